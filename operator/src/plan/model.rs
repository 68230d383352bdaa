//! The compiler's view of the cluster: plain data, free of Kubernetes and protobuf types, so the
//! compiler can be tested and benchmarked without either. `crate::k8s::convert` builds these from
//! the watched objects. Also the compiler's output vocabulary ([`Update`], [`Scope`]), which the
//! plan store reads; this module imports nothing of the compiler.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use weft_api::plan::{Resource, ResourceKey};

/// Identifies a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// A pod bound to a node (host-network pods are left out: they hold no pod address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjectKey,
    pub uid: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The address in the pod's status; `None` until the kubelet reports it.
    pub ip: Option<Ipv4Addr>,
    /// The container ports that have a name (NetworkPolicy named ports).
    pub named_ports: Vec<NamedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A block of pod addresses owned by a node (an `IPBlock` object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub cidr: Ipv4Net,
    pub pool: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub cidr: Ipv4Net,
    pub nat_outgoing: bool,
    pub disabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopologyMode {
    #[default]
    None,
    PreferSameZone,
    PreferSameNode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Masquerade {
    #[default]
    Auto,
    Always,
    Never,
}

/// What a ProxyPolicy adds to the Services it selects.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyOverrides {
    pub affinity_timeout_seconds: Option<u32>,
    pub topology: TopologyMode,
    pub topology_min_endpoints: u32,
    pub masquerade: Masquerade,
    pub allowed_source_cidrs: Vec<String>,
}

/// A Service, with the ProxyPolicy that applies to it already resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    /// None for headless Services, which the proxy ignores.
    pub cluster_ip: Option<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// ClientIP affinity timeout from the Service itself.
    pub affinity_timeout_seconds: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    /// `healthCheckNodePort` (set by the API server for LoadBalancer Services with
    /// externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    /// `trafficDistribution`: `PreferClose` and `PreferSameZone` are PreferSameZone; a
    /// ProxyPolicy's topology, when set, wins.
    pub traffic_distribution: TopologyMode,
    pub policy: ProxyOverrides,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// EndpointSlice topology hints: the zones this endpoint should serve.
    pub hint_zones: Vec<String>,
}

/// An EndpointSlice, keyed by its own name and pointing at its Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation, Unix milliseconds: the
    /// start of the network programming latency SLI.
    pub trigger_unix_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StubDomain {
    pub domain: String,
    pub servers: Vec<String>,
}

/// The settings of the `default` NetworkConfig the compiler needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    pub vxlan: bool,
    pub mtu: u32,
    pub masquerade: bool,
    pub non_masquerade_cidrs: Vec<String>,
    pub service_cidr: String,
    pub node_port_range: (u16, u16),
    pub node_port_addresses: Vec<String>,
    pub nftables: bool,
    pub masquerade_bit: u8,
    pub cni_conf_dir: String,
    pub cni_bin_dir: String,
    pub cni_conflist_name: String,
    pub cni_chained_plugins: Vec<String>,
    pub cluster_domain: String,
    pub dns_service_ip: String,
    pub dns_upstreams: Vec<String>,
    pub dns_stub_domains: Vec<StubDomain>,
    pub dns_cache_ttl_seconds: u32,
    pub dns_pod_records: String,
}

impl Default for NetworkSettings {
    /// The defaults of an empty `NetworkConfig` spec, so nodes get a working plan before an admin
    /// writes one.
    fn default() -> Self {
        Self {
            vxlan: false,
            mtu: 1500,
            masquerade: true,
            non_masquerade_cidrs: Vec::new(),
            service_cidr: "10.96.0.0/16".into(),
            node_port_range: (30000, 32767),
            node_port_addresses: Vec::new(),
            nftables: true,
            masquerade_bit: 14,
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            cni_conflist_name: "10-weft.conflist".into(),
            cni_chained_plugins: vec!["portmap".into()],
            cluster_domain: "cluster.local".into(),
            dns_service_ip: "10.96.0.10".into(),
            dns_upstreams: vec!["/etc/resolv.conf".into()],
            dns_stub_domains: Vec::new(),
            dns_cache_ttl_seconds: 30,
            dns_pod_records: "Insecure".into(),
        }
    }
}

/// One change to the cluster as the compiler sees it.
#[derive(Debug, Clone)]
pub enum Change {
    Node(Node),
    NodeDeleted(String),
    Block(Block),
    BlockDeleted(Ipv4Net),
    Pool(Pool),
    PoolDeleted(String),
    Service(Service),
    ServiceDeleted(ObjectKey),
    Slice(EndpointSlice),
    SliceDeleted(ObjectKey),
    Network(NetworkSettings),
    Pod(Pod),
    PodDeleted(ObjectKey),
    // Ingress (compiled by `super::ingress`).
    IngressSettings(Settings),
    Ingress(Ingress),
    IngressDeleted(ObjectKey),
    IngressClass(IngressClass),
    IngressClassDeleted(String),
    Secret(TlsSecret),
    SecretDeleted(ObjectKey),
    // NetworkPolicy (compiled by `super::policy`); pods are shared with the node plans.
    Namespace(Namespace),
    NamespaceDeleted(String),
    NetworkPolicy(NetworkPolicy),
    NetworkPolicyDeleted(ObjectKey),
    ClusterNetworkPolicy(ClusterNetworkPolicy),
    ClusterNetworkPolicyDeleted(String),
}

