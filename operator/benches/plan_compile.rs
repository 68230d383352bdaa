//! Plan compiler benchmark at Kubernetes' scale limits: N nodes × 10,000 Services × 100,000
//! endpoints (10 a Service, each a pod), 1% of them NodePort Services with externalTrafficPolicy:
//! Local (the per-node kind).
//!
//! Measures, per node count: the full compile (cluster state in, every node's resources out,
//! published to the plan store), an incremental change of one endpoint (compile, and compile +
//! fan-out: building the message for every connected node), the bytes each affected node
//! receives for that change, and the peak memory of a process holding the compiled state with
//! every node connected.
//!
//! `make bench` (or `cargo bench -p weft-operator --bench plan_compile`); `WEFT_BENCH_NODES=1000`
//! limits the node counts. A hand-rolled harness because the figures include bytes and memory,
//! which criterion and divan do not report; timings are medians and p99 over repeated runs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use weft_api::plan::{self as pb, Kind};
use weft_operator::plan::Compiler;
use weft_operator::plan::model::*;
use weft_operator::server::PlanStore;

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const LOCAL_EVERY: usize = 100;

fn cluster(nodes: usize) -> Vec<Change> {
    let mut changes = Vec::with_capacity(nodes + 2 * SERVICES + 1);
    changes.push(Change::Network(NetworkSettings::default()));
    changes.push(Change::Pool(Pool {
        name: "default".into(),
        cidr: "10.0.0.0/8".parse().unwrap_or_default(),
        nat_outgoing: true,
        disabled: false,
    }));
    for n in 0..nodes {
        changes.push(Change::Node(Node {
            name: format!("node-{n}"),
            ip: Some(Ipv4Addr::from(0xAC12_0000u32 + n as u32 + 1)),
            zone: Some(format!("zone-{}", n % 3)),
            labels: BTreeMap::new(),
        }));
        changes.push(Change::Block(Block {
            cidr: ipnet::Ipv4Net::new(Ipv4Addr::from(0x0A00_0000u32 + (n as u32) * 64), 26)
                .unwrap_or_default(),
            pool: "default".into(),
            node: format!("node-{n}"),
        }));
    }
    for s in 0..SERVICES {
        let local = s.is_multiple_of(LOCAL_EVERY);
        changes.push(Change::Service(Service {
            key: ObjectKey::new(format!("ns-{}", s % 100), format!("svc-{s}")),
            cluster_ip: Some(Ipv4Addr::from(0x0A60_0000u32 + s as u32 + 1)),
            external_ips: vec![],
            load_balancer_ips: vec![],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: local.then_some(30000 + (s / LOCAL_EVERY) as u16),
                target_port: TargetPort::Number(8080),
            }],
            affinity_timeout_seconds: None,
            external_local: local,
            health_check_node_port: None,
            internal_local: false,
            traffic_distribution: TopologyMode::None,
            policy: ProxyOverrides::default(),
        }));
        changes.push(Change::Slice(slice(nodes, s, None)));
    }
    // One pod behind each endpoint: every node's plan lists the pods bound to it.
    for i in 0..SERVICES * ENDPOINTS_PER_SERVICE {
        changes.push(Change::Pod(Pod {
            key: ObjectKey::new(format!("ns-{}", (i / ENDPOINTS_PER_SERVICE) % 100), format!("pod-{i}")),
            uid: format!("00000000-0000-0000-0000-{i:012}"),
            node: format!("node-{}", i % nodes),
            labels: Default::default(),
            ip: None,
            named_ports: Vec::new(),
        }));
    }
    changes
}

/// The EndpointSlice of Service `s`; `flip` makes that endpoint not ready.
fn slice(nodes: usize, s: usize, flip: Option<usize>) -> EndpointSlice {
    EndpointSlice {
        key: ObjectKey::new(format!("ns-{}", s % 100), format!("svc-{s}-abcde")),
        service: format!("svc-{s}"),
        ports: vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
        endpoints: (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                let i = s * ENDPOINTS_PER_SERVICE + e;
                Endpoint {
                    ip: Ipv4Addr::from(0x0B00_0000u32 + i as u32),
                    ready: flip != Some(e),
                    serving: true,
                    terminating: false,
                    node: Some(format!("node-{}", i % nodes)),
                    zone: Some(format!("zone-{}", i % 3)),
                    hint_zones: vec![],
                }
            })
            .collect(),
        trigger_unix_ms: None,
    }
}

fn connect_all(
    store: &PlanStore,
    nodes: usize,
) -> Vec<std::sync::Arc<weft_operator::server::store::Connection>> {
    (0..nodes)
        .map(|n| {
            let conn = store.connect(pb::Hello { node: format!("node-{n}"), ..Default::default() });
            // The initial snapshot, so later messages are deltas.
            let _ = store.next_message(&conn);
            conn
        })
        .collect()
}

