//! The host firewall: nftables rules on this kernel for the sandbox networks' bridges.
//!
//! Traffic a sandbox sends enters this kernel through its network's bridge. From there:
//! - to this host's own addresses (the bridge gateways, every other interface, IPv4 and
//!   IPv6): dropped, except DNS to the resolvers containers are given, the TCP ports
//!   `allow_host_ports` names, and TCP 80/443 redirected to the egress proxy by a
//!   server's egress table (the `input` hook);
//! - to another sandbox, on the same bridge or on another sandbox network: dropped
//!   (bridged frames reach the `forward` hook through `br_netfilter`, which the firewall
//!   turns on; `nft`'s own bridge family cannot name a bridge on kernels without
//!   `NFT_BRIDGE_META`);
//! - routed out: private, loopback-range, link-local (cloud metadata) and multicast
//!   destinations dropped unless `allow_private` lists them; UDP 443 dropped (QUIC falls
//!   back to TCP); IPv6 dropped (the sandbox networks are IPv4 only).
//!
//! Replies to connections made to a sandbox (the server's to its agent) pass. The tables
//! run at priority `filter - 10`, before the engines' own rules, and only ever drop, so
//! the engines' rules keep working and cannot re-open what these close. Each set of
//! bridges gets its own `inet` table (named after a hash of them, the bridges in its
//! comment):
//! servers sharing networks write the same table, and a table whose Docker bridges are
//! all gone (a removed network) is removed by the next server to start.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::backend::HostNetwork;

/// E2B's always-denied destinations, with "this network" and multicast/reserved added.
pub const DENIED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
];

/// Prefix of the tables' names.
pub const TABLE_PREFIX: &str = "colima_e2b_";

/// Why there is nothing to install when a backend has no host networks.
const NOT_ON_THIS_KERNEL: &str = "the engine's sandbox networks are not on this kernel (an \
     engine in a VM such as Colima's, or rootless networking): nothing to install here";

/// Longest an `nft` run may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the server installs the host firewall.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirewallMode {
    /// Installed where the engine's networks are on this kernel and the server may
    /// change its rules; otherwise a warning says why not.
    #[default]
    Auto,
    /// As `auto`, but a server that cannot install it refuses to start.
    Required,
    /// Never installed (sandboxes reach whatever the engine lets them).
    Off,
}

/// The `[network]` settings of the host firewall.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirewallConfig {
    /// Whether the firewall is installed.
    pub firewall: FirewallMode,
    /// Private destinations (CIDRs or addresses) sandboxes may reach, e.g. a database on
    /// the LAN. None by default.
    pub allow_private: Vec<IpNet>,
    /// TCP ports on this host's own addresses sandboxes may reach, e.g. 5432 for a
    /// database on the host. None by default.
    pub allow_host_ports: Vec<u16>,
    /// Resolvers sandboxes may query on port 53; default: this host's nameservers (what
    /// the engines give containers).
    pub dns_servers: Option<Vec<IpAddr>>,
    /// DNS servers the egress proxy resolves allowed host names with; default: this
    /// host's resolver (`/etc/hosts`, `/etc/resolv.conf`).
    pub egress_resolvers: Vec<IpAddr>,
}

/// What the firewall does right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirewallStatus {
    /// Installed, in table `table`, for these bridges.
    Active {
        /// The inet table's name.
        table: String,
        /// The bridges it covers.
        interfaces: Vec<String>,
        /// What it cannot enforce here (empty when nothing).
        gaps: Vec<String>,
    },
    /// Not installed, and why.
    Inactive(String),
    /// Turned off in the configuration.
    Off,
}

/// The rules for one set of sandbox networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// Name of the inet table.
    pub table: String,
    /// The bridges covered, sorted.
    pub interfaces: Vec<String>,
    /// The `nft -f` script that replaces the table atomically.
    pub script: String,
}

/// The tables' name for bridges `interfaces` (sorted).
fn table_name(interfaces: &[String]) -> String {
    format!("{TABLE_PREFIX}{}", short_hash(&interfaces.join(" ")))
}

/// The first 5 bytes of `text`'s SHA-256, in hex: what tables are named after.
pub(super) fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// `{ a, b }`, or nothing for an empty set (nft refuses `elements = { }`).
pub(super) fn elements<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if items.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", items.join(", "))
    }
}

