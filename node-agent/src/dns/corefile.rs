//! The Corefile of the node's CoreDNS, rendered purely from the plan.
//!
//! Every value that reaches the text is parsed first and written back from the parsed form
//! (addresses, ports, numbers) or checked against a strict alphabet (domain names, paths): a plan
//! that would need escaping is refused with an error that says which field is wrong, so no
//! user-supplied text ever lands in the Corefile as it came.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use weft_api::plan as pb;

/// How the node serves DNS besides what the plan says: where it listens and the credentials of
/// the kubernetes plugin (from the agent's flags, not the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// The node's address: DNS on port 53 (UDP and TCP), health, ready and metrics on theirs.
    pub node_ip: Ipv4Addr,
    /// The kubeconfig CoreDNS's kubernetes plugin reads Services, EndpointSlices, Namespaces
    /// (and Pods) with.
    pub kubeconfig: PathBuf,
    pub health_port: u16,
    pub ready_port: u16,
    pub metrics_port: u16,
}

/// What is wrong with the plan's DNS settings (the message is the NACK a person reads).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorefileError {
    #[error("{field}: {value:?} is not a lower-case DNS name such as cluster.local")]
    Domain { field: String, value: String },
    #[error(
        "{field}: {value:?} is neither an IP address, IP:port, [IPv6]:port nor an absolute path of a resolv.conf file"
    )]
    Upstream { field: String, value: String },
    #[error("{field}: {value:?} is not an IP address, IP:port or [IPv6]:port")]
    Server { field: String, value: String },
    #[error("{field}: {value:?} is not an absolute path made of letters, digits, '.', '_', '-' and '/'")]
    Path { field: String, value: String },
    #[error("{field} is empty: at least one is needed")]
    Empty { field: String },
    #[error("dns.stubDomains: {domain} is listed twice")]
    DuplicateStub { domain: String },
    #[error(
        "dns.stubDomains: {domain} is the cluster domain or one of its reverse zones; it cannot go elsewhere"
    )]
    StubShadowsCluster { domain: String },
    #[error("{field}: {value:?} is the cluster DNS itself; forwarding there would loop")]
    Loop { field: String, value: String },
    #[error("dns.cacheTTLSeconds: {0} is more than 3600")]
    CacheTtl(u32),
    #[error("dns.podRecords: {0:?} is not one of Disabled, Insecure, Verified")]
    PodRecords(String),
    #[error("dns.serviceIP: {0:?} is not an IP address")]
    ServiceIp(String),
    #[error("{field}: {value:?} is not an IPv4 CIDR")]
    Cidr { field: String, value: String },
}

/// TTL of the answers the kubernetes plugin gives (its default, written out): short, so a
/// changed Service is seen within seconds even by clients that cache.
const CLUSTER_RECORD_TTL: u32 = 5;

