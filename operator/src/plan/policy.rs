//! NetworkPolicy and ClusterNetworkPolicy compilation: each node receives the policies that
//! select its pods, the address sets their peers resolve to, and which of its pods each policy
//! applies to.
//!
//! ```text
//! PolicyTargets (per node)          pod → the policies isolating its ingress / egress, the
//!                                   cluster policies whose subject it is, its named ports
//! NetworkPolicy (shared)            rules: peers as set names and IP blocks, ports
//! ClusterNetworkPolicy (shared)     tier, priority, rules with their actions
//! PolicySet (shared)                one per distinct peer selector: the selected pods' addresses
//! ```
//!
//! Incremental: a pod change re-checks that pod against each peer selector (O(selectors)) and
//! recomputes its node's targets; a namespace label change re-checks that namespace's pods; a
//! policy change recomputes the policy, the sets it introduces and the targets of the nodes with
//! pods in its namespace; a cluster policy change (rare, and its subject spans namespaces)
//! recomputes every node's targets. While the cluster has any policy, every node holds its
//! PolicyTargets (possibly empty), which tells its agent to hold each new pod until its policies
//! are known.
//! Sets and policies are encoded once and shared by every node holding
//! them; a node receives only the resources whose version changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use weft_api::plan::{self as pb, Kind, Resource, ResourceKey};
use xxhash_rust::xxh3::xxh3_64;

use super::model::{
    Change, ClusterNetworkPolicy, ClusterPolicyRule, NamespaceScope, NetworkPolicy, Node, ObjectKey,
    PeerSelector, Pod, PolicyPeer, PolicyRule, PortRef, Protocol, RuleAction, Scope, Tier, Update,
};

/// The name of a node's PolicyTargets resource.
pub const TARGETS: &str = "policy";

#[derive(Debug)]
struct AddressSet {
    name: String,
    /// How many policy rules name it (it is dropped at 0).
    refs: usize,
    members: BTreeSet<ObjectKey>,
}

/// A node's PolicyTargets and the policies it names.
#[derive(Debug)]
struct NodeTargets {
    resource: Arc<Resource>,
    policies: BTreeSet<ObjectKey>,
    cluster_policies: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct PolicyState {
    namespaces: HashMap<String, BTreeMap<String, String>>,
    policies: BTreeMap<ObjectKey, NetworkPolicy>,
    cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    sets: HashMap<PeerSelector, AddressSet>,
    /// Pods by namespace: the ones a namespace label or policy change concerns.
    namespace_pods: HashMap<String, BTreeSet<ObjectKey>>,

    // Compiled, shared by the nodes that hold them.
    set_resources: HashMap<String, Arc<Resource>>,
    policy_resources: HashMap<ObjectKey, Arc<Resource>>,
    cluster_resources: HashMap<String, Arc<Resource>>,
    node_targets: HashMap<String, NodeTargets>,
    /// What each node holds (key → version).
    emitted: HashMap<String, BTreeMap<ResourceKey, u64>>,

    dirty_sets: BTreeSet<PeerSelector>,
    dirty_policies: BTreeSet<ObjectKey>,
    dirty_cluster_policies: BTreeSet<String>,
    dirty_nodes: BTreeSet<String>,
    /// A cluster policy changed: every node's targets are recomputed.
    all_nodes_dirty: bool,
    dirty_namespaces: BTreeSet<String>,
    /// Whether the cluster had a policy at the last flush.
    enforcing: bool,
}

/// The set resource's name for a selector: stable across replicas and restarts.
fn set_name(selector: &PeerSelector) -> String {
    format!("s-{:016x}", xxh3_64(describe(selector).as_bytes()))
}

fn describe(selector: &PeerSelector) -> String {
    match &selector.namespaces {
        NamespaceScope::Own(ns) => format!("pods {} in namespace {ns}", selector.pods),
        NamespaceScope::Selected(s) => format!("pods {} in namespaces {s}", selector.pods),
    }
}

/// The peer selectors a policy's rules name, with the all-pods set for egress named ports.
fn selectors(policy: &NetworkPolicy) -> Vec<PeerSelector> {
    let mut out = Vec::new();
    for rule in policy.ingress.iter().flatten() {
        out.extend(rule_selectors(rule, false));
    }
    for rule in policy.egress.iter().flatten() {
        out.extend(rule_selectors(rule, true));
    }
    out
}

/// The peer selectors a cluster policy's rules name.
fn cluster_selectors(policy: &ClusterNetworkPolicy) -> Vec<PeerSelector> {
    let ingress = policy.ingress.iter().flat_map(|r| rule_selectors(&r.matches, false));
    ingress.chain(policy.egress.iter().flat_map(|r| rule_selectors(&r.matches, true))).collect()
}

fn rule_selectors(rule: &PolicyRule, egress: bool) -> Vec<PeerSelector> {
    let mut out: Vec<PeerSelector> = rule
        .peers
        .iter()
        .filter_map(|p| match p {
            PolicyPeer::Pods(s) => Some(s.clone()),
            PolicyPeer::IpBlock { .. } => None,
        })
        .collect();
    if egress && rule.any_peer && has_named_port(rule) {
        out.push(PeerSelector::all_pods());
    }
    out
}

fn has_named_port(rule: &PolicyRule) -> bool {
    rule.ports.iter().any(|p| matches!(p.port, Some(PortRef::Name(_))))
}

impl PolicyState {
    /// Whether `pod` (with its namespace's labels) is one of the selector's pods.
    fn selects(&self, selector: &PeerSelector, pod: &Pod) -> bool {
        let in_scope = match &selector.namespaces {
            NamespaceScope::Own(ns) => *ns == pod.key.namespace,
            NamespaceScope::Selected(s) => {
                self.namespaces.get(&pod.key.namespace).is_some_and(|labels| s.matches(labels))
            }
        };
        in_scope && selector.pods.matches(&pod.labels)
    }

