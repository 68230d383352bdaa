//! Status and Events, written by the leader only. Desired statuses are computed by pure functions
//! (tested below); writing patches only what differs, so a steady cluster causes no writes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::v1alpha1::conditions::{self as cond, condition_now, merge_conditions, reasons, types};
use weft_api::v1alpha1::{self as api, network_config::NodePlanState};

use super::inputs::StatusInputs;
use super::policy::PolicyMatch;
use super::pools::{pool_status, pool_views};
use crate::plan::model::ObjectKey;
use crate::server::PlanStore;
use crate::server::store::NodeConvergence;

const FIELD_MANAGER: &str = "weft-operator";
const MAX_LAGGING: usize = 10;

pub fn network_status(
    config: &api::NetworkConfig,
    nodes: &[NodeConvergence],
    generation: u64,
) -> api::NetworkConfigStatus {
    let old = config.status.clone().unwrap_or_default();
    let observed = config.metadata.generation;
    let converged = nodes.iter().filter(|n| n.converged()).count();
    let lagging: Vec<NodePlanState> = nodes
        .iter()
        .filter(|n| !n.converged())
        .take(MAX_LAGGING)
        .map(|n| NodePlanState {
            node: n.node.clone(),
            acked_version: (n.report.acked_version != 0).then(|| format!("{:016x}", n.report.acked_version)),
            message: Some(lag_reason(n)),
        })
        .collect();
    let rejected: Vec<&NodeConvergence> = nodes.iter().filter(|n| n.report.nack.is_some()).collect();
    let behind: Vec<String> = nodes
        .iter()
        .filter(|n| !n.converged())
        .take(5)
        .map(|n| format!("{} ({})", n.node, short_lag_reason(n)))
        .collect();
    let ready = if nodes.is_empty() {
        condition_now(types::READY, false, reasons::CONVERGING, "no nodes in the plan yet", observed)
    } else if !rejected.is_empty() {
        let names: Vec<&str> = rejected.iter().map(|n| n.node.as_str()).take(5).collect();
        condition_now(
            types::READY,
            false,
            reasons::PLAN_REJECTED,
            format!(
                "{} node(s) could not apply their plan ({}): the PlanRejected Events and \
                 status.laggingNodes give each agent's error; fix what it names (usually a \
                 NetworkConfig field), the agents retry on their own",
                rejected.len(),
                names.join(", ")
            ),
            observed,
        )
    } else if converged == nodes.len() {
        condition_now(
            types::READY,
            true,
            reasons::CONVERGED,
            format!("all {converged} nodes run the newest plan"),
            observed,
        )
    } else {
        condition_now(
            types::READY,
            false,
            reasons::CONVERGING,
            format!(
                "{converged} of {} nodes run the newest plan; behind: {}. A node stays behind while \
                 its agent is down or cut off from the operator: check the weft-agent pod on it",
                nodes.len(),
                behind.join(", ")
            ),
            observed,
        )
    };
    api::NetworkConfigStatus {
        observed_generation: observed,
        conditions: merge_conditions(&old.conditions, vec![ready]),
        plan_version: Some(generation),
        nodes_total: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
        nodes_converged: u32::try_from(converged).unwrap_or(u32::MAX),
        converged: Some(format!("{converged}/{}", nodes.len())),
        lagging_nodes: lagging,
    }
}

/// Why a node is behind its newest plan, and what to do, for `status.laggingNodes`.
fn lag_reason(n: &NodeConvergence) -> String {
    match (&n.report.nack, n.report.connected) {
        (Some((_, error)), _) => format!("plan rejected: {error}"),
        (None, false) => "agent not connected: the node keeps its last programming but gets no \
                          changes; check the weft-agent pod on this node (status, logs)"
            .to_string(),
        (None, true) => "applying the newest plan".to_string(),
    }
}

fn short_lag_reason(n: &NodeConvergence) -> &'static str {
    match (&n.report.nack, n.report.connected) {
        (Some(_), _) => "plan rejected",
        (None, false) => "agent not connected",
        (None, true) => "applying",
    }
}

