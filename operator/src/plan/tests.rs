//! Compiler tests: behaviour on small cases, and the property that compiling incrementally gives
//! every node the same plan as compiling the final state from scratch.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proptest::prelude::*;
use weft_api::plan::{self as pb, Kind};

use super::model::*;
use super::{Compiler, Scope, Update};
use crate::server::PlanStore;

fn node(name: &str, zone: &str, last: u8) -> Node {
    Node {
        name: name.into(),
        ip: Some(Ipv4Addr::new(172, 18, 0, last)),
        zone: Some(zone.into()),
        labels: BTreeMap::new(),
    }
}

fn service(name: &str) -> Service {
    Service {
        key: ObjectKey::new("default", name),
        cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
        external_ips: vec![],
        load_balancer_ips: vec![],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 9000,
            node_port: None,
            target_port: TargetPort::Number(80),
        }],
        affinity_timeout_seconds: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
        traffic_distribution: TopologyMode::None,
        policy: ProxyOverrides::default(),
    }
}

fn endpoint(last: u8, node: &str, zone: &str) -> Endpoint {
    Endpoint {
        ip: Ipv4Addr::new(10, 244, 0, last),
        ready: true,
        serving: true,
        terminating: false,
        node: Some(node.into()),
        zone: Some(zone.into()),
        hint_zones: vec![],
    }
}

fn slice(service: &str, suffix: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        key: ObjectKey::new("default", format!("{service}-{suffix}")),
        service: service.into(),
        ports: vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 }],
        endpoints,
        trigger_unix_ms: None,
    }
}

/// The endpoints of `service` in `node`'s plan, as "ip:port[flags]".
fn endpoints_seen(store: &PlanStore, node: &str, service: &str) -> Vec<String> {
    let plan = store.plan_of(node).unwrap_or_default();
    let Some(r) = plan.iter().find(|r| r.kind() == Kind::Service && r.name == format!("default/{service}"))
    else {
        return vec![];
    };
    let svc: pb::Service = r.decode().unwrap_or_default();
    svc.ports[0]
        .endpoints
        .iter()
        .map(|e| format!("{}:{}/{}", Ipv4Addr::from(e.ip), e.port, e.flags))
        .collect()
}

fn compiled(changes: Vec<Change>) -> (Compiler, PlanStore) {
    let (compiler, updates) = Compiler::full(changes);
    let store = PlanStore::new();
    store.publish(updates, Default::default());
    (compiler, store)
}

#[test]
fn a_cluster_ip_service_goes_to_every_node_once_encoded() {
    let (_, updates) = Compiler::full([
        Change::Node(node("n1", "a", 1)),
        Change::Node(node("n2", "b", 2)),
        Change::Service(service("web")),
        Change::Slice(slice("web", "1", vec![endpoint(1, "n1", "a"), endpoint(2, "n2", "b")])),
    ]);
    let services: Vec<&Update> = updates.iter().filter(|u| u.key.kind() == Kind::Service).collect();
    assert_eq!(services.len(), 1, "one shared resource, not one per node");
    assert_eq!(services[0].scope, Scope::All);
}

#[test]
fn endpoints_use_the_slice_port_and_skip_non_serving_ones() {
    let mut not_serving = endpoint(3, "n1", "a");
    not_serving.ready = false;
    not_serving.serving = false;
    let mut terminating = endpoint(4, "n1", "a");
    terminating.ready = false;
    terminating.terminating = true;
    let (_, store) = compiled(vec![
        Change::Node(node("n1", "a", 1)),
        Change::Service(service("web")),
        Change::Slice(slice("web", "1", vec![endpoint(1, "n1", "a"), not_serving, terminating])),
    ]);
    assert_eq!(endpoints_seen(&store, "n1", "web"), ["10.244.0.1:80/0", "10.244.0.4:80/3"]);
}

#[test]
fn unchanged_input_emits_nothing() {
    let mut compiler = Compiler::new();
    compiler.apply(Change::Node(node("n1", "a", 1)));
    compiler.apply(Change::Service(service("web")));
    assert!(!compiler.flush().is_empty());
    compiler.apply(Change::Node(node("n1", "a", 1)));
    compiler.apply(Change::Service(service("web")));
    compiler.apply(Change::Network(NetworkSettings::default()));
    assert!(compiler.flush().is_empty(), "no-op changes must not produce plan updates");
}

