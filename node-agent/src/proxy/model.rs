//! The Service model both backends render from: what the proxy is asked to program
//! ([`ProxyPlan`]), what each Service port does on this node whatever writes it ([`PortPlan`]),
//! and what a sync reports. Nothing here knows iptables or nftables syntax.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use weft_api::plan::{self as pb, Kind};

use crate::exec::{ExecError, Runner};
use crate::metrics::AgentMetrics;
use crate::proxy::conntrack::{UdpFlows, clear_udp};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{name} does not decode: {source}")]
    Decode { name: String, source: prost::DecodeError },
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// What the proxy programs: the node's network settings and the plan's Services, still encoded
/// (a sync decodes only the ones whose version changed), in name order.
#[derive(Debug, Clone, Default)]
pub struct ProxyPlan<'a> {
    /// None before the plan has NetworkSettings: nothing is programmed then.
    pub network: Option<pb::NetworkSettings>,
    pub services: Vec<&'a pb::Resource>,
}

impl<'a> ProxyPlan<'a> {
    /// The proxy's part of a plan's resources (any order; other kinds are ignored).
    pub fn from_resources(resources: impl IntoIterator<Item = &'a pb::Resource>) -> Result<Self, ProxyError> {
        let mut plan = ProxyPlan::default();
        for r in resources {
            match r.kind() {
                Kind::Network => plan.network = Some(decode(r)?),
                Kind::Service => plan.services.push(r),
                _ => {}
            }
        }
        plan.services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(plan)
    }
}

/// Decodes a plan resource, naming it when it does not decode.
pub fn decode<M: prost::Message + Default>(r: &pb::Resource) -> Result<M, ProxyError> {
    r.decode().map_err(|source| ProxyError::Decode { name: format!("resource {}", r.name), source })
}

/// The backend's name as NetworkConfig and kube-proxy's `/proxyMode` spell it.
pub fn mode_name(mode: pb::ProxyMode) -> &'static str {
    match mode {
        pb::ProxyMode::Iptables => "iptables",
        pb::ProxyMode::Nftables => "nftables",
    }
}

/// What every Service's rendering depends on besides the Service itself: from NetworkSettings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub pod_cidrs: Vec<Ipv4Net>,
    pub service_cidr: Option<Ipv4Net>,
    pub node_port_addresses: Vec<Ipv4Net>,
    /// The masquerade mark (one bit).
    pub mark: u32,
}

fn cidr(what: &str, s: &str) -> Result<Ipv4Net, ProxyError> {
    s.parse::<Ipv4Net>()
        .or_else(|_| s.parse::<Ipv4Addr>().map(Ipv4Net::from))
        .map(|n| n.trunc())
        .map_err(|_| ProxyError::Invalid(format!("{what} {s:?} is not an IPv4 CIDR")))
}

impl Context {
    pub fn from_settings(net: &pb::NetworkSettings) -> Result<Self, ProxyError> {
        if net.masquerade_bit > 31 {
            return Err(ProxyError::Invalid(format!(
                "the masquerade bit must be 0 to 31, got {}",
                net.masquerade_bit
            )));
        }
        let mut pod_cidrs =
            net.pod_cidrs.iter().map(|c| cidr("pod CIDR", c)).collect::<Result<Vec<_>, _>>()?;
        pod_cidrs.sort();
        pod_cidrs.dedup();
        let mut node_port_addresses = net
            .node_port_addresses
            .iter()
            .map(|c| cidr("nodePortAddresses entry", c))
            .collect::<Result<Vec<_>, _>>()?;
        node_port_addresses.sort();
        node_port_addresses.dedup();
        let service_cidr =
            (!net.service_cidr.is_empty()).then(|| cidr("service CIDR", &net.service_cidr)).transpose()?;
        Ok(Self { pod_cidrs, service_cidr, node_port_addresses, mark: 1 << net.masquerade_bit })
    }
}

/// A Service's `allowedSourceCIDRs` (empty: every source).
pub fn allowed_sources(name: &str, svc: &pb::Service) -> Result<Vec<Ipv4Net>, ProxyError> {
    svc.allowed_source_cidrs.iter().map(|c| cidr(&format!("service {name}: allowed source"), c)).collect()
}

pub const HASH_LEN: usize = 16;

/// kube-proxy-style chain suffix: 80 bits of a content hash in base32 (RFC 4648 alphabet).
pub fn hash_suffix(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let h = xxhash_rust::xxh3::xxh3_128(input.as_bytes());
    (0..HASH_LEN).map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char).collect()
}

/// A per-service chain's name (`WEFT-SVC-…`, `svc-…`), stable for (service, port name, protocol).
pub fn service_chain(prefix: &str, service: &str, port: &str, protocol: &str) -> String {
    format!("{prefix}{}", hash_suffix(&format!("{service}:{port}/{protocol}")))
}