    fn has_policies(&self) -> bool {
        !self.policies.is_empty() || !self.cluster_policies.is_empty()
    }

    /// Records a change of a policy or namespace; pods come through [`Self::pod_changed`].
    pub fn apply(&mut self, change: Change, pods: &HashMap<ObjectKey, Pod>) {
        match change {
            Change::Namespace(ns) if self.namespaces.get(&ns.name) != Some(&ns.labels) => {
                self.namespaces.insert(ns.name.clone(), ns.labels);
                self.namespace_relabeled(&ns.name, pods);
            }
            Change::NamespaceDeleted(name) if self.namespaces.remove(&name).is_some() => {
                self.namespace_relabeled(&name, pods);
            }
            Change::NetworkPolicy(policy) if self.policies.get(&policy.key) != Some(&policy) => {
                let old = self.policies.insert(policy.key.clone(), policy.clone());
                self.policy_changed(old.as_ref(), Some(&policy), pods);
            }
            Change::NetworkPolicyDeleted(key) => {
                if let Some(old) = self.policies.remove(&key) {
                    self.policy_changed(Some(&old), None, pods);
                }
            }
            Change::ClusterNetworkPolicy(policy)
                if self.cluster_policies.get(&policy.name) != Some(&policy) =>
            {
                let old = self.cluster_policies.insert(policy.name.clone(), policy.clone());
                self.track_sets(old.as_ref().map(cluster_selectors), cluster_selectors(&policy), pods);
                self.dirty_cluster_policies.insert(policy.name);
                self.all_nodes_dirty = true;
            }
            Change::ClusterNetworkPolicyDeleted(name) => {
                if let Some(old) = self.cluster_policies.remove(&name) {
                    self.track_sets(Some(cluster_selectors(&old)), Vec::new(), pods);
                    self.dirty_cluster_policies.insert(name);
                    self.all_nodes_dirty = true;
                }
            }
            _ => {}
        }
    }

