//! The service proxy in nftables (`proxy.mode: nftables`): kube-proxy's semantics in one table,
//! `ip weft-proxy`, built around verdict maps so that the common Service costs no chain and no
//! rule of its own.
//!
//! A plain Service (no session affinity, no allowed-source list, masquerade Auto and, when it is
//! reachable from outside, externalTrafficPolicy Cluster) is only map elements:
//!
//! ```text
//! services:  ip daddr . l4proto . dport  vmap @service-ips        → goto pick-cluster-tcp-<n> | pick-external-tcp-<n>
//!            fib daddr local: l4proto . dport vmap @service-nodeports → goto pick-nodeport-tcp-<n>
//! pick-cluster-tcp-<n>:  masquerade non-pod sources; dnat to (ip daddr . tcp dport . numgen random mod n) map @endpoints-tcp
//! ```
//!
//! so a one-endpoint change rewrites a few elements, and `nft` never needs to read thousands of
//! chains (its cache of a table grows with the chains, which is what makes kube-proxy's nftables
//! mode slow at scale). One `pick-*` chain exists per (kind, protocol, endpoint count). The other
//! Services get per-service chains (`svc-`, `svl-`, `ext-`, `sep-` and an `aff-` set per endpoint
//! for affinity) laid out like the iptables backend's. Hairpin traffic (a pod reaching itself
//! through its Service) is masqueraded in postrouting from one set of the node's endpoints.
//!
//! [`render_service`] is pure (one Service in, its elements and chains out); [`Changes`] (in
//! `diff`) turns two renderings into one `nft -f` transaction; [`base`] is the table with
//! everything that depends only on the NetworkSettings; `apply` runs the transactions.

mod apply;
mod diff;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_api::plan as pb;

use super::conntrack::{UdpFlows, udp_endpoints};
use super::model::{
    Context, PortPlan, ProxyError, Refuse, allowed_sources, hash_suffix, protocol_name, service_chain,
};

pub use apply::NftCache;
pub use diff::{Changes, Written};

/// The table (family `ip`) that holds all of the proxy's nftables state.
pub const TABLE: &str = "weft-proxy";

/// Which `pick-*` chain family a plain Service's traffic goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// To the cluster IP: masquerade what does not come from the pod network.
    Cluster,
    /// To an external or load-balancer IP: always masquerade.
    External,
    /// To a NodePort: always masquerade, endpoints keyed by port.
    NodePort,
}

/// One `pick-<kind>-<protocol>-<n>` chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pick {
    pub kind: Kind,
    pub proto: pb::Protocol,
    pub endpoints: u16,
}

impl Pick {
    pub fn chain(&self) -> String {
        let kind = match self.kind {
            Kind::Cluster => "cluster",
            Kind::External => "external",
            Kind::NodePort => "nodeport",
        };
        format!("pick-{kind}-{}-{}", proto(self.proto), self.endpoints)
    }

    /// The pick chain's rules (they depend on the pod CIDRs only).
    pub fn rules(&self, ctx: &Context) -> Vec<String> {
        let p = proto(self.proto);
        let n = self.endpoints;
        let mut rules = Vec::new();
        match self.kind {
            Kind::Cluster => {
                if let Some(set) = pod_set(ctx) {
                    rules.push(format!("ip saddr != {set} jump {MARK_MASQ}"));
                }
                rules.push(format!(
                    "meta l4proto {p} dnat ip addr . port to ip daddr . {p} dport . numgen random mod {n} map @{}",
                    endpoints_map(self.proto, false)
                ));
            }
            Kind::External => {
                rules.push(format!("jump {MARK_MASQ}"));
                rules.push(format!(
                    "meta l4proto {p} dnat ip addr . port to ip daddr . {p} dport . numgen random mod {n} map @{}",
                    endpoints_map(self.proto, false)
                ));
            }
            Kind::NodePort => {
                rules.push(format!("jump {MARK_MASQ}"));
                rules.push(format!(
                    "meta l4proto {p} dnat ip addr . port to {p} dport . numgen random mod {n} map @{}",
                    endpoints_map(self.proto, true)
                ));
            }
        }
        rules
    }
}

