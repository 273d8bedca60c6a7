//! E2B's template API (what the SDKs' `Template.build` and friends call): request a
//! build, upload COPY files through a signed link, start the build with its steps, poll
//! its status and logs, names, tags, list, get and delete.
//!
//! Handlers parse E2B's shapes and map answers; the manager decides (see
//! `sandbox_core::manager` and `sandbox_core::template`).

use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use poem::http::StatusCode;
use poem::web::{Data, Path, Query};
use poem::{Body, Request, Response};
use sandbox_core::template::registry::{BuildRecord, BuildStatus, TemplateRecord, LOG_PAGE};
use sandbox_core::template::steps::{is_files_hash, StepsTemplate};
use sandbox_core::Error;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use time::OffsetDateTime;

use super::control::{answer, json_response, no_content, parse_body, reject};
use crate::{rfc3339, AppState};

/// Where signed file uploads go (outside `/e2b`: the SDK sends no key with them).
pub const UPLOAD_BASE: &str = "/template-files";
/// How long an upload link is valid.
const UPLOAD_LINK_TTL: Duration = Duration::from_secs(3600);
/// What every template reports as its envd version.
const ENVD_VERSION: &str = envd_proto::ENVD_VERSION;

fn status_of(b: &BuildRecord) -> &'static str {
    b.status.as_str()
}

fn build_json(t: &TemplateRecord, b: &BuildRecord) -> Value {
    json!({
        "buildID": b.id,
        "status": status_of(b),
        "createdAt": rfc3339(b.created_at),
        "updatedAt": rfc3339(b.finished_at.unwrap_or(b.created_at)),
        "finishedAt": b.finished_at.map(rfc3339),
        "cpuCount": t.cpu_count.unwrap_or(2),
        "memoryMB": t.memory_mb.unwrap_or(512),
        "envdVersion": ENVD_VERSION,
    })
}

/// E2B's `Template` (list entries); `builds` added for `GET /templates/{id}`.
fn template_json(t: &TemplateRecord, with_builds: bool) -> Value {
    let current = t.current().or_else(|| t.builds.last());
    let updated = t
        .builds
        .iter()
        .filter_map(|b| b.finished_at)
        .max()
        .unwrap_or(t.created_at);
    let mut v = json!({
        "templateID": t.id,
        "buildID": current.map(|b| b.id.clone()).unwrap_or_default(),
        "cpuCount": t.cpu_count.unwrap_or(2),
        "memoryMB": t.memory_mb.unwrap_or(512),
        "diskSizeMB": 0,
        "public": false,
        "aliases": [t.name],
        "names": [t.name],
        "createdAt": rfc3339(t.created_at),
        "updatedAt": rfc3339(updated),
        "createdBy": null,
        "lastSpawnedAt": null,
        "spawnCount": 0,
        "buildCount": t.builds.len(),
        "envdVersion": ENVD_VERSION,
        "buildStatus": current.map(status_of).unwrap_or("waiting"),
    });
    if with_builds {
        v["builds"] = t.builds.iter().map(|b| build_json(t, b)).collect();
    }
    v
}

/// Body of `POST /v3/templates`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BuildRequestV3 {
    name: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    cpu_count: Option<u32>,
    #[serde(rename = "memoryMB")]
    memory_mb: Option<u64>,
}

/// `POST /v3/templates`: a new build of the named template (created when missing).
#[poem::handler]
pub async fn request_v3(Data(state): Data<&AppState>, body: Body) -> Response {
    answer(
        async {
            let req: BuildRequestV3 = parse_body(body).await?;
            let name = req
                .name
                .or(req.alias)
                .ok_or_else(|| reject(StatusCode::BAD_REQUEST, "name is required"))?;
            let (t, b) = state
                .manager
                .request_build(&name, req.tags, req.cpu_count, req.memory_mb)
                .map_err(bad_request)?;
            Ok(json_response(
                StatusCode::ACCEPTED,
                json!({
                    "templateID": t.id,
                    "buildID": b.id,
                    "public": false,
                    "names": [t.name],
                    "tags": b.tags,
                    "aliases": [t.name],
                }),
            ))
        }
        .await,
    )
}

/// E2B answers invalid template requests with 400.
fn bad_request(e: Error) -> super::control::Reject {
    match e {
        Error::InvalidArgument(m) => reject(StatusCode::BAD_REQUEST, m),
        e => e.into(),
    }
}

fn find(state: &AppState, id: &str) -> Result<TemplateRecord, super::control::Reject> {
    state
        .manager
        .templates()
        .find(id)
        .ok_or_else(|| reject(StatusCode::NOT_FOUND, format!("template {id} not found")))
}

