//! IPAM under chaos on one node: random pod ADDs, pod DELs and agent kills, checking after every
//! cycle that no two live pods share an address, and at the end that nothing leaked.
//!
//! `cargo bench -p weft-agent --bench ipam_chaos` (root: it makes network namespaces).
//! `WEFT_CHAOS_CYCLES` (default 1000) sets the number of cycles, `WEFT_CHAOS_SEED` the RNG seed.
//!
//! As in `cni_add`: the agent's CNI socket is served in-process by the real allocator
//! (`IpamHandle::open` on a state directory, one /26 block) and `CniServer`; the "node" is a network
//! namespace this benchmark creates, and the real `weft-cni` binary is executed there with the
//! `CNI_*` environment, as a runtime does; every pod is a fresh network namespace.
//!
//! Each cycle is one random action (a seeded xorshift, so a run can be repeated):
//! - ADD: a new pod (namespace, then CNI ADD);
//! - DEL: a random live pod (CNI DEL, then its namespace is removed);
//! - kill: the socket server's task is aborted and the `IpamHandle` dropped with no shutdown step,
//!   then the allocator is reopened from the same state directory (only the checkpoint survives, as
//!   after SIGKILL) and served again. Blocks are not set again: the checkpoint must carry them.
//!
//! At most `MAX_LIVE` pods are live at once (one /26 block). Checks: after every cycle, the ADD
//! results of the live pods are distinct and the allocator holds exactly the live pods with those
//! addresses, and each pod's eth0 address, read from its namespace, is that address. At the end every pod is deleted, the allocator must report 0 used, and so must a
//! fresh open of its checkpoint. Exits non-zero on any duplicate, leak or disagreement.
//!
//! Every namespace is deleted by a guard, even on an error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::Value;
use weft_agent::cni::{CniServer, render_conflist};
use weft_agent::ipam::{AttachmentKey, IpamHandle};
use weft_api::plan::NetworkSettings;

const WEFT_PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");
const BLOCK: &str = "10.250.0.0/26";
const MAX_LIVE: usize = 40;
const DEFAULT_CYCLES: u64 = 1000;
const DEFAULT_SEED: u64 = 0x5eed_cafe_f00d_0001;
const NODE: &str = "chaos-node";
const MTU: u32 = 1400;

// The guard the datapath tests use; this benchmark needs only part of it.
#[allow(dead_code)]
#[path = "../tests/support/netns.rs"]
mod netns;
use netns::Netns;

/// Prefix of this benchmark's namespaces.
const PREFIX: &str = "wchaos";

fn main() -> Result<()> {
    if !is_root() {
        eprintln!("ipam_chaos: skipped, it needs root for network namespaces");
        return Ok(());
    }
    let cycles = env_u64("WEFT_CHAOS_CYCLES", DEFAULT_CYCLES)?;
    let seed = env_u64("WEFT_CHAOS_SEED", DEFAULT_SEED)?;
    let report = std::thread::spawn(move || run(cycles, seed))
        .join()
        .map_err(|_| anyhow!("the benchmark thread panicked"))??;
    println!("{}", report.table());
    if report.failed() {
        bail!(
            "ipam_chaos failed: {} duplicates, {} leaks, {} disagreements",
            report.duplicates,
            report.leaks,
            report.disagreements
        );
    }
    Ok(())
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}

/// xorshift64*: enough randomness for picking actions, and repeatable from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(if seed == 0 { DEFAULT_SEED } else { seed })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11) % n.max(1)
    }
}

/// The IPv4 addresses on eth0, read from the namespace.
fn eth0_addresses(ns: &Netns) -> Result<Vec<Ipv4Addr>> {
    let text = ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
    let mut addresses = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == "inet"
                && let Some(cidr) = words.next()
            {
                let ip = cidr.split('/').next().unwrap_or(cidr);
                addresses.push(ip.parse().with_context(|| format!("{ip} from ip addr is not IPv4"))?);
            }
        }
    }
    Ok(addresses)
}

struct Pod {
    name: String,
    container_id: String,
    netns: Netns,
}

/// The in-process agent: the allocator and its socket server task, killable.
struct Agent {
    state_dir: PathBuf,
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
    ipam: Option<IpamHandle>,
    task: Option<tokio::task::JoinHandle<Result<(), weft_agent::cni::ServeError>>>,
}

