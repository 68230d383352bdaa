//! The record files: what each programmer was asked to do, as readable text in
//! `<state-dir>/programmed/<programmer>.txt`, for people and tests. A programmer that applied a
//! plan hands it here; a thread of its own renders and writes the records afterwards, so the
//! O(plan) text is never on the plan's path (it was ~0.1 s per message at 10,000 Services), and a
//! record that cannot be rendered or written is logged and counted, never a NACK. Records of a
//! busy stream are coalesced: each file is written from the newest plan its programmer applied.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use weft_api::plan::{self as pb, Kind};

use super::{ProgramError, Programmer, decode, single};
use crate::files::{Access, Durability};
use crate::plan_state::PlanState;

/// Where the records of an agent with state dir `state_dir` are.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("programmed")
}

/// Hands applied plans to the record writer thread; the thread ends, after writing what it was
/// handed, when the last clone is dropped.
#[derive(Clone)]
pub struct Recorder {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("dir", &self.owner.shared.dir).finish_non_exhaustive()
    }
}

struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

struct Shared {
    dir: PathBuf,
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only a map of plans behind: still usable.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Pending {
    /// The newest plan each programmer applied and has not been recorded yet.
    plans: BTreeMap<&'static str, (Programmer, Arc<PlanState>)>,
    /// The plan version the queued records bring the files up to.
    version: Option<u64>,
    stop: bool,
}

impl Recorder {
    /// Starts the writer thread. `recorded` is told each plan version whose records are written
    /// (the agent publishes it in its status, so tests read a record once it is current).
    pub fn start(
        state_dir: &Path,
        errors: Counter,
        recorded: impl Fn(u64) + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared =
            Arc::new(Shared { dir: dir(state_dir), pending: Mutex::default(), wake: Condvar::new() });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("weft-records".into())
            .spawn(move || write_records(&writer, &errors, &recorded))?;
        Ok(Self { owner: Arc::new(Owner { shared }) })
    }

