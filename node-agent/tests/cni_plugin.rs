//! `weft-cni` against real network namespaces (root): the agent's socket server runs in-process
//! with a small allocator, the plugin runs as the container runtime would run it, inside a "host"
//! namespace the test makes (so nothing touches the real root namespace), and the pods are
//! namespaces too. Every namespace is removed by a guard, even when an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::{Value, json};
use weft_agent::cni::{CniServer, conflist};
use weft_agent::ipam::{AttachmentKey, IpamHandle, PodRef};
use weft_api::plan::NetworkSettings;

mod support;
use support::netns::Netns;
use support::{ok, require_root, run};

const PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");
const GATEWAY: &str = "169.254.1.1";
const BLOCK: &str = "10.250.0.0/29";

/// Prefix of this test's namespaces.
const PREFIX: &str = "wcni";

fn netns(tag: &str) -> Netns {
    Netns::new(PREFIX, tag).unwrap()
}

/// What these tests read from a namespace.
trait Inspect {
    /// `ip -j <args>` in this namespace, parsed.
    fn ip_json(&self, args: &[&str]) -> Value;
    fn has_link(&self, name: &str) -> bool;
}

impl Inspect for Netns {
    fn ip_json(&self, args: &[&str]) -> Value {
        let Ok(out) = self.ip(&[&["-j"][..], args].concat()) else { return Value::Null };
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    fn has_link(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).is_ok()
    }
}

/// The agent's side: the socket server on a tokio runtime, with its allocator; plus the host
/// namespace the plugin runs in.
struct Agent {
    ipam: IpamHandle,
    socket: PathBuf,
    host: Netns,
    dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl Agent {
    fn start(blocks: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ipam = IpamHandle::open(dir.path(), "n1").unwrap();
        ipam.set_blocks(blocks.iter().map(|b| b.parse().unwrap()).collect()).unwrap();
        ipam.set_mtu(1400);
        let socket = dir.path().join("cni.sock");
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let server = runtime.block_on(async { CniServer::bind(&socket) }).unwrap();
        runtime.spawn(server.run(ipam.clone()));
        let host = netns("host");
        ok(host.exec("sh").args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]));
        Self { ipam, socket, host, dir, _runtime: runtime }
    }

    /// Stops the server and starts a fresh allocator and server from the same state dir, as a
    /// killed and restarted agent does.
    fn restart(&mut self) {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        std::mem::replace(&mut self._runtime, runtime).shutdown_background();
        self.ipam = IpamHandle::open(self.dir.path(), "n1").unwrap();
        self.ipam.set_mtu(1400);
        let server = self._runtime.block_on(async { CniServer::bind(&self.socket) }).unwrap();
        self._runtime.spawn(server.run(self.ipam.clone()));
    }

    fn netconf(&self) -> Value {
        json!({ "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni", "socket": self.socket, "mtu": 1400 })
    }

    /// Runs the plugin in the host namespace like a runtime: `CNI_*` env and the config on stdin.
    /// Returns the exit success and stdout parsed (Null when empty).
    fn plugin(&self, command: &str, env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
        let mut cmd = self.host.exec(PLUGIN);
        cmd.env("CNI_COMMAND", command).env("CNI_PATH", "/usr/lib/cni");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout: Value = if out.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
            })
        };
        (out.status.success(), stdout)
    }

    fn call(&self, command: &str, pod: &Pod, conf: &Value) -> (bool, Value) {
        let netns = pod.netns.path();
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}", pod.name);
        self.plugin(
            command,
            &[
                ("CNI_CONTAINERID", &pod.container_id),
                ("CNI_NETNS", netns.to_str().unwrap()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &args),
            ],
            &conf.to_string(),
        )
    }

    fn add(&self, pod: &Pod) -> Value {
        let (success, result) = self.call("ADD", pod, &self.netconf());
        assert!(success, "ADD of {} failed: {result}", pod.name);
        result
    }

    fn host_veth_of(&self, pod: &Pod) -> String {
        weft_agent::plugin::netlink::host_veth_name(&pod.container_id, "eth0")
    }
}

