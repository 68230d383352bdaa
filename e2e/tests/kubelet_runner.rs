//! The pod runner (the local cluster's kubelet) as a cluster admin sees it: env and files in the
//! pod, probes gating Ready, restart policies and terminal phases, unknown images reported,
//! hostNetwork pods, and deletion removing processes, namespace and state. Each test works in a
//! namespace of its own on the binary's shared cluster (reference CNI plugins). Needs root.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use weft_e2e::cluster::{NodeRuntime, PodOptions, TestCluster, TestOptions, wait_for};
use weft_e2e::kubelet::{PodRecord, container_log_path, pod_netns_name};

async fn cluster() -> Result<TestCluster> {
    let opts = TestOptions::default().nodes(2).runtime(NodeRuntime::Runner);
    TestCluster::shared(opts.weft_dev(env!("CARGO_BIN_EXE_weft-dev"))).await
}

fn state_dir(c: &TestCluster, node: &str) -> Result<PathBuf> {
    c.nodes()
        .into_iter()
        .find(|n| n.name == node)
        .map(|n| n.kubelet_state_dir)
        .with_context(|| format!("no node {node}"))
}

async fn get_pod(c: &TestCluster, ns: &str, name: &str) -> Result<Pod> {
    Ok(Api::<Pod>::namespaced(c.client(), ns).get(name).await?)
}

fn condition(p: &Pod, t: &str) -> Option<String> {
    p.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == t).map(|c| c.status.clone())
}

/// Waits until `f(pod)` holds.
async fn wait_pod(
    c: &TestCluster,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(c.client(), ns);
    wait_for(&format!("pod {ns}/{name}: {what}"), timeout, || {
        let api = api.clone();
        let ok = &f;
        async move { Ok(api.get_opt(name).await?.filter(|p| ok(p))) }
    })
    .await
}

#[tokio::test]
async fn env_dns_hosts_hostname_init_and_logs_follow_the_spec() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("kubelet-env").await?;
    let marker = format!("/tmp/weft-kubelet-init-{}", ns.name());
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg, namespace: {ns}}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Pod
metadata: {{name: env, namespace: {ns}, labels: {{app: env}}}}
spec:
  nodeName: node-1
  initContainers:
  - name: init
    image: busybox
    command: ["sh", "-c", "echo from-init > {marker}"]
  containers:
  - name: main
    image: nicolaka/netshoot
    command: ["sh", "-c", "cat {marker}; echo $(GREETING) $(POD_NAME); exec sleep infinity"]
    env:
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: POD_NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
    - {{name: APP, valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['app']"}}}}}}
    - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: cfg, key: greeting}}}}}}
"#,
        ns = ns.name()
    ))
    .await?;
    let pod = c.wait_pod_running(&ns, "env", Duration::from_secs(90)).await?;
    let _ = std::fs::remove_file(&marker);
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).context("no pod IP")?;

    let env =
        c.exec_ok(&ns, "env", &["sh", "-c", "echo $POD_NAME $POD_NS $POD_IP $NODE $APP $GREETING"]).await?;
    assert_eq!(env.trim(), format!("env {} {ip} node-1 env hello", ns.name()));
    assert!(
        c.exec_ok(&ns, "env", &["sh", "-c", "echo $KUBERNETES_SERVICE_HOST"])
            .await?
            .trim()
            .starts_with("10.96.")
    );

    let resolv = c.exec_ok(&ns, "env", &["cat", "/etc/resolv.conf"]).await?;
    assert_eq!(
        resolv,
        format!(
            "search {}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
            ns.name()
        )
    );
    assert_eq!(c.exec_ok(&ns, "env", &["hostname"]).await?.trim(), "env");
    let hosts = c.exec_ok(&ns, "env", &["cat", "/etc/hosts"]).await?;
    assert!(hosts.contains(&format!("{ip}\tenv\n")), "{hosts}");

    let log = container_log_path(&state_dir(&c, "node-1")?, &ns, "env", "main");
    let text = wait_for("the container's log", Duration::from_secs(10), || {
        let log = log.clone();
        async move { Ok(std::fs::read_to_string(&log).ok().filter(|t| t.contains("hello env"))) }
    })
    .await?;
    assert!(text.starts_with("from-init\n"), "init ran first: {text}");

    let status = pod.status.context("no status")?;
    assert_eq!(status.host_ip.as_deref(), c.nodes().first().map(|n| n.ip.to_string()).as_deref());
    let init = status.init_container_statuses.unwrap_or_default();
    let done = init.first().and_then(|s| s.state.as_ref()).and_then(|s| s.terminated.as_ref());
    assert_eq!(done.map(|t| t.exit_code), Some(0));
    Ok(())
}

