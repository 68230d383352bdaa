//! The one way the agent runs the kernel's command-line tools (`iptables`, `iptables-restore`,
//! `iptables-save`, `nft`, `conntrack`, `sysctl`): in its own network namespace, in a named one
//! through `ip netns exec` (tests, benchmarks), or nowhere, only recording what it would have
//! written (unit tests, render benchmarks: every check passes, every listing is empty).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {message}")]
    Failed { what: String, message: String },
}

#[derive(Debug, Clone, Default)]
pub struct Runner {
    netns: Option<String>,
    recorded: Option<Arc<Mutex<Vec<String>>>>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ExecError {
    move |source| ExecError::Io { what, source }
}

impl Runner {
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self { netns: Some(name.into()), recorded: None }
    }

    pub fn recording() -> Self {
        Self { netns: None, recorded: Some(Arc::default()) }
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn is_recording(&self) -> bool {
        self.recorded.is_some()
    }

    /// The inputs given to [`Runner::pipe`] so far, oldest first (recording runners only).
    pub fn recorded(&self) -> Vec<String> {
        self.recorded
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Whether `program args` succeeds (a check: its output is not wanted).
    pub fn status_ok(&self, program: &str, args: &[&str]) -> Result<bool, ExecError> {
        if self.is_recording() {
            return Ok(true);
        }
        self.command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .map_err(io(format!("cannot run {program}")))
    }

    /// The stdout of `program args`; its stderr in the error when it fails.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<String, ExecError> {
        if self.is_recording() {
            return Ok(String::new());
        }
        let out = self
            .command(program)
            .args(args)
            .stderr(Stdio::piped())
            .output()
            .map_err(io(format!("cannot run {program}")))?;
        if !out.status.success() {
            return Err(ExecError::Failed {
                what: format!("{program} {}", args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `program args` with `input` on its stdin; its stdout when it succeeds.
    pub fn pipe(&self, program: &str, args: &[&str], input: &str) -> Result<String, ExecError> {
        if let Some(recorded) = &self.recorded {
            recorded.lock().unwrap_or_else(PoisonError::into_inner).push(input.to_string());
            return Ok(String::new());
        }
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("cannot run {program}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(io(format!("cannot write to {program}")))?;
        }
        let out = child.wait_with_output().map_err(io(format!("cannot wait for {program}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ExecError::Failed {
                what: format!("{program} {}", args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// The lines of `program args`'s stdout for which `keep` returns something, read as they
    /// come (an `iptables-save` at 10,000 Services is tens of megabytes, of which a caller may
    /// want only the chain names).
    pub fn filter_lines<T>(
        &self,
        program: &str,
        args: &[&str],
        mut keep: impl FnMut(&str) -> Option<T>,
    ) -> Result<Vec<T>, ExecError> {
        if self.is_recording() {
            return Ok(Vec::new());
        }
        let what = format!("{program} {}", args.join(" "));
        let mut child = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("cannot run {program}")))?;
        let mut kept = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                kept.extend(keep(&line.map_err(io(what.clone()))?));
            }
        }
        let status = child.wait().map_err(io(what.clone()))?;
        if !status.success() {
            return Err(ExecError::Failed { what, message: format!("exited with {status}") });
        }
        Ok(kept)
    }

    /// Runs `program args` for its effect only, best effort: a failure to start is logged, an
    /// exit status is not looked at (`conntrack -D` exits 1 when nothing matched).
    pub fn run_quietly(&self, program: &str, args: &[&str]) {
        if self.is_recording() {
            return;
        }
        match self.command(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status() {
            Ok(_) => tracing::debug!(program, ?args, "ran"),
            Err(e) => tracing::warn!(program, error = %e, "cannot run"),
        }
    }
}
