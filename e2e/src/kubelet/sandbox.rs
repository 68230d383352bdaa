//! Pod sandboxes: the pod's network namespace (`/run/netns/wp-…`), its `/etc/netns/<netns>/`
//! files (resolv.conf, hosts), the state file that lets anyone tear it down later, the pod's
//! processes and the commands that run inside it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cni;
use super::spec::DEFAULT_PATH;

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The shell snippet that sets the hostname in the fresh UTS namespace and execs the command.
const SET_HOSTNAME_AND_EXEC: &str = "hostname \"$1\" || exit 126; shift; exec \"$@\"";

/// The mount namespace in which `ip netns add/attach/delete` must run so that every process (the
/// root namespace included) sees the pod namespaces.
///
/// The runner may be started with `ip netns exec <node-ns>`, which puts it into a private mount
/// namespace whose mounts do not propagate back; the namespace of the process that started it
/// is then used (held open by fd and entered with `nsenter --mount`). Started with
/// `nsenter --net` (which keeps the mount namespace) nothing special is needed.
#[derive(Debug, Clone)]
pub(crate) struct HostMountNs {
    held: Option<std::sync::Arc<File>>,
}

impl HostMountNs {
    /// The mount namespace of the calling process.
    pub(crate) fn current() -> Self {
        HostMountNs { held: None }
    }

    /// The mount namespace of the parent process when it differs from ours.
    pub(crate) fn detect() -> Self {
        let ours = fs::metadata("/proc/self/ns/mnt").map(|m| m.ino()).ok();
        let parent = std::os::unix::process::parent_id();
        let path = format!("/proc/{parent}/ns/mnt");
        match fs::metadata(&path) {
            Ok(m) if Some(m.ino()) != ours => match File::open(&path) {
                Ok(f) => {
                    tracing::info!(
                        "running in a private mount namespace; pod network namespaces are \
                         created in the mount namespace of the parent process {parent}"
                    );
                    HostMountNs { held: Some(std::sync::Arc::new(f)) }
                }
                Err(e) => {
                    tracing::warn!("cannot hold {path}: {e}; pod namespaces may be invisible");
                    HostMountNs { held: None }
                }
            },
            _ => HostMountNs { held: None },
        }
    }

    /// A command running `program` in the host mount namespace.
    pub(crate) fn command(&self, program: &str) -> Command {
        match &self.held {
            Some(f) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--mount=/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

fn run_checked(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `/run/netns/<name>`.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Creates the named network namespace (replacing a leftover of the same name) with `lo` up.
pub(crate) fn create_netns(host: &HostMountNs, name: &str) -> Result<()> {
    if netns_path(name).exists() {
        delete_netns(host, name)?;
    }
    let mut add = host.command("ip");
    add.args(["netns", "add", name]);
    run_checked(add, &format!("ip netns add {name}"))?;
    let mut lo = Command::new("ip");
    lo.args(["-n", name, "link", "set", "lo", "up"]);
    run_checked(lo, &format!("ip -n {name} link set lo up"))
}

/// Names the network namespace of process `pid` (the node's, for `hostNetwork` pods).
pub(crate) fn attach_netns(host: &HostMountNs, name: &str, pid: u32) -> Result<()> {
    if netns_path(name).exists() {
        delete_netns(host, name)?;
    }
    let mut c = host.command("ip");
    c.args(["netns", "attach", name, &pid.to_string()]);
    run_checked(c, &format!("ip netns attach {name} {pid}"))
}

/// Deletes a named network namespace (fine when it does not exist) and its `/etc/netns` files.
pub(crate) fn delete_netns(host: &HostMountNs, name: &str) -> Result<()> {
    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
    if !netns_path(name).exists() {
        return Ok(());
    }
    let mut c = host.command("ip");
    c.args(["netns", "delete", name]);
    run_checked(c, &format!("ip netns delete {name}"))
}

/// Writes `/etc/netns/<netns>/<file>`, which `ip netns exec` bind-mounts over `/etc/<file>`.
pub(crate) fn write_netns_etc(netns: &str, file: &str, content: &str) -> Result<()> {
    let dir = Path::new("/etc/netns").join(netns);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join(file), content.as_bytes())
}

pub(crate) fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(content)?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The network namespace this process is in, by name, if it has one in `/run/netns` (the
/// node's namespace for a runner).
pub(crate) fn current_netns_name() -> Option<String> {
    let ours = fs::metadata("/proc/self/ns/net").ok()?.ino();
    fs::read_dir(NETNS_RUN_DIR)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with(super::spec::NETNS_PREFIX))
        .find(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == ours))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn same_netns_as_current(path: &Path) -> bool {
    match (fs::metadata("/proc/self/ns/net"), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// A process of a pod, identified by pid and start time (so a recycled pid is never signalled).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProcRef {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcRef {
    pub(crate) fn of(pid: u32) -> Self {
        ProcRef { pid, start_time: proc_start_time(pid).unwrap_or(0) }
    }

    /// Whether the process still exists (not a zombie) and is the one recorded.
    pub(crate) fn is_alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) => state != 'Z' && (self.start_time == 0 || start == self.start_time),
            None => false,
        }
    }
}

/// (state, start time in clock ticks) from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

pub(crate) fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

/// Sends `signal` to the process group led by `pid` (the container processes are started as
/// group leaders). A missing group is not an error.
pub(crate) fn signal_group(pid: u32, signal: rustix::process::Signal) {
    let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return;
    };
    let _ = rustix::process::kill_process_group(p, signal);
}

