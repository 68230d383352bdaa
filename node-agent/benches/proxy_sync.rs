//! The service proxy's sync at 1,000 / 5,000 / 10,000 Services × 10 endpoints: the full sync and
//! a one-endpoint change, first render + diff alone (the restore input recorded, not run), then,
//! as root, with the real `iptables-restore` (iptables backend) and `nft` (nftables backend) in a
//! network namespace this benchmark creates (and deletes). The side-by-side comparison with kube-proxy is `e2e`'s benchmark; this one isolates
//! Weft's own cost.
//!
//! `cargo bench -p weft-agent --bench proxy_sync [-- --no-iptables]`

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use weft_agent::exec::Runner;
use weft_agent::metrics::AgentMetrics;
use weft_agent::plan_state::PlanState;
use weft_agent::proxy::{ProxyCache, ProxyPlan, SyncReport};
use weft_api::plan::{self as pb, Kind, Resource};

const ENDPOINTS: u32 = 10;
const CHANGES: usize = 30;

fn service(i: u32, drop_endpoint: Option<u32>) -> Resource {
    let endpoints = (0..ENDPOINTS)
        .filter(|e| Some(*e) != drop_endpoint)
        .map(|e| pb::Endpoint {
            ip: u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + e,
            port: 8080,
            flags: 0,
        })
        .collect();
    let svc = pb::Service {
        cluster_ip: u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1,
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp as i32,
            port: 80,
            node_port: 0,
            endpoints,
        }],
        ..Default::default()
    };
    Resource::encode(Kind::Service, format!("bench/svc-{i}"), &svc)
}

fn plan(n: u32, mode: pb::ProxyMode) -> PlanState {
    let net = pb::NetworkSettings {
        pod_cidrs: vec!["10.128.0.0/9".into()],
        service_cidr: "10.96.0.0/12".into(),
        masquerade_bit: 14,
        proxy_mode: mode as i32,
        ..Default::default()
    };
    let resources = std::iter::once(Resource::encode(Kind::Network, "network", &net))
        .chain((0..n).map(|i| service(i, None)));
    PlanState { version: 1, generation: 1, resources: resources.map(|r| (r.key(), r)).collect() }
}

fn timed(cache: &ProxyCache, plan: &PlanState, metrics: &AgentMetrics) -> (Duration, SyncReport) {
    let started = Instant::now();
    // As the agent calls it: the proxy's part of the plan picked out, then synced.
    let report = cache
        .sync(&ProxyPlan::from_resources(plan.resources.values()).expect("plan"), metrics)
        .expect("sync");
    (started.elapsed(), report)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn run(n: u32, mode: pb::ProxyMode, runner: Runner, label: &str) {
    let cache = ProxyCache::with_runner(runner);
    let metrics = AgentMetrics::default();
    let mut plan = plan(n, mode);
    let (full, report) = timed(&cache, &plan, &metrics);
    let mut changes = Vec::new();
    let mut lines = 0;
    for k in 0..CHANGES {
        // One endpoint of one Service goes away (or comes back): a one-endpoint change.
        let i = ((k / 2) as u32 * 7919) % n;
        let r = service(i, (k % 2 == 0).then_some(k as u32 % ENDPOINTS));
        plan.resources.insert(r.key(), r);
        let (d, report) = timed(&cache, &plan, &metrics);
        assert_eq!(report.services_rendered, 1);
        lines = report.lines;
        changes.push(d);
    }
    let (unchanged, _) = timed(&cache, &plan, &metrics);
    changes.sort();
    println!(
        "| {label} | {n} | {} | {} | {} | {} | {} | {} | {} |",
        ms(full),
        report.lines,
        ms(quantile(&changes, 0.5)),
        ms(quantile(&changes, 0.99)),
        lines,
        ms(unchanged),
        cache.restores(),
    );
}

fn main() {
    let real = !std::env::args().any(|a| a == "--no-iptables")
        && std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        });
    println!(
        "| runner | services | full sync | lines | change p50 | change p99 | lines/change | unchanged sync | restores |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in [1_000, 5_000, 10_000] {
        run(n, pb::ProxyMode::Iptables, Runner::recording(), "iptables render+diff");
        run(n, pb::ProxyMode::Nftables, Runner::recording(), "nftables render+diff");
        if real {
            for (mode, label) in
                [(pb::ProxyMode::Iptables, "iptables-restore"), (pb::ProxyMode::Nftables, "nft")]
            {
                let ns = format!("weft-proxy-bench-{}", std::process::id());
                let ok = Command::new("ip").args(["netns", "add", &ns]).status().is_ok_and(|s| s.success());
                if ok {
                    run(n, mode, Runner::in_netns(&ns), label);
                }
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            }
        }
    }
}
