//! The local cluster: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler) built from source, nodes as network namespaces on a per-cluster underlay
//! bridge, and the test API the end-to-end tests are written against.
//!
//! Layout of one cluster named `<c>` with index `<i>` (see `docs/LOCAL-CLUSTER.md`):
//!
//! - `.weft/<c>/` (tests: `.weft/tests/<c>/`): `state.json`, `pki/`, `kubeconfig` (admin, on
//!   127.0.0.1), `etcd/`, `nodes/<node>/…`, `logs/*.log`;
//! - bridge `wbr<i>` with `172.18.<i>.1/24` in the root namespace; node `node-<n>` is network
//!   namespace `weft-<c>-node-<n>` at `172.18.<i>.<10+n>`, attached by veth `wv<i>n<n>`;
//! - loopback ports `20000 + 10·i …` (API server first; it also listens on the bridge address).
//!
//! [`Cluster`] is the blocking core shared by `weft-dev` and the tests; [`TestCluster`] is the
//! async test API over it.

mod controlplane;
pub mod egress;
mod net;
mod nodes;
mod observability;
mod outside;
mod pki;
mod process;
mod realnode;
mod state;
mod testing;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;

pub use nodes::plan_token;
pub use observability::{Observability, PromSample, SpanRecord};
pub use outside::OutsideHost;
pub use process::ProcRecord;
pub use realnode::{CNI_TIMING_DIR, PAUSE_IMAGE, host_path, node_cgroups};
pub use state::{
    AGENT_METRICS_PORT, CLUSTER_DNS, CLUSTER_DOMAIN, ClusterState, CniMode, KUBERNETES_SERVICE_IP, NodeState,
    OPERATOR_METRICS_PORT, OPERATOR_NODES, PLAN_PORT, POD_CIDR, Ports, SERVICE_CIDR,
};
pub use testing::{
    Fatal, PodOptions, Steps, TestCluster, TestNamespace, TestOptions, client_for, http_get, metric_value,
    metrics_text, wait_for, whoami_remote_ip,
};

use pki::Pki;

/// Where the reference CNI plugins are installed (Debian's containernetworking-plugins).
pub const REFERENCE_CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The repository root: `$WEFT_REPO`, or the parent of this crate's directory.
pub fn repo_root() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_REPO") {
        return p.into();
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or_else(|| manifest.to_path_buf())
}

/// `<repo>/.weft`, where clusters keep their state and logs (ignored by git).
pub fn weft_dir() -> PathBuf {
    repo_root().join(".weft")
}

/// The admin kubeconfig of the cluster `weft-dev up` brought up.
pub fn dev_kubeconfig() -> PathBuf {
    weft_dir().join("kubeconfig")
}

/// The directory with kube-apiserver, etcd, kubectl…: `$WEFT_TOOLS_BIN` if set, else the last
/// line printed by `e2e/tools/install.sh` (which installs whatever is missing and is fast when
/// everything is cached). Computed once per process.
pub fn tools_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(p) = std::env::var_os("WEFT_TOOLS_BIN") {
            return Ok(p.into());
        }
        let script = repo_root().join("e2e/tools/install.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({})", script.display(), out.status));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(l) => Ok(PathBuf::from(l.trim())),
            None => Err(format!("{} printed no bin directory", script.display())),
        }
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Where `weft-dev` is (it runs the cluster's helpers): `$WEFT_BIN_DIR`, else the directory
/// of the running `weft-dev`, else `target/debug` next to the running test binary, else
/// `<repo>/target/debug`.
pub fn default_weft_bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_BIN_DIR") {
        return p.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            if dir.join("weft-dev").is_file() {
                return dir.to_path_buf();
            }
        }
    }
    repo_root().join("target/debug")
}

/// How to bring a cluster up.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Cluster name (`dev` for `weft-dev up`): namespaces are `weft-<name>-…`.
    pub name: String,
    /// Where its state and logs go; default `.weft/<name>`.
    pub dir: Option<PathBuf>,
    /// Nodes to create.
    pub nodes: u8,
    /// Install Weft from `config/` as a user does (the operator Deployment, the agent DaemonSet,
    /// whose agents install weft-cni); without it pods use the reference bridge + host-local
    /// plugins (default true).
    pub weft: bool,
    /// Default: [`tools_bin_dir`].
    pub tools_bin_dir: Option<PathBuf>,
    /// Default: [`default_weft_bin_dir`].
    pub weft_bin_dir: Option<PathBuf>,
    /// `kubectl apply -f crds/` (skipped with a warning when there are none yet) and the
    /// upstream CRDs install.sh caches (ClusterNetworkPolicy); see [`Cluster::apply_crds`].
    pub apply_crds: bool,
    /// Test clusters: the owning process, watched by a reaper that tears the cluster down once it
    /// is gone.
    pub owner_pid: Option<u32>,
    /// Wait for every node to be Ready.
    pub wait_nodes_ready: bool,
    /// With Weft: run an OpenTelemetry Collector and Prometheus watching it (default true;
    /// skipped with a warning when install.sh has not installed them).
    pub observability: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            name: "dev".into(),
            dir: None,
            nodes: 3,
            weft: true,
            tools_bin_dir: None,
            weft_bin_dir: None,
            apply_crds: true,
            owner_pid: None,
            wait_nodes_ready: true,
            observability: true,
        }
    }
}

