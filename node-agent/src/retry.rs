//! Retry delays for reconnects and daemon restarts: doubling from a first delay up to a cap, for
//! as long as it takes (backon's exponential backoff, without jitter or a retry limit).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays that double on every failure, from `first` up to `cap`.
#[derive(Debug)]
pub struct Doubling {
    delays: ExponentialBackoff,
    first: Duration,
    cap: Duration,
}

impl Doubling {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self { delays: Self::delays(first, cap), first, cap: cap.max(first) }
    }

    fn delays(first: Duration, cap: Duration) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(cap.max(first))
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // Without a retry limit backon never runs out; the cap is the answer if it did.
        self.delays.next().unwrap_or(self.cap)
    }

    /// Back to the first delay: what failed had been working for a while.
    pub fn reset(&mut self) {
        self.delays = Self::delays(self.first, self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_a_reset_starts_again() {
        let ms = Duration::from_millis;
        let mut delays = Doubling::new(ms(100), ms(500));
        // backon multiplies by an f32 factor: a few nanoseconds off.
        let seen: Vec<u128> = (0..5).map(|_| delays.next_delay().as_millis()).collect();
        assert_eq!(seen, [100, 200, 400, 500, 500]);
        delays.reset();
        assert_eq!(delays.next_delay(), ms(100));
    }
}
