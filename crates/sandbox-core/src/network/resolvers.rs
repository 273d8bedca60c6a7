//! The DNS resolvers sandboxes use: the engines give containers this host's nameservers
//! (Docker's embedded DNS forwards to them from the container's own network namespace),
//! so the firewall must let port 53 through to exactly those, even where they sit on a
//! private address.

use std::net::IpAddr;
use std::path::Path;

/// Where a host with systemd-resolved keeps its real upstreams (its /etc/resolv.conf
/// names the 127.0.0.53 stub, which containers cannot use, so engines read this one).
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// The nameservers of resolv.conf text `text`, loopback ones left out (containers never
/// reach this host's loopback).
pub fn parse(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // A scoped IPv6 address (`fe80::1%eth0`) is link-local: useless in a container.
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// This host's nameservers as the engines hand them to containers.
pub fn host_nameservers() -> Vec<IpAddr> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).unwrap_or_default();
    let servers = parse(&read("/etc/resolv.conf"));
    if servers.is_empty() {
        return parse(&read(RESOLVED_UPSTREAMS));
    }
    servers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_unparsable_nameservers_are_left_out() {
        let text = "# generated\nsearch example\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n\
                    nameserver ::1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n\
                    nameserver 10.255.255.53\noptions edns0\n";
        let got = parse(text);
        assert_eq!(
            got,
            vec![
                "10.255.255.53".parse::<IpAddr>().expect("literal"),
                "2001:db8::53".parse::<IpAddr>().expect("literal")
            ]
        );
    }
}
