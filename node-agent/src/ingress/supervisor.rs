//! The node's nginx: configuration checked with `nginx -t` before it replaces the running one,
//! graceful reloads (SIGHUP), a graceful stop (SIGQUIT), and a watchdog thread that starts it
//! again if it dies.
//!
//! nginx daemonizes and writes `<dir>/nginx.pid`; a process is ours when that pid runs an nginx
//! master whose command line names our configuration, so a restarted agent adopts the nginx its
//! predecessor started instead of interrupting traffic.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::render::{Desired, Paths};
use super::{IngressError, IngressOptions, Outcome};
use crate::daemon;
use crate::files::{self, Access, Durability};

const WATCH_INTERVAL: Duration = Duration::from_secs(1);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A handle on the node's nginx; clones share it.
#[derive(Debug, Clone)]
pub struct IngressHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    options: IngressOptions,
    /// True while nginx should run (the watchdog restarts it then).
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    want: bool,
    watchdog: bool,
    restarts: u64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IngressError + '_ {
    move |source| IngressError::Io { path: path.to_path_buf(), source }
}

impl IngressHandle {
    /// nginx's files live in `<state_dir>/ingress`.
    pub fn new(state_dir: &Path, options: IngressOptions) -> IngressHandle {
        IngressHandle {
            shared: Arc::new(Shared { dir: state_dir.join("ingress"), options, state: Mutex::default() }),
        }
    }

    pub fn paths(&self) -> Paths {
        Paths::under(&self.shared.dir)
    }

    fn conf(&self) -> PathBuf {
        self.shared.dir.join("nginx.conf")
    }

    fn pid_file(&self) -> PathBuf {
        self.shared.dir.join("nginx.pid")
    }

    /// The pid of our running nginx master, if one runs.
    pub fn running_pid(&self) -> Option<i32> {
        daemon::our_pid(&self.pid_file(), "nginx", &self.conf())
    }

