//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (network-policy-api v0.2.0) → the
//! compiler's model.
//!
//! The CRD is upstream's (installed from its release manifests), so the type here only reads
//! what the compiler needs. Every field is optional to serde: an object this version does not
//! fully understand still converts (to a policy that matches less), instead of failing the list
//! of every ClusterNetworkPolicy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::network_policy::label_selector;
use crate::plan::model::{
    self, ClusterPolicyRule, LabelSelector, NamespaceScope, PeerSelector, PolicyPeer, PolicyPort, PolicyRule,
    PortRef, RuleAction, Tier,
};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterNetworkPolicySpec {
    pub tier: String,
    pub priority: i64,
    pub subject: Subject,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Subject {
    pub namespaces: Option<meta::LabelSelector>,
    pub pods: Option<NamespacedPods>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct NamespacedPods {
    pub namespace_selector: meta::LabelSelector,
    pub pod_selector: meta::LabelSelector,
}

/// An ingress rule (`from`) or an egress rule (`to`).
#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Rule {
    pub name: String,
    pub action: String,
    pub from: Vec<Peer>,
    pub to: Vec<Peer>,
    pub protocols: Vec<ProtocolPort>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Peer {
    pub namespaces: Option<meta::LabelSelector>,
    pub pods: Option<NamespacedPods>,
    /// Egress only: CIDRs.
    pub networks: Vec<String>,
    /// Egress only (experimental channel): not enforced yet, so such a peer matches nothing.
    pub nodes: Option<meta::LabelSelector>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ProtocolPort {
    pub tcp: Option<DestinationPort>,
    pub udp: Option<DestinationPort>,
    pub sctp: Option<DestinationPort>,
    pub destination_named_port: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationPort {
    pub destination_port: Option<Port>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Port {
    pub number: i64,
    pub range: Option<PortRange>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct PortRange {
    pub start: i64,
    pub end: i64,
}

fn namespaced(pods: &NamespacedPods) -> PeerSelector {
    PeerSelector {
        namespaces: NamespaceScope::Selected(label_selector(&pods.namespace_selector)),
        pods: label_selector(&pods.pod_selector),
    }
}

/// Pods of the selected namespaces, or the selected pods of the selected namespaces; `None`
/// when neither is set (selects nothing).
fn pods_of(namespaces: Option<&meta::LabelSelector>, pods: Option<&NamespacedPods>) -> Option<PeerSelector> {
    match (namespaces, pods) {
        (Some(ns), _) => Some(PeerSelector {
            namespaces: NamespaceScope::Selected(label_selector(ns)),
            pods: LabelSelector::default(),
        }),
        (None, Some(p)) => Some(namespaced(p)),
        (None, None) => None,
    }
}

fn peers(list: &[Peer]) -> Vec<PolicyPeer> {
    let mut out = Vec::new();
    for peer in list {
        if let Some(selector) = pods_of(peer.namespaces.as_ref(), peer.pods.as_ref()) {
            out.push(PolicyPeer::Pods(selector));
        }
        // IPv6 networks match no IPv4 traffic: left out.
        out.extend(
            peer.networks
                .iter()
                .filter_map(|n| n.parse().ok())
                .map(|cidr| PolicyPeer::IpBlock { cidr, except: Vec::new() }),
        );
    }
    out
}

fn port_of(p: Option<&Port>) -> (Option<PortRef>, Option<u16>) {
    let Some(p) = p else { return (None, None) };
    match &p.range {
        Some(r) => {
            let start = u16::try_from(r.start).ok();
            (start.map(PortRef::Number), u16::try_from(r.end).ok())
        }
        None => (u16::try_from(p.number).ok().filter(|n| *n > 0).map(PortRef::Number), None),
    }
}

fn ports(protocols: &[ProtocolPort]) -> Vec<PolicyPort> {
    let mut out = Vec::new();
    for p in protocols {
        for (protocol, dest) in
            [(model::Protocol::Tcp, &p.tcp), (model::Protocol::Udp, &p.udp), (model::Protocol::Sctp, &p.sctp)]
        {
            if let Some(dest) = dest {
                let (port, end_port) = port_of(dest.destination_port.as_ref());
                out.push(PolicyPort { protocol, port, end_port });
            }
        }
        if !p.destination_named_port.is_empty() {
            // The API names no protocol for a named port; TCP, as NetworkPolicy defaults to.
            out.push(PolicyPort {
                protocol: model::Protocol::Tcp,
                port: Some(PortRef::Name(p.destination_named_port.clone())),
                end_port: None,
            });
        }
    }
    out
}

fn rule(r: &Rule, peer_list: &[Peer]) -> ClusterPolicyRule {
    let action = match r.action.as_str() {
        "Accept" => RuleAction::Accept,
        "Pass" => RuleAction::Pass,
        // Deny, and anything this version does not know: never accept by mistake.
        _ => RuleAction::Deny,
    };
    ClusterPolicyRule {
        name: r.name.clone(),
        action,
        matches: PolicyRule { any_peer: false, peers: peers(peer_list), ports: ports(&r.protocols) },
    }
}

pub fn cluster_network_policy(policy: &ClusterNetworkPolicy) -> model::ClusterNetworkPolicy {
    let spec = &policy.spec;
    let subject = pods_of(spec.subject.namespaces.as_ref(), spec.subject.pods.as_ref()).unwrap_or(
        // No subject selects nothing: a namespace selector no namespace matches.
        PeerSelector {
            namespaces: NamespaceScope::Selected(LabelSelector::new(vec![model::Requirement::In(
                String::new(),
                Vec::new(),
            )])),
            pods: LabelSelector::default(),
        },
    );
    model::ClusterNetworkPolicy {
        name: policy.name_any(),
        tier: if spec.tier == "Baseline" { Tier::Baseline } else { Tier::Admin },
        priority: u32::try_from(spec.priority).unwrap_or(0),
        subject,
        ingress: spec.ingress.iter().map(|r| rule(r, &r.from)).collect(),
        egress: spec.egress.iter().map(|r| rule(r, &r.to)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn policy(spec: serde_json::Value) -> model::ClusterNetworkPolicy {
        let object = serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p"},
            "spec": spec,
        });
        let parsed: ClusterNetworkPolicy = serde_json::from_value(object).expect("a ClusterNetworkPolicy");
        cluster_network_policy(&parsed)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn tiers_actions_subjects_peers_and_ports_keep_their_meaning() {
        let p = policy(serde_json::json!({
            "tier": "Baseline",
            "priority": 20,
            "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                 "podSelector": {"matchLabels": {"app": "web"}}}},
            "ingress": [
                {"name": "from-b", "action": "Pass", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                               {"udp": {"destinationPort": {"range": {"start": 53, "end": 60}}}},
                               {"sctp": {}}]},
                {"action": "Something-newer", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}]}
            ],
            "egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8", "fd00::/64"]}, {"nodes": {}}]}]
        }));
        assert_eq!((p.tier, p.priority), (Tier::Baseline, 20));
        let NamespaceScope::Selected(ns) = &p.subject.namespaces else { panic!("{:?}", p.subject) };
        assert!(ns.matches(&labels(&[("team", "a")])) && p.subject.pods.matches(&labels(&[("app", "web")])));
        assert_eq!(p.ingress[0].action, RuleAction::Pass);
        assert_eq!(p.ingress[1].action, RuleAction::Deny, "an unknown action never accepts");
        let ports: Vec<_> =
            p.ingress[0].matches.ports.iter().map(|p| (p.protocol, p.port.clone(), p.end_port)).collect();
        assert_eq!(
            ports,
            [
                (model::Protocol::Tcp, Some(PortRef::Number(80)), None),
                (model::Protocol::Udp, Some(PortRef::Number(53)), Some(60)),
                (model::Protocol::Sctp, None, None),
            ]
        );
        assert_eq!(p.egress[0].action, RuleAction::Accept);
        assert_eq!(
            p.egress[0].matches.peers,
            [PolicyPeer::IpBlock { cidr: "10.0.0.0/8".parse().expect("cidr"), except: vec![] }],
            "IPv6 networks and node peers (not enforced yet) match nothing"
        );
        assert!(!p.egress[0].matches.any_peer);
    }

    #[test]
    fn a_namespaces_subject_selects_every_pod_of_those_namespaces_and_none_selects_nothing() {
        let p = policy(serde_json::json!({"tier": "Admin", "priority": 1,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}}}));
        assert_eq!(p.tier, Tier::Admin);
        assert_eq!(p.subject.pods, LabelSelector::default());
        let p = policy(serde_json::json!({"tier": "Admin", "priority": 1, "subject": {}}));
        let NamespaceScope::Selected(ns) = &p.subject.namespaces else { panic!("{:?}", p.subject) };
        assert!(!ns.matches(&labels(&[])) && !ns.matches(&labels(&[("team", "a")])));
    }
}
