//! Ingress with real HTTP: one shared cluster (2 nodes, `--cni weft`, Weft on; every node serves
//! ingress, the default NetworkConfig selects them all). A host outside the cluster (on the
//! cluster's bridge, no route to pods or ClusterIPs) talks to the nodes' addresses on 80/443;
//! every Service behind an Ingress is whoami pods behind a ClusterIP (nginx → ClusterIP → Weft's
//! proxy → pod).
//!
//! - the seeds' example: `/wear` and `/watch` (Prefix) to two Services, element-wise
//!   (`/wearable` is not `/wear`); an Exact path; unmatched requests get 404 until NetworkConfig
//!   names a default backend, then that; the Ingress's status lists both nodes' addresses, and
//!   loses them when the Ingress moves to another class;
//! - two hosts routed by the Host header to two Services, and an unknown host to neither;
//! - TLS with a certificate the test makes (openssl) in a Secret: curl with `--cacert` and SNI
//!   (`--resolve`) gets the Service; plain HTTP to that host gets a 308 to https;
//! - `rewrite-target: /$2` with a capture group strips the prefix;
//! - an Ingress with an invalid regex next to a good one: the good one serves, the broken one
//!   gets a Warning Event saying why.
//!
//! `ingress_endpoints.rs` checks that endpoint changes do not reload nginx.
//!
//! Needs root, `cargo build --workspace --bins` and nginx/openssl from e2e/tools/install.sh.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{OutsideHost, PodOptions, Steps, TestCluster, TestOptions};

async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")))
        .await
}

const WAIT: Duration = Duration::from_secs(90);

/// whoami pods `name` (labelled `app=name`) behind a Service `name` with `port` → 80, named http.
async fn backends(c: &TestCluster, ns: &str, names: &[&str], port: u16) -> Result<()> {
    let nodes = c.nodes();
    let runs = names.iter().enumerate().map(|(i, name)| {
        let node = &nodes[i % nodes.len()].name;
        c.run_pod(PodOptions::new(ns, name).image("traefik/whoami").port(80).label("app", name).on_node(node))
    });
    futures::future::try_join_all(runs).await?;
    let services: String = names
        .iter()
        .map(|name| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: {port}, targetPort: 80}}]\n"
            )
        })
        .collect();
    c.apply_yaml(&services).await?;
    Ok(())
}

/// An HTTP answer as curl saw it.
#[derive(Debug)]
struct Answer {
    code: u16,
    body: String,
    location: String,
}

impl Answer {
    /// The whoami pod that answered, and the request line it received.
    fn pod(&self) -> Option<&str> {
        self.body.lines().find_map(|l| l.strip_prefix("Hostname: ")).map(str::trim)
    }
    fn request_line(&self) -> Option<&str> {
        self.body.lines().find(|l| l.starts_with("GET ")).map(str::trim)
    }
}

/// `curl` from the outside host; `None` when it got no HTTP answer at all.
async fn curl(outside: &OutsideHost, args: &[&str]) -> Result<Option<Answer>> {
    let mut all = vec!["-sS", "--max-time", "5", "-o", "/dev/stdout", "-w", "\n%{http_code} %{redirect_url}"];
    all.extend_from_slice(args);
    let out = outside.run("curl", &all).await?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').context("no status line from curl -w")?;
    let (code, location) = status.split_once(' ').unwrap_or((status, ""));
    Ok(Some(Answer { code: code.parse()?, body: body.to_string(), location: location.to_string() }))
}

/// GET `http://<host>/<path>` against `node_ip:80` (curl `--resolve`, so Host and SNI are right).
async fn get(outside: &OutsideHost, node_ip: Ipv4Addr, host: &str, path: &str) -> Result<Option<Answer>> {
    let resolve = format!("{host}:80:{node_ip}");
    curl(outside, &["--resolve", &resolve, &format!("http://{host}{path}")]).await
}

/// Waits until `check` accepts the answer to GET host/path on every node.
async fn wait_answer(
    c: &TestCluster,
    outside: &OutsideHost,
    host: &str,
    path: &str,
    what: &str,
    check: impl Fn(&Answer) -> bool,
) -> Result<()> {
    for node in c.nodes() {
        c.wait_for(&format!("{what} on {} ({host}{path})", node.name), WAIT, || async {
            match get(outside, node.ip, host, path).await? {
                Some(a) if check(&a) => Ok(Some(())),
                other => bail!("answer: {other:?}"),
            }
        })
        .await?;
    }
    Ok(())
}

