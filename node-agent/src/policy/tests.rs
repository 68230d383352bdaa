use std::net::Ipv4Addr;

use weft_api::plan as pb;

use super::apply::script;
use super::render::{LocalPod, PolicyPlan, render};

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("address"))
}

fn cidr(s: &str) -> pb::Cidr {
    let (a, len) = s.split_once('/').expect("cidr");
    pb::Cidr { address: ip(a), prefix_len: len.parse().expect("prefix") }
}

fn tcp(port: u32) -> pb::PolicyPort {
    pb::PolicyPort { protocol: pb::Protocol::Tcp as i32, port, ..Default::default() }
}

fn named(name: &str) -> pb::PolicyPort {
    pb::PolicyPort { protocol: pb::Protocol::Tcp as i32, named_port: name.into(), ..Default::default() }
}

const CLIENTS: &str = "s-00000000000000c1";

/// shop/web isolates web-1 (ingress): from the clients set on TCP 80 and the http named port,
/// and from 192.168.0.0/16 except 192.168.1.0/24 on every port.
fn plan() -> PolicyPlan {
    let policy = pb::NetworkPolicy {
        namespace: "shop".into(),
        name: "web".into(),
        isolates_ingress: true,
        ingress: vec![
            pb::PolicyRule {
                peer_sets: vec![CLIENTS.into()],
                ports: vec![tcp(80), named("http")],
                ..Default::default()
            },
            pb::PolicyRule {
                ip_blocks: vec![pb::IpBlock {
                    cidr: Some(cidr("192.168.0.0/16")),
                    except: vec![cidr("192.168.1.0/24")],
                }],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let mut plan = PolicyPlan { enforcing: true, ..Default::default() };
    plan.policies.insert("shop/web".into(), policy);
    plan.sets.insert(
        CLIENTS.into(),
        pb::PolicySet {
            selector: "pods app=client in namespace shop".into(),
            addresses: vec![ip("10.244.2.2")],
            ..Default::default()
        },
    );
    plan.targets.push(pb::PolicyTarget {
        namespace: "shop".into(),
        name: "web-1".into(),
        address: ip("10.244.1.2"),
        ingress_policies: vec!["shop/web".into()],
        ports: vec![pb::NamedPort { name: "http".into(), protocol: pb::Protocol::Tcp as i32, port: 8080 }],
        ..Default::default()
    });
    for (name, uid) in [("web-1", "u1"), ("client-1", "u2")] {
        plan.known.insert(("shop".into(), name.into()));
        plan.known_uids.insert(uid.into());
    }
    plan
}

#[test]
fn a_policy_becomes_one_chain_of_peer_and_port_rules_and_a_pod_chain_ending_in_drop() {
    insta::assert_snapshot!(script(None, &render(&plan(), &[])));
}

#[test]
fn ip_blocks_lose_their_exceptions_and_merge() {
    let desired = render(&plan(), &[]);
    let blocks = desired.sets.iter().find(|(n, _)| n.starts_with("b-")).map(|(_, s)| &s.elements);
    let want: std::collections::BTreeSet<String> =
        ["192.168.0.0-192.168.0.255", "192.168.2.0-192.168.255.255"].map(String::from).into();
    assert_eq!(blocks, Some(&want));
}

#[test]
fn the_ipam_address_wins_and_an_unknown_local_pod_is_quarantined() {
    let local = [
        LocalPod {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "u1".into(),
            address: "10.244.1.9".parse().expect("ip"),
        },
        LocalPod {
            namespace: "shop".into(),
            name: "new".into(),
            uid: "u3".into(),
            address: "10.244.1.10".parse().expect("ip"),
        },
    ];
    let desired = render(&plan(), &local);
    assert_eq!(desired.ingress.keys().map(ToString::to_string).collect::<Vec<_>>(), vec!["10.244.1.9"]);
    assert_eq!(desired.quarantine.iter().map(ToString::to_string).collect::<Vec<_>>(), vec!["10.244.1.10"]);
    // Without any policy in the cluster nothing is quarantined.
    let calm = PolicyPlan { enforcing: false, ..PolicyPlan::default() };
    assert!(render(&calm, &local).quarantine.is_empty());
}

#[test]
fn a_one_address_change_writes_one_element_pair_and_no_change_writes_nothing() {
    let old = render(&plan(), &[]);
    let mut next = plan();
    next.sets.get_mut(CLIENTS).expect("set").addresses.push(ip("10.244.3.2"));
    let new = render(&next, &[]);
    insta::assert_snapshot!(script(Some(&old), &new), @"add element ip weft-policy s-00000000000000c1 { 10.244.3.2 }");
    assert_eq!(script(Some(&new), &new), "");
}

#[test]
fn removing_the_last_policy_empties_the_chains_before_deleting_them() {
    let old = render(&plan(), &[]);
    let mut none = plan();
    none.policies.clear();
    none.targets.clear();
    let text = script(Some(&old), &render(&none, &[]));
    let flush = text.find("flush chain").expect("flush");
    let delete = text.find("delete chain").expect("delete");
    let sets = text.find("delete set").expect("delete set");
    assert!(text.starts_with("delete element ip weft-policy ingress-pods"), "{text}");
    assert!(flush < delete && delete < sets, "{text}");
}

#[test]
fn set_names_that_are_not_the_operators_never_reach_the_ruleset() {
    let mut p = plan();
    let evil = "s-x; flush ruleset".to_string();
    p.policies.get_mut("shop/web").expect("policy").ingress[0].peer_sets = vec![evil.clone()];
    p.sets.insert(evil, pb::PolicySet::default());
    let text = script(None, &render(&p, &[]));
    assert!(!text.contains("flush ruleset"), "{text}");
}

fn cluster_rule(action: pb::PolicyAction, rule: pb::PolicyRule) -> pb::ClusterPolicyRule {
    pb::ClusterPolicyRule { name: String::new(), action: action as i32, r#match: Some(rule) }
}

fn from_block(block: &str) -> pb::PolicyRule {
    pb::PolicyRule {
        ip_blocks: vec![pb::IpBlock { cidr: Some(cidr(block)), except: vec![] }],
        ..Default::default()
    }
}

/// web-1 (isolated by shop/web) and web-2 (no NetworkPolicy) are subjects of two Admin policies
/// and one Baseline policy.
fn tiered_plan() -> PolicyPlan {
    let mut plan = plan();
    let admin = |name: &str, priority, rules| pb::ClusterNetworkPolicy {
        name: name.into(),
        tier: pb::PolicyTier::Admin as i32,
        priority,
        ingress: rules,
        egress: vec![],
    };
    // Listed out of order: priority decides, then the name.
    plan.cluster_policies.insert(
        "z-deny".into(),
        admin("z-deny", 10, vec![cluster_rule(pb::PolicyAction::Deny, from_block("192.168.0.0/16"))]),
    );
    plan.cluster_policies.insert(
        "a-pass".into(),
        admin("a-pass", 10, vec![cluster_rule(pb::PolicyAction::Pass, from_block("192.168.7.0/24"))]),
    );
    plan.cluster_policies.insert(
        "first".into(),
        admin("first", 1, vec![cluster_rule(pb::PolicyAction::Accept, from_block("192.168.8.8/32"))]),
    );
    plan.cluster_policies.insert(
        "baseline".into(),
        pb::ClusterNetworkPolicy {
            name: "baseline".into(),
            tier: pb::PolicyTier::Baseline as i32,
            priority: 0,
            ingress: vec![cluster_rule(pb::PolicyAction::Deny, from_block("10.0.0.0/8"))],
            egress: vec![],
        },
    );
    let every = ["z-deny", "a-pass", "first", "baseline"].map(String::from).to_vec();
    plan.targets[0].cluster_ingress_policies = every.clone();
    plan.targets.push(pb::PolicyTarget {
        namespace: "shop".into(),
        name: "web-2".into(),
        address: ip("10.244.1.3"),
        cluster_ingress_policies: every,
        ..Default::default()
    });
    plan.known.insert(("shop".into(), "web-2".into()));
    plan
}

#[test]
fn cluster_policies_go_admin_by_priority_then_network_policy_then_baseline_only_for_pods_it_leaves_open() {
    let desired = render(&tiered_plan(), &[]);
    let chain_of = |address: &str| {
        let name = &desired.ingress[&address.parse::<Ipv4Addr>().expect("address")];
        (name.clone(), desired.chains[name].clone())
    };
    let (_, isolated) = chain_of("10.244.1.2");
    assert_eq!(isolated.len(), 3, "{isolated:?}");
    assert!(isolated[0].starts_with("jump adm-in-"), "Admin first: {isolated:?}");
    assert!(isolated[1].starts_with("jump in-"), "then the NetworkPolicy: {isolated:?}");
    assert_eq!(
        isolated[2], "counter drop",
        "what the NetworkPolicy does not allow is dropped, Baseline not asked"
    );
    let admin = &desired.chains[isolated[0].trim_start_matches("jump ")];
    let verdicts: Vec<&str> = admin.iter().map(|l| l.rsplit(' ').next().unwrap_or_default()).collect();
    assert_eq!(
        verdicts,
        ["accept", "return", "drop"],
        "priority 1, then a-pass and z-deny by name: {admin:?}"
    );
    assert!(admin[0].contains("ip saddr @b-") && admin[2].ends_with("counter drop"), "{admin:?}");

    let (_, open) = chain_of("10.244.1.3");
    assert_eq!(open.len(), 2, "{open:?}");
    assert_eq!(open[0], isolated[0], "the same Admin policies share one chain");
    assert!(open[1].starts_with("jump base-in-"), "no NetworkPolicy isolates web-2: Baseline decides");
    let baseline = &desired.chains[open[1].trim_start_matches("jump ")];
    assert_eq!(baseline.len(), 1);
    assert!(baseline[0].ends_with("counter drop"), "{baseline:?}");

    // Without the cluster policies again, their chains and sets go.
    let script = script(Some(&desired), &render(&plan(), &[]));
    for gone in [
        "delete chain ip weft-policy adm-in-",
        "delete chain ip weft-policy base-in-",
        "delete set ip weft-policy b-",
    ] {
        assert!(script.contains(gone), "{gone} missing from:\n{script}");
    }
}
