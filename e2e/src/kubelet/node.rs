//! The Node object: registration, status heartbeat, the node Lease, and the network readiness
//! that decides the Ready condition (a node whose CNI configuration is missing or whose plugins
//! fail STATUS is NotReady, as with a real container runtime).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;

use super::cni;

/// The kubelet version reported in `nodeInfo` (the control plane's version, marked as ours).
pub(crate) const KUBELET_VERSION: &str = "v1.35.4-weft";
const FIELD_MANAGER: &str = "weft-kubelet";
const LEASE_DURATION_SECONDS: i32 = 40;

/// Whether pods can get a network, and with which configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NetworkStatus {
    pub ready: bool,
    pub message: String,
    pub config: Option<Arc<cni::NetworkConfigList>>,
}

impl NetworkStatus {
    fn not_ready(message: String) -> Self {
        NetworkStatus { ready: false, message, config: None }
    }
}

/// Loads the first configuration file of the conf dir and asks its plugins for STATUS (1.1).
pub(crate) fn check_network(conf_dir: &std::path::Path, bin_dirs: &[PathBuf]) -> NetworkStatus {
    let path = match cni::find_config(conf_dir) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return NetworkStatus::not_ready(format!(
                "cni plugin not initialized: no network config found in {}",
                conf_dir.display()
            ));
        }
        Err(e) => {
            return NetworkStatus::not_ready(format!("reading {}: {e}", conf_dir.display()));
        }
    };
    let list = match cni::load_config(&path) {
        Ok(l) => l,
        Err(e) => return NetworkStatus::not_ready(format!("invalid CNI configuration: {e}")),
    };
    let exec = cni::Exec { bin_dirs: bin_dirs.to_vec(), enter_netns: None };
    match exec.status(&list) {
        Ok(()) => NetworkStatus { ready: true, message: String::new(), config: Some(Arc::new(list)) },
        Err(e) => NetworkStatus::not_ready(e.to_string()),
    }
}

/// Re-checks the network every 2 s (STATUS at most every 10 s while the configuration is
/// unchanged) and publishes changes.
pub(crate) async fn network_monitor(
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    tx: watch::Sender<NetworkStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_full = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return,
        }
        let current = tx.borrow().clone();
        // Cheap check: has the chosen file or its content changed?
        let file = cni::find_config(&conf_dir).ok().flatten();
        let unchanged = match (&file, &current.config) {
            (Some(f), Some(c)) => *f == c.source && cni::load_config(f).is_ok_and(|l| l == **c),
            (None, None) => true,
            _ => false,
        };
        if unchanged && last_full.elapsed() < Duration::from_secs(10) {
            continue;
        }
        last_full = tokio::time::Instant::now();
        let (dir, bins) = (conf_dir.clone(), bin_dirs.clone());
        let Ok(status) = tokio::task::spawn_blocking(move || check_network(&dir, &bins)).await else {
            continue;
        };
        if status != current {
            if status.ready {
                tracing::info!(
                    "network ready: {}",
                    status.config.as_ref().map(|c| c.source.display().to_string()).unwrap_or_default()
                );
            } else {
                tracing::warn!("network not ready: {}", status.message);
            }
            tx.send_replace(status);
        }
    }
}

/// The static facts of this node.
#[derive(Debug, Clone)]
pub(crate) struct NodeIdentity {
    pub name: String,
    pub ip: IpAddr,
    pub zone: Option<String>,
    pub max_pods: u32,
}

pub(crate) fn node_labels(id: &NodeIdentity) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), id.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), arch.to_string()),
    ]);
    if let Some(z) = id.zone.as_ref().filter(|z| !z.is_empty()) {
        labels.insert("topology.kubernetes.io/zone".to_string(), z.clone());
    }
    labels
}

