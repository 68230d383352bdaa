//! CNI as a container runtime drives it (spec 1.1, section 3 "Execution of Network
//! Configurations"): the first configuration file of the conf dir by lexical order, each plugin of
//! the list run in order for ADD with `name`, `cniVersion`, `runtimeConfig` (from the plugin's
//! `capabilities`) and the previous plugin's result as `prevResult` injected, DEL in reverse order
//! with the cached ADD result as `prevResult`, STATUS for every plugin of a 1.1 list. Errors are the
//! plugins' error JSON, surfaced with their `msg`.
//!
//! Plugin execution is blocking (`std::process`); async callers use `spawn_blocking`.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

/// The highest spec version this runtime speaks.
const RUNTIME_VERSION: (u64, u64, u64) = (1, 1, 0);

/// A network configuration list, as loaded from the conf dir.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NetworkConfigList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
    /// The file it came from.
    pub source: PathBuf,
}

impl NetworkConfigList {
    fn version(&self) -> (u64, u64, u64) {
        parse_version(&self.cni_version)
    }

    /// The list as JSON (stored in the pod's state so DEL uses the configuration ADD used).
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "cniVersion": self.cni_version,
            "plugins": self.plugins,
        })
    }
}

/// A CNI failure: the plugin's error JSON (`code`, `msg`, `details`) or what went wrong running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniError {
    pub plugin: String,
    pub command: String,
    pub code: Option<u64>,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin type={:?} failed ({}): {}",
            self.plugin,
            self.command.to_ascii_lowercase(),
            self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        if let Some(code) = self.code {
            write!(f, " (code {code})")?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub(crate) fn parse_version(v: &str) -> (u64, u64, u64) {
    let mut it = v.trim().split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// The configuration file a runtime uses: the first `*.conflist`, `*.conf` or `*.json` of `dir`
/// by lexical order (`Ok(None)` when there is none, i.e. the network is not ready).
pub(crate) fn find_config(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Loads and validates a configuration file (a `.conf`/`.json` single plugin configuration
/// becomes a one-plugin list, as libcni does).
pub(crate) fn load_config(path: &Path) -> Result<NetworkConfigList, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let single = path.extension().and_then(|e| e.to_str()) != Some("conflist");
    parse_config(&text, single, path).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) fn parse_config(text: &str, single: bool, source: &Path) -> Result<NetworkConfigList, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("the configuration is not a JSON object".into());
    };
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("the configuration has no \"name\"")?
        .to_string();
    let cni_version = pick_version(&obj)?;
    let plugins = if single {
        vec![obj.clone()]
    } else {
        let list =
            obj.get("plugins").and_then(Value::as_array).ok_or("a .conflist needs a \"plugins\" array")?;
        list.iter()
            .map(|p| p.as_object().cloned().ok_or("a plugin entry is not an object"))
            .collect::<Result<Vec<_>, _>>()?
    };
    if plugins.is_empty() {
        return Err("the \"plugins\" list is empty".into());
    }
    for p in &plugins {
        if p.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err("a plugin has no \"type\"".into());
        }
    }
    Ok(NetworkConfigList { name, cni_version, plugins, source: source.to_path_buf() })
}

/// `cniVersion`, or with a `cniVersions` array (spec 1.1) the highest version this runtime speaks.
fn pick_version(obj: &Map<String, Value>) -> Result<String, String> {
    if let Some(list) = obj.get("cniVersions").and_then(Value::as_array) {
        let best = list
            .iter()
            .filter_map(Value::as_str)
            .filter(|v| parse_version(v) <= RUNTIME_VERSION)
            .max_by_key(|v| parse_version(v));
        if let Some(v) = best {
            return Ok(v.to_string());
        }
    }
    match obj.get("cniVersion").and_then(Value::as_str) {
        Some(v) if parse_version(v) <= RUNTIME_VERSION => Ok(v.to_string()),
        Some(v) => Err(format!("cniVersion {v} is newer than this runtime's 1.1.0")),
        None => Err("the configuration has no \"cniVersion\"".into()),
    }
}

