//! `weft-whoami`: the built-in workload of the `traefik/whoami` image — a tiny HTTP/1.1 server
//! that answers like whoami: `Hostname: …`, one `IP: …` line per interface address,
//! `RemoteAddr: ip:port`, then the request line and headers (as Go's `Request.Write` prints
//! them). Also `/api` (JSON), `/health` (GET the code, POST a code to set it), `/bench`,
//! `/data?size=N&unit=kb|mb|gb`, `?wait=<duration>` and `?env=true`.
//!
//! Flags as the real one takes them (Go style, `-port 80`, `--port=80`…): `port` (default
//! `$WHOAMI_PORT_NUMBER` or 80), `name` (default `$WHOAMI_NAME`), `verbose`. TLS (`cert`, `key`,
//! `cacert`) is not supported and refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    port: u16,
    name: String,
    verbose: bool,
}

/// Parses Go `flag`-style arguments.
fn parse_args(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Options, String> {
    let mut port = env("WHOAMI_PORT_NUMBER").filter(|s| !s.is_empty()).unwrap_or_else(|| "80".into());
    let mut name = env("WHOAMI_NAME").unwrap_or_default();
    let mut verbose = false;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (key, inline) = match flag.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (flag, None),
        };
        let value = |i: &mut usize| -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            *i += 1;
            args.get(*i).cloned().ok_or_else(|| format!("flag needs an argument: -{key}"))
        };
        match key {
            "port" => port = value(&mut i)?,
            "name" => name = value(&mut i)?,
            "verbose" => {
                verbose = match inline.as_deref() {
                    None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => true,
                    Some(_) => false,
                }
            }
            "allowed-origins" => {
                value(&mut i)?;
            }
            "cert" | "key" | "cacert" => {
                if !value(&mut i)?.is_empty() {
                    return Err(format!("-{key}: TLS is not supported by weft-whoami"));
                }
            }
            _ => return Err(format!("flag provided but not defined: -{key}")),
        }
        i += 1;
    }
    let port = port.parse::<u16>().map_err(|_| format!("invalid port {port:?}"))?;
    Ok(Options { port, name, verbose })
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
    proto: String,
    /// Headers in arrival order, names as sent.
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("/")
    }

    fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| percent_decode(v))
        })
    }

    fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.proto == "HTTP/1.0" { conn.contains("keep-alive") } else { !conn.contains("close") }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a request head (up to and excluding the blank line).
fn parse_head(head: &str) -> Result<Request, String> {
    let mut lines = head.split("\r\n").flat_map(|l| l.split('\n'));
    let line = lines.next().ok_or("empty request")?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(proto), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {line:?}"));
    };
    if !proto.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {proto:?}"));
    }
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').ok_or_else(|| format!("malformed header {l:?}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Request { method: method.to_string(), target: target.to_string(), proto: proto.to_string(), headers })
}

/// Go's `CanonicalMIMEHeaderKey`.
fn canonical(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() };
            upper = c == '-';
            out
        })
        .collect()
}

/// The request as Go's `Request.Write` prints it (what whoami echoes).
fn request_dump(req: &Request, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    out.push_str(&format!("Host: {}\r\n", req.header("host").unwrap_or("")));
    out.push_str(&format!("User-Agent: {}\r\n", req.header("user-agent").unwrap_or("Go-http-client/1.1")));
    if !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    let mut sorted: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (k, v) in &req.headers {
        let key = canonical(k);
        if matches!(key.as_str(), "Host" | "User-Agent" | "Content-Length" | "Transfer-Encoding" | "Trailer")
        {
            continue;
        }
        sorted.entry(key).or_default().push(v);
    }
    for (k, vs) in sorted {
        for v in vs {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Local IPv4 addresses from `/proc/net/fib_trie` (entries marked `/32 host LOCAL`).
fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(ip) = t.strip_prefix("|-- ") {
            last = ip.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// (interface, destination, mask) of the connected routes in `/proc/net/route`.
fn parse_routes(text: &str) -> Vec<(String, Ipv4Addr, Ipv4Addr)> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(v.to_ne_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let gw = hex(f.get(2)?)?;
            if !gw.is_unspecified() {
                return None;
            }
            Some((f.first()?.to_string(), hex(f.get(1)?)?, hex(f.get(7)?)?))
        })
        .collect()
}

/// (interface, address) from `/proc/net/if_inet6`.
fn parse_if_inet6(text: &str) -> Vec<(String, IpAddr)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = f.first()?;
            if hex.len() != 32 {
                return None;
            }
            let v = u128::from_str_radix(hex, 16).ok()?;
            Some((f.get(5)?.to_string(), IpAddr::V6(v.into())))
        })
        .collect()
}

