//! Keeping the host firewall ([`crate::network::firewall`]) in place for this server's
//! sandbox networks: installed at start, before any sandbox is re-adopted or created,
//! and checked again every [`RECHECK`] (an engine that recreated a network has a new
//! bridge; someone may have flushed the host's ruleset), so it survives engine and server
//! restarts.

use std::time::Duration;

use super::{lock, SandboxManager};
use crate::error::{Error, Result};
use crate::network::{FirewallMode, FirewallStatus, HostFirewall};

/// How often the rules are checked and, where they drifted, installed again.
const RECHECK: Duration = Duration::from_secs(30);

impl SandboxManager {
    /// The host firewall under this server's `[network]` settings.
    pub(super) fn firewall(&self) -> HostFirewall {
        HostFirewall::new(self.inner.config.network.clone())
    }

    /// What the host firewall does right now (as last installed or checked); `None`
    /// before [`SandboxManager::start`] installed it.
    pub fn started_firewall_status(&self) -> Option<FirewallStatus> {
        lock(&self.inner.firewall).clone()
    }

    /// Installs the rules for the engine's sandbox networks. In `required` mode a
    /// failure is an error; in `auto` mode it is logged and the server runs without.
    pub(super) async fn install_firewall(&self) -> Result<()> {
        let firewall = self.firewall();
        let mode = firewall.config().firewall;
        if mode == FirewallMode::Off {
            *lock(&self.inner.firewall) = Some(FirewallStatus::Off);
            tracing::warn!("network.firewall = \"off\": sandboxes reach this host, private networks and each other as the engine lets them");
            return Ok(());
        }
        let networks = self.inner.backend.host_networks().await?;
        let status = match firewall.apply(&networks).await {
            Ok(status) => status,
            Err(why) if mode == FirewallMode::Required => {
                return Err(Error::backend(
                    self.inner.backend.name(),
                    format!("network.firewall = \"required\", but the host firewall cannot be installed: {why}"),
                ))
            }
            Err(why) => FirewallStatus::Inactive(why),
        };
        log_status(&status);
        *lock(&self.inner.firewall) = Some(status);
        Ok(())
    }

    /// Checks the rules every [`RECHECK`] and installs them again where they drifted.
    pub(super) fn spawn_firewall_keeper(&self) {
        if self.inner.config.network.firewall == FirewallMode::Off {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RECHECK).await;
                let Some(inner) = weak.upgrade() else { return };
                let manager = SandboxManager { inner };
                let Ok(networks) = manager.inner.backend.host_networks().await else {
                    continue; // the engine is down: nothing it runs can send anything
                };
                manager.keep_egress().await;
                manager.note_foreign_egress().await;
                let firewall = manager.firewall();
                let now = firewall.status(&networks).await;
                if matches!(now, FirewallStatus::Active { .. }) {
                    *lock(&manager.inner.firewall) = Some(now);
                    continue;
                }
                let was_active = matches!(
                    *lock(&manager.inner.firewall),
                    Some(FirewallStatus::Active { .. })
                );
                let status = firewall
                    .apply(&networks)
                    .await
                    .unwrap_or_else(FirewallStatus::Inactive);
                if was_active || matches!(status, FirewallStatus::Active { .. }) {
                    tracing::info!("the host firewall's rules had drifted; installed again");
                    log_status(&status);
                }
                *lock(&manager.inner.firewall) = Some(status);
            }
        });
    }
}

fn log_status(status: &FirewallStatus) {
    match status {
        FirewallStatus::Active {
            table,
            interfaces,
            gaps,
        } => {
            tracing::info!(table = %table, bridges = %interfaces.join(" "), "host firewall active: sandboxes cannot reach this host, private networks or each other");
            for gap in gaps {
                tracing::warn!("host firewall: {gap}");
            }
        }
        FirewallStatus::Inactive(why) => {
            tracing::warn!("host firewall not installed: {why}; sandboxes reach this host, private networks and each other as the engine lets them (network.firewall = \"required\" refuses to start instead)");
        }
        FirewallStatus::Off => {}
    }
}
