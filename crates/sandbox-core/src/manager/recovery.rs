//! Re-adoption after a restart: this server's containers are read back from the engine;
//! running and paused ones (stopped ones with a pause record included) are managed again
//! with their deadlines; expired, other stopped and unreadable ones are removed, and so is every container whose create never finished
//! (the [`CreateJournal`] says which: its client got no answer).

use std::collections::HashSet;
use std::path::PathBuf;

use time::OffsetDateTime;

use super::SandboxManager;
use crate::error::Result;
use crate::labels;
use crate::types::{SandboxId, SandboxState};

/// Creates in flight, one empty file per sandbox id, written before the engine is asked
/// and removed once the create has finished (either way).
#[derive(Debug)]
pub(super) struct CreateJournal {
    dir: Option<PathBuf>,
}

impl CreateJournal {
    pub(super) fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// Notes that sandbox `id` is being created. Without a state directory nothing is
    /// noted (and nothing can be cleaned up after a crash).
    pub(super) fn begin(&self, id: &SandboxId) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let io = |e: std::io::Error| crate::Error::backend("state", e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(id.as_str());
        std::fs::write(&path, b"").map_err(io)?;
        // The note must be on disk before the container exists.
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io)
    }

    /// The create of `id` has finished.
    pub(super) fn end(&self, id: &SandboxId) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(id.as_str()));
        }
    }

    /// Ids whose create never finished (their notes stay until [`Self::forget`]).
    fn unfinished(&self) -> HashSet<SandboxId> {
        let Some(dir) = &self.dir else {
            return HashSet::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return HashSet::new();
        };
        let mut out = HashSet::new();
        for entry in entries.flatten() {
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<SandboxId>().ok())
            {
                out.insert(id);
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        out
    }
}

/// How long after a restart containers of unfinished creates are still looked for: the
/// engine may finish a create (or start) it was asked for before the crash only later.
const UNFINISHED_WATCH: std::time::Duration = std::time::Duration::from_secs(120);

/// What re-adoption found at startup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sandboxes taken back under management.
    pub adopted: usize,
    /// Sandboxes removed because their deadline had passed.
    pub expired: usize,
    /// Containers removed because they were half-created, stopped or unreadable.
    pub broken: usize,
    /// Containers removed because their create never finished (its client got no answer).
    pub unfinished: usize,
    /// Unclaimed warm pool members taken back into their pools.
    pub pooled: usize,
}

impl SandboxManager {
    pub(super) async fn recover(&self) -> Result<RecoveryReport> {
        let owner = self.inner.config.owner.as_str();
        let containers = self
            .inner
            .backend
            .list(&[(labels::MANAGED, "true"), (labels::OWNER, owner)])
            .await?;
        let now = OffsetDateTime::now_utc();
        let mut report = RecoveryReport::default();
        let mut live = HashSet::new();
        let unfinished = self.inner.journal.unfinished();
        {
            let until = std::time::Instant::now() + UNFINISHED_WATCH;
            let mut watch = super::lock(&self.inner.unfinished);
            for id in &unfinished {
                watch.insert(id.clone(), until);
            }
        }
        let mut members = Vec::new();
        for container in containers {
            if container.labels.contains_key(labels::VOLUME_KEEPER) {
                // A volume's keeper holds no state; the next content request starts one.
                self.remove_quietly(&container.name).await;
                continue;
            }
            let pooled = container.labels.get(labels::POOL).map(String::as_str) == Some("true");
            let mut info = match labels::to_info(&container) {
                Ok(info) => info,
                Err(why) => {
                    tracing::warn!(container = %container.name, %why, "removing unreadable sandbox container");
                    self.remove_quietly(&container.name).await;
                    report.broken += 1;
                    continue;
                }
            };
            // A pool member is a client's sandbox once its claim's record exists.
            let unclaimed = pooled && !self.inner.claims.apply(&mut info);
            if let Some(deadline) = self.inner.deadlines.load(&info.id) {
                info.expires_at = deadline;
            }
            // A stopped container with a pause record is a paused sandbox (a filesystem
            // pause, or a frozen one whose engine restarted and lost its memory).
            let parked = self
                .inner
                .lifecycles
                .load(&info.id)
                .is_some_and(|r| r.paused.is_some());
            if parked && matches!(info.state, SandboxState::Exited | SandboxState::Created) {
                info.state = SandboxState::Paused;
            }
            if unclaimed && !unfinished.contains(&info.id) {
                members.push(info);
            } else if unfinished.contains(&info.id) {
                tracing::info!(sandbox = %info.id, "removing a sandbox whose create never finished");
                self.remove_quietly(&container.name).await;
                report.unfinished += 1;
            } else if !matches!(info.state, SandboxState::Running | SandboxState::Paused) {
                tracing::info!(sandbox = %info.id, state = %info.state, "removing half-created or stopped sandbox");
                self.remove_quietly(&container.name).await;
                report.broken += 1;
            } else if info.expires_at <= now {
                tracing::info!(sandbox = %info.id, "removing sandbox that expired while the server was down");
                self.remove_quietly(&container.name).await;
                metrics::counter!("colima_e2b_sandbox_expiries_total").increment(1);
                report.expired += 1;
            } else {
                live.insert(info.id.clone());
                self.log(
                    &info.id,
                    super::sandbox_logs::LogEntry::now(
                        super::sandbox_logs::LogLevel::Info,
                        "sandbox re-adopted after a server restart",
                        &[],
                    ),
                );
                self.registry().sandboxes.insert(info.id.clone(), info);
                report.adopted += 1;
            }
        }
        self.inner.deadlines.retain(&live);
        self.inner.claims.retain(&live);
        self.inner.lifecycles.restore(&live);
        self.settle_pause_records(&live);
        self.restore_networks(&live).await;
        for id in &live {
            self.release_address(id).await;
        }
        let (pooled, removed) = self.readopt_members(members).await;
        report.pooled = pooled;
        report.broken += removed;
        self.update_gauges();
        Ok(report)
    }

    /// Removes containers of creates that never finished which the engine brought into
    /// being after the restart; stops looking for each after a while (called by the
    /// reaper).
    pub(super) async fn sweep_unfinished(&self) {
        let now = std::time::Instant::now();
        let watched: Vec<(SandboxId, std::time::Instant)> = super::lock(&self.inner.unfinished)
            .iter()
            .map(|(id, until)| (id.clone(), *until))
            .collect();
        for (id, until) in watched {
            let name = labels::container_name(&id);
            match self.inner.backend.remove(&name).await {
                Ok(()) => {
                    tracing::info!(sandbox = %id, "removed a sandbox whose create never finished");
                }
                Err(crate::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "could not remove an unfinished sandbox")
                }
            }
            if until <= now {
                super::lock(&self.inner.unfinished).remove(&id);
                self.inner.journal.end(&id);
            }
        }
    }
}
