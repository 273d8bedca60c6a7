//! The perimeter against the real server on a real engine: who may drive sandboxes,
//! from where (sandboxes included), disk quotas, limits, paused sandboxes and creates cut
//! short by a crash. Run on Docker and on Podman (`COLIMA_E2B_TEST_BACKEND`).

use std::time::Duration;

use serde_json::{json, Value};
use tests::{engine_command, json_of, OwnerCleanup, Server, ServerOptions};

async fn create(server: &Server, body: Value) -> String {
    server.create_sandbox(body).await
}

/// Runs `cmd` in the sandbox through the native API; returns (exit code, stdout, stderr).
async fn run(server: &Server, id: &str, cmd: &str) -> (i64, String, String) {
    let (status, body) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/commands/run"),
                json!({"cmd": cmd, "timeout": 120}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "run {cmd:?}: {body}");
    (
        body["exit_code"].as_i64().unwrap_or(-100),
        body["stdout"].as_str().unwrap_or_default().to_string(),
        body["stderr"].as_str().unwrap_or_default().to_string(),
    )
}

/// Python that sets `gw` to the sandbox's default gateway (the host's bridge address).
const GATEWAY_PY: &str = "gw = None
for line in open('/proc/net/route').read().splitlines()[1:]:
    f = line.split()
    if f[1] == '00000000':
        gw = socket.inet_ntoa(struct.pack('<L', int(f[2], 16)))";

/// Asks, from inside sandbox `id`, for each `(method, path, key)` at the server's port
/// on the sandbox's gateway (the host's bridge address); returns the gateway and the
/// statuses (0 when no answer).
async fn from_inside(
    server: &Server,
    id: &str,
    port: u16,
    asks: &[(&str, &str, Option<&str>)],
) -> (String, Vec<u16>) {
    let asks_json = serde_json::to_string(
        &asks
            .iter()
            .map(|(m, p, k)| json!([m, p, k]))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let script = format!(
        r#"python3 - <<'EOF'
import json, socket, struct, urllib.request, urllib.error
{GATEWAY_PY}
print(gw)
for method, path, key in json.loads('''{asks_json}'''):
    headers = {{'Content-Type': 'application/json'}}
    if key:
        headers['Authorization'] = 'Bearer ' + key
    req = urllib.request.Request('http://%s:{port}%s' % (gw, path), data=b'{{}}' if method == 'POST' else None, method=method, headers=headers)
    try:
        print(urllib.request.urlopen(req, timeout=10).status)
    except urllib.error.HTTPError as e:
        print(e.code)
    except Exception as e:
        print(0)
EOF"#
    );
    let (code, out, err) = run(server, id, &script).await;
    assert_eq!(code, 0, "probe failed: {out} {err}");
    let mut lines = out.lines();
    let gateway = lines.next().unwrap_or_default().to_string();
    let statuses = lines.map(|l| l.trim().parse().unwrap_or(0)).collect();
    (gateway, statuses)
}

#[tokio::test]
async fn a_server_beyond_loopback_wants_a_key_from_sandboxes_and_other_hosts() {
    // Behind the firewall: see key_guessing_from_a_sandbox_is_limited_with_retry_after.
    let mut options = ServerOptions::new()
        .own_networks("open")
        .env("COLIMA_E2B_NETWORK__FIREWALL", "off");
    // The seed's own command line: `colima-e2b server --host 0.0.0.0 --port <p>`.
    options.args = vec!["--host".into(), "0.0.0.0".into()];
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let key = server.api_key();
    assert!(
        server.log().contains("needs an API key"),
        "no warning about the exposure: {}",
        server.log()
    );
    // This machine's loopback is still local development.
    let id = create(&server, json!({"timeout": 300})).await;
    let port = server.port();
    let (gateway, statuses) = from_inside(
        &server,
        &id,
        port,
        &[
            ("POST", "/sandboxes/", None),
            ("GET", "/health", None),
            ("GET", "/metrics", None),
            ("POST", "/e2b/sandboxes", None),
            (
                "POST",
                "/sandboxes/",
                Some("e2b_0000000000000000000000000000000000000000"),
            ),
            ("GET", "/sandboxes/", Some(&key)),
        ],
    )
    .await;
    assert_eq!(
        statuses,
        vec![401, 401, 401, 401, 401, 200],
        "a sandbox reaching the server through {gateway}"
    );
    // Another host (here: this machine through its bridge address, not loopback).
    let http = reqwest::Client::new();
    let url = format!("http://{gateway}:{port}/sandboxes/");
    let anon = http.get(&url).send().await.expect("request");
    assert_eq!(anon.status().as_u16(), 401);
    // A WebSocket upgrade is refused before the 101.
    let upgrade = http
        .get(format!(
            "http://{gateway}:{port}/sandboxes/{id}/commands/stream/1"
        ))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("upgrade");
    assert_eq!(upgrade.status().as_u16(), 401);
    let keyed = http
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(keyed.status().as_u16(), 200);
    let listed: Value = keyed.json().await.expect("json");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "nothing was created from inside"
    );
}

