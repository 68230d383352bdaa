//! The plan server: streams each node's plan to its agent over gRPC.

pub mod auth;
pub mod metrics;
pub mod service;
pub mod store;

pub use auth::AgentAuth;
pub use service::PlanServer;
pub use store::PlanStore;
