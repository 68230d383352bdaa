//! Observability of a local cluster running Weft: an OpenTelemetry Collector (`otelcol-weft`,
//! built by `e2e/tools/install.sh`) receiving OTLP from the operator and the agents, and a
//! Prometheus (Debian's) scraping the operator's and every agent's `/metrics` plus the metrics
//! the collector received over OTLP.
//!
//! - The collector listens for OTLP/gRPC on the bridge address (`172.18.<i>.1:4317`), which the
//!   agents reach from their node namespaces and the operator from the root one; it writes what it
//!   receives as OTLP JSON lines into `.weft/<c>/otel/{traces,metrics}.jsonl` (tests read them) and
//!   exposes the OTLP metrics for Prometheus on a loopback port, prefixed `otlp_`.
//! - Prometheus listens on a loopback port of the cluster's block and keeps its data in
//!   `.weft/<c>/prometheus/`; agents are found through a file (`agents.json`, file_sd) rewritten
//!   whenever a node is added, so later nodes are scraped too.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::process::{Launch, ProcRecord};
use super::state::{AGENT_METRICS_PORT, ClusterState};

/// The collector's OTLP/gRPC port on the bridge address.
pub const OTLP_GRPC_PORT: u16 = 4317;
/// The collector binary install.sh builds.
pub const COLLECTOR_BIN: &str = "otelcol-weft";
/// Debian's Prometheus.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// How often Prometheus scrapes, and the agents and operator export OTLP metrics: short, so
/// tests see data within seconds.
pub const SCRAPE_INTERVAL_SECS: u64 = 2;

/// Where a cluster's collector and Prometheus listen and write; stored in the cluster state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Observability {
    /// OTLP/gRPC endpoint given to the operator and the agents (`http://172.18.<i>.1:4317`).
    pub otlp_endpoint: String,
    /// Prometheus's HTTP API and UI (loopback).
    pub prometheus: SocketAddrV4,
    /// The collector's Prometheus exporter (loopback): OTLP metrics, prefixed `otlp_`.
    pub collector_metrics: SocketAddrV4,
    /// `.weft/<c>/otel`: the collector's config and its `traces.jsonl`, `metrics.jsonl`.
    pub otel_dir: PathBuf,
    /// `.weft/<c>/prometheus`: its config, `agents.json` and data.
    pub prometheus_dir: PathBuf,
}

impl Observability {
    /// The layout for `state` (nothing started).
    pub fn for_cluster(state: &ClusterState) -> Observability {
        Observability {
            otlp_endpoint: format!("http://{}:{OTLP_GRPC_PORT}", state.bridge_ip),
            prometheus: SocketAddrV4::new(Ipv4Addr::LOCALHOST, state.ports.prometheus()),
            collector_metrics: SocketAddrV4::new(Ipv4Addr::LOCALHOST, state.ports.collector_metrics()),
            otel_dir: state.dir.join("otel"),
            prometheus_dir: state.dir.join("prometheus"),
        }
    }

    /// The OTLP JSON lines of the spans the collector received.
    pub fn traces_file(&self) -> PathBuf {
        self.otel_dir.join("traces.jsonl")
    }

    /// The OTLP JSON lines of the metrics the collector received.
    pub fn metrics_file(&self) -> PathBuf {
        self.otel_dir.join("metrics.jsonl")
    }

    fn agents_file(&self) -> PathBuf {
        self.prometheus_dir.join("agents.json")
    }

    /// The `OTEL_*` environment of a Weft process exporting to the collector: every span sampled
    /// (tests look for whole traces), metrics exported as often as Prometheus scrapes.
    pub fn otel_env(&self, service: &str, node: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), self.otlp_endpoint.clone()),
            ("OTEL_SERVICE_NAME".to_string(), service.to_string()),
            ("OTEL_TRACES_SAMPLER".to_string(), "always_on".to_string()),
            ("OTEL_METRIC_EXPORT_INTERVAL".to_string(), (SCRAPE_INTERVAL_SECS * 1000).to_string()),
            // Spans leave within a second, so a test does not wait for the default 5 s batches.
            ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "500".to_string()),
        ];
        if let Some(node) = node {
            env.push(("OTEL_RESOURCE_ATTRIBUTES".to_string(), format!("k8s.node.name={node}")));
        }
        env
    }
}

