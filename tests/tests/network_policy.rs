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

/// One E2B control-plane call with the server's key: status and JSON answer.
async fn e2b(server: &Server, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let resp = server
        .http
        .request(method, server.url(&format!("/e2b{path}")))
        .header("X-API-KEY", server.api_key())
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// TCP connects from sandbox `id` to the two public test hosts.
async fn reach_public(server: &Server, id: &str) -> Vec<String> {
    let targets = [
        ("tcp", testhosts::PUBLIC.to_string(), testhosts::TCP_PORT),
        ("tcp", testhosts::PUBLIC_2.to_string(), testhosts::TCP_PORT),
    ];
    probe(server, id, &targets).await
}

/// Whether server `owner`'s egress table is installed.
fn egress_table_installed(owner: &str) -> bool {
    let (ok, ruleset) = nft(&["list", "ruleset"]);
    assert!(ok, "nft list ruleset");
    ruleset.contains(&format!(
        "egress rules of the sandboxes of server {owner}\""
    ))
}

#[tokio::test]
async fn e2b_egress_rules_decide_new_connections_are_replaced_whole_and_outlive_the_server() {
    let _serial = SERIAL.lock().await;
    let _hosts = TestHosts::start();
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    // (E2B's v1 create: a sandbox that is not `secure`, so the native API runs commands
    // in it without its access token.)
    let post = reqwest::Method::POST;
    let put = reqwest::Method::PUT;

    // allowOut wins over denyOut: the one address of the denied range stays reachable.
    let (status, created) = e2b(
        &server,
        post.clone(),
        "/sandboxes",
        json!({"templateID": "base", "timeout": 300, "network": {
            "allowOut": [testhosts::PUBLIC], "denyOut": ["198.51.100.0/24"]}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"]
        .as_str()
        .expect("sandboxID")
        .to_string();
    assert_eq!(created["trafficAccessToken"], Value::Null, "{created}");
    assert!(egress_table_installed(&options.owner));
    // Denied connections are reset at once, not left to time out.
    assert_eq!(reach_public(&server, &id).await, ["open", "refused"]);

    // update_network replaces the rules whole, for new connections.
    let path = format!("/sandboxes/{id}/network");
    let (status, v) = e2b(
        &server,
        put.clone(),
        &path,
        json!({"denyOut": ["0.0.0.0/0"]}),
    )
    .await;
    assert_eq!(status, 204, "{v}");
    assert_eq!(reach_public(&server, &id).await, ["refused", "refused"]);
    let (status, _) = e2b(&server, put.clone(), &path, json!({})).await;
    assert_eq!(status, 204);
    assert_eq!(reach_public(&server, &id).await, ["open", "open"]);
    // allow_internet_access false is denyOut everything; allowOut still allows.
    let (status, _) = e2b(
        &server,
        put.clone(),
        &path,
        json!({"allow_internet_access": false, "allowOut": [testhosts::PUBLIC_2]}),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(reach_public(&server, &id).await, ["refused", "open"]);
    // The native API reads the same rules.
    let (status, native) =
        tests::json_of(server.get(&format!("/sandboxes/{id}/network")).await).await;
    assert_eq!(status, 200, "{native}");
    assert_eq!(
        native["allow_out"],
        json!([testhosts::PUBLIC_2]),
        "{native}"
    );

    // A filesystem pause stops the container and gives its address back to the engine:
    // its rules leave the table, and come back with it at whatever address it gets.
    let (status, v) = e2b(
        &server,
        post.clone(),
        &format!("/sandboxes/{id}/pause"),
        json!({"memory": false}),
    )
    .await;
    assert_eq!(status, 204, "{v}");
    assert!(
        !egress_table_installed(&options.owner),
        "a stopped sandbox's address is still in the egress table"
    );
    let (status, v) = e2b(
        &server,
        post.clone(),
        &format!("/sandboxes/{id}/connect"),
        json!({"timeout": 300}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert!(egress_table_installed(&options.owner));
    assert_eq!(reach_public(&server, &id).await, ["refused", "open"]);

    // What the API refuses, and says why.
    for (body, want) in [
        (json!({"denyOut": ["example.com"]}), 400),
        (json!({"allowOut": ["not an address"]}), 400),
        (
            json!({"egressProxy": {"address": "198.51.100.10:1080"}}),
            501,
        ),
    ] {
        let (status, v) = e2b(&server, put.clone(), &path, body.clone()).await;
        assert_eq!(status, want, "{body}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // A refused update changed nothing.
    assert_eq!(reach_public(&server, &id).await, ["refused", "open"]);
    let (status, _) = e2b(
        &server,
        put.clone(),
        "/sandboxes/clm0000000000000000/network",
        json!({}),
    )
    .await;
    assert_eq!(status, 404);

    // A crash of the server neither opens nor loses the rules; the next start keeps them.
    server.kill9();
    assert!(egress_table_installed(&options.owner));
    let server = Server::start(options.clone()).await;
    assert_eq!(reach_public(&server, &id).await, ["refused", "open"]);

    // Internet off at create with an exception: only that address.
    let (status, created) = e2b(
        &server,
        post.clone(),
        "/sandboxes",
        json!({"templateID": "base", "timeout": 300, "allow_internet_access": false,
               "network": {"allowOut": [testhosts::PUBLIC]}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let other = created["sandboxID"]
        .as_str()
        .expect("sandboxID")
        .to_string();
    assert_eq!(reach_public(&server, &other).await, ["open", "refused"]);

    // No rules are left for removed sandboxes: the table goes with the last of them.
    for (n, sandbox) in [id, other].iter().enumerate() {
        let path = format!("/sandboxes/{sandbox}");
        let (status, _) = e2b(&server, reqwest::Method::DELETE, &path, json!({})).await;
        assert_eq!(status, 204);
        if n == 0 {
            assert!(egress_table_installed(&options.owner));
        }
    }
    let mut gone = false;
    for _ in 0..50 {
        if !egress_table_installed(&options.owner) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the egress table outlived its sandboxes");
}

/// Prints the Host header of every request, on port 8000.
const ECHO_HOST: &str = "nohup python3 -c '
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get(\"Host\") or \"\").encode()
        self.send_response(200); self.send_header(\"Content-Length\", str(len(body))); self.end_headers(); self.wfile.write(body)
http.server.HTTPServer((\"0.0.0.0\", 8000), H).serve_forever()
' >/dev/null 2>&1 & for i in $(seq 50); do curl -s -o /dev/null localhost:8000 && break; sleep 0.1; done; echo up";

#[tokio::test]
async fn public_traffic_off_needs_the_traffic_token_and_the_host_can_be_masked() {
    let _serial = SERIAL.lock().await;
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let (status, created) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 300, "network": {
            "allowPublicTraffic": false, "maskRequestHost": "${PORT}-app.internal"}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"]
        .as_str()
        .expect("sandboxID")
        .to_string();
    let token = created["trafficAccessToken"]
        .as_str()
        .unwrap_or_else(|| panic!("no traffic token: {created}"))
        .to_string();
    assert_eq!(sh(&server, &id, ECHO_HOST).await, "up");
    let get = |header: Option<&str>| {
        let mut rb = server
            .http
            .get(server.url("/"))
            .header("Host", format!("8000-{id}.localhost"));
        if let Some(t) = header {
            rb = rb.header("e2b-traffic-access-token", t);
        }
        rb.send()
    };
    let resp = get(None).await.expect("request");
    assert_eq!(resp.status(), 403);
    let resp = get(Some("wrong")).await.expect("request");
    assert_eq!(resp.status(), 403);
    let resp = get(Some(&token)).await.expect("request");
    assert_eq!(resp.status(), 200);
    // Inside, the request carries the masked Host.
    assert_eq!(resp.text().await.expect("body"), "8000-app.internal");
    // The agent's port checks its own token: the data plane needs no traffic token.
    let (status, v) = server.run(&id, "echo ok").await;
    assert_eq!((status, v["stdout"].as_str()), (200, Some("ok\n")), "{v}");
    // A sandbox that takes public traffic needs no token.
    let open = server.create_sandbox(json!({"timeout": 300})).await;
    assert_eq!(sh(&server, &open, ECHO_HOST).await, "up");
    let resp = server
        .http
        .get(server.url("/"))
        .header("Host", format!("8000-{open}.localhost"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

/// From inside a sandbox: for each `[kind, address, port, name]`, an HTTP GET with
/// `Host: name` ("http") or a TLS ClientHello naming `name` ("tls") sent to
/// `address:port`. Prints one JSON list: the first line the far end answered (the test
/// hosts answer "hello-from-test-host"; the egress proxy "HTTP/1.1 403 Forbidden"), or
/// "closed" / "refused" / "timeout" / the error.
const NAMED: &str = r#"
import json, socket, ssl, sys
out = []
for kind, addr, port, name in json.loads(sys.argv[1]):
    try:
        s = socket.create_connection((addr, port), timeout=5)
        if kind == "http":
            s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name).encode())
            line = s.makefile("rb").readline().decode(errors="replace").strip()
        else:
            ctx = ssl.create_default_context()
            tls = ctx.wrap_socket(s, server_hostname=name, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
                line = "handshake"
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                line = "closed"
            except ssl.SSLError as e:
                # The test host answers plain text: a handshake that got it was proxied.
                line = "not-tls" if "WRONG_VERSION" in str(e) or "record" in str(e).lower() else "ssl: %s" % e
            except (ConnectionResetError, BrokenPipeError):
                line = "closed"
            except socket.timeout:
                line = "timeout"
        out.append(line or "closed")
    except socket.timeout:
        out.append("timeout")
    except ConnectionRefusedError:
        out.append("refused")
    except OSError as e:
        out.append("error: %s" % e)
print(json.dumps(out))
"#;

async fn named(server: &Server, id: &str, targets: &[(&str, &str, u16, &str)]) -> Vec<String> {
    let list = serde_json::to_string(
        &targets
            .iter()
            .map(|(k, a, p, n)| json!([k, a, p, n]))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let cmd = format!("python3 -c '{}' '{}'", NAMED.replace('\'', "'\\''"), list);
    let out = sh(server, id, &cmd).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn host_names_in_allow_out_are_decided_by_sni_and_host_and_dialled_by_the_proxy() {
    use testhosts::{PUBLIC, PUBLIC_2};
    let _serial = SERIAL.lock().await;
    let hosts = TestHosts::start();
    let options = ServerOptions::new().env(
        "COLIMA_E2B_NETWORK__EGRESS_RESOLVERS",
        &format!("[\"{}\"]", testhosts::DNS),
    );
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    assert!(
        server.log().contains("egress proxy listening"),
        "{}",
        server.log()
    );
    let (status, created) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 300, "network": {
            "allowOut": ["allowed.ce2b.test", "*.wild.ce2b.test", "private.ce2b.test"],
            "denyOut": ["0.0.0.0/0"]}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"]
        .as_str()
        .expect("sandboxID")
        .to_string();
    const HELLO: &str = "hello-from-test-host";
    const REFUSED: &str = "HTTP/1.1 403 Forbidden";
    // Dialled at PUBLIC_2 (denied) with an allowed Host: the proxy dials the name
    // (PUBLIC), whatever address the sandbox used.
    let got = named(
        &server,
        &id,
        &[
            ("http", PUBLIC_2, 80, "allowed.ce2b.test"),
            ("http", PUBLIC_2, 80, "other.ce2b.test"),
            ("http", PUBLIC_2, 80, "a.b.wild.ce2b.test"),
            ("http", PUBLIC_2, 80, "wild.ce2b.test"),
            ("http", PUBLIC_2, 80, "private.ce2b.test"),
            ("http", PUBLIC_2, 80, "unknown.ce2b.test"),
            ("tls", PUBLIC_2, 443, "allowed.ce2b.test"),
            ("tls", PUBLIC_2, 443, "other.ce2b.test"),
        ],
    )
    .await;
    assert_eq!(got[0], HELLO, "an allowed Host: {got:?}");
    assert_eq!(got[1], REFUSED, "a Host not allowed: {got:?}");
    assert_eq!(got[2], HELLO, "below a wildcard: {got:?}");
    assert_eq!(got[3], REFUSED, "the wildcard's own name: {got:?}");
    assert_eq!(
        got[4], REFUSED,
        "an allowed name resolving to a private address: {got:?}"
    );
    assert_eq!(got[5], REFUSED, "a name that does not resolve: {got:?}");
    assert_eq!(
        got[6], "not-tls",
        "an allowed SNI reached the test host: {got:?}"
    );
    assert_eq!(got[7], "closed", "an SNI not allowed: {got:?}");
    // Everything that arrived came from this host (the proxy) to PUBLIC: the HTTP
    // requests for the allowed and wildcard names and the allowed ClientHello.
    let arrivals = settle(|| hosts.arrivals(), 3).await;
    assert_eq!(arrived_at(&arrivals, "tcp", PUBLIC, 80), 2, "{arrivals:?}");
    assert_eq!(arrived_at(&arrivals, "tcp", PUBLIC, 443), 1, "{arrivals:?}");
    assert_eq!(arrivals.len(), 3, "refused traffic arrived: {arrivals:?}");
    // Other ports follow the address rules only: denied.
    assert_eq!(reach_public(&server, &id).await, ["refused", "refused"]);

    // Replaced by address rules only: no proxy any more, the sandbox's own address goes.
    let path = format!("/sandboxes/{id}/network");
    let (status, v) = e2b(
        &server,
        reqwest::Method::PUT,
        &path,
        json!({"allowOut": [PUBLIC_2], "denyOut": ["0.0.0.0/0"]}),
    )
    .await;
    assert_eq!(status, 204, "{v}");
    let got = named(
        &server,
        &id,
        &[
            ("http", PUBLIC_2, 80, "other.ce2b.test"),
            ("http", PUBLIC, 80, "allowed.ce2b.test"),
        ],
    )
    .await;
    assert_eq!(got, [HELLO, "refused"]);
    let arrivals = settle(|| hosts.arrivals(), 4).await;
    assert_eq!(
        arrived_at(&arrivals, "tcp", PUBLIC_2, 80),
        1,
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn a_new_sandbox_drops_rules_a_gone_server_left_for_its_address() {
    let _serial = SERIAL.lock().await;
    let _hosts = TestHosts::start();
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let first = server.create_sandbox(json!({"timeout": 300})).await;
    let near = address(&server, &first, false).await;
    let prefix = near
        .rsplit_once('.')
        .map(|(p, _)| p.to_string())
        .expect("an IPv4 address");
    // What a server that crashed for good leaves when its sandboxes are then removed
    // behind its back: deny-everything rules for addresses the engine hands out again.
    let gone = "gone-server-of-a-test";
    let table = sandbox_core::network::egress_table::table_name(gone);
    let elements: Vec<String> = (2..255)
        .map(|n| format!("{prefix}.{n} : jump deny_all"))
        .collect();
    let script = format!(
        "table inet {table} {{\n  comment \"colima-e2b egress rules of the sandboxes of server {gone}\"\n  chain deny_all {{\n    meta l4proto tcp reject with tcp reset\n  }}\n  map sandboxes {{ type ipv4_addr : verdict; elements = {{ {} }}; }}\n  chain forward {{\n    type filter hook forward priority filter - 5; policy accept;\n    ip saddr vmap @sandboxes\n  }}\n}}\n",
        elements.join(", ")
    );
    let _gone_table = GoneTable(table.clone());
    let mut nft_f = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    nft_f
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write");
    assert!(nft_f.wait().expect("nft").success());
    // The sandbox that already had one of the addresses is caught by them (the hazard).
    assert_eq!(reach_public(&server, &first).await[0], "refused");
    // A server notes other servers' tables when it starts: the sandboxes it re-adopts
    // and those it creates take their addresses back.
    server.kill9();
    let server = Server::start(options.clone()).await;
    assert_eq!(reach_public(&server, &first).await[0], "open");
    let second = server.create_sandbox(json!({"timeout": 300})).await;
    let addr = address(&server, &second, false).await;
    assert!(
        addr.starts_with(&format!("{prefix}.")),
        "{addr} is not in {prefix}.0/24"
    );
    assert_eq!(reach_public(&server, &second).await[0], "open");
    let (ok, map) = nft(&["list", "map", "inet", &table, "sandboxes"]);
    assert!(ok, "the other server's table is still there");
    for a in [&near, &addr] {
        assert!(!map.contains(&format!("{a} :")), "{a} still in {map}");
    }
    assert_eq!(
        map.matches(" : jump deny_all").count(),
        253 - 2,
        "only those two go: {map}"
    );
}

/// Deletes a hand-made egress table when the test ends, however it ends.
struct GoneTable(String);

impl Drop for GoneTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}
