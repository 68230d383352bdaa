//! Observability end to end, on a cluster of its own (2 nodes, `--cni weft`, Weft on, with the
//! OpenTelemetry Collector and Prometheus the local cluster runs beside Weft):
//!
//! - a Service change produces one trace, received by the collector, holding the operator's
//!   spans (watch.event → reconcile → plan.compile → plan.send → plan.ack) and every agent's
//!   (agent.receive → agent.apply → program);
//! - every PromQL query of `config/dashboards/weft.json` returns data from the Prometheus that
//!   scrapes the live cluster, and the metrics each query reads are exported;
//! - the operator's and agents' OTLP instruments reach the collector;
//! - killing an agent shows in the metrics (agents connected drops, the node's lag grows) and in
//!   `NetworkConfig` status (`kubectl get networkconfig`, laggingNodes), and heals on restart.
//!
//! Needs root, `e2e/tools/install.sh` (otelcol-weft, prometheus) and `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use weft_e2e::cluster::{PodOptions, SpanRecord, TestCluster, TestOptions, repo_root};

/// Metrics of features built in parallel with this test (service proxy, DNS, ingress): a
/// dashboard query reading one of them is only required to answer once the agent exports it.
const PARALLEL_FEATURE_METRICS: &[&str] = &[
    "weft_agent_proxy_sync_duration_seconds",
    "weft_agent_proxy_sync_lines_written",
    "weft_agent_proxy_syncs_total",
    "weft_agent_network_programming_latency_seconds",
    "weft_agent_dns_apply_duration_seconds",
    "weft_agent_dns_apply_errors_total",
    "weft_agent_ingress_apply_duration_seconds",
    "weft_agent_ingress_apply_errors_total",
];

/// The dashboard's variables as a user opening it sees them: every node, every pool, and
/// Grafana's rate interval.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m").replace("$node", ".*").replace("$pool", ".*")
}

/// Every `(panel title, expr)` of the dashboard, panels in rows included.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p.get("title").and_then(|t| t.as_str()).unwrap_or_default();
            for t in p.get("targets").and_then(|t| t.as_array()).into_iter().flatten() {
                if let Some(expr) = t.get("expr").and_then(|e| e.as_str()) {
                    out.push((title.to_string(), expr.to_string()));
                }
            }
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(panels) = dashboard.get("panels") {
        walk(panels, &mut out);
    }
    out
}

/// The `weft_…` metric names a query reads, without the histogram suffix `_bucket`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("weft_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            let name = &expr[start..end];
            out.insert(name.strip_suffix("_bucket").unwrap_or(name).to_string());
        }
        i = end;
    }
    out
}

/// Whether Prometheus holds any series of `name` (a histogram's under `name_bucket`).
async fn exported(c: &TestCluster, name: &str) -> Result<bool> {
    let q = format!("count({{__name__=~\"{name}|{name}_bucket\"}})");
    Ok(c.prometheus_query(&q).await?.iter().any(|s| s.value > 0.0))
}

/// One finite value at least.
fn has_data(samples: &[weft_e2e::cluster::PromSample]) -> bool {
    samples.iter().any(|s| s.value.is_finite())
}

/// The spans of the trace that holds the `watch.event` of `object` (`<ns>/<name>`) of `kind`.
/// The traces (spans by trace) whose watch event is `kind` `object`: one per operator replica
/// that saw the change (every replica compiles plans for the agents connected to it).
fn traces_of(spans: &[SpanRecord], kind: &str, object: &str) -> Vec<Vec<SpanRecord>> {
    let ids: BTreeSet<&str> = spans
        .iter()
        .filter(|s| {
            s.name == "watch.event"
                && s.attributes.get("kind").map(String::as_str) == Some(kind)
                && s.attributes.get("object").map(String::as_str) == Some(object)
        })
        .map(|s| s.trace_id.as_str())
        .collect();
    ids.into_iter().map(|id| spans.iter().filter(|s| s.trace_id == id).cloned().collect()).collect()
}

/// `sum(weft_agents_connected)` across operator replicas.
async fn agents_connected(c: &TestCluster) -> Result<Option<f64>> {
    Ok(c.prometheus_query("sum(weft_agents_connected)").await?.first().map(|s| s.value))
}

/// The plan lag of `node` as the operator exports it.
async fn lag_of(c: &TestCluster, node: &str) -> Result<Option<f64>> {
    let q = format!("weft_plan_node_lag_seconds{{node=\"{node}\"}}");
    Ok(c.prometheus_query(&q).await?.first().map(|s| s.value))
}

