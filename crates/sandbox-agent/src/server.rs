//! HTTP/1.1 server: authentication, routing of Connect RPCs and REST endpoints,
//! the streaming pumps, and the agent's lifecycle (reaper, SIGTERM).
//!
//! Slow clients: each stream's pump hands frames to its response through a queue of two
//! and waits at most the stall timeout for room; a client that takes nothing for that
//! long is dropped, its stream ended with `deadline_exceeded` ("the reader stalled")
//! ahead of anything still queued, which it gets if it ever reads again. Any connection
//! whose socket takes nothing for twice the stall timeout while the agent has bytes for
//! it (that stream's, a download's) is closed, so a vanished client holds no memory or
//! worker.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rustix::process::Signal;

use crate::auth::{self, FileOp, Secret, SignatureError};
use crate::config::{Config, SECRET_ENV, SECRET_FILE_ENV};
use crate::connect::{self, AgentBody, RestResponse, SendError, StreamSender, MAX_MESSAGE};
use crate::files;
use crate::output::{Next, Reader};
use crate::process::{self, Proc, ProcessTable, SpawnSpec};
use crate::spill::Spill;
use crate::users::{User, UserDb};
use crate::watch::{Watcher, WatcherRegistry};
use envd_proto::codec;
use envd_proto::messages::*;
use envd_proto::{Code, EnvdError};

/// Largest accepted keepalive interval and Connect timeout we honour.
const MAX_KEEPALIVE: Duration = Duration::from_secs(3600);

/// State set through /init.
#[derive(Debug, Default, Clone)]
pub struct InitState {
    /// Environment for every command.
    pub envs: BTreeMap<String, String>,
    /// User when a request names none.
    pub default_user: Option<String>,
    /// Working directory when a command names none.
    pub default_workdir: Option<String>,
}

/// The agent: configuration and all shared state.
#[derive(Debug)]
pub struct Agent {
    /// Configuration.
    pub cfg: Config,
    /// The per-sandbox secret.
    pub secret: Secret,
    /// Users.
    pub users: UserDb,
    /// /init state.
    pub init: Mutex<InitState>,
    /// Environment commands inherit (ours, without the secret).
    pub base_env: Vec<(OsString, OsString)>,
    /// Commands.
    pub procs: Arc<ProcessTable>,
    /// Polling watchers.
    pub watchers: WatcherRegistry,
    /// Open streaming responses (for leak checks through /metrics).
    pub streams: AtomicUsize,
    cpu_prev: Mutex<Option<(u64, u64)>>,
}

impl Agent {
    /// Builds the agent from its configuration.
    pub fn new(cfg: Config) -> Arc<Self> {
        let base_env = std::env::vars_os()
            .filter(|(k, _)| {
                k != SECRET_ENV && k != SECRET_FILE_ENV && k != envd_proto::STALL_TIMEOUT_ENV
            })
            .collect();
        Arc::new(Self {
            secret: Secret::new(cfg.secret.clone()),
            users: UserDb::new(cfg.etc_dir.clone(), cfg.home_override.clone()),
            init: Mutex::new(InitState::default()),
            base_env,
            procs: Arc::new(ProcessTable::new(
                cfg.output_buffer_bytes,
                Spill::new(
                    cfg.spill_dir.clone(),
                    cfg.spill_bytes,
                    cfg.spill_total_bytes,
                ),
            )),
            watchers: WatcherRegistry::default(),
            streams: AtomicUsize::new(0),
            cpu_prev: Mutex::new(None),
            cfg,
        })
    }

    fn init_state(&self) -> InitState {
        self.init
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The acting user of a request: Basic auth, else `username` (REST), else the default.
    fn acting_user(&self, req_user: Option<String>) -> Result<User, EnvdError> {
        let name = req_user
            .or_else(|| self.init_state().default_user)
            .unwrap_or_else(|| self.cfg.default_user.clone());
        self.users.lookup(&name).ok_or_else(|| {
            EnvdError::new(Code::Unauthenticated, format!("invalid user: {name:?}"))
                .with_reason(envd_proto::Reason::InvalidUser)
        })
    }
}

/// Reads (and discards) a small rejected request body, so the client is not reset
/// while still sending and loses our error response; large bodies are cut off.
async fn drain(mut body: Incoming) {
    let mut left: usize = 64 << 10;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(f)) = body.frame().await {
            let n = f.data_ref().map(|d| d.len()).unwrap_or(0);
            if n >= left {
                break;
            }
            left -= n;
        }
    })
    .await;
}

