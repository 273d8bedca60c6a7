//! Where a running server says who it is: on start it writes a record (pid, owner and
//! state directory) named after its port, so `colima-e2b env`, `sandbox` and `template`
//! find the key of the server actually listening there, whatever owner or state
//! directory it was started with (an unexported `COLIMA_E2B_OWNER`, a `--state-dir`).
//!
//! The records live in `$XDG_RUNTIME_DIR/colima-e2b` (else a per-user directory under
//! the temporary directory), mode 0700; they hold paths, never keys. A record whose
//! process is gone is ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What a running server records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// The server's process id.
    pub pid: u32,
    /// Its owner.
    pub owner: String,
    /// Its configured state directory (before the owner's subdirectory), if any.
    pub state_dir: Option<PathBuf>,
    /// The port it listens on.
    pub port: u16,
}

/// The directory of the records.
fn dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("colima-e2b"),
        None => {
            let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
            std::env::temp_dir().join(format!("colima-e2b-{user}"))
        }
    }
}

fn path_for(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("server-{port}.json"))
}

/// Records the server `config` describes as running in this process. The record is
/// removed when the returned guard drops.
pub fn record(config: &Config) -> Option<RecordGuard> {
    let dir = dir();
    let write = || -> std::io::Result<PathBuf> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let rec = ServerRecord {
            pid: std::process::id(),
            owner: config.owner.clone(),
            state_dir: config.state_dir.clone(),
            port: config.port,
        };
        let path = path_for(&dir, config.port);
        let tmp = dir.join(format!(".server-{}.{}", config.port, std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(&rec).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    };
    match write() {
        Ok(path) => Some(RecordGuard { path }),
        Err(e) => {
            tracing::debug!(error = %e, dir = %dir.display(), "cannot record the running server");
            None
        }
    }
}

/// Removes the record of this server when dropped.
#[derive(Debug)]
pub struct RecordGuard {
    path: PathBuf,
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        // Only our own: a newer server on the same port may have replaced it.
        let ours = read(&self.path).is_some_and(|r| r.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read(path: &Path) -> Option<ServerRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `dir` is ours alone: owned by this process's user, closed to others (the
/// temporary-directory fallback is shared, where another user could plant records).
fn private(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid());
    match (std::fs::symlink_metadata(dir), me) {
        (Ok(md), Ok(uid)) => md.is_dir() && md.uid() == uid && md.mode() & 0o077 == 0,
        _ => false,
    }
}

/// The record of the live server on `port`, if one wrote it.
pub fn find(port: u16) -> Option<ServerRecord> {
    let dir = dir();
    if !private(&dir) {
        return None;
    }
    read(&path_for(&dir, port)).filter(|r| r.port == port && alive(r.pid))
}

/// Makes `config` name the owner and state directory of the server running on its port
/// (when one recorded itself), saying so on stderr when they differ from what the
/// configuration alone gives.
pub fn adopt(config: &mut Config) {
    let Some(rec) = find(config.port) else { return };
    if rec.owner != config.owner || rec.state_dir != config.state_dir {
        eprintln!(
            "colima-e2b: using the settings of the server running on port {} (pid {}, owner {:?})",
            rec.port, rec.pid, rec.owner
        );
        config.owner = rec.owner;
        config.state_dir = rec.state_dir;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_dead_processes_are_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        let path = path_for(dir.path(), 1);
        let rec = ServerRecord {
            pid: std::process::id(),
            owner: "o".into(),
            state_dir: None,
            port: 1,
        };
        std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write");
        assert_eq!(read(&path), Some(rec.clone()));
        assert!(alive(rec.pid));
        assert!(!alive(u32::MAX - 1));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        assert!(private(dir.path()));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        assert!(
            !private(dir.path()),
            "a directory others may write is not trusted"
        );
    }
}
