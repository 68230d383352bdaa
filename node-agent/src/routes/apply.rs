//! Makes the node match [`DesiredRoutes`]: the VXLAN device with its FDB and neighbour entries and
//! the routes through rtnetlink (only routes carrying [`ROUTE_PROTOCOL`] are ever changed or
//! removed), `net.ipv4.ip_forward`, and the nat chain through `iptables-restore --noflush` when its
//! text changed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::{
    DesiredRoutes, NAT_CHAIN, PeerRoute, ROUTE_PROTOCOL, RoutesError, VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI,
    VxlanDevice,
};

use crate::exec::Runner;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const ESRCH: i32 = nix::errno::Errno::ESRCH as i32;
const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;
const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;

/// What this agent process last wrote with `iptables-restore` (empty after a start, so the first
/// apply always writes).
#[derive(Debug, Clone, Default)]
pub struct RoutesCache {
    nat: Arc<Mutex<Option<String>>>,
}

/// Programs the current network namespace (the agent runs in its node's).
pub fn apply(desired: &DesiredRoutes, cache: &RoutesCache) -> Result<(), RoutesError> {
    enable_forwarding()?;
    sync_netlink(desired)?;
    sync_nat(&desired.nat, cache)
}

fn enable_forwarding() -> Result<(), RoutesError> {
    if std::fs::read_to_string(IP_FORWARD).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1").map_err(|source| RoutesError::Io {
        what: format!("cannot enable forwarding in {IP_FORWARD}"),
        source,
    })
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutesError {
    let what = what.into();
    move |source| RoutesError::Netlink { what, source }
}

/// Runs the netlink work on its own thread with its own current-thread runtime, whatever the
/// caller's context (the agent applies from `block_in_place`).
fn sync_netlink(desired: &DesiredRoutes) -> Result<(), RoutesError> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("weft-routes".into())
            .spawn_scoped(scope, || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(|source| {
                        RoutesError::Io { what: "cannot start the netlink runtime".into(), source }
                    })?;
                runtime.block_on(async {
                    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| {
                        RoutesError::Io { what: "cannot open a netlink socket".into(), source }
                    })?;
                    let connection = tokio::spawn(connection);
                    let out = sync_with(&handle, desired).await;
                    connection.abort();
                    out
                })
            })
            .map_err(|source| RoutesError::Io { what: "cannot start the routes thread".into(), source })?;
        thread.join().unwrap_or_else(|_| {
            Err(RoutesError::Io {
                what: "the routes thread".into(),
                source: std::io::Error::other("panicked"),
            })
        })
    })
}

/// With VXLAN: the device, its FDB and neighbour entries, then the routes through it. Without:
/// the direct routes first (replacing those through the device), then the device goes.
async fn sync_with(handle: &Handle, desired: &DesiredRoutes) -> Result<(), RoutesError> {
    match &desired.vxlan {
        Some(dev) => {
            let index = ensure_vxlan(handle, dev).await?;
            sync_fdb(handle, index, dev).await?;
            sync_neighbours(handle, index, dev).await?;
            sync_routes_with(handle, &desired.routes, Some(index)).await
        }
        None => {
            let existing = find_link(handle, VXLAN_DEVICE).await?;
            sync_routes_with(handle, &desired.routes, existing.as_ref().map(|l| l.header.index)).await?;
            if let Some(link) = existing {
                match handle.link().del(link.header.index).execute().await {
                    Ok(()) => tracing::info!(device = VXLAN_DEVICE, "VXLAN device removed"),
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENODEV => {}
                    Err(e) => return Err(netlink(format!("cannot remove {VXLAN_DEVICE}"))(e)),
                }
            }
            Ok(())
        }
    }
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, RoutesError> {
    match handle.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENODEV => Ok(None),
        Err(e) => Err(netlink(format!("cannot look up the link {name}"))(e)),
    }
}

/// The VXLAN settings of a link, when it is one.
fn vxlan_info(link: &LinkMessage) -> Option<&[InfoVxlan]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.as_slice()),
            _ => None,
        }),
        _ => None,
    })
}

/// Whether an existing link is the VXLAN device `dev` asks for, in what cannot be changed in place
/// (kind, VNI, local address, port, learning).
fn same_tunnel(link: &LinkMessage, dev: &VxlanDevice) -> bool {
    let is_vxlan = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))))
    });
    let Some(info) = vxlan_info(link) else { return false };
    is_vxlan
        && info.contains(&InfoVxlan::Id(VXLAN_VNI))
        && info.contains(&InfoVxlan::Local(dev.local))
        && info.contains(&InfoVxlan::Port(VXLAN_PORT))
        && !info.contains(&InfoVxlan::Learning(true))
}