/// A running (or partly torn down) cluster. Blocking; owned by one process at a time.
#[derive(Debug)]
pub struct Cluster {
    state: ClusterState,
    children: Vec<Child>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn progress(msg: impl std::fmt::Display) {
    tracing::info!("{msg}");
}

impl Cluster {
    /// Brings a cluster up: bridge, certificates, control plane (waits for `/readyz`), CRDs, Weft
    /// (its configuration and operator, unless `weft` is off), and the nodes (each with its pod
    /// runner and, with Weft, its agent). Anything half-built is torn down on error.
    pub fn up(opts: &UpOptions) -> Result<Cluster> {
        state::validate_name(&opts.name)?;
        if net::run("id", ["-u"]).map(|s| s.trim() != "0").unwrap_or(true) {
            bail!("the local cluster needs root (it creates network namespaces, veths and bridges)");
        }
        let dir = opts.dir.clone().unwrap_or_else(|| weft_dir().join(&opts.name));
        if ClusterState::state_file(&dir).exists() {
            bail!(
                "cluster {} already exists ({}); `weft-dev down --name {}` removes it",
                opts.name,
                dir.display(),
                opts.name
            );
        }
        let tools = match &opts.tools_bin_dir {
            Some(d) => d.clone(),
            None => tools_bin_dir()?,
        };
        controlplane::check_tools(&tools)?;
        realnode::check_available(&tools)?;
        let weft_bin = opts.weft_bin_dir.clone().unwrap_or_else(default_weft_bin_dir);
        // A fresh directory, apart from earlier logs.
        if dir.exists() {
            for e in fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
                if e.file_name() != "logs" {
                    let p = e.path();
                    let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                }
            }
        }
        fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
        // The lock is held until the state file exists: until then another claimer would take the
        // slot for a stale one.
        let lock = state::lock_registry()?;
        let idx = state::claim_index(&lock, &opts.name, &dir)?;
        let state = ClusterState {
            name: opts.name.clone(),
            idx,
            weft: opts.weft,
            dir: dir.clone(),
            tools_bin_dir: tools,
            weft_bin_dir: weft_bin,
            bridge: state::bridge_for(idx),
            bridge_ip: state::bridge_ip_for(idx),
            ports: Ports::for_index(idx),
            nodes: Vec::new(),
            processes: Vec::new(),
            owner_pid: opts.owner_pid,
            observability: None,
        };
        if let Err(e) = state.save() {
            state::release_index(&lock, idx, &opts.name);
            return Err(e);
        }
        drop(lock);
        let mut cluster = Cluster { state, children: Vec::new() };
        match cluster.bring_up(opts) {
            Ok(()) => Ok(cluster),
            Err(e) => {
                let logs = cluster.state.logs_dir();
                if let Err(te) = cluster.teardown() {
                    tracing::warn!("cleaning up after a failed start: {te:#}");
                }
                Err(e.context(format!("bringing up cluster {} (logs in {})", opts.name, logs.display())))
            }
        }
    }

