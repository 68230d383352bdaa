//! The service proxy's end-to-end scenarios, run by `service_proxy.rs` (iptables backend) and
//! `service_proxy_nftables.rs` (nftables backend), each on a shared cluster of its own (4 nodes,
//! `--cni weft`, Weft on; the agents replace kube-proxy). Zones are the local cluster's round
//! robin: node-1 and node-4 in `zone-a`, node-2 in `zone-b`, node-3 in `zone-c`.
//!
//! - a ClusterIP Service (`port: 9000`, `targetPort: 80`) over three echo pods on three nodes
//!   spreads 100 requests from a pod on the fourth node over all three (15–55 % each); port 80
//!   of the ClusterIP does not answer; with `sessionAffinity: ClientIP` all 100 reach one pod;
//!   a deleted endpoint pod leaves the rotation; a Service without endpoints is refused at once
//!   (curl exit 7, not a timeout);
//! - a NodePort Service (30123) answers on every node's address from a host outside the pod
//!   network; with `externalTrafficPolicy: Local` only on the nodes with a local endpoint, and
//!   the echo sees the outside host's own address;
//! - a ProxyPolicy `PreferSameZone` keeps a zone-a client on the zone-a endpoint, and falls back
//!   to every endpoint once the client's node is in a zone without endpoints; its status lists
//!   the Service it applies to.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{OutsideHost, PodOptions, Steps, TestCluster, TestOptions, whoami_remote_ip};

/// The cluster both backends' tests share (one per test binary).
pub fn options() -> TestOptions {
    TestOptions::default().nodes(4).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev"))
}

/// The including test binary's shared cluster, with NetworkConfig `default` set to proxy `mode`
/// (`iptables` or `nftables`) before the first scenario runs: every agent's proxy record says
/// that mode.
pub async fn cluster_in_mode(
    mode: &'static str,
    switched: &tokio::sync::OnceCell<()>,
) -> Result<TestCluster> {
    let c = TestCluster::shared(options()).await?;
    switched.get_or_try_init(|| c.use_proxy_mode(mode)).await?;
    Ok(c)
}

/// One `#[tokio::test]` per scenario, each on the including test binary's `cluster()`.
macro_rules! tests {
    ($($scenario:ident),* $(,)?) => {
        $(#[tokio::test]
        async fn $scenario() -> anyhow::Result<()> {
            proxy_scenarios::$scenario(&cluster().await?).await
        })*
    };
}

pub(crate) use tests;

/// Echo pods `(name, node)` labelled `app=<app>`, started together.
async fn echo_pods(c: &TestCluster, ns: &str, app: &str, pods: &[(&str, &str)]) -> Result<()> {
    let runs = pods.iter().map(|(name, node)| {
        c.run_pod(PodOptions::new(ns, name).image("traefik/whoami").port(80).label("app", app).on_node(node))
    });
    futures::future::try_join_all(runs).await?;
    Ok(())
}

async fn cluster_ip(c: &TestCluster, ns: &str, svc: &str) -> Result<String> {
    let ip = c.kubectl(&["get", "service", svc, "-n", ns, "-o", "jsonpath={.spec.clusterIP}"]).await?;
    ensure!(!ip.trim().is_empty(), "service {ns}/{svc} has no ClusterIP");
    Ok(ip.trim().to_string())
}

/// `n` requests to `url` from `pod`, in one exec: how many times each echo pod answered
/// (`FAIL` counts the requests that got no answer).
async fn hits(c: &TestCluster, ns: &str, pod: &str, url: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let script = format!(
        "for i in $(seq {n}); do curl -s --max-time 5 {url} | sed -n 's/^Hostname: //p' | grep . || echo FAIL; done"
    );
    let out = c.exec_ok(ns, pod, &["sh", "-c", &script]).await?;
    let mut counts = BTreeMap::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    ensure!(counts.values().sum::<usize>() == n, "{n} requests to {url} gave {counts:?}");
    Ok(counts)
}

