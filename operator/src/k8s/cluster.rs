//! Watches the cluster and feeds the plan compiler.
//!
//! One watcher per resource type sends events to a single task that owns the compiler. That task
//! drains every event that is waiting before it compiles, so a burst (an initial list, a rollout)
//! becomes one plan update instead of thousands.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info_span, warn};
use weft_api::v1alpha1 as api;

use super::cluster_network_policy::ClusterNetworkPolicy;
use super::convert;
use super::inputs::StatusInputs;
use super::metrics::ReconcileMetrics;
use super::policy::{Policy, PolicyIndex};
use crate::plan::Compiler;
use crate::plan::model::{Change, ObjectKey};
use crate::server::PlanStore;

/// A watched object.
#[derive(Debug, Clone)]
pub enum Object {
    Node(Box<core::Node>),
    Service(Box<core::Service>),
    Slice(Box<discovery::EndpointSlice>),
    Block(Box<api::IPBlock>),
    Pool(Box<api::IPPool>),
    Network(Box<api::NetworkConfig>),
    Policy(Box<api::ProxyPolicy>),
    Pod(Box<core::Pod>),
    Ingress(Box<networking::Ingress>),
    IngressClass(Box<networking::IngressClass>),
    Secret(Box<core::Secret>),
    Namespace(Box<core::Namespace>),
    NetworkPolicy(Box<networking::NetworkPolicy>),
    ClusterNetworkPolicy(Box<ClusterNetworkPolicy>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Node,
    Service,
    Slice,
    Block,
    Pool,
    Network,
    Policy,
    Pod,
    Ingress,
    IngressClass,
    Secret,
    Namespace,
    NetworkPolicy,
    ClusterNetworkPolicy,
}

const ALL_KINDS: usize = 14;

impl Object {
    fn kind(&self) -> ObjectKind {
        match self {
            Object::Node(_) => ObjectKind::Node,
            Object::Service(_) => ObjectKind::Service,
            Object::Slice(_) => ObjectKind::Slice,
            Object::Block(_) => ObjectKind::Block,
            Object::Pool(_) => ObjectKind::Pool,
            Object::Network(_) => ObjectKind::Network,
            Object::Policy(_) => ObjectKind::Policy,
            Object::Pod(_) => ObjectKind::Pod,
            Object::Ingress(_) => ObjectKind::Ingress,
            Object::IngressClass(_) => ObjectKind::IngressClass,
            Object::Secret(_) => ObjectKind::Secret,
            Object::Namespace(_) => ObjectKind::Namespace,
            Object::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
            Object::ClusterNetworkPolicy(_) => ObjectKind::ClusterNetworkPolicy,
        }
    }

    fn key(&self) -> ObjectKey {
        fn key_of<K: Resource>(o: &K) -> ObjectKey {
            ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any())
        }
        match self {
            Object::Node(o) => key_of(o.as_ref()),
            Object::Service(o) => key_of(o.as_ref()),
            Object::Slice(o) => key_of(o.as_ref()),
            Object::Block(o) => key_of(o.as_ref()),
            Object::Pool(o) => key_of(o.as_ref()),
            Object::Network(o) => key_of(o.as_ref()),
            Object::Policy(o) => key_of(o.as_ref()),
            Object::Pod(o) => key_of(o.as_ref()),
            Object::Ingress(o) => key_of(o.as_ref()),
            Object::IngressClass(o) => key_of(o.as_ref()),
            Object::Secret(o) => key_of(o.as_ref()),
            Object::Namespace(o) => key_of(o.as_ref()),
            Object::NetworkPolicy(o) => key_of(o.as_ref()),
            Object::ClusterNetworkPolicy(o) => key_of(o.as_ref()),
        }
    }
}

#[derive(Debug)]
pub enum ClusterEvent {
    Applied(Object),
    Deleted(Object),
    /// A complete (re)list of one kind: anything known of that kind and not listed is gone.
    Listed(ObjectKind, Vec<Object>),
}

