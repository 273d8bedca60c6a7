//! The seed's command API: `/sandboxes/{id}/commands/...`, and the output WebSocket.

use std::collections::BTreeMap;
use std::time::Duration;

use envd_proto::messages::{DataEvent, ProcessEvent};
use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket};
use poem::web::Data;
use poem::{handler, IntoResponse};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use sandbox_core::agent::command::ShellCommand;
use sandbox_core::Error;

use crate::error::{parse_id, ApiError};
use crate::text::Utf8Decoder;
use crate::AppState;

#[derive(Tags)]
enum CommandTags {
    /// Run commands in a sandbox and follow their output.
    Commands,
}

/// A command to run.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct RunCommandRequest {
    /// Command line, run with `/bin/bash -l -c`.
    #[oai(validator(min_length = 1))]
    pub cmd: String,
    /// Seconds before the command's whole process group is killed (foreground only;
    /// default 60).
    pub timeout: Option<u64>,
    /// Working directory (default: the user's home, `/home/user`).
    pub cwd: Option<String>,
    /// Environment added to the sandbox's.
    #[oai(default)]
    pub envs: BTreeMap<String, String>,
    /// User to run as (default `user`).
    pub user: Option<String>,
}

impl poem_openapi::types::Example for RunCommandRequest {
    fn example() -> Self {
        Self {
            cmd: "python script.py".into(),
            timeout: Some(30),
            cwd: Some("/home/user".into()),
            envs: BTreeMap::new(),
            user: None,
        }
    }
}

impl RunCommandRequest {
    fn shell(self) -> ShellCommand {
        ShellCommand {
            cmd: self.cmd,
            cwd: self.cwd,
            envs: self.envs,
            user: self.user,
        }
    }
}

/// What a foreground command produced.
#[derive(Debug, Object)]
#[oai(example)]
pub struct RunCommandResponse {
    /// Standard output, UTF-8 (invalid bytes replaced).
    pub stdout: String,
    /// Standard error, UTF-8 (invalid bytes replaced).
    pub stderr: String,
    /// Exit code; -1 when a signal ended the command.
    pub exit_code: i32,
    /// Why the command ended abnormally (e.g. `signal: killed`), else null.
    #[oai(nullable)]
    pub error: Option<String>,
    /// True when output past the cap (4 MiB per stream) was dropped.
    pub truncated: bool,
}

impl poem_openapi::types::Example for RunCommandResponse {
    fn example() -> Self {
        Self {
            stdout: "Hello, World!\n".into(),
            stderr: String::new(),
            exit_code: 0,
            error: None,
            truncated: false,
        }
    }
}

/// A command started in the background.
#[derive(Debug, Object)]
#[oai(example)]
pub struct BackgroundCommand {
    /// Its pid inside the sandbox; follow it at `/sandboxes/{id}/commands/stream/{pid}`.
    pub pid: u32,
}

impl poem_openapi::types::Example for BackgroundCommand {
    fn example() -> Self {
        Self { pid: 42 }
    }
}

/// A running process.
#[derive(Debug, Object)]
#[oai(example)]
pub struct ProcessEntry {
    /// Pid inside the sandbox.
    pub pid: u32,
    /// Executable.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory, when set.
    #[oai(nullable)]
    pub cwd: Option<String>,
    /// Tag, when set.
    #[oai(nullable)]
    pub tag: Option<String>,
}

impl poem_openapi::types::Example for ProcessEntry {
    fn example() -> Self {
        Self {
            pid: 42,
            cmd: "/bin/bash".into(),
            args: vec![
                "-l".into(),
                "-c".into(),
                "for i in 1 2 3; do echo $i; sleep 1; done".into(),
            ],
            cwd: None,
            tag: None,
        }
    }
}

/// How many processes a sandbox-wide kill ended.
#[derive(Debug, Object)]
#[oai(example)]
pub struct KilledAll {
    /// Processes killed (the agent itself is never one).
    pub killed: u64,
}

impl poem_openapi::types::Example for KilledAll {
    fn example() -> Self {
        Self { killed: 3 }
    }
}

