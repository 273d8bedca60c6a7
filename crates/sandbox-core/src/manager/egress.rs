//! Sandboxes' network configs (E2B's `network`): checked at create, replaced on a running
//! sandbox (`update_network`), kept in the state directory (`network/`, one file per
//! sandbox, so a restart rebuilds the rules) and enforced by this server's egress table
//! ([`crate::network::egress_table`]), which is rewritten whenever a sandbox's rules
//! change or it goes.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::records::SandboxRecords;
use super::{lock, SandboxManager};
use crate::error::{Error, Result};
use crate::labels;
use crate::network::egress::EgressRules;
use crate::network::egress_proxy::{EgressProxy, Resolver};
use crate::network::egress_table::{self, SandboxRules};
use crate::network::FirewallStatus;
use crate::types::{NetworkConfig, SandboxId, SandboxState};

/// What the server keeps of one sandbox's network config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetwork {
    /// The config as the client set it.
    pub config: NetworkConfig,
    /// The token host-routed requests must carry when public traffic is off.
    pub traffic_token: Option<String>,
    /// The sandbox's address its rules are keyed by (`None`: it has no egress rules).
    pub addr: Option<Ipv4Addr>,
}

/// The network configs of this server's sandboxes, with the files that keep them.
#[derive(Debug)]
pub(super) struct NetworkStore(SandboxRecords<SandboxNetwork>);

impl NetworkStore {
    pub(super) fn new(dir: Option<PathBuf>) -> Self {
        Self(SandboxRecords::new(dir, "network config"))
    }

    fn save(&self, id: &SandboxId, net: &SandboxNetwork) -> Result<()> {
        self.0.save(id, net)
    }

    pub(super) fn get(&self, id: &SandboxId) -> Option<SandboxNetwork> {
        self.0.get(id)
    }

    /// Drops sandbox `id`'s config; whether it had egress rules.
    pub(super) fn forget(&self, id: &SandboxId) -> bool {
        self.0.forget(id).is_some_and(|n| n.addr.is_some())
    }

    /// Reads the configs of `live` sandboxes back and deletes the others' files.
    pub(super) fn restore(&self, live: &HashSet<SandboxId>) {
        self.0.restore(live);
    }

    /// The configs of the sandboxes that have egress rules.
    fn keyed(&self) -> Vec<(SandboxId, SandboxNetwork)> {
        self.0
            .all()
            .into_iter()
            .filter(|(_, n)| n.addr.is_some())
            .collect()
    }

    fn rules(&self) -> Vec<SandboxRules> {
        let mut out: Vec<SandboxRules> = self
            .0
            .all()
            .into_iter()
            .filter_map(|(_, n)| {
                Some(SandboxRules {
                    addr: n.addr?,
                    rules: parse(&n.config, true).ok()?,
                })
            })
            .collect();
        out.sort_by_key(|r| r.addr);
        out
    }
}

/// The egress rules of `config`, or why they cannot be enforced (`proxy`: whether the
/// egress proxy runs, which host names need).
fn parse(config: &NetworkConfig, proxy: bool) -> Result<EgressRules> {
    let rules = EgressRules::parse(&config.allow_out, &config.deny_out, config.internet)
        .map_err(|e| Error::InvalidArgument(e.0))?;
    if rules.has_domains() && !proxy {
        return Err(Error::Unsupported {
            backend: "egress",
            operation: "host names in allowOut without the egress proxy, which runs only \
                        with the host firewall (see `colima-e2b doctor`)",
        });
    }
    Ok(rules)
}

impl SandboxManager {
    /// Checks `config` before a sandbox is created with it (`online`: on a network
    /// with a way out, where rules need enforcing).
    pub(super) fn check_network(&self, config: &NetworkConfig, online: bool) -> Result<()> {
        let rules = parse(config, self.proxy_port().is_some())?;
        if online && !rules.is_open() {
            self.egress_enforceable()?;
        }
        if let Some(mask) = &config.mask_request_host {
            check_mask(mask)?;
        }
        Ok(())
    }

    /// Whether the host firewall was installed (egress rules and the proxy need it).
    fn firewall_active(&self) -> bool {
        matches!(
            self.started_firewall_status(),
            Some(FirewallStatus::Active { .. })
        )
    }

