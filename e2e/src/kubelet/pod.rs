//! Pod workers: one task per pod bound to this node. A worker creates the sandbox (network
//! namespace, CNI ADD, resolv.conf/hosts), supervises the containers (restart policy, backoff,
//! probes), keeps the pod status current, and on deletion stops everything, calls CNI DEL,
//! removes the namespace and state, and deletes the pod object.

use std::collections::HashMap;
use std::fs;
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, Secret, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event as KEvent, EventType, Recorder};
use kube::{Client, Resource as _};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::cni;
use super::node::NetworkStatus;
use super::probe;
use super::sandbox::{self, CniRecord, HostMountNs, PodRecord, ProcRef};
use super::spec::{self, PhaseInput, Workload};

/// Longest wait between restarts of a crashing container.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Termination grace on runner shutdown is capped to this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every worker shares.
pub(crate) struct Ctx {
    pub client: Client,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub state_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cluster_dns: Option<String>,
    pub cluster_domain: String,
    pub host_mnt: HostMountNs,
    pub node_netns: Option<String>,
    pub network: watch::Receiver<NetworkStatus>,
    pub whoami: PathBuf,
    pub recorder: Recorder,
}

/// What the pod's worker should do.
#[derive(Clone, Debug)]
pub(crate) enum Desired {
    /// Run this (latest) version of the pod; a deletionTimestamp means terminate and delete.
    Run(Arc<Pod>),
    /// The object is gone from the API server: tear down, nothing to delete.
    Gone,
    /// The runner stops: tear down, leave the object.
    Shutdown,
}

struct WorkerHandle {
    key: String,
    desired: watch::Sender<Desired>,
    finished: watch::Receiver<()>,
    join: JoinHandle<()>,
}

/// The workers of this node, by pod UID.
pub(crate) struct PodManager {
    ctx: Arc<Ctx>,
    workers: HashMap<String, WorkerHandle>,
    done_tx: mpsc::UnboundedSender<String>,
    done_rx: mpsc::UnboundedReceiver<String>,
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

impl PodManager {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        PodManager { ctx, workers: HashMap::new(), done_tx, done_rx }
    }

    /// A pod was added or changed.
    pub(crate) fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if let Some(w) = self.workers.get(&uid) {
            if matches!(*w.desired.borrow(), Desired::Run(_)) {
                w.desired.send_replace(Desired::Run(Arc::new(pod)));
            }
            return;
        }
        // A finished pod we are not running has nothing to run until it is deleted.
        if is_terminal(&pod) && pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let key = sandbox::pod_key(&namespace, &name);
        // A pod with the same name that is still terminating goes first (as in the kubelet).
        let predecessor = self.workers.values().find(|w| w.key == key).map(|w| w.finished.clone());
        let (desired_tx, desired_rx) = watch::channel(Desired::Run(Arc::new(pod)));
        let (finished_tx, finished_rx) = watch::channel(());
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        let uid2 = uid.clone();
        let join = tokio::spawn(async move {
            if let Some(mut p) = predecessor {
                while p.changed().await.is_ok() {}
            }
            let first = desired_rx.borrow().clone();
            if let Desired::Run(pod) = first {
                let mut worker = Worker::new(ctx, pod);
                worker.run(desired_rx).await;
            }
            drop(finished_tx);
            let _ = done.send(uid2);
        });
        self.workers.insert(uid, WorkerHandle { key, desired: desired_tx, finished: finished_rx, join });
    }

    /// A pod object is gone.
    pub(crate) fn gone(&mut self, uid: &str) {
        if let Some(w) = self.workers.get(uid) {
            w.desired.send_replace(Desired::Gone);
        }
    }

    pub(crate) fn uids(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// Waits for a worker to finish and forgets it.
    pub(crate) async fn reap(&mut self) {
        if let Some(uid) = self.done_rx.recv().await {
            self.workers.remove(&uid);
        }
    }

    /// Tears every pod down (runner shutdown).
    pub(crate) async fn shutdown(mut self) {
        for w in self.workers.values() {
            w.desired.send_replace(Desired::Shutdown);
        }
        for (_, w) in self.workers.drain() {
            let _ = w.join.await;
        }
    }
}

/// How a pod's life on this node ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Delete { grace: Duration },
    Gone,
    Shutdown,
}

fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

fn end_of(desired: &Desired) -> Option<End> {
    match desired {
        Desired::Run(p) if p.metadata.deletion_timestamp.is_some() => {
            Some(End::Delete { grace: grace_of(p) })
        }
        Desired::Run(_) => None,
        Desired::Gone => Some(End::Gone),
        Desired::Shutdown => Some(End::Shutdown),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A container's runtime state, as reported in the status.
#[derive(Debug, Clone)]
struct CRt {
    name: String,
    image: String,
    state: ContainerState,
    last_state: Option<ContainerState>,
    restart_count: i32,
    ready: bool,
    started: bool,
    container_id: Option<String>,
    image_id: String,
    phase: PhaseInput,
}

impl CRt {
    fn new(c: &Container) -> Self {
        CRt {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: waiting_state("ContainerCreating", None),
            last_state: None,
            restart_count: 0,
            ready: false,
            started: false,
            container_id: None,
            image_id: String::new(),
            phase: PhaseInput::Waiting,
        }
    }

    fn set_waiting(&mut self, reason: &str, message: Option<String>) {
        self.state = waiting_state(reason, message);
        self.ready = false;
        self.started = false;
        if self.last_state.is_none() {
            self.phase = PhaseInput::Waiting;
        }
    }

    fn to_status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: self.container_id.clone(),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(self.state.clone()),
            last_state: Some(self.last_state.clone().unwrap_or_default()),
            ..Default::default()
        }
    }
}

fn waiting_state(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.to_string()), message }),
        ..Default::default()
    }
}

