//! The service proxy's rules with real packets: a "node" network namespace with its own
//! iptables, "pod" namespaces behind veths running small TCP/UDP echo servers, and a client pod.
//! The proxy writes its chains inside the node namespace (`ip netns exec`); the root namespace's
//! iptables and nftables are never touched. The behaviour tests run on both backends
//! (`iptables::…`, `nftables::…`). Every namespace is removed by a guard, even when an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use weft_agent::exec::Runner;
use weft_agent::metrics::{AgentMetrics, ResultLabel};
use weft_agent::plan_state::PlanState;
use weft_agent::proxy::{ProxyCache, ProxyPlan};
use weft_api::plan::{self as pb, Kind, Resource};

mod support;
use support::netns::Netns;
use support::{Enter as _, ok, require_root, run};

const CLUSTER_IP: &str = "10.96.0.10";
const EMPTY_IP: &str = "10.96.0.11";
const NODE_IP: &str = "192.168.77.1";
const OUTSIDE_IP: &str = "192.168.77.2";
const NODE_PORT: u16 = 30123;
/// Where the client reads its answers; long only so a slow machine never fails a test.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A namespace of this test (`wpx-…`) with `lo` up.
fn netns(tag: &str) -> Netns {
    let ns = Netns::new("wpx", tag).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns
}

/// A TCP server on 80 answering every connection with `<name> <client address>`, and UDP
/// servers answering every datagram with `<name>` (on 5353) and `<name>:5354` (on 5354, the
/// target of a changed targetPort); they run until the test process exits.
fn serve(ns: &Netns, name: &str) {
    let (tcp, udp, udp_alt) = ns.enter(|| {
        (
            TcpListener::bind("0.0.0.0:80").unwrap(),
            UdpSocket::bind("0.0.0.0:5353").unwrap(),
            UdpSocket::bind("0.0.0.0:5354").unwrap(),
        )
    });
    let tcp_name = name.to_string();
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let _ = conn.write_all(format!("{tcp_name} {peer}").as_bytes());
        }
    });
    for (socket, answer) in [(udp, name.to_string()), (udp_alt, format!("{name}:5354"))] {
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(answer.as_bytes(), from);
            }
        });
    }
}

/// The node, three pods with echo servers, a client pod, and an outside host on the node's
/// underlay link.
struct Lab {
    node: Netns,
    pods: Vec<(Netns, Ipv4Addr)>,
    client: Netns,
    outside: Netns,
    cache: ProxyCache,
    metrics: AgentMetrics,
    mode: pb::ProxyMode,
}

