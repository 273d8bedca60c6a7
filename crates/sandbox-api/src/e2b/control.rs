//! The E2B control plane (`E2B_API_URL`): sandbox lifecycle as E2B's REST API has it.
//!
//! Handlers parse E2B's request shapes and map the core's answers and errors to E2B's;
//! every decision stays with [`sandbox_core::SandboxManager`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envd_proto::ENVD_VERSION;
use percent_encoding::percent_decode_str;
use poem::http::{header, StatusCode};
use poem::web::{Data, Path};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use sandbox_core::manager::{Direction, LogQuery, MetricSample};
use sandbox_core::{
    listing, Error, Lifecycle, OnTimeout, SandboxId, SandboxInfo, SandboxSpec, SandboxState,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{rfc3339, AppState};

/// E2B's default lifetime, seconds, when a v1 create or a resume names none.
const DEFAULT_TIMEOUT_SECS: u64 = 15;
/// E2B's default lifetime, seconds, when a v2 create or a connect names none.
const DEFAULT_TIMEOUT_V2_SECS: u64 = 300;
/// Page size of `GET /v2/sandboxes` when the client names none.
const DEFAULT_PAGE: usize = 100;
/// Reported as every sandbox's `clientID`.
const CLIENT_ID: &str = "colima-e2b";

/// An E2B error: answered as `{"code": <status>, "message": ...}`.
#[derive(Debug)]
pub struct Reject {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

/// What the handlers' bodies return.
pub(crate) type Answer = Result<Response, Reject>;

/// An E2B error with `status`.
pub(crate) fn reject(status: StatusCode, message: impl Into<String>) -> Reject {
    Reject {
        status,
        message: message.into(),
        retry_after: None,
    }
}

impl Reject {
    /// The error body, `{code, message}`.
    pub fn body(&self) -> Value {
        json!({"code": self.status.as_u16(), "message": self.message})
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response {
        let body = self.body();
        let mut resp = Response::builder()
            .status(self.status)
            .content_type("application/json")
            .body(body.to_string());
        if let Some(v) = self.retry_after.and_then(|s| s.to_string().parse().ok()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Maps a core error to the status E2B uses for it: the core's own status, but for
/// the two E2B answers differently.
impl From<Error> for Reject {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            e => StatusCode::from_u16(crate::error::status_of(e))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "E2B control plane call failed");
        }
        let retry_after = match &e {
            Error::ResourceExhausted { retry_after, .. } => retry_after.map(|d| d.as_secs().max(1)),
            _ => None,
        };
        Reject {
            status,
            message: e.to_string(),
            retry_after,
        }
    }
}

/// Turns a handler body's result into the response.
pub(crate) fn answer(result: Answer) -> Response {
    result.unwrap_or_else(Reject::into_response)
}

pub(crate) fn json_response(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(body.to_string())
}

pub(crate) fn no_content() -> Response {
    Response::builder().status(StatusCode::NO_CONTENT).finish()
}

/// Parses a JSON body; an empty body reads as `{}` (E2B clients send none for some calls).
pub(crate) async fn parse_body<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, Reject> {
    let bytes = body
        .into_bytes()
        .await
        .map_err(|e| reject(StatusCode::BAD_REQUEST, e.to_string()))?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        reject(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

pub(crate) fn parse_id(raw: &str) -> Result<SandboxId, Reject> {
    raw.parse()
        .map_err(|_| reject(StatusCode::NOT_FOUND, format!("sandbox {raw} not found")))
}

/// A timeout in seconds from a request: positive and within what the server allows.
fn timeout_secs(value: Option<i64>, default: u64) -> Result<Duration, Reject> {
    match value {
        None => Ok(Duration::from_secs(default)),
        Some(t) if t > 0 => Ok(Duration::from_secs(t as u64)),
        Some(t) => Err(reject(
            StatusCode::BAD_REQUEST,
            format!("timeout must be a positive number of seconds, not {t}"),
        )),
    }
}

/// E2B's `Sandbox` (what create, connect and resume return).
/// A sandbox's `templateID` and `alias`: a built template's id and name, else the
/// configured template's name for both.
fn template_names(state: &AppState, reference: &str) -> (String, String) {
    let (name, _) = sandbox_core::template::registry::split_reference(reference);
    match state.manager.templates().find(name) {
        Some(t) => (t.id, t.name),
        None => (reference.to_string(), reference.to_string()),
    }
}

pub(super) fn sandbox_json(state: &AppState, info: &SandboxInfo, token: Option<&str>) -> Value {
    let (template_id, alias) = template_names(state, &info.template);
    let mut body = json!({
        "sandboxID": info.id.as_str(),
        "templateID": template_id,
        "alias": alias,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "trafficAccessToken": state.manager.network(&info.id).and_then(|n| n.traffic_token),
        "domain": domain(state),
    });
    // Absent, not null: the SDK sends a token whenever the field is present.
    if let (Some(token), Some(obj)) = (token, body.as_object_mut()) {
        obj.insert("envdAccessToken".into(), json!(token));
    }
    body
}

fn domain(state: &AppState) -> Option<String> {
    state.e2b.as_ref().map(|e| e.settings.domain.clone())
}

/// E2B's `ListedSandbox`.
fn listed_json(state: &AppState, info: &SandboxInfo) -> Value {
    let (template_id, alias) = template_names(state, &info.template);
    json!({
        "sandboxID": info.id.as_str(),
        "templateID": template_id,
        "alias": alias,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(info.started_at),
        "endAt": rfc3339(info.expires_at),
        "cpuCount": info.limits.cpus.ceil().max(1.0) as u32,
        "memoryMB": info.limits.memory_mb,
        "diskSizeMB": info.limits.disk_mb.unwrap_or(0),
        "metadata": info.metadata,
        "state": info.state.as_str(),
        "envdVersion": ENVD_VERSION,
        "volumeMounts": info.volume_mounts,
    })
}

/// The access token to hand out for `info`: secure sandboxes' clients must send it.
pub(super) async fn token_for(
    state: &AppState,
    info: &SandboxInfo,
) -> Result<Option<String>, Reject> {
    if !info.secure {
        return Ok(None);
    }
    Ok(Some(state.manager.access_token(&info.id).await?))
}

/// Middleware: the control plane answers only when the E2B layer is on (the perimeter
/// has already checked the API key).
pub async fn require_enabled<E: Endpoint>(next: Arc<E>, req: Request) -> poem::Result<Response> {
    if req.data::<AppState>().is_some_and(|s| s.e2b.is_some()) {
        // Routing errors (no such route, wrong method) in E2B's shape too.
        match next.call(req).await {
            Ok(resp) => Ok(resp.into_response()),
            Err(e) => Ok(reject(e.status(), e.to_string()).into_response()),
        }
    } else {
        Ok(reject(
            StatusCode::NOT_FOUND,
            "the E2B compatibility layer is not enabled",
        )
        .into_response())
    }
}

/// `POST /sandboxes` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<i64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    secure: Option<bool>,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<super::network::CreateNetwork>,
    /// Pause instead of kill at the deadline.
    #[serde(default)]
    auto_pause: Option<bool>,
    /// Whether that pause keeps memory (default true).
    #[serde(default)]
    auto_pause_memory: Option<bool>,
    #[serde(default)]
    auto_resume: Option<AutoResume>,
    #[serde(default)]
    volume_mounts: Option<Vec<sandbox_core::VolumeMount>>,
}

/// E2B's `autoResume` create field.
#[derive(Debug, Deserialize)]
struct AutoResume {
    #[serde(default)]
    enabled: bool,
}

impl NewSandbox {
    /// The lifecycle the create asks for (the core checks the combination).
    fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            on_timeout: if self.auto_pause.unwrap_or(false) {
                OnTimeout::Pause
            } else {
                OnTimeout::Kill
            },
            keep_memory: self.auto_pause_memory.unwrap_or(true),
            auto_resume: self.auto_resume.as_ref().is_some_and(|a| a.enabled),
        }
    }
}

/// E2B's `lifecycle` of a sandbox's detail.
fn lifecycle_json(lifecycle: Lifecycle) -> Value {
    json!({
        "onTimeout": match lifecycle.on_timeout {
            OnTimeout::Kill => "kill",
            OnTimeout::Pause => "pause",
        },
        "autoResume": lifecycle.auto_resume,
    })
}

/// `POST /sandboxes`: create a sandbox from a template; `secure` defaults to false.
#[poem::handler]
pub async fn create(Data(state): Data<&AppState>, body: Body) -> Response {
    answer(create_with(state, body, false).await)
}

/// `POST /v2/sandboxes`: create; every v2 sandbox is secure (its token is required).
#[poem::handler]
pub async fn create_v2(Data(state): Data<&AppState>, body: Body) -> Response {
    answer(create_with(state, body, true).await)
}

async fn create_with(state: &AppState, body: Body, v2: bool) -> Answer {
    let req: NewSandbox = parse_body(body).await?;
    let default = if v2 {
        DEFAULT_TIMEOUT_V2_SECS
    } else {
        DEFAULT_TIMEOUT_SECS
    };
    let timeout = timeout_secs(req.timeout, default)?;
    // E2B names templates by alias or id, optionally with a tag.
    let template = req.template_id.as_str();
    let internet = req.allow_internet_access.unwrap_or(true);
    let lifecycle = req.lifecycle();
    let network = req.network.map(|n| n.config(internet)).transpose()?;
    let spec = SandboxSpec {
        lifecycle,
        metadata: req.metadata.unwrap_or_default(),
        envs: req.env_vars.unwrap_or_default(),
        internet,
        secure: v2 || req.secure.unwrap_or(false),
        network,
        volume_mounts: req.volume_mounts.unwrap_or_default(),
        ..SandboxSpec::new(template, timeout)
    };
    let info = state.manager.create(spec).await.map_err(|e| match e {
        // E2B answers an unknown template with 400.
        Error::NotFound { what } => reject(StatusCode::BAD_REQUEST, format!("{what} not found")),
        e => e.into(),
    })?;
    let token = token_for(state, &info).await?;
    Ok(json_response(
        StatusCode::CREATED,
        sandbox_json(state, &info, token.as_deref()),
    ))
}

/// Query of the list calls, as sent.
#[derive(Debug, Default)]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    order: Option<String>,
    started_after: Option<String>,
    template: Option<String>,
}

/// Parses the `metadata` filter: `k1=v1&k2=v2` as a form, whose keys and values the
/// SDKs escape once more before (Python `quote`, JS `encodeURIComponent`).
fn metadata_filter(raw: Option<&str>) -> BTreeMap<String, String> {
    let unescape = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    form_pairs(raw.unwrap_or_default())
        .into_iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (unescape(&k), unescape(&v)))
        .collect()
}

