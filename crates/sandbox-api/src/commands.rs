//! The seed's command API: `/sandboxes/{id}/commands/...`, and the output WebSocket.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket};
use poem::web::Data;
use poem::{handler, IntoResponse};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use sandbox_core::agent_client::proto::{DataEvent, ProcessEvent};
use sandbox_core::command::{self, ShellCommand};
use sandbox_core::Error;

use crate::error::{parse_id, ApiError};
use crate::text::Utf8Decoder;
use crate::AppState;

/// Most bytes of stdout and of stderr a foreground command returns; the rest is dropped
/// and `truncated` says so.
pub const MAX_OUTPUT: usize = 4 << 20;
/// Timeout of a foreground command when the request gives none, seconds.
pub const DEFAULT_TIMEOUT: u64 = 60;
/// Longest timeout a foreground command may ask for, seconds.
pub const MAX_TIMEOUT: u64 = 24 * 3600;
/// A WebSocket client that does not take a message for this long is dropped.
const WS_SEND_TIMEOUT: Duration = Duration::from_secs(30);

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
        let timeout = body.0.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout == 0 || timeout > MAX_TIMEOUT {
            return Err(Error::InvalidArgument(format!(
                "timeout must be between 1 and {MAX_TIMEOUT} seconds"
            ))
            .into());
        }
        let agent = state.manager.agent(&id).await?;
        let started = std::time::Instant::now();
        let result = body
            .0
            .shell()
            .run(&agent, Duration::from_secs(timeout), MAX_OUTPUT)
            .await;
        let outcome = match &result {
            Ok(o) if o.end.exit_code == 0 => "ok",
            Ok(_) => "nonzero",
            Err(Error::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        metrics::counter!("colima_e2b_commands_total", "outcome" => outcome).increment(1);
        metrics::histogram!("colima_e2b_command_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let out = result?;
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
        let agent = state.manager.agent(&id).await?;
        let pid = body.0.shell().spawn(&agent).await?;
        metrics::counter!("colima_e2b_commands_total", "outcome" => "background").increment(1);
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
        let agent = state.manager.agent(&id).await?;
        let processes = agent.list().await?;
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

    /// Kill process
    ///
    /// Kills the process and its whole process group (SIGKILL). 404 for an unknown pid.
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
        let agent = state.manager.agent(&id).await?;
        command::kill(&agent, pid.0).await?;
        Ok(Json(KilledProcess {
            pid: pid.0,
            status: "killed".into(),
        }))
    }
}

fn ws_message(value: serde_json::Value) -> Message {
    Message::Text(value.to_string())
}

/// `WS /sandboxes/{id}/commands/stream/{pid}`: a process's output as it is produced.
#[handler]
pub async fn stream(
    poem::web::Path((sandbox_id, pid)): poem::web::Path<(String, String)>,
    ws: WebSocket,
    state: Data<&AppState>,
) -> poem::Response {
    let manager = state.manager.clone();
    ws.on_upgrade(move |socket| async move {
        let (mut sink, mut incoming) = socket.split();
        let follow = async {
            let id = parse_id(&sandbox_id).map_err(|_| Error::not_found(format!("sandbox {sandbox_id}")))?;
            let pid: u32 = pid
                .parse()
                .map_err(|_| Error::not_found(format!("process {pid}")))?;
            let agent = manager.agent(&id).await?;
            command::follow(&agent, pid).await
        };
        let gauge = metrics::gauge!("colima_e2b_websockets_open");
        gauge.increment(1.0);
        let mut process = match follow.await {
            Ok(p) => p,
            Err(e) => {
                let _ = sink
                    .send(ws_message(serde_json::json!({"type": "error", "message": e.to_string()})))
                    .await;
                let _ = sink.close().await;
                gauge.decrement(1.0);
                return;
            }
        };
        let (mut out, mut err) = (Utf8Decoder::default(), Utf8Decoder::default());
        loop {
            let message = tokio::select! {
                event = process.next() => match event {
                    Some(Ok(ProcessEvent::Data(DataEvent::Stdout(d) | DataEvent::Pty(d)))) => {
                        let text = out.push(&d);
                        (!text.is_empty()).then(|| serde_json::json!({"type": "stdout", "data": text}))
                    }
                    Some(Ok(ProcessEvent::Data(DataEvent::Stderr(d)))) => {
                        let text = err.push(&d);
                        (!text.is_empty()).then(|| serde_json::json!({"type": "stderr", "data": text}))
                    }
                    Some(Ok(ProcessEvent::End(end))) => {
                        let mut msgs = Vec::new();
                        for (kind, rest) in [("stdout", out.finish()), ("stderr", err.finish())] {
                            if !rest.is_empty() {
                                msgs.push(serde_json::json!({"type": kind, "data": rest}));
                            }
                        }
                        msgs.push(serde_json::json!({"type": "exit", "code": end.exit_code}));
                        for m in msgs {
                            let _ = tokio::time::timeout(WS_SEND_TIMEOUT, sink.send(ws_message(m))).await;
                        }
                        break;
                    }
                    Some(Ok(_)) => None,
                    Some(Err(e)) => {
                        let _ = sink
                            .send(ws_message(serde_json::json!({"type": "error", "message": e.to_string()})))
                            .await;
                        break;
                    }
                    None => {
                        let _ = sink
                            .send(ws_message(serde_json::json!({"type": "error", "message": "the process stream ended without an exit"})))
                            .await;
                        break;
                    }
                },
                incoming = incoming.next() => match incoming {
                    // The client left: stop following (the process keeps running).
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(_)) => None,
                },
            };
            if let Some(m) = message {
                match tokio::time::timeout(WS_SEND_TIMEOUT, sink.send(ws_message(m))).await {
                    Ok(Ok(())) => {}
                    // A client that does not read is dropped, never buffered for.
                    _ => break,
                }
            }
        }
        let _ = sink.close().await;
        gauge.decrement(1.0);
    })
    .into_response()
}
