//! The engine port: the lifecycle contract every container engine backend implements,
//! what the core hands a backend ([`ContainerSpec`] with its [`SandboxProfile`]), and the
//! backends that live in the core itself ([`memory`], and the [`instrumented`] wrapper).

pub mod build;
pub mod image;
pub mod instrumented;
pub mod memory;
pub mod quota;

pub use build::{
    build_failure, context_chunks, is_build_context_problem, BuildEvent, BuildOutput, BuildRequest,
    BuildSink, StepTracker,
};
pub use image::{split_image, DeriveImage, DeriveSteps, ImageFile, ImageLink};

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

/// What a backend supports. Conformance checks and the core choose by capability, never
/// by backend name. Everything starts off (`Capabilities::default()`); each backend turns
/// on what it really supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Containers really run their main process, so an agent inside can be reached
    /// through [`SandboxBackend::agent_address`].
    pub processes: bool,
    /// Containers can be frozen and thawed.
    pub pause: bool,
    /// Networks without a route out (internet off) can be created.
    pub internal_networks: bool,
    /// Sandboxes cannot reach the server host's loopback addresses (the engine runs on
    /// this kernel with bridged networking), so a loopback peer is never a sandbox.
    pub host_loopback_isolated: bool,
    /// [`crate::Limits::disk_mb`] is enforced (the engine's storage has quotas).
    pub disk_quota: bool,
    /// The quota counts the image too (the whole root filesystem), not only what the
    /// container writes.
    pub quota_counts_image: bool,
    /// Sandboxes cannot reach each other over the network.
    pub isolated_sandboxes: bool,
}

/// The baseline every sandbox container gets: decided once by the core (from its
/// configuration) and applied the same way by every backend, which adds only what its
/// engine needs to express it (never privileged, default seccomp, no host namespaces,
/// no client mounts or devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxProfile {
    /// Capabilities kept; every other one is dropped.
    pub capabilities: Vec<String>,
    /// Open files per process (soft and hard).
    pub nofile: u64,
    /// Largest file a process may write, bytes (the `fsize` limit).
    pub max_file_size: u64,
    /// Bytes of container log the engine keeps (one file).
    pub log_max_bytes: u64,
    /// Host name inside the sandbox.
    pub hostname: String,
    /// Size of `/dev/shm` (a tmpfs; its pages count against the memory limit), bytes.
    pub shm_bytes: u64,
}

impl Default for SandboxProfile {
    fn default() -> Self {
        Self {
            capabilities: SANDBOX_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            nofile: 8192,
            max_file_size: 8 << 30,
            log_max_bytes: 1 << 20,
            hostname: "sandbox".into(),
            shm_bytes: 64 << 20,
        }
    }
}

/// The host's side of one sandbox network: the bridge interface its containers' traffic
/// enters this kernel through, for the host firewall ([`crate::network::firewall`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNetwork {
    /// The engine's name for the network.
    pub name: String,
    /// The host interface (a Linux bridge) of the network.
    pub interface: String,
    /// The network's subnets.
    pub subnets: Vec<ipnet::IpNet>,
}

/// Facts about the engine a backend talks to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineInfo {
    /// Engine product, e.g. `Docker Engine` or `Podman Engine`.
    pub engine: String,
    /// Engine version string.
    pub version: String,
    /// Negotiated API version.
    pub api_version: String,
    /// Where the backend connected (socket path or URL).
    pub endpoint: String,
    /// CPUs of the engine's host (a VM's, with Colima), when it says.
    pub cpus: Option<u32>,
    /// Memory of the engine's host, bytes, when it says.
    pub memory_bytes: Option<u64>,
    /// Storage driver and the filesystem under it, e.g. `overlay2 on xfs`, when it says.
    pub storage: Option<String>,
    /// cgroup version of the engine's host (`1` or `2`), when it says.
    pub cgroup_version: Option<u8>,
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
    /// The baseline profile to apply.
    pub profile: SandboxProfile,
    /// Engine volumes mounted read-write into the container (the only mounts it gets).
    pub volumes: Vec<VolumeBind>,
}

/// One engine volume mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBind {
    /// The engine's volume name.
    pub volume: String,
    /// Absolute path inside the container.
    pub path: String,
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

/// What the engine says about a local image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Its size on disk, bytes, when the engine says.
    pub size: Option<u64>,
    /// The engine's image id (changes when the name is given to a new image).
    pub id: Option<String>,
    /// The user the image's config runs as (`Config.User`; empty or `None`: root).
    pub user: Option<String>,
    /// Its entrypoint (`Config.Entrypoint`).
    pub entrypoint: Option<Vec<String>>,
    /// Its labels (`Config.Labels`).
    pub labels: BTreeMap<String, String>,
}

