//! The native code API: `/sandboxes/{id}/code/...` runs code in a sandbox's code
//! interpreter (sandboxes of the `code-interpreter-v1` template) and manages its
//! contexts; `WS /sandboxes/{id}/code/stream` streams a run's events as they happen, in
//! the shapes of E2B's code-interpreter protocol.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket};
use poem::web::Data;
use poem::{handler, IntoResponse};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sandbox_core::agent::interpreter::{CodeContext, CodeEvents, CodeRun, NewCodeContext};
use sandbox_core::Error;

use crate::error::{parse_id, ApiError};
use crate::AppState;

/// Most stdout plus stderr text a `code/run` answer collects; the rest is dropped and
/// `truncated` says so (the WebSocket streams everything).
const MAX_LOG_BYTES: usize = 16 << 20;
/// Most result bytes (MIME bundles) a `code/run` answer collects.
const MAX_RESULT_BYTES: usize = 64 << 20;

#[derive(Tags)]
enum CodeTags {
    /// Run code in a sandbox's code interpreter (template `code-interpreter-v1`).
    Code,
}

/// Code to run.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct RunCodeRequest {
    /// The code.
    pub code: String,
    /// Language of the default context to run it in: `python` (default), `javascript`
    /// or `bash`. Not with `context_id`.
    pub language: Option<String>,
    /// Context to run it in (state persists between runs). Not with `language`.
    pub context_id: Option<String>,
    /// Environment variables for this run only.
    pub envs: Option<BTreeMap<String, String>>,
    /// Seconds the run may take; past it the run is interrupted and the answer is 408.
    /// Default: no limit beyond the sandbox's life.
    #[oai(validator(minimum(value = "1")))]
    pub timeout: Option<u64>,
}

impl poem_openapi::types::Example for RunCodeRequest {
    fn example() -> Self {
        Self {
            code: "import pandas as pd\npd.DataFrame({'a': [1, 2]})".into(),
            language: None,
            context_id: None,
            envs: None,
            timeout: Some(60),
        }
    }
}

impl RunCodeRequest {
    fn run(&self) -> CodeRun {
        CodeRun {
            code: self.code.clone(),
            context_id: self.context_id.clone(),
            language: self.language.clone(),
            env_vars: self.envs.clone(),
        }
    }
}

/// An error the code raised.
#[derive(Debug, Object)]
#[oai(example)]
pub struct CodeError {
    /// Its name, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its value (message).
    pub value: String,
    /// The traceback, as the kernel formats it.
    pub traceback: String,
}

/// The outcome of a run.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Execution {
    /// Results: MIME bundles (`text`, `html`, `png` as base64, `svg`, `json`, ...) with
    /// `is_main_result` for the value of the last expression.
    pub results: Vec<serde_json::Value>,
    /// The main result's text, if there is one.
    #[oai(nullable)]
    pub text: Option<String>,
    /// What the code printed to stdout.
    pub stdout: String,
    /// What the code printed to stderr.
    pub stderr: String,
    /// The error the code raised, if it did.
    #[oai(nullable)]
    pub error: Option<CodeError>,
    /// The context's execution count after this run.
    #[oai(nullable)]
    pub execution_count: Option<u64>,
    /// Output or results were larger than the answer holds (stream them over the
    /// WebSocket for all of it).
    pub truncated: bool,
}

impl poem_openapi::types::Example for Execution {
    fn example() -> Self {
        Self {
            results: vec![serde_json::json!({"text": "2", "is_main_result": true})],
            text: Some("2".into()),
            stdout: String::new(),
            stderr: String::new(),
            error: None,
            execution_count: Some(1),
            truncated: false,
        }
    }
}

/// A code context: a kernel whose state persists between runs.
#[derive(Debug, Object)]
#[oai(example)]
pub struct CodeContextView {
    /// Its id.
    pub id: String,
    /// Its language.
    pub language: String,
    /// Its working directory.
    pub cwd: String,
}

impl poem_openapi::types::Example for CodeError {
    fn example() -> Self {
        Self {
            name: "ZeroDivisionError".into(),
            value: "division by zero".into(),
            traceback: "ZeroDivisionError: division by zero".into(),
        }
    }
}

impl poem_openapi::types::Example for CodeContextView {
    fn example() -> Self {
        Self {
            id: "3f0c2a9e-5b7d-4c1e-9a8b-2d6e4f1a0b3c".into(),
            language: "python".into(),
            cwd: "/home/user".into(),
        }
    }
}

impl poem_openapi::types::Example for NewContextRequest {
    fn example() -> Self {
        Self {
            language: Some("python".into()),
            cwd: Some("/home/user".into()),
            envs: None,
        }
    }
}

impl From<CodeContext> for CodeContextView {
    fn from(c: CodeContext) -> Self {
        Self {
            id: c.id,
            language: c.language,
            cwd: c.cwd,
        }
    }
}

