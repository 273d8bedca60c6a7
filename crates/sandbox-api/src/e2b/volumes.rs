//! E2B's volumes: `POST|GET /volumes`, `GET|DELETE /volumes/{id}` on the control plane
//! (API key), and the content API `/volumecontent/{id}/{path|dir|file}` at the server's
//! root (the SDK's `E2B_VOLUME_API_URL`), authenticated by the volume's own bearer token
//! ([`crate::auth`] checks it). Handlers parse and map; [`sandbox_core::SandboxManager`]
//! decides, and the agent of the volume's keeper container does the filesystem work.

use futures_util::TryStreamExt;
use poem::http::{header, HeaderValue, StatusCode};
use poem::web::{Data, Path};
use poem::{Body, Request, Response};
use sandbox_core::manager::VolumeRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::control::{answer, json_response, no_content, parse_body, reject, Answer};
use crate::AppState;

/// Where the content API lives (relative to `E2B_VOLUME_API_URL`, the server's root).
pub const CONTENT_BASE: &str = "/volumecontent";

/// `POST /volumes` body.
#[derive(Debug, Deserialize)]
struct NewVolume {
    name: String,
}

/// E2B's `Volume`.
fn volume_json(v: &VolumeRecord) -> Value {
    json!({"volumeID": v.id, "name": v.name})
}

/// E2B's `VolumeAndToken`.
fn volume_and_token_json(v: &VolumeRecord) -> Value {
    json!({"volumeID": v.id, "name": v.name, "token": v.token})
}

/// `POST /volumes`: 201 `{volumeID, name, token}`.
#[poem::handler]
pub async fn create(Data(state): Data<&AppState>, body: Body) -> Response {
    answer(
        async {
            let body: NewVolume = parse_body(body).await?;
            let record = state.manager.create_volume(&body.name).await?;
            Ok(json_response(
                StatusCode::CREATED,
                volume_and_token_json(&record),
            ))
        }
        .await,
    )
}

/// `GET /volumes`: every volume, oldest first.
#[poem::handler]
pub async fn list(Data(state): Data<&AppState>) -> Response {
    let all: Vec<Value> = state
        .manager
        .list_volumes()
        .iter()
        .map(volume_json)
        .collect();
    json_response(StatusCode::OK, Value::Array(all))
}

/// `GET /volumes/{id}`: the volume with its token.
#[poem::handler]
pub async fn get(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(
        state
            .manager
            .volume(&id)
            .map(|v| json_response(StatusCode::OK, volume_and_token_json(&v)))
            .map_err(Into::into),
    )
}

/// `DELETE /volumes/{id}`: 204; 409 while a sandbox mounts it.
#[poem::handler]
pub async fn delete(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(
        async {
            let id = state.manager.volume(&id)?.id;
            state.manager.delete_volume(&id).await?;
            Ok(no_content())
        }
        .await,
    )
}

/// Request headers the keeper's agent needs to read a body the way the client sent it.
const PASSED: [header::HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LENGTH,
];

/// `GET|PUT|POST|PATCH|DELETE /volumecontent/{id}/{path|dir|file}?path=…`: forwarded,
/// streaming both ways, to the agent of the volume's keeper.
#[poem::handler]
pub async fn content(
    Data(state): Data<&AppState>,
    Path((id, op)): Path<(String, String)>,
    req: &Request,
    body: Body,
) -> Response {
    answer(content_with(state, &id, &op, req, body).await)
}

async fn content_with(state: &AppState, id: &str, op: &str, req: &Request, body: Body) -> Answer {
    if !matches!(op, "path" | "dir" | "file") {
        return Err(reject(
            StatusCode::NOT_FOUND,
            format!("no volume content operation {op:?} (path, dir or file)"),
        ));
    }
    let Some(e2b) = state.e2b.as_ref() else {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "the E2B compatibility layer is not enabled",
        ));
    };
    // By id only, as the perimeter checked its token ([`crate::auth`]).
    let access = state.manager.volume_access(id).await?;
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("http://{}/volume/{op}{query}", access.addr);
    let mut headers = reqwest::header::HeaderMap::new();
    for name in PASSED {
        if let Some(v) = req.headers().get(&name) {
            headers.insert(name, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&access.token) {
        headers.insert(envd_proto::TOKEN_HEADER, v);
    }
    let upstream = e2b
        .http
        .request(req.method().clone(), url)
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_bytes_stream()))
        .send()
        .await
        .map_err(|e| {
            reject(
                StatusCode::BAD_GATEWAY,
                format!("the content of volume {id} is unreachable: {e}"),
            )
        })?;
    let mut out = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if matches!(
            *name,
            header::CONTENT_TYPE | header::CONTENT_DISPOSITION | header::CONTENT_ENCODING
        ) {
            out = out.header(name.clone(), value.clone());
        }
    }
    // The lease keeps the keeper while the body streams; its end restarts the idle time.
    let (manager, volume, lease) = (state.manager.clone(), id.to_string(), access.lease);
    let done = scopeguard(move || {
        drop(lease);
        manager.volume_used(&volume);
    });
    let stream = upstream.bytes_stream().map_err(move |e| {
        let _ = &done;
        std::io::Error::other(e)
    });
    Ok(out.body(Body::from_bytes_stream(stream)))
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce() + Send + 'static) -> impl Send + Sync + 'static {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    // Sync for the stream's closure: the guard is only touched when dropped.
    let cell = std::sync::Mutex::new(Guard(Some(f)));
    std::sync::Arc::new(cell)
}
