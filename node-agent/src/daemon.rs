//! What the supervisors of the agent's daemons (CoreDNS in `dns`, nginx in `ingress`) share:
//! finding their process from its pid file, reading `/proc`, stopping it with a grace period.
//! Each supervisor keeps its own start, health and restart logic, which differ (CoreDNS is the
//! agent's child; nginx daemonizes and leaves workers behind a dead master).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The pid in `pid_file`, whether or not it still runs.
pub fn recorded_pid(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// The pid in `pid_file` if that process is `program` running with `config` on its command line
/// (a pid file outlives its process, and pids are reused).
pub fn our_pid(pid_file: &Path, program: &str, config: &Path) -> Option<i32> {
    let pid = recorded_pid(pid_file)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains(program) && cmdline.contains(&*config.to_string_lossy())).then_some(pid)
}

/// A process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    /// R, S, Z, …
    pub state: char,
    pub pgrp: i32,
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses, so it ends at the last ')'.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some(ProcStat { comm, state, pgrp })
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z')
}

pub fn signal(pid: i32, sig: Signal) -> nix::Result<()> {
    kill(Pid::from_raw(pid), sig)
}

/// How a daemon is asked to stop: `graceful` first, `forced` when it still runs after `grace`.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    pub graceful: Signal,
    pub grace: Duration,
    pub forced: Signal,
}

/// Stops `pid` as `how` says, judging by `running()` whether it still runs. Returns the error of
/// the first signal (the process may be gone already).
pub fn stop(pid: i32, how: Stop, mut running: impl FnMut() -> bool) -> nix::Result<()> {
    signal(pid, how.graceful)?;
    let deadline = Instant::now() + how.grace;
    while running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if running() {
        let _ = signal(pid, how.forced);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_parentheses_in_the_name() {
        let stat = "4242 (nginx: (worker)) S 1 4200 4200 0 -1 4194560 96 0 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(ProcStat { comm: "nginx: (worker)".into(), state: 'S', pgrp: 4200 })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_its_stat_names_its_group() {
        let me = i32::try_from(std::process::id()).expect("pid fits");
        assert!(alive(me));
        let stat = proc_stat(me).expect("own stat");
        assert_eq!(stat.pgrp, nix::unistd::getpgrp().as_raw());
    }
}
