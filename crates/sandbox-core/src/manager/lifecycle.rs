//! Lifecycle after creation: kill, and E2B's connect (pause and resume: [`super::pausing`]).

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

    /// E2B's connect: resumes a paused sandbox for `timeout` (from its filesystem when
    /// `cold`), or makes a running one live at least `timeout` from now (never
    /// shorter). Returns the sandbox and whether it was resumed.
    pub async fn connect(
        &self,
        id: &SandboxId,
        timeout: Duration,
        cold: bool,
    ) -> Result<(SandboxInfo, bool)> {
        if self.info(id)?.state == SandboxState::Paused {
            match self.resume(id, Some(timeout), cold).await {
                Ok(info) => return Ok((info, true)),
                // Resumed by someone else meanwhile: connect to it as running.
                Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((self.extend_timeout(id, timeout)?, false))
    }
}
