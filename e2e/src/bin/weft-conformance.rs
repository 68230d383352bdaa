//! The Kubernetes network conformance tests against Weft: for each proxy mode, a local cluster of
//! its own with real nodes (kubelet + containerd, Weft installed from `config/`), switched to that
//! mode, then the upstream `e2e.test` (built by `make tools` from the same Kubernetes version as
//! the cluster) run under `ginkgo`. Writes the per-test results to `docs/conformance/` and exits
//! non-zero when a test failed. Root; `make images` first.
//!
//! Usage: `weft-conformance [--suite conformance|network|netpol] [--modes nftables,iptables]`.
//! `conformance` is every `[sig-network]` test tagged `[Conformance]`; `network` is every
//! `[sig-network]` test but those left out in [`NETWORK_SKIP`] (see docs/CONFORMANCE.md);
//! `netpol` is the NetworkPolicy tests (`Netpol`, the truth-table suite, and `NetworkPolicy`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use weft_e2e::cluster::{TestCluster, TestOptions, repo_root, tools_bin_dir, wait_for};

/// What `--suite network` leaves out, and why (docs/CONFORMANCE.md says the same per test):
/// - `[Disruptive]`: restarts or partitions nodes and the control plane, which this cluster's
///   nodes (network namespaces of one machine) cannot survive the way a VM does;
/// - `[Feature:…]` and `[FeatureGate:…]` not enabled: features Weft does not claim, or alpha/beta
///   gates this control plane does not turn on;
/// - `[Flaky]`: upstream's own verdict;
/// - NetworkPolicy and Netpol: `--suite netpol` runs them;
/// - `DNS configMap`: they look for the cluster DNS's pods (`k8s-app=kube-dns` in kube-system)
///   to edit their `coredns`/`kube-dns` ConfigMap and restart them; Weft's CoreDNS runs under each
///   node's agent and is configured through NetworkConfig `spec.dns` (upstreams, stubDomains),
///   which Weft's own DNS e2e tests cover;
/// - `DNS HostNetwork`: its hostNetwork pod serves its results on port 80 of the node, which
///   Weft's ingress (nginx on every node's port 80, like a hostNetwork ingress-nginx) holds.
const NETWORK_SKIP: &str =
    r"\[Disruptive\]|\[Feature:|\[FeatureGate:|\[Flaky\]|NetworkPolicy|Netpol|DNS configMap|DNS HostNetwork";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// `[sig-network]` tests tagged `[Conformance]`.
    Conformance,
    /// Every `[sig-network]` test that can run on one machine (see `NETWORK_SKIP`).
    Network,
    /// The NetworkPolicy tests (see `NETPOL_SKIP`).
    Netpol,
}

/// What `--suite netpol` leaves out: the SCTP variants (`[Feature:SCTPConnectivity]`: the
/// machine's kernel has no SCTP module to load), and upstream's `[Flaky]` and `[Disruptive]`.
const NETPOL_SKIP: &str = r"\[Feature:SCTPConnectivity\]|\[Disruptive\]|\[Flaky\]";

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Conformance => "sig-network-conformance",
            Suite::Network => "sig-network",
            Suite::Netpol => "sig-network-netpol",
        }
    }

    fn focus(self) -> &'static str {
        match self {
            Suite::Conformance => r"\[sig-network\].*\[Conformance\]",
            Suite::Network => r"\[sig-network\]",
            Suite::Netpol => r"\[sig-network\] (Netpol|NetworkPolicy)",
        }
    }

    fn skip(self) -> Option<&'static str> {
        match self {
            Suite::Conformance => None,
            Suite::Network => Some(NETWORK_SKIP),
            Suite::Netpol => Some(NETPOL_SKIP),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Nftables,
    Iptables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Run the Kubernetes network e2e tests against Weft on real nodes")]
struct Args {
    #[arg(long, value_enum, default_value = "conformance")]
    suite: Suite,
    /// Proxy modes to run the suite with, each on a cluster of its own.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "nftables,iptables")]
    modes: Vec<Mode>,
    /// Nodes per cluster (3: the topology tests want three zones, some Services tests three
    /// nodes).
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Ginkgo processes (specs run in parallel; `[Serial]` ones run alone at the end).
    #[arg(long, default_value_t = 4)]
    procs: u8,
    /// Where the per-test results go (`<suite>-<mode>.md`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// One test case of the JUnit report.
#[derive(Debug, Clone, PartialEq)]
struct Case {
    name: String,
    outcome: Outcome,
    seconds: f64,
    /// The first line of the failure message, or why the spec skipped itself.
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + len]))
}