/// The rules for `networks`, with `dns` as the resolvers sandboxes may query.
pub fn ruleset(networks: &[HostNetwork], config: &FirewallConfig, dns: &[IpAddr]) -> Ruleset {
    let interfaces: Vec<String> = networks
        .iter()
        .map(|n| n.interface.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let table = table_name(&interfaces);
    let ifaces = elements(interfaces.iter().map(|i| format!("\"{i}\"")));
    let comment = format!("colima-e2b sandbox networks: {}", interfaces.join(" "));
    let dns4 = elements(dns.iter().filter(|a| a.is_ipv4()));
    let allowed4 = elements(
        config
            .allow_private
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_))),
    );
    let denied4 = elements(DENIED_V4);
    let ports = elements(config.allow_host_ports.iter().collect::<BTreeSet<_>>());
    let script = format!(
        r#"table inet {table} {{}}
delete table inet {table}
table inet {table} {{
  comment "{comment}"
  set sandbox_ifaces {{ type ifname;{ifaces} }}
  set dns4 {{ type ipv4_addr;{dns4} }}
  set allowed4 {{ type ipv4_addr; flags interval;{allowed4} }}
  set denied4 {{ type ipv4_addr; flags interval;{denied4} }}
  set host_ports {{ type inet_service;{ports} }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname @sandbox_ifaces jump to_host
  }}
  chain to_host {{
    ct state established,related accept
    meta l4proto tcp ct status dnat ct original proto-dst {{ 80, 443 }} accept
    meta l4proto {{ tcp, udp }} th dport 53 ip daddr @dns4 accept
    tcp dport @host_ports accept
    counter drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname @sandbox_ifaces jump routed
  }}
  chain routed {{
    ct state established,related accept
    oifname @sandbox_ifaces counter drop
    meta nfproto ipv6 counter drop
    meta l4proto {{ tcp, udp }} th dport 53 ip daddr @dns4 accept
    ip daddr @allowed4 accept
    ip daddr @denied4 counter drop
    udp dport 443 counter drop
  }}
}}
"#
    );
    Ruleset {
        table,
        interfaces,
        script,
    }
}

/// Installs and checks the host firewall.
#[derive(Clone, Debug)]
pub struct HostFirewall {
    config: FirewallConfig,
}