/// The pod's runtime state.
#[derive(Debug)]
struct PodRt {
    start_time: Timestamp,
    host_ip: String,
    pod_ips: Vec<IpAddr>,
    sandbox_ready: bool,
    sandbox_message: Option<String>,
    initialized: bool,
    init_failed: bool,
    init: Vec<CRt>,
    main: Vec<CRt>,
    transitions: HashMap<&'static str, (bool, Timestamp)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Init(usize),
    Main(usize),
}

impl PodRt {
    fn slot(&mut self, slot: Slot) -> Option<&mut CRt> {
        match slot {
            Slot::Init(i) => self.init.get_mut(i),
            Slot::Main(i) => self.main.get_mut(i),
        }
    }

    fn phase(&self, restart_policy: &str) -> &'static str {
        let inputs: Vec<PhaseInput> = self.main.iter().map(|c| c.phase).collect();
        spec::pod_phase(restart_policy, self.initialized, self.init_failed, &inputs)
    }

    fn condition(
        &mut self,
        type_: &'static str,
        ok: bool,
        reason: Option<String>,
        message: Option<String>,
    ) -> Value {
        let now = Timestamp::now();
        let entry = self.transitions.entry(type_).or_insert((ok, now));
        if entry.0 != ok {
            *entry = (ok, now);
        }
        // Explicit nulls: the patch merges into the existing condition of that type, so a
        // reason or message that no longer applies must be removed.
        json!({
            "type": type_,
            "status": if ok { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": Time(entry.1),
            "reason": reason,
            "message": message,
        })
    }

    /// The strategic merge patch of the pod status (with the UID as precondition).
    fn status_patch(&mut self, uid: &str, restart_policy: &str) -> Value {
        let phase = self.phase(restart_policy);
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let unready: Vec<String> = self.main.iter().filter(|c| !c.ready).map(|c| c.name.clone()).collect();
        let incomplete: Vec<String> = self
            .init
            .iter()
            .filter(|c| {
                c.state.terminated.as_ref().is_none_or(|t| t.exit_code != 0)
                    && !(c.started && c.state.running.is_some())
            })
            .map(|c| c.name.clone())
            .collect();
        let ready = unready.is_empty() && !terminal;
        let (ready_reason, ready_message) = if terminal {
            (Some("PodCompleted".to_string()), None)
        } else if ready {
            (None, None)
        } else {
            (
                Some("ContainersNotReady".to_string()),
                Some(format!("containers with unready status: [{}]", unready.join(" "))),
            )
        };
        let sandbox = self.sandbox_ready;
        let initialized = self.initialized;
        let conditions = vec![
            self.condition("PodReadyToStartContainers", sandbox, None, None),
            self.condition(
                "Initialized",
                initialized,
                (!initialized).then(|| "ContainersNotInitialized".to_string()),
                (!initialized)
                    .then(|| format!("containers with incomplete status: [{}]", incomplete.join(" "))),
            ),
            self.condition("Ready", ready, ready_reason.clone(), ready_message.clone()),
            self.condition("ContainersReady", ready, ready_reason, ready_message),
            self.condition("PodScheduled", true, None, None),
        ];
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": Time(self.start_time),
            "containerStatuses": self.main.iter().map(CRt::to_status).collect::<Vec<_>>(),
        });
        if !self.init.is_empty() {
            status["initContainerStatuses"] =
                serde_json::to_value(self.init.iter().map(CRt::to_status).collect::<Vec<_>>())
                    .unwrap_or(Value::Null);
        }
        if let Some(first) = self.pod_ips.first() {
            let mut ips = vec![json!({"$patch": "replace"})];
            ips.extend(self.pod_ips.iter().map(|ip| json!({"ip": ip.to_string()})));
            status["podIP"] = Value::String(first.to_string());
            status["podIPs"] = Value::Array(ips);
        }
        if let Some(m) = self.sandbox_message.as_ref().filter(|_| !sandbox) {
            status["message"] = Value::String(m.clone());
        }
        json!({"metadata": {"uid": uid}, "status": status})
    }
}

/// State shared by the worker, its containers' supervisors and its status writer.
struct Shared {
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    uid: String,
    namespace: String,
    name: String,
    netns: String,
    hostname: String,
    host_network: bool,
    restart_policy: String,
    status: Mutex<PodRt>,
    record: Mutex<PodRecord>,
    dirty: Notify,
    pod_dir: PathBuf,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut PodRt)) {
        f(&mut lock(&self.status));
        self.dirty.notify_one();
    }

    fn update_container(&self, slot: Slot, f: impl FnOnce(&mut CRt)) {
        self.update(|rt| {
            if let Some(c) = rt.slot(slot) {
                f(c);
            }
        });
    }

    fn update_record(&self, f: impl FnOnce(&mut PodRecord)) {
        let mut rec = lock(&self.record);
        f(&mut rec);
        if let Err(e) = sandbox::write_record(&self.ctx.state_dir, &rec) {
            tracing::warn!("pod {}/{}: {e:#}", self.namespace, self.name);
        }
    }

    fn event(&self, warning: bool, reason: &str, note: String) {
        let recorder = self.ctx.recorder.clone();
        let reference = self.pod.object_ref(&());
        let ev = KEvent {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_string(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::debug!("publishing event: {e}");
            }
        });
    }

    fn log_path(&self, container: &str) -> PathBuf {
        self.pod_dir.join(format!("{container}.log"))
    }
}

struct Worker {
    sh: Arc<Shared>,
}

