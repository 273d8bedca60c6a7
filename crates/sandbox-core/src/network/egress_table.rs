//! Each server's egress table: the E2B network rules (`allowOut`, `denyOut`, internet
//! off) of its sandboxes, as nftables rules on this kernel.
//!
//! One `inet` table per server (named after its owner id), holding one chain per
//! sandbox with rules, picked by the sandbox's source address through a verdict map.
//! It hooks `forward` at priority `filter - 5`, after the host firewall's tables
//! (`filter - 10`), whose drops are final: this table can only narrow what a sandbox
//! reaches, never reopen a host, private or metadata address. Replies and connections
//! already made pass (E2B: a rule change takes effect for new connections), and DNS to
//! the resolvers containers are given stays open. A denied TCP connection is reset, and
//! anything else denied is answered "administratively prohibited", so programs fail at
//! once instead of waiting out a timeout.
//!
//! The table is replaced whole, in one `nft -f` transaction, whenever a sandbox's rules
//! change, and deleted when no sandbox has any.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use super::egress::EgressRules;
use super::firewall::{elements, nft, short_hash};

/// Prefix of the egress tables' names.
pub const EGRESS_TABLE_PREFIX: &str = "colima_e2b_egress_";

/// One sandbox's rules, at its address on a sandbox network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRules {
    /// The sandbox's address on its network (the source of what it sends).
    pub addr: Ipv4Addr,
    /// What it may reach.
    pub rules: EgressRules,
}

/// TCP ports whose connections a sandbox with host names in its rules makes through the
/// egress proxy (TLS and plain HTTP).
pub const PROXIED_PORTS: [u16; 2] = [80, 443];

/// The egress table's name for server `owner`.
pub fn table_name(owner: &str) -> String {
    format!("{EGRESS_TABLE_PREFIX}{}", short_hash(owner))
}

/// The IPv4 networks of `nets` (IPv6 never leaves a sandbox network: the host
/// firewall drops it), overlaps and neighbours merged: nft refuses an interval set
/// whose elements overlap.
fn v4(nets: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let v4: Vec<IpNet> = nets
        .into_iter()
        .filter(|n| matches!(n, IpNet::V4(_)))
        .collect();
    IpNet::aggregate(&v4)
}

/// The `nft -f` script that replaces server `owner`'s table with `sandboxes`' rules,
/// `dns` being the resolvers that stay reachable; TCP 80/443 of sandboxes whose rules
/// name hosts go to the egress proxy on `proxy_port`.
pub fn script(
    owner: &str,
    sandboxes: &[SandboxRules],
    dns: &[IpAddr],
    proxy_port: Option<u16>,
) -> String {
    let table = table_name(owner);
    let mut chains = String::new();
    let mut verdicts = Vec::new();
    let proxied: Vec<Ipv4Addr> = sandboxes
        .iter()
        .filter(|s| s.rules.has_domains())
        .map(|s| s.addr)
        .collect();
    let redirect = match proxy_port {
        Some(port) if !proxied.is_empty() => format!(
            "  set proxied4 {{ type ipv4_addr;{} }}\n  chain to_proxy {{\n    type nat hook prerouting priority dstnat - 5; policy accept;\n    ip saddr @proxied4 tcp dport {{ {} }} redirect to :{port}\n  }}\n",
            elements(&proxied),
            PROXIED_PORTS.map(|p| p.to_string()).join(", "),
        ),
        _ => String::new(),
    };
    for (n, s) in sandboxes.iter().enumerate() {
        let chain = format!("sandbox_{n}");
        let allowed = v4(s.rules.allowed_nets().copied());
        let denied = v4(s.rules.denied_nets().iter().copied());
        let mut body = String::new();
        if !allowed.is_empty() {
            body.push_str(&format!("    ip daddr {{ {} }} accept\n", join(&allowed)));
        }
        if !denied.is_empty() {
            let set = join(&denied);
            body.push_str(&format!(
                "    ip daddr {{ {set} }} meta l4proto tcp counter reject with tcp reset\n"
            ));
            body.push_str(&format!(
                "    ip daddr {{ {set} }} counter reject with icmpx type admin-prohibited\n"
            ));
        }
        chains.push_str(&format!("  chain {chain} {{\n{body}  }}\n"));
        verdicts.push(format!("{} : jump {chain}", s.addr));
    }
    let dns4 = elements(dns.iter().filter(|a| a.is_ipv4()));
    let map = elements(verdicts);
    format!(
        r#"table inet {table} {{}}
delete table inet {table}
table inet {table} {{
  comment "colima-e2b egress rules of the sandboxes of server {owner}"
  set dns4 {{ type ipv4_addr;{dns4} }}
{chains}  map sandboxes {{ type ipv4_addr : verdict;{map} }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    ct state established,related accept
    meta l4proto {{ tcp, udp }} th dport 53 ip daddr @dns4 accept
    ip saddr vmap @sandboxes
  }}
{redirect}}}
"#
    )
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Installs server `owner`'s table for `sandboxes`, or deletes it when there are none.
pub async fn apply(
    owner: &str,
    sandboxes: &[SandboxRules],
    dns: &[IpAddr],
    proxy_port: Option<u16>,
) -> Result<(), String> {
    if sandboxes.is_empty() {
        let table = table_name(owner);
        // Creating it first makes the delete succeed whether or not it existed.
        let script = format!("table inet {table} {{}}\ndelete table inet {table}\n");
        return nft(&["-f", "-"], Some(&script)).await.map(drop);
    }
    nft(
        &["-f", "-"],
        Some(&script(owner, sandboxes, dns, proxy_port)),
    )
    .await
    .map(drop)
}

