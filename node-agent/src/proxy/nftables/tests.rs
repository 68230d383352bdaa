use weft_api::plan::{self as pb, Resource};

use super::*;
use crate::exec::Runner;
use crate::metrics::AgentMetrics;
use crate::proxy::ProxyCache;
use crate::proxy::fixtures::{LOCAL, ctx, ip, proxy_plan, resources};

fn settings() -> pb::NetworkSettings {
    pb::NetworkSettings { proxy_mode: pb::ProxyMode::Nftables as i32, ..crate::proxy::fixtures::settings() }
}

fn ep(addr: &str, flags: u32) -> pb::Endpoint {
    pb::Endpoint { ip: ip(addr), port: 8080, flags }
}

fn service(cluster_ip: &str, node_port: u32, endpoints: Vec<pb::Endpoint>) -> pb::Service {
    pb::Service {
        cluster_ip: ip(cluster_ip),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp as i32,
            port: 80,
            node_port,
            endpoints,
        }],
        ..Default::default()
    }
}

fn plan(version: u64, services: &[(&str, pb::Service)]) -> Vec<Resource> {
    let mut resources = resources(&settings(), services);
    for r in &mut resources {
        r.version = version;
    }
    resources
}

/// What one Service adds to an empty table, as `nft -f` input.
fn describe(svc: &pb::Service) -> String {
    let rules = render_service(&ctx(), "default/web", svc).expect("render");
    let mut changes = Changes::default();
    changes.service(None, &rules);
    for p in changes.picks() {
        changes.pick(&ctx(), p);
    }
    changes.text()
}

#[test]
fn the_table_holds_the_hooks_maps_and_shared_chains() {
    insta::assert_snapshot!(base(&ctx()));
}

#[test]
fn a_plain_service_is_map_elements_and_a_shared_pick_chain() {
    let svc = service("10.96.0.50", 30080, vec![ep("10.244.1.5", 0), ep("10.244.2.7", LOCAL)]);
    insta::assert_snapshot!(describe(&svc));
}

#[test]
fn a_service_without_endpoints_is_refused_by_the_filter_hooks() {
    insta::assert_snapshot!(describe(&service("10.96.0.50", 30080, vec![])));
}

#[test]
fn affinity_allowed_sources_and_external_local_get_per_service_chains() {
    let mut svc = service("10.96.0.50", 30080, vec![ep("10.244.1.5", 0), ep("10.244.2.7", LOCAL)]);
    svc.affinity_timeout_seconds = 600;
    svc.external_local = true;
    svc.allowed_source_cidrs = vec!["192.168.0.0/16".into()];
    insta::assert_snapshot!(describe(&svc));
}

#[test]
fn a_one_endpoint_change_writes_a_few_elements_and_an_unchanged_plan_nothing() {
    let runner = Runner::recording();
    let cache = ProxyCache::with_runner(runner.clone());
    let metrics = AgentMetrics::default();
    let three = vec![ep("10.244.1.5", 0), ep("10.244.2.7", 0), ep("10.244.3.9", 0)];
    let other = service("10.96.0.60", 0, vec![ep("10.244.4.4", 0)]);
    let first = plan(
        1,
        &[("default/web", service("10.96.0.50", 0, three.clone())), ("default/other", other.clone())],
    );
    let report = cache.sync(&proxy_plan(&first), &metrics).expect("full sync");
    assert!(report.full);
    assert_eq!(cache.sync(&proxy_plan(&first), &metrics).expect("no-op").lines, 0);
    let two =
        plan(2, &[("default/web", service("10.96.0.50", 0, three[..2].to_vec())), ("default/other", other)]);
    let report = cache.sync(&proxy_plan(&two), &metrics).expect("change");
    assert!(!report.full);
    let recorded = runner.recorded();
    assert_eq!(recorded.len(), 2, "the unchanged sync ran nothing");
    insta::assert_snapshot!(recorded[1]);
}

#[test]
fn an_incremental_sync_ends_where_a_full_one_would() {
    // Replaying the changes on a model of the maps gives what a fresh full sync gives.
    let s = |eps: Vec<pb::Endpoint>, np: u32| service("10.96.0.50", np, eps);
    let steps = [
        vec![ep("10.244.1.5", 0), ep("10.244.2.7", LOCAL)],
        vec![ep("10.244.1.5", 0)],
        vec![],
        vec![ep("10.244.1.5", LOCAL), ep("10.244.2.7", 0), ep("10.244.3.3", 0)],
    ];
    let mut written: Option<Written> = None;
    let mut model: std::collections::BTreeMap<(String, String), String> = Default::default();
    for (i, eps) in steps.into_iter().enumerate() {
        let rules = render_service(&ctx(), "default/web", &s(eps, if i % 2 == 0 { 30080 } else { 0 }))
            .expect("render");
        let mut changes = Changes::default();
        changes.service(written.as_ref(), &rules);
        for e in &changes.delete_elements {
            assert!(
                model.remove(&(e.map().to_string(), e.key())).is_some(),
                "deleted {e:?}, which was not there"
            );
        }
        for e in &changes.add_elements {
            assert!(
                model.insert((e.map().to_string(), e.key()), e.value()).is_none(),
                "added {e:?} over an existing key"
            );
        }
        let fresh: std::collections::BTreeMap<(String, String), String> =
            rules.elements.iter().map(|e| ((e.map().to_string(), e.key()), e.value())).collect();
        assert_eq!(model, fresh, "step {i}");
        written = Some(Written::of(rules).0);
    }
}

