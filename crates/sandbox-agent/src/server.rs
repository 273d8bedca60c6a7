//! HTTP/1.1 server: the agent's state, authentication, routing to the Connect RPCs
//! ([`crate::rpc`], [`crate::streams`]) and the REST endpoints, and the agent's
//! lifecycle (reaper, SIGTERM). Connections are served by [`crate::connection`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::{self, FileOp, Secret, SignatureError};
use crate::config::{Config, SECRET_ENV, SECRET_FILE_ENV};
use crate::connect::{self, AgentBody, RestResponse};
use crate::files;
use crate::process::ProcessTable;
use crate::spill::Spill;
use crate::users::{User, UserDb};
use crate::watch::WatcherRegistry;
use envd_proto::messages::*;
use envd_proto::{Code, EnvdError};

/// Largest accepted keepalive interval and Connect timeout we honour.
pub(crate) const MAX_KEEPALIVE: Duration = Duration::from_secs(3600);

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

    pub(crate) fn init_state(&self) -> InitState {
        self.init
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The acting user of a request: Basic auth, else `username` (REST), else the default.
    pub(crate) fn acting_user(&self, req_user: Option<String>) -> Result<User, EnvdError> {
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
pub(crate) async fn drain(mut body: Incoming) {
    drain_up_to(&mut body, 64 << 10, Duration::from_secs(2)).await;
}

/// Reads and discards the rest of `body`, at most `max_bytes` of it for at most `max_time`.
pub(crate) async fn drain_up_to(body: &mut Incoming, max_bytes: usize, max_time: Duration) {
    let mut left = max_bytes;
    let _ = tokio::time::timeout(max_time, async {
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

/// Drains a rejected request's body: a `/files` upload's all of it (within
/// [`files::UPLOAD_DRAIN_BYTES`]), so the SDK, still sending, reads the answer.
async fn drain_rejected(method: &Method, path: &str, body: Incoming) {
    if method == Method::POST && path == "/files" {
        let mut body = body;
        files::drain_upload(&mut body).await;
    } else {
        drain(body).await;
    }
}

/// Counts an open streaming response while it lives.
pub(crate) struct StreamGuard(Arc<Agent>);

impl StreamGuard {
    pub(crate) fn new(a: &Arc<Agent>) -> Self {
        a.streams.fetch_add(1, Ordering::SeqCst);
        Self(a.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn header_u64(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
}

pub(crate) fn is_stream(req: &Request<Incoming>) -> bool {
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
            let method = req.method().clone();
            drain_rejected(&method, &path, req.into_body()).await;
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
        return Ok(crate::rpc::rpc_dispatch(agent, req, &path).await);
    }
    if let Some(op) = path.strip_prefix("/volume/") {
        let op = op.to_string();
        return Ok(crate::volume::handle(agent, req, &op).await);
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
        (Method::GET, envd_proto::events::EVENTS_PATH) => {
            let after = crate::files::parse_query(req.uri().query())
                .into_iter()
                .find(|(k, _)| k == "after")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            connect::json_response(
                StatusCode::OK,
                serde_json::to_vec(&crate::events::after(after)).unwrap_or_default(),
            )
        }
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
    let refuse = |req: Request<Incoming>, e: EnvdError| async move {
        drain_rejected(&req.method().clone(), "/files", req.into_body()).await;
        e.rest_response()
    };
    let basic = match auth::basic_user(req.headers()) {
        _ if signed => None,
        Ok(u) => u,
        Err(e) => return refuse(req, EnvdError::from_rest_status(401, e)).await,
    };
    let user = match agent.acting_user(get("username").filter(|u| !u.is_empty()).or(basic)) {
        Ok(u) => u,
        Err(e) => return refuse(req, EnvdError::from_rest_status(401, e.message)).await,
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
    crate::events::init();
    // Children may have exited before the handler was installed.
    agent.procs.reap();
    if let Some(name) = agent.cfg.sudo_socket.clone() {
        if crate::sys::geteuid() == 0 {
            tokio::spawn(crate::sudo::service::serve(agent.clone(), name));
        }
    }
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(crate::connection::serve(agent.clone(), stream));
            }
            _ = sigchld.recv() => agent.procs.reap(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    agent.procs.shutdown().await;
    Ok(())
}
