//! Docker Engine and Colima backend for colima-e2b, built on bollard.
//!
//! # Connecting
//! [`DockerBackend::connect`] tries, in order: the configured host, `DOCKER_HOST`, the
//! Colima profile's socket (`~/.colima/<profile>/docker.sock`) and `/var/run/docker.sock`,
//! and negotiates the API version with the first that answers.
//!
//! # Container profile
//! Every sandbox container gets the baseline profile: never privileged, every capability
//! dropped but the few the in-sandbox agent needs to act as other users,
//! `no-new-privileges`, the default seccomp profile, pids/memory(+swap)/CPU limits,
//! nofile/fsize ulimits, a size-capped log, no mounts, no host namespaces, and a
//! dedicated network with inter-container traffic off (an `internal` one when the
//! sandbox has no internet).
//!
//! # Image builds
//! [`SandboxBackend::build_image`] uses the classic builder (`/build`, builder version 1)
//! with the context streamed from disk. It never pulls: the classic builder pulls a
//! missing base whatever `pull` says, so the images the Dockerfile's `FROM` and
//! `COPY --from` name are looked up first. A failed build's step images are removed
//! (untagged ones only, newest first, the base never); a build whose future is dropped is
//! cancelled by the engine as its connection closes, and a task removes its images.

mod build;
mod convert;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerConfig, ContainerCreateBody, EndpointSettings, HostConfig, HostConfigLogConfig, Mount,
    MountType, MountVolumeOptions, NetworkCreateRequest, NetworkingConfig, PortBinding,
    ResourcesUlimits, VolumeCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptions, BuilderVersion, CommitContainerOptions, CreateContainerOptions,
    CreateImageOptions, InspectContainerOptions, ListContainersOptions, ListImagesOptions,
    ListNetworksOptions, ListVolumesOptions, RemoveContainerOptions, RemoveImageOptions,
    RemoveVolumeOptions, StartContainerOptions, UploadToContainerOptions,
};
use bollard::Docker;
use futures_util::{StreamExt, TryStreamExt};
use sandbox_core::backend::image::{derive_with, DeriveSteps};
use sandbox_core::backend::{
    build_failure, context_chunks, is_build_context_problem, split_image, BuildRequest, BuildSink,
    HostNetwork, ImageEntry, StepTracker,
};
use sandbox_core::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, EngineInfo, Error,
    ImageInfo, Result, SandboxBackend,
};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

const NAME: &str = "docker";
/// Seconds bollard waits for one engine call.
const CALL_TIMEOUT_SECS: u64 = 120;
/// Seconds a build request may take to be answered: the engine reads the whole context
/// first (the build's output then streams without a deadline).
const BUILD_ANSWER_SECS: u64 = 15 * 60;
/// CFS period of build steps, microseconds.
const CPU_PERIOD: i32 = 100_000;

/// How the server reaches the agent inside a container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentRoute {
    /// Container IP on Linux with a local engine; a published port otherwise.
    #[default]
    Auto,
    /// The container's IP on the sandbox network (Linux, rootful engines).
    ContainerIp,
    /// A port published on 127.0.0.1 (Colima on macOS, remote VMs).
    Published,
}

/// Settings of the Docker backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerConfig {
    /// Engine address (`unix:///path` or `tcp://host:port`); `None` discovers it.
    pub host: Option<String>,
    /// Colima profile whose socket is tried (`~/.colima/<profile>/docker.sock`).
    pub colima_profile: String,
    /// Prefer the Colima socket and give Colima advice when it is down.
    pub colima: bool,
    /// Network for sandboxes with internet.
    pub network: String,
    /// Network without a route out, for sandboxes without internet.
    pub offline_network: String,
    /// How the server reaches the agent.
    pub agent_route: AgentRoute,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            host: None,
            colima_profile: "default".into(),
            colima: false,
            network: "colima-e2b".into(),
            offline_network: "colima-e2b-offline".into(),
            agent_route: AgentRoute::Auto,
        }
    }
}

/// A [`SandboxBackend`] on Docker Engine (Colima included).
pub struct DockerBackend {
    docker: Docker,
    endpoint: String,
    config: DockerConfig,
    /// Ids of the (online, offline) sandbox networks, resolved once.
    networks: OnceCell<(String, String)>,
    published: bool,
    /// The storage driver enforces per-container sizes (`--storage-opt size=`).
    quota: bool,
    /// The size limit covers the whole root filesystem, image included (btrfs, zfs).
    quota_counts_image: bool,
}

