//! Writing the nftables table: a full sync replaces the table in one transaction; after that each
//! sync writes only the elements, chains and sets of the Services that changed, also in one.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use super::{Changes, Claim, Pick, SHARED_CHAINS, TABLE, Written, base, render_service};
use crate::exec::Runner;
use crate::metrics::AgentMetrics;
use crate::proxy::conntrack::UdpFlows;
use crate::proxy::model::{
    Context, ProxyError, ProxyPlan, SyncReport, WrittenService, changed_services, record_removed,
    record_written, render_or_refuse,
};

#[derive(Debug, Clone)]
struct Service {
    version: u64,
    written: Written,
    udp: Vec<UdpFlows>,
}

impl WrittenService for Service {
    fn version(&self) -> u64 {
        self.version
    }

    fn udp(&self) -> &[UdpFlows] {
        &self.udp
    }
}

/// What the nftables backend last wrote: per Service its elements and chain hashes (not text).
#[derive(Debug, Default)]
pub struct NftCache {
    ctx: Option<Context>,
    services: HashMap<String, Service>,
    picks: BTreeSet<Pick>,
    /// How many Services have each endpoint (the hairpin set holds those above 0).
    hairpin: HashMap<Ipv4Addr, u32>,
    /// Which Service owns each map key it wrote: the first to claim a key keeps it; the other's
    /// element is left out (logged) instead of failing the whole transaction.
    claims: HashMap<Claim, String>,
    /// Keys some Service was left out of: when their owner lets go, the waiting Service's
    /// element must be written at once (a full sync re-renders every Service in name order).
    contested: HashSet<Claim>,
    /// False at start, after a failed write and when the check finds the table tampered with:
    /// the next sync replaces the whole table.
    pub synced: bool,
}

