//! The plan compiler: cluster state in, per-node plan resources out.
//!
//! It is pure (no I/O, no clock) and incremental: [`Compiler::apply`] records a change and marks
//! what it affects; [`Compiler::flush`] recompiles only that and returns the resources that
//! actually changed. Most resources are the same for every node and are encoded once
//! ([`Scope::All`]); only what depends on the node (its own blocks, Services with Local traffic
//! policies or topology preferences) is compiled per node, and identical variants still share one
//! encoding.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use weft_api::plan::{self as pb, Kind, Resource, ResourceKey};

use super::model::{
    Block, Change, EndpointSlice, Masquerade, NetworkSettings, Node, ObjectKey, Pod, Pool, Protocol, Scope,
    Service, TargetPort, TopologyMode, Update,
};

/// What the compiler last emitted for a Service.
#[derive(Debug, Clone)]
enum Emitted {
    All(u64),
    PerNode(HashMap<String, u64>),
}

pub const NETWORK: &str = "network";
pub const DNS: &str = "dns";
pub const NODE: &str = "node";
pub const PODS: &str = "pods";

#[derive(Debug, Default)]
pub struct Compiler {
    settings: NetworkSettings,
    nodes: BTreeMap<String, Node>,
    pools: BTreeMap<String, Pool>,
    blocks: BTreeMap<Ipv4Net, Block>,
    blocks_by_node: HashMap<String, BTreeSet<Ipv4Net>>,
    services: HashMap<ObjectKey, Service>,
    slices: HashMap<ObjectKey, EndpointSlice>,
    slices_by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    pods: HashMap<ObjectKey, Pod>,
    pods_by_node: HashMap<String, BTreeSet<ObjectKey>>,
    /// Ingresses, their classes and Secrets: compiled for the ingress nodes only.
    ingress: super::ingress::IngressState,
    /// NetworkPolicies and namespaces: compiled for the nodes whose pods they select.
    policy: super::policy::PolicyState,

    // Emitted state, to send only what changed.
    emitted_global: HashMap<ResourceKey, u64>,
    /// Versions of each node's own resources (its NodePlan and its pods).
    emitted_node: HashMap<String, [u64; 2]>,
    emitted_services: HashMap<ObjectKey, Emitted>,
    per_node_services: HashSet<ObjectKey>,

    // Dirty marks, consumed by flush.
    dirty_settings: bool,
    dirty_nodes: BTreeSet<String>,
    dirty_services: BTreeSet<ObjectKey>,
}

impl Compiler {
    pub fn new() -> Self {
        Self { dirty_settings: true, ingress: super::ingress::IngressState::new(), ..Self::default() }
    }

    /// Builds a compiler from a complete cluster state and returns every resource (the full
    /// compile).
    pub fn full(changes: impl IntoIterator<Item = Change>) -> (Self, Vec<Update>) {
        let mut compiler = Self::new();
        for change in changes {
            compiler.apply(change);
        }
        let updates = compiler.flush();
        (compiler, updates)
    }

    /// What became of each Ingress of Weft's class at the last flush, and the ingress nodes'
    /// addresses (for Events and Ingress status).
    pub fn ingress_report(&self) -> &super::ingress::IngressReport {
        self.ingress.ingress_report()
    }