/// Whether the collector and Prometheus are installed (install.sh installs both).
pub fn available(state: &ClusterState) -> std::result::Result<(), String> {
    let collector = state.tools_bin_dir.join(COLLECTOR_BIN);
    if !collector.is_file() {
        return Err(format!("{} is missing (run e2e/tools/install.sh)", collector.display()));
    }
    if !Path::new(PROMETHEUS_BIN).is_file() {
        return Err(format!("{PROMETHEUS_BIN} is missing (run e2e/tools/install.sh)"));
    }
    Ok(())
}

/// The collector configuration of the local cluster: `config/otel-collector.yaml`'s pipelines,
/// with a file exporter instead of a tracing backend.
pub fn collector_config(state: &ClusterState, obs: &Observability) -> String {
    format!(
        r#"# Rendered by weft-dev for cluster {name}; the real-cluster config is config/otel-collector.yaml.
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: "{bridge}:{OTLP_GRPC_PORT}"
processors:
  batch:
    timeout: 200ms
exporters:
  file/traces:
    path: "{traces}"
    flush_interval: 200ms
  file/metrics:
    path: "{metrics}"
    flush_interval: 200ms
  prometheus:
    endpoint: "{collector_metrics}"
    namespace: otlp
    resource_to_telemetry_conversion:
      enabled: true
service:
  telemetry:
    # No internal metrics server: its default :8888 would clash between clusters.
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [file/traces]
    metrics:
      receivers: [otlp]
      processors: [batch]
      exporters: [file/metrics, prometheus]
"#,
        name = state.name,
        bridge = state.bridge_ip,
        traces = obs.traces_file().display(),
        metrics = obs.metrics_file().display(),
        collector_metrics = obs.collector_metrics,
    )
}

/// Prometheus's configuration: the operator, the agents (file_sd), the collector's exporter.
pub fn prometheus_config(state: &ClusterState, obs: &Observability) -> String {
    format!(
        r#"# Rendered by weft-dev for cluster {name}.
global:
  scrape_interval: {SCRAPE_INTERVAL_SECS}s
  scrape_timeout: {SCRAPE_INTERVAL_SECS}s
  evaluation_interval: {SCRAPE_INTERVAL_SECS}s
scrape_configs:
  - job_name: weft-operator
    static_configs:
      - targets: [{operators}]
  - job_name: weft-agent
    file_sd_configs:
      - files: ["{agents}"]
        refresh_interval: {SCRAPE_INTERVAL_SECS}s
  - job_name: otel-collector
    static_configs:
      - targets: ["{collector}"]
"#,
        name = state.name,
        operators =
            state.operator_metrics_addrs().iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "),
        agents = obs.agents_file().display(),
        collector = obs.collector_metrics,
    )
}