fn stats(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.99))
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Child mode: build the state for `nodes`, connect every node, report peak RSS.
fn memory_probe(nodes: usize) {
    let (compiler, updates) = Compiler::full(cluster(nodes));
    let store = PlanStore::new();
    store.publish(updates, Default::default());
    let conns = connect_all(&store, nodes);
    println!("{:.1}", peak_rss_mib());
    drop((compiler, conns));
}

fn run(nodes: usize) {
    let changes = cluster(nodes);
    // Full compile: median of a few runs (each from scratch).
    let mut full = Vec::new();
    for _ in 0..5 {
        let input = changes.clone();
        let started = Instant::now();
        let (compiler, updates) = Compiler::full(input);
        let store = PlanStore::new();
        store.publish(updates, Default::default());
        full.push(started.elapsed());
        drop((compiler, store));
    }
    let (full_p50, _) = stats(full);

    let (mut compiler, updates) = Compiler::full(changes);
    let store = PlanStore::new();
    store.publish(updates, Default::default());
    let conns = connect_all(&store, nodes);

    // One endpoint of a ClusterIP Service flips readiness.
    let mut compile = Vec::new();
    let mut fanout = Vec::new();
    let mut bytes = Vec::new();
    let rounds = 300;
    for round in 0..rounds {
        let s = 1 + (round * 7) % (SERVICES - 1);
        let s = if s.is_multiple_of(LOCAL_EVERY) { s + 1 } else { s };
        let started = Instant::now();
        compiler.apply(Change::Slice(slice(nodes, s, Some(round % ENDPOINTS_PER_SERVICE))));
        let updates = compiler.flush();
        compile.push(started.elapsed());
        store.publish(updates, Default::default());
        let mut sent = 0usize;
        for conn in &conns {
            if let Some((_, message)) = store.next_message(conn) {
                sent += prost::Message::encoded_len(&message);
                if conn.node == "node-0" {
                    bytes.push(prost::Message::encoded_len(&message));
                }
            }
        }
        fanout.push(started.elapsed());
        assert!(sent > 0);
        // Put it back so every round changes exactly one endpoint.
        compiler.apply(Change::Slice(slice(nodes, s, None)));
        store.publish(compiler.flush(), Default::default());
        for conn in &conns {
            let _ = store.next_message(conn);
        }
    }
    let (c50, c99) = stats(compile);
    let (f50, f99) = stats(fanout);
    bytes.sort_unstable();
    let per_node = bytes[bytes.len() / 2];

    // One endpoint of a NodePort/Local Service: only per-node variants change.
    let mut local = Vec::new();
    for round in 0..50 {
        let s = LOCAL_EVERY * (1 + round % (SERVICES / LOCAL_EVERY - 1));
        let started = Instant::now();
        compiler.apply(Change::Slice(slice(nodes, s, Some(round % ENDPOINTS_PER_SERVICE))));
        let updates = compiler.flush();
        local.push(started.elapsed());
        store.publish(updates, Default::default());
        compiler.apply(Change::Slice(slice(nodes, s, None)));
        store.publish(compiler.flush(), Default::default());
        for conn in &conns {
            let _ = store.next_message(conn);
        }
    }
    let (l50, l99) = stats(local);

    let memory = std::process::Command::new(std::env::current_exe().unwrap_or_default())
        .args(["--memory-probe", &nodes.to_string()])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into());

    let resources = store.plan_of("node-0").map_or(0, |p| p.len());
    let services_per_node =
        store.plan_of("node-0").map_or(0, |p| p.iter().filter(|r| r.kind() == Kind::Service).count());
    println!(
        "| {nodes} | {} | {} / {} | {} / {} | {} / {} | {per_node} B | {memory} MiB | {resources} ({services_per_node} services) |",
        ms(full_p50),
        ms(c50),
        ms(c99),
        ms(f50),
        ms(f99),
        ms(l50),
        ms(l99),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--memory-probe") {
        memory_probe(args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(1000));
        return;
    }
    let scales: Vec<usize> = std::env::var("WEFT_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 5000]);
    println!(
        "{SERVICES} Services × {ENDPOINTS_PER_SERVICE} endpoints; 1 in {LOCAL_EVERY} is NodePort + externalTrafficPolicy: Local"
    );
    println!();
    println!(
        "| nodes | full compile p50 | one endpoint: compile p50 / p99 | compile + fan-out to all nodes p50 / p99 | one endpoint of a Local Service: compile p50 / p99 | bytes to each affected node | peak RSS (state + all nodes connected) | resources per node |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for nodes in scales {
        run(nodes);
    }
}
