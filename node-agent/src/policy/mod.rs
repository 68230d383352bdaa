//! NetworkPolicy and ClusterNetworkPolicy enforcement on the node, in its own nftables table
//! (`ip weft-policy`).
//!
//! ```text
//! render   PolicyPlan + the node's pods (from IPAM) → Desired (sets, chains, pod maps); pure
//! apply    Desired → one nft transaction with only what changed (all of it after a failure)
//! ```
//!
//! [`PolicyHandle`] is shared by the policy programmer (a new plan) and the CNI server (a new
//! pod): a CNI ADD returns only once the pod's policies are enforced, so a pod is isolated before
//! its first packet. While the cluster has policies, a new pod the plan does not know yet is
//! waited for (the operator usually knows it before the kubelet runs the plugin) and, if the wait
//! runs out, quarantined: dropped both ways until the plan knows it.

pub mod apply;
pub mod render;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use weft_api::plan::{self as pb, Kind, Resource};

use crate::exec::{ExecError, Runner};
use crate::ipam::{IpamHandle, PodRef};
use crate::metrics::AgentMetrics;
pub use render::{Desired, LocalPod, PolicyPlan, render};

/// How long a CNI ADD waits for the plan to know its pod before the pod is quarantined.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy: resource {name} does not decode: {source}")]
    Decode { name: String, source: prost::DecodeError },
    #[error("policy: the nft transaction failed, the ruleset is as it was: {0}")]
    Nft(#[from] ExecError),
}

/// The policy part of the plan, decoded.
pub fn plan_from<'a>(resources: impl Iterator<Item = &'a Resource>) -> Result<PolicyPlan, PolicyError> {
    fn decode<M: prost::Message + Default>(r: &Resource) -> Result<M, PolicyError> {
        r.decode().map_err(|source| PolicyError::Decode { name: r.name.clone(), source })
    }
    let mut plan = PolicyPlan::default();
    for r in resources {
        match r.kind() {
            Kind::NetworkPolicy => {
                plan.policies.insert(r.name.clone(), decode(r)?);
            }
            Kind::ClusterNetworkPolicy => {
                plan.cluster_policies.insert(r.name.clone(), decode(r)?);
            }
            Kind::PolicySet => {
                plan.sets.insert(r.name.clone(), decode(r)?);
            }
            Kind::PolicyTargets => {
                plan.enforcing = true;
                plan.targets = decode::<pb::PolicyTargets>(r)?.pods;
            }
            Kind::Pods => {
                for pod in decode::<pb::NodePods>(r)?.pods {
                    plan.known_uids.insert(pod.uid);
                    plan.known.insert((pod.namespace, pod.name));
                }
            }
            _ => {}
        }
    }
    Ok(plan)
}

/// The node's pods with their addresses, as its IPAM holds them.
pub fn local_pods(ipam: &IpamHandle) -> Vec<LocalPod> {
    ipam.snapshot()
        .allocations()
        .filter(|(_, a)| !a.pod.is_unknown())
        .map(|(_, a)| LocalPod {
            namespace: a.pod.namespace.clone(),
            name: a.pod.name.clone(),
            uid: a.pod.uid.clone(),
            address: a.ip,
        })
        .collect()
}

#[derive(Debug, Default)]
struct State {
    plan: PolicyPlan,
    /// What the table holds; `None`: unknown (start, after a failure), the next sync replaces it.
    written: Option<Desired>,
    /// Whether the table exists (written by this agent or a previous one).
    table: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled after every plan sync: CNI ADDs waiting for their pod wake up.
    synced: Condvar,
}

/// The node's policy enforcement, shared by the programmer and the CNI server.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    shared: Arc<Shared>,
    runner: Runner,
    metrics: AgentMetrics,
    /// False when the node's pod network is not Weft's: another CNI's pods may not even pass
    /// the forward hook, so nothing is programmed.
    enforce: bool,
}

