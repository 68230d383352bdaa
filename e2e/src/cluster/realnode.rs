//! Real nodes: containerd 2.x + runc and the kubelet in each node's network namespace, and in a
//! mount namespace of the node's own, where the paths a node owns (`/etc/cni/net.d`,
//! `/var/lib/kubelet`, …) are bind mounts of the node's directory. So the hostPath volumes of a
//! DaemonSet (Weft's agent) land in that node's directories although every node shares this
//! machine's filesystem, and everything a node mounts (volumes, overlay snapshots, pod network
//! namespaces) disappears with its mount namespace once its last process has exited.
//!
//! Images come from the cluster's registry (Debian's `docker-registry` on the bridge address,
//! serving the store `make images` fills, read-only); each node's containerd mirrors the upstream
//! registries there, so manifests name images exactly as upstream does.
//!
//! Every process of a node (containerd, kubelet, shims, containers) lives under the node's cgroup
//! `/weft-<cluster>-<node>` in every hierarchy, so teardown finds all of them there.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::process::{self, Launch, ProcRecord};
use super::state::{CLUSTER_DNS, CLUSTER_DOMAIN, ClusterState, NodeState};

/// The paths every node has of its own (bind mounts of `<node dir>/host/<path>`).
pub const NODE_PATHS: [&str; 10] = [
    "/etc/cni/net.d",
    "/opt/cni/bin",
    CNI_TIMING_DIR,
    "/var/lib/weft",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/run/containerd",
    "/run/netns",
    "/var/log/pods",
    "/var/log/containers",
];

/// The upstream registries each node's containerd pulls from the cluster's registry instead.
/// `weft.io` is where Weft's own images are named.
pub const MIRRORED_REGISTRIES: [&str; 4] = ["docker.io", "registry.k8s.io", "weft.io", "gcr.io"];

/// The sandbox image: what kubelet v1.35 and containerd v2.4 expect.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.1";

/// A CNI plugin directory containerd searches before the real ones: empty, unless a benchmark puts
/// timing wrappers there (see `weft-bench-pods`).
pub const CNI_TIMING_DIR: &str = "/opt/cni/timing";

/// Port of the cluster's registry on the bridge address.
pub const REGISTRY_PORT: u16 = 5000;

/// The directory a node's `path` is bound from.
pub fn host_path(node: &NodeState, path: &str) -> PathBuf {
    node.dir.join("host").join(path.trim_start_matches('/'))
}

/// The store `make images` fills (`e2e/tools/images.sh`): `$WEFT_CACHE/registry`.
pub fn image_store() -> PathBuf {
    let cache = std::env::var_os("WEFT_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/weft".into());
    cache.join("registry")
}

pub fn registry_addr(state: &ClusterState) -> SocketAddrV4 {
    SocketAddrV4::new(state.bridge_ip, REGISTRY_PORT)
}

const RUNC: &str = "/usr/sbin/runc";
const REGISTRY: &str = "/usr/bin/docker-registry";

/// Fails, saying what to run, when something real nodes need is missing.
pub fn check_available(tools: &Path) -> Result<()> {
    for b in ["kubelet", "containerd", "containerd-shim-runc-v2"] {
        if !tools.join(b).is_file() {
            bail!("{} is missing; run `bash e2e/tools/install.sh`", tools.join(b).display());
        }
    }
    for b in [RUNC, REGISTRY] {
        if !Path::new(b).is_file() {
            bail!(
                "{b} is missing; run `bash e2e/tools/install.sh` (it installs Debian's runc and docker-registry)"
            );
        }
    }
    let agent = image_store().join("docker/registry/v2/repositories/weft.io/weft-agent");
    if !agent.is_dir() {
        bail!("the images are not built ({} is missing); run `make images`", agent.display());
    }
    Ok(())
}

