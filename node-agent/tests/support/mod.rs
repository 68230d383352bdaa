//! What the agent's real-datapath tests share: they run as root, as `make test` does, and fail
//! loudly otherwise — a datapath test that quietly passes without running proves nothing.

use std::process::{Command, Output};

pub mod netns;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}

/// Fails the test unless it runs as root (network namespaces, veths, iptables).
pub fn require_root() {
    assert!(is_root(), "this test needs root: it creates network namespaces, veths and iptables rules");
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, fails the test if it fails, and returns its standard output.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
