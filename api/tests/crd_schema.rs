//! Checks on the generated CRD schemas: descriptions, printer columns, names, CEL rules.
//!
//! The rules themselves are exercised against real objects in `crd_fixtures.rs` (client-side, with
//! kube's CEL evaluator) and, separately, against a real API server by the e2e suite.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::cel::{ScopeContext, WarningKind, analyze_rule, apply_defaults, compile_schema};
use serde_json::{Value, json};
use weft_api::v1alpha1::{
    IPBlock, IPPool, IPPoolSpec, NetworkConfig, NetworkConfigSpec, ProxyPolicy, all_crds,
};

fn schema(crd: &CustomResourceDefinition) -> Value {
    let Some(schema) = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref())
    else {
        panic!("{:?} has no openAPIV3Schema", crd.metadata.name);
    };
    serde_json::to_value(schema).unwrap_or_default()
}

/// Visit every schema node: `f(path, node)`. Paths look like `spec.reserved[]` (`[]`: the items).
fn walk(path: &str, node: &Value, f: &mut dyn FnMut(&str, &Value)) {
    f(path, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            let p = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
            walk(&p, child, f);
        }
    }
    if let Some(items) = node.get("items") {
        walk(&format!("{path}[]"), items, f);
    }
    if let Some(extra) = node.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), extra, f);
    }
}

/// The schema node at `path` (same syntax as [`walk`]).
fn node<'a>(root: &'a Value, path: &str) -> &'a Value {
    let mut found = None;
    let mut cur = root;
    if path.is_empty() {
        return root;
    }
    for part in path.split('.') {
        let (name, items) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        cur = &cur["properties"][name];
        if items {
            cur = &cur["items"];
        }
        found = Some(cur);
    }
    match found {
        Some(n) if !n.is_null() => n,
        _ => panic!("no schema node at {path}"),
    }
}

fn crd_named(name: &str) -> CustomResourceDefinition {
    match all_crds().into_iter().find(|c| c.metadata.name.as_deref() == Some(name)) {
        Some(c) => c,
        None => panic!("no CRD {name}"),
    }
}

#[test]
fn every_property_has_a_description() {
    let mut missing = Vec::new();
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let root = schema(&crd);
        walk("", &root, &mut |path, node| {
            // items and map values are described by the property holding them
            if path.ends_with("[]") || path.ends_with("{}") {
                return;
            }
            let ok = node.get("description").and_then(Value::as_str).is_some_and(|d| !d.trim().is_empty());
            if !ok {
                missing.push(format!("{name}: {}", if path.is_empty() { "<root>" } else { path }));
            }
        });
    }
    assert!(missing.is_empty(), "properties without a description:\n{}", missing.join("\n"));
}

#[test]
fn every_schema_node_has_a_type() {
    // A structural schema needs a type everywhere (an untyped node, e.g. from a plain IpNet,
    // makes the API server reject the CRD).
    let mut untyped = Vec::new();
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        walk("", &schema(&crd), &mut |path, node| {
            let exempt = node.get("x-kubernetes-int-or-string").is_some()
                || node.get("x-kubernetes-preserve-unknown-fields").is_some();
            if node.get("type").and_then(Value::as_str).is_none() && !exempt {
                untyped.push(format!("{name}: {path}"));
            }
            for junctor in ["oneOf", "anyOf", "allOf", "not"] {
                if node.get(junctor).is_some() {
                    untyped.push(format!("{name}: {path} uses {junctor}"));
                }
            }
        });
    }
    assert!(untyped.is_empty(), "non-structural schema nodes:\n{}", untyped.join("\n"));
}

/// (NAME as kubectl prints it, jsonPath, type) of the default (priority 0) columns, AGE included.
fn default_columns(crd: &CustomResourceDefinition) -> Vec<(String, String, String)> {
    let mut cols = vec![("NAME".to_owned(), ".metadata.name".to_owned(), "string".to_owned())];
    for col in crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
    {
        cols.push((col.name.to_uppercase(), col.json_path.clone(), col.type_.clone()));
    }
    cols
}

fn names_of(cols: &[(String, String, String)]) -> Vec<&str> {
    cols.iter().map(|c| c.0.as_str()).collect()
}

#[test]
fn ippool_columns_are_exactly_the_required_ones() {
    let cols = default_columns(&crd_named("ippools.weft.io"));
    assert_eq!(names_of(&cols), ["NAME", "CIDR", "BLOCK", "NODES", "USED", "FREE", "%USED", "AGE"]);
    let paths: Vec<&str> = cols.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(
        paths,
        [
            ".metadata.name",
            ".spec.cidr",
            ".spec.blockSize",
            ".status.nodes",
            ".status.usedAddresses",
            ".status.freeAddresses",
            ".status.usedPercent",
            ".metadata.creationTimestamp",
        ]
    );
}