/// Creates the VXLAN device, or fixes its MTU, MAC and state, or recreates it when what cannot be
/// changed in place differs (the node's address changed, say). Returns its index.
async fn ensure_vxlan(handle: &Handle, dev: &VxlanDevice) -> Result<u32, RoutesError> {
    if let Some(link) = find_link(handle, VXLAN_DEVICE).await? {
        if same_tunnel(&link, dev) {
            let index = link.header.index;
            let mtu_ok = link.attributes.contains(&LinkAttribute::Mtu(dev.mtu));
            let mac_ok = link.attributes.contains(&LinkAttribute::Address(dev.mac.to_vec()));
            let up = link.header.flags.contains(LinkFlags::Up);
            if !(mtu_ok && mac_ok && up) {
                let message =
                    LinkUnspec::new_with_index(index).mtu(dev.mtu).address(dev.mac.to_vec()).up().build();
                handle
                    .link()
                    .set(message)
                    .execute()
                    .await
                    .map_err(netlink(format!("cannot set up {VXLAN_DEVICE}")))?;
                tracing::info!(device = VXLAN_DEVICE, mtu = dev.mtu, "VXLAN device updated");
            }
            return Ok(index);
        }
        handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(netlink(format!("cannot remove the outdated {VXLAN_DEVICE}")))?;
        tracing::info!(device = VXLAN_DEVICE, "outdated VXLAN device removed");
    }
    let message = LinkVxlan::new(VXLAN_DEVICE, VXLAN_VNI)
        .local(dev.local)
        .port(VXLAN_PORT)
        .learning(false)
        .mtu(dev.mtu)
        .address(dev.mac.to_vec())
        .up()
        .build();
    handle.link().add(message).execute().await.map_err(netlink(format!("cannot create {VXLAN_DEVICE}")))?;
    let link = find_link(handle, VXLAN_DEVICE).await?.ok_or_else(|| RoutesError::Command {
        what: format!("creating {VXLAN_DEVICE}"),
        message: "the device is missing right after its creation".into(),
    })?;
    tracing::info!(device = VXLAN_DEVICE, local = %dev.local, mtu = dev.mtu, "VXLAN device created");
    Ok(link.header.index)
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<&[u8]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

fn neighbour_ip(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

async fn neighbours_of(
    handle: &Handle,
    index: u32,
    family: AddressFamily,
) -> Result<Vec<NeighbourMessage>, RoutesError> {
    let all: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("cannot list the {family:?} neighbours")))?;
    Ok(all.into_iter().filter(|n| n.header.ifindex == index).collect())
}

async fn del_neighbour(handle: &Handle, message: NeighbourMessage, what: String) -> Result<(), RoutesError> {
    match handle.neighbours().del(message).execute().await {
        Ok(()) => {
            tracing::info!(entry = %what, "stale VXLAN entry removed");
            Ok(())
        }
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENOENT => Ok(()),
        Err(e) => Err(netlink(format!("cannot remove {what}"))(e)),
    }
}

/// One permanent FDB entry per peer (its VTEP MAC → its node address); others are removed.
async fn sync_fdb(handle: &Handle, index: u32, dev: &VxlanDevice) -> Result<(), RoutesError> {
    let current = neighbours_of(handle, index, AddressFamily::Bridge).await?;
    for (peer, mac) in &dev.peers {
        if current.iter().any(|n| neighbour_mac(n) == Some(mac.as_slice()) && neighbour_ip(n) == Some(*peer))
        {
            continue;
        }
        handle
            .neighbours()
            .add_bridge(index, mac)
            .destination(IpAddr::V4(*peer))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("cannot add the FDB entry for {peer} on {VXLAN_DEVICE}")))?;
        tracing::info!(%peer, "VXLAN FDB entry added");
    }
    for n in current {
        let wanted = match (neighbour_mac(&n), neighbour_ip(&n)) {
            (Some(mac), Some(ip)) => dev.peers.get(&ip).is_some_and(|m| m.as_slice() == mac),
            _ => false,
        };
        // Entries the kernel keeps for the device itself (its own MAC, no destination) stay.
        if wanted || neighbour_ip(&n).is_none() {
            continue;
        }
        let what = format!("the FDB entry {:?} on {VXLAN_DEVICE}", neighbour_ip(&n));
        del_neighbour(handle, n, what).await?;
    }
    Ok(())
}

