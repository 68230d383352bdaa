//! The plan server's Prometheus metrics (registered under the `weft_` prefix): what was sent and
//! acknowledged, in total and per node, and — read from the store at each scrape — how far each
//! node is from its newest plan.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::PlanStore;
use super::store::NodeConvergence;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

impl NodeLabel {
    pub fn new(node: &str) -> Self {
        Self { node: node.to_owned() }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PlanMetrics {
    pub messages_sent: Family<KindLabel, Counter>,
    pub bytes_sent: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub agents_connected: Gauge,
    pub generation: Gauge,
    pub node_bytes_sent: Family<NodeLabel, Counter>,
    pub node_acks: Family<NodeLabel, Counter>,
    pub node_nacks: Family<NodeLabel, Counter>,
    pub auth_refusals: Family<ReasonLabel, Counter>,
}

impl PlanMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "plan_messages_sent",
            "Plan messages sent to agents, by kind (current, snapshot, delta)",
            m.messages_sent.clone(),
        );
        registry.register(
            "plan_bytes_sent",
            "Encoded bytes of plan messages sent to agents",
            m.bytes_sent.clone(),
        );
        registry.register("plan_acks", "Plan versions acknowledged by agents", m.acks.clone());
        registry.register("plan_nacks", "Plan versions agents could not apply", m.nacks.clone());
        registry.register("agents_connected", "Agents with an open plan stream", m.agents_connected.clone());
        registry.register("plan_generation", "The operator's plan generation", m.generation.clone());
        registry.register(
            "plan_node_bytes_sent",
            "Encoded bytes of plan messages sent, per node",
            m.node_bytes_sent.clone(),
        );
        registry.register("plan_node_acks", "Plan versions acknowledged, per node", m.node_acks.clone());
        registry.register(
            "plan_node_nacks",
            "Plan versions rejected (NACKed), per node",
            m.node_nacks.clone(),
        );
        registry.register(
            "plan_auth_refusals",
            "Plan streams refused, by reason (no_token, invalid, wrong_user, not_bound, wrong_node, unavailable)",
            m.auth_refusals.clone(),
        );
        m
    }
}

/// One per-node gauge's value.
type NodeValue = fn(&NodeConvergence, Instant) -> f64;

/// Convergence read from the store at each scrape, so a node that leaves the plan leaves the
/// metrics too: nodes in the plan and converged, and per node whether it is converged, connected,
/// which plan generation it acknowledged and how long it has lagged behind its newest plan.
///
/// Only the leader exports it: a follower compiles the same plans but serves no agent, so its
/// store would show every node as behind and lagging more each second.
#[derive(Debug)]
pub struct ConvergenceCollector {
    store: Arc<PlanStore>,
    leading: Arc<AtomicBool>,
}

impl ConvergenceCollector {
    /// Registers the collector on `registry`.
    pub fn register(registry: &mut Registry, store: Arc<PlanStore>, leading: Arc<AtomicBool>) {
        registry.register_collector(Box::new(Self { store, leading }));
    }
}

