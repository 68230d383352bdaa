//! Routes between nodes and masquerade for traffic leaving the pod network.
//!
//! [`render`] is pure: from the plan it computes the routes to every other node's blocks (directly
//! via the peer's node address over the shared underlay) and the `iptables-restore` fragment of the
//! `WEFT-POSTROUTING` chain in the nat table. [`apply`] makes the node match, idempotently: routes
//! through rtnetlink, marked with Weft's own routing protocol number ([`ROUTE_PROTOCOL`]) so that
//! routes Weft did not install are never touched; the nat chain with one
//! `iptables-restore --noflush`, only when its text changed.
//!
//! NOT YET: VXLAN encapsulation; a plan that asks for it is refused with a clear error (NACKed)
//! rather than routed directly.

mod apply;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_api::plan as pb;

pub use apply::{RoutesCache, apply};

/// The routing protocol number on every route Weft installs (`ip route show proto 87`): 'W'.
pub const ROUTE_PROTOCOL: u8 = 87;

/// The nat chain for pod egress, jumped to from `POSTROUTING`.
pub const NAT_CHAIN: &str = "WEFT-POSTROUTING";

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("VXLAN encapsulation is not implemented yet; set NetworkConfig encapsulation to None")]
    VxlanNotImplemented,
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {message}")]
    Command { what: String, message: String },
}

/// One route to a peer's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    pub via: Ipv4Addr,
}

/// What the node should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredRoutes {
    /// Destination block → gateway (the peer's node address), sorted by destination.
    pub routes: BTreeMap<Ipv4Net, PeerRoute>,
    /// The `iptables-restore --noflush` input for the nat table.
    pub nat: String,
}

impl DesiredRoutes {
    /// Readable text: one line per route, then the nat fragment.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (dst, route) in &self.routes {
            let _ = writeln!(out, "route {dst} via {} proto {ROUTE_PROTOCOL}", route.via);
        }
        out.push_str(&self.nat);
        out
    }
}

fn net(what: &str, s: &str) -> Result<Ipv4Net, RoutesError> {
    s.parse::<Ipv4Net>()
        .map(|n| n.trunc())
        .map_err(|_| RoutesError::Invalid(format!("{what} {s:?} is not an IPv4 CIDR")))
}

/// Computes the node's routes and nat rules from its plan: `own` is the node's name, `peers` every
/// node of the cluster (the node itself is skipped).
pub fn render(
    net_settings: &pb::NetworkSettings,
    own: &pb::NodePlan,
    peers: &[pb::PeerNode],
) -> Result<DesiredRoutes, RoutesError> {
    if net_settings.encapsulation() == pb::Encapsulation::Vxlan {
        return Err(RoutesError::VxlanNotImplemented);
    }
    let mut routes = BTreeMap::new();
    let mut sorted: Vec<&pb::PeerNode> = peers.iter().filter(|p| p.name != own.name).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for peer in sorted {
        let via: Ipv4Addr = peer.node_ip.parse().map_err(|_| {
            RoutesError::Invalid(format!("node {} has no IPv4 address (got {:?})", peer.name, peer.node_ip))
        })?;
        for block in &peer.blocks {
            let dst = net(&format!("block of node {}", peer.name), block)?;
            if let Some(old) = routes.insert(dst, PeerRoute { via })
                && old.via != via
            {
                return Err(RoutesError::Invalid(format!(
                    "block {dst} is on two nodes ({} and {via}); routing neither would be wrong too, \
                     so the plan is refused",
                    old.via
                )));
            }
        }
    }
    Ok(DesiredRoutes { routes, nat: render_nat(net_settings, own)? })
}

