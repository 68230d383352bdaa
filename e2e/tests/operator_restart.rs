//! An operator restart while its lists are slow takes nothing from the nodes (fail-static): a
//! cluster of its own (2 real nodes, Weft installed from `config/`) with NetworkConfig away from
//! its defaults (VXLAN, the iptables proxy mode, masquerade bit 13) and a Service with a pod on
//! each node. The operator Deployment is scaled to 0 (the agents lose their streams) and back to
//! 2, its pods now reaching the API server through a proxy (a kubeconfig from a ConfigMap) that
//! holds their LISTs of EndpointSlices, NetworkConfigs and Pods for several seconds, longer than
//! the agents take to reconnect. From the scale-down until the new leader has synced and the
//! nodes converged again, the test reads each node's kernel every 100 ms (iptables and nftables
//! rules, links, routes) and its IPAM checkpoint: none of it may change. An operator that
//! publishes before every kind is listed removes the VXLAN device, switches the proxy to nftables
//! and drops the Service's endpoints on the nodes.
//! Needs root and `cargo build --workspace --bins`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use weft_e2e::cluster::{NodeState, PodOptions, TestCluster, TestOptions, http_get};

/// How long the proxy holds each slow LIST.
const LIST_DELAY: Duration = Duration::from_secs(6);
/// The kinds whose LISTs are held (the last ones a plan needs: settings, endpoints, pods).
const SLOW_LISTS: [&str; 3] = ["/endpointslices", "/networkconfigs", "/pods"];

/// A plain-HTTP proxy in front of the API server (it forwards with the test's admin client) that
/// holds the first LISTs of [`SLOW_LISTS`] for [`LIST_DELAY`]; watches and everything else pass
/// at once.
struct SlowLists {
    client: kube::Client,
    held: AtomicUsize,
}

impl SlowLists {
    fn holds(&self, method: &Method, path_and_query: &str) -> bool {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        *method == Method::GET
            && SLOW_LISTS.iter().any(|kind| path.ends_with(kind))
            && !query.split('&').any(|p| p.starts_with("watch="))
    }
}

async fn forward(State(proxy): State<Arc<SlowLists>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    if proxy.holds(&parts.method, &path) {
        proxy.held.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(LIST_DELAY).await;
    }
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut upstream = axum::http::Request::builder().method(parts.method).uri(&path);
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = match upstream.body(kube::client::Body::from(body)) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match proxy.client.send(upstream).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            for name in ["connection", "keep-alive", "transfer-encoding", "content-length"] {
                parts.headers.remove(name);
            }
            Response::from_parts(parts, axum::body::Body::new(body))
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// Headers of one connection, not of the request (the admin client sets its own auth and host).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "host" | "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "authorization"
    )
}

/// Starts the proxy on `ip` (the cluster's bridge, which the operator's pods reach from their
/// nodes); returns its address and the proxy (for its counter).
async fn start_proxy(client: kube::Client, ip: Ipv4Addr) -> Result<(SocketAddr, Arc<SlowLists>)> {
    let proxy = Arc::new(SlowLists { client, held: AtomicUsize::new(0) });
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(forward).with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, proxy))
}

/// A ConfigMap holding a kubeconfig that reaches the API server only through the proxy, and the
/// patch that has the operator's pods use it (`KUBECONFIG` comes before the in-cluster config).
fn through_proxy(proxy: SocketAddr) -> (String, String) {
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: slow\n  cluster:\n    server: http://{proxy}\n\
         users:\n- name: through-proxy\n  user: {{}}\ncontexts:\n- name: slow\n  context:\n    cluster: slow\n    user: through-proxy\n\
         current-context: slow\n"
    );
    let config_map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "operator-through-slow-proxy", "namespace": "weft-system" },
        "data": { "kubeconfig": kubeconfig },
    });
    let patch = serde_json::json!([
        { "op": "add", "path": "/spec/template/spec/volumes/-",
          "value": { "name": "slow-proxy", "configMap": { "name": "operator-through-slow-proxy" } } },
        { "op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-",
          "value": { "name": "slow-proxy", "mountPath": "/etc/weft/slow-proxy", "readOnly": true } },
        { "op": "add", "path": "/spec/template/spec/containers/0/env/-",
          "value": { "name": "KUBECONFIG", "value": "/etc/weft/slow-proxy/kubeconfig" } },
    ]);
    (config_map.to_string(), patch.to_string())
}

