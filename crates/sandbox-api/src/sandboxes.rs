//! The seed's sandbox lifecycle API: `/sandboxes/...`.

use std::collections::BTreeMap;
use std::time::Duration;

use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use sandbox_core::{Lifecycle, OnTimeout, SandboxInfo, SandboxSpec};

use crate::error::{parse_id, ApiError};
use crate::{rfc3339, AppState};

#[derive(Tags)]
enum SandboxTags {
    /// Create, list, inspect and kill sandboxes.
    Sandboxes,
}

/// A request to create a sandbox.
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct CreateSandboxRequest {
    /// Template name (`base`, `python`, or one from the server's configuration).
    /// Defaults to the server's default template.
    pub template: Option<String>,
    /// Seconds until the sandbox is removed. Defaults to the server's default (300).
    pub timeout: Option<u64>,
    /// Environment variables for every command in the sandbox.
    #[oai(default)]
    pub envs: BTreeMap<String, String>,
    /// Free-form metadata, returned by list and get and usable as a list filter.
    #[oai(default)]
    pub metadata: BTreeMap<String, String>,
    /// Whether the sandbox may reach the internet (default true).
    pub internet: Option<bool>,
    /// CPU cores (fractions allowed); defaults to the server's limit.
    pub cpus: Option<f64>,
    /// Memory limit in MiB; defaults to the server's limit.
    pub memory_mb: Option<u64>,
    /// Disk quota in MiB over everything the sandbox writes; defaults to the server's.
    pub disk_mb: Option<u64>,
    /// Egress rules: what the sandbox may reach beyond the server's default policy.
    pub network: Option<NetworkRules>,
    /// What the deadline does (kill, or pause) and whether requests wake it when paused.
    pub lifecycle: Option<LifecycleRequest>,
    /// Volumes to mount (see `POST /volumes`), by name, each at an absolute path.
    #[oai(default)]
    pub volume_mounts: Vec<VolumeMountRequest>,
}

/// A volume mounted into a sandbox.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct VolumeMountRequest {
    /// The volume's name.
    pub name: String,
    /// Absolute path inside the sandbox (not a system directory).
    pub path: String,
}

impl poem_openapi::types::Example for VolumeMountRequest {
    fn example() -> Self {
        VolumeMountRequest {
            name: "datasets".into(),
            path: "/mnt/datasets".into(),
        }
    }
}

/// What happens at a sandbox's deadline (E2B's `autoPause`, `autoPauseMemory`,
/// `autoResume`).
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct LifecycleRequest {
    /// `kill` (the default) or `pause`: a paused sandbox is kept for the server's
    /// `paused_retention`.
    pub on_timeout: Option<String>,
    /// Whether that pause keeps memory (a freeze, the default) or only the filesystem
    /// (the memory is freed; a resume starts the sandbox again).
    pub keep_memory: Option<bool>,
    /// Whether a request into the paused sandbox (a command, a file, a host route)
    /// resumes it first; needs `on_timeout: pause` with memory kept.
    pub auto_resume: Option<bool>,
}

impl poem_openapi::types::Example for LifecycleRequest {
    fn example() -> Self {
        LifecycleRequest {
            on_timeout: Some("pause".into()),
            keep_memory: Some(true),
            auto_resume: Some(true),
        }
    }
}

impl LifecycleRequest {
    fn lifecycle(&self) -> Result<Lifecycle, ApiError> {
        let on_timeout = match self.on_timeout.as_deref() {
            None | Some("kill") => OnTimeout::Kill,
            Some("pause") => OnTimeout::Pause,
            Some(other) => {
                return Err(ApiError::from(sandbox_core::Error::InvalidArgument(
                    format!("on_timeout must be kill or pause, not {other:?}"),
                )))
            }
        };
        let default = Lifecycle::default();
        Ok(Lifecycle {
            on_timeout,
            keep_memory: self.keep_memory.unwrap_or(default.keep_memory),
            auto_resume: self.auto_resume.unwrap_or(default.auto_resume),
        })
    }
}

