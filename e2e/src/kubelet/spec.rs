//! Pure translations from a Pod spec to what the runner does: names, images, argv, environment,
//! resolv.conf and hosts files, and the pod phase. No I/O here, so all of it is unit-tested.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodDNSConfig};

/// Prefix of every pod network namespace name (`/run/netns/wp-…`).
pub const NETNS_PREFIX: &str = "wp-";

/// What the containers get on `PATH` (the usual image default).
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The command a tool image idles with when the manifest gives neither command nor args.
pub(crate) const IDLE_COMMAND: [&str; 2] = ["sleep", "infinity"];

/// The deterministic network namespace name of a pod: `wp-` and the first 12 hex digits of its UID
/// (dashes dropped, lower case). A `hostNetwork` pod gets the same name, attached to the node's
/// namespace, so the rule holds for every pod.
pub fn pod_netns_name(uid: &str) -> String {
    let hex: String =
        uid.chars().filter(char::is_ascii_hexdigit).map(|c| c.to_ascii_lowercase()).take(12).collect();
    format!("{NETNS_PREFIX}{hex}")
}

/// The sandbox id given to CNI as `CNI_CONTAINERID` (and `K8S_POD_INFRA_CONTAINER_ID`): the UID's hex
/// digits, so it is unique per pod and stable across runner restarts.
pub(crate) fn sandbox_id(uid: &str) -> String {
    uid.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
}

/// `CNI_ARGS` as container runtimes pass it for Kubernetes pods.
pub(crate) fn cni_args(namespace: &str, name: &str, uid: &str, infra_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={infra_id};K8S_POD_UID={uid}"
    )
}

/// The pod's hostname as the kubelet computes it: `spec.hostname` or the pod name, cut to 63
/// characters without a trailing `-` or `.`.
pub(crate) fn pod_hostname(pod_name: &str, spec_hostname: Option<&str>) -> String {
    let name = spec_hostname.filter(|h| !h.is_empty()).unwrap_or(pod_name);
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.']).to_string()
}

/// The built-in workload a (well-known) image maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Workload {
    /// `traefik/whoami`: the `weft-whoami` binary next to the runner.
    Whoami,
    /// A shell/tool image: the container's command runs with the host's tools.
    HostTools { image: &'static str },
    /// `pause`: idles.
    Pause,
}

/// Images the runner knows, for the error message of an unknown one.
pub(crate) const SUPPORTED_IMAGES: &str = "traefik/whoami, nicolaka/netshoot, busybox, alpine, \
     curlimages/curl, ubuntu, debian, registry.k8s.io/pause (any tag)";

/// The repository part of an image reference, normalised: Docker Hub registry names and the
/// `library/` prefix dropped, tag and digest removed, lower case. Other registries are kept.
pub(crate) fn image_repository(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let no_tag = match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    };
    let mut parts: Vec<&str> = no_tag.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if matches!(first, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
            parts.remove(0);
        }
    }
    if parts.len() == 2 && parts[0] == "library" {
        parts.remove(0);
    }
    parts.join("/").to_ascii_lowercase()
}

/// Maps an image to its built-in workload, or says why it cannot run.
pub(crate) fn classify_image(image: &str) -> Result<Workload, String> {
    let repo = image_repository(image);
    match repo.as_str() {
        "traefik/whoami" => Ok(Workload::Whoami),
        "nicolaka/netshoot" => Ok(Workload::HostTools { image: "nicolaka/netshoot" }),
        "busybox" => Ok(Workload::HostTools { image: "busybox" }),
        "alpine" => Ok(Workload::HostTools { image: "alpine" }),
        "curlimages/curl" => Ok(Workload::HostTools { image: "curlimages/curl" }),
        "ubuntu" => Ok(Workload::HostTools { image: "ubuntu" }),
        "debian" => Ok(Workload::HostTools { image: "debian" }),
        "registry.k8s.io/pause" | "k8s.gcr.io/pause" => Ok(Workload::Pause),
        _ => Err(format!(
            "image {image:?} cannot be pulled on this machine and has no built-in workload; \
             supported images: {SUPPORTED_IMAGES}"
        )),
    }
}

