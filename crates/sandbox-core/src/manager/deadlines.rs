//! Deadlines: every sandbox expires; the reaper sleeps until the next deadline and removes
//! what expired. Deadline changes after creation live in the state directory (labels are
//! immutable, and nothing inside the sandbox may be trusted with its own deadline).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use time::OffsetDateTime;

use super::sandbox_logs::{LogEntry, LogLevel};
use super::{not_found, now_ms, Inner, SandboxManager};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{SandboxId, SandboxInfo};

/// Deadline changes made after creation, one small file per sandbox.
#[derive(Debug)]
pub(super) struct DeadlineStore {
    dir: Option<PathBuf>,
}

impl DeadlineStore {
    pub(super) fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    fn path(&self, id: &SandboxId) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(id.as_str()))
    }

    pub(super) fn load(&self, id: &SandboxId) -> Option<OffsetDateTime> {
        let raw = std::fs::read_to_string(self.path(id)?).ok()?;
        let ms: i128 = raw.trim().parse().ok()?;
        OffsetDateTime::from_unix_timestamp_nanos(ms.checked_mul(1_000_000)?).ok()
    }

    fn save(&self, id: &SandboxId, at: OffsetDateTime) -> Result<()> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(id)) else {
            return Ok(());
        };
        let io = |e: std::io::Error| Error::backend("state", e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, (at.unix_timestamp_nanos() / 1_000_000).to_string()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    pub(super) fn forget(&self, id: &SandboxId) {
        if let Some(path) = self.path(id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Deletes files of sandboxes that no longer exist.
    pub(super) fn retain(&self, live: &HashSet<SandboxId>) {
        if let Some(dir) = &self.dir {
            retain_sandbox_files(dir, live);
        }
    }
}

/// In a state directory of one file per sandbox id, deletes every file but those of
/// `live` sandboxes.
pub(super) fn retain_sandbox_files(dir: &std::path::Path, live: &HashSet<SandboxId>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let keep = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<SandboxId>().ok())
            .is_some_and(|id| live.contains(&id));
        if !keep {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl SandboxManager {
    pub(super) fn check_timeout(&self, timeout: Duration) -> Result<()> {
        let max = self.inner.config.max_timeout;
        if timeout.is_zero() || timeout > max {
            return Err(Error::InvalidArgument(format!(
                "timeout must be between 1 and {} seconds",
                max.as_secs()
            )));
        }
        Ok(())
    }

    /// Sets a sandbox's deadline to `timeout` from now (it may shorten it). The new
    /// deadline survives a restart.
    pub fn set_timeout(&self, id: &SandboxId, timeout: Duration) -> Result<SandboxInfo> {
        self.check_timeout(timeout)?;
        self.move_deadline(id, timeout)
    }

    /// [`set_timeout`](Self::set_timeout), where 0 is allowed and ends the sandbox now
    /// (E2B's `set_timeout(0)`): the reaper removes it as it would at its deadline.
    pub fn set_timeout_or_end(&self, id: &SandboxId, timeout: Duration) -> Result<SandboxInfo> {
        if timeout.is_zero() {
            self.move_deadline(id, timeout)
        } else {
            self.set_timeout(id, timeout)
        }
    }

    fn move_deadline(&self, id: &SandboxId, timeout: Duration) -> Result<SandboxInfo> {
        let deadline = now_ms() + timeout;
        self.log(
            id,
            LogEntry::now(
                LogLevel::Info,
                "sandbox timeout set",
                &[
                    ("timeout_s", timeout.as_secs().to_string()),
                    ("ends_at", super::sandbox_logs::rfc3339(deadline)),
                ],
            ),
        );
        self.set_deadline(id, deadline)
    }

    /// Moves sandbox `id`'s deadline to `deadline`, kept across a restart.
    pub(super) fn set_deadline(
        &self,
        id: &SandboxId,
        deadline: OffsetDateTime,
    ) -> Result<SandboxInfo> {
        self.info(id)?;
        self.inner.deadlines.save(id, deadline)?;
        let info = {
            let mut reg = self.registry();
            let s = reg.sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            s.expires_at = deadline;
            s.clone()
        };
        self.inner.reaper_wake.notify_one();
        Ok(info)
    }

    /// Moves a sandbox's deadline to `timeout` from now unless it is already later
    /// (E2B's connect and refresh never shorten a sandbox's life).
    pub fn extend_timeout(&self, id: &SandboxId, timeout: Duration) -> Result<SandboxInfo> {
        let info = self.info(id)?;
        if info.expires_at >= now_ms() + timeout {
            return Ok(info);
        }
        self.set_timeout(id, timeout)
    }

    pub(super) fn spawn_reaper(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let wake = self.inner.reaper_wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { break };
                let manager = SandboxManager { inner };
                manager.reap_expired().await;
                manager.sweep_unfinished().await;
                let watching = !super::lock(&manager.inner.unfinished).is_empty();
                let wait = manager
                    .next_deadline()
                    .map(|d| {
                        let left = d - OffsetDateTime::now_utc();
                        Duration::try_from(left).unwrap_or(Duration::ZERO)
                    })
                    // Wake now and then anyway, so a wall-clock jump cannot stall expiry.
                    .unwrap_or(Duration::from_secs(5))
                    .min(Duration::from_secs(if watching { 1 } else { 5 }));
                drop(manager);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                }
            }
        });
    }

    fn next_deadline(&self) -> Option<OffsetDateTime> {
        self.registry()
            .sandboxes
            .values()
            .map(|s| s.expires_at)
            .min()
    }

    /// Removes every sandbox whose deadline has passed; returns how many were removed.
    pub async fn reap_expired(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        let due: Vec<SandboxInfo> = self
            .registry()
            .sandboxes
            .values()
            .filter(|s| s.expires_at <= now)
            .cloned()
            .collect();
        // Sandboxes created with `on_timeout: pause` are paused instead.
        let mut to_pause = Vec::new();
        let mut to_kill = HashSet::new();
        for info in &due {
            match self.pause_at_deadline(info) {
                Some(keep_memory) => to_pause.push((info.id.clone(), keep_memory)),
                None => {
                    to_kill.insert(info.id.clone());
                }
            }
        }
        let pauses = to_pause
            .iter()
            .map(|(id, keep_memory)| self.pause_expired(id, *keep_memory));
        futures_util::future::join_all(pauses).await;
        let expired: Vec<SandboxInfo> = {
            let mut reg = self.registry();
            let ids: Vec<SandboxId> = reg
                .sandboxes
                .values()
                .filter(|s| s.expires_at <= now && to_kill.contains(&s.id))
                .map(|s| s.id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| reg.sandboxes.remove(id))
                .collect()
        };
        let count = expired.len();
        let removals = expired.into_iter().map(|info| async move {
            let paused = info.state == crate::types::SandboxState::Paused;
            tracing::info!(sandbox = %info.id, paused, "sandbox expired; removing");
            if info.state == crate::types::SandboxState::Running {
                self.pull_agent_events(&info.id).await;
            }
            match self.retire(&labels::container_name(&info.id)).await {
                Ok(()) => {
                    self.forget(&info.id);
                    self.end_log(
                        &info.id,
                        LogEntry::now(
                            LogLevel::Info,
                            if paused {
                                "paused sandbox reached the paused retention and was removed"
                            } else {
                                "sandbox reached its timeout and was removed"
                            },
                            &[],
                        ),
                    );
                    metrics::counter!("colima_e2b_sandbox_expiries_total").increment(1);
                }
                Err(e) => {
                    // Keep it registered so the next pass tries again.
                    tracing::warn!(sandbox = %info.id, error = %e, "could not remove expired sandbox");
                    self.registry().sandboxes.insert(info.id.clone(), info);
                }
            }
        });
        futures_util::future::join_all(removals).await;
        if count > 0 {
            self.update_gauges();
        }
        count
    }
}
