//! Service health check node ports, as kube-proxy serves them: for a LoadBalancer Service with
//! `externalTrafficPolicy: Local`, every node answers HTTP on the Service's `healthCheckNodePort`
//! with 200 while it has a ready endpoint of that Service and 503 while it has none (terminating
//! endpoints do not count), so the cloud load balancer sends traffic only to nodes that keep it.
//!
//! Also kube-proxy's own endpoints, which load balancers (externalTrafficPolicy Cluster) and the
//! Networking e2e tests probe: `:10256/healthz` (and `/livez`), 200 while the last rule sync
//! succeeded, 503 after a failed one, with kube-proxy's JSON; `127.0.0.1:10249/proxyMode`, the
//! backend's name.
//!
//! [`checks`] is pure (plan → what each port answers); [`HealthServer`] serves a [`Health`] from
//! a thread of its own (it enters the node's network namespace first when the agent is given
//! one), with a listener per health check node port opened and closed as the plan changes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use weft_api::plan as pb;

use super::model::{ProxyError, decode};

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
pub fn checks(services: &[&pb::Resource]) -> Result<BTreeMap<u16, Check>, ProxyError> {
    let mut out = BTreeMap::new();
    for r in services {
        let svc: pb::Service = decode(r)?;
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

/// kube-proxy's health port (`--healthz-bind-address`), on every address.
pub const PROXY_HEALTHZ: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10256);
/// kube-proxy's metrics port (`--metrics-bind-address`), on loopback, where `/proxyMode` is.
pub const PROXY_STATUS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

/// Everything the health listeners answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub checks: BTreeMap<u16, Check>,
    /// `iptables` or `nftables`: the backend of the last successful sync.
    pub mode: &'static str,
    /// When rules were last written successfully.
    pub last_updated: SystemTime,
    /// False after a failed sync (the rules may be stale), until one succeeds.
    pub healthy: bool,
}

impl Health {
    /// `/healthz` and `/livez` on [`PROXY_HEALTHZ`], as kube-proxy answers them.
    pub fn proxy_healthz(&self, now: SystemTime) -> (u16, String) {
        let body = serde_json::json!({
            "lastUpdated": rfc3339(self.last_updated),
            "currentTime": rfc3339(now),
            "nodeEligible": true,
        });
        (if self.healthy { 200 } else { 503 }, body.to_string())
    }
}

/// UTC, second precision (kube-proxy's Go `time.Time` JSON has more; clients parse both).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Serves a [`Health`]; the thread and its listeners end when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct HealthServer {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    /// The namespace to serve in (`/run/netns/<name>`); None: the agent's own.
    netns: Option<String>,
    /// Started at the first sync.
    tx: Option<watch::Sender<Health>>,
}

impl HealthServer {
    pub fn new(netns: Option<String>) -> Self {
        Self { inner: Arc::new(Mutex::new(Inner { netns, tx: None })) }
    }

    /// After a successful sync: answers from now on as `health` says.
    pub fn set(&self, health: Health) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = &inner.tx {
            tx.send_replace(health);
            return;
        }
        let (tx, rx) = watch::channel(health);
        let netns = inner.netns.clone();
        match std::thread::Builder::new().name("weft-health".into()).spawn(move || serve_thread(netns, rx)) {
            Ok(_) => inner.tx = Some(tx),
            Err(e) => tracing::warn!(error = %e, "cannot start the proxy's health server"),
        }
    }

    /// After a failed sync: `/healthz` says 503; the health check node ports keep their answers.
    pub fn set_unhealthy(&self) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = &inner.tx {
            tx.send_if_modified(|h| std::mem::replace(&mut h.healthy, false));
        }
    }
}

fn serve_thread(netns: Option<String>, rx: watch::Receiver<Health>) {
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

/// What a listener answers: the health check node port's [`Check`], or one of kube-proxy's own.
#[derive(Debug, Clone, Copy)]
enum Listener {
    NodePort(u16),
    ProxyHealthz,
    ProxyStatus,
}

impl Listener {
    /// Status, content type and body for a request of `path`.
    fn answer(self, health: &Health, path: &str) -> (u16, &'static str, String) {
        const JSON: &str = "application/json";
        match self {
            // Any path, as kube-proxy's service health server.
            Listener::NodePort(port) => match health.checks.get(&port) {
                Some(check) => {
                    let (status, body) = check.response();
                    (status, JSON, body)
                }
                None => (503, JSON, String::new()),
            },
            Listener::ProxyHealthz if matches!(path, "/healthz" | "/livez") => {
                let (status, body) = health.proxy_healthz(SystemTime::now());
                (status, JSON, body)
            }
            Listener::ProxyStatus if path == "/proxyMode" => {
                (200, "text/plain; charset=utf-8", health.mode.into())
            }
            _ => (404, "text/plain; charset=utf-8", "404 page not found\n".into()),
        }
    }
}

/// kube-proxy's two listeners for the agent's life, and one task per health check node port;
/// each reads the current answer on every request, so an endpoint change needs no new listener.
async fn serve(mut rx: watch::Receiver<Health>) {
    for (addr, listener) in [(PROXY_HEALTHZ, Listener::ProxyHealthz), (PROXY_STATUS, Listener::ProxyStatus)] {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => drop(tokio::spawn(accept(l, listener, rx.clone()))),
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve kube-proxy's health endpoint"),
        }
    }
    let mut listeners: BTreeMap<u16, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        let wanted: Vec<u16> = rx.borrow_and_update().checks.keys().copied().collect();
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
                Ok(l) => {
                    tracing::info!(port, "serving a health check node port");
                    listeners.insert(port, tokio::spawn(accept(l, Listener::NodePort(port), rx.clone())));
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

async fn accept(listener: tokio::net::TcpListener, what: Listener, rx: watch::Receiver<Health>) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(?what, error = %e, "health accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let rx = rx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            // "GET /healthz HTTP/1.1": the path, without a query.
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let path = path.split('?').next().unwrap_or(path);
            let (status, content_type, body) = what.answer(&rx.borrow(), path);
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\n\
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

    fn plan(services: &[(&str, pb::Service)]) -> Vec<Resource> {
        services.iter().map(|(n, s)| Resource::encode(pb::Kind::Service, *n, s)).collect()
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
        let checks = checks(&p.iter().collect::<Vec<_>>()).expect("checks");
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

    #[test]
    fn the_proxy_healthz_says_when_rules_were_last_written_and_fails_after_a_failed_sync() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let mut health = Health {
            checks: BTreeMap::new(),
            mode: "nftables",
            last_updated: at(1_796_529_089),
            healthy: true,
        };
        let (status, body) = health.proxy_healthz(at(1_796_529_099));
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["lastUpdated"], "2026-12-06T03:51:29Z");
        assert_eq!(body["currentTime"], "2026-12-06T03:51:39Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z", "a leap day");
        health.healthy = false;
        assert_eq!(health.proxy_healthz(at(0)).0, 503);
        assert_eq!(
            Listener::ProxyStatus.answer(&health, "/proxyMode"),
            (200, "text/plain; charset=utf-8", "nftables".into())
        );
        assert_eq!(Listener::ProxyHealthz.answer(&health, "/metrics").0, 404);
    }
}
