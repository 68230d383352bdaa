//! `NetworkConfig`: the cluster-wide network settings. Only the object named `default` exists.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation;

/// The only name a `NetworkConfig` may have.
pub const NETWORK_CONFIG_NAME: &str = "default";

/// The defaults of every field, in one place (the schema and `Default` both use them).
pub mod defaults {
    /// Pod interface MTU.
    #[must_use]
    pub fn mtu() -> u32 {
        1500
    }
    /// `true`, for switches that are on by default.
    #[must_use]
    pub fn yes() -> bool {
        true
    }
    /// kubeadm's default service range.
    #[must_use]
    pub fn service_cidr() -> String {
        "10.96.0.0/16".to_owned()
    }
    /// First NodePort.
    #[must_use]
    pub fn node_port_min() -> u16 {
        30000
    }
    /// Last NodePort.
    #[must_use]
    pub fn node_port_max() -> u16 {
        32767
    }
    /// kube-proxy's default minSyncPeriod (1s).
    #[must_use]
    pub fn min_sync_period_ms() -> u32 {
        1000
    }
    /// kube-proxy's default masquerade bit.
    #[must_use]
    pub fn masquerade_bit() -> u8 {
        14
    }
    /// The kubelet's usual cluster domain.
    #[must_use]
    pub fn cluster_domain() -> String {
        "cluster.local".to_owned()
    }
    /// kubeadm's kube-dns ClusterIP (the 10th address of the default service range).
    #[must_use]
    pub fn service_ip() -> String {
        "10.96.0.10".to_owned()
    }
    /// Resolve outside names with the node's own resolvers.
    #[must_use]
    pub fn upstreams() -> Vec<String> {
        vec!["/etc/resolv.conf".to_owned()]
    }
    /// CoreDNS cache TTL cap, in seconds.
    #[must_use]
    pub fn cache_ttl_seconds() -> u32 {
        30
    }
    /// Weft's IngressClass name.
    #[must_use]
    pub fn class_name() -> String {
        "weft".to_owned()
    }
    /// Plain HTTP port on ingress nodes.
    #[must_use]
    pub fn http_port() -> u16 {
        80
    }
    /// HTTPS port on ingress nodes.
    #[must_use]
    pub fn https_port() -> u16 {
        443
    }
    /// Where container runtimes read CNI configurations.
    #[must_use]
    pub fn conf_dir() -> String {
        "/etc/cni/net.d".to_owned()
    }
    /// Where CNI plugin binaries live.
    #[must_use]
    pub fn bin_dir() -> String {
        "/opt/cni/bin".to_owned()
    }
    /// Weft's conflist file name.
    #[must_use]
    pub fn conflist_name() -> String {
        "10-weft.conflist".to_owned()
    }
    /// Plugins chained after weft-cni.
    #[must_use]
    pub fn chained_plugins() -> Vec<String> {
        vec!["portmap".to_owned()]
    }
}

/// Most entries kept in `status.laggingNodes`.
pub const MAX_LAGGING_NODES: usize = 20;

/// Cluster-wide network settings: pod network, services, proxy, DNS, ingress and CNI.
///
/// Weft reads the one `NetworkConfig` named `default`; every section has defaults, so
/// `spec: {}` is a complete configuration.
// kube's printcolumn(...) entries repeat keys such as `type_`, which clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "NetworkConfig",
    plural = "networkconfigs",
    shortname = "netcfg",
    shortname = "wnc",
    category = "weft",
    status = "NetworkConfigStatus",
    derive = "PartialEq",
    doc = "Cluster-wide Weft network settings. Only the NetworkConfig named 'default' is in force.",
    validation = Rule::new("self.metadata.name == 'default'").message("a NetworkConfig must be named 'default': Weft only reads the object named default"),
    printcolumn(name = "Converged", type_ = "string", json_path = ".status.converged", description = "Nodes that applied the newest plan, out of all nodes"),
    printcolumn(name = "Plan", type_ = "integer", json_path = ".status.planVersion", description = "Version of the newest plan"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Whether every node applied the newest plan"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new(
    "!isIP(self.dns.serviceIP) || !isCIDR(self.serviceNetwork.serviceCIDR) || cidr(self.serviceNetwork.serviceCIDR).containsIP(self.dns.serviceIP)"
).message("dns.serviceIP must lie inside serviceNetwork.serviceCIDR").field_path(".dns.serviceIP"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigSpec {
    /// How pods reach each other: encapsulation, MTU and masquerading.
    #[serde(default)]
    pub pod_network: PodNetwork,
    /// The service IP range and the NodePort settings.
    #[serde(default)]
    pub service_network: ServiceNetwork,
    /// How the node agents program Services (the kube-proxy replacement).
    #[serde(default)]
    pub proxy: ProxySettings,
    /// Cluster DNS (CoreDNS) settings.
    #[serde(default)]
    pub dns: DnsSettings,
    /// The built-in ingress controller (nginx).
    #[serde(default)]
    pub ingress: IngressSettings,
    /// Where the CNI configuration and plugins live on each node.
    #[serde(default)]
    pub cni: CniSettings,
}

/// How pod traffic crosses between nodes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Encapsulation {
    /// Plain routing: every node routes the other nodes' blocks via their node address (nodes must share a link).
    #[default]
    None,
    /// VXLAN overlay between nodes (works across routed networks; costs 50 bytes of MTU).
    #[serde(rename = "VXLAN")]
    Vxlan,
}

