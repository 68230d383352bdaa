//! The pod runner that plays kubelet on each node of the local cluster
//! (`weft-dev kubelet …`, run inside the node's network namespace).
//!
//! # What it does
//!
//! - **Node**: creates or updates its Node (InternalIP, labels `kubernetes.io/hostname`,
//!   `topology.kubernetes.io/zone`, `kubernetes.io/os`/`arch`, capacity/allocatable with `pods`),
//!   patches the status every 10 s and renews its Lease in `kube-node-lease`. Ready follows the
//!   network like a container runtime's NetworkReady: a node with no CNI configuration in its conf
//!   dir (or whose 1.1 plugins fail STATUS) is NotReady with the reason in the message.
//! - **Pods**: watches the Pods with `spec.nodeName=<node>`. Per pod: a network namespace
//!   (see [`pod_netns_name`]), CNI ADD through the first configuration file of the conf dir
//!   (spec 1.1 conflist semantics; see `cni.rs`), `lo` up, `/etc/netns/<netns>/resolv.conf` (the
//!   kubelet's dnsPolicy/dnsConfig rules; `search <ns>.svc.<domain> svc.<domain> <domain>`,
//!   `options ndots:5`) and `/etc/netns/<netns>/hosts`, then the containers as processes under
//!   `ip netns exec <netns>` (which bind-mounts those files over /etc) in their own UTS namespace
//!   with the pod's hostname, with the spec's env (`value`, `fieldRef`, ConfigMap/Secret refs,
//!   `envFrom`, `$(VAR)` expansion) plus the `KUBERNETES_SERVICE_*` variables, workingDir and
//!   command/args. Restart policy with backoff (1 s doubling to 30 s), httpGet/tcpSocket/exec
//!   readiness, liveness and startup probes, init containers and sidecars. The status carries
//!   phase, podIP(s), hostIP(s), conditions and container statuses.
//! - **Images** cannot be pulled: `traefik/whoami` runs `weft-whoami` (found next to the current
//!   executable); `nicolaka/netshoot`, `busybox`, `alpine`, `curlimages/curl`, `ubuntu`, `debian`
//!   run the container's command with the host's tools (`sleep infinity` when there is none);
//!   `registry.k8s.io/pause` idles. Any other image leaves the container Waiting with reason
//!   `ImageNotSupported` and a message listing the supported images.
//! - **Deletion** (deletionTimestamp or the object gone): SIGTERM to each container's process
//!   group, the grace period, SIGKILL; CNI DEL (reverse order, cached result as prevResult); the
//!   namespace, its /etc/netns files, state and logs removed; then the object is deleted with
//!   `gracePeriodSeconds=0` and a UID precondition. On SIGTERM/SIGINT the runner tears down every
//!   pod it runs the same way (leaving the objects; logs are kept) and reports the node NotReady.
//! - `hostNetwork: true` pods run in the node's namespace, without CNI.
//!
//! # Contract for callers
//!
//! - Start: `ip netns exec <node-ns> weft-dev kubelet <args>` or `nsenter --net=/run/netns/<node-ns>
//!   weft-dev kubelet <args>` (see [`KubeletArgs`]), then [`run`]. Under `ip netns exec` (a private
//!   mount namespace) the pod namespaces are created in the parent's mount namespace, so they are
//!   visible from the root namespace either way.
//! - **Pod network namespace rule**: `/run/netns/wp-<first 12 hex digits of the pod UID, dashes
//!   removed>` ([`pod_netns_name`]), for every pod; for a `hostNetwork` pod that name is attached
//!   to the node's namespace. Run a command in a pod (its network namespace, /etc/netns files,
//!   hostname) with [`exec_in_pod`] (async, output captured, given the runner's `--state-dir`; the
//!   first container's environment, like `kubectl exec`), [`pod_exec_command_for`] (the same as a
//!   `std::process::Command` for the caller's stdio), [`exec_in_pod_api`] (async, given a client)
//!   or [`pod_exec_command`] (given the netns name; a minimal environment).
//! - **State**: `<state-dir>/pods/<namespace>_<name>.json` ([`PodRecord`]: netns, pod IPs, pids
//!   with start times, the CNI configuration and result) and `<state-dir>/pods/<namespace>_<name>/`
//!   (`<container>.log`, `resolv.conf`). [`cleanup_state`] tears down what a crashed runner left
//!   (call it before deleting the node's namespace, so CNI DEL runs there); the runner itself also
//!   does it at start.

mod cni;
mod node;
mod pod;
mod probe;
mod sandbox;
mod spec;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use sandbox::exec_base_env;
pub use sandbox::{CniRecord, NETNS_RUN_DIR, PodRecord, ProcRecordRef, cleanup_state, pod_exec_command};
pub use spec::pod_netns_name;

