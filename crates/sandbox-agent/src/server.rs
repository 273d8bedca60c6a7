//! HTTP/1.1 server: authentication, routing of Connect RPCs and REST endpoints,
//! the streaming pumps, and the agent's lifecycle (reaper, SIGTERM).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::auth::{self, FileOp, Secret, SignatureError};
use crate::config::{Config, SECRET_ENV, SECRET_FILE_ENV};
use crate::connect::{self, AgentBody, Code, RpcError, MAX_MESSAGE};
use crate::files::{self, HttpError};
use crate::process::{self, Msg, Proc, ProcessTable, SpawnSpec, Subscription};
use crate::proto::*;
use crate::users::{User, UserDb};
use crate::watch::{Watcher, WatcherRegistry};

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
            .filter(|(k, _)| k != SECRET_ENV && k != SECRET_FILE_ENV)
            .collect();
        Arc::new(Self {
            secret: Secret::new(cfg.secret.clone()),
            users: UserDb::new(cfg.etc_dir.clone(), cfg.home_override.clone()),
            init: Mutex::new(InitState::default()),
            base_env,
            procs: Arc::new(ProcessTable::new(cfg.output_buffer_bytes)),
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
    fn acting_user(&self, req_user: Option<String>) -> Result<User, RpcError> {
        let name = req_user
            .or_else(|| self.init_state().default_user)
            .unwrap_or_else(|| self.cfg.default_user.clone());
        self.users.lookup(&name).ok_or_else(|| {
            RpcError::new(Code::Unauthenticated, format!("{INVALID_USER}: {name:?}"))
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
            let err = RpcError::new(Code::Unauthenticated, e.message());
            let stream = is_stream(&req);
            drain(req.into_body()).await;
            return Ok(if rpc && stream {
                connect::stream_err(&err)
            } else if rpc {
                connect::unary_err(&err)
            } else {
                HttpError::new(401, err.message).response()
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
        _ => HttpError::new(404, format!("no route for {path}")).response(),
    })
}

async fn init(agent: Arc<Agent>, req: Request<Incoming>) -> Response<AgentBody> {
    let body = match connect::read_body(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return HttpError::new(413, e.message).response(),
    };
    let init: InitRequest = match connect::parse_json(&body) {
        Ok(i) => i,
        Err(e) => return HttpError::new(400, e.message).response(),
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
            return HttpError::new(400, "invalid environment variable").response();
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
    let Ok(query) = files::parse_query(req.uri().query()) else {
        return Err(SignatureError::Invalid);
    };
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
    let query = match files::parse_query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return e.response(),
    };
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let basic = match auth::basic_user(req.headers()) {
        _ if signed => None,
        Ok(u) => u,
        Err(e) => return HttpError::new(401, e).response(),
    };
    let user = match agent.acting_user(get("username").filter(|u| !u.is_empty()).or(basic)) {
        Ok(u) => u,
        Err(e) => return HttpError::new(401, e.message).response(),
    };
    if req.method() == Method::GET {
        let Some(raw) = get("path") else {
            return HttpError::new(400, "missing ?path=").response();
        };
        let path = match files::resolve(&user, &raw) {
            Ok(p) => p,
            Err(e) => return HttpError::new(400, e.message).response(),
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
        Err(e) => Err(RpcError::new(Code::Unauthenticated, e)),
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
        return connect::unary_err(&RpcError::new(Code::Unimplemented, "use POST"));
    }

    let res: Result<Response<AgentBody>, RpcError> = match (service, method.as_str(), stream) {
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
        (_, _, true) => Err(RpcError::new(
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
) -> Result<Response<AgentBody>, RpcError> {
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
            let Some(sig) = r.signal.number() else {
                return Err(RpcError::new(Code::InvalidArgument, "unsupported signal"));
            };
            // As envd: a process that has ended is gone for signals (the SDK's kill()
            // then returns false), though Connect still replays its end.
            if p.ended() {
                return Err(RpcError::new(
                    Code::NotFound,
                    format!("process with pid {} has already ended", p.pid),
                ));
            }
            p.signal(sig);
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
            let entries =
                files::run_as(user, move || files::list_dir(&path, r.depth, &names)).await?;
            Ok(connect::unary_ok(&ListDirResponse { entries }))
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
        _ => Err(RpcError::new(
            Code::Unimplemented,
            format!("{svc}.{m} is not implemented"),
        )),
    }
}

async fn new_watcher(
    agent: &Arc<Agent>,
    user: &User,
    r: &WatchDirRequest,
) -> Result<Watcher, RpcError> {
    let path = files::resolve(user, &r.path)?;
    let names = files::names(&agent.users).await;
    let (recursive, include) = (r.recursive, r.include_entry);
    files::run_as(user, move || Watcher::new(path, recursive, include, names)).await
}

/// Sends one envelope; false when the client is gone.
async fn send(tx: &mpsc::Sender<Bytes>, b: Bytes) -> bool {
    tx.send(b).await.is_ok()
}

async fn start(
    agent: &Arc<Agent>,
    user: User,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, RpcError> {
    let r: StartRequest = connect::read_stream_request(body).await?;
    if r.process.cmd.is_empty() || r.process.cmd.contains('\0') {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "cmd is empty or contains NUL",
        ));
    }
    if r.process.args.iter().any(|a| a.contains('\0')) {
        return Err(RpcError::new(
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
    let (proc, sub) = agent.procs.start(spec)?;
    Ok(spawn_pump(agent, proc, sub, keepalive, deadline, true))
}

async fn connect_proc(
    agent: &Arc<Agent>,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, RpcError> {
    let r: SelectRequest = connect::read_stream_request(body).await?;
    let proc = agent.procs.find(r.process.pid, r.process.tag.as_deref())?;
    let sub = proc.subscribe(true);
    let dropped = sub.dropped;
    let mut resp = spawn_pump(
        agent,
        proc,
        sub,
        keepalive,
        timeout.map(|t| Instant::now() + t),
        false,
    );
    if let Ok(v) = dropped.to_string().parse() {
        // Output evicted from the bounded buffer before this client connected.
        resp.headers_mut().insert("x-output-dropped-bytes", v);
    }
    Ok(resp)
}

fn spawn_pump(
    agent: &Arc<Agent>,
    proc: Arc<Proc>,
    sub: Subscription,
    keepalive: Option<Duration>,
    deadline: Option<Instant>,
    is_start: bool,
) -> Response<AgentBody> {
    let (tx, rx) = mpsc::channel(8);
    let guard = StreamGuard::new(agent);
    tokio::spawn(async move {
        let _guard = guard;
        pump(proc, sub, tx, keepalive, deadline, is_start).await;
    });
    connect::stream_response(rx)
}

fn event_envelope(e: ProcessEvent) -> Bytes {
    connect::message_envelope(&ProcessEventMessage { event: e })
}

/// Streams a process's events to one client until the end, a deadline, or disconnect.
async fn pump(
    proc: Arc<Proc>,
    sub: Subscription,
    tx: mpsc::Sender<Bytes>,
    keepalive: Option<Duration>,
    deadline: Option<Instant>,
    is_start: bool,
) {
    let Subscription { replay, mut rx, .. } = sub;
    if !send(&tx, event_envelope(ProcessEvent::Start { pid: proc.pid })).await {
        return;
    }
    let finish = |end: &crate::proto::EndEvent| {
        let mut out = vec![event_envelope(ProcessEvent::End(end.clone()))];
        let err = (is_start && proc.timed_out.load(Ordering::SeqCst)).then(|| {
            RpcError::new(
                Code::DeadlineExceeded,
                "command timed out: deadline exceeded",
            )
        });
        out.push(connect::end_stream(err.as_ref()));
        out
    };
    for m in replay {
        let last = matches!(m, Msg::End(_));
        let frames = match &m {
            Msg::End(e) => finish(e),
            other => vec![event_envelope(other.to_event())],
        };
        for f in frames {
            if !send(&tx, f).await {
                return;
            }
        }
        if last {
            return;
        }
    }
    let ka = keepalive.unwrap_or(MAX_KEEPALIVE);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ka, ka);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let stream_deadline = tokio::time::sleep_until(deadline.unwrap_or(far).into());
    tokio::pin!(stream_deadline);
    let mut deadline_fired = false;
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Msg::End(e)) => {
                    for f in finish(&e) {
                        if !send(&tx, f).await { return; }
                    }
                    return;
                }
                Some(m) => {
                    if !send(&tx, event_envelope(m.to_event())).await { return; }
                }
                None => {
                    // Dropped by the producer: the process ended meanwhile.
                    if let Some(e) = proc.end_event() {
                        for f in finish(&e) {
                            if !send(&tx, f).await { return; }
                        }
                    }
                    return;
                }
            },
            _ = ticker.tick(), if keepalive.is_some() => {
                if !send(&tx, event_envelope(ProcessEvent::Keepalive {})).await { return; }
            }
            () = &mut stream_deadline, if deadline.is_some() && !deadline_fired => {
                deadline_fired = true;
                if is_start {
                    // The process's own timer kills it; wait for its end event.
                    proc.timed_out.store(true, Ordering::SeqCst);
                    proc.signal(libc::SIGKILL);
                } else {
                    let err = RpcError::new(Code::DeadlineExceeded, "stream deadline exceeded");
                    let _ = send(&tx, connect::end_stream(Some(&err))).await;
                    return;
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// StreamInput: a client stream of start / data / keepalive envelopes.
async fn stream_input(
    agent: &Arc<Agent>,
    mut body: Incoming,
) -> Result<Response<AgentBody>, RpcError> {
    let mut dec = connect::EnvelopeDecoder::default();
    let mut target: Option<Arc<Proc>> = None;
    'outer: while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| RpcError::new(Code::Canceled, format!("reading request: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        dec.push(&data);
        while let Some((flags, payload)) = dec.next_envelope()? {
            if flags & connect::FLAG_END_STREAM != 0 {
                break 'outer;
            }
            let m: StreamInputRequest = connect::parse_json(&payload)?;
            match m.event {
                StreamInputEvent::Start { process } => {
                    target = Some(agent.procs.find(process.pid, process.tag.as_deref())?);
                }
                StreamInputEvent::Data { input } => {
                    let Some(p) = &target else {
                        return Err(RpcError::new(Code::FailedPrecondition, "data before start"));
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
    let (tx, rx) = mpsc::channel(2);
    let _ = tx.try_send(connect::message_envelope(&serde_json::json!({})));
    let _ = tx.try_send(connect::end_stream(None));
    Ok(connect::stream_response(rx))
}

async fn watch_dir(
    agent: &Arc<Agent>,
    user: User,
    body: Incoming,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Result<Response<AgentBody>, RpcError> {
    let r: WatchDirRequest = connect::read_stream_request(body).await?;
    let mut w = new_watcher(agent, &user, &r).await?;
    let (tx, rx) = mpsc::channel(16);
    let guard = StreamGuard::new(agent);
    tokio::spawn(async move {
        let _guard = guard;
        let msg = |m: WatchDirResponse| connect::message_envelope(&m);
        if !send(&tx, msg(WatchDirResponse::Start {})).await {
            return;
        }
        let ka = keepalive.unwrap_or(MAX_KEEPALIVE);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ka, ka);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let dl =
            tokio::time::sleep_until(timeout.map(|t| Instant::now() + t).unwrap_or(far).into());
        tokio::pin!(dl);
        loop {
            tokio::select! {
                ev = w.next() => match ev {
                    Ok(batch) => {
                        for e in batch {
                            if !send(&tx, msg(WatchDirResponse::Filesystem(Box::new(e)))).await { return; }
                        }
                    }
                    Err(e) => {
                        let _ = send(&tx, connect::end_stream(Some(&e))).await;
                        return;
                    }
                },
                _ = ticker.tick(), if keepalive.is_some() => {
                    if !send(&tx, msg(WatchDirResponse::Keepalive {})).await { return; }
                }
                () = &mut dl, if timeout.is_some() => {
                    let err = RpcError::new(Code::DeadlineExceeded, "watch deadline exceeded");
                    let _ = send(&tx, connect::end_stream(Some(&err))).await;
                    return;
                }
                () = tx.closed() => return,
            }
        }
    });
    Ok(connect::stream_response(rx))
}

/// Runs the agent until SIGTERM/SIGINT: accepts connections, reaps children.
pub async fn run(agent: Arc<Agent>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    if std::process::id() != 1 {
        // Orphans of our commands re-parent to us, so we reap them as PID 1 would.
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
                let a = agent.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(a.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .max_buf_size(1 << 20)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = sigchld.recv() => agent.procs.reap(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    shutdown(&agent).await;
    Ok(())
}

async fn shutdown(agent: &Arc<Agent>) {
    if std::process::id() == 1 {
        crate::sys::kill_all(libc::SIGTERM);
    } else {
        agent.procs.signal_all(libc::SIGTERM);
    }
    // Give commands a moment to exit, reaping them, then stop.
    for _ in 0..20 {
        agent.procs.reap();
        if agent.procs.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.procs.reap();
}
