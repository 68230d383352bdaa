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
