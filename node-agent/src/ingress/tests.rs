//! The nginx configuration for each Ingress feature (snapshots), the grammars, and a fuzz of the
//! renderer: whatever strings an Ingress holds, the output is rejected or safe (and nginx
//! accepts it).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use proptest::prelude::*;
use weft_api::plan::{self as pb, PathType};

use super::render::{Paths, render};

fn backend(svc: &str, last: u8, port: u32) -> Option<pb::IngressBackend> {
    Some(pb::IngressBackend {
        service: format!("shop/{svc}"),
        cluster_ip: u32::from(Ipv4Addr::new(10, 96, 0, last)),
        port,
    })
}

fn path(p: &str, t: PathType, b: Option<pb::IngressBackend>) -> pb::IngressPath {
    pb::IngressPath { path: p.into(), path_type: t as i32, backend: b }
}

fn ingress(name: &str, host: &str, paths: Vec<pb::IngressPath>) -> pb::Ingress {
    pb::Ingress {
        namespace: "shop".into(),
        name: name.into(),
        rules: vec![pb::IngressRule { host: host.into(), paths }],
        ssl_redirect: true,
        created_unix: 1,
        ..Default::default()
    }
}

fn settings() -> pb::IngressSettings {
    pb::IngressSettings { class_name: "weft".into(), http_port: 80, https_port: 443, default_backend: None }
}

fn paths() -> Paths {
    Paths::under(Path::new("/var/lib/weft/ingress"))
}