/// The pairs of a URL-encoded form (malformed input reads as no pairs).
pub(super) fn form_pairs(raw: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(raw).unwrap_or_default()
}

/// The query string of `req` as [`ListQuery`]; repeated `state` parameters are joined.
fn list_query(req: &Request) -> ListQuery {
    let mut q = ListQuery::default();
    let mut states = Vec::new();
    for (k, v) in form_pairs(req.uri().query().unwrap_or_default()) {
        match k.as_str() {
            "metadata" => q.metadata = Some(v),
            "state" => states.push(v),
            "limit" => q.limit = v.parse().ok(),
            "nextToken" | "next_token" => q.next_token = Some(v),
            "order" => q.order = Some(v),
            "startedAfter" | "started_after" => q.started_after = Some(v),
            "template" => q.template = Some(v),
            _ => {}
        }
    }
    if !states.is_empty() {
        q.state = Some(states.join(","));
    }
    q
}

/// The core's query for `q`: states default to running and paused.
fn core_query(q: ListQuery) -> Result<listing::Query, Reject> {
    let bad = |m: String| reject(StatusCode::BAD_REQUEST, m);
    let mut states = Vec::new();
    for name in q.state.as_deref().unwrap_or("running,paused").split(',') {
        match name.trim().to_ascii_lowercase().as_str() {
            "" => {}
            "running" => states.push(SandboxState::Running),
            "paused" => states.push(SandboxState::Paused),
            other => return Err(bad(format!("unknown state {other:?} (running, paused)"))),
        }
    }
    let order = match q.order.as_deref().filter(|o| !o.is_empty()) {
        Some(o) => o.parse().map_err(|e: Error| bad(e.to_string()))?,
        None => listing::Order::Desc,
    };
    let started_after = match q.started_after.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    bad(format!(
                        "startedAfter must be an RFC 3339 time ({e}): {t:?}"
                    ))
                })?,
        ),
        None => None,
    };
    Ok(listing::Query {
        metadata: metadata_filter(q.metadata.as_deref()),
        states,
        started_after,
        template: q.template.filter(|t| !t.is_empty()),
        order,
        limit: q.limit.unwrap_or(DEFAULT_PAGE),
        after: q.next_token.filter(|t| !t.is_empty()),
    })
}