/// The argv a container runs, from its workload and the manifest's `command`/`args` (the same
/// rules as ENTRYPOINT/CMD: `command` replaces the entrypoint, `args` the CMD).
///
/// `whoami` is the path of the `weft-whoami` binary; `is_executable` tells whether a bare name
/// resolves on the container's PATH (used for curlimages/curl's entrypoint script).
pub(crate) fn container_argv(
    workload: &Workload,
    command: &[String],
    args: &[String],
    whoami: &str,
    is_executable: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let idle = || IDLE_COMMAND.iter().map(|s| (*s).to_string()).collect();
    match workload {
        Workload::Pause => Ok(idle()),
        Workload::Whoami => {
            let mut argv = vec![whoami.to_string()];
            if let Some(first) = command.first() {
                let base = first.rsplit('/').next().unwrap_or(first);
                if base != "whoami" {
                    return Err(format!(
                        "traefik/whoami runs only its own entrypoint (/whoami); command {first:?} is \
                         not supported"
                    ));
                }
                argv.extend(command[1..].iter().cloned());
            }
            argv.extend(args.iter().cloned());
            Ok(argv)
        }
        Workload::HostTools { image } => {
            if !command.is_empty() {
                return Ok(command.iter().chain(args).cloned().collect());
            }
            if args.is_empty() {
                return Ok(idle());
            }
            // curlimages/curl's entrypoint runs `curl "$@"` when the first argument is an option
            // or not a command.
            if *image == "curlimages/curl" && (args[0].starts_with('-') || !is_executable(&args[0])) {
                return Ok(std::iter::once("curl".to_string()).chain(args.iter().cloned()).collect());
            }
            Ok(args.to_vec())
        }
    }
}

/// Kubernetes' `$(VAR)` expansion (as in command, args and env values): a defined variable is
/// replaced, an undefined one is left as written, `$$` escapes a `$`.
pub(crate) fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    let mut literal_start = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            out.push_str(&input[literal_start..i]);
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                }
                b'(' => match input[i + 2..].find(')') {
                    Some(close) => {
                        let name = &input[i + 2..i + 2 + close];
                        match lookup(name) {
                            Some(value) => out.push_str(&value),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        i += 2 + close + 1;
                    }
                    None => {
                        out.push_str("$(");
                        i += 2;
                    }
                },
                _ => {
                    out.push('$');
                    i += 1;
                }
            }
            literal_start = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&input[literal_start..]);
    out
}

/// Facts about a running pod that `fieldRef` env vars and files refer to.
#[derive(Debug, Clone, Default)]
pub(crate) struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub service_account: String,
    pub pod_ips: Vec<IpAddr>,
    pub host_ip: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodFacts {
    pub(crate) fn from_pod(pod: &Pod, node_name: &str, host_ip: &str, pod_ips: &[IpAddr]) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        PodFacts {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            uid: meta.uid.clone().unwrap_or_default(),
            node_name: node_name.to_string(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            pod_ips: pod_ips.to_vec(),
            host_ip: host_ip.to_string(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
        }
    }
}

/// The value of a `fieldRef` path, as the kubelet resolves it.
pub(crate) fn field_ref_value(path: &str, facts: &PodFacts) -> Result<String, String> {
    fn subscript<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
        let rest = path.strip_prefix(prefix)?.strip_prefix("['")?;
        rest.strip_suffix("']")
    }
    let ips = || facts.pod_ips.iter().map(ToString::to_string).collect::<Vec<_>>();
    Ok(match path {
        "metadata.name" => facts.name.clone(),
        "metadata.namespace" => facts.namespace.clone(),
        "metadata.uid" => facts.uid.clone(),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => facts.service_account.clone(),
        "status.podIP" => ips().into_iter().next().unwrap_or_default(),
        "status.podIPs" => ips().join(","),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        _ => {
            if let Some(key) = subscript(path, "metadata.labels") {
                facts.labels.get(key).cloned().unwrap_or_default()
            } else if let Some(key) = subscript(path, "metadata.annotations") {
                facts.annotations.get(key).cloned().unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldRef fieldPath {path:?}"));
            }
        }
    })
}