/// The per-attachment parameters (section 2 "Parameters").
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RuntimeConf {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    /// Capability arguments (`portMappings`, …), injected as `runtimeConfig` into the plugins that
    /// declare the capability.
    pub capability_args: Map<String, Value>,
}

/// The stdin of plugin `index` of `list`: its configuration with `name`, `cniVersion`,
/// `runtimeConfig` and `prevResult` injected.
pub(crate) fn plugin_stdin(
    list: &NetworkConfigList,
    index: usize,
    prev_result: Option<&Value>,
    capability_args: &Map<String, Value>,
) -> Value {
    let mut conf = list.plugins.get(index).cloned().unwrap_or_default();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    let mut runtime_config = Map::new();
    if let Some(caps) = conf.get("capabilities").and_then(Value::as_object) {
        for (cap, enabled) in caps {
            if enabled.as_bool() == Some(true)
                && let Some(arg) = capability_args.get(cap)
            {
                runtime_config.insert(cap.clone(), arg.clone());
            }
        }
    }
    if !runtime_config.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    match prev_result {
        Some(prev) => {
            conf.insert("prevResult".into(), prev.clone());
        }
        None => {
            conf.remove("prevResult");
        }
    }
    Value::Object(conf)
}

/// The CNI_* environment of one invocation.
pub(crate) fn plugin_env(
    command: &str,
    rt: Option<&RuntimeConf>,
    bin_dirs: &[PathBuf],
) -> Vec<(String, String)> {
    let path = bin_dirs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
    let mut env = vec![("CNI_COMMAND".to_string(), command.to_string()), ("CNI_PATH".to_string(), path)];
    if let Some(rt) = rt {
        env.push(("CNI_CONTAINERID".into(), rt.container_id.clone()));
        env.push(("CNI_NETNS".into(), rt.netns.clone()));
        env.push(("CNI_IFNAME".into(), rt.ifname.clone()));
        env.push(("CNI_ARGS".into(), rt.args.clone()));
    }
    env
}

/// Parses a failed plugin's output: the error JSON on stdout, else its stderr.
pub(crate) fn parse_error(
    plugin: &str,
    command: &str,
    status: &str,
    stdout: &[u8],
    stderr: &[u8],
) -> CniError {
    let mut err = CniError {
        plugin: plugin.to_string(),
        command: command.to_string(),
        code: None,
        msg: String::new(),
        details: String::new(),
    };
    if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(stdout) {
        err.code = obj.get("code").and_then(Value::as_u64);
        err.msg = obj.get("msg").and_then(Value::as_str).unwrap_or_default().to_string();
        err.details = obj.get("details").and_then(Value::as_str).unwrap_or_default().to_string();
    }
    if err.msg.is_empty() {
        let text = String::from_utf8_lossy(stderr).trim().to_string();
        let out = String::from_utf8_lossy(stdout).trim().to_string();
        err.msg = [text, out]
            .into_iter()
            .find(|t| !t.is_empty())
            .unwrap_or_else(|| format!("exited with {status} and no output"));
    }
    err
}

/// Runs plugins. `enter_netns` runs them through `nsenter --net=<path>` (used when tearing down
/// from another namespace than the node's).
#[derive(Debug, Clone)]
pub(crate) struct Exec {
    pub bin_dirs: Vec<PathBuf>,
    pub enter_netns: Option<PathBuf>,
}

impl Exec {
    fn find(&self, plugin: &str) -> Option<PathBuf> {
        if plugin.contains('/') {
            return None;
        }
        self.bin_dirs.iter().map(|d| d.join(plugin)).find(|p| p.is_file())
    }