/// One image an image listing found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageEntry {
    /// The engine's image id.
    pub id: String,
    /// Its references (`repo:tag`).
    pub tags: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created, unix seconds.
    pub created: i64,
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

    /// What the engine has of `image` locally (`None`: not present), never pulling.
    async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>>;

    /// Makes sure `image` is available locally: a local image is used as is; a missing one
    /// is pulled (with progress in the logs) where a registry is reachable; otherwise the
    /// error names the image.
    async fn ensure_image(&self, image: &str) -> Result<ImageInfo>;

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

    /// Kills every process of a running container (SIGKILL) and leaves it stopped: the
    /// quick half of [`remove`](Self::remove), whose deletion can take seconds on some
    /// storage. A container that is not running (paused included) may answer
    /// [`Error::Conflict`]. Default: removes it.
    async fn stop(&self, name: &str) -> Result<()> {
        self.remove(name).await
    }

    /// Starts a stopped container again, its filesystem as it was left, and reports it
    /// (a pause that keeps only the filesystem is a [`stop`](Self::stop) and a start).
    /// Default: unsupported.
    async fn start(&self, name: &str) -> Result<ContainerInfo> {
        let _ = name;
        Err(crate::Error::Unsupported {
            backend: self.name(),
            operation: "start",
        })
    }

    /// The sandbox networks (created when missing) as this kernel sees them, for the
    /// host firewall. Empty where sandbox traffic does not pass through this kernel (an
    /// engine in a VM, rootless networking): the firewall cannot apply there. Default:
    /// empty.
    async fn host_networks(&self) -> Result<Vec<HostNetwork>> {
        Ok(Vec::new())
    }

    /// Builds `req.tag` from `req.base` plus `req.files`, with `req.entrypoint`, no CMD
    /// and `req.labels`, without network access. When an image tagged `req.tag` already
    /// exists it is reused as is (the caller puts a content hash in the tag). Leaves no
    /// temporary container behind, also on failure.
    async fn derive_image(&self, req: &DeriveImage) -> Result<()>;

    /// Builds `req.tag` from the Dockerfile in `req.context` with the engine's builder,
    /// never pulling (a base that is not local is [`crate::Error::NotFound`] naming it),
    /// within `req`'s memory, CPU and network, sending its events to `sink` as they come.
    /// A failed build (also one whose future is dropped) leaves no step container and
    /// removes the untagged images its steps produced. Returns the built image.
    async fn build_image(&self, req: &BuildRequest, sink: BuildSink<'_>) -> Result<ImageInfo> {
        let _ = (req, sink);
        Err(crate::Error::Unsupported {
            backend: self.name(),
            operation: "build_image",
        })
    }

    /// Commits sandbox container `name`'s filesystem as image `image` with `labels` (E2B's
    /// snapshot), freezing it for the capture when `running`; works on a frozen or
    /// stopped container too. Returns the image.
    async fn snapshot(
        &self,
        name: &str,
        image: &str,
        labels: &BTreeMap<String, String>,
        running: bool,
    ) -> Result<ImageInfo> {
        let _ = (name, image, labels, running);
        Err(crate::Error::Unsupported {
            backend: self.name(),
            operation: "snapshot",
        })
    }

    /// The local images that carry label `label` (any value). Default: none (a backend
    /// that cannot list images has nothing to clean up).
    async fn list_images(&self, label: &str) -> Result<Vec<ImageEntry>> {
        let _ = label;
        Ok(Vec::new())
    }

    /// Removes image `image` (a reference or id) and the untagged parents only it used.
    /// An image in use by a container, or one others are built on, is a
    /// [`crate::Error::Conflict`]; a missing one is [`crate::Error::NotFound`].
    async fn remove_image(&self, image: &str) -> Result<()> {
        let _ = image;
        Err(crate::Error::Unsupported {
            backend: self.name(),
            operation: "remove_image",
        })
    }

    /// Creates engine volume `name` with `labels` (a volume that exists already is kept
    /// as it is).
    async fn create_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let _ = (name, labels);
        Err(crate::Error::Unsupported {
            backend: self.name(),
            operation: "volumes",
        })
    }

    /// The engine volumes carrying every label pair in `labels`: (name, labels).
    /// Default: none.
    async fn list_volumes(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let _ = labels;
        Ok(Vec::new())
    }

    /// Removes engine volume `name` and frees its disk. A volume a container still
    /// mounts is a [`crate::Error::Conflict`]; a missing one is [`crate::Error::NotFound`].
    async fn remove_volume(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(crate::Error::Unsupported {
            backend: self.name(),
            operation: "volumes",
        })
    }

    /// Bytes of the container's storage that its disk quota counts: the writable layer,
    /// plus the image where the quota covers the whole root filesystem (btrfs, zfs).
    /// May take seconds (the engine adds the layer up). `None`: the engine cannot say.
    async fn disk_usage(&self, name: &str) -> Result<Option<u64>> {
        let _ = name;
        Ok(None)
    }

    /// How the server reaches the agent listening on `port` inside the container.
    async fn agent_address(&self, name: &str, port: u16) -> Result<AgentAddress>;
}

/// A shareable, type-erased backend.
pub type DynBackend = Arc<dyn SandboxBackend>;