/// ConfigMap and Secret data the container's env refers to, fetched beforehand
/// (`None` = the object does not exist).
#[derive(Debug, Default, Clone)]
pub(crate) struct EnvSources {
    pub config_maps: BTreeMap<String, Option<BTreeMap<String, String>>>,
    pub secrets: BTreeMap<String, Option<BTreeMap<String, String>>>,
}

/// Names of the ConfigMaps and Secrets a container's env refers to.
pub(crate) fn env_source_names(container: &Container) -> (Vec<String>, Vec<String>) {
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    for from in container.env_from.iter().flatten() {
        if let Some(cm) = &from.config_map_ref {
            cms.push(cm.name.clone());
        }
        if let Some(s) = &from.secret_ref {
            secrets.push(s.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(r) = &from.config_map_key_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &from.secret_key_ref {
                secrets.push(r.name.clone());
            }
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// The container's environment, in order: `base` (PATH, HOSTNAME, service variables), then
/// `envFrom`, then `env` (later entries override earlier ones, `$(VAR)` refers to earlier ones).
/// An error is a `CreateContainerConfigError` message.
pub(crate) fn build_env(
    container: &Container,
    facts: &PodFacts,
    base: &[(String, String)],
    sources: &EnvSources,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = base.to_vec();
    fn set(env: &mut Vec<(String, String)>, key: String, value: String) {
        if let Some(slot) = env.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            env.push((key, value));
        }
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(cm) = &from.config_map_ref {
            ("configmap", &cm.name, cm.optional.unwrap_or(false), sources.config_maps.get(&cm.name))
        } else if let Some(s) = &from.secret_ref {
            ("secret", &s.name, s.optional.unwrap_or(false), sources.secrets.get(&s.name))
        } else {
            continue;
        };
        match data {
            Some(Some(data)) => {
                for (k, v) in data {
                    set(&mut env, format!("{prefix}{k}"), v.clone());
                }
            }
            _ if optional => {}
            _ => return Err(format!("{kind} {name:?} not found")),
        }
    }
    for EnvVar { name, value, value_from } in container.env.iter().flatten() {
        let resolved = if let Some(from) = value_from {
            if let Some(f) = &from.field_ref {
                Some(field_ref_value(&f.field_path, facts)?)
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                match sources.config_maps.get(&r.name) {
                    Some(Some(data)) => match data.get(&r.key) {
                        Some(v) => Some(v.clone()),
                        None if optional => None,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                r.key, facts.namespace, r.name
                            ));
                        }
                    },
                    _ if optional => None,
                    _ => return Err(format!("configmap {:?} not found", r.name)),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                match sources.secrets.get(&r.name) {
                    Some(Some(data)) => match data.get(&r.key) {
                        Some(v) => Some(v.clone()),
                        None if optional => None,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {}/{}",
                                r.key, facts.namespace, r.name
                            ));
                        }
                    },
                    _ if optional => None,
                    _ => return Err(format!("secret {:?} not found", r.name)),
                }
            } else if from.resource_field_ref.is_some() {
                return Err(format!("env {name}: resourceFieldRef is not supported by the weft-e2e runner"));
            } else {
                None
            }
        } else {
            let raw = value.clone().unwrap_or_default();
            let snapshot = env.clone();
            Some(expand(&raw, &|k| snapshot.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())))
        };
        if let Some(v) = resolved {
            set(&mut env, name.clone(), v);
        }
    }
    Ok(env)
}

/// Expands `$(VAR)` in a container's command and args against its final environment.
pub(crate) fn expand_all(items: &[String], env: &[(String, String)]) -> Vec<String> {
    let lookup = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    items.iter().map(|s| expand(s, &lookup)).collect()
}

/// A parsed resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    pub(crate) fn parse(text: &str) -> Self {
        let mut rc = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => rc.nameservers.extend(words.next().map(str::to_string)),
                Some("search") | Some("domain") => {
                    rc.searches = words.map(str::to_string).collect();
                }
                Some("options") => rc.options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        rc
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

/// The inputs of a pod's DNS configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DnsInputs<'a> {
    pub policy: Option<&'a str>,
    pub host_network: bool,
    pub namespace: &'a str,
    pub cluster_dns: Option<&'a str>,
    pub cluster_domain: &'a str,
    pub dns_config: Option<&'a PodDNSConfig>,
    /// The node's own resolv.conf text.
    pub host_resolv: &'a str,
}

