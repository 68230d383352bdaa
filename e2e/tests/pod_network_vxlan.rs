//! Pod networking over VXLAN, with real packets: a cluster of its own (2 nodes, `--cni weft`,
//! Weft on). `networkconfig default` is switched to `encapsulation: VXLAN`; once both agents run
//! the new plan, every node has the `weft.vxlan` device (VNI 4096, port 4789) and routes the other
//! node's blocks through it; pods on different nodes reach each other through the tunnel and the
//! receiver sees the sender's real pod IP. Switching back to `None` removes the device and the
//! pods still reach each other directly.
//! Needs root and `cargo build --workspace --bins`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{NodeState, PodOptions, TestCluster, TestOptions, whoami_remote_ip};

/// The PLAN column of `kubectl get networkconfig default` (0 before the first plan).
async fn plan_version(c: &TestCluster) -> Result<u64> {
    let rows = c.get_table(&["networkconfig", "default"]).await?;
    let row = rows.first().context("no networkconfig default")?;
    Ok(row.get("PLAN").and_then(|p| p.parse().ok()).unwrap_or(0))
}

/// Waits until `networkconfig default` shows a plan newer than `after`, CONVERGED 2/2, Ready.
async fn wait_converged_after(c: &TestCluster, after: u64) -> Result<u64> {
    c.wait_for(
        &format!("networkconfig default to converge 2/2 on a plan newer than {after}"),
        Duration::from_secs(90),
        || async {
            let rows = c.get_table(&["networkconfig", "default"]).await?;
            let row = rows.first().context("no row")?;
            let col = |k: &str| row.get(k).map(String::as_str).unwrap_or_default();
            let plan: u64 = col("PLAN").parse().unwrap_or(0);
            if plan > after && col("CONVERGED") == "2/2" && col("READY") == "True" {
                return Ok(Some(plan));
            }
            bail!("networkconfig default: {row:?}")
        },
    )
    .await
}

/// `ip -n <node netns> args…`: (success, stdout+stderr).
fn ip_in(node: &NodeState, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("ip").arg("-n").arg(&node.netns).args(args).stdin(Stdio::null()).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// TX packets of `weft.vxlan` in the node's namespace.
fn vxlan_tx_packets(node: &NodeState) -> Result<u64> {
    let (ok, text) = ip_in(node, &["-s", "link", "show", "weft.vxlan"])?;
    ensure!(ok, "ip -s link show weft.vxlan on {}: {text}", node.name);
    // "TX:  bytes packets …" then the numbers on the next line.
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with("TX:") {
            let numbers = lines.next().context("no TX numbers")?;
            let packets = numbers.split_whitespace().nth(1).context("no TX packets")?;
            return packets.parse().with_context(|| format!("TX packets {packets:?}"));
        }
    }
    bail!("no TX statistics in {text}")
}

