//! Writing the iptables backend's chains: only what changed, with `iptables-restore -w --noflush`.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{
    CANARY_RULE, Chain, EXTERNAL_SERVICES, Fragments, JUMPS, NODEPORTS, SERVICES, Table, global_chains,
    owned_chain, render_service, restore_text,
};
use crate::exec::Runner;
use crate::metrics::AgentMetrics;
use crate::proxy::conntrack::UdpFlows;
use crate::proxy::model::{
    Context, ProxyError, ProxyPlan, SyncReport, WrittenService, changed_services, record_removed,
    record_written, render_or_refuse,
};

/// Chains per `iptables-restore` in a big write on iptables-nft (about 180 Services of 10
/// endpoints; iptables-legacy gets one restore): in measurements on iptables-nft 1.8.9 a
/// 1,000-Service full sync took 9.3 s as one input and 3.5–3.7 s in batches of 50–250 Services,
/// each batch costing the same whatever the table's size.
pub const MAX_CHAINS_PER_RESTORE: usize = 2000;

/// What was last written for one Service: its plan version and chain hashes, not the text.
#[derive(Debug, Clone)]
struct Written {
    version: u64,
    chains: Vec<(Table, String, u64)>,
    fragments: Fragments,
    udp: Vec<UdpFlows>,
}

impl WrittenService for Written {
    fn version(&self) -> u64 {
        self.version
    }

    fn udp(&self) -> &[UdpFlows] {
        &self.udp
    }
}

/// What the iptables backend last wrote.
#[derive(Debug)]
pub struct IptablesCache {
    ctx: Option<Context>,
    services: HashMap<String, Written>,
    globals: HashMap<(Table, String), u64>,
    /// False at start, after a failed write and when the check finds the chains tampered with:
    /// the next sync rewrites every chain and deletes the stale ones it finds.
    pub synced: bool,
    max_chains_per_restore: usize,
}

impl Default for IptablesCache {
    fn default() -> Self {
        Self::with_max_chains_per_restore(MAX_CHAINS_PER_RESTORE)
    }
}

impl IptablesCache {
    /// Splits big writes into restores of at most `chains` chains (whole Services each).
    pub fn with_max_chains_per_restore(chains: usize) -> Self {
        Self {
            ctx: None,
            services: HashMap::new(),
            globals: HashMap::new(),
            synced: false,
            max_chains_per_restore: chains.max(1),
        }
    }

    /// Makes the chains match the plan's Services; after an error the next sync is a full one.
    pub fn sync(
        &mut self,
        runner: &Runner,
        ctx: &Context,
        plan: &ProxyPlan<'_>,
        metrics: &AgentMetrics,
        started_unix_ms: i64,
    ) -> Result<SyncReport, ProxyError> {
        let result = self.sync_inner(runner, ctx, plan, metrics, started_unix_ms);
        if result.is_err() {
            self.synced = false;
        }
        result
    }

