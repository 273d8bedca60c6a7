//! [`AgentClient`]: typed calls to the in-sandbox agent (envd's protocol: Connect RPC with
//! the JSON codec over HTTP/1.1, plus REST `/files`, `/health` and `/init`).
//!
//! The wire types are the agent's own ([`sandbox_agent::proto`], re-exported as
//! [`proto`]): one definition for both ends, so they cannot drift apart.
//!
//! Every response is read with a cap (unary answers, stream envelopes), and a stream
//! that stops carrying anything (not even the keepalives the client asks for) ends with
//! an error instead of hanging, so a killed or frozen sandbox cannot hold a caller.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

use proto::{
    EntryInfo, EntryResponse, InitRequest, ListDirRequest, ListDirResponse, ListResponse,
    MoveRequest, PathRequest, ProcessEvent, ProcessEventMessage, ProcessInfo, ProcessInput,
    ProcessSelector, SelectRequest, SendInputRequest, SendSignalRequest, Signal, StartRequest,
    UpdateRequest, WriteInfo,
};
pub use sandbox_agent::proto;
pub use sandbox_agent::ENVD_VERSION;

use crate::error::{Error, Result};

/// Port the agent listens on inside every sandbox (envd's).
pub const AGENT_PORT: u16 = 49983;
/// Container environment variable that hands the agent its per-sandbox secret.
pub const SECRET_ENV: &str = "COLIMA_E2B_AGENT_SECRET";
/// Header carrying the secret on every request but `/health`.
pub const TOKEN_HEADER: &str = "X-Access-Token";
/// Largest unary answer read into memory.
pub const MAX_UNARY_RESPONSE: usize = 16 << 20;
/// Largest single stream message accepted (the agent sends output in 32 KiB chunks).
pub const MAX_STREAM_MESSAGE: usize = 16 << 20;
/// Keepalive interval asked of the agent on streams, in seconds.
const KEEPALIVE_SECS: u64 = 5;
/// A stream silent for this long (no output, no keepalive) is treated as dead.
const STREAM_IDLE: Duration = Duration::from_secs(20);

