//! Node-local IP address management: pod addresses allocated from the blocks the operator gave
//! this node, with no Kubernetes API call on the pod-start path.
//!
//! Every address of a block is usable (pods get /32s and are routed, Calico-style: no network or
//! broadcast address to skip). An allocation is keyed by the CNI attachment, `(containerID,
//! ifname)`, so a repeated ADD returns the same address. [`IpamCore`] is the pure allocator;
//! [`Allocator`] adds the checkpoint that keeps every live allocation across agent restarts and
//! crashes; [`IpamHandle`] is the shared, lockable handle the CNI socket server and the plan
//! programmer use.

mod checkpoint;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use checkpoint::{Allocator, CHECKPOINT_FILE, IpamHandle};

/// One CNI attachment: a container's interface on the pod network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self { container_id: container_id.into(), ifname: ifname.into() }
    }
}

impl fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// The pod an attachment belongs to, recorded for people, reporting and garbage collection; empty
/// when the runtime did not say (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` absent from
/// `CNI_ARGS`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl PodRef {
    pub fn is_unknown(&self) -> bool {
        self.uid.is_empty() && self.namespace.is_empty() && self.name.is_empty()
    }
}

/// The pods bound to this node, from the plan's `NodePods` resource.
pub fn pods_from_plan(pods: &weft_api::plan::NodePods) -> Vec<PodRef> {
    pods.pods
        .iter()
        .map(|p| PodRef { namespace: p.namespace.clone(), name: p.name.clone(), uid: p.uid.clone() })
        .collect()
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() && self.name.is_empty() {
            f.write_str("(unknown pod)")
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A live allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The block the address came from; it may since have been removed from the plan.
    pub block: Ipv4Net,
    pub pod: PodRef,
}

/// Address use of one block, for reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockUsage {
    pub cidr: Ipv4Net,
    pub used: u64,
    pub size: u64,
    /// False for a block no longer in the plan that still has live allocations: nothing new is
    /// handed out from it.
    pub active: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "node {node} has no pod address block yet: the operator assigns one when an IPPool selects \
         this node and has a free block"
    )]
    NoBlocks { node: String },
    #[error(
        "node {node}: all {size} addresses of its blocks {} are in use; the operator hands out \
         another block when one is free in an IPPool",
        join(blocks)
    )]
    Exhausted { node: String, size: u64, blocks: Vec<Ipv4Net> },
    #[error("pod address block {cidr:?} of pool {pool:?} is not an IPv4 CIDR like 10.244.0.0/26")]
    InvalidBlock { cidr: String, pool: String },
    #[error("cannot read the IPAM checkpoint {path}: {source}")]
    ReadCheckpoint { path: PathBuf, source: std::io::Error },
    #[error(
        "the IPAM checkpoint {path} is corrupt ({reason}); refusing to start rather than hand out \
         addresses that running pods may hold: repair or move it aside"
    )]
    CorruptCheckpoint { path: PathBuf, reason: String },
    #[error("cannot write the IPAM checkpoint {path}: {source}; the address was not handed out")]
    WriteCheckpoint { path: PathBuf, source: std::io::Error },
}

fn join(blocks: &[Ipv4Net]) -> String {
    blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The blocks of a `NodePlan`, parsed and normalized; IPv4 only.
pub fn blocks_from_plan(node: &weft_api::plan::NodePlan) -> Result<Vec<Ipv4Net>, IpamError> {
    node.blocks
        .iter()
        .map(|b| {
            b.cidr
                .trim()
                .parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|_| IpamError::InvalidBlock { cidr: b.cidr.clone(), pool: b.pool.clone() })
        })
        .collect()
}

fn block_size(block: &Ipv4Net) -> u64 {
    1u64 << (32 - u32::from(block.prefix_len()))
}

/// The pure allocator: no I/O, every operation deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamCore {
    node: String,
    /// The plan's blocks, sorted and de-duplicated: new addresses come from these only.
    blocks: Vec<Ipv4Net>,
    allocations: BTreeMap<AttachmentKey, Allocation>,
    by_ip: BTreeMap<Ipv4Addr, AttachmentKey>,
    /// The last address handed out: the search for a free one starts after it, so a released
    /// address is not handed out again at once (conntrack entries and peers' caches of the old pod
    /// get time to expire).
    cursor: Option<Ipv4Addr>,
}

impl IpamCore {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            blocks: Vec::new(),
            allocations: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            cursor: None,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The blocks new addresses come from.
    pub fn blocks(&self) -> &[Ipv4Net] {
        &self.blocks
    }

    /// Replaces the node's blocks with the plan's. Allocations from a removed block stay until
    /// released; nothing new is handed out from it. Returns whether anything changed.
    pub fn set_blocks(&mut self, blocks: impl IntoIterator<Item = Ipv4Net>) -> bool {
        let set: BTreeSet<Ipv4Net> = blocks.into_iter().map(|b| b.trunc()).collect();
        let blocks: Vec<Ipv4Net> = set.into_iter().collect();
        if blocks == self.blocks {
            return false;
        }
        self.blocks = blocks;
        true
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&AttachmentKey, &Allocation)> {
        self.allocations.iter()
    }

    pub fn len(&self) -> usize {
        self.allocations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty()
    }