pub fn policy_status(policy: &api::ProxyPolicy, matched: Option<&PolicyMatch>) -> api::ProxyPolicyStatus {
    let old = policy.status.clone().unwrap_or_default();
    let observed = policy.metadata.generation;
    let empty = PolicyMatch::default();
    let matched = matched.unwrap_or(&empty);
    let conflicted = if matched.lost_to.is_empty() {
        condition_now(
            types::CONFLICTED,
            false,
            reasons::NO_CONFLICT,
            "no older policy selects the same Services",
            observed,
        )
    } else {
        let detail: Vec<String> = matched
            .lost_to
            .iter()
            .take(5)
            .map(|(svc, winner)| format!("{svc} follows older policy {winner}"))
            .collect();
        condition_now(
            types::CONFLICTED,
            true,
            reasons::OLDER_POLICY_WINS,
            format!(
                "{} Service(s) selected by an older policy: {}; this policy does not apply to them. \
                 Narrow its selector, or remove one of the policies",
                matched.lost_to.len(),
                detail.join(", ")
            ),
            observed,
        )
    };
    let ready = condition_now(
        types::READY,
        true,
        reasons::RECONCILED,
        format!("applies to {} Service(s)", matched.applied.len()),
        observed,
    );
    api::ProxyPolicyStatus {
        observed_generation: observed,
        conditions: merge_conditions(&old.conditions, vec![ready, conflicted]),
        matched_services: matched.applied.iter().take(100).cloned().collect(),
        matched_count: u32::try_from(matched.applied.len()).unwrap_or(u32::MAX),
    }
}

/// Compares statuses ignoring condition timestamps, so recomputing does not cause writes.
fn same_status<S: Serialize>(old: Option<&S>, new: &S) -> bool {
    let strip = |v: serde_json::Value| {
        let mut v = v;
        if let Some(conds) = v.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            for c in conds {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    match (old.and_then(|o| serde_json::to_value(o).ok()), serde_json::to_value(new).ok()) {
        (Some(a), Some(b)) => strip(a) == strip(b),
        _ => false,
    }
}

/// Server-side apply of the whole status: a field the operator wrote before and leaves out now
/// (an emptied `laggingNodes`, skipped when serialising) is removed, which a merge patch would
/// never do.
async fn patch_status<K>(api: &Api<K>, name: &str, status: &impl Serialize) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|_| ())
}

/// Leadership and status writes, so an admin can see which replica writes.
#[derive(Debug, Clone, Default)]
pub struct StatusMetrics {
    pub leader: Gauge,
    pub writes: Counter,
    pub write_errors: Counter,
    /// Where refused status patches and Event writes are also counted, by resource kind; set it
    /// to the registered [`super::metrics::ReconcileMetrics`].
    pub reconcile: super::metrics::ReconcileMetrics,
}

impl StatusMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and writes status",
            m.leader.clone(),
        );
        registry.register("status_writes", "Status patches written to custom resources", m.writes.clone());
        registry.register(
            "status_write_errors",
            "Status patches the API server refused",
            m.write_errors.clone(),
        );
        m
    }
}

/// Writes status while this replica leads; idles otherwise.
pub async fn run(
    client: Client,
    store: Arc<PlanStore>,
    mut inputs: watch::Receiver<StatusInputs>,
    mut leader: watch::Receiver<bool>,
    metrics: StatusMetrics,
) {
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
    let writer = Writer { client: &client, recorder: &recorder, metrics: &metrics };
    let mut reported_nacks: HashSet<(String, u64)> = HashSet::new();
    let mut reported_overlaps: HashSet<String> = HashSet::new();
    let mut reported = Reported::default();
    let mut reported_ingresses = HashSet::new();
    let mut addressed_ingresses = HashSet::new();
    loop {
        let leading = *leader.borrow_and_update();
        metrics.leader.set(i64::from(leading));
        if !leading {
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let snapshot = inputs.borrow_and_update().clone();
        if snapshot.synced {
            writer
                .write_all(&store, &snapshot, &mut reported_nacks, &mut reported_overlaps, &mut reported)
                .await;
            super::ingress::write_status(
                &client,
                &recorder,
                &snapshot.ingress,
                &mut reported_ingresses,
                &mut addressed_ingresses,
            )
            .await;
        }
        tokio::select! {
            _ = inputs.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = leader.changed() => {}
        }
    }
}

/// Events already published, so each state change is reported once.
#[derive(Debug, Default)]
struct Reported {
    /// Nodes whose agent's disconnection was reported.
    disconnected: HashSet<String>,
    /// Pools whose exhaustion was reported.
    exhausted: HashSet<String>,
}

struct Writer<'a> {
    client: &'a Client,
    recorder: &'a Recorder,
    metrics: &'a StatusMetrics,
}

