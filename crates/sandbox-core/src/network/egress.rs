//! E2B's egress rules for one sandbox (`network.allowOut` / `denyOut`, and
//! `allow_internet_access`), and how they decide a destination.
//!
//! Order, as E2B evaluates it: the always-denied ranges (private, loopback, link-local)
//! first, unless the server's operator allows a range (`[network] allow_private`); then
//! an allowed domain allows; an address in `allowOut` allows; an address in `denyOut`
//! denies; anything else is allowed. An allowlist is `denyOut: ["0.0.0.0/0"]` plus
//! `allowOut`. Domains are matched by the name the connection asks for (TLS SNI, HTTP
//! Host), never by the address the sandbox resolved; a name that resolves to an
//! always-denied address is refused whatever the rules say.

use std::net::IpAddr;

use ipnet::IpNet;

use super::firewall::DENIED_V4;

/// IPv6 destinations E2B always denies.
pub const DENIED_V6: &[&str] = &["::1/128", "fc00::/7", "fe80::/10"];

/// One `allowOut` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    /// An address or CIDR.
    Net(IpNet),
    /// A host name, matched exactly (lowercase, no trailing dot).
    Domain(String),
    /// `*.example.com`: any name below `example.com` (not `example.com` itself).
    Below(String),
}

/// What a destination gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The connection may be made.
    Allow,
    /// It is refused, and why.
    Deny(DenyReason),
}

/// Why a destination is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// Private, loopback or link-local: always denied.
    AlwaysDenied,
    /// In `denyOut` (or internet access is off) and not allowed.
    DenyOut,
}

/// One sandbox's egress rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    allow: Vec<AllowEntry>,
    deny: Vec<IpNet>,
}

/// A rule the client sent that cannot be one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRule(pub String);

impl std::fmt::Display for BadRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest list a client may send, per field.
pub const MAX_ENTRIES: usize = 256;

/// `entry` as an address or CIDR (a bare address is a /32 or /128).
fn net(entry: &str) -> Option<IpNet> {
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// A DNS name's canonical form, or why it is not one.
fn domain(entry: &str) -> Result<String, BadRule> {
    let name = entry.trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(name)
    } else {
        Err(BadRule(format!(
            "{entry:?} is not an address, a CIDR or a host name"
        )))
    }
}

impl EgressRules {
    /// The rules from E2B's fields. `allow_internet` false adds `0.0.0.0/0` (and `::/0`)
    /// to `denyOut`, as E2B defines it.
    pub fn parse(
        allow_out: &[String],
        deny_out: &[String],
        allow_internet: bool,
    ) -> Result<Self, BadRule> {
        if allow_out.len() > MAX_ENTRIES || deny_out.len() > MAX_ENTRIES {
            return Err(BadRule(format!(
                "at most {MAX_ENTRIES} entries in allowOut and in denyOut"
            )));
        }
        let mut allow = Vec::with_capacity(allow_out.len());
        for entry in allow_out {
            let entry = entry.trim();
            allow.push(if let Some(n) = net(entry) {
                AllowEntry::Net(n)
            } else if let Some(rest) = entry.strip_prefix("*.") {
                AllowEntry::Below(domain(rest)?)
            } else {
                AllowEntry::Domain(domain(entry)?)
            });
        }
        let mut deny = Vec::with_capacity(deny_out.len() + 2);
        for entry in deny_out {
            deny.push(net(entry.trim()).ok_or_else(|| {
                BadRule(format!(
                    "denyOut takes addresses and CIDRs only, not {entry:?}"
                ))
            })?);
        }
        if !allow_internet {
            deny.extend(["0.0.0.0/0", "::/0"].iter().filter_map(|n| net(n)));
        }
        Ok(Self { allow, deny })
    }

    /// Whether any rule names a domain (connections must then be decided by name, in
    /// the egress proxy).
    pub fn has_domains(&self) -> bool {
        self.allow.iter().any(|a| !matches!(a, AllowEntry::Net(_)))
    }

    /// Whether nothing is restricted beyond the always-denied ranges.
    pub fn is_open(&self) -> bool {
        self.deny.is_empty()
    }

    /// The addresses and CIDRs `allowOut` names.
    pub fn allowed_nets(&self) -> impl Iterator<Item = &IpNet> {
        self.allow.iter().filter_map(|a| match a {
            AllowEntry::Net(n) => Some(n),
            _ => None,
        })
    }

    /// The addresses and CIDRs denied (`denyOut`, and everything when internet is off).
    pub fn denied_nets(&self) -> &[IpNet] {
        &self.deny
    }

    /// The verdict for a connection to address `ip` (no name known).
    /// `operator_allowed`: ranges the server's `[network] allow_private` opens.
    pub fn decide_ip(&self, ip: IpAddr, operator_allowed: &[IpNet]) -> Verdict {
        if always_denied(ip) && !operator_allowed.iter().any(|n| n.contains(&ip)) {
            return Verdict::Deny(DenyReason::AlwaysDenied);
        }
        if self
            .allow
            .iter()
            .any(|a| matches!(a, AllowEntry::Net(n) if n.contains(&ip)))
        {
            return Verdict::Allow;
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Verdict::Deny(DenyReason::DenyOut);
        }
        Verdict::Allow
    }