/// A shared HTTP client for agents: keep-alive pooling (one pool per agent address), no
/// proxy (agents are on local bridges), Nagle off (small request/response latency).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(50))
        .pool_max_idle_per_host(8)
        .connect_timeout(Duration::from_secs(3))
        .build()
        // Building only fails on TLS setup, which this client does not use.
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Typed client for one sandbox's agent. Cloning is cheap and shares the connection pool.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    addr: SocketAddr,
    base: String,
    token: String,
    user: Option<String>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("AgentClient")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What a whole command produced (see [`ProcessStream::collect_output`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessOutput {
    /// Pid from the start event.
    pub pid: Option<u32>,
    /// Standard output (or pty output), up to the cap.
    pub stdout: Vec<u8>,
    /// Standard error, up to the cap.
    pub stderr: Vec<u8>,
    /// Output bytes dropped because the cap was reached.
    pub truncated: u64,
    /// The end event.
    pub end: proto::EndEvent,
}

impl AgentClient {
    /// A client for the agent at `addr` that authenticates with `token`, sharing `http`'s
    /// connection pool (see [`http_client`]).
    pub fn new(http: reqwest::Client, addr: SocketAddr, token: impl Into<String>) -> Self {
        Self {
            http,
            addr,
            base: format!("http://{addr}"),
            token: token.into(),
            user: None,
        }
    }

    /// The same agent, acting as `user` (default: the agent's default user).
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The access token the agent requires (E2B's `envdAccessToken`).
    pub fn token(&self) -> &str {
        &self.token
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(TOKEN_HEADER, &self.token);
        if let Some(user) = &self.user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            rb = rb.header(AUTHORIZATION, format!("Basic {basic}"));
        }
        rb
    }

    fn transport(&self, e: reqwest::Error) -> Error {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        let message = if e.is_connect() {
            format!(
                "the sandbox agent at {} cannot be reached ({why}); the sandbox may be \
                 paused, stopping or removed",
                self.addr
            )
        } else {
            format!(
                "request to the sandbox agent at {} failed: {why}",
                self.addr
            )
        };
        Error::Agent {
            code: "unavailable".into(),
            message,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        rb.send().await.map_err(|e| self.transport(e))
    }

    /// `GET /health`: Ok when the agent answers (no secret needed).
    pub async fn health(&self) -> Result<()> {
        let resp = self
            .send(self.http.get(format!("{}/health", self.base)))
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(error_from_status(resp.status(), b"", None))
        }
    }

    /// `GET /metrics`: resource usage as the sandbox sees it.
    pub async fn metrics(&self) -> Result<proto::Metrics> {
        let started = std::time::Instant::now();
        let result = async {
            let resp = self.send(self.request(Method::GET, "/metrics")).await?;
            let status = resp.status();
            let body = read_capped(resp, 64 * 1024, self).await?;
            if !status.is_success() {
                return Err(error_from_status(status, &body, None));
            }
            serde_json::from_slice(&body).map_err(|e| Error::Agent {
                code: "internal".into(),
                message: format!("unreadable /metrics answer: {e}"),
            })
        }
        .await;
        record_call("metrics", started, &result);
        result
    }

    /// `POST /init`: environment, default user and workdir, and the secret to require.
    pub async fn init(&self, req: &InitRequest) -> Result<()> {
        let resp = self
            .send(self.request(Method::POST, "/init").json(req))
            .await?;
        let status = resp.status();
        let body = read_capped(resp, 64 << 10, self).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(error_from_status(status, &body, None))
        }
    }

    async fn unary<Q: Serialize, R: DeserializeOwned>(
        &self,
        method: &'static str,
        req: &Q,
    ) -> Result<R> {
        let started = std::time::Instant::now();
        let result = self.unary_inner(method, req).await;
        record_call(method, started, &result);
        result
    }

    async fn unary_inner<Q: Serialize, R: DeserializeOwned>(
        &self,
        method: &'static str,
        req: &Q,
    ) -> Result<R> {
        let resp = self
            .send(self.request(Method::POST, &format!("/{method}")).json(req))
            .await?;
        let status = resp.status();
        let body = read_capped(resp, MAX_UNARY_RESPONSE, self).await?;
        if !status.is_success() {
            return Err(error_from_status(status, &body, None));
        }
        let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
        serde_json::from_slice(body).map_err(|e| Error::Agent {
            code: "internal".into(),
            message: format!("unreadable answer to {method}: {e}"),
        })
    }

    async fn open_stream<Q: Serialize>(
        &self,
        method: &'static str,
        req: &Q,
        timeout: Option<Duration>,
    ) -> Result<EnvelopeReader> {
        // Measures until the stream is open (the call's answer), not its whole life.
        let started = std::time::Instant::now();
        let result = self.open_stream_inner(method, req, timeout).await;
        record_call(method, started, &result);
        result
    }

    async fn open_stream_inner<Q: Serialize>(
        &self,
        method: &'static str,
        req: &Q,
        timeout: Option<Duration>,
    ) -> Result<EnvelopeReader> {
        let payload = serde_json::to_vec(req).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let len = u32::try_from(payload.len())
            .map_err(|_| Error::InvalidArgument("request too large".into()))?;
        let mut body = Vec::with_capacity(5 + payload.len());
        body.push(0);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&payload);
        let mut rb = self
            .request(Method::POST, &format!("/{method}"))
            .header(CONTENT_TYPE, "application/connect+json")
            .header("Connect-Protocol-Version", "1")
            .header("Keepalive-Ping-Interval", KEEPALIVE_SECS.to_string())
            .body(body);
        if let Some(t) = timeout {
            rb = rb.header("Connect-Timeout-Ms", t.as_millis().max(1).to_string());
        }
        let resp = self.send(rb).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_capped(resp, 64 << 10, self).await?;
            return Err(error_from_status(status, &body, timeout));
        }
        Ok(EnvelopeReader {
            body: Box::pin(resp.bytes_stream()),
            buf: BytesMut::new(),
            done: false,
            timeout,
            addr: self.addr,
        })
    }

    /// `process.Process/Start`: runs a command; its events arrive on the returned stream.
    /// A `timeout` becomes `Connect-Timeout-Ms`: the agent kills the command's whole
    /// process group when it passes, and the stream ends with [`Error::Timeout`].
    pub async fn start(
        &self,
        req: &StartRequest,
        timeout: Option<Duration>,
    ) -> Result<ProcessStream> {
        let reader = self
            .open_stream("process.Process/Start", req, timeout)
            .await?;
        Ok(ProcessStream { reader })
    }

    /// `process.Process/Connect`: follows a running (or recently ended) process.
    pub async fn connect(
        &self,
        process: ProcessSelector,
        timeout: Option<Duration>,
    ) -> Result<ProcessStream> {
        let reader = self
            .open_stream(
                "process.Process/Connect",
                &SelectRequest { process },
                timeout,
            )
            .await?;
        Ok(ProcessStream { reader })
    }

    /// `process.Process/List`: running processes.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>> {
        let r: ListResponse = self
            .unary("process.Process/List", &serde_json::json!({}))
            .await?;
        Ok(r.processes)
    }

    /// `process.Process/SendInput`: bytes to a process's stdin or pty.
    pub async fn send_input(&self, process: ProcessSelector, input: ProcessInput) -> Result<()> {
        let _: IgnoredAny = self
            .unary(
                "process.Process/SendInput",
                &SendInputRequest { process, input },
            )
            .await?;
        Ok(())
    }

    /// `process.Process/CloseStdin`.
    pub async fn close_stdin(&self, process: ProcessSelector) -> Result<()> {
        let _: IgnoredAny = self
            .unary("process.Process/CloseStdin", &SelectRequest { process })
            .await?;
        Ok(())
    }

    /// `process.Process/SendSignal`: to the command's whole process group.
    pub async fn send_signal(&self, process: ProcessSelector, signal: Signal) -> Result<()> {
        let _: IgnoredAny = self
            .unary(
                "process.Process/SendSignal",
                &SendSignalRequest { process, signal },
            )
            .await?;
        Ok(())
    }

    /// `process.Process/Update`: pty resize.
    pub async fn update(&self, req: &UpdateRequest) -> Result<()> {
        let _: IgnoredAny = self.unary("process.Process/Update", req).await?;
        Ok(())
    }

    /// `filesystem.Filesystem/Stat`.
    pub async fn stat(&self, path: &str) -> Result<EntryInfo> {
        let r: EntryResponse = self
            .unary("filesystem.Filesystem/Stat", &path_req(path))
            .await?;
        Ok(r.entry)
    }

    /// `filesystem.Filesystem/ListDir` down to `depth` levels (0 and 1: own entries).
    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<EntryInfo>> {
        let r: ListDirResponse = self
            .unary(
                "filesystem.Filesystem/ListDir",
                &ListDirRequest {
                    path: path.into(),
                    depth,
                },
            )
            .await?;
        Ok(r.entries)
    }

    /// `filesystem.Filesystem/MakeDir`, parents included.
    pub async fn make_dir(&self, path: &str) -> Result<EntryInfo> {
        let r: EntryResponse = self
            .unary("filesystem.Filesystem/MakeDir", &path_req(path))
            .await?;
        Ok(r.entry)
    }

    /// `filesystem.Filesystem/Move`.
    pub async fn rename(&self, source: &str, destination: &str) -> Result<EntryInfo> {
        let r: EntryResponse = self
            .unary(
                "filesystem.Filesystem/Move",
                &MoveRequest {
                    source: source.into(),
                    destination: destination.into(),
                },
            )
            .await?;
        Ok(r.entry)
    }

    /// `filesystem.Filesystem/Remove` (recursive; a missing path is fine).
    pub async fn remove(&self, path: &str) -> Result<()> {
        let _: IgnoredAny = self
            .unary("filesystem.Filesystem/Remove", &path_req(path))
            .await?;
        Ok(())
    }

    fn files(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut query = vec![("path", path)];
        if let Some(u) = &self.user {
            query.push(("username", u.as_str()));
        }
        self.request(method, "/files").query(&query)
    }

    /// `GET /files`: streams a file's contents.
    pub async fn read_file(&self, path: &str) -> Result<FileStream> {
        let resp = self.send(self.files(Method::GET, path)).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_capped(resp, 64 << 10, self).await?;
            return Err(error_from_status(status, &body, None));
        }
        Ok(FileStream {
            len: resp.content_length(),
            body: Box::pin(resp.bytes_stream()),
            addr: self.addr,
        })
    }

    /// `POST /files` with a raw body: writes (creates or replaces) a file, creating its
    /// parents. `body` may be bytes or a stream (`reqwest::Body::wrap_stream`), so large
    /// files need not be held in memory.
    pub async fn write_file(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Vec<WriteInfo>> {
        let rb = self
            .files(Method::POST, path)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let resp = self.send(rb).await?;
        let status = resp.status();
        let body = read_capped(resp, 1 << 20, self).await?;
        if !status.is_success() {
            return Err(error_from_status(status, &body, None));
        }
        serde_json::from_slice(&body).map_err(|e| Error::Agent {
            code: "internal".into(),
            message: format!("unreadable answer to a file write: {e}"),
        })
    }
}

