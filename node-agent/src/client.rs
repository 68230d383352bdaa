//! The plan client: connects to the operator, resumes from the plan it holds, applies what it
//! receives and answers each message with an ACK or a NACK.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, info, info_span, warn};
use weft_api::plan::{self as pb, plan_message::Body, plan_service_client::PlanServiceClient};

use crate::metrics::{AgentMetrics, KindLabel};
use crate::plan_state::{PlanError, PlanState};
use crate::programmers;

/// How long the agent gathers IPAM changes before it reports usage to the operator.
const IPAM_REPORT_DELAY: Duration = Duration::from_millis(200);

/// How often programmers check that what they wrote is still there (kube-proxy's canary idea).
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    /// The operator's plan endpoints, e.g. `https://172.18.0.11:7700`, tried in turn.
    pub operators: Vec<String>,
    /// The ServiceAccount token (audience `weft-operator`, bound to this node) presented on the
    /// plan stream; read at every connection, so a rotated token is picked up.
    pub plan_token_file: Option<PathBuf>,
    /// The CA certificate (PEM) the operator's TLS certificate is checked against, for an
    /// `https://` operator.
    pub operator_ca_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Delay before retrying a failed apply, and the cap of the reconnect backoff.
    pub retry_interval: Duration,
    pub cni: programmers::CniOptions,
    /// How the node serves cluster DNS (CoreDNS's credentials, ports).
    pub dns: crate::dns::DnsOptions,
    /// How the node runs nginx for ingress.
    pub ingress: crate::ingress::IngressOptions,
    /// Where Service rules, conntrack settings and the proxy's health ports go: the agent's own
    /// network namespace on a node; a recording runner for in-process agents of tests, which
    /// must leave the host's namespace alone.
    pub proxy_runner: crate::exec::Runner,
}

/// What the agent holds, published for readiness and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    pub connected: bool,
    /// The newest plan version received.
    pub received_version: u64,
    /// The newest plan version fully applied (and ACKed).
    pub applied_version: u64,
    /// The newest plan version whose record files (`programmed/*.txt`) are written; they follow
    /// the plan shortly after it is applied (see [`programmers::record`]).
    pub recorded_version: u64,
    pub last_error: Option<String>,
    pub snapshots: u64,
    pub deltas: u64,
    pub currents: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("cannot create the state dir {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot start the record writer thread: {0}")]
    RecordThread(std::io::Error),
    #[error("IPAM: {0}")]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("CNI socket: {0}")]
    CniSocket(#[from] crate::cni::ServeError),
    #[error("{0}; the agent stops so that it is restarted")]
    Critical(weft_api::tasks::Failure),
}

