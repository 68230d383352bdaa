//! Ingresses, IngressClasses and TLS Secrets → the compiler's model, and what the leader writes
//! back: the ingress nodes' addresses in `status.loadBalancer` and a Warning Event for an Ingress
//! left out of the plans.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};
use weft_api::v1alpha1 as api;

use crate::plan::ingress::UnusableSecret;
use crate::plan::model::{
    BackendRef, Ingress, IngressClass, IngressPath, IngressRule, IngressTls, KeyPair, ObjectKey, PathType,
    PortRef, Settings, TlsSecret,
};

const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The Event reason for an Ingress Weft cannot serve.
pub const REJECTED: &str = "IngressRejected";
/// The Event reason for a served Ingress whose TLS Secret is missing.
pub const TLS_SECRET_MISSING: &str = "TLSSecretMissing";
/// The Event reason for a served Ingress whose TLS Secret holds a pair nginx cannot load.
pub const TLS_SECRET_INVALID: &str = "TLSSecretInvalid";
/// The DER of the named curve secp521r1 (OID 1.3.132.0.35) in a key: nginx loads such keys, ring
/// cannot, so they are left to nginx's judgement.
const P521_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];

pub fn settings(config: &api::NetworkConfig) -> Settings {
    let s = &config.spec.ingress;
    Settings {
        enabled: s.enabled,
        node_selector: s.node_selector.clone(),
        class_name: s.class_name.clone(),
        http_port: s.http_port,
        https_port: s.https_port,
        default_backend: s.default_backend.as_deref().and_then(parse_default_backend),
    }
}

/// `namespace/service:port`, as the NetworkConfig schema enforces.
fn parse_default_backend(s: &str) -> Option<(ObjectKey, PortRef)> {
    let (ns, rest) = s.split_once('/')?;
    let (svc, port) = rest.rsplit_once(':')?;
    let port = match port.parse::<u16>() {
        Ok(n) => PortRef::Number(n),
        Err(_) => PortRef::Name(port.to_string()),
    };
    Some((ObjectKey::new(ns, svc), port))
}

fn backend(b: &networking::IngressBackend) -> Option<BackendRef> {
    let svc = b.service.as_ref()?;
    let port = svc.port.as_ref()?;
    let port = match (&port.name, port.number) {
        (Some(name), _) if !name.is_empty() => PortRef::Name(name.clone()),
        (_, Some(n)) => PortRef::Number(u16::try_from(n).ok()?),
        _ => return None,
    };
    Some(BackendRef { service: svc.name.clone(), port })
}

pub fn ingress(o: &networking::Ingress) -> Ingress {
    let spec = o.spec.clone().unwrap_or_default();
    let class_name =
        spec.ingress_class_name.clone().or_else(|| o.annotations().get(LEGACY_CLASS_ANNOTATION).cloned());
    Ingress {
        key: ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any()),
        class_name,
        created_unix: o.creation_timestamp().map(|t| t.0.as_second()).unwrap_or(0),
        annotations: o
            .annotations()
            .iter()
            .filter(|(k, _)| k.starts_with("nginx.ingress.kubernetes.io/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        default_backend: spec.default_backend.as_ref().and_then(backend),
        rules: spec
            .rules
            .iter()
            .flatten()
            .map(|r| IngressRule {
                host: r.host.clone().unwrap_or_default(),
                paths: r
                    .http
                    .iter()
                    .flat_map(|h| &h.paths)
                    .map(|p| IngressPath {
                        path: p.path.clone().unwrap_or_else(|| "/".into()),
                        path_type: match p.path_type.as_str() {
                            "Exact" => PathType::Exact,
                            "Prefix" => PathType::Prefix,
                            _ => PathType::ImplementationSpecific,
                        },
                        backend: backend(&p.backend),
                    })
                    .collect(),
            })
            .collect(),
        tls: spec
            .tls
            .iter()
            .flatten()
            .map(|t| IngressTls { hosts: t.hosts.clone().unwrap_or_default(), secret: t.secret_name.clone() })
            .collect(),
    }
}

pub fn class(o: &networking::IngressClass) -> IngressClass {
    IngressClass {
        name: o.name_any(),
        controller: o.spec.as_ref().and_then(|s| s.controller.clone()).unwrap_or_default(),
        is_default: o.annotations().get(DEFAULT_CLASS_ANNOTATION).is_some_and(|v| v == "true"),
    }
}

/// A `kubernetes.io/tls` Secret with both keys, its pair checked ([`key_pair_problem`]); `None`
/// for any other Secret.
pub fn secret(o: &core::Secret) -> Option<TlsSecret> {
    if o.type_.as_deref() != Some("kubernetes.io/tls") {
        return None;
    }
    let data = o.data.as_ref()?;
    let (cert, private_key) = (&data.get("tls.crt")?.0, &data.get("tls.key")?.0);
    let pair = match key_pair_problem(cert, private_key) {
        None => Ok(KeyPair { cert: cert.clone(), private_key: private_key.clone() }),
        Some(why) => Err(why),
    };
    Some(TlsSecret { key: ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any()), pair })
}