/// Every interface address, grouped by interface (by index), IPv4 before IPv6 — the order whoami
/// prints them in.
fn interface_ips(
    fib_trie: &str,
    routes: &str,
    if_inet6: &str,
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Vec<IpAddr> {
    let routes = parse_routes(routes);
    let mut entries: Vec<(u32, String, u8, IpAddr)> = Vec::new();
    for ip in parse_fib_trie(fib_trie) {
        let iface = if ip.is_loopback() {
            Some("lo".to_string())
        } else {
            routes
                .iter()
                .filter(|(_, dst, mask)| u32::from(ip) & u32::from(*mask) == u32::from(*dst))
                .max_by_key(|(_, _, mask)| u32::from(*mask).count_ones())
                .map(|(i, _, _)| i.clone())
        };
        let name = iface.unwrap_or_default();
        let idx = ifindex(&name).unwrap_or(u32::MAX);
        entries.push((idx, name, 4, IpAddr::V4(ip)));
    }
    for (name, ip) in parse_if_inet6(if_inet6) {
        let idx = ifindex(&name).unwrap_or(u32::MAX);
        entries.push((idx, name, 6, ip));
    }
    // Stable: addresses keep their order within an interface and family.
    entries.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
    entries.into_iter().map(|e| e.3).collect()
}

fn current_ips() -> Vec<IpAddr> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let ifindex = |name: &str| -> Option<u32> {
        if name == "lo" {
            return Some(1);
        }
        std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).ok()?.trim().parse().ok()
    };
    interface_ips(
        &read("/proc/net/fib_trie"),
        &read("/proc/net/route"),
        &read("/proc/net/if_inet6"),
        &ifindex,
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Go's `time.ParseDuration` for the usual forms (`1s`, `500ms`, `1m30s`, `1.5s`).
fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

struct Server {
    opts: Options,
    health: AtomicU16,
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[derive(serde::Serialize)]
struct ApiData {
    hostname: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ip: Vec<String>,
    headers: BTreeMap<String, Vec<String>>,
    url: String,
    host: String,
    method: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "remoteAddr")]
    remote_addr: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    environ: BTreeMap<String, String>,
}

fn truthy(v: Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "t" | "T" | "true" | "TRUE" | "True"))
}

