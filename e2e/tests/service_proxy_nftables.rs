//! The service proxy with real packets, nftables backend (`spec.proxy.mode: nftables`, the
//! default): the scenarios of `proxy_scenarios` (ClusterIP spread, affinity, endpoint removal and
//! rejection; NodePort from outside with externalTrafficPolicy Local; ProxyPolicy
//! PreferSameZone), on a cluster of its own whose agents are on the nftables table before the
//! first test runs.
//!
//! Needs root and `cargo build --workspace --bins`.

use anyhow::Result;
use weft_e2e::cluster::TestCluster;

mod proxy_scenarios;

static SWITCHED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

async fn cluster() -> Result<TestCluster> {
    proxy_scenarios::cluster_in_mode("nftables", &SWITCHED).await
}

proxy_scenarios::tests!(
    cluster_ip_spreads_requests_keeps_affinity_and_follows_endpoints,
    node_port_answers_on_every_node_and_local_keeps_the_client_address,
    proxy_policy_prefer_same_zone_keeps_traffic_in_the_zone_and_falls_back,
);
