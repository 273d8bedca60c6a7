//! Layered configuration: built-in defaults < TOML file < environment < CLI flags.
//!
//! Environment: `COLIMA_E2B_<KEY>` for any key (`__` separates nested keys, e.g.
//! `COLIMA_E2B_DOCKER__COLIMA_PROFILE`), plus the seed's `HOST`, `PORT` and `DOCKER_HOST`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use sandbox_core::{AgentBinary, CommandLimits, Limits, SandboxProfile, Template};
use serde::{Deserialize, Serialize};

/// Which container engine to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Docker Engine (DOCKER_HOST, the Colima socket, /var/run/docker.sock).
    #[default]
    Docker,
    /// Docker on the Colima profile's socket, with Colima advice when it is down.
    Colima,
    /// Podman's libpod API.
    Podman,
    /// The first engine that answers: Docker, then Podman.
    Auto,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Docker => "docker",
            BackendKind::Colima => "colima",
            BackendKind::Podman => "podman",
            BackendKind::Auto => "auto",
        })
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// The whole server configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Sandboxes can reach the host's bridge addresses, so the
    /// default is loopback only.
    pub host: String,
    /// Port to listen on.
    pub port: u16,
    /// Container engine backend.
    pub backend: BackendKind,
    /// Log filter, e.g. `info` or `colima_e2b=debug,info`.
    pub log_level: String,
    /// Identifies this server's sandboxes on a shared engine.
    pub owner: String,
    /// Where state that must survive a restart is kept (deadline changes).
    pub state_dir: Option<PathBuf>,
    /// Creates allowed at once; more wait for their turn (see `create_queue_wait`).
    pub max_concurrent_creates: usize,
    /// Creates allowed to wait for their turn; more get 429.
    pub max_queued_creates: usize,
    /// Seconds a create may wait for its turn before it gets 429.
    pub create_queue_wait: u64,
    /// The warm pool: pre-started sandboxes per template (`base = 4`; 0 disables).
    pub pool: PoolSettings,
    /// Sandboxes allowed at once; more get 429.
    pub max_sandboxes: usize,
    /// Template used when a request names none.
    pub default_template: String,
    /// Seconds a sandbox lives when a request gives no timeout.
    pub default_timeout: u64,
    /// Longest timeout a client may ask for, seconds.
    pub max_timeout: u64,
    /// Seconds a paused sandbox is kept before it is removed.
    pub paused_retention: u64,
    /// Resource limits per sandbox: defaults and the most a client may ask for.
    pub limits: LimitsConfig,
    /// Start even where the engine's storage cannot enforce disk quotas (one sandbox could
    /// then fill the engine's disk).
    pub allow_unlimited_disk: bool,
    /// Seconds a client (WebSocket, stream, download) may take nothing before it is
    /// dropped; the agent drops a stalled reader of a command after the same time.
    pub stall_timeout: u64,
    /// The baseline every sandbox container gets beyond its limits.
    pub profile: ProfileConfig,
    /// Commands of the native API.
    pub commands: CommandsConfig,
    /// File transfers of the native API.
    pub files: FilesConfig,
    /// Template builds (native and E2B's template API).
    pub builds: BuildsConfig,
    /// What is kept about each sandbox over time: resource samples and its log.
    pub history: HistoryConfig,
    /// Template name to template: an image reference, or a table with `image`, `user`
    /// (default `user`) and `workdir`.
    pub templates: BTreeMap<String, Template>,
    /// The static agent binary put into every sandbox (env COLIMA_E2B_AGENT_BINARY).
    /// Default: `sandbox-agent` next to the server executable, else the workspace's
    /// `target/x86_64-unknown-linux-gnu/agent/sandbox-agent` (deploy/build-agent.sh).
    pub agent_binary: Option<PathBuf>,
    /// The perimeter: API keys, local development mode, host names and browser origins.
    pub auth: AuthConfig,
    /// The E2B compatibility layer.
    pub e2b: E2bConfig,
    /// What sandboxes may reach: the host firewall for the sandbox networks and its
    /// allowances (private CIDRs, host ports).
    pub network: sandbox_core::network::FirewallConfig,
    /// Docker backend settings.
    #[cfg(feature = "docker")]
    pub docker: backend_docker::DockerConfig,
    /// Podman backend settings.
    #[cfg(feature = "podman")]
    pub podman: backend_podman::PodmanConfig,
}