impl Server {
    async fn handle(&self, req: &Request, body: &[u8], remote: SocketAddr) -> Response {
        let text =
            |status: u16, body: Vec<u8>| Response { status, content_type: "text/plain; charset=utf-8", body };
        match req.path() {
            "/bench" => text(200, b"1".to_vec()),
            "/health" => {
                if req.method == "POST" {
                    match String::from_utf8_lossy(body).trim().parse::<u16>() {
                        Ok(code) if (100..600).contains(&code) => {
                            println!("Update health check status code [{code}]");
                            self.health.store(code, Ordering::Relaxed);
                            text(200, Vec::new())
                        }
                        _ => text(400, b"invalid status code\n".to_vec()),
                    }
                } else {
                    text(self.health.load(Ordering::Relaxed), Vec::new())
                }
            }
            "/data" => {
                let size = req.query("size").and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
                let mult: u64 = match req.query("unit").unwrap_or_default().to_ascii_lowercase().as_str() {
                    "kb" => 1 << 10,
                    "mb" => 1 << 20,
                    "gb" => 1 << 30,
                    _ => 1,
                };
                let total = size.saturating_mul(mult);
                if total > 256 * 1024 * 1024 {
                    return text(413, b"size too large for weft-whoami\n".to_vec());
                }
                let len = usize::try_from(total).unwrap_or(0);
                let body: Vec<u8> = (0..len).map(|i| if i % 64 == 63 { b'\n' } else { b'|' }).collect();
                text(200, body)
            }
            "/echo" => text(501, b"websocket echo is not supported by weft-whoami\n".to_vec()),
            "/api" => {
                let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (k, v) in req.headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("host")) {
                    headers.entry(canonical(k)).or_default().push(v.clone());
                }
                let environ =
                    if truthy(req.query("env")) { std::env::vars().collect() } else { BTreeMap::new() };
                let data = ApiData {
                    hostname: hostname(),
                    ip: current_ips().iter().map(ToString::to_string).collect(),
                    headers,
                    url: req.target.clone(),
                    host: req.header("host").unwrap_or_default().to_string(),
                    method: req.method.clone(),
                    name: self.opts.name.clone(),
                    remote_addr: remote.to_string(),
                    environ,
                };
                let mut body = serde_json::to_vec(&data).unwrap_or_default();
                body.push(b'\n');
                Response { status: 200, content_type: "application/json", body }
            }
            _ => {
                if let Some(d) = req.query("wait").as_deref().and_then(parse_duration) {
                    tokio::time::sleep(d).await;
                }
                let mut out = String::new();
                if !self.opts.name.is_empty() {
                    out.push_str(&format!("Name: {}\n", self.opts.name));
                }
                out.push_str(&format!("Hostname: {}\n", hostname()));
                for ip in current_ips() {
                    out.push_str(&format!("IP: {ip}\n"));
                }
                out.push_str(&format!("RemoteAddr: {remote}\n"));
                let mut page = out.into_bytes();
                page.extend(request_dump(req, body));
                if truthy(req.query("env")) {
                    for (k, v) in std::env::vars() {
                        page.extend(format!("{k}={v}\n").into_bytes());
                    }
                }
                text(200, page)
            }
        }
    }
}

fn body_len(req: &Request) -> usize {
    req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn write_response(resp: &Response, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&resp.body);
    }
    bytes
}

async fn serve_conn(server: Arc<Server>, mut stream: TcpStream, remote: SocketAddr) {
    let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read a head.
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            if buf.len() > MAX_HEAD {
                let _ = stream
                    .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let req = match parse_head(&head) {
            Ok(r) => r,
            Err(e) => {
                let resp = Response {
                    status: 400,
                    content_type: "text/plain; charset=utf-8",
                    body: format!("400 Bad Request: {e}\n").into_bytes(),
                };
                let _ = stream.write_all(&write_response(&resp, false, false)).await;
                return;
            }
        };
        if req.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let resp = Response {
                status: 501,
                content_type: "text/plain; charset=utf-8",
                body: b"chunked request bodies are not supported by weft-whoami\n".to_vec(),
            };
            let _ = stream.write_all(&write_response(&resp, false, false)).await;
            return;
        }
        let len = body_len(&req);
        if len > MAX_BODY {
            let resp = Response { status: 413, content_type: "text/plain; charset=utf-8", body: Vec::new() };
            let _ = stream.write_all(&write_response(&resp, false, false)).await;
            return;
        }
        while buf.len() < len {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let resp = server.handle(&req, &body, remote).await;
        if server.opts.verbose {
            println!("{remote} - - \"{} {} {}\" {}", req.method, req.path(), req.proto, resp.status);
        }
        let keep_alive = req.keep_alive();
        let bytes = write_response(&resp, keep_alive, req.method == "HEAD");
        if stream.write_all(&bytes).await.is_err() || !keep_alive {
            return;
        }
    }
}

async fn bind(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await,
    }
}

