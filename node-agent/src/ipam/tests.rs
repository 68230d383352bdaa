#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proptest::prelude::*;

use super::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn key(i: usize) -> AttachmentKey {
    AttachmentKey::new(format!("c{i}"), "eth0")
}

fn pod(i: usize) -> PodRef {
    PodRef { namespace: "default".into(), name: format!("p{i}"), uid: format!("uid-{i}") }
}

#[test]
fn every_address_of_a_block_is_usable_then_exhaustion_says_what_to_do() {
    let mut core = IpamCore::new("n1");
    core.set_blocks([net("10.244.0.0/26")]);
    let ips: BTreeSet<Ipv4Addr> = (0..64).map(|i| core.allocate(&key(i), &pod(i)).unwrap().0.ip).collect();
    assert_eq!(ips.len(), 64);
    assert!(ips.contains(&"10.244.0.0".parse().unwrap()));
    assert!(ips.contains(&"10.244.0.63".parse().unwrap()));
    let err = core.allocate(&key(64), &pod(64)).unwrap_err();
    assert!(matches!(err, IpamError::Exhausted { size: 64, .. }));
    assert_eq!(
        err.to_string(),
        "node n1: all 64 addresses of its blocks 10.244.0.0/26 are in use; the operator hands out \
         another block when one is free in an IPPool"
    );
    assert_eq!(
        core.usage(),
        vec![BlockUsage { cidr: net("10.244.0.0/26"), used: 64, size: 64, active: true }]
    );
}

#[test]
fn add_is_idempotent_per_attachment() {
    let mut core = IpamCore::new("n1");
    core.set_blocks([net("10.244.0.0/30")]);
    let (a, new_a) = core.allocate(&key(1), &pod(1)).unwrap();
    let (again, new_again) = core.allocate(&key(1), &pod(1)).unwrap();
    assert!(new_a && !new_again);
    assert_eq!(a, again);
    let other_if = AttachmentKey::new("c1", "net1");
    assert_ne!(core.allocate(&other_if, &pod(1)).unwrap().0.ip, a.ip);
}

#[test]
fn no_block_yet_is_its_own_error() {
    let mut core = IpamCore::new("n1");
    let err = core.allocate(&key(1), &pod(1)).unwrap_err();
    assert!(matches!(err, IpamError::NoBlocks { .. }), "{err}");
    assert!(!core.ready());
}

#[test]
fn a_released_address_is_not_handed_out_again_at_once() {
    let mut core = IpamCore::new("n1");
    core.set_blocks([net("10.0.0.0/29")]);
    let first = core.allocate(&key(0), &pod(0)).unwrap().0.ip;
    core.release(&key(0)).unwrap();
    assert!(core.release(&key(0)).is_none(), "unknown key on DEL is fine");
    let second = core.allocate(&key(1), &pod(1)).unwrap().0.ip;
    assert_ne!(first, second);
    // After wrapping around, it is reused.
    let rest: Vec<Ipv4Addr> = (2..9).map(|i| core.allocate(&key(i), &pod(i)).unwrap().0.ip).collect();
    assert!(rest.contains(&first));
}

#[test]
fn removed_blocks_keep_live_allocations_and_hand_out_nothing() {
    let mut core = IpamCore::new("n1");
    core.set_blocks([net("10.0.0.0/31")]);
    let a = core.allocate(&key(0), &pod(0)).unwrap().0;
    core.set_blocks([net("10.0.1.0/31")]);
    assert_eq!(core.get(&key(0)), Some(&a), "still held");
    let b = core.allocate(&key(1), &pod(1)).unwrap().0;
    let c = core.allocate(&key(2), &pod(2)).unwrap().0;
    assert!(net("10.0.1.0/31").contains(&b.ip) && net("10.0.1.0/31").contains(&c.ip));
    assert!(matches!(core.allocate(&key(3), &pod(3)), Err(IpamError::Exhausted { size: 2, .. })));
    assert_eq!(
        core.usage(),
        vec![
            BlockUsage { cidr: net("10.0.1.0/31"), used: 2, size: 2, active: true },
            BlockUsage { cidr: net("10.0.0.0/31"), used: 1, size: 2, active: false },
        ]
    );
    core.release(&key(0));
    assert_eq!(core.usage().len(), 1, "a removed block disappears once empty");
}

