//! `networking.k8s.io/v1` NetworkPolicy → the compiler's model.

use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::convert::protocol;
use crate::plan::model::{
    LabelSelector, NamespaceScope, NetworkPolicy, ObjectKey, PeerSelector, PolicyPeer, PolicyPort,
    PolicyRule, PortRef, Requirement,
};

/// A selector the API server accepted; an operator it does not define selects nothing (the
/// API server rejects those, so this only guards against a newer API).
pub fn label_selector(selector: &meta::LabelSelector) -> LabelSelector {
    let mut requirements: Vec<Requirement> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        requirements.push(match e.operator.as_str() {
            "In" => Requirement::In(e.key.clone(), values),
            "NotIn" => Requirement::NotIn(e.key.clone(), values),
            "Exists" => Requirement::Exists(e.key.clone()),
            "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
            // Selects nothing: In with no values.
            _ => Requirement::In(e.key.clone(), Vec::new()),
        });
    }
    LabelSelector::new(requirements)
}

pub fn network_policy(policy: &networking::NetworkPolicy) -> NetworkPolicy {
    let namespace = policy.namespace().unwrap_or_default();
    let key = ObjectKey::new(&namespace, policy.name_any());
    let Some(spec) = policy.spec.as_ref() else {
        return NetworkPolicy {
            key,
            pod_selector: LabelSelector::default(),
            ingress: Some(Vec::new()),
            egress: None,
        };
    };
    let types = spec.policy_types.as_ref();
    // Without policyTypes: Ingress always, Egress when there are egress rules.
    let isolates = |t: &str, default: bool| types.map_or(default, |types| types.iter().any(|x| x == t));
    let ingress = isolates("Ingress", true).then(|| {
        spec.ingress
            .iter()
            .flatten()
            .map(|r| rule(&namespace, r.from.as_deref(), r.ports.as_deref()))
            .collect()
    });
    let egress = isolates("Egress", spec.egress.is_some()).then(|| {
        spec.egress.iter().flatten().map(|r| rule(&namespace, r.to.as_deref(), r.ports.as_deref())).collect()
    });
    NetworkPolicy {
        key,
        pod_selector: label_selector(spec.pod_selector.as_ref().unwrap_or(&Default::default())),
        ingress,
        egress,
    }
}

fn rule(
    namespace: &str,
    peers: Option<&[networking::NetworkPolicyPeer]>,
    ports: Option<&[networking::NetworkPolicyPort]>,
) -> PolicyRule {
    let peers = peers.unwrap_or_default();
    PolicyRule {
        any_peer: peers.is_empty(),
        peers: peers.iter().filter_map(|p| peer(namespace, p)).collect(),
        ports: ports.unwrap_or_default().iter().map(port).collect(),
    }
}

/// `None` for a peer that matches no IPv4 traffic (an IPv6 block, or an unparsable one).
fn peer(namespace: &str, peer: &networking::NetworkPolicyPeer) -> Option<PolicyPeer> {
    if let Some(block) = &peer.ip_block {
        let cidr = block.cidr.parse().ok()?;
        let except = block.except.iter().flatten().filter_map(|e| e.parse().ok()).collect();
        return Some(PolicyPeer::IpBlock { cidr, except });
    }
    let namespaces = match &peer.namespace_selector {
        Some(s) => NamespaceScope::Selected(label_selector(s)),
        None => NamespaceScope::Own(namespace.to_string()),
    };
    let pods = peer.pod_selector.as_ref().map(label_selector).unwrap_or_default();
    Some(PolicyPeer::Pods(PeerSelector { namespaces, pods }))
}

fn port(p: &networking::NetworkPolicyPort) -> PolicyPort {
    PolicyPort {
        protocol: protocol(p.protocol.as_deref()),
        port: p.port.as_ref().and_then(|port| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok().map(PortRef::Number),
            IntOrString::String(name) => Some(PortRef::Name(name.clone())),
        }),
        end_port: p.end_port.and_then(|e| u16::try_from(e).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::Protocol;

    fn policy(spec: serde_json::Value) -> NetworkPolicy {
        let object = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec,
        });
        network_policy(&serde_json::from_value(object).unwrap_or_default())
    }

    #[test]
    fn without_policy_types_ingress_always_isolates_and_egress_only_with_rules() {
        let p = policy(serde_json::json!({"podSelector": {}}));
        assert_eq!((p.ingress, p.egress), (Some(vec![]), None), "deny all ingress");
        let p = policy(serde_json::json!({"podSelector": {}, "egress": [{}]}));
        assert!(p.ingress.is_some() && p.egress.as_ref().is_some_and(|e| e[0].any_peer));
        let p = policy(serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]}));
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])), "deny all egress, ingress open");
    }

    #[test]
    fn peers_ports_and_selectors_keep_their_meaning() {
        let p = policy(serde_json::json!({
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]},
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"role": "client"}}},
                    {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                    {"ipBlock": {"cidr": "fd00::/64"}},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
                ],
                "ports": [{"port": "http"}, {"protocol": "UDP", "port": 53, "endPort": 60}, {"protocol": "SCTP"}]
            }, {"from": [{"ipBlock": {"cidr": "fd00::/64"}}]}]
        }));
        let labels =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(p.pod_selector.matches(&labels(&[("app", "web")])));
        assert!(!p.pod_selector.matches(&labels(&[("app", "db")])));
        let rules = p.ingress.unwrap_or_default();
        let rule = &rules[0];
        assert_eq!(rule.peers.len(), 3, "the IPv6 block matches no IPv4 traffic: left out");
        match &rule.peers[0] {
            PolicyPeer::Pods(s) => assert_eq!(s.namespaces, NamespaceScope::Own("shop".into())),
            other => panic!("{other:?}"),
        }
        match &rule.peers[1] {
            PolicyPeer::Pods(s) => assert!(
                matches!(s.namespaces, NamespaceScope::Selected(_)) && s.pods == LabelSelector::default()
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(rule.ports[0].port, Some(PortRef::Name("http".into())));
        assert_eq!((rule.ports[1].protocol, rule.ports[1].end_port), (Protocol::Udp, Some(60)));
        assert_eq!((rule.ports[2].protocol, rule.ports[2].port.clone()), (Protocol::Sctp, None));
        assert!(!rules[1].any_peer && rules[1].peers.is_empty(), "a rule of IPv6 peers only admits nothing");
    }
}