/// Starts the cluster's registry on the bridge address, serving the image store read-only.
pub fn start_registry(state: &ClusterState) -> Result<(ProcRecord, Child)> {
    let config = state.dir.join("registry.yml");
    let text = format!(
        "version: 0.1\n\
         log:\n  level: warn\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    readonly:\n      enabled: true\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {}\n",
        image_store().display(),
        registry_addr(state)
    );
    fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    Launch::new("registry", REGISTRY, state.logs_dir().join("registry.log")).arg("serve").arg(&config).spawn()
}

/// Waits until the registry answers `GET /v2/`.
pub fn wait_registry(state: &ClusterState, rec: &ProcRecord, timeout: Duration) -> Result<()> {
    let addr = registry_addr(state);
    let deadline = Instant::now() + timeout;
    loop {
        if !rec.is_alive() {
            bail!(
                "the registry exited; last lines of {}:\n{}",
                rec.log.display(),
                process::log_tail(&rec.log, 20)
            );
        }
        if let Ok(status) = http_status(addr, "/v2/")
            && status == 200
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the registry on {addr} did not answer within {timeout:?} (see {})", rec.log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_status(addr: SocketAddrV4, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// The node's cgroup (in every hierarchy).
fn cgroup_name(state: &ClusterState, node: &NodeState) -> String {
    format!("weft-{}-{}", state.name, node.name)
}

/// The node's cgroups that exist now (one per hierarchy; none once the node is torn down).
pub fn node_cgroups(state: &ClusterState, node: &NodeState) -> Vec<PathBuf> {
    let name = cgroup_name(state, node);
    hierarchies().into_iter().map(|h| h.join(&name)).filter(|p| p.is_dir()).collect()
}

fn hierarchies() -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
    let mut out: Vec<PathBuf> =
        rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("cgroup.procs").is_file()).collect();
    // A cgroup2 mount at the top is one hierarchy of its own.
    if Path::new("/sys/fs/cgroup/cgroup.procs").is_file() {
        out = vec![PathBuf::from("/sys/fs/cgroup")];
    }
    out.sort();
    out
}

/// Creates `/weft-<cluster>-<node>/{runtime,pods}` in every hierarchy: containerd and the kubelet
/// go into `runtime`, the kubelet's `cgroupRoot` is `pods`.
fn create_cgroups(state: &ClusterState, node: &NodeState) -> Result<()> {
    let name = cgroup_name(state, node);
    for h in hierarchies() {
        for rel in [name.clone(), format!("{name}/runtime"), format!("{name}/pods")] {
            let dir = h.join(&rel);
            fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
            // cpuset cgroups start empty in v1: a task cannot join before cpus and mems are set.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let parent = dir.parent().map(|p| p.join(f));
                if let Some(parent) = parent
                    && dir.join(f).is_file()
                    && fs::read_to_string(dir.join(f)).is_ok_and(|v| v.trim().is_empty())
                {
                    let v = fs::read_to_string(&parent)
                        .with_context(|| format!("reading {}", parent.display()))?;
                    fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("writing {}/{f}", dir.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Moves `pid` into the node's `runtime` cgroup; what it starts later (shims, containers) stays
/// under the node's cgroup.
fn join_cgroup(state: &ClusterState, node: &NodeState, pid: u32) -> Result<()> {
    let name = cgroup_name(state, node);
    for h in hierarchies() {
        let procs = h.join(&name).join("runtime/cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving {pid} into {}", procs.display()))?;
    }
    Ok(())
}

/// Every pid under the node's cgroup (the pids hierarchy, or the first one there is).
fn cgroup_pids(state: &ClusterState, node: &NodeState) -> Vec<u32> {
    let name = cgroup_name(state, node);
    let hs = hierarchies();
    let Some(h) = hs.iter().find(|h| h.ends_with("pids")).or(hs.first()) else { return Vec::new() };
    let mut pids = Vec::new();
    let mut stack = vec![h.join(name)];
    while let Some(dir) = stack.pop() {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    pids
}

/// The live processes named `comm` under the node's cgroup (its containers' too): the agent,
/// the CoreDNS it runs, … as a test looks for them on a real node.
pub fn node_processes(state: &ClusterState, node: &NodeState, comm: &str) -> Vec<ProcRecord> {
    cgroup_pids(state, node)
        .into_iter()
        .filter_map(|pid| {
            let name = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if name.trim() != comm {
                return None;
            }
            let stat = process::proc_stat(pid)?;
            let record = ProcRecord {
                name: format!("{comm}-{}", node.name),
                pid,
                start_time: stat.start_time,
                log: host_path(node, "/var/log/pods"),
                netns: Some(node.netns.clone()),
            };
            record.is_alive().then_some(record)
        })
        .collect()
}

/// The running `weft-agent` of the node (its DaemonSet pod's container): what a test kills to
/// crash the agent as a real node would see it.
pub fn agent_process(state: &ClusterState, node: &NodeState) -> Option<ProcRecord> {
    node_processes(state, node, "weft-agent").into_iter().next()
}

/// Stops everything still running under the node's cgroup (shims, containers: the recorded
/// containerd and kubelet are stopped first by the caller) and removes its cgroups.
pub fn teardown_node(state: &ClusterState, node: &NodeState, children: &mut Vec<Child>) -> Vec<String> {
    let mut errors = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup_pids(state, node);
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            errors.push(format!("processes {pids:?} of node {} did not exit", node.name));
            break;
        }
        process::terminate(&pids, Duration::from_secs(2), children);
    }
    let name = cgroup_name(state, node);
    for h in hierarchies() {
        let root = h.join(&name);
        if !root.exists() {
            continue;
        }
        // Depth first: a cgroup is removed only once its children are.
        let mut dirs = vec![root.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(rd) = fs::read_dir(&dirs[i]) {
                dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()));
            }
            i += 1;
        }
        for d in dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(d) {
                errors.push(format!("removing cgroup {}: {e}", d.display()));
            }
        }
    }
    errors
}