/// A sandbox's egress rules (E2B's `allowOut`/`denyOut`). Evaluated in E2B's order:
/// private, loopback and link-local destinations are always denied; then an address in
/// `allow_out` is allowed; an address in `deny_out` is denied; anything else is allowed.
/// `deny_out: ["0.0.0.0/0"]` with `allow_out` makes an allowlist. New connections follow
/// a change; established ones go on.
#[derive(Debug, Clone, Default, Object)]
#[oai(example)]
pub struct NetworkRules {
    /// Addresses and CIDRs allowed whatever `deny_out` says.
    #[oai(default)]
    pub allow_out: Vec<String>,
    /// Addresses and CIDRs denied.
    #[oai(default)]
    pub deny_out: Vec<String>,
}

impl poem_openapi::types::Example for NetworkRules {
    fn example() -> Self {
        NetworkRules {
            allow_out: vec!["198.51.100.0/24".into()],
            deny_out: vec!["0.0.0.0/0".into()],
        }
    }
}

impl NetworkRules {
    fn config(self, internet: bool) -> sandbox_core::NetworkConfig {
        sandbox_core::NetworkConfig {
            allow_out: self.allow_out,
            deny_out: self.deny_out,
            internet,
            ..Default::default()
        }
    }
}

impl poem_openapi::types::Example for CreateSandboxRequest {
    fn example() -> Self {
        let mut envs = BTreeMap::new();
        envs.insert("DEBUG".into(), "1".into());
        let mut metadata = BTreeMap::new();
        metadata.insert("purpose".into(), "test".into());
        CreateSandboxRequest {
            template: Some("python".into()),
            timeout: Some(600),
            envs,
            metadata,
            internet: None,
            cpus: None,
            memory_mb: None,
            disk_mb: None,
            network: None,
            lifecycle: None,
            volume_mounts: Vec::new(),
        }
    }
}

/// A sandbox as the API reports it.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Sandbox {
    /// Sandbox id (lowercase letters and digits).
    pub sandbox_id: String,
    /// Template it was created from.
    pub template_id: String,
    /// `running` or `paused`.
    pub state: String,
    /// Creation time, RFC 3339 UTC.
    pub started_at: String,
    /// When the sandbox expires, RFC 3339 UTC.
    pub end_at: String,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
    /// CPU cores applied.
    pub cpus: f64,
    /// Memory limit applied, MiB.
    pub memory_mb: u64,
    /// Disk quota, MiB; null when the server runs without disk quotas.
    #[oai(nullable)]
    pub disk_mb: Option<u64>,
    /// Whether the sandbox may reach the internet.
    pub internet: bool,
    /// The volumes mounted into it.
    pub volume_mounts: Vec<VolumeMountRequest>,
}

impl poem_openapi::types::Example for Sandbox {
    fn example() -> Self {
        let mut metadata = BTreeMap::new();
        metadata.insert("purpose".into(), "test".into());
        Sandbox {
            sandbox_id: "clm3k9x0a1b2c3d4e5f6".into(),
            template_id: "python".into(),
            state: "running".into(),
            started_at: "2024-12-02T10:30:00Z".into(),
            end_at: "2024-12-02T10:40:00Z".into(),
            metadata,
            cpus: 1.0,
            memory_mb: 512,
            disk_mb: Some(2048),
            internet: true,
            volume_mounts: Vec::new(),
        }
    }
}

impl From<SandboxInfo> for Sandbox {
    fn from(s: SandboxInfo) -> Self {
        Sandbox {
            sandbox_id: s.id.to_string(),
            template_id: s.template,
            state: s.state.to_string(),
            started_at: rfc3339(s.started_at),
            end_at: rfc3339(s.expires_at),
            metadata: s.metadata,
            cpus: s.limits.cpus,
            memory_mb: s.limits.memory_mb,
            disk_mb: s.limits.disk_mb,
            internet: s.internet,
            volume_mounts: s
                .volume_mounts
                .into_iter()
                .map(|m| VolumeMountRequest {
                    name: m.name,
                    path: m.path,
                })
                .collect(),
        }
    }
}