impl Lab {
    fn new(mode: pb::ProxyMode) -> Self {
        let node = netns("node");
        ok(node.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        let mut pods = Vec::new();
        for i in 1..=3u8 {
            let pod = netns(&format!("pod{i}"));
            let ip = attach(&node, &pod, i);
            serve(&pod, &format!("pod{i}"));
            pods.push((pod, ip));
        }
        let client = netns("client");
        attach(&node, &client, 9);
        let outside = netns("out");
        node.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", outside.name()])
            .unwrap();
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"]).unwrap();
        node.ip(&["link", "set", "eth0", "up"]).unwrap();
        // The node's default route (host-originated traffic to a ClusterIP needs one to be routed
        // before it is DNATed).
        node.ip(&["route", "add", "default", "via", OUTSIDE_IP]).unwrap();
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"]).unwrap();
        outside.ip(&["link", "set", "eth0", "up"]).unwrap();
        let cache = ProxyCache::with_runner(Runner::in_netns(node.name()));
        Self { node, pods, client, outside, cache, metrics: AgentMetrics::default(), mode }
    }

    fn sync(&self, plan: &PlanState) {
        self.cache.sync(&ProxyPlan::from_resources(plan.resources.values()).unwrap(), &self.metrics).unwrap();
    }

    fn iptables(&self, args: &[&str]) {
        let out = run(self.node.exec("iptables").args(args));
        assert!(out.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn nft(&self, args: &[&str]) {
        let out = run(self.node.exec("nft").args(args));
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn plan(&self, endpoints: &[(Ipv4Addr, u32)], external_local: bool) -> PlanState {
        plan(self.mode, endpoints, external_local)
    }

    fn syncs(&self, result: &'static str) -> u64 {
        self.metrics.proxy_syncs.get_or_create(&ResultLabel { result }).get()
    }
}

/// Connects `pod` to `node` with a veth: the pod gets 10.244.<i>.2/24, the node 10.244.<i>.1.
fn attach(node: &Netns, pod: &Netns, i: u8) -> Ipv4Addr {
    let host = format!("vp{i}");
    node.ip(&["link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", pod.name()]).unwrap();
    node.ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", &host]).unwrap();
    node.ip(&["link", "set", &host, "up"]).unwrap();
    pod.ip(&["addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"]).unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")]).unwrap();
    Ipv4Addr::new(10, 244, i, 2)
}

/// TCP: the answer of whoever serves `ip:port` from inside `ns`, or the connect error.
fn ask(ns: &Netns, ip: &str, port: u16) -> Result<String, ErrorKind> {
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    ns.enter(|| {
        let mut conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.kind())?;
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).map_err(|e| e.kind())?;
        Ok(answer)
    })
}

fn who(ns: &Netns, ip: &str, port: u16) -> String {
    let answer = ask(ns, ip, port).unwrap_or_else(|e| panic!("{ip}:{port} did not answer: {e:?}"));
    answer.split_whitespace().next().unwrap_or_default().to_string()
}

fn settings(mode: pb::ProxyMode) -> Resource {
    Resource::encode(
        Kind::Network,
        "network",
        &pb::NetworkSettings {
            pod_cidrs: vec!["10.244.0.0/16".into()],
            service_cidr: "10.96.0.0/16".into(),
            masquerade_bit: 14,
            proxy_mode: mode as i32,
            ..Default::default()
        },
    )
}

/// `default/echo` (TCP 9000 → 80 with NodePort 30123, UDP 53 → 5353) on `endpoints` (flags per
/// pod address), and `default/empty` (TCP 80, no endpoints).
fn plan(mode: pb::ProxyMode, endpoints: &[(Ipv4Addr, u32)], external_local: bool) -> PlanState {
    plan_with(mode, endpoints, |echo| echo.external_local = external_local)
}

/// [`plan`], with `default/echo` changed by `tweak`.
fn plan_with(
    mode: pb::ProxyMode,
    endpoints: &[(Ipv4Addr, u32)],
    tweak: impl Fn(&mut pb::Service),
) -> PlanState {
    let eps = |port| {
        endpoints.iter().map(|(ip, flags)| pb::Endpoint { ip: u32::from(*ip), port, flags: *flags }).collect()
    };
    let mut echo = pb::Service {
        cluster_ip: u32::from(CLUSTER_IP.parse::<Ipv4Addr>().unwrap()),
        ports: vec![
            pb::ServicePort {
                name: "http".into(),
                protocol: pb::Protocol::Tcp as i32,
                port: 9000,
                node_port: u32::from(NODE_PORT),
                endpoints: eps(80),
            },
            pb::ServicePort {
                name: "dns".into(),
                protocol: pb::Protocol::Udp as i32,
                port: 53,
                node_port: 0,
                endpoints: eps(5353),
            },
        ],
        ..Default::default()
    };
    tweak(&mut echo);
    let empty = pb::Service {
        cluster_ip: u32::from(EMPTY_IP.parse::<Ipv4Addr>().unwrap()),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp as i32,
            port: 80,
            ..Default::default()
        }],
        ..Default::default()
    };
    let resources = [
        settings(mode),
        Resource::encode(Kind::Service, "default/echo", &echo),
        Resource::encode(Kind::Service, "default/empty", &empty),
    ];
    PlanState { version: 1, generation: 1, resources: resources.into_iter().map(|r| (r.key(), r)).collect() }
}

fn all(lab: &Lab) -> Vec<(Ipv4Addr, u32)> {
    lab.pods.iter().map(|(_, ip)| (*ip, 0)).collect()
}

fn tally(from: &Netns, requests: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..requests {
        *seen.entry(who(from, CLUSTER_IP, 9000)).or_insert(0) += 1;
    }
    seen
}

