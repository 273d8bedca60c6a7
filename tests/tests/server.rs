//! The real server binary against a real engine: health, metrics, the sandbox lifecycle,
//! re-adoption after a crash, expiry, admission limits and engine failures.

use std::time::Duration;

use serde_json::{json, Value};
use tests::{container_state, remove_owner_containers, OwnerCleanup, Server, ServerOptions};

async fn create(server: &Server, body: Value) -> Value {
    let resp = server.post("/sandboxes/", body).await;
    let status = resp.status();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "create failed: {body}");
    body
}

fn id_of(v: &Value) -> String {
    v["sandbox_id"].as_str().expect("sandbox_id").to_string()
}

/// Polls `f` until it is true, for at most `limit` (a bound on waiting, not a timing claim).
async fn eventually<F: FnMut() -> bool>(limit: Duration, mut f: F) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f()
}

#[tokio::test]
async fn health_reports_the_backend_and_engine_version() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let resp = server.get("/health").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["backend"], tests::engine_cli());
    assert_eq!(body["engine"]["reachable"], true);
    assert!(!body["engine"]["version"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
}

#[tokio::test]
async fn metrics_are_prometheus_text_labelled_by_operation() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    server.get("/health").await;
    server.get("/sandboxes/clmnosuchsandbox").await;
    server.get("/no/such/route/12345").await;
    let resp = server.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("text");
    assert!(
        text.contains(
            r#"colima_e2b_http_requests_total{operation="health",method="GET",status="200"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"operation="get_sandbox",method="GET",status="404""#),
        "{text}"
    );
    assert!(!text.contains("12345"), "a raw path leaked into a label");
    assert!(text.contains(r#"colima_e2b_info{backend=""#), "{text}");
    assert!(
        text.contains("colima_e2b_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn seed_example_creates_lists_gets_and_kills_a_sandbox() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let created = create(
        &server,
        json!({"template": "python", "timeout": 600, "envs": {"DEBUG": "1"}, "metadata": {"purpose": "test"}}),
    )
    .await;
    let id = id_of(&created);
    assert!(
        id.starts_with("clm")
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert_eq!(created["template_id"], "python");
    assert_eq!(created["state"], "running");
    assert_eq!(created["metadata"]["purpose"], "test");
    assert!(created["started_at"].as_str().is_some());
    assert_eq!(container_state(&id).as_deref(), Some("running"));

    let listed: Value = server.get("/sandboxes/").await.json().await.expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let filtered: Value = server
        .get("/sandboxes/?metadata=purpose%3Dtest")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(filtered.as_array().map(Vec::len), Some(1));
    let none: Value = server
        .get("/sandboxes/?metadata=purpose%3Dother")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(none.as_array().map(Vec::len), Some(0));

    let got = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(got.status(), 200);
    let resp = server
        .post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 30}))
        .await;
    assert_eq!(resp.status(), 200);

    let killed = server.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(killed.status(), 200);
    // Killed at once; its container is deleted in the background.
    let state = container_state(&id);
    assert!(
        matches!(state.as_deref(), None | Some("exited") | Some("removing")),
        "container still {state:?} after kill"
    );
    let gone = eventually(Duration::from_secs(60), || container_state(&id).is_none()).await;
    assert!(gone, "container still exists a minute after kill");
    let gone = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().await.expect("json");
    assert_eq!(body["code"], "not_found");
    assert!(body["message"].as_str().unwrap_or_default().contains(&id));
}

#[tokio::test]
async fn client_mistakes_get_json_errors() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .header("content-type", "application/json")
                .body("{bad"),
            422,
        ),
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .json(&json!({"template": "nope"})),
            422,
        ),
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .json(&json!({"timeout": 0})),
            422,
        ),
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .json(&json!({"timeout": -5})),
            422,
        ),
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .json(&json!({"timeout": 1e30})),
            422,
        ),
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .json(&json!({"envs": {"A B": "x"}})),
            422,
        ),
        (
            server
                .http
                .post(server.url("/sandboxes/"))
                .json(&json!({"template": "x".repeat(2 << 20)})),
            413,
        ),
        (server.http.get(server.url("/sandboxes/clmnope")), 404),
        (server.http.get(server.url("/sandboxes/NOT_AN_ID")), 404),
        (server.http.delete(server.url("/sandboxes/clmnope")), 404),
        (
            server
                .http
                .post(server.url("/sandboxes/clmnope/timeout"))
                .json(&json!({"timeout": 5})),
            404,
        ),
        (server.http.get(server.url("/no-such-route")), 404),
        (server.http.put(server.url("/health")), 405),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("case {i}: body is not JSON: {e}"));
        assert_eq!(status, want, "case {i}: {body}");
        assert!(
            body["code"].is_string() && body["message"].is_string(),
            "case {i}: {body}"
        );
    }
    let listed: Value = server.get("/sandboxes/").await.json().await.expect("json");
    assert_eq!(listed, json!([]), "a failed request created a sandbox");
}