/// A context to create.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct NewContextRequest {
    /// `python` (default), `javascript` or `bash`.
    pub language: Option<String>,
    /// Working directory (default the template user's home).
    pub cwd: Option<String>,
    /// Environment variables of every run in it.
    pub envs: Option<BTreeMap<String, String>>,
}

/// Done, nothing to say.
#[derive(ApiResponse)]
pub enum Done {
    /// Done.
    #[oai(status = 204)]
    NoContent,
}

/// Collects a run's events into an [`Execution`], within the answer's bounds.
#[derive(Default)]
struct Collector {
    results: Vec<serde_json::Value>,
    result_bytes: usize,
    text: Option<String>,
    stdout: String,
    stderr: String,
    error: Option<CodeError>,
    execution_count: Option<u64>,
    truncated: bool,
}

impl Collector {
    fn add(&mut self, mut event: serde_json::Map<String, serde_json::Value>) {
        let kind = event
            .remove("type")
            .and_then(|t| t.as_str().map(str::to_string))
            .unwrap_or_default();
        let text = |e: &serde_json::Map<String, serde_json::Value>, k: &str| {
            e.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        match kind.as_str() {
            "stdout" | "stderr" => {
                let t = text(&event, "text");
                let used = self.stdout.len() + self.stderr.len();
                if used + t.len() > MAX_LOG_BYTES {
                    self.truncated = true;
                    return;
                }
                if kind == "stdout" {
                    self.stdout.push_str(&t);
                } else {
                    self.stderr.push_str(&t);
                }
            }
            "result" => {
                let size = serde_json::to_string(&event).map_or(0, |s| s.len());
                if self.result_bytes + size > MAX_RESULT_BYTES {
                    self.truncated = true;
                    return;
                }
                self.result_bytes += size;
                if event.get("is_main_result").and_then(|v| v.as_bool()) == Some(true) {
                    self.text = event
                        .get("text")
                        .and_then(|v| v.as_str())
                        .map(str::to_string);
                }
                self.results.push(serde_json::Value::Object(event));
            }
            "error" => {
                let traceback = match event.get("traceback") {
                    Some(serde_json::Value::Array(lines)) => lines
                        .iter()
                        .filter_map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => text(&event, "traceback"),
                };
                self.error = Some(CodeError {
                    name: text(&event, "name"),
                    value: text(&event, "value"),
                    traceback,
                });
            }
            "number_of_executions" => {
                self.execution_count = event.get("execution_count").and_then(|v| v.as_u64());
            }
            _ => {}
        }
    }

    fn finish(self) -> Execution {
        Execution {
            results: self.results,
            text: self.text,
            stdout: self.stdout,
            stderr: self.stderr,
            error: self.error,
            execution_count: self.execution_count,
            truncated: self.truncated,
        }
    }
}

/// Collects every event of `events` (until `end_of_execution`).
async fn collect(mut events: CodeEvents) -> sandbox_core::Result<Execution> {
    let mut c = Collector::default();
    while let Some(event) = events.next().await {
        c.add(event?);
    }
    Ok(c.finish())
}

/// The code endpoints.
pub struct CodeApi;

#[OpenApi(tag = "CodeTags::Code")]
impl CodeApi {
    /// Run code
    ///
    /// Runs `code` in the sandbox's code interpreter and answers when it has finished:
    /// its results (the last expression's value and displayed objects, with their MIME
    /// bundles: a matplotlib figure is a `png`, a DataFrame `html` and `text`), its
    /// output, and the error it raised. State persists between runs in a context. Stream
    /// the events as they happen over the WebSocket `/sandboxes/{id}/code/stream`. The
    /// sandbox must come from the `code-interpreter-v1` template (else 409).
    #[oai(
        path = "/sandboxes/:sandbox_id/code/run",
        method = "post",
        operation_id = "run_code"
    )]
    async fn run(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<RunCodeRequest>,
    ) -> Result<Json<Execution>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let events = state.manager.run_code(&id, &body.0.run()).await?;
        let execution = match body.0.timeout.map(Duration::from_secs) {
            // Dropping the events on timeout interrupts the run.
            Some(limit) => tokio::time::timeout(limit, collect(events))
                .await
                .map_err(|_| Error::Timeout(limit))??,
            None => collect(events).await?,
        };
        Ok(Json(execution))
    }

    /// List code contexts
    ///
    /// The sandbox's code contexts, the default ones (one per language used) included.
    #[oai(
        path = "/sandboxes/:sandbox_id/code/contexts",
        method = "get",
        operation_id = "list_code_contexts"
    )]
    async fn contexts(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
    ) -> Result<Json<Vec<CodeContextView>>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let all = state.manager.code_contexts(&id).await?;
        Ok(Json(all.into_iter().map(Into::into).collect()))
    }

    /// Create a code context
    ///
    /// Starts a kernel of `language` in `cwd`; runs in it share state.
    #[oai(
        path = "/sandboxes/:sandbox_id/code/contexts",
        method = "post",
        operation_id = "create_code_context"
    )]
    async fn create_context(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<NewContextRequest>,
    ) -> Result<Json<CodeContextView>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let new = NewCodeContext {
            language: body.0.language,
            cwd: body.0.cwd,
            env_vars: body.0.envs,
        };
        Ok(Json(
            state.manager.create_code_context(&id, &new).await?.into(),
        ))
    }

    /// Remove a code context
    ///
    /// Stops its kernel; 404 when it does not exist.
    #[oai(
        path = "/sandboxes/:sandbox_id/code/contexts/:context_id",
        method = "delete",
        operation_id = "remove_code_context"
    )]
    async fn remove_context(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        context_id: Path<String>,
    ) -> Result<Done, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        state
            .manager
            .remove_code_context(&id, &context_id.0)
            .await?;
        Ok(Done::NoContent)
    }

    /// Restart a code context
    ///
    /// Its kernel starts anew: variables and imports are gone.
    #[oai(
        path = "/sandboxes/:sandbox_id/code/contexts/:context_id/restart",
        method = "post",
        operation_id = "restart_code_context"
    )]
    async fn restart_context(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        context_id: Path<String>,
    ) -> Result<Done, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        state
            .manager
            .restart_code_context(&id, &context_id.0)
            .await?;
        Ok(Done::NoContent)
    }
}

