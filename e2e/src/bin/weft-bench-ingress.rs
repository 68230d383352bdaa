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
//! Root; `cargo build -p weft-e2e --bins` first. Usage:
//! `weft-bench-ingress [--changes N] [--rounds R] [--seconds S] [--connections C] [--path P]`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::PostParams;
use weft_e2e::cluster::{CniMode, OutsideHost, PodOptions, TestCluster, TestOptions};

struct Args {
    changes: usize,
    rounds: usize,
    seconds: u32,
    connections: u32,
    path: String,
}

fn args() -> Result<Args> {
    let mut a = Args { changes: 40, rounds: 5, seconds: 10, connections: 32, path: "/bench".into() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
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
    let c =
        TestCluster::start(TestOptions::default().nodes(2).weft(true).cni(CniMode::Weft).weft_dev(weft_dev))
            .await?;
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
    let wrk = |url: String, host: Option<&'static str>| {
        let (netns, seconds, connections) = (n1.netns.clone(), a.seconds, a.connections);
        async move {
            let mut cmd = tokio::process::Command::new("ip");
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

    println!(
        "route change → serving ({} changes): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        a.changes,
        percentile(&latencies, 50.0) * 1000.0,
        percentile(&latencies, 99.0) * 1000.0,
        latencies.last().copied().unwrap_or_default() * 1000.0
    );
    println!(
        "throughput ({} rounds × {} s, wrk -t2 -c{} GET {}): direct median {:.0} req/s [{}], ingress median {:.0} req/s [{}], ratio {:.2}",
        a.rounds,
        a.seconds,
        a.connections,
        a.path,
        median(&direct),
        direct.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        median(&via),
        via.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        median(&via) / median(&direct)
    );
    Ok(())
}