fn host_memory_ki() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// One condition with its transition time kept when the status did not change.
fn condition(
    previous: &[NodeCondition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> NodeCondition {
    let status = if status { "True" } else { "False" }.to_string();
    let transition = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    NodeCondition {
        type_: type_.to_string(),
        status,
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(transition),
    }
}

/// The node status the runner reports.
pub(crate) fn node_status(
    id: &NodeIdentity,
    network: &NetworkStatus,
    previous: &[NodeCondition],
    now: Timestamp,
) -> NodeStatus {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut resources = BTreeMap::from([
        ("cpu".to_string(), Quantity(cpus.to_string())),
        ("pods".to_string(), Quantity(id.max_pods.to_string())),
    ]);
    if let Some(mem) = host_memory_ki() {
        resources.insert("memory".to_string(), Quantity(format!("{mem}Ki")));
    }
    let (ready_reason, ready_message) = if network.ready {
        ("KubeletReady", "kubelet is posting ready status".to_string())
    } else {
        (
            "KubeletNotReady",
            format!(
                "container runtime network not ready: NetworkReady=false \
                 reason:NetworkPluginNotReady message:Network plugin returns error: {}",
                network.message
            ),
        )
    };
    let conditions = vec![
        condition(
            previous,
            "MemoryPressure",
            false,
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
            now,
        ),
        condition(
            previous,
            "DiskPressure",
            false,
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
            now,
        ),
        condition(
            previous,
            "PIDPressure",
            false,
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
            now,
        ),
        condition(previous, "Ready", network.ready, ready_reason, &ready_message, now),
    ];
    let address_type = "InternalIP".to_string();
    NodeStatus {
        addresses: Some(vec![
            NodeAddress { type_: address_type, address: id.ip.to_string() },
            NodeAddress { type_: "Hostname".to_string(), address: id.name.clone() },
        ]),
        allocatable: Some(resources.clone()),
        capacity: Some(resources),
        conditions: Some(conditions),
        node_info: Some(NodeSystemInfo {
            architecture: node_labels(id).get("kubernetes.io/arch").cloned().unwrap_or_default(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: format!("weft-e2e://{}", env!("CARGO_PKG_VERSION")),
            kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.to_string(),
            machine_id: read_trimmed("/etc/machine-id"),
            operating_system: "linux".to_string(),
            os_image: os_image(),
            system_uuid: id.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node, or updates the labels of an existing one. Returns the node's UID.
pub(crate) async fn register(client: &Client, id: &NodeIdentity) -> Result<String> {
    let api: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(id.name.clone()),
            labels: Some(node_labels(id)),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = match api.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = serde_json::json!({"metadata": {"labels": node_labels(id)}});
            api.patch(&id.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("updating Node {}", id.name))?
        }
        Err(e) => return Err(e).with_context(|| format!("creating Node {}", id.name)),
    };
    Ok(created.metadata.uid.unwrap_or_default())
}

/// Patches the node status (conditions with a fresh heartbeat).
pub(crate) async fn post_status(
    client: &Client,
    id: &NodeIdentity,
    network: &NetworkStatus,
    previous: &[NodeCondition],
) -> Result<Vec<NodeCondition>> {
    let api: Api<Node> = Api::all(client.clone());
    let status = node_status(id, network, previous, Timestamp::now());
    let conditions = status.conditions.clone().unwrap_or_default();
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&id.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching status of Node {}", id.name))?;
    Ok(conditions)
}

/// Renews the node's Lease in `kube-node-lease`.
pub(crate) async fn renew_lease(client: &Client, id: &NodeIdentity, node_uid: &str) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(id.name.clone()),
            namespace: Some("kube-node-lease".into()),
            owner_references: (!node_uid.is_empty()).then(|| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: id.name.clone(),
                    uid: node_uid.to_string(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(id.name.clone()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    let mut value = serde_json::to_value(&lease)?;
    value["apiVersion"] = "coordination.k8s.io/v1".into();
    value["kind"] = "Lease".into();
    api.patch(&id.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value))
        .await
        .with_context(|| format!("renewing Lease kube-node-lease/{}", id.name))?;
    Ok(())
}

/// Keeps the node alive: status every 10 s and immediately when the network readiness changes,
/// Lease every 10 s.
pub(crate) async fn heartbeat(
    client: Client,
    id: NodeIdentity,
    node_uid: String,
    mut network: watch::Receiver<NetworkStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conditions: Vec<NodeCondition> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        let net = network.borrow_and_update().clone();
        match post_status(&client, &id, &net, &conditions).await {
            Ok(c) => conditions = c,
            Err(e) => tracing::warn!("{e:#}"),
        }
        if let Err(e) = renew_lease(&client, &id, &node_uid).await {
            tracing::warn!("{e:#}");
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = network.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Reports the node NotReady on the way out (best effort, bounded).
pub(crate) async fn mark_stopped(client: &Client, id: &NodeIdentity) {
    let stopped = NetworkStatus::not_ready("the weft-e2e pod runner stopped".into());
    let fut = post_status(client, id, &stopped, &[]);
    match tokio::time::timeout(Duration::from_secs(3), fut).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!("marking node stopped: {e:#}"),
        Err(_) => tracing::debug!("marking node stopped: timed out"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id() -> NodeIdentity {
        NodeIdentity {
            name: "node-1".into(),
            ip: "172.18.0.11".parse().unwrap(),
            zone: Some("zone-a".into()),
            max_pods: 110,
        }
    }

    #[test]
    fn labels_include_hostname_zone_and_os() {
        let l = node_labels(&id());
        assert_eq!(l["kubernetes.io/hostname"], "node-1");
        assert_eq!(l["topology.kubernetes.io/zone"], "zone-a");
        assert_eq!(l["kubernetes.io/os"], "linux");
        let no_zone = NodeIdentity { zone: None, ..id() };
        assert!(!node_labels(&no_zone).contains_key("topology.kubernetes.io/zone"));
    }

    #[test]
    fn status_reports_address_capacity_and_readiness() {
        let ready = NetworkStatus { ready: true, message: String::new(), config: None };
        let t0 = Timestamp::from_second(1_000).unwrap();
        let s = node_status(&id(), &ready, &[], t0);
        let addrs = s.addresses.clone().unwrap();
        assert_eq!(addrs[0].type_, "InternalIP");
        assert_eq!(addrs[0].address, "172.18.0.11");
        assert_eq!(s.capacity.as_ref().unwrap()["pods"], Quantity("110".into()));
        assert!(s.allocatable.as_ref().unwrap().contains_key("cpu"));
        let conds = s.conditions.clone().unwrap();
        let r = conds.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r.status, "True");

        // Same status later: heartbeat moves, transition time stays.
        let t1 = Timestamp::from_second(1_010).unwrap();
        let s2 = node_status(&id(), &ready, &conds, t1);
        let r2 = s2.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r2.last_heartbeat_time, Some(Time(t1)));
        assert_eq!(r2.last_transition_time, Some(Time(t0)));

        // Network gone: NotReady with the runtime's message, new transition time.
        let not_ready = NetworkStatus::not_ready("cni plugin not initialized".into());
        let s3 = node_status(&id(), &not_ready, &conds, t1);
        let r3 = s3.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r3.status, "False");
        assert_eq!(r3.reason.as_deref(), Some("KubeletNotReady"));
        assert!(r3.message.unwrap().contains("cni plugin not initialized"));
        assert_eq!(r3.last_transition_time, Some(Time(t1)));
    }

    #[test]
    fn network_is_not_ready_without_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let s = check_network(dir.path(), &[]);
        assert!(!s.ready);
        assert!(s.message.contains("no network config"), "{}", s.message);
        std::fs::write(
            dir.path().join("10-x.conflist"),
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        // A 1.0 list needs no STATUS: ready as soon as it is there.
        let s = check_network(dir.path(), &[]);
        assert!(s.ready, "{}", s.message);
        std::fs::write(
            dir.path().join("10-x.conflist"),
            r#"{"cniVersion":"1.1.0","name":"x","plugins":[{"type":"missing-plugin"}]}"#,
        )
        .unwrap();
        let s = check_network(dir.path(), &[dir.path().to_path_buf()]);
        assert!(!s.ready);
        assert!(s.message.contains("missing-plugin"), "{}", s.message);
    }
}