/// `GET /templates/aliases/{alias}`: 200 when a template has this name, else 404
/// (`Template.exists`).
#[poem::handler]
pub async fn alias(Data(state): Data<&AppState>, Path(alias): Path<String>) -> Response {
    answer(
        async {
            let t = find(state, &alias)?;
            Ok(json_response(
                StatusCode::OK,
                json!({"templateID": t.id, "public": false}),
            ))
        }
        .await,
    )
}

/// `GET /templates` and `GET /v2/templates`: every built template.
#[poem::handler]
pub async fn list(Data(state): Data<&AppState>) -> Response {
    let all: Vec<Value> = state
        .manager
        .templates()
        .list()
        .iter()
        .map(|t| template_json(t, false))
        .collect();
    json_response(StatusCode::OK, Value::Array(all))
}

/// `GET /templates/{id}`: one template with its builds.
#[poem::handler]
pub async fn get(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(
        async {
            let t = find(state, &id)?;
            Ok(json_response(StatusCode::OK, template_json(&t, true)))
        }
        .await,
    )
}

/// `DELETE /templates/{id}`: the template, its builds and images.
#[poem::handler]
pub async fn delete(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(
        async {
            state.manager.remove_template(&id).await?;
            Ok(no_content())
        }
        .await,
    )
}

