//! NetworkPolicy enforcement at scale on one node: 1,000 policies over 10,000 pods, all held by
//! this node (the worst case: each of its 110 pods is selected by 10 policies), written by the
//! agent's `PolicyHandle` into the kernel of a network namespace this benchmark creates.
//!
//! `cargo bench -p weft-agent --bench policy_sync` (root). Measured, with the same plan:
//! - a full sync (render + one `nft -f` replacing the table), 5 times;
//! - one remote pod's label change (one address in or out of one peer set), 40 times, written
//!   incrementally, against the same change written as a full replacement (the naive way; the
//!   peer in this run);
//! - one local pod's label change (the pod joins or leaves a policy), 40 times;
//! - the render alone (pure, O(plan)), and the agent's resident memory with the plan held;
//! - with that table in place, the first packet of new connections (TCP connect, SYN to SYN-ACK)
//!   from a client pod to a policed pod (isolated by 10 policies; the rule that admits the client
//!   is the tenth) against an unpoliced pod of the same node, alternately, in the same run.
//!
//! Medians and p99 in milliseconds; the namespace goes with its guard.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use weft_agent::exec::Runner;
use weft_agent::ipam::IpamHandle;
use weft_agent::metrics::AgentMetrics;
use weft_agent::policy::{PolicyHandle, PolicyPlan, apply, render};
use weft_api::plan as pb;

#[allow(dead_code, clippy::expect_used)]
#[path = "../tests/support/mod.rs"]
mod support;
use support::netns::Netns;
use support::{Enter as _, attach};

const POLICIES: usize = 1_000;
const PODS: usize = 10_000;
const LOCAL_PODS: usize = 110;
const PEERS_PER_SET: usize = 100;
const CHANGES: usize = 40;
const CONNECTS: usize = 400;

fn addr(i: usize) -> u32 {
    u32::from(Ipv4Addr::new(10, 240, 0, 0)) + i as u32
}