/// Where a map element sends traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Pick(Pick),
    Chain(String),
    Refuse(Refuse),
}

impl Verdict {
    fn text(&self) -> String {
        match self {
            Verdict::Pick(p) => format!("goto {}", p.chain()),
            Verdict::Chain(c) => format!("goto {c}"),
            Verdict::Refuse(Refuse::Reject) => format!("goto {REJECT}"),
            Verdict::Refuse(Refuse::Drop) => "drop".into(),
        }
    }
}

// The maps and sets of the table.
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const SERVICE_REFUSE: &str = "service-refuse";
pub const EXTERNAL_REFUSE: &str = "external-refuse";
pub const NODEPORT_REFUSE: &str = "nodeport-refuse";
pub const HAIRPIN: &str = "hairpin";

/// The endpoint map of a protocol, for Service IPs or NodePorts. One per protocol: nft 1.0.6
/// cannot add a rule whose key has `th dport` after a `meta l4proto` match once the map exists
/// ("conflicting protocols"), while `tcp dport` keyed maps work.
pub fn endpoints_map(p: pb::Protocol, node_port: bool) -> &'static str {
    match (p, node_port) {
        (pb::Protocol::Tcp, false) => "endpoints-tcp",
        (pb::Protocol::Udp, false) => "endpoints-udp",
        (pb::Protocol::Sctp, false) => "endpoints-sctp",
        (pb::Protocol::Tcp, true) => "nodeport-endpoints-tcp",
        (pb::Protocol::Udp, true) => "nodeport-endpoints-udp",
        (pb::Protocol::Sctp, true) => "nodeport-endpoints-sctp",
    }
}

const PROTOCOLS: [pb::Protocol; 3] = [pb::Protocol::Tcp, pb::Protocol::Udp, pb::Protocol::Sctp];
// Chains every node has.
pub const SERVICES: &str = "services";
pub const MARK_MASQ: &str = "mark-for-masquerade";
pub const REJECT: &str = "reject-traffic";
/// The chains [`base`] writes (hooks first): what the periodic check looks for.
pub const SHARED_CHAINS: [&str; 12] = [
    "nat-prerouting",
    "nat-output",
    "nat-postrouting",
    "filter-input",
    "filter-forward",
    "filter-output",
    SERVICES,
    MARK_MASQ,
    "masquerading",
    "cluster-services",
    "external-services",
    REJECT,
];

/// One element of one of the table's maps: what a Service adds, what an incremental sync diffs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Element {
    /// `service-ips`: a cluster, external or load-balancer IP and port → its chain.
    ServiceIp { ip: Ipv4Addr, proto: pb::Protocol, port: u16, to: Verdict },
    /// `service-nodeports`: a NodePort → its chain.
    NodePort { proto: pb::Protocol, port: u16, to: Verdict },
    /// `endpoints-<protocol>`: the `index`-th endpoint of a plain Service's IP and port.
    Endpoint { ip: Ipv4Addr, proto: pb::Protocol, port: u16, index: u16, ep: Ipv4Addr, ep_port: u16 },
    /// `nodeport-endpoints-<protocol>`: the same for a NodePort.
    NodePortEndpoint { proto: pb::Protocol, port: u16, index: u16, ep: Ipv4Addr, ep_port: u16 },
    /// `service-refuse`: a cluster IP and port whose traffic the filter hooks refuse.
    ServiceRefuse { ip: Ipv4Addr, proto: pb::Protocol, port: u16, refuse: Refuse },
    /// `external-refuse`: the same for external and load-balancer IPs.
    ExternalRefuse { ip: Ipv4Addr, proto: pb::Protocol, port: u16, refuse: Refuse },
    /// `nodeport-refuse`: the same for a NodePort.
    NodePortRefuse { proto: pb::Protocol, port: u16, refuse: Refuse },
}

