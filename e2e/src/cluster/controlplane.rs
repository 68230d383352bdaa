//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback (the API server
//! also on the underlay bridge address), each with its log in `.weft/<cluster>/logs/`.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::egress;
use super::pki::{Pki, write_kubeconfig};
use super::process::{Launch, ProcRecord, log_tail};
use super::state::{CLUSTER_DOMAIN, ClusterState, SERVICE_CIDR};

/// The server URL of the API server on loopback.
pub fn loopback_server(state: &ClusterState) -> String {
    format!("https://127.0.0.1:{}", state.ports.apiserver)
}

/// The server URL of the API server on the bridge address (what node namespaces use).
pub fn bridge_server(state: &ClusterState) -> String {
    format!("https://{}:{}", state.bridge_ip, state.ports.apiserver)
}

/// Fails clearly when a port the cluster needs is taken on loopback.
pub fn check_ports_free(state: &ClusterState) -> Result<()> {
    let p = state.ports;
    for (what, port) in [
        ("kube-apiserver", p.apiserver),
        ("etcd", p.etcd_client),
        ("etcd peer", p.etcd_peer),
        ("kube-controller-manager", p.controller_manager),
        ("kube-scheduler", p.scheduler),
    ] {
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_err() {
            bail!("port {port} ({what} of cluster {}) is already in use", state.name);
        }
    }
    Ok(())
}

