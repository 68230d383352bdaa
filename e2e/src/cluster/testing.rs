//! The test API: a cluster per test (torn down on drop, even when the test panics) or one shared
//! per test binary (torn down by its reaper when the binary exits), and the helpers tests use to
//! act like a cluster admin: kubectl, apply, namespaces, pods, exec, curl, dig, waiting.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use tokio::io::AsyncWriteExt as _;

use super::{Cluster, ClusterState, NodeState, ProcRecord, UpOptions, weft_dir};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Names of test clusters: `e2e-<pid>-<n>`.
pub(crate) fn is_test_name(name: &str) -> bool {
    name.starts_with("e2e-")
}

fn unique_cluster_name() -> String {
    format!("e2e-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// How a test cluster is brought up.
#[derive(Clone, Debug)]
pub struct TestOptions {
    /// Nodes to start with (default 2).
    pub nodes: u8,
    /// Install Weft from `config/` (the operator Deployment, the agent DaemonSet; pods on
    /// weft-cni). Default false: tests of the cluster itself do without, on the reference CNI.
    pub weft: bool,
    /// `kubectl apply -f crds/` and the upstream CRDs (ClusterNetworkPolicy), as
    /// [`super::Cluster::apply_crds`] (default true).
    pub apply_crds: bool,
    /// Where `weft-dev` is (it runs the cluster's helpers); tests pass
    /// `env!("CARGO_BIN_EXE_weft-dev")`'s directory. Default: next to the test binary.
    pub weft_bin_dir: Option<PathBuf>,
    /// With Weft: an OpenTelemetry Collector and Prometheus watching it (default true).
    pub observability: bool,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions { nodes: 2, weft: false, apply_crds: true, weft_bin_dir: None, observability: true }
    }
}

impl TestOptions {
    pub fn nodes(mut self, n: u8) -> Self {
        self.nodes = n;
        self
    }

    /// Install Weft from `config/`.
    pub fn weft(mut self, yes: bool) -> Self {
        self.weft = yes;
        self
    }

    /// Run the OpenTelemetry Collector and Prometheus along with Weft.
    pub fn observability(mut self, yes: bool) -> Self {
        self.observability = yes;
        self
    }

    pub fn apply_crds(mut self, yes: bool) -> Self {
        self.apply_crds = yes;
        self
    }

    /// The directory holding `weft-dev` given its path (`env!("CARGO_BIN_EXE_weft-dev")`).
    pub fn weft_dev(mut self, weft_dev: impl AsRef<Path>) -> Self {
        self.weft_bin_dir = weft_dev.as_ref().parent().map(Path::to_path_buf);
        self
    }
}

#[derive(Debug)]
struct Inner {
    cluster: Mutex<Cluster>,
    /// Snapshot for cheap reads (updated after add_node).
    state: Mutex<ClusterState>,
    owned: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let mut c = match self.cluster.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = c.teardown() {
            eprintln!("tearing down test cluster {}: {e:#}", c.name());
        }
    }
}

/// A local cluster for a test. Dropping one from [`TestCluster::start`] tears it down
/// synchronously; the one from [`TestCluster::shared`] lives until the test binary exits.
#[derive(Clone)]
pub struct TestCluster {
    inner: Arc<Inner>,
    client: kube::Client,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster").field("name", &lock(&self.inner.state).name).finish_non_exhaustive()
    }
}

static SHARED: tokio::sync::OnceCell<std::result::Result<Arc<Inner>, String>> =
    tokio::sync::OnceCell::const_new();

impl TestCluster {
    /// Brings up a cluster of its own (unique name, own bridge and ports), torn down when the
    /// returned value is dropped — or by its reaper if the test process dies first.
    pub async fn start(opts: TestOptions) -> Result<TestCluster> {
        let inner = Arc::new(start_inner(opts, true).await?);
        Self::with_inner(inner).await
    }

    /// The test binary's shared cluster, started by the first caller with `opts` (later callers'
    /// options are ignored). Tests sharing it isolate themselves with [`TestCluster::namespace`].
    pub async fn shared(opts: TestOptions) -> Result<TestCluster> {
        let inner = SHARED
            .get_or_init(|| async move {
                start_inner(opts, false).await.map(Arc::new).map_err(|e| format!("{e:#}"))
            })
            .await
            .clone()
            .map_err(|e| anyhow::anyhow!("the shared test cluster failed to start: {e}"))?;
        Self::with_inner(inner).await
    }

