//! Cluster DNS latencies on a local cluster of its own (Weft on, 3 nodes by default):
//!
//! - **config change → effective on every node**: two hosts outside the cluster answer
//!   `www.example.test` differently; each round points `NetworkConfig` `dns.upstreams` at the
//!   other one and asks every node's CoreDNS (on its node address) until all of them give the new
//!   answer. Timed from just before the API write to the last node answering.
//! - **new Service → resolvable**: each round creates a Service and asks every node for
//!   `<svc>.<ns>.svc.cluster.local` until all of them answer its ClusterIP.
//!
//! - **reload versus restart**: a second CoreDNS in node-1's namespace, with the agent's Corefile
//!   on port 5300, takes a new upstream by SIGUSR1 (what the agent does) or by a restart.
//!
//! Queries are `dig` from the root namespace to the node addresses (over the cluster's bridge),
//! every node polled concurrently. Root; `cargo build --workspace --bins` first.
//! Usage: `weft-bench-dns [--nodes 3] [--changes 20] [--services 30]`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use weft_api::v1alpha1::NetworkConfig;
use weft_e2e::cluster::{OutsideHost, TestCluster, TestOptions, dns_kubeconfig};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Upstream changes to time.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Services to create and time.
    #[arg(long, default_value_t = 30)]
    services: usize,
    /// Rounds of the reload-versus-restart comparison on one node.
    #[arg(long, default_value_t = 10)]
    swaps: usize,
}

