//! The plugin's interface work, all through netlink (`rtnetlink`): the veth pair, the pod's
//! address and routes, the host's route to the pod.
//!
//! Work inside the pod's network namespace runs on a dedicated OS thread that enters the
//! namespace with `setns` and drives its own current-thread runtime, so no other thread ever
//! changes namespace; the thread ends with its work.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::path::Path;

use futures::TryStreamExt as _;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The prefix of every host-side veth this plugin creates.
pub const HOST_VETH_PREFIX: &str = "wft";

const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;
const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;
const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
const ESRCH: i32 = nix::errno::Errno::ESRCH as i32;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Mismatch(String),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// The host-side veth name of an attachment: `wft` and 12 hex digits of a hash of the container ID
/// and interface name (15 characters, the kernel's limit).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let hash = xxhash_rust::xxh3::xxh3_64(format!("{container_id}/{ifname}").as_bytes());
    format!("{HOST_VETH_PREFIX}{:012x}", hash >> 16)
}

/// Runs `work` with a netlink handle in the current network namespace, on a current-thread
/// runtime (the plugin's main thread is not a tokio worker).
pub fn in_host<T, F, Fut>(work: F) -> Result<T, NetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    run_with_handle(work)
}

/// Runs `work` with a netlink handle inside the network namespace `netns`, on a dedicated thread.
pub fn in_netns<T, F, Fut>(netns: &File, work: F) -> Result<T, NetError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetError>>,
{
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("weft-cni-netns".into())
            .spawn_scoped(scope, || {
                nix::sched::setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Io {
                    what: "cannot enter the pod's network namespace".into(),
                    source: e.into(),
                })?;
                run_with_handle(work)
            })
            .map_err(io("cannot start the thread that enters the pod's network namespace"))?;
        thread.join().unwrap_or_else(|_| {
            Err(NetError::Io {
                what: "the thread in the pod's network namespace".into(),
                source: std::io::Error::other("panicked"),
            })
        })
    })
}

fn run_with_handle<T, F, Fut>(work: F) -> Result<T, NetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(io("cannot start the netlink runtime"))?;
    runtime.block_on(async move {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(io("cannot open a netlink socket"))?;
        let connection = tokio::spawn(connection);
        let out = work(handle).await;
        connection.abort();
        out
    })
}

/// A link by name; `None` when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetError> {
    match handle.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT)) => Ok(None),
        Err(e) => Err(NetError::Netlink { what: format!("cannot look up interface {name}"), source: e }),
    }
}

fn mac_of(link: &LinkMessage) -> Vec<u8> {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// What [`setup`] built.
#[derive(Debug, Clone)]
pub struct Plumbed {
    pub host_ifname: String,
    pub host_mac: Vec<u8>,
    pub pod_mac: Vec<u8>,
    pub mtu: Option<u32>,
}

/// What [`setup`] needs.
#[derive(Debug)]
pub struct PodNet<'a> {
    pub host_ifname: &'a str,
    pub pod_ifname: &'a str,
    pub netns: &'a File,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: Option<u32>,
}