/// Pod network settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodNetwork {
    /// Encapsulation between nodes: `None` (direct routes between nodes on a shared link) or `VXLAN` (overlay).
    #[serde(default)]
    pub encapsulation: Encapsulation,
    /// MTU of pod interfaces, in bytes (576 to 9000). With VXLAN, set it 50 below the node MTU.
    #[schemars(range(min = 576, max = 9000))]
    #[serde(default = "defaults::mtu")]
    pub mtu: u32,
    /// Masquerade (SNAT to the node address) pod traffic leaving the pod network.
    #[serde(default = "defaults::yes")]
    pub masquerade: bool,
    /// Destinations never masqueraded (besides the pod and service networks), e.g. a routed datacenter range.
    #[serde(default, rename = "nonMasqueradeCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "validation::cidr_set")]
    pub non_masquerade_cidrs: Vec<String>,
}

impl Default for PodNetwork {
    fn default() -> Self {
        Self {
            encapsulation: Encapsulation::None,
            mtu: defaults::mtu(),
            masquerade: defaults::yes(),
            non_masquerade_cidrs: Vec::new(),
        }
    }
}

/// Service network settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceNetwork {
    /// The ClusterIP range, as given to kube-apiserver's --service-cluster-ip-range (a network address, e.g. 10.96.0.0/16).
    #[schemars(length(max = 43))]
    #[x_kube(
        validation = Rule::new("isCIDR(self)").message("serviceCIDR must be a CIDR such as 10.96.0.0/16"),
        validation = Rule::new("!isCIDR(self) || cidr(self).masked() == cidr(self)").message("serviceCIDR must be a network address with no host bits set, e.g. 10.96.0.0/16 rather than 10.96.0.1/16")
    )]
    #[serde(default = "defaults::service_cidr", rename = "serviceCIDR")]
    pub service_cidr: String,
    /// Ports NodePort Services may use, inclusive (kube-apiserver's --service-node-port-range).
    #[serde(default)]
    pub node_port_range: PortRange,
    /// Node addresses that serve NodePorts, as CIDRs (an address inside one of them serves). Empty: every node address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "validation::cidr_set")]
    pub node_port_addresses: Vec<String>,
}

impl Default for ServiceNetwork {
    fn default() -> Self {
        Self {
            service_cidr: defaults::service_cidr(),
            node_port_range: PortRange::default(),
            node_port_addresses: Vec::new(),
        }
    }
}

/// An inclusive range of ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("nodePortRange.min must not be greater than nodePortRange.max"))]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// First port of the range.
    #[schemars(range(min = 1))]
    #[serde(default = "defaults::node_port_min")]
    pub min: u16,
    /// Last port of the range (inclusive).
    #[schemars(range(min = 1))]
    #[serde(default = "defaults::node_port_max")]
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self { min: defaults::node_port_min(), max: defaults::node_port_max() }
    }
}

/// Service proxy backend.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// iptables chains prefixed WEFT-, written with iptables-restore: for nodes without nft 1.0+.
    Iptables,
    /// One nftables table, ip weft-proxy, built on verdict maps: changes cost the same at any number of Services.
    #[default]
    Nftables,
}

