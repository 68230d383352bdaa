//! NetworkPolicy end to end, run by `network_policy.rs` (nftables proxy) and
//! `network_policy_iptables.rs` (iptables proxy), each on a shared cluster of its own (2 nodes,
//! `--cni weft`, Weft on). What the upstream suites (`make conformance`) do not check:
//!
//! - a policy admitting `role=friend` on TCP 80 to `app=web`: a stranger pod is refused on the
//!   pod IP and the ClusterIP (the verdict comes after the proxy's DNAT), friends are let in on
//!   those and on a NodePort, an outside host is refused on the NodePort until an ipBlock names
//!   it; the web pod's node reports the policy in its agent's metrics;
//! - kubelet probes keep a pod Ready under a namespace's default deny (node traffic is never
//!   judged);
//! - a new pod under an egress deny-all is isolated from its first packet: it starts connecting
//!   at once and must never get through (the CNI ADD returns only once its policy is enforced).

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use weft_e2e::cluster::{
    AGENT_METRICS_PORT, OutsideHost, PodOptions, Steps, TestCluster, TestOptions, metric_value, metrics_text,
};

pub fn options() -> TestOptions {
    TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev"))
}

/// The including test binary's shared cluster, with the proxy in `mode` on every agent.
pub async fn cluster_in_mode(
    mode: &'static str,
    switched: &tokio::sync::OnceCell<()>,
) -> Result<TestCluster> {
    let c = TestCluster::shared(options()).await?;
    switched.get_or_try_init(|| c.use_proxy_mode(mode)).await?;
    Ok(c)
}

/// How long a policy change may take to show (the programming latency is measured, not bounded,
/// in docs/PERFORMANCE.md).
const WAIT: Duration = Duration::from_secs(30);

/// Whether an HTTP GET of `url` from the pod succeeds within 2 s.
async fn gets(c: &TestCluster, ns: &str, pod: &str, url: &str) -> Result<bool> {
    let out = c.exec_in_pod(ns, pod, &["curl", "-sS", "-o", "/dev/null", "--max-time", "2", url]).await?;
    Ok(out.status.success())
}

async fn outside_gets(outside: &OutsideHost, url: &str) -> Result<bool> {
    Ok(outside.run("curl", &["-sS", "-o", "/dev/null", "--max-time", "2", url]).await?.status.success())
}

/// Waits until each `(pod, url)` reaches or not, as `want` says; the error names the checks
/// that still disagree.
async fn expect(c: &TestCluster, ns: &str, what: &str, checks: &[(&str, &str, bool)]) -> Result<()> {
    let wrong = std::sync::Mutex::new(Vec::new());
    let waited = c
        .wait_for(what, WAIT, || async {
            let mut now = Vec::new();
            for (pod, url, want) in checks {
                if gets(c, ns, pod, url).await? != *want {
                    now.push(format!("{pod} → {url} should {}", if *want { "pass" } else { "be refused" }));
                }
            }
            let done = now.is_empty();
            *wrong.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = now;
            Ok(done.then_some(()))
        })
        .await;
    waited.with_context(|| {
        format!("still wrong: {:?}", wrong.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    })
}

pub async fn peers_ports_cluster_ip_and_node_port(c: &TestCluster) -> Result<()> {
    let steps = Steps::new("netpol-peers");
    let ns = c.namespace("np").await?;
    let ns = ns.name();
    let nodes = c.nodes();
    let (web_node, other) = (&nodes[0], &nodes[1]);
    c.run_pod(
        PodOptions::new(ns, "web")
            .image("traefik/whoami")
            .port(80)
            .label("app", "web")
            .on_node(&web_node.name),
    )
    .await?;
    c.run_pod(PodOptions::new(ns, "friend").label("role", "friend").on_node(&other.name)).await?;
    c.run_pod(PodOptions::new(ns, "stranger").on_node(&other.name)).await?;
    // A NodePort client on another node arrives masqueraded to that node's address (its pod
    // traffic leaves the pod network): the same-node friend shows the NodePort verdict.
    c.run_pod(PodOptions::new(ns, "friend-here").label("role", "friend").on_node(&web_node.name)).await?;
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  type: NodePort\n  selector: {{app: web}}\n  ports: [{{port: 8080, targetPort: 80}}]\n"
    ))
    .await?;
    let pod_ip = c.pod_ip(ns, "web").await?;
    let cluster_ip =
        c.kubectl(&["-n", ns, "get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"]).await?;
    let node_port =
        c.kubectl(&["-n", ns, "get", "service", "web", "-o", "jsonpath={.spec.ports[0].nodePort}"]).await?;
    let by_pod = format!("http://{pod_ip}/");
    let by_service = format!("http://{cluster_ip}:8080/");
    // The web pod's own node: DNAT there, and the verdict before any masquerade.
    let by_node_port = format!("http://{}:{node_port}/", web_node.ip);
    let outside = OutsideHost::start(c, 3)?;

    steps.step("no policy: everyone reaches web");
    expect(
        c,
        ns,
        "the stranger to reach web three ways",
        &[("stranger", &by_pod, true), ("stranger", &by_service, true), ("friend-here", &by_node_port, true)],
    )
    .await?;
    ensure!(outside_gets(&outside, &by_node_port).await?, "the outside host reaches the NodePort");

    steps.step("web admits role=friend on TCP 80 only");
    let policy = |extra: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: {ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n\
             \x20 - from: [{{podSelector: {{matchLabels: {{role: friend}}}}}}{extra}]\n\
             \x20   ports: [{{protocol: TCP, port: 80}}]\n"
        )
    };
    c.apply_yaml(&policy("")).await?;
    expect(
        c,
        ns,
        "the stranger refused and the friend let in, by pod IP, ClusterIP and NodePort",
        &[
            ("stranger", &by_pod, false),
            ("stranger", &by_service, false),
            ("friend", &by_pod, true),
            ("friend", &by_service, true),
            ("friend-here", &by_node_port, true),
        ],
    )
    .await?;
    ensure!(!outside_gets(&outside, &by_node_port).await?, "the outside host is refused on the NodePort");

    steps.step("an ipBlock admits the outside host");
    c.apply_yaml(&policy(&format!(", {{ipBlock: {{cidr: {}/32}}}}", outside.ip()))).await?;
    c.wait_for("the outside host to reach the NodePort", WAIT, || async {
        Ok(outside_gets(&outside, &by_node_port).await?.then_some(()))
    })
    .await?;
    ensure!(!gets(c, ns, "stranger", &by_service).await?, "the stranger is still refused");

    steps.step("the web pod's agent reports what it enforces");
    let metrics = metrics_text(std::net::SocketAddr::new(web_node.ip.into(), AGENT_METRICS_PORT)).await?;
    let enforced = metric_value(&metrics, "weft_agent_policy_policies").context("no policy gauge")?;
    let isolated =
        metric_value(&metrics, "weft_agent_policy_isolated_pods").context("no isolated-pods gauge")?;
    ensure!(enforced >= 1.0 && isolated >= 1.0, "policies {enforced}, isolated pods {isolated}");
    let record = c.programmed(&web_node.name, "policy").await?;
    ensure!(record.contains(&format!("pod {ns}/web ingress [{ns}/web]")), "{record}");

    steps.step("the policy goes: the stranger is back");
    c.kubectl(&["-n", ns, "delete", "networkpolicy", "web"]).await?;
    expect(c, ns, "the stranger to reach web again", &[("stranger", &by_service, true)]).await?;
    Ok(())
}