    fn namespace_relabeled(&mut self, namespace: &str, pods: &HashMap<ObjectKey, Pod>) {
        self.dirty_namespaces.insert(namespace.to_string());
        let keys: Vec<ObjectKey> =
            self.namespace_pods.get(namespace).into_iter().flatten().cloned().collect();
        let selectors: Vec<PeerSelector> = self
            .sets
            .keys()
            .filter(|s| matches!(s.namespaces, NamespaceScope::Selected(_)))
            .cloned()
            .collect();
        for selector in selectors {
            for key in &keys {
                let selected = pods.get(key).is_some_and(|p| self.selects(&selector, p));
                self.set_membership(&selector, key, selected);
            }
        }
    }

    fn set_membership(&mut self, selector: &PeerSelector, key: &ObjectKey, selected: bool) {
        let Some(set) = self.sets.get_mut(selector) else { return };
        let changed = if selected { set.members.insert(key.clone()) } else { set.members.remove(key) };
        if changed {
            self.dirty_sets.insert(selector.clone());
        }
    }

    fn policy_changed(
        &mut self,
        old: Option<&NetworkPolicy>,
        new: Option<&NetworkPolicy>,
        pods: &HashMap<ObjectKey, Pod>,
    ) {
        self.track_sets(old.map(selectors), new.map(selectors).unwrap_or_default(), pods);
        if let Some(key) = old.or(new).map(|p| p.key.clone()) {
            self.dirty_namespaces.insert(key.namespace.clone());
            self.dirty_policies.insert(key);
        }
    }

    /// Counts the sets a policy names now (`new`) instead of before (`old`): a new selector's set
    /// is filled from the pods, one no rule names any more is dropped at the next flush.
    fn track_sets(
        &mut self,
        old: Option<Vec<PeerSelector>>,
        new: Vec<PeerSelector>,
        pods: &HashMap<ObjectKey, Pod>,
    ) {
        for selector in new {
            if let Some(set) = self.sets.get_mut(&selector) {
                set.refs += 1;
                continue;
            }
            let members: BTreeSet<ObjectKey> =
                pods.values().filter(|p| self.selects(&selector, p)).map(|p| p.key.clone()).collect();
            self.sets.insert(selector.clone(), AddressSet { name: set_name(&selector), refs: 1, members });
            self.dirty_sets.insert(selector);
        }
        for selector in old.unwrap_or_default() {
            if let Some(set) = self.sets.get_mut(&selector) {
                set.refs -= 1;
                if set.refs == 0 {
                    self.dirty_sets.insert(selector);
                }
            }
        }
    }

    /// A pod appeared, changed or went (`new` is `None`); `old` is what the compiler held.
    pub fn pod_changed(&mut self, old: Option<&Pod>, new: Option<&Pod>) {
        let key = match old.or(new) {
            Some(p) => p.key.clone(),
            None => return,
        };
        if let Some(old) = old {
            self.dirty_nodes.insert(old.node.clone());
        }
        match new {
            Some(new) => {
                self.dirty_nodes.insert(new.node.clone());
                self.namespace_pods.entry(key.namespace.clone()).or_default().insert(key.clone());
            }
            None => {
                if let Some(set) = self.namespace_pods.get_mut(&key.namespace) {
                    set.remove(&key);
                }
            }
        }
        let selectors: Vec<PeerSelector> = self.sets.keys().cloned().collect();
        for selector in selectors {
            let was = old.is_some_and(|p| self.selects(&selector, p));
            let is = new.is_some_and(|p| self.selects(&selector, p));
            self.set_membership(&selector, &key, is);
            // A member whose address or named ports changed changes the set's content.
            if was && is && old.map(|p| (&p.ip, &p.named_ports)) != new.map(|p| (&p.ip, &p.named_ports)) {
                self.dirty_sets.insert(selector);
            }
        }
    }