#[tokio::test]
async fn a_change_is_one_trace_dashboard_queries_answer_and_a_dead_agent_shows() -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    let obs = c.observability()?;
    step(&format!(
        "cluster up; Prometheus on http://{}, collector files in {}",
        obs.prometheus,
        obs.otel_dir.display()
    ));

    // Prometheus scrapes both agents before anything happens on them: rate() only sees what
    // happens after a target's first scrape.
    let replicas = c.state().operator_metrics_addrs().len() as f64;
    c.wait_for(
        "Prometheus to scrape both agents and every operator replica",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            async move {
                let up = c
                    .prometheus_query("sum(up{job=\"weft-agent\"}) + sum(up{job=\"weft-operator\"})")
                    .await?;
                Ok(up.first().filter(|s| s.value == 2.0 + replicas).map(|_| ()))
            }
        },
    )
    .await?;

    // Workloads: pods get addresses (IPAM), a Service gets endpoints (the proxy programs them).
    let ns = c.namespace("obs").await?;
    let web = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "web").on_node(node)
    };
    tokio::try_join!(
        c.run_pod(web("web-1", "node-1")),
        c.run_pod(web("web-2", "node-2")),
        c.run_pod(PodOptions::new(&ns, "client").on_node("node-1")),
    )?;
    step("pods running");

    // 1. One Service change → one trace with operator and agent spans.
    let service = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 80\n",
            ns = ns.name()
        )
    };
    c.apply_yaml(&service("web")).await?;
    let object = format!("{}/web", ns.name());
    // Each replica's trace of the change is one tree; together they reach both agents.
    let traces = c
        .wait_for("the Service's traces to reach both agents", Duration::from_secs(60), || {
            let c = c.clone();
            let object = object.clone();
            async move {
                let spans = c.traces().await?;
                let traces = traces_of(&spans, "Service", &object);
                let all = traces.iter().flatten();
                let applied =
                    all.clone().filter(|s| s.service == "weft-agent" && s.name == "agent.apply").count();
                let acked = all.filter(|s| s.name == "plan.ack").count();
                Ok((applied >= 2 && acked >= 2).then_some(traces))
            }
        })
        .await?;
    for trace in traces.iter().filter(|t| t.iter().any(|s| s.name == "agent.apply")) {
        let names = |service: &str| -> BTreeSet<String> {
            trace.iter().filter(|s| s.service == service).map(|s| s.name.clone()).collect()
        };
        let (operator, agent) = (names("weft-operator"), names("weft-agent"));
        step(&format!("trace of {object}: {} spans; operator {operator:?}; agent {agent:?}", trace.len()));
        for span in ["watch.event", "reconcile", "plan.compile", "plan.send", "plan.ack"] {
            ensure!(operator.contains(span), "operator span {span} missing from the trace: {operator:?}");
        }
        for span in ["agent.receive", "agent.apply", "program"] {
            ensure!(agent.contains(span), "agent span {span} missing from the trace: {agent:?}");
        }
        // One tree: a single root (the reconcile), every other span's parent is in the trace.
        let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
        let roots: Vec<&str> =
            trace.iter().filter(|s| s.parent_span_id.is_empty()).map(|s| s.name.as_str()).collect();
        ensure!(roots == ["reconcile"], "the trace has roots {roots:?}, expected the reconcile alone");
        let orphans: Vec<&str> = trace
            .iter()
            .filter(|s| !s.parent_span_id.is_empty() && !ids.contains(s.parent_span_id.as_str()))
            .map(|s| s.name.as_str())
            .collect();
        ensure!(orphans.is_empty(), "spans whose parent is not in the trace: {orphans:?}");
        let programmers: BTreeSet<&str> = trace
            .iter()
            .filter(|s| s.name == "program")
            .filter_map(|s| s.attributes.get("programmer").map(String::as_str))
            .collect();
        ensure!(programmers.contains("proxy"), "the Service change ran no proxy programmer: {programmers:?}");
    }

    // 2. Every dashboard query answers from the live cluster. Changes first, made while
    //    Prometheus scrapes, so every histogram has observations in the rate window (what the
    //    agents did before their first scrape is invisible to rate()): a second Service (proxy),
    //    an Ingress (nginx), a DNS setting (CoreDNS), traffic.
    c.apply_yaml(&service("web-alt")).await?;
    c.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  ingressClassName: weft\n  rules:\n  - host: web.example.test\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n",
        ns = ns.name()
    ))
    .await?;
    c.patch_network_config(serde_json::json!({"dns":{"cacheTTLSeconds":31}})).await?;
    let _ =
        c.curl_from_pod(ns.name(), "client", &format!("http://web.{}.svc.cluster.local/", ns.name())).await;
    let path = repo_root().join("config/dashboards/weft.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let queries = dashboard_queries(&dashboard);
    ensure!(queries.len() >= 20, "only {} queries in {}", queries.len(), path.display());
    // Waits out a few scrapes; a query still empty after a minute fails.
    let mut pending_features: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut empty: Vec<String> = Vec::new();
    for (title, expr) in &queries {
        let promql = substitute(expr);
        let names = metric_names(&promql);
        ensure!(!names.is_empty(), "panel {title:?}: {promql} reads no weft_ metric");
        let answered = c
            .wait_for(&format!("panel {title:?}: {promql}"), Duration::from_secs(60), || {
                let c = c.clone();
                let promql = promql.clone();
                let names = names.clone();
                async move {
                    let mut missing = Vec::new();
                    for name in &names {
                        if !exported(&c, name).await? {
                            missing.push(name.clone());
                        }
                    }
                    if !missing.is_empty() {
                        // Not exported yet: wait, unless it belongs to a feature still being built.
                        if missing.iter().all(|m| PARALLEL_FEATURE_METRICS.contains(&m.as_str())) {
                            return Ok(Some(Err(missing)));
                        }
                        return Ok(None);
                    }
                    let samples = c.prometheus_query(&promql).await?;
                    Ok(has_data(&samples).then(|| Ok(samples.iter().map(|s| s.value).collect::<Vec<f64>>())))
                }
            })
            .await;
        match answered {
            Ok(Ok(values)) => eprintln!("    {title}: {values:?}  ← {promql}"),
            Ok(Err(missing)) => {
                pending_features.insert(format!("{title}: {promql}"), missing);
            }
            Err(e) => empty.push(format!("{e:#}")),
        }
    }
    step(&format!(
        "{} dashboard queries: {} answered, {} wait for metrics not exported yet {pending_features:?}",
        queries.len(),
        queries.len() - empty.len() - pending_features.len(),
        pending_features.len()
    ));
    ensure!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));

    // 3. The OTLP instruments reached the collector, and through its exporter Prometheus.
    c.wait_for("OTLP metrics from the operator and the agents", Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let names = c.otlp_metric_names().await?;
            let want = [
                ("weft-operator", "weft.plan.nodes.converged"),
                ("weft-operator", "weft.plan.node.lag"),
                ("weft-agent", "weft.agent.apply.duration"),
                ("weft-agent", "weft.agent.ipam.allocation.duration"),
            ];
            Ok(want.iter().all(|(s, m)| names.contains(&(s.to_string(), m.to_string()))).then_some(()))
        }
    })
    .await?;
    c.wait_for("OTLP metrics in Prometheus", Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let s = c.prometheus_query("otlp_weft_plan_nodes_converged").await?;
            Ok(s.iter().any(|s| s.value == 2.0).then_some(()))
        }
    })
    .await?;
    step("OTLP metrics received by the collector and scraped from it");

    // 4. A dead agent shows in the metrics and in NetworkConfig status.
    c.wait_for("2 agents connected", Duration::from_secs(30), || {
        let c = c.clone();
        async move { Ok(agents_connected(&c).await?.filter(|v| *v == 2.0)) }
    })
    .await?;
    // An agent that keeps crashing: the kubelet leaves it down for its back-off.
    c.crash_loop_agent("node-2", 4).await?;
    step("agent of node-2 in CrashLoopBackOff");
    c.wait_for("agents connected to drop to 1", Duration::from_secs(30), || {
        let c = c.clone();
        async move { Ok(agents_connected(&c).await?.filter(|v| *v == 1.0)) }
    })
    .await?;
    // A change node-2 cannot acknowledge: its lag starts and grows.
    c.apply_yaml(&service("after-kill")).await?;
    let first = c
        .wait_for("node-2's lag to start", Duration::from_secs(30), || {
            let c = c.clone();
            async move { Ok(lag_of(&c, "node-2").await?.filter(|v| *v > 0.0)) }
        })
        .await?;
    let later = c
        .wait_for("node-2's lag to grow", Duration::from_secs(30), || {
            let c = c.clone();
            async move { Ok(lag_of(&c, "node-2").await?.filter(|v| *v > first)) }
        })
        .await?;
    step(&format!("node-2 lag {first:.1}s → {later:.1}s"));
    c.wait_for("node-1 to converge on the change (lag 0)", Duration::from_secs(30), || {
        let c = c.clone();
        async move { Ok(lag_of(&c, "node-1").await?.filter(|v| *v == 0.0)) }
    })
    .await?;

    let status = c
        .wait_for("NetworkConfig status to name node-2 as lagging", Duration::from_secs(30), || {
            let c = c.clone();
            async move {
                let out = c.kubectl(&["get", "networkconfig", "default", "-o", "json"]).await?;
                let nc: serde_json::Value = serde_json::from_str(&out)?;
                let status = nc.get("status").cloned().unwrap_or_default();
                let lagging: Vec<String> = status
                    .get("laggingNodes")
                    .and_then(|l| l.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.get("node").and_then(|n| n.as_str()).map(str::to_string))
                    .collect();
                let converged = status.get("nodesConverged").and_then(serde_json::Value::as_u64);
                Ok((lagging == ["node-2"] && converged == Some(1)).then_some(status))
            }
        })
        .await?;
    let message = status.pointer("/laggingNodes/0/message").and_then(|m| m.as_str()).unwrap_or_default();
    ensure!(message.contains("not connected"), "node-2's lag is explained: {message:?}");
    let table = c.get_table(&["networkconfig", "default"]).await?;
    let converged_column = table.first().and_then(|row| row.get("CONVERGED")).cloned();
    ensure!(converged_column.as_deref() == Some("1/2"), "kubectl get networkconfig: {table:?}");
    // `kubectl describe` tells an admin what is wrong and what to look at: the Ready condition
    // names the node, and an Event says its agent went away.
    let describe = c
        .wait_for("the AgentDisconnected Event", Duration::from_secs(30), || {
            let c = c.clone();
            async move {
                let out = c.kubectl(&["describe", "networkconfig", "default"]).await?;
                Ok(out.contains("AgentDisconnected").then_some(out))
            }
        })
        .await?;
    ensure!(
        describe.contains("node-2 (agent not connected)") && describe.contains("check the weft-agent pod"),
        "kubectl describe networkconfig default:\n{describe}"
    );
    step(&format!("status: CONVERGED 1/2, node-2: {message}"));

    // Back: the agent the kubelet restarts after its back-off catches up, the lag returns to 0.
    c.wait_agent_restarted("node-2").await?;
    c.wait_for("node-2 to converge again", Duration::from_secs(60), || {
        let c = c.clone();
        async move {
            let lag = lag_of(&c, "node-2").await?;
            let connected = agents_connected(&c).await?;
            Ok((lag == Some(0.0) && connected == Some(2.0)).then_some(()))
        }
    })
    .await?;
    step("node-2 converged again after its agent restarted");
    // The status says so too: the lagging list clears, and once it is right the operator stops
    // rewriting it (its resourceVersion holds over several status passes).
    let status_of = || async {
        let out = c.kubectl(&["get", "networkconfig", "default", "-o", "json"]).await?;
        let nc: serde_json::Value = serde_json::from_str(&out)?;
        let version = nc.pointer("/metadata/resourceVersion").and_then(|v| v.as_str()).unwrap_or_default();
        anyhow::Ok((version.to_string(), nc.get("status").cloned().unwrap_or_default()))
    };
    let (settled_version, _) = c
        .wait_for(
            "NetworkConfig status to clear laggingNodes and show 2/2",
            Duration::from_secs(30),
            || async {
                let (version, status) = status_of().await?;
                let cleared = status.get("laggingNodes").is_none()
                    && status.get("nodesConverged").and_then(serde_json::Value::as_u64) == Some(2);
                Ok(cleared.then_some((version, status)))
            },
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (version, status) = status_of().await?;
    ensure!(
        version == settled_version,
        "NetworkConfig default was rewritten while nothing changed (resourceVersion {settled_version} → {version}): {status}"
    );
    step("status: laggingNodes cleared, and not rewritten while nothing changes");
    Ok(())
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(weft_agent_apply_duration_seconds_bucket{node=~\".*\"}[5m]))) / max(weft_plan_nodes)",
    );
    let want: BTreeSet<String> =
        ["weft_agent_apply_duration_seconds", "weft_plan_nodes"].into_iter().map(String::from).collect();
    assert_eq!(names, want);
    assert!(metric_names("sum(rate(xweft_foo[5m]))").is_empty());
}
