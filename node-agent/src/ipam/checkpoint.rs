//! The allocator with its checkpoint: every change is on disk (temp file, fsync, rename, fsync of
//! the directory) before the caller sees its result, so an address handed to a pod survives an
//! agent crash at any point, and a restarted agent never hands it out twice.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::files::{self, Access, Durability};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{Allocation, AttachmentKey, BlockUsage, IpamCore, IpamError, PodRef};

/// The checkpoint's file name in the agent's state dir.
pub const CHECKPOINT_FILE: &str = "ipam.json";

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    node: String,
    blocks: Vec<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor: Option<Ipv4Addr>,
    allocations: Vec<CheckpointEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointEntry {
    container_id: String,
    ifname: String,
    ip: Ipv4Addr,
    block: Ipv4Net,
    #[serde(default)]
    pod_namespace: String,
    #[serde(default)]
    pod_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pod_uid: String,
}

/// The allocator of one node, persisted in `<state dir>/ipam.json`.
#[derive(Debug)]
pub struct Allocator {
    core: IpamCore,
    path: PathBuf,
    /// Attachments found without a live pod by [`Self::observe_pods`], with when that was first
    /// seen. In memory only: a restarted agent needs two fresh observations before releasing.
    suspects: BTreeMap<AttachmentKey, Instant>,
    /// Counts saved changes, so watchers know when usage may have changed.
    generation: u64,
}