#[test]
fn gc_releases_what_is_not_valid() {
    let mut core = IpamCore::new("n1");
    core.set_blocks([net("10.0.0.0/28")]);
    for i in 0..5 {
        core.allocate(&key(i), &pod(i)).unwrap();
    }
    let valid: BTreeSet<AttachmentKey> = [key(1), key(3), key(99)].into();
    let released: BTreeSet<AttachmentKey> = core.gc(&valid).into_iter().map(|(k, _)| k).collect();
    assert_eq!(released, [key(0), key(2), key(4)].into());
    assert_eq!(core.len(), 2);
}

#[test]
fn blocks_from_plan_parses_and_rejects() {
    use weft_api::plan::{NodePlan, PodBlock};
    let plan = |cidr: &str| NodePlan {
        blocks: vec![PodBlock { cidr: cidr.into(), pool: "default".into(), nat_outgoing: true }],
        ..Default::default()
    };
    assert_eq!(blocks_from_plan(&plan("10.244.0.64/26")).unwrap(), vec![net("10.244.0.64/26")]);
    let err = blocks_from_plan(&plan("fd00::/64")).unwrap_err();
    assert!(err.to_string().contains("not an IPv4 CIDR"), "{err}");
}

#[test]
fn checkpoint_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Allocator::open(dir.path(), "n1").unwrap();
    a.set_blocks(vec![net("10.0.0.0/29")]).unwrap();
    let got: Vec<Allocation> = (0..3).map(|i| a.allocate(&key(i), &pod(i)).unwrap()).collect();
    a.release(&key(1)).unwrap();
    drop(a);
    let b = Allocator::open(dir.path(), "n1").unwrap();
    assert_eq!(b.core().get(&key(0)), Some(&got[0]));
    assert_eq!(b.core().get(&key(1)), None);
    assert_eq!(b.core().get(&key(2)), Some(&got[2]));
    assert_eq!(b.core().blocks(), &[net("10.0.0.0/29")]);
    assert_eq!(b.core().get(&key(0)).unwrap().pod, pod(0));
}

#[test]
fn corrupt_or_duplicated_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CHECKPOINT_FILE), b"{not json").unwrap();
    let err = Allocator::open(dir.path(), "n1").unwrap_err();
    assert!(matches!(err, IpamError::CorruptCheckpoint { .. }), "{err}");

    let dup = serde_json::json!({
        "version": 1, "node": "n1", "blocks": ["10.0.0.0/29"],
        "allocations": [
            {"container_id": "a", "ifname": "eth0", "ip": "10.0.0.1", "block": "10.0.0.0/29"},
            {"container_id": "b", "ifname": "eth0", "ip": "10.0.0.1", "block": "10.0.0.0/29"},
        ]
    });
    std::fs::write(dir.path().join(CHECKPOINT_FILE), dup.to_string()).unwrap();
    let err = Allocator::open(dir.path(), "n1").unwrap_err();
    assert!(err.to_string().contains("held by both"), "{err}");
}

#[test]
fn a_failed_save_hands_out_nothing_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut a = Allocator::open(&state, "n1").unwrap();
    a.set_blocks(vec![net("10.0.0.0/29")]).unwrap();
    let held = a.allocate(&key(0), &pod(0)).unwrap();
    // The state dir becomes a file: every save now fails.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&state, b"").unwrap();
    let before = a.core().clone();
    assert!(matches!(a.allocate(&key(1), &pod(1)), Err(IpamError::WriteCheckpoint { .. })));
    assert!(matches!(a.release(&key(0)), Err(IpamError::WriteCheckpoint { .. })));
    assert_eq!(a.core(), &before);
    // An idempotent ADD of a held address needs no save.
    assert_eq!(a.allocate(&key(0), &pod(0)).unwrap(), held);
}

