//! Real nodes: the kubelet and containerd on every node, Weft installed from `config/` as a user
//! installs it (operator Deployment, agent DaemonSet, images from the cluster's registry), and the
//! seeds' lab driven through `kubectl exec` as an admin would. Needs root and `make images`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use weft_e2e::cluster::{Steps, TestCluster, TestOptions, wait_for};

/// The tests share one cluster, and one of them deletes an agent pod: they take turns.
static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(
        TestOptions::default()
            .nodes(2)
            .weft(true)
            .observability(false)
            .weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await
}

/// The lab of the seeds: whoami behind a Service on port 9000, a netshoot pod on `node`.
fn lab(ns: &str, node: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: whoami, namespace: {ns}}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: whoami}}}}
  template:
    metadata: {{labels: {{app: whoami}}}}
    spec:
      containers:
      - name: whoami
        image: traefik/whoami
        ports: [{{containerPort: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: whoami, namespace: {ns}}}
spec:
  selector: {{app: whoami}}
  ports: [{{port: 9000, targetPort: 80}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: net-pod, namespace: {ns}}}
spec:
  nodeName: {node}
  containers:
  - name: netshoot
    image: nicolaka/netshoot
    command: [sleep, infinity]
"#
    )
}

async fn start_lab(c: &TestCluster, ns: &str, node: &str) -> Result<String> {
    c.apply_yaml(&lab(ns, node)).await?;
    c.kubectl(&["-n", ns, "rollout", "status", "deployment/whoami", "--timeout=120s"]).await?;
    c.kubectl(&["-n", ns, "wait", "--for=condition=Ready", "pod/net-pod", "--timeout=120s"]).await?;
    let ip = c.kubectl(&["-n", ns, "get", "service", "whoami", "-o", "jsonpath={.spec.clusterIP}"]).await?;
    Ok(ip.trim().to_string())
}

/// `kubectl exec` in `pod` of `ns`, stdout.
async fn exec(c: &TestCluster, ns: &str, pod: &str, cmd: &[&str]) -> Result<String> {
    let mut args = vec!["-n", ns, "exec", pod, "--"];
    args.extend_from_slice(cmd);
    c.kubectl(&args).await
}

/// Hostname → count from `uniq -c` output.
fn spread(out: &str) -> BTreeMap<String, u32> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let n = f.next()?.parse().ok()?;
            let host = f.last()?.to_string();
            Some((host, n))
        })
        .collect()
}

#[tokio::test]
async fn weft_runs_as_pods_and_the_seed_lab_answers_through_kubectl_exec() -> Result<()> {
    let steps = Steps::new("real_nodes::seed_lab");
    let _turn = TURNS.lock().await;
    let c = cluster().await?;

    steps.step("the agent DaemonSet and the operator Deployment run from the images built here");
    for what in ["daemonset/weft-agent", "deployment/weft-operator"] {
        c.kubectl(&["-n", "weft-system", "rollout", "status", what, "--timeout=120s"]).await?;
    }
    let ds = c
        .kubectl(&[
            "-n",
            "weft-system",
            "get",
            "daemonset",
            "weft-agent",
            "-o",
            "jsonpath={.status.numberReady}",
        ])
        .await?;
    assert_eq!(ds.trim(), "2", "one ready agent per node");
    let deploy = c
        .kubectl(&[
            "-n",
            "weft-system",
            "get",
            "deployment",
            "weft-operator",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ])
        .await?;
    assert_eq!(deploy.trim(), "2", "two operator replicas");
    // Every token Weft's pods hold is projected and short-lived: no legacy token Secret.
    let tokens = c
        .kubectl(&[
            "-n",
            "weft-system",
            "get",
            "secrets",
            "--field-selector",
            "type=kubernetes.io/service-account-token",
            "-o",
            "name",
        ])
        .await?;
    assert!(tokens.trim().is_empty(), "long-lived ServiceAccount tokens in weft-system: {tokens}");
    let images = c
        .kubectl(&[
            "-n",
            "weft-system",
            "get",
            "pods",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[*].imageID}",
        ])
        .await?;
    let images: Vec<&str> = images.split_whitespace().collect();
    assert_eq!(images.len(), 4, "{images:?}");
    assert!(
        images.iter().all(|i| i.starts_with("weft.io/weft-")),
        "pulled through the weft.io mirror: {images:?}"
    );

    let ns = c.namespace("lab").await?;
    let svc = start_lab(&c, &ns, "node-1").await?;

    steps.step("100 requests from net-pod spread over the three whoami pods (kubectl exec)");
    let script =
        format!("for i in {{1..100}}; do curl -s -m 2 {svc}:9000 | grep Hostname; done | sort | uniq -c");
    let out = exec(&c, &ns, "net-pod", &["zsh", "-c", &script]).await?;
    let counts = spread(&out);
    assert_eq!(counts.len(), 3, "every whoami pod answers: {out}");
    assert_eq!(counts.values().sum::<u32>(), 100, "every request answered: {out}");

    steps.step("cluster DNS answers nslookup in the pod");
    let name = format!("whoami.{}.svc.cluster.local", ns.name());
    let out = exec(&c, &ns, "net-pod", &["nslookup", &name]).await?;
    assert!(out.contains(&svc), "{name} resolves to {svc}: {out}");

    steps.step("kubectl logs reads a container's output from its kubelet");
    let pods = c.kubectl(&["-n", &ns, "get", "pods", "-l", "app=whoami", "-o", "name"]).await?;
    let first = pods.lines().next().context("no whoami pod")?;
    let logs = c.kubectl(&["-n", &ns, "logs", first]).await?;
    assert!(logs.contains("Starting up on port 80"), "{logs}");
    Ok(())
}