/// GET host/path on one node, which must answer `code` from `pod`.
async fn expect(
    outside: &OutsideHost,
    ip: Ipv4Addr,
    node: &str,
    host: &str,
    path: &str,
    pod: Option<&str>,
    code: u16,
) -> Result<Answer> {
    let a = get(outside, ip, host, path).await?.with_context(|| format!("{node} {host}{path}: no answer"))?;
    ensure!(a.code == code && a.pod() == pod, "{node} {host}{path}: want {code} from {pod:?}, got {a:?}");
    Ok(a)
}

fn pod_is<'a>(pod: &'a str) -> impl Fn(&Answer) -> bool + 'a {
    move |a| a.code == 200 && a.pod() == Some(pod)
}

#[tokio::test]
async fn paths_hosts_default_backend_and_status() -> Result<()> {
    let s = Steps::new("ingress-paths");
    let c = cluster().await?;
    let ns_guard = c.namespace("ing-paths").await?;
    let ns = ns_guard.name();
    backends(&c, ns, &["wear", "watch", "tea", "coffee", "fallback"], 8080).await?;
    // Host 1 of the outside hosts is this test's; the others use 2 and 3.
    let outside = OutsideHost::start(&c, 1)?;
    s.step("backends up");

    c.apply_yaml(&format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: shop, namespace: {ns}}}
spec:
  ingressClassName: weft
  rules:
  - host: shop.example.test
    http:
      paths:
      - {{path: /wear, pathType: Prefix, backend: {{service: {{name: wear, port: {{number: 8080}}}}}}}}
      - {{path: /watch, pathType: Prefix, backend: {{service: {{name: watch, port: {{name: http}}}}}}}}
      - {{path: /exact, pathType: Exact, backend: {{service: {{name: watch, port: {{number: 8080}}}}}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: drinks, namespace: {ns}}}
spec:
  rules:
  - host: tea.example.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: tea, port: {{number: 8080}}}}}}}}
  - host: coffee.example.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: coffee, port: {{number: 8080}}}}}}}}
