//! `SandboxManager`: ids, the registry, deadlines, the reaper, re-adoption and admission.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};

use crate::backend::{ContainerSpec, DynBackend, EngineInfo};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{validate_envs, Limits, SandboxId, SandboxInfo, SandboxSpec, SandboxState};

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
    /// Main process of every sandbox container.
    pub main_command: Vec<String>,
    /// Port of the in-sandbox agent, when sandboxes run one.
    pub agent_port: Option<u16>,
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
                backend,
                config,
                sandboxes: Mutex::new(HashMap::new()),
                creates,
                reaper_wake: Arc::new(Notify::new()),
                deadlines,
                images_ready: Mutex::new(HashSet::new()),
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
                    self.inner.deadlines.forget(&info.id);
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
            if user.is_empty()
                || !user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(Error::InvalidArgument(format!(
                    "invalid user name {user:?}"
                )));
            }
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
        let image_known = self
            .inner
            .images_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&image);
        if !image_known {
            backend.ensure_image(&image).await?;
            self.inner
                .images_ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(image.clone());
        }
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
        };
        let name = labels::container_name(&info.id);
        let container = ContainerSpec {
            name: name.clone(),
            image,
            command: config.main_command.clone(),
            env: spec.envs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels: labels::for_sandbox(&config.owner, &info),
            limits,
            internet: spec.internet,
            user: None,
            agent_port: config.agent_port,
        };
        match backend.create(&container).await {
            Ok(created) => {
                info.state = created.state;
                if let Some(applied) = created.limits {
                    info.limits = applied;
                }
                Ok(info)
            }
            Err(e) => {
                // The backend cleans up after itself; this catches a create that
                // reported failure after the container came to exist.
                self.remove_quietly(&name).await;
                if matches!(e, Error::NotFound { .. }) {
                    // An image that vanished since it was checked.
                    self.inner
                        .images_ready
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&info.image);
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
                self.inner.deadlines.forget(id);
                self.update_gauges();
                Err(Error::not_found(format!("sandbox {id}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Kills and removes a sandbox.
    pub async fn kill(&self, id: &SandboxId) -> Result<()> {
        let info = self
            .registry()
            .remove(id)
            .ok_or_else(|| Error::not_found(format!("sandbox {id}")))?;
        match self.inner.backend.remove(&labels::container_name(id)).await {
            Ok(()) | Err(Error::NotFound { .. }) => {
                self.inner.deadlines.forget(id);
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