/// The test cases of a JUnit XML report as ginkgo writes it (`<testcase name=… time=…>` holding
/// `<skipped>`, `<failure>` or `<error>`). Ginkgo's own suite-level entries (`[BeforeSuite]`,
/// `[SynchronizedBeforeSuite]`, …) count as cases too: a failed setup is a failure.
fn parse_junit(xml: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<testcase ") {
        rest = &rest[i..];
        let tag_end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..tag_end];
        let self_closing = tag.ends_with('/');
        let body_end = if self_closing { tag_end } else { rest.find("</testcase>").unwrap_or(rest.len()) };
        let body = &rest[tag_end.min(body_end)..body_end];
        let outcome = if body.contains("<failure") || body.contains("<error") {
            Outcome::Failed
        } else if body.contains("<skipped") {
            Outcome::Skipped
        } else {
            Outcome::Passed
        };
        let reason = ["<failure", "<error", "<skipped"]
            .iter()
            .find_map(|t| body.find(t).map(|at| &body[at..]))
            .and_then(|el| attr(el.split('>').next().unwrap_or_default(), "message"))
            .map(|m| m.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string())
            .unwrap_or_default();
        cases.push(Case {
            name: attr(tag, "name").unwrap_or_default(),
            outcome,
            seconds: attr(tag, "time").and_then(|t| t.parse().ok()).unwrap_or_default(),
            reason,
        });
        rest = &rest[body_end.min(rest.len())..];
        if rest.starts_with("</testcase>") {
            rest = &rest["</testcase>".len()..];
        } else if self_closing {
            rest = &rest[1.min(rest.len())..];
        }
    }
    cases
}

/// Ginkgo names a spec `[It] <its full text>`; its suite-level nodes (`[SynchronizedBeforeSuite]`,
/// `[ReportAfterSuite] …`) are cases too, without the prefix.
const SPEC_PREFIX: &str = "[It] ";

impl Case {
    fn is_spec(&self) -> bool {
        self.name.starts_with(SPEC_PREFIX)
    }
}

/// Specs passed and failed, and failed suite-level nodes (a failed setup fails the run).
fn tally(cases: &[Case]) -> (usize, usize, usize) {
    let count =
        |spec: bool, o: Outcome| cases.iter().filter(|c| c.is_spec() == spec && c.outcome == o).count();
    (count(true, Outcome::Passed), count(true, Outcome::Failed), count(false, Outcome::Failed))
}

/// The results of one run as Markdown: the counts, every spec that ran (failures first), then
/// the specs that skipped themselves, with why.
fn report(suite: Suite, mode: Mode, cases: &[Case], elapsed: Duration, command: &str) -> String {
    let (passed, failed, _) = tally(cases);
    // Ginkgo's message for a spec the focus or skip left out is plain "skipped"; a spec that
    // skipped itself says why ("skipped - Requires >= 3 zones").
    let skipped = |c: &&Case| c.is_spec() && c.outcome == Outcome::Skipped;
    let skipped_itself: Vec<&Case> = cases.iter().filter(skipped).filter(|c| c.reason != "skipped").collect();
    let not_selected = cases.iter().filter(skipped).count() - skipped_itself.len();
    let escape = |t: &str| t.replace('|', "\\|");
    let name = |c: &Case| escape(c.name.strip_prefix(SPEC_PREFIX).unwrap_or(&c.name));
    let mut s = String::new();
    let _ = writeln!(s, "# {} with the {} proxy mode\n", suite.name(), mode.name());
    let _ = writeln!(
        s,
        "**{passed} passed of {} run** ({failed} failed); {} skipped themselves (listed last, with \
         why); {not_selected} not selected; {:.0} min of tests. Generated by `{command}`; what \
         failures mean is in ../CONFORMANCE.md.\n",
        passed + failed,
        skipped_itself.len(),
        elapsed.as_secs_f64() / 60.0
    );
    for c in cases.iter().filter(|c| !c.is_spec() && c.outcome == Outcome::Failed) {
        let _ = writeln!(s, "Suite node {} FAILED: {}\n", c.name, c.reason);
    }
    let _ = writeln!(s, "| result | test | seconds |\n|---|---|---|");
    let mut ran: Vec<&Case> = cases.iter().filter(|c| c.is_spec() && c.outcome != Outcome::Skipped).collect();
    ran.sort_by(|a, b| (a.outcome != Outcome::Failed, &a.name).cmp(&(b.outcome != Outcome::Failed, &b.name)));
    for c in ran {
        let result = match c.outcome {
            Outcome::Failed => format!("FAILED: {}", escape(&c.reason)),
            _ => "passed".into(),
        };
        let _ = writeln!(s, "| {result} | {} | {:.0} |", name(c), c.seconds);
    }
    for c in skipped_itself {
        let _ = writeln!(s, "| {} | {} | |", escape(&c.reason), name(c));
    }
    s
}

