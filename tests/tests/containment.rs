//! Hostile code inside real sandboxes, through the real server: processes that try to
//! outlive their kill, fork bombs, files the sandbox user may not touch, oversized
//! uploads and listings, and readers that stop reading. Run on Docker and on Podman
//! (`COLIMA_E2B_TEST_BACKEND`).

use std::time::Duration;

use serde_json::{json, Value};
use tests::{json_of, OwnerCleanup, Server, ServerOptions};
use tokio::io::AsyncWriteExt;

async fn create(server: &Server, body: Value) -> String {
    server.create_sandbox(body).await
}

/// Runs `cmd` through the native API; returns the status and the answer.
async fn run(server: &Server, id: &str, cmd: &str) -> (u16, Value) {
    server.run(id, cmd).await
}

/// How many processes inside match `pattern` (a pgrep -f pattern written so that it does
/// not match the pgrep command line itself, e.g. `slee[p] 1001`).
async fn count(server: &Server, id: &str, pattern: &str) -> usize {
    let (status, out) = run(server, id, &format!("pgrep -f '{pattern}' | wc -l")).await;
    assert_eq!(status, 200, "{out}");
    out["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .expect("a count")
}

/// Polls until `count` of `pattern` is `want`, for at most `limit` (a bound on waiting).
async fn wait_count(server: &Server, id: &str, pattern: &str, want: usize, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let n = count(server, id, pattern).await;
        if n == want {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{n} processes match {pattern:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn background(server: &Server, id: &str, cmd: &str) -> u64 {
    server.background(id, cmd).await
}

#[tokio::test]
async fn killing_a_command_ends_everything_it_started_however_it_escaped() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    let pid = background(
        &server,
        &id,
        "env -i setsid sleep 1001 & (setsid sh -c 'exec sleep 1002' &); \
         nohup env -i sleep 1003 >/dev/null 2>&1 & exec sleep 1004",
    )
    .await;
    wait_count(&server, &id, "slee[p] 100[1-4]", 4, Duration::from_secs(20)).await;
    let resp = server
        .delete(&format!("/sandboxes/{id}/commands/{pid}"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    // SendSignal answers once the whole tree is gone.
    assert_eq!(count(&server, &id, "slee[p] 100[1-4]").await, 0);
}

#[tokio::test]
async fn a_daemon_left_by_a_finished_command_is_ended_by_killing_every_process() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let id = create(&server, json!({"timeout": 300})).await;
    let (status, out) = run(
        &server,
        &id,
        "(env -i setsid sleep 1011 >/dev/null 2>&1 &); (setsid sleep 1012 >/dev/null 2>&1 &); echo started",
    )
    .await;
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("started\n")),
        "{out}"
    );
    wait_count(&server, &id, "slee[p] 101[12]", 2, Duration::from_secs(20)).await;
    // The CLI: `colima-e2b sandbox kill-processes ID` against this server.
    let port = server
        .url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let cli = std::process::Command::new(tests::server_binary())
        .args(["sandbox", "--port", &port, "kill-processes", &id])
        .env("COLIMA_E2B_OWNER", &options.owner)
        .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
        .env_remove("COLIMA_E2B_CONFIG")
        .output()
        .expect("run the CLI");
    let said = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(said.starts_with("killed "), "{said}");
    assert_eq!(count(&server, &id, "slee[p] 101[12]").await, 0);
    // The sandbox itself runs on.
    let (status, out) = run(&server, &id, "echo alive").await;
    assert_eq!((status, out["stdout"].as_str()), (200, Some("alive\n")));
    // The native API's form of the same.
    background(&server, &id, "sleep 1013").await;
    let (status, body) = json_of(server.delete(&format!("/sandboxes/{id}/commands/")).await).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["killed"].as_u64().is_some_and(|n| n >= 1), "{body}");
    assert_eq!(count(&server, &id, "slee[p] 1013").await, 0);
}

#[tokio::test]
async fn a_fork_bomb_is_stopped_and_starting_at_the_process_limit_says_so() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    // A bomb that holds what it takes: every process forks for ever, so a pid that
    // frees up is taken again at once. (`b | b &` processes exit after forking, so their
    // number swings below the limit and a start can slip through between them.)
    let bomb = background(&server, &id, "b() { while :; do b & done; }; b").await;
    // Starting anything once the bomb holds every pid says which limit it met.
    let mut refused = None;
    for _ in 0..100 {
        let (status, body) = run(&server, &id, "true").await;
        if status == 429 {
            refused = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("the bomb never reached the process limit");
    assert_eq!(refused["code"], "resource_exhausted", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("process limit")),
        "{refused}"
    );
    let resp = server
        .delete(&format!("/sandboxes/{id}/commands/{bomb}"))
        .await;
    assert_eq!(resp.status().as_u16(), 200, "the bomb's kill");
    let mut ok = false;
    for _ in 0..50 {
        let (status, out) = run(&server, &id, "echo after").await;
        if status == 200 && out["stdout"] == "after\n" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the sandbox did not recover after the bomb was killed");
}

#[tokio::test]
async fn files_the_sandbox_user_may_not_touch_are_403() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    let (status, body) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/files/write"),
                json!({"path": "/root/x", "data": "x"}),
            )
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("permission_denied")),
        "{body}"
    );
    let (status, body) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/commands/run"),
                json!({"cmd": "echo s > /etc/root-only && chmod 600 /etc/root-only", "user": "root"}),
            )
            .await,
    )
    .await;
    assert_eq!(
        (status, body["exit_code"].as_i64()),
        (200, Some(0)),
        "{body}"
    );
    let (status, body) = json_of(
        server
            .get(&format!("/sandboxes/{id}/files/read?path=/etc/root-only"))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("permission_denied")),
        "{body}"
    );
    let resp = server
        .http
        .put(server.url(&format!("/sandboxes/{id}/files/raw?path=/root/y")))
        .body("y")
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 403);
}

