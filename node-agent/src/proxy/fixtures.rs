//! What both backends' unit tests build their plans from.

use std::net::Ipv4Addr;

use weft_api::plan::{self as pb, Kind, Resource};

use super::model::{Context, ProxyPlan};

pub const LOCAL: u32 = pb::EndpointFlag::EndpointLocal as u32;

/// The settings of the tests' node (iptables mode; the nftables tests change only the mode).
pub fn settings() -> pb::NetworkSettings {
    pb::NetworkSettings {
        pod_cidrs: vec!["10.244.0.0/16".into()],
        service_cidr: "10.96.0.0/16".into(),
        masquerade_bit: 14,
        ..Default::default()
    }
}

/// The context does not depend on the proxy mode.
pub fn ctx() -> Context {
    Context::from_settings(&settings()).expect("context")
}

pub fn ip(s: &str) -> u32 {
    u32::from(s.parse::<Ipv4Addr>().expect("ip"))
}

/// A plan's resources: the settings and the Services.
pub fn resources(settings: &pb::NetworkSettings, services: &[(&str, pb::Service)]) -> Vec<Resource> {
    let mut resources = vec![Resource::encode(Kind::Network, "network", settings)];
    resources.extend(services.iter().map(|(name, svc)| Resource::encode(Kind::Service, *name, svc)));
    resources
}

pub fn proxy_plan(resources: &[Resource]) -> ProxyPlan<'_> {
    ProxyPlan::from_resources(resources).expect("proxy plan")
}