    /// Whether this server can enforce egress rules: only through the host firewall.
    fn egress_enforceable(&self) -> Result<()> {
        if self.firewall_active() {
            return Ok(());
        }
        Err(Error::Unsupported {
            backend: "egress",
            operation: "egress rules (allowOut/denyOut, internet off on a running sandbox) \
                        without the host firewall, which is off or cannot be installed here \
                        (see `colima-e2b doctor`)",
        })
    }

    /// Sets (at create) or replaces (E2B's `update_network`) sandbox `id`'s network
    /// config; new connections follow it, established ones go on. Replacing keeps the
    /// traffic token when public traffic stays off.
    pub async fn set_network(
        &self,
        id: &SandboxId,
        config: NetworkConfig,
    ) -> Result<SandboxNetwork> {
        let info = self.info(id)?;
        let rules = parse(&config, self.proxy_port().is_some())?;
        if let Some(mask) = &config.mask_request_host {
            check_mask(mask)?;
        }
        if info.state == SandboxState::Paused && !rules.is_open() {
            // Its address is only sure while it runs.
            return Err(Error::Conflict(format!("sandbox {id} is paused")));
        }
        // A sandbox created without internet is on a network with no way out: rules
        // can only deny more there, which changes nothing.
        let addr = if rules.is_open() || !info.internet {
            None
        } else {
            self.egress_enforceable()?;
            Some(self.sandbox_ipv4(id).await?)
        };
        let before = self.inner.networks.get(id);
        let traffic_token = if config.allow_public_traffic {
            None
        } else {
            before
                .as_ref()
                .and_then(|b| b.traffic_token.clone())
                .or_else(|| Some(crate::agent::binary::generate_secret()))
        };
        let net = SandboxNetwork {
            config,
            traffic_token,
            addr,
        };
        let _apply = self.inner.egress_lock.lock().await;
        self.inner.networks.save(id, &net)?;
        if addr.is_some() || before.is_some_and(|b| b.addr.is_some()) {
            if let Err(e) = self.apply_egress().await {
                return Err(Error::backend(
                    "egress",
                    format!("installing sandbox {id}'s egress rules: {e}"),
                ));
            }
        }
        Ok(net)
    }

    /// Replaces sandbox `id`'s egress rules (E2B's `update_network`: omitted rules are
    /// cleared), keeping who may reach it and its Host mask, which only a create sets;
    /// `internet` `None` keeps what it has.
    pub async fn update_egress(
        &self,
        id: &SandboxId,
        allow_out: Vec<String>,
        deny_out: Vec<String>,
        internet: Option<bool>,
    ) -> Result<SandboxNetwork> {
        let info = self.info(id)?;
        let before = self.network(id).map(|n| n.config);
        let config = NetworkConfig {
            allow_out,
            deny_out,
            internet: internet
                .unwrap_or_else(|| before.as_ref().map_or(info.internet, |b| b.internet)),
            allow_public_traffic: before.as_ref().is_none_or(|b| b.allow_public_traffic),
            mask_request_host: before.and_then(|b| b.mask_request_host),
        };
        self.set_network(id, config).await
    }

    /// Sandbox `id`'s network config, if it was given one.
    pub fn network(&self, id: &SandboxId) -> Option<SandboxNetwork> {
        self.inner.networks.get(id)
    }

    /// Drops what is kept of sandbox `id`'s network config and its rules.
    pub(super) async fn forget_network(&self, id: &SandboxId) {
        if self.inner.networks.forget(id) {
            let _apply = self.inner.egress_lock.lock().await;
            if let Err(e) = self.apply_egress().await {
                tracing::warn!(sandbox = %id, error = %e, "could not remove a sandbox's egress rules");
            }
        }
    }

