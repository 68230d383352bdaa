//! The protocol between `weft-cni` and the agent over the agent's unix socket: one JSON request
//! line, one JSON response line, then the connection closes.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The agent's socket when the conflist names none.
pub const DEFAULT_SOCKET: &str = "/var/lib/weft/cni.sock";

/// The pod's gateway: a link-local address the host answers for on every pod's veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The largest request the server reads (a GC lists every attachment on the node).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// An address for an attachment: its existing one when it has one.
    Add {
        container_id: String,
        ifname: String,
        netns: String,
        #[serde(default)]
        pod_namespace: String,
        #[serde(default)]
        pod_name: String,
        #[serde(default)]
        pod_uid: String,
    },
    /// Releases an attachment's address; unknown is fine.
    Del { container_id: String, ifname: String },
    /// The address an attachment holds (an error when it holds none).
    Check { container_id: String, ifname: String },
    /// Releases every address whose attachment is not listed.
    Gc { valid: Vec<Attachment> },
    /// Whether the agent can serve an ADD now.
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// For Add and Check.
    Address {
        ip: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        /// The pod network's MTU from the plan; 0 when unknown.
        mtu: u32,
    },
    Released {
        /// False when the attachment held no address.
        released: bool,
    },
    Collected {
        released: usize,
    },
    Ready,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Every address of the node's blocks is in use.
    Exhausted,
    /// The node has no block yet (no plan, or no IPPool selects it).
    NoBlocks,
    /// Check: the attachment holds no address.
    UnknownAttachment,
    /// The request did not parse.
    BadRequest,
    /// The agent could not do it (the checkpoint could not be written...).
    Internal,
}