#[tokio::test]
async fn key_guessing_from_a_sandbox_is_limited_with_retry_after() {
    // The perimeter behind the firewall: with the firewall on, no sandbox reaches the
    // server at all (tests/tests/network_policy.rs); these sandboxes get networks
    // without it, as where an operator turned it off or allowed the server's port.
    let mut options = ServerOptions::new()
        .own_networks("open")
        .env("COLIMA_E2B_NETWORK__FIREWALL", "off");
    options.args = vec!["--host".into(), "0.0.0.0".into()];
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    let port = server.port();
    let script = format!(
        r#"python3 - <<'EOF'
import socket, struct, time, urllib.request, urllib.error
{GATEWAY_PY}
statuses, first, retry = [], None, None
t0 = time.monotonic()
for i in range(100):
    req = urllib.request.Request('http://%s:{port}/sandboxes/' % gw, headers={{'Authorization': 'Bearer e2b_guess%040d' % i}})
    try:
        statuses.append(urllib.request.urlopen(req, timeout=10).status)
    except urllib.error.HTTPError as e:
        statuses.append(e.code)
        if e.code == 429 and first is None:
            first, retry = time.monotonic() - t0, e.headers.get('Retry-After')
print(' '.join(map(str, statuses)))
print('%.1f' % ((first or 0) * 1000), retry)
EOF"#
    );
    let (code, out, err) = run(&server, &id, &script).await;
    assert_eq!(code, 0, "{out}{err}");
    let mut lines = out.lines();
    let statuses: Vec<u16> = lines
        .next()
        .unwrap_or_default()
        .split(' ')
        .filter_map(|s| s.parse().ok())
        .collect();
    let (first_ms, retry) = lines
        .next()
        .and_then(|l| l.split_once(' '))
        .unwrap_or_default();
    let unauthorized = statuses.iter().take_while(|s| **s == 401).count();
    eprintln!(
        "from a sandbox: {unauthorized} x 401, then 429 after {first_ms} ms (Retry-After {retry})"
    );
    assert_eq!(statuses.len(), 100, "{out}");
    assert!(
        (1..=11).contains(&unauthorized),
        "wrong keys answered 401 before the limit: {statuses:?}"
    );
    assert!(
        statuses[unauthorized..].iter().all(|s| *s == 429),
        "{statuses:?}"
    );
    assert!(
        retry.parse::<u64>().is_ok_and(|r| r >= 1),
        "Retry-After {retry:?}"
    );
    // The limit is the guesser's: the server's own loopback client is not held back.
    let (status, _) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn auth_off_beyond_loopback_refuses_to_start_and_says_why() {
    let mut options = ServerOptions::new().env("COLIMA_E2B_AUTH__MODE", "off");
    options.args = vec!["--host".into(), "0.0.0.0".into()];
    let _cleanup = OwnerCleanup(options.clone());
    let (status, stderr) = options.run_to_exit(Duration::from_secs(30));
    assert!(!status.success(), "it started: {stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "no fix named: {stderr}");
}

#[tokio::test]
async fn sandboxes_created_secure_are_driven_only_with_a_key_or_their_token() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let key = server.api_key();
    let (status, created) = json_of(
        server
            .http
            .post(server.url("/e2b/v2/sandboxes"))
            .header("x-api-key", &key)
            .json(&json!({"templateID": "base", "timeout": 300, "secure": true}))
            .send()
            .await
            .expect("create"),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().expect("id").to_string();
    let token = created["envdAccessToken"]
        .as_str()
        .expect("token")
        .to_string();
    let run_path = server.url(&format!("/sandboxes/{id}/commands/run"));
    let body = json!({"cmd": "id -un"});
    // Loopback, but no credential: refused on every plane, the id spelled any way.
    let encoded = format!("%{:02X}{}", id.as_bytes()[0], &id[1..]);
    for path in [
        run_path.clone(),
        server.url(&format!("/sandboxes/{encoded}/commands/run")),
    ] {
        let resp = server
            .http
            .post(&path)
            .json(&body)
            .send()
            .await
            .expect("run");
        assert_eq!(resp.status().as_u16(), 401, "{path}");
    }
    let resp = server
        .http
        .post(server.url("/e2b/envd/process.Process/List"))
        .header("e2b-sandbox-id", &id)
        .json(&json!({}))
        .send()
        .await
        .expect("list");
    let (status, body) = json_of(resp).await;
    assert_eq!((status, body["code"].as_u64()), (401, Some(401)), "{body}");
    let resp = server
        .http
        .post(&run_path)
        .header("x-access-token", "0".repeat(32))
        .json(&body)
        .send()
        .await
        .expect("run");
    assert_eq!(resp.status().as_u16(), 401, "a wrong token");
    // Its token or a key drive it.
    for auth in [
        ("x-access-token", token.clone()),
        ("authorization", format!("Bearer {key}")),
    ] {
        let (status, out) = json_of(
            server
                .http
                .post(&run_path)
                .header(auth.0, &auth.1)
                .json(&json!({"cmd": "id -un"}))
                .send()
                .await
                .expect("run"),
        )
        .await;
        assert_eq!(
            (status, out["stdout"].as_str()),
            (200, Some("user\n")),
            "{out}"
        );
    }
    let resp = server
        .http
        .post(server.url("/e2b/envd/process.Process/List"))
        .header("e2b-sandbox-id", &id)
        .header("x-access-token", &token)
        .json(&json!({}))
        .send()
        .await
        .expect("list");
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn pages_of_other_sites_are_refused_before_any_work() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    // DNS rebinding: a name that resolves to 127.0.0.1 but is not the server's.
    let resp = server
        .http
        .post(server.url("/sandboxes/"))
        .header("host", "rebind.attacker.example")
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 421);
    // A cross-site POST from a page in the user's browser.
    let resp = server
        .http
        .post(server.url("/sandboxes/"))
        .header("origin", "https://attacker.example")
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden_origin")),
        "{body}"
    );
    // A page served by a sandbox (its code is untrusted) calling the API from the
    // user's browser, where loopback needs no key.
    let port = server.port();
    let resp = server
        .http
        .post(server.url("/sandboxes/"))
        .header("host", format!("localhost:{port}"))
        .header(
            "origin",
            format!("http://3000-clmsomesandbox.localhost:{port}"),
        )
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 403);
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(listed, json!([]), "nothing was created");
}

