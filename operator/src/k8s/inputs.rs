//! The snapshot the leader's writers (IPAM claims, status, the kube-dns Service, metrics) read:
//! published by the index ([`super::cluster`]) after every compile, never imported back by it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use weft_api::v1alpha1 as api;

use super::convert::DnsNode;
use super::ingress::IngressStatusInputs;
use super::policy::PolicyMatch;
use crate::plan::model::ObjectKey;

/// What the leader needs to write status; published after every compile.
#[derive(Debug, Clone, Default)]
pub struct StatusInputs {
    /// Node names and labels (for IPPool node selectors).
    pub nodes: BTreeMap<String, BTreeMap<String, String>>,
    pub pools: Vec<api::IPPool>,
    pub blocks: Vec<api::IPBlock>,
    pub network: Option<api::NetworkConfig>,
    pub policies: Vec<api::ProxyPolicy>,
    pub policy_matches: BTreeMap<ObjectKey, PolicyMatch>,
    /// Whether every watched kind has completed its first list. Inputs are only published once
    /// it has; false only in the channel's initial value, which writers must not act on.
    pub synced: bool,
    /// The nodes' addresses, zones and readiness, for the kube-dns endpoints.
    pub dns_nodes: Vec<DnsNode>,
    /// The address each pod holds (host-network and finished pods left out), for IPAM.
    pub pod_addresses: Arc<BTreeMap<ObjectKey, Ipv4Addr>>,
    /// Ingresses of Weft's class: served or rejected, and the ingress nodes' addresses.
    pub ingress: IngressStatusInputs,
}
