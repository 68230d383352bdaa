//! Nodes: a network namespace on the cluster's bridge, its directories and identity, the
//! reference CNI configuration and routes (reference mode), and the node-side processes — the
//! pod runner (`weft-dev kubelet`) and, when Weft runs, `weft-agent` — and the operator.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{Context as _, Result, bail};

use super::controlplane::bridge_server;
use super::net;
use super::pki::{Pki, write_kubeconfig};
use super::process::{Launch, ProcRecord};
use super::state::{
    AGENT_METRICS_PORT, CLUSTER_DNS, CLUSTER_DOMAIN, ClusterState, CniMode, NodeRuntime, NodeState, POD_CIDR,
    ZONES,
};

/// The next node of the cluster (not created yet).
pub fn plan(state: &ClusterState) -> Result<NodeState> {
    let index = state.nodes.iter().map(|n| n.index).max().unwrap_or(0).checked_add(1);
    let Some(index) = index.filter(|&i| i <= 200) else {
        bail!("cluster {} has too many nodes", state.name);
    };
    let name = format!("node-{index}");
    let dir = state.dir.join("nodes").join(&name);
    // Real nodes keep these at their standard paths, bound from the node's directory.
    let node_path = |standard: &str, runner: &str| match state.runtime {
        NodeRuntime::Kubelet => dir.join("host").join(standard.trim_start_matches('/')),
        NodeRuntime::Runner => dir.join(runner),
    };
    Ok(NodeState {
        ip: node_ip(state, index),
        netns: format!("{}{name}", state.netns_prefix()),
        veth: format!("wv{}n{index}", state.idx),
        zone: ZONES[usize::from(index - 1) % ZONES.len()].to_string(),
        pod_cidr: format!("10.244.{index}.0/24"),
        kubeconfig: dir.join("kubeconfig"),
        cni_conf_dir: node_path("/etc/cni/net.d", "cni/net.d"),
        cni_bin_dir: node_path("/opt/cni/bin", "cni/bin"),
        kubelet_state_dir: node_path("/var/lib/kubelet", "kubelet"),
        agent_state_dir: node_path("/var/lib/weft", "agent"),
        dir,
        index,
        name,
    })
}

/// The address of node `index` on the cluster's underlay.
pub fn node_ip(state: &ClusterState, index: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, state.idx, 10 + index)
}

/// Creates the node's namespace, directories and kubeconfig; in reference mode also its CNI
/// configuration and the pod routes between it and every other node.
pub fn create(state: &ClusterState, node: &NodeState, pki: &Pki) -> Result<()> {
    for d in [&node.cni_conf_dir, &node.cni_bin_dir, &node.kubelet_state_dir, &node.agent_state_dir] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let ident = pki.client(
        &format!("node-{}", node.name),
        &format!("system:node:{}", node.name),
        Some("system:nodes"),
    )?;
    write_kubeconfig(&node.kubeconfig, &state.name, &bridge_server(state), &pki.ca().cert, &ident)?;
    // CoreDNS's read-only identity (config/rbac/dns.yaml binds the user weft-dns), one for the
    // cluster, issued with its first node.
    let dns = pki.pair("weft-dns");
    let dns = if dns.cert.is_file() { dns } else { pki.client("weft-dns", "weft-dns", None)? };
    write_kubeconfig(&dns_kubeconfig(node), &state.name, &bridge_server(state), &pki.ca().cert, &dns)?;
    net::create_node_netns(&node.netns, &node.veth, &state.bridge, node.ip, 24, state.bridge_ip)?;
    if state.cni == CniMode::Reference {
        write_reference_conflist(node)?;
        // Pods reach addresses outside the pod network (the API server on the bridge address)
        // from the node's address; pod-to-pod traffic keeps its source.
        net::in_netns(
            &node.netns,
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &node.pod_cidr,
                "!",
                "-d",
                POD_CIDR,
                "-m",
                "comment",
                "--comment",
                "weft-dev: pod egress",
                "-j",
                "MASQUERADE",
            ],
        )?;
        for other in state.nodes.iter().filter(|o| o.name != node.name) {
            net::route_via(&node.netns, &other.pod_cidr, other.ip)?;
            net::route_via(&other.netns, &node.pod_cidr, node.ip)?;
        }
    }
    Ok(())
}

