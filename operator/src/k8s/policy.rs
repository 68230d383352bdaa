//! ProxyPolicy resolution: which policy applies to which Service. The oldest policy selecting a
//! Service wins (ties broken by name), so the outcome never depends on watch order; the others
//! are marked `Conflicted` for that Service.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Selector, SelectorExt};
use weft_api::v1alpha1::proxy_policy as pp;

use crate::plan::model::{Masquerade, ObjectKey, ProxyOverrides, TopologyMode};

#[derive(Debug, Clone)]
pub struct Policy {
    pub key: ObjectKey,
    /// (creation timestamp as RFC 3339, name): the precedence order.
    pub created: String,
    pub selector: Option<Selector>,
    pub overrides: ProxyOverrides,
}

impl Policy {
    pub fn from_object(policy: &pp::ProxyPolicy) -> Self {
        use kube::ResourceExt;
        let spec = &policy.spec;
        Policy {
            key: ObjectKey::new(policy.namespace().unwrap_or_default(), policy.name_any()),
            created: policy.creation_timestamp().map(|t| t.0.to_string()).unwrap_or_default(),
            // An invalid selector selects nothing (the API server's schema rejects most).
            selector: Selector::try_from(spec.selector.clone()).ok(),
            overrides: ProxyOverrides {
                affinity_timeout_seconds: spec
                    .session_affinity
                    .as_ref()
                    .filter(|a| a.mode == pp::AffinityMode::ClientIp)
                    .map(|a| a.timeout_seconds),
                topology: match spec.topology.as_ref().map(|t| t.mode) {
                    Some(pp::TopologyMode::PreferSameZone) => TopologyMode::PreferSameZone,
                    Some(pp::TopologyMode::PreferSameNode) => TopologyMode::PreferSameNode,
                    Some(pp::TopologyMode::None) | None => TopologyMode::None,
                },
                topology_min_endpoints: spec.topology.as_ref().map_or(1, |t| t.min_endpoints),
                masquerade: match spec.masquerade {
                    pp::MasqueradeMode::Auto => Masquerade::Auto,
                    pp::MasqueradeMode::Always => Masquerade::Always,
                    pp::MasqueradeMode::Never => Masquerade::Never,
                },
                allowed_source_cidrs: spec.allowed_source_cidrs.clone(),
            },
        }
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_some_and(|s| s.matches(labels))
    }
}

/// What a policy matched, for its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyMatch {
    /// Services this policy applies to.
    pub applied: BTreeSet<String>,
    /// Services it selects but an older policy wins.
    pub lost_to: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub struct PolicyIndex {
    policies: BTreeMap<ObjectKey, Policy>,
}

impl PolicyIndex {
    pub fn upsert(&mut self, policy: Policy) {
        self.policies.insert(policy.key.clone(), policy);
    }

    pub fn remove(&mut self, key: &ObjectKey) {
        self.policies.remove(key);
    }

    /// The winning policy for a Service with these labels, if any.
    pub fn resolve(&self, service: &ObjectKey, labels: &BTreeMap<String, String>) -> Option<&Policy> {
        self.candidates(service, labels).into_iter().next()
    }

    /// The policies selecting a Service, winner first.
    fn candidates(&self, service: &ObjectKey, labels: &BTreeMap<String, String>) -> Vec<&Policy> {
        let mut matching: Vec<&Policy> = self
            .policies
            .values()
            .filter(|p| p.key.namespace == service.namespace && p.selects(labels))
            .collect();
        matching.sort_by(|a, b| (&a.created, &a.key.name).cmp(&(&b.created, &b.key.name)));
        matching
    }

    /// Matches of every policy against the given Services (name → labels, per namespace key).
    pub fn matches<'a>(
        &self,
        services: impl IntoIterator<Item = (&'a ObjectKey, &'a BTreeMap<String, String>)>,
    ) -> BTreeMap<ObjectKey, PolicyMatch> {
        let mut out: BTreeMap<ObjectKey, PolicyMatch> =
            self.policies.keys().map(|k| (k.clone(), PolicyMatch::default())).collect();
        for (service, labels) in services {
            let mut candidates = self.candidates(service, labels).into_iter();
            let Some(winner) = candidates.next() else { continue };
            if let Some(m) = out.get_mut(&winner.key) {
                m.applied.insert(service.name.clone());
            }
            for loser in candidates {
                if let Some(m) = out.get_mut(&loser.key) {
                    m.lost_to.insert(service.name.clone(), winner.key.name.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn policy(name: &str, created: &str, app: &str) -> Policy {
        let selector = LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
            ..LabelSelector::default()
        };
        Policy {
            key: ObjectKey::new("ns", name),
            created: created.into(),
            selector: Selector::try_from(selector).ok(),
            overrides: ProxyOverrides::default(),
        }
    }

    #[test]
    fn the_oldest_policy_wins_and_the_other_is_conflicted() {
        let mut index = PolicyIndex::default();
        index.upsert(policy("young", "2026-02-01T00:00:00Z", "web"));
        index.upsert(policy("old", "2026-01-01T00:00:00Z", "web"));
        let svc = ObjectKey::new("ns", "web");
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert_eq!(index.resolve(&svc, &labels).map(|p| p.key.name.as_str()), Some("old"));
        let matches = index.matches([(&svc, &labels)]);
        assert_eq!(matches[&ObjectKey::new("ns", "old")].applied, BTreeSet::from(["web".to_string()]));
        assert_eq!(
            matches[&ObjectKey::new("ns", "young")].lost_to.get("web").map(String::as_str),
            Some("old")
        );
    }

    #[test]
    fn policies_only_select_services_in_their_namespace() {
        let mut index = PolicyIndex::default();
        index.upsert(policy("p", "2026-01-01T00:00:00Z", "web"));
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert!(index.resolve(&ObjectKey::new("other", "web"), &labels).is_none());
    }
}