/// Confirmation that a process was killed.
#[derive(Debug, Object)]
#[oai(example)]
pub struct KilledProcess {
    /// The killed process.
    pub pid: u32,
    /// Always `killed`.
    pub status: String,
}

impl poem_openapi::types::Example for KilledProcess {
    fn example() -> Self {
        Self {
            pid: 42,
            status: "killed".into(),
        }
    }
}

/// The command endpoints.
pub struct CommandApi;

#[OpenApi(tag = "CommandTags::Commands")]
impl CommandApi {
    /// Run command
    ///
    /// Runs `cmd` with `/bin/bash -l -c` and waits for it. Sandbox-level `envs` apply,
    /// request `envs` add to them. Past `timeout` the command and its whole process group
    /// are killed and the answer is 408. A non-zero exit is not an error: see `exit_code`.
    #[oai(
        path = "/sandboxes/:sandbox_id/commands/run",
        method = "post",
        operation_id = "run_command"
    )]
    async fn run(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<RunCommandRequest>,
    ) -> Result<Json<RunCommandResponse>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let timeout = body.0.timeout.map(Duration::from_secs);
        let out = state
            .manager
            .run_command(&id, &body.0.shell(), timeout)
            .await?;
        Ok(Json(RunCommandResponse {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit_code: out.end.exit_code,
            error: out
                .end
                .error
                .or_else(|| (!out.end.exited).then(|| out.end.status.clone())),
            truncated: out.truncated > 0,
        }))
    }

    /// Run command in background
    ///
    /// Starts `cmd` and answers with its pid at once; `timeout` is ignored. Follow its
    /// output over the WebSocket `/sandboxes/{id}/commands/stream/{pid}`, which sends JSON
    /// text messages `{"type":"stdout","data":"..."}`, `{"type":"stderr","data":"..."}`,
    /// then `{"type":"exit","code":0}`, or `{"type":"error","message":"..."}` when the
    /// stream fails. A stream opened after the command ended still gets its buffered
    /// output and its exit.
    #[oai(
        path = "/sandboxes/:sandbox_id/commands/run/background",
        method = "post",
        operation_id = "run_background_command"
    )]
    async fn background(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<RunCommandRequest>,
    ) -> Result<Json<BackgroundCommand>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let pid = state.manager.spawn_command(&id, &body.0.shell()).await?;
        Ok(Json(BackgroundCommand { pid }))
    }

    /// List processes
    ///
    /// The sandbox's running commands (started through this API or the E2B SDK).
    #[oai(
        path = "/sandboxes/:sandbox_id/commands/",
        method = "get",
        operation_id = "list_commands"
    )]
    async fn list(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
    ) -> Result<Json<Vec<ProcessEntry>>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let processes = state.manager.list_commands(&id).await?;
        Ok(Json(
            processes
                .into_iter()
                .map(|p| ProcessEntry {
                    pid: p.pid,
                    cmd: p.config.cmd,
                    args: p.config.args,
                    cwd: p.config.cwd,
                    tag: p.tag,
                })
                .collect(),
        ))
    }

    /// Kill every process
    ///
    /// Ends every process in the sandbox but its agent (SIGKILL): commands, what they
    /// started, and what anything left behind. The sandbox keeps running.
    #[oai(
        path = "/sandboxes/:sandbox_id/commands/",
        method = "delete",
        operation_id = "kill_all_commands"
    )]
    async fn kill_all(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
    ) -> Result<Json<KilledAll>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let killed = state.manager.kill_all_processes(&id).await?;
        Ok(Json(KilledAll { killed }))
    }

    /// Kill process
    ///
    /// Kills the process and everything it started (SIGKILL), whatever left its process
    /// group or session; a command that ended with processes left behind has those
    /// killed. 404 for an unknown pid.
    #[oai(
        path = "/sandboxes/:sandbox_id/commands/:pid",
        method = "delete",
        operation_id = "kill_command"
    )]
    async fn kill(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        pid: Path<u32>,
    ) -> Result<Json<KilledProcess>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        state.manager.kill_command(&id, pid.0).await?;
        Ok(Json(KilledProcess {
            pid: pid.0,
            status: "killed".into(),
        }))
    }
}

