//! [`SandboxRecords`]: what the server keeps of each sandbox beyond its labels, one JSON
//! file per sandbox in a state directory, with a copy in memory; restored at start for
//! the re-adopted sandboxes only.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::lock;
use crate::error::{Error, Result};
use crate::types::SandboxId;

/// One record of type `T` per sandbox: in `dir` (when the server has a state
/// directory) and in memory.
#[derive(Debug)]
pub(super) struct SandboxRecords<T> {
    dir: Option<PathBuf>,
    /// What the files are of, for the log.
    what: &'static str,
    records: std::sync::Mutex<HashMap<SandboxId, T>>,
}

impl<T: Clone + Serialize + DeserializeOwned> SandboxRecords<T> {
    pub(super) fn new(dir: Option<PathBuf>, what: &'static str) -> Self {
        Self {
            dir,
            what,
            records: Default::default(),
        }
    }

    fn path(&self, id: &SandboxId) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(id.as_str()))
    }

    /// Keeps sandbox `id`'s record, on disk (synced) before this returns.
    pub(super) fn save(&self, id: &SandboxId, record: &T) -> Result<()> {
        if let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(id)) {
            let io = |e: std::io::Error| Error::backend("state", e);
            std::fs::create_dir_all(dir).map_err(io)?;
            let tmp = path.with_extension("tmp");
            let body = serde_json::to_vec(record).map_err(|e| Error::backend("state", e))?;
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(io)?;
                f.write_all(&body).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        lock(&self.records).insert(id.clone(), record.clone());
        Ok(())
    }

    /// Sandbox `id`'s record as kept in memory.
    pub(super) fn get(&self, id: &SandboxId) -> Option<T> {
        lock(&self.records).get(id).cloned()
    }

    /// Sandbox `id`'s record as its file has it (recovery, before [`Self::restore`]).
    pub(super) fn load(&self, id: &SandboxId) -> Option<T> {
        let raw = std::fs::read(self.path(id)?).ok()?;
        serde_json::from_slice(&raw)
            .inspect_err(|e| tracing::warn!(sandbox = %id, error = %e, record = self.what, "unreadable record"))
            .ok()
    }

    /// Drops sandbox `id`'s record; the record it had.
    pub(super) fn forget(&self, id: &SandboxId) -> Option<T> {
        if let Some(path) = self.path(id) {
            let _ = std::fs::remove_file(path);
        }
        lock(&self.records).remove(id)
    }

    /// Reads the records of `live` sandboxes back and deletes the others' files.
    pub(super) fn restore(&self, live: &HashSet<SandboxId>) {
        let found: HashMap<_, _> = live
            .iter()
            .filter_map(|id| Some((id.clone(), self.load(id)?)))
            .collect();
        if let Some(dir) = &self.dir {
            super::deadlines::retain_sandbox_files(dir, live);
        }
        *lock(&self.records) = found;
    }

    /// Every record kept, with its sandbox.
    pub(super) fn all(&self) -> Vec<(SandboxId, T)> {
        lock(&self.records)
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }
}
