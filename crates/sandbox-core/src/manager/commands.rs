//! The native API's commands: shell command lines run through a sandbox's agent, with the
//! server's default and longest timeouts and the output it keeps.

use std::time::{Duration, Instant};

use envd_proto::messages::ProcessInfo;

use super::SandboxManager;
use crate::agent::command::{self, ShellCommand};
use crate::agent::{ProcessOutput, ProcessStream};
use crate::error::{Error, Result};
use crate::types::SandboxId;

/// Timeouts and output caps of foreground commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandLimits {
    /// Timeout of a command that names none.
    pub default_timeout: Duration,
    /// Longest timeout a command may ask for.
    pub max_timeout: Duration,
    /// Bytes of stdout, and of stderr, a foreground command returns; the rest is dropped
    /// and counted as truncated.
    pub max_output: usize,
}

impl Default for CommandLimits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(24 * 3600),
            max_output: 4 << 20,
        }
    }
}

impl SandboxManager {
    /// Runs `cmd` to completion in sandbox `id`. Past its timeout (the request's, else
    /// the default) the agent kills the command's whole tree and this is
    /// [`Error::Timeout`]. A non-zero exit is not an error.
    pub async fn run_command(
        &self,
        id: &SandboxId,
        cmd: &ShellCommand,
        timeout: Option<Duration>,
    ) -> Result<ProcessOutput> {
        let limits = self.inner.config.commands;
        let timeout = timeout.unwrap_or(limits.default_timeout);
        if timeout.is_zero() || timeout > limits.max_timeout {
            return Err(Error::InvalidArgument(format!(
                "timeout must be between 1 and {} seconds",
                limits.max_timeout.as_secs()
            )));
        }
        cmd.validate()?;
        let agent = self.agent(id).await?;
        let started = Instant::now();
        let result = cmd.run(&agent, timeout, limits.max_output).await;
        let outcome = match &result {
            Ok(o) if o.end.exit_code == 0 => "ok",
            Ok(_) => "nonzero",
            Err(Error::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        metrics::counter!("colima_e2b_commands_total", "outcome" => outcome).increment(1);
        metrics::histogram!("colima_e2b_command_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Starts `cmd` in the background in sandbox `id`; returns its pid.
    pub async fn spawn_command(&self, id: &SandboxId, cmd: &ShellCommand) -> Result<u32> {
        cmd.validate()?;
        let agent = self.agent(id).await?;
        let pid = cmd.spawn(&agent).await?;
        metrics::counter!("colima_e2b_commands_total", "outcome" => "background").increment(1);
        Ok(pid)
    }

    /// The sandbox's running commands.
    pub async fn list_commands(&self, id: &SandboxId) -> Result<Vec<ProcessInfo>> {
        self.agent(id).await?.list().await
    }

    /// Kills command `pid` of sandbox `id` and everything it started.
    pub async fn kill_command(&self, id: &SandboxId, pid: u32) -> Result<()> {
        command::kill(&self.agent(id).await?, pid).await
    }

    /// Ends every process in sandbox `id` but its agent; returns how many were killed.
    pub async fn kill_all_processes(&self, id: &SandboxId) -> Result<u64> {
        let killed = self.agent(id).await?.kill_all().await?;
        tracing::info!(sandbox = %id, killed, "killed every process of the sandbox");
        Ok(killed)
    }

    /// Follows command `pid`'s output from its buffered start.
    pub async fn follow_command(&self, id: &SandboxId, pid: u32) -> Result<ProcessStream> {
        command::follow(&self.agent(id).await?, pid).await
    }
}