/// A request to change a sandbox's timeout.
#[derive(Debug, Object)]
#[oai(example)]
pub struct TimeoutRequest {
    /// Seconds from now until the sandbox is removed (may shorten it).
    pub timeout: u64,
}

impl poem_openapi::types::Example for TimeoutRequest {
    fn example() -> Self {
        TimeoutRequest { timeout: 900 }
    }
}

/// Confirmation that a sandbox was killed.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Killed {
    /// The killed sandbox.
    pub sandbox_id: String,
    /// Always `killed`.
    pub status: String,
}

impl poem_openapi::types::Example for Killed {
    fn example() -> Self {
        Killed {
            sandbox_id: "clm3k9x0a1b2c3d4e5f6".into(),
            status: "killed".into(),
        }
    }
}

/// Parses an E2B-style metadata filter: `k1=v1&k2=v2` (URL-encoded as one parameter).
fn parse_metadata_filter(raw: Option<&str>) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ApiError::from(sandbox_core::Error::InvalidArgument(format!(
                "metadata filter {pair:?} is not key=value"
            )))
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The sandbox lifecycle endpoints.
pub struct SandboxApi;

#[OpenApi(tag = "SandboxTags::Sandboxes")]
impl SandboxApi {
    /// Create sandbox
    ///
    /// Creates and starts a sandbox from a template, from its warm pool when it has one.
    /// Creates beyond the server's concurrency wait for their turn. Answers 422 for an
    /// unknown template or an invalid timeout, 429 (with Retry-After) when the create
    /// queue is full or its wait ran out, or the sandbox limit is reached, 503 when the
    /// engine is unreachable.
    #[oai(path = "/sandboxes/", method = "post", operation_id = "create_sandbox")]
    async fn create(
        &self,
        state: Data<&AppState>,
        body: Json<CreateSandboxRequest>,
    ) -> Result<Json<Sandbox>, ApiError> {
        let body = body.0;
        let spec = SandboxSpec {
            template: body.template,
            timeout: body.timeout.map(Duration::from_secs),
            envs: body.envs,
            metadata: body.metadata,
            cpus: body.cpus,
            memory_mb: body.memory_mb,
            disk_mb: body.disk_mb,
            internet: body.internet.unwrap_or(true),
            network: body
                .network
                .map(|n| n.config(body.internet.unwrap_or(true))),
            lifecycle: body
                .lifecycle
                .map(|l| l.lifecycle())
                .transpose()?
                .unwrap_or_default(),
            volume_mounts: body
                .volume_mounts
                .into_iter()
                .map(|m| sandbox_core::VolumeMount {
                    name: m.name,
                    path: m.path,
                })
                .collect(),
            ..SandboxSpec::default()
        };
        let info = state.manager.create(spec).await?;
        Ok(Json(info.into()))
    }

    /// List sandboxes
    ///
    /// Lists this server's sandboxes, oldest first. `metadata` filters by metadata, written
    /// `key1=value1&key2=value2` and URL-encoded as one parameter.
    #[oai(path = "/sandboxes/", method = "get", operation_id = "list_sandboxes")]
    async fn list(
        &self,
        state: Data<&AppState>,
        metadata: Query<Option<String>>,
    ) -> Result<Json<Vec<Sandbox>>, ApiError> {
        let filter = parse_metadata_filter(metadata.0.as_deref())?;
        Ok(Json(
            state
                .manager
                .list(&filter)
                .into_iter()
                .map(Sandbox::from)
                .collect(),
        ))
    }