#[tokio::test]
async fn readiness_probe_gates_ready() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("kubelet-ready").await?;
    let flag = format!("/tmp/weft-kubelet-ready-{}", ns.name());
    let _ = std::fs::remove_file(&flag);
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: gated, namespace: {ns}}}
spec:
  nodeName: node-2
  containers:
  - name: web
    image: traefik/whoami
    readinessProbe:
      exec: {{command: ["test", "-e", "{flag}"]}}
      periodSeconds: 1
  - name: http
    image: busybox
    readinessProbe:
      httpGet: {{path: /health, port: 80}}
      periodSeconds: 1
"#,
        ns = ns.name()
    ))
    .await?;
    wait_pod(&c, &ns, "gated", "Running", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = get_pod(&c, &ns, "gated").await?;
    assert_eq!(condition(&p, "Ready").as_deref(), Some("False"), "not ready before the probe passes");
    let statuses = p.status.and_then(|s| s.container_statuses).unwrap_or_default();
    let ready: Vec<(String, bool)> = statuses.iter().map(|s| (s.name.clone(), s.ready)).collect();
    assert_eq!(ready, [("web".to_string(), false), ("http".to_string(), true)]);

    std::fs::write(&flag, "")?;
    let res = wait_pod(&c, &ns, "gated", "Ready", Duration::from_secs(30), |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await;
    let _ = std::fs::remove_file(&flag);
    res?;
    Ok(())
}

#[tokio::test]
async fn restart_policies_and_terminal_phases() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("kubelet-restart").await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: crash, namespace: {ns}}}
spec:
  nodeName: node-1
  restartPolicy: OnFailure
  containers:
  - {{name: c, image: alpine, command: ["sh", "-c", "exit 3"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ok, namespace: {ns}}}
spec:
  nodeName: node-1
  restartPolicy: Never
  containers:
  - {{name: c, image: busybox, command: ["true"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: fails, namespace: {ns}}}
spec:
  nodeName: node-2
  restartPolicy: Never
  containers:
  - {{name: c, image: ubuntu, command: ["sh", "-c", "exit 7"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: missing, namespace: {ns}}}
spec:
  nodeName: node-2
  restartPolicy: Never
  containers:
  - {{name: c, image: debian, command: ["no-such-command-weft"]}}
"#,
        ns = ns.name()
    ))
    .await?;
    let phase =
        |want: &'static str| move |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(want);
    let ok = wait_pod(&c, &ns, "ok", "Succeeded", Duration::from_secs(60), phase("Succeeded")).await?;
    let fails = wait_pod(&c, &ns, "fails", "Failed", Duration::from_secs(60), phase("Failed")).await?;
    let missing = wait_pod(&c, &ns, "missing", "Failed", Duration::from_secs(60), phase("Failed")).await?;
    let crash = wait_pod(&c, &ns, "crash", "restarted twice", Duration::from_secs(60), |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .is_some_and(|cs| cs.restart_count >= 2)
    })
    .await?;

    let term = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|cs| cs.state.clone())
            .and_then(|s| s.terminated)
    };
    assert_eq!(term(&ok).map(|t| (t.exit_code, t.reason)), Some((0, Some("Completed".into()))));
    assert_eq!(term(&fails).map(|t| t.exit_code), Some(7));
    let start_error = term(&missing).context("missing: not terminated")?;
    assert_eq!(start_error.reason.as_deref(), Some("StartError"));
    assert!(start_error.message.unwrap_or_default().contains("no-such-command-weft"));
    let cs = crash
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|cs| cs.into_iter().next())
        .context("no container status")?;
    assert_eq!(crash.metadata.name.as_deref(), Some("crash"));
    let last = cs.last_state.and_then(|s| s.terminated).context("no last state")?;
    assert_eq!(last.exit_code, 3);

    // A finished pod releases its network namespace.
    for p in [&ok, &fails] {
        let netns = pod_netns_name(p.metadata.uid.as_deref().unwrap_or_default());
        wait_for(&format!("{netns} to be removed"), Duration::from_secs(15), || {
            let path = PathBuf::from("/run/netns").join(&netns);
            async move { Ok((!path.exists()).then_some(())) }
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_unknown_image_is_reported_not_faked() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("kubelet-image").await?;
    let pods: Api<Pod> = Api::namespaced(c.client(), &ns);
    pods.create(
        &Default::default(),
        &PodOptions::new(&ns, "nginx").on_node("node-1").image("nginx:1.27").to_pod(),
    )
    .await?;
    let p = wait_pod(&c, &ns, "nginx", "ImageNotSupported", Duration::from_secs(60), |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|cs| cs.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            == Some("ImageNotSupported")
    })
    .await?;
    let status = p.status.context("no status")?;
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let msg = status
        .container_statuses
        .and_then(|cs| cs.into_iter().next())
        .and_then(|cs| cs.state)
        .and_then(|s| s.waiting)
        .and_then(|w| w.message)
        .unwrap_or_default();
    assert!(msg.contains("nginx:1.27") && msg.contains("traefik/whoami"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn a_host_network_pod_runs_in_the_node_namespace() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("kubelet-hostnet").await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: hostnet, namespace: {ns}}}
spec:
  nodeName: node-2
  hostNetwork: true
  containers:
  - {{name: w, image: traefik/whoami, args: ["--port", "18081"]}}
"#,
        ns = ns.name()
    ))
    .await?;
    let (p, _) = tokio::try_join!(
        c.wait_pod_running(&ns, "hostnet", Duration::from_secs(60)),
        c.run_pod(PodOptions::new(&ns, "client").on_node("node-1")),
    )?;
    let node_ip = c.nodes().into_iter().find(|n| n.name == "node-2").context("node-2")?.ip.to_string();
    assert_eq!(p.status.and_then(|s| s.pod_ip).as_deref(), Some(node_ip.as_str()));
    let body = wait_for("whoami on the node address", Duration::from_secs(20), || {
        let (c, ns, url) = (c.clone(), ns.name().to_string(), format!("http://{node_ip}:18081/"));
        async move { Ok(Some(c.curl_from_pod(&ns, "client", &url).await?)) }
    })
    .await?;
    assert!(body.contains("Hostname: node-2"), "{body}");
    assert!(body.contains(&format!("IP: {node_ip}\n")), "{body}");
    Ok(())
}

