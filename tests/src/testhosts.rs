//! The project's own "internet" for network tests: a network namespace joined to this
//! host by a veth pair, holding addresses of the kinds the firewall decides on (a
//! documentation-range "public" one, a private one, the cloud metadata address), with a
//! listener that records every TCP connection and UDP datagram that arrives. Nothing is
//! ever sent beyond this machine: the namespace answers for those addresses through
//! host routes more specific than any other, checked before use.
//!
//! One [`TestHosts`] at a time per machine (the addresses are fixed); [`TestHosts::start`]
//! removes what an earlier run left.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The namespace's name.
const NS: &str = "ce2b-testhosts";
/// The host's end of the veth pair.
const HOST_IF: &str = "ce2b-th0";
/// The namespace's end.
const NS_IF: &str = "ce2b-th1";
/// The host's address on the link (private: sandboxes must not reach it either).
pub const LINK_HOST: &str = "10.200.0.1";
/// A private destination (10/8).
pub const PRIVATE: &str = "10.200.0.10";
/// A "public" destination (TEST-NET-2, routed here by a /32).
pub const PUBLIC: &str = "198.51.100.10";
/// A second "public" destination next to it, for rules that tell the two apart.
pub const PUBLIC_2: &str = "198.51.100.11";
/// The cloud metadata address, answered by the namespace (routed here by a /32).
pub const METADATA: &str = "169.254.169.254";
/// TCP port the test hosts listen on.
pub const TCP_PORT: u16 = 8080;
/// UDP ports the test hosts listen on (443: QUIC, which must be dropped; 8443 not).
pub const UDP_PORTS: [u16; 2] = [443, 8443];
/// TCP ports of the web (HTTP, TLS) the test hosts listen on too: what the egress proxy
/// decides by name.
pub const WEB_PORTS: [u16; 2] = [80, 443];
/// Where the test hosts' DNS server answers (port 53).
pub const DNS: &str = PRIVATE;
/// Test names and what the DNS server answers for them (a name also answers for every
/// name below it).
pub const NAMES: [(&str, &str); 4] = [
    ("allowed.ce2b.test", PUBLIC),
    ("other.ce2b.test", PUBLIC_2),
    ("wild.ce2b.test", PUBLIC),
    ("private.ce2b.test", PRIVATE),
];

/// Records connections and datagrams: `tcp|udp <local addr> <local port> <peer addr>`.
const LISTENER: &str = r#"
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
lock = threading.Lock()
def note(*f):
    with lock:
        log.write(" ".join(str(x) for x in f) + "\n")
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, peer = s.accept()
        here = c.getsockname()
        note("tcp", here[0], here[1], peer[0])
        try:
            c.sendall(b"hello-from-test-host\n")
        except OSError:
            pass
        c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO: which address it came to
    s.bind(("0.0.0.0", port))
    while True:
        data, anc, _, peer = s.recvmsg(2048, 256)
        here = socket.inet_ntoa(anc[0][2][8:12]) if anc else "?"
        note("udp", here, port, peer[0])
ports = [int(p) for p in sys.argv[2].split(",") if p]
udps = [int(p) for p in sys.argv[3].split(",") if p]
for p in ports:
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
for p in udps:
    threading.Thread(target=udp, args=(p,), daemon=True).start()
note("ready", 0, 0, 0)
threading.Event().wait()
"#;

/// One arrival at a test host (or at this host's listener).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The address it was sent to.
    pub to: String,
    /// The port it was sent to.
    pub port: u16,
    /// Who sent it (after the engine's masquerading: the host's link address).
    pub from: String,
}

/// A listener process and its log.
pub struct Listener {
    child: Child,
    log: PathBuf,
}