    /// The verdict for a connection that names host `name` (TLS SNI or HTTP Host) and
    /// that the egress proxy would dial at `resolved`.
    pub fn decide_name(&self, name: &str, resolved: IpAddr, operator_allowed: &[IpNet]) -> Verdict {
        if always_denied(resolved) && !operator_allowed.iter().any(|n| n.contains(&resolved)) {
            return Verdict::Deny(DenyReason::AlwaysDenied);
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let allowed = self.allow.iter().any(|a| match a {
            AllowEntry::Domain(d) => *d == name,
            AllowEntry::Below(d) => name
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            AllowEntry::Net(_) => false,
        });
        if allowed {
            return Verdict::Allow;
        }
        self.decide_ip(resolved, operator_allowed)
    }
}

/// Whether `ip` is in E2B's always-denied ranges.
pub fn always_denied(ip: IpAddr) -> bool {
    let (list, ip) = match ip {
        // An IPv4-mapped IPv6 address is its IPv4 address.
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (DENIED_V4, IpAddr::V4(v4)),
            None => (DENIED_V6, ip),
        },
        IpAddr::V4(_) => (DENIED_V4, ip),
    };
    list.iter()
        .filter_map(|n| n.parse::<IpNet>().ok())
        .any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> EgressRules {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressRules::parse(&s(allow), &s(deny), true).expect("valid rules")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn an_allowlist_is_deny_all_plus_allow_out() {
        let r = rules(
            &["198.51.100.0/24", "api.example.com", "*.cdn.example"],
            &["0.0.0.0/0"],
        );
        assert!(r.has_domains());
        assert_eq!(r.decide_ip(ip("198.51.100.7"), &[]), Verdict::Allow);
        assert_eq!(
            r.decide_ip(ip("203.0.113.9"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
        assert_eq!(
            r.decide_name("API.example.com.", ip("203.0.113.9"), &[]),
            Verdict::Allow
        );
        assert_eq!(
            r.decide_name("a.b.cdn.example", ip("203.0.113.9"), &[]),
            Verdict::Allow
        );
        // The wildcard is below the name, not the name itself, nor a look-alike.
        assert_eq!(
            r.decide_name("cdn.example", ip("203.0.113.9"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
        assert_eq!(
            r.decide_name("evilcdn.example", ip("203.0.113.9"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
        assert_eq!(
            r.decide_name("other.example.com", ip("203.0.113.9"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
    }

    #[test]
    fn allow_out_addresses_win_over_deny_out_and_the_rest_is_allowed() {
        let r = rules(&["203.0.113.5"], &["203.0.113.0/24"]);
        assert!(!r.has_domains());
        assert_eq!(r.decide_ip(ip("203.0.113.5"), &[]), Verdict::Allow);
        assert_eq!(
            r.decide_ip(ip("203.0.113.6"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
        assert_eq!(r.decide_ip(ip("198.51.100.1"), &[]), Verdict::Allow);
    }

    #[test]
    fn private_ranges_are_denied_whatever_the_rules_unless_the_operator_opens_them() {
        let r = rules(&["10.0.0.0/8", "internal.example"], &[]);
        assert_eq!(
            r.decide_ip(ip("10.1.2.3"), &[]),
            Verdict::Deny(DenyReason::AlwaysDenied)
        );
        // A name that resolves to a private address is refused, allowed or not.
        assert_eq!(
            r.decide_name("internal.example", ip("192.168.1.1"), &[]),
            Verdict::Deny(DenyReason::AlwaysDenied)
        );
        assert_eq!(
            r.decide_name("x.example", ip("::ffff:169.254.169.254"), &[]),
            Verdict::Deny(DenyReason::AlwaysDenied)
        );
        assert_eq!(
            r.decide_ip(ip("fe80::1"), &[]),
            Verdict::Deny(DenyReason::AlwaysDenied)
        );
        let open = ["10.1.2.0/24".parse().expect("literal")];
        assert_eq!(r.decide_ip(ip("10.1.2.3"), &open), Verdict::Allow);
        assert_eq!(
            r.decide_ip(ip("10.1.3.3"), &open),
            Verdict::Deny(DenyReason::AlwaysDenied)
        );
    }

    #[test]
    fn internet_off_denies_everything_but_allow_out() {
        let r = EgressRules::parse(&["198.51.100.10".into()], &[], false).expect("valid");
        assert!(!r.is_open());
        assert_eq!(r.decide_ip(ip("198.51.100.10"), &[]), Verdict::Allow);
        assert_eq!(
            r.decide_ip(ip("198.51.100.11"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
        assert_eq!(
            r.decide_ip(ip("2001:db8::1"), &[]),
            Verdict::Deny(DenyReason::DenyOut)
        );
    }

    #[test]
    fn bad_entries_are_refused_with_what_was_wrong() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let e = EgressRules::parse(&[], &s(&["example.com"]), true).expect_err("a name in denyOut");
        assert!(e.0.contains("denyOut"), "{e}");
        for bad in ["", "exa mple.com", "-x.example", "a..b", "http://x.example"] {
            assert!(
                EgressRules::parse(&s(&[bad]), &[], true).is_err(),
                "{bad:?}"
            );
        }
        let many = vec!["198.51.100.1".to_string(); MAX_ENTRIES + 1];
        assert!(EgressRules::parse(&many, &[], true).is_err());
    }
}
