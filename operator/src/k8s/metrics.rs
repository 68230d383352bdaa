//! The operator's reconcile metrics (registered under the `weft_` prefix): errors by resource,
//! IPAM exhaustion events, and — read at each scrape from what the operator watches and what
//! the agents report — the size, use and free addresses of every IPPool.

use std::collections::HashMap;
use std::sync::Arc;

use kube::ResourceExt as _;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::inputs::StatusInputs;
use super::pools::{pool_status, pool_views};
use crate::server::PlanStore;

/// The kinds of object the operator reconciles or writes, as `resource` label values.
pub const RESOURCES: &[&str] = &[
    "Node",
    "Service",
    "EndpointSlice",
    "Pod",
    "IPBlock",
    "IPPool",
    "NetworkConfig",
    "ProxyPolicy",
    "Event",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

/// Counters shared by the watchers, the block allocator and the status writer.
#[derive(Debug, Clone, Default)]
pub struct ReconcileMetrics {
    /// Failed watches, status patches, block claims and releases, Event writes, by resource kind.
    pub errors: Family<ResourceLabel, Counter>,
    /// Times a node needed an address block and no IPPool selecting it had one free.
    pub exhaustion_events: Counter,
}

impl ReconcileMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // Every kind is exported from the start at 0, so "errors by resource" is never empty.
        for resource in RESOURCES {
            drop(m.errors.get_or_create(&ResourceLabel { resource }));
        }
        registry.register(
            "reconcile_errors",
            "Errors while watching, claiming blocks or writing status and Events, by resource kind",
            m.errors.clone(),
        );
        registry.register(
            "ipam_exhaustion_events",
            "Times a node needed an address block and every IPPool selecting it was full",
            m.exhaustion_events.clone(),
        );
        m
    }

    /// Counts one error about `resource` (one of [`RESOURCES`]).
    pub fn error(&self, resource: &'static str) {
        self.errors.get_or_create(&ResourceLabel { resource }).inc();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

/// Per-pool address and block counts, computed like the IPPool status (same function), so the
/// dashboard and `kubectl get ippools` never disagree.
#[derive(Debug)]
pub struct PoolCollector {
    store: Arc<PlanStore>,
    inputs: watch::Receiver<StatusInputs>,
}

impl PoolCollector {
    pub fn register(registry: &mut Registry, store: Arc<PlanStore>, inputs: watch::Receiver<StatusInputs>) {
        registry.register_collector(Box::new(Self { store, inputs }));
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (pools, blocks, nodes) = {
            let inputs = self.inputs.borrow();
            (inputs.pools.clone(), inputs.blocks.clone(), inputs.nodes.clone())
        };
        let usage: HashMap<String, u32> = self.store.ipam_usage();
        let views = pool_views(&pools);
        let rows: Vec<(String, [u64; 6])> = pools
            .iter()
            .zip(&views)
            .map(|(pool, view)| {
                let s = pool_status(pool, view, &blocks, &usage);
                let name = pool.name_any();
                let of_deleted_nodes = blocks
                    .iter()
                    .filter(|b| b.spec.pool == name && !nodes.contains_key(&b.spec.node))
                    .count();
                let counts = [
                    s.total_addresses,
                    s.used_addresses,
                    s.free_addresses,
                    u64::from(s.total_blocks),
                    u64::from(s.allocated_blocks),
                    u64::try_from(of_deleted_nodes).unwrap_or(u64::MAX),
                ];
                (name, counts)
            })
            .collect();
        let gauges = [
            ("ipam_pool_addresses", "Addresses in the pool's CIDR"),
            ("ipam_pool_addresses_used", "Addresses of the pool in use by pods, as the agents report"),
            ("ipam_pool_addresses_free", "Addresses of the pool not in use"),
            ("ipam_pool_blocks", "Blocks the pool's CIDR holds"),
            ("ipam_pool_blocks_allocated", "Blocks of the pool handed to nodes"),
            (
                "ipam_pool_blocks_of_deleted_nodes",
                "Blocks of the pool whose Node is gone, kept until the grace has passed and no pod holds an address in them",
            ),
        ];
        for (i, (name, help)) in gauges.into_iter().enumerate() {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (pool, counts) in &rows {
                let value = i64::try_from(counts[i]).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(&PoolLabel { pool: pool.clone() })?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::metrics::ConvergenceCollector;
    use weft_api::v1alpha1 as api;

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    #[test]
    fn pools_and_errors_are_exported_with_their_labels() {
        let store = Arc::new(PlanStore::new());
        store.ipam_report("n1", vec![weft_api::plan::BlockUsage { cidr: "10.244.0.0/26".into(), used: 5 }]);
        let inputs = StatusInputs {
            pools: vec![api::IPPool::new("default", api::IPPoolSpec::new("10.244.0.0/24"))],
            blocks: vec![
                api::IPBlock::for_node("10.244.0.0/26", "default", "n1"),
                api::IPBlock::for_node("10.244.0.64/26", "default", "deleted"),
            ],
            nodes: [("n1".to_string(), Default::default())].into(),
            ..Default::default()
        };
        let (_tx, rx) = watch::channel(inputs);
        let mut registry = weft_api::telemetry::new_registry();
        let metrics = ReconcileMetrics::register(&mut registry);
        PoolCollector::register(&mut registry, store.clone(), rx);
        ConvergenceCollector::register(&mut registry, store, Arc::new(true.into()));
        metrics.error("IPPool");
        let text = encode(&registry);
        for line in [
            "weft_ipam_pool_addresses{pool=\"default\"} 256",
            "weft_ipam_pool_addresses_used{pool=\"default\"} 5",
            "weft_ipam_pool_addresses_free{pool=\"default\"} 251",
            "weft_ipam_pool_blocks_allocated{pool=\"default\"} 2",
            "weft_ipam_pool_blocks_of_deleted_nodes{pool=\"default\"} 1",
            "weft_reconcile_errors_total{resource=\"IPPool\"} 1",
            "weft_reconcile_errors_total{resource=\"Service\"} 0",
            "weft_ipam_exhaustion_events_total 0",
            "weft_plan_nodes 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
