//! Tasks a process cannot live without (the operator's watch index and plan compiler, its
//! status writers, the admin server). When one ends or panics the process must end too, so its
//! supervisor (the kubelet) restarts it, instead of answering `/readyz` while it serves stale
//! plans.

use std::fmt::Debug;
use std::future::Future;

use tokio::sync::mpsc;

/// Why a critical task stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub task: &'static str,
    pub why: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} task {}", self.task, self.why)
    }
}

/// Spawns critical tasks and reports the first to stop.
#[derive(Debug)]
pub struct Critical {
    tx: mpsc::UnboundedSender<Failure>,
    rx: mpsc::UnboundedReceiver<Failure>,
}

impl Default for Critical {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx }
    }
}

impl Critical {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task`. Aborting it through the returned handle (at shutdown) is not a failure.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> tokio::task::AbortHandle
    where
        F: Future + Send + 'static,
        F::Output: Debug + Send + 'static,
    {
        let inner = tokio::spawn(task);
        let abort = inner.abort_handle();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let why = match inner.await {
                Ok(output) => format!("ended ({output:?})"),
                Err(e) if e.is_cancelled() => return,
                Err(e) => format!("panicked: {e}"),
            };
            let _ = tx.send(Failure { task: name, why });
        });
        abort
    }

    /// Waits for the first task to end or panic.
    pub async fn failed(&mut self) -> Failure {
        match self.rx.recv().await {
            Some(failure) => failure,
            // Unreachable while `self` holds a sender.
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panic_or_an_end_is_reported_and_an_abort_is_not() {
        let mut critical = Critical::new();
        let aborted = critical.spawn("idle", std::future::pending::<()>());
        aborted.abort();
        critical.spawn("compiler", async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            panic!("index out of bounds");
        });
        let failure =
            tokio::time::timeout(Duration::from_secs(5), critical.failed()).await.expect("reported");
        assert_eq!(failure.task, "compiler");
        assert!(failure.why.starts_with("panicked"), "{failure}");
        critical.spawn("admin", async { Err::<(), _>("address in use") });
        let failure =
            tokio::time::timeout(Duration::from_secs(5), critical.failed()).await.expect("reported");
        assert_eq!(failure.to_string(), "the admin task ended (Err(\"address in use\"))");
    }
}