    /// Records a change; nothing is compiled until [`Compiler::flush`].
    pub fn apply(&mut self, change: Change) {
        // Ingress routes resolve Service names to ClusterIPs.
        match &change {
            Change::Service(s) => self.ingress.service_changed(&s.key),
            Change::ServiceDeleted(key) => self.ingress.service_changed(key),
            _ => {}
        }
        match change {
            c @ (Change::IngressSettings(_)
            | Change::Ingress(_)
            | Change::IngressDeleted(_)
            | Change::IngressClass(_)
            | Change::IngressClassDeleted(_)
            | Change::Secret(_)
            | Change::SecretDeleted(_)) => {
                // Which nodes serve ingress changed: their NodePlans say so.
                if self.ingress.apply(c) {
                    self.dirty_nodes.extend(self.nodes.keys().cloned());
                }
            }
            c @ (Change::Namespace(_)
            | Change::NamespaceDeleted(_)
            | Change::NetworkPolicy(_)
            | Change::NetworkPolicyDeleted(_)
            | Change::ClusterNetworkPolicy(_)
            | Change::ClusterNetworkPolicyDeleted(_)) => self.policy.apply(c, &self.pods),
            Change::Network(settings) => {
                if settings != self.settings {
                    self.settings = settings;
                    self.dirty_settings = true;
                }
            }
            Change::Pool(pool) => {
                if self.pools.get(&pool.name) != Some(&pool) {
                    self.mark_pool_nodes(&pool.name);
                    self.pools.insert(pool.name.clone(), pool);
                    self.dirty_settings = true;
                }
            }
            Change::PoolDeleted(name) => {
                if self.pools.remove(&name).is_some() {
                    self.mark_pool_nodes(&name);
                    self.dirty_settings = true;
                }
            }
            Change::Node(node) => {
                let old = self.nodes.insert(node.name.clone(), node.clone());
                if old.as_ref() != Some(&node) {
                    self.dirty_nodes.insert(node.name.clone());
                    // A new node, or a node whose zone changed, needs its own variant of every
                    // node-dependent Service.
                    if old.is_none_or(|o| o.zone != node.zone) {
                        self.dirty_services.extend(self.per_node_services.iter().cloned());
                    }
                }
            }
            Change::NodeDeleted(name) => {
                if self.nodes.remove(&name).is_some() {
                    self.dirty_nodes.insert(name);
                }
            }
            Change::Block(block) => {
                if let Some(old) = self.blocks.insert(block.cidr, block.clone()) {
                    if let Some(set) = self.blocks_by_node.get_mut(&old.node) {
                        set.remove(&old.cidr);
                    }
                    self.dirty_nodes.insert(old.node);
                }
                self.blocks_by_node.entry(block.node.clone()).or_default().insert(block.cidr);
                self.dirty_nodes.insert(block.node);
            }
            Change::BlockDeleted(cidr) => {
                if let Some(old) = self.blocks.remove(&cidr) {
                    if let Some(set) = self.blocks_by_node.get_mut(&old.node) {
                        set.remove(&cidr);
                    }
                    self.dirty_nodes.insert(old.node);
                }
            }
            Change::Service(service) => {
                if self.services.get(&service.key) != Some(&service) {
                    self.dirty_services.insert(service.key.clone());
                    self.services.insert(service.key.clone(), service);
                }
            }
            Change::ServiceDeleted(key) => {
                if self.services.remove(&key).is_some() {
                    self.dirty_services.insert(key);
                }
            }
            Change::Slice(slice) => {
                let service = ObjectKey::new(&slice.key.namespace, &slice.service);
                if let Some(old) = self.slices.get(&slice.key) {
                    if *old == slice {
                        return;
                    }
                    let old_service = ObjectKey::new(&old.key.namespace, &old.service);
                    if old_service != service {
                        self.unlink_slice(&old_service, &slice.key);
                    }
                }
                self.slices_by_service.entry(service.clone()).or_default().insert(slice.key.clone());
                self.slices.insert(slice.key.clone(), slice);
                self.dirty_services.insert(service);
            }
            Change::Pod(pod) => {
                if let Some(old) = self.pods.get(&pod.key) {
                    if *old == pod {
                        return;
                    }
                    if let Some(set) = self.pods_by_node.get_mut(&old.node) {
                        set.remove(&pod.key);
                    }
                    self.dirty_nodes.insert(old.node.clone());
                }
                self.policy.pod_changed(self.pods.get(&pod.key), Some(&pod));
                self.pods_by_node.entry(pod.node.clone()).or_default().insert(pod.key.clone());
                self.dirty_nodes.insert(pod.node.clone());
                self.pods.insert(pod.key.clone(), pod);
            }
            Change::PodDeleted(key) => {
                if let Some(old) = self.pods.remove(&key) {
                    if let Some(set) = self.pods_by_node.get_mut(&old.node) {
                        set.remove(&key);
                    }
                    self.policy.pod_changed(Some(&old), None);
                    self.dirty_nodes.insert(old.node);
                }
            }
            Change::SliceDeleted(key) => {
                if let Some(old) = self.slices.remove(&key) {
                    let service = ObjectKey::new(&old.key.namespace, &old.service);
                    self.unlink_slice(&service, &key);
                }
            }
        }
    }

