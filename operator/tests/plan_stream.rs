//! The plan stream end to end, in one process: the operator's plan server over real gRPC on
//! loopback, several real agents with their own state dirs, and cluster changes compiled by the
//! real compiler. What an admin would check: every node converges to its plan version; an agent
//! that reconnects while current receives nothing but "current"; an operator restart costs the
//! agents nothing and never flushes what they applied; a plan a node cannot apply is NACKed while
//! the node keeps its last good state.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::watch;
use weft_agent::metrics::AgentMetrics;
use weft_agent::{AgentConfig, AgentStatus};
use weft_operator::plan::Compiler;
use weft_operator::plan::model::*;
use weft_operator::server::metrics::PlanMetrics;
use weft_operator::server::{AgentAuth, PlanServer, PlanStore};

const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// A ClusterIP Service with one TCP port.
fn service(key: ObjectKey, cluster_ip: Ipv4Addr, port_name: &str, port: u16, target: u16) -> Service {
    Service {
        key,
        cluster_ip: Some(cluster_ip),
        external_ips: vec![],
        load_balancer_ips: vec![],
        ports: vec![ServicePort {
            name: port_name.into(),
            protocol: Protocol::Tcp,
            port,
            node_port: None,
            target_port: TargetPort::Number(target),
        }],
        affinity_timeout_seconds: None,
        external_local: false,
        health_check_node_port: None,
        internal_local: false,
        traffic_distribution: TopologyMode::None,
        policy: ProxyOverrides::default(),
    }
}

fn cluster(endpoints: u8, cni_conf_dir: &str) -> Vec<Change> {
    let mut changes: Vec<Change> = NODES
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Change::Node(Node {
                name: n.to_string(),
                ip: Some(Ipv4Addr::new(172, 18, 0, 10 + i as u8)),
                zone: Some("zone-a".into()),
                labels: BTreeMap::new(),
            })
        })
        .collect();
    changes
        .push(Change::Network(NetworkSettings { cni_conf_dir: cni_conf_dir.into(), ..Default::default() }));
    changes.push(Change::Service(service(
        ObjectKey::new("default", "web"),
        Ipv4Addr::new(10, 96, 0, 50),
        "",
        9000,
        80,
    )));
    changes.push(Change::Slice(EndpointSlice {
        key: ObjectKey::new("default", "web-abc"),
        service: "web".into(),
        ports: vec![SlicePort { name: String::new(), protocol: Protocol::Tcp, port: 80 }],
        endpoints: (1..=endpoints)
            .map(|i| Endpoint {
                ip: Ipv4Addr::new(10, 244, 0, i),
                ready: true,
                serving: true,
                terminating: false,
                node: Some(NODES[usize::from(i) % 3].to_string()),
                zone: None,
                hint_zones: vec![],
            })
            .collect(),
        trigger_unix_ms: None,
    }));
    changes
}

/// The operator's plan server on a runtime of its own, so stopping it drops every connection at
/// once, as a crashed or restarted operator process does.
struct Operator {
    store: Arc<PlanStore>,
    compiler: Compiler,
    runtime: tokio::runtime::Runtime,
}

impl Operator {
    /// Starts a plan server on `addr` (port 0 picks one) with the cluster compiled from scratch,
    /// as a restarted operator does after its initial list.
    fn start(addr: SocketAddr, state: Vec<Change>) -> (Self, SocketAddr) {
        Self::start_replica(addr, state, None)
    }

    /// Like [`Operator::start`], serving streams only while `leader` holds true when given.
    fn start_replica(
        addr: SocketAddr,
        state: Vec<Change>,
        leader: Option<watch::Receiver<bool>>,
    ) -> (Self, SocketAddr) {
        let (compiler, updates) = Compiler::full(state);
        let store = Arc::new(PlanStore::new());
        store.publish(updates, Default::default());
        // The previous operator's runtime shuts down in the background: wait for its port.
        let mut attempts = 0;
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(_) if attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let mut server = PlanServer::new(store.clone(), PlanMetrics::default(), AgentAuth::Trusting);
        if let Some(leader) = leader {
            server = server.leading_only(leader);
        }
        let service = server.into_service();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ =
                tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        (Self { store, compiler, runtime }, addr)
    }

