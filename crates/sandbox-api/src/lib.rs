//! The HTTP API of colima-e2b, on poem and poem-openapi.
//!
//! - Native REST API (the seed's): `/sandboxes/...`, `/health`.
//! - Docs: Swagger UI at `/docs`, ReDoc at `/redoc`, the spec at `/openapi.json` and
//!   `/openapi.yaml`.
//! - Prometheus metrics at `/metrics`.
//!
//! Handlers parse and map; every decision is [`sandbox_core::SandboxManager`]'s.

pub mod abort;
pub mod auth;
pub mod code;
pub mod commands;
pub mod e2b;
pub mod error;
pub mod files;
pub mod health;
pub mod logs;
pub mod metrics;
pub mod sandboxes;
pub mod snapshots;
pub mod templates;
pub mod terminal;
pub mod text;
pub mod ui;
pub mod volumes;

use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;

use futures_util::StreamExt;

use poem::http::StatusCode;
use poem::middleware::{NormalizePath, TrailingSlash};
use poem::{Body, Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route};
use poem_openapi::OpenApiService;
use sandbox_core::SandboxManager;

/// Version of the API (and the server release) reported by the spec and `/health`.
pub const VERSION: &str = "0.1.0";

/// Largest JSON request body the API accepts, in bytes.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The sandbox manager.
    pub manager: SandboxManager,
    /// Renders the Prometheus registry.
    pub metrics: PrometheusHandle,
    /// The E2B compatibility layer (`/e2b`, `/e2b/envd`, sandbox host names); `None`
    /// turns it off.
    pub e2b: Option<e2b::E2b>,
    /// The perimeter every request passes first.
    pub perimeter: Arc<auth::Perimeter>,
    /// Limits of the HTTP layer.
    pub limits: ApiLimits,
    /// What `/health` reports beyond the engine's own checks.
    pub health: HealthFacts,
    /// Client connections a handler can abort (the listener registers them).
    pub aborts: abort::Aborts,
}

/// Facts `/health` reports that the binary found at startup.
#[derive(Clone, Debug, Default)]
pub struct HealthFacts {
    /// Checks of the binary's own (auth and exposure, the agent build, the key file).
    pub checks: Arc<Vec<sandbox_core::manager::diagnosis::Check>>,
    /// Whether the server runs without disk quotas on purpose.
    pub allow_unlimited_disk: bool,
}

/// Limits of the HTTP layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// A WebSocket client that takes no message for this long is dropped.
    pub stall_timeout: std::time::Duration,
    /// Largest raw upload (`PUT .../files/raw`), bytes.
    pub max_upload: u64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            stall_timeout: std::time::Duration::from_secs(30),
            max_upload: 1 << 30,
        }
    }
}

type Apis = (
    health::HealthApi,
    sandboxes::SandboxApi,
    files::FileApi,
    commands::CommandApi,
    code::CodeApi,
    templates::TemplateApi,
    logs::LogApi,
    snapshots::SnapshotApi,
    volumes::VolumeApi,
);

fn service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            health::HealthApi,
            sandboxes::SandboxApi,
            files::FileApi,
            commands::CommandApi,
            code::CodeApi,
            templates::TemplateApi,
            logs::LogApi,
            snapshots::SnapshotApi,
            volumes::VolumeApi,
        ),
        "colima-e2b",
        VERSION,
    )
    .summary("Self-hosted E2B-compatible code sandboxes on Docker and Podman")
    .description(
        "Create sandboxes from templates, run commands, read and write files, and expire \
         them after a timeout. Every error is a JSON body `{code, message}`.\n\n\
         Command output streams over the WebSocket \
         `/sandboxes/{sandbox_id}/commands/stream/{pid}` as JSON text messages: \
         `{\"type\":\"stdout\",\"data\":\"...\"}`, `{\"type\":\"stderr\",\"data\":\"...\"}`, \
         then `{\"type\":\"exit\",\"code\":0}`; `{\"type\":\"error\",\"message\":\"...\"}` \
         when following fails. Output is pushed as it is produced; a client that joins \
         after the command ended still gets its buffered output and exit.\n\n\
         Code runs (sandboxes of the `code-interpreter-v1` template) stream over the \
         WebSocket `/sandboxes/{sandbox_id}/code/stream`: send one JSON text message \
         `{\"code\":\"...\",\"language\":null,\"context_id\":null,\"envs\":null,\"timeout\":null}`; \
         the server sends E2B's code-interpreter events as they happen (`stdout`, \
         `stderr`, `result`, `error`, `number_of_executions`), then `end_of_execution`, \
         or `{\"type\":\"stream_error\",\"message\":\"...\"}`; closing the socket \
         interrupts the run.",
    )
    .license(poem_openapi::LicenseObject::new("MIT"))
}

