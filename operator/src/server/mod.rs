//! The plan server: streams each node's plan to its agent over gRPC.

pub mod metrics;
pub mod service;
pub mod store;

pub use service::PlanServer;
pub use store::PlanStore;