    /// Queues the records of `applied` (the programmers that applied `plan`); `plan.version` is
    /// reported as recorded once they are written.
    pub fn record(&self, plan: &Arc<PlanState>, applied: &[Programmer]) {
        let shared = &self.owner.shared;
        let mut pending = shared.lock();
        for programmer in applied {
            pending.plans.insert(programmer.name, (*programmer, plan.clone()));
        }
        pending.version = Some(plan.version);
        drop(pending);
        shared.wake.notify_one();
    }
}

/// The writer thread: waits for queued records, writes them, reports the version; ends once the
/// recorder is dropped and nothing is left to write.
fn write_records(shared: &Shared, errors: &Counter, recorded: &dyn Fn(u64)) {
    loop {
        let (plans, version) = {
            let mut pending = shared.lock();
            while pending.plans.is_empty() && pending.version.is_none() && !pending.stop {
                pending = shared.wake.wait(pending).unwrap_or_else(PoisonError::into_inner);
            }
            let Some(version) = pending.version.take() else {
                return;
            };
            (std::mem::take(&mut pending.plans), version)
        };
        for (programmer, plan) in plans.into_values() {
            if let Err(error) = write_record(&shared.dir, &programmer, &plan) {
                errors.inc();
                tracing::warn!(programmer = programmer.name, %error, "cannot write the record file");
            }
        }
        recorded(version);
    }
}

#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Render(#[from] ProgramError),
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Renders one programmer's record from `plan` and writes it when it differs from the file.
/// Returns whether it was written.
fn write_record(dir: &Path, programmer: &Programmer, plan: &PlanState) -> Result<bool, RecordError> {
    let text = (programmer.record)(plan)?;
    let path = dir.join(format!("{}.txt", programmer.name));
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    // Rebuilt from the plan after any restart: no fsync.
    crate::files::replace(&path, text.as_bytes(), Durability::Cached, Access::Public)
        .map_err(|source| RecordError::Write { path, source })?;
    Ok(true)
}

pub(super) fn cni(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    if let Some(net) = single::<pb::NetworkSettings>("cni", plan, Kind::Network)? {
        let _ = writeln!(out, "conflist {}/{}", net.cni_conf_dir, net.cni_conflist_name);
        let _ = writeln!(out, "bin dir {}", net.cni_bin_dir);
        let _ = writeln!(out, "mtu {}", net.mtu);
        let _ = writeln!(out, "chained {:?}", net.cni_chained_plugins);
    }
    if let Some(node) = single::<pb::NodePlan>("cni", plan, Kind::Node)? {
        let _ = writeln!(out, "node {} ip {}", node.name, node.node_ip);
    }
    Ok(out)
}

pub(super) fn ipam(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    if let Some(node) = single::<pb::NodePlan>("ipam", plan, Kind::Node)? {
        for block in node.blocks {
            let _ =
                writeln!(out, "block {} pool {} natOutgoing {}", block.cidr, block.pool, block.nat_outgoing);
        }
    }
    Ok(out)
}

pub(super) fn routes(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    let own = single::<pb::NodePlan>("routes", plan, Kind::Node)?.map(|n| n.name).unwrap_or_default();
    if let Some(net) = single::<pb::NetworkSettings>("routes", plan, Kind::Network)? {
        let _ = writeln!(out, "encapsulation {:?} masquerade {}", net.encapsulation(), net.masquerade);
    }
    for peer in plan.of_kind(Kind::Peer) {
        let peer: pb::PeerNode = decode("routes", peer)?;
        if peer.name == own {
            continue;
        }
        for block in &peer.blocks {
            let _ = writeln!(out, "route {block} via {} ({})", peer.node_ip, peer.name);
        }
    }
    Ok(out)
}

pub(super) fn proxy(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    if let Some(net) = plan.of_kind(Kind::Network).next() {
        let net: pb::NetworkSettings = decode("proxy", net)?;
        let _ = writeln!(out, "mode {}", crate::proxy::mode_name(net.proxy_mode()));
    }
    for r in plan.of_kind(Kind::Service) {
        let svc: pb::Service = decode("proxy", r)?;
        let ip = std::net::Ipv4Addr::from(svc.cluster_ip);
        for port in &svc.ports {
            let eps: Vec<String> = port
                .endpoints
                .iter()
                .map(|e| format!("{}:{}{}", std::net::Ipv4Addr::from(e.ip), e.port, flags(e)))
                .collect();
            let _ = writeln!(
                out,
                "service {} {ip}:{} {:?} nodePort {} -> [{}]",
                r.name,
                port.port,
                port.protocol(),
                port.node_port,
                eps.join(" ")
            );
        }
    }
    Ok(out)
}

fn flags(e: &pb::Endpoint) -> String {
    let mut s = String::new();
    for (flag, label) in [
        (pb::EndpointFlag::EndpointNotReady, "not-ready"),
        (pb::EndpointFlag::EndpointTerminating, "terminating"),
        (pb::EndpointFlag::EndpointLocal, "local"),
    ] {
        if e.has(flag) {
            s.push(',');
            s.push_str(label);
        }
    }
    s
}

/// What the node serves: its Ingresses and TLS Secrets by name (never the keys).
pub(super) fn ingress(plan: &PlanState) -> Result<String, ProgramError> {
    let p = super::ingress_plan(plan)?;
    let mut out = String::new();
    let serving = p.node.as_ref().is_some_and(|n| n.ingress) && p.settings.is_some();
    let _ = writeln!(out, "serving {serving}");
    for i in &p.ingresses {
        let verdict =
            weft_api::ingress::validate(i).err().map(|e| format!(" rejected: {e}")).unwrap_or_default();
        let _ = writeln!(out, "ingress {}/{}{verdict}", i.namespace, i.name);
    }
    for name in p.secrets.keys() {
        let _ = writeln!(out, "secret {name}");
    }
    Ok(out)
}

pub(super) fn dns(plan: &PlanState) -> Result<String, ProgramError> {
    Ok(single::<pb::DnsSettings>("dns", plan, Kind::Dns)?.map(|d| format!("{d:#?}\n")).unwrap_or_default())
}

/// The policies the node enforces and which of its pods each isolates.
pub(super) fn policy(plan: &PlanState) -> Result<String, ProgramError> {
    let p = crate::policy::plan_from(plan.resources.values())?;
    let mut out = String::new();
    let _ = writeln!(out, "enforcing {}", p.enforcing);
    for name in p.policies.keys() {
        let _ = writeln!(out, "policy {name}");
    }
    for t in &p.targets {
        let _ = writeln!(
            out,
            "pod {}/{} ingress [{}] egress [{}]",
            t.namespace,
            t.name,
            t.ingress_policies.join(" "),
            t.egress_policies.join(" ")
        );
    }
    Ok(out)
}
