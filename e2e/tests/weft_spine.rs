//! Weft's spine on a real cluster, as an admin would see it: the operator compiles a plan per
//! node, every agent applies it and acknowledges it (`kubectl get networkconfig`), a Service and
//! its endpoints reach every node's (recorded) proxy programming, ProxyPolicy conflicts are
//! reported on the newer policy, and the operator Deployment's second replica writes nothing
//! until the leader's pod is gone, then takes the leader Lease over. One cluster of its own (2
//! real nodes, Weft installed from `config/`), one session, in order. Needs root and `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{PodOptions, TestCluster, TestOptions, metric_value, metrics_text};

/// `kubectl get networkconfig default`, once it shows `2/2` and Ready=True, with the plan version.
async fn wait_converged(c: &TestCluster, what: &str, timeout: Duration) -> Result<u64> {
    c.wait_for(what, timeout, || async {
        let rows = c.get_table(&["networkconfig", "default"]).await?;
        let row = rows.first().context("no row")?;
        let col = |k: &str| row.get(k).map(String::as_str).unwrap_or_default();
        if col("CONVERGED") == "2/2" && col("READY") == "True" {
            let plan = col("PLAN").parse().with_context(|| format!("PLAN column in {row:?}"))?;
            return Ok(Some(plan));
        }
        bail!("networkconfig default: {row:?}")
    })
    .await
}

/// The endpoints (`ip:port`, flags dropped) of the line for `svc` on `ip_port` in a `proxy.txt`,
/// if there is one: `service <ns>/<name> <clusterIP>:<port> Tcp nodePort <n> -> [<ep> …]`.
fn proxied(proxy_txt: &str, svc: &str, ip_port: &str) -> Option<BTreeSet<String>> {
    let prefix = format!("service {svc} {ip_port} ");
    let line = proxy_txt.lines().find(|l| l.starts_with(&prefix))?;
    let eps = line.split_once("-> [")?.1.strip_suffix(']')?;
    Some(eps.split_whitespace().map(|e| e.split(',').next().unwrap_or(e).to_string()).collect())
}

/// Waits until every node's `programmed/proxy.txt` proxies `svc` on `ip_port` to exactly `want`.
async fn wait_proxied(
    c: &TestCluster,
    svc: &str,
    ip_port: &str,
    want: &BTreeSet<String>,
    timeout: Duration,
) -> Result<()> {
    let what = format!("every node's proxy.txt to send {svc} {ip_port} to {want:?}");
    c.wait_for(&what, timeout, || async {
        for node in c.nodes() {
            let text = c.programmed(&node.name, "proxy").await?;
            let got = proxied(&text, svc, ip_port);
            if got.as_ref() != Some(want) {
                bail!("{} has {got:?} in {}:\n{text}", node.name, node.programmed_file("proxy").display());
            }
        }
        Ok(Some(()))
    })
    .await
}

fn proxy_policy(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: ProxyPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  selector:\n    matchLabels:\n      app: web\n  sessionAffinity:\n    mode: ClientIP\n"
    )
}

/// A ProxyPolicy's (matchedCount, Conflicted status, Conflicted message), once it has a status.
async fn policy_status(c: &TestCluster, ns: &str, name: &str) -> Result<Option<(String, String, String)>> {
    let out = c
        .kubectl(&[
            "get",
            "proxypolicy",
            name,
            "-n",
            ns,
            "-o",
            r#"jsonpath={.status.matchedCount}{"\t"}{.status.conditions[?(@.type=="Conflicted")].status}{"\t"}{.status.conditions[?(@.type=="Conflicted")].message}"#,
        ])
        .await?;
    let mut f = out.splitn(3, '\t').map(str::to_string);
    let (count, conflicted, message) =
        (f.next().unwrap_or_default(), f.next().unwrap_or_default(), f.next().unwrap_or_default());
    Ok((!conflicted.is_empty()).then_some((count, conflicted, message)))
}