    /// Reads the network configs of the re-adopted sandboxes back and installs their
    /// rules again (called by recovery, before anything runs).
    pub(super) async fn restore_networks(&self, live: &HashSet<SandboxId>) {
        self.inner.networks.restore(live);
        // A container the engine restarted may have a new address; a stopped one (a
        // filesystem pause) has none until it starts again.
        for (id, mut net) in self.inner.networks.keyed() {
            if self.parked(&id)
                && self
                    .info(&id)
                    .is_ok_and(|i| i.state == SandboxState::Paused)
            {
                let stopped = self
                    .inner
                    .backend
                    .inspect(&labels::container_name(&id))
                    .await
                    .is_ok_and(|c| {
                        !matches!(c.state, SandboxState::Running | SandboxState::Paused)
                    });
                if stopped {
                    net.addr = None;
                    if let Err(e) = self.inner.networks.save(&id, &net) {
                        tracing::warn!(sandbox = %id, error = %e, "could not keep a sandbox's network config");
                    }
                    continue;
                }
            }
            if let Ok(addr) = self.sandbox_ipv4(&id).await {
                if net.addr != Some(addr) {
                    net.addr = Some(addr);
                    if let Err(e) = self.inner.networks.save(&id, &net) {
                        tracing::warn!(sandbox = %id, error = %e, "could not keep a sandbox's new address");
                    }
                }
            }
        }
        let _apply = self.inner.egress_lock.lock().await;
        match self.apply_egress().await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "could not install the sandboxes' egress rules"),
        }
    }

    /// A sandbox whose container stops (a filesystem pause) gives its address back to
    /// the engine: its rules leave the table, so a new container given that address is
    /// not caught by them, until [`unpark_egress`](Self::unpark_egress).
    pub(super) async fn park_egress(&self, id: &SandboxId) {
        let Some(mut net) = self.inner.networks.get(id).filter(|n| n.addr.is_some()) else {
            return;
        };
        net.addr = None;
        let _apply = self.inner.egress_lock.lock().await;
        if let Err(e) = self.inner.networks.save(id, &net) {
            tracing::warn!(sandbox = %id, error = %e, "could not keep a sandbox's network config");
        }
        if let Err(e) = self.apply_egress().await {
            tracing::warn!(sandbox = %id, error = %e, "could not remove a stopped sandbox's egress rules");
        }
    }

    /// A sandbox's container started again: its rules are installed at its new address
    /// before anything but its agent runs.
    pub(super) async fn unpark_egress(&self, id: &SandboxId) -> Result<()> {
        let Some(mut net) = self.inner.networks.get(id) else {
            return Ok(());
        };
        let info = self.info(id)?;
        let rules = parse(&net.config, self.proxy_port().is_some())?;
        if rules.is_open() || !info.internet {
            return Ok(());
        }
        net.addr = Some(self.sandbox_ipv4(id).await?);
        self.release_address(id).await;
        let _apply = self.inner.egress_lock.lock().await;
        self.inner.networks.save(id, &net)?;
        self.apply_egress().await.map_err(|e| {
            Error::backend(
                "egress",
                format!("installing sandbox {id}'s egress rules: {e}"),
            )
        })
    }

    /// Installs the egress table again if someone removed it (called by the firewall
    /// keeper).
    pub(super) async fn keep_egress(&self) {
        let rules = self.inner.networks.rules();
        if rules.is_empty() {
            return;
        }
        let table = egress_table::table_name(&self.inner.config.owner);
        if crate::network::firewall::table_exists(&table).await {
            return;
        }
        let _apply = self.inner.egress_lock.lock().await;
        match self.apply_egress().await {
            Ok(()) => tracing::info!(table = %table, "the egress rules were gone; installed again"),
            Err(e) => tracing::warn!(error = %e, "could not install the sandboxes' egress rules"),
        }
    }

    /// Starts the egress proxy, where the host firewall is active (before recovery
    /// installs the re-adopted sandboxes' rules).
    pub(super) async fn start_egress_proxy(&self) {
        if !self.firewall_active() {
            return;
        }
        let network = &self.inner.config.network;
        let resolver = Resolver::new(&network.egress_resolvers);
        match EgressProxy::start(
            self.inner.proxied.clone(),
            resolver,
            network.allow_private.clone(),
        )
        .await
        {
            Ok(proxy) => {
                tracing::info!(
                    port = proxy.port(),
                    "egress proxy listening (host names in allowOut)"
                );
                let _ = self.inner.egress_proxy.set(proxy);
            }
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy not started: host names in allowOut are refused")
            }
        }
    }

    /// Notes the egress tables other servers left on this host (at start and by the
    /// firewall keeper), so creates can drop what they hold for reused addresses.
    pub(super) async fn note_foreign_egress(&self) {
        if !self.firewall_active() {
            return;
        }
        let tables = egress_table::foreign_tables(&self.inner.config.owner).await;
        *lock(&self.inner.foreign_egress) = tables;
    }

    /// A new sandbox's address may have been a gone sandbox's, whose rules another
    /// server's table still holds: they are dropped before the sandbox is handed out.
    pub(super) async fn release_address(&self, id: &SandboxId) {
        let tables = lock(&self.inner.foreign_egress).clone();
        if tables.is_empty() {
            return;
        }
        let Ok(addr) = self.sandbox_ipv4(id).await else {
            return;
        };
        for table in tables {
            if egress_table::forget_address(&table, addr).await {
                tracing::info!(table = %table, addr = %addr, sandbox = %id,
                    "dropped another server's left-over egress rules for a reused address");
            }
        }
    }

    fn proxy_port(&self) -> Option<u16> {
        self.inner.egress_proxy.get().map(EgressProxy::port)
    }

    /// Writes this server's egress table from the configs kept (hold `egress_lock`).
    async fn apply_egress(&self) -> std::result::Result<(), String> {
        let rules = self.inner.networks.rules();
        if let Ok(mut proxied) = self.inner.proxied.write() {
            *proxied = rules
                .iter()
                .filter(|r| r.rules.has_domains())
                .map(|r| (r.addr, r.rules.clone()))
                .collect();
        }
        if rules.is_empty() && !self.firewall_active() {
            return Ok(()); // no firewall, nothing was ever installed
        }
        let dns = self.firewall().dns();
        egress_table::apply(&self.inner.config.owner, &rules, &dns, self.proxy_port()).await
    }

    /// Sandbox `id`'s IPv4 address on its network, as the host firewall sees its traffic.
    async fn sandbox_ipv4(&self, id: &SandboxId) -> Result<Ipv4Addr> {
        let addr = self
            .inner
            .backend
            .agent_address(&labels::container_name(id), self.agent_port())
            .await?;
        match addr.addr.ip() {
            IpAddr::V4(ip) if !ip.is_loopback() => Ok(ip),
            _ => Err(Error::Unsupported {
                backend: "egress",
                operation: "egress rules for a sandbox reached through a published port \
                            (its own address is not routable from this host)",
            }),
        }
    }
}

