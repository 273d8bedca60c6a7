//! `SandboxManager`: ids, the registry, deadlines, the reaper, re-adoption and admission.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};

use crate::agent::{generate_secret, AgentBinary, AGENT_PATH};
use crate::agent_client::{self, proto::InitRequest, AgentClient, AGENT_PORT, SECRET_ENV};
use crate::backend::{ContainerSpec, DeriveImage, DynBackend, EngineInfo, ImageFile};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{
    validate_envs, validate_user, Limits, SandboxId, SandboxInfo, SandboxSpec, SandboxState,
};
use sandbox_agent::signature::{ct_eq, file_signature, FileOp};

/// How the manager behaves; the binary fills it from configuration.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Identifies this server's sandboxes among others on the same engine.
    pub owner: String,
    /// Template name to image reference.
    pub templates: BTreeMap<String, String>,
    /// Template used when a client names none.
    pub default_template: String,
    /// Timeout used when a client gives none.
    pub default_timeout: Duration,
    /// Limits for sandboxes that do not ask for their own.
    pub default_limits: Limits,
    /// Creates allowed to run at once; more are refused with resource exhausted.
    pub max_concurrent_creates: usize,
    /// Sandboxes allowed to exist at once.
    pub max_sandboxes: usize,
    /// Longest timeout a client may ask for.
    pub max_timeout: Duration,
    /// Where deadline changes are persisted so a restarted server keeps them.
    pub state_dir: Option<PathBuf>,
    /// Main process of every sandbox container when it runs no agent.
    pub main_command: Vec<String>,
    /// Port of the in-sandbox agent (default [`AGENT_PORT`] when `agent` is set).
    pub agent_port: Option<u16>,
    /// The agent build put into every sandbox (through a derived image) as its main
    /// process. `None` runs `main_command` instead and offers no agent (unit tests).
    pub agent: Option<AgentBinary>,
    /// How long a new sandbox's agent may take to answer `/health`.
    pub agent_ready_timeout: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            owner: "default".into(),
            templates: BTreeMap::new(),
            default_template: "base".into(),
            default_timeout: Duration::from_secs(300),
            default_limits: Limits::default(),
            max_concurrent_creates: 8,
            max_sandboxes: 100,
            max_timeout: Duration::from_secs(24 * 3600),
            state_dir: None,
            main_command: vec!["sleep".into(), "infinity".into()],
            agent_port: None,
            agent: None,
            agent_ready_timeout: Duration::from_secs(30),
        }
    }
}

/// Now, truncated to whole milliseconds: the precision labels and the deadline store keep,
/// so a time reads back identical after a restart.
fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let ms = now.nanosecond() / 1_000_000 * 1_000_000;
    now.replace_nanosecond(ms).unwrap_or(now)
}

/// What re-adoption found at startup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sandboxes taken back under management.
    pub adopted: usize,
    /// Sandboxes removed because their deadline had passed.
    pub expired: usize,
    /// Containers removed because they were half-created, stopped or unreadable.
    pub broken: usize,
}

/// Deadline changes made after creation, one small file per sandbox (labels are
/// immutable, and nothing inside the sandbox may be trusted with its own deadline).
#[derive(Debug)]
struct DeadlineStore {
    dir: Option<PathBuf>,
}

