//! `GET /health`: is the server up, and does its engine answer?

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use sandbox_core::manager::diagnosis::{Check, Status};

use crate::AppState;

#[derive(Tags)]
enum HealthTags {
    /// Server and engine health.
    Health,
}

/// The container engine as the server sees it.
#[derive(Debug, Object)]
#[oai(example)]
pub struct EngineHealth {
    /// Whether the engine answered.
    pub reachable: bool,
    /// Engine product, e.g. `Docker Engine`.
    #[oai(nullable)]
    pub engine: Option<String>,
    /// Engine version.
    #[oai(nullable)]
    pub version: Option<String>,
    /// Negotiated API version.
    #[oai(nullable)]
    pub api_version: Option<String>,
    /// Where the backend connects.
    #[oai(nullable)]
    pub endpoint: Option<String>,
    /// Why the engine is unreachable.
    #[oai(nullable)]
    pub error: Option<String>,
}

/// One fact about the deployment (the same as `colima-e2b doctor` prints).
#[derive(Debug, Object)]
#[oai(example)]
pub struct HealthCheck {
    /// What was checked, e.g. `engine`, `disk_quota`, `auth`.
    pub name: String,
    /// `ok`, `warn` or `fail`.
    pub status: String,
    /// What was found.
    pub message: String,
    /// How to fix it, when it is not ok.
    #[oai(skip_serializing_if_is_none)]
    pub fix: Option<String>,
}

impl poem_openapi::types::Example for HealthCheck {
    fn example() -> Self {
        HealthCheck {
            name: "auth".into(),
            status: "warn".into(),
            message: "0.0.0.0:8000 is reachable beyond this machine's loopback; every such \
                      request needs a key"
                .into(),
            fix: Some("bind to 127.0.0.1 unless other hosts must reach the server".into()),
        }
    }
}

impl From<Check> for HealthCheck {
    fn from(c: Check) -> Self {
        HealthCheck {
            name: c.name,
            status: match c.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "fail",
            }
            .into(),
            message: c.message,
            fix: c.fix,
        }
    }
}

/// Health of the server and its engine.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Health {
    /// `ok` when the engine answers and no check fails, `degraded` when a check fails,
    /// `unavailable` when the engine does not answer (503).
    pub status: String,
    /// Server version.
    pub version: String,
    /// Backend in use (`docker`, `podman`).
    pub backend: String,
    /// Sandboxes this server manages.
    pub sandboxes: u64,
    /// The engine.
    pub engine: EngineHealth,
    /// Facts about the deployment, each with its fix.
    pub checks: Vec<HealthCheck>,
}

impl poem_openapi::types::Example for Health {
    fn example() -> Self {
        Health {
            status: "ok".into(),
            version: crate::VERSION.into(),
            backend: "docker".into(),
            sandboxes: 2,
            engine: poem_openapi::types::Example::example(),
            checks: vec![HealthCheck {
                name: "disk_quota".into(),
                status: "ok".into(),
                message: "btrfs: each sandbox's disk is capped (limits.disk_mb)".into(),
                fix: None,
            }],
        }
    }
}

impl poem_openapi::types::Example for EngineHealth {
    fn example() -> Self {
        EngineHealth {
            reachable: true,
            engine: Some("Docker Engine".into()),
            version: Some("20.10.24".into()),
            api_version: Some("1.41".into()),
            endpoint: Some("unix:///var/run/docker.sock".into()),
            error: None,
        }
    }
}

/// Health responses.
#[derive(ApiResponse)]
pub enum HealthResponse {
    /// The server and its engine are healthy.
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// The engine cannot be reached.
    #[oai(status = 503)]
    Unavailable(Json<Health>),
}

/// The health endpoint.
pub struct HealthApi;

#[OpenApi(tag = "HealthTags::Health")]
impl HealthApi {
    /// Server health check
    ///
    /// Reports the server version, the backend in use and whether its container engine
    /// answers. Answers 503 when the engine is unreachable, so it works as a readiness probe.
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self, state: Data<&AppState>) -> HealthResponse {
        let manager = &state.manager;
        let sandboxes = manager.list(&Default::default()).len() as u64;
        let backend = manager.backend().name().to_string();
        let mut checks: Vec<Check> = state.health.checks.as_ref().clone();
        checks.extend(manager.diagnose(state.health.allow_unlimited_disk).await);
        let failing = checks.iter().any(|c| c.status == Status::Fail);
        let checks: Vec<HealthCheck> = checks.into_iter().map(HealthCheck::from).collect();
        let engine = manager.engine_info().await;
        crate::metrics::record_engine_up(manager.backend().name(), engine.is_ok());
        match engine {
            Ok(info) => HealthResponse::Ok(Json(Health {
                status: if failing { "degraded" } else { "ok" }.into(),
                version: crate::VERSION.into(),
                backend,
                sandboxes,
                engine: EngineHealth {
                    reachable: true,
                    engine: Some(info.engine),
                    version: Some(info.version),
                    api_version: Some(info.api_version),
                    endpoint: Some(info.endpoint),
                    error: None,
                },
                checks,
            })),
            Err(e) => HealthResponse::Unavailable(Json(Health {
                status: "unavailable".into(),
                version: crate::VERSION.into(),
                backend,
                sandboxes,
                engine: EngineHealth {
                    reachable: false,
                    engine: None,
                    version: None,
                    api_version: None,
                    endpoint: None,
                    error: Some(e.to_string()),
                },
                checks,
            })),
        }
    }
}
