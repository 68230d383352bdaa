//! The CNI network configuration list the agent writes for the container runtime, and the install
//! of the `weft-cni` binary next to it.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use weft_api::plan::NetworkSettings;

use crate::files::{self, Access, Durability};

/// The network's name in the conflist.
pub const NETWORK_NAME: &str = "weft";
/// The plugin binary's name (its `type` in the conflist).
pub const PLUGIN_NAME: &str = "weft-cni";
/// The conflist's file name when the plan names none.
pub const DEFAULT_CONFLIST_NAME: &str = "10-weft.conflist";
/// The CNI spec version of a conflist with weft-cni alone: 1.1 (GC and STATUS).
pub const CNI_VERSION: &str = "1.1.0";
/// The CNI spec version of a conflist with chained plugins. The runtime passes one version to every
/// plugin of a list, and the reference plugins before containernetworking-plugins v1.5 (Debian's
/// among them) refuse 1.1.0, which would fail every pod's ADD at portmap. With 1.0.0 the runtime
/// does not call GC or STATUS on the list; DEL still releases every address.
pub const CNI_VERSION_CHAINED: &str = "1.0.0";

/// The conflist for `settings`: `weft-cni` (talking to the agent on `socket_path`, with the pod
/// network's MTU), then the chained plugins in the plan's order (`portmap` with the
/// `portMappings` capability for hostPort, `bandwidth` with `bandwidth`, others as they are).
/// Names that are not plugin names (a path, an empty string) and `weft-cni` itself are skipped.
/// Spec 1.1.0 alone, 1.0.0 with chained plugins (see [`CNI_VERSION_CHAINED`]).
pub fn render_conflist(settings: &NetworkSettings, socket_path: &Path) -> Value {
    let mut weft = json!({
        "type": PLUGIN_NAME,
        "socket": socket_path.to_string_lossy(),
    });
    if settings.mtu > 0
        && let Some(obj) = weft.as_object_mut()
    {
        obj.insert("mtu".into(), json!(settings.mtu));
    }
    let mut plugins = vec![weft];
    let mut seen = vec![PLUGIN_NAME];
    for name in settings.cni_chained_plugins.iter().map(|n| n.trim()) {
        if !is_plugin_name(name) || seen.contains(&name) {
            continue;
        }
        seen.push(name);
        plugins.push(match name {
            "portmap" => json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }),
            "bandwidth" => json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } }),
            other => json!({ "type": other }),
        });
    }
    if plugins.len() == 1 {
        json!({
            "cniVersion": CNI_VERSION,
            "cniVersions": [CNI_VERSION_CHAINED, CNI_VERSION],
            "name": NETWORK_NAME,
            "plugins": plugins,
        })
    } else {
        json!({ "cniVersion": CNI_VERSION_CHAINED, "name": NETWORK_NAME, "plugins": plugins })
    }
}

fn is_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The conflist file name for `settings` (the plan's, or [`DEFAULT_CONFLIST_NAME`]).
pub fn conflist_name(settings: &NetworkSettings) -> &str {
    match settings.cni_conflist_name.trim() {
        "" => DEFAULT_CONFLIST_NAME,
        name => name,
    }
}

/// Where the agent finds the `weft-cni` it installs: next to its own executable.
pub fn plugin_binary_next_to_agent() -> std::io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(PLUGIN_NAME))
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("the CNI {what} {path} is not an absolute path")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("{name:?} is not a conflist file name (no '/', not hidden, ending in .conflist)")]
    BadConflistName { name: String },
    #[error(
        "cannot read the weft-cni binary {path}: {source}; it is shipped next to weft-agent in the \
         agent's image"
    )]
    ReadPlugin { path: PathBuf, source: std::io::Error },
    #[error("cannot install weft-cni as {path}: {source}")]
    WritePlugin { path: PathBuf, source: std::io::Error },
    #[error("cannot write the CNI conflist {path}: {source}")]
    WriteConflist { path: PathBuf, source: std::io::Error },
}

/// What [`install`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Installed {
    pub plugin_updated: bool,
    pub conflist_updated: bool,
}

/// Installs `weft-cni` from `plugin_binary_source` into `bin_dir` (only when its content changed),
/// then writes `conflist` as `conf_dir/conflist_name` (only when changed); both atomically
/// (temp file, fsync, rename), the binary first so the runtime never sees a conflist whose
/// plugin is missing.
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    conflist_name: &str,
    conflist: &Value,
    plugin_binary_source: &Path,
) -> Result<Installed, InstallError> {
    for (what, dir) in [("conf dir", conf_dir), ("bin dir", bin_dir)] {
        if !dir.is_absolute() {
            return Err(InstallError::NotAbsolute { what, path: dir.to_path_buf() });
        }
    }
    if conflist_name.is_empty()
        || conflist_name.starts_with('.')
        || conflist_name.contains('/')
        || !conflist_name.ends_with(".conflist")
    {
        return Err(InstallError::BadConflistName { name: conflist_name.to_string() });
    }
    let plugin_updated = install_plugin(bin_dir, plugin_binary_source)?;
    let path = conf_dir.join(conflist_name);
    let mut text = serde_json::to_vec_pretty(conflist)
        .map_err(|e| InstallError::WriteConflist { path: path.clone(), source: std::io::Error::other(e) })?;
    text.push(b'\n');
    let conflist_updated = if std::fs::read(&path).is_ok_and(|old| old == text) {
        false
    } else {
        files::replace(&path, &text, Durability::Committed, Access::Public)
            .map_err(|source| InstallError::WriteConflist { path, source })?;
        true
    };
    Ok(Installed { plugin_updated, conflist_updated })
}

