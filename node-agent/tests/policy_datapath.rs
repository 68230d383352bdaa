//! NetworkPolicy enforcement with real packets: a "node" network namespace with the agent's
//! policy table, "pod" namespaces behind veths routed as Weft routes them (/32 addresses, the
//! link-local gateway, proxy ARP on the node side), TCP echo servers. The table is written inside
//! the node namespace only; every namespace is removed by a guard, even when an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use weft_agent::exec::Runner;
use weft_agent::ipam::{AttachmentKey, IpamHandle, PodRef};
use weft_agent::metrics::AgentMetrics;
use weft_agent::policy::{PolicyHandle, PolicyPlan};
use weft_api::plan as pb;

mod support;
use support::netns::Netns;
use support::{Enter as _, attach, ok, require_root, run};

/// A connection that should succeed gets this long; one that should not is given up on after it
/// (a dropped SYN never answers).
const CONNECT: Duration = Duration::from_secs(2);
const BLOCKED: Duration = Duration::from_millis(700);

const SERVER: &str = "10.244.1.2";
const FRIEND: &str = "10.244.2.2";
const STRANGER: &str = "10.244.3.2";
const CLIENTS: &str = "s-00000000000000c1";

fn netns(tag: &str) -> Netns {
    let ns = Netns::new("wpol", tag).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns
}

/// TCP echo servers on 80 and 8080 (the pod's `http` named port): each line comes back.
fn serve(ns: &Netns) {
    for port in [80, 8080] {
        let listener = ns.enter(|| TcpListener::bind(("0.0.0.0", port)).unwrap());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut writer = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        if writeln!(writer, "{line}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
}

/// A connection from inside `ns`, or why not.
fn connect(ns: &Netns, to: &str, port: u16, timeout: Duration) -> Result<TcpStream, ErrorKind> {
    let addr = SocketAddr::new(to.parse().unwrap(), port);
    ns.enter(|| TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.kind()))
}

/// A line sent and echoed on an open connection.
fn echo(conn: &mut TcpStream, line: &str) -> Result<String, ErrorKind> {
    conn.set_read_timeout(Some(CONNECT)).unwrap();
    writeln!(conn, "{line}").map_err(|e| e.kind())?;
    let mut answer = String::new();
    BufReader::new(conn.try_clone().unwrap()).read_line(&mut answer).map_err(|e| e.kind())?;
    Ok(answer.trim().to_string())
}

fn reaches(ns: &Netns, to: &str, port: u16) -> bool {
    match connect(ns, to, port, CONNECT) {
        Ok(mut conn) => echo(&mut conn, "ping").as_deref() == Ok("ping"),
        Err(_) => false,
    }
}

fn blocked(ns: &Netns, to: &str, port: u16) -> bool {
    connect(ns, to, port, BLOCKED).is_err()
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().unwrap())
}

fn cidr(s: &str) -> pb::Cidr {
    let (a, len) = s.split_once('/').unwrap();
    pb::Cidr { address: ip(a), prefix_len: len.parse().unwrap() }
}

struct Lab {
    node: Netns,
    _server: Netns,
    friend: Netns,
    stranger: Netns,
    policy: PolicyHandle,
    ipam: IpamHandle,
    _state: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        require_root();
        let node = netns("node");
        ok(node.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        let server = netns("server");
        attach(&node, &server, "vserver", SERVER);
        serve(&server);
        let friend = netns("friend");
        attach(&node, &friend, "vfriend", FRIEND);
        let stranger = netns("stranger");
        attach(&node, &stranger, "vstranger", STRANGER);
        let state = tempfile::TempDir::new().unwrap();
        let ipam = IpamHandle::open(state.path(), "n1").unwrap();
        ipam.set_blocks(vec!["10.244.50.0/26".parse().unwrap()]).unwrap();
        let policy = PolicyHandle::new(Runner::in_netns(node.name()), AgentMetrics::default(), true);
        Self { node, _server: server, friend, stranger, policy, ipam, _state: state }
    }

    fn sync(&self, plan: &PolicyPlan) {
        self.policy.sync(plan.clone(), &self.ipam).unwrap();
    }