"#
    ))
    .await?;
    let shop = "shop.example.test";
    wait_answer(&c, &outside, shop, "/wear", "/wear to reach wear", pod_is("wear")).await?;
    s.step("/wear reaches wear on every node");
    for node in c.nodes() {
        let check = |path, pod, code| expect(&outside, node.ip, &node.name, shop, path, pod, code);
        let a = check("/wear/socks?size=9", Some("wear"), 200).await?;
        ensure!(a.request_line() == Some("GET /wear/socks?size=9 HTTP/1.1"), "path passed unchanged: {a:?}");
        check("/watch", Some("watch"), 200).await?;
        check("/watch/strap", Some("watch"), 200).await?;
        check("/exact", Some("watch"), 200).await?;
        // Element-wise: /wearable is not under /wear; Exact does not match below itself.
        check("/wearable", None, 404).await?;
        check("/exact/more", None, 404).await?;
        check("/", None, 404).await?;
    }
    s.step("seeds' example: /wear and /watch by path, element-wise, Exact; the rest 404");

    for (host, pod) in [("tea.example.test", "tea"), ("coffee.example.test", "coffee")] {
        wait_answer(&c, &outside, host, "/any/thing", &format!("{host} to reach {pod}"), pod_is(pod)).await?;
    }
    let a = get(&outside, c.nodes()[0].ip, "unknown.example.test", "/").await?.context("no answer")?;
    ensure!(a.code == 404, "an unknown host gets 404: {a:?}");
    s.step("two hosts by Host header; unknown host 404");

    let mut want: Vec<String> = c.nodes().iter().map(|n| n.ip.to_string()).collect();
    want.sort();
    c.wait_for("the Ingress status to list the ingress nodes", WAIT, || async {
        let out = c
            .kubectl(&[
                "get",
                "ingress",
                "shop",
                "-n",
                ns,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[*].ip}",
            ])
            .await?;
        let mut got: Vec<String> = out.split_whitespace().map(str::to_string).collect();
        got.sort();
        if got == want { Ok(Some(())) } else { bail!("status addresses {got:?}, want {want:?}") }
    })
    .await?;
    s.step("status.loadBalancer lists both nodes");

    // An Ingress that leaves Weft's class loses the addresses Weft wrote into its status.
    let addresses = async |name: &str| {
        let jsonpath = "jsonpath={.status.loadBalancer.ingress[*].ip}";
        c.kubectl(&["get", "ingress", name, "-n", ns, "-o", jsonpath]).await
    };
    c.wait_for("drinks to get addresses", WAIT, || async {
        Ok((!addresses("drinks").await?.trim().is_empty()).then_some(()))
    })
    .await?;
    let other_class = r#"{"spec":{"ingressClassName":"someone-else"}}"#;
    c.kubectl(&["patch", "ingress", "drinks", "-n", ns, "--type", "merge", "-p", other_class]).await?;
    c.wait_for("drinks' addresses to be removed", WAIT, || async {
        Ok(addresses("drinks").await?.trim().is_empty().then_some(()))
    })
    .await?;
    s.step("an Ingress moved to another class loses its addresses");

    // The cluster's default backend, for requests no rule matches.
    let patch = format!(r#"{{"spec":{{"ingress":{{"defaultBackend":"{ns}/fallback:http"}}}}}}"#);
    c.kubectl(&["patch", "networkconfig", "default", "--type", "merge", "-p", &patch]).await?;
    let result = async {
        wait_answer(
            &c,
            &outside,
            "unknown.example.test",
            "/x",
            "unmatched host to reach fallback",
            pod_is("fallback"),
        )
        .await?;
        wait_answer(&c, &outside, shop, "/wearable", "unmatched path to reach fallback", pod_is("fallback"))
            .await?;
        let a = get(&outside, c.nodes()[1].ip, shop, "/wear").await?.context("no answer")?;
        ensure!(a.pod() == Some("wear"), "rules still win over the default backend: {a:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    c.kubectl(&[
        "patch",
        "networkconfig",
        "default",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/spec/ingress/defaultBackend"}]"#,
    ])
    .await?;
    result?;
    s.step("the default backend answers unmatched requests");
    Ok(())
}

/// A self-signed certificate for `host` (PEM cert, PEM key) made with openssl.
fn certificate(dir: &std::path::Path, host: &str) -> Result<(String, String)> {
    std::fs::create_dir_all(dir)?;
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={host}"),
        ])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()?;
    ensure!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    Ok((std::fs::read_to_string(crt)?, std::fs::read_to_string(key)?))
}

/// The first Warning Event with `reason` on Ingress `ns/name`, as `reason: note`.
async fn warning_event(c: &TestCluster, ns: &str, name: &str, reason: &str) -> Result<String> {
    let selector = format!("involvedObject.kind=Ingress,involvedObject.name={name},type=Warning");
    c.wait_for(&format!("a {reason} Event on Ingress {ns}/{name}"), WAIT, || async {
        let out = c
            .kubectl(&[
                "get",
                "events",
                "-n",
                ns,
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={range .items[*]}{.reason}: {.note}{.message}{\"\\n\"}{end}",
            ])
            .await?;
        Ok(out.lines().find(|l| l.starts_with(reason)).map(str::to_string))
    })
    .await
}

#[tokio::test]
async fn tls_with_sni_and_ssl_redirect() -> Result<()> {
    let s = Steps::new("ingress-tls");
    let c = cluster().await?;
    let ns_guard = c.namespace("ing-tls").await?;
    let ns = ns_guard.name();
    backends(&c, ns, &["secure"], 80).await?;
    let outside = OutsideHost::start(&c, 2)?;
    let host = "secure.example.test";
    let dir = c.state().dir.join("ingress-test").join(ns);
    let (crt, key) = certificate(&dir, host)?;
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: secure-tls, namespace: {ns}}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&crt),
        indent(&key)
    );
    let ingress = format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: secure, namespace: {ns}}}