/// The pod's resolv.conf per the kubelet's rules (dnsPolicy, dnsConfig), as a kubelet configured
/// without host search domains would write it. `None`: the pod keeps the node's file.
pub(crate) fn pod_resolv_conf(inputs: DnsInputs<'_>) -> Option<ResolvConf> {
    enum Kind {
        Cluster,
        Host,
        None,
    }
    let mut kind = match inputs.policy.unwrap_or("ClusterFirst") {
        "ClusterFirstWithHostNet" => Kind::Cluster,
        "Default" => Kind::Host,
        "None" => Kind::None,
        _ if inputs.host_network => Kind::Host,
        _ => Kind::Cluster,
    };
    let cluster_dns = inputs.cluster_dns.filter(|s| !s.is_empty());
    if matches!(kind, Kind::Cluster) && cluster_dns.is_none() {
        kind = Kind::Host;
    }
    let mut rc = match kind {
        Kind::Cluster => {
            let d = inputs.cluster_domain;
            ResolvConf {
                nameservers: cluster_dns.into_iter().map(str::to_string).collect(),
                searches: vec![format!("{}.svc.{d}", inputs.namespace), format!("svc.{d}"), d.to_string()],
                options: vec!["ndots:5".into()],
            }
        }
        Kind::Host => {
            if inputs.dns_config.is_none() && inputs.host_network {
                return None;
            }
            ResolvConf::parse(inputs.host_resolv)
        }
        Kind::None => ResolvConf::default(),
    };
    if let Some(cfg) = inputs.dns_config {
        for ns in cfg.nameservers.iter().flatten() {
            if !rc.nameservers.contains(ns) {
                rc.nameservers.push(ns.clone());
            }
        }
        for s in cfg.searches.iter().flatten() {
            if !rc.searches.contains(s) {
                rc.searches.push(s.clone());
            }
        }
        for opt in cfg.options.iter().flatten() {
            let rendered = match &opt.value {
                Some(v) => format!("{}:{v}", opt.name.clone().unwrap_or_default()),
                None => opt.name.clone().unwrap_or_default(),
            };
            let key = opt.name.clone().unwrap_or_default();
            rc.options.retain(|o| o.split(':').next().unwrap_or(o) != key.as_str());
            rc.options.push(rendered);
        }
    }
    rc.nameservers.truncate(3);
    rc.searches.truncate(32);
    Some(rc)
}

/// The kubelet-managed /etc/hosts of a pod on the pod network.
pub(crate) fn pod_hosts_file(
    pod_ip: Option<&str>,
    hostname: &str,
    subdomain_fqdn: Option<&str>,
    aliases: &[(String, Vec<String>)],
) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost \
         ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    if let Some(ip) = pod_ip {
        match subdomain_fqdn {
            Some(fqdn) => out.push_str(&format!("{ip}\t{fqdn}\t{hostname}\n")),
            None => out.push_str(&format!("{ip}\t{hostname}\n")),
        }
    }
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for (ip, names) in aliases {
            out.push_str(&format!("{ip}\t{}\n", names.join("\t")));
        }
    }
    out
}

/// What the phase computation needs to know about one regular container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PhaseInput {
    /// Never ran yet (image not supported, config error, being created).
    Waiting,
    /// Waiting to restart after having run.
    Restarting,
    Running,
    Terminated {
        exit_code: i32,
    },
}