    /// The table as nft lists it, counters left out (they differ between two histories).
    fn table(&self) -> String {
        let text = ok(self.node.exec("nft").args(["list", "table", "ip", "weft-policy"]));
        text.lines()
            .map(|l| l.split(" counter packets").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The plan of a cluster with `policies`: each (name, target pods by name, policy).
fn plan(policies: Vec<(&str, Vec<&str>, pb::NetworkPolicy)>, sets: Vec<(&str, Vec<&str>)>) -> PolicyPlan {
    let mut plan = PolicyPlan { enforcing: true, ..Default::default() };
    let addresses = [("server", SERVER), ("friend", FRIEND), ("stranger", STRANGER)];
    for (pod, _) in addresses {
        plan.known.insert(("shop".into(), pod.into()));
    }
    for (key, pods, policy) in policies {
        plan.policies.insert(key.into(), policy.clone());
        for pod in pods {
            let address = addresses.iter().find(|(n, _)| *n == pod).map(|(_, a)| ip(a)).unwrap_or(0);
            let target = match plan.targets.iter_mut().find(|t| t.name == pod) {
                Some(t) => t,
                None => {
                    plan.targets.push(pb::PolicyTarget {
                        namespace: "shop".into(),
                        name: pod.into(),
                        address,
                        ports: vec![pb::NamedPort {
                            name: "http".into(),
                            protocol: pb::Protocol::Tcp as i32,
                            port: 8080,
                        }],
                        ..Default::default()
                    });
                    plan.targets.last_mut().unwrap()
                }
            };
            if policy.isolates_ingress {
                target.ingress_policies.push(key.into());
            }
            if policy.isolates_egress {
                target.egress_policies.push(key.into());
            }
        }
    }
    for (name, members) in sets {
        let addresses = members.iter().map(|m| ip(m)).collect();
        plan.sets.insert(name.into(), pb::PolicySet { addresses, ..Default::default() });
    }
    plan
}

fn tcp(port: u32, end_port: u32) -> pb::PolicyPort {
    pb::PolicyPort { protocol: pb::Protocol::Tcp as i32, port, end_port, ..Default::default() }
}

fn ingress(rules: Vec<pb::PolicyRule>) -> pb::NetworkPolicy {
    pb::NetworkPolicy {
        namespace: "shop".into(),
        name: "p".into(),
        isolates_ingress: true,
        ingress: rules,
        ..Default::default()
    }
}

#[test]
fn an_isolated_pod_accepts_only_its_peers_on_their_ports() {
    let lab = Lab::new();
    assert!(reaches(&lab.stranger, SERVER, 80), "no policy: open");
    let rules = vec![
        pb::PolicyRule {
            peer_sets: vec![CLIENTS.into()],
            ports: vec![tcp(80, 0), pb::PolicyPort { named_port: "http".into(), ..Default::default() }],
            ..Default::default()
        },
        pb::PolicyRule {
            ip_blocks: vec![pb::IpBlock {
                cidr: Some(cidr("10.244.3.0/24")),
                except: vec![cidr("10.244.3.2/32")],
            }],
            ..Default::default()
        },
    ];
    let with_except =
        plan(vec![("shop/p", vec!["server"], ingress(rules.clone()))], vec![(CLIENTS, vec![FRIEND])]);
    lab.sync(&with_except);
    assert!(reaches(&lab.friend, SERVER, 80), "a peer on its port");
    assert!(reaches(&lab.friend, SERVER, 8080), "a peer on the named port http (8080 on the server)");
    assert!(blocked(&lab.stranger, SERVER, 80), "not a peer: the ipBlock's exception");

    // The exception goes: the block lets the stranger in on every port.
    let mut open_block = rules;
    open_block[1].ip_blocks[0].except.clear();
    lab.sync(&plan(vec![("shop/p", vec!["server"], ingress(open_block))], vec![(CLIENTS, vec![FRIEND])]));
    assert!(reaches(&lab.stranger, SERVER, 8080));

    // No policy selects the server any more: open again, and with no policy at all the table goes.
    lab.sync(&plan(vec![], vec![]));
    assert!(reaches(&lab.stranger, SERVER, 80));
    lab.sync(&PolicyPlan::default());
    let tables = ok(lab.node.exec("nft").args(["list", "tables"]));
    assert!(!tables.contains("weft-policy"), "{tables}");
}

#[test]
fn established_connections_survive_a_new_deny_and_new_ones_do_not() {
    let lab = Lab::new();
    // Conntrack follows connections once some rule needs it; on a node the proxy's NAT always
    // does. Here the (empty) policy table does, from before the connection.
    lab.sync(&plan(vec![], vec![]));
    let mut conn = connect(&lab.stranger, SERVER, 80, CONNECT).unwrap();
    assert_eq!(echo(&mut conn, "before").as_deref(), Ok("before"));
    lab.sync(&plan(vec![("shop/deny", vec!["server"], ingress(vec![]))], vec![]));
    assert!(blocked(&lab.stranger, SERVER, 80), "a new connection is denied");
    assert_eq!(
        echo(&mut conn, "after").as_deref(),
        Ok("after"),
        "the established one carries on (conntrack)"
    );
}

#[test]
fn egress_is_limited_to_the_rules_destinations_and_port_ranges_and_replies_pass() {
    let lab = Lab::new();
    let egress = pb::NetworkPolicy {
        namespace: "shop".into(),
        name: "out".into(),
        isolates_egress: true,
        egress: vec![pb::PolicyRule {
            ip_blocks: vec![pb::IpBlock { cidr: Some(cidr("10.244.1.0/24")), except: vec![] }],
            ports: vec![tcp(79, 81)],
            ..Default::default()
        }],
        ..Default::default()
    };
    lab.sync(&plan(vec![("shop/out", vec!["friend"], egress)], vec![]));
    assert!(reaches(&lab.friend, SERVER, 80), "inside the range, and the server's replies come back");
    assert!(blocked(&lab.friend, SERVER, 8080), "outside the port range");
    assert!(reaches(&lab.stranger, SERVER, 80), "the stranger is not isolated");
}

#[test]
fn a_new_pod_is_isolated_before_its_cni_add_returns() {
    let lab = Lab::new();
    let deny_egress = pb::NetworkPolicy {
        namespace: "shop".into(),
        name: "deny".into(),
        isolates_egress: true,
        ..Default::default()
    };
    let mut known = plan(vec![("shop/deny", vec!["newcomer"], deny_egress)], vec![]);
    known.known.insert(("shop".into(), "newcomer".into()));
    known.known_uids.insert("uid-new".into());
    lab.sync(&known);

    // The ADD: an address from IPAM, then admission; only then does the pod exist on the wire.
    let pod = PodRef { namespace: "shop".into(), name: "newcomer".into(), uid: "uid-new".into() };
    let address = lab.ipam.allocate(&AttachmentKey::new("c1", "eth0"), &pod).unwrap().ip.to_string();
    lab.policy.admit(&pod, &lab.ipam).unwrap();
    let newcomer = netns("newcomer");
    attach(&lab.node, &newcomer, "vnew", &address);
    assert!(blocked(&newcomer, SERVER, 80), "its first connection is already denied");
    assert!(lab.table().contains(&format!("{address} : goto pod-out-")), "{}", lab.table());
}

#[test]
fn an_add_waits_for_the_plan_to_know_its_pod_and_an_unknown_pod_is_quarantined() {
    let lab = Lab::new();
    let base = plan(vec![], vec![]);
    lab.sync(&base);

    // The plan learns of the pod while its ADD waits.
    let late = PodRef { namespace: "shop".into(), name: "late".into(), uid: "uid-late".into() };
    let late_ip = lab.ipam.allocate(&AttachmentKey::new("c2", "eth0"), &late).unwrap().ip.to_string();
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            let mut knows = base.clone();
            knows.known_uids.insert("uid-late".into());
            lab.sync(&knows);
        });
        lab.policy.admit(&late, &lab.ipam).unwrap();
    });
    assert!(started.elapsed() >= Duration::from_millis(300), "the ADD waited for the plan");
    let late_ns = netns("late");
    attach(&lab.node, &late_ns, "vlate", &late_ip);
    assert!(reaches(&late_ns, SERVER, 80), "known and selected by nothing: open");

    // A pod the plan never learns of is quarantined once the wait runs out.
    let ghost = PodRef { namespace: "shop".into(), name: "ghost".into(), uid: "uid-ghost".into() };
    let ghost_ip = lab.ipam.allocate(&AttachmentKey::new("c3", "eth0"), &ghost).unwrap().ip.to_string();
    lab.policy.admit(&ghost, &lab.ipam).unwrap();
    let ghost_ns = netns("ghost");
    attach(&lab.node, &ghost_ns, "vghost", &ghost_ip);
    assert!(blocked(&ghost_ns, SERVER, 80), "nothing out");
    assert!(blocked(&lab.friend, &ghost_ip, 80), "nothing in");
}