struct StreamGuard(Arc<Agent>);

impl StreamGuard {
    fn new(a: &Arc<Agent>) -> Self {
        a.streams.fetch_add(1, Ordering::SeqCst);
        Self(a.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn header_u64(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
}

fn is_stream(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/connect+"))
}

/// Serves one request.
pub async fn handle(
    agent: Arc<Agent>,
    req: Request<Incoming>,
) -> Result<Response<AgentBody>, Infallible> {
    let path = req.uri().path().to_string();
    let rpc = path.starts_with("/process.Process/") || path.starts_with("/filesystem.Filesystem/");
    if path == "/health" {
        let mut r = Response::new(AgentBody::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        return Ok(r);
    }
    // Without the token, only a signed URL for this very /files operation gets through.
    let mut signed = false;
    if !agent.secret.allows(req.headers()) {
        let verdict = match (req.method(), path.as_str()) {
            (&Method::GET, "/files") => check_signed(&agent, &req, FileOp::Read),
            (&Method::POST, "/files") => check_signed(&agent, &req, FileOp::Write),
            _ => Err(SignatureError::Missing),
        };
        if let Err(e) = verdict {
            let err = EnvdError::new(Code::Unauthenticated, e.message());
            let stream = is_stream(&req);
            drain(req.into_body()).await;
            return Ok(if rpc && stream {
                connect::stream_err(&err)
            } else if rpc {
                connect::unary_err(&err)
            } else {
                err.rest_response()
            });
        }
        signed = true;
    }
    if rpc {
        return Ok(rpc_dispatch(agent, req, &path).await);
    }
    let method = req.method().clone();
    Ok(match (method, path.as_str()) {
        (Method::GET, "/files") | (Method::POST, "/files") => rest_files(agent, req, signed).await,
        (Method::GET, "/envs") => {
            let envs = agent.init_state().envs;
            connect::json_response(
                StatusCode::OK,
                serde_json::to_vec(&envs).unwrap_or_default(),
            )
        }
        (Method::POST, "/init") => init(agent, req).await,
        (Method::GET, "/metrics") => metrics(&agent),
        (Method::POST, envd_proto::KILL_ALL_PATH) => {
            drain(req.into_body()).await;
            let report = agent.procs.kill_all().await;
            let body = KillAllResponse {
                killed: report.killed as u64,
            };
            connect::json_response(
                StatusCode::OK,
                serde_json::to_vec(&body).unwrap_or_default(),
            )
        }
        _ => EnvdError::from_rest_status(404, format!("no route for {path}")).rest_response(),
    })
}

async fn init(agent: Arc<Agent>, req: Request<Incoming>) -> Response<AgentBody> {
    let body = match connect::read_body(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return EnvdError::from_rest_status(413, e.message).rest_response(),
    };
    let init: InitRequest = match connect::parse_json(&body) {
        Ok(i) => i,
        Err(e) => return EnvdError::from_rest_status(400, e.message).rest_response(),
    };
    // The caller already passed the secret check: either none was set, or it carries it.
    if let Some(t) = &init.access_token {
        agent.secret.set(t);
    }
    let mut st = agent.init.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(envs) = init.env_vars {
        if envs
            .keys()
            .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
            || envs.values().any(|v| v.contains('\0'))
        {
            return EnvdError::from_rest_status(400, "invalid environment variable")
                .rest_response();
        }
        st.envs.extend(envs);
    }
    if let Some(u) = init.default_user.filter(|u| !u.is_empty()) {
        st.default_user = Some(u);
    }
    if let Some(w) = init.default_workdir.filter(|w| !w.is_empty()) {
        st.default_workdir = Some(w);
    }
    let mut r = Response::new(AgentBody::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn metrics(agent: &Agent) -> Response<AgentBody> {
    // The sandbox's cgroup, not the host that /proc/stat and /proc/meminfo describe.
    let cg = crate::sys::cgroup_usage(std::path::Path::new("/sys/fs/cgroup"));
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let cpus = cg.cpus.map_or(host_cpus, |c| c.min(host_cpus));
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pct = match cg.cpu_ns {
        Some(used) => {
            let mut prev = agent.cpu_prev.lock().unwrap_or_else(|p| p.into_inner());
            let pct = match *prev {
                Some((pu, pt)) if now_ns > pt && cpus > 0.0 => {
                    used.saturating_sub(pu) as f64 * 100.0 / ((now_ns - pt) as f64 * cpus)
                }
                _ => 0.0,
            };
            *prev = Some((used, now_ns));
            pct.min(100.0)
        }
        None => 0.0,
    };
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| -> u64 {
        mem.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let host_total = kb("MemTotal:");
    let mem_total = match cg.mem_limit {
        Some(limit) if host_total > 0 => limit.min(host_total),
        Some(limit) => limit,
        None => host_total,
    };
    let mem_used = cg
        .mem_used
        .unwrap_or_else(|| host_total.saturating_sub(kb("MemAvailable:")));
    let mem_cache = cg.mem_cache.unwrap_or(0);
    let (disk_total, disk_used) =
        crate::sys::disk_usage(std::path::Path::new("/")).unwrap_or((0, 0));
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = Metrics {
        ts,
        cpu_count: cpus.ceil().max(1.0) as u64,
        cpu_used_pct: (pct * 100.0).round() / 100.0,
        mem_total,
        mem_used,
        mem_cache,
        mem_total_mib: mem_total >> 20,
        mem_used_mib: mem_used >> 20,
        disk_total,
        disk_used,
        agent_rss: self_rss(),
        agent_streams: agent.streams.load(Ordering::SeqCst) as u64,
        agent_processes: agent.procs.running() as u64,
    };
    connect::json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn self_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Checks the signed-URL parameters of a `/files` request that lacks the access token.
fn check_signed(agent: &Agent, req: &Request<Incoming>, op: FileOp) -> Result<(), SignatureError> {
    let query = files::parse_query(req.uri().query());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    agent.secret.verify_file_url(&query, op, now)
}

/// `GET`/`POST /files`. `signed`: authorised by a signed URL rather than the token, so
/// the user is the signed `username` (never `Authorization`) and one file is written.
async fn rest_files(
    agent: Arc<Agent>,
    req: Request<Incoming>,
    signed: bool,
) -> Response<AgentBody> {
    let query = files::parse_query(req.uri().query());
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let basic = match auth::basic_user(req.headers()) {
        _ if signed => None,
        Ok(u) => u,
        Err(e) => return EnvdError::from_rest_status(401, e).rest_response(),
    };
    let user = match agent.acting_user(get("username").filter(|u| !u.is_empty()).or(basic)) {
        Ok(u) => u,
        Err(e) => return EnvdError::from_rest_status(401, e.message).rest_response(),
    };
    if req.method() == Method::GET {
        let Some(raw) = get("path") else {
            return EnvdError::from_rest_status(400, "missing ?path=").rest_response();
        };
        let path = match files::resolve(&user, &raw) {
            Ok(p) => p,
            Err(e) => return EnvdError::from_rest_status(400, e.message).rest_response(),
        };
        files::download(&user, path, req.headers()).await
    } else {
        let (parts, body) = req.into_parts();
        files::upload(
            &user,
            get("path"),
            &parts.headers,
            body,
            agent.cfg.max_upload_bytes,
            signed,
        )
        .await
    }
}

async fn rpc_dispatch(
    agent: Arc<Agent>,
    req: Request<Incoming>,
    path: &str,
) -> Response<AgentBody> {
    let stream = is_stream(&req);
    let method = path.rsplit('/').next().unwrap_or_default().to_string();
    let service = if path.starts_with("/process.") {
        "process"
    } else {
        "filesystem"
    };
    let user = match auth::basic_user(req.headers()) {
        Err(e) => Err(EnvdError::new(Code::Unauthenticated, e)),
        Ok(u) => agent.acting_user(u),
    };
    let user = match user {
        Ok(u) => u,
        Err(e) => {
            drain(req.into_body()).await;
            return if stream {
                connect::stream_err(&e)
            } else {
                connect::unary_err(&e)
            };
        }
    };
    let timeout = header_u64(&req, "connect-timeout-ms")
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let keepalive = header_u64(&req, "keepalive-ping-interval")
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s).min(MAX_KEEPALIVE));
    if req.method() != Method::POST {
        return connect::unary_err(&EnvdError::new(Code::Unimplemented, "use POST"));
    }

    let res: Result<Response<AgentBody>, EnvdError> = match (service, method.as_str(), stream) {
        ("process", "Start", true) => {
            start(&agent, user, req.into_body(), timeout, keepalive).await
        }
        ("process", "Connect", true) => {
            connect_proc(&agent, req.into_body(), timeout, keepalive).await
        }
        ("process", "StreamInput", true) => stream_input(&agent, req.into_body()).await,
        ("filesystem", "WatchDir", true) => {
            watch_dir(&agent, user, req.into_body(), timeout, keepalive).await
        }
        (_, _, true) => Err(EnvdError::new(
            Code::Unimplemented,
            format!("{path} is not a streaming method"),
        )),
        (svc, m, false) => match connect::read_body(req.into_body(), MAX_MESSAGE).await {
            Err(e) => Err(e),
            Ok(body) => unary(&agent, &user, svc, m, &body).await,
        },
    };
    match res {
        Ok(r) => r,
        Err(e) if stream => connect::stream_err(&e),
        Err(e) => connect::unary_err(&e),
    }
}

async fn unary(
    agent: &Arc<Agent>,
    user: &User,
    svc: &str,
    m: &str,
    body: &[u8],
) -> Result<Response<AgentBody>, EnvdError> {
    let empty = serde_json::json!({});
    match (svc, m) {
        ("process", "List") => Ok(connect::unary_ok(&ListResponse {
            processes: agent.procs.list(),
        })),
        ("process", "SendInput") => {
            let r: SendInputRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            match &r.input {
                ProcessInput::Stdin(b) => p.write_input(false, b).await?,
                ProcessInput::Pty(b) => p.write_input(true, b).await?,
            }
            Ok(connect::unary_ok(&empty))
        }
        ("process", "CloseStdin") => {
            let r: SelectRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            p.close_stdin().await?;
            Ok(connect::unary_ok(&empty))
        }
        ("process", "SendSignal") => {
            let r: SendSignalRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            let sig = match r.signal {
                envd_proto::messages::Signal::Kill => Signal::KILL,
                envd_proto::messages::Signal::Term => Signal::TERM,
                envd_proto::messages::Signal::Unspecified => {
                    return Err(EnvdError::new(Code::InvalidArgument, "unsupported signal"))
                }
            };
            // As envd: a command that has ended is gone for signals (the SDK's kill()
            // then returns false), though Connect still replays its end; but while
            // processes it left behind still run, the signal ends those.
            if p.ended() && !p.tree_alive() {
                return Err(EnvdError::new(
                    Code::NotFound,
                    format!("process with pid {} has already ended", p.pid),
                ));
            }
            agent.procs.signal(&p, sig).await;
            Ok(connect::unary_ok(&empty))
        }
        ("process", "Update") => {
            let r: UpdateRequest = connect::parse_json(body)?;
            let p = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
            if let Some(size) = r.pty.and_then(|p| p.size) {
                p.resize(size.cols, size.rows)?;
            }
            Ok(connect::unary_ok(&empty))
        }
        ("filesystem", "Stat") | ("filesystem", "MakeDir") | ("filesystem", "Remove") => {
            let r: PathRequest = connect::parse_json(body)?;
            let path = files::resolve(user, &r.path)?;
            let names = files::names(&agent.users).await;
            match m {
                "Stat" => {
                    let entry = files::run_as(user, move || files::stat(&path, &names)).await?;
                    Ok(connect::unary_ok(&EntryResponse { entry }))
                }
                "MakeDir" => {
                    let entry = files::run_as(user, move || files::make_dir(&path, &names)).await?;
                    Ok(connect::unary_ok(&EntryResponse { entry }))
                }
                _ => {
                    files::run_as(user, move || files::remove(&path)).await?;
                    Ok(connect::unary_ok(&empty))
                }
            }
        }
        ("filesystem", "ListDir") => {
            let r: ListDirRequest = connect::parse_json(body)?;
            let path = files::resolve(user, if r.path.is_empty() { "~" } else { &r.path })?;
            let names = files::names(&agent.users).await;
            let answer =
                files::run_as(user, move || files::list_dir(&path, r.depth, &names)).await?;
            Ok(connect::unary_json(answer))
        }
        ("filesystem", "Move") => {
            let r: MoveRequest = connect::parse_json(body)?;
            let src = files::resolve(user, &r.source)?;
            let dst = files::resolve(user, &r.destination)?;
            let names = files::names(&agent.users).await;
            let entry = files::run_as(user, move || files::rename(&src, &dst, &names)).await?;
            Ok(connect::unary_ok(&EntryResponse { entry }))
        }
        ("filesystem", "CreateWatcher") => {
            let r: WatchDirRequest = connect::parse_json(body)?;
            let w = new_watcher(agent, user, &r).await?;
            let id = agent.watchers.create(w)?;
            Ok(connect::unary_ok(&WatcherIdMessage { watcher_id: id }))
        }
        ("filesystem", "GetWatcherEvents") | ("filesystem", "RemoveWatcher") => {
            let r: WatcherIdMessage = connect::parse_json(body)?;
            if m == "RemoveWatcher" {
                agent.watchers.remove(&r.watcher_id)?;
                Ok(connect::unary_ok(&empty))
            } else {
                let events = agent.watchers.take(&r.watcher_id)?;
                Ok(connect::unary_ok(&WatcherEventsResponse { events }))
            }
        }
        _ => Err(EnvdError::new(
            Code::Unimplemented,
            format!("{svc}.{m} is not implemented"),
        )),
    }
}

async fn new_watcher(
    agent: &Arc<Agent>,
    user: &User,
    r: &WatchDirRequest,
) -> Result<Watcher, EnvdError> {
    let path = files::resolve(user, &r.path)?;
    let names = files::names(&agent.users).await;
    let (recursive, include) = (r.recursive, r.include_entry);
    files::run_as(user, move || Watcher::new(path, recursive, include, names)).await
}

async fn start(
    agent: &Arc<Agent>,
    user: User,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, EnvdError> {
    let r: StartRequest = connect::read_stream_request(body).await?;
    if r.process.cmd.is_empty() || r.process.cmd.contains('\0') {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            "cmd is empty or contains NUL",
        ));
    }
    if r.process.args.iter().any(|a| a.contains('\0')) {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            "argument contains NUL",
        ));
    }
    let init = agent.init_state();
    let cwd = process::resolve_cwd(
        &user,
        r.process.cwd.as_deref(),
        init.default_workdir.as_deref(),
    )?;
    let mut base_env = agent.base_env.clone();
    base_env.extend(init.envs.iter().map(|(k, v)| (k.into(), v.into())));
    let pty = r.pty.as_ref().map(|p| {
        let s = p.size.unwrap_or(PtySize { cols: 80, rows: 24 });
        (
            u16::try_from(s.cols).unwrap_or(u16::MAX),
            u16::try_from(s.rows).unwrap_or(u16::MAX),
        )
    });
    let deadline = timeout.map(|t| Instant::now() + t);
    let spec = SpawnSpec {
        config: r.process,
        user,
        cwd,
        base_env,
        pty,
        stdin: r.stdin.unwrap_or(true),
        tag: r.tag,
        deadline,
    };
    let (proc, reader) = agent.procs.start(spec).await?;
    Ok(spawn_pump(agent, proc, reader, keepalive, deadline, true))
}

async fn connect_proc(
    agent: &Arc<Agent>,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, EnvdError> {
    let r: SelectRequest = connect::read_stream_request(body).await?;
    let proc = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
    let reader = proc.reader(true);
    let dropped = proc.output.dropped();
    let mut resp = spawn_pump(
        agent,
        proc,
        reader,
        keepalive,
        timeout.map(|t| Instant::now() + t),
        false,
    );
    if let Ok(v) = dropped.to_string().parse() {
        // Output evicted from the bounded buffer before this client connected.
        resp.headers_mut().insert(envd_proto::DROPPED_HEADER, v);
    }
    Ok(resp)
}

fn spawn_pump(
    agent: &Arc<Agent>,
    proc: Arc<Proc>,
    reader: Reader,
    keepalive: Option<Duration>,
    deadline: Option<Instant>,
    is_start: bool,
) -> Response<AgentBody> {
    let (tx, resp) = connect::stream_channel(agent.cfg.stall_timeout);
    let guard = StreamGuard::new(agent);
    let a = agent.clone();
    tokio::spawn(async move {
        let _guard = guard;
        pump(&a, proc, reader, tx, keepalive, deadline, is_start).await;
    });
    resp
}

fn event_envelope(e: ProcessEvent) -> Bytes {
    codec::message_envelope(&ProcessEventMessage { event: e })
}

/// The end of a stream whose client stopped reading.
fn stalled(tx: StreamSender) {
    let err = EnvdError::new(
        Code::DeadlineExceeded,
        format!(
            "the reader stalled: it took nothing for {} ms, so the agent dropped it",
            tx.stall().as_millis()
        ),
    );
    tx.abandon(codec::end_stream(Some(&err)));
}

/// The end of a stream whose reader fell behind what the agent keeps of the output.
/// `data_loss`, not `resource_exhausted`: the SDK reads that as a rate limit to retry.
fn fell_behind(agent: &Agent, missed: u64, spill_error: Option<&str>) -> EnvdError {
    let cfg = &agent.cfg;
    let ring = cfg.output_buffer_bytes;
    let kept = match (cfg.spill_bytes.min(cfg.spill_total_bytes), spill_error) {
        (0, _) => format!("the agent keeps {ring} bytes of a command's output"),
        (spill, None) => format!(
            "the agent keeps {ring} bytes of a command's output in memory and up to {spill} \
             bytes on disk"
        ),
        (_, Some(e)) => format!(
            "the agent keeps {ring} bytes of a command's output in memory; spilling to disk \
             stopped: {e}"
        ),
    };
    EnvdError::new(
        Code::DataLoss,
        format!(
            "the reader fell behind the command's output: {missed} bytes were dropped before \
             it read them ({kept}); Connect again to resume from what is still buffered"
        ),
    )
}

/// Sends one frame; on a stall the stream is abandoned. False when the stream is over.
async fn send_or_drop(tx: &mut Option<StreamSender>, b: Bytes) -> bool {
    let Some(s) = tx.as_ref() else {
        return false;
    };
    match s.send(b).await {
        Ok(()) => true,
        Err(SendError::Gone) => false,
        Err(SendError::Stalled) => {
            if let Some(s) = tx.take() {
                stalled(s);
            }
            false
        }
    }
}

/// Streams a command's events to one client until the end, a deadline, or disconnect.
/// The client reads from the shared ring at its own pace (see [`crate::output`]).
async fn pump(
    agent: &Arc<Agent>,
    proc: Arc<Proc>,
    mut reader: Reader,
    tx: StreamSender,
    keepalive: Option<Duration>,
    deadline: Option<Instant>,
    is_start: bool,
) {
    let mut tx = Some(tx);
    if !send_or_drop(
        &mut tx,
        event_envelope(ProcessEvent::Start { pid: proc.pid }),
    )
    .await
    {
        return;
    }
    let ka = keepalive.unwrap_or(MAX_KEEPALIVE);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ka, ka);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let stream_deadline = tokio::time::sleep_until(deadline.unwrap_or(far).into());
    tokio::pin!(stream_deadline);
    let mut deadline_fired = false;
    loop {
        let Some(sender) = tx.as_ref() else { return };
        tokio::select! {
            next = reader.next() => match next {
                Next::Frame(b) => {
                    if !send_or_drop(&mut tx, b).await { return; }
                }
                Next::End(end) => {
                    let err = (is_start && proc.timed_out.load(Ordering::SeqCst)).then(|| {
                        EnvdError::new(Code::DeadlineExceeded, "command timed out: deadline exceeded")
                    });
                    if send_or_drop(&mut tx, event_envelope(ProcessEvent::End(end))).await {
                        send_or_drop(&mut tx, codec::end_stream(err.as_ref())).await;
                    }
                    return;
                }
                Next::Behind { missed, spill_error } => {
                    let err = fell_behind(agent, missed, spill_error.as_deref());
                    send_or_drop(&mut tx, codec::end_stream(Some(&err))).await;
                    return;
                }
            },
            _ = ticker.tick(), if keepalive.is_some() => {
                if !send_or_drop(&mut tx, event_envelope(ProcessEvent::Keepalive {})).await { return; }
            }
            () = &mut stream_deadline, if deadline.is_some() && !deadline_fired => {
                deadline_fired = true;
                if is_start {
                    // The command's own timer kills it too; the end event follows.
                    proc.timed_out.store(true, Ordering::SeqCst);
                    let (procs, p) = (agent.procs.clone(), proc.clone());
                    tokio::spawn(async move { procs.signal(&p, Signal::KILL).await });
                } else {
                    let err = EnvdError::new(Code::DeadlineExceeded, "stream deadline exceeded");
                    send_or_drop(&mut tx, codec::end_stream(Some(&err))).await;
                    return;
                }
            }
            () = sender.closed() => return,
        }
    }
}

/// StreamInput: a client stream of start / data / keepalive envelopes.
async fn stream_input(
    agent: &Arc<Agent>,
    mut body: Incoming,
) -> Result<Response<AgentBody>, EnvdError> {
    let mut dec = codec::EnvelopeDecoder::new(MAX_MESSAGE);
    let mut target: Option<Arc<Proc>> = None;
    'outer: while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| EnvdError::new(Code::Canceled, format!("reading request: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        dec.push(&data);
        while let Some(envelope) = dec.next_envelope()? {
            if envelope.is_end() {
                break 'outer;
            }
            let m: StreamInputRequest = connect::parse_json(&envelope.payload)?;
            match m.event {
                StreamInputEvent::Start { process } => {
                    target = Some(agent.procs.find(process.pid, process.tag.as_deref())?);
                }
                StreamInputEvent::Data { input } => {
                    let Some(p) = &target else {
                        return Err(EnvdError::new(
                            Code::FailedPrecondition,
                            "data before start",
                        ));
                    };
                    match &input {
                        ProcessInput::Stdin(b) => p.write_input(false, b).await?,
                        ProcessInput::Pty(b) => p.write_input(true, b).await?,
                    }
                }
                StreamInputEvent::Keepalive {} => {}
            }
        }
    }
    let mut body = codec::message_envelope(&serde_json::json!({})).to_vec();
    body.extend_from_slice(&codec::end_stream(None));
    let mut r = Response::new(AgentBody::full(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(envd_proto::STREAM_CONTENT_TYPE),
    );
    Ok(r)
}

async fn watch_dir(
    agent: &Arc<Agent>,
    user: User,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, EnvdError> {
    let r: WatchDirRequest = connect::read_stream_request(body).await?;
    let mut w = new_watcher(agent, &user, &r).await?;
    let (tx, resp) = connect::stream_channel(agent.cfg.stall_timeout);
    let guard = StreamGuard::new(agent);
    tokio::spawn(async move {
        let _guard = guard;
        let mut tx = Some(tx);
        let msg = |m: WatchDirResponse| codec::message_envelope(&m);
        if !send_or_drop(&mut tx, msg(WatchDirResponse::Start {})).await {
            return;
        }
        let ka = keepalive.unwrap_or(MAX_KEEPALIVE);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ka, ka);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let dl =
            tokio::time::sleep_until(timeout.map(|t| Instant::now() + t).unwrap_or(far).into());
        tokio::pin!(dl);
        loop {
            let Some(sender) = tx.as_ref() else { return };
            tokio::select! {
                ev = w.next() => match ev {
                    Ok(batch) => {
                        for e in batch {
                            if !send_or_drop(&mut tx, msg(WatchDirResponse::Filesystem(Box::new(e)))).await { return; }
                        }
                    }
                    Err(e) => {
                        send_or_drop(&mut tx, codec::end_stream(Some(&e))).await;
                        return;
                    }
                },
                _ = ticker.tick(), if keepalive.is_some() => {
                    if !send_or_drop(&mut tx, msg(WatchDirResponse::Keepalive {})).await { return; }
                }
                () = &mut dl, if timeout.is_some() => {
                    let err = EnvdError::new(Code::DeadlineExceeded, "watch deadline exceeded");
                    send_or_drop(&mut tx, codec::end_stream(Some(&err))).await;
                    return;
                }
                () = sender.closed() => return,
            }
        }
    });
    Ok(resp)
}

/// Write progress of one connection: when its writes started to block, if they do.
#[derive(Debug)]
struct WriteProgress {
    epoch: Instant,
    /// Milliseconds after `epoch` + 1 when writes began to block; 0 while they flow.
    blocked_since: AtomicU64,
}

impl WriteProgress {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            blocked_since: AtomicU64::new(0),
        })
    }