/// The first answer of `dig +short name @server` (empty when none or on error).
async fn ask(server: Ipv4Addr, name: &str) -> String {
    let out = tokio::process::Command::new("dig")
        .args(["+short", "+time=1", "+tries=1", &format!("@{server}"), name])
        .output()
        .await;
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

/// Polls every server until each answers `want`; the time (since `t0`) the last one did.
async fn until_all(t0: Instant, servers: &[Ipv4Addr], name: &str, want: &str) -> Result<Duration> {
    let polls = servers.iter().map(|&s| async move {
        loop {
            if ask(s, name).await == want {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{s} did not answer {want} for {name} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let times = futures::future::try_join_all(polls).await?;
    Ok(times.into_iter().max().unwrap_or_default())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(what: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{what}: n={} p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        v.len(),
        percentile(&v, 50.0).as_secs_f64() * 1e3,
        percentile(&v, 90.0).as_secs_f64() * 1e3,
        percentile(&v, 99.0).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    )
}

/// A second CoreDNS in node-1's namespace with the agent's Corefile on other ports, to compare
/// taking a new upstream by SIGUSR1 (what the agent does) with a restart: time until the new
/// answer, and queries that got no answer meanwhile.
struct Swap {
    netns: String,
    node_ip: Ipv4Addr,
    corefile: std::path::PathBuf,
    template: String,
    coredns: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Option<std::process::Child>,
}

const SWAP_PORT: u16 = 5300;

/// Where the agent DaemonSet's CoreDNS finds its kubeconfig (`--dns-kubeconfig`, inside the
/// agent's container).
const DAEMONSET_DNS_KUBECONFIG: &str = "/etc/weft/dns/kubeconfig";

impl Swap {
    fn write(&self, upstream: &str) -> Result<()> {
        std::fs::write(&self.corefile, self.template.replace("UPSTREAM", upstream))?;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&self.coredns)
            .arg("-conf")
            .arg(&self.corefile)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
    }

    /// Polls until `want`; (time, polls answered without an address).
    async fn until(&self, t0: Instant, want: &str) -> Result<(Duration, usize)> {
        let mut misses = 0;
        loop {
            let out = tokio::process::Command::new("dig")
                .args(["+short", "+time=1", "+tries=1", "-p", &SWAP_PORT.to_string()])
                .arg(format!("@{}", self.node_ip))
                .arg("www.example.test")
                .output()
                .await?;
            let answer =
                String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string();
            if answer == want {
                return Ok((t0.elapsed(), misses));
            }
            // No address: a timeout, or "connection refused" while nothing listens.
            if answer.parse::<Ipv4Addr>().is_err() {
                misses += 1;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the second CoreDNS did not answer {want} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) -> Result<()> {
    let p = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw).context("pid")?;
    rustix::process::kill_process(p, sig)?;
    Ok(())
}

/// SIGUSR1 rounds, then restart rounds, alternating the upstream each time.
async fn reload_versus_restart(
    c: &TestCluster,
    upstreams: &[String],
    answers: [&str; 2],
    rounds: usize,
) -> Result<String> {
    let node = c.nodes().first().cloned().context("no node")?;
    let agent_corefile = std::fs::read_to_string(node.agent_state_dir.join("dns/Corefile"))?;
    let template = agent_corefile
        .replace(".:53 {", &format!(".:{SWAP_PORT} {{"))
        .replace(&format!("forward . {}", upstreams[0]), "forward . UPSTREAM")
        .replace(&format!("forward . {}", upstreams[1]), "forward . UPSTREAM")
        .replace(":9153", ":19153")
        .replace(":9154", ":19154")
        .replace(":9155", ":19155");
    let dir = c.state().dir.join("bench-dns");
    // The swap CoreDNS runs beside the agent's, outside its container: the same Corefile with a
    // kubeconfig of the same identity (the agent's ServiceAccount) on this machine's paths.
    std::fs::create_dir_all(&dir)?;
    let token = c.kubectl(&["create", "token", "weft-agent", "-n", "weft-system"]).await?;
    std::fs::write(dir.join("token"), token.trim())?;
    let state = c.state();
    let kubeconfig = dir.join("dns-kubeconfig");
    let server = format!("https://{}:{}", state.bridge_ip, state.ports.apiserver);
    std::fs::write(&kubeconfig, dns_kubeconfig(&server, &state.ca_cert(), &dir.join("token")))?;
    let template = template.replace(DAEMONSET_DNS_KUBECONFIG, &kubeconfig.to_string_lossy());
    let mut swap = Swap {
        netns: node.netns.clone(),
        node_ip: node.ip,
        corefile: dir.join("swap.Corefile"),
        template,
        coredns: c.state().tools_bin_dir.join("coredns"),
        log: dir.join("swap.log"),
        child: None,
    };
    swap.write(&upstreams[0])?;
    swap.start()?;
    swap.until(Instant::now(), answers[0]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut reload, mut reload_misses) = (Vec::new(), 0);
    let (mut restart, mut restart_misses) = (Vec::new(), 0);
    for round in 0..2 * rounds {
        let next = (round + 1) % 2;
        swap.write(&upstreams[next])?;
        let t0 = Instant::now();
        if round < rounds {
            let pid = swap.child.as_ref().map(std::process::Child::id).context("not running")?;
            signal(pid, rustix::process::Signal::USR1)?;
        } else {
            swap.stop();
            swap.start()?;
        }
        let (took, misses) = swap.until(t0, answers[next]).await?;
        if round < rounds {
            reload.push(took);
            reload_misses += misses;
        } else {
            restart.push(took);
            restart_misses += misses;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(format!(
        "{} ({reload_misses} polls without an answer)\n{} ({restart_misses} polls without an answer)",
        summary("one node, new upstream by SIGUSR1 reload", reload),
        summary("one node, new upstream by restart", restart)
    ))
}

fn outside_coredns(c: &TestCluster, host: &mut OutsideHost, name: &str, answer: &str) -> Result<()> {
    let dir = c.state().dir.join("bench-dns");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.Corefile"));
    std::fs::write(
        &path,
        format!(
            "example.test:53 {{\n    bind {}\n    hosts {{\n        {answer} www.example.test\n    }}\n}}\n",
            host.ip()
        ),
    )?;
    let coredns = c.state().tools_bin_dir.join("coredns");
    host.spawn(
        &coredns.to_string_lossy(),
        &["-conf", &path.to_string_lossy()],
        Some(&dir.join(format!("{name}.log"))),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let me = std::env::current_exe()?;
    let c = TestCluster::start(TestOptions::default().nodes(args.nodes).weft(true).weft_dev(&me)).await?;
    let servers: Vec<Ipv4Addr> = c.nodes().iter().map(|n| n.ip).collect();
    let mut hosts = [OutsideHost::start(&c, 1)?, OutsideHost::start(&c, 2)?];
    let answers = ["192.0.2.1", "192.0.2.2"];
    for (i, host) in hosts.iter_mut().enumerate() {
        outside_coredns(&c, host, &format!("upstream-{i}"), answers[i])?;
    }
    let upstream_ips: Vec<String> = hosts.iter().map(|h| h.ip().to_string()).collect();
    let configs: Api<NetworkConfig> = Api::all(c.client());
    let patch = |ip: &str| serde_json::json!({ "spec": { "dns": { "upstreams": [ip] } } });
    configs
        .patch("default", &PatchParams::default(), &Patch::Merge(patch(&upstream_ips[0])))
        .await
        .context("pointing dns.upstreams at the first outside host")?;
    until_all(Instant::now(), &servers, "www.example.test", answers[0])
        .await
        .context("every node serving DNS with the first upstream")?;
    eprintln!("{} nodes serve DNS with upstream {}", servers.len(), upstream_ips[0]);
    // Queries still in flight to the default upstream (the host's resolver, unreachable from
    // the nodes) hold a reload for up to 5 s (CoreDNS's graceful stop of the old server): let
    // them time out before timing changes between working upstreams.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut changes = Vec::new();
    for round in 0..args.changes {
        let next = (round + 1) % 2;
        let t0 = Instant::now();
        configs.patch("default", &PatchParams::default(), &Patch::Merge(patch(&upstream_ips[next]))).await?;
        let took = until_all(t0, &servers, "www.example.test", answers[next]).await?;
        eprintln!("upstream change {}: every node after {:.0} ms", round + 1, took.as_secs_f64() * 1e3);
        changes.push(took);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let swaps = reload_versus_restart(&c, &upstream_ips, answers, args.swaps).await?;

    // CoreDNS's logs outlive the cluster's node directories here, for a look at slow rounds.
    for node in c.nodes() {
        let log = node.agent_state_dir.join("dns/coredns.log");
        let _ =
            std::fs::copy(&log, c.state().dir.join("bench-dns").join(format!("coredns-{}.log", node.name)));
    }
    let ns = c.namespace("bench-dns").await?;
    let services: Api<Service> = Api::namespaced(c.client(), &ns);
    let mut created = Vec::new();
    for round in 0..args.services {
        let name = format!("svc-{round}");
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": { "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] },
        }))?;
        let t0 = Instant::now();
        let svc = services.create(&PostParams::default(), &svc).await?;
        let ip = svc.spec.and_then(|s| s.cluster_ip).context("no ClusterIP")?;
        let took = until_all(t0, &servers, &format!("{name}.{}.svc.cluster.local", ns.name()), &ip).await?;
        eprintln!("service {name}: resolvable on every node after {:.0} ms", took.as_secs_f64() * 1e3);
        created.push(took);
    }

    println!("DNS on {} nodes (CoreDNS per node, SIGUSR1 reloads):", servers.len());
    println!("{}", summary("config change (dns.upstreams) -> new answer on every node", changes));
    println!("{}", summary("new Service -> resolvable on every node", created));
    println!("{swaps}");
    Ok(())
}