impl Worker {
    fn new(ctx: Arc<Ctx>, pod: Arc<Pod>) -> Self {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let hostname = if host_network {
            ctx.node_name.clone()
        } else {
            spec::pod_hostname(&name, spec.hostname.as_deref())
        };
        let rt = PodRt {
            start_time: Timestamp::now(),
            host_ip: ctx.node_ip.to_string(),
            pod_ips: Vec::new(),
            sandbox_ready: false,
            sandbox_message: None,
            initialized: spec.init_containers.as_ref().is_none_or(Vec::is_empty),
            init_failed: false,
            init: spec.init_containers.iter().flatten().map(CRt::new).collect(),
            main: spec.containers.iter().map(CRt::new).collect(),
            transitions: HashMap::new(),
        };
        let netns = spec::pod_netns_name(&uid);
        let record = PodRecord {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            netns: netns.clone(),
            hostname: hostname.clone(),
            host_network,
            node_netns: ctx.node_netns.clone(),
            ..Default::default()
        };
        let pod_dir = sandbox::pods_dir(&ctx.state_dir).join(sandbox::pod_key(&namespace, &name));
        Worker {
            sh: Arc::new(Shared {
                restart_policy: spec.restart_policy.unwrap_or_else(|| "Always".into()),
                ctx,
                pod,
                uid,
                namespace,
                name,
                netns,
                hostname,
                host_network,
                status: Mutex::new(rt),
                record: Mutex::new(record),
                dirty: Notify::new(),
                pod_dir,
            }),
        }
    }

    async fn run(&mut self, mut desired: watch::Receiver<Desired>) {
        let sh = self.sh.clone();
        tracing::info!("pod {}/{}: starting (uid {})", sh.namespace, sh.name, sh.uid);
        let writer = tokio::spawn(status_writer(sh.clone()));
        let initial = desired.borrow_and_update().clone();
        let end = match end_of(&initial) {
            Some(end) => end,
            None => match self.setup(&mut desired).await {
                Err(end) => end,
                Ok(()) => self.run_containers(&mut desired).await,
            },
        };
        tracing::info!("pod {}/{}: stopping ({end:?})", sh.namespace, sh.name);
        writer.abort();
        self.teardown_sandbox().await;
        sandbox::remove_record(&sh.ctx.state_dir, &sh.namespace, &sh.name, &sh.uid);
        if end != End::Shutdown {
            let _ = fs::remove_dir_all(&sh.pod_dir);
        }
        if matches!(end, End::Delete { .. }) {
            self.delete_object().await;
        }
    }