    fn unlink_slice(&mut self, service: &ObjectKey, slice: &ObjectKey) {
        if let Some(set) = self.slices_by_service.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_by_service.remove(service);
            }
        }
        self.dirty_services.insert(service.clone());
    }

    fn mark_pool_nodes(&mut self, pool: &str) {
        let nodes: BTreeSet<String> =
            self.blocks.values().filter(|b| b.pool == pool).map(|b| b.node.clone()).collect();
        self.dirty_nodes.extend(nodes);
    }

    /// Compiles everything marked dirty and returns the resources that changed, in an order that
    /// never leaves a key in both scopes.
    pub fn flush(&mut self) -> Vec<Update> {
        let mut out = Vec::new();
        if std::mem::take(&mut self.dirty_settings) {
            self.emit_global(&mut out, Kind::Network, NETWORK, Some(self.network_payload()));
            self.emit_global(&mut out, Kind::Dns, DNS, Some(self.dns_payload()));
        }
        let dirty_nodes = std::mem::take(&mut self.dirty_nodes);
        for name in &dirty_nodes {
            self.flush_node(&mut out, name);
        }
        for key in std::mem::take(&mut self.dirty_services) {
            self.flush_service(&mut out, &key);
        }
        self.ingress.flush(&mut out, &self.nodes, &self.services, !dirty_nodes.is_empty());
        self.policy.flush(&mut out, &self.nodes, &self.pods, &self.pods_by_node, &dirty_nodes);
        out
    }

    fn emit_global<M: prost::Message>(
        &mut self,
        out: &mut Vec<Update>,
        kind: Kind,
        name: &str,
        payload: Option<M>,
    ) {
        let key = ResourceKey::new(kind, name);
        match payload {
            Some(payload) => {
                let resource = Resource::encode(kind, name, &payload);
                if self.emitted_global.insert(key.clone(), resource.version) != Some(resource.version) {
                    out.push(Update { scope: Scope::All, key, resource: Some(Arc::new(resource)) });
                }
            }
            None => {
                if self.emitted_global.remove(&key).is_some() {
                    out.push(Update { scope: Scope::All, key, resource: None });
                }
            }
        }
    }

    fn flush_node(&mut self, out: &mut Vec<Update>, name: &str) {
        let Some(node) = self.nodes.get(name) else {
            // Gone: its peer entry goes, and so does everything in its own scope, so the store
            // can forget the node.
            self.emit_global::<pb::PeerNode>(out, Kind::Peer, name, None);
            let scope = Scope::Node(name.to_string());
            if self.emitted_node.remove(name).is_some() {
                for key in [ResourceKey::new(Kind::Node, NODE), ResourceKey::new(Kind::Pods, PODS)] {
                    out.push(Update { scope: scope.clone(), key, resource: None });
                }
            }
            for (key, emitted) in &mut self.emitted_services {
                if let Emitted::PerNode(map) = emitted
                    && map.remove(name).is_some()
                {
                    let key = ResourceKey::new(Kind::Service, key.to_string());
                    out.push(Update { scope: scope.clone(), key, resource: None });
                }
            }
            return;
        };
        let blocks: Vec<&Block> = self
            .blocks_by_node
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|cidr| self.blocks.get(cidr))
            .collect();
        let node_ip = node.ip.map(|ip| ip.to_string()).unwrap_or_default();
        let plan = pb::NodePlan {
            name: node.name.clone(),
            node_ip: node_ip.clone(),
            zone: node.zone.clone().unwrap_or_default(),
            ingress: self.ingress.serves(node),
            blocks: blocks
                .iter()
                .map(|b| pb::PodBlock {
                    cidr: b.cidr.to_string(),
                    pool: b.pool.clone(),
                    nat_outgoing: self.pools.get(&b.pool).is_none_or(|p| p.nat_outgoing),
                })
                .collect(),
        };
        let peer = node.ip.is_some().then(|| pb::PeerNode {
            name: node.name.clone(),
            node_ip,
            blocks: blocks.iter().map(|b| b.cidr.to_string()).collect(),
        });
        let pods = pb::NodePods {
            pods: self
                .pods_by_node
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|k| self.pods.get(k))
                .map(|p| pb::PodRef {
                    namespace: p.key.namespace.clone(),
                    name: p.key.name.clone(),
                    uid: p.uid.clone(),
                })
                .collect(),
        };
        let own = [Resource::encode(Kind::Node, NODE, &plan), Resource::encode(Kind::Pods, PODS, &pods)];
        let versions = [own[0].version, own[1].version];
        let previous = self.emitted_node.insert(name.to_string(), versions);
        for (i, resource) in own.into_iter().enumerate() {
            if previous.is_none_or(|p| p[i] != resource.version) {
                out.push(Update {
                    scope: Scope::Node(name.to_string()),
                    key: resource.key(),
                    resource: Some(Arc::new(resource)),
                });
            }
        }
        self.emit_global(out, Kind::Peer, name, peer);
    }

    fn network_payload(&self) -> pb::NetworkSettings {
        let s = &self.settings;
        pb::NetworkSettings {
            encapsulation: if s.vxlan { pb::Encapsulation::Vxlan } else { pb::Encapsulation::None } as i32,
            mtu: s.mtu,
            masquerade: s.masquerade,
            non_masquerade_cidrs: s.non_masquerade_cidrs.clone(),
            pod_cidrs: self.pools.values().filter(|p| !p.disabled).map(|p| p.cidr.to_string()).collect(),
            service_cidr: s.service_cidr.clone(),
            node_port_min: u32::from(s.node_port_range.0),
            node_port_max: u32::from(s.node_port_range.1),
            node_port_addresses: s.node_port_addresses.clone(),
            proxy_mode: if s.nftables { pb::ProxyMode::Nftables } else { pb::ProxyMode::Iptables } as i32,
            masquerade_bit: u32::from(s.masquerade_bit),
            cni_conf_dir: s.cni_conf_dir.clone(),
            cni_bin_dir: s.cni_bin_dir.clone(),
            cni_conflist_name: s.cni_conflist_name.clone(),
            cni_chained_plugins: s.cni_chained_plugins.clone(),
        }
    }

    fn dns_payload(&self) -> pb::DnsSettings {
        let s = &self.settings;
        pb::DnsSettings {
            cluster_domain: s.cluster_domain.clone(),
            service_ip: s.dns_service_ip.clone(),
            upstreams: s.dns_upstreams.clone(),
            stub_domains: s
                .dns_stub_domains
                .iter()
                .map(|d| pb::StubDomain { domain: d.domain.clone(), servers: d.servers.clone() })
                .collect(),
            cache_ttl_seconds: s.dns_cache_ttl_seconds,
            pod_records: s.dns_pod_records.clone(),
        }
    }

    fn flush_service(&mut self, out: &mut Vec<Update>, key: &ObjectKey) {
        let name = key.to_string();
        let rkey = ResourceKey::new(Kind::Service, name.clone());
        let previous = self.emitted_services.remove(key);
        let service = self.services.get(key).filter(|s| s.cluster_ip.is_some());
        let Some(service) = service else {
            self.per_node_services.remove(key);
            retract(out, &rkey, previous);
            return;
        };
        let endpoints = self.collect_endpoints(service);
        let trigger = self.trigger_time(key);
        if !is_node_dependent(service) {
            self.per_node_services.remove(key);
            let resource =
                Resource::encode(Kind::Service, name, &service_payload(service, &endpoints, None, trigger));
            let version = resource.version;
            match previous {
                Some(Emitted::All(v)) if v == version => {}
                Some(Emitted::All(_)) | None => {
                    out.push(Update { scope: Scope::All, key: rkey, resource: Some(Arc::new(resource)) });
                }
                Some(per_node @ Emitted::PerNode(_)) => {
                    retract(out, &rkey, Some(per_node));
                    out.push(Update { scope: Scope::All, key: rkey, resource: Some(Arc::new(resource)) });
                }
            }
            self.emitted_services.insert(key.clone(), Emitted::All(version));
            return;
        }

        self.per_node_services.insert(key.clone());
        let mut previous_nodes = match previous {
            Some(all @ Emitted::All(_)) => {
                retract(out, &rkey, Some(all));
                HashMap::new()
            }
            Some(Emitted::PerNode(map)) => map,
            None => HashMap::new(),
        };
        // Nodes that see the same endpoints share one variant (and its bytes).
        let mut variants: HashMap<u64, Arc<Resource>> = HashMap::new();
        let mut emitted = HashMap::with_capacity(self.nodes.len());
        for node in self.nodes.values() {
            let resource = Resource::encode(
                Kind::Service,
                name.clone(),
                &service_payload(service, &endpoints, Some(node), trigger),
            );
            let resource = variants.entry(resource.version).or_insert_with(|| Arc::new(resource)).clone();
            if previous_nodes.remove(&node.name) != Some(resource.version) {
                out.push(Update {
                    scope: Scope::Node(node.name.clone()),
                    key: rkey.clone(),
                    resource: Some(resource.clone()),
                });
            }
            emitted.insert(node.name.clone(), resource.version);
        }
        self.emitted_services.insert(key.clone(), Emitted::PerNode(emitted));
    }

    /// The newest trigger time among the Service's slices: when the change now being programmed
    /// began.
    fn trigger_time(&self, service: &ObjectKey) -> i64 {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k)?.trigger_unix_ms)
            .max()
            .unwrap_or(0)
    }

    /// Endpoints per Service port name: from every slice of the Service that carries the port,
    /// deduplicated by address (an endpoint moving between slices may briefly be in two).
    fn collect_endpoints(&self, service: &Service) -> BTreeMap<String, Vec<(u16, ResolvedEndpoint)>> {
        let mut by_port: BTreeMap<String, Vec<(u16, ResolvedEndpoint)>> = BTreeMap::new();
        let Some(slice_keys) = self.slices_by_service.get(&service.key) else {
            return by_port;
        };
        for slice in slice_keys.iter().filter_map(|k| self.slices.get(k)) {
            for port in &service.ports {
                let Some(slice_port) =
                    slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol)
                else {
                    continue;
                };
                let list = by_port.entry(port.name.clone()).or_default();
                for ep in &slice.endpoints {
                    // Not serving: never a destination (kube-proxy skips it too).
                    if !(ep.ready || ep.serving) || list.iter().any(|(_, e)| e.ip == ep.ip) {
                        continue;
                    }
                    list.push((
                        slice_port.port,
                        ResolvedEndpoint {
                            ip: ep.ip,
                            ready: ep.ready,
                            terminating: ep.terminating,
                            node: ep.node.clone(),
                            zone: ep.zone.clone(),
                            hint_zones: ep.hint_zones.clone(),
                        },
                    ));
                }
            }
        }
        for list in by_port.values_mut() {
            list.sort_by_key(|(port, ep)| (ep.ip, *port));
        }
        by_port
    }
}

