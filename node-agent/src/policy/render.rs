//! The pure part: the node's policy plan and its pods' addresses in, the nftables objects that
//! enforce it out.
//!
//! ```text
//! forward hook, priority -1 (egress):   established → accept; @quarantine → drop; ip saddr vmap @egress-pods
//! forward hook, priority +1 (ingress):  established → accept; @quarantine → drop; ip daddr vmap @ingress-pods
//! pod-in-<h> / pod-out-<h>:  jump adm-*; then jump each isolating policy's chain, counter drop;
//!                            or, when no NetworkPolicy isolates the pod, jump base-*
//! in-<h> / out-<h>:          one rule per (peer, port) of the policy's rules → accept
//! adm-* / base-*:            the pod's ClusterNetworkPolicies of one tier, in order, one rule per
//!                            (peer, port) of each rule → accept, drop or (Pass) return
//! ```
//!
//! The tiers follow network-policy-api: Admin first (Accept and Deny are final, Pass hands over),
//! then NetworkPolicy, then Baseline for pods no NetworkPolicy isolates, then accept.
//!
//! Both hooks sit after the proxy's DNAT (prerouting), so a pod reached through a ClusterIP or a
//! NodePort is judged by its own address, as the NetworkPolicy API requires. Traffic from the
//! node itself (kubelet probes) takes the output hook and is never judged. Pods selected by the
//! same policies share one `pod-*` chain. Chain and set names are hashes, so no user string
//! reaches the ruleset.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use weft_api::plan as pb;
use xxhash_rust::xxh3::xxh3_64;

/// An nftables set's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetType {
    /// Pod addresses.
    Address,
    /// Address ranges (ipBlocks with their exceptions taken out).
    Interval,
    /// `address . protocol . port` (named ports).
    AddressPort,
}

impl SetType {
    pub fn declaration(self) -> &'static str {
        match self {
            SetType::Address => "type ipv4_addr;",
            SetType::Interval => "type ipv4_addr; flags interval;",
            SetType::AddressPort => "type ipv4_addr . inet_proto . inet_service;",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSet {
    pub kind: SetType,
    pub elements: BTreeSet<String>,
}

/// Everything the policy table holds besides its fixed base chains and maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub sets: BTreeMap<String, NftSet>,
    pub chains: BTreeMap<String, Vec<String>>,
    /// Pod address → its `pod-in-*` chain.
    pub ingress: BTreeMap<Ipv4Addr, String>,
    /// Pod address → its `pod-out-*` chain.
    pub egress: BTreeMap<Ipv4Addr, String>,
    /// Pods the plan does not know yet: nothing in or out until it does.
    pub quarantine: BTreeSet<Ipv4Addr>,
}

impl Desired {
    /// How many pods are isolated in at least one direction.
    pub fn isolated_pods(&self) -> usize {
        self.ingress.keys().chain(self.egress.keys()).collect::<BTreeSet<_>>().len()
    }
}

/// The node's part of the plan that policy enforcement reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyPlan {
    /// The plan holds PolicyTargets: the cluster has policies, so new pods wait to be known.
    pub enforcing: bool,
    pub policies: BTreeMap<String, pb::NetworkPolicy>,
    pub cluster_policies: BTreeMap<String, pb::ClusterNetworkPolicy>,
    pub sets: BTreeMap<String, pb::PolicySet>,
    pub targets: Vec<pb::PolicyTarget>,
    /// The pods bound to this node, as the operator knows them (NodePods).
    pub known: BTreeSet<(String, String)>,
    pub known_uids: BTreeSet<String>,
}

/// A pod of this node and its addresses, from the node's IPAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub address: Ipv4Addr,
}

impl PolicyPlan {
    /// Whether the plan reflects this pod (so its policies, if any, are in it).
    pub fn knows(&self, namespace: &str, name: &str, uid: &str) -> bool {
        if uid.is_empty() {
            self.known.contains(&(namespace.to_string(), name.to_string()))
        } else {
            self.known_uids.contains(uid)
        }
    }
}

fn hash(parts: &[&str]) -> String {
    format!("{:016x}", xxh3_64(parts.join("\u{0}").as_bytes()))
}

fn proto(p: i32) -> &'static str {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Udp) => "udp",
        Ok(pb::Protocol::Sctp) => "sctp",
        _ => "tcp",
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn tag(self) -> &'static str {
        match self {
            Direction::Ingress => "in",
            Direction::Egress => "out",
        }
    }

    /// The address of the peer the rule is about.
    fn peer(self) -> &'static str {
        match self {
            Direction::Ingress => "ip saddr",
            Direction::Egress => "ip daddr",
        }
    }
}