/// Starts etcd and the API server; the caller records them and waits for readiness.
pub fn start_apiserver(state: &ClusterState, pki: &Pki) -> Result<Vec<(ProcRecord, Child)>> {
    let bin = &state.tools_bin_dir;
    let logs = state.logs_dir();
    let dir = &state.dir;
    let p = state.ports;
    let mut started = Vec::new();

    let etcd_data = dir.join("etcd");
    let client_url = format!("http://127.0.0.1:{}", p.etcd_client);
    let peer_url = format!("http://127.0.0.1:{}", p.etcd_peer);
    started.push(
        Launch::new("etcd", bin.join("etcd"), logs.join("etcd.log"))
            .arg(format!("--name=weft-{}", state.name))
            .arg(format!("--data-dir={}", etcd_data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=weft-{}={peer_url}", state.name))
            // A throw-away cluster: durability buys nothing and fsync is slow on shared disks.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn")
            .spawn()?,
    );

    let api = pki.apiserver();
    let ca = pki.ca();
    let mut apiserver =
        Launch::new("kube-apiserver", bin.join("kube-apiserver"), logs.join("kube-apiserver.log"));
    // Pods are only reachable from the nodes: see egress.rs.
    apiserver =
        apiserver.arg(format!("--egress-selector-config-file={}", egress::write_config(state)?.display()));
    started.push(
        apiserver
            .arg(format!("--etcd-servers={client_url}"))
            // One listener for loopback (admin, operator) and the bridge address (nodes).
            .arg("--bind-address=0.0.0.0")
            .arg(format!("--advertise-address={}", state.bridge_ip))
            .arg(format!("--secure-port={}", p.apiserver))
            .arg(format!("--tls-cert-file={}", api.cert.display()))
            .arg(format!("--tls-private-key-file={}", api.key.display()))
            .arg(format!("--client-ca-file={}", ca.cert.display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}"))
            .arg(format!("--service-account-key-file={}", pki.sa_pub().display()))
            .arg(format!("--service-account-signing-key-file={}", pki.sa_key().display()))
            .arg("--allow-privileged=true")
            // Kubelets (real nodes) are reached by their InternalIP (no resolvable hostnames here)
            // with a client certificate they authorize through the API.
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg(format!("--kubelet-client-certificate={}", pki.kubelet_client().cert.display()))
            .arg(format!("--kubelet-client-key={}", pki.kubelet_client().key.display()))
            .arg("--profiling=false")
            .arg(format!("--cert-dir={}", pki.dir.display()))
            .arg("--v=1")
            .spawn()?,
    );
    Ok(started)
}

/// Starts kube-controller-manager and kube-scheduler, once the API server is ready (they read
/// their authentication configuration from it at start).
pub fn start_controllers(state: &ClusterState, pki: &Pki) -> Result<Vec<(ProcRecord, Child)>> {
    let bin = &state.tools_bin_dir;
    let logs = state.logs_dir();
    let dir = &state.dir;
    let p = state.ports;
    let ca = pki.ca();
    let mut started = Vec::new();
    let cm = pki.client("controller-manager", "system:kube-controller-manager", None)?;
    let cm_kubeconfig = dir.join("controller-manager.kubeconfig");
    write_kubeconfig(&cm_kubeconfig, &state.name, &loopback_server(state), &ca.cert, &cm)?;
    started.push(
        Launch::new(
            "kube-controller-manager",
            bin.join("kube-controller-manager"),
            logs.join("kube-controller-manager.log"),
        )
        .arg(format!("--kubeconfig={}", cm_kubeconfig.display()))
        .arg(format!("--authentication-kubeconfig={}", cm_kubeconfig.display()))
        .arg(format!("--authorization-kubeconfig={}", cm_kubeconfig.display()))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={}", p.controller_manager))
        .arg("--controllers=*,-cloud-node-lifecycle-controller,-node-route-controller,-service-lb-controller")
        .arg("--use-service-account-credentials=true")
        .arg(format!("--service-account-private-key-file={}", pki.sa_key().display()))
        .arg(format!("--root-ca-file={}", ca.cert.display()))
        .arg(format!("--cluster-signing-cert-file={}", ca.cert.display()))
        .arg(format!("--cluster-signing-key-file={}", ca.key.display()))
        .arg(format!("--cluster-name=weft-{}", state.name))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--leader-elect=false")
        .arg("--profiling=false")
        .arg(format!("--cert-dir={}", dir.join("controller-manager").display()))
        .arg("--v=1")
        .spawn()?,
    );

    let sched = pki.client("scheduler", "system:kube-scheduler", None)?;
    let sched_kubeconfig = dir.join("scheduler.kubeconfig");
    write_kubeconfig(&sched_kubeconfig, &state.name, &loopback_server(state), &ca.cert, &sched)?;
    started.push(
        Launch::new("kube-scheduler", bin.join("kube-scheduler"), logs.join("kube-scheduler.log"))
            .arg(format!("--kubeconfig={}", sched_kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", sched_kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", sched_kubeconfig.display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", p.scheduler))
            .arg("--leader-elect=false")
            .arg("--profiling=false")
            .arg(format!("--cert-dir={}", dir.join("scheduler").display()))
            .arg("--v=1")
            .spawn()?,
    );
    Ok(started)
}

/// Polls `kubectl get --raw /readyz` until it answers `ok`; on timeout the error carries the
/// API server's last log lines.
pub fn wait_ready(state: &ClusterState, procs: &[ProcRecord], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        for p in procs {
            if !p.is_alive() {
                bail!(
                    "{} exited while the control plane was starting; last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log, 20)
                );
            }
        }
        match kubectl_raw(state, "/readyz") {
            Ok(s) if s.trim() == "ok" => return Ok(()),
            Ok(s) => last = s,
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            let log = state.logs_dir().join("kube-apiserver.log");
            bail!(
                "the API server of cluster {} was not ready after {timeout:?} ({}); last lines of {}:\n{}",
                state.name,
                last.trim(),
                log.display(),
                log_tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn kubectl_raw(state: &ClusterState, path: &str) -> Result<String> {
    super::net::run(
        &state.kubectl_bin().to_string_lossy(),
        [
            "--kubeconfig",
            &state.admin_kubeconfig().to_string_lossy(),
            "--request-timeout=5s",
            "get",
            "--raw",
            path,
        ],
    )
}

/// Whether a binary the control plane needs is missing from the tools directory.
pub fn check_tools(bin: &Path) -> Result<()> {
    for b in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} is missing; run `bash e2e/tools/install.sh` (it builds the pinned binaries)",
                bin.join(b).display()
            );
        }
    }
    Ok(())
}
