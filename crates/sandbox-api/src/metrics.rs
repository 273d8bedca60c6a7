//! Prometheus metrics: the recorder, the `/metrics` endpoint and HTTP request metrics.

use std::sync::Arc;
use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::OperationId;

/// Latency buckets in seconds, from sub-millisecond agent calls to slow creates.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
        "method" => method
    )
    .record(started.elapsed().as_secs_f64());
    result
}