#[tokio::main(worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args, &|k| std::env::var(k).ok()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\nUsage of whoami: [-port N] [-name NAME] [-verbose]");
            return ExitCode::from(2);
        }
    };
    let listener = match bind(opts.port).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("listen tcp :{}: {e}", opts.port);
            return ExitCode::from(1);
        }
    };
    println!("Starting up on port {}", opts.port);
    let server = Arc::new(Server { opts, health: AtomicU16::new(200) });
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_conn(server.clone(), stream, remote));
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn flags_like_go() {
        let none = |_: &str| None;
        assert_eq!(parse_args(&[], &none).unwrap().port, 80);
        assert_eq!(parse_args(&s(&["--port", "8080"]), &none).unwrap().port, 8080);
        assert_eq!(parse_args(&s(&["-port=81"]), &none).unwrap().port, 81);
        let o = parse_args(&s(&["-name", "x", "-verbose"]), &none).unwrap();
        assert_eq!((o.name.as_str(), o.verbose), ("x", true));
        let env = |k: &str| (k == "WHOAMI_PORT_NUMBER").then(|| "9000".to_string());
        assert_eq!(parse_args(&[], &env).unwrap().port, 9000);
        assert!(parse_args(&s(&["--bogus"]), &none).is_err());
        assert!(parse_args(&s(&["--port"]), &none).is_err());
        assert!(parse_args(&s(&["--cert", "c.pem"]), &none).is_err());
    }

    #[test]
    fn request_parsing_and_dump_match_go() {
        let req = parse_head(
            "GET /x?a=1 HTTP/1.1\r\nhost: 10.0.0.5\r\nuser-agent: curl/8\r\naccept: */*\r\nx-b: 2\r\nX-A: 1",
        )
        .unwrap();
        assert_eq!(req.path(), "/x");
        assert_eq!(req.query("a").as_deref(), Some("1"));
        assert!(req.keep_alive());
        let dump = String::from_utf8(request_dump(&req, b"")).unwrap();
        assert_eq!(
            dump,
            "GET /x?a=1 HTTP/1.1\r\nHost: 10.0.0.5\r\nUser-Agent: curl/8\r\nAccept: */*\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
        );
        let post = parse_head("POST / HTTP/1.0\r\nHost: h\r\nContent-Length: 2").unwrap();
        assert!(!post.keep_alive());
        let dump = String::from_utf8(request_dump(&post, b"hi")).unwrap();
        assert_eq!(
            dump,
            "POST / HTTP/1.1\r\nHost: h\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 2\r\n\r\nhi"
        );
        assert!(parse_head("GARBAGE").is_err());
        assert!(parse_head("GET / SPDY/3").is_err());
        assert_eq!(canonical("x-forwarded-for"), "X-Forwarded-For");
    }

    #[test]
    fn ips_are_grouped_by_interface() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.244.1.0\n        /24 link UNICAST\n     \
                   |-- 10.244.1.5\n        /32 host LOCAL\nLocal:\n  +-- 127.0.0.0/8 2 0 2\n     \
                   |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 10.244.1.5\n        /32 host LOCAL\n";
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      eth0\t00000000\t0101F40A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                      eth0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo\n\
                     fe800000000000000c6b4dfffe3a4e5e 03 40 20 80     eth0\n";
        let idx = |n: &str| match n {
            "lo" => Some(1),
            "eth0" => Some(3),
            _ => None,
        };
        let ips: Vec<String> =
            interface_ips(fib, routes, inet6, &idx).iter().map(ToString::to_string).collect();
        if cfg!(target_endian = "little") {
            assert_eq!(ips, ["127.0.0.1", "::1", "10.244.1.5", "fe80::c6b:4dff:fe3a:4e5e"]);
        }
    }

    #[test]
    fn durations_and_decoding() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(percent_decode("a%20b+c%zz%"), "a b c%zz%");
    }

    #[tokio::test]
    async fn answers_like_whoami_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Server {
            opts: Options { port: addr.port(), name: "n1".into(), verbose: false },
            health: AtomicU16::new(200),
        });
        tokio::spawn(async move {
            while let Ok((s, r)) = listener.accept().await {
                tokio::spawn(serve_conn(server.clone(), s, r));
            }
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let local = c.local_addr().unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\nGET /bench HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("\r\n\r\nName: n1\nHostname: "), "{out}");
        assert!(out.contains("IP: 127.0.0.1\n"), "{out}");
        assert!(out.contains(&format!("RemoteAddr: {local}\n")), "{out}");
        assert!(out.contains("GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n"), "{out}");
        assert!(out.ends_with("Connection: close\r\n\r\n1"), "{out}");
    }
}
