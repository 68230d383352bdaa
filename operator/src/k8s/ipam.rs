//! Block allocation: which node gets which block of which IPPool. The plan is computed by a pure
//! function ([`plan_blocks`]); the leader applies it by creating and deleting `IPBlock` objects.
//! The API server's create-if-absent is the lock: a block name is its CIDR, so two replicas (or a
//! replica racing itself after a restart) can never hand one block to two nodes.
//!
//! A block whose Node is gone is not given back at once: the node's agent may still hand out
//! addresses from its checkpoint, and a node that re-registers under its name keeps its blocks.
//! It is released ([`release_orphans`]) once its node has been gone for a grace period, no pod
//! holds an address in it and no connected agent reports one in use, and it is deleted with a
//! UID and resourceVersion precondition, so only the block that was judged goes (Calico's IPAM
//! waits and checks the same way).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::v1alpha1 as api;

use super::inputs::StatusInputs;
use super::pools::{PoolView, overlap, pool_views};
use crate::plan::model::ObjectKey;
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

/// A block whose node is gone: a candidate for release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub name: String,
    pub cidr: Ipv4Net,
    pub node: String,
    /// The block object's UID and resourceVersion, the preconditions of its deletion.
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    pub create: Vec<NewBlock>,
    /// Blocks whose node is gone (still taken: see [`release_orphans`]).
    pub orphans: Vec<Orphan>,
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
        let Ok(cidr) = block.spec.cidr.parse::<Ipv4Net>() else { continue };
        if nodes.contains_key(&block.spec.node) {
            by_node.entry(block.spec.node.as_str()).or_default().push(cidr);
        } else {
            out.orphans.push(Orphan {
                name: block.name_any(),
                cidr,
                node: block.spec.node.clone(),
                uid: block.metadata.uid.clone(),
                resource_version: block.metadata.resource_version.clone(),
            });
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

/// Why a block whose node is gone is still held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The node may come back under its name (re-registered, or its agent still running).
    Grace { left: Duration },
    /// A pod still holds an address in the block.
    PodAddress { pod: ObjectKey, address: Ipv4Addr },
    /// A connected agent reports addresses of the block in use.
    InUse { used: u32 },
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Grace { left } => {
                write!(f, "the node may come back; released in {}s at the earliest", left.as_secs())
            }
            Held::PodAddress { pod, address } => write!(f, "pod {pod} still holds {address}"),
            Held::InUse { used } => write!(f, "its node's agent reports {used} addresses in use"),
        }
    }
}

/// Which orphaned blocks may go now, and why each of the others is held. `gone_for` is how long
/// each block's node has been seen gone (by this replica: a restart or failover starts the clock
/// again, which only delays); `live_usage` counts only agents that are connected now.
pub fn release_orphans<'a>(
    orphans: &'a [Orphan],
    gone_for: &HashMap<String, Duration>,
    grace: Duration,
    pod_addresses: &BTreeMap<ObjectKey, Ipv4Addr>,
    live_usage: &HashMap<String, u32>,
) -> (Vec<&'a Orphan>, Vec<(&'a Orphan, Held)>) {
    let mut release = Vec::new();
    let mut held = Vec::new();
    for orphan in orphans {
        let gone = gone_for.get(&orphan.name).copied().unwrap_or_default();
        // Checked in this order so the pods are scanned only once the grace is over.
        let why = if gone < grace {
            Some(Held::Grace { left: grace - gone })
        } else if let Some((pod, address)) = pod_addresses.iter().find(|(_, a)| orphan.cidr.contains(*a)) {
            Some(Held::PodAddress { pod: pod.clone(), address: *address })
        } else {
            let used = live_usage.get(&orphan.cidr.to_string()).copied().unwrap_or(0);
            (used > 0).then_some(Held::InUse { used })
        };
        match why {
            Some(why) => held.push((orphan, why)),
            None => release.push(orphan),
        }
    }
    (release, held)
}

