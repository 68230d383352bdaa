//! Ingress compilation: what reaches which node, and incremental == full.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proptest::prelude::*;
use weft_api::plan::{self as pb, Kind};

use super::*;
use crate::plan::model::{
    IngressPath, IngressRule, IngressTls, KeyPair, ProxyOverrides, ServicePort, TargetPort, TopologyMode,
};
use crate::plan::tests::plans;
use crate::plan::{Compiler, Scope};
use crate::server::PlanStore;

fn node(name: &str, last: u8, ingress: bool) -> Node {
    let mut labels = BTreeMap::new();
    if ingress {
        labels.insert("ingress".to_string(), "yes".to_string());
    }
    Node { name: name.into(), ip: Some(Ipv4Addr::new(172, 18, 0, last)), zone: None, labels }
}

fn service(name: &str, last: u8) -> Service {
    Service {
        key: ObjectKey::new("shop", name),
        cluster_ip: Some(Ipv4Addr::new(10, 96, 0, last)),
        external_ips: vec![],
        load_balancer_ips: vec![],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
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

fn settings() -> Settings {
    Settings { node_selector: BTreeMap::from([("ingress".into(), "yes".into())]), ..Settings::default() }
}

fn class() -> IngressClass {
    IngressClass { name: "weft".into(), controller: CONTROLLER.into(), is_default: true }
}

fn ingress(name: &str, path: &str, svc: &str, port: PortRef) -> Ingress {
    Ingress {
        key: ObjectKey::new("shop", name),
        class_name: None,
        created_unix: 1,
        annotations: BTreeMap::new(),
        default_backend: None,
        rules: vec![IngressRule {
            host: "shop.example.com".into(),
            paths: vec![IngressPath {
                path: path.into(),
                path_type: PathType::Prefix,
                backend: Some(BackendRef { service: svc.into(), port }),
            }],
        }],
        tls: vec![IngressTls { hosts: vec!["shop.example.com".into()], secret: Some("shop-tls".into()) }],
    }
}

fn secret(name: &str) -> TlsSecret {
    let pair = KeyPair { cert: b"CERT".to_vec(), private_key: b"KEY".to_vec() };
    TlsSecret { key: ObjectKey::new("shop", name), pair: Ok(pair) }
}

fn kinds(store: &PlanStore, node: &str) -> Vec<String> {
    let mut v: Vec<String> = store
        .plan_of(node)
        .unwrap_or_default()
        .iter()
        .filter(|r| matches!(r.kind(), Kind::Ingress | Kind::Secret | Kind::IngressSettings))
        .map(|r| format!("{:?} {}", r.kind(), r.name))
        .collect();
    v.sort();
    v
}

fn base() -> Vec<Change> {
    vec![
        Change::IngressSettings(settings()),
        Change::IngressClass(class()),
        Change::Node(node("n1", 1, true)),
        Change::Node(node("n2", 2, false)),
        Change::Service(service("wear", 11)),
        Change::Ingress(ingress("wear", "/wear", "wear", PortRef::Name("http".into()))),
        Change::Secret(secret("shop-tls")),
        Change::Secret(secret("unrelated")),
    ]
}

#[test]
fn ingresses_and_their_secrets_reach_only_ingress_nodes_with_backends_resolved() {
    let (compiler, updates) = Compiler::full(base());
    let store = PlanStore::new();
    store.publish(updates.clone(), Default::default());
    assert_eq!(
        kinds(&store, "n1"),
        ["Ingress shop/wear", "IngressSettings ingress", "Secret shop/shop-tls"],
        "the unrelated Secret stays in the operator"
    );
    assert_eq!(kinds(&store, "n2"), Vec::<String>::new());
    let ing = updates
        .iter()
        .find(|u| u.key.kind() == Kind::Ingress)
        .and_then(|u| u.resource.as_ref())
        .map(|r| r.decode::<pb::Ingress>().unwrap_or_default())
        .unwrap_or_default();
    let backend = ing.rules[0].paths[0].backend.clone().unwrap_or_default();
    assert_eq!((Ipv4Addr::from(backend.cluster_ip), backend.port), (Ipv4Addr::new(10, 96, 0, 11), 8080));
    let node_plan: pb::NodePlan = store
        .plan_of("n1")
        .unwrap_or_default()
        .iter()
        .find(|r| r.kind() == Kind::Node)
        .map(|r| r.decode().unwrap_or_default())
        .unwrap_or_default();
    assert!(node_plan.ingress);
    assert_eq!(compiler.ingress_report().addresses, [Ipv4Addr::new(172, 18, 0, 1)]);
    // One encoding shared by every ingress node.
    let scopes: Vec<&Scope> =
        updates.iter().filter(|u| u.key.kind() == Kind::Ingress).map(|u| &u.scope).collect();
    assert_eq!(scopes, [&Scope::Node("n1".into())]);
}

#[test]
fn an_invalid_ingress_is_left_out_and_reported_while_the_others_stay() {
    let mut changes = base();
    let mut bad = ingress("bad", "/x;{", "wear", PortRef::Number(8080));
    bad.tls.clear();
    changes.push(Change::Ingress(bad));
    let (compiler, updates) = Compiler::full(changes);
    let store = PlanStore::new();
    store.publish(updates, Default::default());
    assert!(kinds(&store, "n1").contains(&"Ingress shop/wear".to_string()));
    assert!(!kinds(&store, "n1").contains(&"Ingress shop/bad".to_string()));
    let report = &compiler.ingress_report().ingresses;
    assert_eq!(report.get(&ObjectKey::new("shop", "wear")), Some(&Ok(())));
    assert_eq!(
        report.get(&ObjectKey::new("shop", "bad")),
        Some(&Err("spec.rules[0].http.paths[0].path \"/x;{\": must start with / and hold only letters, digits and ._~/%:@!*+,=-".into()))
    );
}

#[test]
fn another_class_and_a_missing_service_are_handled() {
    let mut other = ingress("other", "/o", "wear", PortRef::Number(8080));
    other.class_name = Some("nginx".into());
    let missing = ingress("missing", "/m", "nope", PortRef::Number(80));
    let mut changes = base();
    changes.extend([Change::Ingress(other), Change::Ingress(missing)]);
    let (_, updates) = Compiler::full(changes);
    let names: Vec<&str> =
        updates.iter().filter(|u| u.key.kind() == Kind::Ingress).map(|u| u.key.name.as_str()).collect();
    assert_eq!(names, ["shop/missing", "shop/wear"]);
    let missing: pb::Ingress = updates
        .iter()
        .find(|u| u.key.name == "shop/missing")
        .and_then(|u| u.resource.as_ref()?.decode().ok())
        .unwrap_or_default();
    assert_eq!(missing.rules[0].paths[0].backend.clone().unwrap_or_default().cluster_ip, 0, "503");
}

#[test]
fn an_endpoint_change_never_touches_ingress_resources_but_a_service_change_does() {
    let mut compiler = Compiler::new();
    for c in base() {
        compiler.apply(c);
    }
    compiler.flush();
    compiler.apply(Change::Slice(crate::plan::model::EndpointSlice {
        key: ObjectKey::new("shop", "wear-1"),
        service: "wear".into(),
        ports: vec![],
        endpoints: vec![],
        trigger_unix_ms: None,
    }));
    assert!(compiler.flush().iter().all(|u| u.key.kind() != Kind::Ingress));
    compiler.apply(Change::Service(service("wear", 12)));
    assert!(compiler.flush().iter().any(|u| u.key.kind() == Kind::Ingress));
}

fn arb_change() -> impl Strategy<Value = Change> {
    let node_name = prop::sample::select(vec!["n1", "n2", "n3"]);
    let ing = prop::sample::select(vec!["a", "b"]);
    prop_oneof![
        (node_name.clone(), 1u8..4, any::<bool>()).prop_map(|(n, ip, i)| Change::Node(node(n, ip, i))),
        node_name.prop_map(|n| Change::NodeDeleted(n.into())),
        (prop::sample::select(vec!["wear", "watch"]), 10u8..12)
            .prop_map(|(s, ip)| Change::Service(service(s, ip))),
        prop::sample::select(vec!["wear", "watch"])
            .prop_map(|s| Change::ServiceDeleted(ObjectKey::new("shop", s))),
        (
            ing.clone(),
            prop::sample::select(vec!["/a", "/b;", "/c"]),
            prop::sample::select(vec!["wear", "watch"])
        )
            .prop_map(|(n, p, s)| Change::Ingress(ingress(n, p, s, PortRef::Number(8080)))),
        ing.prop_map(|n| Change::IngressDeleted(ObjectKey::new("shop", n))),
        prop::sample::select(vec!["shop-tls", "x"]).prop_map(|s| Change::Secret(secret(s))),
        Just(Change::SecretDeleted(ObjectKey::new("shop", "shop-tls"))),
        Just(Change::IngressClass(class())),
        Just(Change::IngressClassDeleted("weft".into())),
        (any::<bool>(), any::<bool>()).prop_map(|(enabled, selector)| {
            let mut s = if selector { settings() } else { Settings::default() };
            s.enabled = enabled;
            Change::IngressSettings(s)
        }),
    ]
}

proptest! {
    #[test]
    fn incremental_ingress_compilation_matches_a_full_compile(changes in prop::collection::vec(arb_change(), 1..30)) {
        let mut compiler = Compiler::new();
        let incremental = PlanStore::new();
        for change in changes.clone() {
            compiler.apply(change);
            incremental.publish(compiler.flush(), Default::default());
        }
        let (full_compiler, updates) = Compiler::full(changes);
        let full = PlanStore::new();
        full.publish(updates, Default::default());
        let nodes = ["n1", "n2", "n3"];
        prop_assert_eq!(plans(&incremental, &nodes), plans(&full, &nodes));
        prop_assert_eq!(compiler.ingress_report(), full_compiler.ingress_report());
    }
}

#[test]
fn a_served_ingress_naming_a_missing_tls_secret_is_reported_until_the_secret_exists() {
    let mut changes = base();
    changes.retain(|c| !matches!(c, Change::Secret(s) if s.key.name == "shop-tls"));
    let (mut compiler, _) = Compiler::full(changes);
    let report = compiler.ingress_report();
    assert_eq!(
        report.ingresses.get(&ObjectKey::new("shop", "wear")),
        Some(&Ok(())),
        "still served over HTTP"
    );
    assert_eq!(
        report.unusable_secrets.get(&ObjectKey::new("shop", "wear")),
        Some(&vec![UnusableSecret { name: "shop/shop-tls".into(), invalid: None }])
    );
    compiler.apply(Change::Secret(secret("shop-tls")));
    compiler.flush();
    assert!(compiler.ingress_report().unusable_secrets.is_empty());
}

#[test]
fn a_tls_secret_nginx_cannot_load_is_reported_and_kept_from_the_nodes_and_the_other_ingresses_stay() {
    let mut changes = base();
    changes.push(Change::Service(service("shoes", 12)));
    let mut shoes = ingress("shoes", "/shoes", "shoes", PortRef::Name("http".into()));
    shoes.rules[0].host = "shoes.example.com".into();
    shoes.tls =
        vec![IngressTls { hosts: vec!["shoes.example.com".into()], secret: Some("shoes-tls".into()) }];
    changes.push(Change::Ingress(shoes));
    let broken = TlsSecret { key: ObjectKey::new("shop", "shoes-tls"), pair: Err("mismatched".into()) };
    changes.push(Change::Secret(broken));
    let (compiler, updates) = Compiler::full(changes);
    let store = PlanStore::new();
    store.publish(updates, Default::default());
    let report = compiler.ingress_report();
    assert_eq!(report.ingresses.get(&ObjectKey::new("shop", "shoes")), Some(&Ok(())), "served over HTTP");
    assert_eq!(
        report.unusable_secrets.get(&ObjectKey::new("shop", "shoes")),
        Some(&vec![UnusableSecret { name: "shop/shoes-tls".into(), invalid: Some("mismatched".into()) }])
    );
    assert_eq!(
        kinds(&store, "n1"),
        ["Ingress shop/shoes", "Ingress shop/wear", "IngressSettings ingress", "Secret shop/shop-tls"],
        "the broken Secret never reaches a node; the good one does"
    );
}