    /// Creates the sandbox, retrying with backoff until it works or the pod goes away.
    async fn setup(&mut self, desired: &mut watch::Receiver<Desired>) -> Result<(), End> {
        let sh = self.sh.clone();
        let _ = fs::remove_dir_all(&sh.pod_dir);
        if let Err(e) = fs::create_dir_all(&sh.pod_dir) {
            tracing::warn!("creating {}: {e}", sh.pod_dir.display());
        }
        sh.update(|_| {});
        let mut network = sh.ctx.network.clone();
        let mut backoff = Duration::from_secs(1);
        loop {
            if let Some(end) = end_of(&desired.borrow_and_update()) {
                return Err(end);
            }
            let net = network.borrow_and_update().clone();
            let result = if sh.host_network {
                self.setup_host_network().await
            } else if let (true, Some(config)) = (net.ready, net.config.clone()) {
                self.setup_pod_network(&config).await
            } else {
                let msg = format!("network is not ready: {}", net.message);
                sh.update(|rt| rt.sandbox_message = Some(msg));
                tokio::select! {
                    r = network.changed() => if r.is_err() { return Err(End::Shutdown) },
                    r = desired.changed() => if r.is_err() { return Err(End::Shutdown) },
                }
                continue;
            };
            match result {
                Ok(ips) => {
                    tracing::info!(
                        "pod {}/{}: sandbox {} ready, IPs {ips:?}",
                        sh.namespace,
                        sh.name,
                        sh.netns
                    );
                    sh.update(|rt| {
                        rt.pod_ips = ips;
                        rt.sandbox_ready = true;
                        rt.sandbox_message = None;
                    });
                    return Ok(());
                }
                Err(e) => {
                    let msg = format!("Failed to create pod sandbox: {e:#}");
                    tracing::warn!("pod {}/{}: {msg}", sh.namespace, sh.name);
                    sh.event(true, "FailedCreatePodSandBox", msg.clone());
                    sh.update(|rt| {
                        rt.sandbox_message = Some(msg.clone());
                        for c in rt.main.iter_mut().chain(rt.init.iter_mut()) {
                            c.set_waiting("ContainerCreating", Some(msg.clone()));
                        }
                    });
                    self.teardown_sandbox().await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        r = desired.changed() => if r.is_err() { return Err(End::Shutdown) },
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn setup_host_network(&self) -> anyhow::Result<Vec<IpAddr>> {
        let sh = &self.sh;
        sh.update_record(|_| {});
        let (netns, pid) = (sh.netns.clone(), std::process::id());
        let sh2 = sh.clone();
        tokio::task::spawn_blocking(move || sandbox::attach_netns(&sh2.ctx.host_mnt, &netns, pid)).await??;
        self.write_dns_files(None)?;
        let ips = vec![sh.ctx.node_ip];
        sh.update_record(|r| r.pod_ips = ips.iter().map(ToString::to_string).collect());
        Ok(ips)
    }

    async fn setup_pod_network(&self, config: &cni::NetworkConfigList) -> anyhow::Result<Vec<IpAddr>> {
        let sh = &self.sh;
        let container_id = spec::sandbox_id(&sh.uid);
        let mut caps = serde_json::Map::new();
        caps.insert("portMappings".into(), spec::port_mappings(&sh.pod));
        let record = CniRecord {
            conflist: config.to_json(),
            conflist_path: config.source.clone(),
            bin_dirs: sh.ctx.cni_bin_dirs.clone(),
            args: spec::cni_args(&sh.namespace, &sh.name, &sh.uid, &container_id),
            container_id,
            ifname: "eth0".into(),
            capability_args: caps,
            result: None,
        };
        // Recorded before anything exists, so a crash at any point can be cleaned up.
        sh.update_record(|r| r.cni = Some(record.clone()));
        let netns = sh.netns.clone();
        let sh2 = sh.clone();
        let list = config.clone();
        let rec2 = record.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
            sandbox::create_netns(&sh2.ctx.host_mnt, &netns)?;
            let exec = cni::Exec { bin_dirs: rec2.bin_dirs.clone(), enter_netns: None };
            Ok(exec.add(&list, &rec2.runtime_conf(&netns))?)
        })
        .await??;
        let ips = cni::pod_ips(&cni::result_ips(&result, "eth0"));
        sh.update_record(|r| {
            if let Some(c) = r.cni.as_mut() {
                c.result = Some(result.clone());
            }
            r.pod_ips = ips.iter().map(ToString::to_string).collect();
        });
        let Some(first) = ips.first() else {
            anyhow::bail!("the CNI result has no address for eth0: {result}");
        };
        self.write_dns_files(Some(*first))?;
        Ok(ips)
    }

    /// resolv.conf (and, on the pod network, the kubelet-managed hosts file) for the pod.
    fn write_dns_files(&self, pod_ip: Option<IpAddr>) -> anyhow::Result<()> {
        let sh = &self.sh;
        let spec = sh.pod.spec.clone().unwrap_or_default();
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let rc = spec::pod_resolv_conf(spec::DnsInputs {
            policy: spec.dns_policy.as_deref(),
            host_network: sh.host_network,
            namespace: &sh.namespace,
            cluster_dns: sh.ctx.cluster_dns.as_deref(),
            cluster_domain: &sh.ctx.cluster_domain,
            dns_config: spec.dns_config.as_ref(),
            host_resolv: &host_resolv,
        });
        if let Some(rc) = rc {
            let text = rc.render();
            sandbox::write_atomic(&sh.pod_dir.join("resolv.conf"), text.as_bytes())?;
            sandbox::write_netns_etc(&sh.netns, "resolv.conf", &text)?;
        }
        if let Some(ip) = pod_ip.filter(|_| !sh.host_network) {
            let fqdn =
                spec.subdomain.as_ref().filter(|s| !s.is_empty()).map(|sub| {
                    format!("{}.{sub}.{}.svc.{}", sh.hostname, sh.namespace, sh.ctx.cluster_domain)
                });
            let aliases: Vec<(String, Vec<String>)> = spec
                .host_aliases
                .iter()
                .flatten()
                .map(|a| (a.ip.clone(), a.hostnames.clone().unwrap_or_default()))
                .collect();
            let hosts = spec::pod_hosts_file(Some(&ip.to_string()), &sh.hostname, fqdn.as_deref(), &aliases);
            sandbox::write_netns_etc(&sh.netns, "hosts", &hosts)?;
        }
        Ok(())
    }

    /// CNI DEL, namespace and /etc/netns removal (idempotent).
    async fn teardown_sandbox(&self) {
        let sh = self.sh.clone();
        let rec = lock(&sh.record).clone();
        let res = tokio::task::spawn_blocking(move || {
            sandbox::teardown_record(&sh.ctx.host_mnt, &rec, Duration::from_secs(2))
        })
        .await;
        match res {
            Ok(problems) => {
                for p in problems {
                    tracing::warn!("pod {}/{}: {p}", self.sh.namespace, self.sh.name);
                }
            }
            Err(e) => tracing::warn!("teardown task: {e}"),
        }
        self.sh.update_record(|r| {
            r.cni = None;
            r.processes.clear();
        });
    }

    /// Runs the containers until the pod ends; returns how.
    async fn run_containers(&mut self, desired: &mut watch::Receiver<Desired>) -> End {
        let sh = self.sh.clone();
        let (stop_tx, stop_rx) = watch::channel::<Option<Duration>>(None);
        let mut containers = tokio::spawn(run_all_containers(sh.clone(), stop_rx));
        let mut containers_done = false;
        let end = loop {
            tokio::select! {
                _ = &mut containers, if !containers_done => {
                    containers_done = true;
                    // A finished pod releases its network, as the kubelet does.
                    tracing::info!("pod {}/{}: all containers finished", sh.namespace, sh.name);
                    self.teardown_sandbox().await;
                }
                r = desired.changed() => {
                    if r.is_err() {
                        break End::Shutdown;
                    }
                    if let Some(end) = end_of(&desired.borrow_and_update()) {
                        break end;
                    }
                }
            }
        };
        let grace = match end {
            End::Delete { grace } => grace,
            End::Gone => grace_of(&sh.pod),
            End::Shutdown => grace_of(&sh.pod).min(SHUTDOWN_GRACE),
        };
        stop_tx.send_replace(Some(grace));
        if !containers_done {
            let _ = containers.await;
        }
        end
    }

    async fn delete_object(&self) {
        let sh = &self.sh;
        let api: Api<Pod> = Api::namespaced(sh.ctx.client.clone(), &sh.namespace);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(sh.uid.clone()), resource_version: None }),
            ..Default::default()
        };
        for attempt in 0..5 {
            match api.delete(&sh.name, &dp).await {
                Ok(_) => return,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                Err(e) => {
                    tracing::warn!("pod {}/{}: deleting (attempt {attempt}): {e}", sh.namespace, sh.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Keeps the pod status in the API server in line with the runtime state.
async fn status_writer(sh: Arc<Shared>) {
    let api: Api<Pod> = Api::namespaced(sh.ctx.client.clone(), &sh.namespace);
    let mut last: Option<Value> = None;
    loop {
        sh.dirty.notified().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        loop {
            let body = lock(&sh.status).status_patch(&sh.uid, &sh.restart_policy);
            if last.as_ref() == Some(&body) {
                break;
            }
            match api.patch_status(&sh.name, &PatchParams::default(), &Patch::Strategic(&body)).await {
                Ok(_) => {
                    last = Some(body);
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                    tracing::debug!("pod {}/{}: status not written: {e}", sh.namespace, sh.name);
                    break;
                }
                Err(e) => {
                    tracing::warn!("pod {}/{}: writing status: {e}", sh.namespace, sh.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// The `kubernetes` Service variables every container gets.
async fn kubernetes_service_env(client: &Client) -> Vec<(String, String)> {
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let Ok(Some(svc)) = api.get_opt("kubernetes").await else {
        return Vec::new();
    };
    let Some(spec) = svc.spec else {
        return Vec::new();
    };
    let Some(ip) = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None") else {
        return Vec::new();
    };
    let Some(port) = spec.ports.iter().flatten().next().map(|p| p.port) else {
        return Vec::new();
    };
    let url = format!("tcp://{ip}:{port}");
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), ip.clone()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
        ("KUBERNETES_PORT".into(), url.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP"), url),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.to_string()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), ip),
    ]
}

/// Waits until a stop is requested; the grace period to use.
async fn stop_requested(stop: &mut watch::Receiver<Option<Duration>>) -> Duration {
    loop {
        if let Some(g) = *stop.borrow_and_update() {
            return g;
        }
        if stop.changed().await.is_err() {
            return Duration::ZERO;
        }
    }
}

/// Sleeps, unless a stop comes first (`false`).
async fn sleep_or_stop(stop: &mut watch::Receiver<Option<Duration>>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop_requested(stop) => false,
    }
}

/// Init containers in order, then the regular containers, each under its supervisor.
async fn run_all_containers(sh: Arc<Shared>, stop: watch::Receiver<Option<Duration>>) {
    let spec = sh.pod.spec.clone().unwrap_or_default();
    let mut base = vec![
        ("PATH".to_string(), spec::DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), sh.hostname.clone()),
    ];
    base.extend(kubernetes_service_env(&sh.ctx.client).await);
    let base = Arc::new(base);
    let policy = sh.restart_policy.clone();

    let (sidecar_stop_tx, sidecar_stop_rx) = watch::channel::<Option<Duration>>(None);
    let mut sidecars = Vec::new();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        if c.restart_policy.as_deref() == Some("Always") {
            // A sidecar: keeps running next to the regular containers.
            let h = tokio::spawn(supervise(
                sh.clone(),
                base.clone(),
                Slot::Init(i),
                c.clone(),
                "Always".into(),
                sidecar_stop_rx.clone(),
            ));
            sidecars.push(h);
            let mut s = stop.clone();
            loop {
                if lock(&sh.status).init.get(i).is_some_and(|c| c.started) {
                    break;
                }
                if !sleep_or_stop(&mut s, Duration::from_millis(100)).await {
                    let g = *s.borrow();
                    sidecar_stop_tx.send_replace(g);
                    for h in sidecars {
                        let _ = h.await;
                    }
                    return;
                }
            }
            continue;
        }
        let init_policy = if policy == "Always" { "OnFailure" } else { &policy };
        match supervise(
            sh.clone(),
            base.clone(),
            Slot::Init(i),
            c.clone(),
            init_policy.to_string(),
            stop.clone(),
        )
        .await
        {
            Some(0) => {}
            Some(_) => {
                sh.update(|rt| rt.init_failed = true);
                let g = *stop.borrow();
                sidecar_stop_tx.send_replace(Some(g.unwrap_or(Duration::ZERO)));
                for h in sidecars {
                    let _ = h.await;
                }
                return;
            }
            None => {
                let g = *stop.borrow();
                sidecar_stop_tx.send_replace(Some(g.unwrap_or(Duration::ZERO)));
                for h in sidecars {
                    let _ = h.await;
                }
                return;
            }
        }
    }
    sh.update(|rt| rt.initialized = true);
    let handles: Vec<_> = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(supervise(
                sh.clone(),
                base.clone(),
                Slot::Main(i),
                c.clone(),
                policy.clone(),
                stop.clone(),
            ))
        })
        .collect();
    for h in handles {
        let _ = h.await;
    }
    let g = *stop.borrow();
    sidecar_stop_tx.send_replace(Some(g.unwrap_or_else(|| grace_of(&sh.pod))));
    for h in sidecars {
        let _ = h.await;
    }
}

/// Why a container cannot start (yet).
struct PrepareError {
    reason: &'static str,
    message: String,
    retry: bool,
}

/// What a container instance runs.
struct Prepared {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

async fn fetch_env_sources(
    client: &Client,
    namespace: &str,
    c: &Container,
) -> Result<spec::EnvSources, String> {
    let (cms, secrets) = spec::env_source_names(c);
    let mut sources = spec::EnvSources::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for name in cms {
        let cm = cm_api.get_opt(&name).await.map_err(|e| format!("getting configmap {name:?}: {e}"))?;
        sources.config_maps.insert(name, cm.map(|cm| cm.data.unwrap_or_default()));
    }
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in secrets {
        let s = secret_api.get_opt(&name).await.map_err(|e| format!("getting secret {name:?}: {e}"))?;
        let data = s.map(|s| {
            let mut out: std::collections::BTreeMap<String, String> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            out.extend(s.string_data.unwrap_or_default());
            out
        });
        sources.secrets.insert(name, data);
    }
    Ok(sources)
}

async fn prepare(sh: &Shared, c: &Container, base: &[(String, String)]) -> Result<Prepared, PrepareError> {
    let image = c.image.clone().unwrap_or_default();
    let workload = spec::classify_image(&image).map_err(|message| PrepareError {
        reason: "ImageNotSupported",
        message,
        retry: false,
    })?;
    let config_error =
        |message: String| PrepareError { reason: "CreateContainerConfigError", message, retry: true };
    let sources = fetch_env_sources(&sh.ctx.client, &sh.namespace, c).await.map_err(config_error)?;
    let pod_ips = lock(&sh.status).pod_ips.clone();
    let facts = spec::PodFacts::from_pod(&sh.pod, &sh.ctx.node_name, &sh.ctx.node_ip.to_string(), &pod_ips);
    let mut env = spec::build_env(c, &facts, base, &sources).map_err(config_error)?;
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), "/root".into()));
    }
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone()).unwrap_or_default();
    let command = spec::expand_all(c.command.as_deref().unwrap_or_default(), &env);
    let args = spec::expand_all(c.args.as_deref().unwrap_or_default(), &env);
    if workload == Workload::Whoami && !sh.ctx.whoami.is_file() {
        return Err(PrepareError {
            reason: "CreateContainerError",
            message: format!(
                "{} is missing (it is built with `cargo build -p weft-e2e`)",
                sh.ctx.whoami.display()
            ),
            retry: true,
        });
    }
    let whoami = sh.ctx.whoami.display().to_string();
    let argv =
        spec::container_argv(&workload, &command, &args, &whoami, &|n| sandbox::is_executable(n, &path))
            .map_err(|message| PrepareError { reason: "CreateContainerError", message, retry: false })?;
    let cwd = PathBuf::from(c.working_dir.as_deref().filter(|w| !w.is_empty()).unwrap_or("/"));
    if !cwd.is_dir() {
        return Err(PrepareError {
            reason: "CreateContainerError",
            message: format!(
                "workingDir {} does not exist on this host (containers use the host's filesystem)",
                cwd.display()
            ),
            retry: false,
        });
    }
    Ok(Prepared { argv, env, cwd })
}

