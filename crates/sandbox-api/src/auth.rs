//! The perimeter: every request, on every way in (native API, E2B control and data
//! planes, sandbox host names, WebSocket upgrades), passes here before any work.
//!
//! - **Host**: only names the server answers for (loopback names, `*.localhost`, its E2B
//!   domain and `<port>-<id>.<domain>`, configured names, IP literals) get through; any
//!   other name is a DNS-rebinding attempt and gets 421.
//! - **Origin**: a request a browser sends from another origin gets 403, unless the
//!   origin is configured (CORS is off by default).
//! - **Credential**: one key store for both planes (several named keys for rotation),
//!   sent as `Authorization: Bearer <key>` or `X-API-KEY`; a sandbox's access token
//!   (`X-Access-Token`) also owns that sandbox. In the default mode, a loopback peer with a
//!   loopback Host may go without one (local development), except to drive a sandbox
//!   created secure. Keys compare in constant time; wrong credentials are rate-limited
//!   per peer (429 with `Retry-After`), and a limited peer gets 429 for every credential,
//!   right or wrong, until the limit lifts, so guessing learns nothing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envd_proto::signature::ct_eq;
use envd_proto::{AGENT_PORT, TOKEN_HEADER};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use poem::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use sandbox_core::{SandboxId, SandboxManager};
use serde::{Deserialize, Serialize};

use crate::e2b::proxy::{target_from_headers, target_from_host};
use crate::AppState;

/// Header the E2B SDKs send the API key in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// How strict the perimeter is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A key everywhere, but loopback peers with a loopback Host may go without one
    /// (local development), except to drive sandboxes created secure.
    #[default]
    Auto,
    /// A key (or a sandbox's token) on every request, loopback included.
    Required,
    /// No credentials at all; only allowed on a loopback bind (the server refuses to
    /// start otherwise).
    Off,
}

/// Settings of the perimeter, decided by the binary.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    /// The mode.
    pub mode: AuthMode,
    /// Named keys; any of them is accepted.
    pub keys: Vec<(String, String)>,
    /// Host names the server answers for besides loopback names and the E2B domain;
    /// `*.name` matches subdomains.
    pub hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) allowed to call from a browser.
    pub cors_origins: Vec<String>,
    /// Whether loopback peers may count as local at all: false where sandboxes can reach
    /// the server's loopback (an engine in a VM forwarding to the host's loopback).
    pub trust_loopback: bool,
    /// Wrong credentials a peer may send in a burst before it is limited.
    pub failure_burst: u32,
    /// After the burst, one more wrong credential is allowed every so often.
    pub failure_period: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::Auto,
            keys: Vec::new(),
            hosts: Vec::new(),
            cors_origins: Vec::new(),
            trust_loopback: true,
            failure_burst: 10,
            failure_period: Duration::from_secs(6),
        }
    }
}

/// Who a request was let in as; handlers and the proxy read it from the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Presented the key named so.
    Key(String),
    /// Presented sandbox `.0`'s access token.
    Token(SandboxId),
    /// A loopback peer in the development mode.
    Local,
    /// A signed file URL (its signature is the credential, checked on the way).
    Signed,
    /// The perimeter is off.
    Open,
    /// Anyone: the dashboard's static files, which hold no data (the page asks for the
    /// key and sends it with every call it makes).
    Anyone,
}

impl Caller {
    /// On whose behalf the server forwards this caller's requests into a sandbox.
    pub fn vouch(&self) -> sandbox_core::Vouch {
        match self {
            Caller::Key(_) | Caller::Open => sandbox_core::Vouch::Owner,
            Caller::Local => sandbox_core::Vouch::Local,
            Caller::Token(_) | Caller::Signed | Caller::Anyone => sandbox_core::Vouch::Nobody,
        }
    }
}

