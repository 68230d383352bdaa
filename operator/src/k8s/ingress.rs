//! Ingresses, IngressClasses and TLS Secrets → the compiler's model, and what the leader writes
//! back: the ingress nodes' addresses in `status.loadBalancer` and a Warning Event for an Ingress
//! left out of the plans.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};
use weft_api::v1alpha1 as api;

use crate::plan::model::{
    BackendRef, Ingress, IngressClass, IngressPath, IngressRule, IngressTls, ObjectKey, PathType, PortRef,
    Settings, TlsSecret,
};

const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The Event reason for an Ingress Weft cannot serve.
pub const REJECTED: &str = "IngressRejected";
/// The Event reason for a served Ingress whose TLS Secret is missing.
pub const TLS_SECRET_MISSING: &str = "TLSSecretMissing";

pub fn settings(config: &api::NetworkConfig) -> Settings {
    let s = &config.spec.ingress;
    Settings {
        enabled: s.enabled,
        node_selector: s.node_selector.clone(),
        class_name: s.class_name.clone(),
        http_port: s.http_port,
        https_port: s.https_port,
        default_backend: s.default_backend.as_deref().and_then(parse_default_backend),
    }
}

/// `namespace/service:port`, as the NetworkConfig schema enforces.
fn parse_default_backend(s: &str) -> Option<(ObjectKey, PortRef)> {
    let (ns, rest) = s.split_once('/')?;
    let (svc, port) = rest.rsplit_once(':')?;
    let port = match port.parse::<u16>() {
        Ok(n) => PortRef::Number(n),
        Err(_) => PortRef::Name(port.to_string()),
    };
    Some((ObjectKey::new(ns, svc), port))
}

fn backend(b: &networking::IngressBackend) -> Option<BackendRef> {
    let svc = b.service.as_ref()?;
    let port = svc.port.as_ref()?;
    let port = match (&port.name, port.number) {
        (Some(name), _) if !name.is_empty() => PortRef::Name(name.clone()),
        (_, Some(n)) => PortRef::Number(u16::try_from(n).ok()?),
        _ => return None,
    };
    Some(BackendRef { service: svc.name.clone(), port })
}

pub fn ingress(o: &networking::Ingress) -> Ingress {
    let spec = o.spec.clone().unwrap_or_default();
    let class_name =
        spec.ingress_class_name.clone().or_else(|| o.annotations().get(LEGACY_CLASS_ANNOTATION).cloned());
    Ingress {
        key: ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any()),
        class_name,
        created_unix: o.creation_timestamp().map(|t| t.0.as_second()).unwrap_or(0),
        annotations: o
            .annotations()
            .iter()
            .filter(|(k, _)| k.starts_with("nginx.ingress.kubernetes.io/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        default_backend: spec.default_backend.as_ref().and_then(backend),
        rules: spec
            .rules
            .iter()
            .flatten()
            .map(|r| IngressRule {
                host: r.host.clone().unwrap_or_default(),
                paths: r
                    .http
                    .iter()
                    .flat_map(|h| &h.paths)
                    .map(|p| IngressPath {
                        path: p.path.clone().unwrap_or_else(|| "/".into()),
                        path_type: match p.path_type.as_str() {
                            "Exact" => PathType::Exact,
                            "Prefix" => PathType::Prefix,
                            _ => PathType::ImplementationSpecific,
                        },
                        backend: backend(&p.backend),
                    })
                    .collect(),
            })
            .collect(),
        tls: spec
            .tls
            .iter()
            .flatten()
            .map(|t| IngressTls { hosts: t.hosts.clone().unwrap_or_default(), secret: t.secret_name.clone() })
            .collect(),
    }
}

pub fn class(o: &networking::IngressClass) -> IngressClass {
    IngressClass {
        name: o.name_any(),
        controller: o.spec.as_ref().and_then(|s| s.controller.clone()).unwrap_or_default(),
        is_default: o.annotations().get(DEFAULT_CLASS_ANNOTATION).is_some_and(|v| v == "true"),
    }
}

/// A `kubernetes.io/tls` Secret with both keys; `None` for any other Secret.
pub fn secret(o: &core::Secret) -> Option<TlsSecret> {
    if o.type_.as_deref() != Some("kubernetes.io/tls") {
        return None;
    }
    let data = o.data.as_ref()?;
    Some(TlsSecret {
        key: ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any()),
        cert: data.get("tls.crt")?.0.clone(),
        private_key: data.get("tls.key")?.0.clone(),
    })
}

/// What the leader needs for Ingress status and Events.
#[derive(Debug, Clone, Default)]
pub struct IngressStatusInputs {
    /// Each Ingress of Weft's class, with why it is left out of the plans (if it is).
    pub ingresses: Vec<(networking::Ingress, Result<(), String>)>,
    /// Served Ingresses naming TLS Secrets that do not exist (`namespace/name` each).
    pub missing_secrets: Vec<(networking::Ingress, Vec<String>)>,
    /// The ingress nodes' addresses.
    pub addresses: Vec<Ipv4Addr>,
}

impl IngressStatusInputs {
    pub fn new(
        objects: &BTreeMap<ObjectKey, networking::Ingress>,
        report: &crate::plan::ingress::IngressReport,
    ) -> Self {
        Self {
            ingresses: report
                .ingresses
                .iter()
                .filter_map(|(key, result)| Some((objects.get(key)?.clone(), result.clone())))
                .collect(),
            missing_secrets: report
                .missing_secrets
                .iter()
                .filter_map(|(key, names)| Some((objects.get(key)?.clone(), names.clone())))
                .collect(),
            addresses: report.addresses.clone(),
        }
    }
}