impl DeadlineStore {
    fn path(&self, id: &SandboxId) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(id.as_str()))
    }

    fn load(&self, id: &SandboxId) -> Option<OffsetDateTime> {
        let raw = std::fs::read_to_string(self.path(id)?).ok()?;
        let ms: i128 = raw.trim().parse().ok()?;
        OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok()
    }

    fn save(&self, id: &SandboxId, at: OffsetDateTime) -> Result<()> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(id)) else {
            return Ok(());
        };
        let io = |e: std::io::Error| Error::backend("state", e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, (at.unix_timestamp_nanos() / 1_000_000).to_string()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn forget(&self, id: &SandboxId) {
        if let Some(path) = self.path(id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Deletes files of sandboxes that no longer exist.
    fn retain(&self, live: &HashSet<SandboxId>) {
        let Some(dir) = &self.dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<SandboxId>().ok())
                .is_some_and(|id| live.contains(&id));
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

struct Inner {
    backend: DynBackend,
    config: ManagerConfig,
    sandboxes: Mutex<HashMap<SandboxId, SandboxInfo>>,
    creates: Semaphore,
    reaper_wake: Arc<Notify>,
    deadlines: DeadlineStore,
    images_ready: Mutex<HashSet<String>>,
    /// Serialises image derivations, so concurrent creates derive a template once.
    derive_lock: tokio::sync::Mutex<()>,
    /// Clients of agents met so far (rebuilt from the container after a restart).
    agents: Mutex<HashMap<SandboxId, AgentClient>>,
    /// One connection pool for every agent.
    http: reqwest::Client,
}

/// Owns every sandbox of this server: creates them through the backend, enforces their
/// deadlines, and re-adopts them after a restart.
///
/// Cloning is cheap; clones share one registry.
#[derive(Clone)]
pub struct SandboxManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("backend", &self.inner.backend.name())
            .field("owner", &self.inner.config.owner)
            .finish_non_exhaustive()
    }
}

impl SandboxManager {
    /// A manager over `backend`. Call [`SandboxManager::start`] before serving requests.
    pub fn new(backend: DynBackend, config: ManagerConfig) -> Self {
        let creates = Semaphore::new(config.max_concurrent_creates.max(1));
        let deadlines = DeadlineStore {
            dir: config.state_dir.clone(),
        };
        Self {
            inner: Arc::new(Inner {
                // Every engine call the manager makes is timed and counted.
                backend: Arc::new(crate::instrumented::Instrumented(backend)),
                config,
                sandboxes: Mutex::new(HashMap::new()),
                creates,
                reaper_wake: Arc::new(Notify::new()),
                deadlines,
                images_ready: Mutex::new(HashSet::new()),
                derive_lock: tokio::sync::Mutex::new(()),
                agents: Mutex::new(HashMap::new()),
                http: agent_client::http_client(),
            }),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> &DynBackend {
        &self.inner.backend
    }

    /// The configuration in use.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// Asks the engine whether it answers.
    pub async fn engine_info(&self) -> Result<EngineInfo> {
        self.inner.backend.check().await
    }

    /// Re-adopts this server's sandboxes from the engine and starts the reaper.
    pub async fn start(&self) -> Result<RecoveryReport> {
        let report = self.recover().await?;
        self.spawn_reaper();
        Ok(report)
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<SandboxId, SandboxInfo>> {
        // A poisoned lock only means another thread panicked mid-update of a plain map.
        self.inner
            .sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn agents(&self) -> MutexGuard<'_, HashMap<SandboxId, AgentClient>> {
        self.inner.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn images_ready(&self) -> MutexGuard<'_, HashSet<String>> {
        self.inner
            .images_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Drops what the server keeps about a sandbox that no longer exists.
    fn forget(&self, id: &SandboxId) {
        self.inner.deadlines.forget(id);
        self.agents().remove(id);
    }

    fn agent_port(&self) -> u16 {
        self.inner.config.agent_port.unwrap_or(AGENT_PORT)
    }

    /// A client for sandbox `id`'s agent.
    ///
    /// After a server restart the client is rebuilt from the container itself (its
    /// secret is in the container's environment, its address comes from the backend), so
    /// nothing but the sandbox has to remember it.
    pub async fn agent(&self, id: &SandboxId) -> Result<AgentClient> {
        self.lookup(id)?;
        if let Some(client) = self.agents().get(id) {
            return Ok(client.clone());
        }
        if self.inner.config.agent.is_none() {
            return Err(Error::Agent {
                code: "unavailable".into(),
                message: "this server runs sandboxes without the agent".into(),
            });
        }
        let name = labels::container_name(id);
        let backend = &self.inner.backend;
        let container = backend.inspect(&name).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found(format!("sandbox {id}")),
            other => other,
        })?;
        let prefix = format!("{SECRET_ENV}=");
        let secret = container
            .env
            .iter()
            .find_map(|e| e.strip_prefix(&prefix))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Agent {
                code: "unavailable".into(),
                message: format!("sandbox {id} has no agent secret (created without the agent?)"),
            })?
            .to_string();
        let addr = backend.agent_address(&name, self.agent_port()).await?;
        let client = AgentClient::new(self.inner.http.clone(), addr.addr, secret);
        self.agents().insert(id.clone(), client.clone());
        Ok(client)
    }

    /// The image a template's sandboxes run: derived once per (template image, agent
    /// build) and reused, also across restarts (the backend keeps an existing tag).
    async fn derived_image(&self, base: &str, agent: &AgentBinary) -> Result<String> {
        let tag = agent.derived_tag(base);
        if self.images_ready().contains(&tag) {
            return Ok(tag);
        }
        let _one_at_a_time = self.inner.derive_lock.lock().await;
        if self.images_ready().contains(&tag) {
            return Ok(tag);
        }
        let mut image_labels = BTreeMap::new();
        image_labels.insert(labels::AGENT_SHA256.to_string(), agent.sha256().to_string());
        image_labels.insert(labels::DERIVED_FROM.to_string(), base.to_string());
        let req = DeriveImage {
            base: base.to_string(),
            tag: tag.clone(),
            files: vec![ImageFile {
                path: AGENT_PATH.into(),
                contents: agent.contents().clone(),
                mode: 0o755,
            }],
            entrypoint: vec![AGENT_PATH.into()],
            labels: image_labels,
        };
        let started = Instant::now();
        self.inner.backend.derive_image(&req).await?;
        tracing::info!(base, image = %tag, elapsed_ms = started.elapsed().as_millis() as u64, "agent image ready");
        self.images_ready().insert(tag.clone());
        Ok(tag)
    }

    /// Waits for a new sandbox's agent and hands it the sandbox's settings.
    async fn start_agent(
        &self,
        name: &str,
        spec: &SandboxSpec,
        secret: String,
    ) -> Result<AgentClient> {
        let addr = self
            .inner
            .backend
            .agent_address(name, self.agent_port())
            .await?;
        let client = AgentClient::new(self.inner.http.clone(), addr.addr, secret.clone());
        let limit = self.inner.config.agent_ready_timeout;
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(5);
        loop {
            match client.health().await {
                Ok(()) => break,
                Err(e) if Instant::now() + pause >= deadline => {
                    tracing::warn!(container = name, agent = %addr.addr, error = %e,
                        "the sandbox agent did not answer /health in time");
                    return Err(Error::Timeout(limit));
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
        let user = spec.user.clone().unwrap_or_else(|| "user".into());
        let workdir = (user == "user").then(|| "/home/user".to_string());
        client
            .init(&InitRequest {
                env_vars: Some(spec.envs.clone()),
                access_token: Some(secret),
                default_user: Some(user),
                default_workdir: workdir,
            })
            .await?;
        Ok(client)
    }

    async fn recover(&self) -> Result<RecoveryReport> {
        let backend = &self.inner.backend;
        let owner = self.inner.config.owner.as_str();
        let containers = backend
            .list(&[(labels::MANAGED, "true"), (labels::OWNER, owner)])
            .await?;
        let now = OffsetDateTime::now_utc();
        let mut report = RecoveryReport::default();
        let mut live = HashSet::new();
        for container in containers {
            let info = match labels::to_info(&container) {
                Ok(info) => info,
                Err(why) => {
                    tracing::warn!(container = %container.name, %why, "removing unreadable sandbox container");
                    self.remove_quietly(&container.name).await;
                    report.broken += 1;
                    continue;
                }
            };
            let mut info = info;
            if let Some(deadline) = self.inner.deadlines.load(&info.id) {
                info.expires_at = deadline;
            }
            if !matches!(info.state, SandboxState::Running | SandboxState::Paused) {
                tracing::info!(sandbox = %info.id, state = %info.state, "removing half-created or stopped sandbox");
                self.remove_quietly(&container.name).await;
                report.broken += 1;
            } else if info.expires_at <= now {
                tracing::info!(sandbox = %info.id, "removing sandbox that expired while the server was down");
                self.remove_quietly(&container.name).await;
                metrics::counter!("colima_e2b_sandbox_expiries_total").increment(1);
                report.expired += 1;
            } else {
                live.insert(info.id.clone());
                self.registry().insert(info.id.clone(), info);
                report.adopted += 1;
            }
        }
        self.inner.deadlines.retain(&live);
        self.update_gauges();
        Ok(report)
    }

    async fn remove_quietly(&self, name: &str) {
        match self.inner.backend.remove(name).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(container = name, error = %e, "could not remove container"),
        }
    }

    fn spawn_reaper(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let wake = self.inner.reaper_wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { break };
                let manager = SandboxManager { inner };
                manager.reap_expired().await;
                let wait = manager
                    .next_deadline()
                    .map(|d| {
                        let left = d - OffsetDateTime::now_utc();
                        Duration::try_from(left).unwrap_or(Duration::ZERO)
                    })
                    // Wake now and then anyway, so a wall-clock jump cannot stall expiry.
                    .unwrap_or(Duration::from_secs(5))
                    .min(Duration::from_secs(5));
                drop(manager);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                }
            }
        });
    }

    fn next_deadline(&self) -> Option<OffsetDateTime> {
        self.registry().values().map(|s| s.expires_at).min()
    }

    /// Removes every sandbox whose deadline has passed; returns how many were removed.
    pub async fn reap_expired(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        let expired: Vec<SandboxInfo> = {
            let mut reg = self.registry();
            let ids: Vec<SandboxId> = reg
                .values()
                .filter(|s| s.expires_at <= now)
                .map(|s| s.id.clone())
                .collect();
            ids.iter().filter_map(|id| reg.remove(id)).collect()
        };
        let count = expired.len();
        let removals = expired.into_iter().map(|info| async move {
            tracing::info!(sandbox = %info.id, "sandbox expired; removing");
            match self.inner.backend.remove(&labels::container_name(&info.id)).await {
                Ok(()) | Err(Error::NotFound { .. }) => {
                    self.forget(&info.id);
                    metrics::counter!("colima_e2b_sandbox_expiries_total").increment(1);
                }
                Err(e) => {
                    // Keep it registered so the next pass tries again.
                    tracing::warn!(sandbox = %info.id, error = %e, "could not remove expired sandbox");
                    self.registry().insert(info.id.clone(), info);
                }
            }
        });
        futures_util::future::join_all(removals).await;
        if count > 0 {
            self.update_gauges();
        }
        count
    }

    fn update_gauges(&self) {
        let mut counts: BTreeMap<(String, &'static str), f64> = BTreeMap::new();
        for template in self.inner.config.templates.keys() {
            for state in [SandboxState::Running, SandboxState::Paused] {
                counts.insert((template.clone(), state.as_str()), 0.0);
            }
        }
        for s in self.registry().values() {
            *counts
                .entry((s.template.clone(), s.state.as_str()))
                .or_default() += 1.0;
        }
        for ((template, state), n) in counts {
            metrics::gauge!("colima_e2b_sandboxes_active", "template" => template, "state" => state)
                .set(n);
        }
    }

    fn check_timeout(&self, timeout: Duration) -> Result<()> {
        let max = self.inner.config.max_timeout;
        if timeout.is_zero() || timeout > max {
            return Err(Error::InvalidArgument(format!(
                "timeout must be between 1 and {} seconds",
                max.as_secs()
            )));
        }
        Ok(())
    }

    /// Creates and starts a sandbox.
    ///
    /// Refused with [`Error::ResourceExhausted`] when the concurrent-create or sandbox
    /// limit is reached. A failed create leaves no container behind.
    pub async fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo> {
        let config = &self.inner.config;
        let image = config
            .templates
            .get(&spec.template)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = config.templates.keys().map(String::as_str).collect();
                Error::InvalidArgument(format!(
                    "unknown template {:?}; known templates: {}",
                    spec.template,
                    known.join(", ")
                ))
            })?;
        self.check_timeout(spec.timeout)?;
        validate_envs(&spec.envs)?;
        labels::validate_metadata(&spec.metadata)?;
        let limits = spec.limits.unwrap_or(config.default_limits);
        limits.validate()?;
        if let Some(user) = &spec.user {
            validate_user(user)?;
        }

        let _permit = self.inner.creates.try_acquire().map_err(|_| {
            metrics::counter!("colima_e2b_sandbox_create_failures_total", "reason" => "busy")
                .increment(1);
            Error::ResourceExhausted {
                message: format!(
                    "more than {} sandbox creates at once",
                    config.max_concurrent_creates
                ),
                retry_after: Some(Duration::from_secs(1)),
            }
        })?;
        if self.registry().len() >= config.max_sandboxes {
            metrics::counter!("colima_e2b_sandbox_create_failures_total", "reason" => "limit")
                .increment(1);
            return Err(Error::ResourceExhausted {
                message: format!("the limit of {} sandboxes is reached", config.max_sandboxes),
                retry_after: Some(Duration::from_secs(5)),
            });
        }

        let started = Instant::now();
        let result = self.create_container(&spec, image, limits).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::histogram!("colima_e2b_sandbox_create_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok(info) => {
                metrics::counter!("colima_e2b_sandbox_creates_total", "template" => info.template.clone())
                    .increment(1);
                self.registry().insert(info.id.clone(), info.clone());
                self.inner.reaper_wake.notify_one();
                self.update_gauges();
            }
            Err(e) => {
                metrics::counter!("colima_e2b_sandbox_create_failures_total", "reason" => e.code())
                    .increment(1);
            }
        }
        result
    }

    async fn create_container(
        &self,
        spec: &SandboxSpec,
        image: String,
        limits: Limits,
    ) -> Result<SandboxInfo> {
        let backend = &self.inner.backend;
        let config = &self.inner.config;
        let image_known = self.images_ready().contains(&image);
        if !image_known {
            backend.ensure_image(&image).await?;
            self.images_ready().insert(image.clone());
        }
        let agent = config.agent.as_ref();
        let image = match agent {
            Some(agent) => self.derived_image(&image, agent).await?,
            None => image,
        };
        let secret = agent.map(|_| generate_secret());
        let now = now_ms();
        let mut info = SandboxInfo {
            id: SandboxId::generate(),
            template: spec.template.clone(),
            image: image.clone(),
            state: SandboxState::Running,
            metadata: spec.metadata.clone(),
            started_at: now,
            expires_at: now + spec.timeout,
            limits,
            internet: spec.internet,
            secure: spec.secure,
        };
        let name = labels::container_name(&info.id);
        let mut env: Vec<String> = spec.envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(secret) = &secret {
            // Lives with the container so a restarted server can talk to the agent again.
            env.push(format!("{SECRET_ENV}={secret}"));
        }
        let container = ContainerSpec {
            name: name.clone(),
            image,
            // With the agent, the derived image's entrypoint (the agent) is the main process.
            command: match agent {
                Some(_) => Vec::new(),
                None => config.main_command.clone(),
            },
            env,
            labels: labels::for_sandbox(&config.owner, &info),
            limits,
            internet: spec.internet,
            // The agent switches to each command's user itself, so it starts as root.
            user: agent.map(|_| "root".to_string()),
            agent_port: match agent {
                Some(_) => Some(self.agent_port()),
                None => config.agent_port,
            },
        };
        match backend.create(&container).await {
            Ok(created) => {
                info.state = created.state;
                if let Some(applied) = created.limits {
                    info.limits = applied;
                }
                if let Some(secret) = secret {
                    match self.start_agent(&name, spec, secret).await {
                        Ok(client) => {
                            self.agents().insert(info.id.clone(), client);
                        }
                        Err(e) => {
                            // A failed create leaves nothing behind.
                            self.remove_quietly(&name).await;
                            return Err(match e {
                                // The template exists; a container or address that is
                                // gone means the sandbox died while starting.
                                Error::NotFound { what } => Error::backend(
                                    backend.name(),
                                    format!(
                                        "sandbox {} stopped while starting ({what} not found)",
                                        info.id
                                    ),
                                ),
                                e => e,
                            });
                        }
                    }
                }
                Ok(info)
            }
            Err(e) => {
                // The backend cleans up after itself; this catches a create that
                // reported failure after the container came to exist.
                self.remove_quietly(&name).await;
                if matches!(e, Error::NotFound { .. }) {
                    // An image that vanished since it was checked.
                    self.images_ready().remove(&info.image);
                }
                Err(e)
            }
        }
    }

    /// Lists sandboxes whose metadata contains every pair in `metadata`.
    pub fn list(&self, metadata: &BTreeMap<String, String>) -> Vec<SandboxInfo> {
        let mut out: Vec<SandboxInfo> = self
            .registry()
            .values()
            .filter(|s| metadata.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        out
    }

    /// What the manager knows about sandbox `id`, without asking the engine.
    pub fn info(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.lookup(id)
    }

    fn lookup(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.registry()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("sandbox {id}")))
    }

    /// One sandbox, with its state refreshed from the engine.
    pub async fn get(&self, id: &SandboxId) -> Result<SandboxInfo> {
        let mut info = self.lookup(id)?;
        match self
            .inner
            .backend
            .inspect(&labels::container_name(id))
            .await
        {
            Ok(container) => {
                info.state = container.state;
                if let Some(s) = self.registry().get_mut(id) {
                    s.state = container.state;
                }
                Ok(info)
            }
            Err(Error::NotFound { .. }) => {
                // Removed behind our back (e.g. `docker rm -f`).
                self.registry().remove(id);
                self.forget(id);
                self.update_gauges();
                Err(Error::not_found(format!("sandbox {id}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Where the server reaches `port` inside sandbox `id`: the agent's address for the
    /// agent port, else what the backend reports (the container's address).
    pub async fn port_address(&self, id: &SandboxId, port: u16) -> Result<SocketAddr> {
        let info = self.lookup(id)?;
        if info.state == SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        if port == self.agent_port() {
            return Ok(self.agent(id).await?.addr());
        }
        let addr = self
            .inner
            .backend
            .agent_address(&labels::container_name(id), port)
            .await?;
        Ok(addr.addr)
    }

    /// The running sandbox whose access token produced `signature` for this file
    /// operation. E2B's signed URLs name no sandbox (the SDK drops the data-plane base
    /// from them), so the one token that verifies identifies it.
    pub async fn sandbox_for_file_signature(
        &self,
        path: &str,
        op: FileOp,
        user: &str,
        expiration: Option<i64>,
        signature: &str,
    ) -> Option<SandboxId> {
        let running: Vec<SandboxId> = self
            .registry()
            .iter()
            .filter(|(_, s)| s.state == SandboxState::Running)
            .map(|(id, _)| id.clone())
            .collect();
        for id in running {
            let Ok(agent) = self.agent(&id).await else {
                continue;
            };
            let expected = file_signature(path, op, user, agent.token().as_bytes(), expiration);
            if ct_eq(expected.as_bytes(), signature.as_bytes()) {
                return Some(id);
            }
        }
        None
    }

    /// Moves a sandbox's deadline to `timeout` from now unless it is already later
    /// (E2B's connect never shortens a sandbox's life).
    pub fn extend_timeout(&self, id: &SandboxId, timeout: Duration) -> Result<SandboxInfo> {
        let info = self.lookup(id)?;
        if info.expires_at >= now_ms() + timeout {
            return Ok(info);
        }
        self.set_timeout(id, timeout)
    }

    /// Kills and removes a sandbox.
    pub async fn kill(&self, id: &SandboxId) -> Result<()> {
        let info = self
            .registry()
            .remove(id)
            .ok_or_else(|| Error::not_found(format!("sandbox {id}")))?;
        match self.inner.backend.remove(&labels::container_name(id)).await {
            Ok(()) | Err(Error::NotFound { .. }) => {
                self.forget(id);
                metrics::counter!("colima_e2b_sandbox_kills_total").increment(1);
                self.update_gauges();
                Ok(())
            }
            Err(e) => {
                // Still there: keep managing it so its deadline is enforced.
                self.registry().insert(id.clone(), info);
                Err(e)
            }
        }
    }

    /// Sets a sandbox's deadline to `timeout` from now (it may shorten it).
    pub fn set_timeout(&self, id: &SandboxId, timeout: Duration) -> Result<SandboxInfo> {
        self.check_timeout(timeout)?;
        let deadline = now_ms() + timeout;
        self.lookup(id)?;
        self.inner.deadlines.save(id, deadline)?;
        let info = {
            let mut reg = self.registry();
            let s = reg
                .get_mut(id)
                .ok_or_else(|| Error::not_found(format!("sandbox {id}")))?;
            s.expires_at = deadline;
            s.clone()
        };
        self.inner.reaper_wake.notify_one();
        Ok(info)
    }

    /// Freezes a running sandbox (its deadline keeps running).
    pub async fn pause(&self, id: &SandboxId) -> Result<SandboxInfo> {
        let info = self.lookup(id)?;
        if info.state == SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is already paused")));
        }
        self.require_pause()?;
        self.inner
            .backend
            .pause(&labels::container_name(id))
            .await?;
        self.set_state(id, SandboxState::Paused)
    }

    /// Thaws a paused sandbox.
    pub async fn resume(&self, id: &SandboxId) -> Result<SandboxInfo> {
        let info = self.lookup(id)?;
        if info.state != SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is not paused")));
        }
        self.require_pause()?;
        self.inner
            .backend
            .resume(&labels::container_name(id))
            .await?;
        self.set_state(id, SandboxState::Running)
    }

    fn require_pause(&self) -> Result<()> {
        if self.inner.backend.capabilities().pause {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.inner.backend.name(),
                operation: "pause",
            })
        }
    }

    fn set_state(&self, id: &SandboxId, state: SandboxState) -> Result<SandboxInfo> {
        let info = {
            let mut reg = self.registry();
            let s = reg
                .get_mut(id)
                .ok_or_else(|| Error::not_found(format!("sandbox {id}")))?;
            s.state = state;
            s.clone()
        };
        self.update_gauges();
        Ok(info)
    }
}