#[test]
fn other_columns_are_the_required_ones() {
    let nc = default_columns(&crd_named("networkconfigs.weft.io"));
    assert_eq!(names_of(&nc), ["NAME", "CONVERGED", "PLAN", "READY", "AGE"]);
    assert_eq!(nc[1].1, ".status.converged");
    assert_eq!(nc[2].1, ".status.planVersion");
    assert_eq!(nc[3].1, ".status.conditions[?(@.type==\"Ready\")].status");

    let blocks = default_columns(&crd_named("ipblocks.weft.io"));
    assert_eq!(names_of(&blocks), ["NAME", "CIDR", "POOL", "NODE", "AGE"]);

    let pp = default_columns(&crd_named("proxypolicies.weft.io"));
    assert_eq!(names_of(&pp), ["NAME", "MATCHED", "CONFLICTED", "AGE"]);
    assert_eq!(pp[1].1, ".status.matchedCount");
    assert_eq!(pp[2].1, ".status.conditions[?(@.type==\"Conflicted\")].status");
}

#[test]
fn every_column_points_at_a_field_of_the_schema() {
    for crd in all_crds() {
        let root = schema(&crd);
        for col in crd.spec.versions[0].additional_printer_columns.iter().flatten() {
            if col.json_path.starts_with(".metadata.") {
                assert_eq!(col.type_, "date", "{}", col.name);
                continue;
            }
            let field_path: String =
                col.json_path.trim_start_matches('.').split('[').next().unwrap_or_default().to_owned();
            let n = node(&root, &field_path);
            let ty = n["type"].as_str().unwrap_or_default();
            if !col.json_path.contains('[') {
                assert_eq!(ty, col.type_, "column {} of {:?}", col.name, crd.metadata.name);
            }
        }
    }
}

#[test]
fn names_scope_and_subresources() {
    let expect = [
        ("networkconfigs.weft.io", "NetworkConfig", "Cluster", true),
        ("ippools.weft.io", "IPPool", "Cluster", true),
        ("ipblocks.weft.io", "IPBlock", "Cluster", false),
        ("proxypolicies.weft.io", "ProxyPolicy", "Namespaced", true),
    ];
    for (name, kind, scope, status) in expect {
        let crd = crd_named(name);
        assert_eq!(crd.spec.group, "weft.io");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, scope, "{name}");
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["weft".to_owned()][..]), "{name}");
        assert!(!crd.spec.names.short_names.clone().unwrap_or_default().is_empty(), "{name}");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        let has_status = v.subresources.as_ref().is_some_and(|s| s.status.is_some());
        assert_eq!(has_status, status, "{name} status subresource");
    }
    assert_eq!(IPPool::crd().spec.names.short_names, Some(vec!["ipp".to_owned()]));
    assert_eq!(IPPool::crd().spec.names.plural, "ippools");
    assert_eq!(IPBlock::crd().spec.names.plural, "ipblocks");
    assert_eq!(ProxyPolicy::crd().spec.names.plural, "proxypolicies");
}

