//! Nodes: a network namespace on the cluster's bridge, its directories and identity, and the
//! reference CNI configuration and routes (without Weft). What runs on a node is `realnode.rs`.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::controlplane::bridge_server;
use super::net;
use super::pki::{Pki, write_kubeconfig};
use super::state::{ClusterState, CniMode, NodeState, POD_CIDR, ZONES};

/// The next node of the cluster (not created yet).
pub fn plan(state: &ClusterState) -> Result<NodeState> {
    let index = state.nodes.iter().map(|n| n.index).max().unwrap_or(0).checked_add(1);
    let Some(index) = index.filter(|&i| i <= 200) else {
        bail!("cluster {} has too many nodes", state.name);
    };
    let name = format!("node-{index}");
    let dir = state.dir.join("nodes").join(&name);
    // The node's own standard paths, bound from its directory (see realnode.rs).
    let node_path = |standard: &str| dir.join("host").join(standard.trim_start_matches('/'));
    Ok(NodeState {
        ip: node_ip(state, index),
        netns: format!("{}{name}", state.netns_prefix()),
        veth: format!("wv{}n{index}", state.idx),
        zone: ZONES[usize::from(index - 1) % ZONES.len()].to_string(),
        pod_cidr: format!("10.244.{index}.0/24"),
        kubeconfig: dir.join("kubeconfig"),
        cni_conf_dir: node_path("/etc/cni/net.d"),
        cni_bin_dir: node_path("/opt/cni/bin"),
        kubelet_state_dir: node_path("/var/lib/kubelet"),
        agent_state_dir: node_path("/var/lib/weft"),
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
    net::create_node_netns(&node.netns, &node.veth, &state.bridge, node.ip, 24, state.bridge_ip)?;
    if state.cni() == CniMode::Reference {
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

/// The token an agent a benchmark runs itself presents on its plan stream (see
/// `Cluster::write_plan_token`).
pub fn plan_token(node: &NodeState) -> PathBuf {
    node.dir.join("plan-token")
}

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
