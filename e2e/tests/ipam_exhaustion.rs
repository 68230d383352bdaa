//! A node whose pools are out of blocks: the pod that finds no address gets an Event saying why
//! (the runtime's FailedCreatePodSandBox with weft-cni's message), and the pool says Exhausted.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use weft_e2e::cluster::{PodOptions, TestCluster, TestOptions, wait_for};

#[tokio::test]
async fn a_pod_that_finds_no_address_gets_an_event_saying_why() -> Result<()> {
    let c = TestCluster::start(
        TestOptions::default().nodes(1).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    // No more blocks from the default pool; a 4-address pool only for the next node.
    c.kubectl(&["patch", "ippool", "default", "--type", "merge", "-p", r#"{"spec":{"disabled":true}}"#])
        .await?;
    c.apply_yaml(
        r#"
apiVersion: weft.io/v1alpha1
kind: IPPool
metadata:
  name: tiny
spec:
  cidr: 10.250.0.0/30
  blockSize: 30
  nodeSelector:
    matchLabels:
      kubernetes.io/hostname: node-2
"#,
    )
    .await?;
    let node = c.add_node().await?;
    ensure!(node.name == "node-2", "expected node-2, got {}", node.name);
    let ns = c.namespace("exhaust").await?;
    for i in 0..4 {
        c.run_pod(PodOptions::new(&ns, &format!("p{i}")).on_node("node-2")).await?;
    }
    let fifth = PodOptions::new(&ns, "p4").on_node("node-2");
    let pods: Api<Pod> = Api::namespaced(c.client(), &ns);
    pods.create(&PostParams::default(), &fifth.to_pod()).await.context("creating the fifth pod")?;

    let message = wait_for("an Event on the pod that found no address", Duration::from_secs(60), || {
        let c = &c;
        let ns = ns.to_string();
        async move {
            let out = c
                .kubectl(&[
                    "get",
                    "events",
                    "-n",
                    &ns,
                    "--field-selector",
                    "involvedObject.name=p4,reason=FailedCreatePodSandBox",
                    "-o",
                    "jsonpath={.items[*].message}",
                ])
                .await?;
            Ok((!out.trim().is_empty()).then_some(out))
        }
    })
    .await?;
    ensure!(message.contains("10.250.0.0/30") && message.contains("in use"), "the Event says why: {message}");

    wait_for("the tiny pool to say Exhausted", Duration::from_secs(30), || {
        let c = &c;
        async move {
            let out = c
                .kubectl(&[
                    "get",
                    "ippool",
                    "tiny",
                    "-o",
                    r#"jsonpath={.status.conditions[?(@.type=="Exhausted")].status}"#,
                ])
                .await?;
            Ok((out.trim() == "True").then_some(()))
        }
    })
    .await?;
    Ok(())
}