async fn wait_policy(
    c: &TestCluster,
    ns: &str,
    name: &str,
    ok: impl Fn(&str, &str, &str) -> bool,
) -> Result<(String, String, String)> {
    c.wait_for(&format!("the status of ProxyPolicy {name}"), Duration::from_secs(30), || async {
        let s = policy_status(c, ns, name).await?;
        match s {
            Some((count, conflicted, message)) if ok(&count, &conflicted, &message) => {
                Ok(Some((count, conflicted, message)))
            }
            other => bail!("{name}: {other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn weft_converges_programs_services_reports_conflicts_and_fails_over() -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    step("cluster up");

    // kubectl get networkconfig default: every node runs the newest plan.
    let header = c.kubectl(&["get", "networkconfig", "default"]).await?;
    let header = header.lines().next().unwrap_or_default();
    for col in ["NAME", "CONVERGED", "PLAN", "READY"] {
        ensure!(header.split_whitespace().any(|h| h == col), "column {col} in {header:?}");
    }
    let first_plan =
        wait_converged(&c, "networkconfig default to be converged 2/2", Duration::from_secs(90)).await?;
    step(&format!("networkconfig default converged 2/2 at plan {first_plan}"));

    // Two whoami pods, one per node, behind a ClusterIP Service 9000 → 80.
    let ns = c.namespace("spine").await?;
    let whoami = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "web").on_node(node)
    };
    let (a, b) =
        tokio::try_join!(c.run_pod(whoami("web-a", "node-1")), c.run_pod(whoami("web-b", "node-2")))?;
    let ip = |p: &k8s_openapi::api::core::v1::Pod| p.status.as_ref().and_then(|s| s.pod_ip.clone());
    let (ip_a, ip_b) = (ip(&a).context("web-a has no IP")?, ip(&b).context("web-b has no IP")?);
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: {ns}\n  labels:\n    app: web\n\
         spec:\n  type: ClusterIP\n  selector:\n    app: web\n  ports:\n  - port: 9000\n    targetPort: 80\n",
        ns = ns.name()
    ))
    .await?;
    let cluster_ip =
        c.kubectl(&["get", "service", "web", "-n", ns.name(), "-o", "jsonpath={.spec.clusterIP}"]).await?;
    let (svc, ip_port) = (format!("{}/web", ns.name()), format!("{}:9000", cluster_ip.trim()));
    let both: BTreeSet<String> = [format!("{ip_a}:80"), format!("{ip_b}:80")].into();
    wait_proxied(&c, &svc, &ip_port, &both, Duration::from_secs(30)).await?;
    step(&format!("{svc} {ip_port} -> {both:?} on every node"));

    // One pod goes: its address leaves every node's proxy, and Weft converges again.
    c.kubectl(&["delete", "pod", "web-b", "-n", ns.name(), "--wait=false"]).await?;
    let one: BTreeSet<String> = [format!("{ip_a}:80")].into();
    wait_proxied(&c, &svc, &ip_port, &one, Duration::from_secs(30)).await?;
    let plan = wait_converged(&c, "networkconfig default to converge again", Duration::from_secs(30)).await?;
    ensure!(plan > first_plan, "the plan moved on from {first_plan}, got {plan}");
    step(&format!("web-b gone from every node; converged 2/2 at plan {plan}"));

    // Two ProxyPolicies select the Service: the older one wins, the newer one is Conflicted.
    c.apply_yaml(&proxy_policy(&ns, "first")).await?;
    let first = wait_policy(&c, &ns, "first", |n, conflicted, _| n == "1" && conflicted == "False").await?;
    step(&format!("first: {first:?}"));
    tokio::time::sleep(Duration::from_millis(1100)).await; // creationTimestamp has whole seconds
    c.apply_yaml(&proxy_policy(&ns, "second")).await?;
    let second = wait_policy(&c, &ns, "second", |_, conflicted, _| conflicted == "True").await?;
    ensure!(second.0 == "0", "second applies to no Service: {second:?}");
    ensure!(
        second.2.contains("web follows older policy first"),
        "the conflict names the Service and the older policy: {second:?}"
    );
    let first = policy_status(&c, &ns, "first").await?;
    ensure!(
        first.as_ref().is_some_and(|(n, conflicted, _)| n == "1" && conflicted == "False"),
        "first still wins: {first:?}"
    );
    step(&format!("second: {second:?}"));

    // The Deployment's second replica serves but writes no status while the leader holds the
    // Lease.
    let holder = c.operator_leader().await?;
    let leader_metrics = c.operator_metrics().await?;
    ensure!(metric_value(&leader_metrics, "weft_leader") == Some(1.0), "{holder} leads");
    let (follower, follower_addr) = c
        .operator_replicas()
        .await?
        .into_iter()
        .find(|(pod, _)| *pod != holder)
        .context("the operator Deployment runs no second replica")?;
    let follower_metrics = || async move { metrics_text(follower_addr.into()).await };
    let writes_before = metric_value(&c.operator_metrics().await?, "weft_status_writes_total").unwrap_or(0.0);
    c.apply_yaml(&proxy_policy(&ns, "third")).await?;
    let third = wait_policy(&c, &ns, "third", |_, conflicted, _| conflicted == "True").await?;
    ensure!(third.2.contains("older policy first"), "{third:?}");
    let writes_after = metric_value(&c.operator_metrics().await?, "weft_status_writes_total").unwrap_or(0.0);
    ensure!(
        writes_after > writes_before,
        "the leader wrote third's status ({writes_before} → {writes_after})"
    );
    let b = follower_metrics().await?;
    ensure!(metric_value(&b, "weft_leader") == Some(0.0), "{follower} does not lead:\n{b}");
    ensure!(metric_value(&b, "weft_status_writes_total") == Some(0.0), "{follower} wrote no status:\n{b}");
    ensure!(c.operator_leader().await? == holder, "the Lease stays with {holder}");
    step(&format!("{follower} follows and writes nothing; {holder} wrote third's status"));

    // The leader's pod is deleted: a live replica (the follower, or the Deployment's replacement
    // pod if it is quicker) takes the Lease over and writes status.
    c.kubectl(&["delete", "pod", "-n", "weft-system", &holder, "--wait=false"]).await?;
    step(&format!("{holder} deleted"));
    let leader = c
        .wait_for("another replica to lead and write status", Duration::from_secs(60), || async {
            let now = c.operator_leader().await?;
            let replicas = c.operator_replicas().await?;
            let Some((_, addr)) = replicas.iter().find(|(pod, _)| *pod == now && *pod != holder) else {
                bail!("Lease holder {now:?}; running replicas {replicas:?}")
            };
            let m = metrics_text((*addr).into()).await?;
            let (leads, writes) =
                (metric_value(&m, "weft_leader"), metric_value(&m, "weft_status_writes_total"));
            if leads == Some(1.0) && writes.is_some_and(|w| w > 0.0) {
                return Ok(Some(now));
            }
            bail!("{now}: weft_leader {leads:?}, weft_status_writes_total {writes:?}")
        })
        .await?;
    step(&format!("{leader} leads, holds the Lease and writes status"));
    Ok(())
}
