//! A test cluster of its own comes up, grows a node, and leaves nothing behind when it is dropped
//! — also when the test holding it panics: no namespace, link, process or node cgroup (where the
//! containers ran). Needs root.

use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{ClusterState, PodOptions, ProcRecord, TestCluster, TestOptions, node_cgroups};

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
        // Containers (and their network namespaces, mounts) live under the node's cgroup.
        left.extend(node_cgroups(state, n).iter().map(|g| format!("cgroup {}", g.display())));
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
    let opts = TestOptions::default().nodes(1).apply_crds(false).weft_dev(env!("CARGO_BIN_EXE_weft-dev"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let c = TestCluster::start(opts).await?;
        let node = c.add_node().await?;
        assert_eq!(node.name, "node-2");
        assert_eq!(node.zone, "zone-b");
        let ns = c.namespace("lifecycle").await?;
        let pod = c.run_pod(PodOptions::new(&ns, "idle").on_node("node-2")).await?;
        let node2 = c.state().node("node-2").cloned().context("no node-2")?;
        assert!(!node_cgroups(&c.state(), &node2).is_empty(), "node-2's containers have a cgroup");
        ensure!(pod.status.and_then(|s| s.pod_ip).is_some(), "the pod runs with an address");
        let _ = tx.send(c.state());
        // What a failing test does: the cluster is dropped while unwinding.
        panic!("a deliberate panic with the cluster in scope");
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    });
    let joined = test.await;
    let Ok(state) = rx.await else {
        // The test failed before the deliberate panic: report why.
        return match joined {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => bail!("the test task ended without reporting"),
            Err(e) => Err(e.into()),
        };
    };
    assert!(joined.is_err_and(|e| e.is_panic()), "the task panicked");
    assert_eq!(state.nodes.len(), 2);
    let left = leftovers_of(&state);
    assert!(left.is_empty(), "left behind by cluster {}: {left:?}", state.name);
    Ok(())
}