pub async fn kubelet_probes_pass_a_default_deny(c: &TestCluster) -> Result<()> {
    let ns = c.namespace("np-probe").await?;
    let ns = ns.name();
    c.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny-all, namespace: {ns}}}\n\
         spec: {{podSelector: {{}}, policyTypes: [Ingress, Egress]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: probed, namespace: {ns}}}\n\
         spec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: traefik/whoami\n\
         \x20   readinessProbe: {{httpGet: {{path: /, port: 80}}, periodSeconds: 1}}\n\
         \x20   livenessProbe: {{tcpSocket: {{port: 80}}, periodSeconds: 1}}\n"
    ))
    .await?;
    c.wait_pod_running(ns, "probed", Duration::from_secs(90)).await?;
    // Ready, and still Ready (and never restarted) a few probe periods later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = c
        .kubectl(&[
            "-n",
            ns,
            "get",
            "pod",
            "probed",
            "-o",
            "jsonpath={.status.containerStatuses[0].ready} {.status.containerStatuses[0].restartCount}",
        ])
        .await?;
    ensure!(status.trim() == "true 0", "probed pod under default deny: ready/restarts = {status}");
    Ok(())
}

pub async fn a_new_pod_is_isolated_from_its_first_packet(c: &TestCluster) -> Result<()> {
    let ns = c.namespace("np-first").await?;
    let ns = ns.name();
    let node = c.nodes()[0].name.clone();
    c.run_pod(PodOptions::new(ns, "web").image("traefik/whoami").port(80).label("app", "web").on_node(&node))
        .await?;
    let web = c.pod_ip(ns, "web").await?;
    c.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: no-egress, namespace: {ns}}}\n\
         spec: {{podSelector: {{matchLabels: {{app: newcomer}}}}, policyTypes: [Egress]}}\n"
    ))
    .await?;
    // The web pod keeps answering others: the policy isolates the newcomers only.
    c.run_pod(PodOptions::new(ns, "probe").on_node(&node)).await?;
    ensure!(gets(c, ns, "probe", &format!("http://{web}/")).await?, "web answers an unpoliced pod");
    // Each newcomer tries from the moment its container starts, 20 times 0.1 s apart; a single
    // answer is a leak.
    let script = format!(
        "for i in $(seq 1 20); do curl -s -o /dev/null --max-time 1 http://{web}/ && echo LEAK; sleep 0.1; done; \
         echo DONE; sleep infinity"
    );
    for i in 0..3 {
        let name = format!("newcomer-{i}");
        c.run_pod(
            PodOptions::new(ns, &name)
                .label("app", "newcomer")
                .on_node(&node)
                .command(&["sh", "-c", &script]),
        )
        .await?;
    }
    for i in 0..3 {
        let name = format!("newcomer-{i}");
        let logs = c
            .wait_for(&format!("{name} to finish trying"), Duration::from_secs(60), || async {
                let logs = c.kubectl(&["-n", ns, "logs", &name]).await?;
                Ok(logs.contains("DONE").then_some(logs))
            })
            .await?;
        ensure!(!logs.contains("LEAK"), "{name} reached web before its policy held: {logs}");
    }
    Ok(())
}

/// One `#[tokio::test]` per scenario, each on the including test binary's `cluster()`.
macro_rules! tests {
    ($($scenario:ident),* $(,)?) => {
        $(#[tokio::test]
        async fn $scenario() -> anyhow::Result<()> {
            network_policy_scenarios::$scenario(&cluster().await?).await
        })*
    };
}

pub(crate) use tests;