impl Default for Config {
    fn default() -> Self {
        let mut templates = BTreeMap::new();
        templates.insert("base".into(), Template::new("colima-e2b/base:latest"));
        templates.insert("python".into(), Template::new("colima-e2b/python:latest"));
        templates.insert(
            crate::prepare::TEMPLATE_NAME.into(),
            crate::prepare::template(),
        );
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            backend: BackendKind::Docker,
            log_level: "info".into(),
            owner: "default".into(),
            state_dir: None,
            max_concurrent_creates: 8,
            max_queued_creates: 256,
            create_queue_wait: 60,
            pool: PoolSettings::default(),
            max_sandboxes: 100,
            default_template: "base".into(),
            default_timeout: 300,
            max_timeout: 24 * 3600,
            paused_retention: 30 * 24 * 3600,
            limits: LimitsConfig::default(),
            allow_unlimited_disk: false,
            stall_timeout: 30,
            profile: ProfileConfig::default(),
            commands: CommandsConfig::default(),
            files: FilesConfig::default(),
            builds: BuildsConfig::default(),
            history: HistoryConfig::default(),
            templates,
            agent_binary: None,
            auth: AuthConfig::default(),
            e2b: E2bConfig::default(),
            network: Default::default(),
            #[cfg(feature = "docker")]
            docker: Default::default(),
            #[cfg(feature = "podman")]
            podman: Default::default(),
        }
    }
}

/// `[pool]`: how many pre-started sandboxes each template keeps (`base = 4`; 0 or absent:
/// none), and the memory their limits may add up to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolSettings {
    /// Most memory the members' limits may add up to, MiB.
    pub memory_budget_mb: u64,
    /// Template name to the number of members it keeps.
    #[serde(flatten)]
    pub sizes: BTreeMap<String, usize>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            memory_budget_mb: sandbox_core::manager::PoolConfig::default().memory_budget_mb,
            sizes: BTreeMap::from([("base".to_string(), 2)]),
        }
    }
}

impl PoolSettings {
    /// The manager's pool configuration.
    pub fn pool(&self) -> sandbox_core::manager::PoolConfig {
        sandbox_core::manager::PoolConfig {
            sizes: self.sizes.clone(),
            memory_budget_mb: self.memory_budget_mb,
        }
    }
}

/// `[limits]`: what a sandbox gets when it asks for nothing, and the most it may ask for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// CPU cores (fractions allowed).
    pub cpus: f64,
    /// Memory, MiB (swap limited to the same value).
    pub memory_mb: u64,
    /// Processes.
    pub pids: i64,
    /// Most CPUs a create may ask for; default: the engine host's CPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<f64>,
    /// Most memory a create may ask for, MiB; default: the engine host's memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Disk quota, MiB, over everything a sandbox can write (on btrfs storage its image
    /// counts too). Writes past it fail inside with ENOSPC/EDQUOT; file APIs answer 507.
    pub disk_mb: u64,
    /// Largest disk quota a create may ask for, MiB.
    pub max_disk_mb: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            cpus: l.cpus,
            memory_mb: l.memory_mb,
            pids: l.pids,
            max_cpus: None,
            max_memory_mb: None,
            disk_mb: 2048,
            max_disk_mb: 16384,
        }
    }
}

impl LimitsConfig {
    /// The default limits.
    pub fn defaults(&self) -> Limits {
        Limits {
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            pids: self.pids,
            disk_mb: Some(self.disk_mb),
        }
    }
}

/// `[profile]`: per-process limits and the engine log of every sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// Open files per process.
    pub nofile: u64,
    /// Largest file a process may write, MiB.
    pub max_file_size_mb: u64,
    /// Container log the engine keeps, KiB (output goes through the agent; the log only
    /// serves debugging).
    pub log_max_kb: u64,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        let p = SandboxProfile::default();
        Self {
            nofile: p.nofile,
            max_file_size_mb: p.max_file_size >> 20,
            log_max_kb: p.log_max_bytes >> 10,
        }
    }
}