    async fn with_inner(inner: Arc<Inner>) -> Result<TestCluster> {
        let kubeconfig = lock(&inner.state).admin_kubeconfig();
        let client = client_for(&kubeconfig).await?;
        Ok(TestCluster { inner, client })
    }

    /// A snapshot of the cluster's state (name, index, addresses, nodes, processes).
    pub fn state(&self) -> ClusterState {
        lock(&self.inner.state).clone()
    }

    pub fn name(&self) -> String {
        self.state().name
    }

    pub fn nodes(&self) -> Vec<NodeState> {
        self.state().nodes
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.state().admin_kubeconfig()
    }

    /// A client with the admin identity, bound to the calling test's runtime.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Merges `spec` into the spec of NetworkConfig `default` (a JSON merge patch, as
    /// `kubectl patch --type=merge` sends).
    pub async fn patch_network_config(&self, spec: serde_json::Value) -> Result<()> {
        let configs: Api<weft_api::v1alpha1::NetworkConfig> = Api::all(self.client());
        let patch = serde_json::json!({ "spec": spec });
        configs
            .patch("default", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching NetworkConfig default with spec {spec}"))?;
        Ok(())
    }

    /// Adds a node and waits for it to be Ready.
    pub async fn add_node(&self) -> Result<NodeState> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = lock(&inner.cluster);
            let res = c.add_ready_node();
            *lock(&inner.state) = c.state().clone();
            res
        })
        .await?
    }

    /// `kubectl get args…` as rows of column name → value (for tables whose values hold no spaces).
    pub async fn get_table(&self, args: &[&str]) -> Result<Vec<BTreeMap<String, String>>> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        let out = self.kubectl(&full).await?;
        let mut lines = out.lines();
        let Some(header) = lines.next() else { return Ok(Vec::new()) };
        let header: Vec<&str> = header.split_whitespace().collect();
        Ok(lines
            .map(|l| {
                header.iter().map(|h| h.to_string()).zip(l.split_whitespace().map(str::to_string)).collect()
            })
            .collect())
    }

    /// Runs `kubectl args…` with the admin kubeconfig; fails on a non-zero exit, with stderr.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(args, None).await?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `kubectl args…` with optional stdin and returns whatever happened.
    pub async fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let state = self.state();
        let mut cmd = tokio::process::Command::new(state.kubectl_bin());
        cmd.arg("--kubeconfig")
            .arg(state.admin_kubeconfig())
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("running {}", state.kubectl_bin().display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
            drop(pipe);
        }
        Ok(child.wait_with_output().await?)
    }

    /// `kubectl apply -f -` of the given YAML (one or more documents).
    pub async fn apply_yaml(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_output(&["apply", "-f", "-"], Some(yaml)).await?;
        if !out.status.success() {
            bail!("kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a namespace `<prefix>-<n>` unique in this cluster and waits for its default
    /// ServiceAccount (pods are rejected until it exists). Deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let name = format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        self.kubectl(&["create", "namespace", &name]).await?;
        let ns = TestNamespace { name: name.clone(), state: self.state() };
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), &name);
        wait_for("the namespace's default ServiceAccount", Duration::from_secs(60), || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
        })
        .await?;
        Ok(ns)
    }

    /// Waits (60 s) until no pod of `namespace` matches the label `selector` any more.
    pub async fn wait_pods_gone(&self, namespace: &str, selector: &str) -> Result<()> {
        self.kubectl(&["-n", namespace, "wait", "--for=delete", "pod", "-l", selector, "--timeout=60s"])
            .await
            .map(drop)
    }

    /// Creates a Pod and waits until it runs with an IP and is Ready.
    pub async fn run_pod(&self, opts: PodOptions) -> Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client(), &opts.namespace);
        pods.create(&PostParams::default(), &opts.to_pod())
            .await
            .with_context(|| format!("creating pod {}/{}", opts.namespace, opts.name))?;
        self.wait_pod_running(&opts.namespace, &opts.name, Duration::from_secs(90)).await
    }

    /// Waits for a pod to be Running, Ready and have an IP; fails early when it failed or its
    /// image cannot be pulled or the container not created.
    pub async fn wait_pod_running(&self, namespace: &str, name: &str, timeout: Duration) -> Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        wait_for(&format!("pod {namespace}/{name} to run"), timeout, || {
            let pods = pods.clone();
            async move {
                let Some(pod) = pods.get_opt(name).await? else { return Ok(None) };
                check_pod(&pod).map(|ok| ok.then_some(pod))
            }
        })
        .await
    }

    /// The pod's IP (after it runs).
    pub async fn pod_ip(&self, namespace: &str, name: &str) -> Result<String> {
        let pod: Pod = Api::namespaced(self.client(), namespace).get(name).await?;
        pod.status.and_then(|s| s.pod_ip).with_context(|| format!("pod {namespace}/{name} has no IP"))
    }

    /// Runs `cmd` inside the pod (`kubectl exec`: its namespaces, resolv.conf…); returns the
    /// output whatever the exit status.
    pub async fn exec_in_pod(&self, namespace: &str, pod: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["-n", namespace, "exec", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl_output(&args, None).await
    }

    /// Like [`TestCluster::exec_in_pod`] but the command must succeed; returns stdout.
    pub async fn exec_ok(&self, namespace: &str, pod: &str, cmd: &[&str]) -> Result<String> {
        let out = self.exec_in_pod(namespace, pod, cmd).await?;
        if !out.status.success() {
            bail!(
                "`{}` in pod {namespace}/{pod} failed ({}): {}{}",
                cmd.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `curl -sS --max-time 5 <url>` from inside a pod; the response body.
    pub async fn curl_from_pod(&self, namespace: &str, pod: &str, url: &str) -> Result<String> {
        self.exec_ok(namespace, pod, &["curl", "-sS", "--max-time", "5", url]).await
    }

    /// `dig +short <name> <type>` from inside a pod (with the pod's resolv.conf); the answers.
    pub async fn dig_from_pod(
        &self,
        namespace: &str,
        pod: &str,
        name: &str,
        rtype: &str,
    ) -> Result<Vec<String>> {
        let out = self
            .exec_ok(namespace, pod, &["dig", "+short", "+time=2", "+tries=2", "+search", name, rtype])
            .await?;
        Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
    }

    /// Writes a Node-bound plan token for an agent of `node` that a benchmark runs itself; see
    /// [`Cluster::write_plan_token`].
    pub async fn write_plan_token(&self, node: &NodeState) -> Result<PathBuf> {
        let inner = self.inner.clone();
        let node = node.clone();
        tokio::task::spawn_blocking(move || lock(&inner.cluster).write_plan_token(&node)).await?
    }

    /// The live processes named `comm` on `node` (under its cgroup, its containers' included).
    pub fn node_processes(&self, node: &str, comm: &str) -> Result<Vec<ProcRecord>> {
        let state = self.state();
        let n = state.node(node).with_context(|| format!("no node {node} in this cluster"))?;
        Ok(super::realnode::node_processes(&state, n, comm))
    }

    /// The running agent of `node`: its container's process.
    pub fn agent_process(&self, node: &str) -> Result<ProcRecord> {
        let state = self.state();
        let n = state.node(node).with_context(|| format!("no node {node} in this cluster"))?;
        super::realnode::agent_process(&state, n).with_context(|| format!("no agent runs on {node}"))
    }

    /// Sends `signal` to the agent container's process on `node`, as a crash would, and waits
    /// up to 10 s for it to exit; returns whether it did. The kubelet restarts the container
    /// ([`TestCluster::wait_agent_restarted`]).
    pub async fn kill_agent(&self, node: &str, signal: rustix::process::Signal) -> Result<bool> {
        let record = self.agent_process(node)?;
        let pid = i32::try_from(record.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .with_context(|| format!("the agent of {node} has no valid pid ({})", record.pid))?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("sending {signal:?} to the agent of {node} (pid {})", record.pid))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while record.is_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(!record.is_alive())
    }

    /// Crashes the agent of `node` `crashes` times, each time once the kubelet has restarted it,
    /// and returns after the last: the container is then in CrashLoopBackOff, down for the
    /// kubelet's back-off (10 s doubled per crash: 40 s after the fourth), as an agent that
    /// keeps crashing is.
    pub async fn crash_loop_agent(&self, node: &str, crashes: u32) -> Result<()> {
        for crash in 1..=crashes {
            if crash > 1 {
                self.wait_agent_restarted(node).await?;
            }
            if !self.kill_agent(node, rustix::process::Signal::KILL).await? {
                bail!("the agent of {node} did not exit on SIGKILL (crash {crash})");
            }
        }
        Ok(())
    }

    /// Waits (up to the kubelet's 5 min back-off cap) for the kubelet to have restarted the
    /// agent container of `node` after [`TestCluster::kill_agent`]; its new process. Does not
    /// wait for it to apply its plan.
    pub async fn wait_agent_restarted(&self, node: &str) -> Result<ProcRecord> {
        let state = self.state();
        let node = state.node(node).cloned().with_context(|| format!("no node {node} in this cluster"))?;
        wait_for(
            &format!("the kubelet to restart the agent of {}", node.name),
            Duration::from_secs(310),
            || {
                let (state, node) = (state.clone(), node.clone());
                async move { Ok(super::realnode::agent_process(&state, &node)) }
            },
        )
        .await
    }

    /// Runs the operator with `env` added to its environment (settings, by the variables its flags
    /// read): `kubectl set env` on its Deployment, waiting (120 s) until a replica with those
    /// settings is ready and holds the leader Lease.
    pub async fn set_operator_env(&self, env: &[(&str, &str)]) -> Result<()> {
        let mut args = vec!["-n".to_string(), "weft-system".into(), "set".into(), "env".into()];
        args.push("deployment/weft-operator".into());
        args.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        self.kubectl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        let pods: Api<Pod> = Api::namespaced(self.client(), "weft-system");
        wait_for("an operator replica with the new settings to lead", Duration::from_secs(120), || {
            let pods = pods.clone();
            async move {
                // No Lease, or no holder yet: keep waiting.
                let Ok(holder) = self.operator_leader().await else { return Ok(None) };
                let Some(pod) = pods.get_opt(&holder).await? else { return Ok(None) };
                let has_env = pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
                    env.iter().all(|(k, v)| {
                        c.env.iter().flatten().any(|e| e.name == *k && e.value.as_deref() == Some(*v))
                    })
                });
                Ok((has_env && check_pod(&pod)?).then_some(()))
            }
        })
        .await
    }

    /// The `/metrics` text of the operator replica holding the leader Lease (the one serving
    /// plans and writing status; OpenMetrics).
    pub async fn operator_metrics(&self) -> Result<String> {
        metrics_text(self.operator_leader_metrics_addr().await?.into()).await
    }

    /// The operator Deployment's running replicas: pod name and where it serves `/metrics` (its
    /// node's address).
    pub async fn operator_replicas(&self) -> Result<Vec<(String, std::net::SocketAddrV4)>> {
        let state = self.state();
        let pods: Api<Pod> = Api::namespaced(self.client(), "weft-system");
        let list = pods
            .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=weft-operator"))
            .await
            .context("listing the operator's pods")?;
        let mut out = Vec::new();
        for pod in list {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            if let Some(node) = node.and_then(|n| state.node(&n).cloned())
                && check_pod(&pod).unwrap_or(false)
            {
                out.push((name, std::net::SocketAddrV4::new(node.ip, super::OPERATOR_METRICS_PORT)));
            }
        }
        Ok(out)
    }

    /// Where the operator's leader replica (the Lease holder) serves `/metrics`.
    pub async fn operator_leader_metrics_addr(&self) -> Result<std::net::SocketAddrV4> {
        let holder = self.operator_leader().await?;
        let replicas = self.operator_replicas().await?;
        replicas
            .into_iter()
            .find_map(|(pod, addr)| (pod == holder).then_some(addr))
            .with_context(|| format!("the Lease holder {holder} is not a running replica"))
    }

    /// The pod holding the operator's leader Lease (`weft-system/weft-operator`).
    pub async fn operator_leader(&self) -> Result<String> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client(), "weft-system");
        let lease = leases.get("weft-operator").await.context("reading the operator's Lease")?;
        lease.spec.and_then(|s| s.holder_identity).context("the operator's Lease has no holder")
    }

    /// What the agent of `node` recorded for `programmer` (`proxy`, `routes`, `ipam`, `cni`,
    /// `dns`): the text of `<agent state dir>/programmed/<programmer>.txt`.
    pub async fn programmed(&self, node: &str, programmer: &str) -> Result<String> {
        let state = self.state();
        let node = state.node(node).with_context(|| format!("no node {node} in this cluster"))?;
        let path = node.programmed_file(programmer);
        tokio::fs::read_to_string(&path).await.with_context(|| format!("reading {}", path.display()))
    }

    /// Sets NetworkConfig `default` to proxy `mode` (`iptables` or `nftables`) and waits (60 s)
    /// until every agent's proxy record says that mode.
    pub async fn use_proxy_mode(&self, mode: &str) -> Result<()> {
        self.patch_network_config(serde_json::json!({"proxy": {"mode": mode}})).await?;
        let record = format!("mode {mode}\n");
        self.wait_for(&format!("every agent on the {mode} backend"), Duration::from_secs(60), || async {
            for node in self.nodes() {
                if !self.programmed(&node.name, "proxy").await?.starts_with(&record) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
    }

    /// The cluster's collector and Prometheus; an error when they do not run.
    pub fn observability(&self) -> Result<super::Observability> {
        self.state().observability.with_context(|| {
            format!(
                "cluster {} runs no collector and Prometheus (Weft off, or otelcol-weft/prometheus not installed: run e2e/tools/install.sh)",
                self.name()
            )
        })
    }

    /// Runs a PromQL instant query against the cluster's Prometheus; one sample per series.
    pub async fn prometheus_query(&self, promql: &str) -> Result<Vec<super::PromSample>> {
        let obs = self.observability()?;
        let path = format!("/api/v1/query?query={}", super::observability::url_encode(promql));
        let (_code, body) = http_get(obs.prometheus.into(), &path).await?;
        super::observability::parse_query_response(&body).with_context(|| format!("query {promql}"))
    }

    /// Every span the collector has received so far (its file exporter's output).
    pub async fn traces(&self) -> Result<Vec<super::SpanRecord>> {
        let path = self.observability()?.traces_file();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(super::observability::parse_traces(&text))
    }

    /// `(service.name, metric name)` of every metric the collector has received over OTLP.
    pub async fn otlp_metric_names(&self) -> Result<std::collections::BTreeSet<(String, String)>> {
        let path = self.observability()?.metrics_file();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(super::observability::parse_metric_names(&text))
    }

    /// See [`wait_for`].
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        wait_for(what, timeout, f).await
    }
}

async fn start_inner(opts: TestOptions, owned: bool) -> Result<Inner> {
    let name = unique_cluster_name();
    let up = UpOptions {
        dir: Some(weft_dir().join("tests").join(&name)),
        name,
        nodes: opts.nodes,
        weft: opts.weft,
        tools_bin_dir: None,
        weft_bin_dir: opts.weft_bin_dir,
        apply_crds: opts.apply_crds,
        owner_pid: Some(std::process::id()),
        wait_nodes_ready: true,
        observability: opts.observability,
    };
    let cluster = tokio::task::spawn_blocking(move || {
        prune_old_test_dirs();
        Cluster::up(&up)
    })
    .await??;
    let state = cluster.state().clone();
    Ok(Inner { cluster: Mutex::new(cluster), state: Mutex::new(state), owned })
}

/// Removes the directories (logs) of test clusters that are down and older than six hours.
fn prune_old_test_dirs() {
    let Ok(rd) = std::fs::read_dir(weft_dir().join("tests")) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        let down = p.join("state.down.json");
        let old = std::fs::metadata(&down)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(6 * 3600)));
        if old && !ClusterState::state_file(&p).exists() {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// Polls `f` every 250 ms until it returns `Ok(Some(_))`, or fails after `timeout` with the last
/// error (or "still not"). An `Err` from `f` is treated as "not yet".
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last: Option<anyhow::Error> = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => {
                if e.downcast_ref::<Fatal>().is_some() {
                    return Err(e.context(format!("waiting for {what}")));
                }
                last = Some(e);
            }
        }
        if Instant::now() >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A plain HTTP/1.0 GET (metrics and health endpoints): the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::AsyncReadExt as _;
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET http://{addr}{path}: no HTTP status in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// `GET /metrics`, which must answer 200.
pub async fn metrics_text(addr: std::net::SocketAddr) -> Result<String> {
    let (code, body) = http_get(addr, "/metrics").await?;
    if code != 200 {
        bail!("GET http://{addr}/metrics: HTTP {code}: {body}");
    }
    Ok(body)
}

