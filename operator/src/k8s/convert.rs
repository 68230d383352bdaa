//! Kubernetes objects → the compiler's model. Fields the compiler doesn't need are dropped here,
//! so the compiler never sees Kubernetes types.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use weft_api::v1alpha1::{self as api, network_config as nc};

use crate::plan::model::{self, ObjectKey, ProxyOverrides};

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A node as the kube-dns endpoints need it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DnsNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub zone: Option<String>,
    pub ready: bool,
}

/// The node's first IPv4 InternalIP, zone and Ready condition; None without an address.
pub fn dns_node(node: &core::Node) -> Option<DnsNode> {
    let status = node.status.as_ref()?;
    let ip = status
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())?;
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    Some(DnsNode { name: node.name_any(), ip, zone: node.labels().get(ZONE_LABEL).cloned(), ready })
}

pub fn node(node: &core::Node) -> model::Node {
    let ip = node.status.as_ref().and_then(|s| s.addresses.as_ref()).and_then(|addrs| {
        addrs.iter().find(|a| a.type_ == "InternalIP").and_then(|a| a.address.parse().ok())
    });
    model::Node {
        name: node.name_any(),
        ip,
        zone: node.labels().get(ZONE_LABEL).cloned(),
        labels: node.labels().clone(),
    }
}

pub fn protocol(p: Option<&str>) -> model::Protocol {
    match p {
        Some("UDP") => model::Protocol::Udp,
        Some("SCTP") => model::Protocol::Sctp,
        _ => model::Protocol::Tcp,
    }
}

fn ipv4s<'a>(ips: impl IntoIterator<Item = &'a String>) -> Vec<Ipv4Addr> {
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// Services with either label are not for the default proxy, as kube-proxy's informers select
/// them out: `service-proxy-name` hands a Service to another proxy, `headless` marks one without
/// a virtual IP.
pub const NOT_FOR_THIS_PROXY_LABELS: [&str; 2] =
    ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"];

/// A Service without its ProxyPolicy (see [`crate::k8s::policy`]); `None` for Services the proxy
/// does not handle (ExternalName, [`NOT_FOR_THIS_PROXY_LABELS`]).
pub fn service(svc: &core::Service) -> Option<model::Service> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName")
        || NOT_FOR_THIS_PROXY_LABELS.iter().any(|l| svc.labels().contains_key(*l))
    {
        return None;
    }
    let cluster_ip = spec.cluster_ip.as_deref().filter(|ip| *ip != "None").and_then(|ip| ip.parse().ok());
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| model::ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref()),
            port: u16::try_from(p.port).unwrap_or(0),
            node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
            target_port: match &p.target_port {
                Some(IntOrString::String(name)) => model::TargetPort::Name(name.clone()),
                Some(IntOrString::Int(n)) => model::TargetPort::Number(u16::try_from(*n).unwrap_or(0)),
                None => model::TargetPort::Number(u16::try_from(p.port).unwrap_or(0)),
            },
        })
        .collect();
    let load_balancer_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.as_ref()?.parse().ok()).collect())
        .unwrap_or_default();
    let affinity_timeout_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(10800)
    });
    Some(model::Service {
        key: ObjectKey::new(svc.namespace().unwrap_or_default(), svc.name_any()),
        cluster_ip,
        external_ips: ipv4s(spec.external_ips.iter().flatten()),
        load_balancer_ips,
        ports,
        affinity_timeout_seconds,
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port: spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        traffic_distribution: match spec.traffic_distribution.as_deref() {
            Some("PreferClose" | "PreferSameZone") => model::TopologyMode::PreferSameZone,
            Some("PreferSameNode") => model::TopologyMode::PreferSameNode,
            _ => model::TopologyMode::None,
        },
        policy: ProxyOverrides::default(),
    })
}

/// `None` for slices that name no Service or are not IPv4.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Option<model::EndpointSlice> {
    if slice.address_type != "IPv4" {
        return None;
    }
    let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .map(|p| model::SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref()),
            port: p.port.and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|e| {
            let conditions = e.conditions.as_ref();
            // Per the EndpointSlice API, nil ready/serving mean true and nil terminating false.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            Some(model::Endpoint {
                ip: e.addresses.first()?.parse().ok()?,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node: e.node_name.clone(),
                zone: e.zone.clone(),
                hint_zones: e
                    .hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
            })
        })
        .collect();
    Some(model::EndpointSlice {
        key: ObjectKey::new(slice.namespace().unwrap_or_default(), slice.name_any()),
        service,
        ports,
        endpoints,
        trigger_unix_ms: slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis()),
    })
}

