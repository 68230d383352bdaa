//! Pod start on real nodes (kubelet + containerd): `--pods` pods created at once on one node,
//! each timed from its create request to the moment the API server shows it Ready, with Weft
//! (installed from its images, weft-cni) and with the reference `bridge` + `host-local` plugins,
//! in the same run (a 2-node cluster of its own per CNI; the pods go on node-2). Each CNI ADD is
//! timed as containerd makes it: a wrapper per plugin in the node's CNI timing directory (which
//! containerd searches first) runs the real plugin and logs its start and end; a pod's ADD is the
//! sum over its chain (IPAM and loopback calls left out: they run inside or beside it in both).
//! Root; `make images` and `cargo build --workspace --bins` first.
//! Usage: `weft-bench-pods [--pods 100] [--rounds 2]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use weft_e2e::cluster::{CNI_TIMING_DIR, PAUSE_IMAGE, TestCluster, TestOptions, host_path, wait_for};

#[derive(Parser, Debug)]
struct Args {
    /// Pods per round, all on one node.
    #[arg(long, default_value_t = 100)]
    pods: u32,
    /// Rounds per CNI (the pods are deleted between rounds).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cni {
    Weft,
    Reference,
}

impl Cni {
    fn name(self) -> &'static str {
        match self {
            Cni::Weft => "weft-cni",
            Cni::Reference => "bridge + host-local",
        }
    }
}

/// What containerd calls, wrapped: the pod network plugins and what they call.
const WRAPPED: [&str; 5] = ["weft-cni", "bridge", "host-local", "portmap", "loopback"];
/// Calls made inside or beside a pod network plugin's ADD, not part of its chain.
const NOT_IN_CHAIN: [&str; 2] = ["host-local", "loopback"];

/// A wrapper that runs the real plugin (stdin, stdout and exit code passed through) and logs
/// `name command container start_ns end_ns rc`.
fn wrapper() -> String {
    format!(
        r#"#!/bin/sh
# weft-bench-pods: times one CNI plugin call as containerd makes it.
name=${{0##*/}}
for dir in /opt/cni/bin {reference}; do
  if [ -x "$dir/$name" ]; then real="$dir/$name"; break; fi
done
start=$(date +%s%N)
"$real"
rc=$?
end=$(date +%s%N)
echo "$name ${{CNI_COMMAND:-?}} ${{CNI_CONTAINERID:-?}} $start $end $rc" >> {timing}/calls.log
exit $rc
"#,
        reference = weft_e2e::cluster::REFERENCE_CNI_BIN_DIR,
        timing = CNI_TIMING_DIR,
    )
}

fn install_wrappers(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    for name in WRAPPED {
        let path = dir.join(name);
        std::fs::write(&path, wrapper())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Each sandbox's ADD through its chain, in milliseconds, from the wrappers' log.
fn chain_adds(log: &str) -> Vec<f64> {
    let mut per_container: BTreeMap<&str, f64> = BTreeMap::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, "ADD", container, start, end, "0"] = f.as_slice() else { continue };
        if NOT_IN_CHAIN.contains(name) {
            continue;
        }
        let (Ok(start), Ok(end)) = (start.parse::<u64>(), end.parse::<u64>()) else { continue };
        *per_container.entry(container).or_default() += end.saturating_sub(start) as f64 / 1e6;
    }
    per_container.into_values().collect()
}

fn pod(namespace: &str, name: &str, node: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": "bench-pods" } },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{ "name": "pause", "image": PAUSE_IMAGE }],
        },
    }))?)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One round: `count` pods created at once; each one's create → Ready, and the whole batch's.
