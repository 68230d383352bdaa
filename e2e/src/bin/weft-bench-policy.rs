//! Policy programming latency on the local cluster (2 real nodes, Weft installed from its images,
//! nftables proxy): each change is timed from its API request to the moment the kernel of every
//! node concerned holds it, read by polling `nft` inside each node's network namespace (not the
//! agents' own reports):
//! - a NetworkPolicy created (deny all ingress to `app=server`, pods on both nodes) → every
//!   server pod's address is in its node's `ingress-pods` map; and deleted → out of it again;
//! - a client pod on node-2 relabelled into (and out of) a policy's peers → its address is in
//!   (out of) node-1's policy table, where the policed server runs.
//!
//! Root; `make images` and `cargo build --workspace --bins` first.
//! Usage: `weft-bench-policy [--changes 20]`. No peer runs here (Calico and Cilium are not built
//! on this machine); the Service SLI of `make bench-proxy` is the comparable figure.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use weft_e2e::cluster::{PAUSE_IMAGE, TestCluster, TestOptions};

#[derive(Parser, Debug)]
struct Args {
    /// Changes of each kind.
    #[arg(long, default_value_t = 20)]
    changes: usize,
}

/// How often the kernel is looked at; the figures' resolution.
const POLL: Duration = Duration::from_millis(5);
const GIVE_UP: Duration = Duration::from_secs(30);

fn pod(namespace: &str, name: &str, node: &str, app: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": app } },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{ "name": "pause", "image": PAUSE_IMAGE }],
        },
    }))?)
}

fn policy(name: &str, from_app: Option<&str>) -> Result<NetworkPolicy> {
    let ingress = match from_app {
        Some(app) => serde_json::json!([{ "from": [{ "podSelector": { "matchLabels": { "app": app } } }] }]),
        None => serde_json::json!([]),
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name },
        "spec": {
            "podSelector": { "matchLabels": { "app": "server" } },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }))?)
}

/// `nft list <what>` inside a node's network namespace; empty when the object is not there.
fn nft_list(netns: &str, what: &[&str]) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list"])
        .args(what)
        .output()
        .context("running nft")?;
    Ok(if out.status.success() { String::from_utf8_lossy(&out.stdout).into_owned() } else { String::new() })
}

/// Whether `address` is an element of the listing (not a prefix of a longer address).
fn holds(listing: &str, address: &str) -> bool {
    listing.match_indices(address).any(|(i, _)| {
        let after = listing[i + address.len()..].chars().next();
        let before = listing[..i].chars().last();
        !after.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
    })
}

/// Polls until `done` holds, from `started`; the time it took.
fn until(started: Instant, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<f64> {
    loop {
        if done()? {
            return Ok(started.elapsed().as_secs_f64() * 1e3);
        }
        ensure!(started.elapsed() < GIVE_UP, "{what}: not seen in the kernel after {GIVE_UP:?}");
        std::thread::sleep(POLL);
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
}

async fn wait_running(api: &Api<Pod>, name: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = api.get(name).await?;
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        if !ip.is_empty() && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            return Ok(ip);
        }
        ensure!(Instant::now() < deadline, "{name} not Running after 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    let cluster = TestCluster::start(TestOptions::default().nodes(2).weft(true)).await?;
    cluster.use_proxy_mode("nftables").await?;
    let ns = cluster.namespace("bench-policy").await?;
    let ns = ns.name().to_string();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), &ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(cluster.client(), &ns);
    let nodes = cluster.nodes();
    let netns_of = |node: &str| nodes.iter().find(|n| n.name == node).map(|n| n.netns.clone());
    let layout =
        [("server-1", "node-1", "server"), ("server-2", "node-2", "server"), ("client", "node-2", "other")];
    let mut servers = Vec::new();
    for (name, node, app) in layout {
        pods.create(&PostParams::default(), &pod(&ns, name, node, app)?).await?;
    }
    for (name, node, _) in &layout[..2] {
        let netns = netns_of(node).context("node netns")?;
        servers.push((wait_running(&pods, name).await?, netns));
    }
    let client_ip = wait_running(&pods, "client").await?;
    let node1 = netns_of("node-1").context("node-1 netns")?;
    let enforced_everywhere = |present: bool| {
        let servers = servers.clone();
        move || -> Result<bool> {
            for (ip, netns) in &servers {
                let map = nft_list(netns, &["map", "ip", "weft-policy", "ingress-pods"])?;
                if holds(&map, ip) != present {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    };

    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    for i in 0..args.changes {
        let name = format!("deny-{i}");
        let started = Instant::now();
        policies.create(&PostParams::default(), &policy(&name, None)?).await?;
        created.push(until(started, "policy created", enforced_everywhere(true))?);
        let started = Instant::now();
        policies.delete(&name, &DeleteParams::default()).await?;
        deleted.push(until(started, "policy deleted", enforced_everywhere(false))?);
    }

    // The peers of a standing policy: the client joins and leaves them by its label.
    policies.create(&PostParams::default(), &policy("from-clients", Some("client"))?).await?;
    until(Instant::now(), "policy created", enforced_everywhere(true))?;
    let mut relabelled = Vec::new();
    for i in 0..args.changes * 2 {
        let joins = i % 2 == 0;
        let app = if joins { "client" } else { "other" };
        let patch = serde_json::json!({ "metadata": { "labels": { "app": app } } });
        let started = Instant::now();
        pods.patch("client", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        relabelled.push(until(started, "peer label change", || {
            Ok(holds(&nft_list(&node1, &["table", "ip", "weft-policy"])?, &client_ip) == joins)
        })?);
    }

    println!("| change (API request → in the kernel of every node concerned) | changes | p50 | p99 |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("NetworkPolicy created (server pods on 2 nodes isolated)", &created),
        ("NetworkPolicy deleted (isolation lifted on 2 nodes)", &deleted),
        ("peer pod relabelled (in / out of the peer set on node-1)", &relabelled),
    ] {
        println!("| {what} | {} | {:.0} ms | {:.0} ms |", v.len(), quantile(v, 0.5), quantile(v, 0.99));
    }
    println!("\npolled every {} ms (the figures' resolution)", POLL.as_millis());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::holds;

    #[test]
    fn an_address_is_held_only_as_a_whole_element() {
        let listing = "elements = { 10.244.0.12 : goto pod-in-1, 10.244.0.3 : goto pod-in-1 }";
        assert!(holds(listing, "10.244.0.12") && holds(listing, "10.244.0.3"));
        assert!(!holds(listing, "10.244.0.1"), "a prefix of 10.244.0.12 is not held");
        assert!(!holds(listing, "0.244.0.3"), "nor a suffix");
    }
}