struct Pod {
    name: String,
    container_id: String,
    netns: Netns,
}

impl Pod {
    fn new(name: &str) -> Self {
        let netns = netns(name);
        let container_id = netns.name().replace('-', "");
        Self { name: name.into(), container_id, netns }
    }

    fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, "eth0")
    }

    fn ping(&self, ip: &str) -> bool {
        run(self.netns.exec("ping").args(["-c", "1", "-W", "3", ip])).status.success()
    }
}

fn address_of(result: &Value) -> String {
    let address = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    address.strip_suffix("/32").unwrap_or_else(|| panic!("{address} is not a /32")).to_string()
}

fn error_code(v: &Value) -> u64 {
    v["code"].as_u64().unwrap_or_else(|| panic!("not a CNI error result: {v}"))
}

#[test]
fn pods_get_addresses_reach_each_other_and_are_torn_down() {
    require_root();
    let agent = Agent::start(&[BLOCK]);
    let (p1, p2) = (Pod::new("p1"), Pod::new("p2"));

    let r1 = agent.add(&p1);
    let r2 = agent.add(&p2);
    let (ip1, ip2) = (address_of(&r1), address_of(&r2));
    assert_ne!(ip1, ip2);

    // The result, per spec 1.1.
    assert_eq!(r1["cniVersion"], "1.1.0");
    assert_eq!(r1["interfaces"][0]["name"], agent.host_veth_of(&p1).as_str());
    assert_eq!(r1["interfaces"][1]["name"], "eth0");
    assert_eq!(r1["interfaces"][1]["sandbox"], p1.netns.path().to_str().unwrap());
    assert_eq!(r1["interfaces"][1]["mac"].as_str().unwrap().len(), 17);
    assert_eq!(r1["ips"][0]["interface"], 1);
    assert_eq!(r1["ips"][0]["gateway"], GATEWAY);
    assert_eq!(r1["routes"], json!([{ "dst": "0.0.0.0/0", "gw": GATEWAY }]));

    // The pod: its /32 on eth0 with the configured MTU, and the default route via the gateway.
    let link = &p1.netns.ip_json(&["addr", "show", "dev", "eth0"])[0];
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["operstate"], "UP");
    assert_eq!(link["addr_info"][0]["local"], ip1.as_str());
    assert_eq!(link["addr_info"][0]["prefixlen"], 32);
    let default = &p1.netns.ip_json(&["route", "show", "default"])[0];
    assert_eq!(default["gateway"], GATEWAY);
    assert_eq!(default["dev"], "eth0");
    let lo = &p1.netns.ip_json(&["link", "show", "dev", "lo"])[0];
    assert!(lo["flags"].as_array().unwrap().contains(&json!("UP")));

    // The host: a /32 route to each pod over its veth, with proxy ARP on.
    let veth1 = agent.host_veth_of(&p1);
    let route = &agent.host.ip_json(&["route", "show", &format!("{ip1}/32")])[0];
    assert_eq!(route["dev"], veth1.as_str());
    let proxy_arp = ok(agent.host.exec("cat").arg(format!("/proc/sys/net/ipv4/conf/{veth1}/proxy_arp")));
    assert_eq!(proxy_arp.trim(), "1");

    // Pod to pod through the host, both ways.
    assert!(p1.ping(&ip2), "p1 cannot ping p2 at {ip2}");
    assert!(p2.ping(&ip1), "p2 cannot ping p1 at {ip1}");

    // CHECK passes; a repeated ADD is idempotent.
    let (checked, out) = agent.call("CHECK", &p1, &agent.netconf());
    assert!(checked, "CHECK failed: {out}");
    assert_eq!(address_of(&agent.add(&p1)), ip1);
    assert!(p2.ping(&ip1), "p2 cannot ping p1 again after a repeated ADD");

    // DEL removes the veth and frees the address; a second DEL is still a success.
    let (deleted, out) = agent.call("DEL", &p1, &agent.netconf());
    assert!(deleted, "DEL failed: {out}");
    assert!(!agent.host.has_link(&veth1), "host veth left behind");
    assert!(!p1.netns.has_link("eth0"), "pod end left behind");
    assert_eq!(agent.ipam.get(&p1.key()), None);
    assert!(
        agent.host.ip_json(&["route", "show", &format!("{ip1}/32")]).as_array().is_none_or(Vec::is_empty)
    );
    let (again, out) = agent.call("DEL", &p1, &agent.netconf());
    assert!(again, "second DEL failed: {out}");
    // CHECK of a container the agent no longer knows: code 3.
    let (checked, out) = agent.call("CHECK", &p1, &agent.netconf());
    assert!(!checked);
    assert_eq!(error_code(&out), 3, "{out}");

    let (deleted, out) = agent.call("DEL", &p2, &agent.netconf());
    assert!(deleted, "DEL failed: {out}");
    assert_eq!(agent.ipam.usage()[0].used, 0);
}