#[test]
fn an_incremental_sync_ends_where_a_full_one_would() {
    let steps = [
        plan(vec![("shop/p", vec!["server"], ingress(vec![]))], vec![]),
        plan(
            vec![(
                "shop/p",
                vec!["server", "friend"],
                ingress(vec![pb::PolicyRule {
                    peer_sets: vec![CLIENTS.into()],
                    ports: vec![tcp(80, 0)],
                    ..Default::default()
                }]),
            )],
            vec![(CLIENTS, vec![FRIEND, STRANGER])],
        ),
        plan(
            vec![
                (
                    "shop/p",
                    vec!["friend"],
                    ingress(vec![pb::PolicyRule { any_peer: true, ..Default::default() }]),
                ),
                (
                    "shop/q",
                    vec!["friend", "server"],
                    ingress(vec![pb::PolicyRule { peer_sets: vec![CLIENTS.into()], ..Default::default() }]),
                ),
            ],
            vec![(CLIENTS, vec![STRANGER])],
        ),
        plan(vec![("shop/q", vec!["server"], ingress(vec![]))], vec![]),
    ];
    let incremental = Lab::new();
    for step in &steps {
        incremental.sync(step);
        let fresh = Lab::new();
        fresh.sync(step);
        assert_eq!(incremental.table(), fresh.table());
    }
    // A failed transaction leaves the ruleset as it was, and the next sync replaces the table.
    let before = incremental.table();
    let out = run(incremental.node.exec("nft").args(["delete", "chain", "ip", "weft-policy", "egress"]));
    assert!(out.status.success());
    incremental.policy.invalidate();
    incremental.sync(&steps[3]);
    assert_eq!(incremental.table(), before, "the table was replaced in full");

    // The periodic check finds a ruleset flushed behind the agent's back and writes it again.
    assert!(!incremental.policy.check(&incremental.ipam).unwrap(), "intact: nothing to repair");
    ok(incremental.node.exec("nft").args(["flush", "ruleset"]));
    assert!(incremental.policy.check(&incremental.ipam).unwrap(), "repaired");
    assert_eq!(incremental.table(), before);
}

