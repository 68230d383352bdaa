//! The Weft node agent: receives its node's plan from the operator over gRPC and programs the
//! node from it.
//!
//! Fail-static by design: the last plan received is kept on disk and what was programmed is never
//! flushed because the operator went away; a plan that cannot be applied is NACKed and retried
//! while the node keeps serving its last applied state.

pub mod client;
pub mod cni;
pub mod daemon;
pub mod dns;
pub mod exec;
pub mod files;
pub mod ingress;
pub mod ipam;
pub mod metrics;
pub mod nft;
pub mod plan_state;
pub mod plugin;
pub mod policy;
pub mod programmers;
pub mod proxy;
pub mod retry;
pub mod routes;

pub use client::{AgentConfig, AgentStatus, run, spawn};