#[test]
fn a_restarted_agent_keeps_every_pods_address() {
    require_root();
    let mut agent = Agent::start(&[BLOCK]);
    let (p1, p2) = (Pod::new("r1"), Pod::new("r2"));
    let ip1 = address_of(&agent.add(&p1));
    let ip2 = address_of(&agent.add(&p2));
    agent.restart();
    // The runtime retries an ADD it did not see finish: same address.
    assert_eq!(address_of(&agent.add(&p1)), ip1);
    let (checked, out) = agent.call("CHECK", &p2, &agent.netconf());
    assert!(checked, "CHECK after restart: {out}");
    let p3 = Pod::new("r3");
    let ip3 = address_of(&agent.add(&p3));
    assert!(ip3 != ip1 && ip3 != ip2, "{ip3} handed out twice");
    assert!(p3.ping(&ip2) && p1.ping(&ip3));
    for pod in [&p1, &p2, &p3] {
        let (deleted, out) = agent.call("DEL", pod, &agent.netconf());
        assert!(deleted, "{out}");
    }
    assert_eq!(agent.ipam.usage()[0].used, 0);
}

#[test]
fn the_ninth_pod_on_a_29_gets_the_exhaustion_error() {
    require_root();
    let agent = Agent::start(&[BLOCK]);
    for i in 0..7 {
        let pod = PodRef { namespace: "default".into(), name: format!("filler-{i}"), uid: String::new() };
        agent.ipam.allocate(&AttachmentKey::new(format!("filler{i}"), "eth0"), &pod).unwrap();
    }
    let eighth = Pod::new("p8");
    agent.add(&eighth);
    let ninth = Pod::new("p9");
    let (success, out) = agent.call("ADD", &ninth, &agent.netconf());
    assert!(!success);
    assert_eq!(error_code(&out), 100, "{out}");
    assert_eq!(
        out["details"],
        "node n1: all 8 addresses of its blocks 10.250.0.0/29 are in use; the operator hands out \
         another block when one is free in an IPPool"
    );
    assert!(out["msg"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(!ninth.netns.has_link("eth0"), "nothing is set up for a pod without an address");
    assert!(!agent.host.has_link(&agent.host_veth_of(&ninth)));
    let (deleted, out) = agent.call("DEL", &eighth, &agent.netconf());
    assert!(deleted, "{out}");
}

#[test]
fn failures_are_cni_errors_a_person_can_act_on() {
    require_root();
    let agent = Agent::start(&[]);
    let pod = Pod::new("e1");

    // Malformed stdin: decoding failure.
    let netns = pod.netns.path();
    let env = [
        ("CNI_CONTAINERID", pod.container_id.as_str()),
        ("CNI_NETNS", netns.to_str().unwrap()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (success, out) = agent.plugin("ADD", &env, "{ this is not json");
    assert!(!success);
    assert_eq!(error_code(&out), 6, "{out}");
    assert!(out["details"].as_str().is_some_and(|d| !d.is_empty()), "{out}");

    // A bad setting in the config: invalid network config, naming the setting.
    let mut bad = agent.netconf();
    bad["mtu"] = json!("big");
    let (success, out) = agent.call("ADD", &pod, &bad);
    assert!(!success);
    assert_eq!(error_code(&out), 7, "{out}");
    assert!(out["details"].as_str().unwrap().contains("\"mtu\""), "{out}");

    // No block yet: STATUS says not available, ADD says try again later.
    let (success, out) = agent.plugin("STATUS", &[], &agent.netconf().to_string());
    assert!(!success);
    assert_eq!(error_code(&out), 50, "{out}");
    assert!(out["details"].as_str().unwrap().contains("has no pod address block yet"), "{out}");
    let (success, out) = agent.call("ADD", &pod, &agent.netconf());
    assert!(!success);
    assert_eq!(error_code(&out), 11, "{out}");
    agent.ipam.set_blocks(vec![BLOCK.parse().unwrap()]).unwrap();
    let (success, out) = agent.plugin("STATUS", &[], &agent.netconf().to_string());
    assert!(success, "STATUS with a block: {out}");

    // A missing network namespace on ADD: a clear error, and no address spent on it.
    let gone = Path::new("/run/netns").join(format!("{PREFIX}-gone-{}", std::process::id()));
    let env =
        [("CNI_CONTAINERID", "missingns"), ("CNI_NETNS", gone.to_str().unwrap()), ("CNI_IFNAME", "eth0")];
    let (success, out) = agent.plugin("ADD", &env, &agent.netconf().to_string());
    assert!(!success);
    assert_eq!(error_code(&out), 8, "{out}");
    assert!(out["details"].as_str().unwrap().contains(gone.to_str().unwrap()), "{out}");
    assert_eq!(agent.ipam.usage()[0].used, 0);
    // ... while DEL of it (and of a container never seen) succeeds.
    let (success, out) = agent.plugin("DEL", &env, &agent.netconf().to_string());
    assert!(success, "DEL with a missing netns: {out}");

    // The agent unreachable: try again later, saying what to look at.
    let mut unreachable = agent.netconf();
    let missing_socket = agent.dir.path().join("nobody.sock");
    unreachable["socket"] = json!(missing_socket);
    let (success, out) = agent.call("ADD", &pod, &unreachable);
    assert!(!success);
    assert_eq!(error_code(&out), 11, "{out}");
    let details = out["details"].as_str().unwrap();
    assert!(
        details.contains(missing_socket.to_str().unwrap()) && details.contains("is weft-agent running"),
        "{out}"
    );
    assert!(!pod.netns.has_link("eth0"));

    // The pod already has an eth0 (not ours): the interface error, and nothing left behind.
    pod.netns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "other0"]).unwrap();
    let (success, out) = agent.call("ADD", &pod, &agent.netconf());
    assert!(!success);
    assert_eq!(error_code(&out), 102, "{out}");
    assert!(out["details"].as_str().unwrap().contains("already exists"), "{out}");
    assert_eq!(agent.ipam.usage()[0].used, 0, "the address is given back");
    assert!(!agent.host.has_link(&agent.host_veth_of(&pod)));

    // VERSION lists 1.1.0.
    let (success, out) = agent.plugin("VERSION", &[], "{\"cniVersion\":\"1.1.0\"}");
    assert!(success, "{out}");
    assert_eq!(out["cniVersion"], "1.1.0");
    assert!(out["supportedVersions"].as_array().unwrap().contains(&json!("1.1.0")), "{out}");
}

#[test]
fn gc_releases_addresses_and_veths_of_attachments_that_are_gone() {
    require_root();
    let agent = Agent::start(&[BLOCK]);
    let (keep, stale) = (Pod::new("g1"), Pod::new("g2"));
    let ip_keep = address_of(&agent.add(&keep));
    agent.add(&stale);
    // No list: refused with the spec's "invalid network config" (7), and nothing is released.
    let (success, out) = agent.plugin("GC", &[], &agent.netconf().to_string());
    assert!(!success, "GC without valid-attachments must fail: {out}");
    assert_eq!(out["code"], 7, "{out}");
    assert!(agent.ipam.get(&stale.key()).is_some() && agent.ipam.get(&keep.key()).is_some());
    assert!(agent.host.has_link(&agent.host_veth_of(&stale)));
    let mut conf = agent.netconf();
    conf["cni.dev/valid-attachments"] = json!([{ "containerID": keep.container_id, "ifname": "eth0" }]);
    let (success, out) = agent.plugin("GC", &[], &conf.to_string());
    assert!(success, "GC failed: {out}");
    assert_eq!(agent.ipam.get(&stale.key()), None);
    assert!(!agent.host.has_link(&agent.host_veth_of(&stale)));
    assert_eq!(agent.ipam.get(&keep.key()).map(|a| a.ip.to_string()), Some(ip_keep));
    assert!(agent.host.has_link(&agent.host_veth_of(&keep)));
    let (checked, out) = agent.call("CHECK", &keep, &agent.netconf());
    assert!(checked, "{out}");
    let (deleted, out) = agent.call("DEL", &keep, &agent.netconf());
    assert!(deleted, "{out}");
}

fn cnitool() -> Option<PathBuf> {
    let cached = PathBuf::from("/var/cache/weft/bin/cnitool");
    std::env::var_os("WEFT_CNITOOL").map(PathBuf::from).or(cached.exists().then_some(cached))
}

/// Removes cnitool's cached result of a pod if a failed assertion skipped its DEL.
struct CnitoolPod<'a> {
    agent: &'a Agent,
    pod: Pod,
    env: Vec<(String, String)>,
    tool: PathBuf,
}

impl CnitoolPod<'_> {
    fn run(&self, verb: &str) -> Output {
        let mut cmd = self.agent.host.exec(self.tool.to_str().unwrap());
        cmd.args([verb, "weft", self.pod.netns.path().to_str().unwrap()])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        run(&mut cmd)
    }
}

