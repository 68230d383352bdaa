//! The agent's programmers: one per thing it programs on the node (CNI, IPAM, routes, service
//! proxy, DNS, ingress).
//!
//! Each acts on the node, and what it applied is recorded afterwards, off the plan's path, as
//! readable text in `<state-dir>/programmed/<name>.txt` (see [`record`]). `ipam` hands the node's
//! blocks and pods to the allocator behind `weft-cni`, `cni` installs the conflist and the plugin
//! when the agent is told to (`Target::cni.install`), and `routes` programs the routes to the
//! other nodes' blocks and the masquerade chain (see [`crate::routes`]) when the node's pod
//! network is Weft's (the same flag). `proxy` writes the service chains (see [`crate::proxy`]) whatever the
//! node's CNI, and its periodic check ([`CHECKS`]) repairs them when they are flushed.
//! `policy` enforces the NetworkPolicies selecting the node's pods (see [`crate::policy`]).
//! `ingress` runs nginx on the nodes that serve ingress (see [`crate::ingress`]). `dns` runs the
//! node's CoreDNS from the Corefile it renders (see [`crate::dns`]) when the agent has
//! `--dns-kubeconfig`.

pub mod record;

use std::path::PathBuf;
use std::sync::Arc;

use weft_api::plan::{self as pb, Kind, Resource};

use crate::files::{Access, Durability};
use crate::ipam::IpamHandle;
use crate::plan_state::{ChangedKinds, PlanState};

/// Where the CNI configuration goes; the directories override the plan's (a node of the local
/// cluster has its own).
#[derive(Debug, Clone, Default)]
pub struct CniOptions {
    pub install: bool,
    pub conf_dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
}

/// What the programmers act on.
#[derive(Debug, Clone)]
pub struct Target {
    pub state_dir: PathBuf,
    pub ipam: IpamHandle,
    pub cni: CniOptions,
    /// What the routes programmer last wrote with `iptables-restore`.
    pub routes: crate::routes::RoutesCache,
    /// Programmers record their own figures (sync durations, lines written) here.
    pub metrics: crate::metrics::AgentMetrics,
    /// What the service proxy last wrote (see [`crate::proxy`]).
    pub proxy: crate::proxy::ProxyCache,
    /// The node's CoreDNS (see [`crate::dns`]).
    pub dns: crate::dns::DnsHandle,
    /// The node's nginx (see [`crate::ingress`]).
    pub ingress: crate::ingress::IngressHandle,
    /// NetworkPolicy enforcement (see [`crate::policy`]), shared with the CNI server.
    pub policy: crate::policy::PolicyHandle,
    /// Writes the record files of what was applied.
    pub records: record::Recorder,
}

