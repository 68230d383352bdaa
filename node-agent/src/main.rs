//! `weft-agent`: receives this node's plan from the operator and programs the node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::sync::watch;
use tracing::info;
use weft_agent::metrics::AgentMetrics;
use weft_agent::{AgentConfig, client};
use weft_api::telemetry::{self, AdminState, Readiness};

#[derive(Debug, Parser)]
#[command(version, about = "Weft's node agent: programs this node from the plan the operator sends")]
struct Args {
    /// This node's name, as in its Node object.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The operator's plan endpoints, comma-separated (one per operator replica, or a VIP): the
    /// agent connects to the first that answers and moves on when one is unreachable.
    #[arg(
        long,
        env = "WEFT_OPERATOR",
        value_delimiter = ',',
        required = true,
        default_value = "https://weft-operator.weft-system.svc:7700"
    )]
    operator: Vec<String>,
    /// Send the plan token to `http://` operator addresses too, in the clear (a test setup);
    /// without it the agent refuses to start with a token and a plain-text address.
    #[arg(long, env = "WEFT_INSECURE_PLAINTEXT_TOKEN")]
    insecure_plaintext_token: bool,
    /// The ServiceAccount token proving this node's identity to the operator (audience
    /// `weft-operator`, bound to the agent's Pod or Node; re-read at every connection).
    #[arg(long, env = "WEFT_PLAN_TOKEN_FILE")]
    plan_token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the operator's plan certificate, for an `https://`
    /// --operator.
    #[arg(long, env = "WEFT_OPERATOR_CA_FILE")]
    operator_ca_file: Option<PathBuf>,
    /// Where the agent keeps its plan and what it programmed.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "0.0.0.0:9101")]
    metrics_listen: SocketAddr,
    /// The CNI conf dir, instead of the one in the plan (a node of the local cluster has its own).
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The CNI bin dir, instead of the one in the plan.
    #[arg(long, env = "WEFT_CNI_BIN_DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// Leave the CNI configuration alone (another CNI serves the node); only record it.
    #[arg(long)]
    no_cni_install: bool,
    /// Kubeconfig for CoreDNS's kubernetes plugin (read access to Services, EndpointSlices,
    /// Namespaces and Pods). Without it this node serves no cluster DNS.
    #[arg(long, env = "WEFT_DNS_KUBECONFIG")]
    dns_kubeconfig: Option<PathBuf>,
    /// The CoreDNS binary the agent runs.
    #[arg(long, env = "WEFT_COREDNS", default_value = "coredns")]
    coredns: PathBuf,
    /// CoreDNS's health port (`/health`), on the node address.
    #[arg(long, env = "WEFT_DNS_HEALTH_PORT", default_value_t = 9154)]
    dns_health_port: u16,
    /// CoreDNS's readiness port (`/ready`), on the node address.
    #[arg(long, env = "WEFT_DNS_READY_PORT", default_value_t = 9155)]
    dns_ready_port: u16,
    /// CoreDNS's Prometheus port (`/metrics`), on the node address.
    #[arg(long, env = "WEFT_DNS_METRICS_PORT", default_value_t = 9153)]
    dns_metrics_port: u16,
    /// The nginx binary the agent runs on ingress nodes.
    #[arg(long, env = "WEFT_NGINX", default_value = "/usr/sbin/nginx")]
    nginx_bin: PathBuf,
    /// Delay before retrying a plan that failed to apply.
    #[arg(long, default_value = "5s", value_parser = humantime_duration)]
    retry_interval: Duration,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 500ms or 5s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{s:?} is not a duration like 500ms or 5s")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = telemetry::init("weft-agent")?;
    let mut registry = telemetry::new_registry();
    let metrics = AgentMetrics::register(&mut registry);
    // Ready once a plan is applied: until then the node is not programmed by Weft.
    let readiness = Readiness::new(["plan-applied"]);
    let admin = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    let mut critical = weft_api::tasks::Critical::new();
    critical.spawn(
        "admin server",
        telemetry::serve_admin(admin, AdminState::new(Arc::new(registry), readiness.clone())),
    );

    check_token_transport(&args.operator, args.plan_token_file.is_some(), args.insecure_plaintext_token)
        .map_err(anyhow::Error::msg)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let config = AgentConfig {
        node_name: args.node_name,
        operators: args.operator,
        plan_token_file: args.plan_token_file,
        operator_ca_file: args.operator_ca_file,
        state_dir: args.state_dir,
        retry_interval: args.retry_interval,
        cni: weft_agent::programmers::CniOptions {
            install: !args.no_cni_install,
            conf_dir: args.cni_conf_dir,
            bin_dir: args.cni_bin_dir,
        },
        dns: weft_agent::dns::DnsOptions {
            kubeconfig: args.dns_kubeconfig,
            coredns: args.coredns,
            health_port: args.dns_health_port,
            ready_port: args.dns_ready_port,
            metrics_port: args.dns_metrics_port,
        },
        ingress: weft_agent::ingress::IngressOptions { nginx: args.nginx_bin },
        proxy_runner: weft_agent::exec::Runner::default(),
    };
    let (mut task, mut status) = client::spawn(config, metrics, stop_rx);
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let applied = status.borrow().applied_version != 0;
            readiness.set("plan-applied", applied);
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        // The agent's loop ends by itself only on an error (its CNI socket task died, …).
        result = &mut task => {
            result??;
            anyhow::bail!("the agent's loop ended on its own");
        }
        failure = critical.failed() => anyhow::bail!("{failure}: the agent stops so that it is restarted"),
    }
    info!("shutting down; the node keeps its programmed state");
    let _ = stop_tx.send(true);
    task.await??;
    Ok(())
}

