//! Volumes (E2B's `/volumes`): engine volumes that outlive sandboxes, mounted by name
//! at create (`volume_mounts`), any number of sandboxes at once.
//!
//! What the server knows of a volume (id, name, its content token) lives in the
//! engine volume's labels, so a restarted server finds its volumes again without a
//! state file. Content requests (E2B's volume content API) are served by the agent of a
//! small keeper container that mounts the volume; a keeper starts at the first content
//! request and goes once it has been idle for [`KEEPER_IDLE`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::{lock, SandboxManager};
use crate::agent::binary::{generate_hex, generate_secret};
use crate::backend::{ContainerSpec, VolumeBind};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{SandboxSpec, VolumeMount};

/// How long a keeper stays after its last content request ended.
pub const KEEPER_IDLE: Duration = Duration::from_secs(60);
/// How long a delete waits for killed sandboxes' containers to let go of the volume.
const VOLUME_RELEASE: Duration = Duration::from_secs(15);
/// Most volumes one sandbox mounts.
pub const MAX_MOUNTS: usize = 16;
/// Longest volume name.
const MAX_NAME: usize = 63;

/// One volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The volume's id (`vol_…`).
    pub id: String,
    /// Its name, unique on this server; mounts name it.
    pub name: String,
    /// The bearer token of its content API.
    pub token: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// Where a volume's content is served from, for as long as the lease is held.
#[derive(Clone, Debug)]
pub struct VolumeAccess {
    /// The keeper's agent.
    pub addr: std::net::SocketAddr,
    /// Its access token.
    pub token: String,
    /// Keeps the keeper from being stopped while held (e.g. by a streamed body).
    pub lease: Arc<()>,
}

/// A running keeper.
#[derive(Debug)]
struct Keeper {
    access: VolumeAccess,
    last_used: Instant,
}

/// The volumes and their keepers.
#[derive(Debug, Default)]
pub(super) struct Volumes {
    records: std::sync::Mutex<BTreeMap<String, VolumeRecord>>,
    keepers: std::sync::Mutex<HashMap<String, Keeper>>,
    /// Creates, deletes and keeper starts, one at a time.
    ops: tokio::sync::Mutex<()>,
}

/// The engine's name of volume `id`.
fn engine_name(id: &str) -> String {
    format!("colima-e2b-vol-{id}")
}

/// The keeper container of volume `id`.
fn keeper_name(id: &str) -> String {
    format!("colima-e2b-volume-keeper-{id}")
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "volume name {name:?} must be 1 to {MAX_NAME} letters, digits, '-', '_' or '.', \
             starting with a letter or digit"
        )))
    }
}

/// A mount path: absolute, normalised, and not where the system lives.
fn check_mount_path(path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "volume mount path {path:?} {why}"
        )))
    };
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    if path
        .split('/')
        .any(|c| c == "." || c == ".." || c.contains('\0'))
        || path.contains("//")
    {
        return bad("must be a plain path (no '.', '..' or '//')");
    }
    let trimmed = path.trim_end_matches('/');
    const SYSTEM: [&str; 9] = [
        "", "/proc", "/sys", "/dev", "/etc", "/bin", "/sbin", "/usr", "/lib",
    ];
    if SYSTEM
        .iter()
        .any(|s| trimmed == *s || (!s.is_empty() && trimmed.starts_with(&format!("{s}/"))))
        || trimmed == envd_proto::VOLUME_ROOT
    {
        return bad("is reserved for the system");
    }
    Ok(())
}

fn record_of(name: &str, labels: &BTreeMap<String, String>) -> Option<VolumeRecord> {
    let id = labels.get(labels::VOLUME_ID)?.clone();
    if engine_name(&id) != name {
        return None;
    }
    let created_ms: i128 = labels.get(labels::CREATED_AT)?.parse().ok()?;
    Some(VolumeRecord {
        id,
        name: labels.get(labels::VOLUME_NAME)?.clone(),
        token: labels.get(labels::VOLUME_TOKEN)?.clone(),
        created_at: OffsetDateTime::from_unix_timestamp_nanos(created_ms * 1_000_000).ok()?,
    })
}

impl SandboxManager {
    fn volumes(&self) -> &Volumes {
        &self.inner.volumes
    }

