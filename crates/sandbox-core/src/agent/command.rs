//! Shell commands in a sandbox: how the native API runs `cmd` strings through the agent.

use std::collections::BTreeMap;
use std::time::Duration;

use envd_proto::messages::{ProcessConfig, ProcessEvent, ProcessSelector, Signal, StartRequest};

use super::errors::unavailable;
use super::{AgentClient, ProcessOutput, ProcessStream};
use crate::error::{Error, Result};
use crate::types::{validate_envs, validate_user};

/// Longest command line accepted.
pub const MAX_CMD_LEN: usize = 256 * 1024;

/// A shell command line and how to run it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShellCommand {
    /// The command line, run as `/bin/bash -l -c <cmd>` (as E2B's SDKs do).
    pub cmd: String,
    /// Working directory; relative paths resolve against the user's home.
    pub cwd: Option<String>,
    /// Environment added to the sandbox's own.
    pub envs: BTreeMap<String, String>,
    /// User to run as (default: the sandbox's default user).
    pub user: Option<String>,
}

impl ShellCommand {
    /// Rejects what no shell or kernel accepts (NUL bytes, bad env names, huge input).
    pub fn validate(&self) -> Result<()> {
        if self.cmd.trim().is_empty() {
            return Err(Error::InvalidArgument("cmd must not be empty".into()));
        }
        if self.cmd.len() > MAX_CMD_LEN {
            return Err(Error::InvalidArgument(format!(
                "cmd is longer than {MAX_CMD_LEN} bytes"
            )));
        }
        let has_nul = |s: &str| s.contains('\0');
        if has_nul(&self.cmd)
            || self.cwd.as_deref().is_some_and(has_nul)
            || self.user.as_deref().is_some_and(has_nul)
        {
            return Err(Error::InvalidArgument(
                "cmd, cwd and user must not contain NUL bytes".into(),
            ));
        }
        if let Some(user) = &self.user {
            validate_user(user)?;
        }
        validate_envs(&self.envs)
    }

    fn request(&self) -> StartRequest {
        StartRequest {
            process: ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), self.cmd.clone()],
                envs: self.envs.clone(),
                cwd: self.cwd.clone(),
            },
            // No input for API commands: stdin is /dev/null, so `cat` cannot hang.
            stdin: Some(false),
            ..Default::default()
        }
    }

    fn client(&self, agent: &AgentClient) -> AgentClient {
        match &self.user {
            Some(u) => agent.clone().with_user(u.clone()),
            None => agent.clone(),
        }
    }

    /// Runs to completion, keeping at most `max_output` bytes of stdout and of stderr.
    /// Past `timeout` the agent kills the command's whole process group and this returns
    /// [`Error::Timeout`].
    pub async fn run(
        &self,
        agent: &AgentClient,
        timeout: Duration,
        max_output: usize,
    ) -> Result<ProcessOutput> {
        self.validate()?;
        let stream = self
            .client(agent)
            .start(&self.request(), Some(timeout))
            .await?;
        match stream.collect_output(max_output).await {
            Err(Error::Timeout(_)) => Err(Error::Timeout(timeout)),
            other => other,
        }
    }

    /// Starts in the background and returns its pid once the agent reports the start.
    /// The command keeps running after this returns.
    pub async fn spawn(&self, agent: &AgentClient) -> Result<u32> {
        self.validate()?;
        let mut stream = self.client(agent).start(&self.request(), None).await?;
        first_pid(&mut stream).await
    }
}

/// Reads `stream` up to the agent's report that the process started; its pid.
pub(crate) async fn first_pid(stream: &mut ProcessStream) -> Result<u32> {
    while let Some(event) = stream.next().await {
        if let ProcessEvent::Start { pid } = event? {
            return Ok(pid);
        }
    }
    Err(unavailable(
        "the agent ended the stream before the process started",
    ))
}

/// Kills a process and its whole group (SIGKILL).
pub async fn kill(agent: &AgentClient, pid: u32) -> Result<()> {
    agent
        .send_signal(ProcessSelector::by_pid(pid), Signal::Kill)
        .await
        .map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found(format!("process {pid}")),
            other => other,
        })
}

/// Follows a running or recently ended process's output.
pub async fn follow(agent: &AgentClient, pid: u32) -> Result<ProcessStream> {
    agent
        .connect(ProcessSelector::by_pid(pid), None)
        .await
        .map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found(format!("process {pid}")),
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_with_nul_bad_envs_or_users_are_invalid() {
        let ok = ShellCommand {
            cmd: "echo hi".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        for bad in [
            ShellCommand {
                cmd: "  ".into(),
                ..ok.clone()
            },
            ShellCommand {
                cmd: "a\0b".into(),
                ..ok.clone()
            },
            ShellCommand {
                cwd: Some("/tmp\0".into()),
                ..ok.clone()
            },
            ShellCommand {
                user: Some("root;id".into()),
                ..ok.clone()
            },
            ShellCommand {
                envs: BTreeMap::from([("A B".into(), "x".into())]),
                ..ok.clone()
            },
            ShellCommand {
                cmd: "x".repeat(MAX_CMD_LEN + 1),
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn commands_run_through_a_login_bash_without_stdin() {
        let req = ShellCommand {
            cmd: "echo $HOME".into(),
            cwd: Some("/tmp".into()),
            ..Default::default()
        }
        .request();
        assert_eq!(req.process.cmd, "/bin/bash");
        assert_eq!(req.process.args, vec!["-l", "-c", "echo $HOME"]);
        assert_eq!(req.stdin, Some(false));
        assert_eq!(req.process.cwd.as_deref(), Some("/tmp"));
    }
}
