//! Observability shared by the operator and the node agent: logs and traces through `tracing`
//! (exported over OTLP/gRPC when an endpoint is configured), W3C trace context carried across the
//! plan stream, and the `/metrics`, `/healthz` and `/readyz` admin endpoints.
//!
//! Both binaries call [`init`] first thing in `main` (inside the Tokio runtime), keep the returned
//! [`TelemetryGuard`] alive until they exit, and serve [`serve_admin`] on their admin port.

mod admin;
mod propagation;

use std::io::IsTerminal as _;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, fmt};

pub use admin::{AdminState, Readiness, duration_buckets, new_registry, serve_admin};
pub use propagation::{
    extract_metadata, inject_current, inject_metadata, set_parent_from, set_parent_from_metadata,
};

/// Selects the log line format; JSON is what log pipelines in a cluster want, text is for people.
pub const LOG_FORMAT_ENV: &str = "WEFT_LOG_FORMAT";

/// How long dropping the guard may block while the last spans are exported: long enough for a
/// reachable collector, short enough not to stall a pod's termination grace period.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why telemetry could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A global `tracing` subscriber exists already (a second [`init`] in one process).
    #[error("telemetry is already initialized in this process")]
    AlreadyInitialized,
    /// Installing the global subscriber or the `log` bridge failed.
    #[error("cannot install the global tracing subscriber: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
    /// `RUST_LOG` does not parse; failing beats silently logging at the wrong level.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::FromEnvError),
    /// `WEFT_LOG_FORMAT` is neither `text` nor `json`.
    #[error("invalid {LOG_FORMAT_ENV}={0:?}: expected \"text\" or \"json\"")]
    LogFormat(String),
    /// The OTLP exporter's gRPC channel is driven by Tokio, so it can only be built inside a runtime.
    #[error("OTLP export is configured but init() was called outside a Tokio runtime")]
    NoRuntime,
    /// The OTLP exporter rejected its configuration (endpoint, headers, protocol…).
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The admin HTTP server stopped with an I/O error.
    #[error("admin server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Keeps the OpenTelemetry pipeline alive; dropping it flushes the pending spans and shuts the
/// exporter down, so it must live until the end of `main` (bind it to `_guard`, not `_`).
#[must_use = "dropping the guard shuts the trace exporter down"]
#[derive(Debug)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.meter_provider.take() {
            // A last export of the instruments, like the spans below.
            let shutdown = move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(shutdown),
                _ => shutdown(),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "metric exporter did not shut down cleanly");
            }
        }
        let Some(provider) = self.tracer_provider.take() else {
            return;
        };
        let shutdown = move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        // The batch processor exports from its own thread through a channel driven by Tokio; when
        // dropped on a multi-thread worker, hand the worker's other tasks away while we wait.
        let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(shutdown),
            _ => shutdown(),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "trace exporter did not shut down cleanly; spans may be lost");
        }
    }
}

/// Log line format selected by [`LOG_FORMAT_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// Unset or empty means text; anything unknown is an error so a typo does not go unnoticed.
    fn parse(value: Option<&str>) -> Result<Self, TelemetryError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Some(v) => Err(TelemetryError::LogFormat(v.to_owned())),
        }
    }
}

