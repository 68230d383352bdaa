//! The service proxy benchmarks (`make bench-proxy`; root; `cargo build --workspace --bins` first —
//! weft-dev and the Weft binaries are taken from next to this one, kube-proxy from the tools dir).
//!
//! `weft-bench-proxy side-by-side [--scales 1000,5000,10000] [--changes 20] [--nftables-changes 5]
//! [--iptables legacy|nft] [--proxies iptables,nftables,weft,weft-nftables] [--agent PATH]`: one
//! local control plane (1 node, Weft's operator, the node's own agent stopped), N selector-less
//! Services × 10 endpoints in hand-written EndpointSlices; then, for each scale and one after the
//! other (2 cores: running them at once would time the machine, not the proxies), in a fresh network
//! namespace on the cluster's bridge, each watching the same API server as node-1: kube-proxy
//! `--proxy-mode iptables`, kube-proxy `--proxy-mode nftables`, and weft-agent (its plan from the
//! operator) with each of its backends: `weft-nftables` switches the NetworkConfig to
//! `spec.proxy.mode: nftables` before its agent starts, `weft` back to `iptables`.
//! For each: the first (full) sync, from kube-proxy's `sync_full_proxy_rules_duration_seconds`
//! and Weft's `weft_agent_proxy_sync_duration_seconds` (same definition); then `--changes`
//! one-endpoint changes (one endpoint of one Service flips readiness, the slice's
//! last-change-trigger-time set to now), each timed from the sync-duration histogram's sum over
//! the syncs it caused; rules written per change (kube-proxy: `sync_proxy_rules_iptables_last`,
//! nat + filter; Weft: `weft_agent_proxy_sync_lines_written`); the change's network programming
//! latency as each reports it; peak memory (`VmHWM`). Both iptables proxies use the same backend:
//! legacy by default (Debian 12's iptables-nft-restore is quadratic in chains: minutes at a few
//! thousand Services), through a directory of `iptables*` symlinks first on their PATH. Programmed
//! Services after the first sync, as a check: ClusterIP rules in `iptables-save -t nat`, or the
//! elements of the `service-ips` map (kube-proxy's table `kube-proxy`, Weft's `weft-proxy`).
//!
//! `weft-bench-proxy latency [--changes 40]`: the network programming latency SLI on a 3-node
//! local cluster (`--cni weft`): a selector-less Service whose hand-written slice is switched
//! between two echo pods; each agent's `weft_agent_network_programming_latency_seconds` per change,
//! and, as a cross-check from the outside, the time until every node's curl to the ClusterIP
//! reaches the new pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use weft_api::v1alpha1::{NetworkConfig, ProxyMode};
use weft_e2e::cluster::{
    AGENT_METRICS_PORT, OutsideHost, PodOptions, TestCluster, TestOptions, http_get, repo_root,
};

const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const BENCH_NS: &str = "bench";
const KUBE_PROXY_METRICS_PORT: u16 = 10249;

