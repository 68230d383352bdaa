//! The agent's IPAM checkpoint across a crash, with real packets: a cluster of its own (2 nodes,
//! `--cni weft`, Weft on). Three pods run on node-1; its agent is killed with SIGKILL while they
//! run and started again. Every pod keeps its address, the pods still reach each other (on the
//! node and from node-2), three new pods on node-1 get fresh addresses, and no two pods share one
//! (`kubectl get pods -o wide`).
//! Needs root and `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use rustix::process::Signal;
use weft_e2e::cluster::{
    AGENT_METRICS_PORT, PodOptions, TestCluster, TestOptions, http_get, whoami_remote_ip,
};

fn pod_ip(pod: &Pod) -> Result<Ipv4Addr> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .with_context(|| format!("pod {name} has no IP"))?
        .parse()
        .with_context(|| format!("IP of pod {name}"))
}

/// Pod name → (node, IP) from `kubectl get pods -o wide`; fails on a pod without an address.
/// The table is read by column position: some headers (`NOMINATED NODE`) and values (`RESTARTS`
/// like `1 (5s ago)`) hold spaces.
async fn pods_wide(c: &TestCluster, ns: &str) -> Result<BTreeMap<String, (String, Ipv4Addr)>> {
    let out = c.kubectl(&["get", "pods", "-o", "wide", "-n", ns]).await?;
    let mut lines = out.lines();
    let header = lines.next().context("kubectl printed no header")?;
    let start = |name: &str| -> Result<usize> {
        header
            .match_indices(name)
            .map(|(i, _)| i)
            .find(|&i| {
                let before = header[..i].chars().last().is_none_or(char::is_whitespace);
                let after = header[i + name.len()..].chars().next().is_none_or(char::is_whitespace);
                before && after
            })
            .with_context(|| format!("no {name} column in {header:?}"))
    };
    let (ip_at, node_at, nominated_at) = (start("IP")?, start("NODE")?, start("NOMINATED")?);
    let field = |line: &str, from: usize, to: usize| {
        line.get(from..to.min(line.len())).unwrap_or("").trim().to_string()
    };
    let mut pods = BTreeMap::new();
    for line in lines {
        let name = line.split_whitespace().next().unwrap_or_default().to_string();
        let ip = field(line, ip_at, node_at);
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("IP {ip:?} of pod {name} in {line:?}"))?;
        pods.insert(name, (field(line, node_at, nominated_at), ip));
    }
    Ok(pods)
}

/// Each address held by more than one pod.
fn duplicates(pods: &BTreeMap<String, (String, Ipv4Addr)>) -> BTreeMap<Ipv4Addr, Vec<String>> {
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for (name, (_, ip)) in pods {
        by_ip.entry(*ip).or_default().push(name.clone());
    }
    by_ip.retain(|_, names| names.len() > 1);
    by_ip
}

