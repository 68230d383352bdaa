//! Cluster DNS on this node: a CoreDNS the agent runs and configures from its plan.
//!
//! Every node serves DNS on its own address (port 53, UDP and TCP), like NodeLocal DNSCache; the
//! operator puts the node addresses behind the kube-dns Service. The Corefile is rendered purely
//! from the plan ([`corefile::render`]); the [`supervisor`] writes it atomically and sends CoreDNS
//! SIGUSR1, which reloads it in tens of milliseconds (a restart costs the kubernetes plugin's
//! resync and drops queries meanwhile), and restarts CoreDNS if it dies.
//!
//! CoreDNS's kubernetes plugin needs read access to the API; the agent itself has none. Its
//! credentials come from the agent's `--dns-kubeconfig`; without them this node serves no DNS,
//! says so in its log and in `weft_agent_dns_serving 0`.

pub mod corefile;
pub mod supervisor;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

pub use corefile::{CorefileError, ServeOptions};
pub use supervisor::{DnsHandle, SupervisorError};
use weft_api::plan as pb;

/// How this node serves DNS (from the agent's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsOptions {
    /// Kubeconfig for CoreDNS's kubernetes plugin; `None`: this node serves no DNS.
    pub kubeconfig: Option<PathBuf>,
    /// The CoreDNS binary (looked up in PATH when relative).
    pub coredns: PathBuf,
    pub health_port: u16,
    pub ready_port: u16,
    pub metrics_port: u16,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            kubeconfig: None,
            coredns: PathBuf::from("coredns"),
            health_port: 9154,
            ready_port: 9155,
            metrics_port: 9153,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns: {0}")]
    Corefile(#[from] CorefileError),
    #[error("dns: {0}")]
    Supervisor(#[from] SupervisorError),
    #[error("dns: the plan gives no valid address for this node ({0:?}); CoreDNS binds to it")]
    NodeIp(String),
}

/// Whether and how the node serves DNS, for the record and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    On { node_ip: Ipv4Addr },
    Off { why: String },
}

/// Brings the node's CoreDNS in line with the plan: renders the Corefile and has the supervisor
/// start or reload CoreDNS, or stops it when this node serves no DNS. A plan that does not
/// render leaves the running CoreDNS as it is, or starts it with the last good Corefile after an
/// agent restart (fail-static), and is reported.
pub fn apply(
    dns: Option<&pb::DnsSettings>,
    net: Option<&pb::NetworkSettings>,
    node: Option<&pb::NodePlan>,
    handle: &DnsHandle,
    metrics: &crate::metrics::AgentMetrics,
) -> Result<Serving, DnsError> {
    let span = tracing::info_span!("dns.apply", serving = tracing::field::Empty);
    let _enter = span.enter();
    let started = Instant::now();
    let result = apply_inner(dns, net, node, handle);
    metrics.dns_apply_duration.observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(Serving::On { .. }) => {
            metrics.dns_serving.set(1);
            span.record("serving", true);
        }
        Ok(Serving::Off { why }) => {
            metrics.dns_serving.set(0);
            span.record("serving", false);
            if handle.note_off(why) {
                tracing::warn!(reason = %why, "this node serves no cluster DNS");
            }
        }
        Err(e) => {
            metrics.dns_apply_errors.inc();
            tracing::warn!(error = %e, "DNS not updated; CoreDNS keeps its last configuration");
        }
    }
    result
}

fn apply_inner(
    dns: Option<&pb::DnsSettings>,
    net: Option<&pb::NetworkSettings>,
    node: Option<&pb::NodePlan>,
    handle: &DnsHandle,
) -> Result<Serving, DnsError> {
    let Some(dns) = dns else {
        handle.stop()?;
        return Ok(Serving::Off { why: "the plan holds no DNS settings for this node".into() });
    };
    let Some(kubeconfig) = handle.options().kubeconfig.clone() else {
        handle.stop()?;
        return Ok(Serving::Off {
            why: "no --dns-kubeconfig: CoreDNS has no credentials to read Services".into(),
        });
    };
    let node_ip = node.map(|n| n.node_ip.as_str()).unwrap_or_default();
    if node_ip.is_empty() {
        // A Node registers its addresses after it is created: the next plan brings them.
        handle.stop()?;
        return Ok(Serving::Off { why: "the plan has no address for this node yet".into() });
    }
    let node_ip: Ipv4Addr = node_ip.parse().map_err(|_| DnsError::NodeIp(node_ip.to_string()))?;
    let options = handle.options();
    let serve = ServeOptions {
        node_ip,
        kubeconfig,
        health_port: options.health_port,
        ready_port: options.ready_port,
        metrics_port: options.metrics_port,
    };
    let text = match corefile::render(dns, net, &serve) {
        Ok(text) => text,
        Err(e) => {
            // Fail-static also across agent restarts: the last good Corefile is still on disk.
            if let Err(keep) = handle.keep_last(&serve) {
                tracing::warn!(error = %keep, "cannot start CoreDNS with the last good Corefile");
            }
            return Err(e.into());
        }
    };
    handle.serve(text, &serve)?;
    Ok(Serving::On { node_ip })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> pb::DnsSettings {
        pb::DnsSettings {
            cluster_domain: "cluster.local".into(),
            service_ip: "10.96.0.10".into(),
            upstreams: vec!["/etc/resolv.conf".into()],
            stub_domains: vec![],
            cache_ttl_seconds: 30,
            pod_records: "Insecure".into(),
        }
    }

    fn node() -> pb::NodePlan {
        pb::NodePlan { name: "n1".into(), node_ip: "172.18.1.11".into(), ..Default::default() }
    }

    #[test]
    fn without_credentials_the_node_says_it_serves_no_dns() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let metrics = crate::metrics::AgentMetrics::default();
        metrics.dns_serving.set(1);
        let handle = DnsHandle::new(dir.path(), DnsOptions::default(), metrics.clone());
        let serving = apply(Some(&settings()), None, Some(&node()), &handle, &metrics).expect("apply");
        assert_eq!(
            serving,
            Serving::Off { why: "no --dns-kubeconfig: CoreDNS has no credentials to read Services".into() }
        );
        assert_eq!(metrics.dns_serving.get(), 0);
        assert!(
            !dir.path().join("dns/Corefile").exists(),
            "nothing rendered for a CoreDNS that does not run"
        );
        let serving = apply(None, None, Some(&node()), &handle, &metrics).expect("apply");
        assert_eq!(serving, Serving::Off { why: "the plan holds no DNS settings for this node".into() });
    }

    #[test]
    fn invalid_settings_are_an_error_and_counted() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let metrics = crate::metrics::AgentMetrics::default();
        let options =
            DnsOptions { kubeconfig: Some(PathBuf::from("/etc/weft/dns/kubeconfig")), ..Default::default() };
        let handle = DnsHandle::new(dir.path(), options, metrics.clone());
        let mut bad = settings();
        bad.upstreams = vec!["resolver.example".into()];
        let err = apply(Some(&bad), None, Some(&node()), &handle, &metrics).expect_err("refused");
        assert!(err.to_string().starts_with("dns: dns.upstreams[0]: \"resolver.example\""), "{err}");
        assert_eq!(metrics.dns_apply_errors.get(), 1);
        let mut nameless = node();
        nameless.node_ip = "172.18.1".into();
        let err = apply(Some(&settings()), None, Some(&nameless), &handle, &metrics).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "dns: the plan gives no valid address for this node (\"172.18.1\"); CoreDNS binds to it"
        );
    }
}
