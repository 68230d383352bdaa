//! The test cluster's certificates, made with rcgen (P-256 keys throughout, the service-account
//! signing key too: the API server signs ES256 tokens), and kubeconfigs that reference them.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

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

    /// Creates the CA, the API server's and the plan service's serving certificates, the admin,
    /// controller-manager and scheduler client certificates and the service-account key pair.
    pub fn create(
        dir: &Path,
        cluster: &str,
        apiserver_ips: &[Ipv4Addr],
        plan_ips: &[Ipv4Addr],
    ) -> Result<Pki> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki { dir: dir.to_path_buf() };
        let ca = pki.ca();
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("weft-{cluster}-ca"), None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        write(&ca.cert, &params.self_signed(&ca_key)?.pem())?;
        write(&ca.key, &ca_key.serialize_pem())?;

        let mut sans: Vec<SanType> = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .iter()
        .map(|d| dns_name(d))
        .collect::<Result<_>>()?;
        sans.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        sans.extend(apiserver_ips.iter().map(|ip| SanType::IpAddress((*ip).into())));
        pki.issue("apiserver", "kube-apiserver", None, Usage::Server { sans })?;
        // The operator's plan service listens on the bridge address (a process there) or on the
        // addresses of the nodes its replicas run on (real nodes).
        let mut plan_sans = vec![dns_name("localhost")?, dns_name("weft-operator.weft-system.svc")?];
        plan_sans.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        plan_sans.extend(apiserver_ips.iter().chain(plan_ips).map(|ip| SanType::IpAddress((*ip).into())));
        pki.issue("plan", "weft-operator", None, Usage::Server { sans: plan_sans })?;
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
        let sa = KeyPair::generate()?;
        write(&pki.sa_key(), &sa.serialize_pem())?;
        write(&pki.sa_pub(), &sa.public_key_pem())?;
        Ok(pki)
    }

    /// Issues a client certificate `<stem>.crt` for `cn` (in group `org`) signed by the CA.
    pub fn client(&self, stem: &str, cn: &str, org: Option<&str>) -> Result<CertPair> {
        self.issue(stem, cn, org, Usage::Client)
    }

    fn issue(&self, stem: &str, cn: &str, org: Option<&str>, usage: Usage) -> Result<CertPair> {
        let pair = self.pair(stem);
        let ca = self.ca();
        let read =
            |path: &Path| fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
        let issuer = Issuer::from_ca_cert_pem(&read(&ca.cert)?, KeyPair::from_pem(&read(&ca.key)?)?)
            .with_context(|| format!("the CA in {}", ca.cert.display()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn, org);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        match usage {
            Usage::Client => params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server { sans } => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                params.subject_alt_names = sans;
            }
        }
        write(&pair.cert, &params.signed_by(&key, &issuer)?.pem())?;
        write(&pair.key, &key.serialize_pem())?;
        Ok(pair)
    }
}

enum Usage {
    Client,
    Server { sans: Vec<SanType> },
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(org) = org {
        name.push(DnType::OrganizationName, org);
    }
    name.push(DnType::CommonName, cn);
    name
}

fn dns_name(name: &str) -> Result<SanType> {
    Ok(SanType::DnsName(name.try_into()?))
}

/// Writes a PEM file; keys are readable by their owner only.
fn write(path: &Path, pem: &str) -> Result<()> {
    fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
    if pem.contains("PRIVATE KEY") {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl` as an independent judge of what rcgen made.
    fn openssl(args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl runs");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    #[test]
    fn certificates_verify_against_the_ca_for_their_purpose_with_their_names() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let pki =
            Pki::create(dir.path(), "t", &[Ipv4Addr::new(172, 18, 0, 1)], &[Ipv4Addr::new(172, 18, 1, 11)])
                .expect("pki");
        let ca = pki.ca().cert.display().to_string();
        let node = pki.client("node-1", "system:node:node-1", Some("system:nodes")).expect("a later client");
        for (pair, purpose) in [
            (pki.apiserver(), "sslserver"),
            (pki.plan(), "sslserver"),
            (pki.admin(), "sslclient"),
            (pki.kubelet_client(), "sslclient"),
            (node.clone(), "sslclient"),
        ] {
            let cert = pair.cert.display().to_string();
            let (ok, out) = openssl(&["verify", "-CAfile", &ca, "-purpose", purpose, &cert]);
            assert!(ok, "{cert} for {purpose}: {out}");
            let (ok, out) = openssl(&["x509", "-in", &cert, "-noout", "-checkend", "86400"]);
            assert!(ok, "{cert} is valid tomorrow: {out}");
        }
        let (_, wrong) = openssl(&[
            "verify",
            "-CAfile",
            &ca,
            "-purpose",
            "sslserver",
            &pki.admin().cert.display().to_string(),
        ]);
        assert!(
            wrong.contains("unsuitable certificate purpose"),
            "a client certificate serves nothing: {wrong}"
        );
        let (_, text) = openssl(&[
            "x509",
            "-in",
            &pki.apiserver().cert.display().to_string(),
            "-noout",
            "-ext",
            "subjectAltName",
        ]);
        for name in
            ["DNS:kubernetes.default.svc.cluster.local", "IP Address:127.0.0.1", "IP Address:172.18.0.1"]
        {
            assert!(text.contains(name), "{name} in {text}");
        }
        let (_, subject) = openssl(&["x509", "-in", &node.cert.display().to_string(), "-noout", "-subject"]);
        assert!(
            subject.contains("O = system:nodes") && subject.contains("CN = system:node:node-1"),
            "{subject}"
        );
        let (ok, out) = openssl(&["pkey", "-pubin", "-in", &pki.sa_pub().display().to_string(), "-noout"]);
        assert!(ok, "the service-account public key parses: {out}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(pki.sa_key()).expect("sa.key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
