//! Runs the e2e fixtures (and the objects in config/) through the CRD schemas, client-side.
//!
//! `e2e/fixtures/valid/*.yaml` must pass; each `e2e/fixtures/invalid/*.yaml` starts with
//! `# expect: <text>` and its last document must be rejected with an error containing that text.
//! In a file with several documents, the earlier ones are applied first (they must pass) and a
//! later document updating the same object is checked against it as `oldSelf`.
//!
//! The CEL rules are evaluated by kube's client-side CEL engine (the Kubernetes CEL libraries,
//! defaults applied first, as the API server does). The OpenAPI checks (types, enums, bounds,
//! required fields, unknown fields, set lists) are re-implemented here in miniature with the API
//! server's wording, so the `# expect:` lines hold for both this test and the e2e run against a
//! real API server.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{ErrorKind, Validator};
use serde::Deserialize;
use serde_json::Value;
use weft_api::v1alpha1::{IPBlock, IPPool, NetworkConfig, ProxyPolicy, all_crds};

/// Marks a CEL rule that could not be evaluated (a fixture must never cause one).
const UNEVALUABLE: &str = "CEL RULE COULD NOT BE EVALUATED:";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect(),
        Err(err) => panic!("reading {}: {err}", dir.display()),
    };
    files.sort();
    files
}

fn documents(path: &Path) -> (String, Vec<Value>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(err) => panic!("reading {}: {err}", path.display()),
    };
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        match Value::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(v) => docs.push(v),
            Err(err) => panic!("{}: not YAML: {err}", path.display()),
        }
    }
    (text, docs)
}

fn crd_for(doc: &Value) -> Option<CustomResourceDefinition> {
    let api_version = doc["apiVersion"].as_str()?;
    let kind = doc["kind"].as_str()?;
    all_crds().into_iter().find(|c| {
        format!("{}/{}", c.spec.group, c.spec.versions[0].name) == api_version && c.spec.names.kind == kind
    })
}