impl Collector for ConvergenceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.leading.load(Ordering::Relaxed) {
            return Ok(());
        }
        let nodes = self.store.convergence();
        let now = Instant::now();
        let converged = nodes.iter().filter(|n| n.converged()).count();
        let total = ConstGauge::new(i64::try_from(nodes.len()).unwrap_or(i64::MAX));
        total.encode(encoder.encode_descriptor(
            "plan_nodes",
            "Nodes in the plan",
            None,
            MetricType::Gauge,
        )?)?;
        let done = ConstGauge::new(i64::try_from(converged).unwrap_or(i64::MAX));
        done.encode(encoder.encode_descriptor(
            "plan_nodes_converged",
            "Nodes whose agent acknowledged their newest plan",
            None,
            MetricType::Gauge,
        )?)?;
        let per_node: [(&str, &str, NodeValue); 4] = [
            ("plan_node_converged", "1 when the node's agent acknowledged its newest plan", |n, _| {
                f64::from(u8::from(n.converged()))
            }),
            ("plan_node_connected", "1 while the node's agent has a plan stream open", |n, _| {
                f64::from(u8::from(n.report.connected))
            }),
            (
                "plan_node_acked_generation",
                "Plan generation of the newest plan the node's agent acknowledged",
                // Generations count compiles; far below 2^53, so exact as a float.
                |n, _| n.report.acked_generation as f64,
            ),
            (
                "plan_node_lag_seconds",
                "Seconds since the node's plan first differed from what its agent acknowledged (0 when converged)",
                |n, now| n.lag(now).as_secs_f64(),
            ),
        ];
        for (name, help, value) in per_node {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for node in &nodes {
                let label = NodeLabel::new(&node.node);
                ConstGauge::new(value(node, now)).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// The instruments the operator exports over OTLP (through the global meter provider that
/// `weft_api::telemetry::init` installs when an OTLP endpoint is set; no-ops otherwise): the
/// convergence an admin alerts on, read from the store at each export, by the leader only (as
/// [`ConvergenceCollector`]). Keep the returned handles alive for as long as they should be
/// exported.
pub fn register_otlp(
    store: Arc<PlanStore>,
    leading: Arc<AtomicBool>,
) -> Vec<opentelemetry::metrics::ObservableGauge<f64>> {
    let meter = opentelemetry::global::meter("weft-operator");
    let connected = store.clone();
    // The nodes as this replica reports them: none unless it leads.
    let reported =
        Arc::new(move || if leading.load(Ordering::Relaxed) { store.convergence() } else { Vec::new() });
    let (nodes, converged, lagging) = (reported.clone(), reported.clone(), reported);
    vec![
        meter
            .f64_observable_gauge("weft.plan.nodes")
            .with_description("Nodes in the plan")
            .with_callback(move |o| o.observe(nodes().len() as f64, &[]))
            .build(),
        meter
            .f64_observable_gauge("weft.plan.nodes.converged")
            .with_description("Nodes whose agent acknowledged their newest plan")
            .with_callback(move |o| {
                o.observe(converged().iter().filter(|n| n.converged()).count() as f64, &[])
            })
            .build(),
        meter
            .f64_observable_gauge("weft.agents.connected")
            .with_description("Agents with an open plan stream")
            .with_callback(move |o| o.observe(connected.connected_agents() as f64, &[]))
            .build(),
        meter
            .f64_observable_gauge("weft.plan.node.lag")
            .with_description("Seconds since the node's plan first differed from what its agent acknowledged")
            .with_unit("s")
            .with_callback(move |o| {
                let now = Instant::now();
                for node in lagging() {
                    o.observe(
                        node.lag(now).as_secs_f64(),
                        &[opentelemetry::KeyValue::new("node", node.node)],
                    );
                }
            })
            .build(),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::plan::{Scope, Update};
    use weft_api::plan::{self as pb, Kind, Resource, ResourceKey};

    #[test]
    fn only_the_leader_exports_convergence() {
        let store = Arc::new(PlanStore::new());
        let plan = pb::NodePlan { name: "n1".into(), ..Default::default() };
        store.publish(
            vec![Update {
                scope: Scope::Node("n1".into()),
                key: ResourceKey::new(Kind::Node, "node"),
                resource: Some(Arc::new(Resource::encode(Kind::Node, "node", &plan))),
            }],
            HashMap::new(),
        );
        let leading = Arc::new(AtomicBool::new(false));
        let mut registry = weft_api::telemetry::new_registry();
        ConvergenceCollector::register(&mut registry, store, leading.clone());
        let scrape = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
            text
        };
        let follower = scrape();
        assert!(!follower.contains("weft_plan_node"), "a follower serves no agent:\n{follower}");
        leading.store(true, Ordering::Relaxed);
        let leader = scrape();
        assert!(leader.contains("weft_plan_nodes 1"), "{leader}");
        assert!(leader.contains("weft_plan_node_converged{node=\"n1\"} 0"), "{leader}");
    }
}
