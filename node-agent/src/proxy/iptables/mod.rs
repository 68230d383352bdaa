//! The iptables backend: kube-proxy's iptables proxier, with `WEFT-` chains.
//!
//! [`render_service`] is pure: one plan `Service` in, its chains (`WEFT-SVC-`, `WEFT-SVL-`,
//! `WEFT-EXT-`, `WEFT-SEP-`) and its lines in the shared chains (`WEFT-SERVICES`,
//! `WEFT-NODEPORTS`, …) out; [`render`] assembles a whole plan into one `iptables-restore` input
//! (what the snapshot tests read). [`IptablesCache::sync`] is the thin apply: it re-renders only
//! the Services whose plan resource changed, writes only the chains whose text changed with
//! `iptables-restore -w --noflush`, and writes nothing (spawns nothing) when nothing changed.
//!
//! Layout (see docs/SERVICE-PROXY.md):
//!
//! ```text
//! nat  PREROUTING, OUTPUT → WEFT-SERVICES ─ -d clusterIP:port ─────────→ WEFT-SVC-<h> (or WEFT-SVL-<h>: internalTrafficPolicy Local)
//!                                          ├ -d externalIP|lbIP:port ──→ WEFT-EXT-<h> → WEFT-SVC-<h> | WEFT-SVL-<h> (externalTrafficPolicy Local)
//!                                          └ dst-type LOCAL (last) ───→ WEFT-NODEPORTS ─ --dport nodePort → WEFT-EXT-<h>
//!      WEFT-SVC-<h>/WEFT-SVL-<h> ─ recent (affinity), statistic random ─→ WEFT-SEP-<h> (hairpin mark, DNAT)
//!      POSTROUTING → WEFT-PROXY-POSTROUTING: masquerade what WEFT-MARK-MASQ marked
//! filter FORWARD, OUTPUT (NEW) → WEFT-SERVICES: REJECT ports without endpoints, then the rest of the service CIDR
//!        INPUT, FORWARD (NEW) → WEFT-EXTERNAL-SERVICES: REJECT/DROP external IPs and NodePorts without endpoints
//!        FORWARD → WEFT-FORWARD: accept marked and established service traffic
//! ```
//!
//! The routes programmer owns `WEFT-POSTROUTING` (pod egress); the proxy's masquerade lives in its
//! own `WEFT-PROXY-POSTROUTING` so neither ever rewrites the other's chain.

mod apply;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_api::plan as pb;

use super::conntrack::{UdpFlows, udp_endpoints};
use super::model::{
    Context, HASH_LEN, PortPlan, ProxyError, ProxyPlan, Refuse, allowed_sources, decode, hash_suffix,
    service_chain,
};

pub use apply::{IptablesCache, MAX_CHAINS_PER_RESTORE};

/// The chains every node has, whatever its Services.
pub const SERVICES: &str = "WEFT-SERVICES";
pub const NODEPORTS: &str = "WEFT-NODEPORTS";
pub const EXTERNAL_SERVICES: &str = "WEFT-EXTERNAL-SERVICES";
pub const FORWARD: &str = "WEFT-FORWARD";
pub const MARK_MASQ: &str = "WEFT-MARK-MASQ";
pub const POSTROUTING: &str = "WEFT-PROXY-POSTROUTING";
/// Masquerades what does not come from the pod network when it has more than one CIDR (one
/// `! -s` cannot negate several).
pub const NON_POD_MASQ: &str = "WEFT-NONPOD-MASQ";
/// Empty; the first rule of both `WEFT-SERVICES` jumps to it. The periodic check looks for that
/// rule: gone means someone flushed or deleted Weft's chains, and a full re-sync follows.
pub const CANARY: &str = "WEFT-PROXY-CANARY";
pub const CANARY_COMMENT: &str = "weft proxy canary";

/// Prefixes of the per-service chains (followed by a 16-character hash).
pub const SERVICE_CHAIN_PREFIXES: [&str; 4] = ["WEFT-SVC-", "WEFT-SVL-", "WEFT-EXT-", "WEFT-SEP-"];

/// Whether `name` is a chain the proxy owns (and may delete when stale).
pub fn owned_chain(name: &str) -> bool {
    [SERVICES, NODEPORTS, EXTERNAL_SERVICES, FORWARD, MARK_MASQ, POSTROUTING, NON_POD_MASQ, CANARY]
        .contains(&name)
        || SERVICE_CHAIN_PREFIXES
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|h| h.len() == HASH_LEN && h.bytes().all(is_base32)))
}