    /// Get sandbox info
    ///
    /// One sandbox, with its state refreshed from the engine. 404 when it does not exist.
    #[oai(
        path = "/sandboxes/:sandbox_id",
        method = "get",
        operation_id = "get_sandbox"
    )]
    async fn get(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
    ) -> Result<Json<Sandbox>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        Ok(Json(state.manager.get(&id).await?.into()))
    }

    /// Kill sandbox
    ///
    /// Kills the sandbox's processes at once and removes it. 404 when it does not exist.
    #[oai(
        path = "/sandboxes/:sandbox_id",
        method = "delete",
        operation_id = "kill_sandbox"
    )]
    async fn kill(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
    ) -> Result<Json<Killed>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        state.manager.kill(&id).await?;
        Ok(Json(Killed {
            sandbox_id: id.to_string(),
            status: "killed".into(),
        }))
    }

    /// Update timeout
    ///
    /// Sets the sandbox to expire `timeout` seconds from now; this may shorten its life.
    /// The new deadline survives a server restart.
    #[oai(
        path = "/sandboxes/:sandbox_id/timeout",
        method = "post",
        operation_id = "set_sandbox_timeout"
    )]
    async fn set_timeout(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<TimeoutRequest>,
    ) -> Result<Json<Sandbox>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let info = state
            .manager
            .set_timeout(&id, Duration::from_secs(body.0.timeout))?;
        Ok(Json(info.into()))
    }

    /// Pause sandbox
    ///
    /// Pauses a running sandbox. `keep_memory=true` (the default) freezes it: its
    /// processes stop where they are and resume where they were. `keep_memory=false`
    /// keeps only its filesystem and frees its memory: a resume starts it again (the
    /// template's start command reruns; processes do not survive). A paused sandbox is
    /// kept for the server's `paused_retention`, across server and engine restarts (a
    /// frozen one whose engine restarted resumes from its filesystem). 409 when it is
    /// already paused, 404 when it does not exist.
    #[oai(
        path = "/sandboxes/:sandbox_id/pause",
        method = "post",
        operation_id = "pause_sandbox"
    )]
    async fn pause(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        keep_memory: Query<Option<bool>>,
    ) -> Result<Json<Sandbox>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let info = state
            .manager
            .pause(&id, keep_memory.0.unwrap_or(true))
            .await?;
        Ok(Json(info.into()))
    }

    /// Resume sandbox
    ///
    /// Resumes a paused sandbox, which then lives `timeout` seconds (default: the
    /// timeout it was created with). 409 when it is not paused, 404 when it does not
    /// exist.
    #[oai(
        path = "/sandboxes/:sandbox_id/resume",
        method = "post",
        operation_id = "resume_sandbox"
    )]
    async fn resume(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        timeout: Query<Option<u64>>,
    ) -> Result<Json<Sandbox>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let info = state
            .manager
            .resume(&id, timeout.0.map(Duration::from_secs), false)
            .await?;
        Ok(Json(info.into()))
    }

    /// Get egress rules
    ///
    /// The sandbox's egress rules (empty lists when it has none). 404 when it does not
    /// exist.
    #[oai(
        path = "/sandboxes/:sandbox_id/network",
        method = "get",
        operation_id = "get_sandbox_network"
    )]
    async fn get_network(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
    ) -> Result<Json<NetworkRules>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        state.manager.info(&id)?;
        let rules = state
            .manager
            .network(&id)
            .map(|n| NetworkRules {
                allow_out: n.config.allow_out,
                deny_out: n.config.deny_out,
            })
            .unwrap_or_default();
        Ok(Json(rules))
    }

    /// Replace egress rules
    ///
    /// Replaces the sandbox's egress rules whole; new connections follow them at once.
    /// 422 for an entry that is not an address or CIDR, 404 when the sandbox does not
    /// exist, 409 when it is paused, 501 when this host cannot enforce rules (no host
    /// firewall, see `colima-e2b doctor`).
    #[oai(
        path = "/sandboxes/:sandbox_id/network",
        method = "put",
        operation_id = "set_sandbox_network"
    )]
    async fn set_network(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<NetworkRules>,
    ) -> Result<Json<NetworkRules>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let rules = body.0.clone();
        state
            .manager
            .update_egress(&id, rules.allow_out, rules.deny_out, None)
            .await?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_metadata_filter;

    #[test]
    fn metadata_filters_parse_pairs_and_reject_garbage() {
        let f = parse_metadata_filter(Some("a=1&b=x=y")).expect("parses");
        assert_eq!(f.get("a").map(String::as_str), Some("1"));
        assert_eq!(f.get("b").map(String::as_str), Some("x=y"));
        assert!(parse_metadata_filter(None).expect("empty").is_empty());
        assert!(parse_metadata_filter(Some("novalue")).is_err());
    }
}