/// The OpenAPI document as YAML, exactly as the server serves it at `/openapi.yaml`.
///
/// Building it needs no engine or configuration.
pub fn spec_yaml() -> String {
    service().spec_yaml()
}

/// The OpenAPI document as JSON, as served at `/openapi.json`.
pub fn spec_json() -> String {
    service().spec()
}

/// The whole HTTP application.
pub fn app(state: AppState) -> impl Endpoint<Output = Response> {
    let metrics = state.metrics.clone();
    let api = service();
    let docs = api.swagger_ui();
    let redoc = api.redoc();
    let json = api.spec_endpoint();
    let yaml = api.spec_endpoint_yaml();
    Route::new()
        .nest("/", api)
        .at(
            "/sandboxes/:sandbox_id/commands/stream/:pid",
            poem::get(commands::stream),
        )
        .at(
            "/sandboxes/:sandbox_id/code/stream",
            poem::get(code::stream),
        )
        .at(
            "/sandboxes/:sandbox_id/terminal",
            poem::get(terminal::terminal),
        )
        .at(ui::BASE, poem::get(ui::index))
        .at(format!("{}/:file", ui::BASE), poem::get(ui::file))
        .nest("/docs", docs)
        .nest("/redoc", redoc)
        .at("/openapi.json", json)
        .at("/openapi.yaml", yaml)
        .nest(e2b::API_BASE, e2b_routes())
        .at(
            format!("{}/:id/:hash", e2b::templates::UPLOAD_BASE),
            poem::put(e2b::templates::upload),
        )
        .at(
            format!("{}/:id/:op", e2b::volumes::CONTENT_BASE),
            poem::get(e2b::volumes::content)
                .put(e2b::volumes::content)
                .post(e2b::volumes::content)
                .patch(e2b::volumes::content)
                .delete(e2b::volumes::content)
                .around(e2b::control::require_enabled),
        )
        .at(
            "/files",
            poem::endpoint::make(|req| async move {
                Ok::<_, poem::Error>(e2b::proxy::signed_files(req).await)
            }),
        )
        .at(
            "/metrics",
            poem::endpoint::make(move |req: poem::Request| {
                let metrics = metrics.clone();
                async move {
                    // An idle server calls its engine for nothing: each scrape asks.
                    if let Some(state) = req.data::<AppState>() {
                        metrics::probe_engine(state).await;
                    }
                    Response::builder()
                        .content_type("text/plain; version=0.0.4")
                        .body(metrics.render())
                }
            }),
        )
        .around(limit_body)
        .data(state.clone())
        .around(metrics::track)
        // The seed's paths end in `/` (`/sandboxes/`); poem-openapi routes them without.
        .with(NormalizePath::new(TrailingSlash::Trim))
        .catch_all_error(error::any_error_to_json)
        .around(e2b::proxy::route_by_host)
        .around(auth::guard)
        .data(state)
        .into_endpoint()
        .map_to_response()
}