#[derive(Debug, Clone)]
struct ResolvedEndpoint {
    ip: Ipv4Addr,
    ready: bool,
    terminating: bool,
    node: Option<String>,
    zone: Option<String>,
    hint_zones: Vec<String>,
}

fn retract(out: &mut Vec<Update>, key: &ResourceKey, previous: Option<Emitted>) {
    match previous {
        None => {}
        Some(Emitted::All(_)) => out.push(Update { scope: Scope::All, key: key.clone(), resource: None }),
        Some(Emitted::PerNode(nodes)) => {
            let mut nodes: Vec<String> = nodes.into_keys().collect();
            nodes.sort();
            out.extend(nodes.into_iter().map(|n| Update {
                scope: Scope::Node(n),
                key: key.clone(),
                resource: None,
            }));
        }
    }
}

/// A Service whose endpoints differ between nodes: Local traffic policies mark the node's own
/// endpoints; topology preferences keep endpoints near the node.
fn is_node_dependent(service: &Service) -> bool {
    let external = service.ports.iter().any(|p| p.node_port.is_some())
        || !service.external_ips.is_empty()
        || !service.load_balancer_ips.is_empty();
    service.internal_local
        || (service.external_local && (external || service.health_check_node_port.is_some()))
        || service.traffic_distribution != TopologyMode::None
        || service.policy.topology != TopologyMode::None
}