    /// Compiles what is dirty and sends each node what it lacks.
    pub fn flush(
        &mut self,
        out: &mut Vec<Update>,
        nodes: &BTreeMap<String, Node>,
        pods: &HashMap<ObjectKey, Pod>,
        pods_by_node: &HashMap<String, BTreeSet<ObjectKey>>,
        nodes_changed: &BTreeSet<String>,
    ) {
        let mut changed: BTreeSet<ResourceKey> = BTreeSet::new();
        for selector in std::mem::take(&mut self.dirty_sets) {
            let Some(set) = self.sets.get(&selector) else { continue };
            let key = ResourceKey::new(Kind::PolicySet, set.name.clone());
            changed.insert(key);
            if set.refs == 0 {
                self.set_resources.remove(&set.name);
                self.sets.remove(&selector);
                continue;
            }
            let resource =
                Resource::encode(Kind::PolicySet, set.name.clone(), &set_payload(&selector, set, pods));
            self.set_resources.insert(set.name.clone(), Arc::new(resource));
        }
        for key in std::mem::take(&mut self.dirty_policies) {
            changed.insert(ResourceKey::new(Kind::NetworkPolicy, key.to_string()));
            match self.policies.get(&key) {
                Some(policy) => {
                    let payload = policy_payload(policy);
                    let resource = Resource::encode(Kind::NetworkPolicy, key.to_string(), &payload);
                    self.policy_resources.insert(key, Arc::new(resource));
                }
                None => {
                    self.policy_resources.remove(&key);
                }
            }
        }
        for name in std::mem::take(&mut self.dirty_cluster_policies) {
            changed.insert(ResourceKey::new(Kind::ClusterNetworkPolicy, name.clone()));
            match self.cluster_policies.get(&name) {
                Some(policy) => {
                    let payload = cluster_policy_payload(policy);
                    let resource = Resource::encode(Kind::ClusterNetworkPolicy, name.clone(), &payload);
                    self.cluster_resources.insert(name, Arc::new(resource));
                }
                None => {
                    self.cluster_resources.remove(&name);
                }
            }
        }
        // Nodes whose pods a namespace-wide change concerns; every node when the cluster gains
        // its first policy or loses its last.
        let mut dirty_nodes = std::mem::take(&mut self.dirty_nodes);
        dirty_nodes.extend(nodes_changed.iter().cloned());
        if self.enforcing != self.has_policies() || std::mem::take(&mut self.all_nodes_dirty) {
            self.enforcing = self.has_policies();
            dirty_nodes.extend(nodes.keys().cloned());
        }
        for ns in std::mem::take(&mut self.dirty_namespaces) {
            for key in self.namespace_pods.get(&ns).into_iter().flatten() {
                if let Some(pod) = pods.get(key) {
                    dirty_nodes.insert(pod.node.clone());
                }
            }
        }
        for name in &dirty_nodes {
            self.compile_targets(name, nodes, pods, pods_by_node);
        }
        // Every node that is dirty or holds a changed resource.
        let mut refresh = dirty_nodes;
        refresh.extend(
            self.emitted
                .iter()
                .filter(|(_, held)| changed.iter().any(|k| held.contains_key(k)))
                .map(|(n, _)| n.clone()),
        );
        for name in refresh {
            self.emit_node(out, &name);
        }
    }

