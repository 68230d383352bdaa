//! Pods on the local cluster with the reference CNI plugins (bridge + host-local + portmap), with
//! real packets: pods reach each other on one node and across nodes, a Service gets its
//! EndpointSlice from the real controller, a Deployment of whoami gets scheduled and answers.
//! Each test works in a namespace of its own on the binary's shared cluster. Needs root.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use weft_e2e::cluster::{PodOptions, TestCluster, TestOptions, wait_for};

async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(TestOptions::default().nodes(2).weft_dev(env!("CARGO_BIN_EXE_weft-dev"))).await
}

fn pod_ip(p: &Pod) -> Result<String> {
    p.status.as_ref().and_then(|s| s.pod_ip.clone()).context("pod without IP")
}

fn whoami(ns: &str, name: &str) -> PodOptions {
    PodOptions::new(ns, name).image("traefik/whoami").port(80)
}

#[tokio::test]
async fn two_pods_on_one_node_reach_each_other() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("same-node").await?;
    let (server, client) = tokio::try_join!(
        c.run_pod(whoami(&ns, "server").on_node("node-1")),
        c.run_pod(PodOptions::new(&ns, "client").on_node("node-1")),
    )?;
    let body = c.curl_from_pod(&ns, "client", &format!("http://{}/", pod_ip(&server)?)).await?;
    assert!(body.contains("Hostname: server"), "{body}");
    assert!(body.contains(&format!("RemoteAddr: {}:", pod_ip(&client)?)), "the source is kept: {body}");
    Ok(())
}

#[tokio::test]
async fn pods_on_different_nodes_reach_each_other() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("cross-node").await?;
    let (server, client) = tokio::try_join!(
        c.run_pod(whoami(&ns, "server").on_node("node-2")),
        c.run_pod(PodOptions::new(&ns, "client").on_node("node-1")),
    )?;
    let body = c.curl_from_pod(&ns, "client", &format!("http://{}/", pod_ip(&server)?)).await?;
    assert!(body.contains("Hostname: server"), "{body}");
    assert!(body.contains(&format!("RemoteAddr: {}:", pod_ip(&client)?)), "no NAT between pods: {body}");
    Ok(())
}

#[tokio::test]
async fn a_service_gets_an_endpointslice_listing_its_pods() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("endpoints").await?;
    let (a, b) = tokio::try_join!(
        c.run_pod(whoami(&ns, "web-a").on_node("node-1").label("app", "web")),
        c.run_pod(whoami(&ns, "web-b").on_node("node-2").label("app", "web")),
    )?;
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: {}\n\
         spec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 80\n",
        ns.name()
    ))
    .await?;
    let want: BTreeSet<String> = [pod_ip(&a)?, pod_ip(&b)?].into();
    let slices: Api<EndpointSlice> = Api::namespaced(c.client(), &ns);
    let slice =
        wait_for("the EndpointSlice of service web to list both pods", Duration::from_secs(60), || {
            let slices = slices.clone();
            let want = want.clone();
            async move {
                let list =
                    slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")).await?;
                Ok(list.items.into_iter().find(|s| {
                    let ready: BTreeSet<String> = s
                        .endpoints
                        .iter()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
                        .flat_map(|e| e.addresses.clone())
                        .collect();
                    ready == want
                }))
            }
        })
        .await?;
    let labels = slice.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("endpointslice.kubernetes.io/managed-by").map(String::as_str),
        Some("endpointslice-controller.k8s.io"),
        "made by kube-controller-manager's EndpointSlice controller"
    );
    let targets: BTreeSet<String> =
        slice.endpoints.iter().filter_map(|e| e.target_ref.as_ref().and_then(|t| t.name.clone())).collect();
    assert_eq!(targets, BTreeSet::from(["web-a".to_string(), "web-b".to_string()]));
    Ok(())
}

#[tokio::test]
async fn a_deployment_of_three_whoami_runs_and_answers_on_its_pod_ips() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("deploy").await?;
    c.apply_yaml(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: whoami\n  namespace: {}\n\
         spec:\n  replicas: 3\n  selector:\n    matchLabels:\n      app: whoami\n  template:\n\
         \x20   metadata:\n      labels:\n        app: whoami\n    spec:\n      containers:\n\
         \x20     - name: whoami\n        image: traefik/whoami\n        ports:\n        - containerPort: 80\n",
        ns.name()
    ))
    .await?;
    let client = c.run_pod(PodOptions::new(&ns, "client")).await?;
    let pods: Api<Pod> = Api::namespaced(c.client(), &ns);
    let running = wait_for("3 whoami replicas to be scheduled and Ready", Duration::from_secs(120), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=whoami")).await?;
            let ready: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| {
                    let s = p.status.as_ref();
                    s.and_then(|s| s.pod_ip.as_ref()).is_some()
                        && s.and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .collect();
            Ok((ready.len() == 3).then_some(ready))
        }
    })
    .await?;
    for p in &running {
        let owner = p.metadata.owner_references.iter().flatten().next().map(|o| o.kind.clone());
        assert_eq!(owner.as_deref(), Some("ReplicaSet"), "created by the ReplicaSet controller");
        let name = p.metadata.name.clone().unwrap_or_default();
        assert!(p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(), "{name} was scheduled");
        let body = c.curl_from_pod(&ns, "client", &format!("http://{}/", pod_ip(p)?)).await?;
        assert!(body.contains(&format!("Hostname: {name}")), "{body}");
        assert!(body.contains(&format!("RemoteAddr: {}:", pod_ip(&client)?)), "{body}");
    }
    Ok(())
}

#[tokio::test]
async fn exec_runs_in_the_pod_with_its_hostname_and_resolv_conf() -> Result<()> {
    let c = cluster().await?;
    let ns = c.namespace("exec").await?;
    c.run_pod(PodOptions::new(&ns, "shell").on_node("node-2")).await?;
    assert_eq!(c.exec_ok(&ns, "shell", &["hostname"]).await?.trim(), "shell");
    let resolv = c.exec_ok(&ns, "shell", &["cat", "/etc/resolv.conf"]).await?;
    assert!(
        resolv.contains(&format!("search {}.svc.cluster.local svc.cluster.local cluster.local", ns.name())),
        "{resolv}"
    );
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    let out = c.exec_in_pod(&ns, "shell", &["sh", "-c", "exit 3"]).await?;
    assert_eq!(out.status.code(), Some(3));
    Ok(())
}