impl Drop for CnitoolPod<'_> {
    fn drop(&mut self) {
        let _ = self.run("del");
    }
}

#[test]
fn cnitool_add_check_del_through_the_installed_conflist() {
    require_root();
    let tool = cnitool().expect("cnitool is not installed: run `make tools`, or set WEFT_CNITOOL");
    let agent = Agent::start(&[BLOCK]);
    // The conflist and binary exactly as the agent installs them, with portmap chained.
    let settings =
        NetworkSettings { mtu: 1400, cni_chained_plugins: vec!["portmap".into()], ..Default::default() };
    let (conf_dir, bin_dir) = (agent.dir.path().join("net.d"), agent.dir.path().join("bin"));
    let list = conflist::render_conflist(&settings, &agent.socket);
    let installed =
        conflist::install(&conf_dir, &bin_dir, conflist::conflist_name(&settings), &list, Path::new(PLUGIN))
            .unwrap();
    assert!(installed.plugin_updated && installed.conflist_updated);

    let env = vec![
        ("NETCONFPATH".to_string(), conf_dir.display().to_string()),
        ("CNI_PATH".to_string(), format!("{}:/usr/lib/cni", bin_dir.display())),
        ("CNI_ARGS".to_string(), "K8S_POD_NAMESPACE=default;K8S_POD_NAME=c1".to_string()),
    ];
    let pod = CnitoolPod { agent: &agent, pod: Pod::new("c1"), env, tool };
    let out = pod.run("add");
    assert!(
        out.status.success(),
        "cnitool add: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ip = address_of(&result);
    let link = &pod.pod.netns.ip_json(&["addr", "show", "dev", "eth0"])[0];
    assert_eq!(link["addr_info"][0]["local"], ip.as_str());

    let out = pod.run("check");
    assert!(
        out.status.success(),
        "cnitool check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = pod.run("del");
    assert!(
        out.status.success(),
        "cnitool del: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pod.pod.netns.has_link("eth0"));
    assert_eq!(agent.ipam.usage()[0].used, 0);
}