/// `GET /sandboxes` (v1): running sandboxes.
#[poem::handler]
pub async fn list_v1(Data(state): Data<&AppState>, req: &Request) -> Response {
    let q = list_query(req);
    let filter = metadata_filter(q.metadata.as_deref());
    let items: Vec<Value> = state
        .manager
        .list(&filter)
        .iter()
        .filter(|s| s.state == SandboxState::Running)
        .map(|s| listed_json(state, s))
        .collect();
    json_response(StatusCode::OK, Value::Array(items))
}

/// `GET /v2/sandboxes`: filtered by metadata, state, start time and template, newest
/// first unless `order=asc`, paginated with `nextToken` (`X-Next-Token`), with the
/// running count in `X-Total-Running`.
#[poem::handler]
pub async fn list_v2(Data(state): Data<&AppState>, req: &Request) -> Response {
    answer(list_page(state, list_query(req)))
}

fn list_page(state: &AppState, q: ListQuery) -> Answer {
    let query = core_query(q)?;
    let page = state.manager.list_page(&query)?;
    let items: Vec<Value> = page.items.iter().map(|s| listed_json(state, s)).collect();
    let mut resp = json_response(StatusCode::OK, Value::Array(items));
    if let Some(v) = page.next.and_then(|t| t.parse().ok()) {
        resp.headers_mut().insert("x-next-token", v);
    }
    if let Ok(v) = page.total_running.to_string().parse() {
        resp.headers_mut().insert("x-total-running", v);
    }
    Ok(resp)
}