/// Claims and releases blocks while this replica leads; a block whose node is gone is released
/// only after `grace` (see [`release_orphans`]).
pub async fn run(
    client: Client,
    store: Arc<PlanStore>,
    mut inputs: watch::Receiver<StatusInputs>,
    mut leader: watch::Receiver<bool>,
    metrics: super::metrics::ReconcileMetrics,
    grace: Duration,
) {
    let blocks: Api<api::IPBlock> = Api::all(client);
    let mut reported: HashSet<String> = HashSet::new();
    // When this replica first saw each orphaned block's node gone.
    let mut gone_since: HashMap<String, Instant> = HashMap::new();
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
                let now = Instant::now();
                gone_since.retain(|name, _| plan.orphans.iter().any(|o| &o.name == name));
                let gone_for: HashMap<String, Duration> = plan
                    .orphans
                    .iter()
                    .map(|o| (o.name.clone(), now - *gone_since.entry(o.name.clone()).or_insert(now)))
                    .collect();
                let (release, held) = release_orphans(
                    &plan.orphans,
                    &gone_for,
                    grace,
                    &snapshot.pod_addresses,
                    &store.live_ipam_usage(),
                );
                for (orphan, why) in held {
                    // Said once per reason kind, not every pass.
                    let reason = std::mem::discriminant(&why);
                    if reported.insert(format!("{}: {reason:?}", orphan.name)) {
                        info!(block = %orphan.cidr, node = %orphan.node, %why, "block of a deleted node held");
                    }
                }
                apply(&blocks, plan.create, &release, plan.starved, &mut reported, &metrics).await;
            }
        } else {
            gone_since.clear();
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
    create: Vec<NewBlock>,
    release: &[&Orphan],
    starved: Vec<(String, String)>,
    reported: &mut HashSet<String>,
    metrics: &super::metrics::ReconcileMetrics,
) {
    for block in create {
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
    for orphan in release {
        // Only the block that was judged: not one deleted and claimed again meanwhile.
        let preconditions =
            Preconditions { uid: orphan.uid.clone(), resource_version: orphan.resource_version.clone() };
        let params = DeleteParams { preconditions: Some(preconditions), ..DeleteParams::default() };
        let name = &orphan.name;
        match api.delete(name, &params).await {
            Ok(_) => info!(block = %orphan.cidr, node = %orphan.node, "block released: its node is gone"),
            // Gone already, or changed since it was judged: the next pass judges it again.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => {
                metrics.error("IPBlock");
                warn!(error = %e, block = %name, "cannot release a block");
            }
        }
    }
    for (node, why) in starved {
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
    fn blocks_of_deleted_nodes_stay_taken_and_reserved_ranges_are_skipped() {
        let mut p = pool("default", "10.244.0.0/24", 26);
        p.spec.reserved = vec!["10.244.0.0/26".into()];
        let blocks = vec![api::IPBlock::for_node("10.244.0.64/26", "default", "gone")];
        let plan = plan_blocks(&nodes(&["a"]), &pool_views(&[p]), &blocks, &HashMap::new());
        assert_eq!(claimed(&plan), ["a=10.244.0.128/26"], "the orphan is not handed out again");
        let names: Vec<&str> = plan.orphans.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, [api::block_name("10.244.0.64/26")]);
    }

    fn orphan(cidr: &str) -> Orphan {
        Orphan {
            name: api::block_name(cidr),
            cidr: cidr.parse().unwrap(),
            node: "gone".into(),
            uid: Some("u1".into()),
            resource_version: Some("7".into()),
        }
    }

    #[test]
    fn an_orphan_is_released_only_after_the_grace_with_no_pod_and_no_live_use() {
        let grace = Duration::from_secs(300);
        let orphans = [orphan("10.244.0.64/26")];
        let name = orphans[0].name.clone();
        let at = |secs| HashMap::from([(name.clone(), Duration::from_secs(secs))]);
        let none = BTreeMap::new();
        let no_use = HashMap::new();

        let (release, held) = release_orphans(&orphans, &at(10), grace, &none, &no_use);
        assert!(release.is_empty());
        assert_eq!(held[0].1, Held::Grace { left: Duration::from_secs(290) });

        let pod = ObjectKey::new("default", "p0");
        let holding = BTreeMap::from([(pod.clone(), Ipv4Addr::new(10, 244, 0, 65))]);
        let (release, held) = release_orphans(&orphans, &at(400), grace, &holding, &no_use);
        assert!(release.is_empty());
        assert_eq!(held[0].1, Held::PodAddress { pod, address: Ipv4Addr::new(10, 244, 0, 65) });

        let elsewhere = BTreeMap::from([(ObjectKey::new("default", "p1"), Ipv4Addr::new(10, 244, 0, 1))]);
        let in_use = HashMap::from([("10.244.0.64/26".to_string(), 2)]);
        let (release, held) = release_orphans(&orphans, &at(400), grace, &elsewhere, &in_use);
        assert!(release.is_empty());
        assert_eq!(held[0].1, Held::InUse { used: 2 });

        let (release, held) = release_orphans(&orphans, &at(400), grace, &elsewhere, &no_use);
        assert!(held.is_empty());
        assert_eq!(release, [&orphans[0]]);
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