impl ProfileConfig {
    /// The profile the manager applies.
    pub fn profile(&self) -> SandboxProfile {
        SandboxProfile {
            nofile: self.nofile,
            max_file_size: self.max_file_size_mb.saturating_mul(1 << 20),
            log_max_bytes: self.log_max_kb.saturating_mul(1 << 10),
            ..SandboxProfile::default()
        }
    }
}

/// `[commands]`: foreground commands of the native API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Timeout of a command that names none, seconds.
    pub default_timeout: u64,
    /// Longest timeout a command may ask for, seconds.
    pub max_timeout: u64,
    /// Output kept per stream (stdout, stderr) of a foreground command, KiB.
    pub max_output_kb: u64,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        let c = CommandLimits::default();
        Self {
            default_timeout: c.default_timeout.as_secs(),
            max_timeout: c.max_timeout.as_secs(),
            max_output_kb: (c.max_output >> 10) as u64,
        }
    }
}

impl CommandsConfig {
    /// The limits the manager applies.
    pub fn limits(&self) -> CommandLimits {
        CommandLimits {
            default_timeout: std::time::Duration::from_secs(self.default_timeout),
            max_timeout: std::time::Duration::from_secs(self.max_timeout),
            max_output: usize::try_from(self.max_output_kb.saturating_mul(1 << 10))
                .unwrap_or(usize::MAX),
        }
    }
}

/// `[files]`: file transfers of the native API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest raw upload (`PUT /sandboxes/{id}/files/raw`), MiB; past it the answer is 413
    /// and the file is left as it was.
    pub max_upload_mb: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            max_upload_mb: 1024,
        }
    }
}

/// `[builds]`: template builds, on the configured engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildsConfig {
    /// Builds running at once.
    pub max_concurrent: usize,
    /// Builds that may wait for a slot; more get 429.
    pub max_queued: usize,
    /// Memory of each build step, MiB.
    pub memory_mb: u64,
    /// CPUs of each build step.
    pub cpus: f64,
    /// Longest a build may take, seconds.
    pub timeout: u64,
    /// Whether RUN steps may reach the network (package registries).
    pub network: bool,
    /// Log kept per build, KiB (the oldest lines go first).
    pub max_log_kb: u64,
    /// Largest build context or COPY upload, MiB.
    pub max_upload_mb: u64,
    /// How long a new sandbox's ready command may take to pass, seconds.
    pub ready_timeout: u64,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        let d = sandbox_core::template::registry::RegistryConfig::default();
        Self {
            max_concurrent: d.max_concurrent_builds,
            max_queued: d.max_queued_builds,
            memory_mb: d.build_memory_mb,
            cpus: d.build_cpus,
            timeout: d.build_timeout.as_secs(),
            network: d.build_network,
            max_log_kb: (d.max_log_bytes >> 10) as u64,
            max_upload_mb: d.max_upload_bytes >> 20,
            ready_timeout: d.ready_timeout.as_secs(),
        }
    }
}

impl BuildsConfig {
    /// What the template registry runs builds with (`dir`: the state directory's).
    pub fn registry(&self) -> sandbox_core::template::registry::RegistryConfig {
        sandbox_core::template::registry::RegistryConfig {
            dir: None,
            max_concurrent_builds: self.max_concurrent.max(1),
            max_queued_builds: self.max_queued,
            build_memory_mb: self.memory_mb.max(64),
            build_cpus: if self.cpus > 0.0 { self.cpus } else { 1.0 },
            build_timeout: std::time::Duration::from_secs(self.timeout.max(1)),
            build_network: self.network,
            max_log_bytes: usize::try_from(self.max_log_kb.saturating_mul(1 << 10))
                .unwrap_or(usize::MAX),
            max_upload_bytes: self.max_upload_mb.saturating_mul(1 << 20),
            ready_timeout: std::time::Duration::from_secs(self.ready_timeout.max(1)),
        }
    }
}

