//! Ingress compilation: Ingresses of Weft's IngressClass, the TLS Secrets they name and the
//! controller's settings, for the ingress nodes only.
//!
//! Backends are resolved to the Service's ClusterIP and port here, so nginx proxies to the
//! ClusterIP and Weft's proxy balances: endpoint changes never reach the ingress config. Every
//! Ingress is checked with [`weft_api::ingress::validate`] before it goes into a plan; one that
//! fails is left out (and reported, see [`IngressState::report`]) while the others keep working.
//!
//! There are few Ingresses next to Services and endpoints, so any ingress-related change
//! recompiles every ingress resource; each is encoded once and shared by all ingress nodes, and
//! only resources whose version changed are sent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use weft_api::plan::{self as pb, Kind, Resource, ResourceKey};

use super::model::{
    BackendRef, Change, Ingress, IngressClass, Node, ObjectKey, PathType, PortRef, Protocol, Scope, Service,
    Settings, TlsSecret, Update,
};

/// The name of the settings resource.
pub const SETTINGS: &str = "ingress";
/// The controller an IngressClass must name for Weft to serve it.
pub const CONTROLLER: &str = "weft.io/ingress";

const ANNOTATION_PREFIX: &str = "nginx.ingress.kubernetes.io/";

/// What became of each Ingress of Weft's class, for Events and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressReport {
    /// Served Ingresses (`Ok`) and left-out ones with the reason (`Err`).
    pub ingresses: BTreeMap<ObjectKey, Result<(), String>>,
    /// Served Ingresses naming TLS Secrets that cannot be used: their hosts are served over
    /// HTTP only.
    pub unusable_secrets: BTreeMap<ObjectKey, Vec<UnusableSecret>>,
    /// Addresses of the nodes serving ingress.
    pub addresses: Vec<Ipv4Addr>,
}

/// A TLS Secret an Ingress names that nginx is not given, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusableSecret {
    /// `namespace/name`.
    pub name: String,
    /// Why it cannot be used; `None`: it does not exist (or is not a `kubernetes.io/tls` Secret
    /// with `tls.crt` and `tls.key`).
    pub invalid: Option<String>,
}

#[derive(Debug, Default)]
pub struct IngressState {
    settings: Settings,
    ingresses: BTreeMap<ObjectKey, Ingress>,
    classes: BTreeMap<String, IngressClass>,
    secrets: BTreeMap<ObjectKey, TlsSecret>,
    /// Services some Ingress (or the default backend) points at: only their changes matter.
    referenced_services: BTreeSet<ObjectKey>,
    dirty: bool,
    desired: BTreeMap<ResourceKey, Arc<Resource>>,
    emitted: BTreeMap<String, BTreeMap<ResourceKey, u64>>,
    report: IngressReport,
}

impl IngressState {
    /// Dirty from the start, so the settings go out with the first plan.
    pub fn new() -> Self {
        Self { dirty: true, ..Self::default() }
    }

    /// Ingress is served at all: enabled, and Weft's IngressClass exists (without it there is
    /// nothing to serve, and no node runs nginx).
    fn active(&self) -> bool {
        self.settings.enabled
            && self.classes.get(&self.settings.class_name).is_some_and(|c| c.controller == CONTROLLER)
    }

    /// Whether `node` serves ingress.
    pub fn serves(&self, node: &Node) -> bool {
        self.active() && self.settings.selects(node)
    }

    /// Records a change; returns true when the set of ingress nodes may have changed.
    pub fn apply(&mut self, change: Change) -> bool {
        let before = (self.active(), self.settings.node_selector.clone());
        self.record(change);
        before != (self.active(), self.settings.node_selector.clone())
    }

    fn record(&mut self, change: Change) {
        match change {
            Change::IngressSettings(settings) if settings != self.settings => {
                self.settings = settings;
                self.dirty = true;
            }
            Change::Ingress(ingress) if self.ingresses.get(&ingress.key) != Some(&ingress) => {
                self.ingresses.insert(ingress.key.clone(), ingress);
                self.dirty = true;
            }
            Change::IngressDeleted(key) => self.dirty |= self.ingresses.remove(&key).is_some(),
            Change::IngressClass(class) if self.classes.get(&class.name) != Some(&class) => {
                self.classes.insert(class.name.clone(), class);
                self.dirty = true;
            }
            Change::IngressClassDeleted(name) => self.dirty |= self.classes.remove(&name).is_some(),
            Change::Secret(secret) if self.secrets.get(&secret.key) != Some(&secret) => {
                self.secrets.insert(secret.key.clone(), secret);
                self.dirty = true;
            }
            Change::SecretDeleted(key) => self.dirty |= self.secrets.remove(&key).is_some(),
            _ => {}
        }
    }

    /// A Service changed: the routes to it are recompiled if any Ingress names it.
    pub fn service_changed(&mut self, key: &ObjectKey) {
        if self.referenced_services.contains(key) {
            self.dirty = true;
        }
    }

