//! `ProxyPolicy`: how the node agents proxy selected Services, beyond what the Service API says.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation;

/// Most names kept in `status.matchedServices`.
pub const MAX_MATCHED_SERVICES: usize = 100;

/// Proxy behaviour for the Services it selects in its namespace. When two policies select one
/// Service, the older policy wins and the newer one reports `Conflicted`.
// kube's printcolumn(...) entries repeat keys such as `type_`, which clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "ProxyPolicy",
    plural = "proxypolicies",
    singular = "proxypolicy",
    shortname = "pxp",
    category = "weft",
    namespaced,
    status = "ProxyPolicyStatus",
    derive = "PartialEq",
    doc = "How Weft's node agents proxy the Services this policy selects in its namespace.",
    printcolumn(
        name = "Matched",
        type_ = "integer",
        json_path = ".status.matchedCount",
        description = "Services this policy applies to"
    ),
    printcolumn(
        name = "Conflicted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Conflicted\")].status",
        description = "Whether an older policy selects some of the same Services"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPolicySpec {
    /// Label selector for the Services in this namespace the policy applies to. An empty selector selects every Service in the namespace.
    pub selector: LabelSelector,
    /// Send each client to the same endpoint for a while. Unset: the Service's own sessionAffinity applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Prefer endpoints close to the client node. Unset: the Service's own traffic distribution applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyPreference>,
    /// Source NAT for traffic to the selected Services: `Auto` (only when needed for replies to return, as kube-proxy does), `Always`, or `Never` (keeps client addresses; replies must route back).
    #[serde(default)]
    pub masquerade: MasqueradeMode,
    /// Only clients in these CIDRs may reach the selected Services; others are dropped. Empty: every client.
    #[serde(default, rename = "allowedSourceCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "validation::cidr_set")]
    pub allowed_source_cidrs: Vec<String>,
}

/// Session affinity mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AffinityMode {
    /// No affinity: each connection picks an endpoint.
    #[default]
    None,
    /// Connections from one client IP go to the same endpoint until the timeout passes.
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// Session affinity settings.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinity {
    /// `None` or `ClientIP`.
    #[serde(default)]
    pub mode: AffinityMode,
    /// How long, in seconds, a client stays with its endpoint after its last connection (1 to 86400; default 10800, 3 hours, like Services).
    #[serde(default = "default_affinity_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

fn default_affinity_timeout() -> u32 {
    10800
}

/// Topology preference mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TopologyMode {
    /// Use every ready endpoint.
    #[default]
    None,
    /// Prefer endpoints in the client node's zone (topology.kubernetes.io/zone).
    PreferSameZone,
    /// Prefer endpoints on the client node itself, then any.
    PreferSameNode,
}

/// Topology preference settings.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopologyPreference {
    /// `None`, `PreferSameZone` or `PreferSameNode`.
    #[serde(default)]
    pub mode: TopologyMode,
    /// The preference applies only where at least this many preferred endpoints are ready; otherwise every endpoint is used (1 to 1000).
    #[serde(default = "default_min_endpoints")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_endpoints: u32,
}

fn default_min_endpoints() -> u32 {
    1
}

/// Source NAT mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MasqueradeMode {
    /// Masquerade only where replies would not return otherwise (kube-proxy's behaviour).
    #[default]
    Auto,
    /// Always masquerade to the node address.
    Always,
    /// Never masquerade; the endpoint sees the client address.
    Never,
}

/// Observed state of a policy, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPolicyStatus {
    /// The metadata.generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` (the policy is in the plan) and `Conflicted` (an older policy selects some of the same Services and wins for them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
    /// Names of the Services the policy applies to, sorted (at most 100; matchedCount has the full count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub matched_services: Vec<String>,
    /// Number of Services the policy applies to.
    #[serde(default)]
    pub matched_count: u32,
}
