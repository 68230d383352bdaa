//! `weft-operator`: watches the cluster, serves plan streams; the lease holder writes status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use weft_api::telemetry::{self, AdminState, Readiness};
use weft_operator::k8s::metrics::{PoolCollector, ReconcileMetrics};
use weft_operator::k8s::{cluster, inputs, ipam, status};
use weft_operator::server::metrics::{ConvergenceCollector, PlanMetrics};
use weft_operator::server::{AgentAuth, PlanServer, PlanStore};

#[derive(Debug, Parser)]
#[command(version, about = "Weft's operator: compiles a plan per node and streams it to the node agents")]
struct Args {
    /// Address the plan gRPC service listens on.
    #[arg(long, env = "WEFT_PLAN_LISTEN", default_value = "0.0.0.0:7700")]
    plan_listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "0.0.0.0:9100")]
    metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// This replica's identity in the Lease (defaults to the hostname and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The agents' ServiceAccount (`namespace/name`): plan streams need one of its tokens, for
    /// the audience `weft-operator` and bound to the agent's node (checked with TokenReview).
    #[arg(long, env = "WEFT_AGENT_SERVICE_ACCOUNT", default_value = "weft-system/weft-agent")]
    agent_service_account: String,
    /// PEM certificate (chain) the plan service presents; with --plan-tls-key the plan streams are
    /// TLS (agents verify it with --operator-ca-file). Read at start.
    #[arg(long, env = "WEFT_PLAN_TLS_CERT", requires = "plan_tls_key")]
    plan_tls_cert: Option<PathBuf>,
    /// PEM private key of --plan-tls-cert.
    #[arg(long, env = "WEFT_PLAN_TLS_KEY", requires = "plan_tls_cert")]
    plan_tls_key: Option<PathBuf>,
    /// Serve plan streams without TLS, agents' tokens and TLS keys in the clear (a test setup);
    /// without it the operator refuses to start with no --plan-tls-cert.
    #[arg(long, env = "WEFT_PLAN_INSECURE", conflicts_with = "plan_tls_cert")]
    plan_insecure: bool,
    /// Seconds a deleted Node's IPBlocks are kept for it before they may go to other nodes (a node
    /// that re-registers under its name meanwhile keeps them; its agent may still be allocating).
    /// Even then a block is kept while a pod holds an address in it.
    #[arg(long, env = "WEFT_BLOCK_RELEASE_GRACE_SECONDS", default_value_t = 300)]
    block_release_grace_seconds: u64,
}

const LEASE: &str = "weft-operator";