spec:
  ingressClassName: weft
  tls:
  - hosts: [{host}]
    secretName: secure-tls
  rules:
  - host: {host}
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: secure, port: {{number: 80}}}}}}}}
"#
    );
    // The Ingress first: its host is served over HTTP, and the missing Secret is an Event.
    c.apply_yaml(&ingress).await?;
    let event = warning_event(&c, ns, "secure", "TLSSecretMissing").await?;
    ensure!(event.contains(&format!("{ns}/secure-tls")), "the Event names the Secret: {event}");
    s.step(&format!("Ingress without its Secret: {event}"));
    c.apply_yaml(&secret).await?;
    s.step("Secret applied");
    let ca = dir.join("tls.crt").to_string_lossy().into_owned();
    for node in c.nodes() {
        let resolve = format!("{host}:443:{}", node.ip);
        let url = format!("https://{host}/hello");
        c.wait_for(&format!("https://{host} on {} with the test's CA", node.name), WAIT, || async {
            match curl(&outside, &["--cacert", &ca, "--resolve", &resolve, &url]).await? {
                Some(a) if a.code == 200 && a.pod() == Some("secure") => Ok(Some(())),
                other => bail!("answer: {other:?}"),
            }
        })
        .await?;
        // The certificate is only offered for its host: another name gets no handshake.
        let other = format!("other.example.test:443:{}", node.ip);
        let refused = curl(&outside, &["-k", "--resolve", &other, "https://other.example.test/"]).await?;
        ensure!(refused.is_none(), "a name without a certificate must not get one: {refused:?}");
        let a = get(&outside, node.ip, host, "/hello?x=1").await?.context("no answer over http")?;
        ensure!(
            a.code == 308 && a.location == format!("https://{host}/hello?x=1"),
            "plain HTTP to a TLS host redirects: {a:?}"
        );
    }
    s.step("TLS by SNI with the Secret's certificate; HTTP redirects with 308");
    Ok(())
}

#[tokio::test]
async fn rewrite_target_and_a_broken_ingress_next_to_a_good_one() -> Result<()> {
    let s = Steps::new("ingress-rewrite");
    let c = cluster().await?;
    let ns_guard = c.namespace("ing-rw").await?;
    let ns = ns_guard.name();
    backends(&c, ns, &["api", "good"], 8080).await?;
    let outside = OutsideHost::start(&c, 3)?;
    c.apply_yaml(&format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: api
  namespace: {ns}
  annotations: {{nginx.ingress.kubernetes.io/rewrite-target: /$2}}
spec:
  ingressClassName: weft
  rules:
  - host: api.example.test
    http:
      paths:
      - {{path: /api(/|$)(.*), pathType: ImplementationSpecific, backend: {{service: {{name: api, port: {{number: 8080}}}}}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: broken
  namespace: {ns}
  annotations: {{nginx.ingress.kubernetes.io/use-regex: "true"}}
spec:
  ingressClassName: weft
  rules:
  - host: good.example.test
    http:
      paths:
      - {{path: /(unclosed, pathType: ImplementationSpecific, backend: {{service: {{name: good, port: {{number: 8080}}}}}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: good, namespace: {ns}}}
spec:
  ingressClassName: weft
  rules:
  - host: good.example.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: good, port: {{number: 8080}}}}}}}}
"#
    ))
    .await?;
    wait_answer(
        &c,
        &outside,
        "api.example.test",
        "/api/v1/items?id=7",
        "the rewritten path to reach api",
        |a| a.pod() == Some("api") && a.request_line() == Some("GET /v1/items?id=7 HTTP/1.1"),
    )
    .await?;
    let a = get(&outside, c.nodes()[0].ip, "api.example.test", "/api").await?.context("no answer")?;
    ensure!(a.request_line() == Some("GET / HTTP/1.1"), "/api rewrites to /: {a:?}");
    s.step("rewrite-target /$2 strips /api");

    wait_answer(&c, &outside, "good.example.test", "/anything", "the good Ingress to serve", pod_is("good"))
        .await?;
    let event = warning_event(&c, ns, "broken", "IngressRejected").await?;
    ensure!(
        event.contains("spec.rules[0].http.paths[0].path")
            && event.contains("not a valid regular expression"),
        "the Event says what is wrong: {event}"
    );
    s.step(&format!("the broken Ingress is left out with an Event ({event}); the good one serves"));
    Ok(())
}
