//! Block allocation: which node gets which block of which IPPool. The plan is computed by a pure
//! function ([`plan_blocks`]); the leader applies it by creating and deleting `IPBlock` objects.
//! The API server's create-if-absent is the lock: a block name is its CIDR, so two replicas (or a
//! replica racing itself after a restart) can never hand one block to two nodes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::v1alpha1 as api;

use super::inputs::StatusInputs;
use super::pools::{PoolView, overlap, pool_views};
use crate::server::PlanStore;

/// A node gets another block when fewer than this share of one block's addresses are free.
const FREE_FRACTION_BEFORE_NEW_BLOCK: u32 = 4;
/// Upper bound of blocks per node, so a runaway report cannot drain a pool.
const MAX_BLOCKS_PER_NODE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBlock {
    pub cidr: Ipv4Net,
    pub pool: String,
    pub node: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    pub create: Vec<NewBlock>,
    /// IPBlock names to delete: their node is gone.
    pub release: Vec<String>,
    /// Nodes that need a block and find none free: (node, why).
    pub starved: Vec<(String, String)>,
}

/// What to claim and release so every node has addresses: a node without blocks, or whose blocks
/// are nearly full (per its agent's usage report), gets one more block of the first usable pool
/// (by name) that selects it and has one free.
pub fn plan_blocks(
    nodes: &BTreeMap<String, BTreeMap<String, String>>,
    pools: &[PoolView],
    blocks: &[api::IPBlock],
    usage: &HashMap<String, u32>,
) -> Allocation {
    let mut out = Allocation::default();
    let mut taken: HashSet<Ipv4Net> = blocks.iter().filter_map(|b| b.spec.cidr.parse().ok()).collect();
    let mut by_node: HashMap<&str, Vec<Ipv4Net>> = HashMap::new();
    for block in blocks {
        if !nodes.contains_key(&block.spec.node) {
            out.release.push(block.name_any());
        } else if let Ok(cidr) = block.spec.cidr.parse::<Ipv4Net>() {
            by_node.entry(block.spec.node.as_str()).or_default().push(cidr);
        }
    }
    let mut pools: Vec<&PoolView> = pools.iter().filter(|p| p.usable()).collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    // Per pool, where the search for a free block resumes (blocks are handed out in order).
    let mut cursor: HashMap<&str, u64> = HashMap::new();
    for (node, labels) in nodes {
        let owned = by_node.get(node.as_str()).map(Vec::as_slice).unwrap_or_default();
        if !needs_block(owned, usage) || owned.len() >= MAX_BLOCKS_PER_NODE {
            continue;
        }
        let candidates: Vec<&&PoolView> = pools.iter().filter(|p| p.selects(labels)).collect();
        if candidates.is_empty() {
            out.starved.push((node.clone(), "no enabled, non-overlapping IPPool selects this node".into()));
            continue;
        }
        let found = candidates.iter().find_map(|pool| {
            let start = cursor.entry(pool.name.as_str()).or_insert(0);
            let (cidr, next) = free_block(pool, &taken, *start)?;
            *start = next;
            Some((cidr, pool.name.clone()))
        });
        match found {
            Some((cidr, pool)) => {
                taken.insert(cidr);
                out.create.push(NewBlock { cidr, pool, node: node.clone() });
            }
            None => {
                let names: Vec<&str> = candidates.iter().map(|p| p.name.as_str()).collect();
                out.starved.push((
                    node.clone(),
                    format!("every block of IPPool {} is handed out", names.join(", ")),
                ));
            }
        }
    }
    out
}

/// No blocks, or fewer free addresses than a quarter of a block.
fn needs_block(owned: &[Ipv4Net], usage: &HashMap<String, u32>) -> bool {
    let Some(smallest) = owned.iter().map(|b| 1u32 << (32 - u32::from(b.prefix_len()))).min() else {
        return true;
    };
    let size: u32 = owned.iter().map(|b| 1u32 << (32 - u32::from(b.prefix_len()))).sum();
    let used: u32 = owned.iter().map(|b| usage.get(&b.to_string()).copied().unwrap_or(0)).sum();
    size.saturating_sub(used) < smallest / FREE_FRACTION_BEFORE_NEW_BLOCK
}

/// The first block of `pool` at or after index `start` that nobody holds and that touches no
/// reserved range; returns it and the index to resume from.
fn free_block(pool: &PoolView, taken: &HashSet<Ipv4Net>, start: u64) -> Option<(Ipv4Net, u64)> {
    let cidr = pool.cidr?;
    let bits = u32::from(pool.block_size.checked_sub(cidr.prefix_len())?);
    let count = 1u64 << bits.min(32);
    let step = 1u64 << (32 - u32::from(pool.block_size));
    let base = u64::from(u32::from(cidr.network()));
    (start..count).find_map(|i| {
        let addr = Ipv4Addr::from(u32::try_from(base + i * step).ok()?);
        let block = Ipv4Net::new(addr, pool.block_size).ok()?;
        let free = !taken.contains(&block) && !pool.reserved.iter().any(|r| overlap(Some(*r), Some(block)));
        free.then_some((block, i + 1))
    })
}

