//! The Kubernetes network conformance tests against Weft: for each proxy mode, a local cluster of
//! its own with real nodes (kubelet + containerd, Weft installed from `config/`), switched to that
//! mode, then the upstream `e2e.test` (built by `make tools` from the same Kubernetes version as
//! the cluster) run under `ginkgo`. Writes the per-test results to `docs/conformance/` and exits
//! non-zero when a test failed. Root; `make images` first.
//!
//! Usage: `weft-conformance [--suite conformance|network|netpol|cnp] [--modes nftables,iptables]`.
//! `conformance` is every `[sig-network]` test tagged `[Conformance]`; `network` is every
//! `[sig-network]` test but those left out in [`NETWORK_SKIP`] (see docs/CONFORMANCE.md);
//! `netpol` is the NetworkPolicy tests (`Netpol`, the truth-table suite, and `NetworkPolicy`);
//! `cnp` is the ClusterNetworkPolicy conformance suite of `sigs.k8s.io/network-policy-api`
//! (v0.2.0, built by `make tools`), a `go test` binary rather than ginkgo (see [`CNP_SKIP`]).

use std::collections::BTreeMap;
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
    /// The ClusterNetworkPolicy conformance suite of `sigs.k8s.io/network-policy-api` v0.2.0, its
    /// standard profile (see `CNP_SKIP`).
    #[value(name = "cnp")]
    ClusterNetworkPolicy,
}

/// How a suite runs.
enum Runner {
    /// `ginkgo` over the Kubernetes `e2e.test`, with a focus and a skip.
    Ginkgo { focus: &'static str, skip: Option<&'static str> },
    /// The network-policy-api conformance suite's `go test` binary ([`CNP_TEST_BIN`]).
    GoTest,
}

/// What `--suite netpol` leaves out: the SCTP variants (`[Feature:SCTPConnectivity]`: the
/// machine's kernel has no SCTP module to load), and upstream's `[Flaky]` and `[Disruptive]`.
const NETPOL_SKIP: &str = r"\[Feature:SCTPConnectivity\]|\[Disruptive\]|\[Flaky\]";

/// The network-policy-api conformance suite, `go test -c` of its `conformance` package, in the
/// tools' bin directory (`e2e/tools/install.sh`, `network_policy_api`).
const CNP_TEST_BIN: &str = "network-policy-api-conformance.test";

/// What `--suite cnp` leaves out (`-test.skip`): the tests whose probes are SCTP connections
/// (`agnhost connect --protocol=sctp`), which this machine's kernel cannot make (no `sctp`
/// module: `/proc/sys/net/sctp` is absent), as `NETPOL_SKIP` leaves out the SCTP variants of the
/// NetworkPolicy suite. The `…SCTP` tests probe only SCTP; every subtest of the `…Gress` tests
/// (TCP, UDP and SCTP in one policy) and of the `…EgressInlineCIDRPeers` tests probes SCTP too.
/// (The experimental `…EgressNodePeers` probe SCTP once; they are not in the standard profile.)
const CNP_SKIPPED: [&str; 8] = [
    "CNPAdminTierEgressSCTP",
    "CNPAdminTierIngressSCTP",
    "CNPBaselineTierEgressSCTP",
    "CNPBaselineTierIngressSCTP",
    "CNPAdminTierGress",
    "CNPBaselineTierGress",
    "CNPAdminTierEgressInlineCIDRPeers",
    "CNPBaselineTierEgressInlineCIDRPeers",
];

/// The suite's top-level test that runs it with a conformance profile and writes its report
/// (`TestConformance` runs the same tests but writes none).
const CNP_TOP: &str = "TestConformanceProfiles";