#[tokio::test]
async fn absurd_resources_are_422_naming_the_limit() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    for (body, names) in [
        (json!({"cpus": 64}), "max_cpus"),
        (json!({"memory_mb": 100_000_000}), "memory_mb"),
        (json!({"disk_mb": 1_000_000}), "max_disk_mb"),
        (json!({"disk_mb": 100}), "too small"),
    ] {
        let (status, answer) = json_of(server.post("/sandboxes/", body.clone()).await).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains(names)),
            "{body}: {answer}"
        );
    }
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(listed, json!([]));
}

#[tokio::test]
async fn a_command_for_a_paused_sandbox_is_409_at_once() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let key = server.api_key();
    let id = create(&server, json!({"timeout": 300})).await;
    let resp = server
        .http
        .post(server.url(&format!("/e2b/sandboxes/{id}/pause")))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("pause");
    assert_eq!(resp.status().as_u16(), 204);
    // A hang would hit the client's timeout; the answer must come first.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let resp = quick
        .post(server.url(&format!("/sandboxes/{id}/commands/run")))
        .json(&json!({"cmd": "echo hi"}))
        .send()
        .await
        .expect("an answer, not a hang");
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let resp = quick
        .post(server.url("/e2b/envd/process.Process/List"))
        .header("e2b-sandbox-id", &id)
        .json(&json!({}))
        .send()
        .await
        .expect("an answer, not a hang");
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not found")),
        "E2B's SDK reads this as a sandbox that is not running: {body}"
    );
}

/// Free blocks and inodes of the filesystem holding `path`, via `df` (no unsafe here).
fn free_space(path: &str) -> (u64, u64) {
    let out = std::process::Command::new("df")
        .args(["--output=avail,iavail", "-B1", path])
        .output()
        .expect("df");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut nums = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse::<u64>().ok());
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