/// The first message of a code stream: what to run.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamRequest {
    code: String,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    timeout: Option<u64>,
}

fn failure(message: impl std::fmt::Display) -> Message {
    Message::Text(
        serde_json::json!({"type": "stream_error", "message": message.to_string()}).to_string(),
    )
}

/// `WS /sandboxes/{id}/code/stream`: the client sends one text message, a JSON run
/// request `{code, language?, context_id?, envs?, timeout?}`; the server sends each
/// event as it happens (`stdout`, `stderr`, `result`, `error`, `number_of_executions`,
/// then `end_of_execution`) and closes. Closing the socket interrupts the run.
#[handler]
pub async fn stream(
    poem::web::Path(sandbox_id): poem::web::Path<String>,
    ws: WebSocket,
    state: Data<&AppState>,
) -> poem::Response {
    let manager = state.manager.clone();
    let stall = state.limits.stall_timeout;
    ws.on_upgrade(move |socket| async move {
        let (mut sink, mut incoming) = socket.split();
        let gauge = metrics::gauge!("colima_e2b_websockets_open");
        gauge.increment(1.0);
        let request = match tokio::time::timeout(stall, incoming.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<StreamRequest>(&t)
                .map_err(|e| format!("invalid run request: {e}")),
            Ok(Some(Ok(_))) => Err("the first message must be a JSON text message".into()),
            _ => Err("no run request arrived".to_string()),
        };
        let started = match request {
            Err(e) => Err(e),
            Ok(r) => match parse_id(&sandbox_id) {
                Err(_) => Err(format!("sandbox {sandbox_id} not found")),
                Ok(id) => {
                    let run = CodeRun {
                        code: r.code,
                        context_id: r.context_id,
                        language: r.language,
                        env_vars: r.envs,
                    };
                    manager
                        .run_code(&id, &run)
                        .await
                        .map(|events| (events, r.timeout.map(Duration::from_secs)))
                        .map_err(|e| e.to_string())
                }
            },
        };
        let mut last = None;
        match started {
            Err(e) => last = Some(failure(e)),
            Ok((mut events, limit)) => {
                let deadline = limit.map(|l| tokio::time::Instant::now() + l);
                loop {
                    let timer = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        event = events.next() => match event {
                            None => break,
                            Some(Err(e)) => { last = Some(failure(e)); break; }
                            Some(Ok(e)) => {
                                let msg = Message::Text(serde_json::Value::Object(e).to_string());
                                let sent = tokio::time::timeout(stall, sink.send(msg)).await;
                                if !matches!(sent, Ok(Ok(()))) {
                                    // A client that does not read is dropped, never
                                    // buffered for; the run is interrupted.
                                    break;
                                }
                            }
                        },
                        incoming = incoming.next() => match incoming {
                            // The client left: dropping the events interrupts the run.
                            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                            Some(Ok(_)) => {}
                        },
                        _ = timer => {
                            let limit = limit.unwrap_or_default();
                            last = Some(failure(Error::Timeout(limit)));
                            break;
                        }
                    }
                }
            }
        }
        if let Some(m) = last {
            let _ = tokio::time::timeout(stall, sink.send(m)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        gauge.decrement(1.0);
    })
    .into_response()
}