/// Why nginx would refuse `cert` and `key` (and with them the whole configuration), or `None`:
/// `cert` holds PEM certificates, `key` a PEM private key, and it is the first certificate's key.
/// Only what is sure is refused: a key of a type ring cannot load but OpenSSL can (ECDSA P-521), or
/// a certificate webpki cannot parse, is left to `nginx -t`.
pub fn key_pair_problem(cert: &[u8], key: &[u8]) -> Option<String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = match CertificateDer::pem_slice_iter(cert).collect() {
        Ok(certs) => certs,
        Err(e) => return Some(format!("tls.crt is not PEM: {e}")),
    };
    if certs.is_empty() {
        return Some("tls.crt holds no PEM certificate".into());
    }
    let key = match PrivateKeyDer::from_pem_slice(key) {
        Ok(key) => key,
        Err(e) => return Some(format!("tls.key holds no PEM private key: {e}")),
    };
    if matches!(key, PrivateKeyDer::Pkcs8(_)) && pkcs8_version(key.secret_der()) != Some(0) {
        // OneAsymmetricKey (RFC 5958, with the public key: how ring writes Ed25519 keys) is
        // loaded by ring but not by the OpenSSL nginx runs with.
        return Some(
            "tls.key is a PKCS #8 v2 key, which nginx cannot load (`openssl pkey` writes it as v1)".into(),
        );
    }
    if key.secret_der().windows(P521_OID.len()).any(|w| w == P521_OID) {
        return None;
    }
    let signing = match rustls::crypto::ring::default_provider().key_provider.load_private_key(key) {
        Ok(signing) => signing,
        Err(e) => return Some(format!("tls.key cannot be loaded: {e}")),
    };
    match rustls::sign::CertifiedKey::new(certs, signing).keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Some("tls.key is not the key of the certificate in tls.crt".into())
        }
        _ => None,
    }
}

/// The version of a DER PKCS #8 key: 0 for PrivateKeyInfo, 1 for OneAsymmetricKey.
fn pkcs8_version(der: &[u8]) -> Option<u8> {
    let (&tag, rest) = der.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let rest = if len < 0x80 { rest } else { rest.get(usize::from(len & 0x7f)..)? };
    match (tag, rest) {
        (0x30, [0x02, 0x01, version, ..]) => Some(*version),
        _ => None,
    }
}

/// What the leader needs for Ingress status and Events.
#[derive(Debug, Clone, Default)]
pub struct IngressStatusInputs {
    /// Each Ingress of Weft's class, with why it is left out of the plans (if it is).
    pub ingresses: Vec<(networking::Ingress, Result<(), String>)>,
    /// Served Ingresses naming TLS Secrets that cannot be used.
    pub unusable_secrets: Vec<(networking::Ingress, Vec<UnusableSecret>)>,
    /// The ingress nodes' addresses.
    pub addresses: Vec<Ipv4Addr>,
}

impl IngressStatusInputs {
    pub fn new(
        objects: &BTreeMap<ObjectKey, networking::Ingress>,
        report: &crate::plan::ingress::IngressReport,
    ) -> Self {
        Self {
            ingresses: report
                .ingresses
                .iter()
                .filter_map(|(key, result)| Some((objects.get(key)?.clone(), result.clone())))
                .collect(),
            unusable_secrets: report
                .unusable_secrets
                .iter()
                .filter_map(|(key, secrets)| Some((objects.get(key)?.clone(), secrets.clone())))
                .collect(),
            addresses: report.addresses.clone(),
        }
    }
}

/// The `status.loadBalancer.ingress` a served Ingress should have.
fn desired_addresses(addresses: &[Ipv4Addr]) -> Vec<String> {
    let mut ips: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    ips.sort();
    ips
}

fn current_addresses(o: &networking::Ingress) -> Vec<String> {
    let mut ips: Vec<String> = o
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    ips.sort();
    ips
}

/// Removes the addresses from an Ingress's status (a missing Ingress has none to remove).
async fn clear_addresses(client: &Client, key: &ObjectKey) {
    let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": null } } });
    let api = Api::<networking::Ingress>::namespaced(client.clone(), &key.namespace);
    match api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => info!(ingress = %key, "Ingress no longer served: its addresses removed"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => warn!(error = %e, ingress = %key, "cannot clear Ingress status"),
    }
}

