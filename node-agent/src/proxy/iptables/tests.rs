use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use proptest::prelude::*;
use weft_api::plan::{self as pb, Resource};

use super::*;
use crate::exec::Runner;
use crate::metrics::AgentMetrics;
use crate::proxy::ProxyCache;
use crate::proxy::conntrack::stale_udp_filters;
use crate::proxy::fixtures::{LOCAL, ctx, ip, proxy_plan, resources, settings};

const READY: u32 = 0;
const NOT_READY: u32 = pb::EndpointFlag::EndpointNotReady as u32;
const TERMINATING: u32 = pb::EndpointFlag::EndpointTerminating as u32;

fn ep(addr: &str, flags: u32) -> pb::Endpoint {
    pb::Endpoint { ip: ip(addr), port: 80, flags }
}

fn port(
    name: &str,
    protocol: pb::Protocol,
    port: u32,
    node_port: u32,
    endpoints: Vec<pb::Endpoint>,
) -> pb::ServicePort {
    pb::ServicePort { name: name.into(), protocol: protocol as i32, port, node_port, endpoints }
}

fn service(cluster_ip: &str, ports: Vec<pb::ServicePort>) -> pb::Service {
    pb::Service { cluster_ip: ip(cluster_ip), ports, ..Default::default() }
}

fn plan(services: &[(&str, pb::Service)]) -> Vec<Resource> {
    resources(&settings(), services)
}

/// A Service's chains and its lines in the shared chains, as text.
fn describe(name: &str, svc: &pb::Service) -> String {
    let rules = render_service(&ctx(), name, svc).expect("render");
    let mut out = String::new();
    for (what, text) in [
        ("nat WEFT-SERVICES", &rules.fragments.nat_services),
        ("nat WEFT-NODEPORTS", &rules.fragments.nat_nodeports),
        ("filter WEFT-SERVICES", &rules.fragments.filter_services),
        ("filter WEFT-EXTERNAL-SERVICES", &rules.fragments.filter_external),
    ] {
        if !text.is_empty() {
            let _ = writeln!(out, "# {what}\n{text}");
        }
    }
    for c in &rules.chains {
        let _ = writeln!(out, "# {} {}\n{}", c.table.name(), c.name, c.rules);
    }
    out
}

#[test]
fn a_cluster_ip_with_three_endpoints_balances_with_kube_proxys_probabilities() {
    let svc = service(
        "10.96.0.50",
        vec![port(
            "http",
            pb::Protocol::Tcp,
            9000,
            0,
            vec![ep("10.244.3.7", READY), ep("10.244.1.5", READY), ep("10.244.2.6", READY)],
        )],
    );
    insta::assert_snapshot!(render(&proxy_plan(&plan(&[("default/web", svc)]))).expect("render"));
}

#[test]
fn client_ip_affinity_checks_and_sets_a_recent_list_per_endpoint() {
    let mut svc = service(
        "10.96.0.51",
        vec![port("", pb::Protocol::Tcp, 80, 0, vec![ep("10.244.1.5", READY), ep("10.244.2.6", READY)])],
    );
    svc.affinity_timeout_seconds = 10800;
    insta::assert_snapshot!(describe("default/sticky", &svc));
}

#[test]
fn a_node_port_with_external_traffic_policy_local_goes_to_local_endpoints_without_snat() {
    let mut svc = service(
        "10.96.0.52",
        vec![port(
            "http",
            pb::Protocol::Tcp,
            80,
            30123,
            vec![ep("10.244.1.5", READY | LOCAL), ep("10.244.2.6", READY)],
        )],
    );
    svc.external_local = true;
    insta::assert_snapshot!(describe("default/local", &svc));
}

#[test]
fn external_traffic_policy_local_without_a_local_endpoint_drops_external_traffic_but_serves_pods() {
    let mut svc = service(
        "10.96.0.53",
        vec![port("http", pb::Protocol::Tcp, 80, 30124, vec![ep("10.244.2.6", READY)])],
    );
    svc.external_local = true;
    insta::assert_snapshot!(describe("default/elsewhere", &svc));
}

