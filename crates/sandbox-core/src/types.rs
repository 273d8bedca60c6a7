//! Domain types: sandbox ids, specs, states and what the core knows about a sandbox.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// Prefix of every sandbox id (`clm` + random lowercase alphanumerics).
pub const SANDBOX_ID_PREFIX: &str = "clm";
const SANDBOX_ID_RANDOM_LEN: usize = 16;
const MAX_SANDBOX_ID_LEN: usize = 63;

/// A sandbox id: a DNS-label-safe string of lowercase ASCII letters and digits.
///
/// `len` random characters of `[a-z0-9]` (DNS-label safe), from the OS random source.
pub(crate) fn random_alphanumeric(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut raw = vec![0u8; len];
    // getrandom only fails when the OS has no entropy source at all.
    getrandom::fill(&mut raw).expect("the OS random source is available");
    // 256 % 36 != 0, so fold the top bytes to keep the distribution near uniform.
    raw.into_iter()
        .map(|b| {
            let b = if b >= 252 { b - 252 } else { b };
            ALPHABET[(b % 36) as usize] as char
        })
        .collect()
}

/// Ids appear in host names such as `49983-<id>.localhost`, so they are checked on parse.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// A new random id with the project prefix.
    pub fn generate() -> Self {
        Self(format!(
            "{SANDBOX_ID_PREFIX}{}",
            random_alphanumeric(SANDBOX_ID_RANDOM_LEN)
        ))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SandboxId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let valid = !s.is_empty()
            && s.len() <= MAX_SANDBOX_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::InvalidArgument(format!(
                "sandbox id must be 1-{MAX_SANDBOX_ID_LEN} lowercase letters or digits"
            )))
        }
    }
}

impl TryFrom<String> for SandboxId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> Self {
        id.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The lifecycle state of a sandbox as the engine reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Created in the engine but not started (a half-created sandbox).
    Created,
    /// Running.
    Running,
    /// Frozen by the engine.
    Paused,
    /// The main process exited or the container is being removed.
    Exited,
}

impl SandboxState {
    /// The lowercase name used in APIs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Created => "created",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Exited => "exited",
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The smallest disk quota a sandbox may have, MiB.
pub const MIN_DISK_MB: u64 = 64;

/// Resource limits applied to a sandbox container.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// CPU quota in whole or fractional cores.
    pub cpus: f64,
    /// Memory limit in MiB (swap is limited to the same value, so no extra swap).
    pub memory_mb: u64,
    /// Maximum number of processes and threads.
    pub pids: i64,
    /// Disk quota in MiB over everything the sandbox can write (its whole root
    /// filesystem where the engine's storage counts the image too); `None`: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            disk_mb: None,
            cpus: 1.0,
            memory_mb: 512,
            pids: 256,
        }
    }
}

impl Limits {
    /// Rejects limits that are zero, negative or absurd.
    pub fn validate(&self) -> Result<()> {
        // Engines take CPU quotas in whole nano-CPUs (or 1/100000 periods): less than a
        // hundredth of a core rounds to "no limit" or is refused.
        if !(self.cpus.is_finite() && (0.01..=256.0).contains(&self.cpus)) {
            return Err(Error::InvalidArgument(
                "cpus must be between 0.01 and 256".into(),
            ));
        }
        if !(6..=1 << 20).contains(&self.memory_mb) {
            return Err(Error::InvalidArgument(
                "memory_mb must be between 6 and 1048576".into(),
            ));
        }
        if let Some(disk) = self.disk_mb {
            if !(MIN_DISK_MB..=1 << 24).contains(&disk) {
                return Err(Error::InvalidArgument(format!(
                    "disk_mb must be between {MIN_DISK_MB} and 16777216"
                )));
            }
        }
        if !(1..=1 << 22).contains(&self.pids) {
            return Err(Error::InvalidArgument(
                "pids must be between 1 and 4194304".into(),
            ));
        }
        Ok(())
    }
}