fn path_req(path: &str) -> PathRequest {
    PathRequest { path: path.into() }
}

/// Records an agent call's latency and outcome (labels are static method names).
fn record_call<T>(method: &'static str, started: std::time::Instant, result: &Result<T>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    metrics::histogram!("colima_e2b_agent_call_duration_seconds", "call" => method, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Reads a whole response body, refusing more than `max` bytes.
async fn read_capped(mut resp: reqwest::Response, max: usize, c: &AgentClient) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| c.transport(e))? {
        if out.len() + chunk.len() > max {
            return Err(Error::Agent {
                code: "resource_exhausted".into(),
                message: format!("the agent's answer is larger than {max} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Maps a Connect error code (and message) from the agent to the core error.
pub fn error_from_code(code: &str, message: String, timeout: Option<Duration>) -> Error {
    match code {
        "not_found" => Error::NotFound { what: message },
        "deadline_exceeded" => Error::Timeout(timeout.unwrap_or_default()),
        "invalid_argument" | "failed_precondition" | "out_of_range" => {
            Error::InvalidArgument(message)
        }
        "already_exists" | "aborted" => Error::Conflict(message),
        "resource_exhausted" => Error::ResourceExhausted {
            message,
            retry_after: None,
        },
        "insufficient_storage" => Error::InsufficientStorage(message),
        // The server's token was right; the acting user the client named does not exist.
        "unauthenticated" if message.starts_with(proto::INVALID_USER) => {
            Error::InvalidArgument(message)
        }
        other => Error::Agent {
            code: other.to_string(),
            message,
        },
    }
}

/// An error answer: Connect's `{"code":"not_found",...}` or the REST endpoints'
/// `{"code":404,...}`; the HTTP status decides when the body says nothing.
fn error_from_status(status: StatusCode, body: &[u8], timeout: Option<Duration>) -> Error {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = v
        .get("message")
        .and_then(|m| m.as_str())
        .map(String::from)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
            format!("HTTP {status}: {text}")
        });
    let code = match v.get("code").and_then(|c| c.as_str()) {
        Some(c) => c.to_string(),
        None => match status.as_u16() {
            400 => "invalid_argument",
            401 => "unauthenticated",
            403 => "permission_denied",
            404 => "not_found",
            409 => "already_exists",
            507 => "insufficient_storage",
            413 | 429 => "resource_exhausted",
            503 => "unavailable",
            504 => "deadline_exceeded",
            501 => "unimplemented",
            _ => "internal",
        }
        .to_string(),
    };
    error_from_code(&code, message, timeout)
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Decodes Connect envelopes from a streaming response.
struct EnvelopeReader {
    body: ByteStream,
    buf: BytesMut,
    done: bool,
    timeout: Option<Duration>,
    addr: SocketAddr,
}

impl EnvelopeReader {
    fn dead(&mut self, why: String) -> Option<Result<Bytes>> {
        self.done = true;
        Some(Err(Error::Agent {
            code: "unavailable".into(),
            message: format!(
                "the stream from the sandbox agent at {} broke: {why}",
                self.addr
            ),
        }))
    }

    /// The next message; `None` after a clean end of stream.
    async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            if self.buf.len() >= 5 {
                let flags = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_STREAM_MESSAGE {
                    return self.dead(format!("a message of {len} bytes is over the cap"));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len).freeze();
                    if flags & 0x02 == 0 {
                        return Some(Ok(msg));
                    }
                    self.done = true;
                    let v: serde_json::Value = serde_json::from_slice(&msg).unwrap_or_default();
                    let err = v.get("error")?;
                    let code = err
                        .get("code")
                        .and_then(|c| c.as_str())
                        .unwrap_or("unknown");
                    let message = err
                        .get("message")
                        .and_then(|m| m.as_str())
                        .unwrap_or_default()
                        .to_string();
                    return Some(Err(error_from_code(code, message, self.timeout)));
                }
            }
            match tokio::time::timeout(STREAM_IDLE, self.body.next()).await {
                Err(_) => {
                    return self.dead(format!(
                        "nothing (not even a keepalive) for {STREAM_IDLE:?}; the sandbox may \
                         be paused or gone"
                    ))
                }
                Ok(None) => {
                    return self.dead(
                        "it ended without an end-of-stream message (was the sandbox killed?)"
                            .into(),
                    )
                }
                Ok(Some(Err(e))) => return self.dead(e.to_string()),
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
            }
        }
    }
}

/// The events of one process (Start or Connect), read as they arrive.
///
/// Memory is bounded: one message at a time is buffered, and the agent cannot send faster
/// than it is read (HTTP flow control).
pub struct ProcessStream {
    reader: EnvelopeReader,
}

impl fmt::Debug for ProcessStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessStream")
            .field("addr", &self.reader.addr)
            .finish_non_exhaustive()
    }
}

