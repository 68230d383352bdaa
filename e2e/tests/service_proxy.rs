//! The service proxy with real packets, iptables backend (the default): the scenarios of
//! `proxy_scenarios` (ClusterIP spread, affinity, endpoint removal and rejection; NodePort from
//! outside with externalTrafficPolicy Local; ProxyPolicy PreferSameZone).
//!
//! Needs root and `cargo build --workspace --bins`.

use anyhow::Result;
use weft_e2e::cluster::{CniMode, TestCluster, TestOptions};

mod proxy_scenarios;

async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(
        TestOptions::default()
            .nodes(4)
            .weft(true)
            .cni(CniMode::Weft)
            .weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await
}

#[tokio::test]
async fn cluster_ip_spreads_requests_keeps_affinity_and_follows_endpoints() -> Result<()> {
    proxy_scenarios::cluster_ip_spreads_requests_keeps_affinity_and_follows_endpoints(&cluster().await?).await
}

#[tokio::test]
async fn node_port_answers_on_every_node_and_local_keeps_the_client_address() -> Result<()> {
    proxy_scenarios::node_port_answers_on_every_node_and_local_keeps_the_client_address(&cluster().await?)
        .await
}

#[tokio::test]
async fn proxy_policy_prefer_same_zone_keeps_traffic_in_the_zone_and_falls_back() -> Result<()> {
    proxy_scenarios::proxy_policy_prefer_same_zone_keeps_traffic_in_the_zone_and_falls_back(&cluster().await?)
        .await
}