fn service_payload(
    service: &Service,
    endpoints: &BTreeMap<String, Vec<(u16, ResolvedEndpoint)>>,
    node: Option<&Node>,
    trigger_unix_ms: i64,
) -> pb::Service {
    service_message(service, service_ports(service, endpoints, node), trigger_unix_ms)
}

fn service_message(service: &Service, ports: Vec<pb::ServicePort>, trigger_unix_ms: i64) -> pb::Service {
    let policy = &service.policy;
    pb::Service {
        cluster_ip: service.cluster_ip.map(u32::from).unwrap_or_default(),
        external_ips: service.external_ips.iter().copied().map(u32::from).collect(),
        load_balancer_ips: service.load_balancer_ips.iter().copied().map(u32::from).collect(),
        ports,
        affinity_timeout_seconds: policy
            .affinity_timeout_seconds
            .or(service.affinity_timeout_seconds)
            .unwrap_or(0),
        external_local: service.external_local,
        internal_local: service.internal_local,
        masquerade: match policy.masquerade {
            Masquerade::Auto => pb::Masquerade::Auto,
            Masquerade::Always => pb::Masquerade::Always,
            Masquerade::Never => pb::Masquerade::Never,
        } as i32,
        allowed_source_cidrs: policy.allowed_source_cidrs.clone(),
        last_change_trigger_unix_ms: trigger_unix_ms,
        health_check_node_port: service.health_check_node_port.map(u32::from).unwrap_or_default(),
    }
}