/// Runs the agent until `shutdown` turns true. Never flushes what it programmed: losing the
/// operator only means reconnecting.
pub async fn run(
    config: AgentConfig,
    metrics: AgentMetrics,
    status: watch::Sender<AgentStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| AgentError::StateDir { path: config.state_dir.clone(), source })?;
    let records = {
        let status = status.clone();
        programmers::record::Recorder::start(
            &config.state_dir,
            metrics.record_errors.clone(),
            move |version| status.send_modify(|s| s.recorded_version = version),
        )
        .map_err(AgentError::RecordThread)?
    };
    // The allocator and the socket weft-cni asks for addresses: up before any plan, so pods that
    // kept their addresses across an agent restart are answered at once.
    let target = programmers::Target {
        state_dir: config.state_dir.clone(),
        ipam: crate::ipam::IpamHandle::open(&config.state_dir, &config.node_name)?,
        cni: config.cni.clone(),
        routes: Default::default(),
        metrics: metrics.clone(),
        proxy: crate::proxy::ProxyCache::with_runner(config.proxy_runner.clone()),
        dns: crate::dns::DnsHandle::new(&config.state_dir, config.dns.clone(), metrics.clone()),
        ingress: crate::ingress::IngressHandle::new(&config.state_dir, config.ingress.clone()),
        // Only where the pod network is Weft's: its pods' traffic passes the forward hook.
        policy: crate::policy::PolicyHandle::new(
            config.proxy_runner.clone(),
            metrics.clone(),
            config.cni.install,
        ),
        records,
    };
    let saved = PlanState::load(&config.state_dir).unwrap_or_else(|e| {
        // Start empty: the operator sends a snapshot, and nothing is programmed before it.
        warn!(error = %e, "the saved plan is unreadable; asking the operator for a snapshot");
        PlanState::default()
    });
    // ADDs that come before the saved plan is applied below are judged by it.
    match crate::policy::plan_from(saved.resources.values()) {
        Ok(policy) => target.policy.seed(policy),
        Err(e) => {
            warn!(error = %e, "the saved plan's policies do not decode; new pods wait for the operator's")
        }
    }
    let server = crate::cni::CniServer::bind(&target.socket())?
        .with_metrics(&metrics)
        .with_policy(target.policy.clone());
    // Without its CNI socket the node cannot start pods: the agent must not carry on without it.
    let mut critical = weft_api::tasks::Critical::new();
    let _stop_cni = AbortOnDrop(critical.spawn("CNI socket", server.run(target.ipam.clone())));
    let mut agent = Agent {
        plan: Arc::new(saved),
        applied: false,
        config,
        metrics,
        status,
        target,
        last_check: Instant::now(),
        next_operator: 0,
    };
    if agent.plan.version != 0 {
        info!(version = agent.plan.version, "resuming from the saved plan");
        // The saved plan is what the node was programmed with; re-applying it is idempotent and
        // repairs anything lost while the agent was down.
        agent.apply(None);
    }
    let mut reconnects = crate::retry::Doubling::new(
        Duration::from_millis(100),
        agent.config.retry_interval.max(Duration::from_millis(200)),
    );
    loop {
        let started = Instant::now();
        tokio::select! {
            result = agent.session() => {
                let refused = result.as_ref().err().is_some_and(SessionError::is_refusal);
                let error = result.err().map(|e| e.to_string()).unwrap_or_default();
                // Once per outage at WARN: losing the operator is worth an admin's attention,
                // every failed retry is not.
                if agent.status.borrow().connected {
                    warn!(%error, "lost the plan stream; the node stays as programmed and the agent reconnects");
                } else if refused {
                    warn!(%error, "the operator refused the plan stream; the node stays as programmed");
                } else {
                    debug!(%error, "cannot reach the operator yet");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            failure = critical.failed() => return Err(AgentError::Critical(failure)),
        }
        agent.status.send_modify(|s| s.connected = false);
        agent.metrics.connected.set(0);
        // Disconnected, the node keeps being repaired: fail-static includes the checks.
        if agent.last_check.elapsed() >= CHECK_INTERVAL {
            agent.check();
        }
        if started.elapsed() > Duration::from_secs(10) {
            reconnects.reset();
        }
        tokio::select! {
            () = tokio::time::sleep(reconnects.next_delay()) => {}
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            failure = critical.failed() => return Err(AgentError::Critical(failure)),
        }
    }
}

/// A channel to the first operator endpoint that answers, trying them in turn from `start`
/// (wrapping), with its address and index. Only the leader replica serves plan streams; a
/// follower answers and then refuses the stream, and the caller starts past it next time. The
/// last error is returned when none answers.
async fn connect(
    config: &AgentConfig,
    start: usize,
) -> Result<(tonic::transport::Channel, String, usize), SessionError> {
    let mut last = SessionError::Tls("no operator address given (--operator)".into());
    let n = config.operators.len();
    for index in (0..n).map(|i| (start + i) % n) {
        let operator = &config.operators[index];
        match connect_one(config, operator).await {
            Ok(channel) => return Ok((channel, operator.clone(), index)),
            Err(e) => {
                debug!(%operator, error = %e, "operator endpoint unreachable");
                last = e;
            }
        }
    }
    Err(last)
}

/// A channel to `operator`: TLS verified against `operator_ca_file` for an `https://` address.
async fn connect_one(
    config: &AgentConfig,
    operator: &str,
) -> Result<tonic::transport::Channel, SessionError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(operator.to_string())?;
    if operator.starts_with("https://") {
        let path = config.operator_ca_file.as_ref().ok_or_else(|| {
            SessionError::Tls(format!(
                "{operator} is https: give the CA that signed its certificate with --operator-ca-file"
            ))
        })?;
        let ca = std::fs::read(path)
            .map_err(|e| SessionError::Tls(format!("cannot read {}: {e}", path.display())))?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

/// `Bearer <token>` from the token file.
fn bearer(
    path: &std::path::Path,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, SessionError> {
    let failed = |reason: String| SessionError::Token { path: path.to_path_buf(), reason };
    let token = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(failed("it is empty".into()));
    }
    format!("Bearer {token}").parse().map_err(|_| failed("it is not a token (non-ASCII characters)".into()))
}

/// Stops the CNI socket server with the agent.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Agent {
    config: AgentConfig,
    target: programmers::Target,
    /// Shared with the record writer, which renders from it after the programmers applied it.
    plan: Arc<PlanState>,
    /// Whether `plan` is fully applied on the node.
    applied: bool,
    metrics: AgentMetrics,
    status: watch::Sender<AgentStatus>,
    /// When the programmers' periodic checks last ran.
    last_check: Instant,
    /// Where in `config.operators` the next connection starts: past the endpoint of the last
    /// session, so a replica that refuses streams (a follower) does not hold the agent.
    next_operator: usize,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("the operator closed the stream")]
    Closed,
    #[error("cannot read the plan token {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("TLS to the operator: {0}")]
    Tls(String),
    #[error("{0}; reconnecting for a snapshot")]
    Diverged(PlanError),
}

