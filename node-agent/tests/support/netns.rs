//! A network namespace guard, shared by the datapath tests (through `support`) and the CNI
//! benchmarks (through `#[path]`). It returns errors rather than panicking, so the benchmarks,
//! which are not tests, can use `?`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace, deleted on drop (even when an assertion fails).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix>-<tag>-<pid>-<n>`: the prefix tells whose leftover it is, the pid and a
    /// process-wide counter keep parallel tests and repeated tags apart. `lo` is left down, as
    /// `ip netns add` makes it: the CNI plugin's job is to bring it up, and the tests check that.
    pub fn new(prefix: &str, tag: &str) -> io::Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        output(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`: its standard output, or an error carrying its standard error.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        output(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A command running `program` inside: `ip netns exec <ns> <program>`.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn output(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.output().map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
