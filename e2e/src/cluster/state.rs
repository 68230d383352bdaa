//! What a cluster is made of, persisted as `.weft/<cluster>/state.json` so that `weft-dev down`,
//! `status` and the test reaper can find every process, namespace and link it created; and the
//! machine-wide registry of cluster indexes (`/run/weft/clusters/<idx>.json`) that keeps the
//! underlay subnets and ports of clusters running side by side apart.

use std::fs::{self, File};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::process::ProcRecord;

/// Which CNI the nodes use: Weft's when Weft is installed, the reference plugins otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CniMode {
    /// The reference `bridge` + `host-local` + `portmap` plugins, with static routes between the
    /// nodes' pod /24s (a cluster without Weft).
    #[default]
    Reference,
    /// Weft's own `weft-cni` plugin: each node's agent installs the conflist and the plugin into
    /// the node's CNI directories and programs the routes between nodes.
    Weft,
}

impl std::fmt::Display for CniMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CniMode::Reference => "reference",
            CniMode::Weft => "weft",
        })
    }
}

/// The service CIDR, matching Weft's default `NetworkConfig`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The ClusterIP of the `kubernetes` Service (first address of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The cluster DNS address written into pods' resolv.conf (the kube-dns convention).
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The pod network; node `n` gets `10.244.n.0/24` in reference mode.
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Port of an operator replica's plan server on its node address (as
/// `config/operator/deployment.yaml`).
pub const PLAN_PORT: u16 = 7700;
/// Port of each agent's metrics endpoint on its node address (as `config/agent/daemonset.yaml`).
pub const AGENT_METRICS_PORT: u16 = 7702;
/// Port of an operator replica's metrics endpoint on its node address (as
/// `config/operator/deployment.yaml`).
pub const OPERATOR_METRICS_PORT: u16 = 7701;
/// How many nodes (node-1, node-2) are control-plane nodes running the operator's replicas (the
/// Deployment's 2 replicas, one per node).
pub const OPERATOR_NODES: u8 = 2;
/// Zones handed to nodes round robin.
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// The loopback ports of one cluster, a block of ten derived from its index.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    pub apiserver: u16,
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
}

impl Ports {
    /// Prometheus's HTTP port (see `observability.rs`); derived rather than stored, so older
    /// state files load unchanged.
    pub fn prometheus(&self) -> u16 {
        self.apiserver + 6
    }

    /// The OpenTelemetry Collector's Prometheus exporter (OTLP metrics, scraped by Prometheus).
    pub fn collector_metrics(&self) -> u16 {
        self.apiserver + 7
    }

    pub fn for_index(idx: u8) -> Ports {
        let base = 20000 + u16::from(idx) * 10;
        Ports {
            apiserver: base,
            etcd_client: base + 1,
            etcd_peer: base + 2,
            controller_manager: base + 3,
            scheduler: base + 4,
        }
    }
}

/// One node: a network namespace on the underlay bridge and its directories.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    /// The Node object's name (`node-1`, …).
    pub name: String,
    /// 1-based; decides the address and the reference pod CIDR.
    pub index: u8,
    /// InternalIP on the underlay bridge subnet.
    pub ip: Ipv4Addr,
    /// The node's network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// The root-namespace end of the node's veth (the node end is `eth0`).
    pub veth: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// The node's pod /24 (used by the reference CNI; Weft allocates its own blocks).
    pub pod_cidr: String,
    /// `.weft/<cluster>/nodes/<name>`.
    pub dir: PathBuf,
    /// Kubeconfig the node's processes use (API server on the bridge address, node identity).
    pub kubeconfig: PathBuf,
    /// CNI configuration directory.
    pub cni_conf_dir: PathBuf,
    /// The node's own CNI bin directory (weft-cni goes here; containerd also searches the
    /// reference plugins' directory).
    pub cni_bin_dir: PathBuf,
    /// The kubelet's state directory.
    pub kubelet_state_dir: PathBuf,
    /// The agent's state directory.
    pub agent_state_dir: PathBuf,
}

impl NodeState {
    /// What the node's agent recorded for one of its programmers (`cni`, `ipam`, `routes`,
    /// `proxy`, `dns`): `<agent state dir>/programmed/<programmer>.txt`.
    pub fn programmed_file(&self, programmer: &str) -> PathBuf {
        self.agent_state_dir.join("programmed").join(format!("{programmer}.txt"))
    }
}

/// Everything about one cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    /// Machine-wide index: underlay `172.18.<idx>.0/24`, ports `20000 + 10·idx …`.
    pub idx: u8,
    /// Whether Weft is installed (`config/`: the operator Deployment, the agent DaemonSet).
    /// Missing in older state files: true.
    #[serde(default = "default_true")]
    pub weft: bool,
    /// `.weft/<name>`.
    pub dir: PathBuf,
    /// Where kube-apiserver, etcd, kubectl… live (install.sh's output).
    pub tools_bin_dir: PathBuf,
    /// Where weft-dev lives (`target/debug`): it runs the cluster's helpers.
    pub weft_bin_dir: PathBuf,
    pub bridge: String,
    pub bridge_ip: Ipv4Addr,
    pub ports: Ports,
    pub nodes: Vec<NodeState>,
    pub processes: Vec<ProcRecord>,
    /// For test clusters: the pid of the test process that owns it (its reaper watches it).
    pub owner_pid: Option<u32>,
    /// The OpenTelemetry Collector and Prometheus watching Weft, when they run.
    #[serde(default)]
    pub observability: Option<super::observability::Observability>,
}

fn default_true() -> bool {
    true
}