    /// Reads the server's volumes back from the engine (at start).
    pub(super) async fn load_volumes(&self) {
        let owner = self.inner.config.owner.clone();
        let found = match self
            .inner
            .backend
            .list_volumes(&[(labels::MANAGED, "true"), (labels::OWNER, &owner)])
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the engine's volumes");
                return;
            }
        };
        let mut records = lock(&self.volumes().records);
        for (name, labels) in found {
            match record_of(&name, &labels) {
                Some(r) => {
                    records.insert(r.id.clone(), r);
                }
                None => {
                    tracing::warn!(volume = %name, "ignoring an engine volume with unreadable labels")
                }
            }
        }
        if !records.is_empty() {
            tracing::info!(volumes = records.len(), "volumes found");
        }
    }

    /// Creates volume `name`.
    pub async fn create_volume(&self, name: &str) -> Result<VolumeRecord> {
        check_name(name)?;
        let _op = self.volumes().ops.lock().await;
        if lock(&self.volumes().records)
            .values()
            .any(|r| r.name == name)
        {
            return Err(Error::Conflict(format!(
                "a volume named {name:?} exists already"
            )));
        }
        let now = OffsetDateTime::now_utc();
        let record = VolumeRecord {
            id: format!("vol_{}", generate_hex(10)),
            name: name.to_string(),
            token: generate_secret(),
            created_at: now,
        };
        let mut tags = BTreeMap::new();
        tags.insert(labels::MANAGED.to_string(), "true".to_string());
        tags.insert(labels::OWNER.to_string(), self.inner.config.owner.clone());
        tags.insert(labels::VOLUME_ID.to_string(), record.id.clone());
        tags.insert(labels::VOLUME_NAME.to_string(), record.name.clone());
        tags.insert(labels::VOLUME_TOKEN.to_string(), record.token.clone());
        tags.insert(
            labels::CREATED_AT.to_string(),
            (now.unix_timestamp_nanos() / 1_000_000).to_string(),
        );
        self.inner
            .backend
            .create_volume(&engine_name(&record.id), &tags)
            .await?;
        lock(&self.volumes().records).insert(record.id.clone(), record.clone());
        drop(_op);
        // Every user of every sandbox may write at the volume's top, as in a directory
        // of their own.
        if let Err(e) = self.open_volume_root(&record.id).await {
            tracing::warn!(volume = %record.id, error = %e, "could not open the new volume's root to every user");
        }
        tracing::info!(volume = %record.id, name, "volume created");
        metrics::counter!("colima_e2b_volumes_created_total").increment(1);
        Ok(record)
    }

    /// The volumes, oldest first.
    pub fn list_volumes(&self) -> Vec<VolumeRecord> {
        let mut out: Vec<VolumeRecord> = lock(&self.volumes().records).values().cloned().collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// Volume `id` (or, failing that, the volume named `id`).
    pub fn volume(&self, id: &str) -> Result<VolumeRecord> {
        let records = lock(&self.volumes().records);
        records
            .get(id)
            .or_else(|| records.values().find(|r| r.name == id))
            .cloned()
            .ok_or_else(|| Error::not_found(format!("volume {id}")))
    }

    /// Volume `id`, by its id only (what the content API and its token go by).
    pub fn volume_by_id(&self, id: &str) -> Result<VolumeRecord> {
        lock(&self.volumes().records)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("volume {id}")))
    }

    /// Whether `token` is volume `id`'s content token (constant time).
    pub fn volume_token_matches(&self, id: &str, token: &str) -> bool {
        lock(&self.volumes().records)
            .get(id)
            .is_some_and(|r| envd_proto::signature::ct_eq(r.token.as_bytes(), token.as_bytes()))
    }

    /// Deletes volume `id` and frees its disk. A volume a sandbox (running or paused)
    /// still mounts is a [`Error::Conflict`].
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        let _op = self.volumes().ops.lock().await;
        let record = self.volume(id)?;
        let users: Vec<String> = self
            .registry()
            .sandboxes
            .values()
            .filter(|s| s.volume_mounts.iter().any(|m| m.name == record.name))
            .map(|s| s.id.to_string())
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "volume {} is mounted by sandbox(es) {}; kill them first",
                record.id,
                users.join(", ")
            )));
        }
        lock(&self.volumes().keepers).remove(&record.id);
        self.remove_quietly(&keeper_name(&record.id)).await;
        let engine = engine_name(&record.id);
        // Killed sandboxes' containers go in the background: once they are gone, the
        // volume is free (the engine says it is in use until then).
        let until = Instant::now() + VOLUME_RELEASE;
        let removed = loop {
            match self.inner.backend.remove_volume(&engine).await {
                Err(Error::Conflict(_)) if Instant::now() < until => {
                    self.finish_deletions(until.saturating_duration_since(Instant::now()))
                        .await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other,
            }
        };
        match removed {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        lock(&self.volumes().records).remove(&record.id);
        tracing::info!(volume = %record.id, name = %record.name, "volume deleted");
        Ok(())
    }

    /// The engine volumes `mounts` name, checked (known volumes, distinct plain paths).
    pub(super) fn volume_binds(&self, mounts: &[VolumeMount]) -> Result<Vec<VolumeBind>> {
        if mounts.len() > MAX_MOUNTS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_MOUNTS} volume mounts, not {}",
                mounts.len()
            )));
        }
        let records = lock(&self.volumes().records);
        let mut out: Vec<VolumeBind> = Vec::new();
        for m in mounts {
            check_mount_path(&m.path)?;
            let path = m.path.trim_end_matches('/').to_string();
            let record = records.values().find(|r| r.name == m.name).ok_or_else(|| {
                Error::InvalidArgument(format!("there is no volume named {:?}", m.name))
            })?;
            if out.iter().any(|b| b.path == path) {
                return Err(Error::InvalidArgument(format!(
                    "two volumes are mounted at {path}"
                )));
            }
            out.push(VolumeBind {
                volume: engine_name(&record.id),
                path,
            });
        }
        Ok(out)
    }

    async fn open_volume_root(&self, id: &str) -> Result<()> {
        let access = self.volume_access(id).await?;
        let resp = self
            .inner
            .http
            .patch(format!("http://{}/volume/path?path=/", access.addr))
            .header(envd_proto::TOKEN_HEADER, &access.token)
            .json(&serde_json::json!({ "mode": 0o777 }))
            .send()
            .await
            .map_err(|e| Error::backend("agent", e))?;
        // Content requests start a keeper of their own: only they pay for one.
        let _op = self.volumes().ops.lock().await;
        if lock(&self.volumes().keepers).remove(id).is_some() {
            self.remove_quietly(&keeper_name(id)).await;
        }
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Error::backend(
                "agent",
                format!("the keeper answered {}", resp.status()),
            ))
        }
    }

    /// Where volume `id`'s content is served: its keeper, started when none runs.
    pub async fn volume_access(&self, id: &str) -> Result<VolumeAccess> {
        let record = self.volume_by_id(id)?;
        if let Some(k) = lock(&self.volumes().keepers).get_mut(&record.id) {
            k.last_used = Instant::now();
            return Ok(k.access.clone());
        }
        let _op = self.volumes().ops.lock().await;
        if let Some(k) = lock(&self.volumes().keepers).get_mut(&record.id) {
            k.last_used = Instant::now();
            return Ok(k.access.clone());
        }
        // Deleted while this waited.
        let record = self.volume_by_id(&record.id)?;
        let access = self.start_keeper(&record).await?;
        lock(&self.volumes().keepers).insert(
            record.id.clone(),
            Keeper {
                access: access.clone(),
                last_used: Instant::now(),
            },
        );
        let (manager, id) = (self.clone(), record.id.clone());
        tokio::spawn(async move { manager.retire_keeper_when_idle(id).await });
        Ok(access)
    }

    async fn start_keeper(&self, record: &VolumeRecord) -> Result<VolumeAccess> {
        if self.inner.config.agent.is_none() {
            return Err(Error::Unsupported {
                backend: self.inner.backend.name(),
                operation: "volume content without the sandbox agent",
            });
        }
        let r = self.resolve(&SandboxSpec::default())?;
        let image = self.template_image(&r.template.image).await?.name;
        let name = keeper_name(&record.id);
        let secret = generate_secret();
        let config = &self.inner.config;
        let mut tags = BTreeMap::new();
        tags.insert(labels::MANAGED.to_string(), "true".to_string());
        tags.insert(labels::OWNER.to_string(), config.owner.clone());
        tags.insert(labels::VOLUME_KEEPER.to_string(), record.id.clone());
        let spec = ContainerSpec {
            name: name.clone(),
            image,
            command: Vec::new(),
            env: vec![format!("{}={secret}", envd_proto::SECRET_ENV)],
            labels: tags,
            limits: r.limits,
            // Only the agent runs in it, on the sandboxes' network.
            internet: true,
            user: Some("root".to_string()),
            agent_port: Some(self.agent_port()),
            profile: config.profile.clone(),
            volumes: vec![VolumeBind {
                volume: engine_name(&record.id),
                path: envd_proto::VOLUME_ROOT.to_string(),
            }],
        };
        // A keeper a crash left behind.
        self.remove_quietly(&name).await;
        self.inner.backend.create(&spec).await?;
        match self.wait_agent(&name, secret.clone()).await {
            Ok(client) => {
                tracing::debug!(volume = %record.id, "volume keeper started");
                Ok(VolumeAccess {
                    addr: client.addr(),
                    token: secret,
                    lease: Arc::new(()),
                })
            }
            Err(e) => {
                self.remove_quietly(&name).await;
                Err(e)
            }
        }
    }

    /// Removes volume `id`'s keeper once nothing holds its lease and it has been idle
    /// for [`KEEPER_IDLE`].
    async fn retire_keeper_when_idle(&self, id: String) {
        loop {
            tokio::time::sleep(KEEPER_IDLE / 4).await;
            let retire = {
                let mut keepers = lock(&self.volumes().keepers);
                match keepers.get(&id) {
                    None => return, // the volume went
                    Some(k) => {
                        let held = Arc::strong_count(&k.access.lease) > 1;
                        if held {
                            false
                        } else {
                            k.last_used.elapsed() >= KEEPER_IDLE
                        }
                    }
                }
                .then(|| keepers.remove(&id))
                .flatten()
                .is_some()
            };
            if retire {
                let _op = self.volumes().ops.lock().await;
                if lock(&self.volumes().keepers).contains_key(&id) {
                    // A request started a new keeper (same name) meanwhile: it stays.
                    return;
                }
                self.remove_quietly(&keeper_name(&id)).await;
                tracing::debug!(volume = %id, "idle volume keeper removed");
                return;
            }
        }
    }

    /// Notes that a content request of volume `id` ended (its idle time starts now).
    pub fn volume_used(&self, id: &str) {
        if let Some(k) = lock(&self.volumes().keepers).get_mut(id) {
            k.last_used = Instant::now();
        }
    }

    /// Removes every keeper (the server stops; they hold no state).
    pub async fn stop_keepers(&self) {
        let ids: Vec<String> = lock(&self.volumes().keepers)
            .drain()
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            self.remove_quietly(&keeper_name(&id)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_mount_paths_are_checked() {
        assert!(check_name("data").is_ok());
        assert!(check_name("my-vol_1.x").is_ok());
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_mount_path("/mnt/data").is_ok());
        assert!(check_mount_path("/home/user/work").is_ok());
        for bad in [
            "relative",
            "/",
            "/proc",
            "/etc/x",
            "/usr/local",
            "/mnt/../etc",
            "/a//b",
            envd_proto::VOLUME_ROOT,
        ] {
            assert!(check_mount_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_come_back_from_labels() {
        let mut tags = BTreeMap::new();
        tags.insert(labels::VOLUME_ID.to_string(), "vol_1".to_string());
        tags.insert(labels::VOLUME_NAME.to_string(), "data".to_string());
        tags.insert(labels::VOLUME_TOKEN.to_string(), "t".to_string());
        tags.insert(labels::CREATED_AT.to_string(), "1700000000000".to_string());
        let r = record_of(&engine_name("vol_1"), &tags).expect("readable");
        assert_eq!(
            (r.id.as_str(), r.name.as_str(), r.token.as_str()),
            ("vol_1", "data", "t")
        );
        assert_eq!(r.created_at.unix_timestamp(), 1_700_000_000);
        // A volume whose name does not match its id label is not ours to trust.
        assert!(record_of("colima-e2b-vol-other", &tags).is_none());
    }
}
