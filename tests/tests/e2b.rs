//! The E2B compatibility layer on the wire, on the real server over real engines: what
//! the official SDKs rely on (status codes, error bodies, headers, routing). The SDKs
//! themselves drive it in tests/e2b (deploy/e2b-tests.sh).

use std::process::Command;

use serde_json::{json, Value};
use tests::{free_port, server_binary, OwnerCleanup, Server, ServerOptions};

const KEY: &str = "e2b_00112233445566778899aabbccddeeff00112233";

fn options() -> ServerOptions {
    ServerOptions::new().env("COLIMA_E2B_E2B__API_KEY", KEY)
}

async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = server
        .http
        .request(method, server.url(&format!("/e2b{path}")))
        .header("X-API-KEY", KEY);
    if let Some(body) = body {
        rb = rb.json(&body);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
    };
    (status, headers, v)
}

async fn create(server: &Server, path: &str, body: Value) -> Value {
    let (status, _, v) = call(server, reqwest::Method::POST, path, Some(body)).await;
    assert_eq!(status, 201, "create: {v}");
    v
}

/// A unary envd call through the data plane.
async fn envd(server: &Server, id: &str, token: Option<&str>, method: &str) -> (u16, Value) {
    let mut rb = server
        .http
        .post(server.url(&format!("/e2b/envd/{method}")))
        .header("E2b-Sandbox-Id", id)
        .header("Content-Type", "application/json")
        .body("{}");
    if let Some(t) = token {
        rb = rb.header("X-Access-Token", t);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn env_prints_what_the_sdk_needs_and_the_key_works() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let port = server.url.rsplit(':').next().expect("port").to_string();
    let out = Command::new(server_binary())
        .args(["env", "--port", &port])
        .env("COLIMA_E2B_OWNER", &options.owner)
        .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
        .env("COLIMA_E2B_E2B__API_KEY", KEY)
        .output()
        .expect("colima-e2b env");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        format!("export E2B_API_URL=http://127.0.0.1:{port}/e2b"),
        format!("export E2B_SANDBOX_URL=http://127.0.0.1:{port}/e2b/envd"),
        format!("export E2B_VOLUME_API_URL=http://127.0.0.1:{port}"),
        format!("export E2B_DOMAIN=localhost:{port}"),
        format!("export E2B_API_KEY={KEY}"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from:\n{text}"
        );
    }
    let (status, _, v) = call(&server, reqwest::Method::GET, "/sandboxes", None).await;
    assert_eq!((status, v), (200, json!([])));
}

