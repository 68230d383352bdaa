//! The kube-dns Service: every node serves cluster DNS on its own address (its agent runs
//! CoreDNS there), and pods reach it at `NetworkConfig` `dns.serviceIP` through Weft's proxy.
//!
//! The leader keeps `kube-system/kube-dns` as a selector-less Service with that ClusterIP and
//! the kubeadm names and ports, and one EndpointSlice it owns listing the nodes' addresses. The
//! desired objects come from a pure function ([`desired`]); they are written with server-side
//! apply only when they differ from what was last written, and again every few minutes to undo
//! edits by hand.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::convert::DnsNode;
use super::inputs::StatusInputs;

pub const NAMESPACE: &str = "kube-system";
pub const SERVICE: &str = "kube-dns";
/// The EndpointSlice Weft owns (the endpointslice controller leaves selector-less Services alone).
pub const SLICE: &str = "kube-dns-weft";
pub const MANAGED_BY: &str = "weft.io";
const FIELD_MANAGER: &str = "weft-operator-dns";
/// CoreDNS's metrics port on every node (the agent's `--dns-metrics-port` default).
pub const METRICS_PORT: u16 = 9153;
const RESYNC: Duration = Duration::from_secs(300);

/// The kube-dns Service and its EndpointSlice (without owner reference) for `service_ip`.
pub fn desired(service_ip: &str, nodes: &[DnsNode]) -> (serde_json::Value, serde_json::Value) {
    let labels = json!({
        "k8s-app": "kube-dns",
        "kubernetes.io/name": "CoreDNS",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": SERVICE,
            "namespace": NAMESPACE,
            "labels": labels,
            "annotations": { "prometheus.io/port": METRICS_PORT.to_string(), "prometheus.io/scrape": "true" },
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": service_ip,
            "ports": [
                { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53 },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53 },
                { "name": "metrics", "port": METRICS_PORT, "protocol": "TCP", "targetPort": METRICS_PORT },
            ],
        },
    });
    let mut nodes = nodes.to_vec();
    nodes.sort();
    let endpoints: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let mut e = json!({
                "addresses": [n.ip.to_string()],
                "conditions": { "ready": n.ready, "serving": n.ready, "terminating": false },
                "nodeName": n.name,
            });
            if let Some(zone) = &n.zone {
                e["zone"] = json!(zone);
            }
            e
        })
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": SLICE,
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": SERVICE,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
                "k8s-app": "kube-dns",
            },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "dns", "port": 53, "protocol": "UDP" },
            { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
            { "name": "metrics", "port": METRICS_PORT, "protocol": "TCP" },
        ],
        "endpoints": endpoints,
    });
    (service, slice)
}

/// Keeps kube-dns in line while this replica leads.
pub async fn run(
    client: Client,
    mut inputs: watch::Receiver<StatusInputs>,
    mut leader: watch::Receiver<bool>,
) {
    let services: Api<core::Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<discovery::EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let mut written: Option<(serde_json::Value, serde_json::Value)> = None;
    let mut last_write = Instant::now();
    loop {
        if *leader.borrow_and_update() {
            let snapshot = inputs.borrow_and_update().clone();
            if snapshot.synced {
                let service_ip = snapshot
                    .network
                    .as_ref()
                    .map(|n| n.spec.dns.service_ip.clone())
                    .unwrap_or_else(|| weft_api::v1alpha1::DnsSettings::default().service_ip);
                let want = desired(&service_ip, &snapshot.dns_nodes);
                if written.as_ref() != Some(&want) || last_write.elapsed() > RESYNC {
                    match write(&services, &slices, &want).await {
                        Ok(()) => {
                            written = Some(want);
                            last_write = Instant::now();
                        }
                        Err(e) => warn!(error = %e, "cannot write the kube-dns Service; retrying"),
                    }
                }
            }
        } else {
            written = None;
        }
        tokio::select! {
            _ = inputs.changed() => {}
            _ = leader.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(if written.is_some() { 60 } else { 5 })) => {}
        }
    }
}

async fn write(
    services: &Api<core::Service>,
    slices: &Api<discovery::EndpointSlice>,
    (service, slice): &(serde_json::Value, serde_json::Value),
) -> Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let want_ip = service["spec"]["clusterIP"].as_str().unwrap_or_default();
    // The ClusterIP is immutable: a Service at another address is replaced.
    if let Some(existing) = services.get_opt(SERVICE).await?
        && let Some(ip) = existing.spec.as_ref().and_then(|s| s.cluster_ip.as_deref())
        && ip != want_ip
    {
        info!(from = ip, to = want_ip, "kube-dns moves to the new dns.serviceIP; replacing the Service");
        services.delete(SERVICE, &DeleteParams::foreground()).await?;
        for _ in 0..50 {
            if services.get_opt(SERVICE).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let applied = services.patch(SERVICE, &params, &Patch::Apply(service)).await?;
    let mut slice = slice.clone();
    if let Some(uid) = applied.metadata.uid.as_deref() {
        // Deleted with its Service.
        slice["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "Service", "name": SERVICE, "uid": uid,
            "controller": true, "blockOwnerDeletion": false,
        }]);
    }
    slices.patch(SLICE, &params, &Patch::Apply(&slice)).await?;
    let count = slice["endpoints"].as_array().map(Vec::len).unwrap_or(0);
    info!(service_ip = want_ip, nodes = count, "kube-dns Service and endpoints written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::convert::dns_node;

    fn node(name: &str, ip: &str, ready: bool) -> core::Node {
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { "topology.kubernetes.io/zone": "zone-a" } },
            "status": {
                "addresses": [
                    { "type": "Hostname", "address": name },
                    { "type": "InternalIP", "address": "fd00::1" },
                    { "type": "InternalIP", "address": ip },
                ],
                "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            },
        }))
        .expect("node")
    }

    #[test]
    fn the_service_is_selectorless_at_the_dns_ip_and_the_slice_lists_every_node() {
        let nodes: Vec<DnsNode> = [node("n2", "172.18.0.12", false), node("n1", "172.18.0.11", true)]
            .iter()
            .filter_map(dns_node)
            .collect();
        let (service, slice) = desired("10.96.0.10", &nodes);
        assert!(service["spec"].get("selector").is_none());
        assert_eq!(
            service["spec"],
            json!({
                "type": "ClusterIP",
                "clusterIP": "10.96.0.10",
                "ports": [
                    { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53 },
                    { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53 },
                    { "name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153 },
                ],
            })
        );
        assert_eq!(
            slice["endpoints"],
            json!([
                {
                    "addresses": ["172.18.0.11"],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": "n1",
                    "zone": "zone-a",
                },
                {
                    "addresses": ["172.18.0.12"],
                    "conditions": { "ready": false, "serving": false, "terminating": false },
                    "nodeName": "n2",
                    "zone": "zone-a",
                },
            ])
        );
        assert_eq!(slice["metadata"]["labels"]["kubernetes.io/service-name"], "kube-dns");
        assert_eq!(slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"], "weft.io");
        assert_eq!(service["metadata"]["labels"]["k8s-app"], "kube-dns");
    }

    #[test]
    fn a_node_without_an_ipv4_internal_address_is_left_out() {
        let mut n = node("n1", "not-an-ip", true);
        assert_eq!(dns_node(&n), None);
        n.status = None;
        assert_eq!(dns_node(&n), None);
    }
}
