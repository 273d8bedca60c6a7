//! [`SandboxManager`]: every decision about sandboxes, split by job.
//!
//! - [`create`](self::create): admission, defaults and limits, the container spec, the
//!   agent's start.
//! - [`recovery`]: re-adoption of this server's sandboxes after a restart.
//! - [`deadlines`]: timeouts, the reaper, the deadline store.
//! - [`images`]: template images and the images derived from them with the agent.
//! - [`agents`]: clients of sandboxes' agents, routes into sandboxes, signed URLs.
//! - [`code`](self::code): code runs in a sandbox's code interpreter (native API).
//! - [`commands`]: the native API's commands, with their timeouts and output caps.
//! - [`lifecycle`]: kill and E2B's connect.
//! - [`pausing`]: pause and resume (with memory or from the filesystem), what a
//!   deadline does (`on_timeout`), auto-resume.
//! - [`pool`]: the warm pool: sandboxes started ahead of demand, claimed by creates.
//! - [`reclaim`]: ended sandboxes' containers, killed at once and deleted in the
//!   background.
//! - [`diagnosis`]: what the manager can tell about its deployment.
//! - [`metrics_history`]: resource use sampled over time.
//! - [`snapshots`]: snapshots and forks (a sandbox's filesystem as a template).
//! - [`sandbox_logs`]: each sandbox's log (the server's actions, its agent's events).

mod agents;
mod code;
mod commands;
mod create;
mod deadlines;
pub mod diagnosis;
mod disk;
mod egress;
mod host_firewall;
mod images;
mod lifecycle;
pub mod metrics_history;
mod pausing;
mod pool;
mod reclaim;
mod records;
mod recovery;
pub mod sandbox_logs;
mod snapshots;
mod templates;
mod terminal;
#[cfg(test)]
mod tests;
mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};

use crate::agent::{AgentBinary, AgentClient};
use crate::backend::{DynBackend, EngineInfo, SandboxProfile};
use crate::error::{Error, Result};
use crate::labels;
use crate::template::Template;
use crate::types::{Limits, SandboxId, SandboxInfo, SandboxState};

pub use agents::{ProxyTarget, Vouch};
pub use commands::CommandLimits;
pub use egress::{masked_host, SandboxNetwork};
pub use metrics_history::{MetricSample, MetricsHistoryConfig};
pub use pool::PoolConfig;
pub use recovery::RecoveryReport;
pub use sandbox_logs::{Direction, LogConfig, LogEntry, LogLevel, LogQuery};
pub use snapshots::MAX_FORKS;
pub use templates::{DockerfileBuild, E2B_BASE_IMAGE};
pub use terminal::{Terminal, TerminalControl, TerminalRequest, MAX_TERMINAL_SIZE};
pub use volumes::{VolumeAccess, VolumeRecord, KEEPER_IDLE, MAX_MOUNTS};

use deadlines::DeadlineStore;
use recovery::CreateJournal;