// NetworkPolicy inputs (compiled by `super::policy`).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A label selector's requirement on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A Kubernetes label selector: every requirement holds. Empty selects everything. Kept in a
/// canonical order, so two selectors that mean the same compare (and hash) equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn new(mut requirements: Vec<Requirement>) -> Self {
        for r in &mut requirements {
            if let Requirement::In(_, values) | Requirement::NotIn(_, values) = r {
                values.sort();
                values.dedup();
            }
        }
        requirements.sort();
        requirements.dedup();
        Self { requirements }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl std::fmt::Display for LabelSelector {
    /// As `kubectl get -l` takes it; `{}` for the empty selector.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::In(k, v) if v.len() == 1 => format!("{k}={}", v[0]),
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Which namespaces a pod peer's pods may be in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// The policy's own namespace (no namespaceSelector).
    Own(String),
    /// Namespaces whose labels match.
    Selected(LabelSelector),
}

/// Pods picked by a peer: one address set per distinct selector, shared by every rule naming it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSelector {
    pub namespaces: NamespaceScope,
    pub pods: LabelSelector,
}

impl PeerSelector {
    /// Every pod of every namespace (egress named ports to any peer resolve against it).
    pub fn all_pods() -> Self {
        Self {
            namespaces: NamespaceScope::Selected(LabelSelector::default()),
            pods: LabelSelector::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyPeer {
    Pods(PeerSelector),
    IpBlock { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPort {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    pub end_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// `from`/`to` empty: every peer. Otherwise only `peers` (which may then be empty: a rule
    /// whose only peers are IPv6 blocks matches nothing here).
    pub any_peer: bool,
    pub peers: Vec<PolicyPeer>,
    /// Empty: every port.
    pub ports: Vec<PolicyPort>,
}

/// A `networking.k8s.io/v1` NetworkPolicy. `None` rules: the policy does not isolate that
/// direction (policyTypes leaves it out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub key: ObjectKey,
    pub pod_selector: LabelSelector,
    pub ingress: Option<Vec<PolicyRule>>,
    pub egress: Option<Vec<PolicyRule>>,
}

/// A ClusterNetworkPolicy's tier: Admin is judged before NetworkPolicy, Baseline after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Admin,
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    Accept,
    Deny,
    /// Leave the decision to the next tier.
    Pass,
}

/// One rule of a ClusterNetworkPolicy: its peers and ports as a NetworkPolicy rule's (never
/// `any_peer`), and what happens to traffic that matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicyRule {
    pub name: String,
    pub action: RuleAction,
    pub matches: PolicyRule,
}

/// A `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNetworkPolicy {
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    /// The pods it applies to (namespaces always `Selected`).
    pub subject: PeerSelector,
    pub ingress: Vec<ClusterPolicyRule>,
    pub egress: Vec<ClusterPolicyRule>,
}

// Ingress inputs (compiled by `super::ingress`).

/// NetworkConfig `ingress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub node_selector: BTreeMap<String, String>,
    pub class_name: String,
    pub http_port: u16,
    pub https_port: u16,
    pub default_backend: Option<(ObjectKey, PortRef)>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            node_selector: BTreeMap::new(),
            class_name: "weft".into(),
            http_port: 80,
            https_port: 443,
            default_backend: None,
        }
    }
}

impl Settings {
    /// Whether the node serves ingress.
    pub fn selects(&self, node: &Node) -> bool {
        self.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    /// A Service in the Ingress's namespace.
    pub service: String,
    pub port: PortRef,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathType {
    Exact,
    Prefix,
    ImplementationSpecific,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressPath {
    pub path: String,
    pub path_type: PathType,
    /// `None` for a resource backend, which Weft does not serve (the route answers 503).
    pub backend: Option<BackendRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRule {
    pub host: String,
    pub paths: Vec<IngressPath>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTls {
    pub hosts: Vec<String>,
    pub secret: Option<String>,
}

/// An Ingress, as far as the compiler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    pub key: ObjectKey,
    /// `spec.ingressClassName`, or the legacy `kubernetes.io/ingress.class` annotation.
    pub class_name: Option<String>,
    pub created_unix: i64,
    /// The `nginx.ingress.kubernetes.io/*` annotations.
    pub annotations: BTreeMap<String, String>,
    pub default_backend: Option<BackendRef>,
    pub rules: Vec<IngressRule>,
    pub tls: Vec<IngressTls>,
}

/// An IngressClass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressClass {
    pub name: String,
    pub controller: String,
    pub is_default: bool,
}

/// A `kubernetes.io/tls` Secret: its certificate and key, or why nginx could not load them
/// (checked when converted, so one bad Secret never makes nginx refuse every Ingress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub key: ObjectKey,
    pub pair: Result<KeyPair, String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub cert: Vec<u8>,
    pub private_key: Vec<u8>,
}

impl std::fmt::Debug for KeyPair {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("cert_len", &self.cert.len()).finish_non_exhaustive()
    }
}

// The compiler's output.

/// Who receives a resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every node.
    All,
    /// One node only. A key is never held in both scopes at once.
    Node(String),
}

/// One resource that changed: `None` removes it.
#[derive(Debug, Clone)]
pub struct Update {
    pub scope: Scope,
    pub key: ResourceKey,
    pub resource: Option<Arc<Resource>>,
}
