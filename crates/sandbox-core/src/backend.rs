//! The lifecycle contract every container engine backend implements.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::error::Result;
use crate::types::{Limits, SandboxState};

/// Capabilities every sandbox keeps; backends drop all others. The in-sandbox agent runs
/// as root PID 1 and must act as other users: change owners, bypass file modes, switch
/// uid/gid and signal their processes.
pub const SANDBOX_CAPABILITIES: [&str; 6] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "KILL",
];

/// What a backend supports. Conformance checks and the API choose by capability,
/// never by backend name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Containers can be frozen and thawed.
    pub pause: bool,
    /// Resource usage statistics can be read.
    pub stats: bool,
    /// Networks without a route out (internet off) can be created.
    pub internal_networks: bool,
    /// Container ports can be published on 127.0.0.1.
    pub published_ports: bool,
}

impl Capabilities {
    /// A backend that supports everything.
    pub const ALL: Self = Self {
        pause: true,
        stats: true,
        internal_networks: true,
        published_ports: true,
    };
}

/// Facts about the engine a backend talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    /// Engine product, e.g. `Docker Engine` or `Podman Engine`.
    pub engine: String,
    /// Engine version string.
    pub version: String,
    /// Negotiated API version.
    pub api_version: String,
    /// Where the backend connected (socket path or URL).
    pub endpoint: String,
}

/// A fully resolved container to create: the core decides everything here, the backend
/// adds its baseline security profile and translates it to engine calls.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSpec {
    /// Container name (unique per engine).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Main process and its arguments; empty runs the image's own entrypoint.
    pub command: Vec<String>,
    /// Environment of the main process, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Labels that identify the sandbox and carry the state that must survive a restart.
    pub labels: BTreeMap<String, String>,
    /// Resource limits.
    pub limits: Limits,
    /// Whether the container may reach the internet.
    pub internet: bool,
    /// User of the main process (`None`: the image's default).
    pub user: Option<String>,
    /// Container port of the in-sandbox agent, to be reachable from the server.
    pub agent_port: Option<u16>,
}

/// What the engine reports about one container.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerInfo {
    /// Engine container id.
    pub id: String,
    /// Container name without a leading slash.
    pub name: String,
    /// Image reference it was created from.
    pub image: String,
    /// Labels as stored by the engine.
    pub labels: BTreeMap<String, String>,
    /// Current state.
    pub state: SandboxState,
    /// Creation time as the engine reports it.
    pub created_at: Option<OffsetDateTime>,
    /// Limits read back from the engine (what is really applied).
    pub limits: Option<Limits>,
    /// Environment of the main process, `KEY=VALUE`, as stored by the engine. Filled by
    /// `inspect`; `list` may leave it empty. Carries the agent's secret across restarts.
    pub env: Vec<String>,
}

/// One file to add to a derived image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// Absolute path inside the image.
    pub path: String,
    /// Contents.
    pub contents: std::sync::Arc<[u8]>,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

/// An image to derive from a base image: the base plus files, with a new entrypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeriveImage {
    /// Local base image reference.
    pub base: String,
    /// Reference (`repo:tag`) of the image to produce.
    pub tag: String,
    /// Files to add (owned by root).
    pub files: Vec<ImageFile>,
    /// New entrypoint; the derived image has no CMD.
    pub entrypoint: Vec<String>,
    /// Labels added to the image.
    pub labels: BTreeMap<String, String>,
}

impl DeriveImage {
    /// The files as an uncompressed tar archive rooted at `/`, for engines' archive APIs.
    pub fn tar(&self) -> std::io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        for file in &self.files {
            let rel = file.path.trim_start_matches('/');
            if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "image file path {:?} must be absolute and normal",
                        file.path
                    ),
                ));
            }
            let mut header = tar::Header::new_ustar();
            header.set_size(file.contents.len() as u64);
            header.set_mode(file.mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, rel, &file.contents[..])?;
        }
        builder.into_inner()
    }

    /// Dockerfile-style changes both engines' commit APIs accept.
    pub fn commit_changes(&self) -> Vec<String> {
        let quote = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        let mut changes = vec![
            format!("ENTRYPOINT {}", quote(&self.entrypoint)),
            // A base image's CMD would otherwise become the entrypoint's arguments.
            "CMD []".to_string(),
        ];
        // Unquoted where safe: Podman's parser and Docker's differ on quoting.
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b))
        };
        let word = |s: &str| {
            if plain(s) {
                s.to_string()
            } else {
                serde_json::to_string(s).unwrap_or_default()
            }
        };
        for (k, v) in &self.labels {
            changes.push(format!("LABEL {}={}", word(k), word(v)));
        }
        changes
    }
}

/// How the server reaches a sandbox's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentAddress {
    /// Socket address to connect to.
    pub addr: SocketAddr,
}

/// A container engine seen through the lifecycle operations colima-e2b needs.
///
/// # Contract
/// - A backend only manages containers: it never runs commands in them or touches
///   their files (that is the agent's job).
/// - `create` creates *and* starts the container. If any step fails, the backend
///   removes what it created before returning the error.
/// - `remove` kills (never a graceful stop that waits) and deletes; removing a container
///   that does not exist returns [`crate::Error::NotFound`].
/// - `list` returns only containers carrying every given label.
/// - Unsupported operations return [`crate::Error::Unsupported`] and are declared in
///   [`Capabilities`].
/// - An unreachable engine is [`crate::Error::EngineUnavailable`].
#[async_trait]
pub trait SandboxBackend: Display + Debug + Send + Sync + 'static {
    /// Short backend name (`docker`, `podman`).
    fn name(&self) -> &'static str;

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Checks that the engine answers and reports its version.
    async fn check(&self) -> Result<EngineInfo>;

    /// Makes sure `image` is available locally: a local image is used as is; a missing one
    /// is pulled (with progress in the logs) where a registry is reachable; otherwise the
    /// error names the image.
    async fn ensure_image(&self, image: &str) -> Result<()>;

    /// Creates and starts a container from `spec`.
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo>;

    /// Reports one container by name.
    async fn inspect(&self, name: &str) -> Result<ContainerInfo>;

    /// Lists containers (running or not) that carry every label in `labels`.
    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>>;

    /// Freezes a running container.
    async fn pause(&self, name: &str) -> Result<()>;

    /// Thaws a paused container.
    async fn resume(&self, name: &str) -> Result<()>;

    /// Kills and deletes a container.
    async fn remove(&self, name: &str) -> Result<()>;

    /// Builds `req.tag` from `req.base` plus `req.files`, with `req.entrypoint`, no CMD
    /// and `req.labels`, without network access. When an image tagged `req.tag` already
    /// exists it is reused as is (the caller puts a content hash in the tag). Leaves no
    /// temporary container behind, also on failure.
    async fn derive_image(&self, req: &DeriveImage) -> Result<()>;

    /// How the server reaches the agent listening on `port` inside the container.
    async fn agent_address(&self, name: &str, port: u16) -> Result<AgentAddress>;
}

/// A shareable, type-erased backend.
pub type DynBackend = Arc<dyn SandboxBackend>;