/// `[history]`: what is kept about each sandbox over time, in memory (E2B's
/// `get_metrics(start, end)` and sandbox logs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Seconds between two resource samples of a running sandbox; 0 turns sampling off.
    pub metrics_interval: u64,
    /// Seconds resource samples are kept.
    pub metrics_retention: u64,
    /// Log entries kept per sandbox (the oldest go first).
    pub log_entries: usize,
    /// Seconds the log of a sandbox that ended stays readable.
    pub log_retention: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        let m = sandbox_core::manager::MetricsHistoryConfig::default();
        let l = sandbox_core::manager::LogConfig::default();
        Self {
            metrics_interval: m.interval.as_secs(),
            metrics_retention: m.retention.as_secs(),
            log_entries: l.entries,
            log_retention: l.retention.as_secs(),
        }
    }
}

impl HistoryConfig {
    /// The manager's sampler settings.
    pub fn metrics(&self) -> sandbox_core::manager::MetricsHistoryConfig {
        sandbox_core::manager::MetricsHistoryConfig {
            interval: std::time::Duration::from_secs(self.metrics_interval),
            retention: std::time::Duration::from_secs(self.metrics_retention.max(1)),
        }
    }

    /// The manager's log settings.
    pub fn logs(&self) -> sandbox_core::manager::LogConfig {
        sandbox_core::manager::LogConfig {
            entries: self.log_entries.clamp(1, 100_000),
            retention: std::time::Duration::from_secs(self.log_retention),
        }
    }
}

/// `[auth]`: one key store for every way in.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `auto` (default): a key is needed, but loopback peers with a loopback Host may go
    /// without one (local development), except to drive sandboxes created secure.
    /// `required`: a key on every request. `off`: no keys; refused on a non-loopback bind.
    pub mode: sandbox_api::auth::AuthMode,
    /// Named keys, any of which is accepted (several, for rotation), besides the key
    /// `colima-e2b env` prints (`e2b.api_key`, else generated into the state directory).
    /// Keys for E2B SDK clients look like `e2b_` + hex (the SDK checks that shape).
    pub keys: BTreeMap<String, String>,
    /// Host names the server answers for besides loopback names and the E2B domain
    /// (`*.name` for subdomains); requests for any other name get 421 (DNS rebinding).
    pub hosts: Vec<String>,
    /// Browser origins allowed to call the API (`https://app.example.com`); requests
    /// from any other origin get 403. Empty: same-origin only.
    pub cors_origins: Vec<String>,
}

/// Settings of the E2B compatibility layer (`/e2b`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct E2bConfig {
    /// Serve E2B's control plane, data plane and sandbox host names.
    pub enabled: bool,
    /// The key SDK clients send (`E2B_API_KEY`). Default: a random key kept in the
    /// state directory (`e2b-api-key`), printed by `colima-e2b env`.
    pub api_key: Option<String>,
    /// Domain of sandbox host names (`<port>-<id>.<domain>`). Default `localhost:<port>`.
    pub domain: Option<String>,
}

impl Default for E2bConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            api_key: None,
            domain: None,
        }
    }
}

/// Top-level configuration keys, for telling config variables from other `COLIMA_E2B_*`.
const KEYS: &[&str] = &[
    "host",
    "port",
    "backend",
    "log_level",
    "owner",
    "state_dir",
    "max_concurrent_creates",
    "max_queued_creates",
    "create_queue_wait",
    "pool",
    "max_sandboxes",
    "default_template",
    "default_timeout",
    "max_timeout",
    "paused_retention",
    "limits",
    "allow_unlimited_disk",
    "stall_timeout",
    "auth",
    "profile",
    "commands",
    "files",
    "builds",
    "history",
    "templates",
    "agent_binary",
    "e2b",
    "network",
    "docker",
    "podman",
];

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CliOverrides {
    /// `--host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `--port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `--backend`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// `--log-level`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// The config file used when none is named: `$XDG_CONFIG_HOME/colima-e2b/config.toml`.
pub fn default_config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("colima-e2b").join("config.toml"))
}