/// How the manager behaves; the binary fills it from configuration.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Identifies this server's sandboxes among others on the same engine.
    pub owner: String,
    /// Template name to template.
    pub templates: BTreeMap<String, Template>,
    /// Template used when a client names none.
    pub default_template: String,
    /// Timeout used when a client gives none.
    pub default_timeout: Duration,
    /// Limits for sandboxes that do not ask for their own.
    pub default_limits: Limits,
    /// Most CPUs a sandbox may ask for; `None`: as many as the engine's host has.
    pub max_cpus: Option<f64>,
    /// Most memory a sandbox may ask for, MiB; `None`: as much as the engine's host has.
    pub max_memory_mb: Option<u64>,
    /// Largest disk quota a sandbox may ask for, MiB.
    pub max_disk_mb: Option<u64>,
    /// The baseline profile of every sandbox container.
    pub profile: SandboxProfile,
    /// Creates allowed to run at once; more wait in a queue for their turn.
    pub max_concurrent_creates: usize,
    /// Creates allowed to wait for their turn; more are refused with resource exhausted.
    pub max_queued_creates: usize,
    /// How long a create may wait for its turn before it is refused.
    pub create_queue_wait: Duration,
    /// The warm pool: pre-started sandboxes per template.
    pub pool: PoolConfig,
    /// Sandboxes allowed to exist at once (creates in flight count).
    pub max_sandboxes: usize,
    /// Longest timeout a client may ask for.
    pub max_timeout: Duration,
    /// How long a paused sandbox is kept before it is removed.
    pub paused_retention: Duration,
    /// Derived images younger than this are never pruned (another server on the engine,
    /// of another agent build, may have just derived one for a create in flight).
    pub prune_min_age: Duration,
    /// Commands of the native API: default and longest timeout, output kept.
    pub commands: CommandLimits,
    /// Where state that must survive a restart is kept: deadline changes (`deadlines/`),
    /// creates in flight (`creating/`) and what claims of pool members decided
    /// (`claims/`).
    pub state_dir: Option<PathBuf>,
    /// Main process of every sandbox container when it runs no agent.
    pub main_command: Vec<String>,
    /// Port of the in-sandbox agent (default [`crate::agent::AGENT_PORT`]).
    pub agent_port: Option<u16>,
    /// The agent build put into every sandbox (through a derived image) as its main
    /// process. `None` runs `main_command` instead and offers no agent (unit tests).
    pub agent: Option<AgentBinary>,
    /// How long a new sandbox's agent may take to answer `/health`.
    pub agent_ready_timeout: Duration,
    /// How long the agent lets a stream's reader take nothing before dropping it.
    pub stall_timeout: Duration,
    /// How templates are built (their records go to `state_dir/templates`).
    pub builds: crate::template::registry::RegistryConfig,
    /// How often sandboxes' resource use is sampled and how long samples are kept.
    pub metrics_history: metrics_history::MetricsHistoryConfig,
    /// How much of each sandbox's log is kept.
    pub logs: sandbox_logs::LogConfig,
    /// The host firewall for the sandbox networks (`[network]`).
    pub network: crate::network::FirewallConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            owner: "default".into(),
            templates: BTreeMap::new(),
            default_template: "base".into(),
            default_timeout: Duration::from_secs(300),
            default_limits: Limits::default(),
            max_cpus: None,
            max_memory_mb: None,
            max_disk_mb: None,
            profile: SandboxProfile::default(),
            max_concurrent_creates: 8,
            max_queued_creates: 256,
            create_queue_wait: Duration::from_secs(60),
            pool: PoolConfig::default(),
            max_sandboxes: 100,
            max_timeout: Duration::from_secs(24 * 3600),
            paused_retention: Duration::from_secs(30 * 24 * 3600),
            prune_min_age: Duration::from_secs(3600),
            commands: CommandLimits::default(),
            state_dir: None,
            main_command: vec!["sleep".into(), "infinity".into()],
            agent_port: None,
            agent: None,
            agent_ready_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            builds: Default::default(),
            metrics_history: Default::default(),
            logs: Default::default(),
            network: Default::default(),
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

/// The sandboxes this server manages, and the places held by creates in flight (so the
/// sandbox limit counts them too).
#[derive(Debug, Default)]
struct Registry {
    sandboxes: HashMap<SandboxId, SandboxInfo>,
    reserved: usize,
}