impl fmt::Debug for DockerBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerBackend")
            .field("endpoint", &self.endpoint)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DockerBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker ({})", self.endpoint)
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The engine addresses to try, in order, with where each came from (reading
/// `DOCKER_HOST` and `HOME`; see [`candidates`]).
pub fn candidate_endpoints(config: &DockerConfig) -> Vec<(String, &'static str)> {
    candidates(
        config,
        std::env::var("DOCKER_HOST").ok().as_deref(),
        home().as_deref(),
    )
}

/// The engine addresses to try for `config`, given `DOCKER_HOST` and the home directory.
///
/// An explicit address (configuration, then `DOCKER_HOST`) is used alone: silently
/// falling back to another engine would surprise whoever set it. Otherwise the Colima
/// socket comes first, then the system socket (Colima mode: the Colima socket only).
pub fn candidates(
    config: &DockerConfig,
    docker_host: Option<&str>,
    home: Option<&std::path::Path>,
) -> Vec<(String, &'static str)> {
    if let Some(h) = config.host.as_ref().filter(|h| !h.is_empty()) {
        return vec![(h.clone(), "configuration")];
    }
    if let Some(h) = docker_host.filter(|h| !h.is_empty()) {
        return vec![(h.to_string(), "DOCKER_HOST")];
    }
    let mut out = Vec::new();
    if let Some(h) = home {
        let sock = h
            .join(".colima")
            .join(&config.colima_profile)
            .join("docker.sock");
        out.push((format!("unix://{}", sock.display()), "Colima"));
    }
    if !config.colima {
        out.push(("unix:///var/run/docker.sock".to_string(), "system socket"));
    }
    out
}

fn open(endpoint: &str) -> std::result::Result<Docker, BollardError> {
    let version = bollard::API_DEFAULT_VERSION;
    if let Some(path) = endpoint.strip_prefix("unix://") {
        Docker::connect_with_socket(path, CALL_TIMEOUT_SECS, version)
    } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
        Docker::connect_with_http(endpoint, CALL_TIMEOUT_SECS, version)
    } else if endpoint.starts_with('/') {
        Docker::connect_with_socket(endpoint, CALL_TIMEOUT_SECS, version)
    } else {
        Err(BollardError::UnsupportedURISchemeError {
            uri: endpoint.to_string(),
        })
    }
}

impl DockerBackend {
    /// Connects to the first engine that answers (see the crate docs for the order).
    ///
    /// Fails with [`Error::EngineUnavailable`] saying what was tried and how to fix it.
    pub async fn connect(config: DockerConfig) -> Result<Self> {
        let mut tried = Vec::new();
        for (endpoint, source) in candidate_endpoints(&config) {
            let attempt = match open(&endpoint) {
                Ok(docker) => docker.negotiate_version().await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(docker) => {
                    tracing::debug!(%endpoint, source, "connected to Docker");
                    let published = match config.agent_route {
                        AgentRoute::Published => true,
                        AgentRoute::ContainerIp => false,
                        // Container IPs are routable from the host only when the engine
                        // runs on this Linux kernel (not in a VM such as Colima's).
                        AgentRoute::Auto => {
                            !cfg!(target_os = "linux") || endpoint.contains(".colima")
                        }
                    };
                    let info = docker.info().await.ok().unwrap_or_default();
                    let quota = storage_has_quota(&info);
                    let quota_counts_image = match info.driver.as_deref() {
                        Some("zfs") => true,
                        Some("btrfs") => sandbox_core::backend::quota::btrfs_quota_counts_image(
                            std::path::Path::new(info.docker_root_dir.as_deref().unwrap_or("")),
                        ),
                        _ => false,
                    };
                    return Ok(Self {
                        docker,
                        endpoint,
                        config,
                        networks: OnceCell::new(),
                        published,
                        quota,
                        quota_counts_image,
                    });
                }
                Err(e) => tried.push(format!("{endpoint} ({source}): {}", short_error(&e))),
            }
        }
        let advice = if config.colima {
            format!(
                "start Colima with `colima start --profile {}` and check `colima status`",
                config.colima_profile
            )
        } else {
            "start Docker (`sudo systemctl start docker`, `colima start` on macOS, or \
             deploy/engines.sh here) or set DOCKER_HOST"
                .to_string()
        };
        Err(Error::EngineUnavailable(format!(
            "cannot reach Docker; tried {}; {advice}",
            tried.join("; ")
        )))
    }

