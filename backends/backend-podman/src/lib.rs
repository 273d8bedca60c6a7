//! Podman backend for colima-e2b, on the libpod API through `podman-api`.
//!
//! # What it does
//! Implements [`SandboxBackend`] for Podman: every sandbox is one container created and
//! started with the baseline profile (see [`PodmanBackend`]), attached to a dedicated
//! bridge network, or to an `internal` network (no route out) when internet is off.
//!
//! # Tested versions
//! Podman 4.3.1 (Debian 12; rootful, CNI network backend, runc, cgroup v1 with cgroupfs),
//! libpod API v4. Inspect and list answers are read as plain JSON rather than through
//! podman-api's typed models, which target libpod 4.3.1 and break on Podman 5 (for example
//! `Config.StopSignal` became a string); the fields read are the same in Podman 5, but
//! Podman 5 itself was not available to test against.
//!
//! # Differences from Docker
//! - Container-to-container traffic on one network cannot be blocked: Podman 4.3 has no
//!   equivalent of Docker's `com.docker.network.bridge.enable_icc=false` (neither with CNI
//!   nor netavark). Networks are created with `isolate=true`, which only blocks traffic
//!   between *different* isolated networks.
//! - With the CNI network backend an `internal` network has no gateway on the host, so
//!   the host cannot reach its containers, neither by IP nor through a published port:
//!   `internet: false` together with an `agent_port` is refused there with
//!   [`Error::Unsupported`] (use netavark).
//! - Containers can reach the host's address on their bridge (as with Docker): the server
//!   must not listen on 0.0.0.0.
//! - Rootless Podman (and remote engines) cannot route to container IPs, so the agent port
//!   is published on 127.0.0.1 instead; rootless on cgroup v1 cannot pause or read stats.
//! - Image builds (libpod's `/build`, buildah): `RUN` steps would share the host's network
//!   namespace unless asked otherwise (see the `build` module), so every build asks for a
//!   private one. A build whose client goes away keeps running inside the service: when a
//!   build's future is dropped, a task reads the build to its end and then removes what
//!   it produced (its result too). Images do not depend on their parent images (layers
//!   are shared), so removing an image others were built on is not refused.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containers_api::conn::hyper::{self, Body, Response};
use containers_api::conn::{
    get_http_connector, get_unix_connector, Error as ConnError, Headers, Payload, RequestClient,
    Transport,
};
use futures_util::StreamExt;
use podman_api::opts::{ContainerDeleteOpts, NetworkCreateOpts, PullOpts};
use podman_api::{ApiVersion, Podman};
use sandbox_core::backend::image::{derive_with, DeriveSteps};
use sandbox_core::backend::{
    build_failure, context_chunks, is_build_context_problem, BuildEvent, BuildRequest, BuildSink,
    HostNetwork, ImageEntry, StepTracker,
};
use sandbox_core::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, EngineInfo, Error,
    ImageInfo, Result, SandboxBackend, SandboxState,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod build;
pub mod discovery;
pub mod wire;

const BACKEND: &str = "podman";
/// libpod API prefix: v4 paths are served by Podman 4.x and 5.x alike.
const API: &str = "/v4.0.0/libpod";
/// Label put on the networks this backend creates.
const NETWORK_LABEL: &str = "dev.colima-e2b.network";

/// Settings of the Podman backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodmanConfig {
    /// Service URL (`unix:///path`, or `tcp://host:port`); `None` discovers it
    /// (see [`discovery::candidates`]).
    pub socket: Option<String>,
    /// Bridge network for sandboxes with internet, created on first use.
    pub network: String,
    /// `internal` network (no route out) for sandboxes without internet, created on first use.
    pub offline_network: String,
    /// Always publish the agent port on 127.0.0.1, even where the container IP is
    /// reachable (rootless and remote engines publish regardless).
    pub publish_agent_port: bool,
    /// Processes per user (soft = hard), given because libpod otherwise raises it to its
    /// own maximum, which runc cannot set where the host's hard limit is lower. The pids
    /// limit is the real per-sandbox cap.
    pub ulimit_nproc: u64,
    /// Log driver: `k8s-file` (capped at the profile's log size) or `none`. Sandbox
    /// output goes through the agent, so the engine log only serves debugging.
    pub log_driver: String,
    /// How long connecting may take per socket, in seconds. Generous: the first answer
    /// (`/info`) waits for Podman's storage lock, which a commit of a large image (the
    /// code interpreter's, about 1 GB) holds for many seconds; a socket nobody listens
    /// on fails at once anyway.
    pub connect_timeout_secs: u64,
    /// How long pulling a missing image may take, in seconds.
    pub pull_timeout_secs: u64,
}

impl Default for PodmanConfig {
    fn default() -> Self {
        Self {
            socket: None,
            network: "colima-e2b".into(),
            offline_network: "colima-e2b-offline".into(),
            publish_agent_port: false,
            ulimit_nproc: 16384,
            log_driver: "k8s-file".into(),
            connect_timeout_secs: 60,
            pull_timeout_secs: 900,
        }
    }
}

/// What the engine told us about its host when we connected.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostFacts {
    rootless: bool,
    /// `cni` or `netavark` (empty when the engine did not say).
    network_backend: String,
    /// `v1` or `v2`.
    cgroup_version: String,
    /// The storage driver enforces per-container sizes (`storage_opts.size`).
    quota: bool,
    /// The size limit covers the whole root filesystem, image included (btrfs, zfs).
    quota_counts_image: bool,
    /// Podman's version, major and minor (`None` when the engine did not say).
    version: Option<(u32, u32)>,
}

