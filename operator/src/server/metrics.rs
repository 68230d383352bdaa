//! The plan server's Prometheus metrics (registered under the `weft_` prefix).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct PlanMetrics {
    pub messages_sent: Family<KindLabel, Counter>,
    pub bytes_sent: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub agents_connected: Gauge,
    pub generation: Gauge,
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
        m
    }
}
