//! The plan protocol (`api/proto/weft/plan/v1/plan.proto`) and the few rules both ends share:
//! how a resource is named and versioned, and how a node's plan version follows from its
//! resources.

#[allow(clippy::all, missing_docs, missing_debug_implementations)]
mod generated {
    tonic::include_proto!("weft.plan.v1");
}

pub use generated::*;

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64;

/// The largest plan message either end decodes. gRPC's default (4 MiB) is a snapshot of about
/// 10,000 Services with their endpoints and TLS Secrets; a larger one would never arrive, and the
/// agent would keep reconnecting. 128 MiB holds several hundred thousand Services.
pub const MAX_MESSAGE_BYTES: usize = 128 << 20;

/// Identifies a resource within a node's plan. The kind is kept as its wire value, so an agent
/// that does not know a newer kind still holds it and computes the same plan version as the
/// operator (an older agent must survive a newer operator during a rolling upgrade).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: i32,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self { kind: kind as i32, name: name.into() }
    }

    /// The kind, or `Unspecified` for one this build does not know.
    pub fn kind(&self) -> Kind {
        Kind::try_from(self.kind).unwrap_or(Kind::Unspecified)
    }

    /// The key's contribution to a plan version together with a resource version: plan versions
    /// combine these by XOR, so one resource changing updates the plan version in O(1).
    pub fn mix(&self, version: u64) -> u64 {
        let mut buf = Vec::with_capacity(self.name.len() + 12);
        buf.extend_from_slice(&self.kind.to_le_bytes());
        buf.extend_from_slice(self.name.as_bytes());
        buf.extend_from_slice(&version.to_le_bytes());
        xxh3_64(&buf)
    }
}

impl Resource {
    /// Builds a resource from its payload message; the version is a hash of kind, name and
    /// payload, so every operator replica computes the same version for the same content.
    pub fn encode(kind: Kind, name: impl Into<String>, payload: &impl prost::Message) -> Self {
        let name = name.into();
        let payload = Bytes::from(payload.encode_to_vec());
        let version = content_version(kind, &name, &payload);
        Self { kind: kind as i32, name, version, payload }
    }

    pub fn key(&self) -> ResourceKey {
        ResourceKey { kind: self.kind, name: self.name.clone() }
    }

    pub fn reference(&self) -> ResourceRef {
        ResourceRef { kind: self.kind, name: self.name.clone(), version: self.version }
    }

    /// Decodes the payload as the message its kind says it holds.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.payload.clone())
    }
}

impl ResourceRef {
    pub fn key(&self) -> ResourceKey {
        ResourceKey { kind: self.kind, name: self.name.clone() }
    }
}

fn content_version(kind: Kind, name: &str, payload: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(payload.len() + name.len() + 8);
    buf.extend_from_slice(&(kind as i32).to_le_bytes());
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    buf.extend_from_slice(payload);
    // Zero is reserved for "nothing".
    xxh3_64(&buf).max(1)
}

/// The plan version of a set of resources, given the XOR of their [`ResourceKey::mix`] values.
/// Never zero, which means "no plan".
pub fn plan_version(mixed: u64) -> u64 {
    xxh3_64(&mixed.to_le_bytes()).max(1)
}

/// The plan version of a complete set of resources (the slow path, for agents and tests).
pub fn plan_version_of<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> u64 {
    plan_version(resources.into_iter().fold(0, |acc, r| acc ^ r.key().mix(r.version)))
}

/// Endpoint flag helpers (the `EndpointFlag` enum holds bit values).
impl Endpoint {
    pub fn has(&self, flag: EndpointFlag) -> bool {
        self.flags & flag as u32 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_content_addressed() {
        let a = Resource::encode(Kind::Peer, "n1", &PeerNode { name: "n1".into(), ..Default::default() });
        let b = Resource::encode(Kind::Peer, "n1", &PeerNode { name: "n1".into(), ..Default::default() });
        let c = Resource::encode(Kind::Peer, "n1", &PeerNode { name: "n2".into(), ..Default::default() });
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
    }

    #[test]
    fn a_kind_unknown_to_this_build_still_counts_in_the_plan_version() {
        let mut future = Resource::encode(Kind::Peer, "x", &PeerNode::default());
        future.kind = 99;
        assert_eq!(future.key().kind(), Kind::Unspecified);
        let mut other = future.clone();
        other.kind = 98;
        assert_ne!(plan_version_of([&future]), plan_version_of([&other]));
    }

    #[test]
    fn plan_version_is_order_independent_and_incremental() {
        let rs: Vec<_> =
            (0..5).map(|i| Resource::encode(Kind::Peer, format!("n{i}"), &PeerNode::default())).collect();
        let forward = plan_version_of(&rs);
        let backward = plan_version_of(rs.iter().rev());
        assert_eq!(forward, backward);
        // Removing one resource incrementally gives the version of the set without it.
        let all = rs.iter().fold(0, |acc, r| acc ^ r.key().mix(r.version));
        let without_last = all ^ rs[4].key().mix(rs[4].version);
        assert_eq!(plan_version(without_last), plan_version_of(&rs[..4]));
        assert_ne!(forward, plan_version_of(&rs[..4]));
    }
}
