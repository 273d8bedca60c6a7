//! The host firewall on a real engine (rows E1-E5 of the threat list): from inside a
//! sandbox, this host's own addresses (a listener on every one of them, and the server's
//! API), private and cloud-metadata destinations and other sandboxes (same network,
//! offline network, other engine) are unreachable, while a "public" test host is
//! reachable; the listeners show that nothing blocked ever arrived. The configured
//! allowances open exactly what they name; the rules come back after a flush and
//! outlive the server; tables of vanished networks are removed.
//!
//! Every destination is on this machine: the test hosts live in a network namespace
//! (tests/src/testhosts.rs), the metadata address included.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tests::testhosts::{self, Arrival, Listener, TestHosts};
use tests::{free_port, OwnerCleanup, Server, ServerOptions};

/// One test at a time: the test hosts' addresses are machine-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tries every `[proto, address, port]` at once from inside the sandbox: TCP connects
/// (3 s), UDP sends one datagram. Prints one JSON list: "open", "refused", "timeout",
/// "sent", or the error.
const PROBE: &str = r#"
import json, socket, sys, threading
targets = json.loads(sys.argv[1])
out = [None] * len(targets)
def one(i, proto, addr, port):
    try:
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"probe", (addr, port)); s.close(); out[i] = "sent"; return
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(3)
        s.connect((addr, port) if fam == socket.AF_INET else (addr, port, 0, socket.if_nametoindex("eth0")))
        s.close(); out[i] = "open"
    except socket.timeout:
        out[i] = "timeout"
    except ConnectionRefusedError:
        out[i] = "refused"
    except OSError as e:
        out[i] = "error: %s" % e
threads = [threading.Thread(target=one, args=(i, *t)) for i, t in enumerate(targets)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"#;

/// The sandbox's default gateway (this host's address on its bridge), from its
/// routing table.
const GATEWAY: &str = "python3 -c \"import socket,struct\nfor l in open('/proc/net/route').readlines()[1:]:\n    f=l.split()\n    if f[1]=='00000000': print(socket.inet_ntoa(struct.pack('<L',int(f[2],16))))\"";

async fn sh(server: &Server, id: &str, cmd: &str) -> String {
    let (status, v) = server.run(id, cmd).await;
    assert_eq!(status, 200, "{cmd}: {v}");
    assert_eq!(v["exit_code"], 0, "{cmd}: {v}");
    v["stdout"].as_str().unwrap_or_default().trim().to_string()
}

/// Starts a web server on port 8000 in sandbox `id` (when `serve`); its IPv4 address.
async fn address(server: &Server, id: &str, serve: bool) -> String {
    let start = "nohup python3 -m http.server 8000 >/dev/null 2>&1 & \
                 for i in $(seq 50); do curl -s -o /dev/null localhost:8000 && break; sleep 0.1; done; ";
    let cmd = format!("{}hostname -I", if serve { start } else { "" });
    let out = sh(server, id, &cmd).await;
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no address: {out}"))
        .to_string()
}

/// Runs [`PROBE`] in sandbox `id` against `targets`.
async fn probe(server: &Server, id: &str, targets: &[(&str, String, u16)]) -> Vec<String> {
    let list = serde_json::to_string(
        &targets
            .iter()
            .map(|(p, a, port)| json!([p, a, port]))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let cmd = format!("python3 -c '{}' '{}'", PROBE.replace('\'', "'\\''"), list);
    let out = sh(server, id, &cmd).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// This host's IPv4 addresses but loopback: the bridges' gateways of every engine,
/// the test link, the uplink.
fn host_addresses() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            let addr = f.get(i + 1)?.split('/').next()?;
            (!addr.starts_with("127.")).then(|| addr.to_string())
        })
        .collect()
}

/// The name of the firewall table the server reported installing.
fn table_of(server: &Server) -> String {
    let log = server.log();
    log.lines()
        .rev()
        .filter(|l| l.contains("host firewall active"))
        .filter_map(|l| l.split("table=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .next()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no firewall table in the log: {log}"))
}