impl ProcessStream {
    /// The next event (keepalives included); `None` after the end of the stream. An
    /// error (deadline, killed sandbox, broken stream) is the last item.
    pub async fn next(&mut self) -> Option<Result<ProcessEvent>> {
        let msg = match self.reader.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        Some(
            serde_json::from_slice::<ProcessEventMessage>(&msg)
                .map(|m| m.event)
                .map_err(|e| Error::Agent {
                    code: "internal".into(),
                    message: format!("unreadable process event: {e}"),
                }),
        )
    }

    /// The events as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<ProcessEvent>> + Send {
        futures_util::stream::unfold(self, |mut s| async move { s.next().await.map(|e| (e, s)) })
    }

    /// Reads to the end, keeping at most `max_output` bytes of stdout and stderr each
    /// (the rest is counted in `truncated`). Fails when the stream ends with an error or
    /// without an end event.
    pub async fn collect_output(mut self, max_output: usize) -> Result<ProcessOutput> {
        let mut out = ProcessOutput::default();
        let keep = |buf: &mut Vec<u8>, data: Vec<u8>, dropped: &mut u64| {
            let room = max_output.saturating_sub(buf.len());
            let n = data.len().min(room);
            buf.extend_from_slice(&data[..n]);
            *dropped += (data.len() - n) as u64;
        };
        let mut ended = false;
        while let Some(event) = self.next().await {
            match event? {
                ProcessEvent::Start { pid } => out.pid = Some(pid),
                ProcessEvent::Data(proto::DataEvent::Stdout(d) | proto::DataEvent::Pty(d)) => {
                    keep(&mut out.stdout, d, &mut out.truncated)
                }
                ProcessEvent::Data(proto::DataEvent::Stderr(d)) => {
                    keep(&mut out.stderr, d, &mut out.truncated)
                }
                ProcessEvent::End(end) => {
                    out.end = end;
                    ended = true;
                }
                ProcessEvent::Keepalive {} => {}
            }
        }
        if ended {
            Ok(out)
        } else {
            Err(Error::Agent {
                code: "unavailable".into(),
                message: "the process stream ended without an end event".into(),
            })
        }
    }
}

