//! The native API's volumes: engine volumes that outlive sandboxes, mounted at create
//! (`volume_mounts`). Their content is reached from a sandbox that mounts them, or
//! through E2B's volume content API with the volume's token. Handlers parse and map;
//! [`sandbox_core::SandboxManager`] decides.

use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use sandbox_core::manager::VolumeRecord;

use crate::error::ApiError;
use crate::{rfc3339, AppState};

#[derive(Tags)]
enum VolumeTags {
    /// Volumes: storage that outlives sandboxes and is shared by those that mount it.
    Volumes,
}

/// A request to create a volume.
#[derive(Debug, Object)]
#[oai(example)]
pub struct VolumeRequest {
    /// Its name, unique on the server: 1 to 63 letters, digits, `-`, `_` or `.`.
    pub name: String,
}

/// A volume.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct Volume {
    /// Its id.
    pub volume_id: String,
    /// Its name (what `volume_mounts` name).
    pub name: String,
    /// The bearer token of its E2B content API (`/volumecontent/{volume_id}/…`); only
    /// in the answers about this one volume.
    pub token: Option<String>,
    /// When it was created.
    pub created_at: String,
}

impl Volume {
    fn of(v: &VolumeRecord, with_token: bool) -> Self {
        Volume {
            volume_id: v.id.clone(),
            name: v.name.clone(),
            token: with_token.then(|| v.token.clone()),
            created_at: rfc3339(v.created_at),
        }
    }
}

/// Confirmation that a volume was deleted.
#[derive(Debug, Object)]
#[oai(example)]
pub struct VolumeDeleted {
    /// The deleted volume.
    pub volume_id: String,
    /// Always `deleted`.
    pub status: String,
}

const EXAMPLE_VOLUME: &str = "vol_3f9a0c1b2d4e5f60718a";

impl poem_openapi::types::Example for VolumeRequest {
    fn example() -> Self {
        VolumeRequest {
            name: "datasets".into(),
        }
    }
}

impl poem_openapi::types::Example for Volume {
    fn example() -> Self {
        Volume {
            volume_id: EXAMPLE_VOLUME.into(),
            name: "datasets".into(),
            token: Some("6f1c0e9a8b7d6c5e4f3a2b1c0d9e8f7a".into()),
            created_at: "2026-12-04T12:00:00Z".into(),
        }
    }
}

impl poem_openapi::types::Example for VolumeDeleted {
    fn example() -> Self {
        VolumeDeleted {
            volume_id: EXAMPLE_VOLUME.into(),
            status: "deleted".into(),
        }
    }
}

/// The volume endpoints.
pub struct VolumeApi;

#[OpenApi(tag = "VolumeTags::Volumes")]
impl VolumeApi {
    /// Create a volume
    ///
    /// An engine volume, empty, writable by every user of the sandboxes that mount it.
    /// 409 when the name is taken, 422 for a bad name.
    #[oai(path = "/volumes", method = "post", operation_id = "create_volume")]
    async fn create(
        &self,
        state: Data<&AppState>,
        body: Json<VolumeRequest>,
    ) -> Result<Json<Volume>, ApiError> {
        let record = state.manager.create_volume(&body.0.name).await?;
        Ok(Json(Volume::of(&record, true)))
    }

    /// List volumes
    ///
    /// Every volume, oldest first (without tokens).
    #[oai(path = "/volumes", method = "get", operation_id = "list_volumes")]
    async fn list(&self, state: Data<&AppState>) -> Result<Json<Vec<Volume>>, ApiError> {
        Ok(Json(
            state
                .manager
                .list_volumes()
                .iter()
                .map(|v| Volume::of(v, false))
                .collect(),
        ))
    }

    /// Get a volume
    ///
    /// The volume (by id or name) with its content token. 404 when it does not exist.
    #[oai(
        path = "/volumes/:volume_id",
        method = "get",
        operation_id = "get_volume"
    )]
    async fn get(
        &self,
        state: Data<&AppState>,
        volume_id: Path<String>,
    ) -> Result<Json<Volume>, ApiError> {
        Ok(Json(Volume::of(&state.manager.volume(&volume_id.0)?, true)))
    }

    /// Delete a volume
    ///
    /// Removes the volume and its files, freeing their disk. 404 when it does not
    /// exist, 409 while a sandbox (running or paused) mounts it.
    #[oai(
        path = "/volumes/:volume_id",
        method = "delete",
        operation_id = "delete_volume"
    )]
    async fn delete(
        &self,
        state: Data<&AppState>,
        volume_id: Path<String>,
    ) -> Result<Json<VolumeDeleted>, ApiError> {
        let id = state.manager.volume(&volume_id.0)?.id;
        state.manager.delete_volume(&id).await?;
        Ok(Json(VolumeDeleted {
            volume_id: id,
            status: "deleted".into(),
        }))
    }
}