impl PolicyHandle {
    pub fn new(runner: Runner, metrics: AgentMetrics, enforce: bool) -> Self {
        Self { shared: Arc::new(Shared::default()), runner, metrics, enforce }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plan and what was written; a panic mid-sync leaves `written` as it was
        // before the transaction or `None`, both safe.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new plan: enforces it for the node's pods, then wakes the CNI ADDs waiting for it.
    pub fn sync(&self, plan: PolicyPlan, ipam: &IpamHandle) -> Result<Desired, PolicyError> {
        let mut state = self.lock();
        state.plan = plan;
        let result = self.sync_locked(&mut state, ipam);
        drop(state);
        self.shared.synced.notify_all();
        result
    }

    /// The plan saved by an earlier run, before any is applied: CNI ADDs in the meantime are
    /// judged by it (the kernel still holds what it enforced) instead of passing unwaited.
    pub fn seed(&self, plan: PolicyPlan) {
        self.lock().plan = plan;
    }

    /// A CNI ADD allocated `pod`'s address: returns once its policies are enforced.
    pub fn admit(&self, pod: &PodRef, ipam: &IpamHandle) -> Result<(), PolicyError> {
        if !self.enforce {
            return Ok(());
        }
        let started = Instant::now();
        let mut state = self.lock();
        if !state.plan.enforcing {
            return Ok(());
        }
        while !state.plan.knows(&pod.namespace, &pod.name, &pod.uid) {
            let Some(left) = ADMISSION_WAIT.checked_sub(started.elapsed()) else {
                tracing::warn!(%pod, "the plan does not know the pod yet; quarantined until it does");
                break;
            };
            state = self.shared.synced.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        self.sync_locked(&mut state, ipam)?;
        self.metrics.policy_admission_wait.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Whether the table written is still there with its hooks (a `nft flush ruleset` or a
    /// deleted table or base chain fails it); when not, it is replaced in full at once. Returns
    /// whether it had to be.
    pub fn check(&self, ipam: &IpamHandle) -> Result<bool, PolicyError> {
        let mut state = self.lock();
        if !self.enforce || !state.table || self.runner.is_recording() {
            return Ok(false);
        }
        // A failure (no table at all) is a finding, not an error.
        let listing = self.runner.output("nft", &["-j", "list", "chains", "ip"]).unwrap_or_default();
        if crate::nft::chains_present(&listing, apply::TABLE, &apply::BASE_CHAINS) {
            return Ok(false);
        }
        state.written = None;
        self.sync_locked(&mut state, ipam)?;
        Ok(true)
    }

    /// Forgets what was written: the next sync replaces the table.
    pub fn invalidate(&self) {
        self.lock().written = None;
    }

    fn sync_locked(&self, state: &mut State, ipam: &IpamHandle) -> Result<Desired, PolicyError> {
        if !self.enforce {
            return Ok(Desired::default());
        }
        let started = Instant::now();
        let desired = render(&state.plan, &local_pods(ipam));
        if !state.plan.enforcing && desired == Desired::default() {
            // No policy in the cluster: no table (one left by an earlier run goes).
            if state.table || state.written.is_none() {
                self.runner.run_quietly("nft", &["delete", "table", "ip", apply::TABLE]);
                state.table = false;
                state.written = Some(Desired::default());
                self.metrics.policy_policies.set(0);
                self.metrics.policy_isolated_pods.set(0);
                self.metrics.policy_quarantined_pods.set(0);
            }
            return Ok(desired);
        }
        let previous = if state.table { state.written.as_ref() } else { None };
        if previous == Some(&desired) {
            return Ok(desired);
        }
        let script = apply::script(previous, &desired);
        if let Err(e) = self.runner.pipe("nft", &["-f", "-"], &script) {
            state.written = None;
            self.metrics.policy_sync_errors.inc();
            return Err(e.into());
        }
        state.table = true;
        self.metrics.policy_sync_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.policy_policies.set(i64::try_from(state.plan.policies.len()).unwrap_or(i64::MAX));
        self.metrics.policy_isolated_pods.set(i64::try_from(desired.isolated_pods()).unwrap_or(i64::MAX));
        self.metrics.policy_quarantined_pods.set(i64::try_from(desired.quarantine.len()).unwrap_or(i64::MAX));
        tracing::debug!(
            policies = state.plan.policies.len(),
            isolated = desired.isolated_pods(),
            quarantined = desired.quarantine.len(),
            lines = script.lines().count(),
            "policy synced"
        );
        state.written = Some(desired.clone());
        Ok(desired)
    }
}
