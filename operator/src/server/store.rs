//! The plan store: every node's current plan, and one coalescing queue per connected agent.
//!
//! The compiler publishes [`Update`]s here; each connected agent's queue merges them by resource
//! key, so a slow agent holds at most one pending version of each resource and never blocks the
//! others. Versions are content hashes, so the store can tell an agent that is already current
//! (after a reconnect, an operator restart, or a change that was undone) and send it nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use weft_api::plan::{self as pb, Resource, ResourceKey, plan_version};

use crate::plan::{Scope, Update};

#[derive(Debug, Default)]
struct NodeScope {
    resources: HashMap<ResourceKey, Arc<Resource>>,
    mix: u64,
}

/// The longest NACK text kept from an agent (status and Events carry it).
pub const MAX_NACK_BYTES: usize = 1024;

/// What an agent last told us about its node.
#[derive(Debug, Clone, Default)]
pub struct AgentReport {
    pub acked_version: u64,
    /// The last NACK, cleared by a later ACK.
    pub nack: Option<(u64, String)>,
    pub connected: bool,
    pub last_seen: Option<Instant>,
    /// Addresses in use per block (CIDR), as the agent last reported.
    pub ipam: HashMap<String, u32>,
    /// The plan generation of the message that carried `acked_version` (0 when unknown).
    pub acked_generation: u64,
    /// Kept by the store, not reported: since when the node's plan has differed from what its
    /// agent acknowledged; `None` while the node is converged. Drives the per-node lag metric.
    pub stale_since: Option<Instant>,
}

/// Convergence of one node, for status and metrics.
#[derive(Debug, Clone)]
pub struct NodeConvergence {
    pub node: String,
    pub desired_version: u64,
    pub report: AgentReport,
}

impl NodeConvergence {
    pub fn converged(&self) -> bool {
        self.report.acked_version == self.desired_version
    }

    /// How long the node has been behind its newest plan (zero when converged): the time since
    /// its plan first changed away from what its agent acknowledged.
    pub fn lag(&self, now: Instant) -> std::time::Duration {
        match self.report.stale_since {
            Some(since) if !self.converged() => now.saturating_duration_since(since),
            _ => std::time::Duration::ZERO,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    global: HashMap<ResourceKey, Arc<Resource>>,
    global_mix: u64,
    nodes: HashMap<String, NodeScope>,
    connections: HashMap<String, Arc<Connection>>,
    reports: HashMap<String, AgentReport>,
}

impl Inner {
    fn version(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).map(|n| plan_version(self.global_mix ^ n.mix))
    }

    fn resources_of<'a>(&'a self, scope: &'a NodeScope) -> impl Iterator<Item = &'a Arc<Resource>> {
        self.global.values().chain(scope.resources.values())
    }

    /// Starts the lag clock of every node whose plan now differs from what its agent acknowledged
    /// (a clock already running keeps its start: the node has been behind since then).
    fn mark_stale_nodes(&mut self, now: Instant) {
        let versions: Vec<(String, u64)> =
            self.nodes.keys().filter_map(|node| Some((node.clone(), self.version(node)?))).collect();
        for (node, version) in versions {
            let report = self.reports.entry(node).or_default();
            if report.acked_version == version {
                // Back to what the agent holds (a change undone): the next change starts afresh.
                report.stale_since = None;
            } else if report.stale_since.is_none() {
                report.stale_since = Some(now);
            }
        }
    }
}

#[derive(Debug)]
struct ConnState {
    /// The agent's Hello until its first message has been sent.
    hello: Option<pb::Hello>,
    pending: HashMap<ResourceKey, Option<Arc<Resource>>>,
    /// The version the agent holds once it has applied what was sent.
    sent_version: u64,
    /// The plan generation of the last message sent (what an ACK of `sent_version` stands for).
    sent_generation: u64,
    trace_context: HashMap<String, String>,
}

/// One agent's stream. Wake-ups are permits ([`tokio::sync::Notify`]), so none is lost between a
/// check and a wait.
#[derive(Debug)]
pub struct Connection {
    pub node: String,
    id: u64,
    state: Mutex<ConnState>,
    pub wake: tokio::sync::Notify,
}

impl Connection {
    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

#[derive(Debug, Default)]
pub struct PlanStore {
    inner: Mutex<Inner>,
    next_connection: std::sync::atomic::AtomicU64,
}

/// How a message was built, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Current,
    Snapshot,
    Delta,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Snapshot => "snapshot",
            Self::Delta => "delta",
        }
    }
}