/// What a client asks for when creating a sandbox. Everything left `None` is decided by
/// the manager (the server's defaults, the template's user).
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSpec {
    /// Template name (e.g. `base`, `python`); `None`: the server's default template.
    pub template: Option<String>,
    /// Time to live from creation; `None`: the server's default timeout.
    pub timeout: Option<Duration>,
    /// Environment variables for every command in the sandbox.
    pub envs: BTreeMap<String, String>,
    /// Free-form client metadata, returned by list/get and usable as a list filter.
    pub metadata: BTreeMap<String, String>,
    /// CPU cores; `None`: the server's default.
    pub cpus: Option<f64>,
    /// Memory limit, MiB; `None`: the server's default.
    pub memory_mb: Option<u64>,
    /// Disk quota, MiB; `None`: the server's default.
    pub disk_mb: Option<u64>,
    /// Whether the sandbox may reach the internet.
    pub internet: bool,
    /// Default user inside the sandbox; `None` takes the template's.
    pub user: Option<String>,
    /// Whether clients of the sandbox's agent must present its access token themselves
    /// (E2B's `secure`); otherwise the server's proxy adds it for them.
    pub secure: bool,
    /// E2B's network config: egress rules and who may reach it; `None`: no rules.
    pub network: Option<NetworkConfig>,
    /// What its deadline does and whether traffic wakes it when paused.
    pub lifecycle: Lifecycle,
    /// Volumes to mount (E2B's `volumeMounts`), by volume name.
    pub volume_mounts: Vec<VolumeMount>,
}

/// A volume mounted into a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's name.
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
}

/// What a sandbox's deadline does (E2B's `autoPause`, `autoPauseMemory`) and whether
/// traffic resumes it when paused (E2B's `autoResume`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lifecycle {
    /// At the deadline: kill the sandbox, or pause it.
    pub on_timeout: OnTimeout,
    /// A pause at the deadline keeps memory (a freeze) rather than only the filesystem.
    pub keep_memory: bool,
    /// A request into the paused sandbox (data plane, host route, command) resumes it.
    pub auto_resume: bool,
}

/// What happens at a sandbox's deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The sandbox is removed (the default).
    #[default]
    Kill,
    /// The sandbox is paused and kept for the server's paused retention.
    Pause,
}

impl Default for Lifecycle {
    /// Killed at the deadline; a pause keeps memory unless told otherwise (E2B's default).
    fn default() -> Self {
        Self {
            on_timeout: OnTimeout::Kill,
            keep_memory: true,
            auto_resume: false,
        }
    }
}

impl Lifecycle {
    /// Refuses combinations that cannot work: auto-resume without a pause at the
    /// deadline, or with a deadline pause that keeps only the filesystem (E2B's rules).
    pub fn check(&self) -> Result<()> {
        if self.auto_resume && self.on_timeout != OnTimeout::Pause {
            return Err(Error::InvalidArgument(
                "autoResume needs autoPause (on_timeout: pause)".into(),
            ));
        }
        if self.auto_resume && !self.keep_memory {
            return Err(Error::InvalidArgument(
                "autoResume cannot be combined with autoPauseMemory: false (a filesystem-only \
                 pause is resumed with connect)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A sandbox's network configuration, as a client sets it at create or replaces it
/// later (E2B's `network` object with `allow_internet_access`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// Destinations allowed whatever `deny_out` says: addresses and CIDRs.
    pub allow_out: Vec<String>,
    /// Destinations denied: addresses and CIDRs (`0.0.0.0/0` makes an allowlist).
    pub deny_out: Vec<String>,
    /// `false` denies everything `allow_out` does not allow.
    pub internet: bool,
    /// `false`: host-routed requests to the sandbox need its traffic access token.
    pub allow_public_traffic: bool,
    /// The Host header requests routed to the sandbox carry inside (`${PORT}` is the
    /// port); `None` keeps the client's.
    pub mask_request_host: Option<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            internet: true,
            allow_public_traffic: true,
            mask_request_host: None,
        }
    }
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            template: None,
            timeout: None,
            envs: BTreeMap::new(),
            metadata: BTreeMap::new(),
            cpus: None,
            memory_mb: None,
            disk_mb: None,
            internet: true,
            user: None,
            secure: false,
            network: None,
            lifecycle: Lifecycle::default(),
            volume_mounts: Vec::new(),
        }
    }
}

