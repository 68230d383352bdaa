//! `kubelet::cleanup_state` tears down what a crashed pod runner left: the recorded processes
//! (only when pid and start time still match), the pod network namespace and its /etc/netns
//! files, and the state file. No cluster needed; needs root (network namespaces).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use weft_e2e::kubelet::{PodRecord, ProcRecordRef, cleanup_state, pod_exec_command};

fn start_time(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit(')').next().context("stat")?;
    rest.split_whitespace().nth(19).context("starttime")?.parse().context("starttime")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.trim_start().starts_with('Z')))
}

#[test]
fn cleanup_state_removes_leftovers_of_a_crashed_runner() -> Result<()> {
    // A made-up UID gives a unique namespace name for this run.
    let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 0xfeed_u64);
    let netns = weft_e2e::kubelet::pod_netns_name(&uid);
    let status = Command::new("ip").args(["netns", "add", &netns]).status()?;
    if !status.success() {
        bail!("ip netns add {netns} failed (this test needs root)");
    }
    std::fs::create_dir_all(Path::new("/etc/netns").join(&netns))?;
    std::fs::write(Path::new("/etc/netns").join(&netns).join("resolv.conf"), "nameserver 10.96.0.10\n")?;

    // A "container": a process group leader inside the pod namespace, as the runner starts them.
    let mut cmd = pod_exec_command(&netns, "leftover", &["sleep".to_string(), "1000".to_string()]);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.stdin(Stdio::null()).spawn()?;
    let pid = child.id();
    // Wait until the exec chain reached `sleep` (its namespace is the pod's).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() != "sleep" {
        if Instant::now() > deadline {
            bail!("the test process did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let state = tempfile::tempdir()?;
    let rec = PodRecord {
        namespace: "ns".into(),
        name: "p".into(),
        uid: uid.clone(),
        netns: netns.clone(),
        hostname: "leftover".into(),
        processes: BTreeMap::from([("c".to_string(), ProcRecordRef { pid, start_time: start_time(pid)? })]),
        ..Default::default()
    };
    std::fs::create_dir_all(state.path().join("pods"))?;
    let record = state.path().join("pods/ns_p.json");
    std::fs::write(&record, serde_json::to_vec(&rec)?)?;
    // A record whose pid was recycled by another process must not touch it.
    let mut bystander = Command::new("sleep").arg("1000").spawn()?;
    let stale = PodRecord {
        name: "q".into(),
        netns: format!("{netns}x"),
        processes: BTreeMap::from([(
            "c".to_string(),
            ProcRecordRef { pid: bystander.id(), start_time: start_time(bystander.id())? + 1 },
        )]),
        ..rec.clone()
    };
    std::fs::write(state.path().join("pods/ns_q.json"), serde_json::to_vec(&stale)?)?;

    let cleaned = cleanup_state(state.path())?;
    let _ = child.wait();
    let bystander_alive = alive(bystander.id());
    let _ = bystander.kill();
    let _ = bystander.wait();

    assert_eq!(cleaned, 2);
    assert!(!alive(pid), "the pod process survived");
    assert!(bystander_alive, "a recycled pid was signalled");
    assert!(!Path::new("/run/netns").join(&netns).exists(), "{netns} left behind");
    assert!(!Path::new("/etc/netns").join(&netns).exists(), "/etc/netns/{netns} left behind");
    assert!(!record.exists());
    assert_eq!(cleanup_state(state.path())?, 0);
    assert_eq!(cleanup_state(&state.path().join("missing"))?, 0);
    Ok(())
}