/// Builds the pod's network: the veth pair (the pod end created directly in the pod's namespace),
/// proxy ARP and a /32 route on the host end, the address and routes on the pod end. Idempotent:
/// an existing host end of the same attachment (a retried ADD) is replaced.
pub fn setup(net: &PodNet<'_>) -> Result<Plumbed, NetError> {
    let host_mac =
        in_host(|handle| async move {
            if let Some(old) = link_by_name(&handle, net.host_ifname).await? {
                delete_link(&handle, old.header.index, net.host_ifname).await?;
            }
            let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(net.pod_ifname.to_string())
                .setns_by_fd(net.netns.as_raw_fd());
            let mut veth = LinkVeth::new(net.host_ifname, net.pod_ifname);
            if let Some(mtu) = net.mtu {
                peer = peer.mtu(mtu);
                veth = veth.mtu(mtu);
            }
            let veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build()))).build();
            handle.link().add(veth).execute().await.map_err(|e| {
                if errno(&e) == Some(EEXIST) {
                    NetError::Exists(format!(
                        "cannot create the veth pair {} / {}: an interface named {} already exists in \
                     the pod's network namespace (or {} on the host)",
                        net.host_ifname, net.pod_ifname, net.pod_ifname, net.host_ifname
                    ))
                } else {
                    NetError::Netlink {
                        what: format!("cannot create the veth pair {}", net.host_ifname),
                        source: e,
                    }
                }
            })?;
            let host = link_by_name(&handle, net.host_ifname).await?.ok_or_else(|| {
                NetError::Mismatch(format!(
                    "the host interface {} vanished right after its creation",
                    net.host_ifname
                ))
            })?;
            let index = host.header.index;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(netlink(format!("cannot bring up {}", net.host_ifname)))?;
            // The host end answers ARP for the pod's gateway (and anything it routes), at once.
            write_sysctl(&format!("ipv4/conf/{}/proxy_arp", net.host_ifname), "1")?;
            write_sysctl(&format!("ipv4/neigh/{}/proxy_delay", net.host_ifname), "0")?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.ip, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build();
            handle.route().add(route).replace().execute().await.map_err(netlink(format!(
                "cannot add the host route {}/32 dev {}",
                net.ip, net.host_ifname
            )))?;
            Ok(mac_of(&host))
        })?;

    let host_mac_for_pod = host_mac.clone();
    let pod_mac = in_netns(net.netns, |handle| async move {
        let lo = link_by_name(&handle, "lo").await?;
        if let Some(lo) = lo {
            handle
                .link()
                .set(LinkUnspec::new_with_index(lo.header.index).up().build())
                .execute()
                .await
                .map_err(netlink("cannot bring up lo in the pod"))?;
        }
        let pod = link_by_name(&handle, net.pod_ifname).await?.ok_or_else(|| {
            NetError::Mismatch(format!("{} is missing in the pod right after its creation", net.pod_ifname))
        })?;
        let index = pod.header.index;
        handle
            .address()
            .add(index, IpAddr::V4(net.ip), 32)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("cannot add {}/32 to {} in the pod", net.ip, net.pod_ifname)))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("cannot bring up {} in the pod", net.pod_ifname)))?;
        let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.gateway, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        handle.route().add(to_gateway).replace().execute().await.map_err(netlink(format!(
            "cannot add the route {}/32 dev {} in the pod",
            net.gateway, net.pod_ifname
        )))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(net.gateway)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("cannot add the default route via {} in the pod", net.gateway)))?;
        // The gateway's MAC is the host end's: a permanent entry saves the first packet an ARP
        // round trip and does not depend on the host's proxy ARP.
        if !host_mac_for_pod.is_empty() {
            handle
                .neighbours()
                .add(index, IpAddr::V4(net.gateway))
                .link_layer_address(&host_mac_for_pod)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("cannot add the neighbour entry of {} in the pod", net.gateway)))?;
        }
        Ok(mac_of(&pod))
    })?;
    Ok(Plumbed { host_ifname: net.host_ifname.to_string(), host_mac, pod_mac, mtu: net.mtu })
}

/// Writes `/proc/sys/net/<key>` in the calling thread's network namespace.
fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = Path::new("/proc/sys/net").join(key);
    std::fs::write(&path, value).map_err(io(format!("cannot write {} = {value}", path.display())))
}

async fn delete_link(handle: &Handle, index: u32, name: &str) -> Result<bool, NetError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT)) => Ok(false),
        Err(e) => Err(NetError::Netlink { what: format!("cannot delete {name}"), source: e }),
    }
}

/// Deletes the host end of an attachment's veth (which deletes the pod end and the host route);
/// false when it did not exist.
pub fn teardown(host_ifname: &str) -> Result<bool, NetError> {
    in_host(|handle| async move {
        match link_by_name(&handle, host_ifname).await? {
            Some(link) => delete_link(&handle, link.header.index, host_ifname).await,
            None => Ok(false),
        }
    })
}