/// SIGTERM to the group, up to `grace` for the leader to go, then SIGKILL (for processes that are
/// not our children; ours are stopped through their `Child`).
fn stop_foreign(p: ProcRef, grace: Duration) {
    if !p.is_alive() {
        signal_group(p.pid, rustix::process::Signal::KILL);
        return;
    }
    signal_group(p.pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + grace;
    while p.is_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_group(p.pid, rustix::process::Signal::KILL);
}

/// What the runner needs to DEL a pod's network attachment: the configuration ADD used, the
/// attachment parameters and ADD's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CniRecord {
    pub conflist: Value,
    pub conflist_path: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub container_id: String,
    pub ifname: String,
    pub args: String,
    pub capability_args: Map<String, Value>,
    pub result: Option<Value>,
}

impl CniRecord {
    pub(crate) fn list(&self) -> Result<cni::NetworkConfigList> {
        cni::parse_config(&self.conflist.to_string(), false, &self.conflist_path)
            .map_err(|e| anyhow::anyhow!("stored CNI configuration: {e}"))
    }

    pub(crate) fn runtime_conf(&self, netns: &str) -> cni::RuntimeConf {
        cni::RuntimeConf {
            container_id: self.container_id.clone(),
            netns: netns_path(netns).display().to_string(),
            ifname: self.ifname.clone(),
            args: self.args.clone(),
            capability_args: self.capability_args.clone(),
        }
    }
}

/// `<state-dir>/pods/<namespace>_<name>.json`: everything needed to tear a pod down without the
/// runner (and without the API server).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's network namespace name (`/run/netns/<netns>`).
    pub netns: String,
    /// The hostname its containers see.
    #[serde(default)]
    pub hostname: String,
    pub host_network: bool,
    /// The node's network namespace (where CNI plugins run), when it has a name.
    pub node_netns: Option<String>,
    pub pod_ips: Vec<String>,
    /// Running container processes by container name.
    pub processes: BTreeMap<String, ProcRecordRef>,
    /// The environment of the first container (what `exec` runs with).
    #[serde(default)]
    pub exec_env: Vec<(String, String)>,
    /// The pod's CNI attachment (none for hostNetwork pods and once torn down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniRecord>,
}

/// A recorded container process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProcRecordRef {
    pub pid: u32,
    pub start_time: u64,
}

impl From<ProcRef> for ProcRecordRef {
    fn from(p: ProcRef) -> Self {
        ProcRecordRef { pid: p.pid, start_time: p.start_time }
    }
}

impl From<ProcRecordRef> for ProcRef {
    fn from(p: ProcRecordRef) -> Self {
        ProcRef { pid: p.pid, start_time: p.start_time }
    }
}

/// `<state-dir>/pods`.
pub(crate) fn pods_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

/// The file stem of a pod's state: `<namespace>_<name>`.
pub(crate) fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

pub(crate) fn record_path(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    pods_dir(state_dir).join(format!("{}.json", pod_key(namespace, name)))
}

pub(crate) fn write_record(state_dir: &Path, rec: &PodRecord) -> Result<()> {
    let dir = pods_dir(state_dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = record_path(state_dir, &rec.namespace, &rec.name);
    write_atomic(&path, &serde_json::to_vec_pretty(rec)?)
}

/// Removes a pod's state file if it is still this pod's.
pub(crate) fn remove_record(state_dir: &Path, namespace: &str, name: &str, uid: &str) {
    let path = record_path(state_dir, namespace, name);
    let ours = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<PodRecord>(&b).ok())
        .is_none_or(|r| r.uid == uid);
    if ours {
        let _ = fs::remove_file(path);
    }
}

/// Tears down what a record describes: processes (SIGTERM, `grace`, SIGKILL), the CNI attachment
/// (DEL, run in the node's namespace), the network namespace and its /etc/netns files.
pub(crate) fn teardown_record(host: &HostMountNs, rec: &PodRecord, grace: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    for p in rec.processes.values() {
        stop_foreign((*p).into(), grace);
    }
    if let Some(c) = &rec.cni
        && !rec.host_network
    {
        let enter = rec.node_netns.as_ref().map(|n| netns_path(n));
        let enter = match enter {
            Some(p) if same_netns_as_current(&p) => Some(None),
            Some(p) if p.exists() => Some(Some(p)),
            Some(p) => {
                problems.push(format!(
                    "node namespace {} is gone; skipped CNI DEL for {}/{}",
                    p.display(),
                    rec.namespace,
                    rec.name
                ));
                None
            }
            None => Some(None),
        };
        if let Some(enter_netns) = enter {
            let exec = cni::Exec { bin_dirs: c.bin_dirs.clone(), enter_netns };
            let res =
                c.list().and_then(|l| Ok(exec.del(&l, &c.runtime_conf(&rec.netns), c.result.as_ref())?));
            if let Err(e) = res {
                problems.push(format!("CNI DEL for {}/{}: {e}", rec.namespace, rec.name));
            }
        }
    }
    if let Err(e) = delete_netns(host, &rec.netns) {
        problems.push(e.to_string());
    }
    problems
}

