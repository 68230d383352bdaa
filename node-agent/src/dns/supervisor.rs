//! The node's CoreDNS process: started, reloaded (SIGUSR1), restarted when it dies, stopped
//! when the agent stops.
//!
//! One dedicated thread owns the process. It is spawned through `setpriv --pdeathsig TERM` from
//! that thread, so the kernel stops CoreDNS if the agent is killed outright; its pid is kept in
//! `<state-dir>/dns/coredns.pid` so a new agent finds and replaces one that survived anyway.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::daemon;
use crate::files::{self, Access, Durability};

use super::{DnsOptions, ServeOptions};
use crate::metrics::AgentMetrics;

/// How long a starting CoreDNS gets to answer on its health port.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long CoreDNS gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the thread checks that CoreDNS still runs.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start CoreDNS ({binary}): {source}")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("CoreDNS exited at start ({status}); the end of {log}:\n{tail}")]
    Exited { status: String, log: PathBuf, tail: String },
    #[error(
        "CoreDNS did not answer on its health port {addr} within {START_TIMEOUT:?}; the end of {log}:\n{tail}"
    )]
    Unhealthy { addr: SocketAddr, log: PathBuf, tail: String },
    #[error("cannot signal CoreDNS (pid {pid}): {source}")]
    Signal { pid: u32, source: nix::Error },
    #[error("cannot start the DNS supervisor thread: {0}")]
    Thread(std::io::Error),
    #[error("the DNS supervisor thread is gone")]
    Gone,
}

/// What a serve request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Unchanged,
    Started,
    Reloaded,
}

type Reply<T> = mpsc::SyncSender<Result<T, SupervisorError>>;

enum Request {
    Serve { corefile: String, health: SocketAddr, reply: Reply<Served> },
    Stop { reply: Reply<()> },
    KeepLast { health: SocketAddr, reply: Reply<()> },
}

/// A handle on the node's CoreDNS; clones share it. The thread starts with the first request
/// and stops CoreDNS when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct DnsHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    options: DnsOptions,
    metrics: AgentMetrics,
    thread: Mutex<Option<(mpsc::Sender<Request>, std::thread::JoinHandle<()>)>>,
    /// The last "not serving" reason logged, so it is logged once per change.
    off: Mutex<Option<String>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let taken = match self.thread.get_mut() {
            Ok(t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some((tx, thread)) = taken {
            drop(tx);
            let _ = thread.join();
        }
    }
}

impl DnsHandle {
    /// CoreDNS's files live in `<state_dir>/dns`.
    pub fn new(state_dir: &Path, options: DnsOptions, metrics: AgentMetrics) -> DnsHandle {
        DnsHandle {
            shared: Arc::new(Shared {
                dir: state_dir.join("dns"),
                options,
                metrics,
                thread: Mutex::new(None),
                off: Mutex::new(None),
            }),
        }
    }

    pub fn options(&self) -> &DnsOptions {
        &self.shared.options
    }

    /// `<state-dir>/dns`: the Corefile, the pid file and CoreDNS's log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Records why the node does not serve; true when that is news (to log it once).
    pub(super) fn note_off(&self, why: &str) -> bool {
        let mut off = lock(&self.shared.off);
        if off.as_deref() == Some(why) {
            return false;
        }
        *off = Some(why.to_string());
        true
    }

    /// Writes the Corefile and makes CoreDNS serve it: started if it does not run, told to
    /// reload (SIGUSR1) if it runs with another configuration, left alone otherwise.
    pub fn serve(&self, corefile: String, serve: &ServeOptions) -> Result<Served, SupervisorError> {
        *lock(&self.shared.off) = None;
        let health = SocketAddr::from((serve.node_ip, serve.health_port));
        self.request(|reply| Request::Serve { corefile, health, reply })
    }

    /// Makes sure CoreDNS runs, with the Corefile last written if none runs (the plan could not
    /// be rendered: the node keeps serving what it served before, even after an agent restart).
    pub fn keep_last(&self, serve: &ServeOptions) -> Result<(), SupervisorError> {
        let health = SocketAddr::from((serve.node_ip, serve.health_port));
        self.request(|reply| Request::KeepLast { health, reply })
    }

    /// Stops CoreDNS (also one a previous agent left running).
    pub fn stop(&self) -> Result<(), SupervisorError> {
        self.request(|reply| Request::Stop { reply })
    }

    fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, SupervisorError> {
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let mut thread = lock(&self.shared.thread);
            if thread.is_none() {
                let (tx, rx) = mpsc::channel();
                let mut sup = Supervisor::new(&self.shared.dir, &self.shared.options, &self.shared.metrics);
                let handle = std::thread::Builder::new()
                    .name("weft-coredns".into())
                    .spawn(move || sup.run(rx))
                    .map_err(SupervisorError::Thread)?;
                *thread = Some((tx, handle));
            }
            let Some((tx, _)) = thread.as_ref() else { return Err(SupervisorError::Gone) };
            tx.send(make(reply)).map_err(|_| SupervisorError::Gone)?;
        }
        answer.recv().map_err(|_| SupervisorError::Gone)?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

struct Running {
    child: Child,
    /// The Corefile it was started with or last reloaded to.
    loaded: String,
    /// It answered on its health port once: it handles SIGUSR1 (before that the signal's
    /// default action would kill it).
    healthy: bool,
    started: Instant,
}

struct Supervisor {
    dir: PathBuf,
    options: DnsOptions,
    metrics: AgentMetrics,
    running: Option<Running>,
    /// What to serve (None: stopped on purpose).
    desired: Option<(String, SocketAddr)>,
    /// When a dead CoreDNS may be started again, and the delay after the next death.
    next_start: Instant,
    /// Restart delays: 1 s, doubling to 30 s while CoreDNS keeps dying or failing to start.
    restarts: crate::retry::Doubling,
    stale_checked: bool,
}

impl Supervisor {
    fn new(dir: &Path, options: &DnsOptions, metrics: &AgentMetrics) -> Supervisor {
        Supervisor {
            dir: dir.to_path_buf(),
            options: options.clone(),
            metrics: metrics.clone(),
            running: None,
            desired: None,
            next_start: Instant::now(),
            restarts: crate::retry::Doubling::new(Duration::from_secs(1), Duration::from_secs(30)),
            stale_checked: false,
        }
    }

    fn corefile_path(&self) -> PathBuf {
        self.dir.join("Corefile")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("coredns.pid")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("coredns.log")
    }

    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        loop {
            match rx.recv_timeout(WATCH_INTERVAL) {
                Ok(Request::Serve { corefile, health, reply }) => {
                    let _ = reply.send(self.serve(corefile, health));
                }
                Ok(Request::KeepLast { health, reply }) => {
                    let _ = reply.send(self.keep_last(health));
                }
                Ok(Request::Stop { reply }) => {
                    self.desired = None;
                    let _ = reply.send(self.stop());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.watch(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Err(e) = self.stop() {
                        warn!(error = %e, "stopping CoreDNS");
                    }
                    return;
                }
            }
        }
    }

    fn serve(&mut self, corefile: String, health: SocketAddr) -> Result<Served, SupervisorError> {
        let path = self.corefile_path();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(corefile.as_str()) {
            files::replace(&path, corefile.as_bytes(), Durability::Contents, Access::Public)
                .map_err(|source| SupervisorError::Io { path: path.clone(), source })?;
        }
        self.desired = Some((corefile.clone(), health));
        self.reap();
        let Some(running) = &mut self.running else {
            self.start(&corefile, health)?;
            return Ok(Served::Started);
        };
        if !running.healthy {
            running.healthy = wait_healthy(health, &mut running.child, START_TIMEOUT).is_ok();
            if !running.healthy {
                // Stuck at start: begin again with the new file.
                self.stop()?;
                self.start(&corefile, health)?;
                return Ok(Served::Started);
            }
        }
        if running.loaded == corefile {
            return Ok(Served::Unchanged);
        }
        let pid = running.child.id();
        signal(pid, Signal::SIGUSR1)?;
        running.loaded = corefile;
        self.metrics.dns_reloads.inc();
        info!(pid, "CoreDNS reloads its Corefile");
        Ok(Served::Reloaded)
    }

    fn keep_last(&mut self, health: SocketAddr) -> Result<(), SupervisorError> {
        self.reap();
        if self.running.is_some() {
            return Ok(());
        }
        let Ok(last) = std::fs::read_to_string(self.corefile_path()) else { return Ok(()) };
        info!("serving the last good Corefile");
        self.desired = Some((last.clone(), health));
        self.start(&last, health)
    }

    /// Replaces a CoreDNS a previous agent left behind (its pid file names a live process
    /// running our Corefile).
    fn stop_stale(&mut self) {
        if std::mem::replace(&mut self.stale_checked, true) {
            return;
        }
        if let Some(pid) = daemon::our_pid(&self.pid_path(), "coredns", &self.corefile_path()) {
            info!(pid, "stopping the CoreDNS a previous agent started");
            let stop = daemon::Stop { graceful: Signal::SIGTERM, grace: STOP_GRACE, forced: Signal::SIGKILL };
            let _ = daemon::stop(pid, stop, || daemon::alive(pid));
        }
        let _ = std::fs::remove_file(self.pid_path());
    }