    fn bring_up(&mut self, opts: &UpOptions) -> Result<()> {
        let started = Instant::now();
        if let Some(owner) = opts.owner_pid {
            self.start_reaper(owner)?;
        }
        controlplane::check_ports_free(&self.state)?;
        net::create_bridge(&self.state.bridge, self.state.bridge_ip, 24)?;
        // The operator's replicas run on node-1 and node-2 (the control-plane nodes).
        let plan_ips: Vec<std::net::Ipv4Addr> =
            (1..=OPERATOR_NODES).map(|n| nodes::node_ip(&self.state, n)).collect();
        let pki = Pki::create(&self.state.pki_dir(), &self.state.name, &[self.state.bridge_ip], &plan_ips)?;
        pki::write_kubeconfig(
            &self.state.admin_kubeconfig(),
            &self.state.name,
            &controlplane::loopback_server(&self.state),
            &pki.ca().cert,
            &pki.admin(),
        )?;
        progress(format_args!(
            "cluster {}: starting etcd and the control plane (API server on 127.0.0.1:{} and {}:{})",
            self.state.name, self.state.ports.apiserver, self.state.bridge_ip, self.state.ports.apiserver
        ));
        let procs = controlplane::start_apiserver(&self.state, &pki)?;
        let mut recs = Vec::new();
        for p in procs {
            recs.push(p.0.clone());
            self.record(p)?;
        }
        controlplane::wait_ready(&self.state, &recs, Duration::from_secs(180))?;
        progress(format_args!(
            "cluster {}: API server ready after {:.1?}",
            self.state.name,
            started.elapsed()
        ));
        for p in controlplane::start_controllers(&self.state, &pki)? {
            self.record(p)?;
        }
        if opts.apply_crds {
            self.apply_crds()?;
        }
        let registry = realnode::start_registry(&self.state)?;
        let rec = registry.0.clone();
        self.record(registry)?;
        realnode::wait_registry(&self.state, &rec, Duration::from_secs(30))?;
        if self.state.weft {
            if opts.observability {
                self.start_observability()?;
            }
            self.install_weft()?;
        }
        self.wait_controllers(Duration::from_secs(90))?;
        for _ in 0..opts.nodes {
            self.add_node()?;
        }
        self.label_nodes(Duration::from_secs(60))?;
        if opts.wait_nodes_ready && opts.nodes > 0 {
            self.wait_nodes_ready(Duration::from_secs(120))?;
        }
        self.check_processes()?;
        progress(format_args!("cluster {}: up after {:.1?}", self.state.name, started.elapsed()));
        Ok(())
    }

    /// Starts the OpenTelemetry Collector and Prometheus (see `observability.rs`) before Weft is
    /// installed, whose operator and agents then export to the collector. Skipped with a warning when
    /// install.sh has not installed them.
    fn start_observability(&mut self) -> Result<()> {
        if let Err(why) = observability::available(&self.state) {
            tracing::warn!("cluster {}: no collector and Prometheus: {why}", self.state.name);
            return Ok(());
        }
        let obs = Observability::for_cluster(&self.state);
        self.state.observability = Some(obs.clone());
        self.state.save()?;
        let mut records = Vec::new();
        for p in observability::start(&self.state, &obs)? {
            records.push(p.0.clone());
            self.record(p)?;
        }
        observability::wait_ready(&obs, &records, Duration::from_secs(60))?;
        progress(format_args!(
            "cluster {}: OpenTelemetry Collector (OTLP on {}, files in {}), Prometheus on http://{}",
            self.state.name,
            obs.otlp_endpoint,
            obs.otel_dir.display(),
            obs.prometheus
        ));
        Ok(())
    }

    /// The API server's HTTP CONNECT proxy into the cluster network, in `node`'s namespace.
    fn start_egress_proxy(&mut self, node: &NodeState) -> Result<()> {
        let p = process::Launch::new(
            "egress-proxy",
            self.weft_dev()?,
            self.state.logs_dir().join("egress-proxy.log"),
        )
        .netns(&node.netns)
        .arg("egress-proxy")
        .arg("--socket")
        .arg(egress::socket_path(&self.state))
        .spawn()?;
        self.record(p)
    }

    /// The weft-dev binary, which also runs the cluster's helper processes.
    fn weft_dev(&self) -> Result<PathBuf> {
        let dev = self.state.weft_bin_dir.join("weft-dev");
        if !dev.is_file() {
            bail!("{} is missing (it runs test clusters' helpers); `cargo build -p weft-e2e`", dev.display());
        }
        Ok(dev)
    }

    fn start_reaper(&mut self, owner: u32) -> Result<()> {
        let p = process::Launch::new("reaper", self.weft_dev()?, self.state.logs_dir().join("reaper.log"))
            .arg("reap")
            .arg("--dir")
            .arg(&self.state.dir)
            .args(["--pid", &owner.to_string()])
            .spawn()?;
        self.record(p)
    }

    /// Loads a cluster from its directory (`.weft/<name>`).
    pub fn open_dir(dir: &Path) -> Result<Cluster> {
        Ok(Cluster { state: ClusterState::load(dir)?, children: Vec::new() })
    }

