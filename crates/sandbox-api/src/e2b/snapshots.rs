//! E2B's snapshots and fork: `POST /sandboxes/{id}/snapshots`, `GET /snapshots`,
//! `POST /sandboxes/{id}/fork` (a snapshot is a template: `DELETE /templates/{id}`
//! removes it). Handlers parse and map; [`sandbox_core::SandboxManager`] decides.

use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Path};
use poem::{Body, Request, Response};
use sandbox_core::manager::MAX_FORKS;
use sandbox_core::template::registry::TemplateRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::control::{
    answer, form_pairs, json_response, parse_body, parse_id, reject, sandbox_json, token_for,
    Answer,
};
use crate::AppState;

/// E2B's fork timeout, seconds, when the request names none.
const DEFAULT_FORK_TIMEOUT_SECS: u64 = 15;

/// `POST /sandboxes/{id}/snapshots` body. Its `memory` is not read: every snapshot
/// here keeps the filesystem only (a container has no memory image), which both of
/// E2B's modes accept.
#[derive(Debug, Default, Deserialize)]
struct SnapshotBody {
    #[serde(default)]
    name: Option<String>,
}

/// E2B's `SnapshotInfo`.
fn snapshot_json(t: &TemplateRecord) -> Value {
    // An unnamed snapshot's name is its id: it has no names of its own.
    let names: Vec<&str> = if t.name == t.id {
        Vec::new()
    } else {
        vec![t.name.as_str()]
    };
    json!({"snapshotID": t.id, "names": names})
}

/// `POST /sandboxes/{id}/snapshots`: 201 `{snapshotID, names}`.
#[poem::handler]
pub async fn create(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(
        async {
            let id = parse_id(&id)?;
            let body: SnapshotBody = parse_body(body).await?;
            let name = body.name.as_deref().filter(|n| !n.is_empty());
            let record = state.manager.snapshot(&id, name).await?;
            Ok(json_response(StatusCode::CREATED, snapshot_json(&record)))
        }
        .await,
    )
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: oldest first, paginated with
/// `X-Next-Token` (the id of the page's last snapshot).
#[poem::handler]
pub async fn list(Data(state): Data<&AppState>, req: &Request) -> Response {
    answer(
        async {
            let mut source = None;
            let mut name = None;
            let mut limit = None;
            let mut after = None;
            for (k, v) in form_pairs(req.uri().query().unwrap_or_default()) {
                match k.as_str() {
                    "sandboxID" | "sandbox_id" => source = Some(v),
                    "name" => name = Some(v),
                    "limit" => {
                        limit = Some(v.parse::<usize>().map_err(|_| {
                            reject(
                                StatusCode::BAD_REQUEST,
                                format!("limit must be a number, not {v:?}"),
                            )
                        })?)
                    }
                    "nextToken" | "next_token" => after = Some(v),
                    _ => {}
                }
            }
            let all = state.manager.snapshots(source.as_deref());
            let named = |t: &TemplateRecord| {
                name.as_deref().is_none_or(|n| {
                    let (n, _) = sandbox_core::template::registry::split_reference(n);
                    t.name == n || t.id == n
                })
            };
            let mut rest: Vec<&TemplateRecord> = all.iter().filter(|t| named(t)).collect();
            if let Some(after) = &after {
                match rest.iter().position(|t| &t.id == after) {
                    Some(i) => rest.drain(..=i),
                    None => rest.drain(..0),
                };
            }
            let limit = limit.unwrap_or(100).max(1);
            let more = rest.len() > limit;
            rest.truncate(limit);
            let body: Vec<Value> = rest.iter().map(|t| snapshot_json(t)).collect();
            let mut resp = json_response(StatusCode::OK, Value::Array(body));
            if more {
                if let Some(v) = rest.last().and_then(|t| t.id.parse().ok()) {
                    resp.headers_mut().insert("x-next-token", v);
                }
            }
            Ok(resp)
        }
        .await,
    )
}

/// `POST /sandboxes/{id}/fork` body.
#[derive(Debug, Default, Deserialize)]
struct ForkBody {
    timeout: Option<i64>,
    count: Option<i64>,
}

/// `POST /sandboxes/{id}/fork`: 201 with one `{sandbox}` or `{error}` per fork.
#[poem::handler]
pub async fn fork(Data(state): Data<&AppState>, Path(id): Path<String>, body: Body) -> Response {
    answer(fork_with(state, &id, body).await)
}

async fn fork_with(state: &AppState, id: &str, body: Body) -> Answer {
    let id = parse_id(id)?;
    let body: ForkBody = parse_body(body).await?;
    let count = body.count.unwrap_or(1);
    if !(1..=MAX_FORKS as i64).contains(&count) {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            format!("count must be between 1 and {MAX_FORKS}, not {count}"),
        ));
    }
    let timeout = match body.timeout {
        None => DEFAULT_FORK_TIMEOUT_SECS,
        Some(t) if t > 0 => t as u64,
        Some(t) => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                format!("timeout must be a positive number of seconds, not {t}"),
            ))
        }
    };
    let results = state
        .manager
        .fork(&id, count as usize, Duration::from_secs(timeout))
        .await?;
    let mut out = Vec::with_capacity(results.len());
    for result in results {
        out.push(match result {
            Ok(info) => {
                let token = token_for(state, &info).await?;
                json!({"sandbox": sandbox_json(state, &info, token.as_deref())})
            }
            Err(e) => {
                let status = super::control::Reject::from(e);
                json!({"error": status.body()})
            }
        });
    }
    Ok(json_response(StatusCode::CREATED, Value::Array(out)))
}
