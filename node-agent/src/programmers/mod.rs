//! The agent's programmers: one per thing it programs on the node (CNI, IPAM, routes, service
//! proxy, DNS, ingress).
//!
//! Every programmer records what the plan asks of it, as readable text in
//! `<state-dir>/programmed/<name>.txt`. Three of them also act: `ipam` hands the node's blocks and
//! pods to the allocator behind `weft-cni`, `cni` installs the conflist and the plugin when
//! the agent is told to (`Target::cni.install`), and `routes` programs the routes to the other
//! nodes' blocks and the masquerade chain (see [`crate::routes`]) when the node's pod network is
//! Weft's (the same flag). `proxy` writes the service chains (see [`crate::proxy`]) whatever the
//! node's CNI, and its periodic check ([`CHECKS`]) repairs them when they are flushed.
//! `ingress` runs nginx on the nodes that serve ingress (see [`crate::ingress`]). `dns` runs the
//! node's CoreDNS from the Corefile it renders (see [`crate::dns`]) when the agent has
//! `--dns-kubeconfig`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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
    #[error("{programmer}: cannot write {path}: {source}")]
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
}

/// What a programmer does to the node.
type Act = fn(&PlanState, &Target) -> Result<(), ProgramError>;

/// One programmer: the kinds of plan resource it consumes and what it does with them.
#[derive(Debug, Clone, Copy)]
pub struct Programmer {
    pub name: &'static str,
    pub kinds: &'static [Kind],
    render: fn(&PlanState) -> Result<String, ProgramError>,
    /// What the programmer does to the node besides recording, if anything.
    act: Option<Act>,
}

/// All programmers, in the order they apply (the pod network before the services on it).
pub const PROGRAMMERS: &[Programmer] = &[
    Programmer {
        name: "ipam",
        kinds: &[Kind::Network, Kind::Node, Kind::Pods],
        render: render_ipam,
        act: Some(act_ipam),
    },
    Programmer { name: "cni", kinds: &[Kind::Network, Kind::Node], render: render_cni, act: Some(act_cni) },
    Programmer {
        name: "routes",
        kinds: &[Kind::Network, Kind::Node, Kind::Peer],
        render: render_routes,
        act: Some(act_routes),
    },
    Programmer {
        name: "proxy",
        kinds: &[Kind::Network, Kind::Service],
        render: render_proxy,
        act: Some(act_proxy),
    },
    Programmer {
        name: "dns",
        kinds: &[Kind::Dns, Kind::Network, Kind::Node],
        render: render_dns,
        act: Some(act_dns),
    },
    Programmer {
        name: "ingress",
        kinds: &[Kind::Node, Kind::IngressSettings, Kind::Ingress, Kind::Secret],
        render: render_ingress,
        act: Some(act_ingress),
    },
];

impl Programmer {
    fn path(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("programmed").join(format!("{}.txt", self.name))
    }

    /// Acts on the node (where the programmer does), then records what the plan asks of it;
    /// rewrites nothing when that is unchanged.
    pub fn apply(&self, plan: &PlanState, target: &Target) -> Result<bool, ProgramError> {
        let text = (self.render)(plan)?;
        if let Some(act) = self.act {
            act(plan, target)?;
        }
        let path = self.path(&target.state_dir);
        if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        // A record for people and tests, rewritten from the plan after any restart.
        crate::files::replace(&path, text.as_bytes(), Durability::Cached, Access::Public)
            .map_err(|source| ProgramError::Io { programmer: self.name, path, source })?;
        Ok(true)
    }
}