#[test]
fn handle_reports_status_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let h = IpamHandle::open(dir.path(), "n1").unwrap();
    assert!(h.status().is_err());
    h.set_blocks(vec![net("10.0.0.0/30")]).unwrap();
    h.set_mtu(1450);
    assert!(h.status().is_ok());
    h.allocate(&key(0), &pod(0)).unwrap();
    assert_eq!(h.usage()[0].used, 1);
    assert_eq!(h.mtu(), 1450);
}

#[test]
fn pods_gone_from_the_node_are_released_after_a_second_observation() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut a = Allocator::open(dir.path(), "n1").unwrap();
    a.set_blocks(vec![net("10.0.0.0/28")]).unwrap();
    for i in 0..4 {
        a.allocate(&key(i), &pod(i)).unwrap();
    }
    // An attachment the runtime did not name a pod for is never judged by pods.
    a.allocate(&key(9), &PodRef::default()).unwrap();
    let gap = Duration::from_secs(30);
    let t0 = Instant::now();
    // Pod 1 is listed by UID only, pod 2 by name only (another UID: matched by name), 0 and 3 are
    // gone.
    let live = vec![
        PodRef { uid: "uid-1".into(), ..PodRef::default() },
        PodRef { namespace: "default".into(), name: "p2".into(), uid: String::new() },
    ];
    assert!(a.observe_pods(&live, t0, gap).unwrap().is_empty(), "first observation releases nothing");
    assert!(a.observe_pods(&live, t0 + Duration::from_secs(5), gap).unwrap().is_empty(), "too soon");
    // Pod 3 reappears (the operator's list lagged): forgiven.
    let mut live_again = live.clone();
    live_again.push(pod(3));
    let released: Vec<AttachmentKey> =
        a.observe_pods(&live_again, t0 + gap, gap).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(released, vec![key(0)]);
    // Pod 3 disappears again: a fresh first observation, not a release.
    assert!(a.observe_pods(&live, t0 + gap * 2, gap).unwrap().is_empty());
    let released: Vec<AttachmentKey> =
        a.observe_pods(&live, t0 + gap * 3, gap).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(released, vec![key(3)]);
    let left: BTreeSet<AttachmentKey> = a.core().allocations().map(|(k, _)| k.clone()).collect();
    assert_eq!(left, [key(1), key(2), key(9)].into());
}

#[test]
fn subscribers_see_every_saved_change() {
    let dir = tempfile::tempdir().unwrap();
    let h = IpamHandle::open(dir.path(), "n1").unwrap();
    let mut rx = h.subscribe();
    assert!(!rx.has_changed().unwrap());
    h.set_blocks(vec![net("10.0.0.0/30")]).unwrap();
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();
    h.allocate(&key(0), &pod(0)).unwrap();
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();
    h.allocate(&key(0), &pod(0)).unwrap();
    h.release(&key(5)).unwrap();
    assert!(!rx.has_changed().unwrap(), "an idempotent ADD or an unknown DEL changes nothing");
    h.release(&key(0)).unwrap();
    assert!(rx.has_changed().unwrap());
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum Op {
    Add(usize, usize),
    Del(usize, usize),
    Restart,
    SetBlocks(Vec<bool>),
    Gc(Vec<(usize, usize)>),
}

const BLOCKS: [&str; 3] = ["10.1.0.0/30", "10.1.0.4/31", "10.1.1.0/30"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..12usize, 0..2usize).prop_map(|(c, i)| Op::Add(c, i)),
        3 => (0..12usize, 0..2usize).prop_map(|(c, i)| Op::Del(c, i)),
        1 => Just(Op::Restart),
        1 => proptest::collection::vec(any::<bool>(), 3).prop_map(Op::SetBlocks),
        1 => proptest::collection::vec((0..12usize, 0..2usize), 0..8).prop_map(Op::Gc),
    ]
}