/// Tears down the leftovers of a runner that is gone (crashed or killed): for every pod state
/// file in `<state_dir>/pods/`, kills the recorded processes (only if pid and start time still
/// match), runs CNI DEL with the stored configuration and result (inside the node's network
/// namespace when it still exists, so call this before deleting the node namespace), deletes the
/// pod's network namespace and `/etc/netns/<netns>/`, and removes the state file. Logs are kept.
/// Returns how many pods were cleaned up; problems are logged, not fatal.
pub fn cleanup_state(state_dir: &Path) -> Result<usize> {
    cleanup_state_with(&HostMountNs::current(), state_dir)
}

pub(crate) fn cleanup_state_with(host: &HostMountNs, state_dir: &Path) -> Result<usize> {
    let dir = pods_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut cleaned = 0;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let rec: PodRecord = match fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("skipping unreadable pod state {}: {e}", path.display());
                continue;
            }
        };
        for problem in teardown_record(host, &rec, Duration::from_secs(2)) {
            tracing::warn!("{problem}");
        }
        let _ = fs::remove_file(&path);
        cleaned += 1;
    }
    Ok(cleaned)
}

/// Whether `name` resolves to an executable with `path` (a `PATH` value).
pub(crate) fn is_executable(name: &str, path: &str) -> bool {
    let exec = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if name.contains('/') {
        return exec(Path::new(name));
    }
    path.split(':').filter(|d| !d.is_empty()).any(|d| exec(&Path::new(d).join(name)))
}

/// The command that runs `argv` inside a pod: its network namespace and /etc/netns files
/// (`ip netns exec`), a UTS namespace with the pod's hostname, and a clean environment (`PATH`,
/// `HOSTNAME`, `HOME`, and `TERM` when set). The caller picks stdio.
pub fn pod_exec_command(netns: &str, hostname: &str, argv: &[String]) -> Command {
    container_command(netns, hostname, argv, &exec_base_env(hostname))
}

/// `PATH`, `HOSTNAME`, `HOME`, and `TERM` when set.
pub(crate) fn exec_base_env(hostname: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), hostname.to_string()),
        ("HOME".to_string(), "/root".to_string()),
    ];
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".into(), term));
    }
    env
}

pub(crate) fn container_command(
    netns: &str,
    hostname: &str,
    argv: &[String],
    env: &[(String, String)],
) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, "unshare", "--uts", "--", "/bin/sh", "-c"])
        .arg(SET_HOSTNAME_AND_EXEC)
        .arg("weft-pod")
        .arg(hostname)
        .args(argv)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    c
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_process_names() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 100 18446744073709551615";
        assert_eq!(parse_stat(line), Some(('S', 987_654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcRef::of(std::process::id());
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        let other = ProcRef { pid: me.pid, start_time: me.start_time + 1 };
        assert!(!other.is_alive());
    }

    #[test]
    fn records_round_trip_and_are_removed_only_by_their_pod() {
        let dir = tempfile::tempdir().unwrap();
        let rec = PodRecord {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u1".into(),
            netns: "wp-abc".into(),
            ..Default::default()
        };
        write_record(dir.path(), &rec).unwrap();
        let path = record_path(dir.path(), "ns", "p");
        assert!(path.ends_with("pods/ns_p.json"));
        let back: PodRecord = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, rec);
        remove_record(dir.path(), "ns", "p", "other-uid");
        assert!(path.exists());
        remove_record(dir.path(), "ns", "p", "u1");
        assert!(!path.exists());
    }

    #[test]
    fn executables_are_found_on_path() {
        assert!(is_executable("sh", DEFAULT_PATH));
        assert!(is_executable("/bin/sh", ""));
        assert!(!is_executable("definitely-not-a-command-xyz", DEFAULT_PATH));
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        fs::write(&plain, "x").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!is_executable(&plain.display().to_string(), DEFAULT_PATH));
    }

    #[test]
    fn exec_command_enters_netns_and_sets_hostname() {
        let c = pod_exec_command("wp-abc", "web-0", &["dig".to_string(), "x".to_string()]);
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(c.get_program(), "ip");
        assert_eq!(&args[..4], ["netns", "exec", "wp-abc", "unshare"]);
        assert_eq!(&args[args.len() - 4..], ["weft-pod", "web-0", "dig", "x"]);
    }
}