/// The pod phase, following the kubelet's `getPhase`.
pub(crate) fn pod_phase(
    restart_policy: &str,
    initialized: bool,
    init_failed: bool,
    containers: &[PhaseInput],
) -> &'static str {
    if init_failed {
        return "Failed";
    }
    if !initialized {
        return "Pending";
    }
    let mut running = 0;
    let mut waiting = 0;
    let mut stopped = 0;
    let mut succeeded = 0;
    for c in containers {
        match c {
            PhaseInput::Waiting => waiting += 1,
            PhaseInput::Restarting => stopped += 1,
            PhaseInput::Running => running += 1,
            PhaseInput::Terminated { exit_code } => {
                stopped += 1;
                if *exit_code == 0 {
                    succeeded += 1;
                }
            }
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        if restart_policy == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if restart_policy == "Never" {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

/// Whether a container that exited with `exit_code` is started again.
pub(crate) fn should_restart(restart_policy: &str, exit_code: i32) -> bool {
    match restart_policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// The `portMappings` runtimeConfig of a pod (containers' ports with a hostPort), as container
/// runtimes pass it to CNI plugins that declare the capability.
pub(crate) fn port_mappings(pod: &Pod) -> serde_json::Value {
    let mut out = Vec::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            let Some(host_port) = p.host_port.filter(|p| *p > 0) else {
                continue;
            };
            let mut m = serde_json::json!({
                "hostPort": host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
            });
            if let Some(ip) = p.host_ip.as_deref().filter(|s| !s.is_empty()) {
                m["hostIP"] = serde_json::Value::String(ip.to_string());
            }
            out.push(m);
        }
    }
    serde_json::Value::Array(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVarSource, ObjectFieldSelector,
        PodDNSConfigOption,
    };

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn netns_name_is_deterministic_from_uid() {
        assert_eq!(pod_netns_name("8F0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"), "wp-8f0e1c2a3b4d");
        assert_eq!(sandbox_id("8f0e1c2a-3b4d"), "8f0e1c2a3b4d");
    }

    #[test]
    fn cni_args_match_container_runtimes() {
        assert_eq!(
            cni_args("default", "web-0", "u-1", "abc"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn hostname_is_cut_like_kubelet() {
        assert_eq!(pod_hostname("web", None), "web");
        assert_eq!(pod_hostname("web", Some("db")), "db");
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(pod_hostname(&long, None), "a".repeat(62));
    }

    #[test]
    fn image_names_are_normalised() {
        assert_eq!(image_repository("traefik/whoami:v1.10"), "traefik/whoami");
        assert_eq!(image_repository("docker.io/traefik/whoami@sha256:abc"), "traefik/whoami");
        assert_eq!(image_repository("docker.io/library/busybox:1.36"), "busybox");
        assert_eq!(image_repository("BUSYBOX"), "busybox");
        assert_eq!(image_repository("localhost:5000/busybox:1"), "localhost:5000/busybox");
        assert_eq!(image_repository("registry.k8s.io/pause:3.10"), "registry.k8s.io/pause");
    }

    #[test]
    fn images_map_to_workloads_and_unknown_ones_are_refused() {
        assert_eq!(classify_image("traefik/whoami"), Ok(Workload::Whoami));
        assert!(matches!(classify_image("nicolaka/netshoot:v0.13"), Ok(Workload::HostTools { .. })));
        assert_eq!(classify_image("registry.k8s.io/pause:3.10"), Ok(Workload::Pause));
        let err = classify_image("nginx:1.27").unwrap_err();
        assert!(err.contains("nginx:1.27") && err.contains("traefik/whoami"), "{err}");
        // A look-alike on another registry is a different image.
        assert!(classify_image("ghcr.io/traefik/whoami").is_err());
    }

    #[test]
    fn argv_follows_entrypoint_and_cmd_rules() {
        let yes = |_: &str| true;
        let no = |_: &str| false;
        let tools = Workload::HostTools { image: "busybox" };
        assert_eq!(container_argv(&tools, &[], &[], "/w", &yes).unwrap(), s(&["sleep", "infinity"]));
        assert_eq!(
            container_argv(&tools, &s(&["sh", "-c"]), &s(&["echo hi"]), "/w", &yes).unwrap(),
            s(&["sh", "-c", "echo hi"])
        );
        assert_eq!(container_argv(&tools, &[], &s(&["sleep", "5"]), "/w", &yes).unwrap(), s(&["sleep", "5"]));
        let curl = Workload::HostTools { image: "curlimages/curl" };
        assert_eq!(
            container_argv(&curl, &[], &s(&["-s", "http://x"]), "/w", &yes).unwrap(),
            s(&["curl", "-s", "http://x"])
        );
        assert_eq!(
            container_argv(&curl, &[], &s(&["http://x"]), "/w", &no).unwrap(),
            s(&["curl", "http://x"])
        );
        assert_eq!(
            container_argv(&Workload::Whoami, &[], &s(&["--port", "8080"]), "/bin/w", &yes).unwrap(),
            s(&["/bin/w", "--port", "8080"])
        );
        assert_eq!(
            container_argv(&Workload::Whoami, &s(&["/whoami"]), &[], "/bin/w", &yes).unwrap(),
            s(&["/bin/w"])
        );
        assert!(container_argv(&Workload::Whoami, &s(&["sh"]), &[], "/bin/w", &yes).is_err());
    }

    #[test]
    fn dollar_paren_expansion_matches_kubernetes() {
        let lookup = |k: &str| match k {
            "A" => Some("1".to_string()),
            "B" => Some("two".to_string()),
            _ => None,
        };
        assert_eq!(expand("$(A)-$(B)", &lookup), "1-two");
        assert_eq!(expand("$(C)", &lookup), "$(C)");
        assert_eq!(expand("$$(A)", &lookup), "$(A)");
        assert_eq!(expand("a$b$", &lookup), "a$b$");
        assert_eq!(expand("x$(A", &lookup), "x$(A");
        assert_eq!(expand("é$(A)é", &lookup), "é1é");
    }

    fn facts() -> PodFacts {
        PodFacts {
            name: "web-0".into(),
            namespace: "shop".into(),
            uid: "u1".into(),
            node_name: "n1".into(),
            service_account: "default".into(),
            pod_ips: vec!["10.0.0.5".parse().unwrap()],
            host_ip: "172.18.0.2".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            annotations: BTreeMap::new(),
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
                ..Default::default()
            }),
        }
    }

    fn val(name: &str, v: &str) -> EnvVar {
        EnvVar { name: name.into(), value: Some(v.into()), value_from: None }
    }

    #[test]
    fn env_resolves_field_refs_config_maps_and_expansion() {
        let container = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource { name: "cfg".into(), optional: None }),
                prefix: Some("CFG_".into()),
                secret_ref: None,
            }]),
            env: Some(vec![
                field("POD_NAME", "metadata.name"),
                field("POD_IP", "status.podIP"),
                field("NODE", "spec.nodeName"),
                field("APP", "metadata.labels['app']"),
                val("GREETING", "hi $(POD_NAME) on $(NODE) $(MISSING)"),
                EnvVar {
                    name: "MODE".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "cfg".into(),
                            key: "mode".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                },
            ]),
            ..Default::default()
        };
        let (cms, secrets) = env_source_names(&container);
        assert_eq!(cms, s(&["cfg"]));
        assert!(secrets.is_empty());
        let mut sources = EnvSources::default();
        sources.config_maps.insert("cfg".into(), Some([("mode".to_string(), "fast".to_string())].into()));
        let base = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        let env = build_env(&container, &facts(), &base, &sources).unwrap();
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(get("CFG_mode"), Some("fast"));
        assert_eq!(get("POD_NAME"), Some("web-0"));
        assert_eq!(get("POD_IP"), Some("10.0.0.5"));
        assert_eq!(get("NODE"), Some("n1"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("MODE"), Some("fast"));
        assert_eq!(get("GREETING"), Some("hi web-0 on n1 $(MISSING)"));
        assert_eq!(expand_all(&s(&["echo", "$(POD_NAME)"]), &env), s(&["echo", "web-0"]));

        sources.config_maps.insert("cfg".into(), None);
        let err = build_env(&container, &facts(), &base, &sources).unwrap_err();
        assert!(err.contains("cfg"), "{err}");
        let bad =
            Container { name: "c".into(), env: Some(vec![field("X", "status.phase")]), ..Default::default() };
        assert!(build_env(&bad, &facts(), &base, &EnvSources::default()).is_err());
    }

    fn dns(policy: Option<&str>, host_network: bool, cfg: Option<&PodDNSConfig>) -> Option<String> {
        pod_resolv_conf(DnsInputs {
            policy,
            host_network,
            namespace: "shop",
            cluster_dns: Some("10.96.0.10"),
            cluster_domain: "cluster.local",
            dns_config: cfg,
            host_resolv: "# host\nnameserver 1.1.1.1\nsearch corp.example\noptions edns0\n",
        })
        .map(|rc| rc.render())
    }

    #[test]
    fn resolv_conf_follows_kubelet_convention() {
        assert_eq!(
            dns(None, false, None).unwrap(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
        // hostNetwork pods keep the node's file unless they ask for the cluster DNS.
        assert_eq!(dns(None, true, None), None);
        assert!(dns(Some("ClusterFirstWithHostNet"), true, None).unwrap().contains("nameserver 10.96.0.10"));
        assert_eq!(
            dns(Some("Default"), false, None).unwrap(),
            "search corp.example\nnameserver 1.1.1.1\noptions edns0\n"
        );
        let cfg = PodDNSConfig {
            nameservers: Some(s(&["9.9.9.9"])),
            searches: Some(s(&["x.test"])),
            options: Some(vec![
                PodDNSConfigOption { name: Some("ndots".into()), value: Some("2".into()) },
                PodDNSConfigOption { name: Some("single-request".into()), value: None },
            ]),
        };
        assert_eq!(
            dns(Some("None"), false, Some(&cfg)).unwrap(),
            "search x.test\nnameserver 9.9.9.9\noptions ndots:2 single-request\n"
        );
        assert_eq!(
            dns(None, false, Some(&cfg)).unwrap(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local x.test\n\
             nameserver 10.96.0.10\nnameserver 9.9.9.9\noptions ndots:2 single-request\n"
        );
        let no_dns = pod_resolv_conf(DnsInputs {
            policy: None,
            host_network: false,
            namespace: "shop",
            cluster_dns: None,
            cluster_domain: "cluster.local",
            dns_config: None,
            host_resolv: "nameserver 1.1.1.1\n",
        });
        assert_eq!(no_dns.unwrap().render(), "nameserver 1.1.1.1\n");
    }

    #[test]
    fn hosts_file_lists_the_pod() {
        let h = pod_hosts_file(Some("10.0.0.5"), "web-0", None, &[]);
        assert!(h.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.0.0.5\tweb-0\n"));
        let h = pod_hosts_file(
            Some("10.0.0.5"),
            "web-0",
            Some("web-0.web.shop.svc.cluster.local"),
            &[("1.2.3.4".into(), s(&["a", "b"]))],
        );
        assert!(h.contains("10.0.0.5\tweb-0.web.shop.svc.cluster.local\tweb-0\n"));
        assert!(h.ends_with("# Entries added by HostAliases.\n1.2.3.4\ta\tb\n"));
    }

    #[test]
    fn phase_follows_kubelet() {
        use PhaseInput::*;
        assert_eq!(pod_phase("Always", false, false, &[Running]), "Pending");
        assert_eq!(pod_phase("Always", true, true, &[]), "Failed");
        assert_eq!(pod_phase("Always", true, false, &[Running, Waiting]), "Pending");
        assert_eq!(pod_phase("Always", true, false, &[Running, Restarting]), "Running");
        assert_eq!(pod_phase("Always", true, false, &[Restarting]), "Running");
        assert_eq!(pod_phase("Never", true, false, &[Terminated { exit_code: 0 }]), "Succeeded");
        assert_eq!(pod_phase("Never", true, false, &[Terminated { exit_code: 1 }]), "Failed");
        assert_eq!(pod_phase("OnFailure", true, false, &[Terminated { exit_code: 0 }]), "Succeeded");
        assert_eq!(pod_phase("OnFailure", true, false, &[Restarting]), "Running");
        assert!(should_restart("Always", 0));
        assert!(!should_restart("OnFailure", 0));
        assert!(should_restart("OnFailure", 2));
        assert!(!should_restart("Never", 2));
    }

    #[test]
    fn port_mappings_come_from_host_ports() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "ports": [
                {"containerPort": 80, "hostPort": 8080},
                {"containerPort": 53, "protocol": "UDP", "hostPort": 5353, "hostIP": "127.0.0.1"},
                {"containerPort": 9000}
            ]}]}
        }))
        .unwrap();
        assert_eq!(
            port_mappings(&pod),
            serde_json::json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}
            ])
        );
    }
}
