//! Running the HTTP server until SIGINT or SIGTERM.

use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::{Acceptor, TcpAcceptor, TcpListener};
use poem::web::{LocalAddr, RemoteAddr};
use poem::Server;
use sandbox_api::AppState;
use sandbox_core::{ManagerConfig, SandboxManager};

use crate::config::Config;

/// Starts everything and serves until a shutdown signal. Sandboxes are left running
/// for the next start to re-adopt.
pub async fn run(config: Config) -> Result<(), String> {
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
    let metrics = sandbox_api::metrics::install_recorder()?;
    metrics::gauge!("colima_e2b_info", "backend" => backend.name(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let manager = SandboxManager::new(
        backend,
        ManagerConfig {
            owner: config.owner.clone(),
            templates: config.templates.clone(),
            default_template: config.default_template.clone(),
            default_timeout: Duration::from_secs(config.default_timeout),
            default_limits: config.limits,
            max_concurrent_creates: config.max_concurrent_creates,
            max_sandboxes: config.max_sandboxes,
            max_timeout: Duration::from_secs(config.max_timeout),
            state_dir: config.state_dir().map(|d| d.join("deadlines")),
            agent: Some(agent),
            agent_port: Some(sandbox_core::agent_client::AGENT_PORT),
            ..ManagerConfig::default()
        },
    );
    let report = manager
        .start()
        .await
        .map_err(|e| format!("re-adopting sandboxes failed: {e}"))?;
    tracing::info!(
        adopted = report.adopted,
        expired = report.expired,
        broken = report.broken,
        "re-adopted this server's sandboxes"
    );

    let addr = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(addr.clone());
    let acceptor = poem::listener::Listener::into_acceptor(listener)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (use --port to pick another port)"))?;
    tracing::info!("listening on http://{addr} (docs at http://{addr}/docs)");
    let e2b = if config.e2b.enabled {
        let settings = sandbox_api::e2b::E2bSettings {
            api_key: config.e2b_api_key()?,
            domain: config.e2b_domain(),
        };
        tracing::info!(
            api = %format!("{}/e2b", config.client_base_url()),
            domain = %settings.domain,
            "E2B compatibility on (`colima-e2b env` prints the SDK settings)"
        );
        Some(sandbox_api::e2b::E2b::new(settings))
    } else {
        None
    };
    let app = sandbox_api::app(AppState {
        manager,
        metrics,
        e2b,
    });
    Server::new_with_acceptor(NoDelay(acceptor))
        .run_with_graceful_shutdown(app, shutdown_signal(), Some(Duration::from_secs(5)))
        .await
        .map_err(|e| format!("server error: {e}"))?;
    tracing::info!("shut down; sandboxes keep running and are re-adopted on the next start");
    Ok(())
}

/// Accepts connections with Nagle's algorithm off: streamed events (command output,
/// proxied envd frames) are small writes that must leave at once, not wait for the
/// client's delayed ACK (about 40 ms each).
struct NoDelay(TcpAcceptor);

impl Acceptor for NoDelay {
    type Io = tokio::net::TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(&mut self) -> std::io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.0.accept().await?;
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok((io, local, remote, scheme))
    }
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