/// Writes the node's containerd and kubelet configuration and its registry mirrors, and creates
/// the directories its mount namespace binds and the cgroups it runs in.
pub fn prepare(state: &ClusterState, node: &NodeState, ca_cert: &Path) -> Result<()> {
    for p in NODE_PATHS {
        for d in [host_path(node, p), PathBuf::from(p)] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
    }
    let certs_d = node.dir.join("containerd/certs.d");
    let registry = registry_addr(state);
    for upstream in MIRRORED_REGISTRIES {
        let dir = certs_d.join(upstream);
        fs::create_dir_all(&dir)?;
        // override_path: the store keeps each upstream registry's repositories under its name.
        let hosts = format!(
            "[host.\"http://{registry}/v2/{upstream}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
        );
        fs::write(dir.join("hosts.toml"), hosts)?;
    }
    fs::write(containerd_config(node), containerd_toml(&certs_d))?;
    fs::write(kubelet_config(node), kubelet_yaml(state, node, ca_cert))?;
    create_cgroups(state, node)
}

fn containerd_config(node: &NodeState) -> PathBuf {
    node.dir.join("containerd/config.toml")
}

fn kubelet_config(node: &NodeState) -> PathBuf {
    node.dir.join("kubelet-config.yaml")
}

/// containerd 2.x (config version 3). The paths are the standard ones: the node's mount
/// namespace makes them the node's own.
fn containerd_toml(certs_d: &Path) -> String {
    format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{certs_d}"

[plugins."io.containerd.cri.v1.runtime"]
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    # {timing} is empty except while weft-bench-pods times the plugins (wrappers there are
    # found first).
    bin_dirs = ["{timing}", "/opt/cni/bin", "{reference}"]
    conf_dir = "/etc/cni/net.d"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"#,
        certs_d = certs_d.display(),
        reference = super::REFERENCE_CNI_BIN_DIR,
        timing = CNI_TIMING_DIR,
    )
}