    fn note<T>(&self, r: &Poll<std::io::Result<T>>) {
        match r {
            Poll::Pending => {
                let now = self.epoch.elapsed().as_millis() as u64 + 1;
                let _ = self.blocked_since.compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Poll::Ready(_) => self.blocked_since.store(0, Ordering::Relaxed),
        }
    }

    fn blocked_for(&self) -> Duration {
        match self.blocked_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(
                (self.epoch.elapsed().as_millis() as u64 + 1).saturating_sub(since),
            ),
        }
    }
}

/// A connection's socket, noting whether its writes make progress.
struct WatchedIo {
    inner: tokio::net::TcpStream,
    progress: Arc<WriteProgress>,
}

impl tokio::io::AsyncRead for WatchedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress.note(&r);
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.progress.note(&r);
        r
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection. A client whose socket takes nothing for twice the stall
/// timeout while the agent has bytes for it (a stalled stream whose end could not be
/// written, a stalled download) is disconnected, so it holds nothing for longer.
async fn serve(agent: Arc<Agent>, stream: tokio::net::TcpStream) {
    let progress = WriteProgress::new();
    let io = WatchedIo {
        inner: stream,
        progress: progress.clone(),
    };
    let a = agent.clone();
    let svc = hyper::service::service_fn(move |req| handle(a.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(1 << 20)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let stall = agent.cfg.stall_timeout;
    let close_after = stall.saturating_mul(2);
    let mut check = tokio::time::interval((stall / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = check.tick() => {
                if progress.blocked_for() >= close_after {
                    return;
                }
            }
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT: accepts connections, reaps children.
pub async fn run(agent: Arc<Agent>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    if std::process::id() != 1 {
        // Orphans re-parent to us (a supervisor that died), so we reap them as PID 1 would.
        let _ = crate::sys::set_child_subreaper();
    }
    let listener = tokio::net::TcpListener::bind(agent.cfg.listen).await?;
    eprintln!(
        "sandbox-agent {} listening on {}",
        crate::ENVD_VERSION,
        listener.local_addr()?
    );
    // Children may have exited before the handler was installed.
    agent.procs.reap();
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(agent.clone(), stream));
            }
            _ = sigchld.recv() => agent.procs.reap(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    agent.procs.shutdown().await;
    Ok(())
}