#[tokio::test]
async fn pods_reach_each_other_over_vxlan_without_nat() -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    step("cluster up (weft-cni)");
    let nodes = c.nodes();
    ensure!(nodes.len() == 2, "expected 2 nodes, got {}", nodes.len());

    let before = plan_version(&c).await?;
    c.patch_network_config(serde_json::json!({"podNetwork":{"encapsulation":"VXLAN"}})).await?;
    let plan = wait_converged_after(&c, before).await?;
    step(&format!("networkconfig default: VXLAN, converged 2/2 at plan {plan}"));

    for (node, peer) in [(&nodes[0], &nodes[1]), (&nodes[1], &nodes[0])] {
        let (ok, link) = ip_in(node, &["-d", "link", "show", "weft.vxlan"])?;
        ensure!(ok, "no weft.vxlan on {}: {link}", node.name);
        for want in ["vxlan id 4096", &format!("local {}", node.ip), "dstport 4789", "nolearning"] {
            ensure!(link.contains(want), "weft.vxlan on {} lacks {want:?}:\n{link}", node.name);
        }
        let [a, b, c3, d] = node.ip.octets();
        let mac = format!("02:57:{a:02x}:{b:02x}:{c3:02x}:{d:02x}");
        ensure!(link.contains(&mac), "weft.vxlan on {} does not have the MAC {mac}:\n{link}", node.name);
        let (_, routes) = ip_in(node, &["route", "show", "proto", "87"])?;
        ensure!(
            routes
                .lines()
                .any(|l| l.contains(&format!("via {} dev weft.vxlan", peer.ip)) && l.contains("onlink")),
            "{} has no route through weft.vxlan to {}'s blocks:\n{routes}",
            node.name,
            peer.name
        );
        let (_, fdb) = {
            let out = Command::new("ip")
                .args(["netns", "exec", &node.netns, "bridge", "fdb", "show", "dev", "weft.vxlan"])
                .stdin(Stdio::null())
                .output()?;
            (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
        };
        ensure!(
            fdb.lines().any(|l| l.contains(&format!("dst {}", peer.ip)) && l.contains("permanent")),
            "{} has no FDB entry for {}:\n{fdb}",
            node.name,
            peer.name
        );
    }
    step("weft.vxlan with routes, FDB and neighbour entries on both nodes");

    let ns = c.namespace("vxlan").await?;
    let whoami = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "whoami").on_node(node)
    };
    let (near, far, client1, client2) = tokio::try_join!(
        c.run_pod(whoami("near", "node-1")),
        c.run_pod(whoami("far", "node-2")),
        c.run_pod(PodOptions::new(&ns, "client-1").on_node("node-1")),
        c.run_pod(PodOptions::new(&ns, "client-2").on_node("node-2")),
    )?;
    let mut ips = BTreeMap::new();
    for pod in [&near, &far, &client1, &client2] {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ip: Ipv4Addr = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .with_context(|| format!("pod {name} has no IP"))?
            .parse()?;
        ips.insert(name, ip);
    }
    step(&format!("pods running: {ips:?}"));

    let tx_before = vxlan_tx_packets(&nodes[0])? + vxlan_tx_packets(&nodes[1])?;
    for (from, to) in [("client-1", "far"), ("client-2", "near"), ("client-1", "near")] {
        let (from_ip, to_ip) = (ips[from], ips[to]);
        let body = c.curl_from_pod(&ns, from, &format!("http://{to_ip}/")).await?;
        let seen = whoami_remote_ip(&body)?;
        ensure!(seen == from_ip, "{from} ({from_ip}) -> {to} ({to_ip}): whoami saw {seen} (NATed?)\n{body}");
        ensure!(body.contains(&format!("IP: {to_ip}\n")), "{to} did not answer:\n{body}");
    }
    let tx_after = vxlan_tx_packets(&nodes[0])? + vxlan_tx_packets(&nodes[1])?;
    ensure!(tx_after > tx_before, "no packet went through weft.vxlan ({tx_before} -> {tx_after})");
    step(&format!(
        "pod to pod across nodes over VXLAN, sources kept ({} packets tunnelled)",
        tx_after - tx_before
    ));

    // Back to direct routing: the device goes, the pods still reach each other.
    let before = plan_version(&c).await?;
    c.patch_network_config(serde_json::json!({"podNetwork":{"encapsulation":"None"}})).await?;
    let plan = wait_converged_after(&c, before).await?;
    for node in &nodes {
        let (ok, link) = ip_in(node, &["link", "show", "weft.vxlan"])?;
        ensure!(!ok, "weft.vxlan is still on {} after switching to None:\n{link}", node.name);
        let (_, routes) = ip_in(node, &["route", "show", "proto", "87"])?;
        ensure!(!routes.contains("weft.vxlan"), "{} still routes through weft.vxlan:\n{routes}", node.name);
    }
    for (from, to) in [("client-1", "far"), ("client-2", "near")] {
        let (from_ip, to_ip) = (ips[from], ips[to]);
        let body = c.curl_from_pod(&ns, from, &format!("http://{to_ip}/")).await?;
        let seen = whoami_remote_ip(&body)?;
        ensure!(seen == from_ip, "{from} ({from_ip}) -> {to} ({to_ip}) direct: whoami saw {seen}\n{body}");
    }
    step(&format!("back to None at plan {plan}: weft.vxlan removed, direct routes work"));
    Ok(())
}