#[derive(Parser)]
#[command(
    about = "Service proxy benchmarks: Weft vs kube-proxy side by side, and the network programming latency"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// weft-agent vs kube-proxy, each in iptables and nftables mode, programming N Services × 10
    /// endpoints.
    SideBySide {
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        scales: Vec<usize>,
        /// One-endpoint changes per proxy and scale.
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Which proxies, in order: iptables, nftables (kube-proxy's modes), weft, weft-nftables
        /// (weft-agent's backends).
        #[arg(long, value_delimiter = ',', default_value = "iptables,nftables,weft,weft-nftables")]
        proxies: Vec<String>,
        /// The weft-agent to measure; default `target/release/weft-agent` (kube-proxy is an
        /// optimised build too), else the debug one next to this binary.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// The iptables backend both iptables proxies use: `legacy` or `nft` (Debian 12's
        /// iptables-nft-restore takes minutes for a few thousand Services).
        #[arg(long, default_value = "legacy")]
        iptables: String,
        /// One-endpoint changes for kube-proxy nftables (its syncs take seconds here); Weft's
        /// nftables backend gets `--changes`.
        #[arg(long, default_value_t = 5)]
        nftables_changes: usize,
    },
    /// The network programming latency SLI on a 3-node local cluster.
    Latency {
        #[arg(long, default_value_t = 40)]
        changes: usize,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("info").init();
    match Cli::parse().cmd {
        Cmd::SideBySide { scales, changes, proxies, agent, iptables, nftables_changes } => {
            let legacy = match iptables.as_str() {
                "legacy" => true,
                "nft" => false,
                other => bail!("--iptables {other:?}: legacy or nft"),
            };
            side_by_side(&scales, changes, nftables_changes, &proxies, agent, legacy).await
        }
        Cmd::Latency { changes } => latency(changes).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text

/// The value of the sample `name` whose labels include every `(k, v)` of `labels`, summed over
/// the samples that match (none: `None`).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((l, v)) = r.split_once('}') else { continue };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let ok =
            labels.iter().all(|(k, v)| label_text.split(',').any(|kv| kv.trim() == format!("{k}=\"{v}\"")));
        let Some(v) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        if ok {
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

/// `(sum, count)` of a histogram.
fn histogram(text: &str, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    (
        sample(text, &format!("{name}_sum"), labels).unwrap_or(0.0),
        sample(text, &format!("{name}_count"), labels).unwrap_or(0.0),
    )
}

async fn metrics(addr: std::net::SocketAddr) -> Result<String> {
    let (code, body) = http_get(addr, "/metrics").await?;
    ensure!(code == 200, "GET http://{addr}/metrics: HTTP {code}");
    Ok(body)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn ms(s: f64) -> String {
    if s.is_nan() { "–".into() } else { format!("{:.1} ms", s * 1e3) }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Peak resident memory (`VmHWM`) of a process, in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Objects

fn endpoint_ip(service: usize, endpoint: usize) -> std::net::Ipv4Addr {
    // 10.128.0.0 onwards: outside the pod network, the service network and the underlay.
    std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + (service * 10 + endpoint) as u32,
    )
}

fn endpoints_json(service: usize, not_ready: Option<usize>) -> serde_json::Value {
    serde_json::Value::Array(
        (0..10)
            .map(|e| {
                serde_json::json!({
                    "addresses": [endpoint_ip(service, e).to_string()],
                    "conditions": { "ready": not_ready != Some(e), "serving": not_ready != Some(e), "terminating": false },
                })
            })
            .collect(),
    )
}

fn service_object(i: usize) -> Result<Service> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": format!("s-{i}"), "namespace": BENCH_NS, "labels": { "bench": "proxy" } },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }] },
    }))?)
}

fn slice_object(i: usize) -> Result<EndpointSlice> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("s-{i}"),
            "namespace": BENCH_NS,
            "labels": {
                "kubernetes.io/service-name": format!("s-{i}"),
                "endpointslice.kubernetes.io/managed-by": "bench.weft.io",
            },
            "annotations": { TRIGGER: now_rfc3339() },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints_json(i, None),
    }))?)
}

/// Creates Services and slices `from..to`, 48 requests in flight.
async fn create_objects(client: &kube::Client, from: usize, to: usize) -> Result<()> {
    let t0 = Instant::now();
    let services: Api<Service> = Api::namespaced(client.clone(), BENCH_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), BENCH_NS);
    futures::stream::iter(from..to)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                services
                    .create(&PostParams::default(), &service_object(i)?)
                    .await
                    .with_context(|| format!("service s-{i}"))?;
                slices
                    .create(&PostParams::default(), &slice_object(i)?)
                    .await
                    .with_context(|| format!("slice s-{i}"))?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(48)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!("created services s-{from}..s-{} in {:.1?}", to - 1, t0.elapsed());
    Ok(())
}