/// The Corefile for `dns` (reverse zones from `net`) served as `serve` says.
pub fn render(
    dns: &pb::DnsSettings,
    net: Option<&pb::NetworkSettings>,
    serve: &ServeOptions,
) -> Result<String, CorefileError> {
    let domain = dns_name("dns.clusterDomain", &dns.cluster_domain)?;
    if !dns.service_ip.is_empty() && dns.service_ip.parse::<IpAddr>().is_err() {
        return Err(CorefileError::ServiceIp(dns.service_ip.clone()));
    }
    let pods = match dns.pod_records.as_str() {
        "Disabled" => "disabled",
        "" | "Insecure" => "insecure",
        "Verified" => "verified",
        other => return Err(CorefileError::PodRecords(other.to_string())),
    };
    if dns.cache_ttl_seconds > 3600 {
        return Err(CorefileError::CacheTtl(dns.cache_ttl_seconds));
    }
    if dns.upstreams.is_empty() {
        return Err(CorefileError::Empty { field: "dns.upstreams".into() });
    }
    let upstreams = dns
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| upstream(&format!("dns.upstreams[{i}]"), u))
        .collect::<Result<Vec<_>, _>>()?;
    // Forwarding to the cluster DNS itself is a loop (CoreDNS's loop plugin would stop it).
    let own = [dns.service_ip.clone(), serve.node_ip.to_string()];
    if let Some((i, u)) = dns.upstreams.iter().enumerate().find(|(_, u)| {
        let addr = u.parse::<SocketAddr>().map(|a| (a.ip().to_string(), a.port()));
        let addr = addr.or_else(|_| u.parse::<IpAddr>().map(|ip| (ip.to_string(), 53)));
        addr.is_ok_and(|(ip, port)| port == 53 && own.contains(&ip))
    }) {
        return Err(CorefileError::Loop { field: format!("dns.upstreams[{i}]"), value: u.clone() });
    }
    let mut reverse = BTreeSet::new();
    if let Some(net) = net {
        let cidrs = std::iter::once(("networkSettings.serviceCIDR", &net.service_cidr))
            .filter(|(_, c)| !c.is_empty())
            .chain(net.pod_cidrs.iter().map(|c| ("networkSettings.podCIDRs", c)));
        for (field, cidr) in cidrs {
            let parsed: Ipv4Net =
                cidr.parse().map_err(|_| CorefileError::Cidr { field: field.into(), value: cidr.clone() })?;
            reverse.insert(reverse_zone(parsed));
        }
    }
    let reverse = drop_covered(reverse);
    let mut stubs = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, stub) in dns.stub_domains.iter().enumerate() {
        let name = dns_name(&format!("dns.stubDomains[{i}].domain"), &stub.domain)?;
        if !seen.insert(name.clone()) {
            return Err(CorefileError::DuplicateStub { domain: name });
        }
        if name == domain || reverse.contains(&name) {
            return Err(CorefileError::StubShadowsCluster { domain: name });
        }
        if stub.servers.is_empty() {
            return Err(CorefileError::Empty { field: format!("dns.stubDomains[{i}].servers") });
        }
        let servers = stub
            .servers
            .iter()
            .enumerate()
            .map(|(j, s)| {
                server(s).ok_or_else(|| CorefileError::Server {
                    field: format!("dns.stubDomains[{i}].servers[{j}]"),
                    value: s.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        stubs.push((name, servers));
    }
    let kubeconfig = safe_path("--dns-kubeconfig", &serve.kubeconfig)?;

    let ip = serve.node_ip;
    let mut zones = vec![domain.clone()];
    zones.extend(reverse.iter().cloned());
    let mut out = String::new();
    let _ = writeln!(out, "# Rendered by weft-agent from its plan (NetworkConfig dns); do not edit.");
    let _ = writeln!(out, ".:53 {{");
    let _ = writeln!(out, "    bind {ip}");
    let _ = writeln!(out, "    errors");
    let _ = writeln!(out, "    health {ip}:{}", serve.health_port);
    let _ = writeln!(out, "    ready {ip}:{}", serve.ready_port);
    let _ = writeln!(out, "    kubernetes {} {{", zones.join(" "));
    let _ = writeln!(out, "        kubeconfig {kubeconfig}");
    let _ = writeln!(out, "        pods {pods}");
    let _ = writeln!(out, "        fallthrough in-addr.arpa ip6.arpa");
    let _ = writeln!(out, "        ttl {CLUSTER_RECORD_TTL}");
    let _ = writeln!(out, "    }}");
    let _ = writeln!(out, "    prometheus {ip}:{}", serve.metrics_port);
    let _ = writeln!(out, "    forward . {}", upstreams.join(" "));
    if dns.cache_ttl_seconds > 0 {
        // No negative caching for the cluster zone: a new Service answers at once.
        let _ =
            writeln!(out, "    cache {} {{\n        disable denial {domain}\n    }}", dns.cache_ttl_seconds);
    }
    let _ = writeln!(out, "    loop");
    let _ = writeln!(out, "    loadbalance");
    let _ = writeln!(out, "}}");
    for (name, servers) in stubs {
        let _ = writeln!(out, "{name}:53 {{");
        let _ = writeln!(out, "    bind {ip}");
        let _ = writeln!(out, "    errors");
        let _ = writeln!(out, "    prometheus {ip}:{}", serve.metrics_port);
        let _ = writeln!(out, "    forward . {}", servers.join(" "));
        if dns.cache_ttl_seconds > 0 {
            let _ = writeln!(out, "    cache {}", dns.cache_ttl_seconds);
        }
        let _ = writeln!(out, "}}");
    }
    Ok(out)
}

/// A lower-case DNS name (labels of 1–63 letters, digits and inner hyphens; 253 at most),
/// returned without a trailing dot.
fn dns_name(field: &str, value: &str) -> Result<String, CorefileError> {
    let name = value.strip_suffix('.').unwrap_or(value);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(CorefileError::Domain { field: field.into(), value: value.into() });
    }
    Ok(name.to_string())
}

/// An IP, IP:port or [IPv6]:port, written back canonically.
fn server(value: &str) -> Option<String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return (addr.port() != 0).then(|| addr.to_string());
    }
    value.parse::<IpAddr>().ok().map(|ip| ip.to_string())
}