impl Element {
    pub fn map(&self) -> &'static str {
        match self {
            Element::ServiceIp { .. } => SERVICE_IPS,
            Element::NodePort { .. } => SERVICE_NODEPORTS,
            Element::Endpoint { proto, .. } => endpoints_map(*proto, false),
            Element::NodePortEndpoint { proto, .. } => endpoints_map(*proto, true),
            Element::ServiceRefuse { .. } => SERVICE_REFUSE,
            Element::ExternalRefuse { .. } => EXTERNAL_REFUSE,
            Element::NodePortRefuse { .. } => NODEPORT_REFUSE,
        }
    }

    pub fn key(&self) -> String {
        match self {
            Element::ServiceIp { ip, proto: p, port, .. }
            | Element::ServiceRefuse { ip, proto: p, port, .. }
            | Element::ExternalRefuse { ip, proto: p, port, .. } => format!("{ip} . {} . {port}", proto(*p)),
            Element::NodePort { proto: p, port, .. } | Element::NodePortRefuse { proto: p, port, .. } => {
                format!("{} . {port}", proto(*p))
            }
            Element::Endpoint { ip, port, index, .. } => format!("{ip} . {port} . {index}"),
            Element::NodePortEndpoint { port, index, .. } => format!("{port} . {index}"),
        }
    }

    pub fn value(&self) -> String {
        match self {
            Element::ServiceIp { to, .. } | Element::NodePort { to, .. } => to.text(),
            Element::Endpoint { ep, ep_port, .. } | Element::NodePortEndpoint { ep, ep_port, .. } => {
                format!("{ep} . {ep_port}")
            }
            Element::ServiceRefuse { refuse, .. }
            | Element::ExternalRefuse { refuse, .. }
            | Element::NodePortRefuse { refuse, .. } => Verdict::Refuse(*refuse).text(),
        }
    }

    /// What a Service must own alone to write this element: its map key. Endpoint elements are
    /// keyed under their Service IP or NodePort, so they follow that element's claim.
    pub fn claim(&self) -> Claim {
        match self {
            Element::ServiceIp { ip, proto, port, .. } | Element::Endpoint { ip, proto, port, .. } => {
                Claim::Ip(SERVICE_IPS, *ip, *proto, *port)
            }
            Element::NodePort { proto, port, .. } | Element::NodePortEndpoint { proto, port, .. } => {
                Claim::Port(SERVICE_NODEPORTS, *proto, *port)
            }
            Element::ServiceRefuse { ip, proto, port, .. } => Claim::Ip(SERVICE_REFUSE, *ip, *proto, *port),
            Element::ExternalRefuse { ip, proto, port, .. } => Claim::Ip(EXTERNAL_REFUSE, *ip, *proto, *port),
            Element::NodePortRefuse { proto, port, .. } => Claim::Port(NODEPORT_REFUSE, *proto, *port),
        }
    }

    /// The pick chain the element sends traffic to, if any.
    pub fn pick(&self) -> Option<Pick> {
        match self {
            Element::ServiceIp { to: Verdict::Pick(p), .. }
            | Element::NodePort { to: Verdict::Pick(p), .. } => Some(*p),
            _ => None,
        }
    }
}

/// A map key one Service owns (two Services with the same external IP and port, say, cannot both
/// have an element there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Claim {
    Ip(&'static str, Ipv4Addr, pb::Protocol, u16),
    Port(&'static str, pb::Protocol, u16),
}

/// A per-service chain (complex Services only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    pub name: String,
    pub rules: Vec<String>,
}

impl NftChain {
    fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), rules: Vec::new() }
    }

    fn rule(&mut self, rule: String) {
        self.rules.push(rule);
    }

    /// Content hash: what the cache compares instead of keeping the text.
    pub fn hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for r in &self.rules {
            h.update(r.as_bytes());
            h.update(b"\n");
        }
        h.digest()
    }
}

/// An affinity set: the clients that last went to one endpoint, forgotten after the timeout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinitySet {
    pub name: String,
    pub timeout_seconds: u32,
}

/// Everything one Service contributes to the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Sorted, without duplicates.
    pub elements: Vec<Element>,
    pub chains: Vec<NftChain>,
    pub sets: Vec<AffinitySet>,
    /// Endpoints for the hairpin set, sorted, without duplicates.
    pub hairpin_endpoints: Vec<Ipv4Addr>,
    pub udp: Vec<UdpFlows>,
}

pub fn proto(p: pb::Protocol) -> &'static str {
    protocol_name(p)
}