/// Service proxy settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxySettings {
    /// Proxy backend: `nftables` (table ip weft-proxy, the default; needs nft 1.0+) or `iptables` (WEFT- chains, for older nodes).
    #[serde(default)]
    pub mode: ProxyMode,
    /// Least time between two rule syncs on a node, in milliseconds (0 to 60000), as kube-proxy's --iptables-min-sync-period (default 1000). Not used yet: agents apply every plan update as it arrives.
    #[schemars(range(max = 60000))]
    #[serde(default = "defaults::min_sync_period_ms")]
    pub min_sync_period_ms: u32,
    /// Bit of the packet mark used to flag packets for masquerading (0 to 31); change it if another component uses bit 14.
    #[schemars(range(max = 31))]
    #[serde(default = "defaults::masquerade_bit")]
    pub masquerade_bit: u8,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            mode: ProxyMode::default(),
            min_sync_period_ms: defaults::min_sync_period_ms(),
            masquerade_bit: defaults::masquerade_bit(),
        }
    }
}

/// Whether cluster DNS answers for pod names (CoreDNS `pods` option).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PodRecords {
    /// No A records for pods.
    Disabled,
    /// Answer `a-b-c-d.<ns>.pod.<domain>` for any address, without checking a pod has it (kube-dns compatible).
    #[default]
    Insecure,
    /// Answer only when a pod with that address exists in that namespace.
    Verified,
}

/// Cluster DNS settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DnsSettings {
    /// The cluster domain (the kubelet's --cluster-domain), e.g. cluster.local.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("clusterDomain must be a lower-case DNS name such as cluster.local"))]
    #[serde(default = "defaults::cluster_domain")]
    pub cluster_domain: String,
    /// ClusterIP of the kube-dns Service (the kubelet's --cluster-dns); must lie inside serviceNetwork.serviceCIDR.
    #[serde(default = "defaults::service_ip", rename = "serviceIP")]
    #[schemars(length(max = 39))]
    #[x_kube(validation = Rule::new("isIP(self)").message("serviceIP must be an IP address such as 10.96.0.10"))]
    pub service_ip: String,
    /// Where names outside the cluster are resolved, tried in order: IP addresses (`10.0.0.53`, `10.0.0.53:5353`, `[fd00::53]:53`) or the path of a resolv.conf file on the node. Default: the node's /etc/resolv.conf.
    #[schemars(schema_with = "validation::resolver_list")]
    #[serde(default = "defaults::upstreams")]
    pub upstreams: Vec<String>,
    /// Domains resolved by their own servers instead of the upstreams (e.g. a corporate zone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub stub_domains: Vec<StubDomain>,
    /// Longest time, in seconds, that CoreDNS caches an answer (0 to 3600; 0 disables the cache).
    #[serde(default = "defaults::cache_ttl_seconds", rename = "cacheTTLSeconds")]
    #[schemars(range(max = 3600))]
    pub cache_ttl_seconds: u32,
    /// Pod A records: `Disabled`, `Insecure` (any a-b-c-d name, as kube-dns did) or `Verified` (only addresses of existing pods).
    #[serde(default)]
    pub pod_records: PodRecords,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            cluster_domain: defaults::cluster_domain(),
            service_ip: defaults::service_ip(),
            upstreams: defaults::upstreams(),
            stub_domains: Vec::new(),
            cache_ttl_seconds: defaults::cache_ttl_seconds(),
            pod_records: PodRecords::Insecure,
        }
    }
}

/// A DNS domain forwarded to its own servers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StubDomain {
    /// The domain, e.g. corp.example.com; names in it are sent to `servers`.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("domain must be a lower-case DNS name such as corp.example.com"))]
    pub domain: String,
    /// DNS servers for the domain, tried in order: IP, IP:port or [IPv6]:port.
    #[schemars(schema_with = "validation::server_list")]
    pub servers: Vec<String>,
}