impl Writer<'_> {
    async fn patch<K>(&self, api: Api<K>, name: &str, status: &impl Serialize)
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        match patch_status(&api, name, status).await {
            Ok(()) => {
                self.metrics.writes.inc();
            }
            Err(e) => {
                self.metrics.write_errors.inc();
                let kind = K::kind(&());
                if let Some(resource) = super::metrics::RESOURCES.iter().find(|r| **r == kind) {
                    self.metrics.reconcile.error(resource);
                }
                warn!(error = %e, %kind, name, "cannot write status");
            }
        }
    }

    async fn write_all(
        &self,
        store: &PlanStore,
        inputs: &StatusInputs,
        reported_nacks: &mut HashSet<(String, u64)>,
        reported_overlaps: &mut HashSet<String>,
        reported: &mut Reported,
    ) {
        let (client, recorder) = (self.client, self.recorder);
        let nodes = store.convergence();
        if let Some(config) = &inputs.network {
            let status = network_status(config, &nodes, store.generation());
            if !same_status(config.status.as_ref(), &status) {
                self.patch(Api::<api::NetworkConfig>::all(client.clone()), &config.name_any(), &status).await;
            }
            for node in &nodes {
                // Seen connected before (not a node whose agent has not started yet).
                let gone = !node.report.connected && node.report.last_seen.is_some();
                if gone && reported.disconnected.insert(node.node.clone()) {
                    let note = format!(
                        "node {}: its agent closed the plan stream; the node keeps its last \
                         programming but gets no changes until the agent reconnects (check the \
                         weft-agent pod on {})",
                        node.node, node.node
                    );
                    publish(
                        self.metrics,
                        recorder,
                        config,
                        EventType::Warning,
                        reasons::AGENT_DISCONNECTED,
                        note,
                    )
                    .await;
                } else if node.report.connected && reported.disconnected.remove(&node.node) {
                    let note = format!("node {}: its agent is connected again and catches up", node.node);
                    publish(
                        self.metrics,
                        recorder,
                        config,
                        EventType::Normal,
                        reasons::AGENT_RECONNECTED,
                        note,
                    )
                    .await;
                }
                if let Some((version, error)) = &node.report.nack
                    && reported_nacks.insert((node.node.clone(), *version))
                {
                    publish(
                        self.metrics,
                        recorder,
                        config,
                        EventType::Warning,
                        reasons::PLAN_REJECTED,
                        format!("node {}: {error}", node.node),
                    )
                    .await;
                }
            }
        }
        let views = pool_views(&inputs.pools);
        let usage = store.ipam_usage();
        for (pool, view) in inputs.pools.iter().zip(&views) {
            let status = pool_status(pool, view, &inputs.blocks, &usage);
            let overlapping = cond::is_condition_true(&status.conditions, types::OVERLAPPING);
            let name = pool.name_any();
            if overlapping && reported_overlaps.insert(name.clone()) {
                let message = cond::find_condition(&status.conditions, types::OVERLAPPING)
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                publish(self.metrics, recorder, pool, EventType::Warning, reasons::CIDR_OVERLAP, message)
                    .await;
            } else if !overlapping {
                reported_overlaps.remove(&name);
            }
            let exhausted = cond::is_condition_true(&status.conditions, types::EXHAUSTED);
            if exhausted && reported.exhausted.insert(name.clone()) {
                let message = cond::find_condition(&status.conditions, types::EXHAUSTED)
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                publish(self.metrics, recorder, pool, EventType::Warning, reasons::NO_FREE_BLOCKS, message)
                    .await;
            } else if !exhausted {
                reported.exhausted.remove(&name);
            }
            if !same_status(pool.status.as_ref(), &status) {
                self.patch(Api::<api::IPPool>::all(client.clone()), &name, &status).await;
            }
        }
        for policy in &inputs.policies {
            let key = ObjectKey::new(policy.namespace().unwrap_or_default(), policy.name_any());
            let status = policy_status(policy, inputs.policy_matches.get(&key));
            if !same_status(policy.status.as_ref(), &status) {
                self.patch(
                    Api::<api::ProxyPolicy>::namespaced(client.clone(), &key.namespace),
                    &key.name,
                    &status,
                )
                .await;
            }
        }
    }
}

