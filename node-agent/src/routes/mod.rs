//! Routes between nodes and masquerade for traffic leaving the pod network.
//!
//! [`render`] is pure: from the plan it computes the routes to every other node's blocks (directly
//! via the peer's node address over the shared underlay) and the `iptables-restore` fragment of the
//! `WEFT-POSTROUTING` chain in the nat table. [`apply`] makes the node match, idempotently: routes
//! through rtnetlink, marked with Weft's own routing protocol number ([`ROUTE_PROTOCOL`]) so that
//! routes Weft did not install are never touched; the nat chain with one
//! `iptables-restore --noflush`, only when its text changed.
//!
//! With `encapsulation: VXLAN` the peers' blocks are reached through one VXLAN device,
//! [`VXLAN_DEVICE`] (VNI [`VXLAN_VNI`], UDP port [`VXLAN_PORT`], local = the node's address, learning
//! off, MTU = plan MTU − [`VXLAN_OVERHEAD`]). Every VTEP's MAC is derived from its node's address
//! ([`vtep_mac`]: `02:57:a.b.c.d`), so a node computes its peers' MACs from the plan alone. For every
//! peer the node holds a permanent FDB entry (peer MAC → peer node address) and a permanent
//! neighbour entry on the device (peer node address → peer MAC), and routes the peer's blocks
//! `via <peer node address> dev weft.vxlan onlink`.
//!
//! The gateway of those routes is the peer's *node* address, not an address taken from its block
//! as flannel (`.0` of the subnet) or Calico (a tunnel address allocated from the block) do: Weft's
//! IPAM hands out every address of a block to pods (see `crate::ipam`), so no block address is free
//! for a tunnel, and the gateway of an onlink route is only a key into the device's neighbour table
//! anyway. The device therefore carries no IPv4 address of its own; traffic the node itself sends
//! to a remote pod leaves with the node's address, and the reply comes back over the underlay.
//! Switching back to `None` routes the blocks directly again and deletes the device (with its FDB
//! and neighbour entries).

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
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {message}")]
    Command { what: String, message: String },
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecError),
}

/// The VXLAN device's name.
pub const VXLAN_DEVICE: &str = "weft.vxlan";

/// The VXLAN network identifier of the pod network.
pub const VXLAN_VNI: u32 = 4096;

/// The IANA VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// Bytes VXLAN adds over IPv4: outer IP (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The underlay MTU assumed when the plan leaves it at 0 (the kernel's default).
const DEFAULT_MTU: u32 = 1500;

/// The smallest MTU IPv4 allows on a link.
const MIN_MTU: u32 = 68;

/// The MTU of pod interfaces (and of the VXLAN device): the plan's, less the VXLAN header when
/// pod traffic is encapsulated, so pods never send what the tunnel must fragment.
pub fn pod_mtu(net: &pb::NetworkSettings) -> Result<u32, RoutesError> {
    let underlay = if net.mtu == 0 { DEFAULT_MTU } else { net.mtu };
    if net.encapsulation() != pb::Encapsulation::Vxlan {
        return Ok(underlay);
    }
    underlay.checked_sub(VXLAN_OVERHEAD).filter(|m| *m >= MIN_MTU).ok_or_else(|| {
        RoutesError::Invalid(format!(
            "MTU {underlay} is too small for VXLAN: it adds {VXLAN_OVERHEAD} bytes and IPv4 needs {MIN_MTU}"
        ))
    })
}

/// The VTEP MAC of the node with address `node_ip`: locally administered, unicast, `02:57` ('W')
/// then the four bytes of the address. Every node derives its peers' MACs the same way.
pub fn vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = node_ip.octets();
    [0x02, 0x57, a, b, c, d]
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// One route to a peer's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's node address.
    pub via: Ipv4Addr,
    /// Through [`VXLAN_DEVICE`], `onlink`; directly over the underlay otherwise.
    pub vxlan: bool,
}

/// The VXLAN device and its forwarding entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    /// This node's address: the device's local (source) address.
    pub local: Ipv4Addr,
    /// This node's VTEP MAC ([`vtep_mac`] of `local`).
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Peer node address → its VTEP MAC: one FDB and one neighbour entry each.
    pub peers: BTreeMap<Ipv4Addr, [u8; 6]>,
}

/// What the node should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredRoutes {
    /// Destination block → gateway (the peer's node address), sorted by destination.
    pub routes: BTreeMap<Ipv4Net, PeerRoute>,
    /// The VXLAN device when the pod network is encapsulated; `None`: no device (removed if present).
    pub vxlan: Option<VxlanDevice>,
    /// The `iptables-restore --noflush` input for the nat table.
    pub nat: String,
}

