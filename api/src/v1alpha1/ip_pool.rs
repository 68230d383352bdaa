//! `IPPool`: a range of pod addresses, handed to nodes in blocks.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::validation;

/// Default block prefix length for IPv4 pools.
pub const DEFAULT_BLOCK_SIZE: u8 = 26;

/// A range of pod IP addresses. The operator hands it out to nodes in blocks of `blockSize`
/// (one `IPBlock` object per block); each node assigns its pods addresses from its blocks.
// kube's printcolumn(...) entries repeat keys such as `type_`, which clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    singular = "ippool",
    shortname = "ipp",
    category = "weft",
    status = "IPPoolStatus",
    derive = "PartialEq",
    doc = "A range of pod IP addresses that Weft hands to nodes in fixed-size blocks.",
    printcolumn(
        name = "CIDR",
        type_ = "string",
        json_path = ".spec.cidr",
        description = "The pool's address range"
    ),
    printcolumn(
        name = "Block",
        type_ = "integer",
        json_path = ".spec.blockSize",
        description = "Prefix length of the blocks handed to nodes"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodes",
        description = "Nodes holding at least one block of this pool"
    ),
    printcolumn(
        name = "Used",
        type_ = "integer",
        json_path = ".status.usedAddresses",
        description = "Addresses assigned to pods"
    ),
    printcolumn(
        name = "Free",
        type_ = "integer",
        json_path = ".status.freeAddresses",
        description = "Addresses not assigned to pods (in allocated blocks or not yet allocated)"
    ),
    printcolumn(
        name = "%Used",
        type_ = "integer",
        json_path = ".status.usedPercent",
        description = "Percentage of the pool's addresses assigned to pods"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Blocks",
        type_ = "string",
        json_path = ".status.blocks",
        description = "Allocated blocks out of all blocks",
        priority = 1
    ),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled", priority = 1)
)]
#[x_kube(validation = Rule::new(
    "!has(self.cidr) || !isCIDR(self.cidr) || cidr(self.cidr).ip().family() != 4 || (self.blockSize >= cidr(self.cidr).prefixLength() && self.blockSize <= 32)"
).message("blockSize must be between the pool's prefix length and 32, e.g. 26 for a /16 pool").field_path(".blockSize"))]
#[x_kube(validation = Rule::new(
    "!has(self.reserved) || !has(self.cidr) || !isCIDR(self.cidr) || self.reserved.all(r, !isCIDR(r) || cidr(self.cidr).containsCIDR(r))"
).message("every reserved range must lie inside the pool's cidr").field_path(".reserved"))]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// The pool's address range, a network address such as 10.244.0.0/16 (IPv4 only for now). Immutable.
    #[schemars(length(max = 43))]
    #[x_kube(
        validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.244.0.0/16"),
        validation = Rule::new("!isCIDR(self) || cidr(self).ip().family() == 4").message("only IPv4 pools are supported for now"),
        validation = Rule::new("!isCIDR(self) || cidr(self).masked() == cidr(self)").message("cidr must be a network address with no host bits set, e.g. 10.244.0.0/16 rather than 10.244.1.0/16"),
        validation = Rule::new("self == oldSelf").message("cidr is immutable: create a new IPPool (and disable this one) to change the range")
    )]
    pub cidr: String,
    /// Prefix length of the blocks handed to nodes (default 26: 64 addresses a block). At least the pool's prefix length, at most 32. Immutable.
    #[serde(default = "default_block_size")]
    #[schemars(range(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("blockSize is immutable: create a new IPPool to use another block size"))]
    pub block_size: u8,
    /// Nodes that may receive blocks from this pool. Unset: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Stop handing out new blocks from this pool; blocks already held by nodes stay in use.
    #[serde(default)]
    pub disabled: bool,
    /// Masquerade traffic from this pool's pods to destinations outside the pod and service networks.
    #[serde(default = "default_true")]
    pub nat_outgoing: bool,
    /// Ranges inside the pool never given to pods (use a /32 for a single address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "validation::cidr_set")]
    pub reserved: Vec<String>,
}

fn default_block_size() -> u8 {
    DEFAULT_BLOCK_SIZE
}

fn default_true() -> bool {
    true
}

impl IPPoolSpec {
    /// A pool over `cidr` with every other field at its default.
    #[must_use]
    pub fn new(cidr: impl Into<String>) -> Self {
        Self {
            cidr: cidr.into(),
            block_size: DEFAULT_BLOCK_SIZE,
            node_selector: None,
            disabled: false,
            nat_outgoing: true,
            reserved: Vec::new(),
        }
    }
}

/// Observed state of a pool, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// The metadata.generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` (the pool hands out blocks), `Overlapping` (its cidr overlaps another pool's; the older pool wins), `Exhausted` (no free block left).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
    /// Blocks of blockSize in the pool.
    #[serde(default)]
    pub total_blocks: u32,
    /// Blocks held by nodes.
    #[serde(default)]
    pub allocated_blocks: u32,
    /// "allocated/total" blocks, e.g. 3/1024, for `kubectl get -o wide`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<String>,
    /// Addresses in the pool, reserved ranges excluded.
    #[serde(default)]
    pub total_addresses: u64,
    /// Addresses assigned to pods, as last reported by the node agents.
    #[serde(default)]
    pub used_addresses: u64,
    /// Addresses not assigned to pods: totalAddresses minus usedAddresses.
    #[serde(default)]
    pub free_addresses: u64,
    /// usedAddresses as a whole percentage of totalAddresses (0 to 100).
    #[schemars(range(max = 100))]
    #[serde(default)]
    pub used_percent: u32,
    /// Nodes holding at least one block of this pool.
    #[serde(default)]
    pub nodes: u32,
}