#[test]
fn a_port_without_endpoints_is_rejected_and_gets_no_nat_rules() {
    let svc = service(
        "10.96.0.54",
        vec![
            port("http", pb::Protocol::Tcp, 80, 30125, vec![]),
            // Not ready and not terminating: never used.
            port("dns", pb::Protocol::Udp, 53, 0, vec![ep("10.244.1.5", NOT_READY)]),
        ],
    );
    insta::assert_snapshot!(describe("default/empty", &svc));
}

#[test]
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
    let terminating = ep("10.244.1.5", NOT_READY | TERMINATING);
    let only_terminating =
        service("10.96.0.55", vec![port("http", pb::Protocol::Tcp, 80, 0, vec![terminating])]);
    let with_ready = service(
        "10.96.0.55",
        vec![port("http", pb::Protocol::Tcp, 80, 0, vec![terminating, ep("10.244.2.6", READY)])],
    );
    insta::assert_snapshot!(format!(
        "{}=== with a ready endpoint ===\n{}",
        describe("default/rolling", &only_terminating),
        describe("default/rolling", &with_ready)
    ));
}

#[test]
fn external_and_load_balancer_ips_with_allowed_sources_and_masquerade_always() {
    let mut svc = service(
        "10.96.0.56",
        vec![port(
            "https",
            pb::Protocol::Tcp,
            443,
            0,
            vec![ep("10.244.1.5", READY), ep("10.244.2.6", READY)],
        )],
    );
    svc.external_ips = vec![ip("192.0.2.10")];
    svc.load_balancer_ips = vec![ip("198.51.100.7")];
    svc.allowed_source_cidrs = vec!["10.0.0.0/8".into(), "192.168.1.0/24".into()];
    svc.masquerade = pb::Masquerade::Always as i32;
    insta::assert_snapshot!(describe("shop/front", &svc));
}

#[test]
fn internal_traffic_policy_local_uses_only_local_endpoints_for_the_cluster_ip() {
    let mut svc = service(
        "10.96.0.57",
        vec![port(
            "dns",
            pb::Protocol::Udp,
            53,
            0,
            vec![ep("10.244.1.5", READY | LOCAL), ep("10.244.2.6", READY)],
        )],
    );
    svc.internal_local = true;
    insta::assert_snapshot!(describe("kube-system/node-dns", &svc));
    // Without a local endpoint it drops rather than leave the node.
    svc.ports[0].endpoints = vec![ep("10.244.2.6", READY)];
    let text = describe("kube-system/node-dns", &svc);
    assert!(text.contains("has no local endpoints\" -j DROP"), "{text}");
    assert!(!text.contains("WEFT-SVL-"), "{text}");
}

#[test]
fn a_udp_target_port_change_clears_the_flows_to_the_old_port() {
    let at = |target: u32| {
        let eps = vec![pb::Endpoint { ip: ip("10.244.1.5"), port: target, flags: READY }];
        render_service(
            &ctx(),
            "ns/dns",
            &service("10.96.0.20", vec![port("udp", pb::Protocol::Udp, 80, 30080, eps)]),
        )
        .expect("render")
        .udp
    };
    let (before, after) = (at(8080), at(9090));
    let expected: Vec<Vec<String>> = [
        &["--orig-dst", "10.96.0.20", "--orig-port-dst", "80", "--dst-nat", "10.244.1.5"][..],
        &["--orig-port-dst", "30080", "--dst-nat", "10.244.1.5"][..],
    ]
    .iter()
    .map(|f| f.iter().map(|a| a.to_string()).collect())
    .collect();
    assert_eq!(stale_udp_filters(&before, &after), expected);
    assert!(stale_udp_filters(&after, &after).is_empty(), "an unchanged Service keeps its flows");
}