impl DesiredRoutes {
    /// Readable text: one line per route, then the nat fragment.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(dev) = &self.vxlan {
            let _ = writeln!(
                out,
                "vxlan {VXLAN_DEVICE} id {VXLAN_VNI} dstport {VXLAN_PORT} local {} nolearning mtu {} address {}",
                dev.local,
                dev.mtu,
                mac_text(&dev.mac)
            );
            for (peer, mac) in &dev.peers {
                let _ = writeln!(out, "fdb {} dev {VXLAN_DEVICE} dst {peer} self permanent", mac_text(mac));
                let _ =
                    writeln!(out, "neigh {peer} lladdr {} dev {VXLAN_DEVICE} nud permanent", mac_text(mac));
            }
        }
        for (dst, route) in &self.routes {
            if route.vxlan {
                let _ = writeln!(
                    out,
                    "route {dst} via {} dev {VXLAN_DEVICE} onlink proto {ROUTE_PROTOCOL}",
                    route.via
                );
            } else {
                let _ = writeln!(out, "route {dst} via {} proto {ROUTE_PROTOCOL}", route.via);
            }
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
    let encapsulated = net_settings.encapsulation() == pb::Encapsulation::Vxlan;
    let mut vxlan = if encapsulated {
        let local: Ipv4Addr = own.node_ip.parse().map_err(|_| {
            RoutesError::Invalid(format!(
                "VXLAN needs this node's IPv4 address as the tunnel's source; node {} has {:?}",
                own.name, own.node_ip
            ))
        })?;
        let mtu = pod_mtu(net_settings)?;
        Some(VxlanDevice { local, mac: vtep_mac(local), mtu, peers: BTreeMap::new() })
    } else {
        None
    };
    let mut routes = BTreeMap::new();
    let mut sorted: Vec<&pb::PeerNode> = peers.iter().filter(|p| p.name != own.name).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for peer in sorted {
        let via: Ipv4Addr = peer.node_ip.parse().map_err(|_| {
            RoutesError::Invalid(format!("node {} has no IPv4 address (got {:?})", peer.name, peer.node_ip))
        })?;
        if let Some(dev) = vxlan.as_mut() {
            if via == dev.local {
                return Err(RoutesError::Invalid(format!(
                    "node {} has this node's address {via}; VXLAN needs one address per node",
                    peer.name
                )));
            }
            dev.peers.insert(via, vtep_mac(via));
        }
        for block in &peer.blocks {
            let dst = net(&format!("block of node {}", peer.name), block)?;
            if let Some(old) = routes.insert(dst, PeerRoute { via, vxlan: encapsulated })
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
    Ok(DesiredRoutes { routes, vxlan, nat: render_nat(net_settings, own)? })
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

    fn vxlan(mtu: u32) -> pb::NetworkSettings {
        pb::NetworkSettings { encapsulation: pb::Encapsulation::Vxlan as i32, mtu, ..settings() }
    }

    #[test]
    fn vxlan_routes_every_peer_block_through_the_device_with_fdb_and_neighbour_entries() {
        let own = node("node-1", &[("10.244.0.0/26", true)]);
        let desired = render(&vxlan(1500), &own, &peers()).expect("render");
        insta::assert_snapshot!(desired.describe());
    }

    #[test]
    fn vxlan_mtu_is_the_plan_mtu_less_the_overhead_and_the_kernel_default_when_unset() {
        let own = node("node-1", &[]);
        let mtu = |plan| render(&vxlan(plan), &own, &peers()).ok().and_then(|d| d.vxlan).map(|d| d.mtu);
        assert_eq!(mtu(9000), Some(8950));
        assert_eq!(mtu(0), Some(1450));
        let err = render(&vxlan(100), &own, &peers()).expect_err("too small");
        assert!(err.to_string().contains("too small for VXLAN"), "{err}");
    }

    #[test]
    fn vtep_macs_are_derived_from_the_node_address() {
        assert_eq!(vtep_mac(Ipv4Addr::new(172, 18, 1, 12)), [0x02, 0x57, 172, 18, 1, 12]);
        let own = node("node-1", &[]);
        let desired = render(&vxlan(1500), &own, &peers()).expect("render");
        let dev = desired.vxlan.expect("device");
        assert_eq!(dev.mac, vtep_mac(Ipv4Addr::new(172, 18, 1, 11)));
        assert_eq!(dev.peers.get(&Ipv4Addr::new(172, 18, 1, 13)), Some(&[0x02, 0x57, 172, 18, 1, 13]));
        // The node itself is no peer of its own.
        assert_eq!(dev.peers.len(), 2);
    }

    #[test]
    fn vxlan_needs_the_nodes_own_address_and_one_address_per_node() {
        let mut own = node("node-1", &[]);
        own.node_ip = String::new();
        assert!(render(&vxlan(1500), &own, &peers()).is_err());
        // Direct routing does not need it.
        assert!(render(&settings(), &own, &peers()).is_ok());
        let clash = [peer("node-2", "172.18.1.11", &["10.244.0.64/26"])];
        let err = render(&vxlan(1500), &node("node-1", &[]), &clash).expect_err("clash");
        assert!(err.to_string().contains("one address per node"), "{err}");
    }

    #[test]
    fn direct_routing_has_no_vxlan_device() {
        let desired = render(&settings(), &node("node-1", &[]), &peers()).expect("render");
        assert_eq!(desired.vxlan, None);
        assert!(desired.routes.values().all(|r| !r.vxlan));
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
