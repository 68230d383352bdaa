//! `weft-dev`: the local cluster for people and scripts, like kind.
//!
//! ```text
//! weft-dev up [--nodes 3] [--name dev] [--no-weft]              control plane, nodes, Weft, samples
//! weft-dev down [--name dev | --all]                             stop and remove everything
//! weft-dev status                                               clusters, processes, nodes
//! weft-dev node add                                             one more node
//! ```
//!
//! Pods are the kubelet's: `kubectl run`, `kubectl exec`, `kubectl delete`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use weft_e2e::cluster::{self, Cluster, UpOptions, dev_kubeconfig, repo_root};

#[derive(Debug, Parser)]
#[command(
    name = "weft-dev",
    version,
    about = "A local Kubernetes (real control plane, real nodes: kubelet + containerd in network namespaces) for developing and testing Weft"
)]
struct Cli {
    /// The cluster to act on (status, node).
    #[arg(long, global = true, default_value = "dev", env = "WEFT_DEV_CLUSTER")]
    cluster: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring up the control plane, CRDs, the nodes (kubelet + containerd), Weft installed from
    /// config/ (the weft-operator Deployment, the weft-agent DaemonSet) and sample workloads;
    /// prints how to use kubectl against it.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        /// Run without Weft (pods on the reference bridge + host-local plugins).
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
        Cmd::Up { nodes, no_weft, name, no_samples } => {
            up(name.unwrap_or(cli.cluster), nodes, !no_weft, !no_samples).await?;
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
                let node = c.add_ready_node()?;
                println!("node {} is Ready ({}, {}, netns {})", node.name, node.ip, node.zone, node.netns);
                Ok(())
            })
            .await??;
        }
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

async fn up(name: String, nodes: u8, weft: bool, samples: bool) -> Result<()> {
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
    let opts = UpOptions { name: name.clone(), nodes, weft, ..UpOptions::default() };
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
                "warning: Weft has not converged yet (see `kubectl -n weft-system logs deployment/weft-operator`): {}",
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
    let replicas: Vec<String> = s.plan_addrs().iter().map(|a| format!("https://{a}")).collect();
    let metrics: Vec<String> =
        s.operator_metrics_addrs().iter().map(|a| format!("http://{a}/metrics")).collect();
    println!(
        "weft: weft-operator Deployment (kubectl -n weft-system get deploy,pods): the Lease holder of {} serves plans (metrics {})",
        replicas.join(", "),
        metrics.join(", ")
    );
    for n in &s.nodes {
        println!(
            "weft: weft-agent on {} (netns {}, metrics http://{}:{}/metrics) writes what it programs to {}/*.txt",
            n.name,
            n.netns,
            n.ip,
            cluster::AGENT_METRICS_PORT,
            n.agent_state_dir.join("programmed").display()
        );
    }
    println!(
        "weft: pods use weft-cni; agents program the routes between nodes, pod egress NAT, Services (nftables table ip weft-proxy unless NetworkConfig says iptables), a CoreDNS per node behind kube-dns {} and nginx for Ingresses of class weft",
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
        s.cni(),
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
            s.cni(),
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