/// Deletes every host veth of this plugin whose name is not in `keep`; returns the names deleted.
pub fn delete_host_veths_except(keep: &std::collections::BTreeSet<String>) -> Result<Vec<String>, NetError> {
    in_host(|handle| async move {
        let links: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("cannot list the host's interfaces"))?;
        let mut deleted = Vec::new();
        for link in links {
            let Some(name) = name_of(&link) else { continue };
            if is_host_veth_name(name) && !keep.contains(name) {
                let name = name.to_string();
                if delete_link(&handle, link.header.index, &name).await? {
                    deleted.push(name);
                }
            }
        }
        Ok(deleted)
    })
}

fn is_host_veth_name(name: &str) -> bool {
    name.len() == HOST_VETH_PREFIX.len() + 12
        && name.starts_with(HOST_VETH_PREFIX)
        && name[HOST_VETH_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

async fn ipv4_routes(handle: &Handle) -> Result<Vec<RouteMessage>, NetError> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("cannot list the routes"))
}

fn route_matches(
    route: &RouteMessage,
    dst: Ipv4Addr,
    prefix: u8,
    oif: u32,
    gateway: Option<Ipv4Addr>,
) -> bool {
    let attr_dst = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
        _ => None,
    });
    let attr_oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let attr_gw = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
        _ => None,
    });
    route.header.address_family == AddressFamily::Inet
        && route.header.destination_prefix_length == prefix
        && attr_dst.unwrap_or(Ipv4Addr::UNSPECIFIED) == dst
        && attr_oif == Some(oif)
        && (gateway.is_none() || attr_gw == gateway)
}

/// CHECK: the attachment's interfaces, address and routes are as ADD left them.
pub fn check(net: &PodNet<'_>) -> Result<(), NetError> {
    in_host(|handle| async move {
        let host = link_by_name(&handle, net.host_ifname).await?.ok_or_else(|| {
            NetError::Mismatch(format!("the host end {} of the pod's veth is missing", net.host_ifname))
        })?;
        if !is_up(&host) {
            return Err(NetError::Mismatch(format!(
                "the host end {} of the pod's veth is down",
                net.host_ifname
            )));
        }
        let routes = ipv4_routes(&handle).await?;
        if !routes.iter().any(|r| route_matches(r, net.ip, 32, host.header.index, None)) {
            return Err(NetError::Mismatch(format!(
                "the host has no route {}/32 dev {}",
                net.ip, net.host_ifname
            )));
        }
        Ok(())
    })?;
    in_netns(net.netns, |handle| async move {
        let pod = link_by_name(&handle, net.pod_ifname).await?.ok_or_else(|| {
            NetError::Mismatch(format!("{} is missing in the pod's network namespace", net.pod_ifname))
        })?;
        if !is_up(&pod) {
            return Err(NetError::Mismatch(format!("{} is down in the pod", net.pod_ifname)));
        }
        let index = pod.header.index;
        let addresses: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("cannot list the pod's addresses"))?;
        let has_ip = addresses.iter().any(|a| {
            a.header.prefix_len == 32
                && a.attributes
                    .iter()
                    .any(|attr| matches!(attr, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == net.ip))
        });
        if !has_ip {
            return Err(NetError::Mismatch(format!(
                "{} in the pod does not have {}/32",
                net.pod_ifname, net.ip
            )));
        }
        let routes = ipv4_routes(&handle).await?;
        if !routes.iter().any(|r| route_matches(r, Ipv4Addr::UNSPECIFIED, 0, index, Some(net.gateway))) {
            return Err(NetError::Mismatch(format!(
                "the pod has no default route via {} dev {}",
                net.gateway, net.pod_ifname
            )));
        }
        Ok(())
    })
}

/// Whether `e` says a thing was already gone (for DEL, which must succeed then).
pub fn is_gone(e: &NetError) -> bool {
    match e {
        NetError::Netlink { source, .. } => matches!(errno(source), Some(ENODEV | ENOENT | ESRCH)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_the_kernel_limit_and_differ_per_attachment() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        let b = host_veth_name("0123456789abcdef", "net1");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("wft"));
        assert_ne!(a, b);
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert!(is_host_veth_name(&a));
        assert!(!is_host_veth_name("wftunnel0"));
    }

    #[test]
    fn macs_are_formatted_like_the_spec_expects() {
        assert_eq!(format_mac(&[0x0a, 0xbc, 0, 1, 2, 0xff]), "0a:bc:00:01:02:ff");
    }
}