    /// What became of each Ingress, and the ingress nodes' addresses.
    pub fn ingress_report(&self) -> &IngressReport {
        &self.report
    }

    /// Whether an Ingress belongs to Weft: it names Weft's class, or names none while Weft's
    /// IngressClass is the default. Weft's IngressClass must exist and name Weft's controller.
    fn is_ours(&self, ingress: &Ingress) -> bool {
        let Some(class) = self.classes.get(&self.settings.class_name).filter(|c| c.controller == CONTROLLER)
        else {
            return false;
        };
        match &ingress.class_name {
            Some(name) => *name == class.name,
            None => class.is_default,
        }
    }

    /// Recompiles the ingress resources (when something they depend on changed) and sends each
    /// ingress node what it lacks; nodes that stopped serving ingress (or are gone) lose all of it.
    pub fn flush(
        &mut self,
        out: &mut Vec<Update>,
        nodes: &BTreeMap<String, Node>,
        services: &HashMap<ObjectKey, Service>,
        nodes_changed: bool,
    ) {
        if !self.dirty && !nodes_changed {
            return;
        }
        let mut changed: BTreeSet<ResourceKey> = BTreeSet::new();
        if std::mem::take(&mut self.dirty) {
            let desired = self.compile(services);
            for (key, resource) in &desired {
                if self.desired.get(key).is_none_or(|old| old.version != resource.version) {
                    changed.insert(key.clone());
                }
            }
            changed.extend(self.desired.keys().filter(|k| !desired.contains_key(*k)).cloned());
            self.desired = desired;
        }
        let serving: BTreeSet<&String> = nodes.values().filter(|n| self.serves(n)).map(|n| &n.name).collect();
        self.report.addresses = serving.iter().filter_map(|n| nodes.get(*n)?.ip).collect();
        // Nodes that no longer serve: retract everything they hold.
        let gone: Vec<String> = self.emitted.keys().filter(|n| !serving.contains(n)).cloned().collect();
        for node in gone {
            for key in self.emitted.remove(&node).unwrap_or_default().into_keys() {
                out.push(Update { scope: Scope::Node(node.clone()), key, resource: None });
            }
        }
        for node in serving {
            let fresh = !self.emitted.contains_key(node);
            let held = self.emitted.entry(node.clone()).or_default();
            let keys: Box<dyn Iterator<Item = &ResourceKey>> =
                if fresh { Box::new(self.desired.keys()) } else { Box::new(changed.iter()) };
            for key in keys {
                let resource = self.desired.get(key);
                let scope = Scope::Node(node.clone());
                match resource {
                    Some(r) => {
                        if held.insert(key.clone(), r.version) != Some(r.version) {
                            out.push(Update { scope, key: key.clone(), resource: Some(r.clone()) });
                        }
                    }
                    None => {
                        if held.remove(key).is_some() {
                            out.push(Update { scope, key: key.clone(), resource: None });
                        }
                    }
                }
            }
        }
    }

    fn compile(&mut self, services: &HashMap<ObjectKey, Service>) -> BTreeMap<ResourceKey, Arc<Resource>> {
        let mut desired = BTreeMap::new();
        self.referenced_services.clear();
        self.report.ingresses.clear();
        self.report.unusable_secrets.clear();
        if !self.active() {
            return desired;
        }
        let mut referenced = BTreeSet::new();
        let default_backend = self.settings.default_backend.clone().map(|(svc, port)| {
            referenced.insert(svc.clone());
            resolve(services, &svc, &port)
        });
        let settings = pb::IngressSettings {
            class_name: self.settings.class_name.clone(),
            http_port: u32::from(self.settings.http_port),
            https_port: u32::from(self.settings.https_port),
            default_backend,
        };
        let mut add = |kind: Kind, name: String, payload: &dyn EncodeDyn| {
            let resource = payload.encode_as(kind, &name);
            desired.insert(resource.key(), Arc::new(resource));
        };
        add(Kind::IngressSettings, SETTINGS.into(), &settings);
        let mut secrets = BTreeSet::new();
        let mut report = BTreeMap::new();
        let mut unusable_secrets: BTreeMap<ObjectKey, Vec<UnusableSecret>> = BTreeMap::new();
        for ingress in self.ingresses.values().filter(|i| self.is_ours(i)) {
            for rule in &ingress.rules {
                for path in &rule.paths {
                    if let Some(b) = &path.backend {
                        referenced.insert(ObjectKey::new(&ingress.key.namespace, &b.service));
                    }
                }
            }
            if let Some(b) = &ingress.default_backend {
                referenced.insert(ObjectKey::new(&ingress.key.namespace, &b.service));
            }
            let result = ingress_payload(ingress, services).and_then(|payload| {
                weft_api::ingress::validate(&payload).map_err(|e| e.to_string())?;
                Ok(payload)
            });
            match result {
                Ok(payload) => {
                    for tls in &payload.tls {
                        if tls.secret.is_empty() {
                            continue;
                        }
                        let found = tls
                            .secret
                            .split_once('/')
                            .and_then(|(ns, n)| self.secrets.get(&ObjectKey::new(ns, n)));
                        let invalid = match found.map(|s| &s.pair) {
                            Some(Ok(_)) => {
                                secrets.insert(tls.secret.clone());
                                continue;
                            }
                            Some(Err(why)) => Some(why.clone()),
                            None => None,
                        };
                        let unusable = UnusableSecret { name: tls.secret.clone(), invalid };
                        unusable_secrets.entry(ingress.key.clone()).or_default().push(unusable);
                    }
                    add(Kind::Ingress, ingress.key.to_string(), &payload);
                    report.insert(ingress.key.clone(), Ok(()));
                }
                Err(reason) => {
                    report.insert(ingress.key.clone(), Err(reason));
                }
            }
        }
        // Only usable Secrets a served Ingress names reach the nodes.
        for name in secrets {
            let Some((ns, n)) = name.split_once('/') else { continue };
            if let Some(Ok(pair)) = self.secrets.get(&ObjectKey::new(ns, n)).map(|s| &s.pair) {
                let payload = pb::TlsSecret { cert: pair.cert.clone(), key: pair.private_key.clone() };
                add(Kind::Secret, name, &payload);
            }
        }
        self.referenced_services = referenced;
        self.report.ingresses = report;
        self.report.unusable_secrets = unusable_secrets;
        desired
    }
}

