//! The whole HTTP application in-process over the in-memory backend: routing, parsing,
//! status codes and bodies of the native API and E2B's control plane, with no engine.
//! (The engine suites in `tests/` run the same API against real Docker and Podman.)

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use poem::endpoint::BoxEndpoint;
use poem::http::StatusCode;
use poem::test::{TestClient, TestResponse};
use poem::EndpointExt;
use sandbox_api::auth::{AuthSettings, Perimeter};
use sandbox_api::e2b::{E2b, E2bSettings};
use sandbox_api::AppState;
use sandbox_core::{InMemoryBackend, ManagerConfig, SandboxManager, SandboxState, Template};
use serde_json::{json, Value};

const KEY: &str = "e2b_0123456789abcdef0123456789abcdef01234567";

type Client = TestClient<BoxEndpoint<'static, poem::Response>>;

struct App {
    /// Sends the API key on every request.
    client: Client,
    /// Sends nothing (and, in-process, has no peer address: it is never local).
    anon: Client,
    manager: SandboxManager,
    state: AppState,
}

fn state_with(config: ManagerConfig, auth: AuthSettings) -> (AppState, SandboxManager) {
    let backend = InMemoryBackend::new().with_image("colima-e2b/base:latest", &["sleep"]);
    let manager = SandboxManager::new(Arc::new(backend), config);
    let state = AppState {
        manager: manager.clone(),
        metrics: PrometheusBuilder::new().build_recorder().handle(),
        e2b: Some(E2b::new(E2bSettings {
            domain: "localhost:8000".into(),
        })),
        perimeter: Arc::new(Perimeter::new(AuthSettings {
            keys: vec![("default".into(), KEY.into())],
            ..auth
        })),
        limits: sandbox_api::ApiLimits::default(),
        health: sandbox_api::HealthFacts::default(),
        aborts: sandbox_api::abort::Aborts::default(),
    };
    (state, manager)
}

fn app_with(config: ManagerConfig) -> App {
    let (state, manager) = state_with(config, AuthSettings::default());
    App {
        client: TestClient::new(sandbox_api::app(state.clone()).boxed())
            .default_header("authorization", format!("Bearer {KEY}")),
        anon: TestClient::new(sandbox_api::app(state.clone()).boxed()),
        manager,
        state,
    }
}

fn app() -> App {
    let mut config = ManagerConfig::default();
    config
        .templates
        .insert("base".into(), Template::new("colima-e2b/base:latest"));
    config.max_sandboxes = 3;
    app_with(config)
}

/// Status and JSON body of a response.
async fn answer(resp: TestResponse) -> (StatusCode, Value) {
    let status = resp.0.status();
    let text = resp.0.into_body().into_string().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {body}"
    );
}

