//! Prometheus metrics: the recorder, the `/metrics` endpoint and HTTP request metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::OperationId;

/// Latency buckets in seconds, from sub-millisecond agent calls to slow creates.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How long a scrape waits for the engine's answer before it counts the engine as down.
const ENGINE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// Records request count and latency, labelled by operation (never the raw path),
/// method and status, so label cardinality stays bounded.
pub async fn track<E: Endpoint>(next: Arc<E>, req: Request) -> poem::Result<Response> {
    let method = req.method().as_str().to_owned();
    let method = match method.as_str() {
        "GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS" => method,
        _ => "other".to_owned(),
    };
    let fixed_route = match req.uri().path() {
        "/metrics" => Some("metrics"),
        "/files" => Some("e2b_signed_files"),
        p if p.starts_with("/e2b/envd/") => Some("e2b_data_plane"),
        p if p.starts_with("/e2b/") => Some("e2b_control_plane"),
        p if p.starts_with("/docs") || p.starts_with("/redoc") || p.starts_with("/openapi") => {
            Some("docs")
        }
        _ => None,
    };
    let sandbox = sandbox_of(&req);
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let result = next.call(req).await.map(IntoResponse::into_response);
    let (status, operation) = match &result {
        Ok(resp) => (
            resp.status().as_u16(),
            resp.data::<OperationId>().map(|o| o.0),
        ),
        Err(e) => (e.status().as_u16(), e.data::<OperationId>().map(|o| o.0)),
    };
    let operation = operation.or(fixed_route).unwrap_or("unmatched");
    metrics::counter!(
        "colima_e2b_http_requests_total",
        "operation" => operation,
        "method" => method.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(
        "colima_e2b_http_request_duration_seconds",
        "operation" => operation,
        "method" => method.clone()
    )
    .record(started.elapsed().as_secs_f64());
    // One line per request: never the query (signatures, file paths), bodies or headers.
    tracing::info!(
        method = %method,
        path = %path,
        operation,
        status,
        ms = started.elapsed().as_millis() as u64,
        sandbox = sandbox.as_deref().unwrap_or("-"),
        "request"
    );
    result
}

/// Sets `colima_e2b_engine_up{backend}`: 1 when the engine answered its latest check,
/// else 0. Each `/metrics` scrape and each `/health` checks, so a scrape of an idle
/// server still sees an engine that went away.
pub fn record_engine_up(backend: &'static str, up: bool) {
    metrics::gauge!("colima_e2b_engine_up", "backend" => backend).set(if up { 1.0 } else { 0.0 });
}

/// Asks the engine whether it answers (bounded, so a hung engine cannot stall the scrape).
pub async fn probe_engine(state: &crate::AppState) {
    let manager = &state.manager;
    let answered = tokio::time::timeout(ENGINE_PROBE_TIMEOUT, manager.engine_info()).await;
    record_engine_up(manager.backend().name(), matches!(answered, Ok(Ok(_))));
}

/// The sandbox a request is about: the data plane's header, a sandbox host name, or
/// the path segment after `sandboxes/`.
fn sandbox_of(req: &Request) -> Option<String> {
    let valid = |s: &str| s.parse::<sandbox_core::SandboxId>().is_ok();
    if let Some(id) = req
        .headers()
        .get(crate::e2b::proxy::SANDBOX_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid(s))
    {
        return Some(id.to_string());
    }
    if let Some(t) = req
        .headers()
        .get(poem::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(crate::e2b::proxy::target_from_host)
    {
        return Some(t.sandbox);
    }
    let mut segments = req.uri().path().split('/');
    while let Some(seg) = segments.next() {
        if seg == "sandboxes" {
            return segments
                .next()
                .filter(|s| valid(s) && *s != "metrics")
                .map(String::from);
        }
    }
    None
}