#[test]
fn chain_names_are_stable_short_and_owned() {
    let svc = service_chain("WEFT-SVC-", "default/web", "http", "tcp");
    assert_eq!(svc, service_chain("WEFT-SVC-", "default/web", "http", "tcp"));
    assert_ne!(svc, service_chain("WEFT-SVC-", "default/web", "http", "udp"));
    assert_ne!(svc, service_chain("WEFT-SVC-", "default/web2", "http", "tcp"));
    let sep = endpoint_chain("default/web", "http", "tcp", Ipv4Addr::new(10, 244, 1, 5), 80);
    for name in [&svc, &sep] {
        assert!(name.len() <= 28, "{name}");
        assert!(owned_chain(name), "{name}");
    }
    assert!(owned_chain(CANARY) && owned_chain(SERVICES));
    // The routes programmer's chain and kube-proxy's are never the proxy's to delete.
    assert!(!owned_chain("WEFT-POSTROUTING"));
    assert!(!owned_chain("KUBE-SVC-AAAAAAAAAAAAAAAA"));
    assert!(!owned_chain("WEFT-SVC-tooshort"));
}

#[test]
fn several_pod_cidrs_masquerade_through_one_chain() {
    let mut net = settings();
    net.pod_cidrs = vec!["10.244.0.0/16".into(), "10.245.0.0/16".into()];
    let ctx = Context::from_settings(&net).expect("context");
    let svc = service("10.96.0.58", vec![port("", pb::Protocol::Tcp, 80, 0, vec![ep("10.244.1.5", READY)])]);
    let rules = render_service(&ctx, "default/multi", &svc).expect("render");
    assert!(rules.chains[0].rules.contains(&format!("-j {NON_POD_MASQ}")), "{:?}", rules.chains[0]);
    let globals = global_chains(&ctx, std::iter::once(&rules.fragments));
    let non_pod = globals.iter().find(|c| c.name == NON_POD_MASQ).expect("chain");
    insta::assert_snapshot!(non_pod.rules, @r"
    -A WEFT-NONPOD-MASQ -s 10.244.0.0/16 -j RETURN
    -A WEFT-NONPOD-MASQ -s 10.245.0.0/16 -j RETURN
    -A WEFT-NONPOD-MASQ -j WEFT-MARK-MASQ
    ");
}

#[test]
fn bad_settings_and_services_are_refused_with_a_clear_error() {
    let mut net = settings();
    net.masquerade_bit = 32;
    assert!(Context::from_settings(&net).is_err());
    let mut svc = service("10.96.0.59", vec![port("", pb::Protocol::Tcp, 80, 0, vec![])]);
    svc.allowed_source_cidrs = vec!["not-a-cidr".into()];
    let err = render_service(&ctx(), "default/bad", &svc).expect_err("bad cidr");
    assert!(err.to_string().contains("\"not-a-cidr\" is not an IPv4 CIDR"), "{err}");
}

// ---- the diff ----

type Model = BTreeMap<(String, String), Vec<String>>;

/// What `iptables-restore --noflush` does with `text`, on a model of the tables; panics where the
/// real one would fail (a rule in an undeclared chain, deleting a chain still in use).
fn restore(model: &mut Model, text: &str) {
    let mut table = String::new();
    let mut deleted = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().expect("chain name");
            model.insert((table.clone(), name.to_string()), Vec::new());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().expect("chain");
            model
                .get_mut(&(table.clone(), chain.to_string()))
                .unwrap_or_else(|| panic!("rule in a chain that does not exist: {line}"))
                .push(rule.to_string());
        } else if let Some(chain) = line.strip_prefix("-X ") {
            let rules = model.remove(&(table.clone(), chain.to_string())).expect("deleting a missing chain");
            assert!(rules.is_empty(), "deleting a chain that still has rules: {chain}");
            deleted.push((table.clone(), chain.to_string()));
        } else {
            assert_eq!(line, "COMMIT", "unexpected line");
        }
    }
    // Every jump goes to a chain that exists.
    for ((table, _), rules) in model.iter() {
        for rule in rules {
            if let Some(target) = rule.split(" -j ").nth(1).and_then(|t| t.split_whitespace().next())
                && target.starts_with("WEFT-")
            {
                assert!(model.contains_key(&(table.clone(), target.to_string())), "dangling jump: {rule}");
            }
        }
    }
}