/// The Podman implementation of [`SandboxBackend`].
///
/// # Baseline profile of every container
/// never privileged; all capabilities dropped but [`sandbox_core::backend::SANDBOX_CAPABILITIES`]; `no-new-privileges`;
/// the default seccomp profile; pids, memory (swap equal to memory, so no swap) and CPU
/// quota limits; `nofile`, `nproc` and `fsize` ulimits; no host namespaces, mounts or
/// devices; a size-capped `k8s-file` log; the spec's labels, env, command and user.
pub struct PodmanBackend {
    podman: Podman,
    /// The same service through containers-api directly, for the calls whose podman-api
    /// typed form is wrong or fragile (see [`wire`]).
    raw: Arc<RequestClient<ConnError>>,
    endpoint: String,
    config: PodmanConfig,
    host: HostFacts,
    /// Networks known to exist; the lock also serialises their creation.
    networks_ready: tokio::sync::Mutex<HashSet<String>>,
}

impl fmt::Display for PodmanBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "podman ({})", self.endpoint)
    }
}

impl fmt::Debug for PodmanBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodmanBackend")
            .field("endpoint", &self.endpoint)
            .field("rootless", &self.host.rootless)
            .field("network_backend", &self.host.network_backend)
            .field("cgroup_version", &self.host.cgroup_version)
            .field("config", &self.config)
            .finish()
    }
}

type Validated = Pin<Box<dyn Future<Output = Result<Response<Body>, ConnError>> + Send + Sync>>;

/// Turns a non-2xx answer into [`ConnError::Fault`] with libpod's message.
fn validate(response: Response<Body>) -> Validated {
    Box::pin(async move {
        let status = response.status();
        if status.is_success() || status == hyper::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(response);
        }
        let bytes = hyper::body::to_bytes(response.into_body()).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                let msg = v.get("message").and_then(Value::as_str)?.to_string();
                Some(msg)
            })
            .unwrap_or(text);
        Err(ConnError::Fault {
            code: status,
            message,
        })
    })
}

fn raw_client(url: &str) -> std::result::Result<RequestClient<ConnError>, String> {
    let transport = if let Some(path) = url.strip_prefix("unix://") {
        Transport::Unix {
            // No idle pooling: the service may restart, and stale pooled connections
            // would turn into errors on the next call.
            client: hyper::Client::builder()
                .pool_max_idle_per_host(0)
                .build(get_unix_connector()),
            path: path.into(),
        }
    } else if let Some(host) = url
        .strip_prefix("tcp://")
        .or_else(|| url.strip_prefix("http://"))
    {
        let host = containers_api::url::url::Url::parse(&format!("tcp://{host}"))
            .map_err(|e| format!("invalid URL {url}: {e}"))?;
        Transport::Tcp {
            client: hyper::Client::builder().build(get_http_connector()),
            host,
        }
    } else {
        return Err(format!(
            "unsupported scheme in {url} (use unix:// or tcp://; for ssh:// forward the socket)"
        ));
    };
    Ok(RequestClient::new(transport, Box::new(validate)))
}

/// Percent-encodes a container or network name for a URL path.
fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether an I/O error means the service is not there (socket missing, refused, reset).
fn io_means_unavailable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        NotFound
            | ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | PermissionDenied
            | UnexpectedEof
            | TimedOut
    )
}

/// Whether a transport error means the engine went away (not a bad request).
fn conn_unavailable(e: &ConnError) -> bool {
    match e {
        ConnError::Hyper(h) => {
            if h.is_connect() || h.is_closed() || h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
            let mut source = std::error::Error::source(h);
            while let Some(s) = source {
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    return io_means_unavailable(io);
                }
                source = s.source();
            }
            false
        }
        ConnError::IO(io) => io_means_unavailable(io),
        _ => false,
    }
}

/// Maps an error answer from libpod to the core error for `what`.
///
/// libpod 4.3 answers 500 for many client errors (name in use, image not known, wrong
/// state), so the message text, which ends with libpod's stable cause, is looked at too.
fn fault(code: u16, message: &str, what: &str) -> Error {
    let has = |cause: &str| message.contains(cause);
    if code == 404 || has("no such container") || has("image not known") || has("no such image") {
        Error::not_found(what)
    } else if code == 409
        || has("already in use")
        || has("already exists")
        || has("state improper")
        || has("already paused")
        || has("image is in use")
        || has("dependent child")
    {
        Error::Conflict(format!("{what}: {message}"))
    } else {
        Error::backend(BACKEND, format!("{what}: HTTP {code}: {message}"))
    }
}

