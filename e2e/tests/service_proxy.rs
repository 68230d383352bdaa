//! The service proxy with real packets, iptables backend (the default): the scenarios of
//! `proxy_scenarios` (ClusterIP spread, affinity, endpoint removal and rejection; NodePort from
//! outside with externalTrafficPolicy Local; ProxyPolicy PreferSameZone).
//!
//! Needs root and `cargo build --workspace --bins`.

use anyhow::Result;
use weft_e2e::cluster::TestCluster;

mod proxy_scenarios;

async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(proxy_scenarios::options()).await
}

proxy_scenarios::tests!(
    cluster_ip_spreads_requests_keeps_affinity_and_follows_endpoints,
    node_port_answers_on_every_node_and_local_keeps_the_client_address,
    proxy_policy_prefer_same_zone_keeps_traffic_in_the_zone_and_falls_back,
);
