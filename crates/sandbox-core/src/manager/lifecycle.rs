//! Lifecycle after creation: kill, pause, resume, and E2B's connect.

use std::time::Duration;

use super::sandbox_logs::{LogEntry, LogLevel};
use super::{not_found, SandboxManager};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{SandboxId, SandboxInfo, SandboxState};

impl SandboxManager {
    /// Kills and removes a sandbox.
    pub async fn kill(&self, id: &SandboxId) -> Result<()> {
        // What its agent saw last, before it goes.
        if self
            .info(id)
            .is_ok_and(|i| i.state == SandboxState::Running)
        {
            self.pull_agent_events(id).await;
        }
        let info = self
            .registry()
            .sandboxes
            .remove(id)
            .ok_or_else(|| not_found(id))?;
        match self.retire(&labels::container_name(id)).await {
            Ok(()) => {
                self.forget(id);
                self.end_log(id, LogEntry::now(LogLevel::Info, "sandbox killed", &[]));
                metrics::counter!("colima_e2b_sandbox_kills_total").increment(1);
                self.update_gauges();
                Ok(())
            }
            Err(e) => {
                // Still there: keep managing it so its deadline is enforced.
                self.registry().sandboxes.insert(id.clone(), info);
                Err(e)
            }
        }
    }

    /// Freezes a running sandbox (its deadline keeps running).
    pub async fn pause(&self, id: &SandboxId) -> Result<SandboxInfo> {
        let info = self.info(id)?;
        if info.state == SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is already paused")));
        }
        self.require_pause()?;
        self.inner
            .backend
            .pause(&labels::container_name(id))
            .await?;
        self.log(id, LogEntry::now(LogLevel::Info, "sandbox paused", &[]));
        self.set_state(id, SandboxState::Paused)
    }

    /// Thaws a paused sandbox.
    pub async fn resume(&self, id: &SandboxId) -> Result<SandboxInfo> {
        let info = self.info(id)?;
        if info.state != SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is not paused")));
        }
        self.require_pause()?;
        self.inner
            .backend
            .resume(&labels::container_name(id))
            .await?;
        self.log(id, LogEntry::now(LogLevel::Info, "sandbox resumed", &[]));
        self.set_state(id, SandboxState::Running)
    }

    /// E2B's connect: resumes a paused sandbox, then makes it live at least `timeout`
    /// from now (never shorter). Returns the sandbox and whether it was resumed.
    pub async fn connect(&self, id: &SandboxId, timeout: Duration) -> Result<(SandboxInfo, bool)> {
        let resumed = match self.info(id)?.state {
            SandboxState::Paused => {
                self.resume(id).await?;
                true
            }
            _ => false,
        };
        Ok((self.extend_timeout(id, timeout)?, resumed))
    }

    fn require_pause(&self) -> Result<()> {
        if self.inner.backend.capabilities().pause {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.inner.backend.name(),
                operation: "pause",
            })
        }
    }
}
