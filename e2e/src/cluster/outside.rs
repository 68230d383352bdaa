//! A host outside the cluster: a network namespace on the cluster's bridge with its own address,
//! neither a node nor in the pod network. Tests use it as an external client (NodePort,
//! ingress) or an external server (egress, upstream DNS).

use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context as _, Result, ensure};

use super::TestCluster;

/// Dropping it stops what it runs and removes the namespace (with its veth). Named with the
/// cluster's prefix, so the cluster's teardown removes it too if a test is killed.
#[derive(Debug)]
pub struct OutsideHost {
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    children: Vec<Child>,
}

fn ip_cmd(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output()?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

impl OutsideHost {
    /// Host number `n` (1–9) of the cluster: address `172.18.<i>.<240+n>`. It has no route to
    /// the pod network or the service network, as an outside machine would not.
    pub fn start(c: &TestCluster, n: u8) -> Result<OutsideHost> {
        ensure!((1..=9).contains(&n), "outside host number {n} is not within 1..=9");
        let state = c.state();
        let ip = Ipv4Addr::new(172, 18, state.idx, 240 + n);
        ensure!(
            state.nodes.iter().all(|node| node.ip != ip) && state.bridge_ip != ip,
            "{ip} is taken by the cluster"
        );
        let host = OutsideHost {
            netns: format!("{}outside{n}", state.netns_prefix()),
            veth: format!("wv{}x{n}", state.idx),
            ip,
            children: Vec::new(),
        };
        let (netns, veth) = (host.netns.as_str(), host.veth.as_str());
        ip_cmd(&["netns", "add", netns])?;
        ip_cmd(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
        ip_cmd(&["link", "set", veth, "master", &state.bridge])?;
        ip_cmd(&["link", "set", veth, "up"])?;
        ip_cmd(&["-n", netns, "link", "set", "lo", "up"])?;
        ip_cmd(&["-n", netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ip_cmd(&["-n", netns, "link", "set", "eth0", "up"])?;
        Ok(host)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `program args…` inside the namespace, as a command to configure further.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]).args(args).stdin(Stdio::null());
        cmd
    }

    /// Starts a long-running `program args…` inside the namespace; stopped when the host drops.
    /// Its output goes to `log` when given, else nowhere.
    pub fn spawn(&mut self, program: &str, args: &[&str], log: Option<&std::path::Path>) -> Result<()> {
        let mut cmd = self.command(program, args);
        match log {
            Some(path) => {
                let file =
                    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {program} in {}", self.netns))?;
        self.children.push(child);
        Ok(())
    }

    /// Runs `program args…` inside the namespace to completion (a client: curl, dig…).
    pub async fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = tokio::process::Command::from(self.command(program, args));
        cmd.output().await.with_context(|| format!("running {program} in {}", self.netns))
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for args in [vec!["netns", "del", &self.netns], vec!["link", "del", &self.veth]] {
            let _ = Command::new("ip").args(args).stdin(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}