/// `cmd args…` in the node's network namespace; its stdout.
fn in_node(node: &NodeState, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} in {}", node.netns))?;
    ensure!(out.status.success(), "{args:?} in {}: {}", node.netns, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the node's agent has programmed, as the kernel holds it, and the addresses its IPAM
/// holds. Packet counters are left out: traffic changes them, not the agent. So are the rules of
/// weft-system's own Services (and the endpoint chains they jump to): the operator's pods are
/// the weft-operator Service's endpoints, and scaling them down rightly removes those. nftables
/// is its list of tables: the iptables backend's rules show there too, and a switch to the
/// nftables backend adds `ip weft-proxy`.
fn node_state(node: &NodeState) -> Result<BTreeMap<&'static str, String>> {
    let without_counters = |text: String| -> String {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(at)) => &l[..at],
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let checkpoint = node.agent_state_dir.join("ipam.json");
    let ipam: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&checkpoint).with_context(|| format!("reading {}", checkpoint.display()))?,
    )?;
    let mut addresses: Vec<String> = ipam["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| format!("{} {}/{}", a["ip"], a["pod_namespace"], a["pod_name"]))
        .collect();
    addresses.sort();
    Ok(BTreeMap::from([
        ("iptables", without_weft_system(&without_counters(in_node(node, &["iptables-save"])?))),
        ("nftables", in_node(node, &["nft", "list", "tables"])?),
        ("links", in_node(node, &["ip", "-d", "-o", "link", "show", "type", "vxlan"])?),
        ("routes", in_node(node, &["ip", "route", "show", "table", "all"])?),
        ("ipam", addresses.join("\n")),
    ]))
}