impl PodmanBackend {
    /// Connects to the Podman service and checks that it answers.
    ///
    /// The socket is `config.socket`, else `CONTAINER_HOST`, else the rootless
    /// `$XDG_RUNTIME_DIR/podman/podman.sock` (if present), else `/run/podman/podman.sock`.
    /// Fails with [`Error::EngineUnavailable`] naming every socket tried and how to start
    /// the service.
    pub async fn connect(config: PodmanConfig) -> Result<Self> {
        let candidates = discovery::from_env(config.socket.as_deref());
        let mut failures = Vec::new();
        for url in &candidates {
            match Self::connect_to(url, &config).await {
                Ok(backend) => {
                    tracing::info!(
                        endpoint = %url,
                        rootless = backend.host.rootless,
                        network_backend = %backend.host.network_backend,
                        "connected to podman"
                    );
                    return Ok(backend);
                }
                Err(why) => failures.push(format!("{url}: {why}")),
            }
        }
        Err(Error::EngineUnavailable(format!(
            "cannot reach the Podman service (tried {}). Start it with \
             `podman system service --time=0 unix:///run/podman/podman.sock` as root, or \
             `systemctl --user start podman.socket` rootless, or point CONTAINER_HOST or the \
             `socket` setting at a running service",
            failures.join("; ")
        )))
    }