    fn invoke(
        &self,
        plugin: &str,
        command: &str,
        env: &[(String, String)],
        stdin: &Value,
    ) -> Result<Option<Value>, CniError> {
        let fail = |msg: String| CniError {
            plugin: plugin.to_string(),
            command: command.to_string(),
            code: None,
            msg,
            details: String::new(),
        };
        let bin = self
            .find(plugin)
            .ok_or_else(|| fail(format!("failed to find plugin {plugin:?} in path {:?}", self.bin_dirs)))?;
        let mut cmd = match &self.enter_netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| fail(format!("running {}: {e}", bin.display())))?;
        let input = serde_json::to_vec(stdin).map_err(|e| fail(e.to_string()))?;
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits without reading its stdin is reported by its exit status.
            let _ = pipe.write_all(&input);
        }
        let out =
            child.wait_with_output().map_err(|e| fail(format!("waiting for {}: {e}", bin.display())))?;
        if !out.status.success() {
            return Err(parse_error(plugin, command, &out.status.to_string(), &out.stdout, &out.stderr));
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&out.stdout).map(Some).map_err(|e| fail(format!("invalid result JSON: {e}")))
    }

    /// ADD through the whole list; the final result.
    pub(crate) fn add(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<Value, CniError> {
        let chaining = list.version() >= (0, 3, 0);
        let env = plugin_env("ADD", Some(rt), &self.bin_dirs);
        let mut prev: Option<Value> = None;
        for (i, plugin) in list.plugins.iter().enumerate() {
            let ty = plugin_type(plugin);
            let stdin = plugin_stdin(list, i, prev.as_ref().filter(|_| chaining), &rt.capability_args);
            if let Some(result) = self.invoke(ty, "ADD", &env, &stdin)? {
                prev = Some(result);
            }
        }
        Ok(prev.unwrap_or_else(|| serde_json::json!({"cniVersion": list.cni_version})))
    }

    /// DEL through the list in reverse order, each plugin given the cached ADD result.
    pub(crate) fn del(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        let prev = cached.filter(|_| list.version() >= (0, 4, 0));
        let env = plugin_env("DEL", Some(rt), &self.bin_dirs);
        for (i, plugin) in list.plugins.iter().enumerate().rev() {
            let stdin = plugin_stdin(list, i, prev, &rt.capability_args);
            self.invoke(plugin_type(plugin), "DEL", &env, &stdin)?;
        }
        Ok(())
    }

    /// STATUS of every plugin (only for 1.1 lists; older ones are ready once they exist).
    pub(crate) fn status(&self, list: &NetworkConfigList) -> Result<(), CniError> {
        if list.version() < (1, 1, 0) {
            return Ok(());
        }
        let env = plugin_env("STATUS", None, &self.bin_dirs);
        for (i, plugin) in list.plugins.iter().enumerate() {
            let stdin = plugin_stdin(list, i, None, &Map::new());
            self.invoke(plugin_type(plugin), "STATUS", &env, &stdin)?;
        }
        Ok(())
    }
}

fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// The pod's addresses from a result: those on the sandbox interface `ifname` (or every address
/// when the result does not say which interface), in the result's order. Handles the 0.2.0
/// `ip4`/`ip6` form too.
pub(crate) fn result_ips(result: &Value, ifname: &str) -> Vec<IpAddr> {
    let parse = |cidr: &str| cidr.split('/').next().and_then(|a| a.parse::<IpAddr>().ok());
    let mut out = Vec::new();
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        let interfaces = result.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
        for ip in ips {
            let on_pod_iface = match ip.get("interface").and_then(Value::as_u64) {
                Some(idx) => interfaces.get(usize::try_from(idx).unwrap_or(usize::MAX)).is_none_or(|iface| {
                    let sandbox = iface.get("sandbox").and_then(Value::as_str).unwrap_or("");
                    let name = iface.get("name").and_then(Value::as_str).unwrap_or("");
                    !sandbox.is_empty() && (name == ifname || name.is_empty())
                }),
                None => true,
            };
            if on_pod_iface && let Some(addr) = ip.get("address").and_then(Value::as_str).and_then(parse) {
                out.push(addr);
            }
        }
    } else {
        for key in ["ip4", "ip6"] {
            if let Some(addr) =
                result.get(key).and_then(|v| v.get("ip")).and_then(Value::as_str).and_then(parse)
            {
                out.push(addr);
            }
        }
    }
    out
}