/// Flips endpoint 0 of Service `i` (ready ↔ not ready) and stamps the trigger time.
async fn flip_endpoint(slices: &Api<EndpointSlice>, i: usize, not_ready: bool) -> Result<()> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { TRIGGER: now_rfc3339() } },
        "endpoints": endpoints_json(i, not_ready.then_some(0)),
    });
    slices.patch(&format!("s-{i}"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Side by side

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proxy {
    Iptables,
    Nftables,
    Weft,
    WeftNftables,
}

impl Proxy {
    const ALL: [Proxy; 4] = [Proxy::Iptables, Proxy::Nftables, Proxy::Weft, Proxy::WeftNftables];

    /// Its name in `--proxies`.
    fn name(self) -> &'static str {
        match self {
            Proxy::Iptables => "iptables",
            Proxy::Nftables => "nftables",
            Proxy::Weft => "weft",
            Proxy::WeftNftables => "weft-nftables",
        }
    }

    fn parse(s: &str) -> Result<Proxy> {
        Proxy::ALL.into_iter().find(|p| p.name() == s).with_context(|| {
            let names: Vec<&str> = Proxy::ALL.iter().map(|p| p.name()).collect();
            format!("unknown proxy {s:?} ({})", names.join(", "))
        })
    }

    fn label(self) -> &'static str {
        match self {
            Proxy::Iptables => "kube-proxy iptables",
            Proxy::Nftables => "kube-proxy nftables",
            Proxy::Weft => "weft-agent iptables",
            Proxy::WeftNftables => "weft-agent nftables",
        }
    }

    /// weft-agent's backend (the NetworkConfig's `spec.proxy.mode`); `None` for kube-proxy.
    fn weft_mode(self) -> Option<ProxyMode> {
        match self {
            Proxy::Iptables | Proxy::Nftables => None,
            Proxy::Weft => Some(ProxyMode::Iptables),
            Proxy::WeftNftables => Some(ProxyMode::Nftables),
        }
    }

    /// (sync-duration histogram, full-sync histogram, labels).
    fn sync_metric(self) -> (&'static str, &'static str, &'static [(&'static str, &'static str)]) {
        match self {
            Proxy::Iptables | Proxy::Nftables => (
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                &[("ip_family", "IPv4")],
            ),
            Proxy::Weft | Proxy::WeftNftables => {
                ("weft_agent_proxy_sync_duration_seconds", "weft_agent_proxy_sync_duration_seconds", &[])
            }
        }
    }

    fn latency_metric(self) -> (&'static str, &'static [(&'static str, &'static str)]) {
        match self {
            Proxy::Iptables | Proxy::Nftables => {
                ("kubeproxy_network_programming_duration_seconds", &[("ip_family", "IPv4")])
            }
            Proxy::Weft | Proxy::WeftNftables => ("weft_agent_network_programming_latency_seconds", &[]),
        }
    }

    /// Rules written by the last sync, or the sum/count of a histogram of them.
    fn lines(self, text: &str) -> Lines {
        match self {
            Proxy::Iptables => Lines::Gauge(
                sample(text, "kubeproxy_sync_proxy_rules_iptables_last", &[("ip_family", "IPv4")])
                    .unwrap_or(f64::NAN),
            ),
            Proxy::Nftables => Lines::Gauge(f64::NAN),
            Proxy::Weft | Proxy::WeftNftables => {
                let name = "weft_agent_proxy_sync_lines_written";
                match sample(text, &format!("{name}_sum"), &[]) {
                    Some(sum) => {
                        Lines::Histogram(sum, sample(text, &format!("{name}_count"), &[]).unwrap_or(0.0))
                    }
                    None => Lines::Gauge(
                        sample(text, name, &[])
                            .or_else(|| sample(text, &format!("{name}_total"), &[]))
                            .unwrap_or(f64::NAN),
                    ),
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Lines {
    Gauge(f64),
    Histogram(f64, f64),
}

/// Rules written by the syncs between two readings.
fn lines_between(before: Lines, after: Lines) -> f64 {
    match (before, after) {
        (Lines::Histogram(s0, c0), Lines::Histogram(s1, c1)) if c1 > c0 => s1 - s0,
        (_, Lines::Gauge(v)) => v,
        _ => f64::NAN,
    }
}

/// One proxy's figures at one scale.
#[derive(Debug)]
struct Figures {
    proxy: Proxy,
    services: usize,
    full_sync: f64,
    full_sync_count: f64,
    change: Vec<f64>,
    lines: Vec<f64>,
    latency: Vec<f64>,
    rules: usize,
    peak_rss: u64,
}

/// A process in a fresh namespace, killed (TERM, then KILL) when dropped, before its namespace.
struct Running {
    child: Child,
    // Dropped after the child is gone: removes the namespace and everything in it.
    host: OutsideHost,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `proxy` for node-1 in a fresh namespace (outside host `slot` of the cluster).
fn start_proxy(
    c: &TestCluster,
    proxy: Proxy,
    opts: &Opts,
    slot: u8,
    tag: &str,
) -> Result<(Running, std::net::SocketAddr)> {
    let state = c.state();
    let host = OutsideHost::start(c, slot)?;
    let ip = host.ip();
    let log = state.logs_dir().join(format!("bench-{tag}.log"));
    let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let (mut cmd, port) = match proxy {
        Proxy::Iptables | Proxy::Nftables => {
            let kp = state.tools_bin_dir.join("kube-proxy");
            ensure!(kp.is_file(), "{} is missing: bash e2e/tools/install.sh", kp.display());
            let mode = if proxy == Proxy::Iptables { "iptables" } else { "nftables" };
            let mut cmd = host.command(&kp.to_string_lossy(), &[]);
            cmd.arg(format!("--kubeconfig={}", bridge_kubeconfig(c)?.display()))
                .arg("--hostname-override=node-1")
                .arg(format!("--proxy-mode={mode}"))
                .arg(format!("--metrics-bind-address={ip}:{KUBE_PROXY_METRICS_PORT}"))
                .arg(format!("--healthz-bind-address={ip}:10256"))
                .arg("--cluster-cidr=10.244.0.0/16")
                // Leave the (machine-wide) conntrack sysctls alone.
                .arg("--conntrack-max-per-core=0")
                .arg("--conntrack-tcp-timeout-established=0")
                .arg("--conntrack-tcp-timeout-close-wait=0")
                // No periodic resync in the middle of the measured changes (the default is 30 s).
                .arg("--iptables-sync-period=1h")
                .arg("--v=1");
            (cmd, KUBE_PROXY_METRICS_PORT)
        }
        Proxy::Weft | Proxy::WeftNftables => {
            let dir = state.dir.join(format!("bench-{tag}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("cni/net.d"))?;
            std::fs::create_dir_all(dir.join("cni/bin"))?;
            let mut cmd = host.command(&opts.agent.to_string_lossy(), &[]);
            cmd.args(["--node-name", "node-1"])
                .args([
                    "--operator",
                    &format!("https://{}", state.plan_addrs().first().context("no operator replica")?),
                ])
                .arg("--operator-ca-file")
                .arg(state.ca_cert())
                .arg("--plan-token-file")
                .arg(weft_e2e::cluster::plan_token(state.nodes.first().context("the cluster has no node")?))
                .arg("--state-dir")
                .arg(dir.join("agent"))
                .args(["--metrics-listen", &format!("{ip}:{AGENT_METRICS_PORT}")])
                .arg("--no-cni-install")
                .env("WEFT_CNI_CONF_DIR", dir.join("cni/net.d"))
                .env("WEFT_CNI_BIN_DIR", dir.join("cni/bin"))
                .env("RUST_LOG", "info");
            (cmd, AGENT_METRICS_PORT)
        }
    };
    if let Some(bin) = &opts.legacy_bin {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut p = std::ffi::OsString::from(bin);
        p.push(":");
        p.push(path);
        cmd.env("PATH", p);
    }
    cmd.stdout(file.try_clone()?).stderr(file);
    let child = cmd.spawn().with_context(|| format!("starting {}", proxy.label()))?;
    Ok((Running { child, host }, std::net::SocketAddr::from((ip, port))))
}

/// The admin kubeconfig with the API server's bridge address (reachable from a namespace on the
/// bridge; the serving certificate covers it).
fn bridge_kubeconfig(c: &TestCluster) -> Result<PathBuf> {
    let state = c.state();
    let text = std::fs::read_to_string(state.admin_kubeconfig())?;
    let port = state.ports.apiserver;
    let out = state.dir.join("bench-bridge.kubeconfig");
    std::fs::write(
        &out,
        text.replace(&format!("https://127.0.0.1:{port}"), &format!("https://{}:{port}", state.bridge_ip)),
    )?;
    Ok(out)
}

/// Rules the proxy installed for Services in its namespace (a sanity check that the first sync
/// had them all): lines of `iptables-save -t nat` naming a ClusterIP, or the elements of the
/// nftables `service-ips` map (one per Service IP and port).
async fn rules_for_services(host: &OutsideHost, proxy: Proxy, legacy: bool) -> Result<usize> {
    let nft_table = match proxy {
        Proxy::Nftables => Some("kube-proxy"),
        Proxy::WeftNftables => Some("weft-proxy"),
        Proxy::Iptables | Proxy::Weft => None,
    };
    let out = match nft_table {
        Some(table) => host.run("nft", &["-j", "list", "map", "ip", table, "service-ips"]).await?,
        None if legacy => host.run("iptables-legacy-save", &["-t", "nat"]).await?,
        None => host.run("iptables-nft-save", &["-t", "nat"]).await?,
    };
    Ok(match nft_table {
        Some(table) => {
            map_elements(&out.stdout).with_context(|| format!("reading {table}'s service-ips map"))?
        }
        None => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains(" -d 10.96."))
            .count(),
    })
}

/// How many elements the map in `nft -j list map` output holds.
fn map_elements(json: &[u8]) -> Result<usize> {
    let listing: serde_json::Value = serde_json::from_slice(json).context("nft -j output is not JSON")?;
    let objects = listing["nftables"].as_array().context("no nftables array")?;
    let map = objects.iter().find_map(|o| o.get("map")).context("no map in the listing")?;
    // A map without elements has no "elem" at all.
    Ok(map.get("elem").and_then(serde_json::Value::as_array).map_or(0, Vec::len))
}

/// Sets the NetworkConfig's `spec.proxy.mode` and waits until the operator has compiled it into
/// the plan (its status reports the new generation; it writes status after publishing the plan),
/// so the agent started next runs that backend from its first sync.
async fn set_proxy_mode(c: &TestCluster, mode: ProxyMode) -> Result<()> {
    let configs: Api<NetworkConfig> = Api::all(c.client());
    if configs.get("default").await?.spec.proxy.mode == mode {
        return Ok(());
    }
    let patch = serde_json::json!({ "spec": { "proxy": { "mode": mode } } });
    let patched = configs
        .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting the NetworkConfig's proxy mode to {mode:?}"))?;
    let generation = patched.metadata.generation.context("the patched NetworkConfig has no generation")?;
    c.wait_for(&format!("the operator to plan proxy mode {mode:?}"), Duration::from_secs(60), || {
        let configs = configs.clone();
        async move {
            let observed = configs.get("default").await?.status.and_then(|s| s.observed_generation);
            Ok((observed >= Some(generation)).then_some(()))
        }
    })
    .await?;
    eprintln!("NetworkConfig default: proxy mode {mode:?} (generation {generation})");
    Ok(())
}

async fn measure(
    c: &TestCluster,
    proxy: Proxy,
    opts: &Opts,
    services: usize,
    changes: usize,
    flipped: &mut BTreeMap<usize, bool>,
) -> Result<Figures> {
    let tag = format!("{}-{services}", proxy.name());
    if let Some(mode) = proxy.weft_mode() {
        set_proxy_mode(c, mode).await?;
    }
    let (running, addr) = start_proxy(c, proxy, opts, 1, &tag)?;
    let (sync, full, labels) = proxy.sync_metric();
    let started = Instant::now();
    // The first full sync: poll closely so that a second sync is not mistaken for it.
    let (full_sync, full_sync_count) = loop {
        if let Ok(text) = metrics(addr).await {
            let (sum, count) = histogram(&text, full, labels);
            if count >= 1.0 {
                break (sum / count, count);
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{} made no full sync within 10 minutes (log: bench-{tag}.log)", proxy.label());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first_sync_at = started.elapsed();
    // Settle: what the start queued up (node, service and slice events) is applied.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rules = rules_for_services(&running.host, proxy, opts.legacy_bin.is_some()).await?;
    eprintln!(
        "{} at {services} services: first full sync {} (count {full_sync_count}) {:.1?} after start; {rules} service rules",
        proxy.label(),
        ms(full_sync),
        first_sync_at
    );

    let slices: Api<EndpointSlice> = Api::namespaced(c.client(), BENCH_NS);
    let (lat_name, lat_labels) = proxy.latency_metric();
    let mut fig = Figures {
        proxy,
        services,
        full_sync,
        full_sync_count,
        change: Vec::new(),
        lines: Vec::new(),
        latency: Vec::new(),
        rules,
        peak_rss: 0,
    };
    for k in 0..changes {
        let i = (k * 7919 + 13) % services;
        let before = metrics(addr).await?;
        let (s0, c0) = histogram(&before, sync, labels);
        let (l0, lc0) = histogram(&before, lat_name, lat_labels);
        let lines0 = proxy.lines(&before);
        let state = flipped.entry(i).or_insert(false);
        *state = !*state;
        flip_endpoint(&slices, i, *state).await?;
        let t0 = Instant::now();
        let after = loop {
            let text = metrics(addr).await?;
            let (_, c1) = histogram(&text, sync, labels);
            let (_, lc1) = histogram(&text, lat_name, lat_labels);
            if c1 > c0 && lc1 > lc0 {
                break text;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("{}: no sync within 600 s of change {k} (service s-{i})", proxy.label());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (s1, c1) = histogram(&after, sync, labels);
        let (l1, lc1) = histogram(&after, lat_name, lat_labels);
        fig.change.push((s1 - s0) / (c1 - c0));
        fig.latency.push((l1 - l0) / (lc1 - lc0));
        fig.lines.push(lines_between(lines0, proxy.lines(&after)));
        // kube-proxy runs at most one sync a second (its default --iptables-min-sync-period).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    fig.peak_rss = vm_hwm(running.pid()).unwrap_or(0);
    eprintln!(
        "{} at {services}: change p50 {} p99 {}, lines p50 {}, latency p50 {} p99 {}, VmHWM {:.1} MiB",
        proxy.label(),
        ms(percentile(&fig.change, 50.0)),
        ms(percentile(&fig.change, 99.0)),
        percentile(&fig.lines, 50.0),
        ms(percentile(&fig.latency, 50.0)),
        ms(percentile(&fig.latency, 99.0)),
        fig.peak_rss as f64 / 1048576.0
    );
    drop(running);
    Ok(fig)
}

/// What every phase of the side-by-side run shares.
struct Opts {
    agent: PathBuf,
    /// A directory whose `iptables*`/`ip6tables*` are the legacy backend, put first on the
    /// proxies' PATH; `None`: the system's (nft) backend.
    legacy_bin: Option<PathBuf>,
}

/// `iptables`, `iptables-save`, `iptables-restore` (and ip6tables) → their `-legacy` variants.
fn legacy_bin_dir(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("bench-iptables-legacy");
    std::fs::create_dir_all(&bin)?;
    for family in ["iptables", "ip6tables"] {
        for (name, target) in [
            (family.to_string(), format!("/usr/sbin/{family}-legacy")),
            (format!("{family}-save"), format!("/usr/sbin/{family}-legacy-save")),
            (format!("{family}-restore"), format!("/usr/sbin/{family}-legacy-restore")),
        ] {
            ensure!(Path::new(&target).exists(), "{target} is missing (Debian's iptables package has it)");
            let link = bin.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)?;
        }
    }
    Ok(bin)
}

async fn side_by_side(
    scales: &[usize],
    changes: usize,
    nftables_changes: usize,
    proxies: &[String],
    agent: Option<PathBuf>,
    legacy: bool,
) -> Result<()> {
    let proxies: Vec<Proxy> = proxies.iter().map(|p| Proxy::parse(p)).collect::<Result<_>>()?;
    ensure!(scales.windows(2).all(|w| w[0] < w[1]), "scales must increase: {scales:?}");
    let c = TestCluster::start(TestOptions::default().nodes(1).weft(true)).await?;
    eprintln!("cluster {} up (logs in {})", c.name(), c.state().logs_dir().display());
    let agent = agent.unwrap_or_else(|| {
        let release = repo_root().join("target/release/weft-agent");
        if release.is_file() { release } else { repo_root().join("target/debug/weft-agent") }
    });
    ensure!(agent.is_file(), "{} is missing: cargo build --release -p weft-agent", agent.display());
    eprintln!("measuring {}", agent.display());
    let legacy_bin = if legacy { Some(legacy_bin_dir(&c.state().dir)?) } else { None };
    let opts = Opts { agent, legacy_bin };
    // node-1's own agent would program its namespace and compete for the CPU: the benchmark runs
    // its own agent for node-1 in a fresh namespace instead, so the DaemonSet leaves node-1.
    c.kubectl(&[
        "-n",
        "weft-system",
        "patch",
        "daemonset",
        "weft-agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"weft.io/benchmark-runs-its-own-agent":"true"}}}}}"#,
    ])
    .await?;
    c.wait_pods_gone("weft-system", "app.kubernetes.io/name=weft-agent").await?;
    let node1 = c.nodes().first().cloned().context("the cluster has no node")?;
    c.write_plan_token(&node1).await?;
    // Only the proxy is measured: no ingress controller for the benchmark's agent (its nginx
    // would not start in the fresh namespace and every plan would be NACKed).
    c.patch_network_config(serde_json::json!({"ingress":{"enabled":false}})).await?;
    c.kubectl(&["create", "namespace", BENCH_NS]).await?;
    let client = c.client();
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), BENCH_NS);
    c.wait_for("the bench namespace", Duration::from_secs(60), || {
        let sas = sas.clone();
        async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
    })
    .await?;
    let mut created = 0;
    let mut flipped = BTreeMap::new();
    let mut all = Vec::new();
    for &n in scales {
        create_objects(&client, created, n).await?;
        created = n;
        // Let the operator's watches catch up before its agent connects.
        tokio::time::sleep(Duration::from_secs(10)).await;
        for &proxy in &proxies {
            let changes = if proxy == Proxy::Nftables { nftables_changes } else { changes };
            let fig = measure(&c, proxy, &opts, n, changes, &mut flipped).await?;
            all.push(fig);
        }
    }
    print_table(&all, changes, nftables_changes, scales, &proxies, legacy);
    Ok(())
}

fn print_table(
    all: &[Figures],
    changes: usize,
    nftables_changes: usize,
    scales: &[usize],
    proxies: &[Proxy],
    legacy: bool,
) {
    let scales_arg: Vec<String> = scales.iter().map(ToString::to_string).collect();
    let proxies_arg: Vec<&str> = proxies.iter().map(|p| p.name()).collect();
    let backend = if legacy { "legacy" } else { "nft" };
    println!(
        "\nService proxy side by side, iptables backend {backend}, {changes} one-endpoint changes per \
         proxy and scale ({nftables_changes} for kube-proxy nftables) (command: `weft-bench-proxy \
         side-by-side --scales {} --changes {changes} --nftables-changes {nftables_changes} \
         --proxies {} --iptables {backend}`)\n",
        scales_arg.join(","),
        proxies_arg.join(",")
    );
    println!(
        "| Services (× 10 endpoints) | proxy | full sync | one-endpoint change p50 / p99 | rules written per change (p50) | programming latency p50 / p99 | peak RSS | service rules after full sync |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for f in all {
        let lines = percentile(&f.lines, 50.0);
        println!(
            "| {} | {} | {}{} | {} / {} | {} | {} / {} | {:.1} MiB | {} |",
            f.services,
            f.proxy.label(),
            ms(f.full_sync),
            if f.full_sync_count > 1.0 { format!(" (mean of {})", f.full_sync_count) } else { String::new() },
            ms(percentile(&f.change, 50.0)),
            ms(percentile(&f.change, 99.0)),
            if lines.is_nan() { "–".to_string() } else { format!("{lines:.0}") },
            ms(percentile(&f.latency, 50.0)),
            ms(percentile(&f.latency, 99.0)),
            f.peak_rss as f64 / 1048576.0,
            f.rules
        );
    }
    // Ratios against the targets.
    let get = |p: Proxy, n: usize| all.iter().find(|f| f.proxy == p && f.services == n);
    if let (Some(&first), Some(&last)) = (scales.first(), scales.last()) {
        println!();
        for w in proxies.iter().filter(|p| p.weft_mode().is_some()).filter_map(|&p| get(p, last)) {
            if let Some(k) = get(Proxy::Iptables, last) {
                println!(
                    "- full sync at {last}: {} {} vs kube-proxy iptables {}: ratio {:.3} (target ≤ 0.2)",
                    w.proxy.label(),
                    ms(w.full_sync),
                    ms(k.full_sync),
                    w.full_sync / k.full_sync
                );
            }
        }
        for &p in proxies {
            if let (Some(a), Some(b)) = (get(p, first), get(p, last)) {
                println!(
                    "- {}: one-endpoint change p99 at {last} / at {first}: {:.2} ({} / {})",
                    p.label(),
                    percentile(&b.change, 99.0) / percentile(&a.change, 99.0),
                    ms(percentile(&b.change, 99.0)),
                    ms(percentile(&a.change, 99.0))
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network programming latency on the local cluster

async fn latency(changes: usize) -> Result<()> {
    let c = TestCluster::start(TestOptions::default().nodes(3).weft(true)).await?;
    eprintln!("cluster {} up (logs in {})", c.name(), c.state().logs_dir().display());
    let ns_guard = c.namespace("latency").await?;
    let ns = ns_guard.name();
    let pods = ["lat-a", "lat-b"];
    tokio::try_join!(
        c.run_pod(PodOptions::new(ns, pods[0]).image("traefik/whoami").port(80).on_node("node-1")),
        c.run_pod(PodOptions::new(ns, pods[1]).image("traefik/whoami").port(80).on_node("node-2")),
    )?;
    let ips = [c.pod_ip(ns, pods[0]).await?, c.pod_ip(ns, pods[1]).await?];
    let slice = |target: usize| {
        serde_json::json!({
            "metadata": { "annotations": { TRIGGER: now_rfc3339() } },
            "endpoints": [{ "addresses": [ips[target]], "conditions": { "ready": true } }],
        })
    };
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: lat, namespace: {ns}}}
spec:
  ports: [{{name: http, port: 9000, targetPort: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lat-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: lat, endpointslice.kubernetes.io/managed-by: bench.weft.io}}
addressType: IPv4
ports: [{{name: http, port: 80, protocol: TCP}}]
endpoints: [{{addresses: ["{}"], conditions: {{ready: true}}}}]
"#,
        ips[0]
    ))
    .await?;
    let vip = c.kubectl(&["get", "service", "lat", "-n", ns, "-o", "jsonpath={.spec.clusterIP}"]).await?;
    let url = format!("http://{}:9000/", vip.trim());
    let nodes = c.nodes();
    // Which pod the ClusterIP reaches from a node's namespace.
    let answer = |netns: String| {
        let url = url.clone();
        async move {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &netns, "curl", "-s", "--max-time", "1", &url])
                .stdin(Stdio::null())
                .output()
                .await?;
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok::<_, anyhow::Error>(
                body.lines().find_map(|l| l.strip_prefix("Hostname: ")).map(str::to_string),
            )
        }
    };
    for node in &nodes {
        c.wait_for(
            &format!("{url} from {} to reach {}", node.name, pods[0]),
            Duration::from_secs(120),
            || async { Ok((answer(node.netns.clone()).await?.as_deref() == Some(pods[0])).then_some(())) },
        )
        .await?;
    }
    eprintln!("{url} reaches {} from every node", pods[0]);
    let slices: Api<EndpointSlice> = Api::namespaced(c.client(), ns);
    let metric = "weft_agent_network_programming_latency_seconds";
    let addrs: Vec<std::net::SocketAddr> =
        nodes.iter().map(|n| std::net::SocketAddr::from((n.ip, AGENT_METRICS_PORT))).collect();
    let (mut sli, mut outside) = (Vec::new(), Vec::new());
    for k in 0..changes {
        let target = (k + 1) % 2;
        let mut before = Vec::new();
        for a in &addrs {
            before.push(histogram(&metrics(*a).await?, metric, &[]));
        }
        let t0 = Instant::now();
        slices.patch("lat-1", &PatchParams::default(), &Patch::Merge(&slice(target))).await?;
        // From the outside: every node's curl reaches the new pod.
        let reached = futures::future::try_join_all(nodes.iter().map(|node| {
            let answer = &answer;
            async move {
                loop {
                    if answer(node.netns.clone()).await?.as_deref() == Some(pods[target]) {
                        return Ok::<_, anyhow::Error>(t0.elapsed());
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        bail!("{} still not reaching {} 30 s after the change", node.name, pods[target]);
                    }
                }
            }
        }))
        .await?;
        outside.push(reached.iter().max().copied().unwrap_or_default().as_secs_f64());
        // The SLI as each agent observed it.
        for (a, (s0, c0)) in addrs.iter().zip(&before) {
            let (s1, c1) = c
                .wait_for(
                    "the agent's programming latency to be observed",
                    Duration::from_secs(30),
                    || async {
                        let h = histogram(&metrics(*a).await?, metric, &[]);
                        Ok((h.1 > *c0).then_some(h))
                    },
                )
                .await?;
            sli.push((s1 - s0) / (c1 - c0));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!(
        "\nNetwork programming latency, {changes} EndpointSlice changes × {} nodes \
         (command: `weft-bench-proxy latency --changes {changes}`)\n",
        nodes.len()
    );
    println!("| measure | samples | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (what, v) in [
        ("agents' weft_agent_network_programming_latency_seconds (trigger time → applied, each node)", &sli),
        ("from the outside: change written → every node's curl reaches the new pod", &outside),
    ] {
        println!(
            "| {what} | {} | {} | {} | {} |",
            v.len(),
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0)),
            ms(percentile(v, 100.0))
        );
    }
    Ok(())
}