/// Built-in ingress controller settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.httpPort != self.httpsPort").message("ingress.httpPort and ingress.httpsPort must differ"))]
#[serde(rename_all = "camelCase")]
pub struct IngressSettings {
    /// Run the ingress controller on the selected nodes.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Labels a node must have to serve ingress (and receive TLS Secrets), e.g. node-role.kubernetes.io/ingress: "". Only labels a kubelet cannot set on its own Node (NodeRestriction): keys under node-role.kubernetes.io/ or node-restriction.kubernetes.io/, so a compromised node cannot make itself an ingress node. Empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("self.all(k, k.startsWith('node-role.kubernetes.io/') || k.startsWith('node-restriction.kubernetes.io/'))").message("ingress.nodeSelector keys must be labels a kubelet cannot set on its own Node: node-role.kubernetes.io/... or node-restriction.kubernetes.io/... (a node that could label itself would receive every TLS key)"))]
    pub node_selector: BTreeMap<String, String>,
    /// Name of the IngressClass Weft serves; Ingresses naming another class are ignored.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("className must be a lower-case DNS name such as weft"))]
    #[serde(default = "defaults::class_name")]
    pub class_name: String,
    /// Port on ingress nodes for plain HTTP.
    #[schemars(range(min = 1))]
    #[serde(default = "defaults::http_port")]
    pub http_port: u16,
    /// Port on ingress nodes for HTTPS.
    #[schemars(range(min = 1))]
    #[serde(default = "defaults::https_port")]
    pub https_port: u16,
    /// Backend for requests no Ingress rule matches, as namespace/service:port (port is a number or a port name), e.g. default/fallback:80. Unset: answer 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z]([-a-z0-9]*[a-z0-9])?:([0-9]{1,5}|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$')").message("defaultBackend must look like namespace/service:port, e.g. default/fallback:80 or default/fallback:http"))]
    pub default_backend: Option<String>,
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            enabled: defaults::yes(),
            node_selector: BTreeMap::new(),
            class_name: defaults::class_name(),
            http_port: defaults::http_port(),
            https_port: defaults::https_port(),
            default_backend: None,
        }
    }
}

/// CNI settings on each node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CniSettings {
    /// Directory the container runtime reads CNI configurations from (an absolute path).
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("confDir must be an absolute path such as /etc/cni/net.d"))]
    #[serde(default = "defaults::conf_dir")]
    pub conf_dir: String,
    /// Directory holding CNI plugin binaries; weft-cni is installed there (an absolute path).
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("binDir must be an absolute path such as /opt/cni/bin"))]
    #[serde(default = "defaults::bin_dir")]
    pub bin_dir: String,
    /// File name of the conflist Weft writes in confDir; runtimes use the first file in lexical order.
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new("self.endsWith('.conflist') && !self.contains('/') && self != '.conflist'").message("conflistName must be a file name ending in .conflist, such as 10-weft.conflist"))]
    #[serde(default = "defaults::conflist_name")]
    pub conflist_name: String,
    /// Plugin types chained after weft-cni in the conflist, in order (e.g. portmap for hostPort support).
    #[schemars(schema_with = "validation::plugin_list")]
    #[serde(default = "defaults::chained_plugins")]
    pub chained_plugins: Vec<String>,
}

impl Default for CniSettings {
    fn default() -> Self {
        Self {
            conf_dir: defaults::conf_dir(),
            bin_dir: defaults::bin_dir(),
            conflist_name: defaults::conflist_name(),
            chained_plugins: defaults::chained_plugins(),
        }
    }
}

/// Observed state of the cluster's network configuration, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigStatus {
    /// The metadata.generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions; `Ready` is True when every node applied the newest plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
    /// Version of the newest plan the operator compiled (it grows with every change that reaches nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_version: Option<u64>,
    /// Nodes the operator plans for.
    #[serde(default)]
    pub nodes_total: u32,
    /// Nodes whose agent acknowledged the newest plan.
    #[serde(default)]
    pub nodes_converged: u32,
    /// "converged/total", e.g. 3/4, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged: Option<String>,
    /// Some nodes that have not applied the newest plan (at most 20), with the last version they acknowledged and their last error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub lagging_nodes: Vec<NodePlanState>,
}

/// Where one node stands with its plan.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodePlanState {
    /// Name of the Node.
    pub node: String,
    /// Last plan version the node's agent acknowledged; unset if it never did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<String>,
    /// Why the node is behind: its agent's last NACK error, or that it is disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