/// Writes the agents' scrape targets (one per node, labelled with the node's name) atomically,
/// so Prometheus never reads half a file.
pub fn write_agent_targets(state: &ClusterState, obs: &Observability) -> Result<()> {
    let targets: Vec<serde_json::Value> = state
        .nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "targets": [format!("{}:{AGENT_METRICS_PORT}", n.ip)],
                "labels": { "node": n.name },
            })
        })
        .collect();
    let path = obs.agents_file();
    let tmp = obs.prometheus_dir.join(".agents.json.tmp");
    fs::create_dir_all(&obs.prometheus_dir)
        .with_context(|| format!("creating {}", obs.prometheus_dir.display()))?;
    fs::write(&tmp, serde_json::to_string_pretty(&targets)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Writes the configurations and starts the collector and Prometheus.
pub fn start(state: &ClusterState, obs: &Observability) -> Result<Vec<(ProcRecord, Child)>> {
    for dir in [&obs.otel_dir, &obs.prometheus_dir] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let collector_yaml = obs.otel_dir.join("collector.yaml");
    fs::write(&collector_yaml, collector_config(state, obs))
        .with_context(|| format!("writing {}", collector_yaml.display()))?;
    let prometheus_yaml = obs.prometheus_dir.join("prometheus.yml");
    fs::write(&prometheus_yaml, prometheus_config(state, obs))
        .with_context(|| format!("writing {}", prometheus_yaml.display()))?;
    write_agent_targets(state, obs)?;

    let collector = Launch::new(
        "otel-collector",
        state.tools_bin_dir.join(COLLECTOR_BIN),
        state.logs_dir().join("otel-collector.log"),
    )
    .arg(format!("--config={}", collector_yaml.display()))
    .spawn()?;
    let prometheus = Launch::new("prometheus", PROMETHEUS_BIN, state.logs_dir().join("prometheus.log"))
        .arg(format!("--config.file={}", prometheus_yaml.display()))
        .arg(format!("--storage.tsdb.path={}", obs.prometheus_dir.join("data").display()))
        .arg("--storage.tsdb.retention.time=1d")
        .arg(format!("--web.listen-address={}", obs.prometheus))
        .spawn()?;
    Ok(vec![collector, prometheus])
}

/// Waits until the collector accepts OTLP connections and Prometheus answers `/-/ready`, so the
/// operator's and agents' first spans are not dropped.
pub fn wait_ready(obs: &Observability, records: &[ProcRecord], timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let otlp: std::net::SocketAddr = obs
        .otlp_endpoint
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("OTLP endpoint {}", obs.otlp_endpoint))?;
    loop {
        if let Some(dead) = records.iter().find(|r| !r.is_alive()) {
            anyhow::bail!(
                "{} exited; last lines of {}:\n{}",
                dead.name,
                dead.log.display(),
                super::process::log_tail(&dead.log, 20)
            );
        }
        let collector_up =
            std::net::TcpStream::connect_timeout(&otlp, std::time::Duration::from_millis(200)).is_ok();
        let prometheus_up =
            blocking_get(obs.prometheus.into(), "/-/ready").is_ok_and(|(code, _)| code == 200);
        if collector_up && prometheus_up {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the collector (OTLP on {otlp}: {}) or Prometheus (http://{}: {}) did not come up within {timeout:?}",
                if collector_up { "up" } else { "down" },
                obs.prometheus,
                if prometheus_up { "ready" } else { "not ready" }
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A plain blocking HTTP/1.0 GET: status and body.
fn blocking_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    Ok((code, body.to_string()))
}

/// One sample of an instant query's result.
#[derive(Clone, Debug, PartialEq)]
pub struct PromSample {
    /// The series' labels, `__name__` included when the query keeps it.
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters stay as they are).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses Prometheus's `/api/v1/query` answer: a vector (one sample per series) or a scalar;
/// an error status becomes an error with Prometheus's message.
pub fn parse_query_response(body: &str) -> Result<Vec<PromSample>> {
    #[derive(Deserialize)]
    struct Reply {
        status: String,
        #[serde(default)]
        data: Option<Data>,
        #[serde(default)]
        error: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
    enum Data {
        Vector(Vec<Series>),
        Scalar((f64, String)),
        Matrix(serde::de::IgnoredAny),
        String(serde::de::IgnoredAny),
    }
    #[derive(Deserialize)]
    struct Series {
        metric: std::collections::BTreeMap<String, String>,
        value: (f64, String),
    }
    let reply: Reply = serde_json::from_str(body).with_context(|| format!("Prometheus answered {body:?}"))?;
    if reply.status != "success" {
        anyhow::bail!("Prometheus: {}", reply.error.unwrap_or(reply.status));
    }
    let parse = |v: &str| v.parse::<f64>().with_context(|| format!("sample value {v:?}"));
    match reply.data {
        Some(Data::Vector(series)) => series
            .into_iter()
            .map(|s| Ok(PromSample { labels: s.metric, value: parse(&s.value.1)? }))
            .collect(),
        Some(Data::Scalar((_, v))) => Ok(vec![PromSample { labels: Default::default(), value: parse(&v)? }]),
        Some(Data::Matrix(_) | Data::String(_)) => anyhow::bail!("expected an instant vector or scalar"),
        None => Ok(Vec::new()),
    }
}

/// One span as the collector's file exporter wrote it (OTLP JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// The `service.name` of the process that made it.
    pub service: String,
    /// String, integer and boolean attributes, as text.
    pub attributes: std::collections::BTreeMap<String, String>,
}

fn attribute_text(value: &serde_json::Value) -> Option<String> {
    let v = value.as_object()?;
    if let Some(s) = v.get("stringValue").and_then(|s| s.as_str()) {
        return Some(s.to_string());
    }
    // OTLP JSON writes 64-bit integers as strings.
    v.get("intValue")
        .or_else(|| v.get("boolValue"))
        .or_else(|| v.get("doubleValue"))
        .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
}

fn attributes(list: Option<&serde_json::Value>) -> std::collections::BTreeMap<String, String> {
    list.and_then(|l| l.as_array())
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv.get("key")?.as_str()?.to_string(), attribute_text(kv.get("value")?)?)))
        .collect()
}