#[test]
fn external_traffic_policy_local_marks_each_nodes_own_endpoints() {
    let mut svc = service("web");
    svc.external_local = true;
    svc.ports[0].node_port = Some(30123);
    let (_, store) = compiled(vec![
        Change::Node(node("n1", "a", 1)),
        Change::Node(node("n2", "a", 2)),
        Change::Node(node("n3", "a", 3)),
        Change::Service(svc),
        Change::Slice(slice("web", "1", vec![endpoint(1, "n1", "a"), endpoint(2, "n2", "a")])),
    ]);
    assert_eq!(endpoints_seen(&store, "n1", "web"), ["10.244.0.1:80/4", "10.244.0.2:80/0"]);
    assert_eq!(endpoints_seen(&store, "n2", "web"), ["10.244.0.1:80/0", "10.244.0.2:80/4"]);
    assert_eq!(endpoints_seen(&store, "n3", "web"), ["10.244.0.1:80/0", "10.244.0.2:80/0"]);
}

#[test]
fn a_health_check_node_port_reaches_every_node_with_its_local_endpoints_marked() {
    // A LoadBalancer Service with allocateLoadBalancerNodePorts: false has no node port, only
    // the health check one: still a per-node plan.
    let mut svc = service("lb");
    svc.external_local = true;
    svc.health_check_node_port = Some(32100);
    let (_, store) = compiled(vec![
        Change::Node(node("n1", "a", 1)),
        Change::Node(node("n2", "a", 2)),
        Change::Service(svc),
        Change::Slice(slice("lb", "1", vec![endpoint(1, "n1", "a")])),
    ]);
    for (n, flags) in [("n1", 4), ("n2", 0)] {
        let plan = store.plan_of(n).unwrap_or_default();
        let r = plan
            .iter()
            .find(|r| r.kind() == Kind::Service && r.name == "default/lb")
            .expect("service in plan");
        let svc: pb::Service = r.decode().expect("decode");
        assert_eq!(svc.health_check_node_port, 32100, "{n}");
        assert_eq!(endpoints_seen(&store, n, "lb"), [format!("10.244.0.1:80/{flags}")], "{n}");
    }
}

#[test]
fn prefer_same_zone_keeps_traffic_in_zone_and_falls_back_when_the_zone_has_none() {
    let mut svc = service("web");
    svc.policy.topology = TopologyMode::PreferSameZone;
    let (_, store) = compiled(vec![
        Change::Node(node("n1", "a", 1)),
        Change::Node(node("n2", "b", 2)),
        Change::Node(node("n3", "c", 3)),
        Change::Service(svc),
        Change::Slice(slice("web", "1", vec![endpoint(1, "n1", "a"), endpoint(2, "n2", "b")])),
    ]);
    assert_eq!(endpoints_seen(&store, "n1", "web"), ["10.244.0.1:80/4"]);
    assert_eq!(endpoints_seen(&store, "n2", "web"), ["10.244.0.2:80/4"]);
    assert_eq!(
        endpoints_seen(&store, "n3", "web"),
        ["10.244.0.1:80/0", "10.244.0.2:80/0"],
        "zone c has none: all"
    );
}

#[test]
fn traffic_distribution_prefer_same_node_keeps_traffic_on_the_node_then_the_zone_then_anywhere() {
    let mut svc = service("web");
    svc.traffic_distribution = TopologyMode::PreferSameNode;
    let ips = |store: &PlanStore, node: &str| -> Vec<String> {
        endpoints_seen(store, node, "web")
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default().to_string())
            .collect()
    };
    let nodes = || {
        vec![
            Change::Node(node("n1", "a", 1)),
            Change::Node(node("n2", "a", 2)),
            Change::Node(node("n3", "b", 3)),
            Change::Service(svc.clone()),
        ]
    };
    let mut changes = nodes();
    changes.push(Change::Slice(slice("web", "1", vec![endpoint(1, "n1", "a"), endpoint(3, "n3", "b")])));
    let (_, store) = compiled(changes);
    assert_eq!(ips(&store, "n1"), ["10.244.0.1"], "its own endpoint");
    assert_eq!(ips(&store, "n2"), ["10.244.0.1"], "none on the node: the zone's");
    assert_eq!(ips(&store, "n3"), ["10.244.0.3"]);

    let mut changes = nodes();
    let mut gone = endpoint(1, "n1", "a");
    gone.ready = false;
    changes.push(Change::Slice(slice("web", "1", vec![gone, endpoint(3, "n3", "b")])));
    let (_, store) = compiled(changes);
    assert_eq!(
        ips(&store, "n1"),
        ["10.244.0.1", "10.244.0.3"],
        "the node's endpoint is not ready: all (the agent uses the ready ones)"
    );
}