fn a_cluster_ip_reaches_every_endpoint_and_what_has_no_endpoint_is_refused_at_once(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    lab.sync(&lab.plan(&all(&lab), false));

    let seen = tally(&lab.client, 60);
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["pod1", "pod2", "pod3"], "{seen:?}");
    // From the node itself (CoreDNS, nginx on the host network rely on it).
    assert!(who(&lab.node, CLUSTER_IP, 9000).starts_with("pod"));
    // A port the Service does not declare, and a Service without endpoints: refused, not left
    // to time out.
    assert_eq!(ask(&lab.client, CLUSTER_IP, 80), Err(ErrorKind::ConnectionRefused));
    assert_eq!(ask(&lab.client, EMPTY_IP, 80), Err(ErrorKind::ConnectionRefused));
    assert_eq!(ask(&lab.node, EMPTY_IP, 80), Err(ErrorKind::ConnectionRefused));
}

fn a_removed_endpoint_leaves_the_rotation_and_an_unchanged_plan_writes_nothing(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    lab.sync(&lab.plan(&all(&lab), false));
    let two = &all(&lab)[..2];
    lab.sync(&lab.plan(two, false));
    let seen = tally(&lab.client, 40);
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["pod1", "pod2"], "{seen:?}");

    let restores = lab.cache.restores();
    let unchanged = lab.syncs("unchanged");
    lab.sync(&lab.plan(two, false));
    assert_eq!(lab.cache.restores(), restores, "a sync with no change wrote rules");
    assert_eq!(lab.syncs("unchanged"), unchanged + 1);
}

#[test]
fn chains_flushed_or_deleted_from_outside_are_repaired_by_the_check() {
    require_root();
    let lab = Lab::new(pb::ProxyMode::Iptables);
    let plan = lab.plan(&all(&lab), false);
    lab.sync(&plan);
    assert!(lab.cache.check(&lab.metrics).unwrap(), "freshly written chains pass the check");

    lab.iptables(&["-t", "nat", "-F", "WEFT-SERVICES"]);
    assert!(ask(&lab.client, CLUSTER_IP, 9000).is_err(), "the flush broke the service");
    assert!(!lab.cache.check(&lab.metrics).unwrap());
    lab.sync(&plan);
    assert!(who(&lab.client, CLUSTER_IP, 9000).starts_with("pod"));

    // The canary itself deleted (its reference first), as a firewall reload would.
    lab.iptables(&["-t", "filter", "-F", "WEFT-SERVICES"]);
    lab.iptables(&["-t", "filter", "-X", "WEFT-PROXY-CANARY"]);
    assert!(!lab.cache.check(&lab.metrics).unwrap());
    lab.sync(&plan);
    assert!(lab.cache.check(&lab.metrics).unwrap());
    assert_eq!(ask(&lab.client, EMPTY_IP, 80), Err(ErrorKind::ConnectionRefused), "the REJECTs are back");
    assert_eq!(lab.metrics.proxy_full_resyncs.get(), 2);

    // A jump from a built-in chain removed.
    lab.iptables(&[
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "weft service portals",
        "-j",
        "WEFT-SERVICES",
    ]);
    assert!(!lab.cache.check(&lab.metrics).unwrap());
    lab.sync(&plan);
    assert!(who(&lab.client, CLUSTER_IP, 9000).starts_with("pod"));
}

