//! Running the HTTP server until SIGINT or SIGTERM.

use std::time::Duration;

use poem::listener::TcpListener;
use poem::Server;
use sandbox_api::AppState;
use sandbox_core::{ManagerConfig, SandboxManager};

use sandbox_api::auth::{AuthMode, AuthSettings, Perimeter};

use crate::config::Config;
use crate::listener::GuardedAcceptor;

/// The manager's configuration from the server's; `agent`: the build sandboxes run
/// (`None` for a manager that only inspects, as `doctor`'s).
pub fn manager_config(config: &Config, agent: Option<sandbox_core::AgentBinary>) -> ManagerConfig {
    ManagerConfig {
        owner: config.owner.clone(),
        templates: config.templates.clone(),
        default_template: config.default_template.clone(),
        default_timeout: Duration::from_secs(config.default_timeout),
        default_limits: config.limits.defaults(),
        max_cpus: config.limits.max_cpus,
        max_memory_mb: config.limits.max_memory_mb,
        max_disk_mb: Some(config.limits.max_disk_mb),
        profile: config.profile.profile(),
        commands: config.commands.limits(),
        max_concurrent_creates: config.max_concurrent_creates,
        max_queued_creates: config.max_queued_creates,
        create_queue_wait: Duration::from_secs(config.create_queue_wait),
        pool: config.pool.pool(),
        max_sandboxes: config.max_sandboxes,
        max_timeout: Duration::from_secs(config.max_timeout),
        paused_retention: Duration::from_secs(config.paused_retention),
        state_dir: config.state_dir(),
        agent,
        agent_port: Some(sandbox_core::agent::AGENT_PORT),
        stall_timeout: Duration::from_secs(config.stall_timeout),
        builds: config.builds.registry(),
        metrics_history: config.history.metrics(),
        logs: config.history.logs(),
        network: config.network.clone(),
        ..ManagerConfig::default()
    }
}

/// Host names the server answers for: configured ones, and the bind address when it is
/// a name.
fn auth_hosts(config: &Config) -> Vec<String> {
    let mut hosts = config.auth.hosts.clone();
    let bind = config.host.trim_start_matches('[').trim_end_matches(']');
    if !bind.is_empty() && bind.parse::<std::net::IpAddr>().is_err() {
        hosts.push(bind.to_string());
    }
    hosts
}