fn ws_message(value: serde_json::Value) -> Message {
    Message::Text(value.to_string())
}

fn error_message(message: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({"type": "error", "message": message.to_string()})
}

/// Turns a process's events into the seed's WebSocket messages, decoding UTF-8 across
/// chunks (a character split between two chunks stays whole).
#[derive(Default)]
struct SeedMessages {
    out: Utf8Decoder,
    err: Utf8Decoder,
}

impl SeedMessages {
    /// The messages for one event; the last event (end or failure) is `Err`.
    fn of(
        &mut self,
        event: Option<sandbox_core::Result<ProcessEvent>>,
    ) -> Result<Vec<serde_json::Value>, Vec<serde_json::Value>> {
        let text = |kind: &str, text: String| {
            (!text.is_empty()).then(|| serde_json::json!({"type": kind, "data": text}))
        };
        match event {
            Some(Ok(ProcessEvent::Data(DataEvent::Stdout(d) | DataEvent::Pty(d)))) => {
                Ok(text("stdout", self.out.push(&d)).into_iter().collect())
            }
            Some(Ok(ProcessEvent::Data(DataEvent::Stderr(d)))) => {
                Ok(text("stderr", self.err.push(&d)).into_iter().collect())
            }
            Some(Ok(ProcessEvent::End(end))) => {
                let mut msgs: Vec<_> = [
                    text("stdout", self.out.finish()),
                    text("stderr", self.err.finish()),
                ]
                .into_iter()
                .flatten()
                .collect();
                msgs.push(serde_json::json!({"type": "exit", "code": end.exit_code}));
                Err(msgs)
            }
            Some(Ok(_)) => Ok(Vec::new()),
            Some(Err(e)) => Err(vec![error_message(e)]),
            None => Err(vec![error_message(
                "the process stream ended without an exit",
            )]),
        }
    }
}

/// `WS /sandboxes/{id}/commands/stream/{pid}`: a process's output as it is produced.
///
/// A client that takes no message for the stall timeout is dropped (the command goes on;
/// the agent never waits for this reader either).
#[handler]
pub async fn stream(
    poem::web::Path((sandbox_id, pid)): poem::web::Path<(String, String)>,
    ws: WebSocket,
    state: Data<&AppState>,
) -> poem::Response {
    let manager = state.manager.clone();
    let stall = state.limits.stall_timeout;
    ws.on_upgrade(move |socket| async move {
        let (mut sink, mut incoming) = socket.split();
        let gauge = metrics::gauge!("colima_e2b_websockets_open");
        gauge.increment(1.0);
        let follow = async {
            let id = parse_id(&sandbox_id)
                .map_err(|_| Error::not_found(format!("sandbox {sandbox_id}")))?;
            let pid: u32 = pid
                .parse()
                .map_err(|_| Error::not_found(format!("process {pid}")))?;
            manager.follow_command(&id, pid).await
        };
        let mut last = Vec::new();
        match follow.await {
            Err(e) => last.push(error_message(e)),
            Ok(mut process) => {
                let mut messages = SeedMessages::default();
                'follow: loop {
                    let batch = tokio::select! {
                        event = process.next() => messages.of(event),
                        incoming = incoming.next() => match incoming {
                            // The client left: stop following (the process keeps running).
                            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break 'follow,
                            Some(Ok(_)) => Ok(Vec::new()),
                        },
                    };
                    let (msgs, done) = match batch {
                        Ok(msgs) => (msgs, false),
                        Err(msgs) => (msgs, true),
                    };
                    for m in msgs {
                        let sent = tokio::time::timeout(stall, sink.send(ws_message(m))).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            // A client that does not read is dropped, never buffered for.
                            break 'follow;
                        }
                    }
                    if done {
                        break;
                    }
                }
            }
        }
        for m in last {
            let _ = tokio::time::timeout(stall, sink.send(ws_message(m))).await;
        }
        // A stalled client cannot take the close frame either: do not wait for it long.
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        gauge.decrement(1.0);
    })
    .into_response()
}