fn full_model(plan: &[Resource]) -> Model {
    let mut model = Model::new();
    restore(&mut model, &render(&proxy_plan(plan)).expect("render"));
    model
}

#[derive(Debug, Clone)]
struct Spec {
    name: usize,
    udp: bool,
    node_port: bool,
    external_local: bool,
    affinity: bool,
    endpoints: Vec<(u8, u32)>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0usize..6,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(
            (0u8..6, prop::sample::select(vec![READY, READY | LOCAL, NOT_READY | TERMINATING, NOT_READY])),
            0..5,
        ),
    )
        .prop_map(|(name, udp, node_port, external_local, affinity, endpoints)| Spec {
            name,
            udp,
            node_port,
            external_local,
            affinity,
            endpoints,
        })
}

fn plan_of(specs: &[Spec]) -> Vec<Resource> {
    let mut services: BTreeMap<String, pb::Service> = BTreeMap::new();
    for s in specs {
        let protocol = if s.udp { pb::Protocol::Udp } else { pb::Protocol::Tcp };
        let endpoints =
            s.endpoints.iter().map(|(host, flags)| ep(&format!("10.244.{host}.1"), *flags)).collect();
        let mut svc = service(
            &format!("10.96.0.{}", s.name + 1),
            vec![port("p", protocol, 80, if s.node_port { 30000 + s.name as u32 } else { 0 }, endpoints)],
        );
        svc.external_local = s.external_local;
        svc.affinity_timeout_seconds = if s.affinity { 60 } else { 0 };
        services.insert(format!("ns/svc{}", s.name), svc);
    }
    let list: Vec<(&str, pb::Service)> = services.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    plan(&list)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Applying each sync's diff to what was there gives exactly the chains of the new plan
    /// (also when a write is split into several restores, each of which must be valid on its
    /// own), and a sync of an unchanged plan writes nothing.
    #[test]
    fn the_diffs_add_up_to_the_plan_and_an_unchanged_plan_writes_nothing(
        steps in prop::collection::vec(prop::collection::vec(spec(), 0..5), 1..5),
        batch in prop::sample::select(vec![1usize, 3, MAX_CHAINS_PER_RESTORE]),
    ) {
        let cache = ProxyCache::with_max_chains_per_restore(Runner::recording(), batch);
        let metrics = AgentMetrics::default();
        let mut model = Model::new();
        let mut seen = 0;
        for specs in &steps {
            let plan = plan_of(specs);
            cache.sync(&proxy_plan(&plan), &metrics).expect("sync");
            for text in &cache.runner().recorded()[seen..] {
                restore(&mut model, text);
            }
            seen = cache.runner().recorded().len();
            prop_assert_eq!(&model, &full_model(&plan));
            let again = cache.sync(&proxy_plan(&plan), &metrics).expect("sync");
            prop_assert_eq!(again.lines, 0);
            prop_assert_eq!(cache.runner().recorded().len(), seen, "an unchanged plan wrote something");
        }
    }
}