/// Claims and releases blocks while this replica leads.
pub async fn run(
    client: Client,
    store: Arc<PlanStore>,
    mut inputs: watch::Receiver<StatusInputs>,
    mut leader: watch::Receiver<bool>,
    metrics: super::metrics::ReconcileMetrics,
) {
    let blocks: Api<api::IPBlock> = Api::all(client);
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        if *leader.borrow_and_update() {
            let snapshot = inputs.borrow_and_update().clone();
            if snapshot.synced {
                let plan = plan_blocks(
                    &snapshot.nodes,
                    &pool_views(&snapshot.pools),
                    &snapshot.blocks,
                    &store.ipam_usage(),
                );
                apply(&blocks, plan, &mut reported, &metrics).await;
            }
        }
        tokio::select! {
            _ = inputs.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = leader.changed() => {}
        }
    }
}

async fn apply(
    api: &Api<api::IPBlock>,
    plan: Allocation,
    reported: &mut HashSet<String>,
    metrics: &super::metrics::ReconcileMetrics,
) {
    for block in plan.create {
        let object = api::IPBlock::for_node(&block.cidr.to_string(), &block.pool, &block.node);
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => info!(block = %block.cidr, node = %block.node, pool = %block.pool, "block claimed"),
            // Someone claimed it first: the watch brings their block and the next pass moves on.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                metrics.error("IPBlock");
                warn!(error = %e, block = %block.cidr, "cannot claim a block");
            }
        }
    }
    for name in plan.release {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => info!(block = %name, "block released: its node is gone"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                metrics.error("IPBlock");
                warn!(error = %e, block = %name, "cannot release a block");
            }
        }
    }
    for (node, why) in plan.starved {
        if reported.insert(format!("{node}: {why}")) {
            metrics.exhaustion_events.inc();
            warn!(%node, %why, "node has no address block");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, cidr: &str, block_size: u8) -> api::IPPool {
        let mut spec = api::IPPoolSpec::new(cidr);
        spec.block_size = block_size;
        api::IPPool::new(name, spec)
    }

    fn nodes(names: &[&str]) -> BTreeMap<String, BTreeMap<String, String>> {
        names.iter().map(|n| (n.to_string(), BTreeMap::new())).collect()
    }

    fn claimed(plan: &Allocation) -> Vec<String> {
        plan.create.iter().map(|b| format!("{}={}", b.node, b.cidr)).collect()
    }

    #[test]
    fn every_node_gets_its_own_block_in_order() {
        let views = pool_views(&[pool("default", "10.244.0.0/24", 26)]);
        let plan = plan_blocks(&nodes(&["a", "b"]), &views, &[], &HashMap::new());
        assert_eq!(claimed(&plan), ["a=10.244.0.0/26", "b=10.244.0.64/26"]);
    }

    #[test]
    fn a_nearly_full_node_gets_another_block_and_a_full_pool_says_so() {
        let views = pool_views(&[pool("default", "10.244.0.0/25", 26)]);
        let blocks = vec![api::IPBlock::for_node("10.244.0.0/26", "default", "a")];
        let mut usage = HashMap::from([("10.244.0.0/26".to_string(), 10)]);
        assert!(plan_blocks(&nodes(&["a"]), &views, &blocks, &usage).create.is_empty(), "54 free: enough");
        usage.insert("10.244.0.0/26".into(), 60);
        let plan = plan_blocks(&nodes(&["a", "b"]), &views, &blocks, &usage);
        assert_eq!(claimed(&plan), ["a=10.244.0.64/26"]);
        assert_eq!(plan.starved.len(), 1);
        assert!(plan.starved[0].1.contains("every block of IPPool default is handed out"));
    }

    #[test]
    fn blocks_of_deleted_nodes_are_released_and_reserved_ranges_skipped() {
        let mut p = pool("default", "10.244.0.0/24", 26);
        p.spec.reserved = vec!["10.244.0.0/26".into()];
        let blocks = vec![api::IPBlock::for_node("10.244.0.128/26", "default", "gone")];
        let plan = plan_blocks(&nodes(&["a"]), &pool_views(&[p]), &blocks, &HashMap::new());
        assert_eq!(claimed(&plan), ["a=10.244.0.64/26"]);
        assert_eq!(plan.release, [api::block_name("10.244.0.128/26")]);
    }

    #[test]
    fn overlapping_and_disabled_pools_hand_out_nothing() {
        let mut disabled = pool("c", "10.9.0.0/24", 26);
        disabled.spec.disabled = true;
        let views = pool_views(&[pool("a", "10.244.0.0/16", 26), pool("b", "10.244.8.0/24", 26), disabled]);
        assert_eq!(views[0].overlaps, ["b (10.244.8.0/24)"]);
        let plan = plan_blocks(&nodes(&["n"]), &views, &[], &HashMap::new());
        assert!(plan.create.is_empty());
        assert_eq!(plan.starved[0].1, "no enabled, non-overlapping IPPool selects this node");
    }
}