    /// The engine address in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bollard client, for benchmarks and tests that compare against raw calls.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    fn map_err(&self, what: &str, e: BollardError) -> Error {
        map_error(what, e)
    }

    /// The ids of the (online, offline) sandbox networks, created when missing.
    async fn ensure_networks(&self) -> Result<&(String, String)> {
        self.networks
            .get_or_try_init(|| async {
                let online = self.ensure_network(&self.config.network, false).await?;
                let offline = self
                    .ensure_network(&self.config.offline_network, true)
                    .await?;
                Ok((online, offline))
            })
            .await
    }

    /// The id of the network called `name`, created when missing.
    ///
    /// Docker before API 1.44 lets concurrent creates make same-named twins (and then
    /// refuses the name as ambiguous), so every caller settles on the oldest twin and
    /// containers join it by id.
    async fn ensure_network(&self, name: &str, internal: bool) -> Result<String> {
        if let Some(id) = self.oldest_network(name).await? {
            return Ok(id);
        }
        let mut options = HashMap::new();
        // Sandboxes must not reach each other.
        options.insert(
            "com.docker.network.bridge.enable_icc".to_string(),
            "false".to_string(),
        );
        let mut labels = HashMap::new();
        labels.insert("dev.colima-e2b.managed".to_string(), "true".to_string());
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            internal: Some(internal),
            options: Some(options),
            labels: Some(labels),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => tracing::info!(network = name, internal, "created sandbox network"),
            // Newer engines refuse the twin outright.
            Err(e) if status(&e) == Some(409) => {}
            Err(e) => return Err(self.map_err(&format!("network {name}"), e)),
        }
        self.oldest_network(name).await?.ok_or_else(|| {
            Error::backend(
                NAME,
                format!("network {name} vanished right after its creation"),
            )
        })
    }

    /// The oldest network named exactly `name` (the engine's filter matches substrings).
    async fn oldest_network(&self, name: &str) -> Result<Option<String>> {
        let mut filters = HashMap::new();
        filters.insert("name".to_string(), vec![name.to_string()]);
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.map_err(&format!("network {name}"), e))?;
        let mut same: Vec<_> = networks
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| {
                // Go trims trailing zeros from the nanoseconds, so compare parsed times.
                let created = n.created.as_deref().and_then(|c| {
                    time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339)
                        .ok()
                });
                Some((created, n.id?))
            })
            .collect();
        if same.len() > 1 {
            tracing::warn!(
                network = name,
                count = same.len(),
                "several networks share this name; using the oldest (remove the empty ones with `docker network rm <id>`)"
            );
        }
        same.sort();
        Ok(same.into_iter().next().map(|(_, id)| id))
    }

    /// The engine's create body for `spec`, joining the network with id `network`.
    fn container_body(&self, spec: &ContainerSpec, network: &str) -> ContainerCreateBody {
        let mib = 1024 * 1024;
        let memory = spec.limits.memory_mb as i64 * mib;
        let profile = &spec.profile;
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut log_opts = HashMap::new();
        log_opts.insert("max-size".to_string(), profile.log_max_bytes.to_string());
        log_opts.insert("max-file".to_string(), "1".to_string());
        let port_key = spec.agent_port.map(|p| format!("{p}/tcp"));
        let port_bindings = match (&port_key, self.published) {
            (Some(key), true) => {
                let mut map = HashMap::new();
                map.insert(
                    key.clone(),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(String::new()),
                    }]),
                );
                Some(map)
            }
            _ => None,
        };
        let host_config = HostConfig {
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(profile.capabilities.clone()),
            security_opt: Some(vec!["no-new-privileges".into()]),
            // Docker's default on cgroup v1 is the host's cgroup namespace.
            cgroupns_mode: Some(bollard::models::HostConfigCgroupnsModeEnum::PRIVATE),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some((spec.limits.cpus * 1e9).round() as i64),
            pids_limit: Some(spec.limits.pids),
            storage_opt: spec
                .limits
                .disk_mb
                .map(|mb| HashMap::from([("size".to_string(), format!("{mb}m"))])),
            shm_size: Some(clamp(profile.shm_bytes)),
            ulimits: Some(vec![
                ResourcesUlimits {
                    name: Some("nofile".into()),
                    soft: Some(clamp(profile.nofile)),
                    hard: Some(clamp(profile.nofile)),
                },
                ResourcesUlimits {
                    name: Some("fsize".into()),
                    soft: Some(clamp(profile.max_file_size)),
                    hard: Some(clamp(profile.max_file_size)),
                },
            ]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(log_opts),
            }),
            network_mode: Some(network.to_string()),
            port_bindings,
            mounts: (!spec.volumes.is_empty()).then(|| {
                spec.volumes
                    .iter()
                    .map(|v| Mount {
                        typ: Some(MountType::VOLUME),
                        source: Some(v.volume.clone()),
                        target: Some(v.path.clone()),
                        read_only: Some(false),
                        // The image's files at the path must not be copied into the volume.
                        volume_options: Some(MountVolumeOptions {
                            no_copy: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
        // A command is the whole main process (an image entrypoint must not wrap it); no
        // command runs the image's own entrypoint (the agent, in derived images).
        let (cmd, entrypoint) = if spec.command.is_empty() {
            (None, None)
        } else {
            (Some(spec.command.clone()), Some(Vec::new()))
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd,
            entrypoint,
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            user: spec.user.clone(),
            hostname: Some(profile.hostname.clone()),
            exposed_ports: port_key.map(|k| vec![k]),
            host_config: Some(host_config),
            // The network id in the endpoint too: the engine resolves the network again
            // at start, by name unless told the id.
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.to_string(),
                    EndpointSettings {
                        network_id: Some(network.to_string()),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        }
    }

    async fn pull(&self, image: &str) -> std::result::Result<(), BollardError> {
        let (repo, tag) = split_image(image);
        let options = CreateImageOptions {
            from_image: Some(repo.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let mut stream = self.docker.create_image(Some(options), None, None);
        let mut last_log = Instant::now();
        tracing::info!(image, "pulling image");
        while let Some(item) = stream.next().await {
            let info = item?;
            if let Some(detail) = info.error_detail {
                return Err(BollardError::DockerStreamError {
                    error: detail.message.unwrap_or_else(|| "pull failed".into()),
                });
            }
            if last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                let progress = info
                    .progress_detail
                    .and_then(|p| Some((p.current?, p.total?)))
                    .map(|(c, t)| format!(" {}/{} MiB", c >> 20, t >> 20))
                    .unwrap_or_default();
                tracing::info!(
                    image,
                    status = info.status.as_deref().unwrap_or(""),
                    "pull progress{progress}"
                );
            }
        }
        tracing::info!(image, "pulled image");
        Ok(())
    }

    /// Fails with [`Error::NotFound`] when an image the Dockerfile builds on is not local.
    async fn check_bases(&self, req: &BuildRequest) -> Result<()> {
        let (context, dockerfile) = (req.context.clone(), req.dockerfile.clone());
        let text =
            tokio::task::spawn_blocking(move || build::read_dockerfile(&context, &dockerfile))
                .await
                .map_err(|e| Error::backend(NAME, format!("reading the build context: {e}")))?
                .map_err(|e| {
                    Error::backend(
                        NAME,
                        format!("build context {}: {e}", req.context.display()),
                    )
                })?;
        // No Dockerfile found: the engine says what is wrong with the context.
        let Some(text) = text else { return Ok(()) };
        for image in build::external_images(&text) {
            match self.docker.inspect_image(&image).await {
                Ok(_) => {}
                Err(e) if status(&e) == Some(404) => {
                    return Err(Error::not_found(format!(
                        "image {image} (not present locally, and builds do not pull; pull \
                         or build it first)"
                    )))
                }
                // A malformed reference (400): the build says what is wrong with it.
                Err(e) if status(&e).is_some() => {}
                Err(e) => return Err(self.map_err(&format!("image {image}"), e)),
            }
        }
        Ok(())
    }

    /// Runs the build of `req`, with `guard` following its stream.
    async fn run_build(
        &self,
        req: &BuildRequest,
        sink: BuildSink<'_>,
        guard: &mut StepImages,
    ) -> Result<()> {
        let file = tokio::fs::File::open(&req.context).await.map_err(|e| {
            Error::backend(
                NAME,
                format!("build context {}: {e}", req.context.display()),
            )
        })?;
        let docker = self
            .docker
            .clone()
            .with_timeout(Duration::from_secs(BUILD_ANSWER_SECS));
        let mut stream = docker.build_image(
            build_options(req),
            None,
            Some(bollard::body_try_stream(
                context_chunks(file).map_ok(bytes::Bytes::from),
            )),
        );
        while let Some(item) = stream.next().await {
            match item {
                // bollard turns an error with a message into `DockerStreamError`.
                Ok(info) if info.error_detail.is_some() => {
                    let error = serde_json::json!({ "error": "the engine ended the build" });
                    guard.tracker.message(&error, sink);
                }
                Ok(info) => guard.tracker.message(&build_message(info), sink),
                Err(BollardError::DockerStreamError { error }) => {
                    guard
                        .tracker
                        .message(&serde_json::json!({ "error": error }), sink);
                }
                Err(e) => {
                    guard.tracker.finish(sink);
                    return Err(build_request_error(&req.tag, e));
                }
            }
            if guard.tracker.out.error.is_some() {
                break;
            }
        }
        guard.tracker.finish(sink);
        match guard.tracker.out.error.as_deref() {
            Some(message) => Err(build_failure(
                message,
                guard.tracker.running_from().as_deref(),
            )),
            None => Ok(()),
        }
    }

    /// Whether other images are built on the image with id `id`.
    async fn has_children(&self, id: &str) -> Result<bool> {
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                all: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| self.map_err("images", e))?;
        Ok(images.iter().any(|i| i.parent_id == id))
    }
}

/// The engine's options for the build of `req`: classic builder, no pull, step
/// containers removed whatever happens, the request's limits (memory without swap) and
/// network.
fn build_options(req: &BuildRequest) -> BuildImageOptions {
    // bollard takes these as i32: builds get at most 2 GiB - 1 of memory.
    let memory =
        (req.memory_bytes > 0).then(|| i32::try_from(req.memory_bytes).unwrap_or(i32::MAX));
    let quota = (req.cpus > 0.0).then(|| {
        let quota = (req.cpus * f64::from(CPU_PERIOD)).round();
        // The engine refuses quotas under 1 ms.
        if quota >= f64::from(i32::MAX) {
            i32::MAX
        } else {
            (quota as i32).max(1000)
        }
    });
    BuildImageOptions {
        dockerfile: req.dockerfile.clone(),
        t: Some(req.tag.clone()),
        nocache: req.no_cache,
        pull: None,
        rm: true,
        forcerm: true,
        memory,
        // Memory plus swap: equal to the memory means no swap.
        memswap: memory,
        cpuperiod: quota.map(|_| CPU_PERIOD),
        cpuquota: quota,
        labels: (!req.labels.is_empty()).then(|| {
            req.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        networkmode: Some(if req.network { "default" } else { "none" }.into()),
        version: BuilderVersion::BuilderV1,
        ..Default::default()
    }
}

/// A build stream message as the engine sent it (the fields [`BuildOutput`] reads).
///
/// [`BuildOutput`]: sandbox_core::backend::BuildOutput
fn build_message(info: bollard::models::BuildInfo) -> serde_json::Value {
    let mut msg = serde_json::Map::new();
    if let Some(stream) = info.stream {
        msg.insert("stream".into(), stream.into());
    }
    if let Some(id) = info.aux.and_then(|a| a.id) {
        msg.insert("aux".into(), serde_json::json!({ "ID": id }));
    }
    msg.into()
}

/// The error of a build request that failed in transport or was refused.
fn build_request_error(tag: &str, e: BollardError) -> Error {
    match &e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } if is_build_context_problem(*status_code, message) => Error::BuildFailed(message.clone()),
        // The answer stopped mid-stream: the engine went away.
        BollardError::HyperResponseError { .. } => Error::EngineUnavailable(short_error(&e)),
        _ => map_error(&format!("build of {tag}"), e),
    }
}

/// The step images of a running build. Dropped while armed (the build's future was
/// dropped: the engine cancels a build whose connection closes), it has a task remove
/// the images seen so far.
struct StepImages {
    docker: Docker,
    tracker: StepTracker,
    armed: bool,
}

impl Drop for StepImages {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let images = self.tracker.step_images();
        if images.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let docker = self.docker.clone();
                runtime.spawn(async move {
                    tracing::debug!(?images, "removing the images of an abandoned build");
                    remove_step_images(&docker, images).await;
                });
            }
            Err(_) => tracing::warn!(
                ?images,
                "an abandoned build's images are left (no runtime to remove them)"
            ),
        }
    }
}

/// Removes a failed build's step images, newest first (each removal also takes the
/// untagged parents only it used). Tagged images, and those another image or a container
/// still needs, stay; a step container the engine is still removing is waited for.
async fn remove_step_images(docker: &Docker, images: Vec<String>) {
    const ATTEMPTS: u64 = 8;
    for id in images {
        // A step answered from the cache may be someone's tagged image.
        match docker.inspect_image(&id).await {
            Ok(i) if i.repo_tags.iter().flatten().any(|t| t != "<none>:<none>") => continue,
            Ok(_) => {}
            // Gone already (taken with a newer step's image), or the engine is away.
            Err(_) => continue,
        }
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
            ..Default::default()
        };
        for attempt in 1..=ATTEMPTS {
            match docker.remove_image(&id, Some(options.clone()), None).await {
                Ok(_) => {
                    tracing::debug!(image = %id, "removed an image of a failed build");
                    break;
                }
                Err(e)
                    if status(&e) == Some(409)
                        && short_error(&e).contains("being used by")
                        && attempt < ATTEMPTS =>
                {
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                }
                Err(e) => {
                    tracing::debug!(image = %id, error = %short_error(&e), "kept an image of a failed build");
                    break;
                }
            }
        }
    }
}

/// Whether the engine's storage enforces `--storage-opt size=`: btrfs and zfs always,
/// overlay2 only on XFS (mounted with project quotas, which the engine does not report;
/// without them every sized create fails, naming the mount option).
fn storage_has_quota(info: &bollard::models::SystemInfo) -> bool {
    match info.driver.as_deref() {
        Some("btrfs" | "zfs") => true,
        Some("overlay2") => backing_filesystem(info).as_deref() == Some("xfs"),
        _ => false,
    }
}

/// The filesystem under the storage driver, when the engine says (overlay2 does).
fn backing_filesystem(info: &bollard::models::SystemInfo) -> Option<String> {
    info.driver_status
        .as_ref()?
        .iter()
        .find(|kv| kv.first().map(String::as_str) == Some("Backing Filesystem"))?
        .get(1)
        .cloned()
}

/// What an image inspect says of the image.
fn image_info_of(i: bollard::models::ImageInspect) -> ImageInfo {
    let config = i.config.unwrap_or_default();
    ImageInfo {
        size: i.size.and_then(|s| u64::try_from(s).ok()),
        id: i.id,
        user: config.user,
        entrypoint: config.entrypoint,
        labels: config.labels.unwrap_or_default().into_iter().collect(),
    }
}

/// The HTTP status of an engine error response, if it is one.
fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn short_error(e: &BollardError) -> String {
    match e {
        BollardError::SocketNotFoundError(path) => format!("socket {path} does not exist"),
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        other => {
            let mut s = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(inner) = source {
                s = format!("{s}: {inner}");
                source = inner.source();
            }
            s
        }
    }
}

/// Maps a bollard error to the core error; `what` names the object of the call.
fn map_error(what: &str, e: BollardError) -> Error {
    match &e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => Error::not_found(what),
            409 => Error::Conflict(format!("{what}: {message}")),
            // Docker 20.10 answers 500 for a container in the wrong state.
            500 if message.contains("is not paused") || message.contains("is already paused") => {
                Error::Conflict(format!("{what}: {message}"))
            }
            _ => Error::backend(NAME, format!("{what}: {message}")),
        },
        BollardError::SocketNotFoundError(_)
        | BollardError::HyperLegacyError { .. }
        | BollardError::IOError { .. }
        | BollardError::RequestTimeoutError => Error::EngineUnavailable(short_error(&e)),
        _ => Error::backend(NAME, e),
    }
}