fn nft(args: &[&str]) -> (bool, String) {
    let out = Command::new("nft").args(args).output().expect("nft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn arrived_at(arrivals: &[Arrival], proto: &str, to: &str, port: u16) -> usize {
    arrivals
        .iter()
        .filter(|a| a.proto == proto && a.to == to && a.port == port)
        .count()
}

/// Waits (bounded) until the listener has seen `n` arrivals; a datagram may trail.
async fn settle(arrivals: impl Fn() -> Vec<Arrival>, n: usize) -> Vec<Arrival> {
    for _ in 0..40 {
        let got = arrivals();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    arrivals()
}

#[tokio::test]
async fn a_sandbox_reaches_the_internet_but_not_this_host_private_networks_or_metadata() {
    let _serial = SERIAL.lock().await;
    let hosts = TestHosts::start();
    let on_host = free_port();
    let host_listener = Listener::start(None, &[on_host], &[]);
    let mut options = ServerOptions::new();
    // The API on every address of this host, as the seed's `--host 0.0.0.0` does.
    options.args = vec!["--host".into(), "0.0.0.0".into()];
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    assert!(
        server.log().contains("host firewall active"),
        "{}",
        server.log()
    );
    let api = server.port();
    let id = server.create_sandbox(json!({"timeout": 300})).await;
    let gateway = sh(&server, &id, GATEWAY).await;

    let mut targets = vec![
        ("tcp", testhosts::PUBLIC.to_string(), testhosts::TCP_PORT),
        ("tcp", testhosts::PRIVATE.to_string(), testhosts::TCP_PORT),
        ("tcp", testhosts::METADATA.to_string(), testhosts::TCP_PORT),
        ("udp", testhosts::PUBLIC.to_string(), 8443),
        ("udp", testhosts::PUBLIC.to_string(), 443),
    ];
    let addresses = host_addresses();
    assert!(
        addresses.contains(&gateway),
        "{gateway} not in {addresses:?}"
    );
    for addr in &addresses {
        targets.push(("tcp", addr.clone(), on_host));
        targets.push(("tcp", addr.clone(), api));
    }
    let got = probe(&server, &id, &targets).await;
    assert_eq!(got[0], "open", "the public test host: {got:?}");
    assert_eq!(got[1], "timeout", "a private destination: {got:?}");
    assert_eq!(got[2], "timeout", "the metadata address: {got:?}");
    for (t, r) in targets.iter().zip(&got).skip(5) {
        assert_eq!(r, "timeout", "this host's {}:{} answered", t.1, t.2);
    }

    // What arrived: the public test host's connection and the datagram to 8443, and
    // nothing else (no datagram to 443, nothing at the private or metadata address).
    let arrivals = settle(|| hosts.arrivals(), 2).await;
    assert_eq!(
        arrived_at(&arrivals, "tcp", testhosts::PUBLIC, testhosts::TCP_PORT),
        1,
        "{arrivals:?}"
    );
    assert_eq!(
        arrived_at(&arrivals, "udp", testhosts::PUBLIC, 8443),
        1,
        "{arrivals:?}"
    );
    assert_eq!(arrivals.len(), 2, "blocked traffic arrived: {arrivals:?}");
    assert_eq!(
        host_listener.arrivals(),
        vec![],
        "this host's listener was reached"
    );
    // The server itself still reaches its sandbox (replies pass).
    assert_eq!(sh(&server, &id, "echo ok").await, "ok");

    // doctor says the policy is active.
    let out = Command::new(tests::server_binary())
        .args(["doctor", "--backend", &options.backend])
        .env("COLIMA_E2B_OWNER", &options.owner)
        .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
        .env_remove("COLIMA_E2B_CONFIG")
        .output()
        .expect("doctor");
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("network_policy"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(line.starts_with("[ok  ] network_policy: active"), "{line}");
}

#[tokio::test]
async fn sandboxes_cannot_reach_each_other_on_one_network_another_network_or_another_engine() {
    let _serial = SERIAL.lock().await;
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let a = server.create_sandbox(json!({"timeout": 300})).await;
    let b = server.create_sandbox(json!({"timeout": 300})).await;
    let a_ip = address(&server, &a, true).await;
    // This host reaches it (the server's path to its agent and ports).
    let direct = reqwest::Client::new()
        .get(format!("http://{a_ip}:8000/"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("this host reaches the sandbox");
    assert_eq!(direct.status().as_u16(), 200);
    let got = probe(&server, &b, &[("tcp", a_ip.clone(), 8000)]).await;
    assert_eq!(got, vec!["timeout"], "sandbox to sandbox on one network");
    // Over IPv6 link-local too, where the sandboxes have it.
    let b_v6 = sh(
        &server,
        &b,
        "ip -6 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1",
    )
    .await;
    let a_v6 = sh(
        &server,
        &a,
        "ip -6 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1",
    )
    .await;
    if !a_v6.is_empty() && !b_v6.is_empty() {
        let got = probe(&server, &b, &[("tcp", a_v6.clone(), 8000)]).await;
        assert_eq!(got, vec!["timeout"], "sandbox to sandbox over {a_v6}");
    }

    // A sandbox without internet, where the engine has such networks.
    let (status, body) = tests::json_of(
        server
            .post("/sandboxes/", json!({"timeout": 300, "internet": false}))
            .await,
    )
    .await;
    if options.backend == "podman" {
        // CNI has no internal networks with a host gateway: the declared 501.
        assert!(status == 200 || status == 501, "{status} {body}");
    } else {
        assert_eq!(status, 200, "{body}");
    }
    if status == 200 {
        let c = body["sandbox_id"].as_str().expect("id").to_string();
        let c_ip = address(&server, &c, true).await;
        assert_eq!(
            probe(&server, &c, &[("tcp", a_ip.clone(), 8000)]).await,
            vec!["timeout"]
        );
        assert_eq!(
            probe(&server, &a, &[("tcp", c_ip, 8000)]).await,
            vec!["timeout"]
        );
    }

    // A sandbox of the other engine, when it runs here (CI runs both).
    let other = if options.backend == "podman" {
        "docker"
    } else {
        "podman"
    };
    let socket = if other == "podman" {
        "/run/podman/podman.sock"
    } else {
        "/var/run/docker.sock"
    };
    if !std::path::Path::new(socket).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs both engines, but {socket} is missing"
        );
        eprintln!("{other} is not running here: the cross-engine case is not checked");
        return;
    }
    let mut other_options = ServerOptions::new();
    other_options.backend = other.into();
    let _other_cleanup = OwnerCleanup(other_options.clone());
    let other_server = Server::start(other_options).await;
    let d = other_server.create_sandbox(json!({"timeout": 300})).await;
    let d_ip = address(&other_server, &d, true).await;
    assert_eq!(
        probe(&other_server, &d, &[("tcp", a_ip.clone(), 8000)]).await,
        vec!["timeout"],
        "{other} sandbox to a {} sandbox",
        options.backend
    );
    assert_eq!(
        probe(&server, &a, &[("tcp", d_ip.clone(), 8000)]).await,
        vec!["timeout"],
        "{} sandbox to a {other} sandbox",
        options.backend
    );
    // OwnerCleanup removes containers of this suite's engine only.
    let (code, _) = tests::json_of(other_server.delete(&format!("/sandboxes/{d}")).await).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn allowances_open_exactly_what_they_name() {
    let _serial = SERIAL.lock().await;
    let hosts = TestHosts::start();
    let (allowed, closed) = (free_port(), free_port());
    let host_listener = Listener::start(None, &[allowed, closed], &[]);
    let options = ServerOptions::new()
        .own_networks("allow")
        .env("COLIMA_E2B_NETWORK__ALLOW_PRIVATE", "[\"10.200.0.0/24\"]")
        .env(
            "COLIMA_E2B_NETWORK__ALLOW_HOST_PORTS",
            &format!("[{allowed}]"),
        );
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = server.create_sandbox(json!({"timeout": 300})).await;
    let gateway = sh(&server, &id, GATEWAY).await;
    let got = probe(
        &server,
        &id,
        &[
            ("tcp", testhosts::PRIVATE.to_string(), testhosts::TCP_PORT),
            ("tcp", testhosts::METADATA.to_string(), testhosts::TCP_PORT),
            ("tcp", gateway.clone(), allowed),
            ("tcp", gateway.clone(), closed),
        ],
    )
    .await;
    assert_eq!(got, vec!["open", "timeout", "open", "timeout"]);
    let arrivals = settle(|| hosts.arrivals(), 1).await;
    assert_eq!(
        arrived_at(&arrivals, "tcp", testhosts::PRIVATE, testhosts::TCP_PORT),
        1,
        "{arrivals:?}"
    );
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    let on_host = host_listener.arrivals();
    assert_eq!(on_host.len(), 1, "{on_host:?}");
    assert_eq!(
        (on_host[0].to.as_str(), on_host[0].port),
        (gateway.as_str(), allowed)
    );
}

#[tokio::test]
async fn the_rules_come_back_after_a_flush_outlive_the_server_and_stale_tables_go() {
    let _serial = SERIAL.lock().await;
    // A table of bridges that no longer exist, as a removed network leaves.
    let stale = "colima_e2b_00deadbeef";
    let _ = nft(&["delete", "table", "inet", stale]);
    let (made, _) = nft(&[
        "add",
        "table",
        "inet",
        stale,
        "{ comment \"colima-e2b sandbox networks: br-ce2b0gone00 br-ce2b0gone01\" ; }",
    ]);
    assert!(made, "could not make the stale table");
    let options = ServerOptions::new().own_networks("keep");
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let table = table_of(&server);
    assert!(
        nft(&["list", "table", "inet", &table]).0,
        "{table} is not installed"
    );
    assert!(
        !nft(&["list", "table", "inet", stale]).0,
        "the stale table is still there"
    );

    // Someone flushes it: the server installs it again (it checks every 30 s).
    let (deleted, _) = nft(&["delete", "table", "inet", &table]);
    assert!(deleted);
    let mut back = false;
    for _ in 0..90 {
        if nft(&["list", "table", "inet", &table]).0 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        back,
        "the server did not install {table} again: {}",
        server.log()
    );
    assert!(server.log().contains("installed again"), "{}", server.log());

    // A server that dies leaves the rules in place for the sandboxes that outlive it.
    let id = server.create_sandbox(json!({"timeout": 300})).await;
    server.kill9();
    assert!(
        nft(&["list", "table", "inet", &table]).0,
        "the rules went with the server"
    );
    let server = Server::start(options).await;
    assert_eq!(table_of(&server), table);
    let (status, v): (u16, Value) = server.run(&id, "echo back").await;
    assert_eq!(status, 200, "{v}");
}