async fn publish<K: Resource<DynamicType = ()>>(
    metrics: &StatusMetrics,
    recorder: &Recorder,
    object: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        metrics.reconcile.error("Event");
        warn!(error = %e, "cannot publish an Event");
    } else {
        info!(reason, "event published");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::server::store::AgentReport;

    #[test]
    fn network_status_names_the_nodes_that_rejected_their_plan() {
        let config = api::NetworkConfig::new("default", Default::default());
        let nodes = vec![
            NodeConvergence {
                node: "n1".into(),
                desired_version: 7,
                report: AgentReport { acked_version: 7, ..Default::default() },
            },
            NodeConvergence {
                node: "n2".into(),
                desired_version: 7,
                report: AgentReport {
                    acked_version: 5,
                    nack: Some((7, "bad cni dir".into())),
                    connected: true,
                    ..Default::default()
                },
            },
        ];
        let status = network_status(&config, &nodes, 12);
        assert_eq!(status.converged.as_deref(), Some("1/2"));
        assert_eq!(status.plan_version, Some(12));
        let ready = cond::find_condition(&status.conditions, types::READY).expect("Ready condition");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reasons::PLAN_REJECTED));
        assert!(ready.message.contains("n2"));
        assert_eq!(status.lagging_nodes[0].message.as_deref(), Some("plan rejected: bad cni dir"));
    }

    #[test]
    fn a_node_whose_agent_is_gone_is_named_with_what_to_check() {
        let config = api::NetworkConfig::new("default", Default::default());
        let nodes = vec![
            NodeConvergence {
                node: "n1".into(),
                desired_version: 7,
                report: AgentReport { acked_version: 7, connected: true, ..Default::default() },
            },
            NodeConvergence {
                node: "n2".into(),
                desired_version: 7,
                report: AgentReport { acked_version: 5, connected: false, ..Default::default() },
            },
        ];
        let status = network_status(&config, &nodes, 3);
        assert_eq!((status.nodes_converged, status.nodes_total), (1, 2));
        let ready = cond::find_condition(&status.conditions, types::READY).expect("Ready condition");
        assert_eq!(ready.reason, reasons::CONVERGING);
        assert!(ready.message.contains("n2 (agent not connected)"), "{}", ready.message);
        assert!(ready.message.contains("check the weft-agent pod"), "{}", ready.message);
        let lagging = &status.lagging_nodes[0];
        assert_eq!(lagging.node, "n2");
        assert_eq!(lagging.acked_version.as_deref(), Some("0000000000000005"));
        assert!(lagging.message.as_deref().is_some_and(|m| m.starts_with("agent not connected: ")));
    }

    #[test]
    fn recomputing_an_unchanged_status_is_not_a_change() {
        let mut config = api::NetworkConfig::new("default", Default::default());
        let first = network_status(&config, &[], 1);
        config.status = Some(first);
        let second = network_status(&config, &[], 1);
        assert!(same_status(config.status.as_ref(), &second));
    }

    #[test]
    fn a_conflicted_policy_says_which_policy_wins() {
        let spec: api::ProxyPolicySpec =
            serde_json::from_value(serde_json::json!({"selector": {"matchLabels": {"app": "web"}}}))
                .expect("spec");
        let policy = api::ProxyPolicy::new("young", spec);
        let matched = PolicyMatch {
            applied: BTreeSet::new(),
            lost_to: BTreeMap::from([("web".to_string(), "old".to_string())]),
        };
        let status = policy_status(&policy, Some(&matched));
        let c = cond::find_condition(&status.conditions, types::CONFLICTED).expect("Conflicted condition");
        assert_eq!(c.status, "True");
        assert!(c.message.contains("web follows older policy old"), "{}", c.message);
    }
}