/// Refuses to serve plans in the clear unless the admin said `--plan-insecure`.
fn check_plan_transport(args: &Args) -> Result<(), &'static str> {
    if args.plan_tls_cert.is_none() && !args.plan_insecure {
        return Err(
            "plan streams carry agents' tokens and ingress nodes' TLS keys: give --plan-tls-cert and --plan-tls-key, or --plan-insecure to serve them in the clear (a test setup)",
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    check_plan_transport(&args).map_err(anyhow::Error::msg)?;
    let _telemetry = telemetry::init("weft-operator")?;
    let client = kube::Client::try_default().await.context("cannot reach the Kubernetes API")?;

    let mut registry = telemetry::new_registry();
    let metrics = PlanMetrics::register(&mut registry);
    let mut status_metrics = status::StatusMetrics::register(&mut registry);
    let reconcile_metrics = ReconcileMetrics::register(&mut registry);
    status_metrics.reconcile = reconcile_metrics.clone();
    let store = Arc::new(PlanStore::new());
    let (status_tx, mut status_rx) = watch::channel(inputs::StatusInputs::default());
    // Mirrors the Lease (below) for the convergence metrics, which only the leader exports; a
    // flag, not a receiver, so that the metrics do not hold the Lease at shutdown.
    let leading = Arc::new(AtomicBool::new(false));
    ConvergenceCollector::register(&mut registry, store.clone(), leading.clone());
    PoolCollector::register(&mut registry, store.clone(), status_rx.clone());
    let _otlp_instruments = weft_operator::server::metrics::register_otlp(store.clone(), leading.clone());
    let readiness = Readiness::new(["cluster-synced", "plan-server"]);
    let admin = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    // A task that ends or panics ends the process (below): nothing reports ready on stale state.
    let mut critical = weft_api::tasks::Critical::new();
    critical.spawn(
        "admin server",
        telemetry::serve_admin(admin, AdminState::new(Arc::new(registry), readiness.clone())),
    );

    let (events_tx, events_rx) = mpsc::channel(4096);
    cluster::spawn_watchers(&client, &events_tx, &reconcile_metrics);
    critical.spawn(
        "cluster index",
        cluster::run(events_rx, store.clone(), status_tx, metrics.generation.clone()),
    );
    {
        let readiness = readiness.clone();
        let mut status_rx = status_rx.clone();
        tokio::spawn(async move {
            let _ = status_rx.wait_for(|s| s.synced).await;
            readiness.set("cluster-synced", true);
            info!("cluster state synced");
        });
    }

    // Only the Lease holder serves plan streams, claims blocks and writes status.
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let leader = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), LEASE)
        .with_namespace(args.namespace.clone())
        .with_identity(identity.clone())
        .with_create_mode(kube_lease_manager::LeaseCreateMode::AutoCreate)
        .build()
        .await
        .context("cannot set up leader election")?;
    let (is_leader, lease_task) = leader.watch().await;
    // Every task holding a leadership receiver is aborted at shutdown: the Lease manager releases
    // the Lease only once all receivers are gone.
    let mut leader_tasks = Vec::new();
    {
        let mut is_leader = is_leader.clone();
        leading.store(*is_leader.borrow(), Ordering::Relaxed);
        leader_tasks.push(critical.spawn("leader election", async move {
            while is_leader.changed().await.is_ok() {
                let now_leading = *is_leader.borrow();
                leading.store(now_leading, Ordering::Relaxed);
                info!(identity = %identity, leader = now_leading, "leadership changed");
            }
        }));
    }
    status_rx.mark_unchanged();
    leader_tasks.push(critical.spawn(
        "IPAM claims",
        ipam::run(
            client.clone(),
            store.clone(),
            status_rx.clone(),
            is_leader.clone(),
            reconcile_metrics.clone(),
            std::time::Duration::from_secs(args.block_release_grace_seconds),
        ),
    ));
    // The kube-dns Service in front of every node's CoreDNS.
    leader_tasks.push(critical.spawn(
        "kube-dns Service",
        weft_operator::k8s::dns::run(client.clone(), status_rx.clone(), is_leader.clone()),
    ));
    leader_tasks.push(critical.spawn(
        "status writer",
        status::run(client.clone(), store.clone(), status_rx, is_leader.clone(), status_metrics),
    ));

    let (sa_namespace, sa_name) = args
        .agent_service_account
        .split_once('/')
        .context("--agent-service-account must be namespace/name")?;
    let auth = AgentAuth::token_review(client.clone(), sa_namespace, sa_name);
    let server = PlanServer::new(store, metrics, auth).leading_only(is_leader).into_service();
    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.plan_tls_cert, &args.plan_tls_key) {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("the plan service's TLS certificate and key")?;
        info!(cert = %cert.display(), "plan streams over TLS");
    } else {
        warn!(
            "plan streams are NOT encrypted (--plan-insecure): agents' tokens and their plans, TLS keys included, cross the network in the clear"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.plan_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.plan_listen))?;
    readiness.set("plan-server", true);
    info!(listen = %args.plan_listen, "serving plans");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::select! {
        result = builder.add_service(server).serve_with_incoming(incoming) => {
            result.context("plan server failed")?;
        }
        _ = tokio::signal::ctrl_c() => info!("shutting down"),
        _ = terminate() => info!("shutting down"),
        failure = critical.failed() => anyhow::bail!("{failure}: the operator stops so that it is restarted"),
    }
    // Hand the Lease over at once instead of letting it expire: once the aborted tasks have
    // dropped their receivers the manager releases it and returns.
    for task in &leader_tasks {
        task.abort();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => info!("Lease released"),
        Ok(Ok(Err(e))) => warn!(error = %e, "leader election ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "leader election task failed"),
        Err(_) => warn!("the Lease was not released in time; it expires on its own"),
    }
    Ok(())
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    /// The Deployment (config/operator/deployment.yaml) passes only flags the operator knows.
    #[test]
    fn the_deployments_arguments_are_the_operators_flags() {
        let manifest = include_str!("../../config/operator/deployment.yaml");
        let args = manifest.lines().filter_map(|l| l.trim().strip_prefix("- --")).map(|a| format!("--{a}"));
        let parsed = super::Args::try_parse_from(std::iter::once("weft-operator".to_string()).chain(args));
        let parsed = parsed.unwrap_or_else(|e| panic!("config/operator/deployment.yaml: {e}"));
        assert!(parsed.plan_tls_cert.is_some() && parsed.plan_tls_key.is_some());
        assert_eq!(super::check_plan_transport(&parsed), Ok(()));
    }

    #[test]
    fn plans_are_served_in_the_clear_only_when_the_admin_says_so() {
        let parse = |extra: &[&str]| {
            super::Args::try_parse_from(["weft-operator"].iter().chain(extra)).expect("flags")
        };
        let refused = super::check_plan_transport(&parse(&[])).expect_err("no TLS, no --plan-insecure");
        assert!(refused.contains("--plan-tls-cert") && refused.contains("--plan-insecure"), "{refused}");
        assert_eq!(super::check_plan_transport(&parse(&["--plan-insecure"])), Ok(()));
        assert!(
            super::Args::try_parse_from([
                "weft-operator",
                "--plan-insecure",
                "--plan-tls-cert",
                "c",
                "--plan-tls-key",
                "k"
            ])
            .is_err(),
            "TLS and --plan-insecure contradict each other"
        );
    }
}