fn upstream(field: &str, value: &str) -> Result<String, CorefileError> {
    if let Some(s) = server(value) {
        return Ok(s);
    }
    if value.starts_with('/') {
        return safe_path(field, Path::new(value));
    }
    Err(CorefileError::Upstream { field: field.into(), value: value.into() })
}

/// An absolute path without `..` whose characters need no quoting in a Corefile.
fn safe_path(field: &str, path: &Path) -> Result<String, CorefileError> {
    let text = path.to_string_lossy();
    let ok = text.starts_with('/')
        && text.len() <= 4096
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && !text.split('/').any(|part| part == "..");
    if !ok {
        return Err(CorefileError::Path { field: field.into(), value: text.into_owned() });
    }
    Ok(text.into_owned())
}

/// The in-addr.arpa zone holding `net`, at the octet boundary at or above its prefix.
fn reverse_zone(net: Ipv4Net) -> String {
    let octets = usize::from(net.prefix_len() / 8);
    let mut labels: Vec<String> = net.network().octets()[..octets].iter().map(u8::to_string).collect();
    labels.reverse();
    labels.push("in-addr.arpa".into());
    labels.join(".")
}

/// Drops zones inside another zone of the set (a /8 pool makes its /16 service zone redundant).
fn drop_covered(zones: BTreeSet<String>) -> BTreeSet<String> {
    zones
        .iter()
        .filter(|z| !zones.iter().any(|other| other != *z && z.ends_with(&format!(".{other}"))))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve() -> ServeOptions {
        ServeOptions {
            node_ip: Ipv4Addr::new(172, 18, 1, 11),
            kubeconfig: PathBuf::from("/var/lib/weft/dns/kubeconfig"),
            health_port: 9154,
            ready_port: 9155,
            metrics_port: 9153,
        }
    }

    fn defaults() -> pb::DnsSettings {
        pb::DnsSettings {
            cluster_domain: "cluster.local".into(),
            service_ip: "10.96.0.10".into(),
            upstreams: vec!["/etc/resolv.conf".into()],
            stub_domains: vec![],
            cache_ttl_seconds: 30,
            pod_records: "Insecure".into(),
        }
    }

    fn net() -> pb::NetworkSettings {
        pb::NetworkSettings {
            service_cidr: "10.96.0.0/16".into(),
            pod_cidrs: vec!["10.244.0.0/16".into(), "10.245.8.0/22".into()],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_serve_the_cluster_zone_and_its_reverse_zones_and_forward_the_rest() {
        insta::assert_snapshot!(render(&defaults(), Some(&net()), &serve()).expect("render"), @r"
        # Rendered by weft-agent from its plan (NetworkConfig dns); do not edit.
        .:53 {
            bind 172.18.1.11
            errors
            health 172.18.1.11:9154
            ready 172.18.1.11:9155
            kubernetes cluster.local 244.10.in-addr.arpa 245.10.in-addr.arpa 96.10.in-addr.arpa {
                kubeconfig /var/lib/weft/dns/kubeconfig
                pods insecure
                fallthrough in-addr.arpa ip6.arpa
                ttl 5
            }
            prometheus 172.18.1.11:9153
            forward . /etc/resolv.conf
            cache 30 {
                disable denial cluster.local
            }
            loop
            loadbalance
        }
        ");
    }

    #[test]
    fn stub_domains_get_their_own_server_blocks_and_addresses_are_canonical() {
        let mut dns = defaults();
        dns.upstreams = vec!["172.18.1.241".into(), "172.18.1.242:5353".into(), "[fd00::53]:53".into()];
        dns.stub_domains = vec![
            pb::StubDomain { domain: "corp.example".into(), servers: vec!["10.0.0.53:5300".into()] },
            pb::StubDomain {
                domain: "lab.test.".into(),
                servers: vec!["fd00::1".into(), "10.0.0.54".into()],
            },
        ];
        insta::assert_snapshot!(render(&dns, None, &serve()).expect("render"), @r"
        # Rendered by weft-agent from its plan (NetworkConfig dns); do not edit.
        .:53 {
            bind 172.18.1.11
            errors
            health 172.18.1.11:9154
            ready 172.18.1.11:9155
            kubernetes cluster.local {
                kubeconfig /var/lib/weft/dns/kubeconfig
                pods insecure
                fallthrough in-addr.arpa ip6.arpa
                ttl 5
            }
            prometheus 172.18.1.11:9153
            forward . 172.18.1.241 172.18.1.242:5353 [fd00::53]:53
            cache 30 {
                disable denial cluster.local
            }
            loop
            loadbalance
        }
        corp.example:53 {
            bind 172.18.1.11
            errors
            prometheus 172.18.1.11:9153
            forward . 10.0.0.53:5300
            cache 30
        }
        lab.test:53 {
            bind 172.18.1.11
            errors
            prometheus 172.18.1.11:9153
            forward . fd00::1 10.0.0.54
            cache 30
        }
        ");
    }

    #[test]
    fn verified_pods_and_no_cache() {
        let mut dns = defaults();
        dns.pod_records = "Verified".into();
        dns.cache_ttl_seconds = 0;
        dns.cluster_domain = "k8s.example.org".into();
        let text = render(&dns, Some(&net()), &serve()).expect("render");
        insta::assert_snapshot!(text, @r"
        # Rendered by weft-agent from its plan (NetworkConfig dns); do not edit.
        .:53 {
            bind 172.18.1.11
            errors
            health 172.18.1.11:9154
            ready 172.18.1.11:9155
            kubernetes k8s.example.org 244.10.in-addr.arpa 245.10.in-addr.arpa 96.10.in-addr.arpa {
                kubeconfig /var/lib/weft/dns/kubeconfig
                pods verified
                fallthrough in-addr.arpa ip6.arpa
                ttl 5
            }
            prometheus 172.18.1.11:9153
            forward . /etc/resolv.conf
            loop
            loadbalance
        }
        ");
        dns.pod_records = "Disabled".into();
        assert!(render(&dns, None, &serve()).expect("render").contains("pods disabled\n"));
    }

    #[test]
    fn a_wide_pool_covers_the_narrower_reverse_zones() {
        let net = pb::NetworkSettings {
            service_cidr: "10.96.0.0/12".into(),
            pod_cidrs: vec!["10.0.0.0/8".into(), "192.168.7.0/24".into()],
            ..Default::default()
        };
        let text = render(&defaults(), Some(&net), &serve()).expect("render");
        assert!(text.contains("kubernetes cluster.local 10.in-addr.arpa 7.168.192.in-addr.arpa {"), "{text}");
    }

    fn error(dns: &pb::DnsSettings) -> String {
        render(dns, Some(&net()), &serve()).expect_err("must be refused").to_string()
    }

    #[test]
    fn bad_values_are_refused_with_the_field_and_value() {
        let mut dns = defaults();
        dns.cluster_domain = "cluster.local {\n}\n. {".into();
        assert_eq!(
            error(&dns),
            "dns.clusterDomain: \"cluster.local {\\n}\\n. {\" is not a lower-case DNS name such as cluster.local"
        );
        let mut dns = defaults();
        dns.upstreams = vec!["8.8.8.8".into(), "dns.google".into()];
        assert_eq!(
            error(&dns),
            "dns.upstreams[1]: \"dns.google\" is neither an IP address, IP:port, [IPv6]:port nor an absolute path of a resolv.conf file"
        );
        dns.upstreams = vec!["/etc/resolv.conf }".into()];
        assert!(error(&dns).starts_with("dns.upstreams[0]: \"/etc/resolv.conf }\" is not an absolute path"));
        dns.upstreams = vec!["/etc/../root/x".into()];
        assert!(error(&dns).starts_with("dns.upstreams[0]"));
        dns.upstreams = vec![];
        assert_eq!(error(&dns), "dns.upstreams is empty: at least one is needed");
        dns.upstreams = vec!["10.0.0.53".into(), "10.96.0.10".into()];
        assert_eq!(
            error(&dns),
            "dns.upstreams[1]: \"10.96.0.10\" is the cluster DNS itself; forwarding there would loop"
        );
        dns.upstreams = vec!["172.18.1.11:53".into()];
        assert!(error(&dns).starts_with("dns.upstreams[0]: \"172.18.1.11:53\" is the cluster DNS itself"));
        dns.upstreams = vec!["172.18.1.11:5353".into()];
        assert!(render(&dns, None, &serve()).is_ok(), "another port of the node is another server");
        let mut dns = defaults();
        dns.stub_domains =
            vec![pb::StubDomain { domain: "corp.example".into(), servers: vec!["10.0.0.1:99999".into()] }];
        assert_eq!(
            error(&dns),
            "dns.stubDomains[0].servers[0]: \"10.0.0.1:99999\" is not an IP address, IP:port or [IPv6]:port"
        );
        dns.stub_domains[0].servers = vec!["/etc/resolv.conf".into()];
        assert!(error(&dns).starts_with("dns.stubDomains[0].servers[0]"));
        dns.stub_domains[0].servers = vec![];
        assert_eq!(error(&dns), "dns.stubDomains[0].servers is empty: at least one is needed");
        dns.stub_domains = vec![
            pb::StubDomain { domain: "a.example".into(), servers: vec!["10.0.0.1".into()] },
            pb::StubDomain { domain: "a.example.".into(), servers: vec!["10.0.0.2".into()] },
        ];
        assert_eq!(error(&dns), "dns.stubDomains: a.example is listed twice");
        dns.stub_domains =
            vec![pb::StubDomain { domain: "cluster.local".into(), servers: vec!["10.0.0.1".into()] }];
        assert_eq!(
            error(&dns),
            "dns.stubDomains: cluster.local is the cluster domain or one of its reverse zones; it cannot go elsewhere"
        );
        let mut dns = defaults();
        dns.pod_records = "Sometimes".into();
        assert_eq!(error(&dns), "dns.podRecords: \"Sometimes\" is not one of Disabled, Insecure, Verified");
        let mut dns = defaults();
        dns.cache_ttl_seconds = 3601;
        assert_eq!(error(&dns), "dns.cacheTTLSeconds: 3601 is more than 3600");
        let mut dns = defaults();
        dns.service_ip = "10.96.0.300".into();
        assert_eq!(error(&dns), "dns.serviceIP: \"10.96.0.300\" is not an IP address");
        let mut bad_net = net();
        bad_net.pod_cidrs.push("10.1.0.0/33".into());
        assert_eq!(
            render(&defaults(), Some(&bad_net), &serve()).expect_err("refused").to_string(),
            "networkSettings.podCIDRs: \"10.1.0.0/33\" is not an IPv4 CIDR"
        );
        let mut odd = serve();
        odd.kubeconfig = PathBuf::from("/etc/weft/dns kubeconfig");
        assert!(
            render(&defaults(), None, &odd)
                .expect_err("refused")
                .to_string()
                .starts_with("--dns-kubeconfig: \"/etc/weft/dns kubeconfig\" is not an absolute path")
        );
    }

    proptest::proptest! {
        /// Whatever the plan holds, a rendered Corefile has balanced braces and no line that did
        /// not come from the template (no injected directive).
        #[test]
        fn no_input_breaks_out_of_the_template(
            domain in "\\PC{0,40}",
            upstream in "\\PC{0,40}",
            stub in "\\PC{0,40}",
            server in "\\PC{0,40}",
        ) {
            let mut dns = defaults();
            dns.cluster_domain = domain;
            dns.upstreams = vec![upstream];
            dns.stub_domains = vec![pb::StubDomain { domain: stub, servers: vec![server] }];
            if let Ok(text) = render(&dns, Some(&net()), &serve()) {
                proptest::prop_assert_eq!(text.matches('{').count(), text.matches('}').count());
                for line in text.lines() {
                    proptest::prop_assert!(
                        line.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
                        "unexpected character in {:?}", line
                    );
                    proptest::prop_assert!(!line.contains('#') || line.starts_with("# Rendered"));
                }
            }
        }
    }
}