impl SandboxSpec {
    /// A spec for `template` with `timeout` and everything else default.
    pub fn new(template: impl Into<String>, timeout: Duration) -> Self {
        Self {
            template: Some(template.into()),
            timeout: Some(timeout),
            ..Self::default()
        }
    }
}

/// What the core knows about one sandbox.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SandboxInfo {
    /// The sandbox id.
    pub id: SandboxId,
    /// The template it was created from.
    pub template: String,
    /// The image the container runs.
    pub image: String,
    /// Current state.
    pub state: SandboxState,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Limits applied to it.
    pub limits: Limits,
    /// Whether it may reach the internet.
    pub internet: bool,
    /// Whether its agent's clients must bring the access token (see [`SandboxSpec::secure`]).
    pub secure: bool,
    /// The volumes mounted into it.
    pub volume_mounts: Vec<VolumeMount>,
}

/// Validates a user name a client asks to act as (letters, digits, `_`, `-`, `.`).
pub fn validate_user(user: &str) -> Result<()> {
    let ok = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid user name {user:?}"
        )))
    }
}

/// Validates a map of environment variables (names and values) from a client.
pub fn validate_envs(envs: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in envs {
        let name_ok = !k.is_empty()
            && k.len() <= 256
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(Error::InvalidArgument(format!(
                "environment variable name {k:?} must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        if v.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "environment variable {k} contains a NUL byte"
            )));
        }
        // The agent's own settings travel in these; a client must not override them.
        if k.starts_with("COLIMA_E2B_") {
            return Err(Error::InvalidArgument(format!(
                "environment variable names starting with COLIMA_E2B_ are reserved ({k})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_dns_label_safe_and_parse_back() {
        for _ in 0..200 {
            let id = SandboxId::generate();
            assert!(id.as_str().starts_with(SANDBOX_ID_PREFIX));
            assert_eq!(id.as_str().len(), 3 + SANDBOX_ID_RANDOM_LEN);
            let parsed: SandboxId = id.as_str().parse().expect("valid id");
            assert_eq!(parsed, id);
        }
    }

    #[test]
    fn ids_with_unsafe_characters_are_rejected() {
        for bad in [
            "",
            "CLM1",
            "clm_abc",
            "clm-abc",
            "a/b",
            "a\0b",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn limits_reject_nonsense() {
        assert!(Limits::default().validate().is_ok());
        for l in [
            Limits {
                cpus: 0.0,
                ..Limits::default()
            },
            Limits {
                cpus: f64::NAN,
                ..Limits::default()
            },
            Limits {
                memory_mb: 1,
                ..Limits::default()
            },
            Limits {
                pids: 0,
                ..Limits::default()
            },
        ] {
            assert!(l.validate().is_err(), "{l:?} accepted");
        }
    }

    #[test]
    fn cpu_quotas_too_small_for_the_engine_are_rejected() {
        for cpus in [3e-238, 0.001, 0.0099] {
            let l = Limits {
                cpus,
                ..Limits::default()
            };
            assert!(l.validate().is_err(), "{cpus} accepted");
        }
        let l = Limits {
            cpus: 0.01,
            ..Limits::default()
        };
        assert!(l.validate().is_ok());
    }

    #[test]
    fn env_names_are_checked() {
        let mut envs = BTreeMap::new();
        envs.insert("GOOD_1".to_string(), "v".to_string());
        assert!(validate_envs(&envs).is_ok());
        for bad in ["", "1A", "A-B", "A B", "A=B"] {
            let mut envs = BTreeMap::new();
            envs.insert(bad.to_string(), "v".to_string());
            assert!(validate_envs(&envs).is_err(), "{bad:?} accepted");
        }
        let mut envs = BTreeMap::new();
        envs.insert("A".to_string(), "a\0b".to_string());
        assert!(validate_envs(&envs).is_err());
    }
}
