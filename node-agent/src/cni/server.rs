//! The agent's side of the plugin protocol: a unix socket answering address requests from the
//! node's allocator. No Kubernetes API call is on this path.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use super::protocol::{ErrorKind, GATEWAY, MAX_REQUEST_BYTES, Request, Response};
use crate::ipam::{AttachmentKey, IpamError, IpamHandle, PodRef};
use crate::policy::PolicyHandle;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the directory of the CNI socket {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("{path} exists and is not a socket; refusing to replace it with the CNI socket")]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale CNI socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on the CNI socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("accepting on the CNI socket {path} failed: {source}")]
    Accept { path: PathBuf, source: std::io::Error },
}

/// A bound CNI socket, ready to serve: bind first to know the socket exists, then [`Self::run`].
#[derive(Debug)]
pub struct CniServer {
    listener: UnixListener,
    path: PathBuf,
    metrics: Option<AllocationMetrics>,
    policy: Option<PolicyHandle>,
}

/// What the server records about address requests: allocation latency (Prometheus, and OTLP
/// through the global meter when export is on) and refusals for lack of addresses.
#[derive(Debug, Clone)]
struct AllocationMetrics {
    duration: prometheus_client::metrics::histogram::Histogram,
    exhausted: prometheus_client::metrics::counter::Counter,
    otlp: opentelemetry::metrics::Histogram<f64>,
}

impl AllocationMetrics {
    fn record(&self, started: std::time::Instant, response: &Response) {
        let seconds = started.elapsed().as_secs_f64();
        self.duration.observe(seconds);
        self.otlp.record(seconds, &[]);
        if let Response::Error { kind: ErrorKind::Exhausted | ErrorKind::NoBlocks, .. } = response {
            self.exhausted.inc();
        }
    }
}

impl CniServer {
    /// Binds `path` (replacing a stale socket left by a previous agent), readable and writable by
    /// root only. Call it inside the tokio runtime that will serve.
    pub fn bind(path: &Path) -> Result<Self, ServeError> {
        let path = path.to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ServeError::Dir { path: path.clone(), source })?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&path)
                .map_err(|source| ServeError::RemoveStale { path: path.clone(), source })?,
            Ok(_) => return Err(ServeError::NotASocket { path }),
            Err(_) => {}
        }
        let listener =
            UnixListener::bind(&path).map_err(|source| ServeError::Bind { path: path.clone(), source })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| ServeError::Bind { path: path.clone(), source })?;
        Ok(Self { listener, path, metrics: None, policy: None })
    }

    /// Records every ADD's allocation latency and refusals in the agent's metrics.
    #[must_use]
    pub fn with_metrics(mut self, metrics: &crate::metrics::AgentMetrics) -> Self {
        let otlp = opentelemetry::global::meter("weft-agent")
            .f64_histogram("weft.agent.ipam.allocation.duration")
            .with_description("Time to hand a pod an address on a CNI ADD")
            .with_unit("s")
            .build();
        self.metrics = Some(AllocationMetrics {
            duration: metrics.ipam_allocation_duration.clone(),
            exhausted: metrics.ipam_exhausted.clone(),
            otlp,
        });
        self
    }

    /// An ADD returns only once the pod's NetworkPolicies are enforced (see [`crate::policy`]).
    #[must_use]
    pub fn with_policy(mut self, policy: PolicyHandle) -> Self {
        self.policy = Some(policy);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the future is dropped or accepting fails.
    pub async fn run(self, ipam: IpamHandle) -> Result<(), ServeError> {
        info!(socket = %self.path.display(), "CNI socket listening");
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "accept on the CNI socket failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(source) => return Err(ServeError::Accept { path: self.path.clone(), source }),
            };
            let ipam = ipam.clone();
            let metrics = self.metrics.clone();
            let policy = self.policy.clone();
            tokio::spawn(async move {
                if let Err(e) = handle_connection(stream, ipam, policy, metrics).await {
                    debug!(error = %e, "CNI connection ended with an error");
                }
            });
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    // Out of file descriptors or memory for a moment, or a client that gave up while queued.
    let transient =
        [Errno::ENFILE, Errno::EMFILE, Errno::ENOMEM, Errno::ECONNABORTED, Errno::ECONNRESET, Errno::EINTR];
    e.raw_os_error().is_some_and(|code| transient.iter().any(|t| *t as i32 == code))
}