fn is_base32(b: u8) -> bool {
    b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// One chain and its rules: complete `-A <chain> …` lines, each ending in a newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub table: Table,
    pub name: String,
    pub rules: String,
}

impl Chain {
    fn new(table: Table, name: impl Into<String>) -> Self {
        Self { table, name: name.into(), rules: String::new() }
    }

    fn rule(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.rules, "-A {} {args}", self.name);
    }

    /// Content hash: what the cache compares instead of keeping the text.
    pub fn hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.rules.as_bytes())
    }
}

/// A chain rule from the built-in chains to Weft's, inserted once at the top.
#[derive(Debug, Clone, Copy)]
pub struct Jump {
    pub table: Table,
    pub from: &'static str,
    pub args: &'static [&'static str],
}

/// New connections into the filter chains that refuse what no Service serves.
const NEW_TO_SERVICES: &[&str] = &[
    "-m",
    "conntrack",
    "--ctstate",
    "NEW",
    "-m",
    "comment",
    "--comment",
    "weft service portals",
    "-j",
    SERVICES,
];
const NEW_TO_EXTERNAL_SERVICES: &[&str] = &[
    "-m",
    "conntrack",
    "--ctstate",
    "NEW",
    "-m",
    "comment",
    "--comment",
    "weft externally-visible service portals",
    "-j",
    EXTERNAL_SERVICES,
];

pub const JUMPS: &[Jump] = &[
    Jump {
        table: Table::Nat,
        from: "PREROUTING",
        args: &["-m", "comment", "--comment", "weft service portals", "-j", SERVICES],
    },
    Jump {
        table: Table::Nat,
        from: "OUTPUT",
        args: &["-m", "comment", "--comment", "weft service portals", "-j", SERVICES],
    },
    Jump {
        table: Table::Nat,
        from: "POSTROUTING",
        args: &["-m", "comment", "--comment", "weft service masquerade", "-j", POSTROUTING],
    },
    Jump { table: Table::Filter, from: "INPUT", args: NEW_TO_EXTERNAL_SERVICES },
    Jump {
        table: Table::Filter,
        from: "FORWARD",
        args: &["-m", "comment", "--comment", "weft forwarding rules", "-j", FORWARD],
    },
    Jump { table: Table::Filter, from: "FORWARD", args: NEW_TO_SERVICES },
    Jump { table: Table::Filter, from: "FORWARD", args: NEW_TO_EXTERNAL_SERVICES },
    Jump { table: Table::Filter, from: "OUTPUT", args: NEW_TO_SERVICES },
];

/// The canary rule, first in both tables' `WEFT-SERVICES` (arguments for `iptables -C`).
pub const CANARY_RULE: &[&str] = &["-m", "comment", "--comment", CANARY_COMMENT, "-j", CANARY];

/// A Service's lines in the shared chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragments {
    pub nat_services: String,
    pub nat_nodeports: String,
    pub filter_services: String,
    pub filter_external: String,
}

/// Everything one Service contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    pub chains: Vec<Chain>,
    pub fragments: Fragments,
    pub udp: Vec<UdpFlows>,
}

/// `WEFT-SEP-…`, stable for (service, port name, protocol, endpoint).
pub fn endpoint_chain(service: &str, port: &str, protocol: &str, ep: Ipv4Addr, ep_port: u32) -> String {
    format!("WEFT-SEP-{}", hash_suffix(&format!("{service}:{port}/{protocol}->{ep}:{ep_port}")))
}

/// The filter target of a refusal.
fn refuse_target(refuse: Refuse) -> &'static str {
    match refuse {
        Refuse::Reject => "REJECT --reject-with icmp-port-unreachable",
        Refuse::Drop => "DROP",
    }
}