/// Set by the EndpointSlice controllers on every change they make (and by hand-written slices
/// that want their changes measured).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// `None` for pods that hold no pod address: not scheduled yet, host network, or finished.
pub fn pod(pod: &core::Pod) -> Option<model::Pod> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    if !pod_holds_address(pod) {
        return None;
    }
    let named_ports = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(model::NamedPort {
                name: p.name.clone()?,
                protocol: protocol(p.protocol.as_deref()),
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect();
    Some(model::Pod {
        key: ObjectKey::new(pod.namespace().unwrap_or_default(), pod.name_any()),
        uid: pod.uid().unwrap_or_default(),
        node,
        labels: pod.labels().clone(),
        ip: pod_address(pod),
        named_ports,
    })
}

pub fn namespace(ns: &core::Namespace) -> model::Namespace {
    model::Namespace { name: ns.name_any(), labels: ns.labels().clone() }
}

/// The IPv4 address a running pod holds from Weft's IPAM: none for host-network or finished pods
/// (their address is the node's, or given back).
pub fn pod_address(pod: &core::Pod) -> Option<std::net::Ipv4Addr> {
    if !pod_holds_address(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|a| a.ip.as_str());
    status.pod_ip.as_deref().into_iter().chain(listed).find_map(|ip| ip.parse().ok())
}

/// Neither host-network nor finished: the pod has (or will get) an address of its own.
fn pod_holds_address(pod: &core::Pod) -> bool {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let finished =
        matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    !host_network && !finished
}

pub fn block(block: &api::IPBlock) -> Option<model::Block> {
    Some(model::Block {
        cidr: block.spec.cidr.parse().ok()?,
        pool: block.spec.pool.clone(),
        node: block.spec.node.clone(),
    })
}

pub fn pool(pool: &api::IPPool) -> Option<model::Pool> {
    Some(model::Pool {
        name: pool.name_any(),
        cidr: pool.spec.cidr.parse().ok()?,
        nat_outgoing: pool.spec.nat_outgoing,
        disabled: pool.spec.disabled,
    })
}

pub fn network(config: &api::NetworkConfig) -> model::NetworkSettings {
    let s = &config.spec;
    model::NetworkSettings {
        vxlan: s.pod_network.encapsulation == nc::Encapsulation::Vxlan,
        mtu: s.pod_network.mtu,
        masquerade: s.pod_network.masquerade,
        non_masquerade_cidrs: s.pod_network.non_masquerade_cidrs.clone(),
        service_cidr: s.service_network.service_cidr.clone(),
        node_port_range: (s.service_network.node_port_range.min, s.service_network.node_port_range.max),
        node_port_addresses: s.service_network.node_port_addresses.clone(),
        nftables: s.proxy.mode == nc::ProxyMode::Nftables,
        masquerade_bit: s.proxy.masquerade_bit,
        cni_conf_dir: s.cni.conf_dir.clone(),
        cni_bin_dir: s.cni.bin_dir.clone(),
        cni_conflist_name: s.cni.conflist_name.clone(),
        cni_chained_plugins: s.cni.chained_plugins.clone(),
        cluster_domain: s.dns.cluster_domain.clone(),
        dns_service_ip: s.dns.service_ip.clone(),
        dns_upstreams: s.dns.upstreams.clone(),
        dns_stub_domains: s
            .dns
            .stub_domains
            .iter()
            .map(|d| model::StubDomain { domain: d.domain.clone(), servers: d.servers.clone() })
            .collect(),
        dns_cache_ttl_seconds: s.dns.cache_ttl_seconds,
        dns_pod_records: format!("{:?}", s.dns.pod_records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(labels: &[(&str, &str)], traffic_distribution: Option<&str>) -> core::Service {
        let mut svc = core::Service {
            spec: Some(core::ServiceSpec {
                cluster_ip: Some("10.96.0.20".into()),
                traffic_distribution: traffic_distribution.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        };
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("default".into());
        svc.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        svc
    }

    #[test]
    fn services_handed_to_another_proxy_or_marked_headless_are_left_out() {
        assert!(service(&svc(&[("app", "web")], None)).is_some());
        assert!(service(&svc(&[("service.kubernetes.io/service-proxy-name", "foo-bar")], None)).is_none());
        assert!(service(&svc(&[("service.kubernetes.io/headless", "")], None)).is_none());
    }

    #[test]
    fn traffic_distribution_names_its_topology() {
        let mode = |t| service(&svc(&[], t)).map(|s| s.traffic_distribution);
        assert_eq!(mode(None), Some(model::TopologyMode::None));
        assert_eq!(mode(Some("PreferClose")), Some(model::TopologyMode::PreferSameZone));
        assert_eq!(mode(Some("PreferSameZone")), Some(model::TopologyMode::PreferSameZone));
        assert_eq!(mode(Some("PreferSameNode")), Some(model::TopologyMode::PreferSameNode));
        assert_eq!(mode(Some("SomethingNew")), Some(model::TopologyMode::None));
    }
}
