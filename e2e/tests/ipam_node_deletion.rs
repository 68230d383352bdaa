//! A deleted Node's IPBlock is not handed to another node while the deleted node may still use it:
//! a node deleted and re-registered with a live pod keeps its block, and no address is ever on two
//! pods. Once the node is gone for good (past the grace, no pod holding an address in the block),
//! the block goes to the node that was waiting for one.
//!
//! The pool has a single block, so the node added second (node-3) waits for exactly the block of
//! the deleted node (node-2). Before the grace existed, the operator deleted node-2's block at
//! once and node-3's waiting pod got node-2's live pod's address.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use weft_api::v1alpha1 as api;
use weft_e2e::cluster::{PodOptions, Steps, TestCluster, TestOptions, wait_for};

const GRACE_SECONDS: u64 = 20;
const BLOCK: &str = "10.250.0.0/30";

/// Who holds the pool's block now (None while nobody does).
async fn block_holder(blocks: &Api<api::IPBlock>) -> Result<Option<String>> {
    let list = blocks.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().find(|b| b.spec.cidr == BLOCK).map(|b| b.spec.node))
}

/// The address of every pod of `ns` that has one, failing when two pods share one.
async fn pod_addresses(pods: &Api<Pod>) -> Result<BTreeMap<String, Ipv4Addr>> {
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for pod in pods.list(&ListParams::default()).await?.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) else { continue };
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("pod {name} has address {ip}"))?;
        if let Some(other) = seen.insert(ip, name.clone()) {
            bail!("{ip} is on two pods: {other} and {name}");
        }
        out.insert(name, ip);
    }
    Ok(out)
}

/// For `period`, polls every 300 ms that node-2 holds the block and no address is on two pods.
async fn hold_for(
    period: Duration,
    blocks: &Api<api::IPBlock>,
    pods: &Api<Pod>,
    p0_ip: Ipv4Addr,
) -> Result<()> {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let holder = block_holder(blocks).await?;
        ensure!(holder.as_deref() == Some("node-2"), "block {BLOCK} is held by {holder:?}, not node-2");
        let addresses = pod_addresses(pods).await?;
        ensure!(addresses.get("p0") == Some(&p0_ip), "p0's address changed: {addresses:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_deleted_nodes_block_goes_to_another_node_only_once_the_node_is_gone_for_good() -> Result<()> {
    let steps = Steps::new("ipam_node_deletion");
    let step = |s: &str| steps.step(s);
    let c = TestCluster::start(
        TestOptions::default().nodes(1).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    // The operator under test with a short grace (the default is 300 s).
    // One control-plane node holds one replica (the second, kept off node-1 by anti-affinity,
    // would stay Pending and stall every rollout): as an admin of such a cluster runs it.
    c.kubectl(&["-n", "weft-system", "scale", "deployment/weft-operator", "--replicas=1"]).await?;
    let grace = GRACE_SECONDS.to_string();
    c.set_operator_env(&[("WEFT_BLOCK_RELEASE_GRACE_SECONDS", &grace)]).await?;
    // node-1 keeps its default block; new nodes get blocks only from the one-block pool.
    c.kubectl(&["patch", "ippool", "default", "--type", "merge", "-p", r#"{"spec":{"disabled":true}}"#])
        .await?;
    c.apply_yaml(&format!(
        "apiVersion: weft.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: tiny\nspec:\n  cidr: {BLOCK}\n  blockSize: 30\n"
    ))
    .await?;
    let node2 = c.add_node().await?;
    ensure!(node2.name == "node-2", "expected node-2, got {}", node2.name);
    let ns = c.namespace("ipam-gone").await?;
    let p0 = c.run_pod(PodOptions::new(&ns, "p0").on_node("node-2")).await?;
    let p0_ip: Ipv4Addr = p0.status.and_then(|s| s.pod_ip).context("p0 has no address")?.parse()?;
    let blocks: Api<api::IPBlock> = Api::all(c.client());
    ensure!(block_holder(&blocks).await?.as_deref() == Some("node-2"), "node-2 holds {BLOCK}");
    step(&format!("p0 on node-2 has {p0_ip} from {BLOCK}"));

    // node-3 finds no free block; its pod waits for an address.
    let node3 = c.add_node().await?;
    ensure!(node3.name == "node-3", "expected node-3, got {}", node3.name);
    let pods: Api<Pod> = Api::namespaced(c.client(), &ns);
    pods.create(&PostParams::default(), &PodOptions::new(&ns, "p1").on_node("node-3").to_pod()).await?;

    // Deleted: node-2 keeps its block through the grace; p1 gets no address of it.
    c.kubectl(&["delete", "node", "node-2", "--wait=false"]).await?;
    step("Node node-2 deleted");
    hold_for(Duration::from_secs(GRACE_SECONDS / 2), &blocks, &pods, p0_ip).await?;
    step("node-2 kept its block through half the grace");

    // Re-registered under its name (as a replaced kubelet would): it keeps its block past the grace.
    c.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-2\n  labels:\n    kubernetes.io/hostname: node-2\n",
    )
    .await?;
    step("Node node-2 registered again");
    hold_for(Duration::from_secs(GRACE_SECONDS + 5), &blocks, &pods, p0_ip).await?;
    step("node-2 still holds its block past the grace, p0 its address");

    // Gone for good: its pod first, then the Node. After the grace the block goes to node-3.
    c.kubectl(&["delete", "pod", "-n", &ns, "p0", "--wait=true", "--timeout=60s"]).await?;
    c.kubectl(&["delete", "node", "node-2", "--wait=false"]).await?;
    let gone = Instant::now();
    step("p0 and Node node-2 deleted");
    wait_for("node-3 to hold the block", Duration::from_secs(GRACE_SECONDS + 60), || {
        let blocks = blocks.clone();
        async move { Ok((block_holder(&blocks).await?.as_deref() == Some("node-3")).then_some(())) }
    })
    .await?;
    let waited = gone.elapsed();
    ensure!(
        waited >= Duration::from_secs(GRACE_SECONDS),
        "the block moved {waited:?} after node-2 was deleted, before the {GRACE_SECONDS} s grace"
    );
    step(&format!("node-3 holds {BLOCK} {waited:.1?} after node-2 went"));
    let p1 = c.wait_pod_running(&ns, "p1", Duration::from_secs(90)).await?;
    let p1_ip: Ipv4Addr = p1.status.and_then(|s| s.pod_ip).context("p1 has no address")?.parse()?;
    ensure!(p1_ip.octets()[..3] == [10, 250, 0] && p1_ip.octets()[3] < 4, "p1's {p1_ip} is not from {BLOCK}");
    pod_addresses(&pods).await?;
    step(&format!("p1 on node-3 runs with {p1_ip}"));
    Ok(())
}
