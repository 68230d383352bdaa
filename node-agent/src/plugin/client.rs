//! The plugin's side of the agent protocol: a blocking unix-socket client (the plugin is a short
//! process; one request per invocation).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cni::protocol::{Request, Response};

/// How long the agent may take to answer (an ADD waits for the checkpoint's fsync).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the weft agent at {}: {source}: is weft-agent running on this node?", path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    #[error(
        "the weft agent at {} did not answer: {source}: is weft-agent running and healthy on this node?",
        path.display()
    )]
    Exchange { path: PathBuf, source: std::io::Error },
    #[error("the weft agent at {} answered something this plugin does not understand ({reason}): are weft-cni and weft-agent the same version?", path.display())]
    Decode { path: PathBuf, reason: String },
}

/// Sends one request to the agent on `socket` and reads its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let path = socket.to_path_buf();
    let mut stream =
        UnixStream::connect(socket).map_err(|source| ClientError::Connect { path: path.clone(), source })?;
    let exchange = |source| ClientError::Exchange { path: path.clone(), source };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(exchange)?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(exchange)?;
    let mut bytes = serde_json::to_vec(request)
        .map_err(|e| ClientError::Decode { path: path.clone(), reason: e.to_string() })?;
    bytes.push(b'\n');
    stream.write_all(&bytes).map_err(exchange)?;
    stream.flush().map_err(exchange)?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_RESPONSE_BYTES)).read_line(&mut line).map_err(exchange)?;
    if line.is_empty() {
        return Err(exchange(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection closed without an answer",
        )));
    }
    serde_json::from_str(&line).map_err(|e| ClientError::Decode { path, reason: e.to_string() })
}