#[tokio::test]
async fn a_full_disk_stops_writes_inside_answers_507_and_leaves_the_host_alone() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    // The quota counts the image on btrfs storage: ask for the image plus 96 MiB.
    let (status, small) = json_of(server.post("/sandboxes/", json!({"disk_mb": 64})).await).await;
    assert_eq!(status, 422, "{small}");
    let image_mb: u64 = small["message"]
        .as_str()
        .and_then(|m| m.split("takes ").nth(1))
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the answer names the image size");
    let quota = image_mb + 96;
    let id = create(&server, json!({"disk_mb": quota, "timeout": 300})).await;
    let (_, host_inodes) = free_space("/");
    // File after file until the quota stops it.
    // (Past the image too: on XFS and btrfs simple quotas only writes count.)
    let script = format!(
        "for i in $(seq 1 {}); do dd if=/dev/zero of=/tmp/f$i bs=1M count=8 2>/dev/null || {{ echo stopped at $i; break; }}; done; \
         python3 -c \"\nimport os\nn=0\ntry:\n    while n < 300000:\n        open('/tmp/e%d' % n, 'w').close(); n += 1\nexcept OSError as e:\n    print('files stopped', e.errno)\n\"",
        (quota + 64) / 8
    );
    let (code, out, err) = run(&server, &id, &script).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.contains("stopped at"),
        "the quota did not stop the writes: {out}"
    );
    assert!(
        out.contains("files stopped 122") || out.contains("files stopped 28"),
        "empty files were not stopped by the quota (EDQUOT/ENOSPC): {out}"
    );
    // The file API says the disk is full.
    let resp = server
        .http
        .put(server.url(&format!("/sandboxes/{id}/files/raw?path=/tmp/big")))
        .body(vec![0u8; 16 << 20])
        .send()
        .await
        .expect("upload");
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{body}"
    );
    let (status, body) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/files/write"),
                json!({"path": "/tmp/more", "data": "x".repeat(1 << 19)}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 507, "{body}");
    // What the sandbox holds, which is what the host pays for it: up to the quota, not
    // the 64 MiB past it the loop tried (and at least the 96 MiB past the image that any
    // quota mode leaves). (Not the host's free space: the engine's storage
    // is a sparse file on the host here, which also grows and shrinks with whatever the
    // engine rewrites or frees meanwhile, such as other suites' removed containers.)
    let (code, held, err) = run(&server, &id, "du -sb /tmp | cut -f1").await;
    assert_eq!(code, 0, "{err}");
    let held: u64 = held.trim().parse().expect("du's byte count");
    assert!(
        held < (quota + 16) << 20 && held > 64 << 20,
        "the sandbox holds {held} bytes for a quota of {quota} MiB"
    );
    // And no inodes of the host's root filesystem.
    let (_, host_inodes_after) = free_space("/");
    assert!(
        host_inodes.saturating_sub(host_inodes_after) < 1000,
        "the host lost {} inodes",
        host_inodes.saturating_sub(host_inodes_after)
    );
}