impl PlanStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Applies the compiler's updates and queues them for the connected agents they concern.
    /// Returns the plan generation.
    pub fn publish(&self, updates: Vec<Update>, trace_context: HashMap<String, String>) -> u64 {
        let mut inner = self.inner();
        if updates.is_empty() {
            return inner.generation;
        }
        inner.generation += 1;
        let mut touched: HashMap<u64, Arc<Connection>> = HashMap::new();
        for update in updates {
            let Update { scope, key, resource } = update;
            match &scope {
                Scope::All => {
                    let old = match &resource {
                        Some(r) => inner.global.insert(key.clone(), r.clone()),
                        None => inner.global.remove(&key),
                    };
                    inner.global_mix ^= old.map_or(0, |o| key.mix(o.version))
                        ^ resource.as_ref().map_or(0, |r| key.mix(r.version));
                    for conn in inner.connections.values() {
                        conn.state().pending.insert(key.clone(), resource.clone());
                        touched.entry(conn.id).or_insert_with(|| conn.clone());
                    }
                }
                Scope::Node(node) => {
                    let scope = inner.nodes.entry(node.clone()).or_default();
                    let old = match &resource {
                        Some(r) => scope.resources.insert(key.clone(), r.clone()),
                        None => scope.resources.remove(&key),
                    };
                    scope.mix ^= old.map_or(0, |o| key.mix(o.version))
                        ^ resource.as_ref().map_or(0, |r| key.mix(r.version));
                    if scope.resources.is_empty() {
                        inner.nodes.remove(node);
                    }
                    if let Some(conn) = inner.connections.get(node) {
                        conn.state().pending.insert(key, resource);
                        touched.entry(conn.id).or_insert_with(|| conn.clone());
                    }
                }
            }
        }
        for conn in touched.values() {
            // Updates waiting for the same message coalesce; the message carries the trace of the
            // oldest, which waited longest: that trace shows the whole delay to the datapath.
            let mut state = conn.state();
            if state.trace_context.is_empty() {
                state.trace_context.clone_from(&trace_context);
            }
            drop(state);
            conn.wake.notify_one();
        }
        inner.mark_stale_nodes(Instant::now());
        inner.generation
    }

    /// Registers an agent's stream; a newer stream for the same node replaces an older one.
    pub fn connect(&self, hello: pb::Hello) -> Arc<Connection> {
        let id = self.next_connection.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = Arc::new(Connection {
            node: hello.node.clone(),
            id,
            state: Mutex::new(ConnState {
                hello: Some(hello),
                pending: HashMap::new(),
                sent_version: 0,
                sent_generation: 0,
                trace_context: HashMap::new(),
            }),
            wake: tokio::sync::Notify::new(),
        });
        let mut inner = self.inner();
        if let Some(old) = inner.connections.insert(conn.node.clone(), conn.clone()) {
            // Wake the replaced stream so its sender notices and ends.
            old.wake.notify_one();
        }
        let report = inner.reports.entry(conn.node.clone()).or_default();
        report.connected = true;
        report.last_seen = Some(Instant::now());
        conn.wake.notify_one();
        conn
    }

    /// Whether `conn` is still the node's current stream.
    pub fn is_current(&self, conn: &Connection) -> bool {
        self.inner().connections.get(&conn.node).is_some_and(|c| c.id == conn.id)
    }

    pub fn disconnect(&self, conn: &Connection) {
        let mut inner = self.inner();
        if inner.connections.get(&conn.node).is_some_and(|c| c.id == conn.id) {
            inner.connections.remove(&conn.node);
            if let Some(report) = inner.reports.get_mut(&conn.node) {
                report.connected = false;
            }
        }
    }

    /// The next message for `conn`, or `None` when there is nothing to send: the node is not in
    /// the plan yet, or what is pending leaves the agent's version unchanged (never a no-op).
    pub fn next_message(&self, conn: &Connection) -> Option<(MessageKind, pb::PlanMessage)> {
        let inner = self.inner();
        let mut state = conn.state();
        let Some(scope) = inner.nodes.get(&conn.node) else {
            state.pending.clear();
            return None;
        };
        let version = plan_version(inner.global_mix ^ scope.mix);
        let trace_context = std::mem::take(&mut state.trace_context);
        let message =
            |body| pb::PlanMessage { version, generation: inner.generation, body: Some(body), trace_context };

        if let Some(hello) = state.hello.take() {
            state.pending.clear();
            state.sent_version = version;
            state.sent_generation = inner.generation;
            if hello.version == version {
                return Some((
                    MessageKind::Current,
                    message(pb::plan_message::Body::Current(pb::Current {})),
                ));
            }
            if hello.resources.is_empty() {
                let resources = inner.resources_of(scope).map(|r| (**r).clone()).collect();
                let body = pb::plan_message::Body::Snapshot(pb::Snapshot { resources });
                return Some((MessageKind::Snapshot, message(body)));
            }
            // Resume: only the difference from what the agent holds.
            let held: HashMap<ResourceKey, u64> =
                hello.resources.iter().map(|r| (r.key(), r.version)).collect();
            let upserts = inner
                .resources_of(scope)
                .filter(|r| held.get(&r.key()) != Some(&r.version))
                .map(|r| (**r).clone())
                .collect();
            let removals = hello
                .resources
                .iter()
                .filter(|r| {
                    let key = r.key();
                    !inner.global.contains_key(&key) && !scope.resources.contains_key(&key)
                })
                .cloned()
                .collect();
            let body = pb::plan_message::Body::Delta(pb::Delta { upserts, removals });
            return Some((MessageKind::Delta, message(body)));
        }

        let pending = std::mem::take(&mut state.pending);
        if pending.is_empty() || version == state.sent_version {
            return None;
        }
        state.sent_version = version;
        state.sent_generation = inner.generation;
        let mut delta = pb::Delta::default();
        for (key, resource) in pending {
            match resource {
                Some(r) => delta.upserts.push((*r).clone()),
                None => delta.removals.push(pb::ResourceRef { kind: key.kind, name: key.name, version: 0 }),
            }
        }
        Some((MessageKind::Delta, message(pb::plan_message::Body::Delta(delta))))
    }

    pub fn ack(&self, node: &str, version: u64) {
        let mut inner = self.inner();
        let generation = inner
            .connections
            .get(node)
            .map(|c| {
                let state = c.state();
                (state.sent_version == version).then_some(state.sent_generation)
            })
            .unwrap_or_default();
        let current = inner.version(node) == Some(version);
        let report = inner.reports.entry(node.to_string()).or_default();
        report.acked_version = version;
        if let Some(generation) = generation {
            report.acked_generation = generation;
        }
        if current {
            report.stale_since = None;
        }
        report.nack = None;
        report.last_seen = Some(Instant::now());
    }

    /// Records a NACK. Its text goes into NetworkConfig status and an Event, so an agent's error
    /// is kept to [`MAX_NACK_BYTES`] (cut at a character boundary, marked).
    pub fn nack(&self, node: &str, version: u64, mut error: String) {
        if error.len() > MAX_NACK_BYTES {
            let cut = (0..=MAX_NACK_BYTES).rev().find(|&i| error.is_char_boundary(i)).unwrap_or(0);
            error.truncate(cut);
            error.push_str(" … (truncated)");
        }
        let mut inner = self.inner();
        let report = inner.reports.entry(node.to_string()).or_default();
        report.nack = Some((version, error));
        report.last_seen = Some(Instant::now());
    }

    pub fn ipam_report(&self, node: &str, blocks: Vec<pb::BlockUsage>) {
        let mut inner = self.inner();
        let report = inner.reports.entry(node.to_string()).or_default();
        report.ipam = blocks.into_iter().map(|b| (b.cidr, b.used)).collect();
        report.last_seen = Some(Instant::now());
    }

    /// Addresses in use per block (CIDR) across all nodes, as their agents reported.
    pub fn ipam_usage(&self) -> HashMap<String, u32> {
        let inner = self.inner();
        inner.reports.values().flat_map(|r| r.ipam.iter().map(|(c, u)| (c.clone(), *u))).collect()
    }

    /// Addresses in use per block (CIDR), as reported by the agents connected now.
    pub fn live_ipam_usage(&self) -> HashMap<String, u32> {
        let inner = self.inner();
        inner
            .reports
            .values()
            .filter(|r| r.connected)
            .flat_map(|r| r.ipam.iter().map(|(c, u)| (c.clone(), *u)))
            .collect()
    }

    pub fn generation(&self) -> u64 {
        self.inner().generation
    }

    pub fn node_version(&self, node: &str) -> Option<u64> {
        self.inner().version(node)
    }

    pub fn connected_agents(&self) -> usize {
        self.inner().connections.len()
    }

    /// Every node in the plan with what its agent last reported, sorted by name.
    pub fn convergence(&self) -> Vec<NodeConvergence> {
        let inner = self.inner();
        let mut out: Vec<NodeConvergence> = inner
            .nodes
            .keys()
            .filter_map(|node| {
                Some(NodeConvergence {
                    node: node.clone(),
                    desired_version: inner.version(node)?,
                    report: inner.reports.get(node).cloned().unwrap_or_default(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// Every resource of a node's current plan (tests and debugging).
    pub fn plan_of(&self, node: &str) -> Option<Vec<Resource>> {
        let inner = self.inner();
        let scope = inner.nodes.get(node)?;
        Some(inner.resources_of(scope).map(|r| (**r).clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use weft_api::plan::Kind;

    fn peer(name: &str, ip: &str) -> Update {
        let payload = pb::PeerNode { name: name.into(), node_ip: ip.into(), blocks: vec![] };
        Update {
            scope: Scope::All,
            key: ResourceKey::new(Kind::Peer, name),
            resource: Some(Arc::new(Resource::encode(Kind::Peer, name, &payload))),
        }
    }

    fn node(name: &str) -> Update {
        let payload = pb::NodePlan { name: name.into(), ..Default::default() };
        Update {
            scope: Scope::Node(name.into()),
            key: ResourceKey::new(Kind::Node, "node"),
            resource: Some(Arc::new(Resource::encode(Kind::Node, "node", &payload))),
        }
    }

    fn hello(node: &str) -> pb::Hello {
        pb::Hello { node: node.into(), ..Default::default() }
    }

    fn delta(message: &pb::PlanMessage) -> &pb::Delta {
        match &message.body {
            Some(pb::plan_message::Body::Delta(d)) => d,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn a_slow_agent_gets_the_latest_of_each_resource_once() {
        let store = PlanStore::new();
        store.publish(vec![node("n1")], HashMap::new());
        let conn = store.connect(hello("n1"));
        assert_eq!(store.next_message(&conn).map(|(k, _)| k), Some(MessageKind::Snapshot));
        for i in 0..100 {
            store.publish(vec![peer("n2", &format!("172.18.0.{i}"))], HashMap::new());
        }
        let (kind, message) = store.next_message(&conn).expect("a delta");
        assert_eq!(kind, MessageKind::Delta);
        assert_eq!(delta(&message).upserts.len(), 1, "100 updates of one resource coalesce into one");
        let last: pb::PeerNode = delta(&message).upserts[0].decode().expect("peer");
        assert_eq!(last.node_ip, "172.18.0.99");
        assert_eq!(Some(message.version), store.node_version("n1"));
        assert!(store.next_message(&conn).is_none());
    }

    #[test]
    fn a_nack_text_is_kept_to_its_bound_and_says_it_was_cut() {
        let store = PlanStore::new();
        store.publish(vec![node("n1")], HashMap::new());
        store.nack("n1", 1, "é".repeat(5000));
        let report = store.convergence().into_iter().find(|c| c.node == "n1").expect("n1").report;
        let (_, text) = report.nack.expect("the NACK");
        assert!(text.len() <= MAX_NACK_BYTES + " … (truncated)".len(), "{} bytes", text.len());
        assert!(text.ends_with("(truncated)") && text.starts_with("éé"), "{text}");
        store.nack("n1", 2, "nginx -t: bad".into());
        let report = store.convergence().into_iter().find(|c| c.node == "n1").expect("n1").report;
        assert_eq!(report.nack, Some((2, "nginx -t: bad".to_string())), "a short text is kept whole");
    }

    #[test]
    fn a_node_lags_from_the_first_change_it_has_not_acknowledged_until_it_acks_the_newest() {
        let store = PlanStore::new();
        store.publish(vec![node("n1")], HashMap::new());
        let conn = store.connect(hello("n1"));
        let (_, first) = store.next_message(&conn).expect("snapshot");
        store.ack("n1", first.version);
        let lag = |at| store.convergence()[0].lag(at);
        assert_eq!(lag(Instant::now()), Duration::ZERO, "converged");
        assert_eq!(store.convergence()[0].report.acked_generation, 1);

        store.publish(vec![peer("n2", "172.18.0.2")], HashMap::new());
        let since = store.convergence()[0].report.stale_since.expect("the lag clock runs");
        store.publish(vec![peer("n3", "172.18.0.3")], HashMap::new());
        assert_eq!(store.convergence()[0].report.stale_since, Some(since), "a second change keeps the start");
        assert_eq!(lag(since + Duration::from_secs(5)), Duration::from_secs(5));

        let (_, newest) = store.next_message(&conn).expect("delta");
        store.ack("n1", first.version);
        assert!(
            lag(since + Duration::from_secs(5)) > Duration::ZERO,
            "acking an older version is not converging"
        );
        store.ack("n1", newest.version);
        assert_eq!(lag(since + Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(store.convergence()[0].report.acked_generation, 3);
    }

    #[test]
    fn a_change_undone_stops_the_lag_clock_and_the_next_change_starts_it_afresh() {
        let store = PlanStore::new();
        store.publish(vec![node("n1"), peer("n2", "172.18.0.2")], HashMap::new());
        let conn = store.connect(hello("n1"));
        let (_, first) = store.next_message(&conn).expect("snapshot");
        store.ack("n1", first.version);

        store.publish(vec![peer("n2", "172.18.0.3")], HashMap::new());
        let since = store.convergence()[0].report.stale_since.expect("the lag clock runs");
        store.publish(vec![peer("n2", "172.18.0.2")], HashMap::new());
        assert_eq!(store.convergence()[0].report.stale_since, None, "back to what the agent holds");
        std::thread::sleep(Duration::from_millis(5));
        store.publish(vec![peer("n2", "172.18.0.4")], HashMap::new());
        let again = store.convergence()[0].report.stale_since.expect("the lag clock runs again");
        assert!(again > since, "the lag counts from the new change, not the undone one");
    }

    #[test]
    fn a_change_undone_before_sending_sends_nothing() {
        let store = PlanStore::new();
        store.publish(vec![node("n1"), peer("n2", "172.18.0.2")], HashMap::new());
        let conn = store.connect(hello("n1"));
        assert!(store.next_message(&conn).is_some());
        store.publish(vec![peer("n2", "172.18.0.3")], HashMap::new());
        store.publish(vec![peer("n2", "172.18.0.2")], HashMap::new());
        assert!(store.next_message(&conn).is_none(), "no no-op messages");
    }

    #[test]
    fn an_agent_that_holds_the_current_plan_is_told_so_and_one_behind_gets_the_difference() {
        let store = PlanStore::new();
        store.publish(vec![node("n1"), peer("n2", "172.18.0.2"), peer("n3", "172.18.0.3")], HashMap::new());
        let plan = store.plan_of("n1").expect("plan");
        let current = pb::Hello {
            node: "n1".into(),
            version: store.node_version("n1").unwrap_or_default(),
            resources: plan.iter().map(Resource::reference).collect(),
            agent_version: String::new(),
        };
        let conn = store.connect(current.clone());
        let (kind, message) = store.next_message(&conn).expect("current");
        assert_eq!(kind, MessageKind::Current);
        assert!(prost::Message::encoded_len(&message) < 32, "\"you are current\" costs next to nothing");

        store.publish(vec![peer("n3", "172.18.0.33")], HashMap::new());
        let conn = store.connect(current);
        let (kind, message) = store.next_message(&conn).expect("delta");
        assert_eq!(kind, MessageKind::Delta);
        let names: Vec<&str> = delta(&message).upserts.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["n3"]);
    }

    #[test]
    fn an_agent_of_an_unknown_node_waits() {
        let store = PlanStore::new();
        store.publish(vec![peer("n2", "172.18.0.2")], HashMap::new());
        let conn = store.connect(hello("n1"));
        assert!(store.next_message(&conn).is_none());
        store.publish(vec![node("n1")], HashMap::new());
        assert_eq!(store.next_message(&conn).map(|(k, _)| k), Some(MessageKind::Snapshot));
    }
}