    /// Loads the cluster `name` brought up by `weft-dev up`.
    pub fn open(name: &str) -> Result<Cluster> {
        let dir = weft_dir().join(name);
        if !ClusterState::state_file(&dir).exists() {
            bail!("no cluster named {name} is up (no {})", ClusterState::state_file(&dir).display());
        }
        Cluster::open_dir(&dir)
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The admin kubeconfig (API server on 127.0.0.1).
    pub fn kubeconfig(&self) -> PathBuf {
        self.state.admin_kubeconfig()
    }

    fn pki(&self) -> Pki {
        Pki { dir: self.state.pki_dir() }
    }

    fn record(&mut self, (rec, child): (ProcRecord, Child)) -> Result<()> {
        self.state.processes.push(rec);
        self.children.push(child);
        self.state.save()
    }

    /// Adds a node: namespace, identity, directories, containerd and the kubelet (and on node-1
    /// the API server's egress proxy into the cluster network). With Weft, its agent comes with
    /// the DaemonSet. Does not wait for the Node to be Ready.
    pub fn add_node(&mut self) -> Result<NodeState> {
        let node = nodes::plan(&self.state)?;
        self.state.nodes.push(node.clone());
        self.state.save()?;
        progress(format_args!(
            "cluster {}: node {} ({}, {}, netns {})",
            self.state.name, node.name, node.ip, node.zone, node.netns
        ));
        nodes::create(&self.state, &node, &self.pki())?;
        if let Some(obs) = &self.state.observability {
            // Prometheus re-reads the file: the new node's agent is scraped from now on.
            observability::write_agent_targets(&self.state, obs)?;
        }
        realnode::prepare(&self.state, &node, &self.state.ca_cert())?;
        let containerd = realnode::start_containerd(&self.state, &node)?;
        let rec = containerd.0.clone();
        self.record(containerd)?;
        realnode::wait_containerd(&node, &rec, Duration::from_secs(30))?;
        let kubelet = realnode::start_kubelet(&self.state, &node, &rec)?;
        self.record(kubelet)?;
        if node.index == 1 {
            self.start_egress_proxy(&node)?;
        }
        Ok(node)
    }

    /// Adds a node ([`Cluster::add_node`]), gives it its roles once it registered
    /// ([`Cluster::label_nodes`]) and waits for every node to be Ready.
    pub fn add_ready_node(&mut self) -> Result<NodeState> {
        let node = self.add_node()?;
        self.label_nodes(Duration::from_secs(60))?;
        self.wait_nodes_ready(Duration::from_secs(90))?;
        Ok(node)
    }

    /// Writes a token an agent of `node` proves its identity with, for an agent a benchmark runs
    /// itself: a `weft-system/weft-agent` token for the operator's audience, bound to the Node
    /// object (the DaemonSet's projected token is bound to the agent's Pod on that node, which
    /// the operator's TokenReview reads the same way). Returns where it is
    /// ([`nodes::plan_token`]).
    pub fn write_plan_token(&self, node: &NodeState) -> Result<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let token = loop {
            let minted = self.kubectl_ok(&[
                "create",
                "token",
                "weft-agent",
                "--namespace",
                "weft-system",
                "--audience",
                "weft-operator",
                "--bound-object-kind",
                "Node",
                "--bound-object-name",
                &node.name,
                "--duration",
                "8760h",
            ]);
            match minted {
                Ok(token) => break token,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => return Err(e.context(format!("a plan token bound to Node {}", node.name))),
            }
        };
        let path = nodes::plan_token(node);
        fs::write(&path, token.trim()).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(path)
    }

