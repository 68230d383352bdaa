//! What the agent's real-datapath tests share: they run as root, as `make test` does, and fail
//! loudly otherwise — a datapath test that quietly passes without running proves nothing.

use std::process::{Command, Output};

pub mod netns;

use netns::Netns;

/// Runs code inside a namespace of the test (the datapath tests; the CNI tests do not).
#[allow(dead_code)]
pub trait Enter {
    /// Runs `f` on a thread inside this namespace: sockets it creates live here.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T;
}

impl Enter for Netns {
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).expect("the namespace's file");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("the thread inside the namespace")
        })
    }
}

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

/// Routes `pod` from `node` as Weft does: `address/32` in the pod, the gateway 169.254.1.1 on its
/// link, a /32 route and proxy ARP on the node's end.
#[allow(dead_code)]
pub fn attach(node: &Netns, pod: &Netns, host_if: &str, address: &str) {
    node.ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod.name()])
        .expect("ip");
    node.ip(&["link", "set", host_if, "up"]).expect("ip");
    ok(node.exec("sysctl").args(["-qw", &format!("net.ipv4.conf.{host_if}.proxy_arp=1")]));
    node.ip(&["route", "add", &format!("{address}/32"), "dev", host_if]).expect("ip");
    pod.ip(&["addr", "add", &format!("{address}/32"), "dev", "eth0"]).expect("ip");
    pod.ip(&["link", "set", "eth0", "up"]).expect("ip");
    pod.ip(&["route", "add", "169.254.1.1", "dev", "eth0"]).expect("ip");
    // The gateway's address is nobody's: the pod knows its MAC as the node's end of the veth.
    let brief = node.ip(&["-br", "link", "show", "dev", host_if]).expect("ip");
    let mac = brief.split_whitespace().nth(2).expect("the veth's MAC");
    pod.ip(&["neigh", "add", "169.254.1.1", "lladdr", mac, "dev", "eth0", "nud", "permanent"]).expect("ip");
    pod.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]).expect("ip");
}