impl Agent {
    fn start(state_dir: PathBuf, socket: PathBuf) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("a tokio runtime")?;
        let mut agent = Self { state_dir, socket, runtime, ipam: None, task: None };
        agent.serve()?;
        agent.ipam()?.set_blocks(vec![BLOCK.parse().context("block")?]).context("setting the block")?;
        Ok(agent)
    }

    /// Opens the allocator from the checkpoint and serves the socket.
    fn serve(&mut self) -> Result<()> {
        let ipam = IpamHandle::open(&self.state_dir, NODE).context("opening the allocator")?;
        ipam.set_mtu(MTU);
        let server = self
            .runtime
            .block_on(async { CniServer::bind(&self.socket) })
            .context("binding the CNI socket")?;
        self.task = Some(self.runtime.spawn(server.run(ipam.clone())));
        self.ipam = Some(ipam);
        Ok(())
    }

    /// Kills the agent (no shutdown step: the task is aborted and the allocator dropped as it is),
    /// then starts it again from the state directory.
    fn kill_and_restart(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait until the aborted task is gone, so its clone of the old allocator is dropped.
            let _ = self.runtime.block_on(task);
        }
        self.ipam = None;
        self.serve()
    }

    fn ipam(&self) -> Result<&IpamHandle> {
        self.ipam.as_ref().context("the agent is not running")
    }
}

/// Runs `weft-cni` for `pod` as a runtime does, on this thread's (the node's) namespace.
fn invoke(conf: &Value, command: &str, pod: &Pod) -> Result<Value> {
    let netns = pod.netns.path();
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=chaos;K8S_POD_NAME={}", pod.name);
    let mut child = Command::new(WEFT_PLUGIN)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", &args)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running weft-cni")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(conf.to_string().as_bytes())
        .context("writing the configuration")?;
    let out = child.wait_with_output().context("waiting for weft-cni")?;
    ensure!(
        out.status.success(),
        "{command} of {} failed: {}{}",
        pod.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).context("a result that is not JSON")
}

fn address_of(result: &Value) -> Result<Ipv4Addr> {
    let address = result["ips"][0]["address"].as_str().with_context(|| format!("no address in {result}"))?;
    let ip = address.split('/').next().unwrap_or(address);
    ip.parse().with_context(|| format!("{address} is not an IPv4 address"))
}

#[derive(Default)]
struct Report {
    cycles: u64,
    seed: u64,
    adds: u64,
    dels: u64,
    final_dels: u64,
    kills: u64,
    max_live: usize,
    namespace_checks: u64,
    duplicates: u64,
    leaks: u64,
    disagreements: u64,
    wall_secs: f64,
}

impl Report {
    fn failed(&self) -> bool {
        self.duplicates > 0 || self.leaks > 0 || self.disagreements > 0
    }

    fn table(&self) -> String {
        format!(
            "IPAM chaos on one node, one /26 block, ≤ {MAX_LIVE} live pods (command: `cargo bench -p weft-agent \
             --bench ipam_chaos`, seed {:#x})\n\n\
             | cycles | ADD | DEL | agent kills | max live pods | namespace checks | duplicates | leaks | \
             allocator/pod disagreements | wall time |\n\
             |---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} (+{} at the end) | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.seed,
            self.cycles,
            self.adds,
            self.dels,
            self.final_dels,
            self.kills,
            self.max_live,
            self.namespace_checks,
            self.duplicates,
            self.leaks,
            self.disagreements,
            self.wall_secs,
        )
    }
}

/// A live pod and the address its ADD returned.
struct Live {
    pod: Pod,
    ip: Ipv4Addr,
}

/// Counts duplicates among the live pods' addresses (as the ADDs returned them and as read from the
/// pods' namespaces) and disagreements between those and the allocator.
fn check(agent: &Agent, live: &BTreeMap<u64, Live>, report: &mut Report) -> Result<()> {
    let mut seen = BTreeSet::new();
    for l in live.values() {
        if !seen.insert(l.ip) {
            report.duplicates += 1;
            eprintln!("duplicate: {} also holds {}", l.pod.name, l.ip);
        }
    }
    let snapshot = agent.ipam()?.snapshot();
    if snapshot.len() != live.len() {
        report.disagreements += 1;
        eprintln!("the allocator holds {} attachments for {} live pods", snapshot.len(), live.len());
    }
    for l in live.values() {
        let key = AttachmentKey::new(&l.pod.container_id, "eth0");
        match snapshot.get(&key) {
            Some(a) if a.ip == l.ip => {}
            other => {
                report.disagreements += 1;
                eprintln!("{}: ADD gave {}, the allocator has {:?}", l.pod.name, l.ip, other.map(|a| a.ip));
            }
        }
    }
    report.namespace_checks += 1;
    let mut in_namespaces = BTreeSet::new();
    for l in live.values() {
        let addresses = eth0_addresses(&l.pod.netns)?;
        if addresses != [l.ip] {
            report.disagreements += 1;
            eprintln!("{}: ADD gave {}, eth0 has {addresses:?}", l.pod.name, l.ip);
        }
        for ip in addresses {
            if !in_namespaces.insert(ip) {
                report.duplicates += 1;
                eprintln!("duplicate in the namespaces: {} also has {ip}", l.pod.name);
            }
        }
    }
    Ok(())
}