    /// Waits until every node of the cluster is registered and Ready.
    pub fn wait_nodes_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_processes()?;
            let out = self.kubectl(&[
                "get",
                "nodes",
                "-o",
                r#"jsonpath={range .items[*]}{.metadata.name}{"\t"}{.status.conditions[?(@.type=="Ready")].status}{"\t"}{.status.conditions[?(@.type=="Ready")].message}{"\n"}{end}"#,
            ]);
            let mut ready = Vec::new();
            let mut why = std::collections::BTreeMap::new();
            if let Ok(o) = &out
                && o.status.success()
            {
                for line in String::from_utf8_lossy(&o.stdout).lines() {
                    let mut f = line.splitn(3, '\t');
                    let (name, status, msg) = (f.next(), f.next(), f.next());
                    if let (Some(name), Some(status)) = (name, status) {
                        if status == "True" {
                            ready.push(name.to_string());
                        } else {
                            why.insert(name.to_string(), msg.unwrap_or_default().to_string());
                        }
                    }
                }
            }
            let missing: Vec<&str> = self
                .state
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .filter(|n| !ready.iter().any(|r| r == n))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let detail: Vec<String> = missing
                    .iter()
                    .map(|n| match why.get(*n) {
                        Some(m) => format!("{n}: NotReady: {m}"),
                        None => format!("{n}: not registered"),
                    })
                    .collect();
                bail!(
                    "nodes not Ready after {timeout:?}:\n  {}\n(the kubelets log to {}/kubelet-<node>.log)",
                    detail.join("\n  "),
                    self.state.logs_dir().display()
                );
            }
            process::reap(&mut self.children);
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the controller-manager works: the `default` ServiceAccount of namespace
    /// `default` exists (pods are rejected without it).
    fn wait_controllers(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_processes()?;
            let out = self.kubectl(&["get", "serviceaccount", "default", "-n", "default", "-o", "name"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the controller-manager did not create the default ServiceAccount within {timeout:?} (see {})",
                    self.state.logs_dir().join("kube-controller-manager.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Fails when a process of the cluster has exited, with the end of its log.
    pub fn check_processes(&mut self) -> Result<()> {
        process::reap(&mut self.children);
        if let Some(dead) = self.state.processes.iter().find(|p| p.name != "reaper" && !p.is_alive()) {
            bail!(
                "{} of cluster {} is not running; last lines of {}:\n{}",
                dead.name,
                self.state.name,
                dead.log.display(),
                process::log_tail(&dead.log, 20)
            );
        }
        Ok(())
    }

    /// Installs Weft as config/README.md tells a user to: namespace, bootstrap ConfigMap (this
    /// cluster's API server, the operator replicas' addresses on node-1 and node-2, the CA of the
    /// plan certificate), the plan TLS Secret, RBAC, the operator Deployment, the agent DaemonSet
    /// and the default objects. The images come from the cluster's registry.
    fn install_weft(&mut self) -> Result<()> {
        progress(format_args!(
            "cluster {}: installing Weft from config/ (images from {})",
            self.state.name,
            realnode::registry_addr(&self.state)
        ));
        let config = |part: &str| repo_root().join("config").join(part).to_string_lossy().into_owned();
        self.kubectl_ok(&["apply", "-f", &config("namespace.yaml")])?;
        let ca = fs::read_to_string(self.state.ca_cert()).context("reading the cluster CA")?;
        let operators: Vec<String> = (1..=OPERATOR_NODES)
            .map(|n| format!("https://{}:{PLAN_PORT}", nodes::node_ip(&self.state, n)))
            .collect();
        let server = format!("https://{}:{}", self.state.bridge_ip, self.state.ports.apiserver);
        let bootstrap = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "weft-bootstrap",
                "namespace": "weft-system",
                "labels": { "app.kubernetes.io/part-of": "weft" },
            },
            "data": {
                "apiserver-host": self.state.bridge_ip.to_string(),
                "apiserver-port": self.state.ports.apiserver.to_string(),
                "operator-address": operators.join(","),
                "operator-ca.crt": ca,
                "dns-kubeconfig": dns_token_kubeconfig(&server),
            },
        });
        self.kubectl_stdin(&["apply", "-f", "-"], &bootstrap.to_string())?;
        let tls = self.pki().plan();
        let secret = self.kubectl_ok(&[
            "create",
            "secret",
            "tls",
            "weft-operator-plan-tls",
            "--namespace=weft-system",
            &format!("--cert={}", tls.cert.display()),
            &format!("--key={}", tls.key.display()),
            "--dry-run=client",
            "-o",
            "json",
        ])?;
        self.kubectl_stdin(&["apply", "-f", "-"], &secret)?;
        for part in ["rbac", "operator", "agent", "default"] {
            match (&self.state.observability, part) {
                (Some(obs), "operator" | "agent") => {
                    let docs = with_otel_env(&repo_root().join("config").join(part), obs)?;
                    self.kubectl_stdin(&["apply", "-f", "-"], &docs)?;
                }
                _ => {
                    self.kubectl_ok(&["apply", "-R", "-f", &config(part)])?;
                }
            }
        }
        Ok(())
    }

    /// Gives every node, once it has registered, the roles an admin gives it (labels no kubelet
    /// may set on itself): node-1 and node-2 are control-plane nodes, where the operator
    /// Deployment runs its replicas, as on a cluster whose control plane has kubelets; every
    /// node serves ingress (the default NetworkConfig's `ingress.nodeSelector`). Idempotent.
    pub fn label_nodes(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let nodes: Vec<(String, u8)> = self.state.nodes.iter().map(|n| (n.name.clone(), n.index)).collect();
        for (name, index) in nodes {
            let mut labels = vec!["node-role.kubernetes.io/ingress="];
            if index <= OPERATOR_NODES {
                labels.push("node-role.kubernetes.io/control-plane=");
            }
            loop {
                self.check_processes()?;
                let mut args = vec!["label", "--overwrite", "node", &name];
                args.extend(labels.iter().copied());
                match self.kubectl_ok(&args) {
                    Ok(_) => break,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(300)),
                    Err(e) => return Err(e.context(format!("node {name} did not register"))),
                }
            }
        }
        Ok(())
    }

    /// `kubectl` fed `input` on stdin; must succeed.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.state.kubectl_bin().display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies Weft's CRDs (`crds/*.yaml`; skipped with a warning when there are none yet) and
    /// the upstream ones install.sh caches beside the tools ([`ClusterState::upstream_crds_dir`]:
    /// the network-policy-api `ClusterNetworkPolicy` CRD, which the operator watches), and waits
    /// for them to be Established.
    pub fn apply_crds(&mut self) -> Result<()> {
        let crds = repo_root().join("crds");
        let upstream = self.state.upstream_crds_dir();
        if !nodes::has_yaml(&upstream) {
            bail!("{} has no CRD manifests: run e2e/tools/install.sh (make tools)", upstream.display());
        }
        let mut dirs = vec![upstream];
        if nodes::has_yaml(&crds) {
            dirs.insert(0, crds);
        } else {
            tracing::warn!("{} has no CRD manifests yet; skipping", crds.display());
        }
        for crds in dirs {
            let dir = crds.to_string_lossy().into_owned();
            self.kubectl_ok(&["apply", "-f", &dir])?;
            self.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", "-f", &dir])?;
        }
        Ok(())
    }

    /// `kubectl --kubeconfig <admin> args…`, output captured.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.state.kubectl_bin().display()))
    }

    /// `kubectl` that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A `kubectl` command with the admin kubeconfig, to add arguments and run.
    pub fn kubectl_command(&self) -> Command {
        let mut c = Command::new(self.state.kubectl_bin());
        c.arg("--kubeconfig").arg(self.state.admin_kubeconfig());
        c
    }

    /// Each process of the cluster and whether it is running.
    pub fn processes(&self) -> Vec<(ProcRecord, bool)> {
        self.state.processes.iter().map(|p| (p.clone(), p.is_alive())).collect()
    }

    /// Stops every process (node side first), removes the namespaces, veths and bridge, and the
    /// bulky state (etcd, node directories); keeps `logs/` and moves `state.json` to
    /// `state.down.json`. Synchronous, idempotent and best effort: it carries on past failures
    /// and reports them at the end.
    pub fn teardown(&mut self) -> Result<()> {
        let dir = self.state.dir.clone();
        let lock_path = dir.join(".lock");
        let lock = fs::File::options().create(true).truncate(false).write(true).open(&lock_path);
        let _guard = match lock {
            Ok(f) => f.lock().map(|()| f).ok(),
            Err(_) => None,
        };
        // Someone else may have torn it down (or changed it) while we waited.
        if let Ok(s) = ClusterState::load(&dir) {
            self.state = s;
        } else if !ClusterState::state_file(&dir).exists() && !self.state.nodes.is_empty() {
            tracing::debug!("cluster {} already torn down", self.state.name);
        }
        let mut errors = Vec::new();
        let me = std::process::id();
        let recs: Vec<ProcRecord> =
            self.state.processes.iter().filter(|p| p.pid != me && p.is_alive()).cloned().collect();
        let (node_side, control): (Vec<ProcRecord>, Vec<ProcRecord>) =
            recs.into_iter().partition(|p| p.netns.is_some() || p.name.starts_with("weft-operator"));
        let node_pids: Vec<u32> = node_side.iter().map(|p| p.pid).collect();
        let control_pids: Vec<u32> = control.iter().map(|p| p.pid).collect();
        let mut node_all = node_pids.clone();
        node_all.extend(process::descendants(&node_pids));
        process::terminate(&node_all, Duration::from_secs(5), &mut self.children);
        let mut control_all = control_pids.clone();
        control_all.extend(process::descendants(&control_pids));
        process::terminate(&control_all, Duration::from_secs(3), &mut self.children);

        // Shims and containers, which left containerd's process tree, are found by the node's
        // cgroup; the node's mounts go with its mount namespace.
        for n in &self.state.nodes {
            errors.extend(realnode::teardown_node(&self.state, n, &mut self.children));
        }
        // Other named namespaces tied to ours (a benchmark's or a tool's, not named by us) are
        // found through their veth peers in our node namespaces, or by being one of them.
        let prefix = self.state.netns_prefix();
        let ours: Vec<String> = net::list_netns().into_iter().filter(|n| n.starts_with(&prefix)).collect();
        let node_inodes: BTreeSet<u64> = ours.iter().filter_map(|n| process::netns_inode(n)).collect();
        let pods_ns: Vec<String> = net::list_netns()
            .into_iter()
            .filter(|n| !n.starts_with(&prefix))
            .filter(|n| {
                process::netns_inode(n).is_some_and(|i| node_inodes.contains(&i)) || net::links_into(n, &ours)
            })
            .collect();
        // Anything still running inside those namespaces (daemons that double-forked).
        let inodes: BTreeSet<u64> =
            ours.iter().chain(&pods_ns).filter_map(|n| process::netns_inode(n)).collect();
        let stragglers = process::pids_in_netns(&inodes);
        process::terminate(&stragglers, Duration::from_secs(2), &mut self.children);
        // Those first (their veths live in node namespaces), then nodes.
        for ns in pods_ns.iter().chain(&ours) {
            if let Err(e) = net::delete_netns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        for n in &self.state.nodes {
            if let Err(e) = net::delete_link(&n.veth) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = net::delete_link(&self.state.bridge) {
            errors.push(format!("{e:#}"));
        }
        let _ = fs::remove_dir_all(dir.join("etcd"));
        let _ = fs::remove_dir_all(dir.join("nodes"));
        // Prometheus's TSDB is bulky; the collector's files (otel/) stay with the logs.
        let _ = fs::remove_dir_all(dir.join("prometheus").join("data"));
        let state_file = ClusterState::state_file(&dir);
        if state_file.exists()
            && let Err(e) = fs::rename(&state_file, dir.join("state.down.json"))
        {
            errors.push(format!("moving {}: {e}", state_file.display()));
        }
        match state::lock_registry() {
            Ok(lock) => state::release_index(&lock, self.state.idx, &self.state.name),
            Err(e) => errors.push(format!("{e:#}")),
        }
        process::reap(&mut self.children);
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down cluster {}: {}", self.state.name, errors.join("; "))
        }
    }
}