#[tokio::test]
async fn a_deleted_agent_pod_comes_back_and_traffic_never_stops() -> Result<()> {
    let steps = Steps::new("real_nodes::agent_restart");
    let _turn = TURNS.lock().await;
    let c = cluster().await?;
    let ns = c.namespace("failstatic").await?;
    let svc = start_lab(&c, &ns, "node-2").await?;
    let ips_before =
        c.kubectl(&["-n", &ns, "get", "pods", "-o", "jsonpath={.items[*].status.podIP}"]).await?;
    let agent_on = |node: &'static str| {
        let c = c.clone();
        async move {
            let name = c
                .kubectl(&[
                    "-n",
                    "weft-system",
                    "get",
                    "pods",
                    "-l",
                    "app.kubernetes.io/name=weft-agent",
                    "--field-selector",
                    &format!("spec.nodeName={node}"),
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ])
                .await?;
            Ok::<_, anyhow::Error>(name.trim().to_string())
        }
    };
    let old = agent_on("node-2").await?;
    ensure!(!old.is_empty() && !old.contains(' '), "one agent pod on node-2: {old:?}");

    steps.step("1,000 requests to the ClusterIP from node-2 while node-2's agent pod is deleted");
    let script = format!(
        "n=0; for i in {{1..1000}}; do curl -s -m 2 -o /dev/null -w '%{{http_code}}\\n' {svc}:9000 | grep -q 200 && n=$((n+1)); sleep 0.02; done; echo answered=$n"
    );
    let loop_task = {
        let c = c.clone();
        let ns = ns.to_string();
        tokio::spawn(async move { exec(&c, &ns, "net-pod", &["zsh", "-c", &script]).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kubectl(&["-n", "weft-system", "delete", "pod", &old, "--wait=false"]).await?;
    let new = wait_for("the DaemonSet to recreate node-2's agent", Duration::from_secs(120), || {
        let old = old.clone();
        let c = c.clone();
        async move {
            let name = agent_on("node-2").await?;
            if name.is_empty() || name == old || name.contains(' ') {
                return Ok(None);
            }
            let ready = c
                .kubectl(&[
                    "-n",
                    "weft-system",
                    "get",
                    "pod",
                    &name,
                    "-o",
                    "jsonpath={.status.containerStatuses[0].ready}",
                ])
                .await?;
            Ok((ready.trim() == "true").then_some(name))
        }
    })
    .await?;
    assert_ne!(new, old);
    let out = loop_task.await??;
    assert!(out.contains("answered=1000"), "every request answered during the restart: {out}");

    steps.step("pods keep their addresses");
    let ips_after = c.kubectl(&["-n", &ns, "get", "pods", "-o", "jsonpath={.items[*].status.podIP}"]).await?;
    assert_eq!(ips_before, ips_after);
    Ok(())
}