impl HostFirewall {
    /// A firewall with `config`.
    pub fn new(config: FirewallConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &FirewallConfig {
        &self.config
    }

    /// The resolvers sandboxes may query.
    pub fn dns(&self) -> Vec<IpAddr> {
        self.config
            .dns_servers
            .clone()
            .unwrap_or_else(super::resolvers::host_nameservers)
    }

    /// The rules for `networks` under this configuration.
    pub fn ruleset(&self, networks: &[HostNetwork]) -> Ruleset {
        ruleset(networks, &self.config, &self.dns())
    }

    /// Installs (or replaces) the rules for `networks`, then removes the tables of
    /// bridges that no longer exist. Err: why it could not be installed.
    pub async fn apply(&self, networks: &[HostNetwork]) -> Result<FirewallStatus, String> {
        if self.config.firewall == FirewallMode::Off {
            return Ok(FirewallStatus::Off);
        }
        if networks.is_empty() {
            return Err(NOT_ON_THIS_KERNEL.into());
        }
        let rules = self.ruleset(networks);
        nft(&["-f", "-"], Some(&rules.script)).await?;
        self.remove_stale(&rules.table).await;
        let gaps = bridged_frames_filtered(true)
            .await
            .err()
            .into_iter()
            .collect();
        Ok(FirewallStatus::Active {
            table: rules.table,
            interfaces: rules.interfaces,
            gaps,
        })
    }

    /// Whether the rules for `networks` are installed as this configuration wants them.
    pub async fn status(&self, networks: &[HostNetwork]) -> FirewallStatus {
        if self.config.firewall == FirewallMode::Off {
            return FirewallStatus::Off;
        }
        if networks.is_empty() {
            return FirewallStatus::Inactive(NOT_ON_THIS_KERNEL.into());
        }
        let rules = self.ruleset(networks);
        match nft(&["list", "table", "inet", &rules.table], None).await {
            Err(e) => FirewallStatus::Inactive(format!(
                "table inet {} is not installed: {e}",
                rules.table
            )),
            Ok(listing)
                if !rules
                    .interfaces
                    .iter()
                    .all(|i| listing.contains(&format!("\"{i}\""))) =>
            {
                FirewallStatus::Inactive(format!(
                    "table inet {} does not cover every sandbox network",
                    rules.table
                ))
            }
            Ok(_) => FirewallStatus::Active {
                table: rules.table,
                interfaces: rules.interfaces,
                gaps: bridged_frames_filtered(false)
                    .await
                    .err()
                    .into_iter()
                    .collect(),
            },
        }
    }

    /// Deletes our tables other than `keep` whose bridges all no longer exist.
    async fn remove_stale(&self, keep: &str) {
        let Ok(listing) = nft(&["list", "tables"], None).await else {
            return;
        };
        for line in listing.lines() {
            let mut words = line.split_whitespace();
            let (Some("table"), Some(family), Some(name)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if !name.starts_with(TABLE_PREFIX) || name == keep {
                continue;
            }
            let Ok(table) = nft(&["list", "table", family, name], None).await else {
                continue;
            };
            let bridges = comment_interfaces(&table);
            if is_stale(&bridges, |b| Path::new("/sys/class/net").join(b).exists()) {
                match nft(&["delete", "table", family, name], None).await {
                    Ok(_) => tracing::info!(
                        family,
                        table = name,
                        "removed the firewall table of sandbox networks that are gone"
                    ),
                    Err(e) => {
                        tracing::warn!(family, table = name, error = %e, "could not remove a stale firewall table")
                    }
                }
            }
        }
    }
}

/// Whether table `name` of the inet family is installed.
pub async fn table_exists(name: &str) -> bool {
    nft(&["list", "table", "inet", name], None).await.is_ok()
}

/// The switches that send frames bridged between two ports of a bridge (one sandbox to
/// another on the same network) through the IPv4 and IPv6 `forward` hooks.
const BRIDGE_NF: &[&str] = &[
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

/// Whether bridged frames pass the `forward` hook; `fix`: load `br_netfilter` and turn
/// the switches on where they are off. Err: what is not filtered, and why.
async fn bridged_frames_filtered(fix: bool) -> Result<(), String> {
    if fix && !Path::new(BRIDGE_NF[0]).exists() {
        let loaded = tokio::process::Command::new("modprobe")
            .arg("br_netfilter")
            .status()
            .await;
        if !matches!(loaded, Ok(s) if s.success()) {
            tracing::warn!("could not load br_netfilter");
        }
    }
    for path in BRIDGE_NF {
        match std::fs::read_to_string(path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) if fix => {
                std::fs::write(path, "1").map_err(|e| {
                    format!("sandboxes on one network are not kept apart: {path} is 0 and cannot be set ({e})")
                })?;
                tracing::info!(
                    path,
                    "turned on: sandbox-to-sandbox frames on one bridge pass the firewall"
                );
            }
            Ok(_) => {
                return Err(format!(
                    "sandboxes on one network are not kept apart: {path} is 0"
                ))
            }
            Err(_) => {
                return Err(
                    "sandboxes on one network are not kept apart: br_netfilter is not loaded \
                     (modprobe br_netfilter)"
                        .into(),
                )
            }
        }
    }
    Ok(())
}

/// Whether a table for `bridges` belongs to networks that are gone: every bridge is
/// missing and every one is Docker's (`br-<id>`). Docker makes a network's bridge with the
/// network, so a missing one means a removed network; Podman (CNI, netavark) makes its
/// bridge only when the first container joins, so a missing one proves nothing and its
/// tables are kept (their names come back when Podman reuses them).
fn is_stale(bridges: &[String], exists: impl Fn(&str) -> bool) -> bool {
    !bridges.is_empty() && bridges.iter().all(|b| b.starts_with("br-") && !exists(b))
}

/// The bridges a table's comment names.
fn comment_interfaces(listing: &str) -> Vec<String> {
    listing
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("comment \"colima-e2b sandbox networks:")
                .and_then(|rest| rest.strip_suffix('"'))
        })
        .map(|rest| rest.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Runs `nft args` with `input` on its stdin; its stdout, or why it failed.
pub(super) async fn nft(args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "the nft tool is not installed (Debian/Ubuntu: apt-get install nftables)".to_string()
        } else {
            format!("cannot run nft: {e}")
        }
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = tokio::time::timeout(NFT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("nft did not answer within {NFT_TIMEOUT:?}"))?
        .map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        Err(if err.contains("Operation not permitted") {
            format!("nft: {err} (changing the host's firewall needs root or CAP_NET_ADMIN)")
        } else {
            format!("nft: {err}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, iface: &str) -> HostNetwork {
        HostNetwork {
            name: name.into(),
            interface: iface.into(),
            subnets: vec!["172.18.0.0/16".parse().expect("literal")],
        }
    }

    #[test]
    fn the_table_is_named_after_its_bridges_whatever_their_order() {
        let config = FirewallConfig::default();
        let a = ruleset(&[net("x", "br-a"), net("y", "br-b")], &config, &[]);
        let b = ruleset(&[net("y", "br-b"), net("x", "br-a")], &config, &[]);
        assert_eq!(a.table, b.table);
        assert!(a.table.starts_with(TABLE_PREFIX));
        assert_eq!(a.interfaces, vec!["br-a", "br-b"]);
        let c = ruleset(&[net("x", "br-a")], &config, &[]);
        assert_ne!(a.table, c.table);
    }

    #[test]
    fn the_script_lists_the_bridges_resolvers_and_allowances() {
        let config = FirewallConfig {
            allow_private: vec!["10.1.2.0/24".parse().expect("literal")],
            allow_host_ports: vec![5432, 5432, 6379],
            ..FirewallConfig::default()
        };
        let dns = [
            "10.255.255.53".parse().expect("literal"),
            "2001:db8::1".parse().expect("literal"),
        ];
        let r = ruleset(&[net("x", "br-a"), net("o", "br-o")], &config, &dns);
        let s = &r.script;
        assert!(
            s.contains(r#"set sandbox_ifaces { type ifname; elements = { "br-a", "br-o" }; }"#),
            "{s}"
        );
        assert!(
            s.contains("set dns4 { type ipv4_addr; elements = { 10.255.255.53 }; }"),
            "{s}"
        );
        assert!(
            s.contains("flags interval; elements = { 10.1.2.0/24 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set host_ports { type inet_service; elements = { 5432, 6379 }; }"),
            "{s}"
        );
        assert!(s.contains("169.254.0.0/16"), "{s}");
        // The table is created, deleted and made again in one transaction.
        assert_eq!(
            s.matches(&format!("delete table inet {}", r.table)).count(),
            1
        );
        assert!(s.contains("comment \"colima-e2b sandbox networks: br-a br-o\""));
    }

    #[test]
    fn empty_sets_have_no_elements_clause() {
        let r = ruleset(&[net("x", "br-a")], &FirewallConfig::default(), &[]);
        assert!(
            r.script.contains("set dns4 { type ipv4_addr; }"),
            "{}",
            r.script
        );
        assert!(r.script.contains("set host_ports { type inet_service; }"));
    }

    #[test]
    fn only_tables_of_vanished_docker_bridges_are_stale() {
        let v = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let none = |_: &str| false;
        assert!(is_stale(&v(&["br-0123456789ab", "br-ba9876543210"]), none));
        assert!(!is_stale(
            &v(&["br-0123456789ab", "br-ba9876543210"]),
            |b| b == "br-ba9876543210"
        ));
        // Podman's bridges appear with the first container: never stale by absence.
        assert!(!is_stale(&v(&["cni-podman3", "cni-podman4"]), none));
        assert!(!is_stale(&v(&["br-0123456789ab", "cni-podman4"]), none));
        assert!(!is_stale(&[], none));
    }

    #[test]
    fn a_tables_bridges_are_read_back_from_its_comment() {
        let listing = "table inet colima_e2b_x {\n\tcomment \"colima-e2b sandbox networks: br-a cni-podman1\"\n\tset sandbox_ifaces {";
        assert_eq!(comment_interfaces(listing), vec!["br-a", "cni-podman1"]);
        assert!(comment_interfaces("table inet other {\n}").is_empty());
    }
}
