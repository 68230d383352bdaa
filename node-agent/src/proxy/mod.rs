//! The service proxy: kube-proxy's Service semantics, written by one of two backends.
//!
//! ```text
//! model      ProxyPlan (settings + Services) → Context, PortPlan: what each port does here
//! iptables   render (pure) → chains; apply: only the changed chains, iptables-restore
//! nftables   render (pure) → elements, chains; diff (Changes); apply: one nft transaction
//! conntrack  stale UDP flows, kube-proxy's TCP timeouts (both backends)
//! health     kube-proxy's health and /proxyMode endpoints, health check node ports
//! ```
//!
//! [`ProxyCache`] is the dispatcher: it owns the mode switch (the new backend's rules go in
//! before the old one's come out), the periodic check, the health server and the sync's span and
//! metrics. The backends import the model, never each other or the dispatcher; the external
//! commands they run go through [`crate::exec::Runner`].

pub mod conntrack;
#[cfg(test)]
mod fixtures;
pub mod health;
pub mod iptables;
pub mod model;
pub mod nftables;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use tracing::field::Empty;
use weft_api::plan as pb;

use crate::exec::Runner;
use crate::metrics::{AgentMetrics, ResultLabel};
use health::{Health, HealthServer};
use iptables::IptablesCache;
pub use model::{Context, ProxyError, ProxyPlan, SyncReport, mode_name};
use nftables::NftCache;

#[derive(Debug)]
struct State {
    iptables: IptablesCache,
    nft: NftCache,
    /// The backend of the last successful sync (None before the first).
    active: Option<pb::ProxyMode>,
    /// `iptables-restore` or `nft` processes run so far.
    writes: u64,
    /// Trigger times older than this are not observed as programming latency: they were
    /// programmed by an earlier run (kube-proxy skips them the same way).
    started_unix_ms: i64,
}

/// What the proxy last wrote, shared by the programmer's syncs and its periodic check (which
/// serialize on it).
#[derive(Debug, Clone)]
pub struct ProxyCache {
    state: Arc<Mutex<State>>,
    runner: Runner,
    health: HealthServer,
}

impl Default for ProxyCache {
    fn default() -> Self {
        Self::with_runner(Runner::default())
    }
}

impl ProxyCache {
    pub fn with_runner(runner: Runner) -> Self {
        Self::with_backends(runner, IptablesCache::default())
    }

    /// With an iptables backend that splits big writes into restores of at most `chains` chains.
    pub fn with_max_chains_per_restore(runner: Runner, chains: usize) -> Self {
        Self::with_backends(runner, IptablesCache::with_max_chains_per_restore(chains))
    }