/// The nat fragment: pod-to-pod traffic (and traffic to the non-masquerade CIDRs) keeps its
/// source; traffic from the node's `natOutgoing` blocks to anywhere else leaves with the node's
/// address. An empty chain when masquerade is off.
fn render_nat(settings: &pb::NetworkSettings, own: &pb::NodePlan) -> Result<String, RoutesError> {
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{NAT_CHAIN} - [0:0]");
    let mut sources = Vec::new();
    for block in own.blocks.iter().filter(|b| b.nat_outgoing) {
        sources.push(net("block", &block.cidr)?);
    }
    sources.sort();
    sources.dedup();
    if settings.masquerade && !sources.is_empty() {
        let mut keep = Vec::new();
        for cidr in &settings.pod_cidrs {
            keep.push((net("pod CIDR", cidr)?, "pod network"));
        }
        for cidr in &settings.non_masquerade_cidrs {
            keep.push((net("non-masquerade CIDR", cidr)?, "nonMasqueradeCIDRs"));
        }
        keep.sort();
        keep.dedup_by_key(|(n, _)| *n);
        for (dst, why) in keep {
            let _ = writeln!(
                out,
                "-A {NAT_CHAIN} -d {dst} -m comment --comment \"weft: no NAT to the {why}\" -j RETURN"
            );
        }
        for src in sources {
            let _ = writeln!(
                out,
                "-A {NAT_CHAIN} -s {src} -m comment --comment \"weft: natOutgoing from {src}\" -j MASQUERADE"
            );
        }
    }
    out.push_str("COMMIT\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> pb::NetworkSettings {
        pb::NetworkSettings {
            masquerade: true,
            pod_cidrs: vec!["10.244.0.0/16".into()],
            non_masquerade_cidrs: vec!["192.168.50.0/24".into()],
            ..Default::default()
        }
    }

    fn node(name: &str, blocks: &[(&str, bool)]) -> pb::NodePlan {
        pb::NodePlan {
            name: name.into(),
            node_ip: "172.18.1.11".into(),
            blocks: blocks
                .iter()
                .map(|(cidr, nat)| pb::PodBlock {
                    cidr: (*cidr).into(),
                    pool: "default".into(),
                    nat_outgoing: *nat,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn peer(name: &str, ip: &str, blocks: &[&str]) -> pb::PeerNode {
        pb::PeerNode {
            name: name.into(),
            node_ip: ip.into(),
            blocks: blocks.iter().map(|b| (*b).into()).collect(),
        }
    }

    fn peers() -> Vec<pb::PeerNode> {
        vec![
            peer("node-3", "172.18.1.13", &["10.244.0.128/26"]),
            peer("node-1", "172.18.1.11", &["10.244.0.0/26"]),
            peer("node-2", "172.18.1.12", &["10.244.0.64/26", "10.244.1.0/26"]),
        ]
    }

    #[test]
    fn routes_to_every_other_nodes_blocks_and_masquerade_for_nat_outgoing_blocks() {
        let own = node("node-1", &[("10.244.0.0/26", true), ("10.244.2.0/26", false)]);
        let desired = render(&settings(), &own, &peers()).expect("render");
        insta::assert_snapshot!(desired.describe());
    }

    #[test]
    fn masquerade_off_renders_an_empty_chain() {
        let own = node("node-1", &[("10.244.0.0/26", true)]);
        let desired =
            render(&pb::NetworkSettings { masquerade: false, ..settings() }, &own, &peers()).expect("render");
        insta::assert_snapshot!(desired.nat);
    }

    #[test]
    fn vxlan_is_refused_rather_than_routed_directly() {
        let vxlan = pb::NetworkSettings { encapsulation: pb::Encapsulation::Vxlan as i32, ..settings() };
        let err = render(&vxlan, &node("node-1", &[]), &peers()).expect_err("vxlan");
        assert!(err.to_string().contains("VXLAN encapsulation is not implemented yet"), "{err}");
    }

    #[test]
    fn bad_addresses_and_a_block_on_two_nodes_are_refused() {
        let own = node("node-1", &[]);
        let bad_ip = [peer("node-2", "nope", &["10.244.0.64/26"])];
        assert!(render(&settings(), &own, &bad_ip).is_err());
        let bad_block = [peer("node-2", "172.18.1.12", &["10.244.0.64/33"])];
        assert!(render(&settings(), &own, &bad_block).is_err());
        let twice = [
            peer("node-2", "172.18.1.12", &["10.244.0.64/26"]),
            peer("node-3", "172.18.1.13", &["10.244.0.64/26"]),
        ];
        let err = render(&settings(), &own, &twice).expect_err("twice");
        assert!(err.to_string().contains("on two nodes"), "{err}");
    }

    #[test]
    fn rendering_is_deterministic_whatever_the_peer_order() {
        let own = node("node-1", &[("10.244.0.0/26", true)]);
        let mut reversed = peers();
        reversed.reverse();
        assert_eq!(render(&settings(), &own, &peers()).ok(), render(&settings(), &own, &reversed).ok());
    }
}
