//! NetworkPolicy and ClusterNetworkPolicy compilation: what each node receives, and
//! incremental == full.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proptest::prelude::*;
use weft_api::plan::{self as pb, Kind, Resource};

use super::Compiler;
use super::model::*;
use super::tests::plans;
use crate::server::PlanStore;

fn node(name: &str) -> Node {
    Node { name: name.into(), ip: Some(Ipv4Addr::new(172, 18, 0, 1)), zone: None, labels: BTreeMap::new() }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(ns: &str, name: &str, node: &str, last: Option<u8>, app: &str) -> Pod {
    Pod {
        key: ObjectKey::new(ns, name),
        uid: format!("uid-{ns}-{name}"),
        node: node.into(),
        labels: labels(&[("app", app)]),
        ip: last.map(|l| Ipv4Addr::new(10, 244, 0, l)),
        named_ports: vec![NamedPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
    }
}

fn namespace(name: &str, team: &str) -> Namespace {
    Namespace { name: name.into(), labels: labels(&[("team", team)]) }
}

fn app(value: &str) -> LabelSelector {
    LabelSelector::new(vec![Requirement::In("app".into(), vec![value.into()])])
}

/// In `ns`, pods `app=<target>` accept TCP 80 from pods `app=<from>` of the same namespace.
fn allow_from(ns: &str, name: &str, target: &str, from: &str) -> NetworkPolicy {
    NetworkPolicy {
        key: ObjectKey::new(ns, name),
        pod_selector: app(target),
        ingress: Some(vec![PolicyRule {
            any_peer: false,
            peers: vec![PolicyPeer::Pods(PeerSelector {
                namespaces: NamespaceScope::Own(ns.into()),
                pods: app(from),
            })],
            ports: vec![PolicyPort {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Number(80)),
                end_port: None,
            }],
        }]),
        egress: None,
    }
}

fn team(value: &str) -> LabelSelector {
    LabelSelector::new(vec![Requirement::In("team".into(), vec![value.into()])])
}

/// A cluster policy on pods `app=<target>` of namespaces `team=<team>`: `action` for ingress
/// from every pod of namespaces `team=<from_team>`.
fn cluster_policy(
    name: &str,
    tier: Tier,
    target: &str,
    team_of: &str,
    from_team: &str,
    action: RuleAction,
) -> ClusterNetworkPolicy {
    ClusterNetworkPolicy {
        name: name.into(),
        tier,
        priority: 10,
        subject: PeerSelector { namespaces: NamespaceScope::Selected(team(team_of)), pods: app(target) },
        ingress: vec![ClusterPolicyRule {
            name: "from-team".into(),
            action,
            matches: PolicyRule {
                any_peer: false,
                peers: vec![PolicyPeer::Pods(PeerSelector {
                    namespaces: NamespaceScope::Selected(team(from_team)),
                    pods: LabelSelector::default(),
                })],
                ports: vec![],
            },
        }],
        egress: vec![],
    }
}

fn store_of(changes: Vec<Change>) -> PlanStore {
    let (_, updates) = Compiler::full(changes);
    let store = PlanStore::new();
    store.publish(updates, Default::default());
    store
}

fn of_kind(store: &PlanStore, node: &str, kind: Kind) -> Vec<Resource> {
    store.plan_of(node).unwrap_or_default().into_iter().filter(|r| r.kind() == kind).collect()
}

fn decode<M: prost::Message + Default>(r: &Resource) -> M {
    r.decode().unwrap_or_else(|e| panic!("{} does not decode: {e}", r.name))
}

fn base() -> Vec<Change> {
    vec![
        Change::Node(node("n1")),
        Change::Node(node("n2")),
        Change::Namespace(namespace("shop", "a")),
        Change::Pod(pod("shop", "web-1", "n1", Some(1), "web")),
        Change::Pod(pod("shop", "client-1", "n2", Some(2), "client")),
        Change::Pod(pod("shop", "other-1", "n2", Some(3), "other")),
    ]
}

#[test]
fn a_policy_goes_only_to_the_nodes_whose_pods_it_selects_with_its_peers_resolved() {
    let mut changes = base();
    changes.push(Change::NetworkPolicy(allow_from("shop", "web", "web", "client")));
    let store = store_of(changes);

    let targets: pb::PolicyTargets = decode(&of_kind(&store, "n1", Kind::PolicyTargets)[0]);
    assert_eq!(targets.pods.len(), 1);
    assert_eq!(
        (targets.pods[0].name.as_str(), targets.pods[0].ingress_policies.clone()),
        ("web-1", vec!["shop/web".to_string()])
    );
    assert!(targets.pods[0].egress_policies.is_empty(), "Ingress only");
    assert_eq!(targets.pods[0].ports[0].port, 8080, "named ports for ingress rules");

    let policy: pb::NetworkPolicy = decode(&of_kind(&store, "n1", Kind::NetworkPolicy)[0]);
    assert!(policy.isolates_ingress && !policy.isolates_egress);
    let sets = of_kind(&store, "n1", Kind::PolicySet);
    assert_eq!(sets.len(), 1);
    assert_eq!(policy.ingress[0].peer_sets, vec![sets[0].name.clone()]);
    let set: pb::PolicySet = decode(&sets[0]);
    assert_eq!(set.addresses, vec![u32::from(Ipv4Addr::new(10, 244, 0, 2))], "{}", set.selector);

    for kind in [Kind::NetworkPolicy, Kind::PolicySet] {
        assert!(of_kind(&store, "n2", kind).is_empty(), "n2 runs no selected pod: no {kind:?}");
    }
    let targets: pb::PolicyTargets = decode(&of_kind(&store, "n2", Kind::PolicyTargets)[0]);
    assert!(targets.pods.is_empty(), "n2's agent knows the cluster has policies, and none for its pods");
}

#[test]
fn a_label_change_moves_a_pod_between_sets_and_sends_only_the_set() {
    let mut compiler = Compiler::new();
    let store = PlanStore::new();
    for c in base() {
        compiler.apply(c);
    }
    compiler.apply(Change::NetworkPolicy(allow_from("shop", "web", "web", "client")));
    store.publish(compiler.flush(), Default::default());

    // other-1 becomes a client: only the set changes, only on n1.
    compiler.apply(Change::Pod(pod("shop", "other-1", "n2", Some(3), "client")));
    let updates = compiler.flush();
    let policy_updates: Vec<_> = updates
        .iter()
        .filter(|u| matches!(u.key.kind(), Kind::PolicySet | Kind::NetworkPolicy | Kind::PolicyTargets))
        .collect();
    assert_eq!(policy_updates.len(), 1, "{policy_updates:?}");
    assert_eq!(policy_updates[0].key.kind(), Kind::PolicySet);
    assert_eq!(policy_updates[0].scope, super::Scope::Node("n1".into()));
    store.publish(updates, Default::default());
    let set: pb::PolicySet = decode(&of_kind(&store, "n1", Kind::PolicySet)[0]);
    assert_eq!(set.addresses.len(), 2);
}

#[test]
fn namespace_selectors_follow_namespace_labels() {
    let mut changes = base();
    changes.push(Change::Namespace(namespace("tools", "b")));
    changes.push(Change::Pod(pod("tools", "probe", "n2", Some(9), "probe")));
    let mut policy = allow_from("shop", "web", "web", "client");
    if let Some(rules) = policy.ingress.as_mut() {
        rules[0].peers = vec![PolicyPeer::Pods(PeerSelector {
            namespaces: NamespaceScope::Selected(LabelSelector::new(vec![Requirement::In(
                "team".into(),
                vec!["b".into()],
            )])),
            pods: LabelSelector::default(),
        })];
    }
    changes.push(Change::NetworkPolicy(policy));
    let mut compiler = Compiler::new();
    let store = PlanStore::new();
    for c in changes {
        compiler.apply(c);
    }
    store.publish(compiler.flush(), Default::default());
    let set: pb::PolicySet = decode(&of_kind(&store, "n1", Kind::PolicySet)[0]);
    assert_eq!(set.addresses, vec![u32::from(Ipv4Addr::new(10, 244, 0, 9))]);

    compiler.apply(Change::Namespace(namespace("tools", "c")));
    store.publish(compiler.flush(), Default::default());
    let set: pb::PolicySet = decode(&of_kind(&store, "n1", Kind::PolicySet)[0]);
    assert!(set.addresses.is_empty(), "tools no longer has team=b");
}

#[test]
fn deleting_the_policy_retracts_everything_it_sent() {
    let mut compiler = Compiler::new();
    let store = PlanStore::new();
    for c in base() {
        compiler.apply(c);
    }
    compiler.apply(Change::NetworkPolicy(allow_from("shop", "web", "web", "client")));
    store.publish(compiler.flush(), Default::default());
    compiler.apply(Change::NetworkPolicyDeleted(ObjectKey::new("shop", "web")));
    store.publish(compiler.flush(), Default::default());
    for kind in [Kind::PolicyTargets, Kind::NetworkPolicy, Kind::PolicySet] {
        assert!(of_kind(&store, "n1", kind).is_empty(), "{kind:?} left on n1");
    }
}

#[test]
fn policy_types_and_empty_peers_are_carried_as_the_api_means_them() {
    let deny_all = NetworkPolicy {
        key: ObjectKey::new("shop", "deny"),
        pod_selector: LabelSelector::default(),
        ingress: Some(vec![]),
        egress: Some(vec![PolicyRule {
            any_peer: true,
            peers: vec![],
            ports: vec![PolicyPort {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Name("http".into())),
                end_port: None,
            }],
        }]),
    };
    let mut changes = base();
    changes.push(Change::NetworkPolicy(deny_all));
    let store = store_of(changes);
    let policy: pb::NetworkPolicy = decode(&of_kind(&store, "n2", Kind::NetworkPolicy)[0]);
    assert!(policy.isolates_ingress && policy.isolates_egress && policy.ingress.is_empty());
    let rule = &policy.egress[0];
    assert!(rule.any_peer && rule.peer_sets.is_empty());
    assert_eq!(rule.ports[0].named_port, "http");
    // The named port resolves against every pod: the all-pods set is sent along.
    let sets = of_kind(&store, "n2", Kind::PolicySet);
    assert_eq!(sets.iter().map(|s| s.name.clone()).collect::<Vec<_>>(), vec![rule.all_pods_set.clone()]);
    let set: pb::PolicySet = decode(&sets[0]);
    assert_eq!(set.named_ports.len(), 3);
    let targets: pb::PolicyTargets = decode(&of_kind(&store, "n2", Kind::PolicyTargets)[0]);
    assert_eq!(targets.pods.len(), 2, "an empty podSelector selects every pod of the namespace");
}

