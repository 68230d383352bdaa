//! CNI ADD latency on one node: `weft-cni` (its agent socket served in-process, one /24 block)
//! against the reference `bridge` + `host-local` plugins, in the same run.
//!
//! `cargo bench -p weft-agent --bench cni_add` (root: it makes network namespaces). The "node" is a
//! network namespace this benchmark creates, and every pod is one too; nothing is done in the real
//! root namespace. Each network is a conflist in a temporary directory, and the plugins are run as a
//! container runtime runs them: the binary executed in the node's namespace with the `CNI_*`
//! environment and the network configuration (name and cniVersion from the list) on stdin. The
//! time of one ADD is from the exec to the plugin's exit with its result read.
//!
//! Two phases, each over 100 pods per plugin:
//! - latency: the two plugins interleaved pod by pod (which one goes first alternates), so the
//!   machine's noise hits both; p50 and p99 of ADD (and DEL);
//! - wall time: 100 sequential ADDs of one plugin, then 100 of the other, twice in A B B A order;
//!   the time until all 100 pods have addresses (namespace creation is not included: the runtime
//!   makes the sandbox before it calls CNI).
//!
//! Everything is deleted (DEL of every pod, then every namespace) by guards, even on an error.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use weft_agent::cni::{CniServer, render_conflist};
use weft_agent::ipam::IpamHandle;
use weft_api::plan::NetworkSettings;

const WEFT_PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");
const REFERENCE_DIR: &str = "/usr/lib/cni";
const PODS: usize = 100;
const WEFT_BLOCK: &str = "10.250.0.0/24";
const REFERENCE_SUBNET: &str = "10.251.0.0/24";
const MTU: u32 = 1400;

// The guard the datapath tests use; this benchmark needs only part of it.
#[allow(dead_code)]
#[path = "../tests/support/netns.rs"]
mod netns;
use netns::Netns;

/// Prefix of this benchmark's namespaces.
const PREFIX: &str = "wbench";

fn main() -> Result<()> {
    if !is_root() {
        eprintln!("cni_add: skipped, it needs root for network namespaces");
        return Ok(());
    }
    for plugin in ["bridge", "host-local"] {
        if !Path::new(REFERENCE_DIR).join(plugin).exists() {
            eprintln!("cni_add: skipped, the reference plugin {REFERENCE_DIR}/{plugin} is not installed");
            return Ok(());
        }
    }
    let report = std::thread::spawn(run).join().map_err(|_| anyhow!("the benchmark thread panicked"))??;
    println!("{report}");
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}

/// One network as a runtime sees it: a conflist and the directories to find its plugins in.
struct Network {
    label: &'static str,
    conflist: Value,
    cni_path: String,
}

impl Network {
    /// Reads the conflist back from its file, as the runtime does.
    fn load(label: &'static str, file: &Path, cni_path: String) -> Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let conflist = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        Ok(Self { label, conflist, cni_path })
    }

    /// Each plugin's configuration as the runtime hands it over: the list's `name` and
    /// `cniVersion` added, and the previous plugin's result as `prevResult` when chained.
    fn plugin_configs(&self) -> Result<Vec<Value>> {
        let plugins = self.conflist["plugins"].as_array().context("conflist without plugins")?;
        plugins
            .iter()
            .map(|p| {
                let mut conf = p.clone();
                let obj = conf.as_object_mut().context("a plugin configuration that is not an object")?;
                obj.insert("name".into(), self.conflist["name"].clone());
                obj.insert("cniVersion".into(), self.conflist["cniVersion"].clone());
                Ok(conf)
            })
            .collect()
    }

    fn find(&self, plugin_type: &str) -> Result<PathBuf> {
        self.cni_path
            .split(':')
            .map(|d| Path::new(d).join(plugin_type))
            .find(|p| p.exists())
            .with_context(|| format!("plugin {plugin_type} not in {}", self.cni_path))
    }