/// A file's contents as they arrive from the agent.
pub struct FileStream {
    len: Option<u64>,
    body: ByteStream,
    addr: SocketAddr,
}

impl fmt::Debug for FileStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStream")
            .field("len", &self.len)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FileStream {
    /// The size, when the agent announced it.
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// Whether the agent announced an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == Some(0)
    }

    /// The next chunk; `None` at the end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        match tokio::time::timeout(STREAM_IDLE, self.body.next()).await {
            Err(_) => Some(Err(Error::Agent {
                code: "unavailable".into(),
                message: format!(
                    "the file download from the sandbox agent at {} stalled",
                    self.addr
                ),
            })),
            Ok(None) => None,
            Ok(Some(Ok(b))) => Some(Ok(b)),
            Ok(Some(Err(e))) => Some(Err(Error::Agent {
                code: "unavailable".into(),
                message: format!("the file download broke: {e}"),
            })),
        }
    }

    /// The chunks as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes>> + Send {
        futures_util::stream::unfold(
            self,
            |mut s| async move { s.next_chunk().await.map(|c| (c, s)) },
        )
    }

    /// Reads the whole file, refusing one larger than `max` bytes.
    pub async fn read_to_end(mut self, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len.unwrap_or(0).min(max as u64) as usize);
        while let Some(chunk) = self.next_chunk().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > max {
                return Err(Error::ResourceExhausted {
                    message: format!("the file is larger than {max} bytes"),
                    retry_after: None,
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_codes_map_to_core_errors() {
        assert!(matches!(
            error_from_code("not_found", "process 7".into(), None),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            error_from_code("deadline_exceeded", String::new(), Some(Duration::from_secs(2))),
            Error::Timeout(d) if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            error_from_code("unauthenticated", "no".into(), None),
            Error::Agent { code, .. } if code == "unauthenticated"
        ));
        // An unknown acting user is the client's mistake, not a failing agent.
        assert!(matches!(
            error_from_code("unauthenticated", format!("{}: \"nobody2\"", proto::INVALID_USER), None),
            Error::InvalidArgument(m) if m.contains("nobody2")
        ));
    }

    #[test]
    fn rest_errors_map_by_status_when_the_code_is_a_number() {
        let e = error_from_status(
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"/x: No such file"}"#,
            None,
        );
        assert!(matches!(e, Error::NotFound { what } if what.contains("/x")));
        let e = error_from_status(StatusCode::UNAUTHORIZED, b"garbage", None);
        assert!(matches!(e, Error::Agent { code, .. } if code == "unauthenticated"));
    }
}