fn spawn_container(sh: &Shared, name: &str, p: &Prepared) -> Result<tokio::process::Child, String> {
    let path = p.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or_default();
    let argv0 = p.argv.first().map(String::as_str).unwrap_or_default();
    if !sandbox::is_executable(argv0, path) {
        return Err(format!(
            "exec: {argv0:?}: executable file not found in $PATH (the host's tools run the \
             container's command)"
        ));
    }
    let log_path = sh.log_path(name);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = sandbox::container_command(&sh.netns, &sh.hostname, &p.argv, &p.env);
    cmd.current_dir(&p.cwd).stdin(Stdio::null()).stdout(log).stderr(log2);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd.spawn().map_err(|e| format!("starting the container: {e}"))
}

/// SIGTERM to the container's process group, `grace`, then SIGKILL.
async fn stop_child(child: &mut tokio::process::Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let pid = child.id()?;
    sandbox::signal_group(pid, rustix::process::Signal::TERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(r) => r.ok(),
        Err(_) => {
            sandbox::signal_group(pid, rustix::process::Signal::KILL);
            child.wait().await.ok()
        }
    }
}

fn exit_code(status: Option<std::process::ExitStatus>) -> (i32, Option<i32>) {
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (c, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            (None, None) => (255, None),
        },
        None => (255, None),
    }
}

