//! [`AgentClient`]: typed calls to the in-sandbox agent (envd's protocol: Connect RPC with
//! the JSON codec over HTTP/1.1, plus REST `/files`, `/health`, `/init`, `/metrics`).
//!
//! The wire is `envd_proto`'s, shared with the agent. Every answer is read with a cap,
//! and every error goes through [`super::errors::from_envd`].

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use envd_proto::codec;
use envd_proto::error::REASON_HEADER;
use envd_proto::messages::{
    EntryInfo, EntryResponse, InitRequest, KillAllResponse, ListDirRequest, ListDirResponse,
    ListResponse, Metrics, MoveRequest, PathRequest, ProcessInfo, ProcessInput, ProcessSelector,
    SelectRequest, SendInputRequest, SendSignalRequest, Signal, StartRequest, UpdateRequest,
    WriteInfo,
};
use envd_proto::{EnvdError, KEEPALIVE_HEADER, STREAM_CONTENT_TYPE, TIMEOUT_HEADER, TOKEN_HEADER};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

use super::errors::{from_envd, unavailable, unreadable};
use super::stream::{EnvelopeReader, FileStream, ProcessStream};
use crate::error::{Error, Result};

/// Largest unary answer read into memory.
pub const MAX_UNARY_RESPONSE: usize = 16 << 20;
/// Keepalive interval asked of the agent on streams, in seconds.
const KEEPALIVE_SECS: u64 = 5;

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
            rb = rb.header(AUTHORIZATION, envd_proto::basic_user(user));
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
        unavailable(message)
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        rb.send().await.map_err(|e| self.transport(e))
    }

    /// The body of a successful answer (at most `max` bytes), or its error.
    async fn answer(
        &self,
        resp: reqwest::Response,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        let status = resp.status();
        let reason = resp
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_capped(resp, max.max(64 << 10), self).await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(error_answer(status, reason.as_deref(), &body, timeout))
        }
    }

    /// `GET /health`: Ok when the agent answers (no secret needed).
    pub async fn health(&self) -> Result<()> {
        let resp = self
            .send(self.http.get(format!("{}/health", self.base)))
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(error_answer(resp.status(), None, b"", None))
        }
    }

    /// `GET /metrics`: resource usage as the sandbox sees it.
    pub async fn metrics(&self) -> Result<Metrics> {
        let started = std::time::Instant::now();
        let result = async {
            let resp = self.send(self.request(Method::GET, "/metrics")).await?;
            let body = self.answer(resp, 64 << 10, None).await?;
            serde_json::from_slice(&body).map_err(|e| unreadable("/metrics answer", e))
        }
        .await;
        record_call("metrics", started, &result);
        result
    }

    /// `GET /colima/events?after=`: the agent's events after sequence number `after`.
    pub async fn events(&self, after: u64) -> Result<envd_proto::events::EventBatch> {
        let started = std::time::Instant::now();
        let result = async {
            let path = format!("{}?after={after}", envd_proto::events::EVENTS_PATH);
            let resp = self.send(self.request(Method::GET, &path)).await?;
            let body = self.answer(resp, 4 << 20, None).await?;
            serde_json::from_slice(&body).map_err(|e| unreadable("events answer", e))
        }
        .await;
        record_call("events", started, &result);
        result
    }

    /// `POST /processes/kill-all`: ends every process of the sandbox but the agent;
    /// returns how many were killed.
    pub async fn kill_all(&self) -> Result<u64> {
        let started = std::time::Instant::now();
        let result = async {
            let resp = self
                .send(self.request(Method::POST, envd_proto::KILL_ALL_PATH))
                .await?;
            let body = self.answer(resp, 64 << 10, None).await?;
            serde_json::from_slice::<KillAllResponse>(&body)
                .map(|r| r.killed)
                .map_err(|e| unreadable("kill-all answer", e))
        }
        .await;
        record_call("kill_all", started, &result);
        result
    }

    /// `POST /init`: environment, default user and workdir, and the secret to require.
    pub async fn init(&self, req: &InitRequest) -> Result<()> {
        let resp = self
            .send(self.request(Method::POST, "/init").json(req))
            .await?;
        self.answer(resp, 64 << 10, None).await.map(drop)
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
        let body = self.answer(resp, MAX_UNARY_RESPONSE, None).await?;
        let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
        serde_json::from_slice(body).map_err(|e| unreadable(&format!("answer to {method}"), e))
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
        let mut rb = self
            .request(Method::POST, &format!("/{method}"))
            .header(CONTENT_TYPE, STREAM_CONTENT_TYPE)
            .header("Connect-Protocol-Version", "1")
            .header(KEEPALIVE_HEADER, KEEPALIVE_SECS.to_string())
            .body(codec::message_envelope(req));
        if let Some(t) = timeout {
            rb = rb.header(TIMEOUT_HEADER, t.as_millis().max(1).to_string());
        }
        let resp = self.send(rb).await?;
        if !resp.status().is_success() {
            return Err(self
                .answer(resp, 64 << 10, timeout)
                .await
                .err()
                .unwrap_or_else(|| unavailable("the agent refused the stream without an error")));
        }
        Ok(EnvelopeReader::new(resp, timeout, self.addr))
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
        if !resp.status().is_success() {
            return Err(self
                .answer(resp, 64 << 10, None)
                .await
                .err()
                .unwrap_or_else(|| {
                    unavailable("the agent refused the download without an error")
                }));
        }
        Ok(FileStream::new(resp, self.addr))
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
        let body = self.answer(resp, 1 << 20, None).await?;
        serde_json::from_slice(&body).map_err(|e| unreadable("answer to a file write", e))
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
            return Err(Error::TooLarge(format!(
                "the agent's answer is larger than {max} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An error answer (any of the agent's kinds) as the core error.
fn error_answer(
    status: StatusCode,
    reason: Option<&str>,
    body: &[u8],
    timeout: Option<Duration>,
) -> Error {
    from_envd(
        EnvdError::from_response(status.as_u16(), reason, body),
        timeout,
    )
}