/// The manifests of `dir` with the `OTEL_*` environment pointing Weft at the cluster's collector
/// added to every container of its Deployments and DaemonSets, as JSON lines for `kubectl apply`.
/// The agents name their node through the DaemonSet's `NODE_NAME` variable.
fn with_otel_env(dir: &Path, obs: &Observability) -> Result<String> {
    let mut out = String::new();
    for file in nodes::yaml_files(dir)? {
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut value =
                serde_json::Value::deserialize(doc).with_context(|| format!("parsing {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let env = match value["kind"].as_str() {
                // Each replica its own series: the collector would merge two identical resources.
                Some("Deployment") => {
                    let mut env = obs.otel_env("weft-operator", None);
                    env.push(("OTEL_RESOURCE_ATTRIBUTES".into(), "k8s.pod.name=$(POD_NAME)".into()));
                    env
                }
                Some("DaemonSet") => obs.otel_env("weft-agent", Some("$(NODE_NAME)")),
                _ => Vec::new(),
            };
            if let Some(containers) =
                value.pointer_mut("/spec/template/spec/containers").and_then(|c| c.as_array_mut())
            {
                for c in containers {
                    let vars = c["env"].as_array().cloned().unwrap_or_default();
                    let mut vars: Vec<serde_json::Value> = vars;
                    vars.extend(env.iter().map(|(k, v)| serde_json::json!({ "name": k, "value": v })));
                    c["env"] = serde_json::Value::Array(vars);
                }
            }
            out.push_str(&value.to_string());
            out.push('\n');
        }
    }
    Ok(out)
}