/// Merges every layer. A named file must exist; the default file is optional.
pub fn load(file: Option<&Path>, cli: &CliOverrides) -> Result<Config, String> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    match file {
        Some(path) => {
            if !path.is_file() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            figment = figment.merge(Toml::file(path));
        }
        None => {
            if let Some(path) = default_config_file().filter(|p| p.is_file()) {
                figment = figment.merge(Toml::file(path));
            }
        }
    }
    figment = figment
        .merge(Env::raw().only(&["HOST", "PORT"]))
        .merge(
            Env::raw()
                .only(&["DOCKER_HOST"])
                .map(|_| "docker.host".into()),
        )
        .merge(
            Env::raw()
                .only(&["CONTAINER_HOST"])
                .map(|_| "podman.socket".into()),
        )
        .merge(
            Env::prefixed("COLIMA_E2B_")
                // Other COLIMA_E2B_* variables (used by scripts and tests) are not config.
                .filter(|key| {
                    let top = key.as_str().split("__").next().unwrap_or_default();
                    KEYS.iter().any(|k| top.eq_ignore_ascii_case(k))
                })
                .split("__"),
        )
        .merge(Serialized::defaults(cli));
    let config: Config = figment.extract().map_err(|e| {
        e.into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    config.validate()?;
    Ok(config)
}

impl Config {
    /// Checks values no type can: ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), String> {
        self.limits
            .defaults()
            .validate()
            .map_err(|e| format!("limits: {e}"))?;
        if let Some(max) = self.limits.max_cpus {
            if !(max.is_finite() && max >= self.limits.cpus) {
                return Err("limits.max_cpus must be at least limits.cpus".into());
            }
        }
        if !(1..=3600).contains(&self.stall_timeout) {
            return Err("stall_timeout must be between 1 and 3600 seconds".into());
        }
        if self.limits.max_disk_mb < self.limits.disk_mb {
            return Err("limits.max_disk_mb must be at least limits.disk_mb".into());
        }
        if let Some(max) = self.limits.max_memory_mb {
            if max < self.limits.memory_mb {
                return Err("limits.max_memory_mb must be at least limits.memory_mb".into());
            }
        }
        if !self.templates.contains_key(&self.default_template) {
            return Err(format!(
                "default_template {:?} is not in [templates]",
                self.default_template
            ));
        }
        for name in self.pool.sizes.keys() {
            if !self.templates.contains_key(name) {
                return Err(format!(
                    "pool.{name}: no template {name:?} in [templates] (known: {})",
                    self.templates
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if self.max_concurrent_creates == 0 {
            return Err("max_concurrent_creates must be at least 1".into());
        }
        if self.default_timeout == 0 || self.default_timeout > self.max_timeout {
            return Err("default_timeout must be between 1 and max_timeout".into());
        }
        if self.paused_retention == 0 {
            return Err("paused_retention must be at least 1 second".into());
        }
        let c = &self.commands;
        if c.default_timeout == 0 || c.default_timeout > c.max_timeout {
            return Err(
                "commands.default_timeout must be between 1 and commands.max_timeout".into(),
            );
        }
        if self.profile.nofile < 64 || self.profile.max_file_size_mb == 0 {
            return Err(
                "profile.nofile must be at least 64 and profile.max_file_size_mb at least 1".into(),
            );
        }
        for (name, key) in &self.auth.keys {
            if name.is_empty() || key.len() < 16 || key.chars().any(char::is_whitespace) {
                return Err(format!(
                    "auth.keys.{name}: keys must be at least 16 characters without spaces"
                ));
            }
        }
        if self.owner.is_empty()
            || !self
                .owner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err("owner must be letters, digits, '-', '_' or '.'".into());
        }
        Ok(())
    }

    /// Loads the agent binary: the configured one, else the first default location
    /// holding a static agent build (see [`Config::agent_binary`]).
    pub fn load_agent(&self) -> Result<(PathBuf, AgentBinary), String> {
        if let Some(path) = &self.agent_binary {
            let agent = AgentBinary::load(path).map_err(|e| format!("agent_binary: {e}"))?;
            return Ok((path.clone(), agent));
        }
        let mut candidates = Vec::new();
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            candidates.push(dir.join("sandbox-agent"));
        }
        candidates.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/agent/sandbox-agent"),
        );
        let mut why = Vec::new();
        for path in &candidates {
            if !path.is_file() {
                why.push(format!("{} (missing)", path.display()));
                continue;
            }
            // A dynamically linked development build next to the server is skipped.
            match AgentBinary::load(path) {
                Ok(agent) => return Ok((path.clone(), agent)),
                Err(e) => why.push(e.to_string()),
            }
        }
        Err(format!(
            "no usable sandbox agent binary: {}. Build it with `bash deploy/build-agent.sh` \
             or point agent_binary (env COLIMA_E2B_AGENT_BINARY) at it",
            why.join("; ")
        ))
    }

    /// The address clients use to reach this server (loopback for wildcard binds).
    pub fn client_base_url(&self) -> String {
        let host = match self.host.as_str() {
            "0.0.0.0" | "" => "127.0.0.1".to_string(),
            "::" | "[::]" => "[::1]".to_string(),
            h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
            h => h.to_string(),
        };
        format!("http://{host}:{}", self.port)
    }

    /// The domain of sandbox host names: configured, else `localhost:<port>`.
    pub fn e2b_domain(&self) -> String {
        self.e2b
            .domain
            .clone()
            .unwrap_or_else(|| format!("localhost:{}", self.port))
    }

    /// The E2B API key: configured, else the one kept in the state directory, created
    /// (`e2b_` and 40 hex digits, mode 0600) on first use.
    pub fn e2b_api_key(&self) -> Result<String, String> {
        if let Some(key) = self.e2b.api_key.as_ref().filter(|k| !k.is_empty()) {
            return Ok(key.clone());
        }
        let dir = self
            .state_dir()
            .ok_or("no state directory (set state_dir or HOME) to keep the E2B API key in")?;
        let path = dir.join("e2b-api-key");
        if let Ok(key) = std::fs::read_to_string(&path) {
            let key = key.trim();
            if !key.is_empty() {
                return Ok(key.to_string());
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let key = format!("e2b_{}", sandbox_core::agent::generate_hex(20));
        let tmp = dir.join(format!(".e2b-api-key.{}", std::process::id()));
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            f.write_all(key.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        }
        // A concurrent first start may have won; keep whichever key landed first.
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                Ok(key)
            }
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
                std::fs::read_to_string(&path)
                    .map(|k| k.trim().to_string())
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
            }
        }
    }

    /// Whether the server listens on loopback addresses only.
    pub fn binds_loopback(&self) -> bool {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Every key the server accepts, by name: the one `colima-e2b env` prints (`default`)
    /// and `[auth.keys]`.
    pub fn api_keys(&self) -> Result<Vec<(String, String)>, String> {
        let mut keys = vec![("default".to_string(), self.e2b_api_key()?)];
        keys.extend(self.auth.keys.iter().map(|(n, k)| (n.clone(), k.clone())));
        Ok(keys)
    }

    /// Shell `export` lines that point the official E2B SDKs at this server.
    pub fn e2b_env(&self) -> Result<String, String> {
        let base = self.client_base_url();
        let key = self.e2b_api_key()?;
        Ok(format!(
            "export E2B_API_URL={base}/e2b\n\
             export E2B_SANDBOX_URL={base}/e2b/envd\n\
             export E2B_VOLUME_API_URL={base}\n\
             export E2B_DOMAIN={domain}\n\
             export E2B_API_KEY={key}\n",
            domain = self.e2b_domain(),
        ))
    }

    /// The state directory: configured, else `$XDG_STATE_HOME/colima-e2b`, else
    /// `~/.local/state/colima-e2b`; one subdirectory per owner.
    pub fn state_dir(&self) -> Option<PathBuf> {
        let base = self.state_dir.clone().or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state"))
                })
                .map(|d| d.join("colima-e2b"))
        })?;
        Some(base.join(&self.owner))
    }
}

