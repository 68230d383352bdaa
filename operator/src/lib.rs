//! The Weft operator: watches the cluster, compiles a plan per node and streams it to the node
//! agents; the leader replica writes status and claims address blocks.

pub mod k8s;
pub mod plan;
pub mod server;