/// `GET /sandboxes/{id}`: one sandbox in detail.
#[poem::handler]
pub async fn get(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(detail(state, &id).await)
}

async fn detail(state: &AppState, id: &str) -> Answer {
    let info = state.manager.get(&parse_id(id)?).await?;
    let token = token_for(state, &info).await?;
    let mut body = listed_json(state, &info);
    if let Some(obj) = body.as_object_mut() {
        if let Some(token) = token {
            obj.insert("envdAccessToken".into(), json!(token));
        }
        obj.insert("domain".into(), json!(domain(state)));
        obj.insert("allowInternetAccess".into(), json!(info.internet));
        obj.insert(
            "lifecycle".into(),
            lifecycle_json(state.manager.lifecycle(&info.id)),
        );
    }
    Ok(json_response(StatusCode::OK, body))
}

/// `DELETE /sandboxes/{id}`.
#[poem::handler]
pub async fn kill(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(
        async {
            Ok(state
                .manager
                .kill(&parse_id(&id)?)
                .await
                .map(|()| no_content())?)
        }
        .await,
    )
}

/// Body of the connect and resume calls.
#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    timeout: Option<i64>,
    /// `false` on connect: start a paused sandbox from its filesystem (a reboot).
    #[serde(default)]
    memory: Option<bool>,
}

