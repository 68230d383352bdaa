//! Makes the node match [`DesiredRoutes`]: routes through rtnetlink (only those carrying
//! [`ROUTE_PROTOCOL`] are ever changed or removed), `net.ipv4.ip_forward`, and the nat chain
//! through `iptables-restore --noflush` when its text changed.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{DesiredRoutes, NAT_CHAIN, ROUTE_PROTOCOL, RoutesError};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const ESRCH: i32 = nix::errno::Errno::ESRCH as i32;

/// What this agent process last wrote with `iptables-restore` (empty after a start, so the first
/// apply always writes).
#[derive(Debug, Clone, Default)]
pub struct RoutesCache {
    nat: Arc<Mutex<Option<String>>>,
}

/// Programs the current network namespace (the agent runs in its node's).
pub fn apply(desired: &DesiredRoutes, cache: &RoutesCache) -> Result<(), RoutesError> {
    enable_forwarding()?;
    sync_routes(&desired.routes)?;
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
fn sync_routes(wanted: &BTreeMap<Ipv4Net, super::PeerRoute>) -> Result<(), RoutesError> {
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
                    let out = sync_routes_with(&handle, wanted).await;
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

/// Weft's routes in the main table: destination → (gateway, the message to delete it with).
async fn installed(handle: &Handle) -> Result<Vec<(Ipv4Net, Option<Ipv4Addr>, RouteMessage)>, RoutesError> {
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
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                _ => None,
            });
            let net = Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?;
            Some((net, gw, r))
        })
        .collect())
}

async fn sync_routes_with(
    handle: &Handle,
    wanted: &BTreeMap<Ipv4Net, super::PeerRoute>,
) -> Result<(), RoutesError> {
    let current = installed(handle).await?;
    for (dst, route) in wanted {
        if current.iter().any(|(d, gw, _)| d == dst && *gw == Some(route.via)) {
            continue;
        }
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(route.via)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .build();
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("cannot add the route {dst} via {}", route.via)))?;
        tracing::info!(%dst, via = %route.via, "route added");
    }
    for (dst, _, message) in current {
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
    run_with_input("iptables-restore", &["-w", "--noflush"], text)?;
    // The jump from POSTROUTING, once.
    let jump =
        ["-t", "nat", "-C", "POSTROUTING", "-m", "comment", "--comment", "weft: pod egress", "-j", NAT_CHAIN];
    if !status_ok("iptables", &with_wait(&jump))? {
        let mut add = jump;
        add[2] = "-A";
        let args = with_wait(&add);
        if !status_ok("iptables", &args)? {
            return Err(RoutesError::Command {
                what: format!("iptables {}", args.join(" ")),
                message: "failed".into(),
            });
        }
    }
    tracing::info!(chain = NAT_CHAIN, "nat rules written");
    *last = Some(text.to_string());
    Ok(())
}

fn with_wait<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["-w"];
    v.extend_from_slice(args);
    v
}

fn status_ok(program: &str, args: &[&str]) -> Result<bool, RoutesError> {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .map_err(|source| RoutesError::Io { what: format!("cannot run {program}"), source })
}

fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), RoutesError> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RoutesError::Io { what: format!("cannot run {program}"), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| RoutesError::Io { what: format!("cannot write to {program}"), source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RoutesError::Io { what: format!("cannot wait for {program}"), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RoutesError::Command { what, message: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}
