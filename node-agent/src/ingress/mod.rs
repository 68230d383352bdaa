//! The ingress controller: nginx, configured from the node's plan (Ingresses of Weft's class,
//! their TLS Secrets, the controller's settings) on the nodes that serve ingress.
//!
//! [`render`] turns the plan into nginx's configuration (pure, snapshot-tested); [`apply`] writes
//! the certificates (mode 0600, atomically) and the configuration, checks it with `nginx -t`, and
//! starts nginx or reloads it gracefully (SIGHUP) — only when something changed. nginx proxies
//! to ClusterIPs, so endpoint changes never reload it. nginx runs as a daemon (its own pid file in
//! `<state-dir>/ingress`), so an agent restart does not interrupt ingress traffic: the new agent
//! adopts the running nginx. A watchdog thread restarts nginx if it dies.

pub mod render;
mod supervisor;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use weft_api::plan as pb;

pub use supervisor::IngressHandle;

use crate::metrics::AgentMetrics;

/// How the agent runs nginx.
#[derive(Debug, Clone)]
pub struct IngressOptions {
    /// The nginx binary.
    pub nginx: PathBuf,
}

impl Default for IngressOptions {
    fn default() -> Self {
        Self { nginx: PathBuf::from("/usr/sbin/nginx") }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("ingress: cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("ingress: cannot run {binary}: {source}")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("ingress: nginx rejected the configuration (kept the previous one): {0}")]
    Rejected(String),
    #[error("ingress: nginx did not start: {0}")]
    Start(String),
    #[error("ingress: cannot signal nginx (pid {pid}): {source}")]
    Signal { pid: i32, source: nix::Error },
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The node does not serve ingress (nginx stopped if it ran).
    Off,
    Unchanged,
    Started,
    Reloaded,
}

/// The ingress part of a node's plan.
#[derive(Debug, Clone, Default)]
pub struct IngressPlan {
    pub node: Option<pb::NodePlan>,
    pub settings: Option<pb::IngressSettings>,
    pub ingresses: Vec<pb::Ingress>,
    /// TLS Secrets by `namespace/name`.
    pub secrets: BTreeMap<String, pb::TlsSecret>,
}

/// Makes nginx serve the plan (or stops it when the node serves no ingress).
pub fn apply(
    plan: &IngressPlan,
    handle: &IngressHandle,
    metrics: &AgentMetrics,
) -> Result<Outcome, IngressError> {
    let span = tracing::info_span!("ingress.apply", ingresses = plan.ingresses.len());
    let _enter = span.enter();
    let started = Instant::now();
    let result = apply_inner(plan, handle, metrics);
    metrics.ingress_apply_duration.observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(outcome) => tracing::debug!(?outcome, "ingress applied"),
        Err(e) => {
            metrics.ingress_apply_errors.inc();
            tracing::warn!(error = %e, "ingress apply failed");
        }
    }
    result
}

fn apply_inner(
    plan: &IngressPlan,
    handle: &IngressHandle,
    metrics: &AgentMetrics,
) -> Result<Outcome, IngressError> {
    let (Some(node), Some(settings)) = (plan.node.as_ref().filter(|n| n.ingress), plan.settings.as_ref())
    else {
        metrics.ingress_rejected.set(0);
        handle.stop()?;
        return Ok(Outcome::Off);
    };
    // nginx listens on the node's address only; without one it would take every address.
    let Ok(node_ip) = node.node_ip.parse::<Ipv4Addr>() else {
        tracing::warn!(node_ip = %node.node_ip, "the node has no IPv4 address: not serving ingress");
        handle.stop()?;
        return Ok(Outcome::Off);
    };
    let node_ip = Some(node_ip);
    let desired = render::render(node_ip, settings, &plan.ingresses, &plan.secrets, &handle.paths());
    for (name, why) in &desired.rejected {
        tracing::warn!(ingress = %name, reason = %why, "Ingress left out of the nginx configuration");
    }
    metrics.ingress_rejected.set(i64::try_from(desired.rejected.len()).unwrap_or(i64::MAX));
    let outcome = handle.serve(&desired)?;
    if outcome == Outcome::Reloaded {
        metrics.ingress_reloads.inc();
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests;
