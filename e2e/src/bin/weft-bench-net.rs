//! Cross-node pod-to-pod TCP throughput on Weft (`--cni weft`, direct routing — the default
//! `networkconfig` — and VXLAN) against the raw underlay, in the same run: a local cluster of its own with two
//! nodes, an iperf3 server pod on node-2 and a client pod on node-1; and iperf3 between the two
//! nodes' namespaces on their underlay addresses. Rounds alternate underlay / pods so the machine's
//! noise hits both; then `networkconfig default` is switched to VXLAN and the same is measured
//! again, against the underlay of that phase. Root; `cargo build -p weft-e2e --bins` first (weft-dev and the Weft binaries
//! are taken from next to this one). Usage: `weft-bench-net [rounds] [seconds]` (default 3 × 5 s).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use weft_e2e::cluster::{NodeState, PodOptions, TestCluster, TestOptions};

/// An iperf3 server in a node's namespace, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Received bits per second of an `iperf3 -J` client run.
fn received_bps(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received.bits_per_second in {json}"))
}

fn gbit(v: &[f64]) -> String {
    v.iter().map(|x| format!("{:.2}", x / 1e9)).collect::<Vec<_>>().join(", ")
}

/// What one phase needs: the cluster, the pods and the nodes.
struct Bench<'a> {
    c: &'a TestCluster,
    ns: &'a str,
    n1: &'a NodeState,
    n2: &'a NodeState,
    server_ip: &'a str,
    rounds: usize,
    seconds: u32,
}

impl Bench<'_> {
    /// `rounds` of (underlay, pod to pod), alternating; bits per second of each.
    async fn run(&self, label: &str) -> Result<(Vec<f64>, Vec<f64>)> {
        let t = self.seconds.to_string();
        let (mut underlay, mut pods) = (Vec::new(), Vec::new());
        for round in 0..self.rounds {
            let out = tokio::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.n1.netns,
                    "iperf3",
                    "-c",
                    &self.n2.ip.to_string(),
                    "-p",
                    "5299",
                ])
                .args(["-t", &t, "-J"])
                .output()
                .await
                .context("underlay iperf3 client")?;
            ensure!(out.status.success(), "underlay iperf3: {}", String::from_utf8_lossy(&out.stdout));
            underlay.push(received_bps(&String::from_utf8_lossy(&out.stdout))?);
            let out = self
                .c
                .exec_ok(self.ns, "iperf-client", &["iperf3", "-c", self.server_ip, "-t", &t, "-J"])
                .await?;
            pods.push(received_bps(&out)?);
            eprintln!(
                "{label} round {}: underlay {:.2} Gbit/s, pod to pod {:.2} Gbit/s",
                round + 1,
                underlay.last().copied().unwrap_or_default() / 1e9,
                pods.last().copied().unwrap_or_default() / 1e9
            );
        }
        Ok((underlay, pods))
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose().context("rounds")?.unwrap_or(3);
    let seconds: u32 = args.next().map(|a| a.parse()).transpose().context("seconds")?.unwrap_or(5);
    let c = TestCluster::start(TestOptions::default().nodes(2).weft(true)).await?;
    eprintln!("cluster {} up", c.name());
    let nodes = c.nodes();
    let (n1, n2) = match nodes.as_slice() {
        [a, b, ..] => (a.clone(), b.clone()),
        _ => anyhow::bail!("the cluster has fewer than 2 nodes"),
    };
    let ns = c.namespace("bench").await?;
    let (_server_pod, _client_pod) = tokio::try_join!(
        c.run_pod(PodOptions::new(&ns, "iperf-server").command(&["iperf3", "-s"]).on_node(&n2.name)),
        c.run_pod(PodOptions::new(&ns, "iperf-client").on_node(&n1.name)),
    )?;
    let server_ip = c.pod_ip(&ns, "iperf-server").await?;
    eprintln!("pods running; server pod {server_ip} on {}", n2.name);

    let _underlay_server = Server(
        Command::new("ip")
            .args(["netns", "exec", &n2.netns, "iperf3", "-s", "-p", "5299"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the underlay iperf3 server")?,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bench = Bench { c: &c, ns: ns.name(), n1: &n1, n2: &n2, server_ip: &server_ip, rounds, seconds };
    let direct = bench.run("direct").await?;

    // The same pods over VXLAN: switch `networkconfig default`, wait for both nodes to route the
    // other's blocks through `weft.vxlan`.
    c.patch_network_config(serde_json::json!({"podNetwork":{"encapsulation":"VXLAN"}})).await?;
    c.wait_for("both nodes to route through weft.vxlan", Duration::from_secs(90), || async {
        for node in [&n1, &n2] {
            let out = Command::new("ip").args(["-n", &node.netns, "route", "show"]).output()?;
            ensure!(String::from_utf8_lossy(&out.stdout).contains("weft.vxlan"), "{} not yet", node.name);
        }
        Ok(Some(()))
    })
    .await?;
    let vxlan = bench.run("VXLAN").await?;

    println!(
        "Cross-node TCP throughput, {rounds} × {seconds} s rounds per path, underlay and pods \
         alternating (command: `weft-bench-net {rounds} {seconds}`)\n"
    );
    println!("| path | Gbit/s per round | median | ratio to the underlay of the same phase |");
    println!("|---|---|---|---|");
    for (mode, (underlay, pods)) in [("direct routing", direct), ("VXLAN", vxlan)] {
        let (mu, mp) = (median(&underlay), median(&pods));
        println!(
            "| underlay, node-1 → node-2 ({mode} phase) | {} | {:.2} | 1.00 |",
            gbit(&underlay),
            mu / 1e9
        );
        println!(
            "| pod → pod across nodes, weft-cni, {mode} | {} | {:.2} | {:.2} |",
            gbit(&pods),
            mp / 1e9,
            if mu > 0.0 { mp / mu } else { 0.0 }
        );
    }
    Ok(())
}