pub fn protocol_name(p: pb::Protocol) -> &'static str {
    match p {
        pb::Protocol::Tcp => "tcp",
        pb::Protocol::Udp => "udp",
        pb::Protocol::Sctp => "sctp",
    }
}

/// Text safe inside a double-quoted iptables or nftables comment.
pub fn comment(s: &str) -> String {
    s.chars().map(|c| if c == '"' || c == '\\' || c.is_control() { '_' } else { c }).collect()
}

fn ready(e: &pb::Endpoint) -> bool {
    !e.has(pb::EndpointFlag::EndpointNotReady)
}

fn serving_terminating(e: &pb::Endpoint) -> bool {
    e.has(pb::EndpointFlag::EndpointNotReady) && e.has(pb::EndpointFlag::EndpointTerminating)
}

/// kube-proxy's selection: the ready endpoints; when there are none, the serving terminating
/// ones (so a rolling update of the last replica does not drop connections).
fn usable<'a>(eps: impl Iterator<Item = &'a pb::Endpoint> + Clone) -> Vec<&'a pb::Endpoint> {
    let ready: Vec<_> = eps.clone().filter(|e| ready(e)).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| serving_terminating(e)).collect()
}

/// What the filter table does with traffic a port cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refuse {
    /// No endpoint at all: the client learns at once (kube-proxy's REJECT).
    Reject,
    /// Endpoints exist, but none this traffic policy allows on this node (kube-proxy's DROP).
    Drop,
}

/// What one Service port does on this node, whatever the backend writes it with: which endpoints
/// each kind of traffic balances over and what happens to traffic nothing can serve.
pub(crate) struct PortPlan<'a> {
    pub proto: &'static str,
    pub svc_port: u16,
    pub node_port: u16,
    /// `namespace/name:port`, safe inside a quoted comment.
    pub label: String,
    /// Usable endpoints for Cluster policies and for Local ones, each sorted by (IP, port).
    pub cluster_eps: Vec<&'a pb::Endpoint>,
    pub local_eps: Vec<&'a pb::Endpoint>,
    /// Reachable from outside: a NodePort, external or load-balancer IPs.
    pub externally: bool,
    /// The Local-policy chain is needed (internalTrafficPolicy Local, or externalTrafficPolicy
    /// Local on an externally reachable port).
    pub needs_local: bool,
    /// The Cluster-policy chain is needed.
    pub svc_used: bool,
    /// External traffic has somewhere to go (the `EXT` chain exists).
    pub uses_ext: bool,
    /// What the filter table does with cluster-IP traffic that was not DNATed, and why.
    pub cluster_refuse: Option<(Refuse, &'static str)>,
    /// The same for external IPs, load-balancer IPs and the NodePort.
    pub external_refuse: Option<(Refuse, &'static str)>,
}

impl<'a> PortPlan<'a> {
    pub fn new(
        name: &str,
        svc: &pb::Service,
        port: &'a pb::ServicePort,
        has_external_ips: bool,
        sources_restricted: bool,
    ) -> Result<Self, ProxyError> {
        let proto = protocol_name(port.protocol());
        let svc_port = u16::try_from(port.port).ok().filter(|p| *p != 0).ok_or_else(|| {
            ProxyError::Invalid(format!("service {name}: port {} is out of range", port.port))
        })?;
        let node_port = u16::try_from(port.node_port).map_err(|_| {
            ProxyError::Invalid(format!("service {name}: nodePort {} is out of range", port.node_port))
        })?;
        let label = if port.name.is_empty() { name.to_string() } else { format!("{name}:{}", port.name) };
        let mut eps: Vec<&pb::Endpoint> = port.endpoints.iter().collect();
        eps.sort_by_key(|e| (e.ip, e.port));
        eps.dedup_by_key(|e| (e.ip, e.port));
        let cluster_eps = usable(eps.iter().copied());
        let local_eps = usable(eps.iter().filter(|e| e.has(pb::EndpointFlag::EndpointLocal)).copied());
        let any = !cluster_eps.is_empty() || !local_eps.is_empty();
        let externally = node_port != 0 || has_external_ips;
        let internal_empty = if svc.internal_local { local_eps.is_empty() } else { cluster_eps.is_empty() };
        let external_empty = if svc.external_local { local_eps.is_empty() } else { cluster_eps.is_empty() };
        let refuse = |empty: bool| match (empty, any) {
            (true, true) => Some((Refuse::Drop, "has no local endpoints")),
            (true, false) => Some((Refuse::Reject, "has no endpoints")),
            (false, _) if sources_restricted => Some((Refuse::Reject, "source not allowed")),
            (false, _) => None,
        };
        let (cluster_refuse, external_refuse) = (refuse(internal_empty), refuse(external_empty));
        Ok(Self {
            proto,
            svc_port,
            node_port,
            label: comment(&label),
            cluster_eps,
            local_eps,
            externally,
            needs_local: svc.internal_local || (svc.external_local && externally),
            // The Cluster-policy chain serves the cluster IP unless internalTrafficPolicy is
            // Local, and external traffic (directly, or pods' and the node's own with
            // externalTrafficPolicy Local).
            svc_used: !svc.internal_local || externally,
            uses_ext: externally && any,
            cluster_refuse,
            external_refuse,
        })
    }

    /// The endpoints cluster-IP traffic balances over.
    pub fn internal_eps(&self, svc: &pb::Service) -> &[&'a pb::Endpoint] {
        if svc.internal_local { &self.local_eps } else { &self.cluster_eps }
    }

    /// The endpoints external traffic balances over.
    pub fn external_eps(&self, svc: &pb::Service) -> &[&'a pb::Endpoint] {
        if svc.external_local { &self.local_eps } else { &self.cluster_eps }
    }
}

/// What one sync of a backend did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Every chain was rewritten (first sync, after an error or a tampering).
    pub full: bool,
    pub services: usize,
    pub services_rendered: usize,
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// Lines given to `iptables-restore` or `nft` (0: neither was run).
    pub lines: usize,
    /// `iptables-restore` or `nft` runs.
    pub writes: usize,
    /// Services left out because they do not decode or render (what they had keeps running).
    pub refused: Vec<String>,
}