#[tokio::test]
async fn deletion_stops_the_processes_and_removes_the_sandbox() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("kubelet-delete").await?;
    c.apply_yaml(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: victim, namespace: {ns}}}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 5
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & while true; do sleep 0.2; done"]
"#,
        ns = ns.name()
    ))
    .await?;
    let pod = c.wait_pod_running(&ns, "victim", Duration::from_secs(60)).await?;
    let dir = state_dir(&c, "node-1")?;
    let record_path = dir.join("pods").join(format!("{}_victim.json", ns.name()));
    let rec: PodRecord = serde_json::from_slice(&std::fs::read(&record_path)?)?;
    let pid = rec.processes.get("c").context("no recorded process")?.pid;
    let netns =
        PathBuf::from("/run/netns").join(pod_netns_name(pod.metadata.uid.as_deref().unwrap_or_default()));
    assert!(netns.exists());
    assert!(PathBuf::from(format!("/proc/{pid}")).exists());

    let started = std::time::Instant::now();
    c.kubectl(&["delete", "pod", "victim", "-n", &ns, "--timeout=60s"]).await?;
    assert!(started.elapsed() < Duration::from_secs(5), "TERM handled, no need to wait the grace period");
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.trim_start().starts_with('Z')))
    };
    if alive(pid) {
        bail!("container process {pid} survived the deletion");
    }
    assert!(!netns.exists(), "{} left behind", netns.display());
    assert!(!record_path.exists(), "{} left behind", record_path.display());
    assert!(!dir.join("pods").join(format!("{}_victim", ns.name())).exists());
    // The whole process group went, the background `sleep 1000` included (zombies waiting for
    // their new parent to reap them do not count).
    let group = wait_for("the container's process group to be gone", Duration::from_secs(5), || async move {
        let out = std::process::Command::new("pgrep").args(["-g", &pid.to_string()]).output()?;
        let left: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| alive(*p))
            .collect();
        Ok(left.is_empty().then_some(()))
    })
    .await;
    group?;
    Ok(())
}