    fn sync_inner(
        &mut self,
        runner: &Runner,
        ctx: &Context,
        plan: &ProxyPlan<'_>,
        metrics: &AgentMetrics,
        started_unix_ms: i64,
    ) -> Result<SyncReport, ProxyError> {
        let full = !self.synced;
        let rerender_all = full || self.ctx.as_ref() != Some(ctx);

        // Only the Services whose plan resource changed are rendered again.
        let (services, stale, removed) = changed_services(plan, &self.services, rerender_all);
        let mut report = SyncReport { full, services, services_rendered: stale.len(), ..Default::default() };
        if stale.is_empty() && removed.is_empty() && !rerender_all {
            return Ok(report);
        }
        // iptables-legacy reads and rewrites the whole table on every restore, so batches would
        // make a full sync quadratic there: it gets one restore, as kube-proxy does.
        let mut max_chains = self.max_chains_per_restore;
        if full {
            if runner.output("iptables", &["--version"])?.contains("legacy") {
                max_chains = usize::MAX;
            }
            // Before the bulk write, while the tables are small: on the legacy backend every
            // insert reads and rewrites the whole table.
            ensure_jumps(runner)?;
        }

        // iptables-nft's `--noflush` restore grows faster than linearly with the chains in one
        // input, so a big write goes out in batches of whole Services, rendered batch by batch
        // (the text of 10,000 Services is never in memory at once). Every input stands on its
        // own: the shared chains Services jump to (WEFT-MARK-MASQ…) go first, the ones that jump
        // to Services' chains (WEFT-SERVICES…) last, with the deletions (once nothing refers to
        // them). After a failure half-way the next sync is a full one.
        let roots_names = [SERVICES, NODEPORTS, EXTERNAL_SERVICES];
        let leaves: Vec<Chain> = global_chains(ctx, std::iter::empty())
            .into_iter()
            .filter(|c| !roots_names.contains(&c.name.as_str()))
            .filter(|g| full || self.globals.get(&(g.table, g.name.clone())) != Some(&g.hash()))
            .collect();
        let mut fragments_changed = rerender_all || !removed.is_empty();
        let mut delete: BTreeSet<(Table, String)> = BTreeSet::new();
        let mut batch: Vec<Chain> = leaves;
        let mut pending: Vec<(String, Written, i64)> = Vec::new();
        for r in stale {
            let Some((svc, rules)) =
                render_or_refuse(r, &mut report, |svc| render_service(ctx, &r.name, svc))
            else {
                continue;
            };
            let old = self.services.get(&r.name);
            fragments_changed |= old.is_none_or(|o| o.fragments != rules.fragments);
            let mut group = Vec::new();
            let mut chains = Vec::with_capacity(rules.chains.len());
            for c in rules.chains {
                let hash = c.hash();
                chains.push((c.table, c.name.clone(), hash));
                let same = !full
                    && old.is_some_and(|o| {
                        o.chains.iter().any(|(t, n, h)| *t == c.table && *n == c.name && *h == hash)
                    });
                if !same {
                    group.push(c);
                }
            }
            if let Some(old) = old {
                for (t, n, _) in &old.chains {
                    if !chains.iter().any(|(ct, cn, _)| ct == t && cn == n) {
                        delete.insert((*t, n.clone()));
                    }
                }
            }
            if !batch.is_empty() && batch.len() + group.len() > max_chains {
                report.chains_written += batch.len();
                restore(runner, &mut report, &batch, &[])?;
                batch.clear();
                record_written(&mut self.services, runner, metrics, started_unix_ms, pending.drain(..));
            }
            batch.extend(group);
            let written = Written { version: r.version, chains, fragments: rules.fragments, udp: rules.udp };
            pending.push((r.name.clone(), written, svc.last_change_trigger_unix_ms));
        }
        for name in &removed {
            if let Some(old) = self.services.get(name) {
                delete.extend(old.chains.iter().map(|(t, n, _)| (*t, n.clone())));
            }
        }
        let globals = if fragments_changed {
            let fresh: HashMap<&str, &Fragments> =
                pending.iter().map(|(n, w, _)| (n.as_str(), &w.fragments)).collect();
            let ordered = plan.services.iter().filter_map(|r| {
                fresh
                    .get(r.name.as_str())
                    .copied()
                    .or_else(|| self.services.get(&r.name).map(|w| &w.fragments))
            });
            Some(global_chains(ctx, ordered))
        } else {
            None
        };
        if let Some(globals) = &globals {
            for g in globals.iter().filter(|g| roots_names.contains(&g.name.as_str())) {
                if full || self.globals.get(&(g.table, g.name.clone())) != Some(&g.hash()) {
                    batch.push(g.clone());
                }
            }
            for (t, n) in self.globals.keys() {
                if !globals.iter().any(|g| g.table == *t && g.name == *n) {
                    delete.insert((*t, n.clone()));
                }
            }
        }
        if full {
            // Chains left by an earlier run (or an earlier plan) that nothing wants any more.
            let mut wanted: HashSet<(Table, &str)> = HashSet::new();
            for (name, written) in &self.services {
                if !removed.contains(name) {
                    wanted.extend(written.chains.iter().map(|(t, n, _)| (*t, n.as_str())));
                }
            }
            wanted.extend(
                pending.iter().flat_map(|(_, w, _)| w.chains.iter().map(|(t, n, _)| (*t, n.as_str()))),
            );
            wanted.extend(globals.iter().flatten().map(|g| (g.table, g.name.as_str())));
            for table in [Table::Nat, Table::Filter] {
                for name in existing_chains(runner, table)? {
                    if owned_chain(&name) && !wanted.contains(&(table, name.as_str())) {
                        delete.insert((table, name));
                    }
                }
            }
        }
        report.chains_written += batch.len();
        report.chains_deleted = delete.len();
        if !batch.is_empty() || !delete.is_empty() {
            let delete_refs: Vec<(Table, &str)> = delete.iter().map(|(t, n)| (*t, n.as_str())).collect();
            restore(runner, &mut report, &batch, &delete_refs)?;
        }
        record_written(&mut self.services, runner, metrics, started_unix_ms, pending.drain(..));
        record_removed(&mut self.services, runner, removed);
        if let Some(globals) = globals {
            self.globals = globals.iter().map(|g| ((g.table, g.name.clone()), g.hash())).collect();
        }
        self.ctx = Some(ctx.clone());
        self.synced = true;
        Ok(report)
    }