    fn change(&mut self, changes: Vec<Change>) {
        for c in changes {
            self.compiler.apply(c);
        }
        self.store.publish(self.compiler.flush(), Default::default());
    }

    fn stop(self) {
        self.runtime.shutdown_background();
    }
}

struct Agent {
    node: &'static str,
    dir: PathBuf,
    status: watch::Receiver<AgentStatus>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), weft_agent::client::AgentError>>,
}

impl Agent {
    fn start(node: &'static str, dir: &Path, operator: SocketAddr) -> Self {
        // An unreachable endpoint first: the agent must move on to the one that answers.
        Self::start_with(node, dir, vec!["http://127.0.0.1:1".into(), format!("http://{operator}")])
    }

    fn start_with(node: &'static str, dir: &Path, operators: Vec<String>) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let config = AgentConfig {
            node_name: node.into(),
            operators,
            plan_token_file: None,
            operator_ca_file: None,
            state_dir: dir.to_path_buf(),
            retry_interval: Duration::from_millis(200),
            cni: Default::default(),
            dns: Default::default(),
            ingress: Default::default(),
            // In-process agents: record the rules instead of writing them into the host.
            proxy_runner: weft_agent::exec::Runner::recording(),
        };
        let (task, status) = weft_agent::spawn(config, AgentMetrics::default(), stop_rx);
        Self { node, dir: dir.to_path_buf(), status, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    async fn wait_applied(&mut self, version: u64) -> AgentStatus {
        let mut status = self.status.clone();
        let waited =
            tokio::time::timeout(Duration::from_secs(20), status.wait_for(|s| s.applied_version == version));
        if let Ok(Ok(s)) = waited.await {
            return s.clone();
        }
        panic!("{} did not apply version {version:016x}: {:?}", self.node, *self.status.borrow())
    }

    /// The agent's record for `programmer`, once the records of the plan it holds are written
    /// (they follow the ACK, off the plan's path). Versions are content hashes: only equality
    /// says anything.
    fn programmed(&self, programmer: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while {
            let s = self.status.borrow();
            // An agent resumed from its saved plan has received nothing yet.
            let held = if s.received_version != 0 { s.received_version } else { s.applied_version };
            s.recorded_version != held
        } {
            assert!(
                std::time::Instant::now() < deadline,
                "{} records lag: {:?}",
                self.node,
                *self.status.borrow()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::read_to_string(self.dir.join("programmed").join(format!("{programmer}.txt")))
            .unwrap_or_default()
    }
}

/// Every agent applied its node's version, and the operator heard every ACK.
async fn converge(operator: &Operator, agents: &mut [Agent]) {
    for agent in agents.iter_mut() {
        let version = operator.store.node_version(agent.node).expect("node in plan");
        agent.wait_applied(version).await;
    }
    let acked = async {
        while !operator.store.convergence().iter().all(|c| c.converged()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), acked).await.expect("the operator hears every ACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_converge_resume_and_survive_an_operator_restart() {
    let dirs: Vec<TempDir> = NODES.iter().map(|_| TempDir::new().expect("tempdir")).collect();
    let (mut operator, addr) =
        Operator::start("127.0.0.1:0".parse().expect("addr"), cluster(2, "/etc/cni/net.d"));
    let mut agents: Vec<Agent> =
        NODES.iter().zip(&dirs).map(|(n, d)| Agent::start(n, d.path(), addr)).collect();

    // Every node converges to its own version, from a snapshot.
    converge(&operator, &mut agents).await;
    for agent in &agents {
        assert!(
            agent.programmed("proxy").contains("service default/web 10.96.0.50:9000"),
            "{}",
            agent.programmed("proxy")
        );
        assert!(agent.programmed("proxy").contains("10.244.0.2:80"));
        assert_eq!(agent.status.borrow().snapshots, 1);
    }

    // One endpoint more: a delta, applied everywhere.
    operator.change(cluster(3, "/etc/cni/net.d"));
    converge(&operator, &mut agents).await;
    for agent in &agents {
        assert!(agent.programmed("proxy").contains("10.244.0.3:80"));
        assert!(agent.status.borrow().deltas >= 1);
        assert_eq!(agent.status.borrow().snapshots, 1, "a change is a delta, never a new snapshot");
    }

    // An agent restarting while current receives nothing but "current".
    let a = agents.remove(0);
    let dir = a.dir.clone();
    a.stop().await;
    let mut restarted = Agent::start("n1", &dir, addr);
    restarted.wait_applied(operator.store.node_version("n1").expect("n1")).await;
    tokio::time::timeout(Duration::from_secs(10), restarted.status.wait_for(|s| s.currents == 1))
        .await
        .expect("current")
        .expect("status");
    let s = restarted.status.borrow().clone();
    assert_eq!((s.snapshots, s.deltas, s.currents), (0, 0, 1), "a current agent gets only \"current\"");
    agents.insert(0, restarted);

    // Operator restart with an unchanged cluster: agents stay current, nothing is flushed while
    // it is away.
    let before: Vec<String> = agents.iter().map(|a| a.programmed("proxy")).collect();
    operator.stop();
    for agent in &mut agents {
        tokio::time::timeout(Duration::from_secs(10), agent.status.wait_for(|s| !s.connected))
            .await
            .expect("the agent notices the operator is gone")
            .expect("status");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during: Vec<String> = agents.iter().map(|a| a.programmed("proxy")).collect();
    assert_eq!(before, during, "a broken stream flushes nothing");
    let counts: Vec<(u64, u64)> =
        agents.iter().map(|a| (a.status.borrow().snapshots, a.status.borrow().deltas)).collect();
    let currents: Vec<u64> = agents.iter().map(|a| a.status.borrow().currents).collect();
    let (operator, _) = Operator::start(addr, cluster(3, "/etc/cni/net.d"));
    for (agent, currents) in agents.iter_mut().zip(currents) {
        let mut status = agent.status.clone();
        let reconnected = tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| s.connected && s.currents > currents),
        );
        assert!(
            matches!(reconnected.await, Ok(Ok(_))),
            "{} did not resume: {:?}",
            agent.node,
            *agent.status.borrow()
        );
    }
    let after: Vec<(u64, u64)> =
        agents.iter().map(|a| (a.status.borrow().snapshots, a.status.borrow().deltas)).collect();
    assert_eq!(counts, after, "the restarted operator computes the same versions: nothing to resend");
    assert_eq!(before, agents.iter().map(|a| a.programmed("proxy")).collect::<Vec<_>>());
    operator.stop();

    // Operator restart with a changed cluster: only the difference is sent.
    let (mut operator, _) = Operator::start(addr, cluster(4, "/etc/cni/net.d"));
    converge(&operator, &mut agents).await;
    for (agent, (snapshots, deltas)) in agents.iter().zip(&counts) {
        assert!(agent.programmed("proxy").contains("10.244.0.4:80"));
        assert_eq!(agent.status.borrow().snapshots, *snapshots, "resumed with a delta, not a snapshot");
        assert_eq!(agent.status.borrow().deltas, deltas + 1);
    }

    // A plan a node cannot apply is NACKed; the node keeps its last good CNI state and the rest
    // of the plan still applies; fixing the plan brings an ACK.
    let cni_before = agents[1].programmed("cni");
    operator.change(cluster(5, "relative/cni"));
    let target = operator.store.node_version("n2").expect("n2");
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let report =
                operator.store.convergence().into_iter().find(|c| c.node == "n2").expect("n2").report;
            if report.nack.as_ref().is_some_and(|(v, _)| *v == target) {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .map(|report| {
        let (_, error) = report.nack.expect("nack");
        assert!(error.contains("must be an absolute path"), "{error}");
    })
    .expect("the operator hears the NACK");
    assert_eq!(agents[1].programmed("cni"), cni_before, "fail-static: the last good CNI state stays");
    assert!(agents[1].programmed("proxy").contains("10.244.0.5:80"), "other programmers still apply");
    operator.change(cluster(5, "/etc/cni/net.d"));
    converge(&operator, &mut agents).await;
    assert!(operator.store.convergence().iter().all(|c| c.converged() && c.report.nack.is_none()));

    for agent in agents {
        agent.stop().await;
    }
    operator.stop();
}

/// A cluster of `services` Services, each with an EndpointSlice of 20 endpoints spread over the
/// nodes.
fn many_services(services: u32) -> Vec<Change> {
    let mut changes = cluster(1, "/tmp/weft-plan-stream-cni");
    for i in 0..services {
        let name = format!("svc-{i}");
        let [_, _, b, c] = (0x0a60_0000 + 16 + i).to_be_bytes();
        changes.push(Change::Service(service(
            ObjectKey::new("bulk", &name),
            Ipv4Addr::new(10, 96, b, c),
            "http",
            80,
            8080,
        )));
        changes.push(Change::Slice(EndpointSlice {
            key: ObjectKey::new("bulk", format!("{name}-x")),
            service: name,
            ports: vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
            endpoints: (0..20u32)
                .map(|e| {
                    let [_, b, c, d] = (0x0af4_0000 + i * 20 + e).to_be_bytes();
                    Endpoint {
                        ip: Ipv4Addr::new(10, b, c, d),
                        ready: true,
                        serving: true,
                        terminating: false,
                        node: Some(NODES[e as usize % NODES.len()].to_string()),
                        zone: None,
                        hint_zones: vec![],
                    }
                })
                .collect(),
            trigger_unix_ms: None,
        }));
    }
    changes
}

/// A snapshot above gRPC's default 4 MiB decode limit arrives and is applied (20,000 Services).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_of_twenty_thousand_services_arrives_whole() {
    use prost::Message as _;
    let (operator, addr) = Operator::start("127.0.0.1:0".parse().expect("addr"), many_services(20_000));
    let bytes: usize =
        operator.store.plan_of("n1").expect("n1 has a plan").iter().map(|r| r.encoded_len()).sum();
    assert!(
        bytes > 4 << 20,
        "the snapshot ({bytes} bytes) must exceed gRPC's default 4 MiB to prove anything"
    );
    let dir = TempDir::new().expect("tempdir");
    let mut agent = Agent::start("n1", dir.path(), addr);
    let version = operator.store.node_version("n1").expect("n1 in plan");
    let applied = tokio::time::timeout(
        Duration::from_secs(120),
        agent.status.wait_for(|s| s.applied_version == version),
    )
    .await
    .map(|s| s.map(|s| s.clone()));
    let Ok(Ok(status)) = applied else {
        panic!("n1 did not apply the {bytes}-byte snapshot: {:?}", *agent.status.borrow())
    };
    assert_eq!(status.applied_version, version);
    assert!(agent.programmed("proxy").contains("svc-19999"), "the last Service reached the proxy");
    agent.stop().await;
    operator.stop();
}

/// `agent` applied its node's version, and `operator` heard its ACK.
async fn converge_node(operator: &Operator, agent: &mut Agent) {
    let version = operator.store.node_version(agent.node).expect("node in plan");
    agent.wait_applied(version).await;
    let acked = async {
        while !operator.store.convergence().iter().any(|c| c.node == agent.node && c.converged()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), acked).await.expect("the operator hears the ACK");
}

/// Two replicas, as the Deployment runs them: only the Lease holder serves plan streams. The
/// agent lists the follower first; it ends up on the leader, whose store alone hears its ACKs.
/// When the Lease moves, the old leader ends the stream and the agent follows to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_serves_plan_streams_and_agents_follow_the_lease() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (a_leads, a_leader) = watch::channel(false);
    let (b_leads, b_leader) = watch::channel(true);
    let (a, a_addr) = Operator::start_replica(any, cluster(3, "/etc/cni/net.d"), Some(a_leader));
    let (b, b_addr) = Operator::start_replica(any, cluster(3, "/etc/cni/net.d"), Some(b_leader));
    let dir = TempDir::new().expect("tempdir");
    let mut agent =
        Agent::start_with("n1", dir.path(), vec![format!("http://{a_addr}"), format!("http://{b_addr}")]);
    converge_node(&b, &mut agent).await;
    assert_eq!(a.store.connected_agents(), 0, "the follower holds no stream");

    let _ = b_leads.send(false);
    let _ = a_leads.send(true);
    let moved = async {
        while a.store.connected_agents() == 0 || b.store.connected_agents() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), moved)
        .await
        .expect("the agent leaves the old leader for the new one");
    converge_node(&a, &mut agent).await;
    agent.stop().await;
    a.stop();
    b.stop();
}