#[tokio::test]
async fn sandbox_survives_sigkill_and_is_readopted_with_its_deadline() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let created = create(
        &server,
        json!({"template": "base", "timeout": 600, "metadata": {"k": "v"}}),
    )
    .await;
    let id = id_of(&created);
    let updated: Value = server
        .post(
            &format!("/sandboxes/{id}/timeout"),
            json!({"timeout": 1200}),
        )
        .await
        .json()
        .await
        .expect("json");
    server.kill9();
    assert_eq!(
        container_state(&id).as_deref(),
        Some("running"),
        "sandbox died with the server"
    );

    let server = Server::start(options).await;
    let got = server.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(got.status(), 200, "not re-adopted");
    let got: Value = got.json().await.expect("json");
    assert_eq!(
        got["end_at"], updated["end_at"],
        "deadline changed across the restart"
    );
    assert_eq!(got["metadata"]["k"], "v");
    assert!(server.log().contains("adopted=1"), "{}", server.log());
    assert_eq!(
        server.delete(&format!("/sandboxes/{id}")).await.status(),
        200
    );
    // Killed at once, deleted in the background.
    let gone = eventually(Duration::from_secs(60), || container_state(&id).is_none()).await;
    assert!(gone, "the killed sandbox's container is still there");
}

#[tokio::test]
async fn reaper_removes_an_expired_sandbox() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = id_of(&create(&server, json!({"template": "base", "timeout": 1})).await);
    let removed = eventually(Duration::from_secs(30), || container_state(&id).is_none()).await;
    assert!(removed, "expired sandbox still exists");
    assert_eq!(server.get(&format!("/sandboxes/{id}")).await.status(), 404);
    let metrics = server.get("/metrics").await.text().await.expect("text");
    assert!(
        metrics.contains("colima_e2b_sandbox_expiries_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sandbox_that_expired_while_the_server_was_down_is_removed_on_start() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let id = id_of(&create(&server, json!({"template": "base", "timeout": 2})).await);
    server.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(container_state(&id).as_deref(), Some("running"));
    let server = Server::start(options).await;
    // Recovery runs before the server listens, so the container is already gone.
    assert_eq!(container_state(&id), None, "{}", server.log());
    assert!(server.log().contains("expired=1"), "{}", server.log());
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_leaves_sandboxes_running() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options).await;
    let id = id_of(&create(&server, json!({"template": "base", "timeout": 600})).await);
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    assert_eq!(container_state(&id).as_deref(), Some("running"));
}

#[tokio::test]
async fn creates_beyond_the_queue_get_429_and_leave_nothing_half_created() {
    // One runs, one waits for its turn, two find the queue full.
    let options = ServerOptions::new()
        .env("COLIMA_E2B_MAX_CONCURRENT_CREATES", "1")
        .env("COLIMA_E2B_MAX_QUEUED_CREATES", "1");
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let requests =
        (0..4).map(|_| server.post("/sandboxes/", json!({"template": "base", "timeout": 60})));
    let responses = futures_util::future::join_all(requests).await;
    let mut created = Vec::new();
    let mut refused = 0;
    for resp in responses {
        match resp.status().as_u16() {
            200 => created.push(id_of(&resp.json().await.expect("json"))),
            429 => {
                assert!(
                    resp.headers().contains_key("retry-after"),
                    "429 without Retry-After"
                );
                let body: Value = resp.json().await.expect("json");
                assert_eq!(body["code"], "resource_exhausted");
                refused += 1;
            }
            other => {
                let body = resp.text().await.unwrap_or_default();
                panic!("unexpected status {other}: {body}\n{}", server.log());
            }
        }
    }
    assert_eq!((created.len(), refused), (2, 2), "{}", server.log());
    // Exactly the successful creates exist in the engine.
    assert_eq!(remove_owner_containers(&options.owner), created.len());
}

#[tokio::test]
async fn env_prints_the_key_of_the_server_on_its_port_and_requests_are_logged() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let port = server.url.rsplit(':').next().expect("port").to_string();
    // Neither the owner nor the state directory is given: only the port, as a user
    // would in another terminal.
    let out = std::process::Command::new(tests::server_binary())
        .args(["env", "--port", &port])
        .env_remove("COLIMA_E2B_OWNER")
        .env_remove("COLIMA_E2B_STATE_DIR")
        .env_remove("COLIMA_E2B_CONFIG")
        .output()
        .expect("run colima-e2b env");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let key = server.api_key();
    assert!(
        printed.contains(&format!("export E2B_API_KEY={key}\n")),
        "env printed another key than the running server's ({key}):\n{printed}"
    );
    // The key it printed works.
    let resp = server
        .http
        .get(server.url("/e2b/v2/sandboxes"))
        .header("X-API-Key", &key)
        .send()
        .await
        .expect("list");
    assert_eq!(resp.status(), 200);
    // One info line per request: method, path, operation, status, time, sandbox; never
    // the query or a key.
    server
        .get("/sandboxes/clmnosuchsandbox?secret=hunter2")
        .await;
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("request") && l.contains("path=/sandboxes/clmnosuchsandbox"))
        .unwrap_or_else(|| panic!("no request line in the log:\n{log}"));
    for part in [
        "method=GET",
        "status=404",
        "ms=",
        "sandbox=\"clmnosuchsandbox\"",
        "operation=",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(!log.contains("hunter2"), "the query reached the log");
    assert!(!log.contains(&key), "the key reached the log");
}
