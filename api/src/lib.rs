//! Weft's shared API: the custom resources (`weft.io/v1alpha1`), the gRPC plan protocol spoken
//! between the operator and the node agents, and the telemetry setup both binaries share.

pub mod ingress;
pub mod plan;
pub mod tasks;
pub mod telemetry;
#[cfg(feature = "crds")]
pub mod v1alpha1;