/// The perimeter's state: settings, and who failed to authenticate lately.
pub struct Perimeter {
    settings: AuthSettings,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Peers limited until the instant given (kept small: expired entries are pruned).
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl std::fmt::Debug for Perimeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Perimeter")
            .field("mode", &self.settings.mode)
            .field(
                "keys",
                &self
                    .settings
                    .keys
                    .iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Most limited peers remembered at once.
const MAX_BLOCKED: usize = 10_000;

impl Perimeter {
    /// A perimeter with `settings`.
    pub fn new(settings: AuthSettings) -> Self {
        let burst = NonZeroU32::new(settings.failure_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(settings.failure_period.max(Duration::from_millis(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            settings,
            failures: RateLimiter::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// The name of the key `given`, if it is one (every key is compared, in constant
    /// time each).
    fn key_name(&self, given: &str) -> Option<String> {
        let mut found = None;
        for (name, key) in &self.settings.keys {
            if ct_eq(key.as_bytes(), given.as_bytes()) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found
    }

    /// When `peer` may present credentials again, if it is limited now.
    fn blocked_for(&self, peer: Option<IpAddr>) -> Option<Duration> {
        let peer = peer?;
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let until = *blocked.get(&peer)?;
        until.checked_duration_since(Instant::now())
    }

    /// Counts a wrong credential from `peer`; returns how long it is limited for, if
    /// this failure went over its allowance.
    fn failed(&self, peer: Option<IpAddr>) -> Option<Duration> {
        let peer = peer?;
        let wait = match self.failures.check_key(&peer) {
            Ok(()) => return None,
            Err(not_until) => not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            )),
        };
        let wait = wait.max(Duration::from_secs(1));
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.len() >= MAX_BLOCKED {
            let now = Instant::now();
            blocked.retain(|_, until| *until > now);
            self.failures.retain_recent();
        }
        if blocked.len() < MAX_BLOCKED {
            blocked.insert(peer, Instant::now() + wait);
        }
        Some(wait)
    }
}

/// Which way in a request takes.
#[derive(Debug)]
enum Way {
    /// E2B's control plane (`/e2b/...`): the API key, always.
    Control,
    /// A sandbox's agent or port: the data plane or a sandbox host name.
    Sandbox { id: String, port: u16, e2b: bool },
    /// A signed `/files` URL.
    Signed,
    /// Volume `id`'s content (`/volumecontent/{id}/…`): its bearer token.
    Volume { id: String },
    /// A native route about one sandbox; `drives` when it acts on it.
    Native { id: String, drives: bool },
    /// The dashboard's static files (`/ui`, read only).
    Page,
    /// Anything else on the server (native lists and creates, docs, health, metrics).
    Server,
}

/// A path segment percent-decoded, as the router hands it to handlers.
fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

fn way(req: &Request, host: Option<&str>) -> Way {
    if let Some(target) = host.and_then(target_from_host) {
        return Way::Sandbox {
            id: target.sandbox,
            port: target.port,
            e2b: true,
        };
    }
    let path = req.uri().path();
    if path == crate::e2b::ENVD_BASE || path.starts_with(&format!("{}/", crate::e2b::ENVD_BASE)) {
        let target = target_from_headers(req.headers());
        return Way::Sandbox {
            id: target
                .as_ref()
                .map(|t| t.sandbox.clone())
                .unwrap_or_default(),
            port: target.map_or(AGENT_PORT, |t| t.port),
            e2b: true,
        };
    }
    if path == crate::e2b::API_BASE || path.starts_with(&format!("{}/", crate::e2b::API_BASE)) {
        return Way::Control;
    }
    if let Some(rest) = path.strip_prefix(&format!("{}/", crate::e2b::volumes::CONTENT_BASE)) {
        let id = decoded(rest.split('/').next().unwrap_or_default());
        return Way::Volume { id };
    }
    if path == "/files" || path.starts_with(&format!("{}/", crate::e2b::templates::UPLOAD_BASE)) {
        return Way::Signed;
    }
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if read && (path == crate::ui::BASE || path.starts_with(&format!("{}/", crate::ui::BASE))) {
        return Way::Page;
    }
    let mut parts = path.trim_matches('/').split('/');
    if parts.next() == Some("sandboxes") {
        if let Some(id) = parts.next().filter(|s| !s.is_empty()) {
            let deeper = parts.next().is_some();
            return Way::Native {
                // As the handlers see it: they take the decoded segment.
                id: decoded(id),
                drives: deeper || req.method() != Method::GET,
            };
        }
    }
    Way::Server
}

/// The WebSocket subprotocol prefix a browser offers its key under (a browser cannot set
/// headers on an upgrade): `bearer.<base64url of the key>`, beside [`WS_PROTOCOL`].
pub const WS_KEY_PREFIX: &str = "bearer.";

/// The subprotocol the server picks when a client offers its key as one.
pub const WS_PROTOCOL: &str = "colima-e2b";

/// The credential a request presents: `Authorization: Bearer`, else `X-API-KEY`, else
/// (on a WebSocket upgrade) a `bearer.` subprotocol.
fn presented_key(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if let Some(k) = bearer.or_else(|| headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok())) {
        return Some(Cow::Borrowed(k));
    }
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    use base64::Engine;
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix(WS_KEY_PREFIX))
        .find_map(|b64| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64)
                .ok()
        })
        // A key that is not text is as wrong as any other: it is checked, and counted.
        .map(|bytes| Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The host name of a Host value (`name[:port]`, `[v6][:port]`), lowercased.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn matches_name(pattern: &str, name: &str) -> bool {
    let pattern = host_name(pattern);
    match pattern.strip_prefix("*.") {
        Some(base) => name.ends_with(&format!(".{base}")),
        None => pattern == name,
    }
}

impl Perimeter {
    /// Whether the server answers for Host `name` (DNS rebinding guard).
    fn answers_for(&self, name: &str, domain: Option<&str>) -> bool {
        if name.parse::<IpAddr>().is_ok() || is_loopback_name(name) {
            return true;
        }
        if let Some(domain) = domain.map(host_name).filter(|d| !d.is_empty()) {
            if name == domain || name.ends_with(&format!(".{domain}")) {
                return true;
            }
        }
        self.settings.hosts.iter().any(|h| matches_name(h, name))
    }

    /// Whether a browser's `Origin` may call. Allowed: the same origin as the Host, a
    /// configured origin, and this server's own pages (its names on its port). A page a
    /// sandbox serves (`<port>-<id>.<domain>`) reaches only its own sandbox, never the API
    /// or another sandbox: its code is nobody's to trust.
    fn origin_allowed(
        &self,
        origin: &str,
        host: Option<&str>,
        domain: Option<&str>,
        target_sandbox: Option<&str>,
    ) -> bool {
        let authority = origin
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(origin)
            .trim_end_matches('/');
        if host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
            return true;
        }
        if self.settings.cors_origins.iter().any(|o| {
            o.trim_end_matches('/')
                .eq_ignore_ascii_case(origin.trim_end_matches('/'))
        }) {
            return true;
        }
        if let Some(page) = target_from_host(authority) {
            return target_sandbox == Some(page.sandbox.as_str());
        }
        let port = |a: &str| a.rsplit_once(':').map(|(_, p)| p.to_string());
        let same_port = host.is_some_and(|h| port(h) == port(authority));
        same_port && self.answers_for(&host_name(authority), domain)
    }
}

/// A refusal, in the shape of the way it came in.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn limited(wait: Duration) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!(
                "too many failed authentications from this address; try again in {} s",
                wait.as_secs().max(1)
            ),
            retry_after: Some(wait),
        }
    }

    fn response(self, e2b: bool) -> Response {
        metrics::counter!("colima_e2b_auth_refusals_total", "reason" => self.code).increment(1);
        let body = if e2b {
            serde_json::json!({"code": self.status.as_u16(), "message": self.message})
        } else {
            serde_json::json!({"code": self.code, "message": self.message})
        };
        let mut resp = Response::builder()
            .status(self.status)
            .content_type("application/json")
            .body(body.to_string());
        if let Some(wait) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

fn unauthenticated(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

const NO_KEY: &str = "an API key is required: send `Authorization: Bearer <key>` or \
                      `X-API-KEY: <key>` (`colima-e2b env` prints it)";

/// Middleware: the perimeter around the whole application.
pub async fn guard<E: Endpoint>(next: Arc<E>, mut req: Request) -> poem::Result<Response> {
    let Some(state) = req.data::<AppState>().cloned() else {
        return Ok(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the perimeter has no state",
        )
        .response(false));
    };
    let perimeter = state.perimeter.clone();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let way = way(&req, host.as_deref());
    let e2b = matches!(way, Way::Control | Way::Sandbox { e2b: true, .. });
    let domain = state.e2b.as_ref().map(|e| e.settings.domain.clone());
    if let Some(host) = &host {
        let name = host_name(host);
        if !perimeter.answers_for(&name, domain.as_deref()) {
            return Ok(Refusal::new(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                format!(
                    "this server does not answer for the host name {name:?} (add it to \
                     auth.hosts if it should)"
                ),
            )
            .response(e2b));
        }
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let target_sandbox = match &way {
        Way::Sandbox { id, .. } => Some(id.as_str()),
        _ => None,
    };
    let cross_origin = match &origin {
        Some(o)
            if !perimeter.origin_allowed(o, host.as_deref(), domain.as_deref(), target_sandbox) =>
        {
            return Ok(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!(
                    "requests from the web origin {o:?} are refused (add it to \
                     auth.cors_origins to allow it)"
                ),
            )
            .response(e2b));
        }
        Some(o) if !host.as_deref().is_some_and(|h| o.ends_with(h)) => Some(o.clone()),
        _ => None,
    };
    if let (Some(origin), true) = (&cross_origin, req.method() == Method::OPTIONS) {
        return Ok(preflight(origin));
    }
    let caller = match decide(&perimeter, &state.manager, &req, host.as_deref(), &way).await {
        Ok(caller) => caller,
        Err(refusal) => return Ok(refusal.response(e2b)),
    };
    req.extensions_mut().insert(caller);
    let mut resp = next.call(req).await.map(IntoResponse::into_response)?;
    if let Some(origin) = cross_origin {
        allow_origin(resp.headers_mut(), &origin);
    }
    Ok(resp)
}

fn allow_origin(headers: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: &str) -> Response {
    let mut resp = Response::builder().status(StatusCode::NO_CONTENT).finish();
    let h = resp.headers_mut();
    allow_origin(h, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, x-api-key, x-access-token"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    resp
}

/// Decides who the request comes from, or refuses it.
async fn decide(
    perimeter: &Perimeter,
    manager: &SandboxManager,
    req: &Request,
    host: Option<&str>,
    way: &Way,
) -> Result<Caller, Refusal> {
    let settings = perimeter.settings();
    if settings.mode == AuthMode::Off {
        return Ok(Caller::Open);
    }
    let peer = req.remote_addr().as_socket_addr().map(|a| a.ip());
    // Peers without an address (not seen on TCP) share one allowance.
    let limited_as = Some(peer.unwrap_or(IpAddr::from([0, 0, 0, 0])));
    let local = settings.mode == AuthMode::Auto
        && settings.trust_loopback
        && peer.is_some_and(|ip| ip.is_loopback())
        && host.map(host_name).is_some_and(|h| is_loopback_name(&h));
    let presented = presented_key(req.headers());
    let key = presented.as_deref();
    if let Way::Volume { id } = way {
        return volume_caller(perimeter, manager, id, key, limited_as);
    }
    let token = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty());
    if key.is_some() || token.is_some() {
        if let Some(wait) = perimeter.blocked_for(limited_as) {
            return Err(Refusal::limited(wait));
        }
    }
    // A wrong credential counts whatever else the request has.
    let wrong = |what: &str| -> Refusal {
        match perimeter.failed(limited_as) {
            Some(wait) => Refusal::limited(wait),
            None => unauthenticated(format!("{what} is not valid")),
        }
    };
    let by_key = match key {
        Some(k) => match perimeter.key_name(k) {
            Some(name) => Some(Caller::Key(name)),
            None => return Err(wrong("the API key")),
        },
        None => None,
    };
    // A key owns everything.
    if let Some(caller) = by_key {
        return Ok(caller);
    }
    let sandbox_of = |id: &str| {
        id.parse::<SandboxId>()
            .ok()
            .and_then(|id| manager.info(&id).ok())
    };
    match way {
        Way::Control => Err(unauthenticated(NO_KEY)),
        Way::Signed | Way::Volume { .. } => Ok(Caller::Signed),
        Way::Page => Ok(Caller::Anyone),
        Way::Server if local => Ok(Caller::Local),
        Way::Server => Err(unauthenticated(NO_KEY)),
        Way::Sandbox { id, port, .. } => {
            let info = sandbox_of(id);
            if let (Some(token), Some(info)) = (token, &info) {
                return token_caller(manager, &info.id, token, wrong).await;
            }
            if token.is_some() && info.is_none() {
                // An unknown sandbox: the proxy answers E2B's "not found".
                return Ok(Caller::Signed);
            }
            if !local {
                return Err(unauthenticated(NO_KEY));
            }
            let secure = info.as_ref().is_some_and(|i| i.secure);
            if secure && *port == AGENT_PORT {
                return Err(unauthenticated(format!(
                    "sandbox {id} was created secure: send its access token ({TOKEN_HEADER}) \
                     or an API key"
                )));
            }
            Ok(Caller::Local)
        }
        Way::Native { id, drives } => {
            let info = sandbox_of(id);
            if let (Some(token), Some(info)) = (token, &info) {
                return token_caller(manager, &info.id, token, wrong).await;
            }
            if !local {
                return Err(unauthenticated(NO_KEY));
            }
            if *drives && info.as_ref().is_some_and(|i| i.secure) {
                return Err(unauthenticated(format!(
                    "sandbox {id} was created secure: send an API key or its access token \
                     ({TOKEN_HEADER})"
                )));
            }
            Ok(Caller::Local)
        }
    }
}

/// A caller of volume `id`'s content (the decoded path segment, an id, never a name):
/// its bearer token (or an API key, which owns everything). A volume with no such id
/// passes: its handler, looking it up by the same id, answers 404.
fn volume_caller(
    perimeter: &Perimeter,
    manager: &SandboxManager,
    id: &str,
    bearer: Option<&str>,
    limited_as: Option<IpAddr>,
) -> Result<Caller, Refusal> {
    if let Some(wait) = perimeter.blocked_for(limited_as) {
        return Err(Refusal::limited(wait));
    }
    let Some(bearer) = bearer else {
        return Err(unauthenticated(
            "the volume content API needs the volume's token (Authorization: Bearer)",
        ));
    };
    if let Some(name) = perimeter.key_name(bearer) {
        return Ok(Caller::Key(name));
    }
    if manager.volume_by_id(id).is_err() {
        return Ok(Caller::Signed);
    }
    if manager.volume_token_matches(id, bearer) {
        return Ok(Caller::Signed);
    }
    Err(match perimeter.failed(limited_as) {
        Some(wait) => Refusal::limited(wait),
        None => unauthenticated("the volume token is not valid"),
    })
}

/// A caller presenting sandbox `id`'s access token, if it is the right one.
async fn token_caller(
    manager: &SandboxManager,
    id: &SandboxId,
    token: &str,
    wrong: impl FnOnce(&str) -> Refusal,
) -> Result<Caller, Refusal> {
    match manager.access_token(id).await {
        Ok(expected) if ct_eq(expected.as_bytes(), token.as_bytes()) => {
            Ok(Caller::Token(id.clone()))
        }
        Ok(_) => Err(wrong("the access token")),
        Err(e) => Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            format!("the access token of sandbox {id} cannot be checked: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_offers_its_key_as_a_subprotocol_on_upgrades_only() {
        use base64::Engine;
        let offered = format!(
            "{WS_PROTOCOL}, {WS_KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("e2b_k/e+y")
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            offered.parse().expect("value"),
        );
        assert_eq!(presented_key(&h), None, "not an upgrade");
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(presented_key(&h).as_deref(), Some("e2b_k/e+y"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer other"),
        );
        assert_eq!(
            presented_key(&h).as_deref(),
            Some("other"),
            "the header wins"
        );
        let mut bare = HeaderMap::new();
        bare.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        bare.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(WS_PROTOCOL),
        );
        assert_eq!(presented_key(&bare), None);
    }

    #[test]
    fn only_reading_the_dashboards_files_is_public() {
        let way_of = |method: Method, path: &str| {
            let req = Request::builder()
                .method(method)
                .uri(path.parse().expect("uri"))
                .finish();
            way(&req, Some("127.0.0.1:8000"))
        };
        for page in ["/ui", "/ui/app.js", "/ui/xterm.css"] {
            assert!(matches!(way_of(Method::GET, page), Way::Page), "{page}");
        }
        assert!(matches!(way_of(Method::POST, "/ui"), Way::Server));
        assert!(matches!(way_of(Method::GET, "/uix"), Way::Server));
        assert!(matches!(way_of(Method::GET, "/sandboxes"), Way::Server));
    }

    #[test]
    fn host_names_lose_ports_and_brackets() {
        assert_eq!(host_name("LocalHost:8000"), "localhost");
        assert_eq!(host_name("[::1]:8000"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(
            host_name("3000-clmabc.localhost:8000"),
            "3000-clmabc.localhost"
        );
        assert_eq!(host_name("example.com."), "example.com");
    }

    #[test]
    fn the_server_answers_for_its_names_only() {
        let p = Perimeter::new(AuthSettings {
            hosts: vec!["sandbox.example.com".into(), "*.dev.example.com".into()],
            ..AuthSettings::default()
        });
        for ok in [
            "localhost",
            "3000-clmabc.localhost",
            "127.0.0.1",
            "::1",
            "10.0.0.5",
            "sandbox.example.com",
            "a.dev.example.com",
            "e2b.internal",
            "8080-clmx.e2b.internal",
        ] {
            assert!(p.answers_for(ok, Some("e2b.internal:8000")), "{ok}");
        }
        for bad in [
            "attacker.example",
            "dev.example.com",
            "localhost.attacker.example",
        ] {
            assert!(!p.answers_for(bad, Some("e2b.internal:8000")), "{bad}");
        }
    }

    #[test]
    fn origins_must_be_the_same_configured_or_the_servers_own_pages() {
        let p = Perimeter::new(AuthSettings {
            cors_origins: vec!["https://app.example.com".into()],
            ..AuthSettings::default()
        });
        let d = Some("localhost:8000");
        let api = |o: &str| p.origin_allowed(o, Some("localhost:8000"), d, None);
        assert!(api("http://localhost:8000"));
        assert!(
            api("http://127.0.0.1:8000"),
            "the server's own page under another name"
        );
        assert!(api("https://app.example.com/"));
        assert!(!api("http://evil.example"));
        assert!(!api("http://localhost:9999"), "another local service");
        assert!(
            !api("http://3000-clmabc.localhost:8000"),
            "a sandbox's page calling the API"
        );
        let route = |o: &str, id: &str| {
            p.origin_allowed(o, Some("8080-clmabc.localhost:8000"), d, Some(id))
        };
        assert!(
            route("http://127.0.0.1:8000", "clmabc"),
            "the server's page calling a sandbox"
        );
        assert!(
            route("http://3000-clmabc.localhost:8000", "clmabc"),
            "a sandbox calling itself"
        );
        assert!(
            !route("http://3000-clmother.localhost:8000", "clmabc"),
            "another sandbox"
        );
    }

    #[test]
    fn keys_are_found_by_name_and_wrong_ones_are_limited_after_the_burst() {
        let p = Perimeter::new(AuthSettings {
            keys: vec![("ci".into(), "k1".into()), ("laptop".into(), "k2".into())],
            failure_burst: 3,
            failure_period: Duration::from_secs(60),
            ..AuthSettings::default()
        });
        assert_eq!(p.key_name("k2").as_deref(), Some("laptop"));
        assert_eq!(p.key_name("k3"), None);
        let peer = Some(IpAddr::from([10, 0, 0, 9]));
        let limited: Vec<bool> = (0..5).map(|_| p.failed(peer).is_some()).collect();
        assert_eq!(limited, [false, false, false, true, true]);
        assert!(p.blocked_for(peer).is_some());
        assert!(p.blocked_for(Some(IpAddr::from([10, 0, 0, 10]))).is_none());
    }
}
