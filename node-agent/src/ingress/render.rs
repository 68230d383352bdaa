//! Plan → nginx configuration, pure.
//!
//! Every user string reaching the text has passed [`weft_api::ingress::validate`] (again, here:
//! the operator checked it too) and is written inside double quotes; the grammars exclude quotes,
//! `;`, braces, whitespace, `#` and any `$` except a regex anchor or a `$1`…`$9` capture, so no user
//! string can end its directive. Ingresses that fail are left out and listed in
//! [`Desired::rejected`].
//!
//! Matching follows the Ingress spec: Exact is `location =`; Prefix is element-wise (`/foo`
//! matches `/foo` and `/foo/…`, not `/foo/bar` of `/foobar`): `location = /foo` plus
//! `location /foo/`; the longest prefix wins, across Ingresses. A host with a regex path
//! (`use-regex` or `rewrite-target`) gets every path as a regex location, longest first, as
//! ingress-nginx does. Backends are ClusterIP:port upstreams; Weft's proxy balances behind them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use weft_api::ingress::{is_regex, validate};
use weft_api::plan::{self as pb, PathType};

/// Where the rendered config points nginx at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// nginx's prefix: pid file, logs, temp dirs.
    pub dir: PathBuf,
    /// Where the certificate files go.
    pub certs: PathBuf,
}

impl Paths {
    pub fn under(dir: &Path) -> Paths {
        Paths { dir: dir.to_path_buf(), certs: dir.join("certs") }
    }

    /// The file holding a Secret's certificate chain and key (`namespace/name` is validated),
    /// named after its contents too: a new certificate is a new file, so writing it never
    /// changes what the running nginx would read until the configuration naming it has passed
    /// `nginx -t` and is live.
    pub fn cert_file(&self, secret: &str, pem: &[u8]) -> PathBuf {
        let hash = xxhash_rust::xxh3::xxh3_64(pem);
        self.certs.join(format!("{}.{hash:016x}.pem", secret.replace('/', "_")))
    }
}

/// What the node should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub config: String,
    /// Certificate files: path → PEM (certificate chain, then key).
    pub certs: BTreeMap<PathBuf, Vec<u8>>,
    /// Ingresses left out, with why.
    pub rejected: Vec<(String, String)>,
}

/// What a location does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Proxy(Upstream),
    /// No Service (or port) behind the route.
    Unavailable,
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Upstream {
    ip: Ipv4Addr,
    port: u16,
}

impl Upstream {
    fn name(self) -> String {
        format!("b_{}_{}", self.ip.to_string().replace('.', "_"), self.port)
    }
}

