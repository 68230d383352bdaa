//! The admin endpoints both binaries serve: `/metrics`, `/healthz`, `/readyz`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use super::TelemetryError;

/// The exposition format `prometheus-client` writes; Prometheus picks its parser from this type.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry whose metric names all start with `weft_`, so callers register `plan_bytes` and
/// dashboards see `weft_plan_bytes`.
pub fn new_registry() -> Registry {
    Registry::with_prefix("weft")
}

/// The bucket layout every latency histogram uses (seconds): ×2 steps from 100 µs to ~26 s, so
/// sub-millisecond rule syncs and multi-second programming latencies both resolve, and dashboards
/// can compare histograms bucket for bucket.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 19)
}

/// Named readiness checks shared between the components that own them and `/readyz`; cloning
/// is cheap and every clone sees the same checks.
///
/// Declare every check up front with [`Readiness::new`] so the process is not ready before each
/// component has reported; [`Readiness::set`] flips one.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// A readiness with these checks, all pending. With no checks the process is ready.
    pub fn new<I, S>(checks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let checks = checks.into_iter().map(|name| (name.into(), false)).collect();
        Self { checks: Arc::new(Mutex::new(checks)) }
    }

    /// Marks `check` ready or not (adding it if it was not declared).
    pub fn set(&self, check: &str, ready: bool) {
        let mut checks = self.lock();
        match checks.get_mut(check) {
            Some(state) => *state = ready,
            None => {
                checks.insert(check.to_owned(), ready);
            }
        }
    }

    /// Whether every check is ready.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|ready| *ready)
    }

    /// The checks that are not ready, sorted by name.
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().filter(|(_, ready)| !**ready).map(|(name, _)| name.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        // The map stays consistent whatever a panicking holder did (single inserts/assignments).
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the admin server exposes: the process's metrics and its readiness.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Metrics to expose; register them all before wrapping the registry in an `Arc`.
    pub registry: Arc<Registry>,
    /// Drives `/readyz`.
    pub readiness: Readiness,
}

impl AdminState {
    /// Bundles a registry and a readiness handle for [`serve_admin`].
    pub fn new(registry: Arc<Registry>, readiness: Readiness) -> Self {
        Self { registry, readiness }
    }
}

/// Serves `/metrics` (OpenMetrics text), `/healthz` (200 while the process serves HTTP) and
/// `/readyz` (200 when every readiness check passes, else 503 naming the pending ones) until
/// the listener fails; drop or abort the future to stop it.
pub async fn serve_admin(listener: tokio::net::TcpListener, state: AdminState) -> Result<(), TelemetryError> {
    let router = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    axum::serve(listener, router).await.map_err(TelemetryError::Serve)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(std::fmt::Error) => {
            tracing::error!("cannot encode the metrics registry");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        "ok\n".into_response()
    } else {
        let body = format!("not ready: {}\n", pending.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    struct Reply {
        status: u16,
        content_type: Option<String>,
        body: String,
    }

    /// One HTTP/1.1 request over a fresh connection, read to the server's close.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send request");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("status line");
        let content_type = lines
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            .map(|(_, value)| value.trim().to_owned());
        Reply { status, content_type, body: body.to_owned() }
    }

    async fn start(state: AdminState) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(serve_admin(listener, state));
        addr
    }

    #[tokio::test]
    async fn endpoints_report_metrics_health_and_readiness() {
        let mut registry = new_registry();
        let applied = Counter::<u64>::default();
        registry.register("plans_applied", "Plans applied", applied.clone());
        let latency = Histogram::new(duration_buckets());
        registry.register("apply_duration_seconds", "Apply time", latency.clone());
        applied.inc_by(3);
        latency.observe(0.002);

        let readiness = Readiness::new(["plan-stream", "cni-config"]);
        let addr = start(AdminState::new(Arc::new(registry), readiness.clone())).await;

        let metrics = get(addr, "/metrics").await;
        assert_eq!(metrics.status, 200);
        assert_eq!(metrics.content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(metrics.body.contains("# TYPE weft_plans_applied counter"), "{}", metrics.body);
        assert!(metrics.body.contains("\nweft_plans_applied_total 3\n"), "{}", metrics.body);
        assert!(
            metrics.body.contains("weft_apply_duration_seconds_bucket{le=\"0.0001\"} 0"),
            "{}",
            metrics.body
        );
        assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);

        let health = get(addr, "/healthz").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

        let not_ready = get(addr, "/readyz").await;
        assert_eq!(not_ready.status, 503);
        assert_eq!(not_ready.body, "not ready: cni-config, plan-stream\n");

        readiness.set("plan-stream", true);
        let still = get(addr, "/readyz").await;
        assert_eq!((still.status, still.body.as_str()), (503, "not ready: cni-config\n"));

        readiness.set("cni-config", true);
        let ready = get(addr, "/readyz").await;
        assert_eq!((ready.status, ready.body.as_str()), (200, "ok\n"));

        readiness.set("plan-stream", false);
        assert_eq!(get(addr, "/readyz").await.status, 503);

        assert_eq!(get(addr, "/nope").await.status, 404);
    }

    #[test]
    fn readiness_without_checks_is_ready() {
        let readiness = Readiness::default();
        assert!(readiness.is_ready());
        readiness.clone().set("late", false);
        assert!(!readiness.is_ready());
        assert_eq!(readiness.pending(), ["late"]);
    }

    #[test]
    fn duration_buckets_span_100us_to_about_30s() {
        let buckets: Vec<f64> = duration_buckets().collect();
        assert!(buckets.windows(2).all(|w| w[0] < w[1]));
        let (first, last) = (buckets[0], buckets[buckets.len() - 1]);
        assert!((first - 0.0001).abs() < 1e-12, "{first}");
        assert!((20.0..=40.0).contains(&last), "{last}");
    }
}
