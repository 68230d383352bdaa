//! `IPBlock`: one block of an `IPPool`, held by one node.
//!
//! The operator claims a block by creating the `IPBlock` named after the block's CIDR: the API
//! server's create-if-absent is the lock, so two nodes can never hold the same block, even with two
//! operator replicas racing.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// One block of pod addresses, held by one node. Created and deleted by the operator only.
// kube's printcolumn(...) entries repeat keys such as `type_`, which clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "IPBlock",
    plural = "ipblocks",
    singular = "ipblock",
    shortname = "ipb",
    category = "weft",
    derive = "PartialEq",
    doc = "A block of pod IP addresses from an IPPool, held by one node. Managed by the Weft operator; do not edit.",
    validation = Rule::new(
        "!has(self.spec.cidr) || self.metadata.name == self.spec.cidr.replace('.', '-').replace(':', '-').replace('/', '-')"
    ).message("an IPBlock must be named after its cidr with '.', ':' and '/' replaced by '-', e.g. 10-244-0-64-26 for 10.244.0.64/26"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr", description = "The block's address range"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool", description = "The IPPool the block belongs to"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node", description = "The node holding the block"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IPBlockSpec {
    /// The block's address range, e.g. 10.244.0.64/26. Immutable.
    #[schemars(length(max = 43))]
    #[x_kube(
        validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.244.0.64/26"),
        validation = Rule::new("self == oldSelf").message("cidr is immutable: delete the IPBlock and let the operator allocate another")
    )]
    pub cidr: String,
    /// Name of the IPPool the block was taken from. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("pool is immutable: delete the IPBlock and let the operator allocate another"))]
    pub pool: String,
    /// Name of the Node holding the block. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("node is immutable: delete the IPBlock and let the operator allocate another"))]
    pub node: String,
}

/// The object name of the block `cidr`: `10.244.0.64/26` is named `10-244-0-64-26`.
#[must_use]
pub fn block_name(cidr: &str) -> String {
    cidr.chars().map(|c| if matches!(c, '.' | ':' | '/') { '-' } else { c }).collect()
}

impl IPBlock {
    /// A block object named after `cidr`, as the operator creates it.
    #[must_use]
    pub fn for_node(cidr: &str, pool: &str, node: &str) -> Self {
        Self::new(
            &block_name(cidr),
            IPBlockSpec { cidr: cidr.to_owned(), pool: pool.to_owned(), node: node.to_owned() },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_cidr() {
        assert_eq!(block_name("10.244.0.64/26"), "10-244-0-64-26");
        let b = IPBlock::for_node("10.244.1.0/26", "default", "node-a");
        assert_eq!(b.metadata.name.as_deref(), Some("10-244-1-0-26"));
        assert_eq!(b.spec.node, "node-a");
    }
}
