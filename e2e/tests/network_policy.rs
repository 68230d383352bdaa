//! NetworkPolicy on real nodes with the nftables proxy (the default): every scenario of
//! `network_policy_scenarios`, on a cluster of its own.
//!
//! Needs root, `cargo build --workspace --bins` and `make images`.

use anyhow::Result;
use weft_e2e::cluster::TestCluster;

mod network_policy_scenarios;

static SWITCHED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

async fn cluster() -> Result<TestCluster> {
    network_policy_scenarios::cluster_in_mode("nftables", &SWITCHED).await
}

network_policy_scenarios::tests!(
    peers_ports_cluster_ip_and_node_port,
    kubelet_probes_pass_a_default_deny,
    a_new_pod_is_isolated_from_its_first_packet,
);