impl Listener {
    /// Starts a listener (in namespace `ns`, or this host's when `None`) on TCP `ports`
    /// and UDP `udp_ports`, all addresses; waits until it listens.
    pub fn start(ns: Option<&str>, ports: &[u16], udp_ports: &[u16]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "colima-e2b-listener-{}-{}.log",
            std::process::id(),
            ports.first().copied().unwrap_or_default()
        ));
        let _ = std::fs::remove_file(&log);
        let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let child = cmd
            .args(["-c", LISTENER])
            .arg(&log)
            .arg(join(ports))
            .arg(if udp_ports.is_empty() {
                String::new()
            } else {
                join(udp_ports)
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a test listener (python3)");
        let listener = Self { child, log };
        for _ in 0..100 {
            if std::fs::read_to_string(&listener.log).is_ok_and(|t| t.contains("ready")) {
                return listener;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the test listener did not start");
    }

    /// Everything that arrived so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [proto @ ("tcp" | "udp"), to, port, from] => Some(Arrival {
                        proto: proto.to_string(),
                        to: to.to_string(),
                        port: port.parse().ok()?,
                        from: from.to_string(),
                    }),
                    _ => None,
                }
            })
            .collect()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The namespace with the test hosts' addresses and their listener.
pub struct TestHosts {
    listener: Option<Listener>,
    dns: Option<Child>,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

fn teardown() {
    for dest in [PUBLIC, METADATA] {
        let _ = ip(&["route", "del", &format!("{dest}/32"), "dev", HOST_IF]);
    }
    let _ = ip(&["link", "del", HOST_IF]);
    let _ = ip(&["netns", "del", NS]);
}

impl TestHosts {
    /// Makes the namespace, its addresses and routes, and starts its listener.
    pub fn start() -> Self {
        teardown();
        must(&["netns", "add", NS]);
        must(&[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF,
        ]);
        must(&["link", "set", NS_IF, "netns", NS]);
        must(&["addr", "add", &format!("{LINK_HOST}/24"), "dev", HOST_IF]);
        must(&["link", "set", HOST_IF, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", NS, "ip"];
            all.extend_from_slice(args);
            must(&all);
        };
        in_ns(&["addr", "add", &format!("{PRIVATE}/24"), "dev", NS_IF]);
        for a in [PUBLIC, PUBLIC_2, METADATA] {
            in_ns(&["addr", "add", &format!("{a}/32"), "dev", NS_IF]);
        }
        in_ns(&["link", "set", NS_IF, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["route", "add", "default", "via", LINK_HOST]);
        for dest in [PUBLIC, PUBLIC_2, METADATA] {
            must(&[
                "route",
                "add",
                &format!("{dest}/32"),
                "via",
                PRIVATE,
                "dev",
                HOST_IF,
            ]);
        }
        // Never a packet to the real metadata service or a real public address.
        for dest in [PUBLIC, PUBLIC_2, METADATA, PRIVATE] {
            let route = ip(&["route", "get", dest]).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                route.contains(&format!("dev {HOST_IF}")),
                "{dest} is not routed to the test namespace: {route}"
            );
        }
        let mut ports = vec![TCP_PORT];
        ports.extend(WEB_PORTS);
        let listener = Listener::start(Some(NS), &ports, &UDP_PORTS);
        Self {
            listener: Some(listener),
            dns: Some(start_dns()),
        }
    }

    /// Everything that arrived at the test hosts so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.listener
            .as_ref()
            .map(Listener::arrivals)
            .unwrap_or_default()
    }
}

/// Starts dnsmasq in the namespace on [`DNS`], answering [`NAMES`] and nothing else.
fn start_dns() -> Child {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        NS,
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
    ])
    .args([
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
    ])
    .args(["--pid-file=".to_string(), format!("--listen-address={DNS}")]);
    for (name, addr) in NAMES {
        cmd.arg(format!("--address=/{name}/{addr}"));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dnsmasq (install dnsmasq-base: deploy/test.sh does)");
    // Answers once it listens.
    for _ in 0..100 {
        let probe = Command::new("ip")
            .args(["netns", "exec", NS, "python3", "-c", DNS_PROBE, DNS])
            .output()
            .expect("python3");
        if probe.status.success() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the test hosts' DNS server did not answer");
}

/// Asks the DNS server at argv[1] for allowed.ce2b.test's A record; exit 0 on an answer.
const DNS_PROBE: &str = r#"
import socket, struct, sys
q = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p.encode() for p in "allowed.ce2b.test".split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
s.sendto(q, (sys.argv[1], 53))
data = s.recv(512)
sys.exit(0 if struct.unpack(">H", data[6:8])[0] > 0 else 1)
"#;

impl Drop for TestHosts {
    fn drop(&mut self) {
        self.listener.take();
        if let Some(mut dns) = self.dns.take() {
            let _ = dns.kill();
            let _ = dns.wait();
        }
        teardown();
    }
}