    /// Workers of a master that died keep the listening sockets (nginx workers outlive their
    /// master): they are in the master's process group, so they are found by that and stopped
    /// before a new nginx binds the ports.
    fn stop_orphans(&self) {
        let Some(group) = daemon::recorded_pid(&self.pid_file()) else { return };
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for entry in procs.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if daemon::proc_stat(pid).is_some_and(|s| s.comm == "nginx" && s.pgrp == group) {
                tracing::warn!(pid, "stopping a worker of a dead nginx master");
                let _ = daemon::signal(pid, Signal::SIGKILL);
            }
        }
    }

    /// How many times the watchdog started nginx again.
    pub fn restarts(&self) -> u64 {
        lock(&self.shared.state).restarts
    }

    /// Writes the certificates and the configuration; starts nginx, reloads it, or leaves it
    /// alone when nothing changed.
    pub fn serve(&self, desired: &Desired) -> Result<Outcome, IngressError> {
        let mut state = lock(&self.shared.state);
        state.want = true;
        let dir = &self.shared.dir;
        for sub in [dir.join("tmp"), dir.join("certs")] {
            std::fs::create_dir_all(&sub).map_err(io(&sub))?;
        }
        // nginx's master (root) reads the keys; its workers (nobody) never need to, but they do
        // write under tmp/, so only certs/ is closed to everyone else.
        let certs = dir.join("certs");
        std::fs::set_permissions(&certs, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(&certs))?;
        let mut changed = false;
        for (path, pem) in &desired.certs {
            if std::fs::read(path).ok().as_deref() != Some(pem.as_slice()) {
                files::replace(path, pem, Durability::Contents, Access::Private).map_err(io(path))?;
                changed = true;
            }
        }
        let conf = self.conf();
        changed |= std::fs::read_to_string(&conf).ok().as_deref() != Some(desired.config.as_str());
        let running = self.running_pid();
        if !changed && running.is_some() {
            drop(state);
            self.ensure_watchdog();
            return Ok(Outcome::Unchanged);
        }
        if changed {
            // Checked before it replaces the running configuration: a bad one never goes live.
            let next = dir.join("nginx.conf.next");
            files::replace(&next, desired.config.as_bytes(), Durability::Contents, Access::Private)
                .map_err(io(&next))?;
            let out = self.nginx(&["-t", "-q", "-c", &next.to_string_lossy()])?;
            if !out.status.success() {
                return Err(IngressError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
            std::fs::rename(&next, &conf).map_err(io(&conf))?;
        }
        let outcome = match running {
            Some(pid) => {
                daemon::signal(pid, Signal::SIGHUP).map_err(|source| IngressError::Signal { pid, source })?;
                Outcome::Reloaded
            }
            None => {
                self.stop_orphans();
                self.start()?;
                Outcome::Started
            }
        };
        // Only once the new configuration is live: a refused one leaves the running one with
        // every file it names.
        remove_unused_certs(&dir.join("certs"), desired);
        drop(state);
        self.ensure_watchdog();
        Ok(outcome)
    }

    /// Stops nginx gracefully (SIGQUIT: in-flight requests finish) if it runs.
    pub fn stop(&self) -> Result<(), IngressError> {
        let mut state = lock(&self.shared.state);
        state.want = false;
        let Some(pid) = self.running_pid() else { return Ok(()) };
        tracing::info!(pid, "stopping nginx: the node no longer serves ingress");
        // SIGTERM, nginx's fast shutdown, when in-flight requests take too long.
        let stop = daemon::Stop { graceful: Signal::SIGQUIT, grace: STOP_GRACE, forced: Signal::SIGTERM };
        daemon::stop(pid, stop, || self.running_pid().is_some())
            .map_err(|source| IngressError::Signal { pid, source })
    }

    fn nginx(&self, args: &[&str]) -> Result<std::process::Output, IngressError> {
        let dir = format!("{}/", self.shared.dir.display());
        let error_log = self.shared.dir.join("error.log");
        Command::new(&self.shared.options.nginx)
            .args(["-p", &dir, "-e", &error_log.to_string_lossy()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| IngressError::Spawn { binary: self.shared.options.nginx.clone(), source })
    }

    /// Starts nginx (it daemonizes once it listens, so a bind error is reported here).
    fn start(&self) -> Result<(), IngressError> {
        let conf = self.conf();
        // stderr to a file: the daemon keeps the inherited descriptor, a pipe would never close.
        let log = self.shared.dir.join("start.log");
        let file = std::fs::File::create(&log).map_err(io(&log))?;
        let dir = format!("{}/", self.shared.dir.display());
        let error_log = self.shared.dir.join("error.log");
        let status = Command::new(&self.shared.options.nginx)
            .args(["-p", &dir, "-e", &error_log.to_string_lossy(), "-c", &conf.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .map_err(|source| IngressError::Spawn { binary: self.shared.options.nginx.clone(), source })?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(IngressError::Start(format!("{status}: {}", tail.trim())));
        }
        tracing::info!(pid = self.running_pid(), "nginx started");
        Ok(())
    }

    fn ensure_watchdog(&self) {
        let mut state = lock(&self.shared.state);
        if std::mem::replace(&mut state.watchdog, true) {
            return;
        }
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let spawned = std::thread::Builder::new().name("nginx-watchdog".into()).spawn(move || {
            loop {
                std::thread::sleep(WATCH_INTERVAL);
                let Some(shared) = weak.upgrade() else { return };
                let handle = IngressHandle { shared };
                let mut state = lock(&handle.shared.state);
                if !state.want || handle.running_pid().is_some() || !handle.conf().exists() {
                    continue;
                }
                tracing::warn!("nginx is not running; starting it again");
                handle.stop_orphans();
                match handle.start() {
                    Ok(()) => state.restarts += 1,
                    Err(e) => tracing::warn!(error = %e, "cannot restart nginx"),
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the nginx watchdog");
            state.watchdog = false;
        }
    }
}

/// Removes the certificate files the desired configuration does not name.
fn remove_unused_certs(certs: &Path, desired: &Desired) {
    for entry in std::fs::read_dir(certs).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pem") && !desired.certs.contains_key(&path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}