/// The E2B control plane (API key required) and data plane, relative to `/e2b`.
fn e2b_routes() -> impl Endpoint<Output = Response> {
    use e2b::{control, templates};
    use poem::{get, post};
    let control = Route::new()
        .at("/sandboxes", post(control::create).get(control::list_v1))
        .at(
            "/v2/sandboxes",
            post(control::create_v2).get(control::list_v2),
        )
        .at("/v2/sandboxes/:id/connect", post(control::connect))
        .at("/sandboxes/:id", get(control::get).delete(control::kill))
        .at("/sandboxes/:id/timeout", post(control::set_timeout))
        .at("/sandboxes/:id/refreshes", post(control::refresh))
        .at("/sandboxes/:id/connect", post(control::connect))
        .at("/sandboxes/:id/pause", post(control::pause))
        .at("/sandboxes/:id/network", poem::put(e2b::network::update))
        .at("/sandboxes/:id/resume", post(control::resume))
        .at("/sandboxes/:id/snapshots", post(e2b::snapshots::create))
        .at("/sandboxes/:id/fork", post(e2b::snapshots::fork))
        .at("/snapshots", get(e2b::snapshots::list))
        .at(
            "/volumes",
            post(e2b::volumes::create).get(e2b::volumes::list),
        )
        .at(
            "/volumes/:id",
            get(e2b::volumes::get).delete(e2b::volumes::delete),
        )
        .at("/sandboxes/:id/metrics", get(control::metrics))
        .at("/sandboxes/metrics", get(control::metrics_batch))
        .at("/sandboxes/:id/logs", get(control::logs_v1))
        .at("/v2/sandboxes/:id/logs", get(control::logs_v2))
        .at("/v3/templates", post(templates::request_v3))
        .at("/v2/templates", get(templates::list))
        .at("/templates", get(templates::list))
        .at("/templates/aliases/:alias", get(templates::alias))
        .at(
            "/templates/tags",
            post(templates::assign_tags).delete(templates::delete_tags),
        )
        .at(
            "/templates/:id",
            get(templates::get).delete(templates::delete),
        )
        .at("/templates/:id/tags", get(templates::list_tags))
        .at("/templates/:id/files/:hash", get(templates::file_link))
        .at("/v2/templates/:id/builds/:build", post(templates::trigger))
        .at(
            "/templates/:id/builds/:build/status",
            get(templates::status),
        )
        .around(control::require_enabled);
    Route::new()
        .nest(
            "/envd",
            poem::endpoint::make(
                |req| async move { Ok::<_, poem::Error>(e2b::proxy::envd(req).await) },
            ),
        )
        .nest("/", control)
        .map_to_response()
}

/// Bytes of an oversized body read and discarded before answering 413, so that ordinary
/// clients see the answer instead of a reset connection. Larger bodies are cut off.
/// A time as RFC 3339, the form every API answer uses.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Refuses request bodies over [`MAX_JSON_BODY`] with 413, whether they come with a
/// Content-Length or chunked (a chunked body is read up to the cap, never beyond).
async fn limit_body<E: Endpoint>(next: Arc<E>, mut req: Request) -> poem::Result<Response> {
    let too_large =
        || poem::Error::from_string("request body too large", StatusCode::PAYLOAD_TOO_LARGE);
    // Raw uploads stream to the sandbox under their own cap; a body without a type is
    // taken as the bytes it is.
    // The E2B data plane streams to the sandbox's agent, which enforces its own limits.
    // Template files and contexts stream to disk under the template registry's cap.
    let path = req.uri().path().to_string();
    let native_build = req.method() == poem::http::Method::POST
        && path.starts_with("/templates/")
        && path.ends_with("/builds");
    if native_build {
        // The native build takes any archive type as the bytes it is.
        req.headers_mut().insert(
            poem::http::header::CONTENT_TYPE,
            poem::http::HeaderValue::from_static("application/octet-stream"),
        );
    }
    if path.starts_with(e2b::ENVD_BASE)
        || path.starts_with(&format!("{}/", e2b::volumes::CONTENT_BASE))
        || path == "/files"
        || path.starts_with(&format!("{}/", e2b::templates::UPLOAD_BASE))
        || native_build
    {
        return next.call(req).await.map(IntoResponse::into_response);
    }
    if req.method() == poem::http::Method::PUT && req.uri().path().ends_with("/files/raw") {
        if !req.headers().contains_key(poem::http::header::CONTENT_TYPE) {
            req.headers_mut().insert(
                poem::http::header::CONTENT_TYPE,
                poem::http::HeaderValue::from_static("application/octet-stream"),
            );
        }
        return next.call(req).await.map(IntoResponse::into_response);
    }
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_JSON_BODY as u64 => {
            drain(req.take_body()).await;
            return Err(too_large());
        }
        Some(_) => {}
        None => {
            let mut stream = Box::pin(req.take_body().into_bytes_stream());
            let mut buf = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    poem::Error::from_string(e.to_string(), StatusCode::BAD_REQUEST)
                })?;
                if buf.len() + chunk.len() > MAX_JSON_BODY {
                    drain(Body::from_bytes_stream(stream)).await;
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            req.set_body(Body::from_vec(buf));
        }
    }
    next.call(req).await.map(IntoResponse::into_response)
}

/// Reads and discards up to [`DRAIN_LIMIT`] bytes of `body` (for at most 10 s).
pub(crate) async fn drain(body: Body) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain_all(body)).await;
}

async fn drain_all(body: Body) {
    let mut stream = Box::pin(body.into_bytes_stream());
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > DRAIN_LIMIT {
            break;
        }
    }
}