fn install_plugin(bin_dir: &Path, source: &Path) -> Result<bool, InstallError> {
    let read_err = |e| InstallError::ReadPlugin { path: source.to_path_buf(), source: e };
    let target = bin_dir.join(PLUGIN_NAME);
    if same_content(source, &target).map_err(read_err)? {
        return Ok(false);
    }
    let write_err = |e| InstallError::WritePlugin { path: target.clone(), source: e };
    std::fs::create_dir_all(bin_dir).map_err(write_err)?;
    // Copied under a temporary name with its final mode, then renamed over the old binary: a
    // runtime executing the old one keeps its inode, and nobody ever runs half a binary.
    let tmp = bin_dir.join(format!(".{PLUGIN_NAME}.tmp"));
    let result = (|| {
        {
            let mut from = std::fs::File::open(source)?;
            let mut file = std::fs::File::create(&tmp)?;
            std::io::copy(&mut from, &mut file)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o755))?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(bin_dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)?;
    Ok(true)
}

/// Whether `target` has the content of `source` (streamed: the binary is large in debug builds);
/// an error only when `source` cannot be read.
fn same_content(source: &Path, target: &Path) -> std::io::Result<bool> {
    let mut from = std::fs::File::open(source)?;
    let Ok(mut to) = std::fs::File::open(target) else { return Ok(false) };
    if from.metadata()?.len() != to.metadata().map(|m| m.len()).unwrap_or(u64::MAX) {
        return Ok(false);
    }
    let (mut a, mut b) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut from, &mut a)?;
        let m = read_full(&mut to, &mut b).unwrap_or(usize::MAX);
        if n != m || a[..n] != b[..n] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn settings() -> NetworkSettings {
        NetworkSettings {
            mtu: 1450,
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            cni_conflist_name: "10-weft.conflist".into(),
            cni_chained_plugins: vec!["portmap".into(), "bandwidth".into(), "tuning".into()],
            ..Default::default()
        }
    }

    #[test]
    fn conflist_snapshot() {
        let conflist = render_conflist(&settings(), Path::new("/var/lib/weft/cni.sock"));
        insta::assert_snapshot!(serde_json::to_string_pretty(&conflist).unwrap());
    }

    #[test]
    fn conflist_without_mtu_nor_chain_and_with_bad_names() {
        let s = NetworkSettings {
            cni_chained_plugins: vec![
                "".into(),
                "../sh".into(),
                "weft-cni".into(),
                "portmap".into(),
                "portmap".into(),
            ],
            ..Default::default()
        };
        let conflist = render_conflist(&s, Path::new("/run/weft/cni.sock"));
        let plugins = conflist["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0], json!({ "type": "weft-cni", "socket": "/run/weft/cni.sock" }));
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(conflist["cniVersion"], CNI_VERSION_CHAINED);
        assert_eq!(conflist_name(&s), DEFAULT_CONFLIST_NAME);

        let alone = render_conflist(&NetworkSettings::default(), Path::new("/run/weft/cni.sock"));
        assert_eq!(alone["cniVersion"], CNI_VERSION);
        assert_eq!(alone["plugins"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn install_writes_once_and_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        let source = dir.path().join("weft-cni-src");
        std::fs::write(&source, b"#!/bin/sh\necho v1\n").unwrap();
        let conflist = render_conflist(&settings(), Path::new("/var/lib/weft/cni.sock"));

        let first = install(&conf, &bin, "10-weft.conflist", &conflist, &source).unwrap();
        assert_eq!(first, Installed { plugin_updated: true, conflist_updated: true });
        let mode = std::fs::metadata(bin.join(PLUGIN_NAME)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let written: Value =
            serde_json::from_slice(&std::fs::read(conf.join("10-weft.conflist")).unwrap()).unwrap();
        assert_eq!(written, conflist);

        let again = install(&conf, &bin, "10-weft.conflist", &conflist, &source).unwrap();
        assert_eq!(again, Installed::default());

        std::fs::write(&source, b"#!/bin/sh\necho v2\n").unwrap();
        let updated = install(&conf, &bin, "10-weft.conflist", &conflist, &source).unwrap();
        assert_eq!(updated, Installed { plugin_updated: true, conflist_updated: false });
        assert_eq!(std::fs::read(bin.join(PLUGIN_NAME)).unwrap(), b"#!/bin/sh\necho v2\n");
        let leftovers: Vec<_> = std::fs::read_dir(&bin).unwrap().filter_map(Result::ok).collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn install_refuses_bad_input_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let conflist = json!({});
        let missing = dir.path().join("nope");
        let err = install(dir.path(), dir.path(), "10-weft.conflist", &conflist, &missing).unwrap_err();
        assert!(err.to_string().contains("shipped next to weft-agent"), "{err}");
        let err = install(Path::new("net.d"), dir.path(), "x.conflist", &conflist, &missing).unwrap_err();
        assert!(matches!(err, InstallError::NotAbsolute { .. }));
        let err = install(dir.path(), dir.path(), "../x.conflist", &conflist, &missing).unwrap_err();
        assert!(matches!(err, InstallError::BadConflistName { .. }));
    }
}