fn schema(crd: &CustomResourceDefinition) -> Value {
    crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or_default()
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// The OpenAPI part of the API server's validation, in miniature, with its wording.
fn openapi_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = |p: &str| if p.is_empty() { "<root>".to_owned() } else { p.to_owned() };
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errors.push(format!(
                "{}: Invalid value: \"null\": {} in body must be of type {}",
                at(path),
                at(path),
                schema["type"].as_str().unwrap_or("object")
            ));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or_default();
    let actual = match value {
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    };
    if !ty.is_empty() && ty != actual && !(ty == "number" && actual == "integer") {
        errors.push(format!(
            "{}: Invalid value: \"{actual}\": {} in body must be of type {ty}: \"{actual}\"",
            at(path),
            at(path)
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(show).collect();
        errors.push(format!(
            "{}: Unsupported value: {}: supported values: {}",
            at(path),
            show(value),
            list.join(", ")
        ));
    }
    match value {
        Value::String(s) => {
            if let Some(max) = schema["maxLength"].as_u64()
                && s.chars().count() as u64 > max
            {
                errors.push(format!("{}: Too long: may not be more than {max} bytes", at(path)));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && (s.chars().count() as u64) < min
            {
                errors.push(format!(
                    "{}: Invalid value: {}: {} in body should be at least {min} chars long",
                    at(path),
                    show(value),
                    at(path)
                ));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            if let Some(min) = schema["minimum"].as_f64()
                && x < min
            {
                errors.push(format!(
                    "{}: Invalid value: {n}: {} in body should be greater than or equal to {min}",
                    at(path),
                    at(path)
                ));
            }
            if let Some(max) = schema["maximum"].as_f64()
                && x > max
            {
                errors.push(format!(
                    "{}: Invalid value: {n}: {} in body should be less than or equal to {max}",
                    at(path),
                    at(path)
                ));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                errors.push(format!(
                    "{}: Too many: {}: must have at most {max} items",
                    at(path),
                    items.len()
                ));
            }
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errors.push(format!(
                    "{}: Invalid value: {}: {} in body should have at least {min} items",
                    at(path),
                    items.len(),
                    at(path)
                ));
            }
            if schema["x-kubernetes-list-type"] == "set" {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        errors.push(format!("{path}[{i}]: Duplicate value: {}", show(item)));
                    }
                }
            }
            for (i, item) in items.iter().enumerate() {
                openapi_errors(&schema["items"], item, &format!("{path}[{i}]"), errors);
            }
        }
        Value::Object(map) => {
            let props = schema["properties"].as_object();
            for key in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(key) {
                    errors.push(format!("{}: Required value", join(path, key)));
                }
            }
            if let Some(max) = schema["maxProperties"].as_u64()
                && map.len() as u64 > max
            {
                errors.push(format!("{}: Too many: {}: must have at most {max} items", at(path), map.len()));
            }
            for (key, child) in map {
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_path = join(path, key);
                if let Some(child_schema) = props.and_then(|p| p.get(key)) {
                    openapi_errors(child_schema, child, &child_path, errors);
                } else if schema["additionalProperties"].is_object() {
                    openapi_errors(&schema["additionalProperties"], child, &child_path, errors);
                } else if schema["x-kubernetes-preserve-unknown-fields"] != Value::Bool(true) {
                    errors.push(format!("strict decoding error: unknown field \"{child_path}\""));
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// Every error the API server would report for `doc` (given the stored `old` object, if any).
fn admission_errors(doc: &Value, old: Option<&Value>) -> Vec<String> {
    let Some(crd) = crd_for(doc) else {
        return vec![format!("no Weft CRD for {}/{}", doc["apiVersion"], doc["kind"])];
    };
    let schema = schema(&crd);
    let mut errors = Vec::new();
    if doc["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        errors.push("metadata.name: Required value: name or generateName is required".to_owned());
    }
    let namespaced = crd.spec.scope == "Namespaced";
    if namespaced != doc["metadata"]["namespace"].is_string() {
        errors.push(format!("metadata.namespace: namespaced is {namespaced}"));
    }
    openapi_errors(&schema, doc, "", &mut errors);
    if let Err(cel) = Validator::new().validate(&schema, doc, old) {
        for e in cel.into_vec() {
            if e.kind == ErrorKind::ValidationFailure {
                errors.push(format!("{}: Invalid value: {}", e.field_path, e.message));
            } else {
                // a rule that errors out instead of answering false is a bug in the rule
                errors.push(format!("{UNEVALUABLE} {:?} at {}: {}", e.kind, e.field_path, e.message));
            }
        }
    }
    errors
}

fn identity(doc: &Value) -> (String, String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_owned(),
        doc["metadata"]["namespace"].as_str().unwrap_or_default().to_owned(),
        doc["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The Rust types must read every object the API server accepts.
fn deserializes(doc: &Value) -> Result<(), String> {
    let r = match doc["kind"].as_str() {
        Some("NetworkConfig") => serde_json::from_value::<NetworkConfig>(doc.clone()).map(drop),
        Some("IPPool") => serde_json::from_value::<IPPool>(doc.clone()).map(drop),
        Some("IPBlock") => serde_json::from_value::<IPBlock>(doc.clone()).map(drop),
        Some("ProxyPolicy") => serde_json::from_value::<ProxyPolicy>(doc.clone()).map(drop),
        _ => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

/// Apply the documents of one file in order; returns the errors of the last one.
fn apply_all(path: &Path, docs: &[Value], failures: &mut Vec<String>) -> Vec<String> {
    let mut last_errors = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let old = docs[..i].iter().rev().find(|d| identity(d) == identity(doc));
        let errors = admission_errors(doc, old);
        if i + 1 < docs.len() && !errors.is_empty() {
            failures.push(format!("{}: setup document {} rejected: {errors:?}", path.display(), i + 1));
        }
        last_errors = errors;
    }
    last_errors
}

#[test]
fn valid_fixtures_are_accepted() {
    let mut failures = Vec::new();
    let files = yaml_files(&repo().join("e2e/fixtures/valid"));
    assert!(!files.is_empty());
    for path in files {
        let (_, docs) = documents(&path);
        let errors = apply_all(&path, &docs, &mut failures);
        if !errors.is_empty() {
            failures.push(format!("{}: rejected: {errors:#?}", path.display()));
        }
        for doc in &docs {
            if let Err(e) = deserializes(doc) {
                failures.push(format!("{}: the Rust types cannot read it: {e}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn expectation(path: &Path, text: &str) -> String {
    match text.lines().next().and_then(|l| l.strip_prefix("# expect: ")) {
        Some(e) if !e.trim().is_empty() => e.trim().to_owned(),
        _ => panic!("{}: the first line must be `# expect: <part of the error>`", path.display()),
    }
}

#[test]
fn invalid_fixtures_are_rejected_with_the_expected_message() {
    let mut failures = Vec::new();
    let files = yaml_files(&repo().join("e2e/fixtures/invalid"));
    assert!(!files.is_empty());
    for path in files {
        let (text, docs) = documents(&path);
        let expect = expectation(&path, &text);
        if docs.is_empty() {
            failures.push(format!("{}: no document", path.display()));
            continue;
        }
        let errors = apply_all(&path, &docs, &mut failures);
        if errors.iter().any(|e| e.contains(UNEVALUABLE)) {
            failures.push(format!("{}: {errors:#?}", path.display()));
        }
        if errors.is_empty() {
            failures.push(format!("{}: accepted, but must be rejected with {expect:?}", path.display()));
        } else if !errors.iter().any(|e| e.contains(&expect)) {
            failures
                .push(format!("{}: rejected, but no error contains {expect:?}: {errors:#?}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_cel_rule_has_an_invalid_fixture() {
    let mut expects = Vec::new();
    for path in yaml_files(&repo().join("e2e/fixtures/invalid")) {
        let (text, _) = documents(&path);
        expects.push(expectation(&path, &text));
    }
    let mut uncovered = Vec::new();
    for crd in all_crds() {
        let mut messages = Vec::new();
        collect_messages(&schema(&crd), &mut messages);
        for m in messages {
            if !expects.iter().any(|e| m.contains(e.as_str())) {
                uncovered.push(format!("{:?}: {m}", crd.metadata.name));
            }
        }
    }
    assert!(
        uncovered.is_empty(),
        "rules without an e2e/fixtures/invalid file expecting their message:\n{}",
        uncovered.join("\n")
    );
}

fn collect_messages(node: &Value, out: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            if let Some(rules) = map.get("x-kubernetes-validations").and_then(Value::as_array) {
                out.extend(rules.iter().filter_map(|r| r["message"].as_str().map(str::to_owned)));
            }
            for v in map.values() {
                collect_messages(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_messages(v, out)),
        _ => {}
    }
}

#[test]
fn config_objects_are_accepted() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for dir in ["config/default", "config/samples"] {
        for path in yaml_files(&repo().join(dir)) {
            let (_, docs) = documents(&path);
            for doc in docs.iter().filter(|d| crd_for(d).is_some()) {
                checked += 1;
                let errors = admission_errors(doc, None);
                if !errors.is_empty() {
                    failures.push(format!("{}: rejected: {errors:#?}", path.display()));
                }
                if let Err(e) = deserializes(doc) {
                    failures.push(format!("{}: the Rust types cannot read it: {e}", path.display()));
                }
            }
        }
    }
    assert!(
        checked >= 5,
        "expected the default NetworkConfig/IPPool and a sample per CRD, found {checked} objects"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
