//! Ingress benchmarks on a local cluster of its own (2 nodes, `--cni weft`, Weft on), written for
//! docs/PERFORMANCE.md:
//!
//! - route change → serving: an Ingress for a new host is created through the API and a client
//!   outside the cluster polls node-1's address (every 10 ms) until that host answers from the
//!   backend; `--changes` times, p50/p99. Operator compile, plan stream, agent render, `nginx -t`
//!   and the graceful reload are all inside the figure.
//! - throughput: `wrk` from node-1's namespace, rounds alternating straight to the whoami pod
//!   (on node-2) and through the ingress (node-1's nginx → ClusterIP → the same pod), requests/s
//!   of each, medians and their ratio.
//!
//! `--pin` gives each node a CPU of its own, as separate machines would have: node-1's processes
//! (agent, nginx, its pods) and the `wrk` client on CPU 0, node-2's (the whoami pod) on CPU 1; the
//! control plane floats. Without it every process shares every CPU, so nginx takes its CPU from
//! the backend and the client in the same round.
//!
//! Root; `cargo build -p weft-e2e --bins` first. Usage:
//! `weft-bench-ingress [--changes N] [--rounds R] [--seconds S] [--connections C] [--path P] [--pin]`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::PostParams;
use weft_e2e::cluster::{OutsideHost, PodOptions, TestCluster, TestOptions};

struct Args {
    changes: usize,
    rounds: usize,
    seconds: u32,
    connections: u32,
    path: String,
    pin: bool,
}

fn args() -> Result<Args> {
    let mut a =
        Args { changes: 40, rounds: 5, seconds: 10, connections: 32, path: "/bench".into(), pin: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--pin" {
            a.pin = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--changes" => a.changes = value.parse()?,
            "--rounds" => a.rounds = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--connections" => a.connections = value.parse()?,
            "--path" => a.path = value,
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, 50.0)
}

fn ingress(ns: &str, name: &str, host: &str) -> Result<Ingress> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ingressClassName": "weft", "rules": [{"host": host, "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "echo", "port": {"number": 80}}}}
        ]}}]}
    }))?)
}

