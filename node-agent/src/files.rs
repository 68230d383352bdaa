//! Replacing a file whole: a temp file in the same directory renamed over the target, so a reader
//! (nginx, CoreDNS, the CNI plugin, the agent after a crash) sees the old or the new contents,
//! never a mix. Each caller states what must survive a power cut and who may read the file.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// What a completed [`replace`] guarantees after a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Nothing: a cache or record the agent rebuilds (the plan, programmers' records). Skipping
    /// the fsync matters when the file is megabytes written on every plan message; a process
    /// crash still loses nothing the page cache holds.
    Cached,
    /// The new contents, once the rename is on disk (fsync before the rename).
    Contents,
    /// The contents and the rename itself (the directory is fsynced too): state nothing else can
    /// rebuild (the IPAM checkpoint) or that another program reads at boot (the CNI conflist).
    Committed,
}

/// Who may read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// 0644.
    Public,
    /// 0600: it holds private keys (TLS Secrets in the plan, nginx's certificates).
    Private,
}

/// Replaces `path` with `contents` (creating its directory when missing).
pub fn replace(path: &Path, contents: &[u8], durability: Durability, access: Access) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mode = match access {
        Access::Public => 0o644,
        Access::Private => 0o600,
    };
    let result = (|| {
        // A leftover temp file may have another mode: never reuse it.
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(contents)?;
        if durability != Durability::Cached {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durability == Durability::Committed {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_replaced_file_holds_the_new_contents_with_the_stated_mode() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let path = dir.path().join("sub/plan.pb");
        replace(&path, b"old", Durability::Committed, Access::Public).expect("first write");
        replace(&path, b"new", Durability::Cached, Access::Private).expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a private file is readable by its owner only");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub")).expect("ls").flatten().collect();
        assert_eq!(left.len(), 1, "no temp file is left: {left:?}");
    }
}