#[cfg(test)]
// figment's Jail API returns its large error type by value.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn write(jail: &mut Jail, body: &str) -> PathBuf {
        jail.create_file("c.toml", body).expect("write config");
        jail.directory().join("c.toml")
    }

    #[test]
    fn every_toml_block_of_the_readme_is_a_valid_config() {
        let readme = include_str!("../../../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .collect();
        assert!(blocks.len() >= 3, "README has {} toml blocks", blocks.len());
        for block in blocks {
            Jail::expect_with(|jail| {
                jail.clear_env();
                let file = write(jail, block);
                load(Some(&file), &CliOverrides::default())
                    .unwrap_or_else(|e| panic!("{e}\n{block}"));
                Ok(())
            });
        }
    }

    #[test]
    fn pool_sizes_come_from_the_file_and_the_environment() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let c = load(None, &CliOverrides::default()).expect("load defaults");
            assert_eq!(c.pool.sizes.get("base"), Some(&2));
            let file = write(jail, "[pool]\npython = 3\nmemory_budget_mb = 1024\n");
            jail.set_env("COLIMA_E2B_POOL__BASE", "0");
            let c = load(Some(&file), &CliOverrides::default()).expect("load");
            assert_eq!(c.pool.sizes.get("python"), Some(&3));
            assert_eq!(c.pool.sizes.get("base"), Some(&0));
            assert_eq!(c.pool.memory_budget_mb, 1024);
            c.validate().expect("valid");
            let file = write(jail, "[pool]\nnope = 1\n");
            let err = load(Some(&file), &CliOverrides::default()).expect_err("unknown template");
            assert!(err.contains("pool.nope"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_cli() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let file = write(jail, "port = 9001\nhost = \"127.0.0.2\"\nmax_sandboxes = 7\n[docker]\ncolima_profile = \"work\"\n");
            let c = load(Some(&file), &CliOverrides::default()).expect("load");
            assert_eq!(
                (c.port, c.host.as_str(), c.max_sandboxes),
                (9001, "127.0.0.2", 7)
            );
            assert_eq!(c.docker.colima_profile, "work");
            assert_eq!(c.default_timeout, 300, "default kept");

            jail.set_env("PORT", "9002");
            jail.set_env("COLIMA_E2B_MAX_SANDBOXES", "9");
            jail.set_env("COLIMA_E2B_DOCKER__COLIMA_PROFILE", "envprof");
            jail.set_env("DOCKER_HOST", "unix:///tmp/d.sock");
            let c = load(Some(&file), &CliOverrides::default()).expect("load");
            assert_eq!((c.port, c.max_sandboxes), (9002, 9));
            assert_eq!(c.docker.colima_profile, "envprof");
            assert_eq!(c.docker.host.as_deref(), Some("unix:///tmp/d.sock"));

            jail.set_env("COLIMA_E2B_PORT", "9003");
            let c = load(Some(&file), &CliOverrides::default()).expect("load");
            assert_eq!(c.port, 9003, "COLIMA_E2B_PORT beats PORT");

            let cli = CliOverrides {
                port: Some(9004),
                backend: Some(BackendKind::Podman),
                ..Default::default()
            };
            let c = load(Some(&file), &cli).expect("load");
            assert_eq!((c.port, c.backend), (9004, BackendKind::Podman));
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_reported_with_their_key() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let file = write(jail, "port = \"eighty\"\n");
            let err = load(Some(&file), &CliOverrides::default()).expect_err("bad port");
            assert!(err.contains("port"), "{err}");
            let file = write(jail, "no_such_key = 1\n");
            let err = load(Some(&file), &CliOverrides::default()).expect_err("unknown key");
            assert!(err.contains("no_such_key"), "{err}");
            let file = write(jail, "default_template = \"nope\"\n");
            assert!(load(Some(&file), &CliOverrides::default()).is_err());
            jail.set_env("COLIMA_E2B_BACKEND", "kubernetes");
            let file = write(jail, "");
            assert!(load(Some(&file), &CliOverrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn every_config_key_can_come_from_the_environment() {
        let mut config = Config {
            state_dir: Some("/x".into()),
            ..Config::default()
        };
        config.owner = "o".into();
        let toml = toml::to_string(&config).expect("serialize");
        let table: toml::Table = toml.parse().expect("parse");
        for key in table.keys() {
            assert!(KEYS.contains(&key.as_str()), "{key} is missing from KEYS");
        }
    }

    #[test]
    fn unrelated_colima_e2b_variables_are_ignored() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("COLIMA_E2B_TEST_BACKEND", "podman");
            jail.set_env("COLIMA_E2B_BIN", "/x");
            jail.set_env("COLIMA_E2B_BACKEND", "podman");
            let c = load(None, &CliOverrides::default()).expect("load");
            assert_eq!(c.backend, BackendKind::Podman);
            Ok(())
        });
    }

    #[test]
    fn a_named_missing_file_is_an_error() {
        let err = load(
            Some(Path::new("/nonexistent/colima-e2b.toml")),
            &CliOverrides::default(),
        )
        .expect_err("missing file");
        assert!(err.contains("does not exist"));
    }
}