/// The server blocks (the http preamble is the same for every config), from the `skip`th on,
/// dedented.
fn servers(config: &str, skip: usize) -> String {
    let mut blocks: Vec<String> = Vec::new();
    for line in config.lines() {
        let Some(line) = line.strip_prefix("    ") else { continue };
        if line == "server {" {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks.into_iter().skip(skip).collect()
}

fn rendered(ingresses: &[pb::Ingress], settings: &pb::IngressSettings) -> String {
    let d = render(Some(Ipv4Addr::new(172, 18, 0, 2)), settings, ingresses, &BTreeMap::new(), &paths());
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    d.config
}

#[test]
fn the_preamble_points_nginx_at_its_own_directory_and_declares_keepalive_upstreams() {
    let config = rendered(
        &[ingress("wear", "", vec![path("/wear", PathType::Prefix, backend("wear", 11, 8080))])],
        &settings(),
    );
    insta::assert_snapshot!(config[..config.find("    server {").unwrap_or(0)], @r#"
    # Written by weft-agent from the node's plan; changes here are overwritten.
    worker_processes 2;
    pid /var/lib/weft/ingress/nginx.pid;
    error_log /var/lib/weft/ingress/error.log warn;
    events {
        worker_connections 4096;
    }
    http {
        client_body_temp_path /var/lib/weft/ingress/tmp/client_body;
        proxy_temp_path /var/lib/weft/ingress/tmp/proxy;
        fastcgi_temp_path /var/lib/weft/ingress/tmp/fastcgi;
        uwsgi_temp_path /var/lib/weft/ingress/tmp/uwsgi;
        scgi_temp_path /var/lib/weft/ingress/tmp/scgi;
        access_log off;
        server_tokens off;
        server_names_hash_bucket_size 256;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_connect_timeout 5s;
        upstream b_10_96_0_11_8080 {
            server 10.96.0.11:8080;
            keepalive 32;
            keepalive_time 5s;
            keepalive_requests 10000;
            keepalive_timeout 10s;
        }
    "#);
}

#[test]
fn prefix_paths_match_element_wise_exact_paths_exactly_and_unmatched_requests_get_404() {
    // The seeds' example: /wear and /watch to two Services, without a host.
    let config = rendered(
        &[ingress(
            "shop",
            "",
            vec![
                path("/wear", PathType::Prefix, backend("wear", 11, 8080)),
                path("/watch/", PathType::Prefix, backend("watch", 12, 8080)),
                path("/watch", PathType::Exact, backend("wear", 11, 8080)),
                path("/about", PathType::ImplementationSpecific, backend("watch", 12, 8080)),
            ],
        )],
        &settings(),
    );
    insta::assert_snapshot!(servers(&config, 0), @r#"
    server {
        listen 172.18.0.2:80 default_server;
        listen 172.18.0.2:443 ssl default_server;
        server_name _;
        ssl_reject_handshake on;
        # shop/shop
        location = "/watch" {
            proxy_pass http://b_10_96_0_11_8080;
        }
        # shop/shop
        location = "/about" {
            proxy_pass http://b_10_96_0_12_8080;
        }
        # shop/shop
        location "/about/" {
            proxy_pass http://b_10_96_0_12_8080;
        }
        # shop/shop
        location "/watch/" {
            proxy_pass http://b_10_96_0_12_8080;
        }
        # shop/shop
        location = "/wear" {
            proxy_pass http://b_10_96_0_11_8080;
        }
        # shop/shop
        location "/wear/" {
            proxy_pass http://b_10_96_0_11_8080;
        }
        # no route
        location / {
            return 404;
        }
    }
    "#);
}

#[test]
fn hosts_get_their_own_servers_with_wildcards_matching_one_label_and_the_default_backend() {
    let mut with_default =
        ingress("b", "*.example.com", vec![path("/", PathType::Prefix, backend("b", 13, 80))]);
    with_default.default_backend = backend("fallback", 14, 80);
    let mut s = settings();
    s.default_backend = backend("global", 15, 80);
    let config = rendered(
        &[
            ingress("a", "a.example.com", vec![path("/api", PathType::Prefix, backend("a", 12, 80))]),
            with_default,
        ],
        &s,
    );
    insta::assert_snapshot!(servers(&config, 0), @r#"
    server {
        listen 172.18.0.2:80 default_server;
        listen 172.18.0.2:443 ssl default_server;
        server_name _;
        ssl_reject_handshake on;
        # default backend
        location / {
            proxy_pass http://b_10_96_0_15_80;
        }
    }
    server {
        listen 172.18.0.2:80;
        server_name "~^[^.]+\.example\.com$";
        # shop/b
        location / {
            proxy_pass http://b_10_96_0_13_80;
        }
    }
    server {
        listen 172.18.0.2:80;
        server_name "a.example.com";
        # shop/a
        location = "/api" {
            proxy_pass http://b_10_96_0_12_80;
        }
        # shop/a
        location "/api/" {
            proxy_pass http://b_10_96_0_12_80;
        }
        # default backend
        location / {
            proxy_pass http://b_10_96_0_15_80;
        }
    }
    "#);
}

#[test]
fn tls_hosts_serve_their_certificate_by_sni_and_redirect_plain_http() {
    let mut tls =
        ingress("secure", "secure.example.com", vec![path("/", PathType::Prefix, backend("s", 16, 443))]);
    tls.tls =
        vec![pb::IngressTls { hosts: vec!["secure.example.com".into()], secret: "shop/secure-tls".into() }];
    let mut plain = ingress("plain", "plain.example.com", vec![path("/", PathType::Prefix, None)]);
    plain.force_ssl_redirect = true;
    let secrets = BTreeMap::from([(
        "shop/secure-tls".to_string(),
        pb::TlsSecret {
            cert: b"-----BEGIN CERTIFICATE-----".to_vec(),
            key: b"-----BEGIN PRIVATE KEY-----\n".to_vec(),
        },
    )]);
    let d = render(Some(Ipv4Addr::new(172, 18, 0, 2)), &settings(), &[tls, plain], &secrets, &paths());
    assert_eq!(
        d.certs.into_iter().collect::<Vec<_>>(),
        [(
            Path::new("/var/lib/weft/ingress/certs/shop_secure-tls.393cf61a770a1b5d.pem").to_path_buf(),
            b"-----BEGIN CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\n".to_vec()
        )]
    );
    insta::assert_snapshot!(servers(&d.config, 1), @r#"
    server {
        listen 172.18.0.2:80;
        server_name "plain.example.com";
        # shop/plain
        location / {
            if ($scheme = http) {
                return 308 https://$host$request_uri;
            }
            return 503;
        }
    }
    server {
        listen 172.18.0.2:80;
        server_name "secure.example.com";
        listen 172.18.0.2:443 ssl;
        ssl_certificate "/var/lib/weft/ingress/certs/shop_secure-tls.393cf61a770a1b5d.pem";
        ssl_certificate_key "/var/lib/weft/ingress/certs/shop_secure-tls.393cf61a770a1b5d.pem";
        # shop/secure
        location / {
            if ($scheme = http) {
                return 308 https://$host$request_uri;
            }
            proxy_pass http://b_10_96_0_16_443;
        }
    }
    "#);
}

#[test]
fn a_secret_without_pem_blocks_leaves_its_host_on_plain_http() {
    let mut tls =
        ingress("secure", "secure.example.com", vec![path("/", PathType::Prefix, backend("s", 16, 443))]);
    tls.tls = vec![pb::IngressTls { hosts: vec!["secure.example.com".into()], secret: "shop/junk".into() }];
    let secrets = BTreeMap::from([(
        "shop/junk".to_string(),
        pb::TlsSecret { cert: b"junk".to_vec(), key: b"junk".to_vec() },
    )]);
    let d = render(Some(Ipv4Addr::new(172, 18, 0, 2)), &settings(), &[tls], &secrets, &paths());
    assert!(d.certs.is_empty());
    assert!(!d.config.contains("ssl_certificate"));
    assert!(!d.config.contains("return 308"), "no redirect to an HTTPS that has no certificate");
}

#[test]
fn rewrite_target_turns_the_hosts_paths_into_regexes_longest_first() {
    let mut rewrite = ingress(
        "api",
        "api.example.com",
        vec![path("/api(/|$)(.*)", PathType::ImplementationSpecific, backend("api", 17, 80))],
    );
    rewrite.rewrite_target = "/$2".into();
    rewrite.ssl_redirect = false;
    let plain = ingress(
        "web",
        "api.example.com",
        vec![
            path("/", PathType::Prefix, backend("web", 18, 80)),
            path("/api/v1", PathType::Prefix, backend("v1", 19, 80)),
        ],
    );
    let config = rendered(&[rewrite, plain], &settings());
    insta::assert_snapshot!(servers(&config, 1), @r#"
    server {
        listen 172.18.0.2:80;
        server_name "api.example.com";
        # shop/api
        location ~* "^/api(/|$)(.*)" {
            rewrite "(?i)^/api(/|$)(.*)" "/$2" break;
            proxy_pass http://b_10_96_0_17_80;
        }
        # shop/web
        location ~ "^/api/v1(/|$)" {
            proxy_pass http://b_10_96_0_19_80;
        }
        # shop/web
        location ~ "^/" {
            proxy_pass http://b_10_96_0_18_80;
        }
    }
    "#);
}

#[test]
fn a_bad_ingress_is_left_out_and_the_others_stay() {
    let good = ingress("good", "", vec![path("/ok", PathType::Prefix, backend("ok", 11, 80))]);
    let bad = ingress("bad", "", vec![path("/x\";\n}", PathType::Prefix, backend("ok", 11, 80))]);
    let d = render(Some(Ipv4Addr::new(172, 18, 0, 2)), &settings(), &[bad, good], &BTreeMap::new(), &paths());
    assert_eq!(d.rejected.len(), 1);
    assert_eq!(d.rejected[0].0, "shop/bad");
    assert!(d.config.contains("location = \"/ok\""));
    assert!(!d.config.contains("/x"));
}

#[test]
fn the_older_ingress_wins_a_path_both_claim() {
    let mut newer = ingress("newer", "", vec![path("/p", PathType::Prefix, backend("new", 12, 80))]);
    newer.created_unix = 5;
    let older = ingress("older", "", vec![path("/p", PathType::Prefix, backend("old", 11, 80))]);
    let config = rendered(&[newer, older], &settings());
    assert!(config.contains("# shop/older\n        location = \"/p\""));
    assert!(!config.contains("b_10_96_0_12_80;"));
}

// ---- fuzz ----

/// A string from characters that mean something to nginx or to a regex, and letters.
fn nasty() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "/", "a", "Z", "0", ".", "-", "*", ";", "{", "}", "\"", "'", "\\", "$", "\n", " ", "#", "(", ")",
            "|", "^", "[", "]", "?", "+", "%", "$1", "\\n", "\t", "~", "=", ",", ":", "@", "!",
        ]),
        0..12,
    )
    .prop_map(|v| v.concat())
}

/// Half the time a string of the field's own grammar (so accepted Ingresses are common), half
/// the time a nasty one.
fn either(valid: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(valid)
            .unwrap_or_else(|_| proptest::string::string_regex("a").expect("regex")),
        nasty()
    ]
}

fn arb_ingress() -> impl Strategy<Value = pb::Ingress> {
    (
        either("(\\*\\.)?[a-z]{1,5}(\\.[a-z0-9]{1,5}){0,2}"),
        either("(/[a-z0-9._~%:@!*+,=-]{0,5}){1,3}"),
        either("[a-z]{1,8}"),
        0..3i32,
        any::<bool>(),
        prop::option::of(either("(/[a-z]{0,3}){0,2}(/\\$[1-3])?")),
        prop::option::of(prop::sample::select(vec![
            "/api(/|$)(.*)",
            "/v[0-9]+/(.*)",
            "/a\\.b",
            "/(x|y)?$",
            "/(unclosed",
        ])),
    )
        .prop_map(|(host, p, secret, t, regex, rewrite, regex_path)| {
            let p = match regex_path {
                Some(r) if regex || rewrite.is_some() => r.to_string(),
                _ => format!("/{}", p.trim_start_matches('/')),
            };
            let mut i = ingress(
                "fuzz",
                &host,
                vec![path(&p, PathType::try_from(t).unwrap_or_default(), backend("f", 11, 80))],
            );
            i.use_regex = regex;
            i.rewrite_target = rewrite.map(|r| format!("/{}", r.trim_start_matches('/'))).unwrap_or_default();
            i.tls = vec![pb::IngressTls { hosts: vec![host], secret: format!("shop/{secret}") }];
            i
        })
}

/// Every user string in an accepted Ingress, checked where it lands: no character that could end
/// a directive or a quoted string, and `$` only as a regex anchor or a capture.
fn assert_safe(i: &pb::Ingress) {
    let mut strings: Vec<&str> = vec![&i.rewrite_target];
    for r in &i.rules {
        strings.push(&r.host);
        strings.extend(r.paths.iter().map(|p| p.path.as_str()));
    }
    for t in &i.tls {
        strings.push(&t.secret);
        strings.extend(t.hosts.iter().map(String::as_str));
    }
    for s in strings {
        assert!(
            !s.contains(['"', ';', '{', '}', '\n', '\r', '\t', ' ', '#', '\'']),
            "{s:?} reached the config"
        );
        for (pos, _) in s.match_indices('$') {
            let next = s[pos + 1..].chars().next();
            assert!(
                next.is_none_or(|c| c.is_ascii_digit() || c == ')' || c == '|'),
                "{s:?}: `$` that could name a variable"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn any_string_is_rejected_or_stays_inside_its_quotes(ing in arb_ingress()) {
        let d = render(Some(Ipv4Addr::new(172, 18, 0, 2)), &settings(), std::slice::from_ref(&ing), &BTreeMap::new(), &paths());
        if d.rejected.is_empty() {
            assert_safe(&ing);
            // Every line the renderer writes is balanced: user text never opened or closed a block.
            let opens = d.config.matches('{').count();
            let closes = d.config.matches('}').count();
            prop_assert_eq!(opens, closes);
            for line in d.config.lines() {
                prop_assert_eq!(line.matches('"').count() % 2, 0, "unbalanced quotes in {}", line);
            }
        } else {
            prop_assert!(weft_api::ingress::validate(&ing).is_err());
        }
    }
}

/// nginx itself accepts what the renderer writes for accepted random Ingresses (a smaller run:
/// each case runs `nginx -t`).
#[test]
fn nginx_accepts_every_rendered_config() {
    let nginx = Path::new("/usr/sbin/nginx");
    assert!(nginx.exists(), "nginx is needed for this test: run e2e/tools/install.sh");
    let dir = tempfile::TempDir::new().expect("tempdir");
    let paths = Paths::under(dir.path());
    std::fs::create_dir_all(&paths.certs).expect("certs dir");
    std::fs::create_dir_all(dir.path().join("tmp")).expect("tmp dir");
    let cert = test_cert(dir.path());
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 40, ..ProptestConfig::default() });
    let checked = std::cell::Cell::new(0);
    runner
        .run(&arb_ingress(), |ing| {
            let secrets = ing.tls.iter().map(|t| (t.secret.clone(), cert.clone())).collect();
            // 127.0.0.1 with high ports: nginx -t binds nothing, but the address must be local.
            let s = pb::IngressSettings { http_port: 18080, https_port: 18443, ..settings() };
            let d = render(Some(Ipv4Addr::LOCALHOST), &s, std::slice::from_ref(&ing), &secrets, &paths);
            if !d.rejected.is_empty() {
                return Ok(());
            }
            for (path, pem) in &d.certs {
                std::fs::write(path, pem).expect("cert");
            }
            let conf = dir.path().join("nginx.conf");
            std::fs::write(&conf, &d.config).expect("conf");
            let out = std::process::Command::new(nginx)
                .args([
                    "-t",
                    "-q",
                    "-p",
                    &format!("{}/", dir.path().display()),
                    "-e",
                    &dir.path().join("error.log").to_string_lossy(),
                    "-c",
                    &conf.to_string_lossy(),
                ])
                .output()
                .expect("nginx -t");
            prop_assert!(
                out.status.success(),
                "nginx -t refused:\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                d.config
            );
            checked.set(checked.get() + 1);
            Ok(())
        })
        .expect("every accepted config passes nginx -t");
    assert!(checked.get() > 0, "the run rendered no accepted Ingress");
}

/// A self-signed certificate from openssl (the same tool the e2e test uses).
fn test_cert(dir: &Path) -> pb::TlsSecret {
    let (crt, key) = (dir.join("t.crt"), dir.join("t.key"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    pb::TlsSecret { cert: std::fs::read(crt).expect("crt"), key: std::fs::read(key).expect("key") }
}

// ---- the supervisor, with a real nginx on loopback ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The status code of GET / on 127.0.0.1:`port` (a minimal HTTP/1.0 client).
fn status_of(port: u16) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_supervisor_starts_reloads_refuses_bad_configs_adopts_and_restarts_nginx() {
    use super::{IngressHandle, IngressOptions, Outcome};
    let dir = tempfile::TempDir::new().expect("tempdir");
    let handle = IngressHandle::new(dir.path(), IngressOptions::default());
    let port = free_port();
    let s =
        pb::IngressSettings { http_port: u32::from(port), https_port: u32::from(free_port()), ..settings() };
    let desired = |ingresses: &[pb::Ingress]| {
        render(Some(Ipv4Addr::LOCALHOST), &s, ingresses, &BTreeMap::new(), &handle.paths())
    };
    let empty = desired(&[]);
    assert_eq!(handle.serve(&empty).expect("start"), Outcome::Started);
    wait_until("nginx to answer 404", || status_of(port) == Some(404));
    assert_eq!(handle.serve(&empty).expect("again"), Outcome::Unchanged, "nothing changed: no reload");
    let certs_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&handle.paths().certs).expect("certs dir").permissions(),
    );
    assert_eq!(certs_mode & 0o777, 0o700, "the certificates' directory is root's alone");

    // A route with no Service behind it: 503 once reloaded.
    let routed = desired(&[ingress("x", "", vec![path("/", PathType::Prefix, None)])]);
    assert_eq!(handle.serve(&routed).expect("reload"), Outcome::Reloaded);
    wait_until("the reloaded config to answer 503", || status_of(port) == Some(503));

    // nginx -t refuses it: the error says why and the running config keeps serving.
    let mut broken = routed.clone();
    broken.config = broken.config.replace("return 503;", "return 503 bogus extra;");
    let err = handle.serve(&broken).expect_err("nginx -t must refuse it").to_string();
    assert!(err.contains("nginx rejected the configuration"), "{err}");
    wait_until("the previous config to keep serving", || status_of(port) == Some(503));

    // A new agent (another handle on the same directory) adopts the running nginx.
    let pid = handle.running_pid().expect("pid");
    let adopted = IngressHandle::new(dir.path(), IngressOptions::default());
    assert_eq!(adopted.serve(&routed).expect("adopt"), Outcome::Unchanged);
    assert_eq!(adopted.running_pid(), Some(pid));
    drop(handle);

    // Killed: the watchdog starts it again.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    wait_until("the watchdog to restart nginx", || adopted.running_pid().is_some_and(|p| p != pid));
    wait_until("the restarted nginx to answer", || status_of(port) == Some(503));
    assert_eq!(adopted.restarts(), 1);

    adopted.stop().expect("stop");
    assert_eq!(adopted.running_pid(), None);
    assert_eq!(status_of(port), None, "stopped: nothing listens");
}

/// A renewed certificate in a plan nginx refuses never touches the files the running
/// configuration names; once a good plan is live, the old certificate's file goes.
#[test]
fn a_refused_config_leaves_the_running_certificates_in_place() {
    use super::{IngressHandle, IngressOptions, Outcome};
    let dir = tempfile::TempDir::new().expect("tempdir");
    let handle = IngressHandle::new(&dir.path().join("ingress"), IngressOptions::default());
    let s = pb::IngressSettings {
        http_port: u32::from(free_port()),
        https_port: u32::from(free_port()),
        ..settings()
    };
    let mut tls = ingress("secure", "secure.example.com", vec![path("/", PathType::Prefix, None)]);
    tls.tls = vec![pb::IngressTls { hosts: vec!["secure.example.com".into()], secret: "shop/tls".into() }];
    let desired = |cert: &pb::TlsSecret| {
        let secrets = BTreeMap::from([("shop/tls".to_string(), cert.clone())]);
        render(Some(Ipv4Addr::LOCALHOST), &s, std::slice::from_ref(&tls), &secrets, &handle.paths())
    };
    let (old_dir, new_dir) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::create_dir_all(&old_dir).expect("dir");
    std::fs::create_dir_all(&new_dir).expect("dir");
    let first = desired(&test_cert(&old_dir));
    assert_eq!(handle.serve(&first).expect("start"), Outcome::Started);

    let renewed = test_cert(&new_dir);
    let mut refused = desired(&renewed);
    refused.config = refused.config.replace("return 503;", "return 503 bogus extra;");
    assert!(handle.serve(&refused).is_err(), "nginx -t must refuse it");
    for (file, pem) in &first.certs {
        assert_eq!(
            std::fs::read(file).ok().as_ref(),
            Some(pem),
            "{} is what nginx runs with",
            file.display()
        );
    }

    let good = desired(&renewed);
    assert_eq!(handle.serve(&good).expect("reload"), Outcome::Reloaded);
    for file in first.certs.keys() {
        assert!(!file.exists(), "{} is no longer named by the live configuration", file.display());
    }
    for (file, pem) in &good.certs {
        assert_eq!(std::fs::read(file).ok().as_ref(), Some(pem));
    }
    handle.stop().expect("stop");
}
