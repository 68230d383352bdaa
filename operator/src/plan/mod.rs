//! The plan: what each node must program, compiled from the cluster state.

pub mod compile;
pub mod ingress;
pub mod model;
pub mod policy;

pub use compile::Compiler;
pub use model::{Scope, Update};

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
