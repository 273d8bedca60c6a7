//! [`InterpreterClient`]: the code interpreter service of a `code-interpreter-v1`
//! sandbox (port [`INTERPRETER_PORT`], the protocol of E2B's code-interpreter SDK), for
//! the native API. Runs stream as NDJSON events ([`CodeEvents`]), each kept as the JSON
//! object the service sent, so the native API forwards the SDK's own event shapes.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::errors::{unavailable, unreadable};
use crate::error::{Error, Result};

/// Port of the code interpreter inside a sandbox (the SDK's `JUPYTER_PORT`).
pub const INTERPRETER_PORT: u16 = 49999;

/// Largest event line read (a PNG result is base64 in one line).
pub const MAX_EVENT_LINE: usize = 32 << 20;

/// Largest answer of the contexts calls.
const MAX_ANSWER: usize = 1 << 20;

/// Time a contexts call may take (a context starts a kernel).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A code context: a kernel whose state persists between runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeContext {
    /// Context id.
    pub id: String,
    /// Its language (`python`, `javascript`, `bash`).
    pub language: String,
    /// Its working directory.
    pub cwd: String,
}

/// A new context's settings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NewCodeContext {
    /// Language (default python).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Working directory (default the user's home).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment of every run in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<std::collections::BTreeMap<String, String>>,
}

/// One run of code.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CodeRun {
    /// The code.
    pub code: String,
    /// The context to run it in (not with `language`).
    pub context_id: Option<String>,
    /// The language's default context (not with `context_id`).
    pub language: Option<String>,
    /// Environment for this run only.
    pub env_vars: Option<std::collections::BTreeMap<String, String>>,
}

/// A typed client of one sandbox's interpreter. Cloning is cheap.
#[derive(Clone)]
pub struct InterpreterClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl std::fmt::Debug for InterpreterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("InterpreterClient")
            .field("base", &self.base)
            .finish()
    }
}

impl InterpreterClient {
    /// A client of the interpreter at `addr`, authenticating with the sandbox's token.
    pub fn new(http: reqwest::Client, addr: std::net::SocketAddr, token: String) -> Self {
        Self {
            http,
            base: format!("http://{addr}"),
            token,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(envd_proto::TOKEN_HEADER, &self.token)
    }

    /// Sends a request; a refused connection means the sandbox has no interpreter.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                Error::Conflict(
                    "this sandbox has no code interpreter (create it from the \
                     code-interpreter-v1 template)"
                        .into(),
                )
            } else {
                unavailable(format!("the code interpreter did not answer: {e}"))
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(answer_error(resp).await)
    }

    /// The sandbox's contexts.
    pub async fn contexts(&self) -> Result<Vec<CodeContext>> {
        let resp = self
            .send(
                self.request(reqwest::Method::GET, "/contexts")
                    .timeout(CALL_TIMEOUT),
            )
            .await?;
        json_answer(resp, "contexts").await
    }

    /// Creates a context (starts its kernel).
    pub async fn create_context(&self, new: &NewCodeContext) -> Result<CodeContext> {
        let resp = self
            .send(
                self.request(reqwest::Method::POST, "/contexts")
                    .json(new)
                    .timeout(CALL_TIMEOUT),
            )
            .await?;
        json_answer(resp, "context").await
    }

    /// Removes a context (stops its kernel).
    pub async fn remove_context(&self, id: &str) -> Result<()> {
        let path = format!("/contexts/{}", path_segment(id)?);
        self.send(
            self.request(reqwest::Method::DELETE, &path)
                .timeout(CALL_TIMEOUT),
        )
        .await
        .map(drop)
    }

    /// Restarts a context: its kernel starts anew, its state is gone.
    pub async fn restart_context(&self, id: &str) -> Result<()> {
        let path = format!("/contexts/{}/restart", path_segment(id)?);
        self.send(
            self.request(reqwest::Method::POST, &path)
                .timeout(CALL_TIMEOUT),
        )
        .await
        .map(drop)
    }

    /// Starts a run. Dropping the events interrupts it (the service sees the connection
    /// close).
    pub async fn run(&self, run: &CodeRun) -> Result<CodeEvents> {
        let resp = self
            .send(self.request(reqwest::Method::POST, "/execute").json(run))
            .await?;
        Ok(CodeEvents {
            body: Box::pin(resp.bytes_stream()),
            buf: BytesMut::new(),
            ended: false,
        })
    }
}

/// Context ids are the service's own; anything that is not a plain token is refused
/// before it reaches a URL.
fn path_segment(id: &str) -> Result<&str> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(id)
    } else {
        Err(Error::InvalidArgument(format!("invalid context id {id:?}")))
    }
}

/// Reads a small answer (bounded).
async fn read_capped(resp: reqwest::Response) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| unavailable(format!("the answer broke off: {e}")))?;
        if out.len() + chunk.len() > MAX_ANSWER {
            return Err(unreadable("code interpreter answer", "too large"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn json_answer<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    what: &str,
) -> Result<T> {
    let body = read_capped(resp).await?;
    serde_json::from_slice(&body).map_err(|e| unreadable(what, e))
}

/// The core's error for a refusal of the service.
async fn answer_error(resp: reqwest::Response) -> Error {
    let status = resp.status().as_u16();
    let body = read_capped(resp).await.unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            ["message", "error", "detail"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|m| m.as_str()).map(str::to_string))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    let message = if message.is_empty() {
        format!("the code interpreter answered {status}")
    } else {
        message
    };
    match status {
        400 | 413 | 422 => Error::InvalidArgument(message),
        401 | 403 => Error::PermissionDenied(message),
        404 => Error::NotFound { what: message },
        409 => Error::Conflict(message),
        429 => Error::ResourceExhausted {
            message,
            retry_after: None,
        },
        _ => unavailable(message),
    }
}

type ByteStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static>,
>;

/// The events of one run, as the service sends them: JSON objects with a `type`
/// (`stdout`, `stderr`, `result`, `error`, `number_of_executions`, `end_of_execution`).
pub struct CodeEvents {
    body: ByteStream,
    buf: BytesMut,
    ended: bool,
}

impl CodeEvents {
    /// The next event; `None` after `end_of_execution`. A stream that ends without it
    /// (the kernel died, the sandbox went away) is an error.
    pub async fn next(&mut self) -> Option<Result<serde_json::Map<String, serde_json::Value>>> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: serde_json::Map<String, serde_json::Value> =
                    match serde_json::from_slice(line) {
                        Ok(e) => e,
                        Err(e) => return Some(Err(unreadable("code interpreter event", e))),
                    };
                if event.get("type").and_then(|t| t.as_str()) == Some("end_of_execution") {
                    self.ended = true;
                }
                return Some(Ok(event));
            }
            if self.buf.len() > MAX_EVENT_LINE {
                self.ended = true;
                return Some(Err(Error::TooLarge(format!(
                    "a code interpreter event is larger than {} MiB",
                    MAX_EVENT_LINE >> 20
                ))));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(chunk.chunk()),
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(unavailable(format!("the run broke off: {e}"))));
                }
                None => {
                    self.ended = true;
                    return Some(Err(unavailable(
                        "the run ended without end_of_execution (the kernel or sandbox went away)",
                    )));
                }
            }
        }
    }
}