/// The pod CIDRs as an nftables expression (`10.244.0.0/16` or `{ a, b }`).
fn pod_set(ctx: &Context) -> Option<String> {
    match ctx.pod_cidrs.as_slice() {
        [] => None,
        [one] => Some(one.to_string()),
        many => Some(format!("{{ {} }}", many.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "))),
    }
}

/// Renders one Service (`name` is the plan resource's name, `namespace/name`).
pub fn render_service(ctx: &Context, name: &str, svc: &pb::Service) -> Result<ServiceRules, ProxyError> {
    let allowed = allowed_sources(name, svc)?;
    let cluster_ip = (svc.cluster_ip != 0).then(|| Ipv4Addr::from(svc.cluster_ip));
    let external: Vec<Ipv4Addr> =
        svc.external_ips.iter().chain(svc.load_balancer_ips.iter()).map(|ip| Ipv4Addr::from(*ip)).collect();
    let mut out = ServiceRules::default();
    for port in &svc.ports {
        render_port(ctx, name, svc, port, cluster_ip, &external, &allowed, &mut out)?;
    }
    out.elements.sort();
    out.elements.dedup();
    out.hairpin_endpoints.sort();
    out.hairpin_endpoints.dedup();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn render_port(
    ctx: &Context,
    name: &str,
    svc: &pb::Service,
    port: &pb::ServicePort,
    cluster_ip: Option<Ipv4Addr>,
    external: &[Ipv4Addr],
    allowed: &[Ipv4Net],
    out: &mut ServiceRules,
) -> Result<(), ProxyError> {
    let plan = PortPlan::new(name, svc, port, !external.is_empty(), !allowed.is_empty())?;
    let p = port.protocol();
    let svc_port = plan.svc_port;
    let masquerade = svc.masquerade();
    let internal_eps = plan.internal_eps(svc);
    let external_eps = plan.external_eps(svc);
    let plain = svc.affinity_timeout_seconds == 0
        && allowed.is_empty()
        && masquerade == pb::Masquerade::Auto
        && !(svc.external_local && plan.externally);

    // Every endpoint, not only those marked local: the operator marks them only in the plans of
    // Services whose endpoints differ per node, and a pod reaching itself through any Service
    // must be masqueraded. (Only a pod of this node can hairpin here: the others' elements never
    // match.)
    out.hairpin_endpoints
        .extend(plan.cluster_eps.iter().chain(plan.local_eps.iter()).map(|e| Ipv4Addr::from(e.ip)));
    if let (Some(ip), Some((refuse, _))) = (cluster_ip, plan.cluster_refuse) {
        out.elements.push(Element::ServiceRefuse { ip, proto: p, port: svc_port, refuse });
    }
    if let Some((refuse, _)) = plan.external_refuse {
        for ip in external {
            out.elements.push(Element::ExternalRefuse { ip: *ip, proto: p, port: svc_port, refuse });
        }
        if plan.node_port != 0 {
            out.elements.push(Element::NodePortRefuse { proto: p, port: plan.node_port, refuse });
        }
    }

    if plain {
        let count = |eps: &[&pb::Endpoint]| u16::try_from(eps.len()).unwrap_or(u16::MAX);
        let endpoints = |ip: Ipv4Addr, eps: &[&pb::Endpoint], out: &mut ServiceRules| {
            for (index, e) in eps.iter().enumerate().take(usize::from(u16::MAX)) {
                out.elements.push(Element::Endpoint {
                    ip,
                    proto: p,
                    port: svc_port,
                    index: index as u16,
                    ep: Ipv4Addr::from(e.ip),
                    ep_port: e.port as u16,
                });
            }
        };
        if let Some(ip) = cluster_ip.filter(|_| !internal_eps.is_empty()) {
            let pick = Pick { kind: Kind::Cluster, proto: p, endpoints: count(internal_eps) };
            out.elements.push(Element::ServiceIp { ip, proto: p, port: svc_port, to: Verdict::Pick(pick) });
            endpoints(ip, internal_eps, out);
        }
        if plan.uses_ext && !external_eps.is_empty() {
            let n = count(external_eps);
            for ip in external {
                let pick = Pick { kind: Kind::External, proto: p, endpoints: n };
                out.elements.push(Element::ServiceIp {
                    ip: *ip,
                    proto: p,
                    port: svc_port,
                    to: Verdict::Pick(pick),
                });
                endpoints(*ip, external_eps, out);
            }
            if plan.node_port != 0 {
                let pick = Pick { kind: Kind::NodePort, proto: p, endpoints: n };
                out.elements.push(Element::NodePort {
                    proto: p,
                    port: plan.node_port,
                    to: Verdict::Pick(pick),
                });
                for (index, e) in external_eps.iter().enumerate().take(usize::from(u16::MAX)) {
                    out.elements.push(Element::NodePortEndpoint {
                        proto: p,
                        port: plan.node_port,
                        index: index as u16,
                        ep: Ipv4Addr::from(e.ip),
                        ep_port: e.port as u16,
                    });
                }
            }
        }
    } else {
        render_chains(ctx, name, svc, port, &plan, cluster_ip, external, allowed, out);
    }

    if p == pb::Protocol::Udp {
        let endpoints = udp_endpoints(&plan.cluster_eps, &plan.local_eps);
        out.udp.push(UdpFlows {
            ips: cluster_ip.into_iter().chain(external.iter().copied()).collect(),
            port: svc_port,
            node_port: plan.node_port,
            endpoints,
        });
    }
    Ok(())
}

/// The per-service chains of a Service the maps alone cannot express (affinity, allowed sources,
/// masquerade Always/Never, externalTrafficPolicy Local): the iptables backend's layout.
#[allow(clippy::too_many_arguments)]
fn render_chains(
    ctx: &Context,
    name: &str,
    svc: &pb::Service,
    port: &pb::ServicePort,
    plan: &PortPlan<'_>,
    cluster_ip: Option<Ipv4Addr>,
    external: &[Ipv4Addr],
    allowed: &[Ipv4Net],
    out: &mut ServiceRules,
) {
    let p = port.protocol();
    let pn = proto(p);
    let svc_port = plan.svc_port;
    let masquerade = svc.masquerade();
    let affinity = svc.affinity_timeout_seconds;
    let svc_chain = service_chain("svc-", name, &port.name, pn);
    let svl_chain = service_chain("svl-", name, &port.name, pn);
    let ext_chain = service_chain("ext-", name, &port.name, pn);
    let internal_chain = if svc.internal_local { &svl_chain } else { &svc_chain };
    let external_target = if svc.external_local { &svl_chain } else { &svc_chain };
    let guard = (!allowed.is_empty()).then(|| {
        let set = allowed.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
        // Back to the hook: not DNATed, so the filter hooks refuse it.
        format!("ip saddr != {{ {set} }} return")
    });

    if let Some(ip) = cluster_ip.filter(|_| !plan.internal_eps(svc).is_empty()) {
        out.elements.push(Element::ServiceIp {
            ip,
            proto: p,
            port: svc_port,
            to: Verdict::Chain(internal_chain.clone()),
        });
    }
    if plan.uses_ext {
        for ip in external {
            out.elements.push(Element::ServiceIp {
                ip: *ip,
                proto: p,
                port: svc_port,
                to: Verdict::Chain(ext_chain.clone()),
            });
        }
        if plan.node_port != 0 {
            out.elements.push(Element::NodePort {
                proto: p,
                port: plan.node_port,
                to: Verdict::Chain(ext_chain.clone()),
            });
        }
    }

    // Each endpoint's chain (and, with affinity, the set of clients it last served).
    let mut seps: Vec<NftChain> = Vec::new();
    let mut sets: Vec<AffinitySet> = Vec::new();
    let mut sep_of = |e: &pb::Endpoint| -> (String, Option<String>) {
        let ip = Ipv4Addr::from(e.ip);
        let key = format!("{name}:{}/{pn}->{ip}:{}", port.name, e.port);
        let chain = format!("sep-{}", hash_suffix(&key));
        let set = (affinity > 0).then(|| format!("aff-{}", hash_suffix(&format!("{key}~{affinity}"))));
        if !seps.iter().any(|c| c.name == chain) {
            let mut sep = NftChain::new(chain.clone());
            if let Some(set) = &set {
                sep.rule(format!("update @{set} {{ ip saddr }}"));
                sets.push(AffinitySet { name: set.clone(), timeout_seconds: affinity });
            }
            sep.rule(format!("meta l4proto {pn} dnat to {ip}:{}", e.port));
            seps.push(sep);
        }
        (chain, set)
    };
    let mut balance = |chain: &mut NftChain, eps: &[&pb::Endpoint]| {
        let targets: Vec<(String, Option<String>)> = eps.iter().map(|e| sep_of(e)).collect();
        for (sep, set) in &targets {
            if let Some(set) = set {
                chain.rule(format!("ip saddr @{set} goto {sep}"));
            }
        }
        let n = targets.len();
        for (i, (sep, _)) in targets.iter().enumerate() {
            if i + 1 < n {
                chain.rule(format!("numgen random mod {} == 0 goto {sep}", n - i));
            } else {
                chain.rule(format!("goto {sep}"));
            }
        }
    };
    let masq_rule = |chain: &mut NftChain| {
        let Some(ip) = cluster_ip else { return };
        let what = format!("ip daddr {ip} meta l4proto {pn} th dport {svc_port}");
        match masquerade {
            pb::Masquerade::Never => {}
            pb::Masquerade::Always => chain.rule(format!("{what} jump {MARK_MASQ}")),
            pb::Masquerade::Auto => {
                if let Some(set) = pod_set(ctx) {
                    chain.rule(format!("{what} ip saddr != {set} jump {MARK_MASQ}"));
                }
            }
        }
    };
    let mut chains = Vec::new();
    if plan.svc_used && !plan.cluster_eps.is_empty() {
        let mut chain = NftChain::new(svc_chain.clone());
        chain.rules.extend(guard.clone());
        if !svc.internal_local {
            masq_rule(&mut chain);
        }
        balance(&mut chain, &plan.cluster_eps);
        chains.push(chain);
    }
    if plan.needs_local && !plan.local_eps.is_empty() {
        let mut chain = NftChain::new(svl_chain.clone());
        chain.rules.extend(guard.clone());
        if svc.internal_local {
            masq_rule(&mut chain);
        }
        balance(&mut chain, &plan.local_eps);
        chains.push(chain);
    }
    if plan.uses_ext {
        let mut chain = NftChain::new(ext_chain);
        chain.rules.extend(guard);
        if svc.external_local {
            if !plan.cluster_eps.is_empty() {
                for pod in &ctx.pod_cidrs {
                    // Pods reaching an external address of the Service get the Cluster policy.
                    chain.rule(format!("ip saddr {pod} goto {svc_chain}"));
                }
                if masquerade != pb::Masquerade::Never {
                    chain.rule(format!("fib saddr type local jump {MARK_MASQ}"));
                }
                chain.rule(format!("fib saddr type local goto {svc_chain}"));
            }
            if masquerade == pb::Masquerade::Always {
                chain.rule(format!("jump {MARK_MASQ}"));
            }
        } else if masquerade != pb::Masquerade::Never {
            chain.rule(format!("jump {MARK_MASQ}"));
        }
        if !plan.external_eps(svc).is_empty() {
            chain.rule(format!("goto {external_target}"));
        }
        chains.push(chain);
    }
    chains.append(&mut seps);
    sets.sort();
    sets.dedup();
    out.chains.append(&mut chains);
    out.sets.append(&mut sets);
}

/// The table with everything that depends only on the NetworkSettings: the maps (empty), the
/// hooks and the shared chains. A full sync replaces the whole table with this plus every
/// Service's elements and chains, in one transaction.
pub fn base(ctx: &Context) -> String {
    let mut out = String::new();
    let mark = format!("{:#x}", ctx.mark);
    let _ = writeln!(out, "add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{");
    let _ = writeln!(out, "\tcomment \"Weft service proxy; written by weft-agent, do not edit\"");
    for (map, spec) in [
        (SERVICE_IPS, "type ipv4_addr . inet_proto . inet_service : verdict"),
        (SERVICE_NODEPORTS, "type inet_proto . inet_service : verdict"),
        (SERVICE_REFUSE, "type ipv4_addr . inet_proto . inet_service : verdict"),
        (EXTERNAL_REFUSE, "type ipv4_addr . inet_proto . inet_service : verdict"),
        (NODEPORT_REFUSE, "type inet_proto . inet_service : verdict"),
    ] {
        let _ = writeln!(out, "\tmap {map} {{\n\t\t{spec}\n\t}}");
    }
    for p in PROTOCOLS {
        let n = proto(p);
        let _ = writeln!(
            out,
            "\tmap {} {{\n\t\ttypeof ip daddr . {n} dport . numgen random mod 1 : ip daddr . {n} dport\n\t}}",
            endpoints_map(p, false)
        );
        let _ = writeln!(
            out,
            "\tmap {} {{\n\t\ttypeof {n} dport . numgen random mod 1 : ip daddr . {n} dport\n\t}}",
            endpoints_map(p, true)
        );
    }
    let _ = writeln!(out, "\tset {HAIRPIN} {{\n\t\ttypeof ip saddr . ip daddr\n\t}}");
    let chain = |out: &mut String, name: &str, rules: &[String]| {
        let _ = writeln!(out, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        let _ = writeln!(out, "\t}}");
    };
    // nat: portals first, masquerade last. filter: after nat in output (priority 0 > -100), so
    // what was DNATed no longer has the Service's address.
    chain(
        &mut out,
        "nat-prerouting",
        &["type nat hook prerouting priority dstnat; policy accept;".into(), format!("jump {SERVICES}")],
    );
    chain(
        &mut out,
        "nat-output",
        &["type nat hook output priority -100; policy accept;".into(), format!("jump {SERVICES}")],
    );
    chain(
        &mut out,
        "nat-postrouting",
        &["type nat hook postrouting priority srcnat; policy accept;".into(), "jump masquerading".into()],
    );
    chain(
        &mut out,
        "filter-input",
        &[
            "type filter hook input priority filter; policy accept;".into(),
            "ct state new jump external-services".into(),
        ],
    );
    chain(
        &mut out,
        "filter-forward",
        &[
            "type filter hook forward priority filter; policy accept;".into(),
            "ct state new jump cluster-services".into(),
            "ct state new jump external-services".into(),
        ],
    );
    chain(
        &mut out,
        "filter-output",
        &[
            "type filter hook output priority filter; policy accept;".into(),
            "ct state new jump cluster-services".into(),
        ],
    );
    let mut services = vec![format!("ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}")];
    let nodeports = format!("fib daddr type local meta l4proto . th dport vmap @{SERVICE_NODEPORTS}");
    if ctx.node_port_addresses.is_empty() {
        services.push(nodeports);
    } else {
        services.extend(ctx.node_port_addresses.iter().map(|a| format!("ip daddr {a} {nodeports}")));
    }
    chain(&mut out, SERVICES, &services);
    chain(&mut out, MARK_MASQ, &[format!("meta mark set meta mark | {mark}")]);
    chain(
        &mut out,
        "masquerading",
        &[
            format!("ct status dnat ip saddr . ip daddr @{HAIRPIN} jump {MARK_MASQ}"),
            format!("meta mark & {mark} == 0 return"),
            // Clear the bit so a packet re-traversing the stack is not masqueraded twice.
            format!("meta mark set meta mark ^ {mark}"),
            "masquerade fully-random".into(),
        ],
    );
    let mut cluster = vec![format!("ip daddr . meta l4proto . th dport vmap @{SERVICE_REFUSE}")];
    if let Some(range) = ctx.service_cidr {
        // Nothing DNATed it: no Service has this address and port; refuse at once.
        cluster.push(format!("ip daddr {range} goto {REJECT}"));
    }
    chain(&mut out, "cluster-services", &cluster);
    chain(
        &mut out,
        "external-services",
        &[
            format!("ip daddr . meta l4proto . th dport vmap @{EXTERNAL_REFUSE}"),
            format!("fib daddr type local meta l4proto . th dport vmap @{NODEPORT_REFUSE}"),
        ],
    );
    chain(&mut out, REJECT, &["reject with icmp type port-unreachable".into()]);
    out.push_str("}\n");
    out
}