impl Allocator {
    /// Loads the checkpoint in `state_dir` (none: an empty allocator). A checkpoint that does not
    /// parse or holds a duplicate is an error: starting empty would hand out addresses that
    /// running pods hold.
    pub fn open(state_dir: &Path, node: &str) -> Result<Self, IpamError> {
        let path = state_dir.join(CHECKPOINT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::with(IpamCore::new(node), path));
            }
            Err(source) => return Err(IpamError::ReadCheckpoint { path, source }),
        };
        let corrupt = |reason: String| IpamError::CorruptCheckpoint { path: path.clone(), reason };
        let file: CheckpointFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {}, this agent reads version {FORMAT_VERSION}",
                file.version
            )));
        }
        let allocations = file
            .allocations
            .into_iter()
            .map(|e| {
                (
                    AttachmentKey::new(e.container_id, e.ifname),
                    Allocation {
                        ip: e.ip,
                        block: e.block,
                        pod: PodRef { namespace: e.pod_namespace, name: e.pod_name, uid: e.pod_uid },
                    },
                )
            })
            .collect();
        let core = IpamCore::restore(node, file.blocks, file.cursor, allocations).map_err(corrupt)?;
        Ok(Self::with(core, path))
    }

    fn with(core: IpamCore, path: PathBuf) -> Self {
        Self { core, path, suspects: BTreeMap::new(), generation: 0 }
    }

    /// Increases with every saved change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn core(&self) -> &IpamCore {
        &self.core
    }

    /// Applies `change` and saves the result; on a failed save the change is undone, so memory and
    /// disk never disagree.
    fn commit<T>(
        &mut self,
        change: impl FnOnce(&mut IpamCore) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        let before = self.core.clone();
        let (out, changed) = change(&mut self.core)?;
        if changed {
            if let Err(e) = self.save() {
                self.core = before;
                return Err(e);
            }
            self.generation += 1;
        }
        Ok(out)
    }

    /// Replaces the node's blocks with the plan's (see [`IpamCore::set_blocks`]).
    pub fn set_blocks(&mut self, blocks: Vec<Ipv4Net>) -> Result<bool, IpamError> {
        self.commit(|core| {
            let changed = core.set_blocks(blocks);
            Ok((changed, changed))
        })
    }

    /// The address of an attachment, saved before it is returned.
    pub fn allocate(&mut self, key: &AttachmentKey, pod: &PodRef) -> Result<Allocation, IpamError> {
        self.commit(|core| core.allocate(key, pod))
    }

    /// Releases an attachment's address; unknown is fine.
    pub fn release(&mut self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        self.commit(|core| {
            let released = core.release(key);
            let changed = released.is_some();
            Ok((released, changed))
        })
    }

    /// CNI GC: releases every allocation not in `valid`.
    pub fn gc(
        &mut self,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Result<Vec<(AttachmentKey, Allocation)>, IpamError> {
        self.commit(|core| {
            let released = core.gc(valid);
            let changed = !released.is_empty();
            Ok((released, changed))
        })
    }

    /// Garbage collection against the pods bound to this node (the plan's `NodePods`): an
    /// attachment whose pod is not in `live` is released only when a second observation, at least
    /// `min_gap` after the first, still does not list it; one that reappears is forgiven. Call it
    /// only with a complete list (not before the plan holds one).
    pub fn observe_pods(
        &mut self,
        live: &[PodRef],
        now: Instant,
        min_gap: Duration,
    ) -> Result<Vec<(AttachmentKey, Allocation)>, IpamError> {
        let stale: BTreeSet<AttachmentKey> = self.core.stale_by_pods(live).into_iter().collect();
        self.suspects.retain(|k, _| stale.contains(k));
        let confirmed: BTreeSet<AttachmentKey> = self
            .suspects
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= min_gap)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &stale {
            self.suspects.entry(key.clone()).or_insert(now);
        }
        if confirmed.is_empty() {
            return Ok(Vec::new());
        }
        let released = self.commit(|core| {
            let released: Vec<_> =
                confirmed.iter().filter_map(|k| core.release(k).map(|a| (k.clone(), a))).collect();
            let changed = !released.is_empty();
            Ok((released, changed))
        })?;
        for (key, _) in &released {
            self.suspects.remove(key);
        }
        Ok(released)
    }

    fn save(&self) -> Result<(), IpamError> {
        let file = CheckpointFile {
            version: FORMAT_VERSION,
            node: self.core.node().to_string(),
            blocks: self.core.blocks().to_vec(),
            cursor: self.core.cursor(),
            allocations: self
                .core
                .allocations()
                .map(|(k, a)| CheckpointEntry {
                    container_id: k.container_id.clone(),
                    ifname: k.ifname.clone(),
                    ip: a.ip,
                    block: a.block,
                    pod_namespace: a.pod.namespace.clone(),
                    pod_name: a.pod.name.clone(),
                    pod_uid: a.pod.uid.clone(),
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| IpamError::WriteCheckpoint {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        files::replace(&self.path, &bytes, Durability::Committed, Access::Public)
            .map_err(|source| IpamError::WriteCheckpoint { path: self.path.clone(), source })
    }
}

/// The agent's shared handle on its allocator: cheap to clone, safe to use from any thread. Its
/// methods do blocking file I/O (the checkpoint's fsync): call them from a blocking context
/// (`tokio::task::spawn_blocking`), as the CNI socket server does.
#[derive(Debug, Clone)]
pub struct IpamHandle {
    allocator: Arc<Mutex<Allocator>>,
    mtu: Arc<AtomicU32>,
    changes: Arc<watch::Sender<u64>>,
}

impl IpamHandle {
    pub fn new(allocator: Allocator) -> Self {
        let (changes, _) = watch::channel(allocator.generation());
        Self {
            allocator: Arc::new(Mutex::new(allocator)),
            mtu: Arc::new(AtomicU32::new(0)),
            changes: Arc::new(changes),
        }
    }

    /// A receiver that sees a new value after every saved change (an allocation, a release, new
    /// blocks): the agent waits on it, batches, and reports [`Self::usage`] to the operator.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Runs `f` on the allocator and tells subscribers if it saved a change.
    fn with<T>(&self, f: impl FnOnce(&mut Allocator) -> T) -> T {
        let mut allocator = self.lock();
        let before = allocator.generation();
        let out = f(&mut allocator);
        let after = allocator.generation();
        drop(allocator);
        if after != before {
            self.changes.send_replace(after);
        }
        out
    }

    /// Opens the allocator of `node` from the checkpoint in `state_dir`.
    pub fn open(state_dir: &Path, node: &str) -> Result<Self, IpamError> {
        Allocator::open(state_dir, node).map(Self::new)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Allocator> {
        // A panic while holding the lock cannot leave the core half-changed: `commit` restores it
        // before a failed save returns, and the core's own methods do not panic.
        self.allocator.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the node's blocks from the plan (`NodePlan.blocks`, see [`super::blocks_from_plan`]).
    pub fn set_blocks(&self, blocks: Vec<Ipv4Net>) -> Result<bool, IpamError> {
        self.with(|a| a.set_blocks(blocks))
    }

    /// The pod network's MTU (`NetworkSettings.mtu`, 0: the kernel's default), told to the plugin.
    pub fn set_mtu(&self, mtu: u32) {
        self.mtu.store(mtu, Ordering::Relaxed);
    }

    pub fn mtu(&self) -> u32 {
        self.mtu.load(Ordering::Relaxed)
    }

    pub fn allocate(&self, key: &AttachmentKey, pod: &PodRef) -> Result<Allocation, IpamError> {
        self.with(|a| a.allocate(key, pod))
    }

    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        self.with(|a| a.release(key))
    }

    pub fn gc(&self, valid: &BTreeSet<AttachmentKey>) -> Result<Vec<(AttachmentKey, Allocation)>, IpamError> {
        self.with(|a| a.gc(valid))
    }

    /// See [`Allocator::observe_pods`]; `now` is taken here.
    pub fn observe_pods(
        &self,
        live: &[PodRef],
        min_gap: Duration,
    ) -> Result<Vec<(AttachmentKey, Allocation)>, IpamError> {
        self.with(|a| a.observe_pods(live, Instant::now(), min_gap))
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<Allocation> {
        self.lock().core().get(key).cloned()
    }

    /// `(cidr, used, size, active)` of every block, for reporting.
    pub fn usage(&self) -> Vec<BlockUsage> {
        self.lock().core().usage()
    }

    /// Whether an ADD can be served, and if not why, for a person.
    pub fn status(&self) -> Result<(), IpamError> {
        let allocator = self.lock();
        if allocator.core().ready() {
            Ok(())
        } else {
            Err(IpamError::NoBlocks { node: allocator.core().node().to_string() })
        }
    }

    /// A copy of the allocator's state, for tests and debugging.
    pub fn snapshot(&self) -> IpamCore {
        self.lock().core().clone()
    }
}
