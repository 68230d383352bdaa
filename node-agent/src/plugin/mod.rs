//! `weft-cni`, the CNI plugin (spec 1.1): thin by design. It asks the agent for the pod's address
//! over the agent's unix socket and does the interface work through netlink.
//!
//! Every failure is a CNI error result with the spec's code and a message a person can act on;
//! the plugin-specific codes are the `CODE_*` constants.

pub mod client;
pub mod netlink;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use rscni_plugin::cni::Cni;
use rscni_plugin::error::Error;
use rscni_plugin::types::{Args, CNIResult, Interface, IpConfig, NetConf, Route};

use crate::cni::protocol::{Attachment, DEFAULT_SOCKET, ErrorKind, Request, Response};
use client::ClientError;
use netlink::{NetError, PodNet};

/// Every address of the node's blocks is in use.
pub const CODE_EXHAUSTED: u32 = 100;
/// The agent could not serve the request (its checkpoint could not be written...).
pub const CODE_AGENT: u32 = 101;
/// The interfaces, address or routes could not be set up.
pub const CODE_INTERFACE: u32 = 102;
/// CHECK found the pod's network not as ADD left it.
pub const CODE_CHECK: u32 = 103;

/// The plugin's settings in its conflist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// The agent's socket (`"socket"`, default [`DEFAULT_SOCKET`]).
    pub socket: PathBuf,
    /// The pod interface's MTU (`"mtu"`); absent: the agent's, else the kernel's default.
    pub mtu: Option<u32>,
}

impl PluginConfig {
    pub fn from_netconf(conf: &NetConf) -> Result<Self, Error> {
        let socket = match conf.custom.get("socket") {
            None => PathBuf::from(DEFAULT_SOCKET),
            Some(serde_json::Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
            Some(other) => {
                return Err(Error::InvalidNetworkConfig(format!(
                    "weft-cni's \"socket\" must be the absolute path of the weft agent's socket, \
                     like \"{DEFAULT_SOCKET}\"; got {other}"
                )));
            }
        };
        let mtu = match conf.custom.get("mtu") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(0) => None,
                Some(m @ 68..=65535) => u32::try_from(m).ok(),
                _ => {
                    return Err(Error::InvalidNetworkConfig(format!(
                        "weft-cni's \"mtu\" must be a number from 68 to 65535 (or 0 for the \
                         default); got {v}"
                    )));
                }
            },
        };
        Ok(Self { socket, mtu })
    }
}

/// The pod's namespace, name and UID from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`); empty when absent.
pub fn pod_from_cni_args(args: Option<&str>) -> (String, String, String) {
    let (mut namespace, mut name, mut uid) = (String::new(), String::new(), String::new());
    for pair in args.unwrap_or_default().split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) => namespace = v.to_string(),
            Some(("K8S_POD_NAME", v)) => name = v.to_string(),
            Some(("K8S_POD_UID", v)) => uid = v.to_string(),
            _ => {}
        }
    }
    (namespace, name, uid)
}

/// The plugin.
#[derive(Debug, Default)]
pub struct WeftCni;

fn required<'a, T: std::ops::Deref<Target = str>>(value: Option<&'a T>, var: &str) -> Result<&'a str, Error> {
    value.map(|v| &**v).ok_or_else(|| Error::missing_env(&[var]))
}

fn open_netns(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|e| {
        Error::InvalidNetNS(format!(
            "cannot open the pod's network namespace {}: {e}; the pod sandbox is gone or \
             CNI_NETNS is wrong",
            path.display()
        ))
    })
}

fn client_error(e: ClientError) -> Error {
    match e {
        ClientError::Connect { .. } | ClientError::Exchange { .. } => Error::TryAgainLater(e.to_string()),
        ClientError::Decode { .. } => {
            Error::Custom(CODE_AGENT, "Unexpected answer from the weft agent".into(), e.to_string())
        }
    }
}

fn agent_error(kind: ErrorKind, message: String) -> Error {
    match kind {
        ErrorKind::Exhausted => {
            Error::Custom(CODE_EXHAUSTED, "No free pod address on this node".into(), message)
        }
        ErrorKind::NoBlocks => Error::TryAgainLater(message),
        ErrorKind::UnknownAttachment => Error::NotExist(message),
        ErrorKind::BadRequest | ErrorKind::Internal => {
            Error::Custom(CODE_AGENT, "The weft agent could not serve the request".into(), message)
        }
    }
}

