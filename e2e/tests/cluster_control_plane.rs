//! The local cluster's control plane, checked the way an admin would: `kubectl get --raw /readyz`,
//! the CRDs applied with kubectl, their printer columns and `kubectl explain`, nodes registered
//! with their address and zone, the API server reachable from inside a node. Needs root.

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use weft_e2e::cluster::{TestCluster, TestOptions, repo_root};

/// One control plane for this test binary, with one node.
async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(TestOptions::default().nodes(1).weft_dev(env!("CARGO_BIN_EXE_weft-dev"))).await
}

#[tokio::test]
async fn readyz_prints_ok() -> Result<()> {
    let c = cluster().await?;
    let out = c.kubectl(&["get", "--raw", "/readyz"]).await?;
    assert_eq!(out.trim(), "ok");
    Ok(())
}

#[tokio::test]
async fn a_node_reaches_the_api_server_on_the_bridge_address_as_itself() -> Result<()> {
    let c = cluster().await?;
    let state = c.state();
    let node = state.nodes.first().context("the cluster has no node")?;
    let run = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.netns))
            .arg("--")
            .arg(state.kubectl_bin())
            .arg("--kubeconfig")
            .arg(&node.kubeconfig)
            .args(args);
        cmd
    };
    let out = run(&["get", "--raw", "/readyz"]).output().await?;
    ensure!(out.status.success(), "from {}: {}", node.netns, String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let kubeconfig = std::fs::read_to_string(&node.kubeconfig)?;
    assert!(
        kubeconfig.contains(&format!("server: https://{}:{}", state.bridge_ip, state.ports.apiserver)),
        "the node kubeconfig points at the bridge address:\n{kubeconfig}"
    );
    let who = run(&["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]).output().await?;
    assert_eq!(String::from_utf8_lossy(&who.stdout).trim(), format!("system:node:{}", node.name));
    Ok(())
}

#[tokio::test]
async fn crds_apply_and_ippools_print_their_columns() -> Result<()> {
    let c = cluster().await?;
    let crds = repo_root().join("crds");
    c.kubectl(&["apply", "-f", &crds.to_string_lossy()]).await?;
    c.apply_yaml(
        "apiVersion: weft.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: e2e-columns\n\
         spec:\n  cidr: 10.252.0.0/16\n  disabled: true\n",
    )
    .await?;
    let table = c.kubectl(&["get", "ippools"]).await;
    c.kubectl(&["delete", "ippool", "e2e-columns", "--wait=false"]).await?;
    let table = table?;
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "CIDR", "BLOCK", "NODES", "USED", "FREE", "%USED", "AGE"], "{table}");
    assert!(table.lines().any(|l| l.starts_with("e2e-columns ") && l.contains("10.252.0.0/16")), "{table}");
    Ok(())
}

#[tokio::test]
async fn explain_shows_the_field_descriptions() -> Result<()> {
    let c = cluster().await?;
    let out = c.kubectl(&["explain", "ippool.spec"]).await?;
    assert!(out.contains("KIND:       IPPool"), "{out}");
    assert!(out.contains("cidr\t<string> -required-"), "{out}");
    assert!(out.contains("blockSize\t<integer>"), "{out}");
    assert!(out.contains("The pool's address range"), "the description of spec.cidr is shown:\n{out}");
    Ok(())
}

#[tokio::test]
async fn nodes_register_with_internal_ip_zone_and_ready() -> Result<()> {
    let c = cluster().await?;
    let nodes: Api<Node> = Api::all(c.client());
    for want in c.nodes() {
        let node = nodes.get(&want.name).await?;
        let labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(labels.get("topology.kubernetes.io/zone"), Some(&want.zone));
        let status = node.status.unwrap_or_default();
        let internal: Vec<String> = status
            .addresses
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        assert_eq!(internal, [want.ip.to_string()]);
        let ready = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Ready");
        assert_eq!(ready.map(|r| r.status).as_deref(), Some("True"));
    }
    Ok(())
}