/// Whether the standard OTel variables ask for trace export: an OTLP endpoint is set (generic or
/// traces-specific) and the SDK is not disabled. Takes a lookup so tests need not touch the env.
fn otlp_traces_enabled(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Whether the standard variables ask for OTLP metric export: an endpoint (generic or
/// metrics-specific), the SDK not disabled and `OTEL_METRICS_EXPORTER` not `none`.
fn otlp_metrics_enabled(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let none = var("OTEL_METRICS_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && !none && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

/// Sets up logging and tracing for a Weft binary, once per process.
///
/// - Filter from `RUST_LOG` (default `info`); human-readable lines on stderr, or JSON when
///   `WEFT_LOG_FORMAT=json`.
/// - When `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: spans are
///   batched and exported over OTLP/gRPC with `service.name` = `service_name` (unless
///   `OTEL_SERVICE_NAME` overrides it). The SDK itself reads the rest of the standard variables:
///   `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
///   `OTEL_EXPORTER_OTLP_{,TRACES_}{HEADERS,TIMEOUT,COMPRESSION}`, `OTEL_RESOURCE_ATTRIBUTES`.
///   This path must run inside a Tokio runtime.
/// - The W3C TraceContext propagator is installed globally.
///
/// A second call returns [`TelemetryError::AlreadyInitialized`] and changes nothing.
pub fn init(service_name: &str) -> Result<TelemetryGuard, TelemetryError> {
    if tracing::dispatcher::has_been_set() {
        return Err(TelemetryError::AlreadyInitialized);
    }
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env()?;
    let format = LogFormat::parse(std::env::var(LOG_FORMAT_ENV).ok().as_deref())?;

    let tracer_provider = if otlp_traces_enabled(|name| std::env::var(name).ok()) {
        Some(build_tracer_provider(service_name)?)
    } else {
        None
    };
    let meter_provider = if otlp_metrics_enabled(|name| std::env::var(name).ok()) {
        Some(build_meter_provider(service_name)?)
    } else {
        None
    };
    let otel = tracer_provider.as_ref().map(|provider| otel_layer(provider.tracer("weft")));

    let ansi = std::io::stderr().is_terminal();
    let (json, text) = match format {
        LogFormat::Json => (
            Some(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        LogFormat::Text => (None, Some(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))),
    };

    let installed = tracing_subscriber::registry().with(filter).with(json).with(text).with(otel).try_init();
    if let Err(error) = installed {
        if let Some(provider) = tracer_provider {
            // Nothing will ever feed it; stop its export thread before reporting.
            let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
        if let Some(provider) = meter_provider {
            let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
        return Err(error.into());
    }

    // Global so libraries using the OpenTelemetry API directly join the same traces.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(provider) = &tracer_provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    // Instruments from `opentelemetry::global::meter` export over OTLP from here on (no-ops
    // when export is off).
    if let Some(provider) = &meter_provider {
        opentelemetry::global::set_meter_provider(provider.clone());
    }
    Ok(TelemetryGuard { tracer_provider, meter_provider })
}

/// The OTLP/gRPC trace pipeline. Endpoint, headers, timeout and sampler come from the standard
/// `OTEL_*` variables, read by the exporter and the SDK themselves.
fn build_tracer_provider(service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    // tonic's lazily connected channel spawns its worker on the current runtime at build time.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    // No `with_sampler`: the default config reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service_name))
        .build())
}

/// The OTLP/gRPC metric pipeline for the instruments made with `opentelemetry::global::meter`:
/// exported every `OTEL_METRIC_EXPORT_INTERVAL` ms (default 60 s). The Prometheus `/metrics`
/// registry is separate: what is on OTLP is listed in docs/OBSERVABILITY.md.
fn build_meter_provider(service_name: &str) -> Result<SdkMeterProvider, TelemetryError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic().build()?;
    Ok(SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .with_resource(resource(service_name))
        .build())
}

/// `service.name` (unless `OTEL_SERVICE_NAME` overrides it) and `service.version`.
fn resource(service_name: &str) -> Resource {
    let resource = Resource::builder()
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    // OTEL_SERVICE_NAME is the deployer's override; the detectors in `builder()` already read it.
    let overridden = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty());
    let resource = if overridden { resource } else { resource.with_service_name(service_name.to_owned()) };
    resource.build()
}

/// The tracing → OpenTelemetry bridge, shared by [`init`] and the tests. The transport crates the
/// exporter itself uses are excluded: their spans would be exported, producing more spans, forever.
fn otel_layer<S>(tracer: SdkTracer) -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    let exporter_internals = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry-otlp", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF);
    tracing_opentelemetry::layer().with_tracer(tracer).with_filter(exporter_internals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_known_values_and_rejects_typos() {
        assert_eq!(LogFormat::parse(None).ok(), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("")).ok(), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("JSON")).ok(), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse(Some("text")).ok(), Some(LogFormat::Text));
        assert!(matches!(
            LogFormat::parse(Some("jsno")),
            Err(TelemetryError::LogFormat(v)) if v == "jsno"
        ));
    }

    #[test]
    fn otlp_is_enabled_only_by_a_non_empty_endpoint() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert!(!otlp_traces_enabled(env(&[])));
        assert!(!otlp_traces_enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(otlp_traces_enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")])));
        assert!(otlp_traces_enabled(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4317")])));
        assert!(!otlp_traces_enabled(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ])));
        assert!(otlp_metrics_enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")])));
        assert!(otlp_metrics_enabled(env(&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://c:4317")])));
        assert!(!otlp_metrics_enabled(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")])));
        assert!(!otlp_metrics_enabled(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ])));
    }

    // Inside a multi-thread runtime, like the binaries, so the OTLP path also works when the
    // environment running the tests sets an endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn init_twice_does_not_panic_and_the_second_call_fails() {
        // Another test in this binary (or a bad RUST_LOG in the caller's environment) may make
        // the first call fail too; whatever happens, nothing panics and the second call fails.
        let first = init("weft-test");
        let second = init("weft-test");
        assert!(second.is_err());
        if first.is_ok() {
            assert!(matches!(second, Err(TelemetryError::AlreadyInitialized)));
        }
        tracing::info_span!("probe")
            .in_scope(|| tracing::info!("logging still works after a rejected second init"));
    }
}