/// Refuses a plan token that would cross the network in the clear: with a token, every operator
/// address must be `https://` unless the admin said `--insecure-plaintext-token`.
fn check_token_transport(operators: &[String], token: bool, insecure: bool) -> Result<(), String> {
    let plain: Vec<&str> =
        operators.iter().map(String::as_str).filter(|o| !o.starts_with("https://")).collect();
    if token && !insecure && !plain.is_empty() {
        return Err(format!(
            "refusing to send the plan token in the clear to {}: use https:// addresses (with --operator-ca-file), or --insecure-plaintext-token for a test setup",
            plain.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn a_token_goes_only_over_tls_unless_the_admin_says_otherwise() {
        let tls = ["https://10.0.0.1:7700".to_string(), "https://10.0.0.2:7700".to_string()];
        let mixed = ["https://10.0.0.1:7700".to_string(), "http://10.0.0.2:7700".to_string()];
        assert_eq!(super::check_token_transport(&tls, true, false), Ok(()));
        let refused = super::check_token_transport(&mixed, true, false).expect_err("a plain-text address");
        assert!(
            refused.contains("http://10.0.0.2:7700") && refused.contains("--insecure-plaintext-token"),
            "{refused}"
        );
        assert_eq!(super::check_token_transport(&mixed, true, true), Ok(()), "said so explicitly");
        assert_eq!(super::check_token_transport(&mixed, false, false), Ok(()), "no token to leak");
    }

    /// The DaemonSet (config/agent/daemonset.yaml) passes only flags the agent knows.
    #[test]
    fn the_daemonsets_arguments_are_the_agents_flags() {
        let manifest = include_str!("../../config/agent/daemonset.yaml");
        let args = manifest.lines().filter_map(|l| l.trim().strip_prefix("- --")).map(|a| format!("--{a}"));
        let parsed = super::Args::try_parse_from(std::iter::once("weft-agent".to_string()).chain(args));
        let parsed = parsed.unwrap_or_else(|e| panic!("config/agent/daemonset.yaml: {e}"));
        assert!(parsed.plan_token_file.is_some() && parsed.operator_ca_file.is_some());
    }
}