/// Decodes and renders one plan Service. One that fails is left out of the sync and named in
/// `report`, as kube-proxy skips a Service it cannot program: one bad object never blocks the
/// others, and the rules it had stay until it renders again.
pub fn render_or_refuse<R>(
    r: &pb::Resource,
    report: &mut SyncReport,
    render: impl FnOnce(&pb::Service) -> Result<R, ProxyError>,
) -> Option<(pb::Service, R)> {
    let rendered = decode::<pb::Service>(r).and_then(|svc| render(&svc).map(|rules| (svc, rules)));
    match rendered {
        Ok(rendered) => Some(rendered),
        Err(e) => {
            tracing::warn!(service = %r.name, error = %e, "Service left out of the proxy rules");
            report.refused.push(r.name.clone());
            None
        }
    }
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// The network programming latency SLI of one Service change: from the EndpointSlice's
/// last-change-trigger-time to now. Changes from before this agent started are not observed.
pub fn observe_programming_latency(metrics: &AgentMetrics, started_unix_ms: i64, now_ms: i64, trigger: i64) {
    if trigger != 0 && trigger >= started_unix_ms {
        metrics.network_programming_latency.observe((now_ms - trigger).max(0) as f64 / 1000.0);
    }
}

/// What a backend keeps of each Service it wrote, as far as the shared bookkeeping goes.
pub trait WrittenService {
    /// The plan resource's version it was written at.
    fn version(&self) -> u64;
    fn udp(&self) -> &[UdpFlows];
}

/// The plan's Services against a cache of what was written: how many there are, those to
/// render again (all of them when `all`), and the names of those gone from the plan.
pub fn changed_services<'a, W: WrittenService>(
    plan: &ProxyPlan<'a>,
    cache: &HashMap<String, W>,
    all: bool,
) -> (usize, Vec<&'a pb::Resource>, Vec<String>) {
    let mut services = 0;
    let mut cached_seen = 0;
    let mut stale = Vec::new();
    for r in plan.services.iter().copied() {
        services += 1;
        let old = cache.get(&r.name);
        cached_seen += usize::from(old.is_some());
        if all || old.is_none_or(|o| o.version() != r.version) {
            stale.push(r);
        }
    }
    // Counting the cached names seen spares building a set in the common case: nothing removed.
    let removed = if cached_seen == cache.len() {
        Vec::new()
    } else {
        let present: HashSet<&str> = plan.services.iter().map(|r| r.name.as_str()).collect();
        cache.keys().filter(|k| !present.contains(k.as_str())).cloned().collect()
    };
    (services, stale, removed)
}

/// Records Services whose rules were just written (name, what was written, the change's trigger
/// time): the cache, their stale UDP flows, and the programming latency of their change. Called
/// after the write: the SLI ends when the rules are in the kernel.
pub fn record_written<W: WrittenService>(
    cache: &mut HashMap<String, W>,
    runner: &Runner,
    metrics: &AgentMetrics,
    started_unix_ms: i64,
    written: impl Iterator<Item = (String, W, i64)>,
) {
    let now_ms = now_unix_ms();
    for (name, new, trigger) in written {
        let old = cache.get(&name);
        if let Some(old) = old {
            clear_udp(runner, old.udp(), new.udp());
        }
        if old.is_none_or(|o| o.version() != new.version()) {
            observe_programming_latency(metrics, started_unix_ms, now_ms, trigger);
        }
        cache.insert(name, new);
    }
}

/// Forgets Services whose rules were just deleted, and their UDP flows.
pub fn record_removed<W: WrittenService>(
    cache: &mut HashMap<String, W>,
    runner: &Runner,
    removed: Vec<String>,
) {
    for name in removed {
        if let Some(old) = cache.remove(&name) {
            clear_udp(runner, old.udp(), &[]);
        }
    }
}
