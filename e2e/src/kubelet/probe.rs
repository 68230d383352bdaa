//! Container probes as the kubelet runs them: httpGet and tcpSocket from the node's namespace to
//! the pod's address, exec inside the pod. gRPC probes are approximated by a TCP connect (logged).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Probe timing with the Kubernetes defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub(crate) fn timing(p: &Probe) -> Timing {
    let secs = |v: Option<i32>, default: u64, min: u64| {
        Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default).max(min))
    };
    let count = |v: Option<i32>, default: u32| {
        v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0).unwrap_or(default)
    };
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0, 0),
        period: secs(p.period_seconds, 10, 1),
        timeout: secs(p.timeout_seconds, 1, 1),
        success_threshold: count(p.success_threshold, 1),
        failure_threshold: count(p.failure_threshold, 3),
    }
}

/// Resolves a probe port (number or container port name).
pub(crate) fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u16>() {
                return Ok(n);
            }
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("container has no port named {s:?}"))
        }
    }
}

/// The HTTP request a probe sends.
pub(crate) fn http_request(host_header: &str, path: &str, headers: &[(String, String)]) -> String {
    let path = if path.is_empty() { "/" } else { path };
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !has("host") {
        req.push_str(&format!("Host: {host_header}\r\n"));
    }
    if !has("user-agent") {
        req.push_str("User-Agent: kube-probe/1.35\r\n");
    }
    if !has("accept") {
        req.push_str("Accept: */*\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

/// The status code of an HTTP response head.
pub(crate) fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    let proto = parts.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// What one probe attempt does.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Http { addr: SocketAddr, host_header: String, path: String, headers: Vec<(String, String)>, https: bool },
    Tcp { addr: SocketAddr },
    Exec { argv: Vec<String> },
}

/// Turns a probe spec into an action against `pod_ip`.
pub(crate) fn action(p: &Probe, pod_ip: IpAddr, ports: &[ContainerPort]) -> Result<Action, String> {
    if let Some(h) = &p.http_get {
        let port = resolve_port(&h.port, ports)?;
        let ip = match h.host.as_deref().filter(|s| !s.is_empty()) {
            Some(host) => {
                host.parse::<IpAddr>().map_err(|_| format!("httpGet host {host:?} is not an IP address"))?
            }
            None => pod_ip,
        };
        let addr = SocketAddr::new(ip, port);
        let headers: Vec<(String, String)> =
            h.http_headers.iter().flatten().map(|hh| (hh.name.clone(), hh.value.clone())).collect();
        return Ok(Action::Http {
            addr,
            host_header: addr.to_string(),
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            headers,
            https: h.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("https")),
        });
    }
    if let Some(t) = &p.tcp_socket {
        let port = resolve_port(&t.port, ports)?;
        let ip = t.host.as_deref().filter(|s| !s.is_empty()).and_then(|h| h.parse().ok()).unwrap_or(pod_ip);
        return Ok(Action::Tcp { addr: SocketAddr::new(ip, port) });
    }
    if let Some(g) = &p.grpc {
        let port = u16::try_from(g.port).map_err(|_| format!("invalid port {}", g.port))?;
        return Ok(Action::Tcp { addr: SocketAddr::new(pod_ip, port) });
    }
    if let Some(e) = &p.exec {
        let argv = e.command.clone().unwrap_or_default();
        if argv.is_empty() {
            return Err("exec probe without a command".into());
        }
        return Ok(Action::Exec { argv });
    }
    Err("probe has no handler".into())
}

/// Runs an HTTP or TCP action once (exec actions are run by the caller, in the pod).
pub(crate) async fn run_network(action: &Action, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        match action {
            Action::Tcp { addr } => {
                TcpStream::connect(addr).await.map(|_| ()).map_err(|e| format!("dial tcp {addr}: {e}"))
            }
            Action::Http { addr, host_header, path, headers, https } => {
                let mut s = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
                if *https {
                    // No TLS client here: an HTTPS probe passes when the port accepts.
                    return Ok(());
                }
                s.write_all(http_request(host_header, path, headers).as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 1024];
                let mut len = 0;
                while len < buf.len() {
                    let n = s.read(&mut buf[len..]).await.map_err(|e| e.to_string())?;
                    if n == 0 || buf[..len + n].contains(&b'\n') {
                        len += n;
                        break;
                    }
                    len += n;
                }
                match status_code(&buf[..len]) {
                    Some(code) if (200..400).contains(&code) => Ok(()),
                    Some(code) => Err(format!("HTTP probe failed with statuscode: {code}")),
                    None => Err("HTTP probe got no valid response".into()),
                }
            }
            Action::Exec { .. } => Err("exec probes run in the pod".into()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HTTPGetAction, TCPSocketAction};

    #[test]
    fn defaults_match_kubernetes() {
        let t = timing(&Probe::default());
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!(t.failure_threshold, 3);
        assert_eq!(t.success_threshold, 1);
        let t =
            timing(&Probe { period_seconds: Some(1), initial_delay_seconds: Some(2), ..Default::default() });
        assert_eq!(t.period, Duration::from_secs(1));
        assert_eq!(t.initial_delay, Duration::from_secs(2));
    }

    #[test]
    fn named_ports_resolve() {
        let ports =
            vec![ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() }];
        assert_eq!(resolve_port(&IntOrString::String("http".into()), &ports), Ok(8080));
        assert_eq!(resolve_port(&IntOrString::Int(80), &ports), Ok(80));
        assert!(resolve_port(&IntOrString::String("grpc".into()), &ports).is_err());
    }

    #[test]
    fn http_request_and_status() {
        let r = http_request("10.0.0.5:80", "healthz", &[("X-A".into(), "1".into())]);
        assert!(r.starts_with("GET /healthz HTTP/1.1\r\nHost: 10.0.0.5:80\r\n"));
        assert!(r.contains("User-Agent: kube-probe/1.35\r\n"));
        assert!(r.ends_with("X-A: 1\r\nConnection: close\r\n\r\n"));
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"garbage"), None);
    }

    #[test]
    fn actions_target_the_pod() {
        let pod_ip: IpAddr = "10.0.0.5".parse().unwrap();
        let p = Probe {
            http_get: Some(HTTPGetAction { port: IntOrString::Int(80), ..Default::default() }),
            ..Default::default()
        };
        match action(&p, pod_ip, &[]).unwrap() {
            Action::Http { addr, path, .. } => {
                assert_eq!(addr.to_string(), "10.0.0.5:80");
                assert_eq!(path, "/");
            }
            other => panic!("{other:?}"),
        }
        let p = Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(53), host: None }),
            ..Default::default()
        };
        assert!(matches!(action(&p, pod_ip, &[]).unwrap(), Action::Tcp { .. }));
        assert!(action(&Probe::default(), pod_ip, &[]).is_err());
    }

    #[tokio::test]
    async fn network_probes_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let reply: &[u8] = if n == 0 {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
                n += 1;
            }
        });
        let http = Action::Http {
            addr,
            host_header: addr.to_string(),
            path: "/".into(),
            headers: vec![],
            https: false,
        };
        assert_eq!(run_network(&http, Duration::from_secs(2)).await, Ok(()));
        let err = run_network(&http, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert_eq!(run_network(&Action::Tcp { addr }, Duration::from_secs(2)).await, Ok(()));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(run_network(&Action::Tcp { addr: closed }, Duration::from_secs(2)).await.is_err());
    }
}