/// The value of an unlabelled sample (`weft_leader 1`, `weft_status_writes_total 3`) in a
/// Prometheus/OpenMetrics text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

/// An error that stops [`wait_for`] at once (the condition can no longer become true).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Ok(true) when the pod runs, is Ready and has an IP; a [`Fatal`] error when it cannot.
fn check_pod(pod: &Pod) -> Result<bool> {
    let Some(status) = &pod.status else { return Ok(false) };
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            return Err(Fatal(format!(
                "pod {name} is {}: {}",
                status.phase.as_deref().unwrap_or_default(),
                status.message.as_deref().unwrap_or_default()
            ))
            .into());
        }
        Some("Running") => {}
        _ => {
            for cs in status.container_statuses.iter().flatten() {
                if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
                    let reason = w.reason.as_deref().unwrap_or_default();
                    if reason.contains("Image") || reason.contains("Invalid") {
                        return Err(Fatal(format!(
                            "pod {name} container {}: {reason}: {}",
                            cs.name,
                            w.message.as_deref().unwrap_or_default()
                        ))
                        .into());
                    }
                }
            }
            return Ok(false);
        }
    }
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    Ok(ready && status.pod_ip.is_some())
}

/// A namespace for one test, deleted (without waiting) when dropped.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    state: ClusterState,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for TestNamespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !ClusterState::state_file(&self.state.dir).exists() {
            return;
        }
        let _ = std::process::Command::new(self.state.kubectl_bin())
            .arg("--kubeconfig")
            .arg(self.state.admin_kubeconfig())
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
                "--request-timeout=10s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A Pod to run: by default `nicolaka/netshoot` idling (`sleep infinity`), scheduled by the