/// Every CEL rule, where it must be (schema path, exact rule, a piece of its message).
const RULES: &[(&str, &str, &str, &str)] = &[
    ("networkconfigs.weft.io", "", "self.metadata.name == 'default'", "must be named 'default'"),
    (
        "networkconfigs.weft.io",
        "spec",
        "!isIP(self.dns.serviceIP) || !isCIDR(self.serviceNetwork.serviceCIDR) || cidr(self.serviceNetwork.serviceCIDR).containsIP(self.dns.serviceIP)",
        "dns.serviceIP must lie inside serviceNetwork.serviceCIDR",
    ),
    (
        "networkconfigs.weft.io",
        "spec.podNetwork.nonMasqueradeCIDRs[]",
        "isCIDR(self) && cidr(self).ip().family() == 4",
        "must be an IPv4 CIDR",
    ),
    (
        "networkconfigs.weft.io",
        "spec.serviceNetwork.serviceCIDR",
        "isCIDR(self)",
        "serviceCIDR must be a CIDR",
    ),
    (
        "networkconfigs.weft.io",
        "spec.serviceNetwork.serviceCIDR",
        "!isCIDR(self) || cidr(self).masked() == cidr(self)",
        "no host bits",
    ),
    (
        "networkconfigs.weft.io",
        "spec.serviceNetwork.nodePortRange",
        "self.min <= self.max",
        "must not be greater than",
    ),
    (
        "networkconfigs.weft.io",
        "spec.serviceNetwork.nodePortAddresses[]",
        "isCIDR(self) && cidr(self).ip().family() == 4",
        "must be an IPv4 CIDR",
    ),
    ("networkconfigs.weft.io", "spec.dns.clusterDomain", "", "clusterDomain must be a lower-case DNS name"),
    ("networkconfigs.weft.io", "spec.dns.serviceIP", "isIP(self)", "serviceIP must be an IP address"),
    ("networkconfigs.weft.io", "spec.dns.upstreams[]", "", "absolute path to a resolv.conf file"),
    ("networkconfigs.weft.io", "spec.dns.stubDomains[].domain", "", "domain must be a lower-case DNS name"),
    ("networkconfigs.weft.io", "spec.dns.stubDomains[].servers[]", "", "must be an IP address, IP:port"),
    ("networkconfigs.weft.io", "spec.ingress", "self.httpPort != self.httpsPort", "must differ"),
    (
        "networkconfigs.weft.io",
        "spec.ingress.nodeSelector",
        "self.all(k, k.startsWith('node-role.kubernetes.io/') || k.startsWith('node-restriction.kubernetes.io/'))",
        "labels a kubelet cannot set on its own Node",
    ),
    ("networkconfigs.weft.io", "spec.ingress.className", "", "className must be a lower-case DNS name"),
    ("networkconfigs.weft.io", "spec.ingress.defaultBackend", "", "namespace/service:port"),
    (
        "networkconfigs.weft.io",
        "spec.cni.confDir",
        "self.startsWith('/')",
        "confDir must be an absolute path",
    ),
    ("networkconfigs.weft.io", "spec.cni.binDir", "self.startsWith('/')", "binDir must be an absolute path"),
    ("networkconfigs.weft.io", "spec.cni.conflistName", "", "ending in .conflist"),
    ("networkconfigs.weft.io", "spec.cni.chainedPlugins[]", "", "must be a CNI plugin type"),
    ("ippools.weft.io", "spec.cidr", "isCIDR(self)", "cidr must be a CIDR"),
    ("ippools.weft.io", "spec.cidr", "!isCIDR(self) || cidr(self).ip().family() == 4", "only IPv4"),
    ("ippools.weft.io", "spec.cidr", "!isCIDR(self) || cidr(self).masked() == cidr(self)", "no host bits"),
    ("ippools.weft.io", "spec.cidr", "self == oldSelf", "cidr is immutable"),
    ("ippools.weft.io", "spec.blockSize", "self == oldSelf", "blockSize is immutable"),
    ("ippools.weft.io", "spec", "", "blockSize must be between the pool's prefix length and 32"),
    ("ippools.weft.io", "spec", "", "every reserved range must lie inside the pool's cidr"),
    (
        "ippools.weft.io",
        "spec.reserved[]",
        "isCIDR(self) && cidr(self).ip().family() == 4",
        "must be an IPv4 CIDR",
    ),
    ("ipblocks.weft.io", "", "", "must be named after its cidr"),
    ("ipblocks.weft.io", "spec.cidr", "isCIDR(self)", "cidr must be a CIDR"),
    ("ipblocks.weft.io", "spec.cidr", "self == oldSelf", "cidr is immutable"),
    ("ipblocks.weft.io", "spec.pool", "self == oldSelf", "pool is immutable"),
    ("ipblocks.weft.io", "spec.node", "self == oldSelf", "node is immutable"),
    (
        "proxypolicies.weft.io",
        "spec.allowedSourceCIDRs[]",
        "isCIDR(self) && cidr(self).ip().family() == 4",
        "must be an IPv4 CIDR",
    ),
];

fn rules_at(node: &Value) -> Vec<(String, String)> {
    node.get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or_default().to_owned(),
                r["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn each_cel_rule_is_where_expected() {
    for (crd, path, rule, message) in RULES {
        let root = schema(&crd_named(crd));
        let rules = rules_at(node(&root, path));
        assert!(
            rules.iter().any(|(r, m)| (rule.is_empty() || r == rule) && m.contains(message)),
            "{crd} {path}: no rule {rule:?} with message containing {message:?}; found {rules:?}"
        );
    }
}

#[test]
fn no_rule_is_left_unlisted() {
    // Every rule in the schemas appears in RULES, so adding one means adding its test (and its
    // e2e/fixtures/invalid file).
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        walk("", &schema(&crd), &mut |path, node| {
            for (rule, message) in rules_at(node) {
                let listed = RULES.iter().any(|(c, p, r, m)| {
                    *c == name && *p == path && (r.is_empty() || *r == rule) && message.contains(m)
                });
                assert!(listed, "{name} {path}: rule {rule:?} is not listed in RULES");
            }
        });
    }
}