/// The ranges `cidr` minus `except`, merged with the others of the rule, as nft elements.
fn ranges(blocks: &[pb::IpBlock]) -> BTreeSet<String> {
    let span = |c: &pb::Cidr| -> Option<(u32, u32)> {
        let len = c.prefix_len.min(32);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let start = c.address & mask;
        Some((start, start | !mask))
    };
    let mut all: Vec<(u32, u32)> = Vec::new();
    for block in blocks {
        let Some(whole) = block.cidr.as_ref().and_then(span) else { continue };
        let mut pieces = vec![whole];
        for hole in block.except.iter().filter_map(span) {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    let mut out = Vec::new();
                    if hole.1 < s || hole.0 > e {
                        out.push((s, e));
                    } else {
                        if hole.0 > s {
                            out.push((s, hole.0 - 1));
                        }
                        if hole.1 < e {
                            out.push((hole.1 + 1, e));
                        }
                    }
                    out
                })
                .collect();
        }
        all.extend(pieces);
    }
    all.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (s, e) in all {
        match merged.last_mut() {
            Some(last) if u64::from(s) <= u64::from(last.1) + 1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
        .into_iter()
        .map(|(s, e)| {
            if s == e {
                Ipv4Addr::from(s).to_string()
            } else {
                format!("{}-{}", Ipv4Addr::from(s), Ipv4Addr::from(e))
            }
        })
        .collect()
}

/// Whether a set name from the plan is one the operator makes (`s-` and 16 hex digits): only
/// those reach the ruleset.
fn valid_set_name(name: &str) -> bool {
    name.len() == 18 && name.starts_with("s-") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The port conditions of a rule's numeric ports; `None` in the list: every port.
fn numeric_ports(rule: &pb::PolicyRule) -> Vec<Option<String>> {
    if rule.ports.is_empty() {
        return vec![None];
    }
    rule.ports
        .iter()
        .filter(|p| p.named_port.is_empty())
        .map(|p| {
            let name = proto(p.protocol);
            Some(match (p.port, p.end_port) {
                (0, _) => format!("meta l4proto {name}"),
                (port, end) if end > port => format!("{name} dport {port}-{end}"),
                (port, _) => format!("{name} dport {port}"),
            })
        })
        .collect()
}

/// The local pods a policy selects in one direction (true: ingress): address, named ports.
type Selected<'a> = HashMap<(&'a str, bool), Vec<(Ipv4Addr, &'a [pb::NamedPort])>>;

struct Renderer<'a> {
    plan: &'a PolicyPlan,
    out: Desired,
    /// Per policy: the local pods it selects (address, named ports), per direction.
    selected: Selected<'a>,
}

impl<'a> Renderer<'a> {
    fn set(&mut self, name: String, kind: SetType, elements: BTreeSet<String>) -> String {
        self.out.sets.insert(name.clone(), NftSet { kind, elements });
        name
    }

    /// The policy's chain for one direction.
    fn policy_chain(&mut self, key: &str, policy: &pb::NetworkPolicy, dir: Direction) -> String {
        let chain = format!("{}-{}", dir.tag(), hash(&[key]));
        if self.out.chains.contains_key(&chain) {
            return chain;
        }
        let rules = match dir {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        let mut lines = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            lines.extend(self.rule_lines(key, i, rule, dir, "accept"));
        }
        lines.dedup();
        self.out.chains.insert(chain.clone(), lines);
        chain
    }

    /// The lines that give `verdict` to the traffic one rule (the `index`th of policy `key`)
    /// matches: one per (peer, port).
    fn rule_lines(
        &mut self,
        key: &str,
        index: usize,
        rule: &pb::PolicyRule,
        dir: Direction,
        verdict: &str,
    ) -> Vec<String> {
        let index = index.to_string();
        let mut lines = Vec::new();
        let mut peers: Vec<Option<String>> = Vec::new();
        if rule.any_peer {
            peers.push(None);
        }
        for set in &rule.peer_sets {
            if valid_set_name(set) && self.plan.sets.contains_key(set) {
                self.ensure_peer_set(set);
                peers.push(Some(format!("{} @{set}", dir.peer())));
            }
        }
        if !rule.ip_blocks.is_empty() {
            let name = format!("b-{}", hash(&[key, dir.tag(), &index]));
            let set = self.set(name, SetType::Interval, ranges(&rule.ip_blocks));
            peers.push(Some(format!("{} @{set}", dir.peer())));
        }
        for peer in &peers {
            for port in numeric_ports(rule) {
                let cond: Vec<&str> = [peer.as_deref(), port.as_deref()].into_iter().flatten().collect();
                lines.push(format!("{} {verdict}", cond.join(" ")).trim_start().to_string());
            }
        }
        for port in rule.ports.iter().filter(|p| !p.named_port.is_empty()) {
            let elements = self.named_port_elements(key, rule, port, dir);
            if elements.is_empty() {
                continue;
            }
            let name =
                format!("n-{}", hash(&[key, dir.tag(), &index, &port.named_port, proto(port.protocol)]));
            let set = self.set(name, SetType::AddressPort, elements);
            // Either way the named port is the destination's.
            let tuple = format!("ip daddr . meta l4proto . th dport @{set}");
            match dir {
                // The named port is the selected pod's: any peer of the rule, to it.
                Direction::Ingress => {
                    for peer in &peers {
                        let cond: Vec<&str> =
                            [peer.as_deref(), Some(tuple.as_str())].into_iter().flatten().collect();
                        lines.push(format!("{} {verdict}", cond.join(" ")));
                    }
                }
                // The named port is the peer pod's: the set holds only peer pods.
                Direction::Egress => lines.push(format!("{tuple} {verdict}")),
            }
        }
        lines
    }

    /// The chain of one tier's cluster policies for the pods that are subjects of exactly
    /// `names` (of that tier), in the tier's order: priority, then name.
    fn tier_chain(&mut self, tag: &str, names: &[&'a str], dir: Direction) -> String {
        let chain = format!("{tag}-{}-{}", dir.tag(), hash(names));
        if self.out.chains.contains_key(&chain) {
            return chain;
        }
        let mut lines = Vec::new();
        for name in names {
            let Some(policy) = self.plan.cluster_policies.get(*name) else { continue };
            let rules = match dir {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            for (i, rule) in rules.iter().enumerate() {
                let verdict = match pb::PolicyAction::try_from(rule.action) {
                    Ok(pb::PolicyAction::Accept) => "accept",
                    Ok(pb::PolicyAction::Pass) => "return",
                    // Deny, and an action this agent does not know: never accept by mistake.
                    _ => "counter drop",
                };
                let Some(matches) = rule.r#match.as_ref() else { continue };
                lines.extend(self.rule_lines(name, i, matches, dir, verdict));
            }
        }
        lines.dedup();
        self.out.chains.insert(chain.clone(), lines);
        chain
    }

    fn ensure_peer_set(&mut self, name: &str) {
        if self.out.sets.contains_key(name) {
            return;
        }
        let Some(set) = self.plan.sets.get(name) else { return };
        let elements = set.addresses.iter().map(|a| Ipv4Addr::from(*a).to_string()).collect();
        self.set(name.to_string(), SetType::Address, elements);
    }

    /// `address . protocol . port` of the pods a named port resolves on.
    fn named_port_elements(
        &self,
        key: &str,
        rule: &pb::PolicyRule,
        port: &pb::PolicyPort,
        dir: Direction,
    ) -> BTreeSet<String> {
        let matches = |p: &pb::NamedPort| p.name == port.named_port && p.protocol == port.protocol;
        let tuple = |a: Ipv4Addr, p: &pb::NamedPort| format!("{a} . {} . {}", proto(p.protocol), p.port);
        match dir {
            Direction::Ingress => self
                .selected
                .get(&(key, true))
                .into_iter()
                .flatten()
                .flat_map(|(a, ports)| ports.iter().filter(|p| matches(p)).map(|p| tuple(*a, p)))
                .collect(),
            Direction::Egress => {
                let sets = rule
                    .peer_sets
                    .iter()
                    .chain((!rule.all_pods_set.is_empty()).then_some(&rule.all_pods_set));
                sets.filter_map(|s| self.plan.sets.get(s))
                    .flat_map(|s| &s.named_ports)
                    .filter_map(|n| Some((Ipv4Addr::from(n.address), n.port.as_ref()?)))
                    .filter(|(_, p)| matches(p))
                    .map(|(a, p)| tuple(a, p))
                    .collect()
            }
        }
    }

    /// The chain of the pods isolated by exactly these NetworkPolicies and subjects of exactly
    /// these ClusterNetworkPolicies in one direction.
    fn pod_chain(&mut self, policies: &[String], cluster: &'a [String], dir: Direction) -> String {
        let mut sorted: Vec<&str> = policies.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let (admin, baseline) = self.tiers(cluster);
        let mut id = sorted.clone();
        if !cluster.is_empty() {
            id.extend(["\u{1}admin"].iter().chain(&admin).chain(["\u{1}baseline"].iter()).chain(&baseline));
        }
        let chain = format!("pod-{}-{}", dir.tag(), hash(&id));
        if self.out.chains.contains_key(&chain) {
            return chain;
        }
        let mut lines = Vec::new();
        if !admin.is_empty() {
            lines.push(format!("jump {}", self.tier_chain("adm", &admin, dir)));
        }
        if !sorted.is_empty() {
            for key in sorted {
                // A policy the plan names but does not hold (not yet sent) allows nothing.
                if let Some(policy) = self.plan.policies.get(key) {
                    lines.push(format!("jump {}", self.policy_chain(key, policy, dir)));
                }
            }
            lines.push("counter drop".into());
        } else if !baseline.is_empty() {
            // Whatever Baseline leaves undecided is accepted (the base chain's policy).
            lines.push(format!("jump {}", self.tier_chain("base", &baseline, dir)));
        }
        self.out.chains.insert(chain.clone(), lines);
        chain
    }

    /// The cluster policies the plan holds among `names`, per tier, in evaluation order.
    fn tiers(&self, names: &'a [String]) -> (Vec<&'a str>, Vec<&'a str>) {
        let mut held: Vec<(&pb::ClusterNetworkPolicy, &'a str)> =
            names.iter().filter_map(|n| Some((self.plan.cluster_policies.get(n)?, n.as_str()))).collect();
        held.sort_by_key(|(p, n)| (p.priority, *n));
        held.dedup_by_key(|(_, n)| *n);
        let baseline = pb::PolicyTier::Baseline as i32;
        let admin = held.iter().filter(|(p, _)| p.tier != baseline).map(|(_, n)| *n).collect();
        let base = held.iter().filter(|(p, _)| p.tier == baseline).map(|(_, n)| *n).collect();
        (admin, base)
    }
}

/// The ruleset that enforces `plan` for the node's pods. `local` are the pods the node's IPAM
/// holds addresses for: a pod's address comes from there first (a new pod's status does not
/// have it yet), then from the plan. While the plan enforces, a local pod it does not know yet is
/// quarantined.
pub fn render(plan: &PolicyPlan, local: &[LocalPod]) -> Desired {
    let mut by_pod: HashMap<(&str, &str), Vec<Ipv4Addr>> = HashMap::new();
    for pod in local {
        by_pod.entry((pod.namespace.as_str(), pod.name.as_str())).or_default().push(pod.address);
    }
    let mut targets: Vec<(&pb::PolicyTarget, Vec<Ipv4Addr>)> = Vec::new();
    for target in &plan.targets {
        let addresses = match by_pod.get(&(target.namespace.as_str(), target.name.as_str())) {
            Some(a) => a.clone(),
            None if target.address != 0 => vec![Ipv4Addr::from(target.address)],
            None => continue,
        };
        targets.push((target, addresses));
    }
    let mut r = Renderer { plan, out: Desired::default(), selected: HashMap::new() };
    for (target, addresses) in &targets {
        for (policies, ingress) in [
            (&target.ingress_policies, true),
            (&target.egress_policies, false),
            (&target.cluster_ingress_policies, true),
            (&target.cluster_egress_policies, false),
        ] {
            for key in policies {
                let list = r.selected.entry((key.as_str(), ingress)).or_default();
                list.extend(addresses.iter().map(|a| (*a, target.ports.as_slice())));
            }
        }
    }
    for (target, addresses) in &targets {
        if !target.ingress_policies.is_empty() || !target.cluster_ingress_policies.is_empty() {
            let chain =
                r.pod_chain(&target.ingress_policies, &target.cluster_ingress_policies, Direction::Ingress);
            r.out.ingress.extend(addresses.iter().map(|a| (*a, chain.clone())));
        }
        if !target.egress_policies.is_empty() || !target.cluster_egress_policies.is_empty() {
            let chain =
                r.pod_chain(&target.egress_policies, &target.cluster_egress_policies, Direction::Egress);
            r.out.egress.extend(addresses.iter().map(|a| (*a, chain.clone())));
        }
    }
    if plan.enforcing {
        r.out.quarantine =
            local.iter().filter(|p| !plan.knows(&p.namespace, &p.name, &p.uid)).map(|p| p.address).collect();
        for a in &r.out.quarantine {
            r.out.ingress.remove(a);
            r.out.egress.remove(a);
        }
    }
    r.out
}