/// One permanent neighbour entry per peer (its node address → its VTEP MAC); others are removed.
async fn sync_neighbours(handle: &Handle, index: u32, dev: &VxlanDevice) -> Result<(), RoutesError> {
    let current = neighbours_of(handle, index, AddressFamily::Inet).await?;
    for (peer, mac) in &dev.peers {
        if current.iter().any(|n| {
            neighbour_ip(n) == Some(*peer)
                && neighbour_mac(n) == Some(mac.as_slice())
                && n.header.state == NeighbourState::Permanent
        }) {
            continue;
        }
        handle
            .neighbours()
            .add(index, IpAddr::V4(*peer))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("cannot add the neighbour {peer} on {VXLAN_DEVICE}")))?;
        tracing::info!(%peer, "VXLAN neighbour added");
    }
    for n in current {
        if neighbour_ip(&n).is_some_and(|ip| dev.peers.contains_key(&ip)) {
            continue;
        }
        let what = format!("the neighbour {:?} on {VXLAN_DEVICE}", neighbour_ip(&n));
        del_neighbour(handle, n, what).await?;
    }
    Ok(())
}

/// One of Weft's routes as installed.
struct Installed {
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    message: RouteMessage,
}

/// Weft's routes in the main table.
async fn installed(handle: &Handle) -> Result<Vec<Installed>, RoutesError> {
    let all: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("cannot list the routes"))?;
    Ok(all
        .into_iter()
        .filter(|r| {
            r.header.address_family == AddressFamily::Inet
                && r.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
        })
        .filter_map(|r| {
            let dst = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                    _ => None,
                })
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            let gateway = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                _ => None,
            });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let dst = Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?;
            Some(Installed { dst, gateway, oif, message: r })
        })
        .collect())
}

/// `vxlan`: the VXLAN device's index when it exists. A route through it is right only when the
/// plan asks for VXLAN; a direct route only when it does not go through it.
async fn sync_routes_with(
    handle: &Handle,
    wanted: &BTreeMap<Ipv4Net, PeerRoute>,
    vxlan: Option<u32>,
) -> Result<(), RoutesError> {
    let current = installed(handle).await?;
    for (dst, route) in wanted {
        let through_vxlan = |oif: Option<u32>| vxlan.is_some() && oif == vxlan;
        if current
            .iter()
            .any(|r| r.dst == *dst && r.gateway == Some(route.via) && through_vxlan(r.oif) == route.vxlan)
        {
            continue;
        }
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(route.via)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
        if route.vxlan {
            let Some(index) = vxlan else {
                return Err(RoutesError::Invalid(format!(
                    "route {dst} needs {VXLAN_DEVICE}, which is missing"
                )));
            };
            builder = builder.output_interface(index).onlink();
        }
        handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("cannot add the route {dst} via {}", route.via)))?;
        tracing::info!(%dst, via = %route.via, vxlan = route.vxlan, "route added");
    }
    for Installed { dst, message, .. } in current {
        if wanted.contains_key(&dst) {
            // Replaced above when its gateway changed.
            continue;
        }
        match handle.route().del(message).execute().await {
            Ok(()) => tracing::info!(%dst, "stale route removed"),
            // Gone already (its interface went away): nothing to do.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ESRCH => {}
            Err(e) => return Err(netlink(format!("cannot remove the stale route {dst}"))(e)),
        }
    }
    Ok(())
}

fn sync_nat(text: &str, cache: &RoutesCache) -> Result<(), RoutesError> {
    let mut last = cache.nat.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.as_deref() == Some(text) {
        return Ok(());
    }
    let runner = Runner::default();
    runner.pipe("iptables-restore", &["-w", "--noflush"], text)?;
    // The jump from POSTROUTING, once.
    let jump = [
        "-w",
        "-t",
        "nat",
        "-C",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "weft: pod egress",
        "-j",
        NAT_CHAIN,
    ];
    if !runner.status_ok("iptables", &jump)? {
        let mut append = jump;
        append[3] = "-A";
        runner.output("iptables", &append)?;
    }
    tracing::info!(chain = NAT_CHAIN, "nat rules written");
    *last = Some(text.to_string());
    Ok(())
}