/// `iptables-save` output without weft-system's Services and the endpoint chains' declarations
/// (their rules carry the Service's name, so the test's own endpoints stay in).
fn without_weft_system(rules: &str) -> String {
    rules
        .lines()
        .filter(|l| !l.contains("\"weft-system/") && !l.starts_with(":WEFT-SEP-"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lines of `after` that differ from `before`, marked `-` and `+`.
fn changed_lines(before: &str, after: &str) -> String {
    let b: std::collections::BTreeSet<&str> = before.lines().collect();
    let a: std::collections::BTreeSet<&str> = after.lines().collect();
    let mut out: Vec<String> = b.difference(&a).map(|l| format!("- {l}")).collect();
    out.extend(a.difference(&b).map(|l| format!("+ {l}")));
    out.join("\n")
}

async fn wait_converged(c: &TestCluster, what: &str) -> Result<()> {
    c.wait_for(what, Duration::from_secs(90), || async {
        let rows = c.get_table(&["networkconfig", "default"]).await?;
        let row = rows.first().context("no networkconfig default")?;
        let col = |k: &str| row.get(k).map(String::as_str).unwrap_or_default();
        if col("CONVERGED") == "2/2" && col("READY") == "True" { Ok(Some(())) } else { bail!("{row:?}") }
    })
    .await
}

#[tokio::test]
async fn an_operator_restarted_behind_slow_lists_changes_nothing_on_the_nodes() -> Result<()> {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    step("cluster up (weft-cni)");
    c.patch_network_config(serde_json::json!({
        "podNetwork": { "encapsulation": "VXLAN" },
        "proxy": { "mode": "iptables", "masqueradeBit": 13 },
    }))
    .await?;
    let ns = c.namespace("op-restart").await?;
    let echo = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "echo").on_node(node)
    };
    tokio::try_join!(c.run_pod(echo("echo-1", "node-1")), c.run_pod(echo("echo-2", "node-2")))?;
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: {ns}\nspec:\n  selector:\n    app: echo\n  ports:\n  - port: 80\n",
        ns = ns.name()
    ))
    .await?;
    let cluster_ip =
        c.kubectl(&["get", "service", "echo", "-n", ns.name(), "-o", "jsonpath={.spec.clusterIP}"]).await?;
    let nodes = c.nodes();
    c.wait_for(
        "both nodes to program VXLAN and the Service's two endpoints with iptables",
        Duration::from_secs(90),
        || {
            let (nodes, cluster_ip) = (nodes.clone(), cluster_ip.clone());
            async move {
                for node in &nodes {
                    let state = node_state(node)?;
                    let endpoints = state["iptables"].lines().filter(|l| l.contains("-j DNAT")).count();
                    if !state["links"].contains("weft.vxlan")
                        || !state["iptables"].contains(cluster_ip.trim())
                        || endpoints < 2
                    {
                        bail!("{}: vxlan {:?}, {endpoints} DNAT rules", node.name, state["links"]);
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await?;
    wait_converged(&c, "networkconfig default to converge 2/2 on the new settings").await?;
    let before: Vec<_> = nodes.iter().map(node_state).collect::<Result<_>>()?;
    step(&format!("both nodes programmed (Service {} with 2 endpoints, VXLAN, iptables)", cluster_ip.trim()));

    // Every replica goes (the agents lose their streams), and both come back behind the proxy.
    let (proxy_addr, proxy) = start_proxy(c.client(), c.state().bridge_ip).await?;
    let (config_map, patch) = through_proxy(proxy_addr);
    c.apply_yaml(&config_map).await?;
    let deployment = ["-n", "weft-system", "deployment/weft-operator"];
    c.kubectl(&[&["scale"][..], &deployment[..], &["--replicas=0"][..]].concat()).await?;
    c.wait_pods_gone("weft-system", "app.kubernetes.io/name=weft-operator").await?;
    c.kubectl(&[&["patch"][..], &deployment[..], &["--type=json", "-p", &patch][..]].concat()).await?;
    c.kubectl(&[&["scale"][..], &deployment[..], &["--replicas=2"][..]].concat()).await?;
    step(&format!("operator scaled to 0, then to 2 replicas behind the slow-list proxy at {proxy_addr}"));

    // Poll the kernels until the new operator is ready (its lists done) and both nodes report
    // convergence to it, and a little longer: any change at any moment is a failure.
    let mut changes = Vec::new();
    let mut ready_at: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for (node, old) in nodes.iter().zip(&before) {
            let now = node_state(node)?;
            for (what, text) in &now {
                if old[what] != *text && changes.len() < 20 {
                    changes.push(format!(
                        "[{:>6.1?}] {} {what}:\n{}",
                        t0.elapsed(),
                        node.name,
                        changed_lines(&old[what], text)
                    ));
                }
            }
        }
        let leader = c.operator_leader_metrics_addr().await.ok();
        if let (None, Some(leader)) = (ready_at, leader)
            && http_get(leader.into(), "/readyz").await.is_ok_and(|(code, _)| code == 200)
        {
            ready_at = Some(Instant::now());
            step("the new leader is ready (every kind listed)");
        }
        if ready_at.is_some_and(|at| at.elapsed() > Duration::from_secs(5)) {
            break;
        }
        ensure!(Instant::now() < deadline, "no new leader was ready within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_converged(&c, "networkconfig default to converge 2/2 on the new leader").await?;
    for (node, old) in nodes.iter().zip(&before) {
        let now = node_state(node)?;
        for (what, text) in &now {
            if old[what] != *text {
                changes.push(format!(
                    "after convergence, {} {what}:\n{}",
                    node.name,
                    changed_lines(&old[what], text)
                ));
            }
        }
    }
    let held = proxy.held.load(Ordering::SeqCst);
    ensure!(held >= SLOW_LISTS.len(), "the proxy held only {held} LISTs: the restart was not slowed");
    step(&format!("{held} LISTs held for {LIST_DELAY:?} each"));
    ensure!(
        changes.is_empty(),
        "the nodes' programmed state changed during the restart:\n{}",
        changes.join("\n")
    );
    Ok(())
}
