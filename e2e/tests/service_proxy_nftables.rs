//! The service proxy with real packets, nftables backend (`spec.proxy.mode: nftables`): the same
//! scenarios as `service_proxy.rs`, on a cluster of its own whose NetworkConfig switches the
//! agents to the nftables table before the first test runs.
//!
//! Needs root and `cargo build --workspace --bins`.

use anyhow::Result;
use weft_e2e::cluster::TestCluster;

mod proxy_scenarios;

static SWITCHED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The shared cluster, switched to the nftables backend: every agent has replaced its iptables
/// chains with the table (its proxy record says `mode nftables`).
async fn cluster() -> Result<TestCluster> {
    let c = TestCluster::shared(proxy_scenarios::options()).await?;
    SWITCHED
        .get_or_try_init(|| async {
            c.patch_network_config(serde_json::json!({"proxy":{"mode":"nftables"}})).await?;
            c.wait_for("every agent on the nftables backend", std::time::Duration::from_secs(60), || async {
                for node in c.nodes() {
                    if !c.programmed(&node.name, "proxy").await?.starts_with("mode nftables\n") {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            })
            .await
        })
        .await?;
    Ok(c)
}

proxy_scenarios::tests!(
    cluster_ip_spreads_requests_keeps_affinity_and_follows_endpoints,
    node_port_answers_on_every_node_and_local_keeps_the_client_address,
    proxy_policy_prefer_same_zone_keeps_traffic_in_the_zone_and_falls_back,
);