/// Binds `path` and serves the plugin's requests from `ipam` until the future is dropped.
pub async fn serve(path: &Path, ipam: IpamHandle) -> Result<(), ServeError> {
    CniServer::bind(path)?.run(ipam).await
}

async fn handle_connection(
    stream: UnixStream,
    ipam: IpamHandle,
    policy: Option<PolicyHandle>,
    metrics: Option<AllocationMetrics>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    let response = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => error(ErrorKind::BadRequest, "no request within 10s".into()),
        Ok(Err(e)) => error(ErrorKind::BadRequest, format!("cannot read the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => {
            error(ErrorKind::BadRequest, format!("request larger than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => error(ErrorKind::BadRequest, format!("request does not parse: {e}")),
            Ok(request) => {
                let timed = matches!(request, Request::Add { .. }).then(std::time::Instant::now);
                let response = tokio::task::spawn_blocking(move || answer(&ipam, policy.as_ref(), request))
                    .await
                    .unwrap_or_else(|e| {
                        error(ErrorKind::Internal, format!("the request handler failed: {e}"))
                    });
                if let (Some(started), Some(metrics)) = (timed, &metrics) {
                    metrics.record(started, &response);
                }
                response
            }
        },
    };
    let mut bytes = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

fn ipam_error(e: IpamError) -> Response {
    let kind = match e {
        IpamError::Exhausted { .. } => ErrorKind::Exhausted,
        IpamError::NoBlocks { .. } => ErrorKind::NoBlocks,
        _ => ErrorKind::Internal,
    };
    error(kind, e.to_string())
}

/// Answers one request; blocking (the checkpoint is fsynced before an address is returned, and
/// with `policy` the pod's policies are enforced before it is).
pub fn answer(ipam: &IpamHandle, policy: Option<&PolicyHandle>, request: Request) -> Response {
    let address = |ip| Response::Address { ip, prefix_len: 32, gateway: GATEWAY, mtu: ipam.mtu() };
    match request {
        Request::Add { container_id, ifname, netns, pod_namespace, pod_name, pod_uid } => {
            let key = AttachmentKey::new(container_id, ifname);
            let pod = PodRef { namespace: pod_namespace, name: pod_name, uid: pod_uid };
            match ipam.allocate(&key, &pod) {
                Ok(a) => {
                    info!(attachment = %key, %pod, netns, ip = %a.ip, "address allocated");
                    // Fail closed: a pod whose policies cannot be enforced does not start (the
                    // runtime's DEL gives the address back, the kubelet retries).
                    if let Some(Err(e)) = policy.map(|p| p.admit(&pod, ipam)) {
                        warn!(attachment = %key, %pod, error = %e, "the pod's network policies are not enforced");
                        return error(
                            ErrorKind::Internal,
                            format!("the pod's network policies cannot be enforced: {e}"),
                        );
                    }
                    address(a.ip)
                }
                Err(e) => {
                    warn!(attachment = %key, %pod, error = %e, "no address for the pod");
                    ipam_error(e)
                }
            }
        }
        Request::Del { container_id, ifname } => {
            let key = AttachmentKey::new(container_id, ifname);
            match ipam.release(&key) {
                Ok(released) => {
                    if let Some(a) = &released {
                        info!(attachment = %key, pod = %a.pod, ip = %a.ip, "address released");
                    }
                    Response::Released { released: released.is_some() }
                }
                Err(e) => ipam_error(e),
            }
        }
        Request::Check { container_id, ifname } => {
            let key = AttachmentKey::new(container_id, ifname);
            match ipam.get(&key) {
                Some(a) => address(a.ip),
                None => error(
                    ErrorKind::UnknownAttachment,
                    format!("attachment {key} holds no address on this node"),
                ),
            }
        }
        Request::Gc { valid } => {
            let valid: BTreeSet<AttachmentKey> =
                valid.into_iter().map(|a| AttachmentKey::new(a.container_id, a.ifname)).collect();
            match ipam.gc(&valid) {
                Ok(released) => {
                    for (key, a) in &released {
                        info!(attachment = %key, pod = %a.pod, ip = %a.ip, "address garbage-collected");
                    }
                    Response::Collected { released: released.len() }
                }
                Err(e) => ipam_error(e),
            }
        }
        Request::Status => match ipam.status() {
            Ok(()) => Response::Ready,
            Err(e) => ipam_error(e),
        },
    }
}