impl ClusterState {
    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> Result<ClusterState> {
        let path = Self::state_file(dir);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes the state atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let path = Self::state_file(&self.dir);
        let tmp = self.dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn subnet(&self) -> String {
        subnet_for(self.idx)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// The admin kubeconfig (API server on 127.0.0.1).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn kubectl_bin(&self) -> PathBuf {
        self.tools_bin_dir.join("kubectl")
    }

    /// The upstream CRDs install.sh caches beside the tools (`<tools bin>/crds/`): the
    /// network-policy-api ClusterNetworkPolicy CRD, standard channel.
    pub fn upstream_crds_dir(&self) -> PathBuf {
        self.tools_bin_dir.join("crds")
    }

    /// Prefix of every network namespace this cluster owns (its nodes').
    pub fn netns_prefix(&self) -> String {
        netns_prefix(&self.name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Where every operator replica serves plan streams (in the order of
    /// [`ClusterState::operator_metrics_addrs`]). Only the leader answers.
    pub fn plan_addrs(&self) -> Vec<std::net::SocketAddrV4> {
        self.operator_node_addrs(PLAN_PORT)
    }

    /// The cluster CA's certificate (it signed the API server's and the plan service's).
    pub fn ca_cert(&self) -> PathBuf {
        self.pki_dir().join("ca.crt")
    }

    /// Where every operator replica serves `/metrics`, `/healthz` and `/readyz`.
    pub fn operator_metrics_addrs(&self) -> Vec<std::net::SocketAddrV4> {
        self.operator_node_addrs(OPERATOR_METRICS_PORT)
    }

    /// `port` on each control-plane node's address: where the operator's replicas listen.
    fn operator_node_addrs(&self, port: u16) -> Vec<std::net::SocketAddrV4> {
        (1..=OPERATOR_NODES)
            .map(|n| std::net::SocketAddrV4::new(super::nodes::node_ip(self, n), port))
            .collect()
    }

    /// The CNI the nodes use: Weft's when Weft is installed.
    pub fn cni(&self) -> CniMode {
        if self.weft { CniMode::Weft } else { CniMode::Reference }
    }
}

pub fn netns_prefix(cluster: &str) -> String {
    format!("weft-{cluster}-")
}

pub fn subnet_for(idx: u8) -> String {
    format!("172.18.{idx}.0/24")
}

pub fn bridge_for(idx: u8) -> String {
    format!("wbr{idx}")
}

pub fn bridge_ip_for(idx: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, idx, 1)
}

/// A cluster name must be usable in file names, namespace names and labels.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
    if !ok {
        bail!("cluster name {name:?}: use 1-24 characters a-z, 0-9 and '-', starting with a letter");
    }
    Ok(())
}

/// The machine-wide registry of cluster indexes.
pub const REGISTRY_DIR: &str = "/run/weft/clusters";

#[derive(Debug, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub name: String,
    pub dir: PathBuf,
}

/// Held while the registry is read or changed.
#[derive(Debug)]
pub struct RegistryLock {
    _file: File,
}

pub fn lock_registry() -> Result<RegistryLock> {
    fs::create_dir_all(REGISTRY_DIR).with_context(|| format!("creating {REGISTRY_DIR}"))?;
    let path = Path::new(REGISTRY_DIR).join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock().with_context(|| format!("locking {}", path.display()))?;
    Ok(RegistryLock { _file: file })
}

fn entry_path(idx: u8) -> PathBuf {
    Path::new(REGISTRY_DIR).join(format!("{idx}.json"))
}

pub fn read_entry(idx: u8) -> Option<RegistryEntry> {
    let text = fs::read_to_string(entry_path(idx)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every registered cluster, by index.
pub fn registered() -> Vec<(u8, RegistryEntry)> {
    (1..=254u8).filter_map(|i| read_entry(i).map(|e| (i, e))).collect()
}

/// Claims the lowest free index for `name` (a slot is free when unclaimed, or claimed by a cluster
/// whose state is gone and whose bridge no longer exists).
pub fn claim_index(_lock: &RegistryLock, name: &str, dir: &Path) -> Result<u8> {
    if let Some((idx, _)) = registered().into_iter().find(|(_, e)| e.name == name) {
        bail!(
            "a cluster named {name} is already registered (index {idx}); run `weft-dev down --name {name}` first"
        );
    }
    for idx in 1..=254u8 {
        let free = match read_entry(idx) {
            None => true,
            Some(e) => {
                !ClusterState::state_file(&e.dir).exists() && !super::net::link_exists(&bridge_for(idx))
            }
        };
        if free && !super::net::link_exists(&bridge_for(idx)) && ports_free(Ports::for_index(idx)) {
            let entry = RegistryEntry { name: name.to_string(), dir: dir.to_path_buf() };
            let mut f = File::create(entry_path(idx))?;
            f.write_all(serde_json::to_string(&entry)?.as_bytes())?;
            return Ok(idx);
        }
    }
    bail!("no free cluster index (254 clusters registered in {REGISTRY_DIR}?)")
}

/// Whether every loopback port of a block can be bound (something else may use them).
fn ports_free(p: Ports) -> bool {
    [p.apiserver, p.etcd_client, p.etcd_peer, p.controller_manager, p.scheduler]
        .into_iter()
        .chain([p.prometheus(), p.collector_metrics()])
        .all(|port| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_ok())
}

pub fn release_index(_lock: &RegistryLock, idx: u8, name: &str) {
    if read_entry(idx).is_some_and(|e| e.name == name) {
        let _ = fs::remove_file(entry_path(idx));
    }
}