#[test]
fn rules_compile_have_messages_and_fit_the_cost_budget() {
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let root = schema(&crd);
        let compiled = compile_schema(&root);
        walk("", &root, &mut |path, node| {
            let rules = rules_at(node);
            if rules.is_empty() {
                return;
            }
            let here = compile_schema(node);
            assert!(!here.has_errors(), "{name} {path}: {:?}", here.compilation_errors());
            for (rule, message) in rules {
                assert!(
                    message.len() > 20,
                    "{name} {path}: rule {rule:?} needs a message a person understands"
                );
                let warnings = analyze_rule(&rule, &here, ScopeContext::CrdValidation);
                let bad: Vec<_> = warnings
                    .iter()
                    // (WrongScope is not checked: the analyzer mistakes comprehension variables
                    // such as `r` in `self.reserved.all(r, ...)` for undeclared ones.)
                    .filter(|w| w.kind == WarningKind::CostExceeded)
                    .collect();
                assert!(bad.is_empty(), "{name} {path}: {rule}: {bad:?}");
            }
            // strings and lists a rule reads are bounded, so the API server's cost estimate passes
            match node["type"].as_str() {
                Some("string") => assert!(node.get("maxLength").is_some(), "{name} {path}: maxLength"),
                Some("array") => assert!(node.get("maxItems").is_some(), "{name} {path}: maxItems"),
                _ => {}
            }
            if let Some(props) = node.get("properties").and_then(Value::as_object) {
                for (prop, child) in props {
                    let read = rules_at(node).iter().any(|(r, _)| r.contains(&format!("self.{prop}")));
                    if read && child["type"] == "array" {
                        assert!(child.get("maxItems").is_some(), "{name} {path}.{prop}: maxItems");
                    }
                }
            }
        });
        assert!(!compiled.has_errors(), "{name}: {:?}", compiled.compilation_errors());
    }
}

#[test]
fn list_items_with_rules_are_bounded() {
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        walk("", &schema(&crd), &mut |path, node| {
            if let Some(items) = node.get("items")
                && items.get("x-kubernetes-validations").is_some()
            {
                assert!(node.get("maxItems").is_some(), "{name} {path}: maxItems");
            }
        });
    }
}

#[test]
fn schema_defaults_match_the_rust_defaults() {
    // `spec: {}` defaulted by the API server equals NetworkConfigSpec::default().
    let root = schema(&NetworkConfig::crd());
    let defaulted = apply_defaults(node(&root, "spec"), &json!({}));
    let rust = serde_json::to_value(NetworkConfigSpec::default()).unwrap_or_default();
    assert_eq!(defaulted, rust);

    // Partly given sections are completed field by field.
    let partial = apply_defaults(node(&root, "spec"), &json!({"podNetwork": {"mtu": 1450}}));
    assert_eq!(partial["podNetwork"]["mtu"], 1450);
    assert_eq!(partial["podNetwork"]["masquerade"], true);
    assert_eq!(partial["podNetwork"]["encapsulation"], "None");

    let root = schema(&IPPool::crd());
    let defaulted = apply_defaults(node(&root, "spec"), &json!({"cidr": "10.244.0.0/16"}));
    let rust = serde_json::to_value(IPPoolSpec::new("10.244.0.0/16")).unwrap_or_default();
    assert_eq!(defaulted, rust);
}

#[test]
fn network_config_spec_defaults_are_the_documented_ones() {
    let d = NetworkConfigSpec::default();
    assert_eq!(d.pod_network.mtu, 1500);
    assert!(d.pod_network.masquerade);
    assert_eq!(d.service_network.service_cidr, "10.96.0.0/16");
    assert_eq!(
        (d.service_network.node_port_range.min, d.service_network.node_port_range.max),
        (30000, 32767)
    );
    assert_eq!(d.proxy.masquerade_bit, 14);
    assert_eq!(d.dns.cluster_domain, "cluster.local");
    assert_eq!(d.dns.service_ip, "10.96.0.10");
    assert_eq!(d.dns.cache_ttl_seconds, 30);
    assert!(d.ingress.enabled);
    assert_eq!(d.ingress.class_name, "weft");
    assert_eq!((d.ingress.http_port, d.ingress.https_port), (80, 443));
    assert_eq!(d.cni.conf_dir, "/etc/cni/net.d");
    assert_eq!(d.cni.bin_dir, "/opt/cni/bin");
    assert_eq!(d.cni.conflist_name, "10-weft.conflist");
    assert_eq!(d.cni.chained_plugins, ["portmap"]);

    // and `spec: {}` deserializes to them
    let parsed: NetworkConfigSpec = serde_json::from_value(json!({})).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, d);
}