/// Whether every node's namespace holds the state of `mode` (checked in the kernel): the
/// nftables table `ip weft-proxy`, or the iptables chain WEFT-SERVICES and no table.
fn node_in_mode(netns: &str, mode: Mode) -> bool {
    let ns = format!("--net=/run/netns/{netns}");
    let ok = |args: &[&str]| {
        Command::new("nsenter").arg(&ns).arg("--").args(args).output().is_ok_and(|o| o.status.success())
    };
    let table = ok(&["nft", "list", "table", "ip", "weft-proxy"]);
    match mode {
        Mode::Nftables => table,
        Mode::Iptables => !table && ok(&["iptables", "-t", "nat", "-S", "WEFT-SERVICES"]),
    }
}

async fn run_mode(args: &Args, mode: Mode, bin: &Path, out_dir: &Path, command: &str) -> Result<Vec<Case>> {
    let weft_bin = std::env::current_exe().context("where weft-conformance is")?;
    let c = TestCluster::start(
        TestOptions::default().nodes(args.nodes).weft(true).observability(false).weft_dev(&weft_bin),
    )
    .await?;
    eprintln!("[conformance] cluster {} up; proxy mode {}", c.name(), mode.name());
    for what in ["daemonset/weft-agent", "deployment/weft-operator"] {
        c.kubectl(&["-n", "weft-system", "rollout", "status", what, "--timeout=180s"]).await?;
    }
    c.patch_network_config(serde_json::json!({"proxy": {"mode": mode.name()}})).await?;
    let nodes = c.nodes();
    wait_for(&format!("every node on the {} proxy", mode.name()), Duration::from_secs(120), || async {
        Ok(nodes.iter().all(|n| node_in_mode(&n.netns, mode)).then_some(()))
    })
    .await?;

    let run_dir = c.state().dir.join("conformance");
    std::fs::create_dir_all(&run_dir)?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut ginkgo = tokio::process::Command::new(bin.join("ginkgo"));
    ginkgo
        .env("PATH", &path)
        .env("KUBECONFIG", c.kubeconfig())
        .arg(format!("--procs={}", args.procs))
        .arg("--timeout=4h")
        .arg("--no-color")
        .arg("--silence-skips")
        .arg(format!("--output-dir={}", run_dir.display()))
        .arg("--junit-report=junit.xml")
        .arg(format!("--focus={}", args.suite.focus()));
    if let Some(skip) = args.suite.skip() {
        ginkgo.arg(format!("--skip={skip}"));
    }
    ginkgo
        .arg(bin.join("e2e.test"))
        .arg("--")
        .arg(format!("--kubeconfig={}", c.kubeconfig().display()))
        .arg("--provider=skeleton")
        // Without it the multi-node tests skip themselves ("Requires at least 2 nodes (not -1)").
        .arg(format!("--num-nodes={}", args.nodes))
        .arg(format!("--report-dir={}", run_dir.display()))
        .stdout(std::fs::File::create(run_dir.join("ginkgo.log"))?)
        .stderr(std::process::Stdio::inherit());
    eprintln!("[conformance] running {} (log: {})", args.suite.name(), run_dir.join("ginkgo.log").display());
    let started = Instant::now();
    // A failing spec makes ginkgo exit non-zero: the report says which.
    let status = ginkgo.status().await.context("running ginkgo")?;
    let elapsed = started.elapsed();
    let xml = std::fs::read_to_string(run_dir.join("junit.xml")).with_context(|| {
        format!("ginkgo ({status}) wrote no junit.xml; see {}", run_dir.join("ginkgo.log").display())
    })?;
    let cases = parse_junit(&xml);
    ensure!(!cases.is_empty(), "the JUnit report lists no tests (ginkgo {status})");
    let out = out_dir.join(format!("{}-{}.md", args.suite.name(), mode.name()));
    std::fs::write(&out, report(args.suite, mode, &cases, elapsed, command))
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("[conformance] {} written", out.display());
    Ok(cases)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = tools_bin_dir()?;
    for tool in ["ginkgo", "e2e.test"] {
        ensure!(bin.join(tool).exists(), "{} missing: run make tools", bin.join(tool).display());
    }
    let out_dir = args.out_dir.clone().unwrap_or_else(|| repo_root().join("docs/conformance"));
    std::fs::create_dir_all(&out_dir)?;
    let command = std::env::args()
        .map(|a| a.rsplit('/').next().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let mut failed = Vec::new();
    for &mode in &args.modes {
        let cases = run_mode(&args, mode, &bin, &out_dir, &command).await?;
        let (passed, failed_specs, _) = tally(&cases);
        eprintln!(
            "[conformance] {} / {}: {passed} passed of {} run",
            args.suite.name(),
            mode.name(),
            passed + failed_specs
        );
        for c in cases.iter().filter(|c| c.outcome == Outcome::Failed) {
            eprintln!("[conformance]   FAILED {}: {}", c.name, c.reason);
            failed.push(format!("{}: {}", mode.name(), c.name));
        }
    }
    if !failed.is_empty() {
        bail!("{} failed:\n{}", failed.len(), failed.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JUNIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="3" disabled="0" errors="0" failures="1" time="10">
  <testsuite name="Kubernetes e2e suite" package="/" tests="3">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1.5"></testcase>
    <testcase name="[It] [sig-network] DNS should provide DNS for services  [Conformance]" classname="Kubernetes e2e suite" status="failed" time="30.2">
      <failure message="timed out waiting for the condition&#xA;more" type="failed">[FAILED] ...</failure>
      <system-err>log</system-err>
    </testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods &amp; more" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [sig-network] Topology Hints should distribute endpoints evenly" classname="Kubernetes e2e suite" status="skipped" time="0.1">
      <skipped message="skipped - Requires &gt;= 3 zones"></skipped>
    </testcase>
  </testsuite>
</testsuites>"#;

    #[test]
    fn junit_cases_carry_outcome_time_and_reason() {
        let cases = parse_junit(JUNIT);
        assert_eq!(cases.len(), 4);
        assert_eq!(cases[3].reason, "skipped - Requires >= 3 zones");
        assert_eq!(cases[0].outcome, Outcome::Passed);
        assert_eq!(cases[0].seconds, 1.5);
        assert_eq!(cases[1].outcome, Outcome::Failed);
        assert_eq!(cases[1].reason, "timed out waiting for the condition");
        assert_eq!(cases[2].outcome, Outcome::Skipped);
        assert_eq!(
            cases[2].name,
            "[It] [sig-network] Services should serve a basic endpoint from pods & more"
        );
    }

    #[test]
    fn report_counts_only_what_ran_and_lists_failures_first() {
        let md =
            report(Suite::Conformance, Mode::Nftables, &parse_junit(JUNIT), Duration::from_secs(120), "x");
        assert!(md.contains("**0 passed of 1 run** (1 failed); 1 skipped themselves"), "{md}");
        assert!(md.contains("1 not selected"), "{md}");
        assert!(md.contains("| FAILED: timed out waiting for the condition | [sig-network] DNS"), "{md}");
        assert!(!md.contains("SynchronizedBeforeSuite"), "a passed suite node is not a test: {md}");
        assert!(!md.contains("serve a basic endpoint"), "{md}");
        assert!(md.contains("| skipped - Requires >= 3 zones | [sig-network] Topology Hints"), "{md}");
    }

    #[test]
    fn a_failed_suite_node_is_reported_apart_from_the_specs() {
        let xml = JUNIT.replace(
            r#"status="passed" time="1.5"></testcase>"#,
            r#"status="failed" time="1.5"><failure message="no nodes Ready" type="failed"></failure></testcase>"#,
        );
        let cases = parse_junit(&xml);
        assert_eq!(tally(&cases), (0, 1, 1));
        let md = report(Suite::Conformance, Mode::Iptables, &cases, Duration::from_secs(60), "x");
        assert!(md.contains("Suite node [SynchronizedBeforeSuite] FAILED: no nodes Ready"), "{md}");
    }
}