/// scheduler.
#[derive(Clone, Debug)]
pub struct PodOptions {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`; `None` leaves it to the scheduler.
    pub node: Option<String>,
    pub image: String,
    /// The container's command (`[]`: the image's default).
    pub command: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// A container port to declare (TCP).
    pub port: Option<u16>,
}

impl PodOptions {
    pub fn new(namespace: &str, name: &str) -> PodOptions {
        PodOptions {
            namespace: namespace.into(),
            name: name.into(),
            node: None,
            image: "nicolaka/netshoot".into(),
            command: vec!["sleep".into(), "infinity".into()],
            labels: BTreeMap::new(),
            port: None,
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Another image, run with its own command unless [`PodOptions::command`] follows.
    pub fn image(mut self, image: &str) -> Self {
        self.image = image.into();
        self.command.clear();
        self
    }

    pub fn command(mut self, cmd: &[&str]) -> Self {
        self.command = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The Pod object.
    pub fn to_pod(&self) -> Pod {
        let mut container = serde_json::json!({ "name": "main", "image": self.image });
        if !self.command.is_empty() {
            container["command"] = serde_json::json!(self.command);
        }
        if let Some(p) = self.port {
            container["ports"] = serde_json::json!([{ "containerPort": p, "protocol": "TCP" }]);
        }
        let mut spec = serde_json::json!({
            "containers": [container],
            "terminationGracePeriodSeconds": 2,
        });
        if let Some(n) = &self.node {
            spec["nodeName"] = serde_json::json!(n);
        }
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": self.name, "namespace": self.namespace, "labels": self.labels },
            "spec": spec,
        });
        // The JSON above is always a valid Pod.
        serde_json::from_value(value).unwrap_or_default()
    }
}

/// The client address an echo (`traefik/whoami`) saw: its `RemoteAddr:` line, without the port.
pub fn whoami_remote_ip(body: &str) -> Result<std::net::Ipv4Addr> {
    let line = body
        .lines()
        .find_map(|l| l.strip_prefix("RemoteAddr: "))
        .with_context(|| format!("no RemoteAddr in {body:?}"))?;
    let ip = line.trim().rsplit_once(':').map(|(ip, _)| ip).unwrap_or(line);
    ip.parse().with_context(|| format!("RemoteAddr {line:?}"))
}

/// Marks the steps of a long test with the time since it began, so the log of a slow or failing
/// run shows where the time went.
#[derive(Debug)]
pub struct Steps {
    started: std::time::Instant,
    test: &'static str,
}

impl Steps {
    pub fn new(test: &'static str) -> Steps {
        Steps { started: std::time::Instant::now(), test }
    }

    pub fn step(&self, what: &str) {
        eprintln!("[{} {:>6.1?}] {what}", self.test, self.started.elapsed());
    }
}