// ---- property: incremental == full ----

fn arb_change() -> impl Strategy<Value = Change> {
    let ns = prop::sample::select(vec!["shop", "tools"]);
    let app_name = prop::sample::select(vec!["web", "client", "other"]);
    let pod_name = prop::sample::select(vec!["p1", "p2", "p3", "p4"]);
    let node_name = prop::sample::select(vec!["n1", "n2", "n3"]);
    prop_oneof![
        node_name.clone().prop_map(|n| Change::Node(node(n))),
        node_name.clone().prop_map(|n| Change::NodeDeleted(n.into())),
        (ns.clone(), prop::sample::select(vec!["a", "b"]))
            .prop_map(|(n, t)| Change::Namespace(namespace(n, t))),
        ns.clone().prop_map(|n| Change::NamespaceDeleted(n.into())),
        (ns.clone(), pod_name.clone(), node_name, prop::option::of(1u8..6), app_name.clone())
            .prop_map(|(ns, p, n, ip, a)| Change::Pod(pod(ns, p, n, ip, a))),
        (ns.clone(), pod_name).prop_map(|(ns, p)| Change::PodDeleted(ObjectKey::new(ns, p))),
        (
            ns.clone(),
            prop::sample::select(vec!["x", "y"]),
            app_name.clone(),
            app_name.clone(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(ns, name, target, from, by_team, egress)| {
                let mut p = allow_from(ns, name, target, from);
                if by_team && let Some(rules) = p.ingress.as_mut() {
                    rules[0].peers = vec![PolicyPeer::Pods(PeerSelector {
                        namespaces: NamespaceScope::Selected(LabelSelector::new(vec![Requirement::In(
                            "team".into(),
                            vec!["a".into()],
                        )])),
                        pods: app(from),
                    })];
                }
                if egress {
                    p.egress = p.ingress.clone();
                }
                Change::NetworkPolicy(p)
            }),
        (ns, prop::sample::select(vec!["x", "y"]))
            .prop_map(|(ns, name)| Change::NetworkPolicyDeleted(ObjectKey::new(ns, name))),
        (
            prop::sample::select(vec!["c1", "c2"]),
            any::<bool>(),
            app_name,
            prop::sample::select(vec!["a", "b"]),
            prop::sample::select(vec!["a", "b"]),
        )
            .prop_map(|(name, admin, target, of, from)| {
                let tier = if admin { Tier::Admin } else { Tier::Baseline };
                Change::ClusterNetworkPolicy(cluster_policy(name, tier, target, of, from, RuleAction::Deny))
            }),
        prop::sample::select(vec!["c1", "c2"]).prop_map(|n| Change::ClusterNetworkPolicyDeleted(n.into())),
    ]
}

#[test]
fn a_cluster_policy_goes_to_the_nodes_of_its_subjects_with_the_sets_its_rules_name() {
    let mut changes = base();
    changes.push(Change::ClusterNetworkPolicy(cluster_policy(
        "deny-b",
        Tier::Admin,
        "web",
        "a",
        "b",
        RuleAction::Pass,
    )));
    let store = store_of(changes.clone());
    let holders: Vec<&str> = ["n1", "n2"]
        .into_iter()
        .filter(|n| !of_kind(&store, n, Kind::ClusterNetworkPolicy).is_empty())
        .collect();
    let targets: Vec<pb::PolicyTargets> =
        ["n1", "n2"].iter().map(|n| decode(&of_kind(&store, n, Kind::PolicyTargets)[0])).collect();
    let subjects: Vec<(String, Vec<String>)> = targets
        .iter()
        .flat_map(|t| &t.pods)
        .filter(|p| !p.cluster_ingress_policies.is_empty())
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.cluster_ingress_policies.clone()))
        .collect();
    assert_eq!(holders, ["n1"], "only the node of shop/web-1 holds it");
    assert_eq!(subjects.len(), 1, "web pods of team a namespaces are its subjects: {targets:?}");
    assert!(subjects.iter().all(|(_, policies)| policies == &["deny-b".to_string()]));
    for node in &holders {
        let policy: pb::ClusterNetworkPolicy = decode(&of_kind(&store, node, Kind::ClusterNetworkPolicy)[0]);
        assert_eq!(policy.tier, pb::PolicyTier::Admin as i32);
        let rule = &policy.ingress[0];
        assert_eq!(rule.action, pb::PolicyAction::Pass as i32);
        let sets = &rule.r#match.as_ref().expect("match").peer_sets;
        let held: Vec<String> = of_kind(&store, node, Kind::PolicySet).into_iter().map(|r| r.name).collect();
        assert!(sets.iter().all(|s| held.contains(s)), "{sets:?} sent with the policy: {held:?}");
    }
    changes.push(Change::ClusterNetworkPolicyDeleted("deny-b".into()));
    let store = store_of(changes);
    assert!(["n1", "n2"].iter().all(|n| of_kind(&store, n, Kind::ClusterNetworkPolicy).is_empty()));
}

proptest! {
    #[test]
    fn incremental_policy_compilation_matches_a_full_compile(changes in prop::collection::vec(arb_change(), 1..40)) {
        let mut compiler = Compiler::new();
        let incremental = PlanStore::new();
        for change in changes.clone() {
            compiler.apply(change);
            incremental.publish(compiler.flush(), Default::default());
        }
        let full = store_of(changes);
        let nodes = ["n1", "n2", "n3"];
        prop_assert_eq!(plans(&incremental, &nodes), plans(&full, &nodes));
    }
}