fn a_udp_flow_to_a_removed_endpoint_moves_to_a_remaining_one(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    lab.sync(&lab.plan(&all(&lab), false));
    let target: SocketAddr = format!("{CLUSTER_IP}:53").parse().unwrap();
    // One socket, one conntrack flow: without the cleanup its next datagram would still go to
    // the removed endpoint.
    let socket = lab.client.enter(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let exchange = || {
        socket.send_to(b"hi", target).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = exchange();
    assert_eq!(exchange(), first, "one flow, one endpoint");
    let remaining: Vec<(Ipv4Addr, u32)> = lab
        .pods
        .iter()
        .filter(|(_, ip)| format!("pod{}", ip.octets()[2]) != first)
        .map(|(_, ip)| (*ip, 0))
        .collect();
    assert_eq!(remaining.len(), 2);
    lab.sync(&lab.plan(&remaining, false));
    let after = exchange();
    assert_ne!(after, first, "the flow still goes to the removed endpoint");
}

fn a_udp_flow_follows_a_changed_target_port(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    let pod1 = [(lab.pods[0].1, 0)];
    lab.sync(&lab.plan(&pod1, false));
    let target: SocketAddr = format!("{CLUSTER_IP}:53").parse().unwrap();
    let socket = lab.client.enter(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let exchange = || {
        socket.send_to(b"hi", target).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(exchange(), "pod1");
    // Same endpoint IP, new port: the flow's conntrack entry still says 5353 unless cleared.
    lab.sync(&plan_with(mode, &pod1, |echo| echo.ports[1].endpoints[0].port = 5354));
    assert_eq!(exchange(), "pod1:5354", "the flow still goes to the old target port");
}

/// `GET path` on `addr` from inside `ns`: the status and body, or the connect error.
fn http_get(ns: &Netns, addr: &str, path: &str) -> Result<(u16, String), ErrorKind> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.enter(|| {
        let mut conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.kind())?;
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = conn.read_to_string(&mut out);
        let status = out.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    })
}

/// The HTTP status of `GET /healthz` on the node's health check node port, from outside.
fn health_status(lab: &Lab, port: u16) -> Result<u16, ErrorKind> {
    http_get(&lab.outside, &format!("{NODE_IP}:{port}"), "/healthz").map(|(status, _)| status)
}

/// kube-proxy's health and mode endpoints, which load balancers and the e2e tests probe.
fn kube_proxys_healthz_and_proxy_mode_are_served(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    lab.sync(&lab.plan(&all(&lab), false));
    let healthz = format!("{NODE_IP}:10256");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        match http_get(&lab.outside, &healthz, "/healthz") {
            Ok(got) => break got,
            Err(e) if std::time::Instant::now() > deadline => panic!("{healthz}: {e:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(body["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
    let name = weft_agent::proxy::mode_name(mode).to_string();
    assert_eq!(http_get(&lab.node, "127.0.0.1:10249", "/proxyMode"), Ok((200, name)));
    assert_eq!(
        http_get(&lab.outside, &format!("{NODE_IP}:10249"), "/proxyMode"),
        Err(ErrorKind::ConnectionRefused),
        "the status port is on loopback only"
    );
}

fn a_health_check_node_port_says_whether_the_node_has_a_ready_endpoint(mode: pb::ProxyMode) {
    require_root();
    const HEALTH_PORT: u16 = 31999;
    let lab = Lab::new(mode);
    let local = |flags: u32| vec![(lab.pods[0].1, pb::EndpointFlag::EndpointLocal as u32 | flags)];
    let with_health = |echo: &mut pb::Service| {
        echo.external_local = true;
        echo.health_check_node_port = u32::from(HEALTH_PORT);
    };
    // The listener comes up on its own thread: wait for it.
    let wait_for = |want: Result<u16, ErrorKind>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = health_status(&lab, HEALTH_PORT);
            if got == want || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    lab.sync(&plan_with(mode, &local(0), with_health));
    assert_eq!(wait_for(Ok(200)), Ok(200), "a ready local endpoint");
    let terminating = pb::EndpointFlag::EndpointTerminating as u32;
    lab.sync(&plan_with(mode, &local(terminating), with_health));
    assert_eq!(wait_for(Ok(503)), Ok(503), "only a terminating endpoint");
    lab.sync(&lab.plan(&local(0), true));
    assert_eq!(
        wait_for(Err(ErrorKind::ConnectionRefused)),
        Err(ErrorKind::ConnectionRefused),
        "no health port"
    );
}

/// kube-proxy's conntrack TCP timeouts, in the node's namespace (and only there).
fn conntrack_tcp_timeouts_are_kube_proxys(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    let host_close_wait =
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait");
    lab.sync(&lab.plan(&all(&lab), false));
    let value = |key: &str| {
        let out = run(lab.node.exec("sysctl").args(["-n", key]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(value("net.netfilter.nf_conntrack_tcp_timeout_close_wait"), "3600");
    assert_eq!(value("net.netfilter.nf_conntrack_tcp_timeout_established"), "86400");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait").ok(),
        host_close_wait.ok(),
        "the host's own namespace was changed"
    );
}

fn a_node_port_masquerades_external_clients_unless_the_policy_is_local(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    // Cluster policy: any endpoint, and the pod sees a node address (SNAT to the address of
    // the node's interface towards the pod), not the client's.
    lab.sync(&lab.plan(&all(&lab), false));
    let answer = ask(&lab.outside, NODE_IP, NODE_PORT).unwrap();
    let (pod, peer) = answer.split_once(' ').unwrap();
    assert_eq!(peer, format!("10.244.{}.1", &pod[3..]), "{answer}");

    // Local policy: only the node's own endpoint (pod2), and the pod sees the client's address.
    let local = pb::EndpointFlag::EndpointLocal as u32;
    let eps: Vec<(Ipv4Addr, u32)> =
        all(&lab).into_iter().map(|(ip, _)| (ip, if ip.octets()[2] == 2 { local } else { 0 })).collect();
    lab.sync(&lab.plan(&eps, true));
    for _ in 0..10 {
        assert_eq!(ask(&lab.outside, NODE_IP, NODE_PORT).unwrap(), format!("pod2 {OUTSIDE_IP}"));
    }
    // No local endpoint: dropped for outside clients (no answer), still served to pods.
    lab.sync(&lab.plan(&all(&lab), true));
    assert!(ask(&lab.outside, NODE_IP, NODE_PORT).is_err());
    assert!(who(&lab.client, NODE_IP, NODE_PORT).starts_with("pod"));
}

#[test]
fn a_restarted_agent_deletes_the_chains_of_services_gone_while_it_was_down() {
    require_root();
    let lab = Lab::new(pb::ProxyMode::Iptables);
    lab.sync(&lab.plan(&all(&lab), false));
    let chains = |lab: &Lab| {
        let out = run(lab.node.exec("iptables-save").args(["-t", "nat"]));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(":WEFT-")).count()
    };
    let before = chains(&lab);

    // A new agent (empty cache), whose plan no longer has default/echo; it writes in small
    // batches, each of which must be valid on its own.
    let restarted = ProxyCache::with_max_chains_per_restore(Runner::in_netns(lab.node.name()), 2);
    let mut without_echo = lab.plan(&all(&lab), false);
    without_echo
        .resources
        .retain(|k, _| k.kind() != Kind::Service || !format!("{k:?}").contains("default/echo"));
    assert_eq!(without_echo.of_kind(Kind::Service).count(), 1);
    restarted
        .sync(&ProxyPlan::from_resources(without_echo.resources.values()).unwrap(), &lab.metrics)
        .unwrap();
    assert!(restarted.restores() > 1, "the write was not split");
    // echo had WEFT-SVC, WEFT-EXT (NodePort) and three WEFT-SEP for its TCP port, WEFT-SVC
    // and three WEFT-SEP for its UDP port.
    assert_eq!(chains(&lab), before - 9);
    assert_eq!(ask(&lab.client, CLUSTER_IP, 9000), Err(ErrorKind::ConnectionRefused));
    assert!(restarted.check(&lab.metrics).unwrap());
}

/// The behaviour tests, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod iptables {
            $(#[test]
            fn $name() {
                super::$name(weft_api::plan::ProxyMode::Iptables)
            })*
        }
        mod nftables {
            $(#[test]
            fn $name() {
                super::$name(weft_api::plan::ProxyMode::Nftables)
            })*
        }
    };
}

fn client_ip_affinity_keeps_a_client_on_one_endpoint(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    lab.sync(&plan_with(mode, &all(&lab), |echo| echo.affinity_timeout_seconds = 600));
    let seen = tally(&lab.client, 20);
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Without affinity the same client is spread again.
    lab.sync(&lab.plan(&all(&lab), false));
    assert!(tally(&lab.client, 40).len() > 1);
}

fn a_pod_reaches_itself_through_its_service(mode: pb::ProxyMode) {
    require_root();
    let lab = Lab::new(mode);
    // No endpoint marked local: the operator marks them only for Services whose endpoints
    // differ per node (traffic policies Local, topology), not for a plain ClusterIP.
    lab.sync(&lab.plan(&all(&lab), false));
    // pod1 is one of the endpoints: when the balancing picks it, the packet must be
    // masqueraded (hairpin), or pod1 would answer itself directly and the connection fail.
    let (pod1, ip1) = &lab.pods[0];
    let mut answers = BTreeMap::new();
    for _ in 0..30 {
        let answer = ask(pod1, CLUSTER_IP, 9000).unwrap();
        let (pod, peer) = answer.split_once(' ').unwrap();
        if pod == "pod1" {
            assert_ne!(peer, ip1.to_string(), "a hairpin connection was not masqueraded");
        }
        *answers.entry(pod.to_string()).or_insert(0) += 1;
    }
    assert!(answers.contains_key("pod1"), "30 requests never reached pod1 itself: {answers:?}");
}

on_both_backends!(
    client_ip_affinity_keeps_a_client_on_one_endpoint,
    a_pod_reaches_itself_through_its_service,
    a_cluster_ip_reaches_every_endpoint_and_what_has_no_endpoint_is_refused_at_once,
    a_removed_endpoint_leaves_the_rotation_and_an_unchanged_plan_writes_nothing,
    a_udp_flow_to_a_removed_endpoint_moves_to_a_remaining_one,
    a_udp_flow_follows_a_changed_target_port,
    conntrack_tcp_timeouts_are_kube_proxys,
    a_health_check_node_port_says_whether_the_node_has_a_ready_endpoint,
    kube_proxys_healthz_and_proxy_mode_are_served,
    a_node_port_masquerades_external_clients_unless_the_policy_is_local,
);

#[test]
fn the_nftables_hooks_or_table_deleted_from_outside_are_replaced_by_the_check() {
    require_root();
    let lab = Lab::new(pb::ProxyMode::Nftables);
    let plan = lab.plan(&all(&lab), false);
    lab.sync(&plan);
    assert!(lab.cache.check(&lab.metrics).unwrap(), "a freshly written table passes the check");

    lab.nft(&["delete", "chain", "ip", "weft-proxy", "nat-prerouting"]);
    lab.nft(&["delete", "chain", "ip", "weft-proxy", "nat-output"]);
    assert!(ask(&lab.client, CLUSTER_IP, 9000).is_err(), "the deleted hooks broke the service");
    assert!(!lab.cache.check(&lab.metrics).unwrap());
    lab.sync(&plan);
    assert!(who(&lab.client, CLUSTER_IP, 9000).starts_with("pod"));

    // `nft flush ruleset`, as a firewall reload does.
    lab.nft(&["flush", "ruleset"]);
    assert!(!lab.cache.check(&lab.metrics).unwrap());
    lab.sync(&plan);
    assert!(lab.cache.check(&lab.metrics).unwrap());
    assert!(who(&lab.client, CLUSTER_IP, 9000).starts_with("pod"));
    assert_eq!(ask(&lab.client, EMPTY_IP, 80), Err(ErrorKind::ConnectionRefused), "the rejects are back");
    assert_eq!(lab.metrics.proxy_full_resyncs.get(), 2);
}

#[test]
fn switching_backends_removes_what_the_other_one_wrote() {
    require_root();
    let lab = Lab::new(pb::ProxyMode::Iptables);
    let weft_chains = |lab: &Lab| {
        let out = run(&mut lab.node.exec("iptables-save"));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("WEFT-")).count()
    };
    let table =
        |lab: &Lab| run(lab.node.exec("nft").args(["list", "table", "ip", "weft-proxy"])).status.success();
    lab.sync(&plan(pb::ProxyMode::Iptables, &all(&lab), false));
    assert!(weft_chains(&lab) > 0);

    lab.sync(&plan(pb::ProxyMode::Nftables, &all(&lab), false));
    assert_eq!(weft_chains(&lab), 0, "iptables chains or jumps left behind");
    assert!(table(&lab));
    assert!(who(&lab.client, CLUSTER_IP, 9000).starts_with("pod"));
    assert_eq!(ask(&lab.client, EMPTY_IP, 80), Err(ErrorKind::ConnectionRefused));

    lab.sync(&plan(pb::ProxyMode::Iptables, &all(&lab), false));
    assert!(!table(&lab), "the nftables table was left behind");
    assert!(who(&lab.client, CLUSTER_IP, 9000).starts_with("pod"));
    assert_eq!(ask(&lab.client, EMPTY_IP, 80), Err(ErrorKind::ConnectionRefused));
}