/// Runs every programmer whose kinds changed (all of them when `changed` is `None`). Returns the
/// names of those that failed with their errors; the others are applied regardless, so one broken
/// part never holds back the rest.
pub fn apply_all(
    plan: &PlanState,
    changed: Option<&ChangedKinds>,
    target: &Target,
) -> Vec<(String, ProgramError)> {
    let mut failures = Vec::new();
    for programmer in PROGRAMMERS {
        if changed.is_some_and(|c| !programmer.kinds.iter().any(|k| c.contains(k))) {
            continue;
        }
        let span = tracing::info_span!("program", programmer = programmer.name);
        let _enter = span.enter();
        if let Err(e) = programmer.apply(plan, target) {
            tracing::warn!(error = %e, "programmer failed");
            failures.push((programmer.name.to_string(), e));
        }
    }
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

/// Installs the conflist and `weft-cni` into the node's CNI directories.
fn act_cni(plan: &PlanState, target: &Target) -> Result<(), ProgramError> {
    let Some(net) = single::<pb::NetworkSettings>("cni", plan, Kind::Network)?.filter(|_| target.cni.install)
    else {
        return Ok(());
    };
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

fn render_cni(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    if let Some(net) = single::<pb::NetworkSettings>("cni", plan, Kind::Network)? {
        for (what, dir) in [("conf dir", &net.cni_conf_dir), ("bin dir", &net.cni_bin_dir)] {
            if !dir.starts_with('/') {
                return Err(ProgramError::Invalid {
                    programmer: "cni",
                    message: format!("the CNI {what} must be an absolute path, got {dir:?}"),
                });
            }
        }
        let _ = writeln!(out, "conflist {}/{}", net.cni_conf_dir, net.cni_conflist_name);
        let _ = writeln!(out, "bin dir {}", net.cni_bin_dir);
        let _ = writeln!(out, "mtu {}", net.mtu);
        let _ = writeln!(out, "chained {:?}", net.cni_chained_plugins);
    }
    if let Some(node) = single::<pb::NodePlan>("cni", plan, Kind::Node)? {
        let _ = writeln!(out, "node {} ip {}", node.name, node.node_ip);
    }
    Ok(out)
}

fn render_ipam(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    if let Some(node) = single::<pb::NodePlan>("ipam", plan, Kind::Node)? {
        for block in node.blocks {
            let _ =
                writeln!(out, "block {} pool {} natOutgoing {}", block.cidr, block.pool, block.nat_outgoing);
        }
    }
    Ok(out)
}

fn render_routes(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    let own = single::<pb::NodePlan>("routes", plan, Kind::Node)?.map(|n| n.name).unwrap_or_default();
    if let Some(net) = single::<pb::NetworkSettings>("routes", plan, Kind::Network)? {
        let _ = writeln!(out, "encapsulation {:?} masquerade {}", net.encapsulation(), net.masquerade);
    }
    for peer in plan.of_kind(Kind::Peer) {
        let peer: pb::PeerNode = decode("routes", peer)?;
        if peer.name == own {
            continue;
        }
        for block in &peer.blocks {
            let _ = writeln!(out, "route {block} via {} ({})", peer.node_ip, peer.name);
        }
    }
    Ok(out)
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

/// A periodic check: whether what a programmer wrote is still on the node; when it is not, the
/// check repairs it (returns true then).
type Check = fn(&PlanState, &Target) -> Result<bool, ProgramError>;

/// The programmers that check their work between plans (see [`check_all`]).
pub const CHECKS: &[(&str, Check)] = &[("proxy", check_proxy)];

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

fn render_proxy(plan: &PlanState) -> Result<String, ProgramError> {
    let mut out = String::new();
    if let Some(net) = plan.of_kind(Kind::Network).next() {
        let net: pb::NetworkSettings = decode("proxy", net)?;
        let _ = writeln!(out, "mode {}", crate::proxy::mode_name(net.proxy_mode()));
    }
    for r in plan.of_kind(Kind::Service) {
        let svc: pb::Service = decode("proxy", r)?;
        let ip = std::net::Ipv4Addr::from(svc.cluster_ip);
        for port in &svc.ports {
            let eps: Vec<String> = port
                .endpoints
                .iter()
                .map(|e| format!("{}:{}{}", std::net::Ipv4Addr::from(e.ip), e.port, flags(e)))
                .collect();
            let _ = writeln!(
                out,
                "service {} {ip}:{} {:?} nodePort {} -> [{}]",
                r.name,
                port.port,
                port.protocol(),
                port.node_port,
                eps.join(" ")
            );
        }
    }
    Ok(out)
}

fn flags(e: &pb::Endpoint) -> String {
    let mut s = String::new();
    for (flag, label) in [
        (pb::EndpointFlag::EndpointNotReady, "not-ready"),
        (pb::EndpointFlag::EndpointTerminating, "terminating"),
        (pb::EndpointFlag::EndpointLocal, "local"),
    ] {
        if e.has(flag) {
            s.push(',');
            s.push_str(label);
        }
    }
    s
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

/// What the node serves: its Ingresses and TLS Secrets by name (never the keys).
fn render_ingress(plan: &PlanState) -> Result<String, ProgramError> {
    let p = ingress_plan(plan)?;
    let mut out = String::new();
    let serving = p.node.as_ref().is_some_and(|n| n.ingress) && p.settings.is_some();
    let _ = writeln!(out, "serving {serving}");
    for i in &p.ingresses {
        let verdict =
            weft_api::ingress::validate(i).err().map(|e| format!(" rejected: {e}")).unwrap_or_default();
        let _ = writeln!(out, "ingress {}/{}{verdict}", i.namespace, i.name);
    }
    for name in p.secrets.keys() {
        let _ = writeln!(out, "secret {name}");
    }
    Ok(out)
}

fn render_dns(plan: &PlanState) -> Result<String, ProgramError> {
    Ok(single::<pb::DnsSettings>("dns", plan, Kind::Dns)?.map(|d| format!("{d:#?}\n")).unwrap_or_default())
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
    fn the_proxy_recorder_lists_each_service_port_and_its_endpoints() {
        insta::assert_snapshot!(render_proxy(&plan(vec![service()])).expect("render"), @"service default/web 10.96.0.50:9000 Tcp nodePort 30123 -> [10.244.1.5:80 10.244.2.7:80,terminating,local]\n");
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
        let text = render_routes(&plan([vec![node], peers.to_vec()].concat())).expect("render");
        insta::assert_snapshot!(text, @"route 10.244.2.0/26 via 172.18.0.2 (n2)\n");
    }

    #[test]
    fn a_relative_cni_dir_is_refused_with_a_clear_error_and_an_unchanged_plan_writes_nothing() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let target = Target {
            state_dir: dir.path().to_path_buf(),
            ipam: IpamHandle::open(dir.path(), "n1").expect("ipam"),
            cni: CniOptions::default(),
            routes: Default::default(),
            metrics: Default::default(),
            proxy: crate::proxy::ProxyCache::with_runner(crate::exec::Runner::recording()),
            dns: crate::dns::DnsHandle::new(dir.path(), Default::default(), Default::default()),
            ingress: crate::ingress::IngressHandle::new(dir.path(), Default::default()),
        };
        let net = |conf: &str| {
            Resource::encode(
                Kind::Network,
                "network",
                &pb::NetworkSettings {
                    cni_conf_dir: conf.into(),
                    cni_bin_dir: "/opt/cni/bin".into(),
                    ..Default::default()
                },
            )
        };
        let failures = apply_all(&plan(vec![net("etc/cni")]), None, &target);
        assert_eq!(failures.len(), 1);
        assert_eq!(
            failures[0].1.to_string(),
            "cni: the CNI conf dir must be an absolute path, got \"etc/cni\""
        );
        let good = plan(vec![net("/etc/cni/net.d"), service()]);
        assert!(apply_all(&good, None, &target).is_empty());
        let cni = PROGRAMMERS.iter().find(|p| p.name == "cni").expect("cni");
        assert!(!cni.apply(&good, &target).expect("apply"), "unchanged: nothing rewritten");
    }
}
