//! The plan the agent holds: what it received from the operator, persisted so a restarted agent
//! resumes where it was instead of starting over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::files::{Access, Durability};
use weft_api::plan::{self as pb, Kind, Resource, ResourceKey, plan_message::Body};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("plan message has no body")]
    Empty,
    #[error(
        "plan version mismatch after applying the message: expected {expected:016x}, computed {computed:016x}"
    )]
    VersionMismatch { expected: u64, computed: u64 },
    #[error("cannot read the saved plan {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the saved plan {path} is corrupt: {source}")]
    Decode { path: PathBuf, source: prost::DecodeError },
    #[error("cannot save the plan to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanState {
    /// 0: no plan yet.
    pub version: u64,
    pub generation: u64,
    pub resources: BTreeMap<ResourceKey, Resource>,
}

/// Which resource kinds a message changed; programmers run only when theirs did.
pub type ChangedKinds = std::collections::BTreeSet<Kind>;

impl PlanState {
    /// The state after `message`, and the kinds it changed. A "current" message changes nothing.
    /// The result is checked against the version the operator announced, so a diverged agent
    /// notices and asks for a snapshot instead of programming a wrong plan.
    pub fn apply(&self, message: &pb::PlanMessage) -> Result<(PlanState, ChangedKinds), PlanError> {
        let mut next = self.clone();
        let mut changed = ChangedKinds::new();
        match message.body.as_ref().ok_or(PlanError::Empty)? {
            Body::Current(_) => {}
            Body::Snapshot(snapshot) => {
                let fresh: BTreeMap<ResourceKey, Resource> =
                    snapshot.resources.iter().map(|r| (r.key(), r.clone())).collect();
                for (key, old) in &self.resources {
                    if fresh.get(key).is_none_or(|r| r.version != old.version) {
                        changed.insert(key.kind());
                    }
                }
                for (key, new) in &fresh {
                    if self.resources.get(key).is_none_or(|r| r.version != new.version) {
                        changed.insert(key.kind());
                    }
                }
                next.resources = fresh;
            }
            Body::Delta(delta) => {
                for removal in &delta.removals {
                    if next.resources.remove(&removal.key()).is_some() {
                        changed.insert(removal.kind());
                    }
                }
                for upsert in &delta.upserts {
                    let key = upsert.key();
                    if next.resources.get(&key).is_none_or(|r| r.version != upsert.version) {
                        changed.insert(key.kind());
                        next.resources.insert(key, upsert.clone());
                    }
                }
            }
        }
        let computed = pb::plan_version_of(next.resources.values());
        if computed != message.version {
            return Err(PlanError::VersionMismatch { expected: message.version, computed });
        }
        next.version = message.version;
        next.generation = message.generation;
        Ok((next, changed))
    }

    pub fn references(&self) -> Vec<pb::ResourceRef> {
        self.resources.values().map(Resource::reference).collect()
    }

    /// Resources of one kind, in name order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Resource> {
        self.resources.iter().filter(move |(k, _)| k.kind() == kind).map(|(_, r)| r)
    }

    fn file(dir: &Path) -> PathBuf {
        dir.join("plan.pb")
    }

    /// Loads the saved plan; a missing file is an empty plan.
    pub fn load(dir: &Path) -> Result<Self, PlanError> {
        let path = Self::file(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(PlanError::Read { path, source }),
        };
        let saved =
            pb::PlanMessage::decode(bytes.as_slice()).map_err(|source| PlanError::Decode { path, source })?;
        let resources = match saved.body {
            Some(Body::Snapshot(s)) => s.resources.into_iter().map(|r| (r.key(), r)).collect(),
            _ => BTreeMap::new(),
        };
        Ok(Self { version: saved.version, generation: saved.generation, resources })
    }

    /// Saves atomically (temp file + rename), so a crash leaves the old or the new plan. Not
    /// fsynced: the file is a cache of what the operator holds for this node (lost or damaged by
    /// a power cut, the agent asks for a snapshot), and it is written on every plan message.
    pub fn save(&self, dir: &Path) -> Result<(), PlanError> {
        let message = pb::PlanMessage {
            version: self.version,
            generation: self.generation,
            body: Some(Body::Snapshot(pb::Snapshot {
                resources: self.resources.values().cloned().collect(),
            })),
            trace_context: Default::default(),
        };
        let path = Self::file(dir);
        crate::files::replace(&path, &message.encode_to_vec(), Durability::Cached, Access::Private)
            .map_err(|source| PlanError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, ip: &str) -> Resource {
        Resource::encode(
            Kind::Peer,
            name,
            &pb::PeerNode { name: name.into(), node_ip: ip.into(), blocks: vec![] },
        )
    }

    fn message(resources: &[Resource], body: Body) -> pb::PlanMessage {
        pb::PlanMessage {
            version: pb::plan_version_of(resources),
            generation: 1,
            body: Some(body),
            trace_context: Default::default(),
        }
    }

    #[test]
    fn a_snapshot_replaces_and_a_delta_patches_reporting_what_changed() {
        let (a, b, b2) = (peer("a", "172.18.0.1"), peer("b", "172.18.0.2"), peer("b", "172.18.0.22"));
        let snapshot =
            message(&[a.clone(), b.clone()], Body::Snapshot(pb::Snapshot { resources: vec![a.clone(), b] }));
        let (state, changed) = PlanState::default().apply(&snapshot).expect("snapshot");
        assert_eq!(state.resources.len(), 2);
        assert_eq!(changed, ChangedKinds::from([Kind::Peer]));

        let delta = message(
            std::slice::from_ref(&b2),
            Body::Delta(pb::Delta { upserts: vec![b2.clone()], removals: vec![a.reference()] }),
        );
        let (next, changed) = state.apply(&delta).expect("delta");
        assert_eq!(next.resources.values().cloned().collect::<Vec<_>>(), vec![b2]);
        assert_eq!(changed, ChangedKinds::from([Kind::Peer]));
        assert_eq!(next.version, delta.version);

        let current = pb::PlanMessage { body: Some(Body::Current(pb::Current {})), ..delta };
        let (same, changed) = next.apply(&current).expect("current");
        assert_eq!(same, next);
        assert!(changed.is_empty());
    }

    #[test]
    fn a_delta_that_does_not_fit_the_plan_held_is_refused() {
        let a = peer("a", "172.18.0.1");
        // The operator believes the agent also holds "b": the announced version includes it.
        let mut wrong = message(&[a.clone(), peer("b", "172.18.0.2")], Body::Delta(pb::Delta::default()));
        wrong.body = Some(Body::Delta(pb::Delta { upserts: vec![a], removals: vec![] }));
        assert!(matches!(PlanState::default().apply(&wrong), Err(PlanError::VersionMismatch { .. })));
    }

    #[test]
    fn the_plan_survives_a_restart() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let a = peer("a", "172.18.0.1");
        let snapshot =
            message(std::slice::from_ref(&a), Body::Snapshot(pb::Snapshot { resources: vec![a.clone()] }));
        let (state, _) = PlanState::default().apply(&snapshot).expect("snapshot");
        state.save(dir.path()).expect("save");
        assert_eq!(PlanState::load(dir.path()).expect("load"), state);
        // The plan holds the TLS keys of the node's Ingresses: its owner (root) alone reads it.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("plan.pb")).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(PlanState::load(&dir.path().join("missing")).expect("empty"), PlanState::default());
        std::fs::write(dir.path().join("plan.pb"), b"\xff\xff\xff").expect("write");
        assert!(matches!(PlanState::load(dir.path()), Err(PlanError::Decode { .. })));
    }
}