/// `weft-dev kubelet`: the pod runner of one node.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeletArgs {
    /// The Node's name.
    #[arg(long)]
    pub node_name: String,
    /// The node's InternalIP (its address on the underlay).
    #[arg(long)]
    pub node_ip: IpAddr,
    /// The `topology.kubernetes.io/zone` label.
    #[arg(long)]
    pub zone: Option<String>,
    /// Kubeconfig of the node's identity (`system:node:<name>`).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Where the CNI configuration is read (first `*.conflist`/`*.conf`/`*.json` by name).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// CNI plugin directories, colon-separated (like `CNI_PATH`).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: String,
    /// The runner's state: `pods/<ns>_<name>.json` and `pods/<ns>_<name>/<container>.log`.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The cluster DNS address pods get as nameserver (none: pods get the node's resolv.conf).
    #[arg(long)]
    pub cluster_dns: Option<IpAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The pods capacity reported for the node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
}

impl KubeletArgs {
    fn bin_dirs(&self) -> Vec<PathBuf> {
        self.cni_bin_dir.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect()
    }
}

async fn client_from(path: &std::path::Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    Client::try_from(config).context("building the Kubernetes client")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the pod runner until SIGTERM/SIGINT, then tears down every pod it runs.
pub async fn run(args: KubeletArgs) -> Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: tearing down the pods of this node");
        let _ = shutdown_tx.send(true);
    });
    run_until(args, shutdown_rx).await
}

/// [`run`] with the shutdown trigger supplied by the caller (`true` stops it).
pub async fn run_until(args: KubeletArgs, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    std::fs::create_dir_all(sandbox::pods_dir(&args.state_dir))
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let host_mnt = sandbox::HostMountNs::detect();
    let node_netns =
        std::env::var("WEFT_NODE_NETNS").ok().filter(|s| !s.is_empty()).or_else(sandbox::current_netns_name);
    {
        let (host, dir) = (host_mnt.clone(), args.state_dir.clone());
        let leftovers =
            tokio::task::spawn_blocking(move || sandbox::cleanup_state_with(&host, &dir)).await??;
        if leftovers > 0 {
            tracing::info!("cleaned up {leftovers} pod(s) left by a previous runner");
        }
    }
    let whoami = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("weft-whoami")))
        .unwrap_or_else(|| PathBuf::from("weft-whoami"));
    let client = client_from(&args.kubeconfig).await?;
    let id = node::NodeIdentity {
        name: args.node_name.clone(),
        ip: args.node_ip,
        zone: args.zone.clone(),
        max_pods: args.max_pods,
    };

    // Register (retrying while the API server comes up).
    let node_uid = loop {
        match node::register(&client, &id).await {
            Ok(uid) => break uid,
            Err(e) => {
                tracing::warn!("registering node {}: {e:#}; retrying", id.name);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    };
    tracing::info!(
        "node {} registered (InternalIP {}, netns {})",
        id.name,
        id.ip,
        node_netns.as_deref().unwrap_or("?")
    );

    let bin_dirs = args.bin_dirs();
    let initial = {
        let (dir, bins) = (args.cni_conf_dir.clone(), bin_dirs.clone());
        tokio::task::spawn_blocking(move || node::check_network(&dir, &bins)).await?
    };
    let (net_tx, net_rx) = watch::channel(initial);
    let monitor = tokio::spawn(node::network_monitor(
        args.cni_conf_dir.clone(),
        bin_dirs.clone(),
        net_tx,
        shutdown.clone(),
    ));
    let heartbeat =
        tokio::spawn(node::heartbeat(client.clone(), id.clone(), node_uid, net_rx.clone(), shutdown.clone()));

    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "kubelet".into(), instance: Some(args.node_name.clone()) },
    );
    let ctx = Arc::new(pod::Ctx {
        client: client.clone(),
        node_name: args.node_name.clone(),
        node_ip: args.node_ip,
        state_dir: args.state_dir.clone(),
        cni_bin_dirs: bin_dirs,
        cluster_dns: args.cluster_dns.map(|ip| ip.to_string()),
        cluster_domain: args.cluster_domain.clone(),
        host_mnt,
        node_netns,
        network: net_rx,
        whoami,
        recorder,
    });
    let mut pods = pod::PodManager::new(ctx);
    let api: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name));
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Option<HashSet<String>> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = pods.reap() => {}
            ev = stream.next() => match ev {
                Some(Ok(Event::Apply(p))) => pods.apply(p),
                Some(Ok(Event::Delete(p))) => {
                    if let Some(uid) = p.metadata.uid.as_deref() {
                        pods.gone(uid);
                    }
                }
                Some(Ok(Event::Init)) => listing = Some(HashSet::new()),
                Some(Ok(Event::InitApply(p))) => {
                    if let (Some(seen), Some(uid)) = (listing.as_mut(), p.metadata.uid.clone()) {
                        seen.insert(uid);
                    }
                    pods.apply(p);
                }
                Some(Ok(Event::InitDone)) => {
                    if let Some(seen) = listing.take() {
                        for uid in pods.uids().into_iter().filter(|u| !seen.contains(u)) {
                            pods.gone(&uid);
                        }
                    }
                }
                Some(Err(e)) => tracing::warn!("watching pods: {e}"),
                None => break,
            },
        }
    }
    pods.shutdown().await;
    monitor.abort();
    heartbeat.abort();
    node::mark_stopped(&client, &id).await;
    tracing::info!("pod runner of {} stopped", id.name);
    Ok(())
}