impl NftCache {
    pub fn sync(
        &mut self,
        runner: &Runner,
        ctx: &Context,
        plan: &ProxyPlan<'_>,
        metrics: &AgentMetrics,
        started_unix_ms: i64,
    ) -> Result<SyncReport, ProxyError> {
        let full = !self.synced || self.ctx.as_ref() != Some(ctx);
        if full {
            self.services.clear();
            self.picks.clear();
            self.hairpin.clear();
            self.claims.clear();
            self.contested.clear();
        }
        let mut freed_contested = false;
        let (services, stale, removed) = changed_services(plan, &self.services, false);
        let mut report = SyncReport { full, services, services_rendered: stale.len(), ..Default::default() };
        if !full && stale.is_empty() && removed.is_empty() {
            return Ok(report);
        }

        let mut changes = Changes::default();
        let mut hairpin: HashMap<Ipv4Addr, i64> = HashMap::new();
        let mut pending: Vec<(String, Service, i64)> = Vec::with_capacity(stale.len());
        for r in stale {
            let Some((svc, mut rules)) =
                render_or_refuse(r, &mut report, |svc| render_service(ctx, &r.name, svc))
            else {
                continue;
            };
            let old = self.services.get(&r.name);
            if let Some(old) = old {
                for e in &old.written.elements {
                    if self.claims.get(&e.claim()).is_some_and(|owner| *owner == r.name) {
                        self.claims.remove(&e.claim());
                        freed_contested |= self.contested.contains(&e.claim());
                    }
                }
            }
            rules.elements.retain(|e| match self.claims.get(&e.claim()) {
                Some(owner) if *owner != r.name => {
                    tracing::warn!(service = %r.name, owner = %owner, key = %e.key(), "map key taken by another Service; left out");
                    self.contested.insert(e.claim());
                    false
                }
                _ => {
                    self.claims.insert(e.claim(), r.name.clone());
                    true
                }
            });
            changes.service(old.map(|o| &o.written), &rules);
            for ip in old.iter().flat_map(|o| &o.written.hairpin_endpoints) {
                *hairpin.entry(*ip).or_default() -= 1;
            }
            for ip in &rules.hairpin_endpoints {
                *hairpin.entry(*ip).or_default() += 1;
            }
            let (written, udp) = Written::of(rules);
            let written = Service { version: r.version, written, udp };
            pending.push((r.name.clone(), written, svc.last_change_trigger_unix_ms));
        }
        for name in &removed {
            if let Some(old) = self.services.get(name) {
                changes.removed(&old.written);
                for e in &old.written.elements {
                    if self.claims.get(&e.claim()).is_some_and(|owner| owner == name) {
                        self.claims.remove(&e.claim());
                        freed_contested |= self.contested.contains(&e.claim());
                    }
                }
                for ip in &old.written.hairpin_endpoints {
                    *hairpin.entry(*ip).or_default() -= 1;
                }
            }
        }
        let mut counts = self.hairpin.clone();
        for (ip, delta) in hairpin {
            let before = counts.get(&ip).copied().unwrap_or(0);
            let after = u32::try_from(i64::from(before) + delta).unwrap_or(0);
            match (before, after) {
                (0, a) if a > 0 => changes.hairpin_add.push(ip),
                (b, 0) if b > 0 => changes.hairpin_delete.push(ip),
                _ => {}
            }
            if after == 0 {
                counts.remove(&ip);
            } else {
                counts.insert(ip, after);
            }
        }
        changes.hairpin_add.sort();
        changes.hairpin_delete.sort();
        let new_picks: Vec<Pick> = changes.picks().into_iter().filter(|p| !self.picks.contains(p)).collect();
        for p in &new_picks {
            changes.pick(ctx, *p);
        }

        let mut text = if full { base(ctx) } else { String::new() };
        changes.write(&mut text);
        report.chains_written = changes.chains_written();
        report.chains_deleted = changes.chains_deleted();
        report.lines = text.lines().count();
        if !changes.is_empty() || full {
            nft(runner, &text)?;
            report.writes += 1;
        }
        record_written(&mut self.services, runner, metrics, started_unix_ms, pending.into_iter());
        record_removed(&mut self.services, runner, removed);
        self.picks.extend(new_picks);
        self.hairpin = counts;
        self.ctx = Some(ctx.clone());
        self.synced = true;
        if freed_contested {
            // A Service waits for a key its owner just let go of. Only a full sync renders it
            // again; it replaces the table in one transaction, as after a restart.
            tracing::info!("a contested map key was freed; rewriting the table so its next claimant gets it");
            self.synced = false;
            let rewrite = self.sync(runner, ctx, plan, metrics, started_unix_ms)?;
            report.full = true;
            report.lines += rewrite.lines;
            report.writes += rewrite.writes;
            report.chains_written += rewrite.chains_written;
        }
        Ok(report)
    }

    /// Whether the table is still there with its hooks and shared chains (a `nft flush ruleset`
    /// or a deleted table or chain fails it). When not, the next sync replaces the table; returns
    /// false then. A cache that never synced has nothing to check. Only chains are listed: `nft
    /// list chain` reads every map element into nft's cache first (2 s at 10,000 Services, every
    /// 5 s), so a chain emptied by hand inside the table is not noticed.
    pub fn check(&mut self, runner: &Runner) -> Result<bool, ProxyError> {
        if !self.synced || runner.is_recording() {
            return Ok(true);
        }
        // A failure (no table at all) is a finding, not an error.
        let listing = runner.output("nft", &["-j", "list", "chains", "ip"]).unwrap_or_default();
        let intact = crate::nft::chains_present(&listing, TABLE, &SHARED_CHAINS);
        if !intact {
            self.synced = false;
        }
        Ok(intact)
    }

    /// Deletes the table (another backend takes over). Best effort.
    pub fn remove(&mut self, runner: &Runner) {
        self.synced = false;
        self.ctx = None;
        if runner.is_recording() {
            return;
        }
        if nft(runner, &format!("delete table ip {TABLE}\n")).is_ok() {
            tracing::debug!("nftables service proxy table removed");
        }
    }
}

/// One `nft -f -` transaction: all of `input` or nothing.
fn nft(runner: &Runner, input: &str) -> Result<(), ProxyError> {
    runner.pipe("nft", &["-f", "-"], input)?;
    Ok(())
}