/// Waits (generously: programming is fast, the machine is shared) until `n` requests from `pod`
/// are all answered by pods in `want`, and by each of them; returns the last counts.
async fn wait_answered_by(
    c: &TestCluster,
    ns: &str,
    pod: &str,
    url: &str,
    want: &[&str],
) -> Result<BTreeMap<String, usize>> {
    c.wait_for(
        &format!("{url} from {pod} to be answered by exactly {want:?}"),
        Duration::from_secs(90),
        || async {
            let counts = hits(c, ns, pod, url, 30).await?;
            let all_wanted = counts.keys().all(|k| want.contains(&k.as_str()));
            let each_seen = want.iter().all(|w| counts.contains_key(*w));
            if all_wanted && each_seen { Ok(Some(counts)) } else { bail!("answers {counts:?}") }
        },
    )
    .await
}

/// The exit code of `curl` to `url` from `pod` (0 when it answered).
async fn curl_exit(c: &TestCluster, ns: &str, pod: &str, url: &str) -> Result<i32> {
    let out = c.exec_in_pod(ns, pod, &["curl", "-sS", "--max-time", "5", url]).await?;
    out.status.code().with_context(|| format!("curl {url} in {pod} was killed"))
}

pub async fn cluster_ip_spreads_requests_keeps_affinity_and_follows_endpoints(c: &TestCluster) -> Result<()> {
    let s = Steps::new("clusterip");
    s.step("cluster up");
    let ns_guard = c.namespace("svc").await?;
    let ns = ns_guard.name();
    let (echo, client) = (["echo-1", "echo-2", "echo-3"], "client");
    echo_pods(c, ns, "echo", &[(echo[0], "node-1"), (echo[1], "node-2"), (echo[2], "node-3")]).await?;
    c.run_pod(PodOptions::new(ns, client).on_node("node-4")).await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {ns}}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 9000, targetPort: 80, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: {ns}}}
spec:
  selector: {{app: echo}}
  sessionAffinity: ClientIP
  ports: [{{port: 9000, targetPort: 80, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: nobody, namespace: {ns}}}
spec:
  selector: {{app: nobody}}
  ports: [{{port: 9000, targetPort: 80, protocol: TCP}}]
"#
    ))
    .await?;
    let vip = cluster_ip(c, ns, "echo").await?;
    let url = format!("http://{vip}:9000/");
    s.step(&format!("3 echo pods on node-1..3, client on node-4, service echo {vip}:9000"));

    wait_answered_by(c, ns, client, &url, &echo).await?;
    let counts = hits(c, ns, client, &url, 100).await?;
    for pod in echo {
        let n = counts.get(pod).copied().unwrap_or(0);
        ensure!((15..=55).contains(&n), "{pod} answered {n} of 100 requests (want 15-55): {counts:?}");
    }
    ensure!(!counts.contains_key("FAIL"), "requests failed: {counts:?}");
    s.step(&format!("100 requests spread over the three pods: {counts:?}"));

    // Only the Service's port is proxied: the pods listen on 80, the ClusterIP does not.
    let code = curl_exit(c, ns, client, &format!("http://{vip}:80/")).await?;
    ensure!(code != 0, "port 80 of the ClusterIP {vip} answered");
    s.step(&format!("port 80 of the ClusterIP does not answer (curl exit {code})"));

    let sticky = format!("http://{}:9000/", cluster_ip(c, ns, "sticky").await?);
    c.wait_for("the sticky service to answer", Duration::from_secs(90), || async {
        Ok((curl_exit(c, ns, client, &sticky).await? == 0).then_some(()))
    })
    .await?;
    let counts = hits(c, ns, client, &sticky, 100).await?;
    ensure!(
        counts.len() == 1 && counts.keys().all(|k| echo.contains(&k.as_str())),
        "sessionAffinity ClientIP: 100 requests from one pod reached {counts:?}"
    );
    s.step(&format!("sessionAffinity ClientIP: {counts:?}"));

    // A deleted endpoint leaves the rotation.
    c.kubectl(&["delete", "pod", echo[2], "-n", ns, "--wait=false"]).await?;
    wait_answered_by(c, ns, client, &url, &echo[..2]).await?;
    let counts = hits(c, ns, client, &url, 60).await?;
    ensure!(
        counts.keys().all(|k| echo[..2].contains(&k.as_str())) && counts.len() == 2,
        "after deleting {}: {counts:?}",
        echo[2]
    );
    s.step(&format!("{} deleted, out of rotation: {counts:?}", echo[2]));

    // No endpoints: refused at once (exit 7, connection refused), not left to time out (28).
    let nobody = format!("http://{}:9000/", cluster_ip(c, ns, "nobody").await?);
    c.wait_for("the service without endpoints to be refused", Duration::from_secs(90), || async {
        match curl_exit(c, ns, client, &nobody).await? {
            7 => Ok(Some(())),
            code => bail!("curl {nobody} exited {code}, not 7 (connection refused)"),
        }
    })
    .await?;
    for _ in 0..5 {
        let code = curl_exit(c, ns, client, &nobody).await?;
        ensure!(code == 7, "curl {nobody} exited {code}, not 7 (connection refused)");
    }
    s.step("a service without endpoints is refused (curl exit 7)");
    Ok(())
}