impl Target {
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("cni.sock")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("{programmer}: resource {name} does not decode: {source}")]
    Decode { programmer: &'static str, name: String, source: prost::DecodeError },
    #[error("{programmer}: {message}")]
    Invalid { programmer: &'static str, message: String },
    #[error("{programmer}: {path}: {source}")]
    Io { programmer: &'static str, path: PathBuf, source: std::io::Error },
    #[error("ipam: {0}")]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("cni: {0}")]
    Install(#[from] crate::cni::InstallError),
    #[error("routes: {0}")]
    Routes(#[from] crate::routes::RoutesError),
    #[error("proxy: {0}")]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error(transparent)]
    Ingress(#[from] crate::ingress::IngressError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}

/// What a programmer does to the node.
type Act = fn(&PlanState, &Target) -> Result<(), ProgramError>;

/// One programmer: the kinds of plan resource it consumes, what it does with them, and the
/// text that records it.
#[derive(Debug, Clone, Copy)]
pub struct Programmer {
    pub name: &'static str,
    pub kinds: &'static [Kind],
    act: Act,
    record: fn(&PlanState) -> Result<String, ProgramError>,
}

/// All programmers, in the order they apply (the pod network before the services on it).
pub const PROGRAMMERS: &[Programmer] = &[
    Programmer {
        name: "ipam",
        kinds: &[Kind::Network, Kind::Node, Kind::Pods],
        act: act_ipam,
        record: record::ipam,
    },
    Programmer { name: "cni", kinds: &[Kind::Network, Kind::Node], act: act_cni, record: record::cni },
    Programmer {
        name: "routes",
        kinds: &[Kind::Network, Kind::Node, Kind::Peer],
        act: act_routes,
        record: record::routes,
    },
    Programmer {
        name: "proxy",
        kinds: &[Kind::Network, Kind::Service],
        act: act_proxy,
        record: record::proxy,
    },
    Programmer {
        name: "policy",
        kinds: &[
            Kind::Pods,
            Kind::NetworkPolicy,
            Kind::ClusterNetworkPolicy,
            Kind::PolicySet,
            Kind::PolicyTargets,
        ],
        act: act_policy,
        record: record::policy,
    },
    Programmer {
        name: "dns",
        kinds: &[Kind::Dns, Kind::Network, Kind::Node],
        act: act_dns,
        record: record::dns,
    },
    Programmer {
        name: "ingress",
        kinds: &[Kind::Node, Kind::IngressSettings, Kind::Ingress, Kind::Secret],
        act: act_ingress,
        record: record::ingress,
    },
];

/// Runs every programmer whose kinds changed (all of them when `changed` is `None`), then queues
/// the records of those that applied. Returns the names of those that failed with their errors;
/// the others are applied regardless, so one broken part never holds back the rest.
pub fn apply_all(
    plan: &Arc<PlanState>,
    changed: Option<&ChangedKinds>,
    target: &Target,
) -> Vec<(String, ProgramError)> {
    let mut failures = Vec::new();
    let mut applied = Vec::new();
    for programmer in PROGRAMMERS {
        if changed.is_some_and(|c| !programmer.kinds.iter().any(|k| c.contains(k))) {
            continue;
        }
        let span = tracing::info_span!("program", programmer = programmer.name);
        let _enter = span.enter();
        match (programmer.act)(plan, target) {
            Ok(()) => applied.push(*programmer),
            Err(e) => {
                tracing::warn!(error = %e, "programmer failed");
                failures.push((programmer.name.to_string(), e));
            }
        }
    }
    target.records.record(plan, &applied);
    failures
}

fn decode<M: prost::Message + Default>(programmer: &'static str, r: &Resource) -> Result<M, ProgramError> {
    r.decode().map_err(|source| ProgramError::Decode { programmer, name: r.name.clone(), source })
}

fn single<M: prost::Message + Default>(
    programmer: &'static str,
    plan: &PlanState,
    kind: Kind,
) -> Result<Option<M>, ProgramError> {
    plan.of_kind(kind).next().map(|r| decode(programmer, r)).transpose()
}

/// The node's blocks and pods to the allocator: new pods get addresses from the blocks, addresses
/// of pods gone from two observations in a row are released.
fn act_ipam(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    if let Some(net) = single::<pb::NetworkSettings>("ipam", plan, Kind::Network)? {
        target.ipam.set_mtu(crate::routes::pod_mtu(&net)?);
    }
    if let Some(node) = single::<pb::NodePlan>("ipam", plan, Kind::Node)? {
        target.ipam.set_blocks(crate::ipam::blocks_from_plan(&node)?)?;
    }
    if let Some(pods) = single::<pb::NodePods>("ipam", plan, Kind::Pods)? {
        target.ipam.observe_pods(&crate::ipam::pods_from_plan(&pods), POD_GC_GAP)?;
    }
    Ok(())
}

/// How long a pod must stay absent from the plan before its address is released.
const POD_GC_GAP: std::time::Duration = std::time::Duration::from_secs(30);

/// Installs the conflist and `weft-cni` into the node's CNI directories. The directories are
/// checked whether or not this node installs them.
fn act_cni(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    let Some(net) = single::<pb::NetworkSettings>("cni", plan, Kind::Network)? else {
        return Ok(());
    };
    for (what, dir) in [("conf dir", &net.cni_conf_dir), ("bin dir", &net.cni_bin_dir)] {
        if !dir.starts_with('/') {
            return Err(ProgramError::Invalid {
                programmer: "cni",
                message: format!("the CNI {what} must be an absolute path, got {dir:?}"),
            });
        }
    }
    if !target.cni.install {
        return Ok(());
    }
    let conf_dir = target.cni.conf_dir.clone().unwrap_or_else(|| PathBuf::from(&net.cni_conf_dir));
    let bin_dir = target.cni.bin_dir.clone().unwrap_or_else(|| PathBuf::from(&net.cni_bin_dir));
    let plugin = crate::cni::plugin_binary_next_to_agent().map_err(|source| ProgramError::Io {
        programmer: "cni",
        path: PathBuf::from("weft-cni"),
        source,
    })?;
    let conflist = crate::cni::render_conflist(&net, &target.socket());
    crate::cni::install(&conf_dir, &bin_dir, crate::cni::conflist::conflist_name(&net), &conflist, &plugin)?;
    Ok(())
}

/// Routes to the other nodes' blocks (direct or over VXLAN), forwarding and masquerade. The
/// plan is validated whatever the node's CNI; the node is only programmed when its pod network is
/// Weft's (`Target::cni.install`): beside another CNI (the local cluster's
/// reference mode) Weft's blocks would shadow that CNI's own pod routes.
fn act_routes(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    let (Some(net), Some(node)) = (
        single::<pb::NetworkSettings>("routes", plan, Kind::Network)?,
        single::<pb::NodePlan>("routes", plan, Kind::Node)?,
    ) else {
        return Ok(());
    };
    let peers =
        plan.of_kind(Kind::Peer).map(|r| decode("routes", r)).collect::<Result<Vec<pb::PeerNode>, _>>()?;
    let desired = crate::routes::render(&net, &node, &peers)?;
    if target.cni.install {
        crate::routes::apply(&desired, &target.routes)?;
    }
    Ok(())
}

/// The proxy's part of the plan: its settings and Services.
fn proxy_plan(plan: &PlanState) -> Result<crate::proxy::ProxyPlan<'_>, ProgramError> {
    Ok(crate::proxy::ProxyPlan::from_resources(plan.resources.values())?)
}

/// The service proxy's rules (see [`crate::proxy`]): only the rules that changed are written.
fn act_proxy(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    target.proxy.sync(&proxy_plan(plan)?, &target.metrics)?;
    Ok(())
}

/// NetworkPolicy enforcement (see [`crate::policy`]); CNI ADDs waiting for their pod wake up.
fn act_policy(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    target.policy.sync(crate::policy::plan_from(plan.resources.values())?, &target.ipam)?;
    Ok(())
}

/// A periodic check: whether what a programmer wrote is still on the node; when it is not, the
/// check repairs it (returns true then).
type Check = fn(&PlanState, &Target) -> Result<bool, ProgramError>;

/// The programmers that check their work between plans (see [`check_all`]).
pub const CHECKS: &[(&str, Check)] = &[("proxy", check_proxy), ("policy", check_policy)];

/// Runs every programmer's periodic check; returns the failures.
pub fn check_all(plan: &PlanState, target: &Target) -> Vec<(String, ProgramError)> {
    let mut failures = Vec::new();
    for (name, check) in CHECKS {
        match check(plan, target) {
            Ok(true) => {
                tracing::info!(programmer = name, "repaired what was changed behind the agent's back")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(programmer = name, error = %e, "check failed");
                failures.push((name.to_string(), e));
            }
        }
    }
    failures
}

/// The canary: chains flushed or deleted from outside are rewritten in full.
fn check_proxy(plan: &PlanState, target: &Target) -> Result<bool, ProgramError> {
    if target.proxy.check(&target.metrics)? {
        return Ok(false);
    }
    target.proxy.sync(&proxy_plan(plan)?, &target.metrics)?;
    Ok(true)
}

/// The policy table flushed or deleted from outside is written again in full.
fn check_policy(_plan: &PlanState, target: &Target) -> Result<bool, ProgramError> {
    Ok(target.policy.check(&target.ipam)?)
}

/// Runs the node's CoreDNS with the Corefile rendered from the plan (see [`crate::dns`]); its
/// files are in `<state-dir>/dns`, whether it serves in `<state-dir>/dns/status`.
fn act_dns(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    let dns = single::<pb::DnsSettings>("dns", plan, Kind::Dns)?;
    let net = single::<pb::NetworkSettings>("dns", plan, Kind::Network)?;
    let node = single::<pb::NodePlan>("dns", plan, Kind::Node)?;
    let serving = crate::dns::apply(dns.as_ref(), net.as_ref(), node.as_ref(), &target.dns, &target.metrics)?;
    let status = match serving {
        crate::dns::Serving::On { node_ip } => format!("serving on {node_ip}:53\n"),
        crate::dns::Serving::Off { why } => format!("not serving: {why}\n"),
    };
    let path = target.dns.dir().join("status");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(status.as_str()) {
        crate::files::replace(&path, status.as_bytes(), Durability::Contents, Access::Public)
            .map_err(|source| ProgramError::Io { programmer: "dns", path, source })?;
    }
    Ok(())
}

/// The ingress part of the plan, decoded.
fn ingress_plan(plan: &PlanState) -> Result<crate::ingress::IngressPlan, ProgramError> {
    let ingresses =
        plan.of_kind(Kind::Ingress).map(|r| decode("ingress", r)).collect::<Result<Vec<pb::Ingress>, _>>()?;
    let secrets = plan
        .of_kind(Kind::Secret)
        .map(|r| Ok((r.name.clone(), decode("ingress", r)?)))
        .collect::<Result<_, ProgramError>>()?;
    Ok(crate::ingress::IngressPlan {
        node: single("ingress", plan, Kind::Node)?,
        settings: single("ingress", plan, Kind::IngressSettings)?,
        ingresses,
        secrets,
    })
}

/// Runs nginx with the configuration rendered from the plan (see [`crate::ingress`]); its files
/// are in `<state-dir>/ingress`.
fn act_ingress(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    crate::ingress::apply(&ingress_plan(plan)?, &target.ingress, &target.metrics)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(resources: Vec<Resource>) -> PlanState {
        PlanState {
            version: 1,
            generation: 1,
            resources: resources.into_iter().map(|r| (r.key(), r)).collect(),
        }
    }

    fn service() -> Resource {
        let svc = pb::Service {
            cluster_ip: u32::from(std::net::Ipv4Addr::new(10, 96, 0, 50)),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                protocol: pb::Protocol::Tcp as i32,
                port: 9000,
                node_port: 30123,
                endpoints: vec![
                    pb::Endpoint {
                        ip: u32::from(std::net::Ipv4Addr::new(10, 244, 1, 5)),
                        port: 80,
                        flags: 0,
                    },
                    pb::Endpoint {
                        ip: u32::from(std::net::Ipv4Addr::new(10, 244, 2, 7)),
                        port: 80,
                        flags: pb::EndpointFlag::EndpointTerminating as u32
                            | pb::EndpointFlag::EndpointLocal as u32,
                    },
                ],
            }],
            ..Default::default()
        };
        Resource::encode(Kind::Service, "default/web", &svc)
    }

    #[test]
    fn the_proxy_record_lists_each_service_port_and_its_endpoints() {
        insta::assert_snapshot!(record::proxy(&plan(vec![service()])).expect("render"), @"service default/web 10.96.0.50:9000 Tcp nodePort 30123 -> [10.244.1.5:80 10.244.2.7:80,terminating,local]\n");
    }

    #[test]
    fn routes_skip_the_node_itself() {
        let node =
            Resource::encode(Kind::Node, "node", &pb::NodePlan { name: "n1".into(), ..Default::default() });
        let peers = ["n1", "n2"].map(|n| {
            Resource::encode(
                Kind::Peer,
                n,
                &pb::PeerNode {
                    name: n.into(),
                    node_ip: format!("172.18.0.{}", &n[1..]),
                    blocks: vec![format!("10.244.{}.0/26", &n[1..])],
                },
            )
        });
        let text = record::routes(&plan([vec![node], peers.to_vec()].concat())).expect("render");
        insta::assert_snapshot!(text, @"route 10.244.2.0/26 via 172.18.0.2 (n2)\n");
    }

    /// A target on `dir` whose proxy only records, the recorded versions on the receiver.
    fn target(dir: &std::path::Path) -> (Target, std::sync::mpsc::Receiver<u64>) {
        let (recorded, versions) = std::sync::mpsc::channel();
        let metrics = crate::metrics::AgentMetrics::default();
        let records = record::Recorder::start(dir, metrics.record_errors.clone(), move |version| {
            let _ = recorded.send(version);
        })
        .expect("record thread");
        let target = Target {
            state_dir: dir.to_path_buf(),
            ipam: IpamHandle::open(dir, "n1").expect("ipam"),
            cni: CniOptions::default(),
            routes: Default::default(),
            metrics,
            proxy: crate::proxy::ProxyCache::with_runner(crate::exec::Runner::recording()),
            dns: crate::dns::DnsHandle::new(dir, Default::default(), Default::default()),
            ingress: crate::ingress::IngressHandle::new(dir, Default::default()),
            policy: crate::policy::PolicyHandle::new(
                crate::exec::Runner::recording(),
                Default::default(),
                false,
            ),
            records,
        };
        (target, versions)
    }

    fn network(conf_dir: &str) -> Resource {
        Resource::encode(
            Kind::Network,
            "network",
            &pb::NetworkSettings {
                cni_conf_dir: conf_dir.into(),
                cni_bin_dir: "/opt/cni/bin".into(),
                ..Default::default()
            },
        )
    }

    const RECORDED: std::time::Duration = std::time::Duration::from_secs(10);

    #[test]
    fn a_relative_cni_dir_is_refused_with_a_clear_error_and_its_record_keeps_the_last_good_plan() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let (target, recorded) = target(dir.path());
        let records = record::dir(dir.path());
        let good = Arc::new(plan(vec![network("/etc/cni/net.d"), service()]));
        assert!(apply_all(&good, None, &target).is_empty());
        assert_eq!(recorded.recv_timeout(RECORDED), Ok(1));
        let cni_record = std::fs::read_to_string(records.join("cni.txt")).expect("cni record");
        assert!(cni_record.starts_with("conflist /etc/cni/net.d/"), "{cni_record}");

        let mut bad = plan(vec![network("etc/cni"), service()]);
        bad.version = 2;
        let failures = apply_all(&Arc::new(bad), None, &target);
        assert_eq!(failures.len(), 1);
        assert_eq!(
            failures[0].1.to_string(),
            "cni: the CNI conf dir must be an absolute path, got \"etc/cni\""
        );
        assert_eq!(recorded.recv_timeout(RECORDED), Ok(2));
        assert_eq!(std::fs::read_to_string(records.join("cni.txt")).expect("cni record"), cni_record);
        assert!(std::fs::read_to_string(records.join("proxy.txt")).expect("proxy").contains("default/web"));
    }

    #[test]
    fn a_record_that_cannot_be_written_is_counted_and_never_fails_the_plan() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let (target, recorded) = target(dir.path());
        // The records' directory is a file: every record write fails.
        std::fs::write(record::dir(dir.path()), "not a directory").expect("write");
        let good = Arc::new(plan(vec![network("/etc/cni/net.d"), service()]));
        assert!(apply_all(&good, None, &target).is_empty(), "the plan applies");
        assert_eq!(recorded.recv_timeout(RECORDED), Ok(1));
        assert_eq!(target.metrics.record_errors.get(), PROGRAMMERS.len() as u64);
    }
}