    fn start(&mut self, corefile: &str, health: SocketAddr) -> Result<(), SupervisorError> {
        self.stop_stale();
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| SupervisorError::Io { path: log_path.clone(), source })?;
        let err_log =
            log.try_clone().map_err(|source| SupervisorError::Io { path: log_path.clone(), source })?;
        let binary = self.options.coredns.clone();
        // setpriv sets the parent-death signal and execs CoreDNS (same pid): if the agent dies,
        // so does its CoreDNS.
        let mut cmd = match setpriv() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "TERM", "--"]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        cmd.arg("-conf").arg(self.corefile_path()).stdin(Stdio::null()).stdout(log).stderr(err_log);
        let child =
            cmd.spawn().map_err(|source| SupervisorError::Spawn { binary: binary.clone(), source })?;
        let pid = child.id();
        let pid_path = self.pid_path();
        files::replace(&pid_path, format!("{pid}\n").as_bytes(), Durability::Contents, Access::Public)
            .map_err(|source| SupervisorError::Io { path: pid_path, source })?;
        info!(pid, corefile = %self.corefile_path().display(), "CoreDNS started");
        let mut running =
            Running { child, loaded: corefile.to_string(), healthy: false, started: Instant::now() };
        let result = wait_healthy(health, &mut running.child, START_TIMEOUT);
        running.healthy = result.is_ok();
        match result {
            Ok(()) => {
                self.running = Some(running);
                Ok(())
            }
            Err(Health::Exited(status)) => {
                let _ = std::fs::remove_file(self.pid_path());
                Err(SupervisorError::Exited { status, log: log_path.clone(), tail: tail(&log_path) })
            }
            Err(Health::Timeout) => {
                // Keep it: it may still come up (the kubernetes plugin waits for the API).
                self.running = Some(running);
                Err(SupervisorError::Unhealthy { addr: health, log: log_path.clone(), tail: tail(&log_path) })
            }
        }
    }

    fn stop(&mut self) -> Result<(), SupervisorError> {
        self.stop_stale();
        let Some(mut running) = self.running.take() else { return Ok(()) };
        let pid = running.child.id();
        if running.child.try_wait().ok().flatten().is_none() {
            let _ = signal(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while running.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = running.child.kill();
            let _ = running.child.wait();
            info!(pid, "CoreDNS stopped");
        }
        let _ = std::fs::remove_file(self.pid_path());
        Ok(())
    }

    /// Forgets a CoreDNS that exited (logged), so the next request or tick starts a new one.
    fn reap(&mut self) {
        let Some(running) = &mut self.running else { return };
        let Ok(Some(status)) = running.child.try_wait() else { return };
        let ran = running.started.elapsed();
        warn!(%status, ?ran, log = %self.log_path().display(), "CoreDNS exited; restarting it");
        self.running = None;
        self.metrics.dns_serving.set(0);
        // A CoreDNS that ran for a while is restarted at once; one that keeps dying, less often.
        if ran > Duration::from_secs(60) {
            self.restarts.reset();
        }
        self.next_start = Instant::now() + self.restarts.next_delay();
    }

    /// Restarts CoreDNS if it died while it should serve.
    fn watch(&mut self) {
        self.reap();
        if self.running.is_some() || Instant::now() < self.next_start {
            return;
        }
        let Some((corefile, health)) = self.desired.clone() else { return };
        self.metrics.dns_restarts.inc();
        match self.start(&corefile, health) {
            Ok(()) => {
                self.metrics.dns_serving.set(1);
                info!("CoreDNS restarted");
            }
            Err(e) => {
                warn!(error = %e, "CoreDNS did not restart");
                self.next_start = Instant::now() + self.restarts.next_delay();
            }
        }
    }
}

enum Health {
    Exited(String),
    Timeout,
}

/// Polls `GET /health` until it answers 200, the process exits or `timeout` passes.
fn wait_healthy(addr: SocketAddr, child: &mut Child, timeout: Duration) -> Result<(), Health> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Health::Exited(status.to_string()));
        }
        if health_ok(addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Health::Timeout);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn health_ok(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200"))
    };
    attempt().unwrap_or(false)
}

/// Signals CoreDNS, the agent's child (whose pid `Child` gives as u32).
fn signal(pid: u32, sig: Signal) -> Result<(), SupervisorError> {
    let raw = i32::try_from(pid).map_err(|_| SupervisorError::Signal { pid, source: nix::Error::EINVAL })?;
    daemon::signal(raw, sig).map_err(|source| SupervisorError::Signal { pid, source })
}