#[tokio::test]
async fn create_get_list_timeout_kill_round_trip() {
    let app = app();
    let (status, created) = answer(
        app.client
            .post("/sandboxes/")
            .body_json(
                &json!({"template": "base", "timeout": 600, "metadata": {"purpose": "test"}}),
            )
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["sandbox_id"]
        .as_str()
        .expect("sandbox_id")
        .to_string();
    assert_eq!(created["state"], "running");
    assert_eq!(created["template_id"], "base");
    assert_eq!(created["metadata"]["purpose"], "test");

    let (status, got) = answer(app.client.get(format!("/sandboxes/{id}")).send().await).await;
    assert_eq!(
        (status, got["sandbox_id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );

    let (_, listed) = answer(
        app.client
            .get("/sandboxes/")
            .query("metadata", &"purpose=test")
            .send()
            .await,
    )
    .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let (_, none) = answer(
        app.client
            .get("/sandboxes/")
            .query("metadata", &"purpose=other")
            .send()
            .await,
    )
    .await;
    assert_eq!(none, json!([]));

    let (status, updated) = answer(
        app.client
            .post(format!("/sandboxes/{id}/timeout"))
            .body_json(&json!({"timeout": 900}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_ne!(updated["end_at"], created["end_at"]);

    let (status, killed) = answer(app.client.delete(format!("/sandboxes/{id}")).send().await).await;
    assert_eq!(
        (status, killed["status"].as_str()),
        (StatusCode::OK, Some("killed"))
    );
    let (status, body) = answer(app.client.get(format!("/sandboxes/{id}")).send().await).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn defaults_come_from_the_server_and_limits_from_the_request() {
    let app = app();
    let (status, created) = answer(
        app.client
            .post("/sandboxes/")
            .body_json(&json!({"cpus": 0.5, "memory_mb": 256}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["template_id"], "base", "the default template");
    assert_eq!(
        (created["cpus"].as_f64(), created["memory_mb"].as_u64()),
        (Some(0.5), Some(256))
    );
    let started = time::OffsetDateTime::parse(
        created["started_at"].as_str().unwrap_or_default(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("started_at");
    let ends = time::OffsetDateTime::parse(
        created["end_at"].as_str().unwrap_or_default(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("end_at");
    assert_eq!((ends - started).whole_seconds(), 300, "the default timeout");
}

#[tokio::test]
async fn client_mistakes_are_4xx_with_a_code_and_message() {
    let app = app();
    for (body, want, code) in [
        (
            json!({"template": "nope"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            json!({"timeout": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            json!({"timeout": "soon"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_error",
        ),
        (
            json!({"cpus": 0.001}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            json!({"envs": {"A B": "x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
    ] {
        let (status, answer) =
            answer(app.client.post("/sandboxes/").body_json(&body).send().await).await;
        assert_error(status, &answer, want, code);
    }
    let (status, body) = answer(
        app.client
            .post("/sandboxes/")
            .content_type("application/json")
            .body("{not json")
            .send()
            .await,
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_error",
    );
    let big = format!("{{\"metadata\":{{\"k\":\"{}\"}}}}", "x".repeat(2 << 20));
    let (status, body) = answer(
        app.client
            .post("/sandboxes/")
            .content_type("application/json")
            .body(big)
            .send()
            .await,
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let (status, body) = answer(app.client.get("/no/such/route").send().await).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = answer(app.client.get("/sandboxes/NOT-AN-ID").send().await).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    assert!(
        app.manager.list(&Default::default()).is_empty(),
        "nothing was created"
    );
}

#[tokio::test]
async fn the_sandbox_limit_answers_429_with_retry_after() {
    let app = app();
    for _ in 0..3 {
        let (status, body) = answer(
            app.client
                .post("/sandboxes/")
                .body_json(&json!({}))
                .send()
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let resp = app
        .client
        .post("/sandboxes/")
        .body_json(&json!({}))
        .send()
        .await;
    resp.assert_header_exist("retry-after");
    let (status, body) = answer(resp).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "resource_exhausted",
    );
}

#[tokio::test]
async fn commands_in_a_paused_sandbox_answer_409_at_once() {
    let app = app();
    let (_, created) = answer(
        app.client
            .post("/sandboxes/")
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    let id: sandbox_core::SandboxId = created["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("id");
    app.manager.pause(&id, true).await.expect("pause");
    assert_eq!(
        app.manager.info(&id).map(|i| i.state).ok(),
        Some(SandboxState::Paused)
    );
    for (path, body) in [
        (
            format!("/sandboxes/{id}/commands/run"),
            json!({"cmd": "echo hi"}),
        ),
        (
            format!("/sandboxes/{id}/commands/run/background"),
            json!({"cmd": "sleep 1"}),
        ),
        (
            format!("/sandboxes/{id}/files/write"),
            json!({"path": "/tmp/x", "data": "x"}),
        ),
    ] {
        let (status, answer) = answer(app.client.post(&path).body_json(&body).send().await).await;
        assert_error(status, &answer, StatusCode::CONFLICT, "conflict");
    }
    let (status, answer) = answer(
        app.client
            .get(format!("/sandboxes/{id}/files/read"))
            .query("path", &"/etc/hostname")
            .send()
            .await,
    )
    .await;
    assert_error(status, &answer, StatusCode::CONFLICT, "conflict");
}

#[tokio::test]
async fn health_docs_spec_and_metrics_are_served() {
    let app = app();
    let (status, health) = answer(app.client.get("/health").send().await).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["backend"], "memory");
    assert_eq!(health["engine"]["engine"], "In-memory");
    let checks = health["checks"].as_array().expect("checks");
    let named = |n: &str| checks.iter().find(|c| c["name"] == n).cloned();
    assert_eq!(
        named("engine").map(|c| c["status"].clone()),
        Some(json!("ok")),
        "{health}"
    );
    assert_eq!(
        named("template:base").map(|c| c["status"].clone()),
        Some(json!("ok")),
        "{health}"
    );
    assert!(
        named("disk_quota").is_some() && named("state_dir").is_some(),
        "{health}"
    );
    let (status, spec) = answer(app.client.get("/openapi.json").send().await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        spec["paths"]["/sandboxes"]["post"].is_object(),
        "the spec lists the seed API"
    );
    assert!(spec["paths"]["/sandboxes/{sandbox_id}/commands/run"].is_object());
    for page in ["/docs", "/redoc"] {
        let resp = app.client.get(page).send().await;
        resp.assert_status_is_ok();
        let html = resp.0.into_body().into_string().await.unwrap_or_default();
        assert!(html.contains("<html"), "{page} is not a page");
    }
    let resp = app.client.get("/metrics").send().await;
    resp.assert_status_is_ok();
}

#[tokio::test]
async fn the_e2b_control_plane_needs_its_key_and_speaks_e2b() {
    let app = app();
    let (status, body) = answer(
        app.anon
            .post("/e2b/sandboxes")
            .body_json(&json!({"templateID": "base"}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (StatusCode::UNAUTHORIZED, Some(401)),
        "{body}"
    );
    let (status, body) = answer(
        app.anon
            .post("/e2b/sandboxes")
            .header("x-api-key", "e2b_wrong")
            .body_json(&json!({"templateID": "base"}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let (status, created) = answer(
        app.anon
            .post("/e2b/sandboxes")
            .header("x-api-key", KEY)
            .body_json(&json!({"templateID": "base", "timeout": 60, "metadata": {"a": "1"}}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["sandboxID"]
        .as_str()
        .expect("sandboxID")
        .to_string();
    assert_eq!(created["envdVersion"], envd_proto::ENVD_VERSION);
    assert_eq!(created["domain"], "localhost:8000");

    let (status, body) = answer(
        app.anon
            .post("/e2b/sandboxes")
            .header("x-api-key", KEY)
            .body_json(&json!({"templateID": "nope"}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (StatusCode::BAD_REQUEST, Some(400)),
        "{body}"
    );

    let resp = app
        .anon
        .get("/e2b/v2/sandboxes")
        .header("x-api-key", KEY)
        .query("metadata", &"a=1")
        .send()
        .await;
    let (status, listed) = answer(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed[0]["sandboxID"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["state"], "running");

    let pause = app
        .anon
        .post(format!("/e2b/sandboxes/{id}/pause"))
        .header("x-api-key", KEY)
        .send()
        .await;
    pause.assert_status(StatusCode::NO_CONTENT);
    let again = app
        .anon
        .post(format!("/e2b/sandboxes/{id}/pause"))
        .header("x-api-key", KEY)
        .send()
        .await;
    again.assert_status(StatusCode::CONFLICT);
    let (status, connected) = answer(
        app.anon
            .post(format!("/e2b/sandboxes/{id}/connect"))
            .header("x-api-key", KEY)
            .body_json(&json!({"timeout": 30}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "connect resumes a paused sandbox: {connected}"
    );
    let (status, _) = answer(
        app.anon
            .post(format!("/e2b/sandboxes/{id}/connect"))
            .header("x-api-key", KEY)
            .body_json(&json!({"timeout": 30}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "connect to a running sandbox");

    let kill = app
        .anon
        .delete(format!("/e2b/sandboxes/{id}"))
        .header("x-api-key", KEY)
        .send()
        .await;
    kill.assert_status(StatusCode::NO_CONTENT);
    let (status, body) = answer(
        app.anon
            .get(format!("/e2b/sandboxes/{id}"))
            .header("x-api-key", KEY)
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (StatusCode::NOT_FOUND, Some(404)),
        "{body}"
    );
}

#[tokio::test]
async fn the_e2b_data_plane_answers_502_for_unknown_and_paused_sandboxes() {
    let app = app();
    let (status, body) = answer(
        app.client
            .post("/e2b/envd/process.Process/List")
            .header("e2b-sandbox-id", "clmnosuchsandbox")
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not found")),
        "{body}"
    );

    let (_, created) = answer(
        app.client
            .post("/sandboxes/")
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    let id = created["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    app.manager
        .pause(&id.parse().expect("id"), true)
        .await
        .expect("pause");
    let (status, body) = answer(
        app.client
            .post("/e2b/envd/process.Process/List")
            .header("e2b-sandbox-id", id.as_str())
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    // The SDK reads "was not found" as: the sandbox is not running (no retry).
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not found")),
        "{body}"
    );
}

/// Requests the perimeter refuses before any work, whoever sends them.
#[tokio::test]
async fn unknown_hosts_foreign_origins_and_missing_keys_are_refused_before_any_work() {
    let app = app();
    let (status, body) = answer(
        app.client
            .post("/sandboxes/")
            .header("host", "attacker.example:8000")
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::MISDIRECTED_REQUEST,
        "unknown_host",
    );
    let (status, body) = answer(
        app.client
            .post("/sandboxes/")
            .header("host", "localhost:8000")
            .header("origin", "http://attacker.example")
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden_origin");
    // The same origin as the page (Swagger UI at /docs) is fine.
    let (status, body) = answer(
        app.client
            .get("/sandboxes/")
            .header("host", "localhost:8000")
            .header("origin", "http://localhost:8000")
            .send()
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for path in [
        "/sandboxes/",
        "/health",
        "/metrics",
        "/docs",
        "/openapi.json",
    ] {
        let resp = app
            .anon
            .get(path)
            .header("host", "localhost:8000")
            .send()
            .await;
        resp.assert_header("www-authenticate", "Bearer");
        let (status, body) = answer(resp).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    let (status, body) = answer(
        app.anon
            .post("/sandboxes/")
            .header("x-api-key", "e2b_not_the_key_at_all_0000000000")
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    let (status, body) = answer(
        app.anon
            .post("/sandboxes/")
            .header("x-api-key", KEY)
            .body_json(&json!({}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "X-API-KEY works on the native API too: {body}"
    );
    assert_eq!(
        app.manager.list(&Default::default()).len(),
        1,
        "only the keyed create ran"
    );
}

#[tokio::test]
async fn allowed_origins_get_cors_answers() {
    let (state, _manager) = state_with(
        {
            let mut c = ManagerConfig::default();
            c.templates
                .insert("base".into(), Template::new("colima-e2b/base:latest"));
            c
        },
        AuthSettings {
            cors_origins: vec!["https://app.example.com".into()],
            ..AuthSettings::default()
        },
    );
    let client = TestClient::new(sandbox_api::app(state).boxed());
    let resp = client
        .options("/sandboxes/")
        .header("host", "localhost:8000")
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await;
    resp.assert_status(StatusCode::NO_CONTENT);
    resp.assert_header("access-control-allow-origin", "https://app.example.com");
    let resp = client
        .get("/sandboxes/")
        .header("host", "localhost:8000")
        .header("origin", "https://app.example.com")
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await;
    resp.assert_status_is_ok();
    resp.assert_header("access-control-allow-origin", "https://app.example.com");
}

#[tokio::test]
async fn wrong_credentials_are_limited_per_peer_and_then_even_the_right_key_waits() {
    let app = app();
    let burst = AuthSettings::default().failure_burst as usize;
    let mut statuses = Vec::new();
    for _ in 0..burst + 5 {
        let resp = app
            .anon
            .get("/sandboxes/")
            .header("authorization", "Bearer e2b_guess_guess_guess_guess_guess")
            .send()
            .await;
        statuses.push(resp.0.status().as_u16());
    }
    assert!(statuses[..burst].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[burst..].iter().all(|s| *s == 429), "{statuses:?}");
    let resp = app.client.get("/sandboxes/").send().await;
    resp.assert_header_exist("retry-after");
    let (status, body) = answer(resp).await;
    assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

/// A real listener on 127.0.0.1, so requests have a loopback peer.
async fn serve(state: AppState) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let acceptor = poem::listener::TcpAcceptor::from_std(listener).expect("acceptor");
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(sandbox_api::app(state)));
    format!("http://{addr}")
}

#[tokio::test]
async fn loopback_clients_go_without_a_key_except_to_drive_secure_sandboxes() {
    let app = app();
    let base = serve(app.state.clone()).await;
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{base}/sandboxes/"))
        .json(&json!({}))
        .send()
        .await
        .expect("create");
    assert_eq!(
        created.status().as_u16(),
        200,
        "dev mode: no key on loopback"
    );
    let body: Value = created.json().await.expect("json");
    let open_id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    // A sandbox created secure (as every current E2B SDK does) needs a key or its token.
    let secure = app
        .manager
        .create(sandbox_core::SandboxSpec {
            secure: true,
            ..Default::default()
        })
        .await
        .expect("secure create");
    let resp = http
        .post(format!("{base}/sandboxes/{}/timeout", secure.id))
        .json(&json!({"timeout": 60}))
        .send()
        .await
        .expect("timeout");
    assert_eq!(resp.status().as_u16(), 401);
    let resp = http
        .post(format!("{base}/sandboxes/{open_id}/timeout"))
        .json(&json!({"timeout": 60}))
        .send()
        .await
        .expect("timeout");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = http
        .get(format!("{base}/sandboxes/{}", secure.id))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 200, "looking is not driving");
    let resp = http
        .post(format!("{base}/sandboxes/{}/timeout", secure.id))
        .bearer_auth(KEY)
        .json(&json!({"timeout": 60}))
        .send()
        .await
        .expect("timeout");
    assert_eq!(resp.status().as_u16(), 200, "a key drives any sandbox");
    // A loopback peer naming another host is not local (a rebinding page would).
    let resp = http
        .get(format!("{base}/sandboxes/"))
        .header("host", "sandbox.example.org")
        .send()
        .await
        .expect("list");
    assert_eq!(resp.status().as_u16(), 421);
}

#[tokio::test]
async fn required_mode_asks_loopback_clients_for_a_key_too() {
    let mut config = ManagerConfig::default();
    config
        .templates
        .insert("base".into(), Template::new("colima-e2b/base:latest"));
    let (state, _) = state_with(
        config,
        AuthSettings {
            mode: sandbox_api::auth::AuthMode::Required,
            ..AuthSettings::default()
        },
    );
    let base = serve(state).await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(resp.status().as_u16(), 401);
    let resp = http
        .get(format!("{base}/health"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("health");
    assert_eq!(resp.status().as_u16(), 200);
}
