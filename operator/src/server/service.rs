//! The `PlanService` gRPC implementation: one sender and one receiver task per agent stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};
use weft_api::plan::{self as pb, plan_service_server::PlanService};

use super::auth::{self, AgentAuth, AuthError};
use super::metrics::{KindLabel, NodeLabel, PlanMetrics, ReasonLabel};
use super::store::{Connection, PlanStore};

#[derive(Debug, Clone)]
pub struct PlanServer {
    store: Arc<PlanStore>,
    metrics: PlanMetrics,
    auth: AgentAuth,
    leader: Option<watch::Receiver<bool>>,
}

impl PlanServer {
    pub fn new(store: Arc<PlanStore>, metrics: PlanMetrics, auth: AgentAuth) -> Self {
        Self { store, metrics, auth, leader: None }
    }

    /// Serves plan streams only while `leader` says this replica holds the Lease: a follower
    /// refuses them with `Unavailable` (the agent tries the next address) and a replica that
    /// loses the Lease ends its streams. So every agent's ACKs, NACKs and IPAM use reach the one
    /// replica that writes status and claims blocks.
    pub fn leading_only(mut self, leader: watch::Receiver<bool>) -> Self {
        self.leader = Some(leader);
        self
    }

    fn refuse(&self, e: AuthError) -> Status {
        warn!(error = %e, "plan stream refused");
        self.metrics.auth_refusals.get_or_create(&ReasonLabel { reason: e.reason() }).inc();
        e.into()
    }

    pub fn into_service(self) -> pb::plan_service_server::PlanServiceServer<Self> {
        // A Hello names every resource the agent holds: as large as its plan.
        pb::plan_service_server::PlanServiceServer::new(self).max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
    }
}

/// What a replica that does not hold the Lease answers a plan stream.
const NOT_LEADER: &str = "this operator replica is not the leader: only the leader serves plan streams";

type PlanStream = Pin<Box<dyn Stream<Item = Result<pb::PlanMessage, Status>> + Send>>;

#[tonic::async_trait]
impl PlanService for PlanServer {
    type WatchStream = PlanStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<PlanStream>, Status> {
        let authenticated = {
            let span = info_span!("plan.authenticate");
            self.auth.node(request.metadata()).instrument(span).await.map_err(|e| self.refuse(e))?
        };
        if self.leader.as_ref().is_some_and(|l| !*l.borrow()) {
            self.metrics.auth_refusals.get_or_create(&ReasonLabel { reason: "not_leader" }).inc();
            return Err(Status::unavailable(NOT_LEADER));
        }
        let mut inbound = request.into_inner();
        let first =
            inbound.message().await?.ok_or_else(|| Status::invalid_argument("stream closed before Hello"))?;
        let Some(pb::agent_message::Kind::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument("the first message on a plan stream must be Hello"));
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("Hello.node is empty: the agent must name its Node"));
        }
        auth::check_hello(authenticated.as_deref(), &hello.node).map_err(|e| self.refuse(e))?;
        let span = info_span!("plan.stream", node = %hello.node);
        span.in_scope(|| {
            info!(version = hello.version, held = hello.resources.len(), agent = %hello.agent_version, "agent connected")
        });
        let conn = self.store.connect(hello);
        self.metrics.agents_connected.set(self.store.connected_agents() as i64);

        // Capacity 1: a slow agent backs up here while its queue in the store keeps coalescing.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(
            send_loop(self.store.clone(), conn.clone(), tx, self.metrics.clone(), self.leader.clone())
                .instrument(span.clone()),
        );
        tokio::spawn(receive_loop(self.store.clone(), conn, inbound, self.metrics.clone()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn send_loop(
    store: Arc<PlanStore>,
    conn: Arc<Connection>,
    tx: mpsc::Sender<Result<pb::PlanMessage, Status>>,
    metrics: PlanMetrics,
    mut leader: Option<watch::Receiver<bool>>,
) {
    loop {
        if !store.is_current(&conn) {
            return;
        }
        if leader.as_ref().is_some_and(|l| !*l.borrow()) {
            info!("leadership lost: ending the plan stream so the agent moves to the new leader");
            let _ = tx.send(Err(Status::unavailable(NOT_LEADER))).await;
            return;
        }
        if let Some((kind, message)) = store.next_message(&conn) {
            let span = info_span!("plan.send", kind = kind.as_str(), version = message.version);
            if let Some(parent) = (!message.trace_context.is_empty()).then_some(&message.trace_context) {
                weft_api::telemetry::set_parent_from(&span, parent);
            }
            let mut message = message;
            span.in_scope(|| message.trace_context = weft_api::telemetry::inject_current());
            metrics.messages_sent.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
            let bytes = message.encoded_len() as u64;
            metrics.bytes_sent.inc_by(bytes);
            metrics.node_bytes_sent.get_or_create(&NodeLabel::new(&conn.node)).inc_by(bytes);
            if tx.send(Ok(message)).instrument(span).await.is_err() {
                return;
            }
            continue;
        }
        let lost = async {
            match leader.as_mut() {
                // A closed channel (the Lease manager gone) changes nothing any more.
                Some(l) => {
                    if l.wait_for(|leads| !*leads).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = conn.wake.notified() => {}
            () = lost => {}
            () = tx.closed() => return,
        }
    }
}

async fn receive_loop(
    store: Arc<PlanStore>,
    conn: Arc<Connection>,
    mut inbound: Streaming<pb::AgentMessage>,
    metrics: PlanMetrics,
) {
    loop {
        match inbound.message().await {
            Ok(Some(message)) => match message.kind {
                Some(pb::agent_message::Kind::Ack(ack)) => {
                    // Closes the change's trace: the agent's apply span is this span's parent.
                    let span = info_span!("plan.ack", version = ack.version);
                    weft_api::telemetry::set_parent_from(&span, &message.trace_context);
                    let _enter = span.enter();
                    metrics.acks.inc();
                    let node = NodeLabel::new(&conn.node);
                    metrics.node_acks.get_or_create(&node).inc();
                    // Exported at 0 from the first ACK on, so "NACKs per node" has a series.
                    drop(metrics.node_nacks.get_or_create(&node));
                    store.ack(&conn.node, ack.version);
                }
                Some(pb::agent_message::Kind::Nack(nack)) => {
                    let span = info_span!("plan.nack", version = nack.version);
                    weft_api::telemetry::set_parent_from(&span, &message.trace_context);
                    let _enter = span.enter();
                    metrics.nacks.inc();
                    metrics.node_nacks.get_or_create(&NodeLabel::new(&conn.node)).inc();
                    warn!(version = nack.version, error = %nack.error, "agent could not apply its plan");
                    store.nack(&conn.node, nack.version, nack.error);
                }
                Some(pb::agent_message::Kind::Ipam(report)) => store.ipam_report(&conn.node, report.blocks),
                Some(pb::agent_message::Kind::Hello(_)) | None => {
                    warn!("ignoring an unexpected message on an open plan stream");
                }
            },
            Ok(None) => break,
            Err(status) => {
                info!(%status, "plan stream broke");
                break;
            }
        }
    }
    store.disconnect(&conn);
    // Let the sender notice the stream is no longer current.
    conn.wake.notify_one();
    metrics.agents_connected.set(store.connected_agents() as i64);
    info!("agent disconnected");
}
