//! Writing the proxy's chains: only what changed, with one `iptables-restore -w --noflush`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::field::Empty;
use weft_api::plan::{self as pb, Kind};

use super::{
    CANARY_RULE, Chain, Context, EXTERNAL_SERVICES, Fragments, JUMPS, NODEPORTS, ProxyError, SERVICES, Table,
    UdpFlows, global_chains, mode_name, owned_chain, render_service, restore_text,
};
use crate::metrics::{AgentMetrics, ResultLabel};
use crate::plan_state::PlanState;
use crate::proxy::health::{self, Health, HealthServer};
use crate::proxy::nft::NftCache;

/// Runs the iptables tools: in the agent's own network namespace, in a named one through
/// `ip netns exec` (tests, benchmarks), or nowhere, only recording the `iptables-restore` inputs
/// (unit tests, render benchmarks: every check passes, no chain exists beforehand).
#[derive(Debug, Clone, Default)]
pub struct Runner {
    netns: Option<String>,
    recorded: Option<Arc<Mutex<Vec<String>>>>,
}

impl Runner {
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self { netns: Some(name.into()), recorded: None }
    }

    pub fn recording() -> Self {
        Self { netns: None, recorded: Some(Arc::default()) }
    }

    /// The `iptables-restore` inputs recorded so far, oldest first (recording runners only).
    pub fn recorded(&self) -> Vec<String> {
        self.recorded
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn status_ok(&self, program: &str, args: &[&str]) -> Result<bool, ProxyError> {
        if self.recorded.is_some() {
            return Ok(true);
        }
        self.command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .map_err(|source| ProxyError::Io { what: format!("cannot run {program}"), source })
    }

    pub(crate) fn output(&self, program: &str, args: &[&str]) -> Result<String, ProxyError> {
        if self.recorded.is_some() {
            return Ok(String::new());
        }
        let out = self
            .command(program)
            .args(args)
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| ProxyError::Io { what: format!("cannot run {program}"), source })?;
        if !out.status.success() {
            return Err(ProxyError::Command {
                what: format!("{program} {}", args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn is_recording(&self) -> bool {
        self.recorded.is_some()
    }

    /// Runs `program args` with `input` on its stdin; its stdout when it succeeds.
    fn pipe(&self, program: &str, args: &[&str], input: &str) -> Result<String, ProxyError> {
        if let Some(recorded) = &self.recorded {
            recorded.lock().unwrap_or_else(PoisonError::into_inner).push(input.to_string());
            return Ok(String::new());
        }
        let what = format!("{program} {}", args.join(" "));
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ProxyError::Io { what: format!("cannot run {program}"), source })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|source| ProxyError::Io { what: format!("cannot write to {program}"), source })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| ProxyError::Io { what: format!("cannot wait for {program}"), source })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ProxyError::Command {
                what,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn restore(&self, input: &str) -> Result<(), ProxyError> {
        self.pipe("iptables-restore", &["-w", "--noflush"], input).map(drop)
    }

    /// One `nft -f -` transaction: all of `input` or nothing.
    pub(crate) fn nft(&self, input: &str) -> Result<(), ProxyError> {
        self.pipe("nft", &["-f", "-"], input).map(drop)
    }
}

/// What was last written for one Service: its plan version and chain hashes, not the text.
#[derive(Debug, Clone)]
struct Written {
    version: u64,
    chains: Vec<(Table, String, u64)>,
    fragments: Fragments,
    udp: Vec<UdpFlows>,
}

#[derive(Debug)]
struct State {
    ctx: Option<Context>,
    services: HashMap<String, Written>,
    globals: HashMap<(Table, String), u64>,
    /// False at start, after a failed write and when the check finds the chains tampered with:
    /// the next sync rewrites every chain and deletes the stale ones it finds.
    synced: bool,
    /// `iptables-restore` processes run so far.
    restores: u64,
    /// Trigger times older than this are not observed as programming latency: they were
    /// programmed by an earlier run (kube-proxy skips them the same way).
    started_unix_ms: i64,
    /// The backend of the last successful sync (None before the first).
    active: Option<pb::ProxyMode>,
    nft: NftCache,
}

impl Default for State {
    fn default() -> Self {
        Self {
            ctx: None,
            services: HashMap::new(),
            globals: HashMap::new(),
            synced: false,
            restores: 0,
            started_unix_ms: now_unix_ms(),
            active: None,
            nft: NftCache::default(),
        }
    }
}

pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// What the proxy last wrote, shared by the programmer's syncs and its periodic check (which
/// serialize on it).
#[derive(Debug, Clone)]
pub struct ProxyCache {
    state: Arc<Mutex<State>>,
    runner: Runner,
    max_chains_per_restore: usize,
    health: HealthServer,
}

impl Default for ProxyCache {
    fn default() -> Self {
        Self::with_runner(Runner::default())
    }
}

/// Chains per `iptables-restore` in a big write on iptables-nft (about 180 Services of 10
/// endpoints; iptables-legacy gets one restore): in measurements on iptables-nft 1.8.9 a
/// 1,000-Service full sync took 9.3 s as one input and 3.5–3.7 s in batches of 50–250 Services,
/// each batch costing the same whatever the table's size.
pub const MAX_CHAINS_PER_RESTORE: usize = 2000;

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Every chain was rewritten (first sync, after an error or a tampering).
    pub full: bool,
    pub services: usize,
    pub services_rendered: usize,
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// Lines given to `iptables-restore` (0: it was not run).
    pub lines: usize,
}

impl ProxyCache {
    pub fn with_runner(runner: Runner) -> Self {
        let health = HealthServer::new(runner.netns.clone());
        Self { state: Arc::default(), runner, max_chains_per_restore: MAX_CHAINS_PER_RESTORE, health }
    }

    /// Splits big writes into restores of at most `chains` chains (whole Services each).
    pub fn with_max_chains_per_restore(mut self, chains: usize) -> Self {
        self.max_chains_per_restore = chains.max(1);
        self
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many times rules were written (`iptables-restore` or `nft` runs).
    pub fn restores(&self) -> u64 {
        self.lock().restores
    }

    /// Forgets what was written: the next sync rewrites everything.
    pub fn invalidate(&self) {
        let mut state = self.lock();
        state.synced = false;
        state.nft.synced = false;
    }

    /// Makes the node's chains match the plan's Services. Fail-static: on any error nothing is
    /// flushed, the error is returned (the plan is NACKed) and the next sync rewrites every chain.
    pub fn sync(&self, plan: &PlanState, metrics: &AgentMetrics) -> Result<SyncReport, ProxyError> {
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
                // The health endpoints follow the rules just written.
                if let (None, Some(mode)) = (&self.runner.recorded, state.active) {
                    match health::checks(plan) {
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
                state.synced = false;
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
        plan: &PlanState,
        metrics: &AgentMetrics,
    ) -> Result<SyncReport, ProxyError> {
        let Some(net) = plan.of_kind(Kind::Network).next() else { return Ok(SyncReport::default()) };
        let net: pb::NetworkSettings =
            net.decode().map_err(|source| ProxyError::Decode { name: "network settings".into(), source })?;
        let ctx = Context::from_settings(&net)?;
        let mode = net.proxy_mode();
        // First sync, or the backend changed: the new backend's rules are written first, and
        // what the other one left goes only once they are in (a failed write leaves the node
        // with the old rules, not none).
        let switched = state.active != Some(mode);
        let report = match mode {
            pb::ProxyMode::Nftables => {
                let report = state.nft.sync(&self.runner, &ctx, plan, metrics, state.started_unix_ms)?;
                state.restores += u64::from(report.lines > 0);
                if state.active.is_none() {
                    set_conntrack_timeouts(&self.runner);
                }
                state.active = Some(mode);
                report
            }
            pb::ProxyMode::Iptables => {
                if switched {
                    state.synced = false;
                }
                self.sync_iptables(state, ctx, plan, metrics, mode)?
            }
        };
        if switched {
            match mode {
                pb::ProxyMode::Nftables => {
                    if let Err(e) = self.remove_iptables() {
                        tracing::warn!(error = %e, "cannot remove the iptables service chains");
                    }
                    state.synced = false;
                }
                pb::ProxyMode::Iptables => state.nft.remove(&self.runner),
            }
        }
        Ok(report)
    }

    /// The iptables backend's part of [`ProxyCache::sync`].
    fn sync_iptables(
        &self,
        state: &mut State,
        ctx: Context,
        plan: &PlanState,
        metrics: &AgentMetrics,
        mode: pb::ProxyMode,
    ) -> Result<SyncReport, ProxyError> {
        let full = !state.synced;
        let rerender_all = full || state.ctx.as_ref() != Some(&ctx);

        // Only the Services whose plan resource changed are rendered again.
        let (services, stale, removed) = changed_services(plan, &state.services, |w| w.version, rerender_all);
        let mut report = SyncReport { full, services, services_rendered: stale.len(), ..Default::default() };
        if stale.is_empty() && removed.is_empty() && !rerender_all {
            return Ok(report);
        }
        // iptables-legacy reads and rewrites the whole table on every restore, so batches would
        // make a full sync quadratic there: it gets one restore, as kube-proxy does.
        let mut max_chains = self.max_chains_per_restore;
        if full {
            if self.runner.output("iptables", &["--version"])?.contains("legacy") {
                max_chains = usize::MAX;
            }
            // Before the bulk write, while the tables are small: on the legacy backend every
            // insert reads and rewrites the whole table.
            self.ensure_jumps()?;
        }

        // iptables-nft's `--noflush` restore grows faster than linearly with the chains in one
        // input, so a big write goes out in batches of whole Services, rendered batch by batch
        // (the text of 10,000 Services is never in memory at once). Every input stands on its
        // own: the shared chains Services jump to (WEFT-MARK-MASQ…) go first, the ones that jump
        // to Services' chains (WEFT-SERVICES…) last, with the deletions (once nothing refers to
        // them). After a failure half-way the next sync is a full one.
        let roots_names = [SERVICES, NODEPORTS, EXTERNAL_SERVICES];
        let leaves: Vec<Chain> = global_chains(&ctx, std::iter::empty())
            .into_iter()
            .filter(|c| !roots_names.contains(&c.name.as_str()))
            .filter(|g| full || state.globals.get(&(g.table, g.name.clone())) != Some(&g.hash()))
            .collect();
        let mut fragments_changed = rerender_all || !removed.is_empty();
        let mut delete: BTreeSet<(Table, String)> = BTreeSet::new();
        let mut batch: Vec<Chain> = leaves;
        let mut pending: Vec<(String, Written, i64)> = Vec::new();
        for r in stale {
            let svc: pb::Service =
                r.decode().map_err(|source| ProxyError::Decode { name: r.name.clone(), source })?;
            let rules = render_service(&ctx, &r.name, &svc)?;
            let old = state.services.get(&r.name);
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
                report.lines += self.restore(state, &batch, &[])?;
                batch.clear();
                self.commit(state, metrics, pending.drain(..));
            }
            batch.extend(group);
            let written = Written { version: r.version, chains, fragments: rules.fragments, udp: rules.udp };
            pending.push((r.name.clone(), written, svc.last_change_trigger_unix_ms));
        }
        for name in &removed {
            if let Some(old) = state.services.get(name) {
                delete.extend(old.chains.iter().map(|(t, n, _)| (*t, n.clone())));
            }
        }
        let globals = if fragments_changed {
            let fresh: HashMap<&str, &Fragments> =
                pending.iter().map(|(n, w, _)| (n.as_str(), &w.fragments)).collect();
            let ordered = plan.of_kind(Kind::Service).filter_map(|r| {
                fresh
                    .get(r.name.as_str())
                    .copied()
                    .or_else(|| state.services.get(&r.name).map(|w| &w.fragments))
            });
            Some(global_chains(&ctx, ordered))
        } else {
            None
        };
        if let Some(globals) = &globals {
            for g in globals.iter().filter(|g| roots_names.contains(&g.name.as_str())) {
                if full || state.globals.get(&(g.table, g.name.clone())) != Some(&g.hash()) {
                    batch.push(g.clone());
                }
            }
            for (t, n) in state.globals.keys() {
                if !globals.iter().any(|g| g.table == *t && g.name == *n) {
                    delete.insert((*t, n.clone()));
                }
            }
        }
        if full {
            // Chains left by an earlier run (or an earlier plan) that nothing wants any more.
            let mut wanted: HashSet<(Table, &str)> = HashSet::new();
            for (name, written) in &state.services {
                if !removed.contains(name) {
                    wanted.extend(written.chains.iter().map(|(t, n, _)| (*t, n.as_str())));
                }
            }
            wanted.extend(
                pending.iter().flat_map(|(_, w, _)| w.chains.iter().map(|(t, n, _)| (*t, n.as_str()))),
            );
            wanted.extend(globals.iter().flatten().map(|g| (g.table, g.name.as_str())));
            for table in [Table::Nat, Table::Filter] {
                for name in self.existing_chains(table)? {
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
            report.lines += self.restore(state, &batch, &delete_refs)?;
        }
        self.commit(state, metrics, pending.drain(..));
        for name in removed {
            if let Some(old) = state.services.remove(&name) {
                clear_udp(&self.runner, &old.udp, &[]);
            }
        }
        if let Some(globals) = globals {
            state.globals = globals.iter().map(|g| ((g.table, g.name.clone()), g.hash())).collect();
        }
        state.ctx = Some(ctx);
        state.synced = true;
        if state.active.is_none() {
            set_conntrack_timeouts(&self.runner);
        }
        state.active = Some(mode);
        Ok(report)
    }

    /// Records Services whose chains were just written: the cache, stale UDP flows, and the
    /// programming latency of their change.
    fn commit(
        &self,
        state: &mut State,
        metrics: &AgentMetrics,
        written: impl Iterator<Item = (String, Written, i64)>,
    ) {
        // After the restore that wrote them: the SLI ends when the rules are in the kernel.
        let now_ms = now_unix_ms();
        for (name, new, trigger) in written {
            let old = state.services.get(&name);
            if let Some(old) = old {
                clear_udp(&self.runner, &old.udp, &new.udp);
            }
            if old.is_none_or(|o| o.version != new.version) {
                observe_programming_latency(metrics, state.started_unix_ms, now_ms, trigger);
            }
            state.services.insert(name, new);
        }
    }

    /// One `iptables-restore`; returns the lines written.
    fn restore(
        &self,
        state: &mut State,
        write: &[Chain],
        delete: &[(Table, &str)],
    ) -> Result<usize, ProxyError> {
        let text = restore_text(write, delete);
        state.restores += 1;
        self.runner.restore(&text)?;
        Ok(text.lines().count())
    }

    /// The chains of `table` as the kernel has them (read line by line: at 10,000 Services the
    /// dump is tens of megabytes, of which only the chain names are kept).
    fn existing_chains(&self, table: Table) -> Result<Vec<String>, ProxyError> {
        if self.runner.recorded.is_some() {
            return Ok(Vec::new());
        }
        let what = format!("iptables-save -t {}", table.name());
        let mut child = self
            .runner
            .command("iptables-save")
            .args(["-t", table.name()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ProxyError::Io { what: "cannot run iptables-save".into(), source })?;
        let mut chains = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let line = line.map_err(|source| ProxyError::Io { what: what.clone(), source })?;
                if let Some(name) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next()) {
                    chains.push(name.to_string());
                }
            }
        }
        let status = child.wait().map_err(|source| ProxyError::Io { what: what.clone(), source })?;
        if !status.success() {
            return Err(ProxyError::Command { what, message: format!("exited with {status}") });
        }
        Ok(chains)
    }

    /// The rules from the built-in chains into Weft's, each inserted once at the top. A chain
    /// jumped to that does not exist yet is created empty; the restore fills it.
    fn ensure_jumps(&self) -> Result<(), ProxyError> {
        for jump in JUMPS {
            if let Some(target) = jump.args.last() {
                // Fails harmlessly when the chain exists.
                self.runner.status_ok("iptables", &["-w", "-t", jump.table.name(), "-N", target])?;
            }
            let check = [&["-w", "-t", jump.table.name(), "-C", jump.from][..], jump.args].concat();
            if self.runner.status_ok("iptables", &check)? {
                continue;
            }
            let insert = [&["-w", "-t", jump.table.name(), "-I", jump.from, "1"][..], jump.args].concat();
            self.runner.output("iptables", &insert)?;
            tracing::info!(
                table = jump.table.name(),
                chain = jump.from,
                "jump to the service chains inserted"
            );
        }
        Ok(())
    }

    /// Deletes the iptables backend's jumps and chains (the nftables backend took over). Nothing
    /// to do (and little work) when there are none.
    fn remove_iptables(&self) -> Result<(), ProxyError> {
        if self.runner.is_recording() {
            // Every check "passes" there: nothing to learn, nothing to remove.
            return Ok(());
        }
        let mut found = false;
        for jump in JUMPS {
            let check = [&["-w", "-t", jump.table.name(), "-C", jump.from][..], jump.args].concat();
            let delete = [&["-w", "-t", jump.table.name(), "-D", jump.from][..], jump.args].concat();
            while self.runner.status_ok("iptables", &check)? {
                self.runner.output("iptables", &delete)?;
                found = true;
            }
        }
        for table in [Table::Nat, Table::Filter] {
            found = found
                || self.runner.status_ok("iptables", &["-w", "-t", table.name(), "-S", SERVICES, "1"])?;
        }
        if !found {
            return Ok(());
        }
        let mut delete = Vec::new();
        for table in [Table::Nat, Table::Filter] {
            delete.extend(
                self.existing_chains(table)?.into_iter().filter(|n| owned_chain(n)).map(|n| (table, n)),
            );
        }
        let refs: Vec<(Table, &str)> = delete.iter().map(|(t, n)| (*t, n.as_str())).collect();
        self.runner.restore(&restore_text(&[], &refs))?;
        tracing::info!(
            chains = delete.len(),
            "iptables service chains removed: the nftables backend took over"
        );
        Ok(())
    }

    /// Whether the chains are still as written: the canary rule at the top of both
    /// `WEFT-SERVICES` and the jumps from the built-in chains. When not, the cache is dropped and
    /// the next sync is a full one; returns false then. A cache that never synced has nothing to
    /// check.
    pub fn check(&self, metrics: &AgentMetrics) -> Result<bool, ProxyError> {
        let mut state = self.lock();
        if state.active == Some(pb::ProxyMode::Nftables) {
            let intact = state.nft.check(&self.runner)?;
            if !intact {
                tracing::warn!(
                    "the service proxy's nftables table was changed behind Weft's back; replacing it"
                );
                metrics.proxy_full_resyncs.inc();
            }
            return Ok(intact);
        }
        if !state.synced {
            return Ok(state.ctx.is_none());
        }
        let mut intact = true;
        for table in [Table::Nat, Table::Filter] {
            let args = [&["-w", "-t", table.name(), "-C", SERVICES][..], CANARY_RULE].concat();
            intact &= self.runner.status_ok("iptables", &args)?;
        }
        for jump in JUMPS {
            if !intact {
                break;
            }
            let args = [&["-w", "-t", jump.table.name(), "-C", jump.from][..], jump.args].concat();
            intact &= self.runner.status_ok("iptables", &args)?;
        }
        if !intact {
            tracing::warn!(
                "the service chains were flushed or deleted behind Weft's back; re-syncing all of them"
            );
            metrics.proxy_full_resyncs.inc();
            state.synced = false;
        }
        Ok(intact)
    }
}

/// Deletes the conntrack entries of UDP flows to endpoints that went away or changed port;
/// without this a client keeps sending to the dead endpoint for as long as it keeps the flow
/// alive. Best effort: a failure is logged, the rules are already right.
pub(crate) fn clear_udp(runner: &Runner, old: &[UdpFlows], new: &[UdpFlows]) {
    for filter in stale_udp_filters(old, new) {
        let filter: Vec<&str> = filter.iter().map(String::as_str).collect();
        conntrack_delete(runner, &filter);
    }
}

/// The `conntrack -D -p udp` filters for the flows of `old` that `new` no longer serves: per
/// endpoint gone or moved to another port, its flows to each Service address and to the NodePort.
/// By endpoint IP, as kube-proxy: conntrack cannot filter on the NATed port.
pub(crate) fn stale_udp_filters(old: &[UdpFlows], new: &[UdpFlows]) -> Vec<Vec<String>> {
    let mut filters = Vec::new();
    for flows in old {
        let kept = new.iter().find(|n| n.port == flows.port && n.node_port == flows.node_port);
        for ep in &flows.endpoints {
            if kept.is_some_and(|k| k.endpoints.contains(ep)) {
                continue;
            }
            let ep_ip = ep.ip().to_string();
            for ip in &flows.ips {
                filters.push(
                    [
                        "--orig-dst",
                        &ip.to_string(),
                        "--orig-port-dst",
                        &flows.port.to_string(),
                        "--dst-nat",
                        &ep_ip,
                    ]
                    .map(String::from)
                    .to_vec(),
                );
            }
            if flows.node_port != 0 {
                filters.push(
                    ["--orig-port-dst", &flows.node_port.to_string(), "--dst-nat", &ep_ip]
                        .map(String::from)
                        .to_vec(),
                );
            }
        }
    }
    filters
}

/// kube-proxy's conntrack TCP timeouts (its `conntrack.tcpEstablishedTimeout` and
/// `tcpCloseWaitTimeout` defaults), which workloads and the conformance tests expect: a day for
/// established flows, an hour for CLOSE_WAIT (the kernel's 60 s would drop half-closed
/// long-lived connections). Per network namespace; set once the first rules have loaded
/// nf_conntrack. Best effort, as kube-proxy: a failure is logged.
const CONNTRACK_TIMEOUTS: &[(&str, &str)] = &[
    ("net.netfilter.nf_conntrack_tcp_timeout_established", "86400"),
    ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600"),
];

fn set_conntrack_timeouts(runner: &Runner) {
    if runner.recorded.is_some() {
        return;
    }
    for (key, value) in CONNTRACK_TIMEOUTS {
        let setting = format!("{key}={value}");
        match runner.command("sysctl").args(["-q", "-w", &setting]).stdout(Stdio::null()).output() {
            Ok(out) if out.status.success() => tracing::debug!(%setting, "conntrack timeout set"),
            Ok(out) => {
                tracing::warn!(%setting, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "cannot set a conntrack timeout")
            }
            Err(e) => {
                tracing::warn!(%setting, error = %e, "cannot run sysctl; conntrack timeouts stay the kernel's")
            }
        }
    }
}

fn conntrack_delete(runner: &Runner, filter: &[&str]) {
    if runner.recorded.is_some() {
        return;
    }
    let args = [&["-D", "-p", "udp"][..], filter].concat();
    // Exit status 1 only says no entry matched.
    match runner.command("conntrack").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(_) => tracing::debug!(args = ?args, "stale UDP conntrack entries deleted"),
        Err(e) => tracing::warn!(error = %e, "cannot run conntrack; stale UDP flows may linger"),
    }
}

/// The network programming latency SLI of one Service change: from the EndpointSlice's
/// last-change-trigger-time to now. Changes from before this agent started are not observed.
pub(crate) fn observe_programming_latency(
    metrics: &AgentMetrics,
    started_unix_ms: i64,
    now_ms: i64,
    trigger: i64,
) {
    if trigger != 0 && trigger >= started_unix_ms {
        metrics.network_programming_latency.observe((now_ms - trigger).max(0) as f64 / 1000.0);
    }
}

/// The plan's Services against a cache of what was written (by name, with the plan version each
/// was written at): how many there are, those to render again (all of them when `all`), and the
/// names of those gone from the plan.
pub(crate) fn changed_services<'a, W>(
    plan: &'a PlanState,
    cache: &HashMap<String, W>,
    version: impl Fn(&W) -> u64,
    all: bool,
) -> (usize, Vec<&'a pb::Resource>, Vec<String>) {
    let mut services = 0;
    let mut cached_seen = 0;
    let mut stale = Vec::new();
    for r in plan.of_kind(Kind::Service) {
        services += 1;
        let old = cache.get(&r.name);
        cached_seen += usize::from(old.is_some());
        if all || old.is_none_or(|o| version(o) != r.version) {
            stale.push(r);
        }
    }
    // Counting the cached names seen spares building a set in the common case: nothing removed.
    let removed = if cached_seen == cache.len() {
        Vec::new()
    } else {
        let present: HashSet<&str> = plan.of_kind(Kind::Service).map(|r| r.name.as_str()).collect();
        cache.keys().filter(|k| !present.contains(k.as_str())).cloned().collect()
    };
    (services, stale, removed)
}