fn unexpected(response: &Response) -> Error {
    Error::Custom(
        CODE_AGENT,
        "Unexpected answer from the weft agent".into(),
        format!("unexpected answer {response:?}: are weft-cni and weft-agent the same version?"),
    )
}

fn net_error(e: &NetError) -> Error {
    Error::Custom(CODE_INTERFACE, "Cannot set up the pod's network interface".into(), e.to_string())
}

fn call(config: &PluginConfig, request: &Request) -> Result<Response, Error> {
    match client::call(&config.socket, request).map_err(client_error)? {
        Response::Error { kind, message } => Err(agent_error(kind, message)),
        response => Ok(response),
    }
}

struct Lease {
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: u32,
}

fn lease(response: Response) -> Result<Lease, Error> {
    match response {
        Response::Address { ip, prefix_len: 32, gateway, mtu } => Ok(Lease { ip, gateway, mtu }),
        other => Err(unexpected(&other)),
    }
}

impl Cni for WeftCni {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let container_id = required(args.container_id(), "CNI_CONTAINERID")?;
        let ifname = required(args.ifname(), "CNI_IFNAME")?;
        let netns_path = args.netns().ok_or_else(|| Error::missing_env(&["CNI_NETNS"]))?;
        // Before asking for an address: a missing namespace must not cost one.
        let netns = open_netns(netns_path)?;
        let (pod_namespace, pod_name, pod_uid) = pod_from_cni_args(args.args());
        let lease = lease(call(
            &config,
            &Request::Add {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
                netns: netns_path.display().to_string(),
                pod_namespace,
                pod_name,
                pod_uid,
            },
        )?)?;
        let host_ifname = netlink::host_veth_name(container_id, ifname);
        let mtu = config.mtu.or((lease.mtu > 0).then_some(lease.mtu));
        let net = PodNet {
            host_ifname: &host_ifname,
            pod_ifname: ifname,
            netns: &netns,
            ip: lease.ip,
            gateway: lease.gateway,
            mtu,
        };
        let plumbed = match netlink::setup(&net) {
            Ok(p) => p,
            Err(e) => {
                // Leave nothing behind: the runtime may never call DEL for a failed ADD.
                let _ = netlink::teardown(&host_ifname);
                let _ = client::call(
                    &config.socket,
                    &Request::Del { container_id: container_id.to_string(), ifname: ifname.to_string() },
                );
                return Err(net_error(&e));
            }
        };
        let sandbox = netns_path.display().to_string();
        Ok(CNIResult {
            interfaces: vec![
                Interface {
                    name: plumbed.host_ifname,
                    mac: netlink::format_mac(&plumbed.host_mac),
                    mtu: plumbed.mtu,
                    sandbox: None,
                    socket_path: None,
                    pci_id: None,
                },
                Interface {
                    name: ifname.to_string(),
                    mac: netlink::format_mac(&plumbed.pod_mac),
                    mtu: plumbed.mtu,
                    sandbox: Some(sandbox),
                    socket_path: None,
                    pci_id: None,
                },
            ],
            ips: vec![IpConfig {
                interface: Some(1),
                address: IpNet::V4(Ipv4Net::from(lease.ip)),
                gateway: Some(IpAddr::V4(lease.gateway)),
            }],
            routes: vec![Route {
                dst: IpNet::V4(Ipv4Net::default()),
                gw: Some(IpAddr::V4(lease.gateway)),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            }],
            dns: args.config().dns.clone(),
        })
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let container_id = required(args.container_id(), "CNI_CONTAINERID")?;
        let ifname = required(args.ifname(), "CNI_IFNAME")?;
        // Deleting the host end deletes the pod end; a pod whose namespace is gone has neither.
        match netlink::teardown(&netlink::host_veth_name(container_id, ifname)) {
            Ok(_) => {}
            Err(e) if netlink::is_gone(&e) => {}
            Err(e) => return Err(net_error(&e)),
        }
        match call(
            &config,
            &Request::Del { container_id: container_id.to_string(), ifname: ifname.to_string() },
        )? {
            Response::Released { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let container_id = required(args.container_id(), "CNI_CONTAINERID")?;
        let ifname = required(args.ifname(), "CNI_IFNAME")?;
        let netns_path = args.netns().ok_or_else(|| Error::missing_env(&["CNI_NETNS"]))?;
        let netns = open_netns(netns_path)?;
        let lease = lease(call(
            &config,
            &Request::Check { container_id: container_id.to_string(), ifname: ifname.to_string() },
        )?)?;
        let host_ifname = netlink::host_veth_name(container_id, ifname);
        let net = PodNet {
            host_ifname: &host_ifname,
            pod_ifname: ifname,
            netns: &netns,
            ip: lease.ip,
            gateway: lease.gateway,
            mtu: None,
        };
        netlink::check(&net).map_err(|e| match e {
            NetError::Mismatch(m) => {
                Error::Custom(CODE_CHECK, "The pod's network is not as set up".into(), m)
            }
            e => net_error(&e),
        })
    }

    fn status(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        match client::call(&config.socket, &Request::Status) {
            Ok(Response::Ready) => Ok(()),
            Ok(Response::Error { message, .. }) => Err(Error::PluginNotAvailable(message)),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(Error::PluginNotAvailable(e.to_string())),
        }
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        // Without the list every attachment would count as gone: every pod of the node would
        // lose its address and veth. The spec says the runtime passes it; refuse otherwise.
        let Some(attachments) = args.config().valid_attachments.as_ref() else {
            return Err(Error::InvalidNetworkConfig(
                "GC without cni.dev/valid-attachments: refused, it would release every pod's address on this node"
                    .into(),
            ));
        };
        let valid: Vec<Attachment> = attachments
            .iter()
            .map(|a| Attachment { container_id: a.container_id.clone(), ifname: a.ifname.clone() })
            .collect();
        let keep: BTreeSet<String> =
            valid.iter().map(|a| netlink::host_veth_name(&a.container_id, &a.ifname)).collect();
        // Both halves run even when one fails, as the spec asks; the first error is reported.
        let veths = netlink::delete_host_veths_except(&keep).map(|_| ()).map_err(|e| net_error(&e));
        let addresses = match call(&config, &Request::Gc { valid }) {
            Ok(Response::Collected { .. }) => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        };
        veths.and(addresses)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn conf(extra: serde_json::Value) -> NetConf {
        let mut v = serde_json::json!({ "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni" });
        if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = PluginConfig::from_netconf(&conf(serde_json::json!({}))).unwrap();
        assert_eq!(c, PluginConfig { socket: DEFAULT_SOCKET.into(), mtu: None });
        let c =
            PluginConfig::from_netconf(&conf(serde_json::json!({ "socket": "/run/w.sock", "mtu": 1450 })))
                .unwrap();
        assert_eq!(c, PluginConfig { socket: "/run/w.sock".into(), mtu: Some(1450) });
        for bad in [
            serde_json::json!({ "socket": "rel.sock" }),
            serde_json::json!({ "mtu": 10 }),
            serde_json::json!({ "mtu": "x" }),
        ] {
            let err = PluginConfig::from_netconf(&conf(bad)).unwrap_err();
            assert_eq!(u32::from(&err), 7, "{err}");
        }
    }

    #[test]
    fn pod_identity_comes_from_cni_args() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1";
        assert_eq!(pod_from_cni_args(Some(args)), ("shop".into(), "web-0".into(), "u-1".into()));
        assert_eq!(pod_from_cni_args(None), Default::default());
    }

    #[test]
    fn agent_errors_map_to_cni_codes() {
        assert_eq!(u32::from(&agent_error(ErrorKind::Exhausted, "x".into())), CODE_EXHAUSTED);
        assert_eq!(u32::from(&agent_error(ErrorKind::NoBlocks, "x".into())), 11);
        assert_eq!(u32::from(&agent_error(ErrorKind::UnknownAttachment, "x".into())), 3);
        let unreachable = client::call(Path::new("/nonexistent/weft.sock"), &Request::Status).unwrap_err();
        let err = client_error(unreachable);
        assert_eq!(u32::from(&err), 11);
        assert!(err.to_string().contains("is weft-agent running on this node?"), "{err}");
    }
}
