//! Everything that talks to the Kubernetes API: watching the cluster into the compiler,
//! converting objects, resolving ProxyPolicies, and writing status and Events.

pub mod cluster;
pub mod convert;
pub mod dns;
pub mod ingress;
pub mod ipam;
pub mod metrics;
pub mod policy;
pub mod status;