#[async_trait]
impl SandboxBackend for DockerBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.processes = true;
        caps.pause = true;
        caps.internal_networks = true;
        // Published ports mean an engine in a VM, which may forward to our loopback.
        caps.host_loopback_isolated = !self.published;
        caps.disk_quota = self.quota;
        caps.quota_counts_image = self.quota_counts_image;
        // The sandbox networks have inter-container traffic off.
        caps.isolated_sandboxes = true;
        caps
    }

    async fn check(&self) -> Result<EngineInfo> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| self.map_err("engine", e))?;
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| self.map_err("engine", e))?;
        Ok(EngineInfo {
            engine: v
                .platform
                .map(|p| p.name)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "Docker Engine".into()),
            version: v.version.unwrap_or_default(),
            api_version: self.docker.client_version().to_string(),
            endpoint: self.endpoint.clone(),
            cpus: info.ncpu.and_then(|n| u32::try_from(n).ok()),
            memory_bytes: info.mem_total.and_then(|n| u64::try_from(n).ok()),
            storage: info
                .driver
                .as_ref()
                .map(|driver| match backing_filesystem(&info) {
                    Some(fs) => format!("{driver} on {fs}"),
                    None => driver.clone(),
                }),
            cgroup_version: info.cgroup_version.as_ref().and_then(|v| match v {
                bollard::models::SystemInfoCgroupVersionEnum::_1 => Some(1),
                bollard::models::SystemInfoCgroupVersionEnum::_2 => Some(2),
                _ => None,
            }),
        })
    }

    async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(image_info_of(i))),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.map_err(&format!("image {image}"), e)),
        }
    }

    async fn ensure_image(&self, image: &str) -> Result<ImageInfo> {
        match self.docker.inspect_image(image).await {
            Ok(i) => return Ok(image_info_of(i)),
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(self.map_err(&format!("image {image}"), e)),
        }
        match self.pull(image).await {
            Ok(()) => self
                .docker
                .inspect_image(image)
                .await
                .map(image_info_of)
                .map_err(|e| self.map_err(&format!("image {image}"), e)),
            Err(e) => {
                let why = short_error(&e);
                match map_error("engine", e) {
                    unavailable @ Error::EngineUnavailable(_) => Err(unavailable),
                    _ => Err(Error::not_found(format!(
                        "image {image} (not present locally, and pulling it failed: {why}; \
                         build the default templates offline with deploy/images.sh)"
                    ))),
                }
            }
        }
    }

    /// Container create (never started), archive upload, commit, remove: offline, and
    /// the image keeps the base's layers.
    async fn derive_image(&self, req: &DeriveImage) -> Result<()> {
        derive_with(self, req).await
    }

    /// Classic builder; see the crate docs for what is checked first and removed after.
    async fn build_image(&self, req: &BuildRequest, sink: BuildSink<'_>) -> Result<ImageInfo> {
        self.check_bases(req).await?;
        let mut guard = StepImages {
            docker: self.docker.clone(),
            tracker: StepTracker::default(),
            armed: true,
        };
        let outcome = self.run_build(req, sink, &mut guard).await;
        guard.armed = false;
        if let Err(e) = outcome {
            remove_step_images(&self.docker, guard.tracker.step_images()).await;
            return Err(e);
        }
        guard.tracker.built_image(self, &req.tag).await
    }

    /// `DELETE /images/{image}` without force. An image that is the base of others is
    /// refused here, unless `image` is only one of its tags: the engine would just untag
    /// it and keep it.
    async fn remove_image(&self, image: &str) -> Result<()> {
        let what = format!("image {image}");
        let info = self
            .docker
            .inspect_image(image)
            .await
            .map_err(|e| self.map_err(&what, e))?;
        let tags: Vec<&String> = info
            .repo_tags
            .iter()
            .flatten()
            .filter(|t| *t != "<none>:<none>")
            .collect();
        let untag_only = tags.len() > 1
            && tags
                .iter()
                .any(|t| *t == image || **t == format!("{image}:latest"));
        if let (false, Some(id)) = (untag_only, info.id.as_deref()) {
            if self.has_children(id).await? {
                return Err(Error::Conflict(format!(
                    "{what}: other images are built on it"
                )));
            }
        }
        self.docker
            .remove_image(image, Some(RemoveImageOptions::default()), None)
            .await
            .map(drop)
            .map_err(|e| self.map_err(&what, e))
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo> {
        if spec.limits.disk_mb.is_some() && !self.quota {
            return Err(Error::Unsupported {
                backend: NAME,
                operation: "a disk quota (the engine's storage has no quotas)",
            });
        }
        let (online, offline) = self.ensure_networks().await?;
        let network = if spec.internet { online } else { offline };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), self.container_body(spec, network))
            .await
            .map_err(|e| match status(&e) {
                Some(404) => Error::not_found(format!("image {}", spec.image)),
                _ => self.map_err(&format!("container {}", spec.name), e),
            })?;
        if let Err(e) = self
            .docker
            .start_container(&spec.name, None::<StartContainerOptions>)
            .await
        {
            // A failed create leaves nothing behind.
            let _ = self.remove(&spec.name).await;
            return Err(self.map_err(&format!("container {}", spec.name), e));
        }
        match self.inspect(&spec.name).await {
            Ok(info) => Ok(info),
            Err(e) => {
                let _ = self.remove(&spec.name).await;
                Err(e)
            }
        }
    }

    async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        let c = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))?;
        Ok(convert::from_inspect(c))
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.map_err("containers", e))?;
        Ok(containers.into_iter().map(convert::from_summary).collect())
    }

    async fn pause(&self, name: &str) -> Result<()> {
        self.docker
            .pause_container(name)
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))
    }

    async fn resume(&self, name: &str) -> Result<()> {
        self.docker
            .unpause_container(name)
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))
    }

    async fn remove(&self, name: &str) -> Result<()> {
        // force kills with SIGKILL: no graceful stop that waits for the stop timeout.
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        self.docker
            .remove_container(name, Some(options))
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))
    }

    /// The bridges of the sandbox networks: `com.docker.network.bridge.name`, else
    /// `br-` and the first 12 characters of the network's id (the engine's naming).
    async fn host_networks(&self) -> Result<Vec<HostNetwork>> {
        if self.published {
            return Ok(Vec::new());
        }
        let (online, offline) = self.ensure_networks().await?;
        let mut out = Vec::new();
        for id in [online, offline] {
            let net = self
                .docker
                .inspect_network(id, None)
                .await
                .map_err(|e| self.map_err(&format!("network {id}"), e))?;
            let interface = net
                .options
                .as_ref()
                .and_then(|o| o.get("com.docker.network.bridge.name"))
                .cloned()
                .unwrap_or_else(|| format!("br-{}", &id[..id.len().min(12)]));
            let subnets = net
                .ipam
                .and_then(|i| i.config)
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.subnet.as_deref()?.parse().ok())
                .collect();
            out.push(HostNetwork {
                name: net.name.unwrap_or_else(|| id.clone()),
                interface,
                subnets,
            });
        }
        Ok(out)
    }

    async fn stop(&self, name: &str) -> Result<()> {
        // SIGKILL by default: what `remove` does first, without the storage's deletion.
        self.docker
            .kill_container(name, None)
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))
    }

    async fn snapshot(
        &self,
        name: &str,
        image: &str,
        labels: &BTreeMap<String, String>,
        running: bool,
    ) -> Result<ImageInfo> {
        sandbox_core::backend::image::snapshot_with(self, name, image, labels, running).await
    }

    async fn list_images(&self, label: &str) -> Result<Vec<ImageEntry>> {
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![label.to_string()],
            )])),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|e| self.map_err("images", e))?;
        Ok(images
            .into_iter()
            .map(|i| ImageEntry {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                labels: i.labels.into_iter().collect(),
                created: i.created,
            })
            .collect())
    }

    async fn start(&self, name: &str) -> Result<ContainerInfo> {
        self.docker
            .start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))?;
        self.inspect(name).await
    }

    async fn create_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let what = format!("volume {name}");
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.to_string()),
                labels: Some(labels.clone().into_iter().collect()),
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| self.map_err(&what, e))
    }

    async fn list_volumes(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let filters = HashMap::from([(
            "label".to_string(),
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )]);
        let found = self
            .docker
            .list_volumes(Some(ListVolumesOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.map_err("volumes", e))?;
        Ok(found
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.name, v.labels.into_iter().collect()))
            .collect())
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        let what = format!("volume {name}");
        self.docker
            .remove_volume(name, None::<RemoveVolumeOptions>)
            .await
            .map_err(|e| self.map_err(&what, e))
    }

    async fn disk_usage(&self, name: &str) -> Result<Option<u64>> {
        let c = self
            .docker
            .inspect_container(
                name,
                Some(
                    bollard::query_parameters::InspectContainerOptionsBuilder::new()
                        .size(true)
                        .build(),
                ),
            )
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))?;
        let bytes = if self.quota_counts_image {
            c.size_root_fs
        } else {
            c.size_rw
        };
        Ok(bytes.and_then(|b| u64::try_from(b).ok()))
    }

    async fn agent_address(&self, name: &str, port: u16) -> Result<AgentAddress> {
        let c = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))?;
        let settings = c.network_settings.unwrap_or_default();
        if self.published {
            let host_port = settings
                .ports
                .as_ref()
                .and_then(|p| p.get(&format!("{port}/tcp")))
                .and_then(|b| b.as_ref())
                .and_then(|b| {
                    b.iter()
                        .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
                });
            return host_port
                .map(|p| AgentAddress {
                    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p),
                })
                .ok_or_else(|| Error::not_found(format!("published port {port} of {name}")));
        }
        let ip = settings
            .networks
            .unwrap_or_default()
            .into_values()
            .find_map(|n| {
                n.ip_address
                    .filter(|ip| !ip.is_empty())?
                    .parse::<IpAddr>()
                    .ok()
            });
        ip.map(|ip| AgentAddress {
            addr: SocketAddr::new(ip, port),
        })
        .ok_or_else(|| Error::not_found(format!("IP address of {name}")))
    }
}