/// `setpriv` from PATH, if the node has it.
fn setpriv() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("setpriv")).find(|p| p.is_file())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, UdpSocket};

    /// The CoreDNS e2e/tools/install.sh builds.
    fn coredns() -> PathBuf {
        std::env::var_os("WEFT_COREDNS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/weft/bin/coredns"))
    }

    fn free_port() -> u16 {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().expect("addr").port();
        let t = std::net::TcpListener::bind(("127.0.0.1", port));
        if t.is_ok() { port } else { free_port() }
    }

    fn corefile(dns: u16, health: u16, answer: Ipv4Addr) -> String {
        format!(
            "example.test:{dns} {{\n    bind 127.0.0.1\n    health 127.0.0.1:{health}\n    hosts {{\n        {answer} a.example.test\n    }}\n}}\n"
        )
    }

    fn dig(port: u16) -> String {
        let out = Command::new("dig")
            .args(["+short", "+time=1", "+tries=1", "-p", &port.to_string(), "@127.0.0.1", "a.example.test"])
            .output()
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn serve_options(health: u16) -> ServeOptions {
        ServeOptions {
            node_ip: Ipv4Addr::LOCALHOST,
            kubeconfig: PathBuf::from("/unused"),
            health_port: health,
            ready_port: 0,
            metrics_port: 0,
        }
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn coredns_is_started_reloaded_restarted_replaced_and_stopped() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let (dns, health) = (free_port(), free_port());
        let options = DnsOptions { coredns: coredns(), ..DnsOptions::default() };
        let metrics = AgentMetrics::default();
        let handle = DnsHandle::new(dir.path(), options.clone(), metrics.clone());
        let serve = serve_options(health);
        let first = corefile(dns, health, Ipv4Addr::new(192, 0, 2, 1));

        assert_eq!(handle.serve(first.clone(), &serve).expect("start"), Served::Started);
        assert_eq!(dig(dns), "192.0.2.1");
        assert_eq!(handle.serve(first, &serve).expect("same"), Served::Unchanged);

        let second = corefile(dns, health, Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(handle.serve(second.clone(), &serve).expect("reload"), Served::Reloaded);
        wait_until("the reloaded answer", || dig(dns) == "192.0.2.2");
        assert_eq!(metrics.dns_reloads.get(), 1);

        // Killed behind the supervisor's back: started again with the same Corefile.
        let pid_file = dir.path().join("dns/coredns.pid");
        let pid: u32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid");
        signal(pid, Signal::SIGKILL).expect("kill");
        wait_until("a new CoreDNS", || {
            std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() != pid.to_string())
                && dig(dns) == "192.0.2.2"
        });
        assert_eq!(metrics.dns_restarts.get(), 1);
        wait_until("weft_agent_dns_serving 1 again", || metrics.dns_serving.get() == 1);

        // The agent stops: so does its CoreDNS.
        let pid: u32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid");
        drop(handle);
        assert!(!daemon::alive(i32::try_from(pid).expect("pid")), "CoreDNS {pid} stopped with the agent");

        // A CoreDNS left behind by an agent that died (its pid file names it) is replaced by the
        // next agent.
        let mut stray = Command::new(coredns())
            .arg("-conf")
            .arg(dir.path().join("dns/Corefile"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stray coredns");
        std::fs::write(&pid_file, format!("{}\n", stray.id())).expect("pid file");
        wait_until("the stray CoreDNS", || dig(dns) == "192.0.2.2");
        let handle = DnsHandle::new(dir.path(), options, AgentMetrics::default());
        let third = corefile(dns, health, Ipv4Addr::new(192, 0, 2, 3));
        assert_eq!(handle.serve(third, &serve).expect("replace"), Served::Started);
        assert!(stray.try_wait().expect("wait").is_some(), "the stray CoreDNS was stopped");
        assert_eq!(dig(dns), "192.0.2.3");

        // The last handle gone (the agent stops): CoreDNS stops too.
        let new: u32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid");
        drop(handle);
        assert!(!daemon::alive(i32::try_from(new).expect("pid")), "CoreDNS {new} stopped with the agent");
        assert!(!pid_file.exists());
    }

    #[test]
    fn a_corefile_coredns_refuses_is_reported_with_its_log() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let health = free_port();
        let handle = DnsHandle::new(
            dir.path(),
            DnsOptions { coredns: coredns(), ..DnsOptions::default() },
            AgentMetrics::default(),
        );
        let err = handle
            .serve(format!(".:{} {{\n    nosuchplugin\n}}\n", free_port()), &serve_options(health))
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.starts_with("CoreDNS exited at start"), "{text}");
        assert!(text.contains("nosuchplugin"), "{text}");
    }
}