    fn compile_targets(
        &mut self,
        name: &str,
        nodes: &BTreeMap<String, Node>,
        pods: &HashMap<ObjectKey, Pod>,
        pods_by_node: &HashMap<String, BTreeSet<ObjectKey>>,
    ) {
        if !nodes.contains_key(name) {
            self.node_targets.remove(name);
            return;
        }
        let mut named = BTreeSet::new();
        let mut cluster_named = BTreeSet::new();
        let mut targets = Vec::new();
        for pod in pods_by_node.get(name).into_iter().flatten().filter_map(|k| pods.get(k)) {
            let selecting = self
                .policies
                .range(ObjectKey::new(&pod.key.namespace, "")..)
                .take_while(|(k, _)| k.namespace == pod.key.namespace)
                .filter(|(_, p)| p.pod_selector.matches(&pod.labels))
                .map(|(_, p)| p);
            let (mut ingress, mut egress) = (Vec::new(), Vec::new());
            for policy in selecting {
                named.insert(policy.key.clone());
                if policy.ingress.is_some() {
                    ingress.push(policy.key.to_string());
                }
                if policy.egress.is_some() {
                    egress.push(policy.key.to_string());
                }
            }
            let (mut cluster_ingress, mut cluster_egress) = (Vec::new(), Vec::new());
            for policy in self.cluster_policies.values().filter(|p| self.selects(&p.subject, pod)) {
                cluster_named.insert(policy.name.clone());
                if !policy.ingress.is_empty() {
                    cluster_ingress.push(policy.name.clone());
                }
                if !policy.egress.is_empty() {
                    cluster_egress.push(policy.name.clone());
                }
            }
            if [&ingress, &egress, &cluster_ingress, &cluster_egress].iter().all(|l| l.is_empty()) {
                continue;
            }
            targets.push(pb::PolicyTarget {
                namespace: pod.key.namespace.clone(),
                name: pod.key.name.clone(),
                address: pod.ip.map(u32::from).unwrap_or_default(),
                ingress_policies: ingress,
                egress_policies: egress,
                ports: pod.named_ports.iter().map(named_port).collect(),
                cluster_ingress_policies: cluster_ingress,
                cluster_egress_policies: cluster_egress,
            });
        }
        // While the cluster has policies every node holds its targets, even none: the agent then
        // knows to hold a new pod's ADD until the plan knows the pod (see the agent's policy).
        if !self.has_policies() {
            self.node_targets.remove(name);
            return;
        }
        targets.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let resource = Resource::encode(Kind::PolicyTargets, TARGETS, &pb::PolicyTargets { pods: targets });
        self.node_targets.insert(
            name.to_string(),
            NodeTargets { resource: Arc::new(resource), policies: named, cluster_policies: cluster_named },
        );
    }

    /// Sends the node what its targets need and retracts what they no longer do.
    fn emit_node(&mut self, out: &mut Vec<Update>, name: &str) {
        let mut desired: BTreeMap<ResourceKey, Arc<Resource>> = BTreeMap::new();
        if let Some(targets) = self.node_targets.get(name) {
            desired.insert(targets.resource.key(), targets.resource.clone());
            let mut named_sets = Vec::new();
            for key in &targets.policies {
                let (Some(resource), Some(policy)) = (self.policy_resources.get(key), self.policies.get(key))
                else {
                    continue;
                };
                desired.insert(resource.key(), resource.clone());
                named_sets.extend(selectors(policy));
            }
            for name in &targets.cluster_policies {
                let (Some(resource), Some(policy)) =
                    (self.cluster_resources.get(name), self.cluster_policies.get(name))
                else {
                    continue;
                };
                desired.insert(resource.key(), resource.clone());
                named_sets.extend(cluster_selectors(policy));
            }
            for selector in named_sets {
                if let Some(set) = self.sets.get(&selector).and_then(|s| self.set_resources.get(&s.name)) {
                    desired.insert(set.key(), set.clone());
                }
            }
        }
        let held = self.emitted.entry(name.to_string()).or_default();
        let scope = Scope::Node(name.to_string());
        let gone: Vec<ResourceKey> = held.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
        for key in gone {
            held.remove(&key);
            out.push(Update { scope: scope.clone(), key, resource: None });
        }
        for (key, resource) in desired {
            if held.insert(key.clone(), resource.version) != Some(resource.version) {
                out.push(Update { scope: scope.clone(), key, resource: Some(resource) });
            }
        }
        if held.is_empty() {
            self.emitted.remove(name);
        }
    }
}

fn protocol(p: Protocol) -> i32 {
    let p = match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    };
    p as i32
}

fn named_port(p: &super::model::NamedPort) -> pb::NamedPort {
    pb::NamedPort { name: p.name.clone(), protocol: protocol(p.protocol), port: u32::from(p.port) }
}

