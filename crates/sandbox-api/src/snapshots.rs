//! The native API's snapshots and forks: a sandbox's filesystem captured as a template
//! that sandboxes are created from (`"template": "<snapshot_id>"`), and forks made from
//! one capture. Handlers parse and map; [`sandbox_core::SandboxManager`] decides.

use std::time::Duration;

use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use sandbox_core::template::registry::TemplateRecord;

use crate::error::{parse_id, ApiError, ErrorBody};
use crate::sandboxes::Sandbox;
use crate::{rfc3339, AppState};

#[derive(Tags)]
enum SnapshotTags {
    /// Capture sandboxes' filesystems, start sandboxes from them, fork sandboxes.
    Snapshots,
}

/// A request to snapshot a sandbox.
#[derive(Debug, Default, Object)]
#[oai(example)]
pub struct SnapshotRequest {
    /// Its name: a new capture of an existing snapshot of that name replaces what the
    /// name starts; none makes an unnamed snapshot.
    pub name: Option<String>,
}

/// A snapshot: a template made from a sandbox's filesystem.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Snapshot {
    /// Its id: create sandboxes with `"template": "<snapshot_id>"` (or its name).
    pub snapshot_id: String,
    /// Its names (none for an unnamed snapshot).
    pub names: Vec<String>,
    /// The sandbox it was captured from last.
    pub sandbox_id: Option<String>,
    /// When it was first taken.
    pub created_at: String,
}

impl From<&TemplateRecord> for Snapshot {
    fn from(t: &TemplateRecord) -> Self {
        Snapshot {
            snapshot_id: t.id.clone(),
            names: if t.name == t.id {
                Vec::new()
            } else {
                vec![t.name.clone()]
            },
            sandbox_id: t.snapshot_of.clone(),
            created_at: rfc3339(t.created_at),
        }
    }
}

/// A request to fork a sandbox.
#[derive(Debug, Object)]
#[oai(example)]
pub struct ForkRequest {
    /// How many sandboxes (1 to 100).
    pub count: usize,
    /// Seconds each fork lives; default the server's default timeout.
    pub timeout: Option<u64>,
}

/// One fork's outcome: its sandbox, or why it did not start.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct ForkResult {
    /// The sandbox, when it started.
    pub sandbox: Option<Sandbox>,
    /// Why it did not start.
    pub error: Option<ErrorBody>,
}

/// Confirmation that a snapshot was deleted.
#[derive(Debug, Object)]
#[oai(example)]
pub struct SnapshotDeleted {
    /// The deleted snapshot.
    pub snapshot_id: String,
    /// Always `deleted`.
    pub status: String,
}

const EXAMPLE_SNAPSHOT: &str = "k3x9v0a1b2c3d4e5f6g7";
const EXAMPLE_SANDBOX: &str = "clm3k9x0a1b2c3d4e5f6";

impl poem_openapi::types::Example for SnapshotRequest {
    fn example() -> Self {
        SnapshotRequest {
            name: Some("prepared".into()),
        }
    }
}

impl poem_openapi::types::Example for Snapshot {
    fn example() -> Self {
        Snapshot {
            snapshot_id: EXAMPLE_SNAPSHOT.into(),
            names: vec!["prepared".into()],
            sandbox_id: Some(EXAMPLE_SANDBOX.into()),
            created_at: "2026-12-03T12:00:00Z".into(),
        }
    }
}

impl poem_openapi::types::Example for ForkRequest {
    fn example() -> Self {
        ForkRequest {
            count: 3,
            timeout: Some(600),
        }
    }
}

impl poem_openapi::types::Example for ForkResult {
    fn example() -> Self {
        ForkResult {
            sandbox: None,
            error: Some(ErrorBody::new(
                "resource_exhausted",
                "at most 100 sandboxes may exist at once",
            )),
        }
    }
}

impl poem_openapi::types::Example for SnapshotDeleted {
    fn example() -> Self {
        SnapshotDeleted {
            snapshot_id: EXAMPLE_SNAPSHOT.into(),
            status: "deleted".into(),
        }
    }
}

/// The snapshot and fork endpoints.
pub struct SnapshotApi;

#[OpenApi(tag = "SnapshotTags::Snapshots")]
impl SnapshotApi {
    /// Snapshot a sandbox
    ///
    /// Captures the sandbox's filesystem (running or paused; the engine freezes a
    /// running one for the capture) as a template. Processes are not captured: a
    /// sandbox created from it starts fresh, its template's start command included.
    /// 404 when the sandbox does not exist, 409 when the name belongs to a template
    /// that is not a snapshot.
    #[oai(
        path = "/sandboxes/:sandbox_id/snapshots",
        method = "post",
        operation_id = "snapshot_sandbox"
    )]
    async fn create(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<SnapshotRequest>,
    ) -> Result<Json<Snapshot>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let name = body.0.name.filter(|n| !n.is_empty());
        let record = state.manager.snapshot(&id, name.as_deref()).await?;
        Ok(Json(Snapshot::from(&record)))
    }

    /// List snapshots
    ///
    /// The snapshots kept, oldest first; `sandbox_id` keeps those of one sandbox.
    #[oai(path = "/snapshots", method = "get", operation_id = "list_snapshots")]
    async fn list(
        &self,
        state: Data<&AppState>,
        sandbox_id: Query<Option<String>>,
    ) -> Result<Json<Vec<Snapshot>>, ApiError> {
        Ok(Json(
            state
                .manager
                .snapshots(sandbox_id.0.as_deref())
                .iter()
                .map(Snapshot::from)
                .collect(),
        ))
    }

    /// Delete snapshot
    ///
    /// Removes the snapshot and its image. 404 when it does not exist, 409 while a
    /// sandbox created from it exists.
    #[oai(
        path = "/snapshots/:snapshot_id",
        method = "delete",
        operation_id = "delete_snapshot"
    )]
    async fn delete(
        &self,
        state: Data<&AppState>,
        snapshot_id: Path<String>,
    ) -> Result<Json<SnapshotDeleted>, ApiError> {
        let record = state.manager.delete_snapshot(&snapshot_id.0).await?;
        Ok(Json(SnapshotDeleted {
            snapshot_id: record.id,
            status: "deleted".into(),
        }))
    }

    /// Fork a sandbox
    ///
    /// Captures the sandbox's filesystem once and starts `count` sandboxes from it, each
    /// with the source's metadata, envs, user, limits, egress rules and lifecycle; one
    /// result per fork. Processes are not carried over. The capture is removed once
    /// none of its sandboxes is left. 422 for a count outside 1-100, 404 when the
    /// sandbox does not exist.
    #[oai(
        path = "/sandboxes/:sandbox_id/fork",
        method = "post",
        operation_id = "fork_sandbox"
    )]
    async fn fork(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<ForkRequest>,
    ) -> Result<Json<Vec<ForkResult>>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let timeout = body
            .0
            .timeout
            .map(Duration::from_secs)
            .unwrap_or(state.manager.config().default_timeout);
        let results = state.manager.fork(&id, body.0.count, timeout).await?;
        Ok(Json(
            results
                .into_iter()
                .map(|r| match r {
                    Ok(info) => ForkResult {
                        sandbox: Some(info.into()),
                        error: None,
                    },
                    Err(e) => ForkResult {
                        sandbox: None,
                        error: Some(ErrorBody::new(e.code(), e.to_string())),
                    },
                })
                .collect(),
        ))
    }
}