#[tokio::test]
async fn a_sigkilled_agent_comes_back_with_every_pod_keeping_its_address() -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    step("cluster up (weft-cni)");
    let ns = c.namespace("restart").await?;
    let whoami = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "whoami").on_node(node)
    };
    let (a, b, client) = tokio::try_join!(
        c.run_pod(whoami("a", "node-1")),
        c.run_pod(whoami("b", "node-1")),
        c.run_pod(PodOptions::new(&ns, "client").on_node("node-1")),
    )?;
    let remote = c.run_pod(PodOptions::new(&ns, "remote").on_node("node-2")).await?;
    let mut before = BTreeMap::new();
    for pod in [&a, &b, &client, &remote] {
        before.insert(pod.metadata.name.clone().unwrap_or_default(), pod_ip(pod)?);
    }
    step(&format!("pods running: {before:?}"));

    // SIGKILL the node's agent while the pods run, then start it again.
    let agent = "the agent of node-1";
    let record = c.agent_process("node-1")?;
    ensure!(c.kill_agent("node-1", Signal::KILL).await?, "{agent} did not exit on SIGKILL");
    ensure!(!record.is_alive(), "{agent} (pid {}) is still alive", record.pid);
    step(&format!("{agent} (pid {}) killed with SIGKILL", record.pid));
    // The data path does not need the agent: the pods still talk while it is down.
    let body = c.curl_from_pod(&ns, "client", &format!("http://{}/", before["a"])).await?;
    ensure!(whoami_remote_ip(&body)? == before["client"], "client -> a while the agent is down:\n{body}");

    let restarted = c.wait_agent_restarted("node-1").await?;
    ensure!(restarted.pid != record.pid, "the agent was not started again");
    let node1 = c.state().node("node-1").cloned().context("no node-1")?;
    let readyz = std::net::SocketAddr::from((node1.ip, AGENT_METRICS_PORT));
    c.wait_for("the restarted agent to be ready", Duration::from_secs(60), || async {
        let (code, body) = http_get(readyz, "/readyz").await?;
        if code == 200 { Ok(Some(())) } else { bail!("/readyz {code}: {body}") }
    })
    .await?;
    c.wait_for("networkconfig default to be converged 2/2 again", Duration::from_secs(60), || async {
        let rows = c.get_table(&["networkconfig", "default"]).await?;
        let row = rows.first().context("no row")?;
        let col = |k: &str| row.get(k).map(String::as_str).unwrap_or_default();
        if col("CONVERGED") == "2/2" && col("READY") == "True" { Ok(Some(())) } else { bail!("{row:?}") }
    })
    .await?;
    step(&format!("{agent} restarted (pid {}) and ready", restarted.pid));

    // Every pod keeps its address.
    let after = pods_wide(&c, &ns).await?;
    for (name, ip) in &before {
        let (_, now) = after.get(name).with_context(|| format!("pod {name} is gone: {after:?}"))?;
        ensure!(now == ip, "pod {name} had {ip} before the agent was killed, now {now}");
    }
    // And the pods still reach each other, on the node and from the other node.
    for (from, to) in [("client", "a"), ("client", "b"), ("remote", "a"), ("remote", "b")] {
        let (from_ip, to_ip) = (before[from], before[to]);
        let body = c.curl_from_pod(&ns, from, &format!("http://{to_ip}/")).await?;
        let seen = whoami_remote_ip(&body)?;
        ensure!(seen == from_ip, "{from} ({from_ip}) -> {to} ({to_ip}): whoami saw {seen}\n{body}");
    }
    step("every pod kept its address and the pods still reach each other");

    // Three new pods on the node get fresh addresses.
    let (n1, n2, n3) = tokio::try_join!(
        c.run_pod(whoami("new-1", "node-1")),
        c.run_pod(whoami("new-2", "node-1")),
        c.run_pod(whoami("new-3", "node-1")),
    )?;
    let old: BTreeSet<Ipv4Addr> = before.values().copied().collect();
    for pod in [&n1, &n2, &n3] {
        let ip = pod_ip(pod)?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        ensure!(!old.contains(&ip), "new pod {name} got {ip}, an address an older pod holds ({before:?})");
    }
    let all = pods_wide(&c, &ns).await?;
    ensure!(all.len() == before.len() + 3, "expected {} pods, got {all:?}", before.len() + 3);
    for (name, (node, _)) in &all {
        let want = if name == "remote" { "node-2" } else { "node-1" };
        ensure!(node == want, "pod {name} runs on {node:?}, not {want}");
    }
    let dups = duplicates(&all);
    ensure!(dups.is_empty(), "pods sharing an address: {dups:?} (all: {all:?})");
    let body = c.curl_from_pod(&ns, "remote", &format!("http://{}/", pod_ip(&n1)?)).await?;
    ensure!(whoami_remote_ip(&body)? == before["remote"], "remote -> new-1:\n{body}");
    step(&format!("3 new pods with fresh addresses, no duplicates: {all:?}"));
    Ok(())
}