/// The `-test.skip` pattern of [`CNP_SKIPPED`] (go test matches it per `/`-separated level).
fn cnp_skip() -> String {
    format!("^{CNP_TOP}$/^({})$", CNP_SKIPPED.join("|"))
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Conformance => "sig-network-conformance",
            Suite::Network => "sig-network",
            Suite::Netpol => "sig-network-netpol",
            Suite::ClusterNetworkPolicy => "cluster-network-policy",
        }
    }

    fn runner(self) -> Runner {
        match self {
            Suite::Conformance => Runner::Ginkgo { focus: r"\[sig-network\].*\[Conformance\]", skip: None },
            Suite::Network => Runner::Ginkgo { focus: r"\[sig-network\]", skip: Some(NETWORK_SKIP) },
            Suite::Netpol => {
                Runner::Ginkgo { focus: r"\[sig-network\] (Netpol|NetworkPolicy)", skip: Some(NETPOL_SKIP) }
            }
            Suite::ClusterNetworkPolicy => Runner::GoTest,
        }
    }

    /// The tools it needs in the tools' bin directory.
    fn tools(self) -> &'static [&'static str] {
        match self.runner() {
            Runner::Ginkgo { .. } => &["ginkgo", "e2e.test"],
            Runner::GoTest => &[CNP_TEST_BIN],
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

/// What one run of a suite came to, for the summary `main` prints.
#[derive(Debug, Default)]
struct Summary {
    passed: usize,
    run: usize,
    /// Every failure: the test (or suite-level node) and why.
    failed: Vec<(String, String)>,
}

/// A cluster of its own for `mode`: Weft rolled out, `NetworkConfig spec.proxy.mode` set, and
/// every node's kernel in that mode.
async fn cluster_in_mode(args: &Args, mode: Mode) -> Result<TestCluster> {
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
    Ok(c)
}

async fn run_mode(args: &Args, mode: Mode, bin: &Path, out_dir: &Path, command: &str) -> Result<Summary> {
    let c = cluster_in_mode(args, mode).await?;
    let run_dir = c.state().dir.join("conformance");
    std::fs::create_dir_all(&run_dir)?;
    let run = Run { args, mode, bin, out_dir, command, run_dir: &run_dir };
    match args.suite.runner() {
        Runner::Ginkgo { focus, skip } => run_ginkgo(&c, &run, focus, skip).await,
        Runner::GoTest => run_cnp(&c, &run).await,
    }
}

/// What every runner needs of one mode's run.
struct Run<'a> {
    args: &'a Args,
    mode: Mode,
    bin: &'a Path,
    out_dir: &'a Path,
    command: &'a str,
    /// `.weft/tests/<cluster>/conformance`: logs of this run.
    run_dir: &'a Path,
}

async fn run_ginkgo(c: &TestCluster, run: &Run<'_>, focus: &str, skip: Option<&str>) -> Result<Summary> {
    let (args, bin, run_dir) = (run.args, run.bin, run.run_dir);
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
        .arg(format!("--focus={focus}"));
    if let Some(skip) = skip {
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
    let out = run.out_dir.join(format!("{}-{}.md", args.suite.name(), run.mode.name()));
    std::fs::write(&out, report(args.suite, run.mode, &cases, elapsed, run.command))
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("[conformance] {} written", out.display());
    let (passed, failed, _) = tally(&cases);
    Ok(Summary {
        passed,
        run: passed + failed,
        failed: cases
            .iter()
            .filter(|c| c.outcome == Outcome::Failed)
            .map(|c| (c.name.clone(), c.reason.clone()))
            .collect(),
    })
}

// --- the network-policy-api conformance suite (`--suite cnp`) -----------------------------------

/// The test binary's arguments: the profile run (the only one that writes the suite's report),
/// the standard features, framed `-test.v` output for [`parse_go_test`], the SCTP skip. The base
/// resources are kept when the run ends (the cluster is removed after it), so that pods the
/// suite's setup waited for in vain can be described in the report.
fn cnp_args(report_yaml: &Path, version: &str, additional_info: &str) -> Vec<String> {
    vec![
        format!("-test.run=^{CNP_TOP}$"),
        format!("-test.skip={}", cnp_skip()),
        "-test.v=test2json".into(),
        "-test.timeout=2h".into(),
        "-supported-features=ClusterNetworkPolicy".into(),
        "-conformance-profiles=ClusterNetworkPolicy".into(),
        "-cleanup-base-resources=false".into(),
        // The profile run requires the implementation's details; they land in the report.
        "-organization=Weft".into(),
        "-project=weft".into(),
        format!("-url=file://{}", repo_root().display()),
        format!("-version={version}"),
        "-contact=the Weft maintainers (README.md)".into(),
        format!("-additional-info={additional_info}"),
        format!("-report-output={}", report_yaml.display()),
    ]
}

/// Weft's version and commit (`0.1.0 (abc1234)`), for the suite's report.
fn weft_version() -> String {
    let commit = Command::new("git")
        .args(["-C", &repo_root().to_string_lossy(), "describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match commit {
        Some(c) if !c.is_empty() => format!("{} ({c})", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

async fn run_cnp(c: &TestCluster, run: &Run<'_>) -> Result<Summary> {
    let (suite, mode, run_dir) = (run.args.suite, run.mode, run.run_dir);
    let report_yaml = run.out_dir.join(format!("{}-{}-report.yaml", suite.name(), mode.name()));
    // A report from an earlier run must not pass for this one's.
    let _ = std::fs::remove_file(&report_yaml);
    let log = run_dir.join("go-test.log");
    let args = cnp_args(&report_yaml, &weft_version(), &format!("{}; docs/CONFORMANCE.md", run.command));
    let mut test = tokio::process::Command::new(run.bin.join(CNP_TEST_BIN));
    test.current_dir(run_dir)
        .env("KUBECONFIG", c.kubeconfig())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        // client-go's klog, apart from the tests' output.
        .stderr(std::fs::File::create(run_dir.join("go-test.stderr.log"))?);
    eprintln!("[conformance] running {} (log: {})", suite.name(), log.display());
    let started = Instant::now();
    // A failing test makes the binary exit non-zero: the report says which.
    let status = test.status().await.with_context(|| format!("running {CNP_TEST_BIN}"))?;
    let elapsed = started.elapsed();
    let output = std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let tests = parse_go_test(&output);
    ensure!(
        !tests.is_empty(),
        "{CNP_TEST_BIN} ({status}) ran no tests; see {} and {}",
        log.display(),
        run_dir.join("go-test.stderr.log").display()
    );
    let unready = match c.kubectl(&["get", "pods", "-A", "-l", "conformance-house", "-o", "json"]).await {
        Ok(json) => unready_containers(&serde_json::from_str(&json).unwrap_or_default()),
        Err(e) => {
            eprintln!("[conformance] could not list the suite's base pods: {e:#}");
            Vec::new()
        }
    };
    let mut described = Vec::new();
    for u in &unready {
        described.push(u.describe(c).await);
    }
    let yaml_written = report_yaml.exists();
    if yaml_written {
        // The suite writes it 0600; it is a results file like the others.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&report_yaml, std::fs::Permissions::from_mode(0o644))?;
    }
    let md = cnp_report(&CnpRun {
        mode,
        tests: &tests,
        elapsed,
        command: run.command,
        report_yaml: yaml_written
            .then(|| report_yaml.file_name().unwrap_or_default().to_string_lossy().into_owned()),
        unready: &described,
    });
    let out = run.out_dir.join(format!("{}-{}.md", suite.name(), mode.name()));
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "[conformance] {} written (the suite's own report: {})",
        out.display(),
        if yaml_written { report_yaml.display().to_string() } else { "not written".into() }
    );
    let t = tally_go(&tests);
    let mut failed: Vec<(String, String)> = t
        .failed
        .iter()
        .map(|g| (g.name.clone(), reasons(&g.output).first().cloned().unwrap_or_default()))
        .collect();
    failed.extend(t.suite_failed.iter().map(|g| (g.name.clone(), reasons(&g.output).join(" / "))));
    Ok(Summary { passed: t.passed.len(), run: t.passed.len() + t.failed.len(), failed })
}

/// One test of a `go test -v` run: `TestConformanceProfiles`, `…/<ShortName>`,
/// `…/<ShortName>/<subtest>` (spaces written as `_`, as go test names subtests).
#[derive(Debug, Clone, PartialEq)]
struct GoTest {
    name: String,
    /// None: it started and never ended (the binary timed out, panicked or was killed).
    outcome: Option<Outcome>,
    seconds: f64,
    /// Its own output (not its subtests'), as printed.
    output: Vec<String>,
    /// Whether subtests of it ran.
    parent: bool,
}

/// The tests of `go test -v` output, in the order they started. Both forms: plain `-test.v`
/// (subtests' `--- PASS` lines indented, after their parent's) and `-test.v=test2json`, whose
/// framing lines (`=== RUN`, `=== NAME`, `--- FAIL: …`) begin with a ^V byte; when the output has
/// any, only those count as framing, so a test's output cannot pass for a result. Output is the
/// current test's (the last `=== RUN`/`=== NAME`/`=== CONT`); what follows the last test (the
/// binary's own `FAIL`, a timeout's panic) goes to the tests that never ended.
fn parse_go_test(log: &str) -> Vec<GoTest> {
    const MARK: char = '\u{16}';
    let framed = log.lines().any(|l| l.starts_with(MARK));
    let mut tests: Vec<GoTest> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut current: Option<usize> = None;
    let mut trailing = Vec::new();
    for line in log.lines() {
        let frame = if framed {
            line.strip_prefix(MARK)
        } else {
            let t = line.trim_start();
            (t.starts_with("=== ") || t.starts_with("--- ")).then_some(t)
        };
        let Some(frame) = frame else {
            match current {
                Some(i) => tests[i].output.push(line.to_string()),
                None if !matches!(line.trim(), "" | "PASS" | "FAIL") && !line.starts_with("ok ") => {
                    trailing.push(line.to_string())
                }
                None => {}
            }
            continue;
        };
        let frame = frame.trim_start();
        if let Some(rest) = frame.strip_prefix("=== ") {
            let (verb, name) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = name.trim();
            current = match (verb, name) {
                (_, "") | ("PAUSE", _) => None,
                ("RUN", _) => {
                    let i = *index.entry(name.to_string()).or_insert_with(|| {
                        tests.push(GoTest {
                            name: name.to_string(),
                            outcome: None,
                            seconds: 0.0,
                            output: Vec::new(),
                            parent: false,
                        });
                        tests.len() - 1
                    });
                    if let Some(&p) = name.rsplit_once('/').and_then(|(parent, _)| index.get(parent)) {
                        tests[p].parent = true;
                    }
                    Some(i)
                }
                _ => index.get(name).copied(),
            };
        } else if let Some(rest) = frame.strip_prefix("--- ") {
            let Some((verb, rest)) = rest.split_once(": ") else { continue };
            let outcome = match verb {
                "PASS" => Outcome::Passed,
                "FAIL" => Outcome::Failed,
                "SKIP" => Outcome::Skipped,
                _ => continue,
            };
            let (name, time) = rest.rsplit_once(" (").unwrap_or((rest, ""));
            if let Some(&i) = index.get(name.trim()) {
                tests[i].outcome = Some(outcome);
                tests[i].seconds =
                    time.trim_end_matches(')').trim_end_matches('s').parse().unwrap_or_default();
            }
            // After a result, output belongs to whoever the next `=== NAME` says (plain -v
            // prints subtests' results after their parent's output, so nobody's).
            current = None;
        }
    }
    if !trailing.is_empty() {
        for t in tests.iter_mut().filter(|t| t.outcome.is_none()) {
            t.output.extend(trailing.iter().cloned());
        }
    }
    tests
}

/// The tests that count, by outcome: those without subtests (a test whose subtests ran is the
/// sum of them), and the failures of tests whose subtests all passed or skipped: the suite's
/// setup (`TestConformanceProfiles` failing before any test ran) or a test's own check.
#[derive(Debug, Default)]
struct GoTally<'a> {
    passed: Vec<&'a GoTest>,
    failed: Vec<&'a GoTest>,
    skipped: Vec<&'a GoTest>,
    suite_failed: Vec<&'a GoTest>,
}

fn tally_go(tests: &[GoTest]) -> GoTally<'_> {
    let mut t = GoTally::default();
    for g in tests {
        let outcome = g.outcome.unwrap_or(Outcome::Failed);
        if g.parent {
            let prefix = format!("{}/", g.name);
            let child_failed = tests.iter().any(|c| {
                c.name.starts_with(&prefix) && c.outcome.unwrap_or(Outcome::Failed) == Outcome::Failed
            });
            if outcome == Outcome::Failed && !child_failed {
                t.suite_failed.push(g);
            }
            continue;
        }
        if g.name == CNP_TOP && outcome == Outcome::Failed {
            // No test ran: its setup failed.
            t.suite_failed.push(g);
            continue;
        }
        match outcome {
            Outcome::Passed => t.passed.push(g),
            Outcome::Failed => t.failed.push(g),
            Outcome::Skipped => t.skipped.push(g),
        }
    }
    t
}

/// Why a test failed or skipped, from its output: the log lines without their `file.go:N:`
/// prefix, testify's `Error:`/`Messages:` but not its trace and test name, each line once (a
/// probe retried until its timeout logs the same lines every half second), at most 12.
fn reasons(output: &[String]) -> Vec<String> {
    const MAX: usize = 12;
    let mut out: Vec<String> = Vec::new();
    let mut more = 0;
    let mut in_trace = false;
    for line in output {
        let mut t = line.trim();
        // `helper.go:100: FAILED …` → `FAILED …`
        if let Some((loc, rest)) = t.split_once(": ").or_else(|| t.strip_suffix(':').map(|l| (l, "")))
            && is_go_location(loc)
        {
            t = rest.trim();
        }
        let text = t.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() {
            continue;
        }
        if text.starts_with("Error Trace:") {
            in_trace = true;
            continue;
        }
        if in_trace && is_go_location(&text) {
            continue;
        }
        in_trace = false;
        if text.starts_with("Test:") || out.contains(&text) {
            continue;
        }
        if out.len() == MAX {
            more += 1;
        } else {
            out.push(text);
        }
    }
    if more > 0 {
        out.push(format!("… {more} more lines (see go-test.log)"));
    }
    out
}

/// `helper.go:100` or `/a/b/helper.go:100`.
fn is_go_location(s: &str) -> bool {
    s.rsplit_once(".go:").is_some_and(|(file, line)| {
        !file.is_empty()
            && !file.contains(' ')
            && !line.is_empty()
            && line.bytes().all(|b| b.is_ascii_digit())
    })
}

/// A container of the suite's base pods that was not ready when the run ended.
#[derive(Debug, Clone, PartialEq)]
struct Unready {
    namespace: String,
    pod: String,
    container: String,
    /// `CrashLoopBackOff, 5 restarts, last exit 1`, `Pending: Unschedulable`, …
    state: String,
    /// Whether it ran before (so `kubectl logs --previous` has something).
    restarted: bool,
}

impl Unready {
    /// Its state and, when it crashed, the last lines it logged.
    async fn describe(&self, c: &TestCluster) -> String {
        let mut s = format!("{}/{} container {}: {}", self.namespace, self.pod, self.container, self.state);
        if self.restarted
            && let Ok(log) = c
                .kubectl(&[
                    "-n",
                    &self.namespace,
                    "logs",
                    &self.pod,
                    "-c",
                    &self.container,
                    "--previous",
                    "--tail=2",
                ])
                .await
        {
            let last: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            if !last.is_empty() {
                let _ = write!(s, "; it logged: {}", last.join(" / "));
            }
        }
        s
    }
}

/// The containers (or pods, when none started) that were not ready, from `kubectl get pods -o
/// json`.
fn unready_containers(pods: &serde_json::Value) -> Vec<Unready> {
    let mut out = Vec::new();
    let str_at = |v: &serde_json::Value, p: &str| {
        v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_string()
    };
    for pod in pods.get("items").and_then(|i| i.as_array()).into_iter().flatten() {
        let (namespace, name) = (str_at(pod, "/metadata/namespace"), str_at(pod, "/metadata/name"));
        let statuses = pod.pointer("/status/containerStatuses").and_then(|s| s.as_array());
        let Some(statuses) = statuses.filter(|s| !s.is_empty()) else {
            let mut state = str_at(pod, "/status/phase");
            if let Some(cond) = pod
                .pointer("/status/conditions")
                .and_then(|c| c.as_array())
                .and_then(|c| c.iter().find(|c| c.get("status").and_then(|s| s.as_str()) == Some("False")))
            {
                let _ = write!(state, ": {} {}", str_at(cond, "/reason"), str_at(cond, "/message"));
            }
            out.push(Unready { namespace, pod: name, container: "-".into(), state, restarted: false });
            continue;
        };
        for cs in statuses {
            if cs.get("ready").and_then(|r| r.as_bool()) == Some(true) {
                continue;
            }
            let restarts = cs.get("restartCount").and_then(|r| r.as_u64()).unwrap_or(0);
            let mut state = ["waiting", "terminated", "running"]
                .iter()
                .find_map(|k| cs.pointer(&format!("/state/{k}")).map(|s| (k, s)))
                .map(|(k, s)| match str_at(s, "/reason") {
                    r if r.is_empty() => (*k).to_string(),
                    r => r,
                })
                .unwrap_or_else(|| "not ready".into());
            if restarts > 0 {
                let _ = write!(state, ", {restarts} restarts");
            }
            if let Some(code) = cs.pointer("/lastState/terminated/exitCode").and_then(|c| c.as_i64()) {
                let _ = write!(state, ", last exit {code}");
            }
            out.push(Unready {
                namespace: namespace.clone(),
                pod: name.clone(),
                container: str_at(cs, "/name"),
                state,
                restarted: restarts > 0,
            });
        }
    }
    out
}

/// What [`cnp_report`] writes about.
struct CnpRun<'a> {
    mode: Mode,
    tests: &'a [GoTest],
    elapsed: Duration,
    command: &'a str,
    /// The suite's own report's file name, when it wrote one.
    report_yaml: Option<String>,
    /// The base pods' containers that were not ready at the end, described.
    unready: &'a [String],
}

/// A test's name for people: without `TestConformanceProfiles/`, levels as ` / `, `_` as spaces
/// below the test's own (CamelCase) name.
fn display_name(name: &str) -> String {
    let rest = name.strip_prefix(CNP_TOP).map(|r| r.trim_start_matches('/')).unwrap_or(name);
    if rest.is_empty() {
        return name.to_string();
    }
    let mut levels = rest.split('/');
    let mut out: Vec<String> = levels.next().map(str::to_string).into_iter().collect();
    out.extend(levels.map(|l| l.replace('_', " ")));
    out.join(" / ")
}

/// The results of one `--suite cnp` run as Markdown, in the manner of [`report`]: the counts,
/// what setup failed, every test that ran (failures first), the skips with why, then each
/// failure with its reason lines.
fn cnp_report(r: &CnpRun<'_>) -> String {
    let t = tally_go(r.tests);
    let escape = |s: &str| s.replace('|', "\\|");
    let mut s = String::new();
    let _ = writeln!(s, "# {} with the {} proxy mode\n", Suite::ClusterNetworkPolicy.name(), r.mode.name());
    let _ = writeln!(
        s,
        "The ClusterNetworkPolicy conformance suite of `sigs.k8s.io/network-policy-api` v0.2.0 \
         (`{CNP_TOP}`, profile `ClusterNetworkPolicy`, standard features). **{} passed of {} run** \
         ({} failed); {} skipped themselves (listed after them, with why); {} tests left out \
         because their probes are SCTP ({}); {:.0} min of tests. Generated by `{}`; what this \
         means is in ../CONFORMANCE.md.\n",
        t.passed.len(),
        t.passed.len() + t.failed.len(),
        t.failed.len(),
        t.skipped.len(),
        CNP_SKIPPED.len(),
        CNP_SKIPPED.join(", "),
        r.elapsed.as_secs_f64() / 60.0,
        r.command,
    );
    match &r.report_yaml {
        Some(f) => {
            let _ = writeln!(
                s,
                "The suite's own report: [{f}]({f}). It counts the {} tests left out by \
                 `-test.skip` as passed (go test's `t.Run` returns true for a test it does not run, \
                 which the suite takes for success); this file does not.\n",
                CNP_SKIPPED.len()
            );
        }
        None => {
            let _ =
                writeln!(s, "The suite wrote no report of its own (it writes it only once its tests ran).\n");
        }
    }
    for g in &t.suite_failed {
        let _ = writeln!(s, "**{} FAILED** before or beside its tests:\n\n```", display_name(&g.name));
        for l in reasons(&g.output) {
            let _ = writeln!(s, "{l}");
        }
        let _ = writeln!(s, "```\n");
    }
    if !r.unready.is_empty() {
        let _ = writeln!(s, "Base pods' containers not ready when the run ended:\n");
        for u in r.unready {
            let _ = writeln!(s, "- {u}");
        }
        let _ = writeln!(s);
    }
    if !(t.passed.is_empty() && t.failed.is_empty() && t.skipped.is_empty()) {
        let _ = writeln!(s, "| result | test | seconds |\n|---|---|---|");
        let first_reason = |g: &GoTest| reasons(&g.output).first().map(|l| escape(l)).unwrap_or_default();
        for g in t.failed.iter().chain(&t.passed) {
            let result = match g.outcome {
                Some(Outcome::Failed) => "FAILED".to_string(),
                None => "FAILED (never ended)".to_string(),
                _ => "passed".to_string(),
            };
            let _ = writeln!(s, "| {result} | {} | {:.0} |", escape(&display_name(&g.name)), g.seconds);
        }
        for g in &t.skipped {
            let _ = writeln!(s, "| skipped: {} | {} | |", first_reason(g), escape(&display_name(&g.name)));
        }
    }
    if !t.failed.is_empty() {
        let _ = writeln!(s, "\n## Failures\n");
        for g in &t.failed {
            let _ = writeln!(s, "### {}\n\n```", display_name(&g.name));
            for l in reasons(&g.output) {
                let _ = writeln!(s, "{l}");
            }
            let _ = writeln!(s, "```\n");
        }
    }
    s
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = tools_bin_dir()?;
    for tool in args.suite.tools() {
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
        let summary = run_mode(&args, mode, &bin, &out_dir, &command).await?;
        eprintln!(
            "[conformance] {} / {}: {} passed of {} run",
            args.suite.name(),
            mode.name(),
            summary.passed,
            summary.run
        );
        for (name, reason) in summary.failed {
            eprintln!("[conformance]   FAILED {name}: {reason}");
            failed.push(format!("{}: {name}", mode.name()));
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

    /// `-test.v=test2json` output: framing lines start with ^V; a test's own output that looks
    /// like a result line is not one.
    const GO_TEST: &str = "\u{16}=== RUN   TestConformanceProfiles\n\
\u{16}=== RUN   TestConformanceProfiles/CNPAdminTierIngressTCP\n\
\u{16}=== RUN   TestConformanceProfiles/CNPAdminTierIngressTCP/Should_allow_ingress\n\
\u{16}--- PASS: TestConformanceProfiles/CNPAdminTierIngressTCP/Should_allow_ingress (3.50s)\n\
\u{16}=== RUN   TestConformanceProfiles/CNPAdminTierIngressTCP/Should_deny_ingress\n\
    helper.go:100: FAILED Request from x to y on port 80: expected false\n\
    helper.go:100: FAILED Request from x to y on port 80: expected false\n\
    --- PASS: not a result\n\
\u{16}--- FAIL: TestConformanceProfiles/CNPAdminTierIngressTCP/Should_deny_ingress (30.00s)\n\
\u{16}--- FAIL: TestConformanceProfiles/CNPAdminTierIngressTCP (33.50s)\n\
\u{16}=== RUN   TestConformanceProfiles/CNPAdminTierPriority\n\
    priority.go:40: skipping: not supported\n\
\u{16}--- SKIP: TestConformanceProfiles/CNPAdminTierPriority (0.00s)\n\
\u{16}--- FAIL: TestConformanceProfiles (33.60s)\n\
FAIL\n";

    #[test]
    fn go_test_output_becomes_leaf_tests_with_their_reasons() {
        let tests = parse_go_test(GO_TEST);
        let t = tally_go(&tests);
        let names = |v: &[&GoTest]| v.iter().map(|g| display_name(&g.name)).collect::<Vec<_>>();
        assert_eq!(names(&t.passed), ["CNPAdminTierIngressTCP / Should allow ingress"]);
        assert_eq!(names(&t.failed), ["CNPAdminTierIngressTCP / Should deny ingress"]);
        assert_eq!(names(&t.skipped), ["CNPAdminTierPriority"]);
        assert!(t.suite_failed.is_empty(), "the parents failed because a subtest did");
        assert_eq!(
            reasons(&t.failed[0].output),
            ["FAILED Request from x to y on port 80: expected false", "--- PASS: not a result"],
            "file:line prefixes off, repeated lines once"
        );
        assert_eq!(t.failed[0].seconds, 30.0);
        assert_eq!(
            cnp_skip(),
            "^TestConformanceProfiles$/^(CNPAdminTierEgressSCTP|CNPAdminTierIngressSCTP|CNPBaselineTierEgressSCTP|CNPBaselineTierIngressSCTP|CNPAdminTierGress|CNPBaselineTierGress|CNPAdminTierEgressInlineCIDRPeers|CNPBaselineTierEgressInlineCIDRPeers)$"
        );
    }

    #[test]
    fn a_run_that_never_ended_fails_its_open_tests_with_what_followed() {
        let log = "\u{16}=== RUN   TestConformanceProfiles\n\u{16}=== RUN   TestConformanceProfiles/CNPAdminTierEgressUDP\n\
                   panic: test timed out after 2h0m0s\n";
        let tests = parse_go_test(log);
        let t = tally_go(&tests);
        assert_eq!(t.failed.len(), 1);
        assert!(t.failed[0].outcome.is_none());
        assert!(reasons(&t.failed[0].output).iter().any(|l| l.contains("timed out")));
    }
}
