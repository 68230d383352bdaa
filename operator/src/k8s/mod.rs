//! Everything that talks to the Kubernetes API. The index: `cluster` (the watches → one
//! `ClusterView` → the compiler and the plan store), with `convert` (objects → the compiler's
//! model), `policy` (ProxyPolicy matching) and `ingress`'s converters. What the index publishes
//! for the leader: `inputs` (`StatusInputs`). The leader's writers, which read `inputs` and never
//! the index: `ipam` (IPBlock claims), `status` (status and Events), `dns` (the kube-dns Service),
//! `metrics`; `pools` holds the IPPool views that IPAM, status and metrics share.

pub mod cluster;
pub mod cluster_network_policy;
pub mod convert;
pub mod dns;
pub mod ingress;
pub mod inputs;
pub mod ipam;
pub mod metrics;
pub mod network_policy;
pub mod policy;
pub mod pools;
pub mod status;