/// The egress tables of servers other than `owner`.
pub async fn foreign_tables(owner: &str) -> Vec<String> {
    let own = table_name(owner);
    let Ok(listing) = nft(&["list", "tables", "inet"], None).await else {
        return Vec::new();
    };
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|name| name.starts_with(EGRESS_TABLE_PREFIX) && *name != own)
        .map(str::to_string)
        .collect()
}

/// Drops `addr`'s rules from another server's `table`. Only for an address the engine
/// has just given a new sandbox: on one host an address belongs to one container, so
/// rules for it there are left over from a sandbox that is gone (its server stopped and
/// never came back, and the sandbox was removed behind its back).
pub async fn forget_address(table: &str, addr: Ipv4Addr) -> bool {
    let mut dropped = false;
    for set in ["sandboxes", "proxied4"] {
        let script = format!("delete element inet {table} {set} {{ {addr} }}\n");
        dropped |= nft(&["-f", "-"], Some(&script)).await.is_ok();
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: &str, rules: EgressRules) -> SandboxRules {
        SandboxRules {
            addr: addr.parse().expect("literal"),
            rules,
        }
    }

    fn rules(allow: &[&str], deny: &[&str], internet: bool) -> EgressRules {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressRules::parse(&s(allow), &s(deny), internet).expect("valid rules")
    }

    #[test]
    fn each_sandbox_gets_a_chain_picked_by_its_address() {
        let sandboxes = [
            at(
                "172.18.0.5",
                rules(&["198.51.100.10"], &["198.51.100.0/24"], true),
            ),
            at("172.18.0.6", rules(&[], &[], false)),
        ];
        let dns = ["10.255.255.53".parse().expect("literal")];
        let s = script("srv-1", &sandboxes, &dns, Some(40123));
        assert!(s.starts_with(&format!("table inet {} {{}}", table_name("srv-1"))));
        assert!(
            s.contains("172.18.0.5 : jump sandbox_0, 172.18.0.6 : jump sandbox_1"),
            "{s}"
        );
        assert!(s.contains("ip daddr { 198.51.100.10/32 } accept"), "{s}");
        assert!(
            s.contains("ip daddr { 198.51.100.0/24 } meta l4proto tcp counter reject"),
            "{s}"
        );
        // Internet off: everything IPv4 denied; the IPv6 half is left to the host firewall.
        assert!(s.contains("ip daddr { 0.0.0.0/0 } meta l4proto tcp"), "{s}");
        assert!(!s.contains("::/0"), "{s}");
        assert!(
            s.contains("set dns4 { type ipv4_addr; elements = { 10.255.255.53 }; }"),
            "{s}"
        );
        assert!(s.contains("priority filter - 5"), "{s}");
        // No host names: nothing goes to the proxy.
        assert!(!s.contains("redirect"), "{s}");
    }

    #[test]
    fn sandboxes_whose_rules_name_hosts_go_through_the_proxy() {
        let sandboxes = [
            at(
                "172.18.0.5",
                rules(&["api.example.com"], &["0.0.0.0/0"], true),
            ),
            at("172.18.0.6", rules(&["198.51.100.1"], &["0.0.0.0/0"], true)),
        ];
        let s = script("srv-1", &sandboxes, &[], Some(40123));
        assert!(
            s.contains("set proxied4 { type ipv4_addr; elements = { 172.18.0.5 }; }"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @proxied4 tcp dport { 80, 443 } redirect to :40123"),
            "{s}"
        );
        assert!(s.contains("priority dstnat - 5"), "{s}");
        assert!(!script("srv-1", &sandboxes, &[], None).contains("redirect"));
    }

    #[test]
    fn overlapping_and_repeated_entries_are_merged() {
        let sandboxes = [at(
            "172.18.0.5",
            rules(
                &[
                    "198.51.100.0/24",
                    "198.51.100.10",
                    "198.51.100.10",
                    "198.51.101.0/24",
                ],
                &["0.0.0.0/0", "10.0.0.0/8"],
                true,
            ),
        )];
        let s = script("srv-1", &sandboxes, &[], None);
        assert!(s.contains("ip daddr { 198.51.100.0/23 } accept"), "{s}");
        assert!(s.contains("ip daddr { 0.0.0.0/0 } meta l4proto tcp"), "{s}");
    }

    #[test]
    fn servers_get_tables_of_their_own() {
        assert_ne!(table_name("a"), table_name("b"));
        assert!(table_name("a").starts_with(EGRESS_TABLE_PREFIX));
        assert_eq!(table_name("a"), table_name("a"));
    }
}
