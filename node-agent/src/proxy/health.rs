//! Service health check node ports, as kube-proxy serves them: for a LoadBalancer Service with
//! `externalTrafficPolicy: Local`, every node answers HTTP on the Service's `healthCheckNodePort`
//! with 200 while it has a ready endpoint of that Service and 503 while it has none (terminating
//! endpoints do not count), so the cloud load balancer sends traffic only to nodes that keep it.
//!
//! [`checks`] is pure (plan → what each port answers); [`HealthServer`] serves it from a thread
//! of its own (it enters the node's network namespace first when the agent is given one), with
//! a listener per port opened and closed as the plan changes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use weft_api::plan::{self as pb, Kind};

use super::ProxyError;
use crate::plan_state::PlanState;

/// What one health check node port answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Ready endpoints of the Service on this node (distinct addresses over its ports).
    pub local_endpoints: usize,
}

impl Check {
    /// Status code and JSON body, as kube-proxy's health server writes them.
    pub fn response(&self) -> (u16, String) {
        let (namespace, name) = self.service.split_once('/').unwrap_or(("", &self.service));
        let body = serde_json::json!({
            "service": { "namespace": namespace, "name": name },
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": true,
        });
        let status = if self.local_endpoints > 0 { 200 } else { 503 };
        (status, body.to_string())
    }
}

/// The health check node ports of the plan's Services and what each answers.
pub fn checks(plan: &PlanState) -> Result<BTreeMap<u16, Check>, ProxyError> {
    let mut out = BTreeMap::new();
    for r in plan.of_kind(Kind::Service) {
        let svc: pb::Service =
            r.decode().map_err(|source| ProxyError::Decode { name: r.name.clone(), source })?;
        let Ok(port) = u16::try_from(svc.health_check_node_port) else { continue };
        if port == 0 {
            continue;
        }
        let mut ready: Vec<u32> = svc
            .ports
            .iter()
            .flat_map(|p| &p.endpoints)
            .filter(|e| {
                e.has(pb::EndpointFlag::EndpointLocal)
                    && !e.has(pb::EndpointFlag::EndpointNotReady)
                    && !e.has(pb::EndpointFlag::EndpointTerminating)
            })
            .map(|e| e.ip)
            .collect();
        ready.sort_unstable();
        ready.dedup();
        out.insert(port, Check { service: r.name.clone(), local_endpoints: ready.len() });
    }
    Ok(out)
}

/// Serves [`checks`]; the thread and its listeners end when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct HealthServer {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    /// The namespace to serve in (`/run/netns/<name>`); None: the agent's own.
    netns: Option<String>,
    /// Started at the first non-empty set of checks.
    tx: Option<watch::Sender<BTreeMap<u16, Check>>>,
}

impl HealthServer {
    pub fn new(netns: Option<String>) -> Self {
        Self { inner: Arc::new(Mutex::new(Inner { netns, tx: None })) }
    }

    /// Makes the listeners match `checks`.
    pub fn set(&self, checks: BTreeMap<u16, Check>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = &inner.tx {
            tx.send_if_modified(|current| {
                let changed = *current != checks;
                *current = checks;
                changed
            });
            return;
        }
        if checks.is_empty() {
            return;
        }
        let (tx, rx) = watch::channel(checks);
        let netns = inner.netns.clone();
        match std::thread::Builder::new().name("weft-health".into()).spawn(move || serve_thread(netns, rx)) {
            Ok(_) => inner.tx = Some(tx),
            Err(e) => tracing::warn!(error = %e, "cannot start the health check node port server"),
        }
    }
}

fn serve_thread(netns: Option<String>, rx: watch::Receiver<BTreeMap<u16, Check>>) {
    if let Some(ns) = netns {
        let path = PathBuf::from("/run/netns").join(&ns);
        let entered = std::fs::File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())
        });
        if let Err(e) = entered {
            tracing::warn!(netns = %ns, error = %e, "cannot enter the node's namespace; no health check node ports");
            return;
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the health check runtime");
            return;
        }
    };
    runtime.block_on(serve(rx));
}

/// One listener task per port; each reads the current answer from the shared map on every
/// request, so an endpoint change needs no new listener.
async fn serve(mut rx: watch::Receiver<BTreeMap<u16, Check>>) {
    let mut listeners: BTreeMap<u16, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        let wanted: Vec<u16> = rx.borrow_and_update().keys().copied().collect();
        listeners.retain(|port, task| {
            let keep = wanted.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for port in wanted {
            if listeners.contains_key(&port) {
                continue;
            }
            match tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await {
                Ok(listener) => {
                    tracing::info!(port, "serving a health check node port");
                    listeners.insert(port, tokio::spawn(accept(listener, port, rx.clone())));
                }
                // Tried again at the next change.
                Err(e) => tracing::warn!(port, error = %e, "cannot listen on a health check node port"),
            }
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
    for task in listeners.values() {
        task.abort();
    }
}

async fn accept(listener: tokio::net::TcpListener, port: u16, rx: watch::Receiver<BTreeMap<u16, Check>>) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(port, error = %e, "health check accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = rx.borrow().get(&port).map(Check::response);
        tokio::spawn(async move {
            // The request is not looked at (any path answers, as kube-proxy's); read some of it
            // so the client's write does not meet a reset.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
            let (status, body) = answer.unwrap_or((503, String::new()));
            let reason = if status == 200 { "OK" } else { "Service Unavailable" };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::plan::Resource;

    fn svc(health_port: u32, endpoints: Vec<pb::Endpoint>) -> pb::Service {
        pb::Service {
            health_check_node_port: health_port,
            ports: vec![pb::ServicePort { name: "http".into(), port: 80, endpoints, ..Default::default() }],
            external_local: true,
            ..Default::default()
        }
    }

    fn ep(last: u8, flags: u32) -> pb::Endpoint {
        pb::Endpoint { ip: u32::from(Ipv4Addr::new(10, 244, 0, last)), port: 80, flags }
    }

    const LOCAL: u32 = pb::EndpointFlag::EndpointLocal as u32;
    const TERMINATING: u32 = pb::EndpointFlag::EndpointTerminating as u32;
    const NOT_READY: u32 = pb::EndpointFlag::EndpointNotReady as u32;

    fn plan(services: &[(&str, pb::Service)]) -> PlanState {
        let resources = services.iter().map(|(n, s)| Resource::encode(Kind::Service, *n, s));
        PlanState { version: 1, generation: 1, resources: resources.map(|r| (r.key(), r)).collect() }
    }

    #[test]
    fn only_ready_local_endpoints_keep_the_node_healthy() {
        let p = plan(&[
            (
                "web/lb",
                svc(
                    32000,
                    vec![ep(1, LOCAL), ep(2, LOCAL | TERMINATING), ep(3, 0), ep(4, LOCAL | NOT_READY)],
                ),
            ),
            ("web/draining", svc(32001, vec![ep(5, LOCAL | TERMINATING)])),
            ("web/plain", svc(0, vec![ep(6, LOCAL)])),
        ]);
        let checks = checks(&p).expect("checks");
        assert_eq!(checks.keys().copied().collect::<Vec<_>>(), [32000, 32001], "no port, no check");
        let (status, body) = checks[&32000].response();
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "web", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
        );
        assert_eq!(checks[&32001].response().0, 503, "only terminating endpoints: unhealthy");
    }
}
