//! Engine models to core types.

use std::collections::BTreeMap;

use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary,
    ContainerSummaryStateEnum, HostConfig,
};
use sandbox_core::{ContainerInfo, Limits, SandboxState};
use time::OffsetDateTime;

fn state_of_inspect(s: Option<ContainerStateStatusEnum>) -> SandboxState {
    match s {
        Some(ContainerStateStatusEnum::RUNNING) => SandboxState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => SandboxState::Paused,
        Some(ContainerStateStatusEnum::CREATED) => SandboxState::Created,
        _ => SandboxState::Exited,
    }
}

fn state_of_summary(s: Option<ContainerSummaryStateEnum>) -> SandboxState {
    match s {
        Some(ContainerSummaryStateEnum::RUNNING) => SandboxState::Running,
        Some(ContainerSummaryStateEnum::PAUSED) => SandboxState::Paused,
        Some(ContainerSummaryStateEnum::CREATED) => SandboxState::Created,
        _ => SandboxState::Exited,
    }
}

fn limits_of(h: &HostConfig) -> Option<Limits> {
    let cpus = match (h.nano_cpus, h.cpu_quota, h.cpu_period) {
        (Some(n), _, _) if n > 0 => n as f64 / 1e9,
        (_, Some(q), Some(p)) if q > 0 && p > 0 => q as f64 / p as f64,
        _ => return None,
    };
    let disk_mb = h
        .storage_opt
        .as_ref()
        .and_then(|o| o.get("size"))
        .and_then(|s| parse_mib(s));
    Some(Limits {
        cpus,
        memory_mb: u64::try_from(h.memory?).ok()? / (1024 * 1024),
        pids: h.pids_limit?,
        disk_mb,
    })
}

/// A size as the engine keeps it (`2048m`, `2g`, `1073741824`) in MiB.
pub(crate) fn parse_mib(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().ok()?;
    match s[digits.len()..].trim_end_matches('b') {
        "" => Some(n >> 20),
        "k" => Some(n >> 10),
        "m" => Some(n),
        "g" => n.checked_mul(1 << 10),
        "t" => n.checked_mul(1 << 20),
        _ => None,
    }
}

fn labels(l: Option<std::collections::HashMap<String, String>>) -> BTreeMap<String, String> {
    l.unwrap_or_default().into_iter().collect()
}

pub(crate) fn from_inspect(c: ContainerInspectResponse) -> ContainerInfo {
    let config = c.config.unwrap_or_default();
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: config.image.unwrap_or_default(),
        labels: labels(config.labels),
        state: state_of_inspect(c.state.and_then(|s| s.status)),
        created_at: c.created.as_deref().and_then(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        }),
        limits: c.host_config.as_ref().and_then(limits_of),
        env: config.env.unwrap_or_default(),
    }
}

pub(crate) fn from_summary(c: ContainerSummary) -> ContainerInfo {
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .names
            .unwrap_or_default()
            .into_iter()
            .next()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: c.image.unwrap_or_default(),
        labels: labels(c.labels),
        state: state_of_summary(c.state),
        created_at: c
            .created
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
        limits: None,
        env: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mib;

    #[test]
    fn engine_sizes_read_as_mib() {
        assert_eq!(parse_mib("2048m"), Some(2048));
        assert_eq!(parse_mib("2g"), Some(2048));
        assert_eq!(parse_mib("2GB"), Some(2048));
        assert_eq!(parse_mib("1073741824"), Some(1024));
        assert_eq!(parse_mib("junk"), None);
    }
}