/// `GET /templates/{id}/tags`.
#[poem::handler]
pub async fn list_tags(Data(state): Data<&AppState>, Path(id): Path<String>) -> Response {
    answer(
        async {
            let t = find(state, &id)?;
            let all: Vec<Value> = t
                .tags
                .iter()
                .map(|(tag, bid)| {
                    let created = t.build(bid).map(|b| b.created_at).unwrap_or(t.created_at);
                    json!({"tag": tag, "buildID": bid, "createdAt": rfc3339(created)})
                })
                .collect();
            Ok(json_response(StatusCode::OK, Value::Array(all)))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct AssignTags {
    target: String,
    tags: Vec<String>,
}

/// `POST /templates/tags`: points tags at the build `target` (`name:tag`) names.
#[poem::handler]
pub async fn assign_tags(Data(state): Data<&AppState>, body: Body) -> Response {
    answer(
        async {
            let req: AssignTags = parse_body(body).await?;
            let (bid, tags) = state
                .manager
                .templates()
                .assign_tags(&req.target, &req.tags)
                .map_err(bad_request)?;
            Ok(json_response(
                StatusCode::CREATED,
                json!({"buildID": bid, "tags": tags}),
            ))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct DeleteTags {
    name: String,
    tags: Vec<String>,
}

/// `DELETE /templates/tags`.
#[poem::handler]
pub async fn delete_tags(Data(state): Data<&AppState>, body: Body) -> Response {
    answer(
        async {
            let req: DeleteTags = parse_body(body).await?;
            state
                .manager
                .templates()
                .remove_tags(&req.name, &req.tags)
                .map_err(bad_request)?;
            Ok(no_content())
        }
        .await,
    )
}

type HmacSha256 = Hmac<Sha256>;

fn upload_signature(key: &[u8], template_id: &str, hash: &str, expires: i64) -> String {
    // A key of any length is accepted by HMAC.
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return String::new();
    };
    mac.update(format!("{template_id}\n{hash}\n{expires}").as_bytes());
    let bytes = mac.finalize().into_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The scheme and host a client reached this server by.
fn origin_of(req: &Request) -> String {
    let headers = req.headers();
    let host = headers
        .get(poem::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|s| *s == "https" || *s == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

/// `GET /templates/{id}/files/{hash}`: whether the files are here, else where to PUT
/// them (a signed link back to this server, valid for an hour).
#[poem::handler]
pub async fn file_link(
    req: &Request,
    Data(state): Data<&AppState>,
    Path((id, hash)): Path<(String, String)>,
) -> Response {
    answer(
        async {
            let t = find(state, &id)?;
            if !is_files_hash(&hash) {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    format!("{hash:?} is not a sha256 files hash"),
                ));
            }
            let hash = hash.to_ascii_lowercase();
            if state.manager.templates().files().has(&hash) {
                return Ok(json_response(StatusCode::CREATED, json!({"present": true})));
            }
            let Some(e2b) = &state.e2b else {
                return Err(reject(StatusCode::NOT_FOUND, "E2B compatibility is off"));
            };
            let expires =
                OffsetDateTime::now_utc().unix_timestamp() + UPLOAD_LINK_TTL.as_secs() as i64;
            let signature = upload_signature(&e2b.upload_key[..], &t.id, &hash, expires);
            let url = format!(
                "{}{UPLOAD_BASE}/{}/{hash}?expires={expires}&signature={signature}",
                origin_of(req),
                t.id
            );
            Ok(json_response(
                StatusCode::CREATED,
                json!({"present": false, "url": url}),
            ))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    expires: i64,
    signature: String,
}

/// `PUT /template-files/{id}/{hash}?expires&signature`: the upload a link allows.
#[poem::handler]
pub async fn upload(
    Data(state): Data<&AppState>,
    Path((id, hash)): Path<(String, String)>,
    query: Result<Query<UploadQuery>, poem::Error>,
    body: Body,
) -> Response {
    answer(
        async {
            let Ok(Query(q)) = query else {
                crate::drain(body).await;
                return Err(reject(
                    StatusCode::FORBIDDEN,
                    "the upload link needs its expires and signature",
                ));
            };
            let Some(e2b) = &state.e2b else {
                crate::drain(body).await;
                return Err(reject(StatusCode::NOT_FOUND, "E2B compatibility is off"));
            };
            let expected = upload_signature(&e2b.upload_key[..], &id, &hash, q.expires);
            let valid = !expected.is_empty()
                && envd_proto::signature::ct_eq(expected.as_bytes(), q.signature.as_bytes());
            if !valid {
                crate::drain(body).await;
                return Err(reject(
                    StatusCode::FORBIDDEN,
                    "the upload link is not valid",
                ));
            }
            if q.expires < OffsetDateTime::now_utc().unix_timestamp() {
                crate::drain(body).await;
                return Err(reject(StatusCode::FORBIDDEN, "the upload link has expired"));
            }
            let templates = state.manager.templates();
            let max = templates.config().max_upload_bytes;
            let stream = body
                .into_bytes_stream()
                .map(|c| c.map_err(std::io::Error::other));
            let size = templates.files().put(&hash, stream, max).await?;
            Ok(json_response(StatusCode::OK, json!({"size": size})))
        }
        .await,
    )
}

/// `POST /v2/templates/{id}/builds/{buildID}`: starts the build with its steps.
#[poem::handler]
pub async fn trigger(
    Data(state): Data<&AppState>,
    Path((id, build_id)): Path<(String, String)>,
    body: Body,
) -> Response {
    answer(
        async {
            let t = find(state, &id)?;
            let steps: StepsTemplate = parse_body(body).await?;
            state
                .manager
                .start_steps_build(&t.id, &build_id, &steps)
                .await
                .map_err(bad_request)?;
            Ok(Response::builder().status(StatusCode::ACCEPTED).finish())
        }
        .await,
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    logs_offset: Option<u64>,
    limit: Option<usize>,
}

/// `GET /templates/{id}/builds/{buildID}/status?logsOffset=N`: the status and up to 100
/// log entries from the offset.
#[poem::handler]
pub async fn status(
    Data(state): Data<&AppState>,
    Path((id, build_id)): Path<(String, String)>,
    Query(q): Query<StatusQuery>,
) -> Response {
    answer(
        async {
            let (t, b) = state
                .manager
                .templates()
                .build(&id, &build_id)
                .map_err(|e| reject(StatusCode::NOT_FOUND, e.to_string()))?;
            let limit = q.limit.unwrap_or(LOG_PAGE).clamp(1, LOG_PAGE);
            let entries = state
                .manager
                .templates()
                .log(&b.id)
                .map(|log| log.read(q.logs_offset.unwrap_or(0), limit).0)
                .unwrap_or_default();
            let logs: Vec<String> = entries.iter().map(|e| e.message.clone()).collect();
            let mut v = json!({
                "templateID": t.id,
                "buildID": b.id,
                "status": status_of(&b),
                "logEntries": entries,
                "logs": logs,
            });
            if let (BuildStatus::Error, Some(reason)) = (b.status, &b.reason) {
                v["reason"] = json!({"message": reason.message, "step": reason.step});
            }
            Ok(json_response(StatusCode::OK, v))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_signatures_bind_template_hash_and_expiry() {
        let key = b"k".repeat(32);
        let a = upload_signature(&key, "t1", "ab", 10);
        assert_eq!(a.len(), 64);
        assert_ne!(a, upload_signature(&key, "t2", "ab", 10));
        assert_ne!(a, upload_signature(&key, "t1", "ac", 10));
        assert_ne!(a, upload_signature(&key, "t1", "ab", 11));
        assert_ne!(a, upload_signature(b"other", "t1", "ab", 10));
    }
}