/// Checks a `maskRequestHost`: a host (optionally with a port, `${PORT}` allowed).
fn check_mask(mask: &str) -> Result<()> {
    let plain = mask.replace("${PORT}", "1");
    let ok = !plain.is_empty()
        && plain.len() <= 253
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:_[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "maskRequestHost {mask:?} is not a host name (with an optional :port; ${{PORT}} \
             stands for the port)"
        )))
    }
}

/// The Host header a request routed to `port` carries inside, under `mask`.
pub fn masked_host(mask: &str, port: u16) -> String {
    mask.replace("${PORT}", &port.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_name_a_host_and_take_the_port() {
        assert!(check_mask("${PORT}-myapp.example.com").is_ok());
        assert!(check_mask("localhost:${PORT}").is_ok());
        assert!(check_mask("a b").is_err());
        assert!(check_mask("x\r\nInjected: 1").is_err());
        assert!(check_mask("").is_err());
        assert_eq!(masked_host("${PORT}-app.test", 3000), "3000-app.test");
    }

    #[test]
    fn host_names_in_allow_out_need_the_proxy() {
        let config = NetworkConfig {
            allow_out: vec!["example.com".into()],
            ..Default::default()
        };
        assert!(matches!(
            parse(&config, false),
            Err(Error::Unsupported { .. })
        ));
        assert!(parse(&config, true).is_ok());
        let config = NetworkConfig {
            deny_out: vec!["example.com".into()],
            ..Default::default()
        };
        assert!(matches!(
            parse(&config, true),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn configs_survive_a_restart_only_for_live_sandboxes() {
        let dir = std::env::temp_dir().join(format!("colima-e2b-net-{}", SandboxId::generate()));
        let store = NetworkStore::new(Some(dir.join("network")));
        let (a, b) = (SandboxId::generate(), SandboxId::generate());
        let net = SandboxNetwork {
            config: NetworkConfig {
                deny_out: vec!["0.0.0.0/0".into()],
                ..Default::default()
            },
            traffic_token: Some("t".into()),
            addr: Some("172.18.0.9".parse().expect("literal")),
        };
        store.save(&a, &net).expect("saved");
        store.save(&b, &net).expect("saved");
        let again = NetworkStore::new(Some(dir.join("network")));
        again.restore(&HashSet::from([a.clone()]));
        assert_eq!(again.get(&a), Some(net));
        assert_eq!(again.get(&b), None);
        assert!(!dir.join("network").join(b.as_str()).exists());
        assert_eq!(again.rules().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