fn cluster_ingress(
    name: &str,
    tier: pb::PolicyTier,
    priority: u32,
    rules: Vec<(pb::PolicyAction, &str)>,
) -> pb::ClusterNetworkPolicy {
    pb::ClusterNetworkPolicy {
        name: name.into(),
        tier: tier as i32,
        priority,
        ingress: rules
            .into_iter()
            .map(|(action, set)| pb::ClusterPolicyRule {
                name: String::new(),
                action: action as i32,
                r#match: Some(pb::PolicyRule { peer_sets: vec![set.into()], ..Default::default() }),
            })
            .collect(),
        egress: vec![],
    }
}

/// `plan` with the server the subject of `cluster` (ingress).
fn with_cluster_policies(mut plan: PolicyPlan, cluster: Vec<pb::ClusterNetworkPolicy>) -> PolicyPlan {
    if !plan.targets.iter().any(|t| t.name == "server") {
        plan.targets.push(pb::PolicyTarget {
            namespace: "shop".into(),
            name: "server".into(),
            address: ip(SERVER),
            ..Default::default()
        });
    }
    let server = plan.targets.iter_mut().find(|t| t.name == "server").unwrap();
    server.cluster_ingress_policies = cluster.iter().map(|p| p.name.clone()).collect();
    for p in cluster {
        plan.cluster_policies.insert(p.name.clone(), p);
    }
    plan
}

#[test]
fn admin_decides_before_network_policy_pass_hands_over_and_baseline_only_judges_what_is_left_open() {
    let lab = Lab::new();
    const STRANGERS: &str = "s-000000000000005e";
    let sets = || vec![(CLIENTS, vec![FRIEND]), (STRANGERS, vec![STRANGER])];
    let allow_friend = || {
        let rule = pb::PolicyRule { peer_sets: vec![CLIENTS.into()], ..Default::default() };
        vec![("shop/p", vec!["server"], ingress(vec![rule]))]
    };
    use pb::PolicyAction::{Accept, Deny, Pass};
    use pb::PolicyTier::{Admin, Baseline};

    // Admin Deny of the friend wins over the NetworkPolicy that allows it; Admin Accept of the
    // stranger wins over the NetworkPolicy that does not.
    let admin = cluster_ingress("admin", Admin, 10, vec![(Deny, CLIENTS), (Accept, STRANGERS)]);
    lab.sync(&with_cluster_policies(plan(allow_friend(), sets()), vec![admin]));
    assert!(blocked(&lab.friend, SERVER, 80), "Admin Deny beats a NetworkPolicy allow");
    assert!(reaches(&lab.stranger, SERVER, 80), "Admin Accept beats NetworkPolicy isolation");

    // A higher-priority (lower number) Pass of the friend hands it to the NetworkPolicy, which
    // allows it; the Baseline Deny is never asked for an isolated pod.
    let pass = cluster_ingress("pass", Admin, 5, vec![(Pass, CLIENTS)]);
    let admin = cluster_ingress("admin", Admin, 10, vec![(Deny, CLIENTS)]);
    let baseline = cluster_ingress("baseline", Baseline, 0, vec![(Deny, CLIENTS)]);
    lab.sync(&with_cluster_policies(plan(allow_friend(), sets()), vec![pass, admin, baseline.clone()]));
    assert!(reaches(&lab.friend, SERVER, 80), "Pass, then the NetworkPolicy allows");
    assert!(blocked(&lab.stranger, SERVER, 80), "not allowed by the NetworkPolicy");

    // Without a NetworkPolicy, Baseline judges: it denies the friend, the rest stays open.
    lab.sync(&with_cluster_policies(plan(vec![], sets()), vec![baseline]));
    assert!(blocked(&lab.friend, SERVER, 80), "Baseline Deny");
    assert!(reaches(&lab.stranger, SERVER, 80), "what Baseline does not match is accepted");

    lab.sync(&PolicyPlan::default());
    assert!(reaches(&lab.friend, SERVER, 80));
}