    /// Runs `command` for `pod` through the whole list (in reverse for DEL). Returns the final
    /// result.
    fn invoke(&self, command: &str, pod: &Pod) -> Result<Value> {
        let mut configs = self.plugin_configs()?;
        if command == "DEL" {
            configs.reverse();
        }
        let mut prev = Value::Null;
        for mut conf in configs {
            if command == "ADD"
                && !prev.is_null()
                && let Some(obj) = conf.as_object_mut()
            {
                obj.insert("prevResult".into(), prev.clone());
            }
            let plugin_type = conf["type"].as_str().context("a plugin without a type")?.to_string();
            let binary = self.find(&plugin_type)?;
            let netns = pod.netns.path();
            let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={}", pod.name);
            let mut child = Command::new(&binary)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", &pod.container_id)
                .env("CNI_NETNS", &netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_ARGS", &args)
                .env("CNI_PATH", &self.cni_path)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("running {}", binary.display()))?;
            child
                .stdin
                .take()
                .context("no stdin")?
                .write_all(conf.to_string().as_bytes())
                .context("writing the configuration")?;
            let out = child.wait_with_output().context("waiting for the plugin")?;
            if !out.status.success() {
                bail!(
                    "{} {command} of {} failed: {}{}",
                    self.label,
                    pod.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if !out.stdout.is_empty() {
                prev = serde_json::from_slice(&out.stdout).context("a result that is not JSON")?;
            }
        }
        Ok(prev)
    }
}

struct Pod {
    name: String,
    container_id: String,
    netns: Netns,
}

/// The pods of one network that have had an ADD and no DEL yet; DEL of each on drop.
struct Attached<'a> {
    network: &'a Network,
    pods: BTreeSet<usize>,
    all: &'a [Pod],
}

impl<'a> Attached<'a> {
    fn new(network: &'a Network, all: &'a [Pod]) -> Self {
        Self { network, pods: BTreeSet::new(), all }
    }

    /// ADD of pod `i`: its duration and address.
    fn add(&mut self, i: usize) -> Result<(Duration, String)> {
        let pod = self.all.get(i).context("no such pod")?;
        self.pods.insert(i);
        let start = Instant::now();
        let result = self.network.invoke("ADD", pod)?;
        let took = start.elapsed();
        let address = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("{}: no address in the result {result}", self.network.label))?;
        Ok((took, address.to_string()))
    }

    fn del(&mut self, i: usize) -> Result<Duration> {
        let pod = self.all.get(i).context("no such pod")?;
        let start = Instant::now();
        self.network.invoke("DEL", pod)?;
        let took = start.elapsed();
        self.pods.remove(&i);
        Ok(took)
    }

    fn del_all(&mut self) -> Result<()> {
        for i in std::mem::take(&mut self.pods) {
            self.del(i)?;
        }
        Ok(())
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        for &i in &self.pods {
            if let Some(pod) = self.all.get(i) {
                let _ = self.network.invoke("DEL", pod);
            }
        }
    }
}

fn pods(tag: &str, n: usize) -> Result<Vec<Pod>> {
    (0..n)
        .map(|i| {
            let netns = Netns::new(PREFIX, &format!("{tag}{i}"))?;
            let container_id = format!("{}{i:04}{}", tag, std::process::id());
            Ok(Pod { name: format!("{tag}-{i}"), container_id, netns })
        })
        .collect()
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() { "-".into() } else { format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64()) }
}