/// Every span in the file exporter's OTLP JSON lines; a line being written (incomplete) is skipped.
pub fn parse_traces(text: &str) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        for rs in doc.get("resourceSpans").and_then(|v| v.as_array()).into_iter().flatten() {
            let resource = attributes(rs.pointer("/resource/attributes"));
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.get("scopeSpans").and_then(|v| v.as_array()).into_iter().flatten() {
                for span in ss.get("spans").and_then(|v| v.as_array()).into_iter().flatten() {
                    let text = |k: &str| span.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
                    out.push(SpanRecord {
                        trace_id: text("traceId"),
                        span_id: text("spanId"),
                        parent_span_id: text("parentSpanId"),
                        name: text("name"),
                        service: service.clone(),
                        attributes: attributes(span.get("attributes")),
                    });
                }
            }
        }
    }
    out
}

/// `(service.name, metric name)` of every metric in the file exporter's OTLP JSON lines.
pub fn parse_metric_names(text: &str) -> std::collections::BTreeSet<(String, String)> {
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        for rm in doc.get("resourceMetrics").and_then(|v| v.as_array()).into_iter().flatten() {
            let service = attributes(rm.pointer("/resource/attributes"))
                .get("service.name")
                .cloned()
                .unwrap_or_default();
            for sm in rm.get("scopeMetrics").and_then(|v| v.as_array()).into_iter().flatten() {
                for m in sm.get("metrics").and_then(|v| v.as_array()).into_iter().flatten() {
                    if let Some(name) = m.get("name").and_then(|n| n.as_str()) {
                        out.insert((service.clone(), name.to_string()));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_answers_parse_into_samples_and_errors_say_why() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"weft_plan_nodes","job":"weft-operator"},"value":[1700000000.1,"3"]}]}}"#;
        let samples = parse_query_response(vector).expect("vector");
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[0].labels.get("job").map(String::as_str), Some("weft-operator"));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"0.5"]}}"#;
        assert_eq!(parse_query_response(scalar).expect("scalar")[0].value, 0.5);
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        let e = parse_query_response(error).expect_err("an error");
        assert!(format!("{e:#}").contains("parse error at char 3"), "{e:#}");
    }

    #[test]
    fn spans_are_read_from_otlp_json_lines_with_their_service() {
        let line = concat!(
            r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"weft-agent"}}]},"#,
            r#""scopeSpans":[{"scope":{"name":"weft"},"spans":[{"traceId":"aa","spanId":"01","parentSpanId":"02","#,
            r#""name":"agent.apply","attributes":[{"key":"version","value":{"intValue":"7"}}]}]}]}]}"#
        );
        let spans = parse_traces(&format!("{line}\n{{\"resourceSpans\":[{{\n"));
        assert_eq!(spans.len(), 1, "the incomplete last line is skipped");
        assert_eq!(spans[0].service, "weft-agent");
        assert_eq!((spans[0].name.as_str(), spans[0].parent_span_id.as_str()), ("agent.apply", "02"));
        assert_eq!(spans[0].attributes.get("version").map(String::as_str), Some("7"));
    }

    #[test]
    fn url_encoding_keeps_promql_intact() {
        assert_eq!(
            url_encode("sum(rate(x[5m])) by (node)"),
            "sum%28rate%28x%5B5m%5D%29%29%20by%20%28node%29"
        );
        assert_eq!(url_encode("a{b=\"c\"}"), "a%7Bb%3D%22c%22%7D");
    }
}