async fn round(api: &Api<Pod>, ns: &str, node: &str, count: u32, tag: u32) -> Result<(Vec<f64>, Duration)> {
    let ready_at: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watch = {
        let ready_at = ready_at.clone();
        let stream = watcher(api.clone(), watcher::Config::default().labels("app=bench-pods"));
        tokio::spawn(async move {
            let mut pods = std::pin::pin!(kube::runtime::WatchStreamExt::applied_objects(stream));
            while let Ok(Some(p)) = pods.try_next().await {
                if is_ready(&p) {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    ready_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(name)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let started = Instant::now();
    let names: Vec<String> = (0..count).map(|i| format!("p{tag}-{i}")).collect();
    let created: Vec<(String, Instant)> = futures::stream::iter(names.iter().cloned())
        .map(|name| async move {
            let sent = Instant::now();
            api.create(&PostParams::default(), &pod(ns, &name, node)?)
                .await
                .with_context(|| format!("creating {name}"))?;
            anyhow::Ok((name, sent))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ready = ready_at.lock().unwrap_or_else(|e| e.into_inner()).len();
        if names.iter().all(|n| ready_at.lock().unwrap_or_else(|e| e.into_inner()).contains_key(n)) {
            break;
        }
        ensure!(Instant::now() < deadline, "only {ready} of {count} pods Ready after 600 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    let ready_at = ready_at.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = created.iter().filter_map(|(n, _)| ready_at.get(n)).max().copied().unwrap_or(started);
    let per_pod = created
        .iter()
        .filter_map(|(n, sent)| ready_at.get(n).map(|r| r.duration_since(*sent).as_secs_f64() * 1e3))
        .collect();
    Ok((per_pod, last.duration_since(started)))
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

struct Figures {
    ready_ms: Vec<f64>,
    batch: Vec<Duration>,
    add_ms: Vec<f64>,
}

async fn measure(cni: Cni, args: &Args) -> Result<Figures> {
    let weft_bin = std::env::current_exe().context("where weft-bench-pods is")?;
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(cni == Cni::Weft).observability(false).weft_dev(&weft_bin),
    )
    .await?;
    eprintln!("[bench-pods] cluster {} up ({})", c.name(), cni.name());
    if cni == Cni::Weft {
        for what in ["daemonset/weft-agent", "deployment/weft-operator"] {
            c.kubectl(&["-n", "weft-system", "rollout", "status", what, "--timeout=180s"]).await?;
        }
    }
    let node = c.nodes().last().cloned().context("no nodes")?;
    let ns = c.namespace("bench-pods").await?;
    let api: Api<Pod> = Api::namespaced(c.client(), ns.name());
    // The pause image pulled and the node's network up before anything is timed.
    round(&api, ns.name(), &node.name, 1, 0).await?;
    delete_all(&api).await?;
    let timing = host_path(&node, CNI_TIMING_DIR);
    install_wrappers(&timing)?;
    let mut figures = Figures { ready_ms: Vec::new(), batch: Vec::new(), add_ms: Vec::new() };
    for r in 1..=args.rounds {
        let _ = std::fs::remove_file(timing.join("calls.log"));
        let (ready, batch) = round(&api, ns.name(), &node.name, args.pods, r).await?;
        let log = std::fs::read_to_string(timing.join("calls.log")).unwrap_or_default();
        let adds = chain_adds(&log);
        ensure!(
            adds.len() as u32 >= args.pods,
            "{} of {} sandboxes' ADDs were timed: {log}",
            adds.len(),
            args.pods
        );
        eprintln!(
            "[bench-pods] {} round {r}: {} pods Ready in {:.1} s; Pod→Ready p50 {:.0} ms; CNI ADD p50 {:.1} ms",
            cni.name(),
            args.pods,
            batch.as_secs_f64(),
            quantile(&ready, 0.5),
            quantile(&adds, 0.5)
        );
        figures.ready_ms.extend(ready);
        figures.batch.push(batch);
        figures.add_ms.extend(adds);
        delete_all(&api).await?;
    }
    // The wrappers go before the cluster does, so nothing outlives the run.
    std::fs::remove_dir_all(&timing)?;
    Ok(figures)
}

async fn delete_all(api: &Api<Pod>) -> Result<()> {
    let lp = ListParams::default().labels("app=bench-pods");
    api.delete_collection(&DeleteParams { grace_period_seconds: Some(0), ..Default::default() }, &lp).await?;
    wait_for("the bench pods to be gone", Duration::from_secs(300), || async {
        Ok(api.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.pods == 0 || args.rounds == 0 {
        bail!("--pods and --rounds must be at least 1");
    }
    let weft = measure(Cni::Weft, &args).await?;
    let reference = measure(Cni::Reference, &args).await?;
    println!(
        "| CNI | pods × rounds | batch create → all Ready (median) | Pod → Ready p50 / p99 | CNI ADD p50 / p99 |"
    );
    println!("|---|---|---|---|---|");
    for (cni, f) in [(Cni::Weft, &weft), (Cni::Reference, &reference)] {
        let batch: Vec<f64> = f.batch.iter().map(Duration::as_secs_f64).collect();
        println!(
            "| {} | {} × {} | {:.1} s | {:.0} / {:.0} ms | {:.1} / {:.1} ms |",
            cni.name(),
            args.pods,
            args.rounds,
            quantile(&batch, 0.5),
            quantile(&f.ready_ms, 0.5),
            quantile(&f.ready_ms, 0.99),
            quantile(&f.add_ms, 0.5),
            quantile(&f.add_ms, 0.99)
        );
    }
    println!(
        "\nweft-cni / reference: Pod → Ready p50 {:.2}×, CNI ADD p50 {:.2}×",
        quantile(&weft.ready_ms, 0.5) / quantile(&reference.ready_ms, 0.5),
        quantile(&weft.add_ms, 0.5) / quantile(&reference.add_ms, 0.5)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_add_is_the_sum_of_its_chain_without_ipam_and_loopback() {
        let log = "bridge ADD c1 1000000 6000000 0\nhost-local ADD c1 2000000 3000000 0\n\
                   portmap ADD c1 6000000 7000000 0\nloopback ADD c1 0 9000000 0\n\
                   weft-cni ADD c2 0 2500000 0\nweft-cni DEL c2 0 9000000 0\nbridge ADD c3 0 1 1\n";
        assert_eq!(
            chain_adds(log),
            vec![6.0, 2.5],
            "c1: bridge 5 + portmap 1; c2: 2.5; a failed ADD is left out"
        );
    }
}