/// Everything on this thread, which moves into the node's namespace (so the plugins it runs start
/// there, as the runtime's do on a node); the process's other threads stay where they are.
fn run() -> Result<String> {
    let dir = tempfile::tempdir().context("a temporary directory")?;

    // The agent: allocator with one /24 and the socket server, in-process.
    let ipam = IpamHandle::open(&dir.path().join("ipam"), "bench-node").context("opening the allocator")?;
    ipam.set_blocks(vec![WEFT_BLOCK.parse().context("block")?]).context("setting the block")?;
    ipam.set_mtu(MTU);
    let socket = dir.path().join("cni.sock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("a tokio runtime")?;
    let server = runtime.block_on(async { CniServer::bind(&socket) }).context("binding the CNI socket")?;
    runtime.spawn(server.run(ipam.clone()));

    // The two conflists, each in its own directory.
    let weft_dir = dir.path().join("weft.d");
    let reference_dir = dir.path().join("reference.d");
    std::fs::create_dir_all(&weft_dir)?;
    std::fs::create_dir_all(&reference_dir)?;
    let settings = NetworkSettings { mtu: MTU, ..Default::default() };
    let weft_list = render_conflist(&settings, &socket);
    std::fs::write(weft_dir.join("10-weft.conflist"), serde_json::to_vec_pretty(&weft_list)?)?;
    let reference_list = json!({
        "cniVersion": "1.0.0",
        "name": "reference",
        "plugins": [{
            "type": "bridge",
            "bridge": "wbench0",
            "isGateway": true,
            "ipMasq": false,
            "mtu": MTU,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": REFERENCE_SUBNET }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": dir.path().join("host-local"),
            },
        }],
    });
    std::fs::write(reference_dir.join("10-reference.conflist"), serde_json::to_vec_pretty(&reference_list)?)?;
    let weft_bin = Path::new(WEFT_PLUGIN).parent().context("plugin directory")?.display().to_string();
    let weft =
        Network::load("weft-cni", &weft_dir.join("10-weft.conflist"), format!("{weft_bin}:{REFERENCE_DIR}"))?;
    let reference = Network::load(
        "bridge + host-local",
        &reference_dir.join("10-reference.conflist"),
        REFERENCE_DIR.into(),
    )?;

    // The node and the pods (declared before the guards that DEL, so those drop first).
    let node = Netns::new(PREFIX, "node")?;
    let weft_pods = pods("w", PODS)?;
    let reference_pods = pods("r", PODS)?;
    let node_ns = std::fs::File::open(node.path()).context("opening the node's namespace")?;
    nix::sched::setns(&node_ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .context("entering the node's namespace")?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling forwarding on the node")?;

    let mut on_weft = Attached::new(&weft, &weft_pods);
    let mut on_reference = Attached::new(&reference, &reference_pods);

    // Warm-up (page cache, the bridge's creation): one pod each, then DEL.
    on_weft.add(0)?;
    on_reference.add(0)?;
    on_weft.del_all()?;
    on_reference.del_all()?;

    // Phase 1: interleaved, pod by pod.
    let (mut weft_add, mut reference_add) = (Vec::new(), Vec::new());
    let (mut weft_addresses, mut reference_addresses) = (BTreeSet::new(), BTreeSet::new());
    for i in 0..PODS {
        let weft_first = i % 2 == 0;
        for turn in 0..2 {
            if (turn == 0) == weft_first {
                let (took, address) = on_weft.add(i)?;
                weft_add.push(took);
                weft_addresses.insert(address);
            } else {
                let (took, address) = on_reference.add(i)?;
                reference_add.push(took);
                reference_addresses.insert(address);
            }
        }
    }
    ensure!(weft_addresses.len() == PODS, "weft-cni handed out {} distinct addresses", weft_addresses.len());
    ensure!(
        reference_addresses.len() == PODS,
        "the reference handed out {} distinct addresses",
        reference_addresses.len()
    );
    let (mut weft_del, mut reference_del) = (Vec::new(), Vec::new());
    for i in 0..PODS {
        weft_del.push(on_weft.del(i)?);
        reference_del.push(on_reference.del(i)?);
    }
    ensure!(ipam.usage().iter().all(|u| u.used == 0), "weft-cni left addresses allocated");

    // Phase 2: wall time of 100 sequential ADDs, A B B A.
    let (mut weft_wall, mut reference_wall) = (Vec::new(), Vec::new());
    for round in 0..4 {
        let weft_turn = round == 0 || round == 3;
        let attached = if weft_turn { &mut on_weft } else { &mut on_reference };
        let start = Instant::now();
        for i in 0..PODS {
            attached.add(i)?;
        }
        let wall = start.elapsed();
        attached.del_all()?;
        if weft_turn { weft_wall.push(wall) } else { reference_wall.push(wall) }
    }
    ensure!(ipam.usage().iter().all(|u| u.used == 0), "weft-cni left addresses allocated");
    drop(on_weft);
    drop(on_reference);
    drop(weft_pods);
    drop(reference_pods);
    drop(node);
    runtime.shutdown_background();

    let max = |v: &[Duration]| v.iter().copied().max().unwrap_or_default();
    let (w50, w99, r50, r99) = (
        percentile(&weft_add, 50.0),
        percentile(&weft_add, 99.0),
        percentile(&reference_add, 50.0),
        percentile(&reference_add, 99.0),
    );
    let (wd50, rd50) = (percentile(&weft_del, 50.0), percentile(&reference_del, 50.0));
    let mut out = String::new();
    out.push_str(&format!(
        "CNI ADD on one node, {PODS} sequential pods per plugin, interleaved (command: `cargo bench -p \
         weft-agent --bench cni_add`)\n\n"
    ));
    out.push_str(
        "| plugin | ADD p50 | ADD p99 | DEL p50 | all 100 pods addressed (wall, 2 runs, worst) |\n\
         |---|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| weft-cni (agent socket, /24 block) | {} | {} | {} | {} / {} ({}) |\n",
        ms(w50),
        ms(w99),
        ms(wd50),
        ms(weft_wall[0]),
        ms(weft_wall[1]),
        ms(max(&weft_wall)),
    ));
    out.push_str(&format!(
        "| bridge + host-local ({REFERENCE_DIR}) | {} | {} | {} | {} / {} ({}) |\n",
        ms(r50),
        ms(r99),
        ms(rd50),
        ms(reference_wall[0]),
        ms(reference_wall[1]),
        ms(max(&reference_wall)),
    ));
    out.push_str(&format!(
        "| ratio weft / reference | {} | {} | {} | {} |\n",
        ratio(w50, r50),
        ratio(w99, r99),
        ratio(wd50, rd50),
        ratio(max(&weft_wall), max(&reference_wall)),
    ));
    Ok(out)
}
