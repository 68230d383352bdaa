//! Endpoint changes behind an Ingress never reload nginx (it proxies to the ClusterIP; Weft's
//! proxy follows the endpoints): a cluster of its own (1 node, `--cni weft`, Weft on), so no other
//! test changes Ingresses meanwhile. A second whoami pod joins the Service behind an Ingress; it
//! answers through the ingress (once nginx renews its keep-alive connection to the ClusterIP,
//! at most 5 s after opening it: the proxy balances per connection), and the agent's
//! `weft_agent_ingress_reloads_total` is unchanged.
//! Needs root and `cargo build --workspace --bins`.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use weft_e2e::cluster::{
    AGENT_METRICS_PORT, OutsideHost, PodOptions, TestCluster, TestOptions, metric_value, metrics_text,
};

/// The pod that answered GET http://web.example.test/ on `ip`, if one did.
async fn answered_by(outside: &OutsideHost, ip: std::net::Ipv4Addr) -> Result<Option<String>> {
    let resolve = format!("web.example.test:80:{ip}");
    let out = outside
        .run("curl", &["-sf", "--max-time", "5", "--resolve", &resolve, "http://web.example.test/"])
        .await?;
    let body = String::from_utf8_lossy(&out.stdout);
    Ok(body.lines().find_map(|l| l.strip_prefix("Hostname: ")).map(|p| p.trim().to_string()))
}

#[tokio::test]
async fn a_new_endpoint_gets_traffic_without_an_nginx_reload() -> Result<()> {
    let c = TestCluster::start(
        TestOptions::default().nodes(1).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    let ns_guard = c.namespace("ing-eps").await?;
    let ns = ns_guard.name();
    let node = c.nodes()[0].clone();
    c.run_pod(
        PodOptions::new(ns, "web-1").image("traefik/whoami").port(80).label("app", "web").on_node(&node.name),
    )
    .await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 80}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: {ns}}}
spec:
  ingressClassName: weft
  rules:
  - host: web.example.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
"#
    ))
    .await?;
    let outside = OutsideHost::start(&c, 1)?;
    c.wait_for("web-1 to answer through the ingress", Duration::from_secs(90), || async {
        Ok((answered_by(&outside, node.ip).await?.as_deref() == Some("web-1")).then_some(()))
    })
    .await?;
    let metrics = std::net::SocketAddr::from((node.ip, AGENT_METRICS_PORT));
    let reloads = || async move {
        let text = metrics_text(metrics).await?;
        metric_value(&text, "weft_agent_ingress_reloads_total").context("no weft_agent_ingress_reloads_total")
    };
    let before = reloads().await?;

    c.run_pod(
        PodOptions::new(ns, "web-2").image("traefik/whoami").port(80).label("app", "web").on_node(&node.name),
    )
    .await?;
    c.wait_for("web-2 to answer through the ingress", Duration::from_secs(90), || async {
        for _ in 0..20 {
            if answered_by(&outside, node.ip).await?.as_deref() == Some("web-2") {
                return Ok(Some(()));
            }
        }
        Ok(None)
    })
    .await?;
    let after = reloads().await?;
    ensure!(after == before, "an endpoint change reloaded nginx ({before} → {after} reloads)");
    Ok(())
}
