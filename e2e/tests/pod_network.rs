//! Pod networking on Weft's own CNI, with real packets: a cluster of its own (2 nodes,
//! `--cni weft`, Weft on). Pods on one node and across nodes reach each other by IP and the
//! receiver sees the sender's real pod IP (no NAT); pod addresses come from the IPBlocks the
//! operator claimed for the pod's node; a pod reaching an address outside the pod network (a
//! namespace this test puts on the cluster's bridge) is seen with its node's address
//! (masqueraded); deleting every pod brings `kubectl get ippool default` USED back to 0.
//! Needs root and `cargo build --workspace --bins`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{OutsideHost, PodOptions, TestCluster, TestOptions, whoami_remote_ip};

/// An IPv4 CIDR (`a.b.c.d/n`) as (network, prefix length).
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u32)> {
    let (ip, len) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR"))?;
    let len: u32 = len.parse().with_context(|| format!("prefix of {s:?}"))?;
    ensure!(len <= 32, "prefix of {s:?}");
    Ok((ip.parse().with_context(|| format!("address of {s:?}"))?, len))
}

fn contains((net, len): (Ipv4Addr, u32), ip: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(net) & mask == u32::from(ip) & mask
}

#[tokio::test]
async fn pods_reach_each_other_without_nat_leave_masqueraded_and_give_their_addresses_back() -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    step("cluster up (weft-cni)");
    let ns = c.namespace("podnet").await?;
    let whoami = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "whoami").on_node(node)
    };
    let (a, b, far) = tokio::try_join!(
        c.run_pod(whoami("a", "node-1")),
        c.run_pod(whoami("b", "node-1")),
        c.run_pod(whoami("far", "node-2")),
    )?;
    let (client1, client2) = tokio::try_join!(
        c.run_pod(PodOptions::new(&ns, "client-1").on_node("node-1")),
        c.run_pod(PodOptions::new(&ns, "client-2").on_node("node-2")),
    )?;
    step("pods running");
    let mut ips = BTreeMap::new();
    for pod in [&a, &b, &far, &client1, &client2] {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let ip: Ipv4Addr = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .with_context(|| format!("pod {name} has no IP"))?
            .parse()?;
        ips.insert(name, (node, ip));
    }
    let distinct: std::collections::BTreeSet<_> = ips.values().map(|(_, ip)| *ip).collect();
    ensure!(distinct.len() == ips.len(), "duplicate pod addresses: {ips:?}");

    // Every pod's address is in a block the operator claimed for the pod's node.
    let blocks = c.get_table(&["ipblocks"]).await?;
    let mut by_node: BTreeMap<String, Vec<(Ipv4Addr, u32)>> = BTreeMap::new();
    for row in &blocks {
        let cidr = row.get("CIDR").with_context(|| format!("no CIDR in {row:?}"))?;
        let node = row.get("NODE").with_context(|| format!("no NODE in {row:?}"))?;
        by_node.entry(node.clone()).or_default().push(parse_cidr(cidr)?);
    }
    for (pod, (node, ip)) in &ips {
        let owned = by_node.get(node).map(Vec::as_slice).unwrap_or_default();
        ensure!(
            owned.iter().any(|n| contains(*n, *ip)),
            "pod {pod} on {node} has {ip}, outside its node's IPBlocks {owned:?} (all: {blocks:?})"
        );
    }
    step(&format!("pod addresses from the nodes' IPBlocks: {ips:?}"));

    // Pod to pod, same node and across nodes, both directions: the receiver sees the real pod IP.
    let cases =
        [("client-1", "a"), ("client-1", "b"), ("client-1", "far"), ("client-2", "a"), ("client-2", "far")];
    for (from, to) in cases {
        let (_, from_ip) = ips[from];
        let (_, to_ip) = ips[to];
        let body = c.curl_from_pod(&ns, from, &format!("http://{to_ip}/")).await?;
        let seen = whoami_remote_ip(&body)?;
        ensure!(seen == from_ip, "{from} ({from_ip}) -> {to} ({to_ip}): whoami saw {seen} (NATed?)\n{body}");
        ensure!(body.contains(&format!("IP: {to_ip}\n")), "{to} did not answer:\n{body}");
    }
    step("pod to pod on one node and across nodes, sources kept");

    // A pod reaching outside the pod network is seen with its node's address.
    let state = c.state();
    let mut outside = OutsideHost::start(&c, 1)?;
    outside.spawn(env!("CARGO_BIN_EXE_weft-whoami"), &["-port", "8080"], None)?;
    let outside_ip = outside.ip();
    for (pod, node) in [("client-1", "node-1"), ("client-2", "node-2")] {
        let node_ip = state.node(node).with_context(|| format!("no {node}"))?.ip;
        let url = format!("http://{outside_ip}:8080/");
        let body = c
            .wait_for(&format!("{pod} to reach {url}"), Duration::from_secs(20), || async {
                Ok(Some(c.curl_from_pod(&ns, pod, &url).await?))
            })
            .await?;
        let seen = whoami_remote_ip(&body)?;
        ensure!(seen == node_ip, "{pod} on {node} reached {outside_ip} as {seen}, not as {node_ip}\n{body}");
    }
    step("egress masqueraded to the node's address");

    // USED is the number of pods; deleting them all brings it back to 0.
    let used = || async {
        let rows = c.get_table(&["ippool", "default"]).await?;
        let row = rows.first().context("no ippool default")?;
        row.get("USED").with_context(|| format!("no USED in {row:?}"))?.parse::<u64>().context("USED")
    };
    let pods = ips.len() as u64;
    c.wait_for(&format!("ippool default USED to be {pods}"), Duration::from_secs(30), || async {
        let n = used().await?;
        if n == pods { Ok(Some(())) } else { bail!("USED {n}") }
    })
    .await?;
    c.kubectl(&["delete", "pods", "--all", "-n", &ns, "--wait=true", "--timeout=60s"]).await?;
    c.wait_for("ippool default USED to be back to 0", Duration::from_secs(30), || async {
        let n = used().await?;
        if n == 0 { Ok(Some(())) } else { bail!("USED {n}") }
    })
    .await?;
    step("every pod deleted: ippool default USED 0");
    Ok(())
}