/// Runs `cmd` inside pod `namespace/pod` of the node whose runner uses `state_dir` (its network
/// namespace, /etc/netns files and hostname; see [`pod_exec_command`]) and returns its output
/// whatever the exit status. The pod is found through `<state_dir>/pods/<namespace>_<name>.json`;
/// works from any namespace, the root one included.
pub async fn exec_in_pod(
    state_dir: &std::path::Path,
    namespace: &str,
    pod: &str,
    cmd: &[String],
) -> Result<std::process::Output> {
    let (netns, hostname, env) = exec_target(state_dir, namespace, pod)?;
    exec_in_netns(&netns, &hostname, &env, &format!("{namespace}/{pod}"), cmd).await
}

/// The command [`exec_in_pod`] runs, for callers that want their own stdio (interactive use):
/// `cmd` in pod `namespace/pod` of the node whose runner uses `state_dir`, with the pod's
/// hostname and its first container's environment.
pub fn pod_exec_command_for(
    state_dir: &std::path::Path,
    namespace: &str,
    pod: &str,
    cmd: &[String],
) -> Result<std::process::Command> {
    let (netns, hostname, env) = exec_target(state_dir, namespace, pod)?;
    if !sandbox::netns_path(&netns).exists() {
        bail!(
            "pod {namespace}/{pod} has no network namespace {} (yet)",
            sandbox::netns_path(&netns).display()
        );
    }
    Ok(sandbox::container_command(&netns, &hostname, cmd, &env))
}

/// (netns, hostname, environment) of an exec.
type ExecTarget = (String, String, Vec<(String, String)>);

fn exec_target(state_dir: &std::path::Path, namespace: &str, pod: &str) -> Result<ExecTarget> {
    let path = sandbox::record_path(state_dir, namespace, pod);
    let rec: PodRecord = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("pod {namespace}/{pod} is not running on this node (no {})", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let hostname = if rec.hostname.is_empty() { pod.to_string() } else { rec.hostname.clone() };
    let mut env = rec.exec_env.clone();
    if env.is_empty() {
        env = exec_base_env(&hostname);
    } else if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".into(), term));
    }
    Ok((rec.netns, hostname, env))
}

/// [`exec_in_pod`] finding the pod through the API server instead (its UID gives the namespace
/// name, [`pod_netns_name`]).
pub async fn exec_in_pod_api(
    client: &Client,
    namespace: &str,
    pod: &str,
    cmd: &[String],
) -> Result<std::process::Output> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let p = api.get(pod).await.with_context(|| format!("getting pod {namespace}/{pod}"))?;
    let Some(uid) = p.metadata.uid.as_deref() else {
        bail!("pod {namespace}/{pod} has no UID");
    };
    let spec = p.spec.clone().unwrap_or_default();
    let hostname = if spec.host_network.unwrap_or(false) {
        spec.node_name.clone().unwrap_or_default()
    } else {
        spec::pod_hostname(pod, spec.hostname.as_deref())
    };
    let env = exec_base_env(&hostname);
    exec_in_netns(&pod_netns_name(uid), &hostname, &env, &format!("{namespace}/{pod}"), cmd).await
}

async fn exec_in_netns(
    netns: &str,
    hostname: &str,
    env: &[(String, String)],
    what: &str,
    cmd: &[String],
) -> Result<std::process::Output> {
    if cmd.is_empty() {
        bail!("no command given");
    }
    if !sandbox::netns_path(netns).exists() {
        bail!("pod {what} has no network namespace {} (yet)", sandbox::netns_path(netns).display());
    }
    let mut c = tokio::process::Command::from(sandbox::container_command(netns, hostname, cmd, env));
    c.stdin(std::process::Stdio::null()).kill_on_drop(true);
    c.output().await.with_context(|| format!("running {cmd:?} in pod {what}"))
}

/// The log file of a container: `<state-dir>/pods/<namespace>_<name>/<container>.log`.
pub fn container_log_path(
    state_dir: &std::path::Path,
    namespace: &str,
    pod: &str,
    container: &str,
) -> PathBuf {
    pod::log_file(state_dir, namespace, pod, container)
}