    /// The address of `key`: its existing one (idempotent ADD), or a free one from the node's
    /// blocks. The flag is true when the address is newly allocated.
    pub fn allocate(&mut self, key: &AttachmentKey, pod: &PodRef) -> Result<(Allocation, bool), IpamError> {
        if let Some(existing) = self.allocations.get(key) {
            return Ok((existing.clone(), false));
        }
        if self.blocks.is_empty() {
            return Err(IpamError::NoBlocks { node: self.node.clone() });
        }
        let (ip, block) = self.find_free().ok_or_else(|| IpamError::Exhausted {
            node: self.node.clone(),
            size: self.blocks.iter().map(block_size).sum(),
            blocks: self.blocks.clone(),
        })?;
        let allocation = Allocation { ip, block, pod: pod.clone() };
        self.allocations.insert(key.clone(), allocation.clone());
        self.by_ip.insert(ip, key.clone());
        self.cursor = Some(ip);
        Ok((allocation, true))
    }

    /// Next-fit over the blocks in address order, starting after the cursor and wrapping.
    fn find_free(&self) -> Option<(Ipv4Addr, Ipv4Net)> {
        let start = self.cursor.map_or(0, |c| u32::from(c).wrapping_add(1));
        let free_in = |block: &Ipv4Net, from: u32| -> Option<Ipv4Addr> {
            let first = u32::from(block.network()).max(from);
            let last = u32::from(block.broadcast());
            (first..=last).map(Ipv4Addr::from).find(|ip| !self.by_ip.contains_key(ip))
        };
        // Blocks are sorted: first those at or after the cursor, then all of them from the start.
        self.blocks
            .iter()
            .filter(|b| u32::from(b.broadcast()) >= start)
            .find_map(|b| free_in(b, start).map(|ip| (ip, *b)))
            .or_else(|| self.blocks.iter().find_map(|b| free_in(b, 0).map(|ip| (ip, *b))))
    }

    /// Releases `key`'s address; an unknown key is not an error (DEL is idempotent).
    pub fn release(&mut self, key: &AttachmentKey) -> Option<Allocation> {
        let allocation = self.allocations.remove(key)?;
        self.by_ip.remove(&allocation.ip);
        Some(allocation)
    }

    /// CNI GC: releases every allocation whose attachment is not in `valid`.
    pub fn gc(&mut self, valid: &BTreeSet<AttachmentKey>) -> Vec<(AttachmentKey, Allocation)> {
        let stale: Vec<AttachmentKey> =
            self.allocations.keys().filter(|k| !valid.contains(*k)).cloned().collect();
        stale.into_iter().filter_map(|k| self.release(&k).map(|a| (k, a))).collect()
    }

    /// The attachments whose pod is not among `live` (matched by UID, or by namespace and name):
    /// candidates for release once a second observation confirms them. Attachments of an unknown
    /// pod are never candidates.
    pub fn stale_by_pods(&self, live: &[PodRef]) -> Vec<AttachmentKey> {
        let uids: BTreeSet<&str> = live.iter().map(|p| p.uid.as_str()).filter(|u| !u.is_empty()).collect();
        let names: BTreeSet<(&str, &str)> = live
            .iter()
            .filter(|p| !p.name.is_empty())
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        self.allocations
            .iter()
            .filter(|(_, a)| {
                // `uids` holds no empty UID, so an allocation without one never matches by UID.
                let live = uids.contains(a.pod.uid.as_str())
                    || names.contains(&(a.pod.namespace.as_str(), a.pod.name.as_str()));
                !a.pod.is_unknown() && !live
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Use of every block: the plan's blocks, then removed blocks that still have live addresses.
    pub fn usage(&self) -> Vec<BlockUsage> {
        let mut used: BTreeMap<Ipv4Net, u64> = BTreeMap::new();
        for allocation in self.allocations.values() {
            *used.entry(allocation.block).or_default() += 1;
        }
        let mut out: Vec<BlockUsage> = self
            .blocks
            .iter()
            .map(|b| BlockUsage {
                cidr: *b,
                used: used.remove(b).unwrap_or(0),
                size: block_size(b),
                active: true,
            })
            .collect();
        out.extend(used.into_iter().map(|(cidr, used)| BlockUsage {
            cidr,
            used,
            size: block_size(&cidr),
            active: false,
        }));
        out
    }

    /// True when an ADD can be served: the node has at least one block.
    pub fn ready(&self) -> bool {
        !self.blocks.is_empty()
    }

    pub(crate) fn cursor(&self) -> Option<Ipv4Addr> {
        self.cursor
    }

    /// Rebuilds the state from a checkpoint's parts, rejecting duplicates.
    pub(crate) fn restore(
        node: impl Into<String>,
        blocks: Vec<Ipv4Net>,
        cursor: Option<Ipv4Addr>,
        allocations: Vec<(AttachmentKey, Allocation)>,
    ) -> Result<Self, String> {
        let mut core = Self::new(node);
        core.set_blocks(blocks);
        core.cursor = cursor;
        for (key, allocation) in allocations {
            if !allocation.block.contains(&allocation.ip) {
                return Err(format!(
                    "address {} of {key} is not in its block {}",
                    allocation.ip, allocation.block
                ));
            }
            if let Some(other) = core.by_ip.get(&allocation.ip) {
                return Err(format!("address {} is held by both {other} and {key}", allocation.ip));
            }
            if core.allocations.contains_key(&key) {
                return Err(format!("attachment {key} appears twice"));
            }
            core.by_ip.insert(allocation.ip, key.clone());
            core.allocations.insert(key, allocation);
        }
        Ok(core)
    }
}

#[cfg(test)]
mod tests;