impl ObjectKind {
    /// The Kubernetes kind, as metrics and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Node => "Node",
            ObjectKind::Service => "Service",
            ObjectKind::Slice => "EndpointSlice",
            ObjectKind::Block => "IPBlock",
            ObjectKind::Pool => "IPPool",
            ObjectKind::Network => "NetworkConfig",
            ObjectKind::Policy => "ProxyPolicy",
            ObjectKind::Pod => "Pod",
            ObjectKind::Ingress => "Ingress",
            ObjectKind::IngressClass => "IngressClass",
            ObjectKind::Secret => "Secret",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }
}

impl ClusterEvent {
    /// What the event is about, for its span: the kind, and the object's key when it is one.
    fn describe(&self) -> (&'static str, &'static str, String) {
        match self {
            ClusterEvent::Applied(o) => ("applied", o.kind().as_str(), o.key().to_string()),
            ClusterEvent::Deleted(o) => ("deleted", o.kind().as_str(), o.key().to_string()),
            ClusterEvent::Listed(kind, objects) => {
                ("listed", kind.as_str(), format!("{} objects", objects.len()))
            }
        }
    }
}

/// Starts one watcher per resource type, sending to `tx`; failed watches count as reconcile
/// errors of their kind.
pub fn spawn_watchers(client: &Client, tx: &mpsc::Sender<ClusterEvent>, metrics: &ReconcileMetrics) {
    let cfg = watcher::Config::default;
    spawn_watch(
        Api::<core::Node>::all(client.clone()),
        cfg(),
        |o| Object::Node(Box::new(o)),
        ObjectKind::Node,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<core::Service>::all(client.clone()),
        cfg(),
        |o| Object::Service(Box::new(o)),
        ObjectKind::Service,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<discovery::EndpointSlice>::all(client.clone()),
        cfg(),
        |o| Object::Slice(Box::new(o)),
        ObjectKind::Slice,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<api::IPBlock>::all(client.clone()),
        cfg(),
        |o| Object::Block(Box::new(o)),
        ObjectKind::Block,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<api::IPPool>::all(client.clone()),
        cfg(),
        |o| Object::Pool(Box::new(o)),
        ObjectKind::Pool,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<api::NetworkConfig>::all(client.clone()),
        cfg(),
        |o| Object::Network(Box::new(o)),
        ObjectKind::Network,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<core::Pod>::all(client.clone()),
        cfg(),
        |o| Object::Pod(Box::new(o)),
        ObjectKind::Pod,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<api::ProxyPolicy>::all(client.clone()),
        cfg(),
        |o| Object::Policy(Box::new(o)),
        ObjectKind::Policy,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<networking::Ingress>::all(client.clone()),
        cfg(),
        |o| Object::Ingress(Box::new(o)),
        ObjectKind::Ingress,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<networking::IngressClass>::all(client.clone()),
        cfg(),
        |o| Object::IngressClass(Box::new(o)),
        ObjectKind::IngressClass,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<core::Namespace>::all(client.clone()),
        cfg(),
        |o| Object::Namespace(Box::new(o)),
        ObjectKind::Namespace,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<networking::NetworkPolicy>::all(client.clone()),
        cfg(),
        |o| Object::NetworkPolicy(Box::new(o)),
        ObjectKind::NetworkPolicy,
        tx,
        metrics,
    );
    spawn_watch(
        Api::<ClusterNetworkPolicy>::all(client.clone()),
        cfg(),
        |o| Object::ClusterNetworkPolicy(Box::new(o)),
        ObjectKind::ClusterNetworkPolicy,
        tx,
        metrics,
    );
    // Only TLS Secrets; of those, only the ones a served Ingress names go into plans.
    spawn_watch(
        Api::<core::Secret>::all(client.clone()),
        cfg().fields("type=kubernetes.io/tls"),
        |o| Object::Secret(Box::new(o)),
        ObjectKind::Secret,
        tx,
        metrics,
    );
}

fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
    kind: ObjectKind,
    tx: &mpsc::Sender<ClusterEvent>,
    metrics: &ReconcileMetrics,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let tx = tx.clone();
    let metrics = metrics.clone();
    tokio::spawn(
        async move {
            let mut stream = watcher::watcher(api, config).default_backoff().boxed();
            let mut listing = Vec::new();
            while let Some(event) = stream.next().await {
                let message = match event {
                    Ok(Event::Init) => {
                        listing.clear();
                        continue;
                    }
                    Ok(Event::InitApply(o)) => {
                        listing.push(wrap(o));
                        continue;
                    }
                    Ok(Event::InitDone) => ClusterEvent::Listed(kind, std::mem::take(&mut listing)),
                    Ok(Event::Apply(o)) => ClusterEvent::Applied(wrap(o)),
                    Ok(Event::Delete(o)) => ClusterEvent::Deleted(wrap(o)),
                    Err(e) => {
                        metrics.error(kind.as_str());
                        warn!(error = %e, "watch failed; retrying");
                        continue;
                    }
                };
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        }
        .instrument(info_span!("watch", kind = ?kind)),
    );
}

/// The cluster as the operator knows it, and the compiler fed from it.
#[derive(Debug, Default)]
pub struct ClusterView {
    compiler: Compiler,
    policies: PolicyIndex,
    /// Services as converted, before their policy is applied, with their labels.
    services: BTreeMap<ObjectKey, (crate::plan::model::Service, BTreeMap<String, String>)>,
    known: HashMap<ObjectKind, HashSet<ObjectKey>>,
    nodes: BTreeMap<String, BTreeMap<String, String>>,
    /// Nodes as the kube-dns endpoints need them, by name.
    dns_nodes: BTreeMap<String, convert::DnsNode>,
    pools: BTreeMap<ObjectKey, api::IPPool>,
    blocks: BTreeMap<ObjectKey, api::IPBlock>,
    network: Option<api::NetworkConfig>,
    policy_objects: BTreeMap<ObjectKey, api::ProxyPolicy>,
    synced: HashSet<ObjectKind>,
    /// Ingresses as watched, for their status and Events.
    ingress_objects: BTreeMap<ObjectKey, networking::Ingress>,
    /// The address each pod holds, for IPAM (a block is given back only when no pod holds an
    /// address in it). Shared with the published inputs; copied only when it changes.
    pod_addresses: Arc<BTreeMap<ObjectKey, Ipv4Addr>>,
}

impl ClusterView {
    pub fn new() -> Self {
        Self { compiler: Compiler::new(), ..Self::default() }
    }

    pub fn handle(&mut self, event: ClusterEvent) {
        match event {
            ClusterEvent::Applied(o) => self.apply(o),
            ClusterEvent::Deleted(o) => self.delete(o),
            ClusterEvent::Listed(kind, objects) => {
                let listed: HashSet<ObjectKey> = objects.iter().map(Object::key).collect();
                let gone: Vec<ObjectKey> = self
                    .known
                    .get(&kind)
                    .map(|k| k.difference(&listed).cloned().collect())
                    .unwrap_or_default();
                for key in gone {
                    self.delete_key(kind, &key);
                }
                for o in objects {
                    self.apply(o);
                }
                self.synced.insert(kind);
            }
        }
    }