fn set_payload(selector: &PeerSelector, set: &AddressSet, pods: &HashMap<ObjectKey, Pod>) -> pb::PolicySet {
    let members: Vec<&Pod> = set.members.iter().filter_map(|k| pods.get(k)).collect();
    let mut addresses: Vec<u32> = members.iter().filter_map(|p| p.ip).map(u32::from).collect();
    addresses.sort_unstable();
    addresses.dedup();
    let mut named_ports: Vec<pb::NamedPortAddress> = members
        .iter()
        .filter_map(|p| Some((p.ip?, p)))
        .flat_map(|(ip, p)| {
            p.named_ports.iter().map(move |port| pb::NamedPortAddress {
                address: u32::from(ip),
                port: Some(named_port(port)),
            })
        })
        .collect();
    named_ports.sort_by_key(|n| (n.address, n.port.as_ref().map(|p| (p.name.clone(), p.protocol, p.port))));
    pb::PolicySet { selector: describe(selector), addresses, named_ports }
}

fn policy_payload(policy: &NetworkPolicy) -> pb::NetworkPolicy {
    let rules = |rules: &Option<Vec<PolicyRule>>, egress: bool| -> Vec<pb::PolicyRule> {
        rules.iter().flatten().map(|r| rule_payload(r, egress)).collect()
    };
    pb::NetworkPolicy {
        namespace: policy.key.namespace.clone(),
        name: policy.key.name.clone(),
        isolates_ingress: policy.ingress.is_some(),
        isolates_egress: policy.egress.is_some(),
        ingress: rules(&policy.ingress, false),
        egress: rules(&policy.egress, true),
    }
}

fn cluster_policy_payload(policy: &ClusterNetworkPolicy) -> pb::ClusterNetworkPolicy {
    let rules = |rules: &[ClusterPolicyRule], egress: bool| -> Vec<pb::ClusterPolicyRule> {
        rules
            .iter()
            .map(|r| pb::ClusterPolicyRule {
                name: r.name.clone(),
                action: match r.action {
                    RuleAction::Accept => pb::PolicyAction::Accept,
                    RuleAction::Deny => pb::PolicyAction::Deny,
                    RuleAction::Pass => pb::PolicyAction::Pass,
                } as i32,
                r#match: Some(rule_payload(&r.matches, egress)),
            })
            .collect()
    };
    pb::ClusterNetworkPolicy {
        name: policy.name.clone(),
        tier: match policy.tier {
            Tier::Admin => pb::PolicyTier::Admin,
            Tier::Baseline => pb::PolicyTier::Baseline,
        } as i32,
        priority: policy.priority,
        ingress: rules(&policy.ingress, false),
        egress: rules(&policy.egress, true),
    }
}

fn cidr(net: &ipnet::Ipv4Net) -> pb::Cidr {
    pb::Cidr { address: u32::from(net.network()), prefix_len: u32::from(net.prefix_len()) }
}

fn rule_payload(rule: &PolicyRule, egress: bool) -> pb::PolicyRule {
    let mut peer_sets = Vec::new();
    let mut ip_blocks = Vec::new();
    for peer in &rule.peers {
        match peer {
            PolicyPeer::Pods(s) => peer_sets.push(set_name(s)),
            PolicyPeer::IpBlock { cidr: net, except } => ip_blocks
                .push(pb::IpBlock { cidr: Some(cidr(net)), except: except.iter().map(cidr).collect() }),
        }
    }
    peer_sets.sort();
    peer_sets.dedup();
    let all_pods_set = if egress && rule.any_peer && has_named_port(rule) {
        set_name(&PeerSelector::all_pods())
    } else {
        String::new()
    };
    pb::PolicyRule {
        any_peer: rule.any_peer,
        peer_sets,
        ip_blocks,
        ports: rule
            .ports
            .iter()
            .map(|p| {
                let (port, named_port) = match &p.port {
                    None => (0, String::new()),
                    Some(PortRef::Number(n)) => (u32::from(*n), String::new()),
                    Some(PortRef::Name(n)) => (0, n.clone()),
                };
                pb::PolicyPort {
                    protocol: protocol(p.protocol),
                    port,
                    end_port: p.end_port.map(u32::from).unwrap_or(0),
                    named_port,
                }
            })
            .collect(),
        all_pods_set,
    }
}