/// Pins node `i`'s processes to CPU `i` (modulo the CPUs there are): every process in the node's
/// network namespace and every descendant of one (pods are children of the node's kubelet
/// runner), threads included.
fn pin_nodes(c: &TestCluster) -> Result<()> {
    // (pid, parent pid, `net:[<inode>]` of its network namespace) of every process.
    let mut procs: Vec<(String, String, String)> = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let pid = entry?.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name (which may hold spaces) follow the last ')'.
        let ppid =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
        let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        if let (Some(ppid), Some(net)) = (ppid, net) {
            procs.push((pid, ppid, net.to_string_lossy().into_owned()));
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    for (i, node) in c.nodes().iter().enumerate() {
        let cpu = (i % cpus).to_string();
        let ns_ino = std::fs::metadata(format!("/run/netns/{}", node.netns))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .with_context(|| format!("node {} has no network namespace", node.name))?;
        let wanted = format!("net:[{ns_ino}]");
        let mut pids: std::collections::BTreeSet<&str> =
            procs.iter().filter(|(_, _, net)| *net == wanted).map(|(pid, _, _)| pid.as_str()).collect();
        loop {
            let children: Vec<&str> = procs
                .iter()
                .filter(|(pid, ppid, _)| !pids.contains(pid.as_str()) && pids.contains(ppid.as_str()))
                .map(|(pid, _, _)| pid.as_str())
                .collect();
            if children.is_empty() {
                break;
            }
            pids.extend(children);
        }
        let mut pinned = 0;
        for pid in &pids {
            // A process may have exited since: the others are still pinned.
            let status = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", &cpu, pid])
                .stdout(std::process::Stdio::null())
                .status();
            pinned += usize::from(status.is_ok_and(|s| s.success()));
        }
        ensure!(pinned > 0, "no process of {} could be pinned", node.name);
        eprintln!("pinned {pinned} processes of {} to CPU {cpu}", node.name);
    }
    Ok(())
}

/// Requests/s from `wrk` output (`Requests/sec: 12345.67`).
fn requests_per_second(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?
        .trim()
        .parse()
        .context("Requests/sec is not a number")
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let weft_dev = std::env::current_exe()?.with_file_name("weft-dev");
    let c = TestCluster::start(TestOptions::default().nodes(2).weft(true).weft_dev(weft_dev)).await?;
    let ns_guard = c.namespace("bench-ingress").await?;
    let ns = ns_guard.name();
    let nodes = c.nodes();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    c.run_pod(
        PodOptions::new(ns, "echo").image("traefik/whoami").port(80).label("app", "echo").on_node(&n2.name),
    )
    .await?;
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: {ns}}}\n\
         spec:\n  selector: {{app: echo}}\n  ports: [{{port: 80, targetPort: 80}}]\n"
    ))
    .await?;
    let pod_ip = c.pod_ip(ns, "echo").await?;
    let outside = OutsideHost::start(&c, 1)?;
    let api: Api<Ingress> = Api::namespaced(c.client(), ns);

    // Warm up: the first Ingress also starts nginx on both nodes.
    api.create(&PostParams::default(), &ingress(ns, "bench", "bench.example.test")?).await?;
    let resolve = format!("bench.example.test:80:{}", n1.ip);
    c.wait_for("the bench Ingress to serve", Duration::from_secs(120), || async {
        let out = outside
            .run("curl", &["-sf", "--max-time", "2", "--resolve", &resolve, "http://bench.example.test/"])
            .await?;
        Ok(out.status.success().then_some(()))
    })
    .await?;
    eprintln!("cluster up, nginx serving on {} and {}", n1.ip, n2.ip);

    let mut latencies = Vec::with_capacity(a.changes);
    for i in 0..a.changes {
        let host = format!("r{i}.example.test");
        let resolve = format!("{host}:80:{}", n1.ip);
        // One process polls every 10 ms, so process start-up is not part of each probe.
        let poll = format!(
            "until curl -sf --max-time 1 -o /dev/null --resolve {resolve} http://{host}/; do sleep 0.01; done"
        );
        let started = Instant::now();
        api.create(&PostParams::default(), &ingress(ns, &format!("r{i}"), &host)?).await?;
        let out = tokio::time::timeout(Duration::from_secs(30), outside.run("sh", &["-c", &poll]))
            .await
            .with_context(|| format!("{host} did not serve within 30 s"))??;
        ensure!(out.status.success(), "poll for {host}: {}", String::from_utf8_lossy(&out.stderr));
        let took = started.elapsed().as_secs_f64();
        latencies.push(took);
        eprintln!("route change {}: {:.0} ms", i + 1, took * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);

    // Throughput, from node-1's namespace: straight to the pod vs through node-1's ingress.
    if a.pin {
        pin_nodes(&c)?;
    }
    let wrk = |url: String, host: Option<&'static str>| {
        let (netns, seconds, connections, pin) = (n1.netns.clone(), a.seconds, a.connections, a.pin);
        async move {
            // With --pin the client runs on node-1's CPU, like a client on the ingress node.
            let mut cmd = tokio::process::Command::new(if pin { "taskset" } else { "ip" });
            if pin {
                cmd.args(["-c", "0", "ip"]);
            }
            cmd.args(["netns", "exec", &netns, "wrk", "-t2", &format!("-c{connections}")])
                .arg(format!("-d{seconds}s"));
            if let Some(h) = host {
                cmd.args(["-H", &format!("Host: {h}")]);
            }
            let out = cmd.arg(&url).output().await.context("wrk (install it with e2e/tools/install.sh)")?;
            ensure!(out.status.success(), "wrk {url}: {}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            ensure!(!text.contains("Non-2xx"), "wrk {url} got errors:\n{text}");
            requests_per_second(&text)
        }
    };
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        direct.push(wrk(format!("http://{pod_ip}:80{}", a.path), None).await?);
        via.push(wrk(format!("http://{}:80{}", n1.ip, a.path), Some("bench.example.test")).await?);
        eprintln!("round {}: direct {:.0} req/s, ingress {:.0} req/s", round + 1, direct[round], via[round]);
    }

    if !latencies.is_empty() {
        println!(
            "route change → serving ({} changes): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            a.changes,
            percentile(&latencies, 50.0) * 1000.0,
            percentile(&latencies, 99.0) * 1000.0,
            latencies.last().copied().unwrap_or_default() * 1000.0
        );
    }
    println!(
        "throughput ({} rounds × {} s, wrk -t2 -c{} GET {}{}): direct median {:.0} req/s [{}], ingress median {:.0} req/s [{}], ratio {:.2}",
        a.rounds,
        a.seconds,
        a.connections,
        a.path,
        if a.pin { ", one CPU per node" } else { "" },
        median(&direct),
        direct.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        median(&via),
        via.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        median(&via) / median(&direct)
    );
    Ok(())
}