impl SessionError {
    /// A refusal an admin must hear about (a missing or wrong token or CA), not a passing outage.
    fn is_refusal(&self) -> bool {
        match self {
            Self::Token { .. } | Self::Tls(_) => true,
            Self::Stream(s) => {
                matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
            }
            _ => false,
        }
    }
}

impl Agent {
    async fn session(&mut self) -> Result<(), SessionError> {
        let (channel, operator, index) = connect(&self.config, self.next_operator).await?;
        // The next session starts at the following endpoint: a follower that refused this one,
        // or a leader that went away, is not tried first again.
        self.next_operator = index + 1;
        let mut client = PlanServiceClient::new(channel).max_decoding_message_size(pb::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            node: self.config.node_name.clone(),
            version: self.plan.version,
            resources: self.plan.references(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let _ = tx.send(agent_message(pb::agent_message::Kind::Hello(hello))).await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(path) = &self.config.plan_token_file {
            request.metadata_mut().insert("authorization", bearer(path)?);
        }
        let mut inbound = client.watch(request).await?.into_inner();
        self.status.send_modify(|s| s.connected = true);
        self.metrics.connected.set(1);
        info!(%operator, version = self.plan.version, "plan stream open");
        let mut ipam_changes = self.target.ipam.subscribe();
        ipam_changes.mark_changed();
        let mut checks =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECK_INTERVAL, CHECK_INTERVAL);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry = async {
                if self.applied || self.plan.version == 0 {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(self.config.retry_interval).await;
            };
            tokio::select! {
                message = inbound.message() => {
                    let message = message?.ok_or(SessionError::Closed)?;
                    let reply = self.receive(message)?;
                    if tx.send(reply).await.is_err() {
                        return Err(SessionError::Closed);
                    }
                }
                () = retry => {
                    if let Some(reply) = self.apply(None) {
                        let _ = tx.send(reply).await;
                    }
                }
                _ = checks.tick() => self.check(),
                Ok(()) = ipam_changes.changed() => {
                    // Batch a burst of pod starts into one report.
                    tokio::time::sleep(IPAM_REPORT_DELAY).await;
                    ipam_changes.mark_unchanged();
                    let blocks = self
                        .target
                        .ipam
                        .usage()
                        .into_iter()
                        .map(|u| pb::BlockUsage { cidr: u.cidr.to_string(), used: u32::try_from(u.used).unwrap_or(u32::MAX) })
                        .collect();
                    if tx.send(agent_message(pb::agent_message::Kind::Ipam(pb::IpamReport { blocks }))).await.is_err() {
                        return Err(SessionError::Closed);
                    }
                }
            }
        }
    }

    /// Takes one plan message in; returns the ACK or NACK to send.
    fn receive(&mut self, message: pb::PlanMessage) -> Result<pb::AgentMessage, SessionError> {
        let span = info_span!("agent.receive", version = message.version, generation = message.generation);
        weft_api::telemetry::set_parent_from(&span, &message.trace_context);
        let _enter = span.enter();
        let kind = match &message.body {
            Some(Body::Current(_)) => "current",
            Some(Body::Snapshot(_)) => "snapshot",
            Some(Body::Delta(_)) => "delta",
            None => "empty",
        };
        self.metrics.messages_received.get_or_create(&KindLabel { kind }).inc();
        self.status.send_modify(|s| match kind {
            "current" => s.currents += 1,
            "snapshot" => s.snapshots += 1,
            _ => s.deltas += 1,
        });
        let (next, changed) = match self.plan.apply(&message) {
            Ok(result) => result,
            Err(e) => {
                // Forget what we hold so the next Hello asks for a snapshot.
                warn!(error = %e, "plan message does not fit the plan held");
                self.plan = Arc::new(PlanState { generation: self.plan.generation, ..PlanState::default() });
                return Err(SessionError::Diverged(e));
            }
        };
        if next.version == self.plan.version && self.applied {
            return Ok(agent_message(pb::agent_message::Kind::Ack(pb::Ack { version: next.version })));
        }
        self.plan = Arc::new(next);
        self.status.send_modify(|s| s.received_version = self.plan.version);
        // Saved before programming: after a crash the agent resumes with what the operator
        // believes it holds, and re-applies it.
        if let Err(e) = self.plan.save(&self.config.state_dir) {
            warn!(error = %e, "cannot save the plan; it will be asked for again after a restart");
        }
        Ok(self.apply(Some(&changed)).unwrap_or_else(|| {
            agent_message(pb::agent_message::Kind::Ack(pb::Ack { version: self.plan.version }))
        }))
    }

    /// Runs the programmers' periodic checks (e.g. the proxy's canary), which repair what was
    /// changed behind the agent's back.
    fn check(&mut self) {
        self.last_check = Instant::now();
        if self.plan.version == 0 {
            return;
        }
        let span = info_span!("agent.check", version = self.plan.version);
        let failures = tokio::task::block_in_place(|| {
            span.in_scope(|| programmers::check_all(&self.plan, &self.target))
        });
        if !failures.is_empty() {
            // The next plan or retry applies again; a check failure alone is not a NACK.
            self.applied = false;
        }
    }

    /// Programs the node from the held plan. Returns the ACK/NACK to send (None before any plan).
    fn apply(&mut self, changed: Option<&crate::plan_state::ChangedKinds>) -> Option<pb::AgentMessage> {
        if self.plan.version == 0 {
            return None;
        }
        let started = Instant::now();
        let span = info_span!("agent.apply", version = self.plan.version);
        // Programmers write files and fsync: keep that off the async workers' backs.
        let failures = tokio::task::block_in_place(|| {
            span.in_scope(|| programmers::apply_all(&self.plan, changed, &self.target))
        });
        self.metrics.apply_duration.observe(started.elapsed().as_secs_f64());
        otlp_apply_duration().record(started.elapsed().as_secs_f64(), &[]);
        let version = self.plan.version;
        let reply = if failures.is_empty() {
            self.applied = true;
            self.metrics.plan_generation.set(self.plan.generation as i64);
            self.status.send_modify(|s| {
                s.applied_version = version;
                s.last_error = None;
            });
            pb::agent_message::Kind::Ack(pb::Ack { version })
        } else {
            self.applied = false;
            self.metrics.apply_errors.inc();
            let error = failures.iter().map(|(_, e)| e.to_string()).collect::<Vec<_>>().join("; ");
            self.status.send_modify(|s| s.last_error = Some(error.clone()));
            pb::agent_message::Kind::Nack(pb::Nack { version, error })
        };
        let mut message = agent_message(reply);
        span.in_scope(|| message.trace_context = weft_api::telemetry::inject_current());
        Some(message)
    }
}

/// The plan apply time on OTLP (the global meter `weft_api::telemetry::init` installs; a no-op
/// when export is off). Made on first use, after `init`.
fn otlp_apply_duration() -> &'static opentelemetry::metrics::Histogram<f64> {
    static HISTOGRAM: std::sync::OnceLock<opentelemetry::metrics::Histogram<f64>> =
        std::sync::OnceLock::new();
    HISTOGRAM.get_or_init(|| {
        opentelemetry::global::meter("weft-agent")
            .f64_histogram("weft.agent.apply.duration")
            .with_description("Time to apply a plan message to the node")
            .with_unit("s")
            .build()
    })
}

fn agent_message(kind: pb::agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind), trace_context: Default::default() }
}

/// Runs `run` as a task with its own status channel (used by the binary and by tests).
pub fn spawn(
    config: AgentConfig,
    metrics: AgentMetrics,
    shutdown: watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<Result<(), AgentError>>, watch::Receiver<AgentStatus>) {
    let (status_tx, status_rx) = watch::channel(AgentStatus::default());
    let span = info_span!("agent", node = %config.node_name);
    let handle = tokio::spawn(run(config, metrics, status_tx, shutdown).instrument(span));
    (handle, status_rx)
}
