//! Cluster DNS, with real queries: a cluster of its own (2 nodes, `--cni weft`, Weft on). Every
//! node's agent runs CoreDNS on the node address; the operator keeps `kube-system/kube-dns` at
//! 10.96.0.10 in front of them. A host outside the cluster (on the cluster's bridge) runs its own
//! CoreDNS: `example.test` on port 53 (the upstream) and `corp.test` on 5353 (a stub domain);
//! a second outside host answers `example.test` differently (the new upstream).
//!
//! From a pod, asking every node's CoreDNS directly and through the pod's own resolv.conf
//! (search path, ndots:5, nameserver 10.96.0.10 through Weft's proxy): a Service by its short and
//! longer names, a headless Service (one A record per ready pod), SRV of a named port, an
//! ExternalName (CNAME), a pod's `a-b-c-d.<ns>.pod` name, PTR of a ClusterIP, a name forwarded to
//! the upstream, a stub domain; then changing `dns.upstreams` in NetworkConfig reaches every node,
//! `dns.podRecords: Verified` stops answering pod names that no pod has, and an upstream that
//! would loop back to kube-dns is refused (NetworkConfig status) while the nodes keep serving the
//! last good configuration; an agent killed with SIGKILL leaves no CoreDNS
//! behind and its successor serves again.
//! Needs root, `cargo build --workspace --bins` and CoreDNS from e2e/tools/install.sh.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use weft_e2e::cluster::{
    AGENT_METRICS_PORT, OutsideHost, PodOptions, Steps, TestCluster, TestOptions, metric_value, metrics_text,
};

/// Runs CoreDNS on an outside host with `corefile`.
fn outside_coredns(c: &TestCluster, host: &mut OutsideHost, name: &str, corefile: &str) -> Result<()> {
    let dir = c.state().dir.join("dns-test");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.Corefile"));
    std::fs::write(&path, corefile)?;
    let coredns = c.state().tools_bin_dir.join("coredns");
    let log = dir.join(format!("{name}.log"));
    host.spawn(&coredns.to_string_lossy(), &["-conf", &path.to_string_lossy()], Some(&log))
}

/// `dig +short` from `pod` with extra arguments; the answer lines.
async fn dig(c: &TestCluster, ns: &str, pod: &str, args: &[&str]) -> Result<Vec<String>> {
    let mut cmd = vec!["dig", "+short", "+time=2", "+tries=2"];
    cmd.extend_from_slice(args);
    let out = c.exec_ok(ns, pod, &cmd).await?;
    Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
}

/// Waits until `dig args` from the pod answers exactly `want` (the first answer: a freshly
/// started CoreDNS may still be syncing with the API).
async fn expect_answer(c: &TestCluster, ns: &str, pod: &str, args: &[&str], want: &[&str]) -> Result<()> {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let what = format!("`dig +short {}` to answer {want:?}", args.join(" "));
    c.wait_for(&what, Duration::from_secs(30), || {
        let got = dig(c, ns, pod, args);
        let want = want.clone();
        async move {
            let got = got.await?;
            ensure!(got == want, "it answered {got:?}");
            Ok(Some(()))
        }
    })
    .await
}

/// Waits until the answer lines of `dig +short args` satisfy `ok` (CoreDNS learns new
/// EndpointSlices from its watch a moment after the API has them).
async fn expect_lines(
    c: &TestCluster,
    ns: &str,
    pod: &str,
    args: &[&str],
    what: &str,
    ok: impl Fn(&[String]) -> bool,
) -> Result<()> {
    let ok = &ok;
    c.wait_for(&format!("`dig {}`: {what}", args.join(" ")), Duration::from_secs(30), || async move {
        let got = dig(c, ns, pod, args).await?;
        ensure!(ok(&got), "it answered {got:?}");
        Ok(Some(()))
    })
    .await
}