/// Body of the pause call.
#[derive(Debug, Default, Deserialize)]
struct PauseBody {
    /// `false` keeps only the filesystem and frees the memory.
    #[serde(default)]
    memory: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`: the sandbox now ends `timeout` seconds from now.
#[poem::handler]
pub async fn set_timeout(
    Data(state): Data<&AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    answer(
        async {
            let (id, timeout) = id_and_timeout(&id, body, "timeout").await?;
            state.manager.set_timeout_or_end(&id, timeout)?;
            Ok(no_content())
        }
        .await,
    )
}

/// Parses a path id and a body whose `field` is a required timeout in seconds, 0 or more
/// (E2B's minimum is 0: `set_timeout(0)` ends the sandbox now).
async fn id_and_timeout(
    id: &str,
    body: Body,
    field: &str,
) -> Result<(SandboxId, Duration), Reject> {
    let id = parse_id(id)?;
    let body: BTreeMap<String, Value> = parse_body(body).await?;
    let secs = body.get(field).and_then(Value::as_i64).ok_or_else(|| {
        reject(
            StatusCode::BAD_REQUEST,
            format!("{field} (seconds) is required"),
        )
    })?;
    if secs < 0 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            format!("{field} must be 0 or more seconds, not {secs}"),
        ));
    }
    Ok((id, Duration::from_secs(secs as u64)))
}

/// `POST /sandboxes/{id}/refreshes`: extends the sandbox's life by `duration` seconds.
#[poem::handler]
pub async fn refresh(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(
        async {
            let (id, timeout) = id_and_timeout(&id, body, "duration").await?;
            state.manager.extend_timeout(&id, timeout)?;
            Ok(no_content())
        }
        .await,
    )
}

/// `POST /sandboxes/{id}/connect` (and `/v2/...`): 200 with the sandbox if it runs (its
/// life extended to at least `timeout`), 201 if it had to be resumed.
#[poem::handler]
pub async fn connect(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let body: TimeoutBody = parse_body(body).await?;
            let timeout = timeout_secs(body.timeout, DEFAULT_TIMEOUT_V2_SECS)?;
            let cold = body.memory == Some(false);
            let (info, resumed) = state.manager.connect(&id, timeout, cold).await?;
            let status = if resumed {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            sandbox_answer(state, &info, status).await
        }
        .await,
    )
}

/// `POST /sandboxes/{id}/pause` (`{memory}`, default true): 204, or 409 when already
/// paused.
#[poem::handler]
pub async fn pause(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let body: PauseBody = parse_body(body).await?;
            let keep_memory = body.memory.unwrap_or(true);
            Ok(state
                .manager
                .pause(&id, keep_memory)
                .await
                .map(|_| no_content())?)
        }
        .await,
    )
}

/// `POST /sandboxes/{id}/resume`: 201 with the sandbox, or 409 when it is not paused.
#[poem::handler]
pub async fn resume(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let body: TimeoutBody = parse_body(body).await?;
            let timeout = timeout_secs(body.timeout, DEFAULT_TIMEOUT_SECS)?;
            let info = state.manager.resume(&id, Some(timeout), false).await?;
            sandbox_answer(state, &info, StatusCode::CREATED).await
        }
        .await,
    )
}

/// The sandbox's `Sandbox` body with `status`.
async fn sandbox_answer(state: &AppState, info: &SandboxInfo, status: StatusCode) -> Answer {
    let token = token_for(state, info).await?;
    Ok(json_response(
        status,
        sandbox_json(state, info, token.as_deref()),
    ))
}

/// The log query of `req`: `cursor` (unix ms), `limit`, `direction`, `level`, `search`.
fn log_query(req: &Request) -> Result<LogQuery, Reject> {
    let bad = |m: String| reject(StatusCode::BAD_REQUEST, m);
    let mut q = LogQuery {
        limit: sandbox_core::manager::sandbox_logs::MAX_LOG_PAGE,
        ..LogQuery::default()
    };
    for (k, v) in form_pairs(req.uri().query().unwrap_or_default()) {
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "cursor" => {
                q.cursor = Some(v.parse().map_err(|_| {
                    bad(format!(
                        "cursor must be a unix time in milliseconds, not {v:?}"
                    ))
                })?)
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .map_err(|_| bad(format!("limit must be a number, not {v:?}")))?
            }
            "direction" => {
                q.direction = match v.as_str() {
                    "forward" => Direction::Forward,
                    "backward" => Direction::Backward,
                    _ => {
                        return Err(bad(format!(
                            "direction must be forward or backward, not {v:?}"
                        )))
                    }
                }
            }
            "level" => q.level = Some(v.parse().map_err(|e: Error| bad(e.to_string()))?),
            "search" => q.search = Some(v.chars().take(256).collect()),
            _ => {}
        }
    }
    Ok(q)
}

/// E2B's `SandboxLogEntry`.
fn log_json(e: &sandbox_core::manager::LogEntry) -> Value {
    json!({
        "timestamp": rfc3339(e.at),
        "level": e.level,
        "message": e.message,
        "fields": e.fields,
    })
}

/// `GET /v2/sandboxes/{id}/logs`: the sandbox's log (`{logs: [{timestamp, level,
/// message, fields}]}`), readable for a while after the sandbox ended.
#[poem::handler]
pub async fn logs_v2(
    Data(state): Data<&AppState>,
    Path(id): Path<String>,
    req: &Request,
) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let entries = state.manager.logs(&id, &log_query(req)?).await?;
            let logs: Vec<Value> = entries.iter().map(log_json).collect();
            Ok(json_response(StatusCode::OK, json!({ "logs": logs })))
        }
        .await,
    )
}

/// `GET /sandboxes/{id}/logs` (v1): `{logs: [{timestamp, line}], logEntries: [...]}`.
#[poem::handler]
pub async fn logs_v1(
    Data(state): Data<&AppState>,
    Path(id): Path<String>,
    req: &Request,
) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let entries = state.manager.logs(&id, &log_query(req)?).await?;
            let lines: Vec<Value> = entries
                .iter()
                .map(|e| json!({"timestamp": rfc3339(e.at), "line": e.message}))
                .collect();
            let structured: Vec<Value> = entries.iter().map(log_json).collect();
            Ok(json_response(
                StatusCode::OK,
                json!({ "logs": lines, "logEntries": structured }),
            ))
        }
        .await,
    )
}