fn service_ports(
    service: &Service,
    endpoints: &BTreeMap<String, Vec<(u16, ResolvedEndpoint)>>,
    node: Option<&Node>,
) -> Vec<pb::ServicePort> {
    service
        .ports
        .iter()
        .map(|port| {
            let all = endpoints.get(&port.name).map(Vec::as_slice).unwrap_or_default();
            let chosen = match node {
                Some(node) => select_for_node(service, all, node),
                None => all.iter().collect(),
            };
            pb::ServicePort {
                name: port.name.clone(),
                protocol: match port.protocol {
                    Protocol::Tcp => pb::Protocol::Tcp,
                    Protocol::Udp => pb::Protocol::Udp,
                    Protocol::Sctp => pb::Protocol::Sctp,
                } as i32,
                port: u32::from(port.port),
                node_port: port.node_port.map(u32::from).unwrap_or(0),
                endpoints: chosen
                    .into_iter()
                    .map(|(target, ep)| {
                        let mut flags = 0;
                        if !ep.ready {
                            flags |= pb::EndpointFlag::EndpointNotReady as u32;
                        }
                        if ep.terminating {
                            flags |= pb::EndpointFlag::EndpointTerminating as u32;
                        }
                        if node.is_some_and(|n| ep.node.as_deref() == Some(n.name.as_str())) {
                            flags |= pb::EndpointFlag::EndpointLocal as u32;
                        }
                        pb::Endpoint {
                            ip: u32::from(ep.ip),
                            port: u32::from(resolve_target(&port.target_port, *target)),
                            flags,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The slice's port is authoritative (it resolves named target ports); a numeric target port
/// only applies when the slice carries none.
fn resolve_target(target: &TargetPort, slice_port: u16) -> u16 {
    match target {
        TargetPort::Number(n) if slice_port == 0 => *n,
        _ => slice_port,
    }
}

/// Topology: keep the endpoints near `node` when there are enough of them, else all of them
/// (falling back is what keeps a zone without endpoints working).
fn select_for_node<'a>(
    service: &Service,
    all: &'a [(u16, ResolvedEndpoint)],
    node: &Node,
) -> Vec<&'a (u16, ResolvedEndpoint)> {
    let min = service.policy.topology_min_endpoints.max(1) as usize;
    let keep = |pred: &dyn Fn(&ResolvedEndpoint) -> bool| -> Option<Vec<&'a (u16, ResolvedEndpoint)>> {
        let near: Vec<_> = all.iter().filter(|e| pred(&e.1)).collect();
        (near.iter().filter(|e| e.1.ready).count() >= min).then_some(near)
    };
    let zone = node.zone.as_deref();
    let same_node = || keep(&|e| e.node.as_deref() == Some(node.name.as_str()));
    let same_zone = || keep(&|e| zone.is_some() && e.zone.as_deref() == zone);
    // EndpointSlice zone hints when every endpoint has them, as kube-proxy does; else zones.
    let hinted_zone = || {
        if !all.is_empty() && all.iter().all(|e| !e.1.hint_zones.is_empty()) {
            keep(&|e| zone.is_some_and(|z| e.hint_zones.iter().any(|h| h == z)))
        } else {
            same_zone()
        }
    };
    let chosen = match (service.policy.topology, service.traffic_distribution) {
        (TopologyMode::PreferSameNode, _) => same_node(),
        (TopologyMode::PreferSameZone, _) => same_zone(),
        (TopologyMode::None, TopologyMode::PreferSameZone) => hinted_zone(),
        // The node's own endpoints (what the controller's node hints name), then the zone's.
        (TopologyMode::None, TopologyMode::PreferSameNode) => same_node().or_else(hinted_zone),
        (TopologyMode::None, TopologyMode::None) => None,
    };
    chosen.unwrap_or_else(|| all.iter().collect())
}
