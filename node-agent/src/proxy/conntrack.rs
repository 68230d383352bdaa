//! The conntrack side of the proxy, the same for both backends: stale UDP flows are deleted when
//! their endpoint goes, and TCP timeouts are kube-proxy's.

use std::net::{Ipv4Addr, SocketAddrV4};

use weft_api::plan as pb;

use crate::exec::Runner;

/// A UDP destination of a Service and the endpoints behind it: when an endpoint goes away, or
/// its port changes (a new targetPort), its conntrack entries must go too, or the client keeps
/// talking to the dead pod or port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFlows {
    /// Cluster IP, external IPs, load-balancer IPs.
    pub ips: Vec<Ipv4Addr>,
    pub port: u16,
    pub node_port: u16,
    /// Sorted, no duplicates.
    pub endpoints: Vec<SocketAddrV4>,
}

/// The endpoints a UDP Service port's flows may be NATed to, for [`UdpFlows::endpoints`].
pub fn udp_endpoints(cluster: &[&pb::Endpoint], local: &[&pb::Endpoint]) -> Vec<SocketAddrV4> {
    let mut eps: Vec<SocketAddrV4> =
        cluster.iter().chain(local).map(|e| SocketAddrV4::new(Ipv4Addr::from(e.ip), e.port as u16)).collect();
    eps.sort();
    eps.dedup();
    eps
}

/// Deletes the conntrack entries of UDP flows to endpoints that went away or changed port;
/// without this a client keeps sending to the dead endpoint for as long as it keeps the flow
/// alive. Best effort: a failure is logged, the rules are already right.
pub fn clear_udp(runner: &Runner, old: &[UdpFlows], new: &[UdpFlows]) {
    for filter in stale_udp_filters(old, new) {
        let filter: Vec<&str> = filter.iter().map(String::as_str).collect();
        conntrack_delete(runner, &filter);
    }
}

/// The `conntrack -D -p udp` filters for the flows of `old` that `new` no longer serves: per
/// endpoint gone or moved to another port, its flows to each Service address and to the NodePort.
/// By endpoint IP, as kube-proxy: conntrack cannot filter on the NATed port.
pub fn stale_udp_filters(old: &[UdpFlows], new: &[UdpFlows]) -> Vec<Vec<String>> {
    let mut filters = Vec::new();
    for flows in old {
        let kept = new.iter().find(|n| n.port == flows.port && n.node_port == flows.node_port);
        for ep in &flows.endpoints {
            if kept.is_some_and(|k| k.endpoints.contains(ep)) {
                continue;
            }
            let ep_ip = ep.ip().to_string();
            for ip in &flows.ips {
                filters.push(
                    [
                        "--orig-dst",
                        &ip.to_string(),
                        "--orig-port-dst",
                        &flows.port.to_string(),
                        "--dst-nat",
                        &ep_ip,
                    ]
                    .map(String::from)
                    .to_vec(),
                );
            }
            if flows.node_port != 0 {
                filters.push(
                    ["--orig-port-dst", &flows.node_port.to_string(), "--dst-nat", &ep_ip]
                        .map(String::from)
                        .to_vec(),
                );
            }
        }
    }
    filters
}

/// kube-proxy's conntrack TCP timeouts (its `conntrack.tcpEstablishedTimeout` and
/// `tcpCloseWaitTimeout` defaults), which workloads and the conformance tests expect: a day for
/// established flows, an hour for CLOSE_WAIT (the kernel's 60 s would drop half-closed
/// long-lived connections). Per network namespace; set once the first rules have loaded
/// nf_conntrack. Best effort, as kube-proxy: a failure is logged.
const CONNTRACK_TIMEOUTS: &[(&str, &str)] = &[
    ("net.netfilter.nf_conntrack_tcp_timeout_established", "86400"),
    ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600"),
];

pub fn set_conntrack_timeouts(runner: &Runner) {
    for (key, value) in CONNTRACK_TIMEOUTS {
        let setting = format!("{key}={value}");
        match runner.output("sysctl", &["-q", "-w", &setting]) {
            Ok(_) => tracing::debug!(%setting, "conntrack timeout set"),
            Err(e) => {
                tracing::warn!(%setting, error = %e, "cannot set a conntrack timeout; it stays the kernel's")
            }
        }
    }
}

fn conntrack_delete(runner: &Runner, filter: &[&str]) {
    runner.run_quietly("conntrack", &[&["-D", "-p", "udp"][..], filter].concat());
}