/// Writes what changed: addresses of served Ingresses (and their removal from Ingresses no longer
/// served: rejected, ingress disabled, class gone; `addressed` remembers where they were written),
/// one Warning Event per new rejection or missing TLS Secret (`reported` remembers them, so a
/// steady cluster writes nothing).
pub async fn write_status(
    client: &Client,
    recorder: &Recorder,
    inputs: &IngressStatusInputs,
    reported: &mut HashSet<(ObjectKey, String)>,
    addressed: &mut HashSet<ObjectKey>,
) {
    let mut still_rejected = HashSet::new();
    let mut warn = async |object: &networking::Ingress, reason: &str, note: String| {
        let key = ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any());
        let entry = (key.clone(), note.clone());
        still_rejected.insert(entry.clone());
        if reported.contains(&entry) {
            return;
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        match recorder.publish(&event, &object.object_ref(&())).await {
            Ok(()) => {
                info!(ingress = %key, reason, "Ingress warning: event published");
                reported.insert(entry);
            }
            Err(e) => warn!(error = %e, "cannot publish an Event"),
        }
    };
    for (object, secrets) in &inputs.unusable_secrets {
        for UnusableSecret { name, invalid } in secrets {
            let (reason, note) = match invalid {
                None => (
                    TLS_SECRET_MISSING,
                    format!(
                        "TLS Secret {name} not found (or not a kubernetes.io/tls Secret with tls.crt and tls.key): its hosts are served over HTTP only"
                    ),
                ),
                Some(why) => (
                    TLS_SECRET_INVALID,
                    format!("TLS Secret {name} cannot be used ({why}): its hosts are served over HTTP only"),
                ),
            };
            warn(object, reason, note).await;
        }
    }
    for (object, result) in &inputs.ingresses {
        let key = ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any());
        match result {
            Ok(()) => {
                addressed.insert(key.clone());
                let want = desired_addresses(&inputs.addresses);
                if current_addresses(object) == want {
                    continue;
                }
                let ingress: Vec<serde_json::Value> =
                    want.iter().map(|ip| serde_json::json!({ "ip": ip })).collect();
                let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": ingress } } });
                let api = Api::<networking::Ingress>::namespaced(client.clone(), &key.namespace);
                if let Err(e) =
                    api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await
                {
                    warn!(error = %e, ingress = %key, "cannot write Ingress status");
                }
            }
            Err(reason) => {
                if !current_addresses(object).is_empty() {
                    clear_addresses(client, &key).await;
                }
                addressed.remove(&key);
                warn(object, REJECTED, format!("not served by Weft: {reason}")).await;
            }
        }
    }
    let served: HashSet<ObjectKey> = inputs
        .ingresses
        .iter()
        .filter(|(_, result)| result.is_ok())
        .map(|(o, _)| ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any()))
        .collect();
    let gone: Vec<ObjectKey> = addressed.difference(&served).cloned().collect();
    for key in gone {
        clear_addresses(client, &key).await;
        addressed.remove(&key);
    }
    // A fixed (or deleted) Ingress that breaks again later is reported again.
    reported.retain(|e| still_rejected.contains(e));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backend_takes_a_port_number_or_name() {
        assert_eq!(
            parse_default_backend("default/fallback:80"),
            Some((ObjectKey::new("default", "fallback"), PortRef::Number(80)))
        );
        assert_eq!(
            parse_default_backend("web/fallback:http"),
            Some((ObjectKey::new("web", "fallback"), PortRef::Name("http".into())))
        );
        assert_eq!(parse_default_backend("fallback:80"), None);
    }

    #[test]
    fn an_ingress_converts_with_its_class_paths_and_annotations() {
        let o: networking::Ingress = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                "annotations": {"nginx.ingress.kubernetes.io/rewrite-target": "/$2", "other": "x"}},
            "spec": {"ingressClassName": "weft", "rules": [{"host": "shop.example.com", "http": {"paths": [
                {"path": "/wear", "pathType": "Prefix", "backend": {"service": {"name": "wear", "port": {"number": 8080}}}},
                {"path": "/watch", "pathType": "Exact", "backend": {"service": {"name": "watch", "port": {"name": "http"}}}}
            ]}}], "tls": [{"hosts": ["shop.example.com"], "secretName": "shop-tls"}]}
        }))
        .unwrap_or_default();
        let i = ingress(&o);
        assert_eq!(i.class_name.as_deref(), Some("weft"));
        assert_eq!(i.annotations.len(), 1);
        assert_eq!(i.rules[0].paths[1].path_type, PathType::Exact);
        assert_eq!(
            i.rules[0].paths[1].backend,
            Some(BackendRef { service: "watch".into(), port: PortRef::Name("http".into()) })
        );
        assert_eq!(i.tls[0].secret.as_deref(), Some("shop-tls"));
    }
}

