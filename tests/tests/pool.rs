//! The warm pool on a real engine: a pooled create is served from the pool (the metrics
//! say so) with only its own envs and metadata, the pool refills, requests the pool
//! cannot serve create cold, and claimed sandboxes and unclaimed members survive a
//! SIGKILL. The burst of 50 creates with the default admission settings is
//! tests/e2b/test_sdk.py::test_burst_of_50_creates_all_succeed, through the official SDK.

use std::time::Duration;

use serde_json::json;
use tests::{json_of, owner_containers, OwnerCleanup, Server, ServerOptions};

/// One test at a time: each fills a pool.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const POOL: &[(&str, &str)] = &[("template", "base")];

fn pooled_options(size: usize) -> ServerOptions {
    ServerOptions::new().env("COLIMA_E2B_POOL__BASE", &size.to_string())
}

/// Waits (bounded) until the base pool holds `n` members; the last value seen.
async fn pool_reaches(server: &Server, n: f64) -> f64 {
    let mut size = 0.0;
    for _ in 0..600 {
        size = server.metric("colima_e2b_pool_size", POOL).await;
        if size == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    size
}

async fn stdout(server: &Server, id: &str, cmd: &str) -> String {
    let (status, v) = server.run(id, cmd).await;
    assert_eq!(status, 200, "{v}");
    v["stdout"].as_str().expect("stdout").to_string()
}

#[tokio::test]
async fn a_pooled_create_gets_only_its_own_settings_and_the_pool_refills() {
    let _serial = SERIAL.lock().await;
    let options = pooled_options(2);
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    assert_eq!(pool_reaches(&server, 2.0).await, 2.0, "{}", server.log());
    // Members exist on the engine but are nobody's sandboxes.
    assert_eq!(owner_containers(&options.owner).len(), 2);
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");

    let a = server
        .create_sandbox(json!({"template": "base", "envs": {"WHO": "a"}, "metadata": {"n": "a"}}))
        .await;
    let b = server
        .create_sandbox(json!({"envs": {"WHO": "b", "ONLY_B": "1"}, "metadata": {"n": "b"}}))
        .await;
    assert_eq!(
        server.metric("colima_e2b_pool_claims_total", POOL).await,
        2.0
    );
    assert_eq!(
        server
            .metric(
                "colima_e2b_sandbox_create_seconds_count",
                &[("path", "warm")]
            )
            .await,
        2.0
    );
    assert_eq!(
        stdout(&server, &a, "echo $WHO-${ONLY_B:-none}").await,
        "a-none\n"
    );
    assert_eq!(
        stdout(&server, &b, "echo $WHO-${ONLY_B:-none}").await,
        "b-1\n"
    );
    // The template's workdir and user, as a cold create gives them.
    assert_eq!(
        stdout(&server, &a, "whoami; pwd").await,
        "user\n/home/user\n"
    );
    for (id, n) in [(&a, "a"), (&b, "b")] {
        let (_, v) = json_of(server.get(&format!("/sandboxes/{id}")).await).await;
        assert_eq!(v["metadata"], json!({"n": n}), "{v}");
        assert_eq!(v["state"], "running", "{v}");
    }
    // Each claim got a member nobody had touched, and the pool refills behind them.
    assert_ne!(a, b);
    assert_eq!(pool_reaches(&server, 2.0).await, 2.0, "{}", server.log());
    assert_eq!(owner_containers(&options.owner).len(), 4);
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
}

#[tokio::test]
async fn requests_the_pool_cannot_serve_create_cold() {
    let _serial = SERIAL.lock().await;
    let options = pooled_options(1);
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    assert_eq!(pool_reaches(&server, 1.0).await, 1.0, "{}", server.log());
    let limits = server
        .create_sandbox(json!({"template": "base", "memory_mb": 300}))
        .await;
    // Podman's CNI network backend cannot run an offline sandbox (501); the create still
    // went past the pool first.
    let (status, offline) = json_of(
        server
            .post(
                "/sandboxes/",
                json!({"template": "base", "internet": false}),
            )
            .await,
    )
    .await;
    let offline = match status {
        200 => offline["sandbox_id"].as_str().map(str::to_string),
        _ => {
            assert_eq!(
                (status, &offline["code"]),
                (501, &json!("unsupported")),
                "{offline}"
            );
            None
        }
    };
    let python = server.create_sandbox(json!({"template": "python"})).await;
    assert_eq!(
        server.metric("colima_e2b_pool_claims_total", &[]).await,
        0.0
    );
    for reason in ["limits", "internet_off"] {
        assert_eq!(
            server
                .metric("colima_e2b_pool_misses_total", &[("reason", reason)])
                .await,
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        server
            .metric(
                "colima_e2b_sandbox_create_seconds_count",
                &[("path", "cold"), ("outcome", "ok")]
            )
            .await,
        if offline.is_some() { 3.0 } else { 2.0 }
    );
    assert_eq!(server.metric("colima_e2b_pool_size", POOL).await, 1.0);
    let (_, v) = json_of(server.get(&format!("/sandboxes/{limits}")).await).await;
    assert_eq!(v["memory_mb"], 300, "{v}");
    for id in [Some(limits), offline, Some(python)].iter().flatten() {
        assert_eq!(stdout(&server, id, "echo ok").await, "ok\n");
    }
}

#[tokio::test]
async fn claimed_sandboxes_and_unclaimed_members_survive_a_sigkill() {
    let _serial = SERIAL.lock().await;
    let options = pooled_options(2);
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    assert_eq!(pool_reaches(&server, 2.0).await, 2.0, "{}", server.log());
    let id = server
        .create_sandbox(json!({"timeout": 600, "envs": {"K": "v"}, "metadata": {"m": "1"}}))
        .await;
    assert_eq!(
        server.metric("colima_e2b_pool_claims_total", POOL).await,
        1.0
    );
    let (_, before) = json_of(server.get(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(pool_reaches(&server, 2.0).await, 2.0, "{}", server.log());
    let containers = owner_containers(&options.owner);
    assert_eq!(containers.len(), 3);
    server.kill9();

    let server = Server::start(options.clone()).await;
    let log = server.log();
    assert!(log.contains("adopted=1"), "{log}");
    assert!(log.contains("pooled=2"), "{log}");
    let (status, after) = json_of(server.get(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(status, 200, "{after}");
    for key in ["metadata", "started_at", "end_at", "template_id"] {
        assert_eq!(after[key], before[key], "{key} changed across the restart");
    }
    assert_eq!(stdout(&server, &id, "echo $K").await, "v\n");
    // The same members are back in the pool: nothing was removed or started.
    assert_eq!(server.metric("colima_e2b_pool_size", POOL).await, 2.0);
    assert_eq!(owner_containers(&options.owner), containers);
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // And they still serve claims.
    let next = server.create_sandbox(json!({})).await;
    assert_eq!(
        server.metric("colima_e2b_pool_claims_total", POOL).await,
        1.0
    );
    assert_eq!(stdout(&server, &next, "echo ${K:-unset}").await, "unset\n");
}