    async fn connect_to(url: &str, config: &PodmanConfig) -> std::result::Result<Self, String> {
        let podman = Podman::new_versioned(url, ApiVersion::new(4, Some(0), Some(0)))
            .map_err(|e| e.to_string())?;
        let raw = Arc::new(raw_client(url)?);
        let timeout = Duration::from_secs(config.connect_timeout_secs.max(1));
        let info: Value = tokio::time::timeout(timeout, raw.get_json(format!("{API}/info")))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let host = info.get("host");
        let text = |path: &[&str]| {
            host.and_then(|h| path.iter().try_fold(h, |v, k| v.get(k)))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let facts = HostFacts {
            rootless: host
                .and_then(|h| h.get("security"))
                .and_then(|s| s.get("rootless"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            network_backend: text(&["networkBackend"]),
            cgroup_version: text(&["cgroupVersion"]),
            quota: wire::storage_has_quota(&info),
            quota_counts_image: match info
                .get("store")
                .and_then(|s| s.get("graphDriverName"))
                .and_then(Value::as_str)
            {
                Some("zfs") => true,
                Some("btrfs") => {
                    sandbox_core::backend::quota::btrfs_quota_counts_image(std::path::Path::new(
                        info.get("store")
                            .and_then(|s| s.get("graphRoot"))
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    ))
                }
                _ => false,
            },
            version: build::major_minor(
                info.get("version")
                    .and_then(|v| v.get("Version"))
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            ),
        };
        Ok(Self {
            podman,
            raw,
            endpoint: url.to_string(),
            config: config.clone(),
            host: facts,
            networks_ready: tokio::sync::Mutex::new(HashSet::new()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &PodmanConfig {
        &self.config
    }

    /// Where the backend is connected (socket URL).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The raw libpod inspect answer of a container, for callers that need more than
    /// [`ContainerInfo`] (e.g. checking the applied profile).
    pub async fn inspect_json(&self, name: &str) -> Result<Value> {
        self.raw
            .get_json(format!("{API}/containers/{}/json", path_segment(name)))
            .await
            .map_err(|e| self.conn_err(e, &format!("container {name}")))
    }

    /// The raw libpod inspect answer of a network.
    pub async fn network_json(&self, name: &str) -> Result<Value> {
        self.raw
            .get_json(format!("{API}/networks/{}/json", path_segment(name)))
            .await
            .map_err(|e| self.conn_err(e, &format!("network {name}")))
    }

    /// The engine's network backend (`cni` or `netavark`; empty if it did not say).
    pub fn network_backend(&self) -> &str {
        &self.host.network_backend
    }

    /// Whether the engine runs rootless.
    pub fn rootless(&self) -> bool {
        self.host.rootless
    }

    fn local(&self) -> bool {
        self.endpoint.starts_with("unix://")
    }

    /// Container IPs are routable only from the host of a rootful, local engine.
    fn must_publish(&self) -> bool {
        self.config.publish_agent_port || self.host.rootless || !self.local()
    }

    fn unavailable(&self, e: impl fmt::Display) -> Error {
        Error::EngineUnavailable(format!(
            "podman at {} does not answer ({e}); is `podman system service` running?",
            self.endpoint
        ))
    }

    fn conn_err(&self, e: ConnError, what: &str) -> Error {
        if conn_unavailable(&e) {
            return self.unavailable(e);
        }
        match e {
            ConnError::Fault { code, message } => fault(code.as_u16(), &message, what),
            other => Error::backend(BACKEND, format!("{what}: {other}")),
        }
    }

    fn api_err(&self, e: podman_api::Error, what: &str) -> Error {
        match e {
            podman_api::Error::Fault { code, message } => fault(code.as_u16(), &message, what),
            podman_api::Error::Error(c) => self.conn_err(c, what),
            podman_api::Error::IO(io) if io_means_unavailable(&io) => self.unavailable(io),
            other => Error::backend(BACKEND, format!("{what}: {other}")),
        }
    }

    /// Makes sure network `name` exists with the wanted `internal` setting.
    async fn ensure_network(&self, name: &str, internal: bool) -> Result<()> {
        let mut ready = self.networks_ready.lock().await;
        if ready.contains(name) {
            return Ok(());
        }
        match self.network_json(name).await {
            Ok(net) => {
                let is_internal = net
                    .get("internal")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if is_internal != internal {
                    // Never attach offline sandboxes to a network with a way out (or the
                    // reverse) just because someone made one with our name.
                    return Err(Error::Conflict(format!(
                        "network {name} exists with internal={is_internal}, expected \
                         internal={internal}; remove it (`podman network rm {name}`) or \
                         configure another name"
                    )));
                }
            }
            Err(Error::NotFound { .. }) => {
                let opts = NetworkCreateOpts::builder()
                    .name(name)
                    .driver("bridge")
                    .internal(internal)
                    // Sandboxes use the host's resolvers; no per-network DNS server.
                    .dns_enabled(false)
                    // Blocks traffic to and from other isolated networks (not within one).
                    .options([("isolate", "true")])
                    .labels([(NETWORK_LABEL, "true")])
                    .build();
                match self.podman.networks().create(&opts).await {
                    Ok(_) => tracing::info!(network = name, internal, "created podman network"),
                    // Another server created it meanwhile.
                    Err(podman_api::Error::Fault { code, .. }) if code.as_u16() == 409 => {}
                    Err(e) => return Err(self.api_err(e, &format!("network {name}"))),
                }
            }
            Err(e) => return Err(e),
        }
        ready.insert(name.to_string());
        Ok(())
    }

    /// Force-removes without waiting, ignoring "already gone".
    async fn remove_quietly(&self, name: &str) {
        match self.remove(name).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(container = name, error = %e, "could not remove container"),
        }
    }

    async fn image_info_json(&self, image: &str) -> Result<ImageInfo> {
        let v: Value = self
            .raw
            .get_json(format!("{API}/images/{}/json", path_segment(image)))
            .await
            .map_err(|e| self.conn_err(e, &format!("image {image}")))?;
        Ok(ImageInfo {
            size: v.get("Size").and_then(Value::as_u64),
            id: v.get("Id").and_then(Value::as_str).map(str::to_string),
            user: v
                .pointer("/Config/User")
                .and_then(Value::as_str)
                .map(str::to_string),
            entrypoint: v
                .pointer("/Config/Entrypoint")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                }),
            labels: v
                .pointer("/Config/Labels")
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The error of a build request that libpod refused or that failed in transport.
    fn build_request_error(&self, e: ConnError, tag: &str) -> Error {
        if let ConnError::Fault { code, message } = &e {
            if is_build_context_problem(code.as_u16(), message) {
                return Error::BuildFailed(message.clone());
            }
        }
        self.conn_err(e, &format!("build of {tag}"))
    }

    async fn start_and_inspect(&self, name: &str) -> Result<ContainerInfo> {
        self.podman
            .containers()
            .get(name)
            .start(None)
            .await
            .map_err(|e| self.api_err(e, &format!("container {name}")))?;
        self.inspect(name).await
    }
}

#[async_trait]
impl SandboxBackend for PodmanBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// Pause (the cgroup freezer) is unavailable only to rootless Podman on cgroup v1,
    /// which gets no cgroup delegation. Internal networks work everywhere (but see the
    /// CNI note in `create`).
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.processes = true;
        caps.pause = !(self.host.rootless && self.host.cgroup_version == "v1");
        caps.internal_networks = true;
        // Rootless networking (slirp4netns, pasta) and remote engines may forward
        // sandbox traffic to this host's loopback.
        caps.host_loopback_isolated = self.local() && !self.host.rootless;
        caps.disk_quota = self.host.quota;
        caps.quota_counts_image = self.host.quota_counts_image;
        // Podman 4.3 cannot turn off traffic between containers of one network.
        caps.isolated_sandboxes = false;
        caps
    }

    async fn check(&self) -> Result<EngineInfo> {
        let info: Value = self
            .raw
            .get_json(format!("{API}/info"))
            .await
            .map_err(|e| self.conn_err(e, "engine info"))?;
        let field = |k: &str| {
            info.get("version")
                .and_then(|v| v.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let host = &info["host"];
        let store = &info["store"];
        let driver = store["graphDriverName"].as_str().unwrap_or_default();
        let backing = store["graphStatus"]["Backing Filesystem"]
            .as_str()
            .unwrap_or_default();
        Ok(EngineInfo {
            engine: "Podman Engine".into(),
            version: field("Version"),
            api_version: field("APIVersion"),
            endpoint: self.endpoint.clone(),
            cpus: host["cpus"].as_u64().and_then(|n| u32::try_from(n).ok()),
            memory_bytes: host["memTotal"].as_u64(),
            storage: (!driver.is_empty()).then(|| match backing {
                "" => driver.to_string(),
                fs => format!("{driver} on {fs}"),
            }),
            cgroup_version: match host["cgroupVersion"].as_str() {
                Some("v1") => Some(1),
                Some("v2") => Some(2),
                _ => None,
            },
        })
    }

    async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        match self.image_info_json(image).await {
            Ok(info) => Ok(Some(info)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn ensure_image(&self, image: &str) -> Result<ImageInfo> {
        let what = format!("image {image}");
        let exists = self
            .podman
            .images()
            .get(image)
            .exists()
            .await
            .map_err(|e| self.api_err(e, &what))?;
        if exists {
            return self.image_info_json(image).await;
        }
        tracing::info!(image, "image not present locally, pulling");
        let opts = PullOpts::builder().reference(image).build();
        let images = self.podman.images();
        let pull = async {
            let mut stream = images.pull(&opts);
            let mut failure: Option<String> = None;
            let mut pulled = false;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(report) => {
                        if let Some(line) = report.stream.as_deref().map(str::trim) {
                            if !line.is_empty() {
                                tracing::info!(image, "pull: {line}");
                            }
                        }
                        if let Some(e) = report.error {
                            failure = Some(e);
                        }
                        if report.id.is_some() || report.images.is_some_and(|i| !i.is_empty()) {
                            pulled = true;
                        }
                    }
                    Err(e) => match self.api_err(e, &what) {
                        unavailable @ Error::EngineUnavailable(_) => return Err(unavailable),
                        other => failure = Some(other.to_string()),
                    },
                }
            }
            Ok((pulled, failure))
        };
        let timeout = Duration::from_secs(self.config.pull_timeout_secs.max(1));
        let (pulled, failure) = tokio::time::timeout(timeout, pull)
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        match (pulled, failure) {
            (true, None) => {
                tracing::info!(image, "pulled");
                self.image_info_json(image).await
            }
            (_, failure) => Err(Error::not_found(format!(
                "image {image} (not present locally and the pull failed: {})",
                failure.unwrap_or_else(|| "no image reported".into())
            ))),
        }
    }

    /// Container create (never started), archive upload, commit, remove: offline, and
    /// the image keeps the base's layers.
    async fn derive_image(&self, req: &DeriveImage) -> Result<()> {
        derive_with(self, req).await
    }

    /// `POST /libpod/build` with the context streamed from disk; see the crate docs for
    /// the network and for builds whose future is dropped.
    async fn build_image(&self, req: &BuildRequest, sink: BuildSink<'_>) -> Result<ImageInfo> {
        // Two engine faults end a build without anything of its own being wrong (see
        // `build::Rerun`); both leave the steps done so far in the layer cache, so the
        // build is run again and resumes where it was cut.
        let mut attempts = 1;
        loop {
            match self.build_once(req, sink).await {
                Err(Error::BuildFailed(m)) if attempts < build::RERUN_ATTEMPTS => {
                    let Some(why) = build::Rerun::of(&m, self.host.version) else {
                        return Err(Error::BuildFailed(m));
                    };
                    attempts += 1;
                    tracing::warn!(tag = %req.tag, error = %m, attempt = attempts,
                        "{}; building again", why.explain());
                    sink(BuildEvent::Output(format!(
                        "podman: {m}: {}; building again (attempt {attempts} of {})",
                        why.explain(),
                        build::RERUN_ATTEMPTS
                    )));
                }
                other => return other,
            }
        }
    }

    /// `DELETE /libpod/images/{image}` without force.
    async fn remove_image(&self, image: &str) -> Result<()> {
        self.raw
            .delete(format!("{API}/images/{}", path_segment(image)))
            .await
            .map(drop)
            .map_err(|e| self.conn_err(e, &format!("image {image}")))
    }

    async fn create_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let what = format!("volume {name}");
        let body = serde_json::json!({ "Name": name, "Labels": labels });
        match self
            .raw
            .post_string(
                format!("{API}/volumes/create"),
                Payload::Json(body.to_string()),
                Headers::none(),
            )
            .await
            .map_err(|e| self.conn_err(e, &what))
        {
            // Docker keeps an existing volume; so does this backend.
            Ok(_) | Err(Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_volumes(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters = serde_json::json!({ "label": wanted }).to_string();
        let query = containers_api::url::encoded_pairs([("filters", filters)]);
        let answer: Value = self
            .raw
            .get_json(format!("{API}/volumes/json?{query}"))
            .await
            .map_err(|e| self.conn_err(e, "volumes"))?;
        let entries = answer.as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(entries
            .iter()
            .filter_map(|v| {
                let name = v.get("Name")?.as_str()?.to_string();
                let labels = v
                    .get("Labels")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                Some((name, labels))
            })
            // libpod ORs label filters; every pair must match.
            .filter(|(_, found): &(String, BTreeMap<String, String>)| {
                labels
                    .iter()
                    .all(|(k, v)| found.get(*k).map(String::as_str) == Some(*v))
            })
            .collect())
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        self.raw
            .delete(format!("{API}/volumes/{}", path_segment(name)))
            .await
            .map(drop)
            .map_err(|e| self.conn_err(e, &format!("volume {name}")))
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerInfo> {
        if spec.limits.disk_mb.is_some() && !self.host.quota {
            return Err(Error::Unsupported {
                backend: BACKEND,
                operation: "a disk quota (the engine's storage has no quotas)",
            });
        }
        if !spec.internet && spec.agent_port.is_some() && self.host.network_backend == "cni" {
            return Err(Error::Unsupported {
                backend: BACKEND,
                operation: "internet off with a reachable agent on the CNI network backend \
                            (internal CNI networks have no host gateway; use netavark)",
            });
        }
        let (network, internal) = if spec.internet {
            (self.config.network.clone(), false)
        } else {
            (self.config.offline_network.clone(), true)
        };
        let place = wire::Placement {
            network: network.clone(),
            publish_agent_port: self.must_publish(),
        };
        let body = wire::create_body(spec, &self.config, &place)?;
        self.ensure_network(&network, internal).await?;

        let created = self
            .raw
            .post_string(
                format!("{API}/containers/create"),
                Payload::Json(body.to_string()),
                Headers::none(),
            )
            .await;
        if let Err(e) = created {
            let message = match &e {
                ConnError::Fault { message, .. } => message.clone(),
                _ => String::new(),
            };
            if message.contains("network not found") {
                // Someone removed our network: check it again next time.
                self.networks_ready.lock().await.remove(&network);
                return Err(Error::backend(
                    BACKEND,
                    format!("network {network}: {message}"),
                ));
            }
            let err = self.conn_err(e, &format!("image {}", spec.image));
            match err {
                // The name belongs to an existing container that is not ours to remove.
                Error::Conflict(_) => {
                    return Err(Error::Conflict(format!(
                        "container {} already exists: {message}",
                        spec.name
                    )))
                }
                Error::NotFound { .. } | Error::EngineUnavailable(_) => return Err(err),
                _ => {
                    // A create that failed after the container came to exist leaves nothing.
                    self.remove_quietly(&spec.name).await;
                    return Err(err);
                }
            }
        }
        match self.start_and_inspect(&spec.name).await {
            Ok(info) => Ok(info),
            Err(e) => {
                self.remove_quietly(&spec.name).await;
                Err(e)
            }
        }
    }

    async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        Ok(wire::info_from_inspect(&self.inspect_json(name).await?))
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>> {
        let filters = serde_json::json!({
            "label": labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        });
        let query = containers_api::url::encoded_pairs([
            ("all", "true".to_string()),
            ("filters", filters.to_string()),
        ]);
        let answer: Value = self
            .raw
            .get_json(format!("{API}/containers/json?{query}"))
            .await
            .map_err(|e| self.conn_err(e, "containers"))?;
        let entries = answer.as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(entries
            .iter()
            .map(wire::info_from_list)
            // Filter again here: label filter semantics have varied between versions.
            .filter(|c| {
                labels
                    .iter()
                    .all(|(k, v)| c.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect())
    }

    async fn pause(&self, name: &str) -> Result<()> {
        if !self.capabilities().pause {
            return Err(Error::Unsupported {
                backend: BACKEND,
                operation: "pause (rootless Podman on cgroup v1 has no freezer)",
            });
        }
        self.podman
            .containers()
            .get(name)
            .pause()
            .await
            .map_err(|e| self.api_err(e, &format!("container {name}")))
    }

    async fn resume(&self, name: &str) -> Result<()> {
        if !self.capabilities().pause {
            return Err(Error::Unsupported {
                backend: BACKEND,
                operation: "resume (rootless Podman on cgroup v1 has no freezer)",
            });
        }
        self.podman
            .containers()
            .get(name)
            .unpause()
            .await
            .map_err(|e| self.api_err(e, &format!("container {name}")))
    }

    async fn remove(&self, name: &str) -> Result<()> {
        let what = format!("container {name}");
        let container = self.podman.containers().get(name);
        // SIGKILL first: a force remove would otherwise stop (SIGTERM, then wait).
        match container.send_signal("SIGKILL").await {
            Ok(()) => {}
            Err(e) => match self.api_err(e, &what) {
                e @ (Error::NotFound { .. } | Error::EngineUnavailable(_)) => return Err(e),
                // Not running (created, exited or paused): the force remove handles it.
                other => tracing::debug!(container = name, error = %other, "kill before remove"),
            },
        }
        let opts = ContainerDeleteOpts::builder()
            .force(true)
            .timeout(0)
            .build();
        // A force remove can race with the container's own exit ("container state
        // improper" seen on 4.3 with a paused container); a retry sees the final state.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match container
                .delete(&opts)
                .await
                .map_err(|e| self.api_err(e, &what))
            {
                Ok(()) => return Ok(()),
                // Gone between attempts: removed, which is what was asked.
                Err(Error::NotFound { .. }) if attempt > 1 => return Ok(()),
                Err(Error::Conflict(why)) if attempt < 3 => {
                    tracing::debug!(container = name, %why, "retrying remove");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The bridges of the sandbox networks (`network_interface` of the engine's network
    /// inspect). Rootless networking and remote engines have none on this kernel.
    async fn host_networks(&self) -> Result<Vec<HostNetwork>> {
        if !self.local() || self.host.rootless {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (name, internal) in [
            (self.config.network.clone(), false),
            (self.config.offline_network.clone(), true),
        ] {
            self.ensure_network(&name, internal).await?;
            let net = self.network_json(&name).await?;
            let Some(interface) = net.get("network_interface").and_then(Value::as_str) else {
                return Err(Error::backend(
                    BACKEND,
                    format!("network {name} names no host interface"),
                ));
            };
            let subnets = net
                .get("subnets")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s.get("subnet")?.as_str()?.parse().ok())
                .collect();
            out.push(HostNetwork {
                name,
                interface: interface.to_string(),
                subnets,
            });
        }
        Ok(out)
    }

    async fn stop(&self, name: &str) -> Result<()> {
        // SIGKILL by default: what `remove` does first, without the storage's deletion.
        self.podman
            .containers()
            .get(name)
            .kill()
            .await
            .map_err(|e| self.api_err(e, &format!("container {name}")))
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
        let filters = serde_json::json!({ "label": [label] }).to_string();
        let query = containers_api::url::encoded_pairs([("filters", filters)]);
        let answer: Value = self
            .raw
            .get_json(format!("{API}/images/json?{query}"))
            .await
            .map_err(|e| self.conn_err(e, "images"))?;
        let entries = answer.as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(entries
            .iter()
            .filter_map(|i| {
                let strings = |key: &str| -> Vec<String> {
                    i.get(key)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                Some(ImageEntry {
                    id: i.get("Id")?.as_str()?.to_string(),
                    tags: strings("Names")
                        .into_iter()
                        .chain(strings("RepoTags"))
                        .fold(Vec::new(), |mut acc, t| {
                            if !acc.contains(&t) {
                                acc.push(t);
                            }
                            acc
                        }),
                    labels: i
                        .get("Labels")
                        .and_then(Value::as_object)
                        .map(|o| {
                            o.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                                .collect()
                        })
                        .unwrap_or_default(),
                    created: i.get("Created").and_then(Value::as_i64).unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn start(&self, name: &str) -> Result<ContainerInfo> {
        self.start_and_inspect(name).await
    }

    async fn disk_usage(&self, name: &str) -> Result<Option<u64>> {
        let v: Value = self
            .raw
            .get_json(format!(
                "{API}/containers/{}/json?size=true",
                path_segment(name)
            ))
            .await
            .map_err(|e| self.conn_err(e, &format!("container {name}")))?;
        let field = if self.host.quota_counts_image {
            "SizeRootFs"
        } else {
            "SizeRw"
        };
        Ok(v.get(field).and_then(Value::as_u64))
    }

    async fn agent_address(&self, name: &str, port: u16) -> Result<AgentAddress> {
        let inspect = self.inspect_json(name).await?;
        if let Some(host_port) = wire::published_port(&inspect, port) {
            return Ok(AgentAddress {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)),
            });
        }
        let info = wire::info_from_inspect(&inspect);
        if info.state != SandboxState::Running {
            return Err(Error::Conflict(format!(
                "container {name} is {}, its agent cannot be reached",
                info.state
            )));
        }
        let ips = wire::container_ips(&inspect);
        if self.local() && !self.host.rootless {
            // Only an address on a bridge attached to this host is really reachable; any
            // other would be sent to the default gateway and leave the machine.
            let routes = std::fs::read_to_string("/proc/net/route").ok();
            let reachable = ips.iter().find(|(_, ip)| {
                routes
                    .as_deref()
                    .is_none_or(|table| wire::directly_routed(table, *ip))
            });
            if let Some((_, ip)) = reachable {
                return Ok(AgentAddress {
                    addr: SocketAddr::from((*ip, port)),
                });
            }
        }
        Err(Error::backend(
            BACKEND,
            format!(
                "container {name}: port {port} is not published and none of its addresses \
                 {ips:?} is reachable from this host"
            ),
        ))
    }
}

#[async_trait]
impl DeriveSteps for PodmanBackend {
    async fn image_exists(&self, tag: &str) -> Result<bool> {
        self.podman
            .images()
            .get(tag)
            .exists()
            .await
            .map_err(|e| self.api_err(e, &format!("image {tag}")))
    }

    async fn create_stopped(
        &self,
        name: &str,
        base: &str,
        entrypoint: &[String],
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let body = serde_json::json!({
            "name": name,
            "image": base,
            "entrypoint": entrypoint,
            "labels": labels,
            "netns": { "nsmode": "none" },
        });
        self.raw
            .post_string(
                format!("{API}/containers/create"),
                Payload::Json(body.to_string()),
                Headers::none(),
            )
            .await
            .map(drop)
            .map_err(|e| self.conn_err(e, &format!("image {base}")))
    }

    async fn upload(&self, name: &str, archive: Vec<u8>) -> Result<()> {
        self.podman
            .containers()
            .get(name)
            .copy_to("/", Body::from(archive))
            .await
            .map_err(|e| self.api_err(e, &format!("container {name}")))
    }

    async fn commit(
        &self,
        name: &str,
        repo: &str,
        tag: &str,
        changes: &[String],
        pause: bool,
    ) -> Result<()> {
        let mut query = vec![
            ("container", name.to_string()),
            ("repo", repo.to_string()),
            ("tag", tag.to_string()),
            ("pause", pause.to_string()),
        ];
        query.extend(changes.iter().map(|c| ("changes", c.clone())));
        let query = containers_api::url::encoded_pairs(query);
        self.raw
            .post_string(
                format!("{API}/commit?{query}"),
                Payload::empty(),
                Headers::none(),
            )
            .await
            .map(drop)
            .map_err(|e| self.conn_err(e, &format!("image {repo}:{tag}")))
    }

    async fn remove_temporary(&self, name: &str) -> Result<()> {
        SandboxBackend::remove(self, name).await
    }
}

/// A build being read. Dropped while armed (the build's future was dropped), it hands
/// the rest of the stream to a task: libpod goes on building whatever happens to the
/// connection, so the task reads the build to its end and removes what it produced, its
/// result included, as a build given up on must not leave an image.
struct BuildRun {
    raw: Arc<RequestClient<ConnError>>,
    body: Body,
    lines: build::Lines,
    tracker: StepTracker,
    /// The tag the build gives its image.
    tag: String,
    /// The id of the image the tag named before the build.
    previous: Option<String>,
    armed: bool,
}

impl BuildRun {
    /// Reads the build stream to its end, sending its events to `sink`.
    async fn follow(&mut self, sink: BuildSink<'_>) -> std::result::Result<(), hyper::Error> {
        while let Some(chunk) = self.body.next().await {
            for msg in self.lines.push(&chunk?) {
                build::take_message(&mut self.tracker, &msg, sink);
            }
        }
        if let Some(msg) = self.lines.finish() {
            build::take_message(&mut self.tracker, &msg, sink);
        }
        self.tracker.finish(sink);
        Ok(())
    }
}

impl BuildRun {
    /// Takes the tag off the abandoned build's result `result` (which removes the image
    /// when that was its only name), unless the tag named it before the build or names
    /// a newer build's image by now.
    async fn untag_result(&self, result: &str) {
        let bare = |id: &str| id.trim_start_matches("sha256:").to_string();
        if self.previous.as_deref().map(bare) == Some(bare(result)) {
            return;
        }
        let named: std::result::Result<Value, _> = self
            .raw
            .get_json(format!("{API}/images/{}/json", path_segment(&self.tag)))
            .await;
        let current = named
            .ok()
            .and_then(|v| v.get("Id").and_then(Value::as_str).map(bare));
        if current == Some(bare(result)) {
            remove_image_quietly(&self.raw, &self.tag).await;
        }
    }
}

impl Drop for BuildRun {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut rest = BuildRun {
            raw: self.raw.clone(),
            body: std::mem::take(&mut self.body),
            lines: std::mem::take(&mut self.lines),
            tracker: std::mem::take(&mut self.tracker),
            tag: std::mem::take(&mut self.tag),
            previous: self.previous.take(),
            armed: false,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("an abandoned build is left running (no runtime to follow it)");
            return;
        };
        runtime.spawn(async move {
            let quiet = |_: BuildEvent| {};
            if let Err(e) = rest.follow(&quiet).await {
                tracing::debug!(error = %e, "lost an abandoned build's stream");
            }
            let images = rest.tracker.step_images();
            tracing::debug!(tag = %rest.tag, ?images, "removing what an abandoned build made");
            if let Some(result) = &rest.tracker.out.image_id {
                rest.untag_result(result).await;
            }
            remove_step_images(&rest.raw, images).await;
        });
    }
}

/// Removes a failed build's step images, newest first (each removal also takes the
/// untagged parents only it used). Tagged images, and those another image or a container
/// still needs, stay.
async fn remove_step_images(raw: &RequestClient<ConnError>, images: Vec<String>) {
    for id in images {
        let info: std::result::Result<Value, _> = raw
            .get_json(format!("{API}/images/{}/json", path_segment(&id)))
            .await;
        let tagged = match &info {
            Ok(v) => v
                .get("RepoTags")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty()),
            // Gone already (taken with a newer step's image), or the engine is away.
            Err(_) => continue,
        };
        // A step answered from the cache may be someone's tagged image.
        if !tagged {
            remove_image_quietly(raw, &id).await;
        }
    }
}

/// Removes image `id` without force, logging what stops it.
async fn remove_image_quietly(raw: &RequestClient<ConnError>, id: &str) {
    match raw
        .delete(format!("{API}/images/{}", path_segment(id)))
        .await
    {
        Ok(_) => tracing::debug!(image = %id, "removed an image of a failed build"),
        Err(e) => tracing::debug!(image = %id, error = %e, "kept an image of a failed build"),
    }
}

impl PodmanBackend {
    /// One build: [`SandboxBackend::build_image`] without the reruns of engine faults.
    async fn build_once(&self, req: &BuildRequest, sink: BuildSink<'_>) -> Result<ImageInfo> {
        let file = tokio::fs::File::open(&req.context).await.map_err(|e| {
            Error::backend(
                BACKEND,
                format!("build context {}: {e}", req.context.display()),
            )
        })?;
        // What the tag names now: an abandoned build that only gave it back is kept.
        let previous = self.image_info(&req.tag).await?.and_then(|i| i.id);
        let response = self
            .raw
            .post(
                format!("{API}/build?{}", build::build_query(req)),
                Payload::XTar(Body::wrap_stream(context_chunks(file))),
                Headers::none(),
            )
            .await
            .map_err(|e| self.build_request_error(e, &req.tag))?;
        let mut run = BuildRun {
            raw: self.raw.clone(),
            body: response.into_body(),
            lines: build::Lines::default(),
            tracker: StepTracker::default(),
            tag: req.tag.clone(),
            previous,
            armed: true,
        };
        let read = run.follow(sink).await;
        run.armed = false;
        let failure = match (read, run.tracker.out.error.as_deref()) {
            (Err(e), _) => {
                Some(self.conn_err(ConnError::Hyper(e), &format!("build of {}", req.tag)))
            }
            (Ok(()), Some(message)) => Some(build_failure(
                message,
                run.tracker.running_from().as_deref(),
            )),
            (Ok(()), None) => None,
        };
        if let Some(e) = failure {
            remove_step_images(&self.raw, run.tracker.step_images()).await;
            return Err(e);
        }
        run.tracker.built_image(self, &req.tag).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpod_500_answers_are_classified_by_cause() {
        let in_use = "creating container storage: the container name \"x\" is already in use \
                      by abc. You have to remove that container to be able to reuse that name: \
                      that name is already in use";
        assert!(matches!(
            fault(500, in_use, "container x"),
            Error::Conflict(_)
        ));
        assert!(matches!(
            fault(500, "nope/nothing:1: image not known", "image nope"),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            fault(
                500,
                "\"abc\" is already paused: container state improper",
                "container x"
            ),
            Error::Conflict(_)
        ));
        assert!(matches!(
            fault(404, "", "container x"),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            fault(500, "OCI runtime error", "c"),
            Error::Backend { .. }
        ));
    }

    #[test]
    fn names_are_escaped_in_paths() {
        assert_eq!(path_segment("clm-abc_1.x"), "clm-abc_1.x");
        assert_eq!(path_segment("a/b?c"), "a%2Fb%3Fc");
    }
}