    fn apply(&mut self, object: Object) {
        let key = object.key();
        self.known.entry(object.kind()).or_default().insert(key.clone());
        match object {
            Object::Node(n) => {
                self.nodes.insert(key.name.clone(), n.labels().clone());
                match convert::dns_node(&n) {
                    Some(dns) => self.dns_nodes.insert(key.name.clone(), dns),
                    None => self.dns_nodes.remove(&key.name),
                };
                self.compiler.apply(Change::Node(convert::node(&n)));
            }
            Object::Service(s) => match convert::service(&s) {
                Some(model) => {
                    self.services.insert(key.clone(), (model, s.labels().clone()));
                    self.resolve_service(&key);
                }
                None => self.delete_key(ObjectKind::Service, &key),
            },
            Object::Slice(s) => match convert::endpoint_slice(&s) {
                Some(model) => self.compiler.apply(Change::Slice(model)),
                None => self.compiler.apply(Change::SliceDeleted(key)),
            },
            Object::Block(b) => {
                if let Some(model) = convert::block(&b) {
                    self.compiler.apply(Change::Block(model));
                }
                self.blocks.insert(key, *b);
            }
            Object::Pool(p) => {
                match convert::pool(&p) {
                    Some(model) => self.compiler.apply(Change::Pool(model)),
                    None => self.compiler.apply(Change::PoolDeleted(key.name.clone())),
                }
                self.pools.insert(key, *p);
            }
            Object::Network(n) => {
                // Only the NetworkConfig named `default` is in force (admission enforces the name).
                if n.name_any() == "default" {
                    self.compiler.apply(Change::Network(convert::network(&n)));
                    self.compiler.apply(Change::IngressSettings(super::ingress::settings(&n)));
                    self.network = Some(*n);
                }
            }
            Object::Pod(p) => {
                self.set_pod_address(&key, convert::pod_address(&p));
                match convert::pod(&p) {
                    Some(model) => self.compiler.apply(Change::Pod(model)),
                    None => self.compiler.apply(Change::PodDeleted(key)),
                }
            }
            Object::Policy(p) => {
                self.policies.upsert(Policy::from_object(&p));
                self.policy_objects.insert(key.clone(), *p);
                self.resolve_namespace(&key.namespace);
            }
            Object::Ingress(i) => {
                self.compiler.apply(Change::Ingress(super::ingress::ingress(&i)));
                self.ingress_objects.insert(key, *i);
            }
            Object::IngressClass(c) => self.compiler.apply(Change::IngressClass(super::ingress::class(&c))),
            Object::Secret(s) => match super::ingress::secret(&s) {
                Some(model) => self.compiler.apply(Change::Secret(model)),
                None => self.compiler.apply(Change::SecretDeleted(key)),
            },
            Object::Namespace(n) => self.compiler.apply(Change::Namespace(convert::namespace(&n))),
            Object::NetworkPolicy(p) => {
                self.compiler.apply(Change::NetworkPolicy(super::network_policy::network_policy(&p)))
            }
            Object::ClusterNetworkPolicy(p) => self.compiler.apply(Change::ClusterNetworkPolicy(
                super::cluster_network_policy::cluster_network_policy(&p),
            )),
        }
    }

    fn delete(&mut self, object: Object) {
        let key = object.key();
        self.delete_key(object.kind(), &key);
    }

    fn delete_key(&mut self, kind: ObjectKind, key: &ObjectKey) {
        if let Some(known) = self.known.get_mut(&kind) {
            known.remove(key);
        }
        match kind {
            ObjectKind::Node => {
                self.nodes.remove(&key.name);
                self.dns_nodes.remove(&key.name);
                self.compiler.apply(Change::NodeDeleted(key.name.clone()));
            }
            ObjectKind::Service => {
                self.services.remove(key);
                self.compiler.apply(Change::ServiceDeleted(key.clone()));
            }
            ObjectKind::Slice => self.compiler.apply(Change::SliceDeleted(key.clone())),
            ObjectKind::Block => {
                if let Some(b) = self.blocks.remove(key).and_then(|b| convert::block(&b)) {
                    self.compiler.apply(Change::BlockDeleted(b.cidr));
                }
            }
            ObjectKind::Pool => {
                self.pools.remove(key);
                self.compiler.apply(Change::PoolDeleted(key.name.clone()));
            }
            ObjectKind::Network => {
                if key.name == "default" {
                    self.network = None;
                    self.compiler.apply(Change::Network(Default::default()));
                    self.compiler.apply(Change::IngressSettings(Default::default()));
                }
            }
            ObjectKind::Pod => {
                self.set_pod_address(key, None);
                self.compiler.apply(Change::PodDeleted(key.clone()));
            }
            ObjectKind::Policy => {
                self.policies.remove(key);
                self.policy_objects.remove(key);
                self.resolve_namespace(&key.namespace);
            }
            ObjectKind::Ingress => {
                self.ingress_objects.remove(key);
                self.compiler.apply(Change::IngressDeleted(key.clone()));
            }
            ObjectKind::IngressClass => self.compiler.apply(Change::IngressClassDeleted(key.name.clone())),
            ObjectKind::Secret => self.compiler.apply(Change::SecretDeleted(key.clone())),
            ObjectKind::Namespace => self.compiler.apply(Change::NamespaceDeleted(key.name.clone())),
            ObjectKind::NetworkPolicy => self.compiler.apply(Change::NetworkPolicyDeleted(key.clone())),
            ObjectKind::ClusterNetworkPolicy => {
                self.compiler.apply(Change::ClusterNetworkPolicyDeleted(key.name.clone()))
            }
        }
    }