/// The kubeconfig each node's CoreDNS reads the API with: the short-lived token the agent
/// DaemonSet projects for it (config/rbac/dns.yaml), as in config/bootstrap.yaml.
fn dns_token_kubeconfig(server: &str) -> String {
    dns_kubeconfig(
        server,
        Path::new("/var/run/secrets/weft-dns/ca.crt"),
        Path::new("/var/run/secrets/weft-dns/token"),
    )
}

/// A kubeconfig for CoreDNS's kubernetes plugin: `server`, trusting `ca`, with the token in
/// `token_file` (client-go re-reads it, so a rotated token is picked up).
pub fn dns_kubeconfig(server: &str, ca: &Path, token_file: &Path) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: weft-dns
  user:
    tokenFile: {token}
contexts:
- name: weft-dns
  context:
    cluster: cluster
    user: weft-dns
current-context: weft-dns
",
        ca = ca.display(),
        token = token_file.display()
    )
}

/// Tears down the cluster whose state is in `dir` (what `weft-dev down` and the reaper do).
pub fn teardown_dir(dir: &Path) -> Result<()> {
    let mut c = Cluster::open_dir(dir)?;
    c.teardown()
}

/// Every cluster directory with a `state.json` under `.weft/` (and `.weft/tests/`), plus those in
/// the machine-wide registry.
pub fn known_clusters() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for base in [weft_dir(), weft_dir().join("tests")] {
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.filter_map(|e| e.ok()) {
                if ClusterState::state_file(&e.path()).exists() {
                    dirs.push(e.path());
                }
            }
        }
    }
    for (_, e) in state::registered() {
        if ClusterState::state_file(&e.dir).exists() && !dirs.contains(&e.dir) {
            dirs.push(e.dir);
        }
    }
    dirs.sort();
    dirs
}