/// The kubelet's configuration: webhook authentication and authorization as on a real cluster
/// (no anonymous access; the API server presents its kubelet client certificate), cgroupfs under
/// the node's own cgroup, cluster DNS at the kube-dns address Weft serves.
fn kubelet_yaml(state: &ClusterState, node: &NodeState, ca_cert: &Path) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}/pods
failCgroupV1: false
failSwapOn: false
clusterDNS: [{dns}]
clusterDomain: {domain}
resolvConf: /etc/resolv.conf
podLogsDir: /var/log/pods
serializeImagePulls: false
# A shared machine: disk use by other work must not evict this node's pods.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
",
        ip = node.ip,
        ca = ca_cert.display(),
        cgroup = cgroup_name(state, node),
        dns = CLUSTER_DNS,
        domain = CLUSTER_DOMAIN,
    );
    y
}

fn path_env(state: &ClusterState) -> std::ffi::OsString {
    // The shim containerd starts is found on PATH: the one built with containerd comes first.
    let mut p = std::ffi::OsString::from(&state.tools_bin_dir);
    p.push(":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    p
}

/// The shell that makes the node's mount and UTS namespaces: names the node `$NODE_HOSTNAME`,
/// binds each `<src> <dst>` pair given after the config path, then becomes containerd.
const CONTAINERD_WRAPPER: &str = r#"set -e
hostname "$NODE_HOSTNAME"
conf=$1; shift
while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
exec containerd --config "$conf""#;

/// Starts containerd in the node's network namespace, a new mount namespace (mounts from the
/// root namespace still propagate in; none of the node's propagate out) and a new UTS namespace
/// whose hostname is the node's name, as on a real node: hostNetwork pods share it (the
/// Services e2e tests check their hostname against the node name).
pub fn start_containerd(state: &ClusterState, node: &NodeState) -> Result<(ProcRecord, Child)> {
    let mut launch = Launch::new(
        format!("containerd-{}", node.name),
        "unshare",
        state.logs_dir().join(format!("containerd-{}.log", node.name)),
    )
    .netns(&node.netns)
    .args(["--mount", "--uts", "--propagation", "slave", "--", "sh", "-c", CONTAINERD_WRAPPER, "sh"])
    .arg(containerd_config(node));
    for p in NODE_PATHS {
        launch = launch.arg(host_path(node, p)).arg(p);
    }
    let started = launch.env("PATH", path_env(state)).env("NODE_HOSTNAME", &node.name).spawn()?;
    join_cgroup(state, node, started.0.pid)?;
    Ok(started)
}

/// Waits until the node's containerd serves its socket.
pub fn wait_containerd(node: &NodeState, rec: &ProcRecord, timeout: Duration) -> Result<()> {
    let sock = host_path(node, "/run/containerd").join("containerd.sock");
    let deadline = Instant::now() + timeout;
    while !sock.exists() || std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if !rec.is_alive() {
            bail!(
                "containerd of {} exited; last lines of {}:\n{}",
                node.name,
                rec.log.display(),
                process::log_tail(&rec.log, 20)
            );
        }
        if Instant::now() >= deadline {
            bail!("containerd of {} did not serve {} within {timeout:?}", node.name, sock.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Starts the kubelet in the node's network namespace and containerd's mount namespace.
pub fn start_kubelet(
    state: &ClusterState,
    node: &NodeState,
    containerd: &ProcRecord,
) -> Result<(ProcRecord, Child)> {
    let started = Launch::new(
        format!("kubelet-{}", node.name),
        state.tools_bin_dir.join("kubelet"),
        state.logs_dir().join(format!("kubelet-{}.log", node.name)),
    )
    .netns(&node.netns)
    .mountns(format!("/proc/{}/ns/mnt", containerd.pid))
    .arg("--config")
    .arg(kubelet_config(node))
    .arg("--kubeconfig")
    .arg(&node.kubeconfig)
    .args(["--hostname-override", &node.name])
    .args(["--node-ip", &node.ip.to_string()])
    .args(["--node-labels", &format!("topology.kubernetes.io/zone={}", node.zone)])
    .arg("--v=1")
    .env("PATH", path_env(state))
    .spawn()?;
    join_cgroup(state, node, started.0.pid)?;
    Ok(started)
}
