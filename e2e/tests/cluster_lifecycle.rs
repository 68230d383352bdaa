//! A test cluster of its own comes up, grows a node, and leaves nothing behind when it is dropped
//! — also when the test holding it panics. Needs root.

use std::path::Path;

use anyhow::{Result, bail};
use weft_e2e::cluster::{ClusterState, NodeRuntime, PodOptions, ProcRecord, TestCluster, TestOptions};

fn leftovers_of(state: &ClusterState) -> Vec<String> {
    let mut left = Vec::new();
    let prefix = format!("weft-{}-", state.name);
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            left.push(format!("network namespace {name}"));
        }
    }
    if Path::new("/sys/class/net").join(&state.bridge).exists() {
        left.push(format!("bridge {}", state.bridge));
    }
    for n in &state.nodes {
        if Path::new("/sys/class/net").join(&n.veth).exists() {
            left.push(format!("veth {}", n.veth));
        }
    }
    let alive: Vec<&ProcRecord> = state.processes.iter().filter(|p| p.is_alive()).collect();
    left.extend(alive.iter().map(|p| format!("process {} ({})", p.name, p.pid)));
    if ClusterState::state_file(&state.dir).exists() {
        left.push(format!("{}", ClusterState::state_file(&state.dir).display()));
    }
    left
}

#[tokio::test]
async fn a_cluster_grows_a_node_and_is_gone_after_a_panic() -> Result<()> {
    // On the pod runner: the check follows the pod's own network namespace, which on real nodes
    // lives in containerd's mount namespace, out of the test's sight.
    let opts = TestOptions::default().runtime(NodeRuntime::Runner).nodes(1).apply_crds(false);
    let opts = opts.weft_dev(env!("CARGO_BIN_EXE_weft-dev"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let c = TestCluster::start(opts).await?;
        let node = c.add_node().await?;
        assert_eq!(node.name, "node-2");
        assert_eq!(node.zone, "zone-b");
        let ns = c.namespace("lifecycle").await?;
        let pod = c.run_pod(PodOptions::new(&ns, "idle").on_node("node-2")).await?;
        let pod_netns = weft_e2e::kubelet::pod_netns_name(pod.metadata.uid.as_deref().unwrap_or_default());
        assert!(Path::new("/run/netns").join(&pod_netns).exists());
        let _ = tx.send((c.state(), pod_netns));
        // What a failing test does: the cluster is dropped while unwinding.
        panic!("a deliberate panic with the cluster in scope");
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    });
    let joined = test.await;
    let Ok((state, pod_netns)) = rx.await else {
        // The test failed before the deliberate panic: report why.
        return match joined {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => bail!("the test task ended without reporting"),
            Err(e) => Err(e.into()),
        };
    };
    assert!(joined.is_err_and(|e| e.is_panic()), "the task panicked");
    assert!(!Path::new("/run/netns").join(&pod_netns).exists(), "pod namespace {pod_netns} is gone");
    assert_eq!(state.nodes.len(), 2);
    let left = leftovers_of(&state);
    assert!(left.is_empty(), "left behind by cluster {}: {left:?}", state.name);
    Ok(())
}
