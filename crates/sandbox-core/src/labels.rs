//! Container labels: how a sandbox's identity and durable state live with the container,
//! so that a restarted server can re-adopt it.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::backend::ContainerInfo;
use crate::error::{Error, Result};
use crate::types::{Limits, SandboxId, SandboxInfo};

/// Marks a container as a colima-e2b sandbox.
pub const MANAGED: &str = "dev.colima-e2b.managed";
/// The server instance that owns the sandbox.
pub const OWNER: &str = "dev.colima-e2b.owner";
/// The sandbox id.
pub const SANDBOX_ID: &str = "dev.colima-e2b.sandbox-id";
/// The template name.
pub const TEMPLATE: &str = "dev.colima-e2b.template";
/// Client metadata as a JSON object.
pub const METADATA: &str = "dev.colima-e2b.metadata";
/// Creation time, unix milliseconds.
pub const CREATED_AT: &str = "dev.colima-e2b.created-at";
/// Initial expiry, unix milliseconds (labels are immutable; later changes live in the
/// manager's deadline store).
pub const EXPIRES_AT: &str = "dev.colima-e2b.expires-at";
/// `true` when the sandbox may reach the internet.
pub const INTERNET: &str = "dev.colima-e2b.internet";
/// `true` when clients must bring the agent's access token themselves.
pub const SECURE: &str = "dev.colima-e2b.secure";
/// Limits requested at creation, as JSON.
pub const LIMITS: &str = "dev.colima-e2b.limits";
/// `true` on a warm pool member: its claim's settings (metadata, deadline, `secure`)
/// are in the server's state directory, not in these labels.
pub const POOL: &str = "dev.colima-e2b.pool";

/// On snapshot images: the sandbox they were captured from.
pub const SNAPSHOT_OF: &str = "dev.colima-e2b.snapshot-of";

/// The volumes a sandbox mounts (JSON `[{name, path}]`).
pub const VOLUMES: &str = "dev.colima-e2b.volumes";
/// On an engine volume: the id of the volume it holds.
pub const VOLUME_ID: &str = "dev.colima-e2b.volume-id";
/// On an engine volume: the volume's name.
pub const VOLUME_NAME: &str = "dev.colima-e2b.volume-name";
/// On an engine volume: the bearer token of its content API.
pub const VOLUME_TOKEN: &str = "dev.colima-e2b.volume-token";
/// On a volume's content container: the id of the volume it serves.
pub const VOLUME_KEEPER: &str = "dev.colima-e2b.volume-keeper";
/// On snapshot images: bytes of the image at the start of their chain of snapshots (a
/// template's), so what the captures added is counted against a quota.
pub const ORIGIN_BYTES: &str = "dev.colima-e2b.origin-bytes";
/// On derived images: sha256 of the agent binary they carry.
pub const AGENT_SHA256: &str = "dev.colima-e2b.agent-sha256";
/// On derived images: the template image they were derived from.
pub const DERIVED_FROM: &str = "dev.colima-e2b.derived-from";

/// Most metadata entries a sandbox may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY: usize = 128;
const MAX_METADATA_VALUE: usize = 1024;

/// Container name of a sandbox.
pub fn container_name(id: &SandboxId) -> String {
    format!("colima-e2b-{id}")
}

/// Rejects metadata that is too large to carry in labels or contains control characters.
pub fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_METADATA_ENTRIES} metadata entries are allowed"
        )));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE {
            return Err(Error::InvalidArgument(format!(
                "metadata keys must be 1-{MAX_METADATA_KEY} bytes and values at most {MAX_METADATA_VALUE} bytes"
            )));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(Error::InvalidArgument(
                "metadata must not contain control characters".into(),
            ));
        }
    }
    Ok(())
}

fn unix_ms(t: OffsetDateTime) -> String {
    (t.unix_timestamp_nanos() / 1_000_000).to_string()
}

fn parse_unix_ms(s: &str) -> Option<OffsetDateTime> {
    let ms: i128 = s.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(ms.checked_mul(1_000_000)?).ok()
}