    fn set_pod_address(&mut self, key: &ObjectKey, address: Option<Ipv4Addr>) {
        if self.pod_addresses.get(key) != address.as_ref() {
            let addresses = Arc::make_mut(&mut self.pod_addresses);
            match address {
                Some(a) => addresses.insert(key.clone(), a),
                None => addresses.remove(key),
            };
        }
    }

    fn resolve_service(&mut self, key: &ObjectKey) {
        let Some((model, labels)) = self.services.get(key) else { return };
        let mut service = model.clone();
        service.policy = self.policies.resolve(key, labels).map(|p| p.overrides.clone()).unwrap_or_default();
        self.compiler.apply(Change::Service(service));
    }

    fn resolve_namespace(&mut self, namespace: &str) {
        let keys: Vec<ObjectKey> =
            self.services.keys().filter(|k| k.namespace == namespace).cloned().collect();
        for key in keys {
            self.resolve_service(&key);
        }
    }

    /// Whether every watched kind has completed its first list.
    pub fn synced(&self) -> bool {
        self.synced.len() >= ALL_KINDS
    }

    pub fn compiler_mut(&mut self) -> &mut Compiler {
        &mut self.compiler
    }

    pub fn status_inputs(&self) -> StatusInputs {
        StatusInputs {
            nodes: self.nodes.clone(),
            pools: self.pools.values().cloned().collect(),
            blocks: self.blocks.values().cloned().collect(),
            network: self.network.clone(),
            policies: self.policy_objects.values().cloned().collect(),
            policy_matches: self.policies.matches(self.services.iter().map(|(k, (_, labels))| (k, labels))),
            synced: self.synced(),
            dns_nodes: self.dns_nodes.values().cloned().collect(),
            pod_addresses: self.pod_addresses.clone(),
            ingress: super::ingress::IngressStatusInputs::new(
                &self.ingress_objects,
                self.compiler.ingress_report(),
            ),
        }
    }
}

/// Applies one watch event inside its own span (a child of the reconcile that batches it), so a
/// trace starts with the object change that caused it.
fn handle_traced(view: &mut ClusterView, event: ClusterEvent) {
    let (action, kind, object) = event.describe();
    info_span!("watch.event", action, kind, object = %object).in_scope(|| view.handle(event));
}

/// Owns the view: applies every waiting event, compiles once, publishes to the store.
pub async fn run(
    mut events: mpsc::Receiver<ClusterEvent>,
    store: Arc<PlanStore>,
    status: watch::Sender<StatusInputs>,
    generation: prometheus_client::metrics::gauge::Gauge,
) {
    let mut view = ClusterView::new();
    while let Some(first) = events.recv().await {
        let span = info_span!("reconcile", events = tracing::field::Empty, updates = tracing::field::Empty);
        let _enter = span.enter();
        let mut count = 1;
        handle_traced(&mut view, first);
        while let Ok(next) = events.try_recv() {
            handle_traced(&mut view, next);
            count += 1;
        }
        // Until every kind has finished its first list the view is a part of the cluster: a plan
        // compiled from it would remove what is not listed yet from the agents (Service rules,
        // VXLAN, nginx, pod addresses). Nothing is published meanwhile, so agents that connect
        // get no answer and keep their last plan (fail-static); the first compile sees it all.
        if !view.synced() {
            span.record("events", count);
            debug!(events = count, listed = view.synced.len(), "waiting for every kind's first list");
            continue;
        }
        let updates = info_span!("plan.compile").in_scope(|| view.compiler_mut().flush());
        span.record("events", count);
        span.record("updates", updates.len());
        debug!(events = count, updates = updates.len(), "compiled");
        let gen_now = store.publish(updates, weft_api::telemetry::inject_current());
        generation.set(gen_now as i64);
        status.send_replace(view.status_inputs());
    }
}
