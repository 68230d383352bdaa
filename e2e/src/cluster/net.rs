//! The underlay: a bridge in the root namespace per cluster, one network namespace per node
//! attached to it by a veth pair, and routes. Everything goes through `ip`, `sysctl` and
//! `iptables`, entered into a namespace with `nsenter --net` where needed.

use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// Runs a command and returns its stdout; a failure carries the command line and stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
    let out = Command::new(program).args(&args).output();
    let line = || {
        let mut s = program.to_string();
        for a in &args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => bail!("{}: {e}", line()),
    };
    if !out.status.success() {
        bail!("{} failed ({}): {}", line(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip …` in the root namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// `ip -n <ns> …`.
pub fn ip_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", all)
}

/// Runs `program args…` inside network namespace `ns`.
pub fn in_netns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec![net.as_str(), "--", program];
    all.extend_from_slice(args);
    run("nsenter", all)
}

/// Whether a link of that name exists in the root namespace.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Named network namespaces (`/run/netns/*`).
pub fn list_netns() -> Vec<String> {
    let Ok(rd) = fs::read_dir("/run/netns") else { return Vec::new() };
    let mut v: Vec<String> = rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    v.sort();
    v
}

/// Links in the root namespace.
pub fn list_links() -> Vec<String> {
    let Ok(rd) = fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut v: Vec<String> = rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    v.sort();
    v
}

/// Creates the cluster's bridge with its address (idempotent).
pub fn create_bridge(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    if !link_exists(name) {
        ip(&["link", "add", "name", name, "type", "bridge"])?;
    }
    // Keep the root namespace's iptables (docker sets FORWARD to DROP, for instance) out of
    // traffic between nodes; best effort, older kernels lack the option.
    let _ = ip(&["link", "set", name, "type", "bridge", "nf_call_iptables", "0"]);
    let cidr = format!("{addr}/{prefix}");
    let have = ip(&["-4", "-o", "addr", "show", "dev", name])?;
    if !have.contains(&format!(" {cidr} ")) {
        ip(&["addr", "add", &cidr, "dev", name])?;
    }
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Creates network namespace `ns`, attaches it to `bridge` with a veth (`veth` in the root
/// namespace, `eth0` inside), gives it `addr/prefix`, a default route via `gateway`, and turns on
/// forwarding inside.
pub fn create_node_netns(
    ns: &str,
    veth: &str,
    bridge: &str,
    addr: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<()> {
    if Path::new("/run/netns").join(ns).exists() {
        bail!("network namespace {ns} already exists (a leftover? `weft-dev down --all` removes them)");
    }
    ip(&["netns", "add", ns])?;
    if link_exists(veth) {
        ip(&["link", "del", veth])?;
    }
    ip(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
    ip(&["link", "set", veth, "master", bridge])?;
    ip(&["link", "set", veth, "up"])?;
    ip_ns(ns, &["link", "set", "lo", "up"])?;
    ip_ns(ns, &["addr", "add", &format!("{addr}/{prefix}"), "dev", "eth0"])?;
    ip_ns(ns, &["link", "set", "eth0", "up"])?;
    ip_ns(ns, &["route", "add", "default", "via", &gateway.to_string()])?;
    in_netns(ns, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
    Ok(())
}

/// `ip route replace <dst> via <via>` inside `ns`.
pub fn route_via(ns: &str, dst: &str, via: Ipv4Addr) -> Result<()> {
    ip_ns(ns, &["route", "replace", dst, "via", &via.to_string()])?;
    Ok(())
}

/// Deletes a named network namespace (its links go with it); missing is fine.
pub fn delete_netns(ns: &str) -> Result<()> {
    if !Path::new("/run/netns").join(ns).exists() {
        return Ok(());
    }
    ip(&["netns", "del", ns])?;
    Ok(())
}

/// Deletes a root-namespace link; missing is fine.
pub fn delete_link(name: &str) -> Result<()> {
    if link_exists(name)
        && let Err(e) = ip(&["link", "del", name])
        // A veth goes away on its own once the namespace of its peer is freed.
        && link_exists(name)
    {
        return Err(e);
    }
    Ok(())
}

/// Whether a link inside namespace `ns` has its peer in one of the namespaces `targets` (as
/// `ip -o link` reports it: `link-netns <name>`).
pub fn links_into(ns: &str, targets: &[String]) -> bool {
    let Ok(out) = ip_ns(ns, &["-o", "link", "show"]) else { return false };
    out.lines().any(|l| {
        let mut words = l.split_whitespace();
        while let Some(w) = words.next() {
            if w == "link-netns" && words.next().is_some_and(|t| targets.iter().any(|x| x == t)) {
                return true;
            }
        }
        false
    })
}