#[test]
fn two_services_on_one_external_ip_and_port_do_not_fail_the_sync_the_first_keeps_it() {
    let runner = Runner::recording();
    let cache = ProxyCache::with_runner(runner.clone());
    let metrics = AgentMetrics::default();
    let with_external = |cluster_ip: &str, endpoint: &str| {
        let mut s = service(cluster_ip, 0, vec![ep(endpoint, 0)]);
        s.external_ips = vec![ip("192.168.9.9")];
        s
    };
    let first = plan(
        1,
        &[
            ("default/a", with_external("10.96.0.1", "10.244.1.1")),
            ("default/b", with_external("10.96.0.2", "10.244.2.2")),
        ],
    );
    cache.sync(&proxy_plan(&first), &metrics).expect("a conflict is not an error");
    let text = runner.recorded().concat();
    assert_eq!(text.matches("192.168.9.9 . tcp . 80 : goto").count(), 1, "{text}");
    assert!(
        text.contains("192.168.9.9 . 80 . 0 : 10.244.1.1 . 8080"),
        "default/a (first by name) keeps it: {text}"
    );
    assert!(!text.contains("192.168.9.9 . 80 . 0 : 10.244.2.2"), "{text}");
    // Each keeps its own cluster IP.
    assert!(text.contains("10.96.0.2 . tcp . 80 : goto"), "{text}");

    // The owner goes: in the same sync the other Service gets the key (before, it waited for
    // the next full sync, which might never come).
    let written = runner.recorded().len();
    cache
        .sync(&proxy_plan(&plan(2, &[("default/b", with_external("10.96.0.2", "10.244.2.2"))])), &metrics)
        .expect("sync");
    let text = runner.recorded()[written..].concat();
    assert!(text.contains("192.168.9.9 . 80 . 0 : 10.244.2.2 . 8080"), "default/b takes the key: {text}");
    let rewrite = runner.recorded().last().cloned().unwrap_or_default();
    assert!(
        rewrite.contains("delete table ip weft-proxy"),
        "the table is replaced in one transaction: {rewrite}"
    );
    assert!(!rewrite.contains("10.244.1.1"), "nothing of default/a is left: {rewrite}");
}

/// The check reads `nft -j list chains ip`: only chains of Weft's own table count, a table of the
/// same chain names elsewhere does not, and output that is not nft's JSON means "not intact".
#[test]
fn the_check_finds_the_shared_chains_of_its_own_table_only() {
    let chains = |table: &str, names: &[&str]| -> String {
        names
            .iter()
            .map(|name| {
                format!(r#"{{"chain":{{"family":"ip","table":"{table}","name":"{name}","handle":1}}}}"#)
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let listing = |objects: String| {
        format!(r#"{{"nftables":[{{"metainfo":{{"version":"1.0.6","json_schema_version":1}}}},{objects}]}}"#)
    };
    let ours = listing(chains(TABLE, &SHARED_CHAINS));
    assert!(crate::nft::chains_present(&ours, TABLE, &SHARED_CHAINS));
    let elsewhere = listing(chains("other", &SHARED_CHAINS));
    assert!(!crate::nft::chains_present(&elsewhere, TABLE, &SHARED_CHAINS));
    let one_missing = listing(chains(TABLE, &SHARED_CHAINS[1..]));
    assert!(!crate::nft::chains_present(&one_missing, TABLE, &SHARED_CHAINS));
    assert!(!crate::nft::chains_present("", TABLE, &SHARED_CHAINS));
    assert!(!crate::nft::chains_present("table ip weft-proxy {", TABLE, &SHARED_CHAINS));
}

/// A Service that does not render (an IPv6 allowed source, stored before admission refused
/// them) is left out and named; the others are programmed in the same transaction.
#[test]
fn a_service_that_does_not_render_is_left_out_and_the_others_are_programmed() {
    let runner = Runner::recording();
    let cache = ProxyCache::with_runner(runner.clone());
    let metrics = AgentMetrics::default();
    let mut bad = service("10.96.0.2", 0, vec![ep("10.244.2.2", 0)]);
    bad.allowed_source_cidrs = vec!["fd00::/64".into()];
    let good = service("10.96.0.1", 0, vec![ep("10.244.1.1", 0)]);
    let report = cache
        .sync(&proxy_plan(&plan(1, &[("default/bad", bad), ("default/good", good)])), &metrics)
        .expect("one bad Service does not fail the sync");
    assert_eq!(report.refused, ["default/bad"]);
    assert_eq!(metrics.proxy_services_refused.get(), 1);
    let text = runner.recorded().concat();
    assert!(text.contains("10.96.0.1 . tcp . 80 : goto"), "the good Service is programmed: {text}");
    assert!(!text.contains("10.96.0.2"), "nothing of the bad one: {text}");
}