    /// Whether the chains are still as written: the canary rule at the top of both
    /// `WEFT-SERVICES` and the jumps from the built-in chains. When not, the next sync is a full
    /// one; returns false then. A cache that never synced has nothing to check.
    pub fn check(&mut self, runner: &Runner) -> Result<bool, ProxyError> {
        if !self.synced {
            return Ok(self.ctx.is_none());
        }
        let mut intact = true;
        for table in [Table::Nat, Table::Filter] {
            let args = [&["-w", "-t", table.name(), "-C", SERVICES][..], CANARY_RULE].concat();
            intact &= runner.status_ok("iptables", &args)?;
        }
        for jump in JUMPS {
            if !intact {
                break;
            }
            let args = [&["-w", "-t", jump.table.name(), "-C", jump.from][..], jump.args].concat();
            intact &= runner.status_ok("iptables", &args)?;
        }
        if !intact {
            self.synced = false;
        }
        Ok(intact)
    }

    /// Deletes the backend's jumps and chains (the nftables backend took over). Nothing to do
    /// (and little work) when there are none.
    pub fn remove(&mut self, runner: &Runner) -> Result<(), ProxyError> {
        self.synced = false;
        if runner.is_recording() {
            // Every check "passes" there: nothing to learn, nothing to remove.
            return Ok(());
        }
        let mut found = false;
        for jump in JUMPS {
            let check = [&["-w", "-t", jump.table.name(), "-C", jump.from][..], jump.args].concat();
            let delete = [&["-w", "-t", jump.table.name(), "-D", jump.from][..], jump.args].concat();
            while runner.status_ok("iptables", &check)? {
                runner.output("iptables", &delete)?;
                found = true;
            }
        }
        for table in [Table::Nat, Table::Filter] {
            found =
                found || runner.status_ok("iptables", &["-w", "-t", table.name(), "-S", SERVICES, "1"])?;
        }
        if !found {
            return Ok(());
        }
        let mut delete = Vec::new();
        for table in [Table::Nat, Table::Filter] {
            delete.extend(
                existing_chains(runner, table)?.into_iter().filter(|n| owned_chain(n)).map(|n| (table, n)),
            );
        }
        let refs: Vec<(Table, &str)> = delete.iter().map(|(t, n)| (*t, n.as_str())).collect();
        restore(runner, &mut SyncReport::default(), &[], &refs)?;
        tracing::info!(
            chains = delete.len(),
            "iptables service chains removed: the nftables backend took over"
        );
        Ok(())
    }
}

/// One `iptables-restore`, counted in `report`.
fn restore(
    runner: &Runner,
    report: &mut SyncReport,
    write: &[Chain],
    delete: &[(Table, &str)],
) -> Result<(), ProxyError> {
    let text = restore_text(write, delete);
    report.writes += 1;
    report.lines += text.lines().count();
    runner.pipe("iptables-restore", &["-w", "--noflush"], &text)?;
    Ok(())
}

/// The chains of `table` as the kernel has them (only the names of a dump that is tens of
/// megabytes at 10,000 Services).
fn existing_chains(runner: &Runner, table: Table) -> Result<Vec<String>, ProxyError> {
    Ok(runner.filter_lines("iptables-save", &["-t", table.name()], |line| {
        line.strip_prefix(':').and_then(|l| l.split_whitespace().next()).map(String::from)
    })?)
}

/// The rules from the built-in chains into Weft's, each inserted once at the top. A chain jumped
/// to that does not exist yet is created empty; the restore fills it.
fn ensure_jumps(runner: &Runner) -> Result<(), ProxyError> {
    for jump in JUMPS {
        if let Some(target) = jump.args.last() {
            // Fails harmlessly when the chain exists.
            runner.status_ok("iptables", &["-w", "-t", jump.table.name(), "-N", target])?;
        }
        let check = [&["-w", "-t", jump.table.name(), "-C", jump.from][..], jump.args].concat();
        if runner.status_ok("iptables", &check)? {
            continue;
        }
        let insert = [&["-w", "-t", jump.table.name(), "-I", jump.from, "1"][..], jump.args].concat();
        runner.output("iptables", &insert)?;
        tracing::info!(table = jump.table.name(), chain = jump.from, "jump to the service chains inserted");
    }
    Ok(())
}
