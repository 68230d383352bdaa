//! The agent's Prometheus metrics (registered under the `weft_` prefix).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub messages_received: Family<KindLabel, Counter>,
    pub apply_duration: Histogram,
    pub apply_errors: Counter,
    pub plan_generation: Gauge,
    pub connected: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            messages_received: Family::default(),
            apply_duration: Histogram::new(weft_api::telemetry::duration_buckets()),
            apply_errors: Counter::default(),
            plan_generation: Gauge::default(),
            connected: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "agent_plan_messages_received",
            "Plan messages received from the operator, by kind",
            m.messages_received.clone(),
        );
        registry.register(
            "agent_apply_duration_seconds",
            "Time to apply a plan message to the node",
            m.apply_duration.clone(),
        );
        registry.register(
            "agent_apply_errors",
            "Plan applications that failed (NACKed)",
            m.apply_errors.clone(),
        );
        registry.register(
            "agent_plan_generation",
            "Generation of the plan applied on this node",
            m.plan_generation.clone(),
        );
        registry.register(
            "agent_connected",
            "1 while the plan stream to the operator is open",
            m.connected.clone(),
        );
        m
    }
}
