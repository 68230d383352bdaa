//! Standard Kubernetes status conditions, shared by every Weft resource.
//!
//! Every status carries a list of [`Condition`]s (`type`, `status`, `reason`, `message`,
//! `observedGeneration`, `lastTransitionTime`), keyed by `type`. The helpers here keep the usual
//! contract: replacing a condition whose `status` did not change keeps its `lastTransitionTime`, so
//! `kubectl describe` says since when a resource has been in its state, not when the operator last
//! looked at it.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Condition `status` value: the condition holds.
pub const STATUS_TRUE: &str = "True";
/// Condition `status` value: the condition does not hold.
pub const STATUS_FALSE: &str = "False";
/// Condition `status` value: the operator cannot tell (yet).
pub const STATUS_UNKNOWN: &str = "Unknown";

/// Condition types used in Weft statuses.
pub mod types {
    /// The resource is accepted and in force (all resources).
    pub const READY: &str = "Ready";
    /// An `IPPool`'s CIDR overlaps another pool's (`IPPool`).
    pub const OVERLAPPING: &str = "Overlapping";
    /// An `IPPool` has no free block left to hand to a node (`IPPool`).
    pub const EXHAUSTED: &str = "Exhausted";
    /// A `ProxyPolicy` selects a Service that an older policy already selects (`ProxyPolicy`).
    pub const CONFLICTED: &str = "Conflicted";
}

/// Condition reasons (CamelCase, as the API conventions ask) used in Weft statuses.
pub mod reasons {
    /// Ready=True: the operator compiled the resource into the plan.
    pub const RECONCILED: &str = "Reconciled";
    /// NetworkConfig Ready=True: every node acknowledged the newest plan.
    pub const CONVERGED: &str = "Converged";
    /// NetworkConfig Ready=False: some nodes have not acknowledged the newest plan yet.
    pub const CONVERGING: &str = "Converging";
    /// NetworkConfig Ready=False: at least one node rejected (NACKed) the newest plan.
    pub const PLAN_REJECTED: &str = "PlanRejected";
    /// Ready=False: the spec passed admission but the operator cannot use it (see message).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// NetworkConfig Ready=False: no IPPool is usable, so pods cannot get addresses.
    pub const NO_POOL: &str = "NoUsablePool";
    /// IPPool Ready=False: the pool is disabled and hands out no new blocks.
    pub const DISABLED: &str = "Disabled";
    /// IPPool Overlapping=True: the pool's CIDR overlaps another pool.
    pub const CIDR_OVERLAP: &str = "CIDROverlap";
    /// IPPool Overlapping=False.
    pub const NO_OVERLAP: &str = "NoOverlap";
    /// IPPool Exhausted=True: every block of the pool is allocated.
    pub const NO_FREE_BLOCKS: &str = "NoFreeBlocks";
    /// IPPool Exhausted=False.
    pub const BLOCKS_AVAILABLE: &str = "BlocksAvailable";
    /// ProxyPolicy Conflicted=True: an older policy selects one of the same Services and wins.
    pub const OLDER_POLICY_WINS: &str = "OlderPolicyWins";
    /// ProxyPolicy Conflicted=False.
    pub const NO_CONFLICT: &str = "NoConflict";
    /// NetworkConfig Event: a node's agent closed its plan stream; the node gets no changes.
    pub const AGENT_DISCONNECTED: &str = "AgentDisconnected";
    /// NetworkConfig Event: a node's agent that was disconnected has a plan stream again.
    pub const AGENT_RECONNECTED: &str = "AgentReconnected";
}

/// The `status` string for a boolean condition.
#[must_use]
pub fn status_str(holds: bool) -> &'static str {
    if holds { STATUS_TRUE } else { STATUS_FALSE }
}

/// Build a condition stamped with `now` as its transition time.
///
/// Pass it to [`set_condition`], which keeps the previous transition time when the status did not
/// change.
#[must_use]
pub fn new_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(now),
    }
}

/// A boolean condition stamped with the current time (see [`new_condition`]).
#[must_use]
pub fn condition_now(
    type_: &str,
    holds: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> Condition {
    new_condition(type_, status_str(holds), reason, message, observed_generation, Timestamp::now())
}

/// The conditions `new` as they replace `old`: types missing from `new` are dropped, and a
/// condition whose status did not change keeps its transition time.
#[must_use]
pub fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut out = old.to_vec();
    out.retain(|c| new.iter().any(|n| n.type_ == c.type_));
    for c in new {
        set_condition(&mut out, c);
    }
    out
}

/// The condition of type `type_`, if present.
#[must_use]
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
#[must_use]
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == STATUS_TRUE)
}

/// Set `condition`, replacing any condition of the same type.
///
/// When a condition of that type exists with the same `status`, its `lastTransitionTime` is kept
/// (only reason, message and observedGeneration are updated). Returns whether the list changed, so
/// a controller can skip a status write that would change nothing.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_time.clone_from(&existing.last_transition_time);
            }
            if *existing == condition {
                false
            } else {
                *existing = condition;
                true
            }
        }
        None => {
            conditions.push(condition);
            true
        }
    }
}

/// Remove the condition of type `type_`; returns whether one was removed.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn same_status_keeps_transition_time() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            new_condition(types::READY, STATUS_FALSE, reasons::CONVERGING, "1/3", Some(1), at(10)),
        ));
        assert!(set_condition(
            &mut conds,
            new_condition(types::READY, STATUS_FALSE, reasons::CONVERGING, "2/3", Some(1), at(20)),
        ));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].message, "2/3");
        assert_eq!(conds[0].last_transition_time, Time(at(10)));
    }

    #[test]
    fn status_change_moves_transition_time() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            new_condition(types::READY, STATUS_FALSE, reasons::CONVERGING, "", None, at(10)),
        );
        set_condition(
            &mut conds,
            new_condition(types::READY, STATUS_TRUE, reasons::CONVERGED, "", None, at(30)),
        );
        assert_eq!(conds[0].last_transition_time, Time(at(30)));
        assert!(is_condition_true(&conds, types::READY));
    }

    #[test]
    fn identical_condition_is_no_change() {
        let mut conds = Vec::new();
        let c =
            new_condition(types::EXHAUSTED, status_str(false), reasons::BLOCKS_AVAILABLE, "", Some(2), at(5));
        assert!(set_condition(&mut conds, c.clone()));
        let mut later = c;
        later.last_transition_time = Time(at(50));
        assert!(!set_condition(&mut conds, later));
        assert!(remove_condition(&mut conds, types::EXHAUSTED));
        assert!(!remove_condition(&mut conds, types::EXHAUSTED));
    }
}