enum Outcome {
    Exited { code: i32, signal: Option<i32>, reason: &'static str, message: Option<String> },
    Stopped { code: i32, signal: Option<i32> },
}

/// Runs one container per its restart policy until it is done (`Some(exit code)`) or stopped
/// (`None`).
async fn supervise(
    sh: Arc<Shared>,
    base: Arc<Vec<(String, String)>>,
    slot: Slot,
    container: Container,
    policy: String,
    mut stop: watch::Receiver<Option<Duration>>,
) -> Option<i32> {
    let name = container.name.clone();
    let mut backoff = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    loop {
        if stop.borrow().is_some() {
            return None;
        }
        let prepared = match prepare(&sh, &container, &base).await {
            Ok(p) => p,
            Err(e) => {
                if last_error.as_ref() != Some(&e.message) {
                    tracing::warn!(
                        "pod {}/{} container {name}: {}: {}",
                        sh.namespace,
                        sh.name,
                        e.reason,
                        e.message
                    );
                    sh.event(true, "Failed", format!("Error: {}: {}", e.reason, e.message));
                    last_error = Some(e.message.clone());
                }
                sh.update_container(slot, |c| c.set_waiting(e.reason, Some(e.message.clone())));
                let wait = if e.retry { backoff } else { Duration::from_secs(86_400) };
                if !sleep_or_stop(&mut stop, wait).await {
                    return None;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        last_error = None;
        let started_at = Timestamp::now();
        let started = Instant::now();
        let outcome = match spawn_container(&sh, &name, &prepared) {
            Err(message) => {
                Outcome::Exited { code: 128, signal: None, reason: "StartError", message: Some(message) }
            }
            Ok(child) => {
                run_instance(&sh, slot, &container, &prepared.env, child, started_at, &mut stop).await
            }
        };
        let container_id = lock(&sh.status).slot(slot).and_then(|c| c.container_id.clone());
        let (code, signal, reason, message, stopped) = match outcome {
            Outcome::Exited { code, signal, reason, message } => (code, signal, reason, message, false),
            Outcome::Stopped { code, signal } => {
                (code, signal, if code == 0 { "Completed" } else { "Error" }, None, true)
            }
        };
        if reason == "StartError"
            && let Some(m) = &message
        {
            sh.event(true, "Failed", format!("Error: {m}"));
        }
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                signal,
                reason: Some(reason.to_string()),
                message,
                started_at: Some(Time(started_at)),
                finished_at: Some(Time(Timestamp::now())),
                container_id: container_id.clone(),
            }),
            ..Default::default()
        };
        if stopped || !spec::should_restart(&policy, code) {
            sh.update_container(slot, |c| {
                c.state = terminated;
                c.ready = false;
                c.started = false;
                c.phase = PhaseInput::Terminated { exit_code: code };
            });
            return if stopped { None } else { Some(code) };
        }
        if started.elapsed() > MAX_BACKOFF * 2 {
            backoff = Duration::from_secs(1);
        }
        let wait_msg = format!(
            "back-off {}s restarting failed container={name} pod={}_{}({})",
            backoff.as_secs(),
            sh.name,
            sh.namespace,
            sh.uid
        );
        sh.update_container(slot, |c| {
            c.last_state = Some(terminated);
            c.restart_count += 1;
            c.state = waiting_state("CrashLoopBackOff", Some(wait_msg));
            c.ready = false;
            c.started = false;
            c.phase = PhaseInput::Restarting;
        });
        sh.event(
            true,
            "BackOff",
            format!("Back-off restarting failed container {name} in pod {}_{}", sh.name, sh.namespace),
        );
        if !sleep_or_stop(&mut stop, backoff).await {
            return None;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One run of a container process: running state, probes, exit or stop.
async fn run_instance(
    sh: &Arc<Shared>,
    slot: Slot,
    container: &Container,
    env: &[(String, String)],
    mut child: tokio::process::Child,
    started_at: Timestamp,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Outcome {
    let name = container.name.clone();
    let pid = child.id().unwrap_or(0);
    sh.update_record(|r| {
        r.processes.insert(name.clone(), ProcRef::of(pid).into());
        // `exec` runs with the first container's environment, as `kubectl exec` would.
        if slot == Slot::Main(0) {
            r.exec_env = env.to_vec();
        }
    });
    let restart_count = lock(&sh.status).slot(slot).map_or(0, |c| c.restart_count);
    let container_id = format!("weft://{}-{name}-{restart_count}", spec::sandbox_id(&sh.uid));
    let has_startup = container.startup_probe.is_some();
    let has_readiness = container.readiness_probe.is_some();
    let image_id =
        format!("weft-builtin://{}", spec::image_repository(container.image.as_deref().unwrap_or_default()));
    sh.update_container(slot, |c| {
        c.state = ContainerState {
            running: Some(ContainerStateRunning { started_at: Some(Time(started_at)) }),
            ..Default::default()
        };
        c.container_id = Some(container_id.clone());
        c.image_id = image_id;
        c.started = !has_startup;
        c.ready = !has_startup && !has_readiness;
        c.phase = PhaseInput::Running;
    });
    tracing::info!("pod {}/{} container {name}: started (pid {pid})", sh.namespace, sh.name);
    sh.event(false, "Started", format!("Started container {name}"));
    let (kill_tx, mut kill_rx) = mpsc::channel::<String>(1);
    let probes = tokio::spawn(probe_container(sh.clone(), slot, container.clone(), kill_tx));
    let outcome = tokio::select! {
        status = child.wait() => {
            let (code, signal) = exit_code(status.ok());
            Outcome::Exited {
                code,
                signal,
                reason: if code == 0 { "Completed" } else { "Error" },
                message: None,
            }
        }
        grace = stop_requested(stop) => {
            sh.event(false, "Killing", format!("Stopping container {name}"));
            let (code, signal) = exit_code(stop_child(&mut child, grace).await);
            Outcome::Stopped { code, signal }
        }
        Some(why) = kill_rx.recv() => {
            sh.event(false, "Killing", format!("Container {name} {why}, will be restarted"));
            let (code, signal) = exit_code(stop_child(&mut child, grace_of(&sh.pod)).await);
            Outcome::Exited { code, signal, reason: "Error", message: Some(why) }
        }
    };
    probes.abort();
    // Whatever the container left in its process group goes with it.
    sandbox::signal_group(pid, rustix::process::Signal::KILL);
    sh.update_record(|r| {
        r.processes.remove(&name);
    });
    tracing::info!("pod {}/{} container {name}: exited", sh.namespace, sh.name);
    outcome
}

/// One probe attempt; `Err` carries the failure output.
async fn probe_once(
    sh: &Shared,
    container: &Container,
    p: &k8s_openapi::api::core::v1::Probe,
    timeout: Duration,
) -> Result<(), String> {
    let pod_ip = lock(&sh.status).pod_ips.first().copied().unwrap_or(sh.ctx.node_ip);
    let ports = container.ports.clone().unwrap_or_default();
    match probe::action(p, pod_ip, &ports)? {
        probe::Action::Exec { argv } => {
            let env = vec![
                ("PATH".to_string(), spec::DEFAULT_PATH.to_string()),
                ("HOSTNAME".to_string(), sh.hostname.clone()),
            ];
            let mut cmd = tokio::process::Command::from(sandbox::container_command(
                &sh.netns,
                &sh.hostname,
                &argv,
                &env,
            ));
            cmd.stdin(Stdio::null()).kill_on_drop(true);
            match tokio::time::timeout(timeout, cmd.output()).await {
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(format!(
                    "command {argv:?} exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim()
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("command {argv:?} timed out after {timeout:?}")),
            }
        }
        action => probe::run_network(&action, timeout).await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// Runs one probe per the kubelet's rules. Startup returns once it succeeds (`true`) or fails
/// past its threshold (`false`); liveness returns `false` past its threshold; readiness runs
/// until aborted.
async fn probe_loop(
    sh: &Shared,
    slot: Slot,
    container: &Container,
    p: &k8s_openapi::api::core::v1::Probe,
    kind: ProbeKind,
) -> Result<(), String> {
    let t = probe::timing(p);
    tokio::time::sleep(t.initial_delay).await;
    let mut successes = 0u32;
    let mut failures = 0u32;
    loop {
        match probe_once(sh, container, p, t.timeout).await {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if successes >= t.success_threshold {
                    match kind {
                        ProbeKind::Startup => return Ok(()),
                        ProbeKind::Readiness => sh.update_container(slot, |c| c.ready = true),
                        ProbeKind::Liveness => {}
                    }
                }
            }
            Err(msg) => {
                successes = 0;
                failures += 1;
                let label = match kind {
                    ProbeKind::Startup => "Startup",
                    ProbeKind::Readiness => "Readiness",
                    ProbeKind::Liveness => "Liveness",
                };
                sh.event(true, "Unhealthy", format!("{label} probe failed: {msg}"));
                if failures >= t.failure_threshold {
                    match kind {
                        ProbeKind::Readiness => sh.update_container(slot, |c| c.ready = false),
                        ProbeKind::Startup | ProbeKind::Liveness => {
                            return Err(format!("failed {} probe", label.to_ascii_lowercase()));
                        }
                    }
                }
            }
        }
        tokio::time::sleep(t.period).await;
    }
}

async fn probe_container(sh: Arc<Shared>, slot: Slot, container: Container, kill: mpsc::Sender<String>) {
    if let Some(p) = &container.startup_probe {
        if let Err(why) = probe_loop(&sh, slot, &container, p, ProbeKind::Startup).await {
            let _ = kill.send(why).await;
            return;
        }
        let ready = container.readiness_probe.is_none();
        sh.update_container(slot, |c| {
            c.started = true;
            c.ready = ready;
        });
    }
    let readiness = async {
        if let Some(p) = &container.readiness_probe {
            let _ = probe_loop(&sh, slot, &container, p, ProbeKind::Readiness).await;
        }
    };
    let liveness = async {
        if let Some(p) = &container.liveness_probe
            && let Err(why) = probe_loop(&sh, slot, &container, p, ProbeKind::Liveness).await
        {
            let _ = kill.send(why).await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// Where pods' logs live: `<state-dir>/pods/<namespace>_<name>/<container>.log`.
pub(crate) fn log_file(state_dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    sandbox::pods_dir(state_dir).join(sandbox::pod_key(namespace, pod)).join(format!("{container}.log"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rt_with(main: Vec<CRt>) -> PodRt {
        PodRt {
            start_time: Timestamp::from_second(1_000).unwrap(),
            host_ip: "172.18.0.11".into(),
            pod_ips: vec!["10.244.1.5".parse().unwrap()],
            sandbox_ready: true,
            sandbox_message: None,
            initialized: true,
            init_failed: false,
            init: vec![],
            main,
            transitions: HashMap::new(),
        }
    }

    fn container(name: &str) -> CRt {
        CRt::new(&Container { name: name.into(), image: Some("busybox".into()), ..Default::default() })
    }

    fn cond<'a>(patch: &'a Value, t: &str) -> &'a Value {
        patch["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap()
    }

    #[test]
    fn status_patch_reports_ips_conditions_and_containers() {
        let mut c = container("app");
        c.state = ContainerState {
            running: Some(ContainerStateRunning { started_at: None }),
            ..Default::default()
        };
        c.phase = PhaseInput::Running;
        c.ready = false;
        c.started = true;
        let mut rt = rt_with(vec![c]);
        let p = rt.status_patch("uid-1", "Always");
        assert_eq!(p["metadata"]["uid"], "uid-1");
        assert_eq!(p["status"]["phase"], "Running");
        assert_eq!(p["status"]["podIP"], "10.244.1.5");
        assert_eq!(p["status"]["podIPs"], json!([{"$patch": "replace"}, {"ip": "10.244.1.5"}]));
        assert_eq!(p["status"]["hostIP"], "172.18.0.11");
        assert_eq!(cond(&p, "Ready")["status"], "False");
        assert_eq!(cond(&p, "Ready")["message"], "containers with unready status: [app]");
        assert_eq!(cond(&p, "PodScheduled")["status"], "True");
        assert_eq!(cond(&p, "Initialized")["status"], "True");
        let cs = &p["status"]["containerStatuses"][0];
        assert_eq!(cs["name"], "app");
        assert_eq!(cs["image"], "busybox");
        assert_eq!(cs["ready"], false);
        assert_eq!(cs["restartCount"], 0);
        assert!(cs["state"]["running"].is_object());

        let before = cond(&p, "Ready")["lastTransitionTime"].clone();
        rt.main[0].ready = true;
        let p2 = rt.status_patch("uid-1", "Always");
        assert_eq!(cond(&p2, "Ready")["status"], "True");
        assert_eq!(cond(&p2, "ContainersReady")["status"], "True");
        assert!(cond(&p2, "Ready")["message"].is_null());
        assert!(cond(&p2, "Ready")["reason"].is_null());
        // Unchanged conditions keep their transition time.
        assert_eq!(
            cond(&p2, "PodScheduled")["lastTransitionTime"],
            cond(&p, "PodScheduled")["lastTransitionTime"]
        );
        let _ = before;
    }

    #[test]
    fn unsupported_images_leave_the_pod_pending_with_the_reason() {
        let mut c = container("app");
        c.set_waiting("ImageNotSupported", Some("image \"nginx\" …".into()));
        let mut rt = rt_with(vec![c]);
        let p = rt.status_patch("u", "Always");
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"], "ImageNotSupported");
    }

    #[test]
    fn completed_pods_are_not_ready() {
        let mut c = container("job");
        c.phase = PhaseInput::Terminated { exit_code: 0 };
        let mut rt = rt_with(vec![c]);
        let p = rt.status_patch("u", "Never");
        assert_eq!(p["status"]["phase"], "Succeeded");
        assert_eq!(cond(&p, "Ready")["reason"], "PodCompleted");
    }

    #[test]
    fn grace_comes_from_deletion_or_spec() {
        let mut pod = Pod::default();
        assert_eq!(grace_of(&pod), Duration::from_secs(30));
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            termination_grace_period_seconds: Some(5),
            ..Default::default()
        });
        assert_eq!(grace_of(&pod), Duration::from_secs(5));
        pod.metadata.deletion_grace_period_seconds = Some(0);
        assert_eq!(grace_of(&pod), Duration::ZERO);
    }
}
