//! `weft-dev`: the local cluster for people and scripts, like kind.
//!
//! ```text
//! weft-dev up [--nodes 3] [--name dev] [--no-weft]              control plane, Weft, nodes, samples
//! weft-dev down [--name dev | --all]                             stop and remove everything
//! weft-dev status                                               clusters, processes, nodes
//! weft-dev node add                                             one more node
//! weft-dev pod run --node node-1 --name p [--label k=v]… [--namespace ns] [--image i] [-- cmd…]
//! weft-dev pod exec p [--namespace ns] -- cmd…
//! weft-dev pod delete p [--namespace ns]
//! weft-dev kubelet …                                            the pod runner (run on each node)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use weft_e2e::cluster::{
    self, Cluster, CniMode, NodeRuntime, PodOptions, UpOptions, client_for, dev_kubeconfig, repo_root,
    wait_for,
};

#[derive(Debug, Parser)]
#[command(
    name = "weft-dev",
    version,
    about = "A local Kubernetes (real control plane, nodes and pods as network namespaces) for developing and testing Weft"
)]
struct Cli {
    /// The cluster to act on (status, node, pod).
    #[arg(long, global = true, default_value = "dev", env = "WEFT_DEV_CLUSTER")]
    cluster: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring up the control plane, CRDs, Weft (config/, weft-operator, one weft-agent per node),
    /// the nodes and sample workloads; prints how to use kubectl against it.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        /// Which CNI gives pods their network: Weft's own (`weft`, needs Weft) or the reference
        /// bridge + host-local plugins (`reference`, for comparison and for `--no-weft`).
        #[arg(long, value_enum, default_value_t = CniMode::Weft)]
        cni: CniMode,
        /// What runs the pods: the project's pod runner, or the real kubelet with containerd
        /// (then Weft is installed from config/ as pods, images from `make images`, and the CNI
        /// is Weft's, or the reference plugins with --no-weft).
        #[arg(long, value_enum, default_value_t = NodeRuntime::Runner)]
        runtime: NodeRuntime,
        /// Run without Weft: no config/, no weft-operator, no weft-agents.
        #[arg(long)]
        no_weft: bool,
        /// Cluster name (defaults to --cluster).
        #[arg(long)]
        name: Option<String>,
        /// Do not apply config/samples/workloads.yaml.
        #[arg(long)]
        no_samples: bool,
    },
    /// Stop every process and remove namespaces, veths, bridges.
    Down {
        /// Cluster name (defaults to --cluster).
        #[arg(long)]
        name: Option<String>,
        /// Every local cluster, including test clusters, and any `weft-*` namespace or link left.
        #[arg(long)]
        all: bool,
    },
    /// Show clusters, their processes and nodes.
    Status,
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Pods (`kubectl exec` needs a real kubelet; `pod exec` runs inside the pod's namespaces).
    #[command(subcommand)]
    Pod(PodCmd),
    /// The pod runner that plays kubelet on a node (started by `up` inside the node's namespace).
    Kubelet(weft_e2e::kubelet::KubeletArgs),
    /// Tear down the cluster in DIR once process PID exits (started for test clusters).
    #[command(hide = true)]
    Reap {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        pid: u32,
    },
    /// Serve the API server's HTTP CONNECT proxy on SOCKET (started by `up` inside node-1's
    /// namespace on real nodes).
    #[command(hide = true)]
    EgressProxy {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Fail if anything of a local test cluster (namespaces, links, registry entries) is left,
    /// waiting up to --wait seconds for reapers to finish.
    Leftovers {
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Count the `weft-dev up` clusters too.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Add a node to the cluster and wait for it to be Ready.
    Add,
}

#[derive(Debug, Subcommand)]
enum PodCmd {
    /// Create a Pod (and wait for it to run).
    Run {
        /// The node to run on (spec.nodeName); the scheduler picks one when omitted.
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        name: String,
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "nicolaka/netshoot")]
        image: String,
        /// A TCP containerPort to declare.
        #[arg(long)]
        port: Option<u16>,
        /// Do not wait for the pod to run.
        #[arg(long)]
        no_wait: bool,
        /// The container's command.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command inside a pod's namespaces.
    Exec {
        pod: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Delete a pod and wait for it to be gone.
    Delete {
        pod: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
}

fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: labels are key=value")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Up { nodes, cni, runtime, no_weft, name, no_samples } => {
            if runtime == NodeRuntime::Runner {
                cni.check_available(!no_weft)?;
            }
            up(name.unwrap_or(cli.cluster), nodes, cni, runtime, !no_weft, !no_samples).await?;
        }
        Cmd::Down { name, all } => {
            let name = name.unwrap_or(cli.cluster);
            tokio::task::spawn_blocking(move || down(&name, all)).await??;
        }
        Cmd::Status => status(&cli.cluster)?,
        Cmd::Node(NodeCmd::Add) => {
            let name = cli.cluster;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut c = Cluster::open(&name)?;
                let node = c.add_node()?;
                c.wait_nodes_ready(Duration::from_secs(90))?;
                println!("node {} is Ready ({}, {}, netns {})", node.name, node.ip, node.zone, node.netns);
                Ok(())
            })
            .await??;
        }
        Cmd::Pod(cmd) => return pod(&cli.cluster, cmd).await,
        Cmd::Kubelet(args) => weft_e2e::kubelet::run(args).await?,
        Cmd::Reap { dir, pid } => tokio::task::spawn_blocking(move || cluster::reap(&dir, pid)).await??,
        Cmd::EgressProxy { socket } => cluster::egress::serve(&socket).await?,
        Cmd::Leftovers { wait, all } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(wait);
            loop {
                let left = cluster::leftovers(!all);
                if left.is_empty() {
                    println!("no leftovers");
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    for l in &left {
                        eprintln!("left over: {l}");
                    }
                    bail!("{} leftovers of local clusters (`weft-dev down --all` removes them)", left.len());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn up(
    name: String,
    nodes: u8,
    cni: CniMode,
    runtime: NodeRuntime,
    weft: bool,
    samples: bool,
) -> Result<()> {
    let dir = cluster::weft_dir().join(&name);
    if let Ok(existing) = Cluster::open_dir(&dir) {
        if existing.processes().iter().all(|(_, alive)| *alive) {
            println!("cluster {name} is already up");
            print_summary(&existing);
            return Ok(());
        }
        eprintln!("cluster {name} is partly down; removing it before starting again");
        tokio::task::spawn_blocking(move || cluster::teardown_dir(&dir)).await??;
    }
    let opts = UpOptions { name: name.clone(), nodes, cni, runtime, weft, ..UpOptions::default() };
    let c = tokio::task::spawn_blocking(move || Cluster::up(&opts)).await??;
    std::fs::copy(c.kubeconfig(), dev_kubeconfig())
        .with_context(|| format!("writing {}", dev_kubeconfig().display()))?;
    if samples {
        let file = repo_root().join("config/samples/workloads.yaml");
        if file.is_file() {
            let out = c.kubectl_ok(&["apply", "-f", &file.to_string_lossy()])?;
            print!("{out}");
            let waited = c.kubectl(&[
                "wait",
                "--for=condition=Available",
                "--timeout=120s",
                "deployment",
                "-l",
                "app.kubernetes.io/part-of=weft-samples",
            ])?;
            if !waited.status.success() {
                eprintln!(
                    "warning: sample workloads not available yet: {}",
                    String::from_utf8_lossy(&waited.stderr).trim()
                );
            }
        }
    }
    if c.state().weft && has_crd(&c, "networkconfigs.weft.io") {
        // Every agent has applied the newest plan (the samples' Services included).
        let waited =
            c.kubectl(&["wait", "--for=condition=Ready", "--timeout=90s", "networkconfig/default"])?;
        if !waited.status.success() {
            eprintln!(
                "warning: Weft has not converged yet (see {}): {}",
                c.state().logs_dir().join("weft-operator.log").display(),
                String::from_utf8_lossy(&waited.stderr).trim()
            );
        }
    }
    print_summary(&c);
    Ok(())
}

fn has_crd(c: &Cluster, crd: &str) -> bool {
    c.kubectl(&["get", "crd", crd]).is_ok_and(|o| o.status.success())
}

/// Prints `$ kubectl <args>` and its output.
fn show_kubectl(c: &Cluster, args: &[&str]) {
    println!("$ kubectl {}", args.join(" "));
    match c.kubectl(args) {
        Ok(o) => {
            print!("{}", String::from_utf8_lossy(&o.stdout));
            eprint!("{}", String::from_utf8_lossy(&o.stderr));
        }
        Err(e) => eprintln!("{e:#}"),
    }
}

/// Where Weft's operator and agents of a cluster are and what they recorded.
fn print_weft(s: &cluster::ClusterState) {
    if !s.weft {
        println!("weft: not running (brought up with --no-weft)");
        return;
    }
    println!(
        "weft: weft-operator serves plans on {} (metrics http://{}/metrics, log {})",
        s.plan_url(),
        s.operator_metrics_addr(),
        s.logs_dir().join("weft-operator.log").display()
    );
    for n in &s.nodes {
        println!(
            "weft: agent-{} in netns {} (metrics http://{}:{}/metrics), writes what it programs to {}/*.txt",
            n.name,
            n.netns,
            n.ip,
            cluster::AGENT_METRICS_PORT,
            n.agent_state_dir.join("programmed").display()
        );
    }
    if s.cni == CniMode::Weft {
        println!("weft: pods use weft-cni; agents program the routes between nodes and pod egress NAT");
    } else {
        println!("weft: pods use the reference plugins; agents only record their CNI and routes programming");
    }
    println!(
        "weft: agents program Services (nftables table ip weft-proxy unless NetworkConfig says iptables), a CoreDNS per node behind kube-dns {} and nginx for Ingresses of class weft",
        cluster::CLUSTER_DNS
    );
}

fn print_summary(c: &Cluster) {
    let s = c.state();
    println!();
    println!(
        "cluster {}: API server https://127.0.0.1:{} (nodes reach it at https://{}:{}), underlay {} on bridge {}, CNI {}, Weft {}",
        s.name,
        s.ports.apiserver,
        s.bridge_ip,
        s.ports.apiserver,
        s.subnet(),
        s.bridge,
        s.cni,
        if s.weft { "on" } else { "off" }
    );
    print_weft(s);
    println!("logs: {}", s.logs_dir().display());
    println!();
    show_kubectl(c, &["get", "pods", "-A", "-o", "wide"]);
    let what = if has_crd(c, "networkconfigs.weft.io") { "nodes,ippools,networkconfig" } else { "nodes" };
    show_kubectl(c, &["get", what]);
    println!();
    let kubeconfig = if s.dir == cluster::weft_dir().join(&s.name) && dev_kubeconfig().exists() {
        dev_kubeconfig()
    } else {
        s.admin_kubeconfig()
    };
    println!("export KUBECONFIG={}", kubeconfig.display());
    println!("export PATH={}:$PATH   # the matching kubectl", s.tools_bin_dir.display());
}

fn down(name: &str, all: bool) -> Result<()> {
    if all {
        cluster::down_all()?;
        let _ = std::fs::remove_file(dev_kubeconfig());
        println!("all local clusters are down");
        return Ok(());
    }
    let dir = cluster::weft_dir().join(name);
    if !dir.join("state.json").exists() {
        println!("cluster {name} is not up");
        return Ok(());
    }
    let kubeconfig_was_ours = std::fs::read_to_string(dev_kubeconfig())
        .is_ok_and(|k| k.contains(&format!("current-context: weft-{name}\n")));
    cluster::teardown_dir(&dir)?;
    if kubeconfig_was_ours {
        let _ = std::fs::remove_file(dev_kubeconfig());
    }
    println!("cluster {name} is down (logs kept in {})", dir.join("logs").display());
    Ok(())
}

fn status(name: &str) -> Result<()> {
    let dirs = cluster::known_clusters();
    if dirs.is_empty() {
        println!("no local clusters are up (`weft-dev up` starts one)");
        return Ok(());
    }
    for dir in dirs {
        let c = Cluster::open_dir(&dir)?;
        let s = c.state();
        println!(
            "cluster {} ({}): index {}, underlay {} on {}, API server https://127.0.0.1:{}, CNI {}, Weft {}",
            s.name,
            dir.display(),
            s.idx,
            s.subnet(),
            s.bridge,
            s.ports.apiserver,
            s.cni,
            if s.weft { "on" } else { "off" }
        );
        for (p, alive) in c.processes() {
            let state = if alive { "running" } else { "NOT RUNNING" };
            let ns = p.netns.as_deref().map(|n| format!(" netns {n}")).unwrap_or_default();
            println!("  {:<26} pid {:<8} {state:<12} {}{ns}", p.name, p.pid, p.log.display());
        }
        for n in &s.nodes {
            println!(
                "  node {:<10} {:<15} {:<7} pods {:<15} netns {}",
                n.name, n.ip, n.zone, n.pod_cidr, n.netns
            );
        }
        print_weft(s);
        if s.name == name {
            if let Ok(o) = c.kubectl(&["get", "nodes", "-o", "wide"]) {
                print!("{}", String::from_utf8_lossy(&o.stdout));
            }
            if s.weft
                && let Ok(o) = c.kubectl(&["get", "networkconfig"])
                && o.status.success()
            {
                print!("{}", String::from_utf8_lossy(&o.stdout));
            }
        }
    }
    Ok(())
}

async fn pod(cluster_name: &str, cmd: PodCmd) -> Result<ExitCode> {
    let c = Cluster::open(cluster_name)?;
    let client = client_for(&c.kubeconfig()).await?;
    match cmd {
        PodCmd::Run { node, name, labels, namespace, image, port, no_wait, command } => {
            let opts = PodOptions {
                namespace: namespace.clone(),
                name: name.clone(),
                node,
                image,
                command,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                port,
            };
            let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            pods.create(&PostParams::default(), &opts.to_pod())
                .await
                .with_context(|| format!("creating pod {namespace}/{name}"))?;
            println!("pod/{name} created");
            if !no_wait {
                let pod =
                    wait_for(&format!("pod {namespace}/{name} to run"), Duration::from_secs(90), || {
                        let pods = pods.clone();
                        let name = name.clone();
                        async move {
                            let p = pods.get(&name).await?;
                            let running = p
                                .status
                                .as_ref()
                                .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some());
                            Ok(running.then_some(p))
                        }
                    })
                    .await?;
                let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
                let ip = pod.status.and_then(|s| s.pod_ip).unwrap_or_default();
                println!("pod/{name} is running on {node} with IP {ip}");
            }
        }
        PodCmd::Exec { pod, namespace, command } => {
            let p: Pod = Api::namespaced(client, &namespace)
                .get(&pod)
                .await
                .with_context(|| format!("getting pod {namespace}/{pod}"))?;
            let node_name = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .context("the pod is not scheduled to a node yet")?;
            // The runner's naming rule gives the pod's network namespace; run with the caller's
            // stdio so that interactive commands work.
            let uid = p.metadata.uid.clone().context("the pod has no UID")?;
            let spec = p.spec.unwrap_or_default();
            let hostname = if spec.host_network.unwrap_or(false) {
                node_name.clone()
            } else {
                spec.hostname.clone().unwrap_or_else(|| pod.clone())
            };
            let netns = weft_e2e::kubelet::pod_netns_name(&uid);
            if !Path::new("/run/netns").join(&netns).exists() {
                bail!("pod {namespace}/{pod} on {node_name} has no network namespace {netns} (yet)");
            }
            let status = weft_e2e::kubelet::pod_exec_command(&netns, &hostname, &command)
                .status()
                .with_context(|| format!("running {command:?} in pod {namespace}/{pod}"))?;
            let code = status.code().unwrap_or(1);
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        PodCmd::Delete { pod, namespace } => {
            let pods: Api<Pod> = Api::namespaced(client, &namespace);
            pods.delete(&pod, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting pod {namespace}/{pod}"))?;
            wait_for(&format!("pod {namespace}/{pod} to be gone"), Duration::from_secs(90), || {
                let pods = pods.clone();
                let pod = pod.clone();
                async move { Ok(pods.get_opt(&pod).await?.is_none().then_some(())) }
            })
            .await?;
            println!("pod/{pod} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}