pub async fn node_port_answers_on_every_node_and_local_keeps_the_client_address(
    c: &TestCluster,
) -> Result<()> {
    let s = Steps::new("nodeport");
    let ns_guard = c.namespace("nodeport").await?;
    let ns = ns_guard.name();
    echo_pods(c, ns, "np", &[("np-1", "node-1"), ("np-2", "node-2")]).await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: np, namespace: {ns}}}
spec:
  type: NodePort
  selector: {{app: np}}
  ports: [{{port: 9000, targetPort: 80, nodePort: 30123, protocol: TCP}}]
"#
    ))
    .await?;
    // Host 1 of the cluster's outside hosts is this test's (the other tests use none).
    let outside = OutsideHost::start(c, 1)?;
    let outside_ip = outside.ip();
    let nodes = c.nodes();
    let get = |url: String| {
        let outside = &outside;
        async move {
            let out = outside.run("curl", &["-sS", "--max-time", "3", &url]).await?;
            Ok::<_, anyhow::Error>(
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()),
            )
        }
    };
    s.step(&format!("np-1 on node-1, np-2 on node-2, NodePort 30123, client {outside_ip}"));

    for node in &nodes {
        let url = format!("http://{}:30123/", node.ip);
        c.wait_for(&format!("{url} to answer from outside"), Duration::from_secs(90), || async {
            get(url.clone()).await
        })
        .await?;
        for _ in 0..5 {
            let body = get(url.clone()).await?.with_context(|| format!("{url} did not answer"))?;
            ensure!(body.contains("Hostname: np-"), "{url}: {body}");
        }
    }
    s.step("NodePort answers on every node");

    c.kubectl(&["patch", "service", "np", "-n", ns, "-p", r#"{"spec":{"externalTrafficPolicy":"Local"}}"#])
        .await?;
    let local = [("node-1", "np-1"), ("node-2", "np-2")];
    let is_local = |name: &str| local.iter().any(|(n, _)| *n == name);
    // Each node's agent applies the change on its own: wait until every node has, that is until
    // the others stop answering and the local ones stop masquerading the client.
    c.wait_for("NodePort to answer only where an endpoint is local", Duration::from_secs(90), || async {
        for node in &nodes {
            let answered = get(format!("http://{}:30123/", node.ip)).await?;
            if answered.is_some() != is_local(&node.name) {
                bail!("{} answered: {}", node.name, answered.is_some());
            }
            if let Some(body) = answered
                && whoami_remote_ip(&body)? != outside_ip
            {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    for node in &nodes {
        let url = format!("http://{}:30123/", node.ip);
        match local.iter().find(|(n, _)| *n == node.name) {
            Some((_, pod)) => {
                for _ in 0..5 {
                    let body = get(url.clone()).await?.with_context(|| format!("{url} did not answer"))?;
                    ensure!(
                        body.contains(&format!("Hostname: {pod}\n")),
                        "{url} answered from elsewhere: {body}"
                    );
                    let seen = whoami_remote_ip(&body)?;
                    ensure!(
                        seen == outside_ip,
                        "{url}: the echo saw {seen}, not the client {outside_ip}\n{body}"
                    );
                }
            }
            None => {
                for _ in 0..3 {
                    ensure!(get(url.clone()).await?.is_none(), "{url} answered without a local endpoint");
                }
            }
        }
    }
    s.step("externalTrafficPolicy Local: only node-1 and node-2 answer, with the client's own address");
    Ok(())
}

/// Sets node `node`'s zone label; the guard puts `restore` back (also when the test fails).
struct ZoneLabel {
    kubectl: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    node: String,
    restore: String,
}

impl ZoneLabel {
    async fn set(c: &TestCluster, node: &str, zone: &str, restore: &str) -> Result<ZoneLabel> {
        c.kubectl(&["label", "node", node, &format!("topology.kubernetes.io/zone={zone}"), "--overwrite"])
            .await?;
        let state = c.state();
        Ok(ZoneLabel {
            kubectl: state.kubectl_bin(),
            kubeconfig: state.admin_kubeconfig(),
            node: node.into(),
            restore: restore.into(),
        })
    }
}

impl Drop for ZoneLabel {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["label", "node", &self.node, "--overwrite"])
            .arg(format!("topology.kubernetes.io/zone={}", self.restore))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
    }
}

pub async fn proxy_policy_prefer_same_zone_keeps_traffic_in_the_zone_and_falls_back(
    c: &TestCluster,
) -> Result<()> {
    let s = Steps::new("topology");
    let ns_guard = c.namespace("zones").await?;
    let ns = ns_guard.name();
    let (pods, client) = (["zone-a-1", "zone-b-2", "zone-c-3"], "zclient");
    echo_pods(c, ns, "zoned", &[(pods[0], "node-1"), (pods[1], "node-2"), (pods[2], "node-3")]).await?;
    c.run_pod(PodOptions::new(ns, client).on_node("node-4")).await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: zoned, namespace: {ns}, labels: {{tier: near}}}}
spec:
  selector: {{app: zoned}}
  ports: [{{port: 9000, targetPort: 80, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: anywhere, namespace: {ns}}}
spec:
  selector: {{app: zoned}}
  ports: [{{port: 9000, targetPort: 80, protocol: TCP}}]
---
apiVersion: weft.io/v1alpha1
kind: ProxyPolicy
metadata: {{name: same-zone, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{tier: near}}}}
  topology: {{mode: PreferSameZone}}
"#
    ))
    .await?;
    s.step("echo pods in zone-a (node-1), zone-b, zone-c; client on node-4 (zone-a)");

    let matched = c
        .wait_for(
            "the ProxyPolicy status to list the service it applies to",
            Duration::from_secs(60),
            || async {
                let out = c
                    .kubectl(&[
                        "get",
                        "proxypolicy",
                        "same-zone",
                        "-n",
                        ns,
                        "-o",
                        "jsonpath={.status.matchedServices}",
                    ])
                    .await?;
                if out.contains("zoned") { Ok(Some(out)) } else { bail!("matchedServices {out:?}") }
            },
        )
        .await?;
    ensure!(!matched.contains("anywhere"), "the policy matched a service it does not select: {matched}");
    s.step(&format!("ProxyPolicy status matchedServices {matched}"));

    let url = format!("http://{}:9000/", cluster_ip(c, ns, "zoned").await?);
    wait_answered_by(c, ns, client, &url, &pods[..1]).await?;
    let counts = hits(c, ns, client, &url, 100).await?;
    ensure!(counts.len() == 1 && counts.contains_key(pods[0]), "zone-a client reached {counts:?}");
    // The Service the policy does not select still uses every endpoint.
    let anywhere = format!("http://{}:9000/", cluster_ip(c, ns, "anywhere").await?);
    wait_answered_by(c, ns, client, &anywhere, &pods).await?;
    s.step(&format!("PreferSameZone: the zone-a client stays in zone-a {counts:?}"));

    // The client's node moves to a zone without endpoints: every endpoint again.
    let _zone = ZoneLabel::set(c, "node-4", "zone-d", "zone-a").await?;
    wait_answered_by(c, ns, client, &url, &pods).await?;
    let counts = hits(c, ns, client, &url, 100).await?;
    ensure!(
        counts.len() == 3 && pods.iter().all(|p| counts.contains_key(*p)),
        "zone-d client (no endpoints in its zone) reached {counts:?}"
    );
    s.step(&format!("node-4 in zone-d (no endpoints there): falls back to all {counts:?}"));
    Ok(())
}