/// The pod IPs Kubernetes reports: the first address, then the first of the other family.
pub(crate) fn pod_ips(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs {
        if out.iter().all(|o| o.is_ipv4() != a.is_ipv4()) {
            out.push(*a);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> NetworkConfigList {
        parse_config(
            &json!({
                "cniVersion": "1.0.0",
                "name": "weft",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                    {"type": "tuning", "capabilities": {"bandwidth": true}}
                ]
            })
            .to_string(),
            false,
            Path::new("/etc/cni/net.d/10-weft.conflist"),
        )
        .unwrap()
    }

    #[test]
    fn stdin_injects_name_version_prev_result_and_runtime_config() {
        let l = list();
        let mut caps = Map::new();
        caps.insert("portMappings".into(), json!([{"hostPort": 80}]));
        let first = plugin_stdin(&l, 0, None, &caps);
        assert_eq!(
            first,
            json!({"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"},
                   "name": "weft", "cniVersion": "1.0.0"})
        );
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]});
        let second = plugin_stdin(&l, 1, Some(&prev), &caps);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["runtimeConfig"], json!({"portMappings": [{"hostPort": 80}]}));
        assert_eq!(second["name"], "weft");
        // A declared capability the runtime has no argument for is not injected.
        let third = plugin_stdin(&l, 2, Some(&prev), &caps);
        assert!(third.get("runtimeConfig").is_none());
    }

    #[test]
    fn env_has_the_cni_parameters() {
        let rt = RuntimeConf {
            container_id: "abc".into(),
            netns: "/run/netns/wp-abc".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAME=p".into(),
            capability_args: Map::new(),
        };
        let env =
            plugin_env("ADD", Some(&rt), &[PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CNI_COMMAND"), Some("ADD"));
        assert_eq!(get("CNI_PATH"), Some("/opt/cni/bin:/usr/lib/cni"));
        assert_eq!(get("CNI_CONTAINERID"), Some("abc"));
        assert_eq!(get("CNI_NETNS"), Some("/run/netns/wp-abc"));
        assert_eq!(get("CNI_IFNAME"), Some("eth0"));
        assert_eq!(get("CNI_ARGS"), Some("IgnoreUnknown=1;K8S_POD_NAME=p"));
        let status = plugin_env("STATUS", None, &[PathBuf::from("/b")]);
        assert_eq!(status.len(), 2);
    }

    #[test]
    fn config_parsing_validates_and_converts_single_configs() {
        let src = Path::new("x.conf");
        let single = parse_config(r#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#, true, src).unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.cni_version, "0.4.0");
        assert!(parse_config(r#"{"cniVersion":"1.0.0","plugins":[]}"#, false, src).is_err());
        assert!(parse_config(r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, false, src).is_err());
        assert!(parse_config(r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#, false, src).is_err());
        assert!(
            parse_config(r#"{"cniVersion":"2.0.0","name":"n","plugins":[{"type":"x"}]}"#, false, src)
                .is_err()
        );
        let multi = parse_config(
            r#"{"cniVersion":"1.0.0","cniVersions":["0.4.0","1.1.0","2.0.0"],"name":"n","plugins":[{"type":"x"}]}"#,
            false,
            src,
        )
        .unwrap();
        assert_eq!(multi.cni_version, "1.1.0");
        assert!(parse_config("not json", false, src).is_err());
    }

    #[test]
    fn first_config_file_by_lexical_order() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_config(&dir.path().join("missing")).unwrap(), None);
        assert_eq!(find_config(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("20-b.conflist"), "{}").unwrap();
        std::fs::write(dir.path().join("10-a.conf"), "{}").unwrap();
        std::fs::write(dir.path().join("05-readme.txt"), "").unwrap();
        assert_eq!(find_config(dir.path()).unwrap(), Some(dir.path().join("10-a.conf")));
    }

    #[test]
    fn errors_surface_the_plugin_msg() {
        let e = parse_error(
            "weft-cni",
            "ADD",
            "exit status: 1",
            br#"{"cniVersion":"1.1.0","code":11,"msg":"no address left in pool","details":"block 10.0.0.0/26"}"#,
            b"",
        );
        assert_eq!(e.code, Some(11));
        assert_eq!(e.msg, "no address left in pool");
        assert_eq!(
            e.to_string(),
            "plugin type=\"weft-cni\" failed (add): no address left in pool: block 10.0.0.0/26 (code 11)"
        );
        let e = parse_error("bridge", "DEL", "exit status: 2", b"", b"panic: boom\n");
        assert_eq!(e.msg, "panic: boom");
        let e = parse_error("bridge", "DEL", "signal: 9", b"", b"");
        assert!(e.msg.contains("signal: 9"));
    }

    #[test]
    fn pod_addresses_come_from_the_sandbox_interface() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa"},
                {"name": "veth1", "mac": "bb"},
                {"name": "eth0", "mac": "cc", "sandbox": "/run/netns/wp-1"}
            ],
            "ips": [
                {"address": "10.1.0.1/24", "interface": 0},
                {"address": "fd00::5/64", "interface": 2},
                {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 2}
            ]
        });
        let ips = result_ips(&r, "eth0");
        assert_eq!(ips, vec!["fd00::5".parse::<IpAddr>().unwrap(), "10.244.1.5".parse().unwrap()]);
        assert_eq!(pod_ips(&ips), ips);
        let ipam_only = json!({"ips": [{"address": "10.0.0.9/32"}, {"address": "10.0.0.10/32"}]});
        assert_eq!(pod_ips(&result_ips(&ipam_only, "eth0")), vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        let old = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.3/16"}});
        assert_eq!(result_ips(&old, "eth0"), vec!["10.0.0.3".parse::<IpAddr>().unwrap()]);
    }

    /// Runs a scripted plugin chain for real: each plugin records its stdin and env and answers
    /// with a result, so the order, `prevResult` chaining and DEL's reverse order are observed.
    #[test]
    fn add_and_del_run_the_chain_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        for (name, ip) in [("first", "10.0.0.2"), ("second", "")] {
            let result = if ip.is_empty() {
                // Passes its prevResult through, as chained plugins do.
                "jq -c .prevResult \"$in\"".to_string()
            } else {
                format!(
                    "echo '{{\"cniVersion\":\"1.0.0\",\"interfaces\":[{{\"name\":\"eth0\",\"sandbox\":\"'$CNI_NETNS'\"}}],\"ips\":[{{\"address\":\"{ip}/24\",\"interface\":0}}]}}'"
                )
            };
            let script = format!(
                "#!/bin/sh\nin=$(mktemp)\ncat > \"$in\"\necho \"{name} $CNI_COMMAND $CNI_ARGS $(cat $in)\" >> {log}\n\
                 if [ \"$CNI_COMMAND\" = ADD ]; then {result}; fi\nrm -f \"$in\"\n",
                log = log.display()
            );
            let path = dir.path().join(name);
            std::fs::write(&path, script).unwrap();
            let _ = Command::new("chmod").arg("+x").arg(&path).status();
        }
        let l = parse_config(
            r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"first"},{"type":"second"}]}"#,
            false,
            Path::new("t.conflist"),
        )
        .unwrap();
        let exec = Exec {
            bin_dirs: vec![PathBuf::from("/nonexistent"), dir.path().to_path_buf()],
            enter_netns: None,
        };
        let rt = RuntimeConf {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1".into(),
            capability_args: Map::new(),
        };
        let result = exec.add(&l, &rt).unwrap();
        assert_eq!(result_ips(&result, "eth0"), vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        exec.del(&l, &rt, Some(&result)).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("first ADD IgnoreUnknown=1 "));
        assert!(!lines[0].contains("prevResult"));
        assert!(lines[1].starts_with("second ADD ") && lines[1].contains("\"prevResult\""));
        assert!(lines[2].starts_with("second DEL ") && lines[2].contains("10.0.0.2"));
        assert!(lines[3].starts_with("first DEL ") && lines[3].contains("\"prevResult\""));

        let missing = Exec { bin_dirs: vec![dir.path().to_path_buf()], enter_netns: None };
        let l2 = parse_config(
            r#"{"cniVersion":"1.1.0","name":"t","plugins":[{"type":"nope"}]}"#,
            false,
            Path::new("t.conflist"),
        )
        .unwrap();
        let err = missing.status(&l2).unwrap_err();
        assert!(err.msg.contains("failed to find plugin \"nope\""), "{err}");
    }
}