#[tokio::test]
async fn an_upload_over_the_cap_is_413_and_leaves_the_old_file_as_it_was() {
    let options = ServerOptions::new().env("COLIMA_E2B_FILES__MAX_UPLOAD_MB", "1");
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    let path = format!("/sandboxes/{id}/files/raw?path=/home/user/data.bin");
    let resp = server
        .http
        .put(server.url(&path))
        .body("the old contents")
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = server
        .http
        .put(server.url(&path))
        .body(vec![b'n'; 3 << 20])
        .send()
        .await
        .expect("upload");
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 413, "{body}");
    let back = server.get(&path).await.bytes().await.expect("download");
    assert_eq!(&back[..], b"the old contents");
    let (_, out) = run(
        &server,
        &id,
        "ls -a /home/user | grep -c colima-e2b-upload; true",
    )
    .await;
    assert_eq!(
        out["stdout"], "0\n",
        "the partial upload was left behind: {out}"
    );
}

#[tokio::test]
async fn a_listing_too_large_for_an_answer_is_413_with_advice() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    let (status, out) = run(
        &server,
        &id,
        "mkdir -p /tmp/many && cd /tmp/many && python3 -c \"\nfor i in range(70000):\n    open('%s%06d' % ('n' * 200, i), 'w').close()\n\"",
    )
    .await;
    assert_eq!((status, out["exit_code"].as_i64()), (200, Some(0)), "{out}");
    let (status, body) = json_of(
        server
            .get(&format!("/sandboxes/{id}/files/list?path=/tmp/many"))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("smaller depth") || m.contains("deeper path")),
        "{body}"
    );
}

/// A WebSocket client of the command stream that completes the handshake, then never
/// reads: a tiny receive buffer makes the server's writes stall at once.
async fn stalled_websocket(server: &Server, path: &str) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("handshake");
    stream
}

/// `colima_e2b_websockets_open` from `/metrics`.
async fn websockets_open(server: &Server) -> f64 {
    let text = server
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("colima_e2b_websockets_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn readers_that_stop_reading_never_slow_the_command_or_the_other_readers() {
    let options = ServerOptions::new().env("COLIMA_E2B_STALL_TIMEOUT", "3");
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = create(&server, json!({"timeout": 300})).await;
    // Waits for a file so that every reader is connected before the output starts.
    let pid = background(
        &server,
        &id,
        "while [ ! -e /tmp/go ]; do sleep 0.1; done; \
         for i in $(seq 1 2000); do head -c 10000 /dev/zero | tr '\\0' x; echo; done; echo finished",
    )
    .await;
    let stream = format!("/sandboxes/{id}/commands/stream/{pid}");
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(stalled_websocket(&server, &stream).await);
    }
    // E2B's data plane too: Connect streams through the proxy that are never read.
    let key = server.api_key();
    for _ in 0..5 {
        let addr: std::net::SocketAddr = server
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("addr");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut s = socket.connect(addr).await.expect("connect");
        let body = format!("{{\"process\":{{\"pid\":{pid}}}}}");
        let mut envelope = vec![0u8];
        envelope.extend_from_slice(&(body.len() as u32).to_be_bytes());
        envelope.extend_from_slice(body.as_bytes());
        let head = format!(
            "POST /e2b/envd/process.Process/Connect HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/connect+json\r\nE2b-Sandbox-Id: {id}\r\n\
             X-API-KEY: {key}\r\nContent-Length: {}\r\n\r\n",
            envelope.len()
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&envelope).await.expect("body");
        stalled.push(s);
    }
    let rss_before = server.rss().unwrap_or(0);
    // One reader that reads: the seed's Python client, counting what arrives.
    let url = format!("{}{stream}", server.url.replace("http://", "ws://"));
    let reader = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import json, websocket\nws = websocket.create_connection('{url}')\nn = 0\n\
                 while True:\n    d = json.loads(ws.recv())\n    if d['type'] == 'stdout': n += d['data'].count('x')\n\
                 \n    elif d['type'] in ('exit', 'error'):\n        print(n, d.get('code'), d.get('message'))\n        break\n"
            ))
            .output()
            .expect("python")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, out) = run(&server, &id, "touch /tmp/go").await;
    assert_eq!(status, 200, "{out}");
    let done = reader.await.expect("reader");
    let said = String::from_utf8_lossy(&done.stdout).trim().to_string();
    assert_eq!(
        said,
        "20000000 0 None",
        "the reading client got everything and the exit ({})",
        String::from_utf8_lossy(&done.stderr)
    );
    let rss_peak = server.rss().unwrap_or(0);
    eprintln!(
        "server RSS with 25 stalled readers: {} KiB before, {} KiB after 20 MB of output",
        rss_before >> 10,
        rss_peak >> 10
    );
    assert!(
        rss_peak < rss_before + (64 << 20),
        "the server's memory grew by {} KiB",
        (rss_peak - rss_before) >> 10
    );
    // The stalled clients are dropped after the stall timeout (3 s here).
    let start = std::time::Instant::now();
    while websockets_open(&server).await != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stalled WebSocket clients were never dropped"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(stalled);
}