fn k(c: usize, i: usize) -> AttachmentKey {
    AttachmentKey::new(format!("container-{c}"), format!("eth{i}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random ADD/DEL/GC/block changes/restarts against a model: the allocator holds exactly the
    /// model's attachments (no leak), no address twice (no duplicate), a repeated ADD returns the
    /// same address, a new one comes from an active block, and exhaustion happens only when every
    /// active address is taken.
    #[test]
    fn never_duplicates_nor_leaks(ops in proptest::collection::vec(op(), 1..60)) {
        // On tmpfs when there is one: the logic is under test here, not the disk's fsync.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let mut alloc = Allocator::open(dir.path(), "n1").unwrap();
        alloc.set_blocks(vec![net(BLOCKS[0])]).unwrap();
        let mut active: Vec<Ipv4Net> = vec![net(BLOCKS[0])];
        let mut model: BTreeMap<AttachmentKey, Ipv4Addr> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Add(c, i) => {
                    let key = k(c, i);
                    match alloc.allocate(&key, &PodRef::default()) {
                        Ok(a) => {
                            if let Some(old) = model.get(&key) {
                                prop_assert_eq!(*old, a.ip, "idempotent ADD");
                            } else {
                                prop_assert!(active.iter().any(|b| b.contains(&a.ip)), "from an active block");
                                prop_assert!(!model.values().any(|ip| *ip == a.ip), "duplicate {}", a.ip);
                                model.insert(key, a.ip);
                            }
                        }
                        Err(IpamError::Exhausted { .. }) => {
                            prop_assert!(!model.contains_key(&key));
                            let free = active.iter().flat_map(|b| b.hosts_all()).any(|ip| !model.values().any(|m| *m == ip));
                            prop_assert!(!free, "exhausted with a free address");
                        }
                        Err(IpamError::NoBlocks { .. }) => prop_assert!(active.is_empty()),
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Del(c, i) => {
                    let key = k(c, i);
                    let released = alloc.release(&key).unwrap();
                    prop_assert_eq!(released.map(|a| a.ip), model.remove(&key));
                }
                Op::Restart => {
                    drop(alloc);
                    alloc = Allocator::open(dir.path(), "n1").unwrap();
                }
                Op::SetBlocks(mask) => {
                    active = BLOCKS.iter().zip(mask).filter(|(_, on)| *on).map(|(b, _)| net(b)).collect();
                    alloc.set_blocks(active.clone()).unwrap();
                }
                Op::Gc(valid) => {
                    let valid: BTreeSet<AttachmentKey> = valid.into_iter().map(|(c, i)| k(c, i)).collect();
                    alloc.gc(&valid).unwrap();
                    model.retain(|key, _| valid.contains(key));
                }
            }
            let held: BTreeMap<AttachmentKey, Ipv4Addr> =
                alloc.core().allocations().map(|(k, a)| (k.clone(), a.ip)).collect();
            prop_assert_eq!(&held, &model, "allocator and model agree");
            let distinct: BTreeSet<Ipv4Addr> = held.values().copied().collect();
            prop_assert_eq!(distinct.len(), held.len(), "no duplicate");
            let used: u64 = alloc.core().usage().iter().map(|u| u.used).sum();
            prop_assert_eq!(used as usize, held.len(), "usage counts every allocation once");
        }
        // And what is on disk is what is in memory.
        let reloaded = Allocator::open(dir.path(), "n1").unwrap();
        prop_assert_eq!(reloaded.core(), alloc.core());
    }
}

/// `hosts_all` for an `Ipv4Net`: every address, as IPAM counts them.
trait AllAddresses {
    fn hosts_all(&self) -> Vec<Ipv4Addr>;
}

impl AllAddresses for Ipv4Net {
    fn hosts_all(&self) -> Vec<Ipv4Addr> {
        (u32::from(self.network())..=u32::from(self.broadcast())).map(Ipv4Addr::from).collect()
    }
}