/// Encodes a payload of any message type (the resources of one kind differ in type).
trait EncodeDyn {
    fn encode_as(&self, kind: Kind, name: &str) -> Resource;
}

impl<M: prost::Message> EncodeDyn for M {
    fn encode_as(&self, kind: Kind, name: &str) -> Resource {
        Resource::encode(kind, name, self)
    }
}

/// A Service port as ClusterIP:port; 0 when the Service, its ClusterIP or the port is missing.
fn resolve(services: &HashMap<ObjectKey, Service>, key: &ObjectKey, port: &PortRef) -> pb::IngressBackend {
    let found = services.get(key).and_then(|s| {
        let ip = s.cluster_ip?;
        let p = s.ports.iter().filter(|p| p.protocol == Protocol::Tcp).find(|p| match port {
            PortRef::Number(n) => p.port == *n,
            PortRef::Name(name) => p.name == *name,
        })?;
        Some((ip, p.port))
    });
    pb::IngressBackend {
        service: key.to_string(),
        cluster_ip: found.map(|(ip, _)| u32::from(ip)).unwrap_or(0),
        port: found.map(|(_, p)| u32::from(p)).unwrap_or(0),
    }
}

fn bool_annotation(ingress: &Ingress, name: &str, default: bool) -> Result<bool, String> {
    match ingress.annotations.get(&format!("{ANNOTATION_PREFIX}{name}")).map(String::as_str) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => {
            let shown: String = other.chars().take(40).collect();
            Err(format!("annotation {ANNOTATION_PREFIX}{name} {shown:?}: must be \"true\" or \"false\""))
        }
    }
}

fn ingress_payload(ingress: &Ingress, services: &HashMap<ObjectKey, Service>) -> Result<pb::Ingress, String> {
    let ns = &ingress.key.namespace;
    let backend = |b: &BackendRef| resolve(services, &ObjectKey::new(ns, &b.service), &b.port);
    Ok(pb::Ingress {
        namespace: ns.clone(),
        name: ingress.key.name.clone(),
        default_backend: ingress.default_backend.as_ref().map(backend),
        rules: ingress
            .rules
            .iter()
            .map(|r| pb::IngressRule {
                host: r.host.clone(),
                paths: r
                    .paths
                    .iter()
                    .map(|p| pb::IngressPath {
                        path: p.path.clone(),
                        path_type: match p.path_type {
                            PathType::Prefix => pb::PathType::Prefix,
                            PathType::Exact => pb::PathType::Exact,
                            PathType::ImplementationSpecific => pb::PathType::ImplementationSpecific,
                        } as i32,
                        // A resource backend has no Service: an empty backend answers 503.
                        backend: Some(p.backend.as_ref().map(backend).unwrap_or_default()),
                    })
                    .collect(),
            })
            .collect(),
        tls: ingress
            .tls
            .iter()
            .map(|t| pb::IngressTls {
                hosts: t.hosts.clone(),
                secret: t.secret.as_ref().map(|s| format!("{ns}/{s}")).unwrap_or_default(),
            })
            .collect(),
        rewrite_target: ingress
            .annotations
            .get(&format!("{ANNOTATION_PREFIX}rewrite-target"))
            .cloned()
            .unwrap_or_default(),
        use_regex: bool_annotation(ingress, "use-regex", false)?,
        ssl_redirect: bool_annotation(ingress, "ssl-redirect", true)?,
        force_ssl_redirect: bool_annotation(ingress, "force-ssl-redirect", false)?,
        created_unix: ingress.created_unix,
    })
}

#[cfg(test)]
#[path = "ingress_tests.rs"]
mod tests;