/// E2B's `SandboxMetric`.
fn metric_json(m: &MetricSample) -> Value {
    json!({
        "timestamp": rfc3339(m.at),
        "timestampUnix": m.at.unix_timestamp(),
        "cpuCount": m.cpu_count,
        "cpuUsedPct": m.cpu_used_pct,
        "memUsed": m.mem_used,
        "memTotal": m.mem_total,
        "memCache": m.mem_cache,
        "diskUsed": m.disk_used,
        "diskTotal": m.disk_total,
    })
}

/// A `start`/`end` query value: unix seconds.
fn unix_param(req: &Request, name: &str) -> Result<Option<time::OffsetDateTime>, Reject> {
    let raw = form_pairs(req.uri().query().unwrap_or_default())
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty());
    raw.map(|v| {
        v.parse::<i64>()
            .ok()
            .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(|| {
                reject(
                    StatusCode::BAD_REQUEST,
                    format!("{name} must be a unix time in seconds, not {v:?}"),
                )
            })
    })
    .transpose()
}

/// `GET /sandboxes/{id}/metrics?start=&end=`: the samples taken in that range (unix
/// seconds, inclusive; default all that are kept), oldest first.
#[poem::handler]
pub async fn metrics(
    Data(state): Data<&AppState>,
    Path(id): Path<String>,
    req: &Request,
) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let (start, end) = (unix_param(req, "start")?, unix_param(req, "end")?);
            if let (Some(s), Some(e)) = (start, end) {
                if s > e {
                    return Err(reject(StatusCode::BAD_REQUEST, "start is after end"));
                }
            }
            let samples = state.manager.metrics_between(&id, start, end).await?;
            let items: Vec<Value> = samples.iter().map(metric_json).collect();
            Ok(json_response(StatusCode::OK, Value::Array(items)))
        }
        .await,
    )
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the newest sample of each running sandbox
/// named, as `{"sandboxes": {id: SandboxMetric}}` (unknown ids are left out).
#[poem::handler]
pub async fn metrics_batch(Data(state): Data<&AppState>, req: &Request) -> Response {
    answer(
        async {
            let mut ids = Vec::new();
            for (k, v) in form_pairs(req.uri().query().unwrap_or_default()) {
                if k == "sandbox_ids" || k == "sandboxIds" {
                    ids.extend(
                        v.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .filter_map(|s| s.parse::<SandboxId>().ok()),
                    );
                }
            }
            if ids.len() > 100 {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "at most 100 sandbox_ids per call",
                ));
            }
            let latest = state.manager.latest_metrics(&ids).await;
            let map: serde_json::Map<String, Value> = latest
                .iter()
                .map(|(id, m)| (id.to_string(), metric_json(m)))
                .collect();
            Ok(json_response(StatusCode::OK, json!({"sandboxes": map})))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode() {
        // What `metadata` is once the query string is decoded: the Python SDK sends
        // urlencode({quote(k): quote(v)}) for {"a": "1", "user id": "x=y&z+é", "flag": ""}.
        let f = metadata_filter(Some("a=1&user%2520id=x%253Dy%2526z%252B%25C3%25A9&flag"));
        assert_eq!(f.get("a").map(String::as_str), Some("1"));
        assert_eq!(f.get("user id").map(String::as_str), Some("x=y&z+é"));
        assert_eq!(f.get("flag").map(String::as_str), Some(""));
        assert!(metadata_filter(None).is_empty());
    }

    #[test]
    fn malformed_escapes_stay_as_they_are() {
        let f = metadata_filter(Some("a=%252&b=%25zz"));
        assert_eq!(f.get("a").map(String::as_str), Some("%2"));
        assert_eq!(f.get("b").map(String::as_str), Some("%zz"));
    }

    #[test]
    fn timeouts_must_be_positive() {
        assert!(timeout_secs(Some(0), 15).is_err());
        assert!(timeout_secs(Some(-5), 15).is_err());
        assert_eq!(timeout_secs(None, 15).ok(), Some(Duration::from_secs(15)));
        assert_eq!(
            timeout_secs(Some(60), 15).ok(),
            Some(Duration::from_secs(60))
        );
    }
}