#[test]
fn a_deleted_node_leaves_the_plan_entirely() {
    let mut svc = service("web");
    svc.internal_local = true;
    let mut compiler = Compiler::new();
    let store = PlanStore::new();
    for change in [
        Change::Node(node("n1", "a", 1)),
        Change::Node(node("n2", "a", 2)),
        Change::Service(svc),
        Change::Block(Block {
            cidr: "10.244.0.0/26".parse().unwrap_or_default(),
            pool: "p".into(),
            node: "n2".into(),
        }),
    ] {
        compiler.apply(change);
    }
    store.publish(compiler.flush(), Default::default());
    assert!(store.plan_of("n2").is_some());
    compiler.apply(Change::NodeDeleted("n2".into()));
    store.publish(compiler.flush(), Default::default());
    assert!(store.plan_of("n2").is_none());
    let n1 = store.plan_of("n1").unwrap_or_default();
    assert!(!n1.iter().any(|r| r.kind() == Kind::Peer && r.name == "n2"), "n1 no longer routes to n2");
}

// ---- property: incremental == full ----

fn arb_change() -> impl Strategy<Value = Change> {
    let node_name = prop::sample::select(vec!["n1", "n2", "n3", "n4"]);
    let svc_name = prop::sample::select(vec!["a", "b", "c"]);
    prop_oneof![
        (node_name.clone(), prop::sample::select(vec!["z1", "z2"]), 1u8..5)
            .prop_map(|(n, z, ip)| Change::Node(node(n, z, ip))),
        node_name.clone().prop_map(|n| Change::NodeDeleted(n.into())),
        (
            svc_name.clone(),
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![0u8, 1, 2]),
            prop::option::of(30000u16..30003)
        )
            .prop_map(|(s, etp, itp, topo, np)| {
                let mut svc = service(s);
                svc.external_local = etp;
                svc.internal_local = itp;
                svc.ports[0].node_port = np;
                svc.policy.topology =
                    [TopologyMode::None, TopologyMode::PreferSameZone, TopologyMode::PreferSameNode]
                        [topo as usize];
                Change::Service(svc)
            }),
        svc_name.clone().prop_map(|s| Change::ServiceDeleted(ObjectKey::new("default", s))),
        (
            svc_name.clone(),
            prop::sample::select(vec!["x", "y"]),
            prop::collection::vec((1u8..8, node_name, any::<bool>()), 0..4)
        )
            .prop_map(|(s, suffix, eps)| {
                let endpoints = eps
                    .into_iter()
                    .map(|(ip, n, ready)| {
                        let mut e = endpoint(ip, n, if n < "n3" { "z1" } else { "z2" });
                        e.ready = ready;
                        e
                    })
                    .collect();
                Change::Slice(slice(s, suffix, endpoints))
            }),
        (svc_name.clone(), prop::sample::select(vec!["x", "y"]))
            .prop_map(|(s, suffix)| Change::SliceDeleted(ObjectKey::new("default", format!("{s}-{suffix}")))),
        (0u8..4, prop::sample::select(vec!["n1", "n2", "n3", "n4"])).prop_map(|(i, n)| Change::Block(
            Block {
                cidr: ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, 0, i * 64), 26).unwrap_or_default(),
                pool: "default".into(),
                node: n.into(),
            }
        )),
        any::<bool>()
            .prop_map(|vxlan| Change::Network(NetworkSettings { vxlan, ..NetworkSettings::default() })),
    ]
}

/// Each node's plan as sorted (kind/name, version) pairs, to compare two stores.
pub(super) fn plans(store: &PlanStore, nodes: &[&str]) -> BTreeMap<String, Vec<(String, u64)>> {
    nodes
        .iter()
        .filter_map(|n| {
            let mut plan: Vec<(String, u64)> = store
                .plan_of(n)?
                .into_iter()
                .map(|r| (format!("{:?}/{}", r.kind(), r.name), r.version))
                .collect();
            plan.sort();
            Some((n.to_string(), plan))
        })
        .collect()
}

proptest! {
    #[test]
    fn incremental_compilation_matches_a_full_compile(changes in prop::collection::vec(arb_change(), 1..40)) {
        let mut compiler = Compiler::new();
        let incremental = PlanStore::new();
        for change in changes.clone() {
            compiler.apply(change);
            incremental.publish(compiler.flush(), Default::default());
        }
        let (_, full) = compiled(changes);
        let nodes = ["n1", "n2", "n3", "n4"];
        prop_assert_eq!(plans(&incremental, &nodes), plans(&full, &nodes));
        for n in nodes {
            prop_assert_eq!(incremental.node_version(n), full.node_version(n));
        }
    }
}