/// Renders one Service (`name` is the plan resource's name, `namespace/name`).
pub fn render_service(ctx: &Context, name: &str, svc: &pb::Service) -> Result<ServiceRules, ProxyError> {
    let mut out = ServiceRules { chains: Vec::new(), fragments: Fragments::default(), udp: Vec::new() };
    let allowed = allowed_sources(name, svc)?;
    let masquerade = svc.masquerade();
    let cluster_ip = (svc.cluster_ip != 0).then(|| Ipv4Addr::from(svc.cluster_ip));
    let external: Vec<(Ipv4Addr, &str)> = svc
        .external_ips
        .iter()
        .map(|ip| (Ipv4Addr::from(*ip), "external IP"))
        .chain(svc.load_balancer_ips.iter().map(|ip| (Ipv4Addr::from(*ip), "loadbalancer IP")))
        .collect();
    for port in &svc.ports {
        render_port(ctx, name, svc, port, cluster_ip, &external, &allowed, masquerade, &mut out)?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn render_port(
    ctx: &Context,
    name: &str,
    svc: &pb::Service,
    port: &pb::ServicePort,
    cluster_ip: Option<Ipv4Addr>,
    external: &[(Ipv4Addr, &str)],
    allowed: &[Ipv4Net],
    masquerade: pb::Masquerade,
    out: &mut ServiceRules,
) -> Result<(), ProxyError> {
    let plan = PortPlan::new(name, svc, port, !external.is_empty(), !allowed.is_empty())?;
    let PortPlan { proto, svc_port, node_port, ref label, needs_local, svc_used, uses_ext, .. } = plan;
    let (cluster_eps, local_eps) = (&plan.cluster_eps, &plan.local_eps);
    let svc_chain = service_chain("WEFT-SVC-", name, &port.name, proto);
    let svl_chain = service_chain("WEFT-SVL-", name, &port.name, proto);
    let ext_chain = service_chain("WEFT-EXT-", name, &port.name, proto);
    let internal_eps = plan.internal_eps(svc);
    let internal_chain = if svc.internal_local { &svl_chain } else { &svc_chain };
    let external_eps = plan.external_eps(svc);
    let external_target = if svc.external_local { &svl_chain } else { &svc_chain };
    let dport = format!("-p {proto} -m {proto} --dport {svc_port}");
    let sources: Vec<Option<Ipv4Net>> =
        if allowed.is_empty() { vec![None] } else { allowed.iter().copied().map(Some).collect() };
    let src = |s: &Option<Ipv4Net>| s.map(|n| format!("-s {n} ")).unwrap_or_default();
    let f = &mut out.fragments;

    // The cluster IP.
    if let Some(ip) = cluster_ip {
        if !internal_eps.is_empty() {
            for s in &sources {
                let _ = writeln!(
                    f.nat_services,
                    "-A {SERVICES} {}-d {ip}/32 {dport} -m comment --comment \"{label} cluster IP\" -j {internal_chain}",
                    src(s)
                );
            }
        }
        if let Some((refuse, why)) = plan.cluster_refuse {
            let _ = writeln!(
                f.filter_services,
                "-A {SERVICES} -d {ip}/32 {dport} -m comment --comment \"{label} {why}\" -j {}",
                refuse_target(refuse)
            );
        }
    }

    // External IPs, load-balancer IPs and the NodePort.
    let external_refuse = plan.external_refuse;
    for (ip, what) in external {
        if uses_ext {
            for s in &sources {
                let _ = writeln!(
                    f.nat_services,
                    "-A {SERVICES} {}-d {ip}/32 {dport} -m comment --comment \"{label} {what}\" -j {ext_chain}",
                    src(s)
                );
            }
        }
        if let Some((refuse, why)) = external_refuse {
            let _ = writeln!(
                f.filter_external,
                "-A {EXTERNAL_SERVICES} -d {ip}/32 {dport} -m comment --comment \"{label} {why}\" -j {}",
                refuse_target(refuse)
            );
        }
    }
    if node_port != 0 {
        let np = format!("-p {proto} -m {proto} --dport {node_port}");
        if uses_ext {
            for s in &sources {
                let _ = writeln!(
                    f.nat_nodeports,
                    "-A {NODEPORTS} {}{np} -m comment --comment \"{label}\" -j {ext_chain}",
                    src(s)
                );
            }
        }
        if let Some((refuse, why)) = external_refuse {
            let _ = writeln!(
                f.filter_external,
                "-A {EXTERNAL_SERVICES} -m addrtype --dst-type LOCAL {np} -m comment --comment \"{label} {why}\" -j {}",
                refuse_target(refuse)
            );
        }
    }

    // The endpoint chains.
    let affinity = svc.affinity_timeout_seconds;
    let mut seps: Vec<Chain> = Vec::new();
    let mut sep_of = |e: &pb::Endpoint| -> String {
        let ip = Ipv4Addr::from(e.ip);
        let chain = endpoint_chain(name, &port.name, proto, ip, e.port);
        if !seps.iter().any(|c| c.name == chain) {
            let mut sep = Chain::new(Table::Nat, chain.clone());
            sep.rule(format_args!("-m comment --comment \"{label}\" -s {ip}/32 -j {MARK_MASQ}"));
            let recent = if affinity > 0 {
                format!("-m recent --set --name {chain} --mask 255.255.255.255 --rsource ")
            } else {
                String::new()
            };
            sep.rule(format_args!(
                "-m comment --comment \"{label}\" {recent}-p {proto} -m {proto} -j DNAT --to-destination {ip}:{}",
                e.port
            ));
            seps.push(sep);
        }
        chain
    };
    let mut balance = |chain: &mut Chain, eps: &[&pb::Endpoint]| {
        let targets: Vec<(String, String)> =
            eps.iter().map(|e| (sep_of(e), format!("{}:{}", Ipv4Addr::from(e.ip), e.port))).collect();
        if affinity > 0 {
            for (sep, to) in &targets {
                chain.rule(format_args!(
                    "-m comment --comment \"{label} -> {to}\" -m recent --name {sep} --rcheck --seconds {affinity} --reap -j {sep}"
                ));
            }
        }
        let n = targets.len();
        for (i, (sep, to)) in targets.iter().enumerate() {
            if i + 1 < n {
                let p = 1.0 / (n - i) as f64;
                chain.rule(format_args!(
                    "-m comment --comment \"{label} -> {to}\" -m statistic --mode random --probability {p:.10} -j {sep}"
                ));
            } else {
                chain.rule(format_args!("-m comment --comment \"{label} -> {to}\" -j {sep}"));
            }
        }
    };
    let masq_rule = |chain: &mut Chain| {
        let Some(ip) = cluster_ip else { return };
        let what = format!("-d {ip}/32 {dport} -m comment --comment \"{label} cluster IP\"");
        match masquerade {
            pb::Masquerade::Never => {}
            pb::Masquerade::Always => chain.rule(format_args!("{what} -j {MARK_MASQ}")),
            pb::Masquerade::Auto => match ctx.pod_cidrs.as_slice() {
                [] => {}
                [one] => chain.rule(format_args!("! -s {one} {what} -j {MARK_MASQ}")),
                _ => chain.rule(format_args!("{what} -j {NON_POD_MASQ}")),
            },
        }
    };
    let mut chains = Vec::new();
    if svc_used && !cluster_eps.is_empty() {
        let mut chain = Chain::new(Table::Nat, svc_chain.clone());
        if !svc.internal_local {
            masq_rule(&mut chain);
        }
        balance(&mut chain, cluster_eps);
        chains.push(chain);
    }
    if needs_local && !local_eps.is_empty() {
        let mut chain = Chain::new(Table::Nat, svl_chain.clone());
        if svc.internal_local {
            masq_rule(&mut chain);
        }
        balance(&mut chain, local_eps);
        chains.push(chain);
    }
    if uses_ext {
        let mut chain = Chain::new(Table::Nat, ext_chain);
        if svc.external_local {
            if !cluster_eps.is_empty() {
                for pod in &ctx.pod_cidrs {
                    chain.rule(format_args!(
                        "-s {pod} -m comment --comment \"pod traffic for {label} external destinations\" -j {svc_chain}"
                    ));
                }
                if masquerade != pb::Masquerade::Never {
                    chain.rule(format_args!(
                        "-m comment --comment \"masquerade LOCAL traffic for {label} external destinations\" -m addrtype --src-type LOCAL -j {MARK_MASQ}"
                    ));
                }
                chain.rule(format_args!(
                    "-m comment --comment \"route LOCAL traffic for {label} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}"
                ));
            }
            if masquerade == pb::Masquerade::Always {
                chain.rule(format_args!("-j {MARK_MASQ}"));
            }
        } else if masquerade != pb::Masquerade::Never {
            chain.rule(format_args!(
                "-m comment --comment \"masquerade traffic for {label} external destinations\" -j {MARK_MASQ}"
            ));
        }
        if !external_eps.is_empty() {
            chain.rule(format_args!("-j {external_target}"));
        }
        chains.push(chain);
    }
    chains.append(&mut seps);
    out.chains.append(&mut chains);

    if port.protocol() == pb::Protocol::Udp {
        let endpoints = udp_endpoints(cluster_eps, local_eps);
        out.udp.push(UdpFlows {
            ips: cluster_ip.into_iter().chain(external.iter().map(|(ip, _)| *ip)).collect(),
            port: svc_port,
            node_port,
            endpoints,
        });
    }
    Ok(())
}

/// The chains every node has, given every Service's fragments in name order.
pub fn global_chains<'a>(ctx: &Context, fragments: impl Iterator<Item = &'a Fragments>) -> Vec<Chain> {
    let mut nat_services = Chain::new(Table::Nat, SERVICES);
    nat_services.rule(format_args!("-m comment --comment \"{CANARY_COMMENT}\" -j {CANARY}"));
    let mut nodeports = Chain::new(Table::Nat, NODEPORTS);
    let mut filter_services = Chain::new(Table::Filter, SERVICES);
    filter_services.rule(format_args!("-m comment --comment \"{CANARY_COMMENT}\" -j {CANARY}"));
    let mut external = Chain::new(Table::Filter, EXTERNAL_SERVICES);
    for f in fragments {
        nat_services.rules.push_str(&f.nat_services);
        nodeports.rules.push_str(&f.nat_nodeports);
        filter_services.rules.push_str(&f.filter_services);
        external.rules.push_str(&f.filter_external);
    }
    const LAST: &str = "weft service nodeports; NOTE: this must be the last rule in this chain";
    if ctx.node_port_addresses.is_empty() {
        nat_services.rule(format_args!(
            "-m comment --comment \"{LAST}\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
        ));
    } else {
        for addr in &ctx.node_port_addresses {
            nat_services.rule(format_args!(
                "-d {addr} -m comment --comment \"{LAST}\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ));
        }
    }
    if let Some(range) = ctx.service_cidr {
        // Nothing DNATed it: no Service has this address and port. Refuse at once rather than let
        // the client time out (kube-proxy leaves it unanswered).
        filter_services.rule(format_args!(
            "-d {range} -m comment --comment \"weft: no service on this address and port\" -j REJECT --reject-with icmp-port-unreachable"
        ));
    }
    let mark = format!("{:#x}", ctx.mark);
    let mut mark_masq = Chain::new(Table::Nat, MARK_MASQ);
    mark_masq.rule(format_args!("-j MARK --or-mark {mark}"));
    let mut postrouting = Chain::new(Table::Nat, POSTROUTING);
    postrouting.rule(format_args!("-m mark ! --mark {mark}/{mark} -j RETURN"));
    // Clear the bit so a packet re-traversing the stack (e.g. into a tunnel) is not
    // masqueraded twice.
    postrouting.rule(format_args!("-j MARK --xor-mark {mark}"));
    postrouting.rule(format_args!(
        "-m comment --comment \"weft service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    ));
    let mut forward = Chain::new(Table::Filter, FORWARD);
    forward.rule(format_args!(
        "-m comment --comment \"weft forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    forward.rule(format_args!(
        "-m comment --comment \"weft forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    let mut chains = vec![
        nat_services,
        nodeports,
        mark_masq,
        postrouting,
        Chain::new(Table::Nat, CANARY),
        filter_services,
        external,
        forward,
        Chain::new(Table::Filter, CANARY),
    ];
    if ctx.pod_cidrs.len() > 1 {
        let mut non_pod = Chain::new(Table::Nat, NON_POD_MASQ);
        for pod in &ctx.pod_cidrs {
            non_pod.rule(format_args!("-s {pod} -j RETURN"));
        }
        non_pod.rule(format_args!("-j {MARK_MASQ}"));
        chains.push(non_pod);
    }
    chains
}

/// The whole plan as one `iptables-restore` input (what a full re-sync writes, without the
/// deletion of stale chains); empty when the plan has no NetworkSettings yet.
pub fn render(plan: &ProxyPlan<'_>) -> Result<String, ProxyError> {
    let Some(net) = &plan.network else { return Ok(String::new()) };
    let ctx = Context::from_settings(net)?;
    let mut rendered = Vec::new();
    for r in &plan.services {
        rendered.push(render_service(&ctx, &r.name, &decode(r)?)?);
    }
    let mut chains = global_chains(&ctx, rendered.iter().map(|r| &r.fragments));
    chains.extend(rendered.into_iter().flat_map(|r| r.chains));
    Ok(restore_text(&chains, &[]))
}

/// `iptables-restore --noflush` input that rewrites `write` (declared, so flushed, then filled)
/// and deletes `delete` (flushed, then removed once nothing refers to them).
pub fn restore_text(write: &[Chain], delete: &[(Table, &str)]) -> String {
    let mut out = String::new();
    for table in [Table::Nat, Table::Filter] {
        let w: Vec<&Chain> = write.iter().filter(|c| c.table == table).collect();
        let d: Vec<&str> = delete.iter().filter(|(t, _)| *t == table).map(|(_, n)| *n).collect();
        if w.is_empty() && d.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", table.name());
        for c in &w {
            let _ = writeln!(out, ":{} - [0:0]", c.name);
        }
        for name in &d {
            let _ = writeln!(out, ":{name} - [0:0]");
        }
        for c in &w {
            out.push_str(&c.rules);
        }
        for name in &d {
            let _ = writeln!(out, "-X {name}");
        }
        out.push_str("COMMIT\n");
    }
    out
}