/// The cluster index in a link name of ours (`wbr<i>`, `wv<i>n<n>`).
fn link_index(link: &str) -> Option<u8> {
    link.strip_prefix("wbr")
        .or_else(|| link.strip_prefix("wv").and_then(|r| r.split('n').next()))
        .and_then(|i| i.parse::<u8>().ok())
}

/// What is left of local clusters on this machine: registry entries, `weft-*` network namespaces,
/// `wbr*`/`wv*` links. `only_tests` ignores clusters brought up by
/// `weft-dev up` (everything not named `e2e-…`) and what belongs to them.
pub fn leftovers(only_tests: bool) -> Vec<String> {
    let counts = |name: &str| !only_tests || testing::is_test_name(name);
    let registered = state::registered();
    let mut out: Vec<String> = registered
        .iter()
        .filter(|(_, e)| counts(&e.name))
        .map(|(i, e)| format!("cluster index {i} still registered to {} ({})", e.name, e.dir.display()))
        .collect();
    let kept: Vec<(u8, String)> = registered
        .iter()
        .filter(|(_, e)| !counts(&e.name))
        .map(|(i, e)| (*i, state::netns_prefix(&e.name)))
        .collect();
    let all_ns = net::list_netns();
    let kept_ns: Vec<String> =
        all_ns.iter().filter(|n| kept.iter().any(|(_, p)| n.starts_with(p))).cloned().collect();
    for ns in &all_ns {
        if ns.starts_with("weft-") && !kept_ns.contains(ns) {
            out.push(format!("network namespace {ns}"));
        }
    }
    for link in net::list_links() {
        if link_index(&link).is_some_and(|i| !kept.iter().any(|(k, _)| *k == i)) {
            out.push(format!("link {link}"));
        }
    }
    out.extend(host_rules());
    out
}

/// Service or route rules of Weft's in the machine's own namespace: only a node's namespace may
/// hold them (an in-process test agent once wrote its proxy rules here).
fn host_rules() -> Vec<String> {
    let stdout = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut out: Vec<String> = stdout("nft", &["list", "tables"])
        .lines()
        .filter(|l| l.contains("weft"))
        .map(|l| format!("nftables {l} in the machine's own namespace"))
        .collect();
    for program in ["iptables-save", "iptables-legacy-save"] {
        let chains = stdout(program, &[]).lines().filter(|l| l.contains("WEFT-")).count();
        if chains > 0 {
            out.push(format!("{chains} WEFT- rules and chains in the machine's own namespace ({program})"));
        }
    }
    out
}

/// Tears down every known cluster, then removes any remaining `weft-*` namespaces,
/// `wbr*`/`wv*` links and registry entries.
pub fn down_all() -> Result<()> {
    let mut errors = Vec::new();
    for dir in known_clusters() {
        if let Err(e) = teardown_dir(&dir) {
            errors.push(format!("{e:#}"));
        }
    }
    for ns in net::list_netns().into_iter().filter(|n| n.starts_with("weft-")) {
        if let Some(ino) = process::netns_inode(&ns) {
            let pids = process::pids_in_netns(&[ino].into_iter().collect());
            process::terminate(&pids, Duration::from_secs(2), &mut Vec::new());
        }
        if let Err(e) = net::delete_netns(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    for link in net::list_links() {
        if link_index(&link).is_some()
            && let Err(e) = net::delete_link(&link)
        {
            errors.push(format!("{e:#}"));
        }
    }
    if let Ok(lock) = state::lock_registry() {
        for (idx, e) in state::registered() {
            state::release_index(&lock, idx, &e.name);
        }
    }
    if errors.is_empty() { Ok(()) } else { bail!("{}", errors.join("; ")) }
}

/// `weft-dev reap`: waits for process `pid` to exit, then tears down the cluster in `dir`
/// (unless it is already gone). This is what makes test clusters disappear even when the test
/// process panics, is killed, or keeps a cluster in a static.
pub fn reap(dir: &Path, pid: u32) -> Result<()> {
    let start = process::proc_stat(pid).map(|s| s.start_time);
    loop {
        let alive = process::proc_stat(pid).is_some_and(|s| Some(s.start_time) == start && s.state != 'Z');
        if !alive {
            break;
        }
        if !ClusterState::state_file(dir).exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !ClusterState::state_file(dir).exists() {
        return Ok(());
    }
    let mut log = std::io::stderr();
    let _ = writeln!(log, "owner {pid} exited at unix time {}; tearing down {}", now_secs(), dir.display());
    teardown_dir(dir)
}
