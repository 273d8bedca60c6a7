//! Interactive terminals: a login shell in a sandbox's pty, typed into and resized by one
//! client (the CLI's `sandbox shell`, the dashboard's terminal), killed when it leaves.

use envd_proto::messages::{
    ProcessConfig, ProcessInput, ProcessSelector, Pty, PtySize, StartRequest, UpdateRequest,
};

use super::SandboxManager;
use crate::agent::command::{first_pid, kill};
use crate::agent::{AgentClient, ProcessStream};
use crate::error::{Error, Result};
use crate::types::{validate_user, SandboxId};

/// Largest pty a client may ask for (columns and rows each).
pub const MAX_TERMINAL_SIZE: u16 = 1000;

/// How to open a terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminalRequest {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
    /// User to log in as (default: the sandbox's default user).
    pub user: Option<String>,
}

impl Default for TerminalRequest {
    fn default() -> Self {
        Self {
            cols: 80,
            rows: 24,
            user: None,
        }
    }
}

fn size(cols: u16, rows: u16) -> Result<PtySize> {
    let ok = |n: u16| (1..=MAX_TERMINAL_SIZE).contains(&n);
    if !ok(cols) || !ok(rows) {
        return Err(Error::InvalidArgument(format!(
            "a terminal is 1 to {MAX_TERMINAL_SIZE} columns and rows (asked {cols}x{rows})"
        )));
    }
    Ok(PtySize {
        cols: cols.into(),
        rows: rows.into(),
    })
}

/// A login shell running in a sandbox's pty: its controls and its output, apart so that
/// one task can type while it reads.
#[derive(Debug)]
pub struct Terminal {
    /// Input, resize and close. Dropping it kills the shell: a terminal never outlives
    /// its client, however the client left.
    pub control: TerminalControl,
    /// The pty's output, then the shell's end.
    pub output: ProcessStream,
}

/// What a client does to its terminal.
#[derive(Debug)]
pub struct TerminalControl {
    agent: AgentClient,
    pid: u32,
    closed: bool,
}

impl Drop for TerminalControl {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (agent, pid) = (self.agent.clone(), self.pid);
            rt.spawn(async move {
                let _ = kill(&agent, pid).await;
            });
        }
    }
}

impl TerminalControl {
    /// The shell's pid inside the sandbox.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Bytes typed into the terminal.
    pub async fn input(&self, bytes: Vec<u8>) -> Result<()> {
        self.agent
            .send_input(ProcessSelector::by_pid(self.pid), ProcessInput::Pty(bytes))
            .await
    }

    /// Resizes the pty (the shell gets SIGWINCH).
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        let size = size(cols, rows)?;
        self.agent
            .update(&UpdateRequest {
                process: ProcessSelector::by_pid(self.pid),
                pty: Some(Pty { size: Some(size) }),
            })
            .await
    }

    /// Kills the shell and everything it started (its process group).
    pub async fn close(mut self) -> Result<()> {
        self.closed = true;
        match kill(&self.agent, self.pid).await {
            // Already gone: the shell exited by itself.
            Err(Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}

impl SandboxManager {
    /// Opens a login shell (`bash -l`, `TERM=xterm-256color`) in a pty of sandbox `id`.
    /// The caller owns it: [`Terminal::close`] when its client leaves.
    pub async fn open_terminal(&self, id: &SandboxId, req: &TerminalRequest) -> Result<Terminal> {
        let size = size(req.cols, req.rows)?;
        let mut agent = self.agent(id).await?;
        if let Some(user) = &req.user {
            validate_user(user)?;
            agent = agent.with_user(user.clone());
        }
        let start = StartRequest {
            process: ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into()],
                envs: [("TERM".to_string(), "xterm-256color".to_string())].into(),
                cwd: None,
            },
            pty: Some(Pty { size: Some(size) }),
            ..Default::default()
        };
        let mut output = agent.start(&start, None).await?;
        let pid = first_pid(&mut output).await?;
        metrics::counter!("colima_e2b_terminals_opened_total").increment(1);
        Ok(Terminal {
            control: TerminalControl {
                agent,
                pid,
                closed: false,
            },
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sizes_are_bounded() {
        assert!(size(80, 24).is_ok());
        assert!(size(MAX_TERMINAL_SIZE, 1).is_ok());
        for (c, r) in [(0, 24), (80, 0), (MAX_TERMINAL_SIZE + 1, 24)] {
            assert!(matches!(size(c, r), Err(Error::InvalidArgument(_))));
        }
    }
}