#[tokio::test]
async fn a_generated_key_is_kept_and_printed_by_env() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let out = Command::new(server_binary())
        .args(["env", "--port", &free_port().to_string()])
        .env("COLIMA_E2B_OWNER", &options.owner)
        .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
        .output()
        .expect("colima-e2b env");
    let text = String::from_utf8_lossy(&out.stdout);
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("export E2B_API_KEY="))
        .expect("key line")
        .to_string();
    assert!(key.starts_with("e2b_") && key.len() == 44, "{key}");
    assert!(key[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
    let resp = server
        .http
        .get(server.url("/e2b/sandboxes"))
        .header("X-API-KEY", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn control_plane_answers_errors_as_e2b_does() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;

    for key in [None, Some("e2b_wrong")] {
        let mut rb = server.http.get(server.url("/e2b/sandboxes"));
        if let Some(k) = key {
            rb = rb.header("X-API-KEY", k);
        }
        let resp = rb.send().await.expect("request");
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["code"], 401, "{v}");
    }

    let post = reqwest::Method::POST;
    let (s, _, v) = call(
        &server,
        post.clone(),
        "/sandboxes",
        Some(json!({"templateID": "base", "timeout": 0})),
    )
    .await;
    assert_eq!((s, &v["code"]), (400, &json!(400)), "{v}");
    let (s, _, v) = call(
        &server,
        post.clone(),
        "/sandboxes",
        Some(json!({"templateID": "no-such-template"})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, _, v) = call(&server, post.clone(), "/sandboxes", Some(json!({"x": 1}))).await;
    assert_eq!(s, 400, "{v}");

    for path in [
        "/sandboxes/clm0000000000000000",
        "/sandboxes/not-an-id",
        "/sandboxes/clm0000000000000000/metrics",
    ] {
        let (s, _, v) = call(&server, reqwest::Method::GET, path, None).await;
        assert_eq!((s, &v["code"]), (404, &json!(404)), "{path}: {v}");
    }
    let (s, _, _) = call(
        &server,
        reqwest::Method::DELETE,
        "/sandboxes/clm0000000000000000",
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _, _) = call(
        &server,
        post,
        "/sandboxes/clm0000000000000000/timeout",
        Some(json!({"timeout": 30})),
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn lifecycle_pagination_pause_and_tokens() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let tag = format!("page-{}", free_port());
    // v1 create honours `secure`; v2 sandboxes are always secure.
    let open = create(
        &server,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 120, "secure": false, "metadata": {"tag": tag}}),
    )
    .await;
    assert!(open.get("envdAccessToken").is_none(), "{open}");
    assert_eq!(open["envdVersion"], envd_proto::ENVD_VERSION);
    let mut ids = vec![open["sandboxID"].as_str().expect("id").to_string()];
    for _ in 0..2 {
        let v = create(
            &server,
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 120, "metadata": {"tag": tag}}),
        )
        .await;
        assert!(
            v["envdAccessToken"].as_str().is_some_and(|t| !t.is_empty()),
            "{v}"
        );
        assert_eq!(
            v["domain"],
            server.url.replace("http://127.0.0.1", "localhost")
        );
        ids.push(v["sandboxID"].as_str().expect("id").to_string());
    }
    // What the metrics' diskUsed must count (where the quota counts only writes, a new
    // sandbox has used nothing yet).
    let wrote: Value = server
        .http
        .post(server.url(&format!("/sandboxes/{}/commands/run", ids[1])))
        .header("X-API-KEY", KEY)
        .json(&json!({"cmd": "head -c 8388608 /dev/urandom > /home/user/eight-mib && sync"}))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(wrote["exit_code"], 0, "{wrote}");

    let filter = format!("metadata=tag%3D{tag}");
    let (s, h, page1) = call(
        &server,
        reqwest::Method::GET,
        &format!("/v2/sandboxes?{filter}&limit=2"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page1.as_array().map(Vec::len), Some(2), "{page1}");
    let next = h
        .get("x-next-token")
        .and_then(|v| v.to_str().ok())
        .expect("X-Next-Token on a partial page")
        .to_string();
    let (_, h2, page2) = call(
        &server,
        reqwest::Method::GET,
        &format!("/v2/sandboxes?{filter}&limit=2&nextToken={next}"),
        None,
    )
    .await;
    assert_eq!(page2.as_array().map(Vec::len), Some(1), "{page2}");
    assert!(h2.get("x-next-token").is_none());
    let mut seen: Vec<String> = page1
        .as_array()
        .into_iter()
        .chain(page2.as_array())
        .flatten()
        .map(|s| s["sandboxID"].as_str().expect("id").to_string())
        .collect();
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    let (s, _, _) = call(
        &server,
        reqwest::Method::GET,
        "/v2/sandboxes?nextToken=clmunknown",
        None,
    )
    .await;
    assert_eq!(s, 400);

    // Pause, list by state, connect resumes (201), second resume conflicts.
    let id = &ids[1];
    let post = reqwest::Method::POST;
    let (s, _, _) = call(
        &server,
        post.clone(),
        &format!("/sandboxes/{id}/pause"),
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, _) = call(
        &server,
        post.clone(),
        &format!("/sandboxes/{id}/pause"),
        None,
    )
    .await;
    assert_eq!(s, 409);
    let (_, _, paused) = call(
        &server,
        reqwest::Method::GET,
        &format!("/v2/sandboxes?{filter}&state=paused"),
        None,
    )
    .await;
    assert_eq!(paused.as_array().map(Vec::len), Some(1), "{paused}");
    assert_eq!(paused[0]["state"], "paused");
    let (_, _, running_v1) = call(
        &server,
        reqwest::Method::GET,
        &format!("/sandboxes?{filter}"),
        None,
    )
    .await;
    assert_eq!(running_v1.as_array().map(Vec::len), Some(2), "{running_v1}");
    let (s, _, v) = call(
        &server,
        post.clone(),
        &format!("/sandboxes/{id}/connect"),
        Some(json!({"timeout": 60})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, _, _) = call(
        &server,
        post.clone(),
        &format!("/sandboxes/{id}/resume"),
        Some(json!({"timeout": 60})),
    )
    .await;
    assert_eq!(s, 409);
    let (s, _, v) = call(
        &server,
        post.clone(),
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 60})),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // Detail, metrics, timeout and kill.
    let (s, _, detail) = call(
        &server,
        reqwest::Method::GET,
        &format!("/sandboxes/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    for field in [
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdAccessToken",
    ] {
        assert!(detail.get(field).is_some(), "{field} missing: {detail}");
    }
    // The disk figure is read from the engine in the background and kept for 30 s: the
    // 8 MiB written at the start show within that (a bound on waiting, not a timing claim).
    let mut m = Value::Null;
    for _ in 0..90 {
        let (s, _, got) = call(
            &server,
            reqwest::Method::GET,
            &format!("/sandboxes/{id}/metrics"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{got}");
        m = got;
        if m[0]["diskUsed"].as_u64().is_some_and(|u| u >= 8 << 20) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let sample = &m[0];
    let memory_mb = detail["memoryMB"].as_u64().expect("memoryMB");
    assert_eq!(
        sample["memTotal"].as_u64(),
        Some(memory_mb << 20),
        "memTotal is the sandbox's memory limit: {m}"
    );
    let used = sample["memUsed"].as_u64().expect("memUsed");
    assert!(used > 0 && used < memory_mb << 20, "memUsed {used} of {m}");
    assert_eq!(sample["cpuCount"], detail["cpuCount"], "{m}");
    let (disk_used, disk_total) = (
        sample["diskUsed"].as_u64().expect("diskUsed"),
        sample["diskTotal"].as_u64().expect("diskTotal"),
    );
    assert!(
        disk_used >= 8 << 20 && disk_used <= disk_total,
        "diskUsed counts the 8 MiB written: {m}"
    );
    let (s, _, _) = call(
        &server,
        post,
        &format!("/sandboxes/{id}/timeout"),
        Some(json!({"timeout": -1})),
    )
    .await;
    assert_eq!(s, 400);
    for id in &ids {
        let (s, _, _) = call(
            &server,
            reqwest::Method::DELETE,
            &format!("/sandboxes/{id}"),
            None,
        )
        .await;
        assert_eq!(s, 204);
    }
    let (s, _, _) = call(
        &server,
        reqwest::Method::DELETE,
        &format!("/sandboxes/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn data_plane_routes_by_header_and_host_and_guards_secure_sandboxes() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let secure = create(
        &server,
        "/v2/sandboxes",
        json!({"templateID": "base", "timeout": 120}),
    )
    .await;
    let open = create(
        &server,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 120, "secure": false}),
    )
    .await;
    let sid = secure["sandboxID"].as_str().expect("id");
    let token = secure["envdAccessToken"].as_str().expect("token");
    let oid = open["sandboxID"].as_str().expect("id");

    // Secure: the client must bring the token; not secure: the server vouches.
    let (s, v) = envd(&server, sid, None, "process.Process/List").await;
    assert_eq!(s, 401, "{v}");
    let (s, v) = envd(&server, sid, Some(token), "process.Process/List").await;
    assert_eq!(s, 200, "{v}");
    assert!(v["processes"].is_array() || v == json!({}), "{v}");
    let (s, v) = envd(&server, oid, None, "process.Process/List").await;
    assert_eq!(s, 200, "{v}");

    // Unknown sandboxes are E2B's 502 with the sandbox id.
    let (s, v) = envd(&server, "clm0000000000000000", None, "process.Process/List").await;
    assert_eq!(s, 502);
    assert_eq!(v["sandboxId"], "clm0000000000000000");
    assert_eq!(v["code"], 502);
    let resp = server
        .http
        .post(server.url("/e2b/envd/process.Process/List"))
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 400);

    // Host names: the agent's port and a closed port.
    let host = |port: u16, id: &str| format!("{port}-{id}.localhost");
    let resp = server
        .http
        .get(server.url("/health"))
        .header("Host", host(49983, oid))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 204, "the agent's /health, not the server's");
    let resp = server
        .http
        .get(server.url("/"))
        .header("Host", host(3999, oid))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.expect("json");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("port is not open")),
        "{v}"
    );
    let resp = server
        .http
        .get(server.url("/"))
        .header("Host", host(8080, "clm0000000000000000"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 502);

    // A signed URL that no sandbox's token produced.
    let resp = server
        .http
        .get(server.url("/files?path=a.txt&signature=v1_bogus"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
}