/// The conflist for the reference plugins: a `cni0` bridge inside the node namespace, host-local
/// IPAM from the node's pod /24 (its own data dir, so nodes never share allocations), portmap.
fn write_reference_conflist(node: &NodeState) -> Result<()> {
    let gateway = node.pod_cidr.replace(".0/24", ".1");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft-reference",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": node.pod_cidr, "gateway": gateway }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": node.dir.join("cni/ipam"),
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    let path = node.cni_conf_dir.join("10-weft-reference.conflist");
    let tmp = node.cni_conf_dir.join(".10-weft-reference.conflist.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&conf)?)?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn path_env(state: &ClusterState) -> std::ffi::OsString {
    let mut p = std::ffi::OsString::from(&state.tools_bin_dir);
    p.push(":");
    p.push(&state.weft_bin_dir);
    p.push(":");
    p.push(std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
    p
}

/// Starts the node's pod runner inside its namespace.
pub fn start_kubelet(state: &ClusterState, node: &NodeState) -> Result<(ProcRecord, Child)> {
    let dev = state.weft_bin_dir.join("weft-dev");
    if !dev.is_file() {
        bail!("{} is missing; build it with `cargo build -p weft-e2e`", dev.display());
    }
    Launch::new(
        format!("kubelet-{}", node.name),
        dev,
        state.logs_dir().join(format!("kubelet-{}.log", node.name)),
    )
    .netns(&node.netns)
    .arg("kubelet")
    .args(["--node-name", &node.name])
    .args(["--node-ip", &node.ip.to_string()])
    .args(["--zone", &node.zone])
    .arg("--kubeconfig")
    .arg(&node.kubeconfig)
    .arg("--cni-conf-dir")
    .arg(&node.cni_conf_dir)
    .args(["--cni-bin-dir", &node.cni_path()])
    .arg("--state-dir")
    .arg(&node.kubelet_state_dir)
    .args(["--cluster-dns", &CLUSTER_DNS.to_string()])
    .args(["--cluster-domain", CLUSTER_DOMAIN])
    .env("WEFT_CLUSTER", &state.name)
    .env("WEFT_NODE_NETNS", &node.netns)
    .env("PATH", path_env(state))
    .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
    .spawn()
}

/// The kubeconfig the node's CoreDNS (run by its agent) reads the cluster with.
pub fn dns_kubeconfig(node: &NodeState) -> PathBuf {
    node.dir.join("dns-kubeconfig")
}

/// The token the node's agent presents on its plan stream (see `Cluster::write_plan_token`).
pub fn plan_token(node: &NodeState) -> PathBuf {
    node.dir.join("plan-token")
}

/// Starts `weft-agent` inside the node's namespace, connected to the operator's plan server.
pub fn start_agent(state: &ClusterState, node: &NodeState) -> Result<(ProcRecord, Child)> {
    let agent = state.weft_bin_dir.join("weft-agent");
    if !agent.is_file() {
        bail!("{} is missing; build it with `cargo build --workspace --bins`", agent.display());
    }
    Launch::new(
        format!("agent-{}", node.name),
        agent,
        state.logs_dir().join(format!("agent-{}.log", node.name)),
    )
    .netns(&node.netns)
    .args(["--node-name", &node.name])
    .args(["--operator", &state.plan_url()])
    .arg("--operator-ca-file")
    .arg(state.ca_cert())
    .arg("--plan-token-file")
    .arg(plan_token(node))
    .arg("--state-dir")
    .arg(&node.agent_state_dir)
    .args(["--metrics-listen", &format!("{}:{AGENT_METRICS_PORT}", node.ip)])
    // Every node serves cluster DNS (CoreDNS from the tools dir, found through PATH).
    .arg("--dns-kubeconfig")
    .arg(dns_kubeconfig(node))
    // With the reference plugins serving the node, the agent only records its CNI programming.
    .args(if state.cni == CniMode::Reference { &["--no-cni-install"][..] } else { &[] })
    .env("KUBECONFIG", &node.kubeconfig)
    .env("WEFT_CNI_CONF_DIR", &node.cni_conf_dir)
    .env("WEFT_CNI_BIN_DIR", &node.cni_bin_dir)
    .env("PATH", path_env(state))
    .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
    .envs(otel_env(state, "weft-agent", Some(&node.name)))
    .spawn()
}

/// The `OTEL_*` variables pointing a Weft process at the cluster's collector (none without one).
fn otel_env(state: &ClusterState, service: &str, node: Option<&str>) -> Vec<(String, String)> {
    state.observability.as_ref().map(|o| o.otel_env(service, node)).unwrap_or_default()
}

/// Starts `weft-operator` in the root namespace: plans on the bridge address (where the agents
/// connect), metrics on the cluster's loopback operator port.
pub fn start_operator(state: &ClusterState) -> Result<(ProcRecord, Child)> {
    operator_launch(
        state,
        "weft-operator",
        state.plan_addr().into(),
        state.operator_metrics_addr().into(),
        state.logs_dir().join("weft-operator.log"),
    )?
    .spawn()
}

/// A `weft-operator` in the root namespace with the admin kubeconfig (more arguments may follow).
pub fn operator_launch(
    state: &ClusterState,
    name: &str,
    plan: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
) -> Result<Launch> {
    let op = state.weft_bin_dir.join("weft-operator");
    if !op.is_file() {
        bail!("{} is missing; build it with `cargo build --workspace --bins`", op.display());
    }
    let tls = Pki { dir: state.pki_dir() }.plan();
    Ok(Launch::new(name, op, log)
        .args(["--plan-listen", &plan.to_string()])
        .arg("--plan-tls-cert")
        .arg(tls.cert)
        .arg("--plan-tls-key")
        .arg(tls.key)
        .args(["--metrics-listen", &metrics.to_string()])
        .env("KUBECONFIG", state.admin_kubeconfig())
        .env("PATH", path_env(state))
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .envs(otel_env(state, "weft-operator", None)))
}

/// Whether a path is an existing directory with at least one `*.yaml`/`*.yml` file.
/// The YAML files directly in `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

pub fn has_yaml(dir: &Path) -> bool {
    yaml_files(dir).is_ok_and(|files| !files.is_empty())
}