/// The `status.loadBalancer.ingress` a served Ingress should have.
fn desired_addresses(addresses: &[Ipv4Addr]) -> Vec<String> {
    let mut ips: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    ips.sort();
    ips
}

fn current_addresses(o: &networking::Ingress) -> Vec<String> {
    let mut ips: Vec<String> = o
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    ips.sort();
    ips
}

/// Removes the addresses from an Ingress's status (a missing Ingress has none to remove).
async fn clear_addresses(client: &Client, key: &ObjectKey) {
    let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": null } } });
    let api = Api::<networking::Ingress>::namespaced(client.clone(), &key.namespace);
    match api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => info!(ingress = %key, "Ingress no longer served: its addresses removed"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => warn!(error = %e, ingress = %key, "cannot clear Ingress status"),
    }
}

/// Writes what changed: addresses of served Ingresses (and their removal from Ingresses no longer
/// served: rejected, ingress disabled, class gone; `addressed` remembers where they were written),
/// one Warning Event per new rejection or missing TLS Secret (`reported` remembers them, so a
/// steady cluster writes nothing).
pub async fn write_status(
    client: &Client,
    recorder: &Recorder,
    inputs: &IngressStatusInputs,
    reported: &mut HashSet<(ObjectKey, String)>,
    addressed: &mut HashSet<ObjectKey>,
) {
    let mut still_rejected = HashSet::new();
    let mut warn = async |object: &networking::Ingress, reason: &str, note: String| {
        let key = ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any());
        let entry = (key.clone(), note.clone());
        still_rejected.insert(entry.clone());
        if reported.contains(&entry) {
            return;
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        match recorder.publish(&event, &object.object_ref(&())).await {
            Ok(()) => {
                info!(ingress = %key, reason, "Ingress warning: event published");
                reported.insert(entry);
            }
            Err(e) => warn!(error = %e, "cannot publish an Event"),
        }
    };
    for (object, names) in &inputs.missing_secrets {
        for name in names {
            let note = format!(
                "TLS Secret {name} not found (or not a kubernetes.io/tls Secret with tls.crt and tls.key): its hosts are served over HTTP only"
            );
            warn(object, TLS_SECRET_MISSING, note).await;
        }
    }
    for (object, result) in &inputs.ingresses {
        let key = ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any());
        match result {
            Ok(()) => {
                addressed.insert(key.clone());
                let want = desired_addresses(&inputs.addresses);
                if current_addresses(object) == want {
                    continue;
                }
                let ingress: Vec<serde_json::Value> =
                    want.iter().map(|ip| serde_json::json!({ "ip": ip })).collect();
                let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": ingress } } });
                let api = Api::<networking::Ingress>::namespaced(client.clone(), &key.namespace);
                if let Err(e) =
                    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await
                {
                    warn!(error = %e, ingress = %key, "cannot write Ingress status");
                }
            }
            Err(reason) => {
                if !current_addresses(object).is_empty() {
                    clear_addresses(client, &key).await;
                }
                addressed.remove(&key);
                warn(object, REJECTED, format!("not served by Weft: {reason}")).await;
            }
        }
    }
    let served: HashSet<ObjectKey> = inputs
        .ingresses
        .iter()
        .filter(|(_, result)| result.is_ok())
        .map(|(o, _)| ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any()))
        .collect();
    let gone: Vec<ObjectKey> = addressed.difference(&served).cloned().collect();
    for key in gone {
        clear_addresses(client, &key).await;
        addressed.remove(&key);
    }
    // A fixed (or deleted) Ingress that breaks again later is reported again.
    reported.retain(|e| still_rejected.contains(e));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backend_takes_a_port_number_or_name() {
        assert_eq!(
            parse_default_backend("default/fallback:80"),
            Some((ObjectKey::new("default", "fallback"), PortRef::Number(80)))
        );
        assert_eq!(
            parse_default_backend("web/fallback:http"),
            Some((ObjectKey::new("web", "fallback"), PortRef::Name("http".into())))
        );
        assert_eq!(parse_default_backend("fallback:80"), None);
    }

    #[test]
    fn an_ingress_converts_with_its_class_paths_and_annotations() {
        let o: networking::Ingress = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                "annotations": {"nginx.ingress.kubernetes.io/rewrite-target": "/$2", "other": "x"}},
            "spec": {"ingressClassName": "weft", "rules": [{"host": "shop.example.com", "http": {"paths": [
                {"path": "/wear", "pathType": "Prefix", "backend": {"service": {"name": "wear", "port": {"number": 8080}}}},
                {"path": "/watch", "pathType": "Exact", "backend": {"service": {"name": "watch", "port": {"name": "http"}}}}
            ]}}], "tls": [{"hosts": ["shop.example.com"], "secretName": "shop-tls"}]}
        }))
        .unwrap_or_default();
        let i = ingress(&o);
        assert_eq!(i.class_name.as_deref(), Some("weft"));
        assert_eq!(i.annotations.len(), 1);
        assert_eq!(i.rules[0].paths[1].path_type, PathType::Exact);
        assert_eq!(
            i.rules[0].paths[1].backend,
            Some(BackendRef { service: "watch".into(), port: PortRef::Name("http".into()) })
        );
        assert_eq!(i.tls[0].secret.as_deref(), Some("shop-tls"));
    }
}
