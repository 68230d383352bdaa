//! Long-running processes of a cluster: started in their own process group with output appended
//! to a log file, recorded with their start time (so a recycled pid is never signalled), and
//! stopped with SIGTERM, a grace period, then SIGKILL — including descendants that left the
//! group and anything still running inside the cluster's network namespaces.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// A process the cluster started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcRecord {
    /// What it is: `etcd`, `kube-apiserver`, `kubelet-node-1`, `agent-node-2`, `reaper`…
    pub name: String,
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, to tell the process from a later one with the same pid.
    pub start_time: u64,
    pub log: PathBuf,
    /// The network namespace it runs in, if not the root one.
    pub netns: Option<String>,
}

impl ProcRecord {
    pub fn is_alive(&self) -> bool {
        proc_stat(self.pid).is_some_and(|s| s.start_time == self.start_time && s.state != 'Z')
    }
}

/// What to start.
#[derive(Debug)]
pub struct Launch {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, OsString)>,
    /// Run inside this network namespace (entered with `nsenter --net`, which keeps the root
    /// mount namespace so that network namespaces the process creates are visible to everyone).
    pub netns: Option<String>,
    /// With `netns`: also enter this mount namespace (`/proc/<pid>/ns/mnt` of a real node's
    /// containerd).
    pub mountns: Option<PathBuf>,
    pub log: PathBuf,
}

impl Launch {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>, log: impl Into<PathBuf>) -> Launch {
        Launch {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
            mountns: None,
            log: log.into(),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Launch {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<OsString>) -> Launch {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn netns(mut self, ns: impl Into<String>) -> Launch {
        self.netns = Some(ns.into());
        self
    }

    pub fn mountns(mut self, ns: impl Into<PathBuf>) -> Launch {
        self.mountns = Some(ns.into());
        self
    }

    fn command_line(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Starts the process detached from the caller's process group, stdin from /dev/null and
    /// stdout+stderr appended to the log.
    pub fn spawn(self) -> Result<(ProcRecord, Child)> {
        if let Some(parent) = self.log.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let ns = self.netns.as_deref().map(|n| format!(" (netns {n})")).unwrap_or_default();
        writeln!(log, "=== {} started at unix time {now}{ns}: {}", self.name, self.command_line())?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"));
                if let Some(mnt) = &self.mountns {
                    c.arg(format!("--mount={}", mnt.display()));
                }
                c.arg("--").arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {}", self.command_line()))?;
        let pid = child.id();
        let start_time = proc_stat(pid).map(|s| s.start_time).unwrap_or_default();
        Ok((ProcRecord { name: self.name, pid, start_time, log: self.log, netns: self.netns }, child))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
    pub start_time: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    // cutime cstime priority nice threads itrealvalue starttime …"; comm may contain spaces.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn all_pids() -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// All descendants of `roots` (not including the roots), found through parent pids.
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in all_pids() {
        if let Some(s) = proc_stat(pid) {
            children.entry(s.ppid).or_default().push(pid);
        }
    }
    let mut out = BTreeSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if out.insert(c) {
                stack.push(c);
            }
        }
    }
    out.into_iter().collect()
}

/// The inode identifying a named network namespace.
pub fn netns_inode(ns: &str) -> Option<u64> {
    fs::metadata(Path::new("/run/netns").join(ns)).ok().map(|m| m.ino())
}

/// Processes whose network namespace is one of `inodes`.
pub fn pids_in_netns(inodes: &BTreeSet<u64>) -> Vec<u32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    all_pids()
        .into_iter()
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .and_then(|l| {
                    let s = l.to_string_lossy().into_owned();
                    s.strip_prefix("net:[")?.strip_suffix(']')?.parse::<u64>().ok()
                })
                .is_some_and(|ino| inodes.contains(&ino))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z')
}

/// `signal` to each of `pids` and to the process group each leads (one that is gone, or leads
/// no group, is skipped).
fn signal_all(pids: &[u32], signal: rustix::process::Signal) {
    for pid in pids.iter().filter_map(|&p| i32::try_from(p).ok().and_then(rustix::process::Pid::from_raw)) {
        let _ = rustix::process::kill_process(pid, signal);
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// SIGTERM to `pids` (and the process groups they lead), wait up to `grace` for them to exit,
/// then SIGKILL the rest. Children of this process are reaped through `children`. Returns
/// whether they all exited on SIGTERM (false when some had to be killed).
pub fn terminate(pids: &[u32], grace: Duration, children: &mut Vec<Child>) -> bool {
    let me = std::process::id();
    let pids: Vec<u32> = pids.iter().copied().filter(|&p| p != me && p > 1).collect();
    if pids.is_empty() {
        return true;
    }
    signal_all(&pids, rustix::process::Signal::TERM);
    let deadline = Instant::now() + grace;
    loop {
        reap(children);
        if !pids.iter().any(|&p| alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_all(&pids, rustix::process::Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        reap(children);
        std::thread::sleep(Duration::from_millis(20));
    }
    reap(children);
    false
}

/// Collects exited children so they do not linger as zombies.
pub fn reap(children: &mut Vec<Child>) {
    children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