/// Starts everything and serves until a shutdown signal. Sandboxes are left running
/// for the next start to re-adopt.
pub async fn run(config: Config) -> Result<(), String> {
    let loopback = config.binds_loopback();
    if config.auth.mode == AuthMode::Off && !loopback {
        return Err(format!(
            "auth.mode = \"off\" with host {}: anyone who can reach that address, every \
             sandbox included, could create sandboxes and run commands in them; refusing to \
             start. Bind to 127.0.0.1 (--host 127.0.0.1) or turn auth back on",
            config.host
        ));
    }
    let keys = config.api_keys()?;
    let (agent_path, agent) = config.load_agent()?;
    tracing::info!(
        path = %agent_path.display(),
        sha256 = agent.sha256(),
        bytes = agent.contents().len(),
        "sandbox agent binary"
    );
    let backend = crate::engine::connect(&config).await?;
    let engine = backend.check().await.map_err(|e| e.to_string())?;
    tracing::info!(
        backend = backend.name(),
        engine = %engine.engine,
        version = %engine.version,
        api = %engine.api_version,
        endpoint = %engine.endpoint,
        "connected to the container engine"
    );
    check_disk_quota(&config, backend.capabilities().disk_quota, &engine)?;
    let metrics = sandbox_api::metrics::install_recorder()?;
    metrics::gauge!("colima_e2b_info", "backend" => backend.name(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let trust_loopback = backend.capabilities().host_loopback_isolated;
    let own_checks = crate::doctor::own_checks(&config, Some(trust_loopback));
    let manager = SandboxManager::new(backend, manager_config(&config, Some(agent)));
    let report = manager
        .start()
        .await
        .map_err(|e| format!("re-adopting sandboxes failed: {e}"))?;
    tracing::info!(
        adopted = report.adopted,
        expired = report.expired,
        broken = report.broken,
        unfinished = report.unfinished,
        pooled = report.pooled,
        "re-adopted this server's sandboxes"
    );

    let addr = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(addr.clone());
    let acceptor = poem::listener::Listener::into_acceptor(listener)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (use --port to pick another port)"))?;
    tracing::info!("listening on http://{addr} (docs at http://{addr}/docs)");
    log_exposure(&config, trust_loopback);
    let perimeter = std::sync::Arc::new(Perimeter::new(AuthSettings {
        mode: config.auth.mode,
        keys,
        hosts: auth_hosts(&config),
        cors_origins: config.auth.cors_origins.clone(),
        trust_loopback,
        ..AuthSettings::default()
    }));
    let e2b = e2b_layer(&config);
    let aborts = sandbox_api::abort::Aborts::default();
    let app = sandbox_api::app(AppState {
        manager: manager.clone(),
        metrics,
        e2b,
        perimeter,
        limits: sandbox_api::ApiLimits {
            stall_timeout: Duration::from_secs(config.stall_timeout),
            max_upload: config.files.max_upload_mb.saturating_mul(1 << 20),
        },
        health: sandbox_api::HealthFacts {
            checks: std::sync::Arc::new(own_checks),
            allow_unlimited_disk: config.allow_unlimited_disk,
        },
        aborts: aborts.clone(),
    });
    let acceptor =
        GuardedAcceptor::new(acceptor, Duration::from_secs(config.stall_timeout), aborts);
    let _record = crate::running::record(&config);
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, shutdown_signal(), Some(Duration::from_secs(5)))
        .await
        .map_err(|e| format!("server error: {e}"))?;
    let pending = manager.pending_deletions();
    if pending > 0 {
        // Killed sandboxes whose containers are still to be deleted (what is left, the
        // next start removes).
        tracing::info!(pending, "deleting killed sandboxes' containers");
        manager.finish_deletions(Duration::from_secs(15)).await;
    }
    // Volume keepers hold no state; the next start would remove them anyway.
    manager.stop_keepers().await;
    tracing::info!("shut down; sandboxes keep running and are re-adopted on the next start");
    Ok(())
}

/// Without quota support the server refuses to start, unless told to go without.
fn check_disk_quota(
    config: &Config,
    supported: bool,
    engine: &sandbox_core::EngineInfo,
) -> Result<(), String> {
    if supported {
        return Ok(());
    }
    let storage = engine.storage.as_deref().unwrap_or("unknown storage");
    if !config.allow_unlimited_disk {
        return Err(format!(
            "the engine's storage ({storage}) cannot enforce per-sandbox disk quotas, so one \
             sandbox could fill the engine's disk; refusing to start. Fix: run the engine on \
             storage with quotas (`bash deploy/engines.sh` prepares btrfs, or XFS with project \
             quotas, for an engine it starts itself; an engine you run already needs its data \
             root on such storage), or set allow_unlimited_disk = true \
             (env COLIMA_E2B_ALLOW_UNLIMITED_DISK=true) to run without disk quotas"
        ));
    }
    tracing::warn!(%storage, "the engine's storage cannot enforce disk quotas: sandboxes have none (allow_unlimited_disk)");
    Ok(())
}

/// Says at startup who may use the server and how.
fn log_exposure(config: &Config, trust_loopback: bool) {
    match (config.auth.mode, config.binds_loopback()) {
        (AuthMode::Auto, true) if trust_loopback => tracing::info!(
            "auth: local development mode: loopback clients need no key (but for sandboxes \
             created secure); set auth.mode = \"required\" to always require one"
        ),
        (AuthMode::Auto, true) => tracing::info!(
            "auth: sandboxes of this engine can reach the host's loopback, so every request \
             needs a key; `colima-e2b env` prints it"
        ),
        (AuthMode::Off, _) => tracing::warn!("auth: off; any local process may use this server"),
        (_, false) => tracing::warn!(
            "listening on {}, beyond loopback: every request from another host or a sandbox \
             needs an API key (`Authorization: Bearer <key>` or `X-API-KEY`); \
             `colima-e2b env` prints it",
            config.host
        ),
        (AuthMode::Required, true) => tracing::info!("auth: a key is required on every request"),
    }
}

/// The E2B compatibility layer, when it is on.
fn e2b_layer(config: &Config) -> Option<sandbox_api::e2b::E2b> {
    if !config.e2b.enabled {
        return None;
    }
    let settings = sandbox_api::e2b::E2bSettings {
        domain: config.e2b_domain(),
    };
    tracing::info!(
        api = %format!("{}/e2b", config.client_base_url()),
        domain = %settings.domain,
        "E2B compatibility on (`colima-e2b env` prints the SDK settings)"
    );
    Some(sandbox_api::e2b::E2b::new(settings))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_without_quotas_refuses_to_start_naming_the_fix_unless_allowed() {
        let engine = sandbox_core::EngineInfo {
            storage: Some("overlay2 on extfs".into()),
            ..Default::default()
        };
        let config = Config::default();
        let err = check_disk_quota(&config, false, &engine).expect_err("refused");
        assert!(err.contains("overlay2 on extfs"), "{err}");
        assert!(err.contains("allow_unlimited_disk"), "{err}");
        assert!(err.contains("deploy/engines.sh"), "{err}");
        assert!(check_disk_quota(&config, true, &engine).is_ok());
        let allowed = Config {
            allow_unlimited_disk: true,
            ..Config::default()
        };
        assert!(check_disk_quota(&allowed, false, &engine).is_ok());
    }
}