    fn with_backends(runner: Runner, iptables: IptablesCache) -> Self {
        let health = HealthServer::new(runner.netns().map(String::from));
        let state = State {
            iptables,
            nft: NftCache::default(),
            active: None,
            writes: 0,
            started_unix_ms: model::now_unix_ms(),
        };
        Self { state: Arc::new(Mutex::new(state)), runner, health }
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many times rules were written (`iptables-restore` or `nft` runs).
    pub fn restores(&self) -> u64 {
        self.lock().writes
    }

    /// Forgets what was written: the next sync rewrites everything.
    pub fn invalidate(&self) {
        let mut state = self.lock();
        state.iptables.synced = false;
        state.nft.synced = false;
    }

    /// Makes the node's rules match the plan's Services. Fail-static: on any error nothing is
    /// flushed, the error is returned (the plan is NACKed) and the next sync rewrites every rule.
    pub fn sync(&self, plan: &ProxyPlan<'_>, metrics: &AgentMetrics) -> Result<SyncReport, ProxyError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "proxy.sync",
            services = Empty,
            chains_changed = Empty,
            lines = Empty,
            full = Empty
        );
        let _enter = span.enter();
        let mut state = self.lock();
        let result = self.sync_locked(&mut state, plan, metrics);
        match &result {
            Ok(report) => {
                state.writes += report.writes as u64;
                // The health endpoints follow the rules just written.
                if let (false, Some(mode)) = (self.runner.is_recording(), state.active) {
                    match health::checks(&plan.services) {
                        Ok(checks) => self.health.set(Health {
                            checks,
                            mode: mode_name(mode),
                            last_updated: SystemTime::now(),
                            healthy: true,
                        }),
                        Err(e) => tracing::warn!(error = %e, "health check node ports left as they were"),
                    }
                }
                span.record("services", report.services);
                span.record("chains_changed", report.chains_written + report.chains_deleted);
                span.record("lines", report.lines);
                span.record("full", report.full);
                metrics.proxy_services_refused.set(i64::try_from(report.refused.len()).unwrap_or(i64::MAX));
                let result = if report.lines == 0 { "unchanged" } else { "changed" };
                metrics.proxy_syncs.get_or_create(&ResultLabel { result }).inc();
                if report.lines > 0 {
                    metrics.proxy_sync_lines.observe(report.lines as f64);
                    metrics.proxy_sync_duration.observe(started.elapsed().as_secs_f64());
                    tracing::info!(
                        services = report.services,
                        rendered = report.services_rendered,
                        written = report.chains_written,
                        deleted = report.chains_deleted,
                        lines = report.lines,
                        full = report.full,
                        "service rules written"
                    );
                }
            }
            Err(e) => {
                state.iptables.synced = false;
                state.nft.synced = false;
                self.health.set_unhealthy();
                metrics.proxy_syncs.get_or_create(&ResultLabel { result: "error" }).inc();
                tracing::warn!(error = %e, "service rules not written; the previous ones stay");
            }
        }
        result
    }

    fn sync_locked(
        &self,
        state: &mut State,
        plan: &ProxyPlan<'_>,
        metrics: &AgentMetrics,
    ) -> Result<SyncReport, ProxyError> {
        let Some(net) = &plan.network else { return Ok(SyncReport::default()) };
        let ctx = Context::from_settings(net)?;
        let mode = net.proxy_mode();
        // First sync, or the backend changed: the new backend's rules are written first, and
        // what the other one left goes only once they are in (a failed write leaves the node
        // with the old rules, not none).
        let switched = state.active != Some(mode);
        let started_unix_ms = state.started_unix_ms;
        let report = match mode {
            pb::ProxyMode::Nftables => state.nft.sync(&self.runner, &ctx, plan, metrics, started_unix_ms)?,
            pb::ProxyMode::Iptables => {
                if switched {
                    state.iptables.synced = false;
                }
                state.iptables.sync(&self.runner, &ctx, plan, metrics, started_unix_ms)?
            }
        };
        if state.active.is_none() {
            // The first rules have loaded nf_conntrack: its sysctls exist now.
            conntrack::set_conntrack_timeouts(&self.runner);
        }
        if switched {
            match mode {
                pb::ProxyMode::Nftables => {
                    if let Err(e) = state.iptables.remove(&self.runner) {
                        tracing::warn!(error = %e, "cannot remove the iptables service chains");
                    }
                }
                pb::ProxyMode::Iptables => state.nft.remove(&self.runner),
            }
        }
        state.active = Some(mode);
        Ok(report)
    }

    /// Whether the active backend's rules are still as written. When not, its cache is dropped
    /// and the next sync is a full one; returns false then.
    pub fn check(&self, metrics: &AgentMetrics) -> Result<bool, ProxyError> {
        let mut state = self.lock();
        let (was_synced, intact) = match state.active {
            Some(pb::ProxyMode::Nftables) => (state.nft.synced, state.nft.check(&self.runner)?),
            _ => (state.iptables.synced, state.iptables.check(&self.runner)?),
        };
        // Not synced (a failed write): false asks for the sync that was due anyway.
        if !intact && was_synced {
            tracing::warn!(
                backend = state.active.map(mode_name).unwrap_or("none"),
                "the service rules were flushed or deleted behind Weft's back; rewriting all of them"
            );
            metrics.proxy_full_resyncs.inc();
        }
        Ok(intact)
    }
}