/// The key-pair check against the judge that matters: for each pair of a corpus, the check passes
/// exactly when the real `nginx -t` loads the pair.
#[cfg(test)]
mod key_pair_tests {
    use std::path::Path;

    use super::*;

    fn self_signed(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let params = rcgen::CertificateParams::new(vec!["shop.example.com".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A pair from openssl, as most admins make one (ring, rcgen's backend, makes no RSA keys).
    fn openssl_pair(dir: &Path, newkey: &str) -> (String, String) {
        let (crt, key) = (dir.join("openssl.crt"), dir.join("openssl.key"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                newkey,
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=shop.example.com",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (std::fs::read_to_string(crt).expect("crt"), std::fs::read_to_string(key).expect("key"))
    }

    /// Whether nginx loads `cert` and `key` for an HTTPS server (what it said when not).
    fn nginx_loads(dir: &Path, cert: &str, key: &str) -> Result<(), String> {
        let (crt, k, conf) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("nginx.conf"));
        std::fs::write(&crt, cert).expect("write");
        std::fs::write(&k, key).expect("write");
        let d = dir.display();
        let config = format!(
            "pid {d}/nginx.pid;\nevents {{}}\nhttp {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:8443 ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n  }}\n}}\n",
            crt.display(),
            k.display()
        );
        std::fs::write(&conf, config).expect("write");
        let out = std::process::Command::new("/usr/sbin/nginx")
            .args(["-t", "-q", "-p", &format!("{d}/"), "-e", &format!("{d}/error.log"), "-c"])
            .arg(&conf)
            .output()
            .expect("nginx (installed by make tools)");
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
    }

    /// Every pair `nginx -t` refuses is refused by the check, and the check passes exactly the
    /// pairs nginx can serve with. (A certificate with a key of another type passes `nginx -t`,
    /// which files the key in another slot, yet serves no handshake: the check refuses it too.)
    #[test]
    fn the_check_passes_exactly_the_pairs_nginx_can_serve_with() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let (rsa_cert, rsa_key) = openssl_pair(dir.path(), "rsa:2048");
        let (ed_ossl_cert, ed_ossl_key) = openssl_pair(dir.path(), "ed25519");
        let (ec_cert, ec_key) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (ec384_cert, ec384_key) = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        let (ed_cert, ed_key) = self_signed(&rcgen::PKCS_ED25519);
        let garbage_key = "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n";
        // (what, certificate, key, whether nginx can serve with it)
        let corpus: [(&str, &str, &str, bool); 10] = [
            ("RSA", &rsa_cert, &rsa_key, true),
            ("ECDSA P-256", &ec_cert, &ec_key, true),
            ("ECDSA P-384", &ec384_cert, &ec384_key, true),
            ("Ed25519 from openssl (PKCS #8 v1)", &ed_ossl_cert, &ed_ossl_key, true),
            ("Ed25519 from ring (PKCS #8 v2, which OpenSSL 3.0 refuses)", &ed_cert, &ed_key, false),
            ("an RSA certificate with an ECDSA key", &rsa_cert, &ec_key, false),
            ("an ECDSA certificate with another ECDSA key", &ec_cert, &ec384_key, false),
            ("no certificate", "junk", &rsa_key, false),
            ("no key", &rsa_cert, "junk", false),
            ("a key block of garbage", &rsa_cert, garbage_key, false),
        ];
        for (what, cert, key, serves) in corpus {
            let problem = key_pair_problem(cert.as_bytes(), key.as_bytes());
            let loads = nginx_loads(dir.path(), cert, key);
            assert_eq!(problem.is_none(), serves, "{what}: the check says {problem:?}");
            assert!(
                loads.is_ok() || problem.is_some(),
                "{what}: nginx refuses it ({loads:?}), the check does not"
            );
            assert!(!serves || loads.is_ok(), "{what}: nginx refuses a good pair: {loads:?}");
        }
    }

    #[test]
    fn a_secret_with_a_mismatched_pair_converts_with_the_reason() {
        let (cert, _) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, other_key) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let secret = core::Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("shop-tls".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), k8s_openapi::ByteString(cert.into_bytes())),
                ("tls.key".to_string(), k8s_openapi::ByteString(other_key.into_bytes())),
            ])),
            ..Default::default()
        };
        let converted = secret_of(&secret);
        assert_eq!(converted.pair, Err("tls.key is not the key of the certificate in tls.crt".to_string()));
    }

    fn secret_of(s: &core::Secret) -> TlsSecret {
        secret(s).expect("a kubernetes.io/tls Secret")
    }
}