/// Policy `p` isolates 10 % of the local pods (ingress) and admits the pods of its peer set on
/// TCP 8000+p%100; the sets are the 10,000 pods in slices of 100.
fn plan() -> PolicyPlan {
    let mut plan = PolicyPlan { enforcing: true, ..Default::default() };
    for p in 0..POLICIES {
        let set = format!("s-{p:016x}");
        let policy = pb::NetworkPolicy {
            namespace: format!("ns-{}", p / 10),
            name: format!("policy-{p}"),
            isolates_ingress: true,
            ingress: vec![pb::PolicyRule {
                peer_sets: vec![set.clone()],
                ports: vec![pb::PolicyPort {
                    protocol: pb::Protocol::Tcp as i32,
                    port: 8000 + (p % 100) as u32,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        plan.policies.insert(format!("ns-{}/policy-{p}", p / 10), policy);
        let first = (p * PEERS_PER_SET) % PODS;
        let addresses = (first..first + PEERS_PER_SET).map(addr).collect();
        plan.sets.insert(set, pb::PolicySet { addresses, ..Default::default() });
    }
    for l in 0..LOCAL_PODS {
        let ingress_policies =
            (0..10).map(|k| (l * 10 + k) % POLICIES).map(|p| format!("ns-{}/policy-{p}", p / 10)).collect();
        plan.targets.push(pb::PolicyTarget {
            namespace: "local".into(),
            name: format!("pod-{l}"),
            address: addr(PODS + l),
            ingress_policies,
            ..Default::default()
        });
        plan.known.insert(("local".into(), format!("pod-{l}")));
    }
    plan
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

struct Timing {
    name: &'static str,
    samples: Vec<f64>,
    lines: usize,
}

fn run() -> Result<String> {
    let node = Netns::new("wbpol", "node")?;
    let dir = tempfile::TempDir::new()?;
    let ipam = IpamHandle::open(dir.path(), "bench")?;
    let handle = PolicyHandle::new(Runner::in_netns(node.name()), AgentMetrics::default(), true);
    let before = rss_mib();
    let base = plan();

    let mut full = Vec::new();
    for _ in 0..5 {
        handle.invalidate();
        let started = Instant::now();
        handle.sync(base.clone(), &ipam)?;
        full.push(ms(started.elapsed()));
    }
    let desired = render(&base, &[]);
    let full_lines = apply::script(None, &desired).lines().count();
    let held = rss_mib() - before;

    // A remote pod (the first of set 0) leaves the set and comes back, alternately.
    let remote = |i: usize| {
        let mut p = base.clone();
        if i.is_multiple_of(2) {
            p.sets.get_mut(&format!("s-{:016x}", 0)).map(|s| s.addresses.remove(0));
        }
        p
    };
    // A local pod (pod-0) joins policy 999, and leaves it.
    let local = |i: usize| {
        let mut p = base.clone();
        if i.is_multiple_of(2) {
            p.targets[0].ingress_policies.push(format!("ns-99/policy-{}", POLICIES - 1));
        }
        p
    };
    let mut timings = Vec::new();
    for (name, change, incremental) in [
        ("remote pod label change, incremental", &remote as &dyn Fn(usize) -> PolicyPlan, true),
        ("remote pod label change, full replace (peer)", &remote, false),
        ("local pod label change, incremental", &local, true),
    ] {
        handle.sync(base.clone(), &ipam)?;
        let mut samples = Vec::new();
        let mut lines = 0;
        for i in 0..CHANGES {
            let next = change(i);
            let previous = render(&change(i + 1), &[]);
            lines = lines.max(apply::script(Some(&previous), &render(&next, &[])).lines().count());
            if !incremental {
                handle.invalidate();
            }
            let started = Instant::now();
            handle.sync(next, &ipam)?;
            samples.push(ms(started.elapsed()));
        }
        timings.push(Timing { name, samples, lines: if incremental { lines } else { full_lines } });
    }
    let mut renders = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        std::hint::black_box(render(&base, &[]));
        renders.push(ms(started.elapsed()));
    }

    let first_packet = first_packet(&node)?;

    let mut out = format!(
        "policy_sync: {POLICIES} policies, {PODS} pods in {} peer sets, {LOCAL_PODS} local pods each isolated by 10 policies\n\
         full sync (render + nft -f of {full_lines} lines): p50 {:.1} ms (5 runs)\n\
         render alone: p50 {:.1} ms; agent memory with the plan held: +{held:.0} MiB\n",
        base.sets.len(),
        quantile(&mut full, 0.5),
        quantile(&mut renders, 0.5),
    );
    for t in &mut timings {
        out.push_str(&format!(
            "{}: p50 {:.1} ms, p99 {:.1} ms, {} lines written ({CHANGES} changes)\n",
            t.name,
            quantile(&mut t.samples, 0.5),
            quantile(&mut t.samples, 0.99),
            t.lines
        ));
    }
    let inc = quantile(&mut timings[0].samples, 0.5);
    let naive = quantile(&mut timings[1].samples, 0.5);
    out.push_str(&format!("incremental / full replace (p50): {:.3}\n", inc / naive));
    out.push_str(&first_packet);
    Ok(out)
}

/// Connect latency to pod-0 (policed: its 10 policies' chains are walked, the last admits the
/// client on TCP 8009) and to an address no policy selects, on the node holding the full table.
fn first_packet(node: &Netns) -> Result<String> {
    let dotted = |a: u32| Ipv4Addr::from(a).to_string();
    let (client_ip, policed_ip, open_ip) = (addr(905), addr(PODS), addr(PODS + LOCAL_PODS + 1));
    std::process::Command::new("ip")
        .args(["netns", "exec", node.name(), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .status()?;
    // The node answers for the pods' gateway only with its loopback up.
    node.ip(&["link", "set", "lo", "up"])?;
    let client = Netns::new("wbpol", "client")?;
    let policed = Netns::new("wbpol", "policed")?;
    let open = Netns::new("wbpol", "open")?;
    for (ns, host_if, ip) in
        [(&client, "vclient", client_ip), (&policed, "vpoliced", policed_ip), (&open, "vopen", open_ip)]
    {
        ns.ip(&["link", "set", "lo", "up"])?;
        attach(node, ns, host_if, &dotted(ip));
    }
    for server in [&policed, &open] {
        let listener = server.enter(|| std::net::TcpListener::bind(("0.0.0.0", 8009)))?;
        std::thread::spawn(move || for _ in listener.incoming() {});
    }
    let samples = client.enter(|| -> Result<[Vec<f64>; 2]> {
        let mut out = [Vec::new(), Vec::new()];
        for i in 0..CONNECTS * 2 {
            let (slot, to) = if i % 2 == 0 { (0, policed_ip) } else { (1, open_ip) };
            let target = std::net::SocketAddr::from((Ipv4Addr::from(to), 8009));
            let started = Instant::now();
            let conn = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
                .map_err(|e| anyhow!("connect to {target} (attempt {i}): {e}"))?;
            out[slot].push(ms(started.elapsed()));
            drop(conn);
        }
        Ok(out)
    })?;
    let [mut to_policed, mut to_open] = samples;
    let (p50, open50) = (quantile(&mut to_policed, 0.5), quantile(&mut to_open, 0.5));
    Ok(format!(
        "first packet (TCP connect, {CONNECTS} each, alternating): policed pod p50 {:.3} ms p99 {:.3} ms; \
         unpoliced pod p50 {:.3} ms p99 {:.3} ms; policed / unpoliced (p50): {:.2}\n",
        p50,
        quantile(&mut to_policed, 0.99),
        open50,
        quantile(&mut to_open, 0.99),
        p50 / open50
    ))
}

fn main() -> Result<()> {
    if !std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
    {
        eprintln!("policy_sync: skipped, it needs root for network namespaces");
        return Ok(());
    }
    let report = std::thread::spawn(run).join().map_err(|_| anyhow!("the benchmark thread panicked"))??;
    println!("{report}");
    Ok(())
}