#[test]
fn one_endpoint_change_among_many_services_writes_only_that_services_chains() {
    let specs: Vec<(String, pb::Service)> = (0..2000u32)
        .map(|i| {
            let eps = (0..10)
                .map(|e| pb::Endpoint { ip: ip("10.244.0.0") + i * 16 + e, port: 80, flags: READY })
                .collect();
            (
                format!("ns/svc{i}"),
                service(
                    &Ipv4Addr::from(ip("10.96.0.0") + i + 1).to_string(),
                    vec![port("p", pb::Protocol::Tcp, 80, 0, eps)],
                ),
            )
        })
        .collect();
    let list = |s: &[(String, pb::Service)]| {
        plan(&s.iter().map(|(n, s)| (n.as_str(), s.clone())).collect::<Vec<_>>())
    };
    let cache = ProxyCache::with_runner(Runner::recording());
    let metrics = AgentMetrics::default();
    let first = cache.sync(&proxy_plan(&list(&specs)), &metrics).expect("full sync");
    assert!(first.full);
    assert_eq!(first.services_rendered, 2000);

    let mut changed = specs.clone();
    changed[1234].1.ports[0].endpoints.remove(3);
    let report = cache.sync(&proxy_plan(&list(&changed)), &metrics).expect("sync");
    assert!(!report.full);
    assert_eq!(report.services_rendered, 1);
    // The service chain rewritten, the gone endpoint's chain deleted; nothing else.
    assert_eq!((report.chains_written, report.chains_deleted), (1, 1));
    let text = cache.runner().recorded().pop().expect("written");
    let svc_chain = service_chain("WEFT-SVC-", "ns/svc1234", "p", "tcp");
    assert!(text.contains(&format!(":{svc_chain} - [0:0]")), "{text}");
    assert!(!text.contains(":WEFT-SERVICES"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("-A ")).count(), 10, "{text}");
}

#[test]
fn programming_latency_is_observed_once_per_change_and_not_for_old_triggers() {
    let cache = ProxyCache::with_runner(Runner::recording());
    let metrics = AgentMetrics::default();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let mut svc =
        service("10.96.0.60", vec![port("", pb::Protocol::Tcp, 80, 0, vec![ep("10.244.1.5", READY)])]);
    // From before the agent started: programmed by an earlier run.
    svc.last_change_trigger_unix_ms = now - 3_600_000;
    cache.sync(&proxy_plan(&plan(&[("default/a", svc.clone())])), &metrics).expect("sync");
    let count = |m: &AgentMetrics| {
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("latency", "", m.network_programming_latency.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text.lines().find_map(|l| l.strip_prefix("latency_count ")).map(str::to_string).unwrap_or_default()
    };
    assert_eq!(count(&metrics), "0");
    svc.last_change_trigger_unix_ms = now + 5_000;
    svc.ports[0].endpoints.push(ep("10.244.2.6", READY));
    cache.sync(&proxy_plan(&plan(&[("default/a", svc.clone())])), &metrics).expect("sync");
    cache.sync(&proxy_plan(&plan(&[("default/a", svc)])), &metrics).expect("sync");
    assert_eq!(count(&metrics), "1");
}

/// A Service that does not render (an IPv6 allowed source, stored before admission refused
/// them) is left out and named; the others are programmed in the same sync.
#[test]
fn a_service_that_does_not_render_is_left_out_and_the_others_are_programmed() {
    let runner = Runner::recording();
    let cache = ProxyCache::with_runner(runner.clone());
    let metrics = AgentMetrics::default();
    let good = service("10.96.0.1", vec![port("http", pb::Protocol::Tcp, 80, 0, vec![ep("10.244.1.1", 0)])]);
    let mut bad =
        service("10.96.0.2", vec![port("http", pb::Protocol::Tcp, 80, 0, vec![ep("10.244.2.2", 0)])]);
    bad.allowed_source_cidrs = vec!["fd00::/64".into()];
    let report = cache
        .sync(&proxy_plan(&plan(&[("default/bad", bad), ("default/good", good)])), &metrics)
        .expect("one bad Service does not fail the sync");
    assert_eq!(report.refused, ["default/bad"]);
    assert_eq!(metrics.proxy_services_refused.get(), 1);
    let text = runner.recorded().concat();
    assert!(text.contains("-d 10.96.0.1/32"), "the good Service is programmed: {text}");
    assert!(!text.contains("10.96.0.2"), "nothing of the bad one: {text}");
}