fn action(backend: Option<&pb::IngressBackend>) -> Action {
    match backend {
        Some(b) if b.cluster_ip != 0 && b.port != 0 => match u16::try_from(b.port) {
            Ok(port) => Action::Proxy(Upstream { ip: Ipv4Addr::from(b.cluster_ip), port }),
            Err(_) => Action::Unavailable,
        },
        _ => Action::Unavailable,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Match {
    Exact(String),
    /// Normalised: no trailing slash, except `/` itself.
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone)]
struct Route {
    matcher: Match,
    action: Action,
    rewrite: Option<String>,
    ssl_redirect: bool,
    force_ssl_redirect: bool,
    /// namespace/name of the Ingress, for the comment.
    from: String,
}

#[derive(Debug, Default)]
struct Server {
    routes: Vec<Route>,
    /// The certificate file serving this host over TLS (its Secret is in the plan).
    tls: Option<PathBuf>,
    default_action: Option<(Action, String)>,
    /// Plain HTTP redirects to HTTPS for the fallback location.
    redirect: bool,
}

/// Renders nginx's configuration for this node.
pub fn render(
    node_ip: Option<Ipv4Addr>,
    settings: &pb::IngressSettings,
    ingresses: &[pb::Ingress],
    secrets: &BTreeMap<String, pb::TlsSecret>,
    paths: &Paths,
) -> Desired {
    let mut rejected = Vec::new();
    let mut ordered: Vec<&pb::Ingress> = Vec::new();
    for ingress in ingresses {
        match validate(ingress) {
            Ok(()) => ordered.push(ingress),
            Err(e) => rejected.push((format!("{}/{}", ingress.namespace, ingress.name), e.to_string())),
        }
    }
    // The oldest Ingress wins a conflict (ingress-nginx's rule), then by name.
    ordered.sort_by(|a, b| {
        (a.created_unix, &a.namespace, &a.name).cmp(&(b.created_unix, &b.namespace, &b.name))
    });

    let mut servers: BTreeMap<String, Server> = BTreeMap::new();
    servers.entry(String::new()).or_default();
    let mut certs = BTreeMap::new();
    for ingress in &ordered {
        let from = format!("{}/{}", ingress.namespace, ingress.name);
        for tls in &ingress.tls {
            // A Secret without PEM blocks would make `nginx -t` refuse the whole configuration:
            // its hosts are served without TLS instead.
            let Some(secret) = secrets.get(&tls.secret).filter(|s| !tls.secret.is_empty() && is_pem(s))
            else {
                continue;
            };
            let mut pem = secret.cert.clone();
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            pem.extend_from_slice(&secret.key);
            let file = paths.cert_file(&tls.secret, &pem);
            for host in &tls.hosts {
                let server = servers.entry(host.clone()).or_default();
                server.tls.get_or_insert_with(|| file.clone());
            }
            certs.insert(file, pem);
        }
        let mut hosts = BTreeSet::new();
        for rule in &ingress.rules {
            hosts.insert(rule.host.clone());
            let server = servers.entry(rule.host.clone()).or_default();
            for path in &rule.paths {
                let matcher = if is_regex(ingress, path.path_type()) {
                    Match::Regex(path.path.clone())
                } else if path.path_type() == PathType::Exact {
                    Match::Exact(path.path.clone())
                } else {
                    let trimmed = path.path.trim_end_matches('/');
                    Match::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
                };
                if server.routes.iter().any(|r| r.matcher == matcher) {
                    continue;
                }
                server.routes.push(Route {
                    matcher,
                    action: action(path.backend.as_ref()),
                    rewrite: (!ingress.rewrite_target.is_empty()).then(|| ingress.rewrite_target.clone()),
                    ssl_redirect: ingress.ssl_redirect,
                    force_ssl_redirect: ingress.force_ssl_redirect,
                    from: from.clone(),
                });
            }
        }
        // spec.defaultBackend serves what the Ingress's hosts do not match; an Ingress without
        // host rules gives it to the default server.
        if let Some(backend) = &ingress.default_backend {
            if hosts.is_empty() || hosts.contains("") {
                hosts.insert(String::new());
            }
            for host in hosts {
                let server = servers.entry(host).or_default();
                server.default_action.get_or_insert_with(|| (action(Some(backend)), from.clone()));
            }
        }
    }
    for (host, server) in &mut servers {
        // Hosts with TLS redirect plain HTTP unless their Ingresses say ssl-redirect: false.
        server.redirect = !host.is_empty()
            && (server.routes.iter().any(|r| r.force_ssl_redirect)
                || (server.tls.is_some() && server.routes.iter().all(|r| r.ssl_redirect)));
    }
    let config = write_config(node_ip, settings, &servers, paths);
    Desired { config, certs, rejected }
}

fn is_pem(secret: &pb::TlsSecret) -> bool {
    let has = |pem: &[u8], marker: &[u8]| pem.windows(marker.len()).any(|w| w == marker);
    has(&secret.cert, b"-----BEGIN CERTIFICATE-----") && has(&secret.key, b"PRIVATE KEY-----")
}

fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

/// Quotes regex metacharacters of a literal path (validated: no quotes or backslashes in it).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if ".*+?()[]{}|^$\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `*.example.com` matches exactly one label in front (the Ingress spec), which nginx's own
/// wildcard names do not: a regex name.
fn server_name(host: &str) -> String {
    match host.strip_prefix("*.") {
        Some(rest) => quote(&format!("~^[^.]+\\.{}$", rest.replace('.', "\\."))),
        None => quote(host),
    }
}

fn write_config(
    node_ip: Option<Ipv4Addr>,
    settings: &pb::IngressSettings,
    servers: &BTreeMap<String, Server>,
    paths: &Paths,
) -> String {
    let dir = paths.dir.display();
    let mut o = String::new();
    let _ = writeln!(o, "# Written by weft-agent from the node's plan; changes here are overwritten.");
    let _ = writeln!(o, "worker_processes 2;");
    let _ = writeln!(o, "pid {dir}/nginx.pid;");
    let _ = writeln!(o, "error_log {dir}/error.log warn;");
    let _ = writeln!(o, "events {{\n    worker_connections 4096;\n}}");
    let _ = writeln!(o, "http {{");
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(o, "    {t}_temp_path {dir}/tmp/{t};");
    }
    let _ = writeln!(
        o,
        "    access_log off;
    server_tokens off;
    server_names_hash_bucket_size 256;
    proxy_http_version 1.1;
    proxy_set_header Connection \"\";
    proxy_set_header Host $host;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
    proxy_connect_timeout 5s;"
    );
    let default_backend = action(settings.default_backend.as_ref());
    let mut upstreams: BTreeSet<Upstream> = BTreeSet::new();
    let mut collect = |a: &Action| {
        if let Action::Proxy(u) = a {
            upstreams.insert(*u);
        }
    };
    collect(&default_backend);
    for server in servers.values() {
        server.routes.iter().for_each(|r| collect(&r.action));
        if let Some((a, _)) = &server.default_action {
            collect(a);
        }
    }
    // Keep-alive connections to each ClusterIP. The proxy balances per connection, so each one
    // is retired 5 s after it was opened (`keepalive_time`): new endpoints get their share within
    // seconds, without a new connection every few requests under load.
    for u in &upstreams {
        let _ = writeln!(
            o,
            "    upstream {} {{\n        server {}:{};\n        keepalive 32;\n        keepalive_time 5s;\n        keepalive_requests 10000;\n        keepalive_timeout 10s;\n    }}",
            u.name(),
            u.ip,
            u.port
        );
    }
    let listen = |port: u32, extra: &str| match node_ip {
        Some(ip) => format!("        listen {ip}:{port}{extra};\n"),
        None => format!("        listen {port}{extra};\n"),
    };
    let (http, https) = (settings.http_port, settings.https_port);
    let redirect_port = if https == 443 { String::new() } else { format!(":{https}") };
    for (host, server) in servers {
        let _ = writeln!(o, "    server {{");
        if host.is_empty() {
            o.push_str(&listen(http, " default_server"));
            // No certificate for unknown names: refuse the handshake instead of a wrong cert.
            o.push_str(&listen(https, " ssl default_server"));
            let _ = writeln!(o, "        server_name _;\n        ssl_reject_handshake on;");
        } else {
            o.push_str(&listen(http, ""));
            let _ = writeln!(o, "        server_name {};", server_name(host));
            if let Some(cert) = &server.tls {
                o.push_str(&listen(https, " ssl"));
                let _ = writeln!(o, "        ssl_certificate {};", quote(&cert.display().to_string()));
                let _ = writeln!(o, "        ssl_certificate_key {};", quote(&cert.display().to_string()));
            }
        }
        let regex_mode = server.routes.iter().any(|r| matches!(r.matcher, Match::Regex(_)));
        let mut routes: Vec<&Route> = server.routes.iter().collect();
        // Regex locations are tried in order: longest path first approximates longest match.
        routes.sort_by(|a, b| {
            let len = |r: &Route| match &r.matcher {
                Match::Exact(p) | Match::Prefix(p) | Match::Regex(p) => p.len(),
            };
            len(b).cmp(&len(a)).then_with(|| a.matcher.cmp(&b.matcher))
        });
        let exact: BTreeSet<&str> = routes
            .iter()
            .filter_map(|r| match &r.matcher {
                Match::Exact(p) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        let mut has_root = false;
        for route in routes {
            let heads: Vec<String> = match &route.matcher {
                Match::Exact(p) => vec![format!("= {}", quote(p))],
                Match::Prefix(p) if regex_mode => {
                    has_root |= p == "/";
                    if p == "/" {
                        vec![format!("~ {}", quote("^/"))]
                    } else {
                        vec![format!("~ {}", quote(&format!("^{}(/|$)", regex_escape(p))))]
                    }
                }
                Match::Prefix(p) if p == "/" => {
                    has_root = true;
                    vec!["/".to_string()]
                }
                Match::Prefix(p) => {
                    let mut v = vec![quote(&format!("{p}/"))];
                    // An Exact route for the same path wins the bare path.
                    if !exact.contains(p.as_str()) {
                        v.insert(0, format!("= {}", quote(p)));
                    }
                    v
                }
                Match::Regex(p) => {
                    has_root |= p == "/";
                    vec![format!("~* {}", quote(&format!("^{p}")))]
                }
            };
            let redirect = !host.is_empty()
                && (route.force_ssl_redirect || (server.tls.is_some() && route.ssl_redirect));
            for head in heads {
                let _ = writeln!(o, "        # {}", route.from);
                let _ = writeln!(o, "        location {head} {{");
                if redirect {
                    let _ = writeln!(
                        o,
                        "            if ($scheme = http) {{\n                return 308 https://$host{redirect_port}$request_uri;\n            }}"
                    );
                }
                if let (Some(target), Match::Regex(p)) = (&route.rewrite, &route.matcher) {
                    let _ = writeln!(
                        o,
                        "            rewrite {} {} break;",
                        quote(&format!("(?i)^{p}")),
                        quote(target)
                    );
                }
                write_action(&mut o, &route.action);
                let _ = writeln!(o, "        }}");
            }
        }
        if !has_root {
            let (fallback, from) = match &server.default_action {
                Some((a, from)) => (a.clone(), from.as_str()),
                None if settings.default_backend.is_some() => (default_backend.clone(), "default backend"),
                None => (Action::NotFound, "no route"),
            };
            let _ = writeln!(o, "        # {from}");
            let _ = writeln!(o, "        location / {{");
            if server.redirect {
                let _ = writeln!(
                    o,
                    "            if ($scheme = http) {{\n                return 308 https://$host{redirect_port}$request_uri;\n            }}"
                );
            }
            write_action(&mut o, &fallback);
            let _ = writeln!(o, "        }}");
        }
        let _ = writeln!(o, "    }}");
    }
    let _ = writeln!(o, "}}");
    o
}

fn write_action(o: &mut String, action: &Action) {
    let _ = match action {
        Action::Proxy(u) => writeln!(o, "            proxy_pass http://{};", u.name()),
        Action::Unavailable => writeln!(o, "            return 503;"),
        Action::NotFound => writeln!(o, "            return 404;"),
    };
}
