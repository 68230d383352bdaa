//! The API server's way into the cluster network on real nodes.
//!
//! The control plane runs in the root network namespace, which has no routes to pod addresses
//! (and must not get any: tests leave the host's namespace as they found it). So, as on managed
//! clusters with Konnectivity, the API server sends its "cluster" traffic — pod, Service and node
//! proxying, `kubectl logs`/`exec` to kubelets, webhooks — through an HTTP CONNECT proxy
//! (`--egress-selector-config-file`). The proxy listens on a Unix socket in the cluster directory
//! (a filesystem path, so reachable from the root namespace) and runs inside node-1's network
//! namespace, where pods and the other nodes are routed like from any node.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use super::state::ClusterState;

/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// The longest CONNECT request head accepted (Go's `http.DefaultMaxHeaderBytes` is 1 MiB; the API
/// server sends two short lines).
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Where the proxy listens.
pub fn socket_path(state: &ClusterState) -> PathBuf {
    state.dir.join("egress.sock")
}

/// Writes the API server's EgressSelectorConfiguration: "cluster" traffic over HTTP CONNECT to
/// the proxy's socket. Returns its path.
pub fn write_config(state: &ClusterState) -> Result<PathBuf> {
    let socket = socket_path(state);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "the egress proxy socket {} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} bytes): \
             use a shorter checkout path or WEFT_DIR",
            socket.display()
        );
    }
    let path = state.dir.join("egress-selector.yaml");
    let yaml = format!(
        "apiVersion: apiserver.k8s.io/v1beta1\n\
         kind: EgressSelectorConfiguration\n\
         egressSelections:\n\
         - name: cluster\n  \
           connection:\n    \
             proxyProtocol: HTTPConnect\n    \
             transport:\n      \
               uds:\n        \
                 udsName: {}\n",
        socket.display()
    );
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Serves HTTP CONNECT on `socket` until killed: each connection names `host:port`, gets
/// `200` once the TCP connection from this namespace is up (`502` if not), then bytes flow both
/// ways until either side closes.
pub async fn serve(socket: &Path) -> Result<()> {
    // A socket file left by a killed predecessor would make bind fail.
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "egress proxy serving HTTP CONNECT");
    loop {
        let (conn, _) = listener.accept().await.context("accepting on the egress socket")?;
        tokio::spawn(async move {
            if let Err(e) = tunnel(conn).await {
                tracing::warn!("egress tunnel: {e:#}");
            }
        });
    }
}

async fn tunnel(conn: UnixStream) -> Result<()> {
    let mut conn = BufReader::new(conn);
    let target = read_connect_head(&mut conn).await?;
    let upstream = match TcpStream::connect(&target).await {
        Ok(s) => s,
        Err(e) => {
            conn.get_mut().write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await?;
            bail!("dialing {target}: {e}");
        }
    };
    conn.get_mut().write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
    // The client speaks only after the 200, so nothing is buffered beyond the head.
    let mut conn = conn.into_inner();
    let mut upstream = upstream;
    tokio::io::copy_bidirectional(&mut conn, &mut upstream)
        .await
        .with_context(|| format!("relaying to {target}"))?;
    Ok(())
}

/// Reads `CONNECT host:port HTTP/1.1` and the header lines up to the blank one; returns the
/// target.
async fn read_connect_head<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<String> {
    let mut head = String::new();
    let mut target = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed before the end of the CONNECT request");
        }
        head.push_str(&line);
        if head.len() > MAX_HEAD_BYTES {
            bail!("CONNECT request head longer than {MAX_HEAD_BYTES} bytes");
        }
        let line = line.trim_end();
        if target.is_none() {
            target = Some(parse_request_line(line)?);
        } else if line.is_empty() {
            break;
        }
    }
    target.context("empty CONNECT request")
}

fn parse_request_line(line: &str) -> Result<String> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(target), Some(version), None)
            if version.starts_with("HTTP/1.") && target.contains(':') =>
        {
            Ok(target.to_string())
        }
        _ => bail!("not an HTTP CONNECT request line: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_target_and_stops_at_the_blank_line() {
        let mut input: &[u8] = b"CONNECT 10.244.2.7:8080 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nTLS...";
        let target = read_connect_head(&mut input).await.unwrap();
        assert_eq!(target, "10.244.2.7:8080");
        assert_eq!(input, b"TLS...");
    }

    #[tokio::test]
    async fn refuses_what_is_not_connect() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"CONNECT nowhere HTTP/1.1\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nHost: x",
        ] {
            let mut input = bad;
            assert!(read_connect_head(&mut input).await.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A real round trip: a TCP echo server on loopback reached through the proxy's socket.
    #[tokio::test]
    async fn relays_bytes_both_ways() {
        use tokio::io::AsyncReadExt as _;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("egress.sock");
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        let proxy_socket = socket.clone();
        tokio::spawn(async move { serve(&proxy_socket).await });
        let mut conn = loop {
            match UnixStream::connect(&socket).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        conn.write_all(format!("CONNECT {echo_addr} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let expected = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let mut reply = vec![0; expected.len()];
        conn.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, expected);
        conn.write_all(b"ping").await.unwrap();
        let mut echoed = [0; 4];
        conn.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
    }
}