/// The labels of a new sandbox.
pub fn for_sandbox(owner: &str, info: &SandboxInfo) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(MANAGED.into(), "true".into());
    labels.insert(OWNER.into(), owner.into());
    labels.insert(SANDBOX_ID.into(), info.id.to_string());
    labels.insert(TEMPLATE.into(), info.template.clone());
    labels.insert(
        METADATA.into(),
        serde_json::to_string(&info.metadata).unwrap_or_else(|_| "{}".into()),
    );
    labels.insert(CREATED_AT.into(), unix_ms(info.started_at));
    labels.insert(EXPIRES_AT.into(), unix_ms(info.expires_at));
    labels.insert(INTERNET.into(), info.internet.to_string());
    labels.insert(SECURE.into(), info.secure.to_string());
    labels.insert(
        LIMITS.into(),
        serde_json::to_string(&info.limits).unwrap_or_else(|_| "{}".into()),
    );
    if !info.volume_mounts.is_empty() {
        labels.insert(
            VOLUMES.into(),
            serde_json::to_string(&info.volume_mounts).unwrap_or_else(|_| "[]".into()),
        );
    }
    // Always set: an image committed from a pool member (a snapshot) carries its
    // labels, and a container's own labels are what must count.
    labels.insert(POOL.into(), "false".into());
    labels
}

/// Rebuilds what the core knows about a sandbox from its container, or says why it cannot.
pub fn to_info(container: &ContainerInfo) -> Result<SandboxInfo, String> {
    let get = |key: &str| {
        container
            .labels
            .get(key)
            .ok_or_else(|| format!("label {key} is missing"))
    };
    let id: SandboxId = get(SANDBOX_ID)?.parse().map_err(|e: Error| e.to_string())?;
    let started_at = parse_unix_ms(get(CREATED_AT)?).ok_or("bad created-at label")?;
    let expires_at = parse_unix_ms(get(EXPIRES_AT)?).ok_or("bad expires-at label")?;
    let metadata = serde_json::from_str(get(METADATA)?).map_err(|e| e.to_string())?;
    let requested: Limits = container
        .labels
        .get(LIMITS)
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    Ok(SandboxInfo {
        id,
        template: get(TEMPLATE)?.clone(),
        image: container.image.clone(),
        state: container.state,
        metadata,
        started_at,
        expires_at,
        limits: container.limits.unwrap_or(requested),
        internet: container.labels.get(INTERNET).map(String::as_str) != Some("false"),
        secure: container.labels.get(SECURE).map(String::as_str) == Some("true"),
        volume_mounts: container
            .labels
            .get(VOLUMES)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::SandboxState;

    #[test]
    fn labels_round_trip_through_a_container() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid time");
        let mut metadata = BTreeMap::new();
        metadata.insert("purpose".to_string(), "test \"quoted\"".to_string());
        let info = SandboxInfo {
            id: SandboxId::generate(),
            template: "base".into(),
            image: "img".into(),
            state: SandboxState::Running,
            metadata,
            started_at: now,
            expires_at: now + time::Duration::seconds(60),
            limits: Limits::default(),
            internet: false,
            secure: true,
            volume_mounts: vec![crate::types::VolumeMount {
                name: "data".into(),
                path: "/mnt/data".into(),
            }],
        };
        let container = ContainerInfo {
            id: "c".into(),
            name: container_name(&info.id),
            image: "img".into(),
            labels: for_sandbox("me", &info),
            state: SandboxState::Running,
            created_at: None,
            limits: None,
            env: Vec::new(),
        };
        assert_eq!(to_info(&container).expect("parses"), info);
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let mut m = BTreeMap::new();
        m.insert("k".to_string(), "v".repeat(2000));
        assert!(validate_metadata(&m).is_err());
        let mut m = BTreeMap::new();
        m.insert("k\n".to_string(), "v".to_string());
        assert!(validate_metadata(&m).is_err());
        let m: BTreeMap<_, _> = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert!(validate_metadata(&m).is_err());
    }
}
