//! Engine models to core types.

use std::collections::BTreeMap;

use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary,
    ContainerSummaryStateEnum, HostConfig,
};
use sandbox_core::{ContainerInfo, Limits, SandboxState};
use time::OffsetDateTime;

/// Splits `repo[:tag]` (a registry port is not a tag) into repo and tag.
pub(crate) fn split_image(image: &str) -> (&str, &str) {
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    }
}

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
    Some(Limits {
        cpus,
        memory_mb: u64::try_from(h.memory?).ok()? / (1024 * 1024),
        pids: h.pids_limit?,
    })
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
    use super::split_image;

    #[test]
    fn image_references_split_into_repo_and_tag() {
        assert_eq!(split_image("python"), ("python", "latest"));
        assert_eq!(split_image("python:3.12"), ("python", "3.12"));
        assert_eq!(
            split_image("localhost:5000/a/b"),
            ("localhost:5000/a/b", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/a/b:v1"),
            ("localhost:5000/a/b", "v1")
        );
    }
}