struct Inner {
    backend: DynBackend,
    config: ManagerConfig,
    registry: Mutex<Registry>,
    creates: Semaphore,
    /// Creates waiting for their turn under `creates`.
    queued: std::sync::atomic::AtomicUsize,
    /// The warm pool's members and fills.
    pool: Mutex<pool::PoolState>,
    /// Wakes the pool's refiller (a member was claimed or removed).
    pool_wake: Arc<Notify>,
    /// What claims of pool members decided.
    claims: pool::ClaimStore,
    /// Stopped containers waiting to be deleted.
    reclaim: Mutex<reclaim::ReclaimQueue>,
    reaper_wake: Arc<Notify>,
    deadlines: DeadlineStore,
    /// Creates in flight, so a restart removes what no finished create owns.
    journal: CreateJournal,
    /// Unfinished creates found at start, watched for a while (see `sweep_unfinished`).
    unfinished: Mutex<HashMap<SandboxId, std::time::Instant>>,
    /// What the engine's host has (CPUs, memory), read at start.
    host: Mutex<Option<EngineInfo>>,
    /// Derived images known to exist (their tags name what they were made from).
    derived_ready: Mutex<HashSet<String>>,
    /// Serialises image derivations, so concurrent creates derive a template once.
    derive_lock: tokio::sync::Mutex<()>,
    /// Clients of agents met so far (rebuilt from the container after a restart).
    agents: Mutex<HashMap<SandboxId, AgentClient>>,
    /// One connection pool for every agent.
    http: reqwest::Client,
    /// Disk usage per sandbox as its quota counts it, with when it was read.
    disk_used: Mutex<HashMap<SandboxId, disk::DiskRead>>,
    /// Sandboxes whose disk usage is being read from the engine in the background.
    disk_refreshing: Mutex<HashSet<SandboxId>>,
    /// One disk read from the engine at a time.
    disk_reads: Semaphore,
    /// Templates built by this server.
    templates: Arc<crate::template::registry::Registry>,
    /// Images of builds a restart cut off, removed at start.
    interrupted_builds: Mutex<Vec<String>>,
    /// Resource use samples per sandbox.
    metrics_history: metrics_history::History,
    /// Each sandbox's log.
    logs: sandbox_logs::Logs,
    /// The host firewall, as last installed or checked (`None` before start).
    firewall: Mutex<Option<crate::network::FirewallStatus>>,
    /// Sandboxes' network configs (E2B's `network`).
    networks: egress::NetworkStore,
    /// Serialises writes of the egress table.
    egress_lock: tokio::sync::Mutex<()>,
    /// The egress proxy, once started (see `start`).
    egress_proxy: std::sync::OnceLock<crate::network::egress_proxy::EgressProxy>,
    /// The rules the proxy decides by, for the sandboxes whose rules name hosts.
    proxied: crate::network::egress_proxy::ProxiedRules,
    /// Egress tables of other servers on this host (see `release_address`).
    foreign_egress: Mutex<Vec<String>>,
    /// Sandboxes' lifecycles and pause records.
    lifecycles: pausing::LifecycleStore,
    /// One lifecycle change per sandbox at a time.
    turns: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    /// Forks under way (sweeps of forks' captures wait for none).
    forks_under_way: std::sync::atomic::AtomicUsize,
    /// One sweep of forks' captures at a time.
    sweep_lock: tokio::sync::Mutex<()>,
    /// Volumes and their content keepers.
    volumes: volumes::Volumes,
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

/// A poisoned lock only means another thread panicked mid-update of plain data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SandboxManager {
    /// A manager over `backend`. Call [`SandboxManager::start`] before serving requests.
    pub fn new(backend: DynBackend, config: ManagerConfig) -> Self {
        let creates = Semaphore::new(config.max_concurrent_creates.max(1));
        let deadlines = DeadlineStore::new(config.state_dir.as_ref().map(|d| d.join("deadlines")));
        let journal = CreateJournal::new(config.state_dir.as_ref().map(|d| d.join("creating")));
        let claims = pool::ClaimStore::new(config.state_dir.as_ref().map(|d| d.join("claims")));
        let networks =
            egress::NetworkStore::new(config.state_dir.as_ref().map(|d| d.join("network")));
        let lifecycles = pausing::LifecycleStore::new(
            config.state_dir.as_ref().map(|d| d.join("lifecycle")),
            "lifecycle",
        );
        let mut builds = config.builds.clone();
        if builds.dir.is_none() {
            builds.dir = config.state_dir.as_ref().map(|d| d.join("templates"));
        }
        let (templates, interrupted) = crate::template::registry::Registry::open(builds);
        Self {
            inner: Arc::new(Inner {
                // Every engine call the manager makes is timed and counted.
                backend: Arc::new(crate::backend::instrumented::Instrumented(backend)),
                config,
                registry: Mutex::new(Registry::default()),
                creates,
                queued: Default::default(),
                pool: Default::default(),
                pool_wake: Arc::new(Notify::new()),
                claims,
                reclaim: Default::default(),
                reaper_wake: Arc::new(Notify::new()),
                deadlines,
                journal,
                unfinished: Mutex::new(HashMap::new()),
                host: Mutex::new(None),
                derived_ready: Mutex::new(HashSet::new()),
                derive_lock: tokio::sync::Mutex::new(()),
                agents: Mutex::new(HashMap::new()),
                http: crate::agent::http_client(),
                disk_used: Mutex::new(HashMap::new()),
                disk_refreshing: Mutex::new(HashSet::new()),
                disk_reads: Semaphore::new(1),
                templates: Arc::new(templates),
                interrupted_builds: Mutex::new(interrupted),
                metrics_history: Default::default(),
                logs: Default::default(),
                firewall: Mutex::new(None),
                networks,
                egress_lock: tokio::sync::Mutex::new(()),
                egress_proxy: std::sync::OnceLock::new(),
                proxied: Default::default(),
                foreign_egress: Mutex::new(Vec::new()),
                lifecycles,
                turns: Mutex::new(HashMap::new()),
                forks_under_way: Default::default(),
                sweep_lock: tokio::sync::Mutex::new(()),
                volumes: Default::default(),
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

    /// Reads what the engine's host has, re-adopts this server's sandboxes from the
    /// engine and starts the reaper.
    pub async fn start(&self) -> Result<RecoveryReport> {
        let info = self.inner.backend.check().await?;
        *lock(&self.inner.host) = Some(info);
        // Before any sandbox is re-adopted or created.
        self.install_firewall().await?;
        self.start_egress_proxy().await;
        self.note_foreign_egress().await;
        self.load_volumes().await;
        let report = self.recover().await?;
        let interrupted = std::mem::take(&mut *lock(&self.inner.interrupted_builds));
        for image in interrupted {
            self.remove_build_images(&image).await;
        }
        self.spawn_reaper();
        self.spawn_sampler();
        self.spawn_refiller();
        // Forks' captures whose sandboxes went while the server was down, and derived
        // images that no template needs any more.
        let manager = self.clone();
        tokio::spawn(async move {
            manager.sweep_fork_captures().await;
            manager.prune_derived_images().await;
        });
        self.spawn_firewall_keeper();
        Ok(report)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.inner.registry)
    }

    fn agents(&self) -> MutexGuard<'_, HashMap<SandboxId, AgentClient>> {
        lock(&self.inner.agents)
    }

    /// Drops what the server keeps about a sandbox that no longer exists.
    fn forget(&self, id: &SandboxId) {
        self.inner.deadlines.forget(id);
        self.inner.claims.forget(id);
        self.agents().remove(id);
        self.inner.metrics_history.forget(id);
        self.forget_lifecycle(id);
        if self.inner.templates.list().iter().any(|t| t.ephemeral) {
            // It may have been the last sandbox of a fork's capture.
            let manager = self.clone();
            tokio::spawn(async move { manager.sweep_fork_captures().await });
        }
        if self.inner.networks.get(id).is_some() {
            let (manager, id) = (self.clone(), id.clone());
            tokio::spawn(async move { manager.forget_network(&id).await });
        }
    }

    /// Lists sandboxes whose metadata contains every pair in `metadata`, oldest first.
    pub fn list(&self, metadata: &BTreeMap<String, String>) -> Vec<SandboxInfo> {
        let mut out: Vec<SandboxInfo> = self
            .registry()
            .sandboxes
            .values()
            .filter(|s| metadata.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        out
    }

    /// Ids of the sandboxes that run now.
    fn running_ids(&self) -> Vec<SandboxId> {
        self.registry()
            .sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Running)
            .map(|s| s.id.clone())
            .collect()
    }

    /// One page of the sandboxes `q` selects (see [`crate::listing`]).
    pub fn list_page(&self, q: &crate::listing::Query) -> Result<crate::listing::Page> {
        // A built template is named by its id or its name: a sandbox matches by either.
        let synonyms: Vec<String> = q
            .template
            .as_deref()
            .and_then(|t| self.templates().find(t))
            .map(|t| vec![t.id, t.name])
            .unwrap_or_default();
        let all = self.registry().sandboxes.values().cloned().collect();
        crate::listing::page(all, q, &synonyms)
    }

    /// What the manager knows about sandbox `id`, without asking the engine.
    pub fn info(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.registry()
            .sandboxes
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// One sandbox, with its state refreshed from the engine.
    pub async fn get(&self, id: &SandboxId) -> Result<SandboxInfo> {
        let mut info = self.info(id)?;
        match self
            .inner
            .backend
            .inspect(&labels::container_name(id))
            .await
        {
            Ok(container) => {
                // A pause that kept only the filesystem is a stopped container.
                info.state = match container.state {
                    SandboxState::Exited | SandboxState::Created if self.parked(id) => {
                        SandboxState::Paused
                    }
                    state => state,
                };
                if let Some(s) = self.registry().sandboxes.get_mut(id) {
                    s.state = info.state;
                }
                Ok(info)
            }
            Err(Error::NotFound { .. }) => {
                // Removed behind our back (e.g. `docker rm -f`).
                self.registry().sandboxes.remove(id);
                self.forget(id);
                self.end_log(
                    id,
                    sandbox_logs::LogEntry::now(
                        sandbox_logs::LogLevel::Warn,
                        "sandbox container was removed outside the server",
                        &[],
                    ),
                );
                self.update_gauges();
                Err(not_found(id))
            }
            Err(e) => Err(e),
        }
    }

    /// What the engine says of sandbox `id`'s container (gone: the sandbox is not found).
    pub(super) async fn sandbox_container(
        &self,
        id: &SandboxId,
    ) -> Result<crate::backend::ContainerInfo> {
        self.inner
            .backend
            .inspect(&labels::container_name(id))
            .await
            .map_err(|e| match e {
                Error::NotFound { .. } => not_found(id),
                other => other,
            })
    }

    fn set_state(&self, id: &SandboxId, state: SandboxState) -> Result<SandboxInfo> {
        let info = {
            let mut reg = self.registry();
            let s = reg.sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            s.state = state;
            s.clone()
        };
        self.update_gauges();
        Ok(info)
    }

    fn update_gauges(&self) {
        let mut counts: BTreeMap<(String, &'static str), f64> = BTreeMap::new();
        for template in self.inner.config.templates.keys() {
            for state in [SandboxState::Running, SandboxState::Paused] {
                counts.insert((template.clone(), state.as_str()), 0.0);
            }
        }
        for s in self.registry().sandboxes.values() {
            *counts
                .entry((s.template.clone(), s.state.as_str()))
                .or_default() += 1.0;
        }
        for ((template, state), n) in counts {
            metrics::gauge!("colima_e2b_sandboxes_active", "template" => template, "state" => state)
                .set(n);
        }
    }

    async fn remove_quietly(&self, name: &str) {
        match self.inner.backend.remove(name).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(container = name, error = %e, "could not remove container"),
        }
    }
}

fn not_found(id: &SandboxId) -> Error {
    Error::not_found(format!("sandbox {id}"))
}