#[async_trait]
impl DeriveSteps for DockerBackend {
    async fn image_exists(&self, tag: &str) -> Result<bool> {
        match self.docker.inspect_image(tag).await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(self.map_err(&format!("image {tag}"), e)),
        }
    }

    async fn create_stopped(
        &self,
        name: &str,
        base: &str,
        entrypoint: &[String],
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(base.to_string()),
                    entrypoint: Some(entrypoint.to_vec()),
                    labels: Some(labels.clone().into_iter().collect()),
                    network_disabled: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map(drop)
            .map_err(|e| match status(&e) {
                Some(404) => Error::not_found(format!("image {base}")),
                _ => self.map_err(&format!("container {name}"), e),
            })
    }

    async fn upload(&self, name: &str, archive: Vec<u8>) -> Result<()> {
        self.docker
            .upload_to_container(
                name,
                Some(UploadToContainerOptions {
                    path: "/".into(),
                    ..Default::default()
                }),
                bollard::body_full(archive.into()),
            )
            .await
            .map_err(|e| self.map_err(&format!("container {name}"), e))
    }

    async fn commit(
        &self,
        name: &str,
        repo: &str,
        tag: &str,
        changes: &[String],
        pause: bool,
    ) -> Result<()> {
        self.docker
            .commit_container(
                CommitContainerOptions {
                    container: Some(name.to_string()),
                    repo: Some(repo.to_string()),
                    tag: Some(tag.to_string()),
                    changes: Some(changes.join("\n")),
                    pause,
                    ..Default::default()
                },
                ContainerConfig::default(),
            )
            .await
            .map(drop)
            .map_err(|e| self.map_err(&format!("image {repo}:{tag}"), e))
    }

    async fn remove_temporary(&self, name: &str) -> Result<()> {
        SandboxBackend::remove(self, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_host_is_used_alone() {
        let config = DockerConfig {
            host: Some("unix:///tmp/x.sock".into()),
            ..Default::default()
        };
        let c = candidates(&config, Some("tcp://elsewhere:2375"), None);
        assert_eq!(c, vec![("unix:///tmp/x.sock".to_string(), "configuration")]);
        let c = candidates(
            &DockerConfig::default(),
            Some("tcp://elsewhere:2375"),
            Some(std::path::Path::new("/home/u")),
        );
        assert_eq!(c, vec![("tcp://elsewhere:2375".to_string(), "DOCKER_HOST")]);
    }

    #[test]
    fn discovery_tries_colima_then_the_system_socket() {
        let home = std::path::Path::new("/home/u");
        let c = candidates(&DockerConfig::default(), None, Some(home));
        assert_eq!(
            c,
            vec![
                (
                    "unix:///home/u/.colima/default/docker.sock".to_string(),
                    "Colima"
                ),
                ("unix:///var/run/docker.sock".to_string(), "system socket"),
            ]
        );
        // An empty DOCKER_HOST counts as unset.
        assert_eq!(
            candidates(&DockerConfig::default(), Some(""), Some(home)),
            c
        );
        let colima = candidates(
            &DockerConfig {
                colima: true,
                colima_profile: "work".into(),
                ..Default::default()
            },
            None,
            Some(home),
        );
        assert_eq!(
            colima,
            vec![(
                "unix:///home/u/.colima/work/docker.sock".to_string(),
                "Colima"
            )]
        );
        assert!(candidates(
            &DockerConfig {
                colima: true,
                ..Default::default()
            },
            None,
            None
        )
        .is_empty());
    }

    #[test]
    fn engine_errors_map_to_core_errors() {
        let e = BollardError::DockerResponseServerError {
            status_code: 404,
            message: "no such container".into(),
        };
        assert!(matches!(
            map_error("container x", e),
            Error::NotFound { .. }
        ));
        let e = BollardError::DockerResponseServerError {
            status_code: 409,
            message: "is paused".into(),
        };
        assert!(matches!(map_error("container x", e), Error::Conflict(_)));
        let e = BollardError::SocketNotFoundError("/nope".into());
        assert!(matches!(map_error("x", e), Error::EngineUnavailable(_)));
    }
}