#[tokio::test]
async fn creates_cut_short_by_a_crash_leave_nothing_after_the_restart() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let url = server.url("/sandboxes/");
    let creates: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&json!({"timeout": 600, "cpus": 0.05}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Kill the server as soon as the first container exists: every create is then
    // still starting its sandbox (the agent at a twentieth of a core takes a while).
    let owner_filter = format!("label=dev.colima-e2b.owner={}", options.owner);
    let mut seen = false;
    for _ in 0..300 {
        let out = engine_command()
            .args(["ps", "-aq", "--filter", &owner_filter])
            .output()
            .expect("engine CLI");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    assert!(seen, "no create reached the engine");
    let mut answered = 0;
    for c in creates {
        if matches!(c.await, Ok(Ok(200))) {
            answered += 1;
        }
    }
    let server = Server::start(options.clone()).await;
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(answered),
        "only creates that were answered survive: {listed}"
    );
    // The engine may finish a create it was asked for before the crash only now: the
    // restarted server keeps looking for those for a while.
    let start = std::time::Instant::now();
    loop {
        let out = engine_command()
            .args(["ps", "-aq", "--filter", &owner_filter])
            .output()
            .expect("engine CLI");
        let left = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .count();
        if left == answered {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "containers left running: {left}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The restart found the creates that never finished and removed their containers,
    // at recovery or when the engine brought them into being later.
    let log = server.log();
    let at_recovery: usize = log
        .split("unfinished=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no recovery report: {log}"));
    let later = log
        .matches("removed a sandbox whose create never finished")
        .count();
    assert!(at_recovery + later >= 1, "nothing was unfinished: {log}");
}

#[tokio::test]
async fn doctor_explains_the_deployment_and_fails_when_the_engine_is_away() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let doctor = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(tests::server_binary());
        cmd.args(["doctor", "--backend", &options.backend])
            .env("COLIMA_E2B_OWNER", &options.owner)
            .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
            .env_remove("COLIMA_E2B_CONFIG");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("run doctor")
    };
    let healthy = doctor(&[]);
    let said = String::from_utf8_lossy(&healthy.stdout);
    assert!(healthy.status.success(), "{said}");
    for name in [
        "engine",
        "auth",
        "disk_quota",
        "isolation",
        "cgroups",
        "template:base",
        "state_dir",
        "agent",
    ] {
        assert!(
            said.contains(&format!("] {name}: ")),
            "no {name} check: {said}"
        );
    }
    assert!(said.contains("0 failed"), "{said}");
    // The engine away: a failing check, its fix, and exit status 1.
    let away = doctor(&[
        ("DOCKER_HOST", "unix:///nonexistent/colima-e2b.sock"),
        ("CONTAINER_HOST", "unix:///nonexistent/colima-e2b.sock"),
    ]);
    let said = String::from_utf8_lossy(&away.stdout);
    assert_eq!(away.status.code(), Some(1), "{said}");
    assert!(said.contains("[FAIL] engine:"), "{said}");
    assert!(said.contains("fix: "), "{said}");
}

/// A WebSocket upgrade of `path` with these extra headers; the answer's status and its
/// chosen subprotocol.
async fn upgrade(
    server: &Server,
    path: &str,
    headers: &[(&'static str, String)],
) -> (u16, Option<String>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}{path}", server.url.replacen("http", "ws", 1));
    let mut req = url.as_str().into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, v.parse().expect("header value"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_ws, resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        ),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (resp.status().as_u16(), None),
        Err(e) => panic!("upgrade {path}: {e}"),
    }
}

#[tokio::test]
async fn the_dashboard_is_public_but_what_it_shows_and_its_terminal_need_the_key() {
    use base64::Engine;
    let options = ServerOptions::new().env("COLIMA_E2B_AUTH__MODE", "required");
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let key = server.api_key();
    // The page and its files: anyone, with a policy that keeps them to their own origin.
    for file in ["/ui", "/ui/app.js", "/ui/xterm.js"] {
        let resp = server.get(file).await;
        assert_eq!(resp.status().as_u16(), 200, "{file}");
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
    }
    for file in [
        "/ui/package.json",
        "/ui/..%2F..%2FCargo.toml",
        "/ui/node_modules",
    ] {
        let (status, body) = json_of(server.get(file).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("not_found")),
            "{file}: {body}"
        );
    }
    assert_eq!(
        server.post("/ui", json!({})).await.status().as_u16(),
        401,
        "only reading is public"
    );
    let (status, _) = json_of(server.get("/sandboxes").await).await;
    assert_eq!(status, 401, "the data is not");

    let id = {
        let resp = server
            .http
            .post(server.url("/sandboxes"))
            .bearer_auth(&key)
            .json(&json!({"template": "base"}))
            .send()
            .await
            .expect("create");
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 200, "{body}");
        body["sandbox_id"].as_str().expect("id").to_string()
    };
    let path = format!("/sandboxes/{id}/terminal");
    let offer = |k: &str| {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k);
        (
            "sec-websocket-protocol",
            format!("colima-e2b, bearer.{b64}"),
        )
    };
    assert_eq!(upgrade(&server, &path, &[]).await.0, 401, "no key");
    assert_eq!(
        upgrade(&server, &path, &[offer("e2b_wrong")]).await.0,
        401,
        "a wrong key"
    );
    assert_eq!(
        upgrade(&server, &path, &[offer(&key)]).await,
        (101, Some("colima-e2b".to_string())),
        "the key as a subprotocol, and the server names the one it speaks"
    );
    let foreign = ("origin", "https://attacker.example".to_string());
    assert_eq!(
        upgrade(&server, &path, &[offer(&key), foreign]).await.0,
        403,
        "another site's page, even with the key"
    );
}
