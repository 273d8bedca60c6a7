//! Pause and resume as E2B means them, on the real server over real engines: a pause
//! that keeps memory (a freeze) and one that keeps only the filesystem (the container
//! stops), paused sandboxes across a server SIGKILL, `on_timeout: pause` and
//! auto-resume, through the native API and E2B's control and data planes.

use std::time::Duration;

use serde_json::{json, Value};
use tests::{container_state, json_of, OwnerCleanup, Server, ServerOptions};

const KEY: &str = "e2b_00112233445566778899aabbccddeeff00112233";

/// A server with the E2B layer and a template whose start command leaves a trace of
/// every start in the sandbox's filesystem.
fn options() -> ServerOptions {
    ServerOptions::new()
        .env("COLIMA_E2B_E2B__API_KEY", KEY)
        .env(
            "COLIMA_E2B_TEMPLATES__BOOTS__IMAGE",
            "colima-e2b/base:latest",
        )
        .env(
            "COLIMA_E2B_TEMPLATES__BOOTS__START_CMD",
            "echo started >> /home/user/starts.log; exec sleep 100000",
        )
}

/// Polls `f` until it is true, for at most `limit` (a bound on waiting, not a timing claim).
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f().await
}

/// Runs `cmd` and returns its stdout, trimmed (the command must succeed).
async fn sh(server: &Server, id: &str, cmd: &str) -> String {
    let (status, body) = server.run(id, cmd).await;
    assert_eq!(status, 200, "{cmd}: {body}");
    assert_eq!(body["exit_code"], 0, "{cmd}: {body}");
    body["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

async fn state_of(server: &Server, id: &str) -> String {
    let (status, body) = json_of(server.get(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(status, 200, "{body}");
    body["state"].as_str().unwrap_or_default().to_string()
}

async fn pause(server: &Server, id: &str, keep_memory: bool) -> Value {
    let (status, body) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/pause?keep_memory={keep_memory}"),
                json!({}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "pause: {body}");
    assert_eq!(body["state"], "paused");
    body
}

async fn resume(server: &Server, id: &str) -> Value {
    let (status, body) = json_of(
        server
            .post(&format!("/sandboxes/{id}/resume"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "resume: {body}");
    assert_eq!(body["state"], "running");
    body
}

/// An E2B control-plane call.
async fn e2b(server: &Server, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let resp = server
        .http
        .request(method, server.url(&format!("/e2b{path}")))
        .header("X-API-KEY", KEY)
        .json(&body)
        .send()
        .await
        .expect("request");
    json_of(resp).await
}

/// A unary envd call through the data plane (the server adds the token: v1 sandboxes).
async fn envd(server: &Server, id: &str, method: &str) -> u16 {
    server
        .http
        .post(server.url(&format!("/e2b/envd/{method}")))
        .header("E2b-Sandbox-Id", id)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// The sandbox's container is stopped: its processes and memory are gone (Podman says
/// `stopped` until its cleanup has run, then `exited`).
fn assert_stopped(id: &str) {
    let state = container_state(id);
    assert!(
        matches!(state.as_deref(), Some("exited" | "stopped")),
        "container of {id} is {state:?}"
    );
}

fn seconds_left(end_at: &Value) -> i64 {
    let end = time::OffsetDateTime::parse(
        end_at.as_str().expect("end_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    (end - time::OffsetDateTime::now_utc()).whole_seconds()
}

#[tokio::test]
async fn a_filesystem_pause_frees_the_container_keeps_files_and_restarts_the_template() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = server
        .create_sandbox(json!({"template": "boots", "timeout": 600}))
        .await;
    let started = eventually(Duration::from_secs(30), || async {
        server.run(&id, "cat /home/user/starts.log").await.1["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("started"))
    })
    .await;
    assert!(started, "the start command did not run");
    sh(&server, &id, "echo kept > /home/user/keep.txt").await;
    server.background(&id, "sleep 777").await;

    // Only the filesystem: the container stops, so its memory is freed.
    let paused = pause(&server, &id, false).await;
    assert!(
        seconds_left(&paused["end_at"]) > 24 * 3600,
        "a paused sandbox is kept for the paused retention, not its timeout: {paused}"
    );
    assert_stopped(&id);
    assert_eq!(state_of(&server, &id).await, "paused");
    let (status, body) = server.run(&id, "true").await;
    assert_eq!(status, 409, "a command for a paused sandbox: {body}");
    let (status, _) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/pause?keep_memory=false"),
                json!({}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 409, "paused twice");

    let resumed = resume(&server, &id).await;
    // The first command after the boot: the new agent numbers its events from the
    // start again, below the old agent's, and they still reach the sandbox's log.
    sh(&server, &id, "echo after-boot-marker").await;
    let (status, logs) = json_of(
        server
            .get(&format!("/sandboxes/{id}/logs?limit=1000"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{logs}");
    let started = logs["logs"].as_array().is_some_and(|l| {
        l.iter().any(|e| {
            e["fields"]["cmd"]
                .as_str()
                .is_some_and(|c| c.contains("after-boot-marker"))
        })
    });
    assert!(
        started,
        "the restarted agent's process start is not in the log: {logs}"
    );
    let left = seconds_left(&resumed["end_at"]);
    assert!(
        (500..=600).contains(&left),
        "a resume gives the create's timeout again: {left}"
    );
    assert_eq!(container_state(&id).as_deref(), Some("running"));
    assert_eq!(sh(&server, &id, "cat /home/user/keep.txt").await, "kept");
    assert_eq!(
        sh(&server, &id, "wc -l < /home/user/starts.log").await,
        "2",
        "the template's start command runs again"
    );
    assert_eq!(
        sh(&server, &id, "pgrep -fx 'sleep 777' || echo none").await,
        "none",
        "processes do not survive a filesystem pause"
    );
    assert_eq!(sh(&server, &id, "whoami").await, "user", "the default user");

    // With memory: frozen, and its processes go on where they were.
    let before = sh(&server, &id, "pgrep -fx 'sleep 100000'").await;
    server.background(&id, "sleep 778").await;
    pause(&server, &id, true).await;
    assert_eq!(container_state(&id).as_deref(), Some("paused"));
    resume(&server, &id).await;
    assert_eq!(sh(&server, &id, "pgrep -fx 'sleep 100000'").await, before);
    assert!(!sh(&server, &id, "pgrep -fx 'sleep 778'").await.is_empty());
    assert_eq!(sh(&server, &id, "wc -l < /home/user/starts.log").await, "2");
    assert_eq!(
        server
            .metric(
                "colima_e2b_sandbox_pauses_total",
                &[("keeps", "filesystem")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn paused_sandboxes_survive_a_server_sigkill() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let frozen = server
        .create_sandbox(json!({"template": "base", "timeout": 600}))
        .await;
    let stopped = server
        .create_sandbox(json!({"template": "base", "timeout": 600}))
        .await;
    for id in [&frozen, &stopped] {
        sh(&server, id, "echo mine > /home/user/mine.txt").await;
    }
    server.background(&frozen, "sleep 555").await;
    let frozen_end = pause(&server, &frozen, true).await["end_at"].clone();
    let stopped_end = pause(&server, &stopped, false).await["end_at"].clone();
    server.kill9();
    assert_eq!(container_state(&frozen).as_deref(), Some("paused"));
    assert_stopped(&stopped);

    let server = Server::start(options).await;
    assert!(server.log().contains("adopted=2"), "{}", server.log());
    let (_, listed) = json_of(server.get("/sandboxes/").await).await;
    let listed = listed.as_array().expect("list").clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|s| s["state"] == "paused"), "{listed:?}");
    for (id, end) in [(&frozen, &frozen_end), (&stopped, &stopped_end)] {
        let (_, got) = json_of(server.get(&format!("/sandboxes/{id}")).await).await;
        assert_eq!(&got["end_at"], end, "the retention deadline moved: {got}");
        resume(&server, id).await;
        assert_eq!(sh(&server, id, "cat /home/user/mine.txt").await, "mine");
    }
    assert!(
        !sh(&server, &frozen, "pgrep -fx 'sleep 555'")
            .await
            .is_empty(),
        "the frozen sandbox's process is where it was"
    );
}

#[tokio::test]
async fn on_timeout_pause_then_auto_resume_by_the_next_request() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let (status, created) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 2, "autoPause": true,
               "autoResume": {"enabled": true}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().expect("id").to_string();
    let (_, detail) = e2b(
        &server,
        reqwest::Method::GET,
        &format!("/sandboxes/{id}"),
        json!({}),
    )
    .await;
    assert_eq!(
        detail["lifecycle"],
        json!({"onTimeout": "pause", "autoResume": true})
    );
    sh(&server, &id, "echo before > /home/user/f").await;
    let paused = eventually(Duration::from_secs(30), || async {
        state_of(&server, &id).await == "paused"
    })
    .await;
    assert!(paused, "not paused at its deadline: {}", server.log());
    assert_eq!(container_state(&id).as_deref(), Some("paused"), "frozen");
    // The next data-plane request resumes it, and succeeds.
    assert_eq!(envd(&server, &id, "process.Process/List").await, 200);
    assert_eq!(state_of(&server, &id).await, "running");
    assert_eq!(sh(&server, &id, "cat /home/user/f").await, "before");

    // Only the filesystem at the deadline, no auto-resume: traffic finds it gone (E2B's
    // 502), connect resumes it (201), then answers 200.
    let (status, created) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 2, "autoPause": true,
               "autoPauseMemory": false}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let cold = created["sandboxID"].as_str().expect("id").to_string();
    let paused = eventually(Duration::from_secs(30), || async {
        state_of(&server, &cold).await == "paused"
    })
    .await;
    assert!(paused, "not paused at its deadline: {}", server.log());
    assert_stopped(&cold);
    assert_eq!(envd(&server, &cold, "process.Process/List").await, 502);
    assert_eq!(state_of(&server, &cold).await, "paused");
    let connect = format!("/sandboxes/{cold}/connect");
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        &connect,
        json!({"timeout": 60}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        &connect,
        json!({"timeout": 60}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Refused combinations: 400.
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": "base", "autoResume": {"enabled": true}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn e2b_pause_modes_and_a_reboot_on_connect() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let (status, created) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": "base", "timeout": 300}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().expect("id").to_string();
    server.background(&id, "sleep 999").await;
    let pause_path = format!("/sandboxes/{id}/pause");
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        &pause_path,
        json!({"memory": true}),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = e2b(&server, reqwest::Method::POST, &pause_path, json!({})).await;
    assert_eq!(status, 409, "{body}");
    let (_, listed) = e2b(
        &server,
        reqwest::Method::GET,
        "/v2/sandboxes?state=paused",
        json!({}),
    )
    .await;
    assert!(
        listed
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s["sandboxID"] == id.as_str())),
        "{listed}"
    );
    // `on_resume: reboot` (memory false): from the filesystem, processes gone.
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        &format!("/sandboxes/{id}/connect"),
        json!({"timeout": 120, "memory": false}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        sh(&server, &id, "pgrep -fx 'sleep 999' || echo none").await,
        "none"
    );
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        &pause_path,
        json!({"memory": false}),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_stopped(&id);
    let (status, body) = e2b(
        &server,
        reqwest::Method::POST,
        &format!("/sandboxes/{id}/connect"),
        json!({"timeout": 120}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(sh(&server, &id, "echo up").await, "up");
}

/// Whether the engine has an image whose reference contains `part`.
fn engine_has_image(part: &str) -> bool {
    let out = tests::engine_command()
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .output()
        .expect("engine CLI");
    String::from_utf8_lossy(&out.stdout).contains(part)
}

#[tokio::test]
async fn snapshots_and_forks_start_sandboxes_from_a_capture_and_free_it() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let source = server
        .create_sandbox(json!({"template": "boots", "timeout": 600, "metadata": {"team": "a"}}))
        .await;
    sh(&server, &source, "echo captured > /home/user/c.txt").await;
    server.background(&source, "sleep 321").await;

    // A named snapshot through E2B's API; the source runs on.
    let path = format!("/sandboxes/{source}/snapshots");
    let (status, snap) = e2b(
        &server,
        reqwest::Method::POST,
        &path,
        json!({"name": "team-a-snap"}),
    )
    .await;
    assert_eq!(status, 201, "{snap}");
    assert_eq!(snap["names"], json!(["team-a-snap"]));
    let snap_id = snap["snapshotID"].as_str().expect("id").to_string();
    assert_eq!(state_of(&server, &source).await, "running");
    assert!(!sh(&server, &source, "pgrep -fx 'sleep 321'")
        .await
        .is_empty());
    let (status, again) = e2b(
        &server,
        reqwest::Method::POST,
        &path,
        json!({"name": "team-a-snap"}),
    )
    .await;
    assert_eq!(
        (status, &again["snapshotID"]),
        (201, &snap["snapshotID"]),
        "{again}"
    );
    let (status, listed) = e2b(
        &server,
        reqwest::Method::GET,
        &format!("/snapshots?sandboxID={source}"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        listed,
        json!([{"snapshotID": snap_id, "names": ["team-a-snap"]}])
    );

    // It survives a server crash, and sandboxes start from it: its files, not its
    // processes; the template's start command runs again.
    server.kill9();
    let server = Server::start(options).await;
    let (status, from) = e2b(
        &server,
        reqwest::Method::POST,
        "/sandboxes",
        json!({"templateID": snap_id, "timeout": 120}),
    )
    .await;
    assert_eq!(status, 201, "{from}");
    let from = from["sandboxID"].as_str().expect("id").to_string();
    assert_eq!(sh(&server, &from, "cat /home/user/c.txt").await, "captured");
    assert_eq!(
        sh(&server, &from, "pgrep -fx 'sleep 321' || echo none").await,
        "none"
    );
    let starts = eventually(Duration::from_secs(30), || async {
        server.run(&from, "wc -l < /home/user/starts.log").await.1["stdout"]
            .as_str()
            .is_some_and(|s| s.trim() == "2")
    })
    .await;
    assert!(
        starts,
        "the start command did not run again in the snapshot's sandbox"
    );
    let (status, body) = e2b(
        &server,
        reqwest::Method::DELETE,
        &format!("/templates/{snap_id}"),
        json!({}),
    )
    .await;
    assert_eq!(status, 409, "deleted while a sandbox uses it: {body}");

    // Fork of 3 through the native API: one capture, the source's metadata.
    let (status, forks) = json_of(
        server
            .post(
                &format!("/sandboxes/{source}/fork"),
                json!({"count": 3, "timeout": 120}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{forks}");
    let forks: Vec<String> = forks
        .as_array()
        .expect("results")
        .iter()
        .map(|f| {
            f["sandbox"]["sandbox_id"]
                .as_str()
                .expect("a fork")
                .to_string()
        })
        .collect();
    assert_eq!(forks.len(), 3);
    let (_, info) = json_of(server.get(&format!("/sandboxes/{}", forks[0])).await).await;
    let capture = info["template_id"].as_str().expect("template").to_string();
    assert_ne!(capture, snap_id);
    assert_eq!(info["metadata"]["team"], "a");
    for f in &forks {
        assert_eq!(sh(&server, f, "cat /home/user/c.txt").await, "captured");
    }
    assert!(engine_has_image(&capture), "the capture's image");
    let (status, _) = json_of(
        server
            .post(&format!("/sandboxes/{source}/fork"), json!({"count": 101}))
            .await,
    )
    .await;
    assert_eq!(status, 422, "a count over 100");

    // The capture goes with its last sandbox; the snapshot with its delete.
    for f in &forks {
        assert_eq!(
            server.delete(&format!("/sandboxes/{f}")).await.status(),
            200
        );
    }
    let freed = eventually(Duration::from_secs(90), || async {
        !engine_has_image(&capture)
    })
    .await;
    assert!(freed, "the fork's capture image outlived its sandboxes");
    assert_eq!(
        server.delete(&format!("/sandboxes/{from}")).await.status(),
        200
    );
    let (status, body) = json_of(server.delete(&format!("/snapshots/{snap_id}")).await).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !engine_has_image(&snap_id),
        "the snapshot's images are removed"
    );
    let (_, listed) = json_of(server.get("/snapshots").await).await;
    assert_eq!(listed, json!([]));
}

#[tokio::test]
async fn derived_images_no_template_needs_are_pruned() {
    let guard = tests::OwnerGuard::new();
    let base = format!(
        "colima-e2b-test/prune-{}:v1",
        sandbox_core::SandboxId::generate()
    );
    let tag = |from: &str| {
        let ok = tests::engine_command()
            .args(["tag", from, &base])
            .status()
            .expect("engine CLI")
            .success();
        assert!(ok, "tag {from} as {base}");
    };
    tag("colima-e2b/base:latest");
    let agent = sandbox_core::AgentBinary::load(&tests::agent_binary()).expect("agent");
    let manager = sandbox_core::SandboxManager::new(
        tests::test_backend().await,
        sandbox_core::ManagerConfig {
            owner: guard.0.clone(),
            templates: [("p".to_string(), sandbox_core::Template::new(&base))].into(),
            default_template: "p".into(),
            agent: Some(agent.clone()),
            prune_min_age: Duration::ZERO,
            ..Default::default()
        },
    );
    manager.start().await.expect("start");
    let derived_of = |manager: &sandbox_core::SandboxManager| {
        let manager = manager.clone();
        let base = base.clone();
        let agent = agent.clone();
        async move {
            let id = manager
                .backend()
                .image_info(&base)
                .await
                .expect("inspect")
                .and_then(|i| i.id);
            agent.derived_tag(&base, id.as_deref())
        }
    };
    let spec = || sandbox_core::SandboxSpec::new("p", Duration::from_secs(120));
    let first = manager.create(spec()).await.expect("create");
    let old = derived_of(&manager).await;
    assert!(engine_has_image(&old), "derived {old}");
    assert_eq!(
        manager.prune_derived_images().await,
        0,
        "in use, and current"
    );
    manager.kill(&first.id).await.expect("kill");

    // The base's name now means another image: the old derivation is stale.
    tag("colima-e2b/python:latest");
    let second = manager.create(spec()).await.expect("create again");
    let new = derived_of(&manager).await;
    assert_ne!(old, new);
    let gone = eventually(Duration::from_secs(60), || async {
        manager.prune_derived_images().await;
        !engine_has_image(&old)
    })
    .await;
    assert!(gone, "the stale derived image {old} was not pruned");
    assert!(engine_has_image(&new), "the current derivation was pruned");
    manager.kill(&second.id).await.expect("kill");
    let _ = eventually(Duration::from_secs(60), || async {
        manager.backend().remove_image(&new).await.is_ok()
    })
    .await;
    let _ = tests::engine_command().args(["rmi", &base]).status();
}

#[tokio::test]
async fn a_snapshots_files_count_against_the_quota_of_sandboxes_made_from_it() {
    let options = options();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let source = server
        .create_sandbox(json!({"template": "base", "timeout": 600, "disk_mb": 1200}))
        .await;
    sh(
        &server,
        &source,
        "dd if=/dev/zero of=/home/user/carried bs=1M count=300 2>/dev/null && sync",
    )
    .await;
    let (status, snap) = json_of(
        server
            .post(&format!("/sandboxes/{source}/snapshots"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{snap}");
    let snap = snap["snapshot_id"].as_str().expect("id").to_string();

    // With the same quota, the new sandbox holds the 300 MiB it started with and room
    // for about 900 more, not 1200 more (engines whose quota counts only writes would
    // otherwise let every generation of snapshots add a whole quota).
    let (status, made) = json_of(
        server
            .post(
                "/sandboxes/",
                json!({"template": snap, "timeout": 600, "disk_mb": 1200}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(
        made["disk_mb"], 1200,
        "the quota asked for is the one reported"
    );
    let id = made["sandbox_id"].as_str().expect("id").to_string();
    let (status, body) = server
        .run(
            &id,
            "dd if=/dev/zero of=/home/user/more bs=1M count=1100 2>/dev/null; echo status=$?; \
             du -sm /home/user | cut -f1",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let out = body["stdout"].as_str().unwrap_or_default().to_string();
    assert!(
        out.contains("status=1"),
        "1100 MiB more fit in a 1200 MiB quota that 300 MiB of snapshot files share: {out}"
    );
    let held: u64 = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("du");
    assert!(
        held <= 1200,
        "the sandbox holds {held} MiB under a 1200 MiB quota"
    );
    assert!(held >= 1000, "the quota stopped writes early: {held} MiB");
}