#[tokio::test]
async fn pods_resolve_services_pods_and_outside_names_on_every_node() -> Result<()> {
    let s = Steps::new("dns");
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    s.step("cluster up");
    let mut upstream = OutsideHost::start(&c, 1)?;
    let mut new_upstream = OutsideHost::start(&c, 2)?;
    let (up_ip, new_ip) = (upstream.ip(), new_upstream.ip());
    outside_coredns(
        &c,
        &mut upstream,
        "upstream",
        &format!(
            "example.test:53 {{\n    bind {up_ip}\n    hosts {{\n        192.0.2.10 www.example.test\n    }}\n}}\n\
             corp.test:5353 {{\n    bind {up_ip}\n    hosts {{\n        192.0.2.20 db.corp.test\n    }}\n}}\n"
        ),
    )?;
    outside_coredns(
        &c,
        &mut new_upstream,
        "new-upstream",
        &format!(
            "example.test:53 {{\n    bind {new_ip}\n    hosts {{\n        192.0.2.11 www.example.test\n    }}\n}}\n"
        ),
    )?;
    c.patch_network_config(serde_json::json!({
        "dns": { "upstreams": [up_ip.to_string()], "stubDomains": [{ "domain": "corp.test", "servers": [format!("{up_ip}:5353")] }] }
    }))
    .await?;

    let ns = c.namespace("dns").await?;
    let ns = ns.name().to_string();
    let web = |name: &str, node: &str| {
        PodOptions::new(&ns, name).image("traefik/whoami").port(80).label("app", "web").on_node(node)
    };
    let (w1, w2, client) = tokio::try_join!(
        c.run_pod(web("web-1", "node-1")),
        c.run_pod(web("web-2", "node-2")),
        c.run_pod(PodOptions::new(&ns, "client").on_node("node-1")),
    )?;
    let ip_of = |p: &k8s_openapi::api::core::v1::Pod| -> Result<Ipv4Addr> {
        Ok(p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).context("pod without IP")?.parse()?)
    };
    let web_ips: BTreeSet<String> = [ip_of(&w1)?, ip_of(&w2)?].iter().map(Ipv4Addr::to_string).collect();
    let client_ip = ip_of(&client)?;
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 8080, targetPort: 80, protocol: TCP}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web-headless, namespace: {ns}}}\n\
         spec:\n  clusterIP: None\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: {ns}}}\n\
         spec:\n  type: ExternalName\n  externalName: www.example.test\n"
    ))
    .await?;
    let cluster_ip = c
        .kubectl(&["get", "service", "web", "-n", &ns, "-o", "jsonpath={.spec.clusterIP}"])
        .await?
        .trim()
        .to_string();
    ensure!(!cluster_ip.is_empty(), "web has no ClusterIP");
    s.step(&format!("pods and services up (web {cluster_ip})"));

    // The kube-dns Service fronts every node.
    let kube_dns = c
        .wait_for("the kube-dns Service", Duration::from_secs(30), || {
            let r = c.kubectl(&[
                "get",
                "service",
                "kube-dns",
                "-n",
                "kube-system",
                "-o",
                "jsonpath={.spec.clusterIP}",
            ]);
            async move { Ok(Some(r.await?).filter(|ip| !ip.trim().is_empty())) }
        })
        .await?;
    ensure!(kube_dns.trim() == "10.96.0.10", "kube-dns is at {kube_dns:?}, not 10.96.0.10");
    let slice = c
        .kubectl(&[
            "get",
            "endpointslices",
            "-n",
            "kube-system",
            "-l",
            "kubernetes.io/service-name=kube-dns",
            "-o",
            "jsonpath={range .items[*].endpoints[*]}{.addresses[0]} {.nodeName}{\"\\n\"}{end}",
        ])
        .await?;
    let listed: BTreeSet<&str> = slice.lines().map(str::trim).collect();
    let nodes = c.nodes();
    let expected: BTreeSet<String> = nodes.iter().map(|n| format!("{} {}", n.ip, n.name)).collect();
    ensure!(
        listed == expected.iter().map(String::as_str).collect(),
        "kube-dns endpoints {listed:?}, expected {expected:?}"
    );

    let fqdn = format!("web.{ns}.svc.cluster.local");
    let pod_name = format!("{}.{ns}.pod.cluster.local", client_ip.to_string().replace('.', "-"));
    let rev = format!("web.{ns}.svc.cluster.local.");
    for node in &nodes {
        let at = format!("@{}", node.ip);
        let at = at.as_str();
        s.step(&format!("asking {} directly", node.name));
        // The search path of the pod's resolv.conf, sent to this node.
        for name in ["web".to_string(), format!("web.{ns}"), format!("web.{ns}.svc")] {
            expect_answer(&c, &ns, "client", &[at, "+search", &name], &[&cluster_ip]).await?;
        }
        expect_answer(&c, &ns, "client", &[at, &fqdn], &[&cluster_ip]).await?;
        let headless = format!("web-headless.{ns}.svc.cluster.local");
        expect_lines(&c, &ns, "client", &[at, &headless], "one A record per ready pod", |got| {
            got.iter().cloned().collect::<BTreeSet<_>>() == web_ips && got.len() == web_ips.len()
        })
        .await?;
        let srv = format!("_http._tcp.web.{ns}.svc.cluster.local");
        let target = format!(" 8080 {fqdn}.");
        expect_lines(&c, &ns, "client", &[at, &srv, "SRV"], "SRV of the named port", |got| {
            got.len() == 1 && got[0].ends_with(&target)
        })
        .await?;
        let srv = format!("_http._tcp.{headless}");
        expect_lines(
            &c,
            &ns,
            "client",
            &[at, &srv, "SRV"],
            "one SRV per pod of the headless Service",
            |got| got.len() == 2 && got.iter().all(|r| r.contains(" 80 ")),
        )
        .await?;
        // An A query answered with a name: the CNAME (`+short` prints its target first).
        let ext = format!("ext.{ns}.svc.cluster.local");
        expect_lines(&c, &ns, "client", &[at, &ext], "a CNAME to www.example.test", |got| {
            got.first().is_some_and(|l| l == "www.example.test.")
        })
        .await?;
        expect_answer(&c, &ns, "client", &[at, &pod_name], &[&client_ip.to_string()]).await?;
        expect_answer(&c, &ns, "client", &[at, "-x", &cluster_ip], &[&rev]).await?;
        expect_answer(&c, &ns, "client", &[at, "www.example.test"], &["192.0.2.10"]).await?;
        expect_answer(&c, &ns, "client", &[at, "db.corp.test"], &["192.0.2.20"]).await?;
        let metrics = metrics_text(std::net::SocketAddr::from((node.ip, AGENT_METRICS_PORT))).await?;
        ensure!(
            metric_value(&metrics, "weft_agent_dns_serving") == Some(1.0),
            "{} does not report weft_agent_dns_serving 1",
            node.name
        );
    }

    // Through the pod's own resolv.conf: nameserver 10.96.0.10 (kube-dns, through Weft's proxy).
    s.step("asking through the pod's resolv.conf (10.96.0.10)");
    let resolv = c.exec_ok(&ns, "client", &["cat", "/etc/resolv.conf"]).await?;
    ensure!(
        resolv.contains("nameserver 10.96.0.10")
            && resolv.contains(&format!("search {ns}.svc.cluster.local svc.cluster.local cluster.local"))
            && resolv.contains("ndots:5"),
        "the pod's resolv.conf: {resolv}"
    );
    for name in ["web".to_string(), format!("web.{ns}"), format!("web.{ns}.svc"), fqdn.clone()] {
        expect_answer(&c, &ns, "client", &["+search", &name], &[&cluster_ip]).await?;
    }
    let hosts = c.exec_ok(&ns, "client", &["getent", "hosts", "web"]).await?;
    ensure!(hosts.split_whitespace().next() == Some(cluster_ip.as_str()), "getent hosts web: {hosts}");
    expect_answer(&c, &ns, "client", &["+search", "www.example.test"], &["192.0.2.10"]).await?;

    // A new upstream reaches every node.
    s.step("changing dns.upstreams");
    c.patch_network_config(serde_json::json!({ "dns": { "upstreams": [new_ip.to_string()] } })).await?;
    for node in &nodes {
        expect_answer(&c, &ns, "client", &[&format!("@{}", node.ip), "www.example.test"], &["192.0.2.11"])
            .await?;
        // The stub domain still goes to its own server.
        expect_answer(&c, &ns, "client", &[&format!("@{}", node.ip), "db.corp.test"], &["192.0.2.20"])
            .await?;
    }
    s.step("every node forwards to the new upstream");

    // Pod records: Insecure (the default) answers any a-b-c-d name; Verified only the address of
    // a pod that exists in that namespace.
    let no_pod = format!("10-244-250-250.{ns}.pod.cluster.local");
    expect_answer(&c, &ns, "client", &[&no_pod], &["10.244.250.250"]).await?;
    c.patch_network_config(serde_json::json!({"dns":{"podRecords":"Verified"}})).await?;
    for node in &nodes {
        let at = format!("@{}", node.ip);
        expect_answer(&c, &ns, "client", &[&at, &no_pod], &[]).await?;
        expect_answer(&c, &ns, "client", &[&at, &pod_name], &[&client_ip.to_string()]).await?;
    }
    s.step("podRecords Verified: only addresses of existing pods answer, on every node");

    // Forwarding to kube-dns itself would loop: every agent refuses it (NetworkConfig status
    // says why) and CoreDNS keeps serving what it had.
    c.patch_network_config(serde_json::json!({"dns":{"upstreams":["10.96.0.10"]}})).await?;
    c.wait_for("NetworkConfig status to report the refused upstream", Duration::from_secs(30), || {
        let status = c.kubectl(&[
            "get",
            "networkconfig",
            "default",
            "-o",
            "jsonpath={.status.laggingNodes[*].message}",
        ]);
        async move {
            let status = status.await?;
            let refused = status.matches("is the cluster DNS itself; forwarding there would loop").count();
            if refused == 2 { Ok(Some(())) } else { bail!("lagging nodes: {status:?}") }
        }
    })
    .await?;
    for node in &nodes {
        expect_answer(&c, &ns, "client", &[&format!("@{}", node.ip), "www.example.test"], &["192.0.2.11"])
            .await?;
    }
    s.step("a looping upstream is refused; the nodes keep the last good one");

    // An agent killed outright takes its CoreDNS along (nothing is left running on the node);
    // the restarted agent runs exactly one again.
    let node2 = nodes.iter().find(|n| n.name == "node-2").context("no node-2")?;
    ensure!(c.node_processes("node-2", "coredns")?.len() == 1, "node-2 runs one CoreDNS");
    ensure!(c.kill_agent("node-2", rustix::process::Signal::KILL).await?, "agent-node-2 did not exit");
    c.wait_for("node-2's CoreDNS to stop with its agent", Duration::from_secs(10), || {
        let left = c.node_processes("node-2", "coredns");
        async move { Ok(left?.is_empty().then_some(())) }
    })
    .await?;
    c.wait_agent_restarted("node-2").await?;
    expect_answer(&c, &ns, "client", &[&format!("@{}", node2.ip), &fqdn], &[&cluster_ip]).await?;
    let running = c.node_processes("node-2", "coredns")?;
    ensure!(running.len() == 1, "node-2 runs CoreDNS {running:?} after its agent restarted");
    s.step("a killed agent leaves no CoreDNS behind; its successor serves again");
    Ok(())
}