fn used(ipam: &IpamHandle) -> u64 {
    ipam.usage().iter().map(|u| u.used).sum()
}

/// Everything on this thread, which moves into the node's namespace (so the plugin it runs starts
/// there); the runtime's threads stay where they are, which the Unix socket does not mind.
fn run(cycles: u64, seed: u64) -> Result<Report> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let state_dir = dir.path().join("ipam");
    let socket = dir.path().join("cni.sock");
    let mut agent = Agent::start(state_dir.clone(), socket.clone())?;

    // The network configuration as the runtime hands it to the plugin.
    let settings = NetworkSettings { mtu: MTU, ..Default::default() };
    let list = render_conflist(&settings, &socket);
    let mut conf = list["plugins"][0].clone();
    let obj = conf.as_object_mut().context("a plugin configuration that is not an object")?;
    obj.insert("name".into(), list["name"].clone());
    obj.insert("cniVersion".into(), list["cniVersion"].clone());

    let node = Netns::new(PREFIX, "node")?;
    let node_ns = std::fs::File::open(node.path()).context("opening the node's namespace")?;
    nix::sched::setns(&node_ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .context("entering the node's namespace")?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling forwarding on the node")?;

    let mut rng = Rng::new(seed);
    let mut report = Report { cycles, seed, ..Default::default() };
    // Dropped before `node`: every pod namespace goes first.
    let mut live: BTreeMap<u64, Live> = BTreeMap::new();
    let mut next_pod = 0_u64;
    let start = Instant::now();
    for _ in 0..cycles {
        // 50% ADD, 38% DEL, 12% kill; ADD when empty, DEL when full.
        let roll = rng.below(100);
        let action = if live.is_empty() && roll < 88 {
            0
        } else if live.len() >= MAX_LIVE && roll < 88 {
            1
        } else if roll < 50 {
            0
        } else if roll < 88 {
            1
        } else {
            2
        };
        match action {
            0 => {
                let i = next_pod;
                next_pod += 1;
                let netns = Netns::new(PREFIX, &format!("p{i}"))?;
                let pod = Pod {
                    name: format!("pod-{i}"),
                    container_id: format!("chaos{}{i:06}", std::process::id()),
                    netns,
                };
                let result = invoke(&conf, "ADD", &pod)?;
                let ip = address_of(&result)?;
                live.insert(i, Live { pod, ip });
                report.adds += 1;
            }
            1 => {
                let nth = rng.below(live.len() as u64) as usize;
                let key = *live.keys().nth(nth).context("no live pod to delete")?;
                let gone = live.remove(&key).context("no live pod to delete")?;
                invoke(&conf, "DEL", &gone.pod)?;
                drop(gone);
                report.dels += 1;
            }
            _ => {
                agent.kill_and_restart()?;
                report.kills += 1;
            }
        }
        report.max_live = report.max_live.max(live.len());
        check(&agent, &live, &mut report)?;
    }

    // Every pod deleted: nothing may stay allocated, in memory or in the checkpoint.
    for (_, gone) in std::mem::take(&mut live) {
        invoke(&conf, "DEL", &gone.pod)?;
        report.final_dels += 1;
    }
    let after_del = used(agent.ipam()?);
    agent.kill_and_restart()?;
    let after_reload = used(agent.ipam()?);
    if after_del > 0 || after_reload > 0 {
        eprintln!("leaked: {after_del} used after deleting every pod, {after_reload} after reloading");
    }
    report.leaks = after_del + after_reload;
    report.wall_secs = start.elapsed().as_secs_f64();
    drop(node);
    if let Some(task) = agent.task.take() {
        task.abort();
    }
    agent.runtime.shutdown_background();
    Ok(report)
}
