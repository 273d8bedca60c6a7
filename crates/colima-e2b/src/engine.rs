//! Choosing and connecting the container engine backend at startup.

use std::sync::Arc;

use sandbox_core::{DynBackend, Error};

use crate::config::{BackendKind, Config};

/// Connects the backend the configuration names.
///
/// The error is one line saying what was tried and how to fix it.
pub async fn connect(config: &Config) -> Result<DynBackend, String> {
    match config.backend {
        BackendKind::Docker => docker(config, false).await,
        BackendKind::Colima => docker(config, true).await,
        BackendKind::Podman => podman(config).await,
        BackendKind::Auto => {
            let mut errors = Vec::new();
            match docker(config, false).await {
                Ok(b) => {
                    tracing::info!(backend = %b, "auto: using Docker");
                    return Ok(b);
                }
                Err(e) => errors.push(e),
            }
            match podman(config).await {
                Ok(b) => {
                    tracing::info!(backend = %b, "auto: using Podman");
                    return Ok(b);
                }
                Err(e) => errors.push(e),
            }
            Err(format!(
                "no container engine answers: {}",
                errors.join(" | ")
            ))
        }
    }
}

#[cfg(feature = "docker")]
async fn docker(config: &Config, colima: bool) -> Result<DynBackend, String> {
    let mut docker = config.docker.clone();
    docker.colima |= colima;
    backend_docker::DockerBackend::connect(docker)
        .await
        .map(|b| Arc::new(b) as DynBackend)
        .map_err(|e| message(&e))
}

#[cfg(not(feature = "docker"))]
async fn docker(_config: &Config, _colima: bool) -> Result<DynBackend, String> {
    Err("this build has no Docker backend; rebuild with `--features docker`".into())
}

#[cfg(feature = "podman")]
async fn podman(config: &Config) -> Result<DynBackend, String> {
    backend_podman::PodmanBackend::connect(config.podman.clone())
        .await
        .map(|b| Arc::new(b) as DynBackend)
        .map_err(|e| message(&e))
}

#[cfg(not(feature = "podman"))]
async fn podman(_config: &Config) -> Result<DynBackend, String> {
    Err("this build has no Podman backend; rebuild with `--features podman`".into())
}

fn message(e: &Error) -> String {
    e.to_string()
}
