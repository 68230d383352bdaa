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

/// The outcome of a service proxy sync: `changed` (rules written), `unchanged`, `error`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Service proxy (see [`crate::proxy`]): kube-proxy's sync_proxy_rules_duration_seconds
    /// (start of a sync to the end of iptables-restore, render included), lines per restore,
    /// syncs by result, full re-syncs after a tampering, and the network programming latency SLI.
    pub proxy_sync_duration: Histogram,
    pub proxy_sync_lines: Histogram,
    pub proxy_syncs: Family<ResultLabel, Counter>,
    pub proxy_full_resyncs: Counter,
    pub proxy_services_refused: Gauge,
    pub network_programming_latency: Histogram,
    pub messages_received: Family<KindLabel, Counter>,
    pub apply_duration: Histogram,
    pub apply_errors: Counter,
    pub record_errors: Counter,
    pub plan_generation: Gauge,
    pub connected: Gauge,
    /// IPAM (see [`crate::cni::CniServer`]): time to answer a pod's address request, and requests
    /// refused because the node's blocks are full or missing.
    pub ipam_allocation_duration: Histogram,
    pub ipam_exhausted: Counter,
    /// DNS (see [`crate::dns`]): Corefile renders and CoreDNS updates.
    pub dns_apply_duration: Histogram,
    pub dns_apply_errors: Counter,
    pub dns_reloads: Counter,
    pub dns_restarts: Counter,
    pub dns_serving: Gauge,
    /// Ingress (see [`crate::ingress`]): nginx config renders and reloads, Ingresses left out.
    pub ingress_apply_duration: Histogram,
    pub ingress_apply_errors: Counter,
    pub ingress_reloads: Counter,
    pub ingress_rejected: Gauge,
    /// NetworkPolicy (see [`crate::policy`]): policies and isolated pods on the node, sync
    /// durations, how long new pods waited for their policies, pods quarantined.
    pub policy_policies: Gauge,
    pub policy_isolated_pods: Gauge,
    pub policy_quarantined_pods: Gauge,
    pub policy_sync_duration: Histogram,
    pub policy_sync_errors: Counter,
    pub policy_admission_wait: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            proxy_sync_duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 15,
            )),
            proxy_sync_lines: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1.0, 4.0, 12,
            )),
            proxy_syncs: Family::default(),
            proxy_full_resyncs: Counter::default(),
            proxy_services_refused: Gauge::default(),
            network_programming_latency: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
            ]),
            messages_received: Family::default(),
            apply_duration: Histogram::new(weft_api::telemetry::duration_buckets()),
            apply_errors: Counter::default(),
            record_errors: Counter::default(),
            plan_generation: Gauge::default(),
            connected: Gauge::default(),
            ipam_allocation_duration: Histogram::new(weft_api::telemetry::duration_buckets()),
            ipam_exhausted: Counter::default(),
            dns_apply_duration: Histogram::new(weft_api::telemetry::duration_buckets()),
            dns_apply_errors: Counter::default(),
            dns_reloads: Counter::default(),
            dns_restarts: Counter::default(),
            dns_serving: Gauge::default(),
            ingress_apply_duration: Histogram::new(weft_api::telemetry::duration_buckets()),
            ingress_apply_errors: Counter::default(),
            ingress_reloads: Counter::default(),
            ingress_rejected: Gauge::default(),
            policy_policies: Gauge::default(),
            policy_isolated_pods: Gauge::default(),
            policy_quarantined_pods: Gauge::default(),
            policy_sync_duration: Histogram::new(weft_api::telemetry::duration_buckets()),
            policy_sync_errors: Counter::default(),
            policy_admission_wait: Histogram::new(weft_api::telemetry::duration_buckets()),
        }
    }
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "agent_proxy_sync_duration_seconds",
            "Service proxy sync: from its start to the end of iptables-restore (kube-proxy's sync_proxy_rules_duration_seconds)",
            m.proxy_sync_duration.clone(),
        );
        registry.register(
            "agent_proxy_sync_lines_written",
            "Lines given to iptables-restore per service proxy sync that wrote anything",
            m.proxy_sync_lines.clone(),
        );
        registry.register(
            "agent_proxy_syncs",
            "Service proxy syncs by result: changed (rules written), unchanged (nothing written), error",
            m.proxy_syncs.clone(),
        );
        registry.register(
            "agent_proxy_full_resyncs",
            "Full re-syncs of the service chains after the canary found them flushed or deleted",
            m.proxy_full_resyncs.clone(),
        );
        registry.register(
            "agent_network_programming_latency_seconds",
            "Network programming latency: EndpointSlice change (last-change-trigger-time) to service rules applied",
            m.network_programming_latency.clone(),
        );
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
            "agent_record_errors",
            "Record files (programmed/*.txt) that could not be rendered or written; the plan applies regardless",
            m.record_errors.clone(),
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
        registry.register(
            "agent_ipam_allocation_duration_seconds",
            "Time to hand a pod an address (checkpointed) on a CNI ADD",
            m.ipam_allocation_duration.clone(),
        );
        registry.register(
            "agent_ipam_exhausted",
            "CNI ADDs refused because the node's blocks were full or it had none yet",
            m.ipam_exhausted.clone(),
        );
        registry.register(
            "agent_dns_apply_duration_seconds",
            "Time to render the Corefile and start or reload CoreDNS",
            m.dns_apply_duration.clone(),
        );
        registry.register(
            "agent_dns_apply_errors",
            "DNS updates that failed (invalid DNS settings, CoreDNS not starting)",
            m.dns_apply_errors.clone(),
        );
        registry.register(
            "agent_dns_reloads",
            "Corefile reloads sent to CoreDNS (SIGUSR1)",
            m.dns_reloads.clone(),
        );
        registry.register(
            "agent_dns_restarts",
            "Times CoreDNS was started again after it exited",
            m.dns_restarts.clone(),
        );
        registry.register(
            "agent_dns_serving",
            "1 while this node serves cluster DNS, 0 when it does not (no DNS settings or no --dns-kubeconfig)",
            m.dns_serving.clone(),
        );
        registry.register(
            "agent_ingress_apply_duration_seconds",
            "Time to render the nginx configuration and start or reload nginx",
            m.ingress_apply_duration.clone(),
        );
        registry.register(
            "agent_ingress_apply_errors",
            "Ingress updates that failed (nginx rejected the configuration or did not start)",
            m.ingress_apply_errors.clone(),
        );
        registry.register(
            "agent_ingress_reloads",
            "Graceful nginx reloads (SIGHUP) after a configuration change",
            m.ingress_reloads.clone(),
        );
        registry.register(
            "agent_proxy_services_refused",
            "Services of the plan left out of the last service proxy sync because they do not render (each is logged with why; the others are programmed)",
            m.proxy_services_refused.clone(),
        );
        registry.register(
            "agent_ingress_rejected",
            "Ingresses in the plan the agent left out of the nginx configuration (invalid)",
            m.ingress_rejected.clone(),
        );
        registry.register(
            "agent_policy_policies",
            "NetworkPolicies enforced on this node (those selecting one of its pods)",
            m.policy_policies.clone(),
        );
        registry.register(
            "agent_policy_isolated_pods",
            "Pods of this node isolated by a NetworkPolicy (ingress, egress or both)",
            m.policy_isolated_pods.clone(),
        );
        registry.register(
            "agent_policy_quarantined_pods",
            "Pods of this node the plan does not know yet: all their traffic is dropped until it does",
            m.policy_quarantined_pods.clone(),
        );
        registry.register(
            "agent_policy_sync_duration_seconds",
            "Policy sync: from its start to the end of the nft transaction",
            m.policy_sync_duration.clone(),
        );
        registry.register(
            "agent_policy_sync_errors",
            "Policy syncs that failed (the ruleset is left as it was)",
            m.policy_sync_errors.clone(),
        );
        registry.register(
            "agent_policy_admission_wait_seconds",
            "CNI ADD: time from the address being allocated to the pod's policies being enforced",
            m.policy_admission_wait.clone(),
        );
        m
    }
}
