//! Certificates generated on the fly with `openssl` (P-256 keys; RSA for the service-account
//! signing key), and kubeconfigs that reference them.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::net::run;

/// Runs `openssl` with mixed string and path arguments.
fn openssl(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<String> {
    run("openssl", args.iter().map(|a| a.as_ref()))
}

/// A certificate and its key.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster's PKI directory (`.weft/<cluster>/pki`).
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca(&self) -> CertPair {
        self.pair("ca")
    }

    pub fn apiserver(&self) -> CertPair {
        self.pair("apiserver")
    }

    /// The API server's client certificate towards kubelets.
    pub fn kubelet_client(&self) -> CertPair {
        self.pair("apiserver-kubelet-client")
    }

    /// The operator's plan service (TLS for the agents' streams).
    pub fn plan(&self) -> CertPair {
        self.pair("plan")
    }

    pub fn admin(&self) -> CertPair {
        self.pair("admin")
    }

    /// The service-account signing key (private) and verification key (public).
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }

    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }

    pub fn pair(&self, stem: &str) -> CertPair {
        CertPair { cert: self.dir.join(format!("{stem}.crt")), key: self.dir.join(format!("{stem}.key")) }
    }

    /// Creates the CA, the API server's and the plan service's serving certificates, the admin, controller-manager and
    /// scheduler client certificates and the service-account key pair.
    pub fn create(
        dir: &Path,
        cluster: &str,
        apiserver_ips: &[Ipv4Addr],
        plan_ips: &[Ipv4Addr],
    ) -> Result<Pki> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki { dir: dir.to_path_buf() };
        let ca = pki.ca();
        genkey(&ca.key)?;
        openssl(&[
            &"req",
            &"-x509",
            &"-new",
            &"-key",
            &ca.key,
            &"-subj",
            &format!("/CN=weft-{cluster}-ca"),
            &"-days",
            &"3650",
            &"-addext",
            &"basicConstraints=critical,CA:TRUE",
            &"-addext",
            &"keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            &"-out",
            &ca.cert,
        ])?;
        let mut sans = String::from(
            "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1",
        );
        for ip in apiserver_ips {
            let _ = write!(sans, ",IP:{ip}");
        }
        pki.issue("apiserver", "kube-apiserver", None, Usage::Server { sans: &sans })?;
        // The operator's plan service listens on the bridge address (a process there) or on the
        // addresses of the nodes its replicas run on (real nodes).
        let mut plan_sans = String::from("DNS:localhost,DNS:weft-operator.weft-system.svc,IP:127.0.0.1");
        for ip in apiserver_ips.iter().chain(plan_ips) {
            let _ = write!(plan_sans, ",IP:{ip}");
        }
        pki.issue("plan", "weft-operator", None, Usage::Server { sans: &plan_sans })?;
        pki.issue("admin", "weft-admin", Some("system:masters"), Usage::Client)?;
        // What the API server presents to kubelets (exec, logs, port-forward), which authorize it
        // with a SubjectAccessReview.
        pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            Usage::Client,
        )?;
        pki.issue("controller-manager", "system:kube-controller-manager", None, Usage::Client)?;
        pki.issue("scheduler", "system:kube-scheduler", None, Usage::Client)?;
        openssl(&[
            &"genpkey",
            &"-algorithm",
            &"RSA",
            &"-pkeyopt",
            &"rsa_keygen_bits:2048",
            &"-out",
            &pki.sa_key(),
        ])?;
        openssl(&[&"pkey", &"-in", &pki.sa_key(), &"-pubout", &"-out", &pki.sa_pub()])?;
        Ok(pki)
    }

    /// Issues a client certificate `<stem>.crt` for `cn` (in group `org`) signed by the CA.
    pub fn client(&self, stem: &str, cn: &str, org: Option<&str>) -> Result<CertPair> {
        self.issue(stem, cn, org, Usage::Client)
    }

    fn issue(&self, stem: &str, cn: &str, org: Option<&str>, usage: Usage<'_>) -> Result<CertPair> {
        let pair = self.pair(stem);
        let ca = self.ca();
        genkey(&pair.key)?;
        let csr = self.dir.join(format!("{stem}.csr"));
        let ext = self.dir.join(format!("{stem}.ext"));
        let subj = match org {
            Some(o) => format!("/O={o}/CN={cn}"),
            None => format!("/CN={cn}"),
        };
        openssl(&[&"req", &"-new", &"-key", &pair.key, &"-subj", &subj, &"-out", &csr])?;
        let mut ext_text = String::from("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n");
        match usage {
            Usage::Client => ext_text.push_str("extendedKeyUsage=clientAuth\n"),
            Usage::Server { sans } => {
                let _ = writeln!(ext_text, "extendedKeyUsage=serverAuth\nsubjectAltName={sans}");
            }
        }
        fs::write(&ext, ext_text)?;
        openssl(&[
            &"x509",
            &"-req",
            &"-in",
            &csr,
            &"-CA",
            &ca.cert,
            &"-CAkey",
            &ca.key,
            &"-days",
            &"825",
            &"-extfile",
            &ext,
            &"-out",
            &pair.cert,
        ])?;
        let _ = fs::remove_file(csr);
        let _ = fs::remove_file(ext);
        Ok(pair)
    }
}

#[derive(Clone, Copy)]
enum Usage<'a> {
    Client,
    Server { sans: &'a str },
}

fn genkey(path: &Path) -> Result<()> {
    openssl(&[&"genpkey", &"-algorithm", &"EC", &"-pkeyopt", &"ec_paramgen_curve:P-256", &"-out", &path])?;
    Ok(())
}

/// Writes a kubeconfig for `server` authenticating with `client`.
pub fn write_kubeconfig(
    path: &Path,
    cluster: &str,
    server: &str,
    ca: &Path,
    client: &CertPair,
) -> Result<()> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: weft-{cluster}\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: weft-{cluster}\n  user:\n    client-certificate: {cert}\n    client-key: {key}\n\
         contexts:\n\
         - name: weft-{cluster}\n  context:\n    cluster: weft-{cluster}\n    user: weft-{cluster}\n\
         current-context: weft-{cluster}\n",
        ca = ca.display(),
        cert = client.cert.display(),
        key = client.key.display(),
    );
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
