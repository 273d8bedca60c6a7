//! Templates built by the server from a Dockerfile (the native API and the CLI), on a real
//! engine (`COLIMA_E2B_TEST_BACKEND`): live build logs, the template's files, envs, start
//! and ready commands inside its sandboxes, the layer cache, a failing step reported at
//! its number with nothing left behind, a base that is not local, persistence across a
//! restart, and removal.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tests::{engine_command, json_of, OwnerCleanup, Server, ServerOptions};

/// A gzip tar of `files` (path, contents).
fn context(files: &[(&str, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, data.as_bytes())
            .expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

/// Starts a build of `name`; returns the build id.
async fn build(server: &Server, name: &str, query: &[(&str, &str)], body: Vec<u8>) -> String {
    let resp = server
        .http
        .post(server.url(&format!("/templates/{name}/builds")))
        .query(query)
        .header("content-type", "application/x-tar")
        .body(body)
        .send()
        .await
        .expect("build request");
    let (status, out) = json_of(resp).await;
    assert_eq!(status, 202, "{out}");
    assert_eq!(out["name"], name);
    out["build_id"].as_str().expect("build_id").to_string()
}

/// Follows the build's log to its end; returns the entries.
async fn follow(server: &Server, name: &str, build_id: &str) -> Vec<Value> {
    let resp = server
        .http
        .get(server.url(&format!("/templates/{name}/builds/{build_id}/logs")))
        .query(&[("follow", "true")])
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .expect("logs");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let text = resp.text().await.expect("log stream");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

async fn build_status(server: &Server, name: &str, build_id: &str) -> Value {
    let (status, out) = json_of(
        server
            .get(&format!("/templates/{name}/builds/{build_id}"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{out}");
    out
}

async fn sh(server: &Server, id: &str, cmd: &str) -> String {
    let (status, out) = server.run(id, cmd).await;
    assert_eq!(status, 200, "{cmd}: {out}");
    assert_eq!(out["exit_code"], 0, "{cmd}: {out}");
    out["stdout"].as_str().unwrap_or_default().to_string()
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

fn image_exists(image: &str) -> bool {
    engine_command()
        .args(["image", "inspect", image])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Every image reference in the engine that contains `needle` (a template's id names
/// its builds' tags and the tags derived from them with the agent).
fn images_naming(needle: &str) -> Vec<String> {
    let out = engine_command()
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .output()
        .expect("list images");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Whether image `id`'s history has a step containing `marker`.
fn history_mentions(id: &str, marker: &str) -> bool {
    let out = engine_command()
        .args(["history", "--no-trunc", "--format", "{{.CreatedBy}}", id])
        .output()
        .expect("engine history");
    String::from_utf8_lossy(&out.stdout).contains(marker)
}

fn dangling_images() -> BTreeSet<String> {
    let out = engine_command()
        .args(["images", "-q", "--filter", "dangling=true"])
        .output()
        .expect("engine images");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A Dockerfile whose RUN step no earlier build on the engine can have cached (the
/// engine's layer cache outlives test runs), so the first build really runs it.
fn dockerfile(marker: &str) -> String {
    format!(
        "FROM colima-e2b/base:latest\n\
         RUN echo {marker} && echo from-run > /etc/tpl-marker\n\
         COPY app.txt /home/user/app.txt\n\
         ENV TPL_ENV=from-dockerfile\n"
    )
}

#[tokio::test]
async fn a_dockerfile_becomes_a_template_with_its_files_envs_and_start_command() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;
    let name = unique("native");
    let marker = unique("build-marker-output");
    let dockerfile = dockerfile(&marker);
    let files = [
        ("Dockerfile", dockerfile.as_str()),
        ("app.txt", "hello from the context\n"),
    ];
    let build_id = build(
        &server,
        &name,
        &[
            ("start_cmd", "sleep 4242"),
            ("ready_cmd", "test -f /etc/tpl-marker"),
        ],
        context(&files),
    )
    .await;
    let log = follow(&server, &name, &build_id).await;
    let messages: Vec<&str> = log.iter().filter_map(|e| e["message"].as_str()).collect();
    assert!(
        messages.iter().any(|m| m.starts_with("Step 2/")),
        "{messages:?}"
    );
    // The RUN step's own output, logged at its step.
    let output = log
        .iter()
        .find(|e| e["message"] == marker.as_str())
        .unwrap_or_else(|| panic!("RUN output missing: {messages:?}"));
    assert_eq!(output["step"], "2");
    let status = build_status(&server, &name, &build_id).await;
    assert_eq!(status["status"], "ready", "{status}");
    assert_eq!(status["tags"], json!(["default"]));
    let image = status["image"].as_str().expect("image").to_string();
    assert!(image_exists(&image), "{image}");

    let (code, list) = json_of(server.get("/templates").await).await;
    assert_eq!(code, 200);
    let listed = list
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listed["source"], "built");
    assert_eq!(listed["start_cmd"], "sleep 4242");

    let id = server
        .create_sandbox(json!({"template": name, "timeout": 300}))
        .await;
    assert_eq!(sh(&server, &id, "cat /etc/tpl-marker").await, "from-run\n");
    assert_eq!(
        sh(&server, &id, "cat /home/user/app.txt").await,
        "hello from the context\n"
    );
    assert_eq!(sh(&server, &id, "echo $TPL_ENV").await, "from-dockerfile\n");
    // The start command runs, as the template's user.
    let ps = sh(&server, &id, "ps -eo user:20,args | grep '[s]leep 4242'").await;
    assert!(ps.starts_with("user "), "{ps}");

    // In use: removal is refused.
    let (code, body) = json_of(server.delete(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 409, "{body}");

    // An unchanged rebuild answers every step from the layer cache.
    let again = build(&server, &name, &[], context(&files)).await;
    let log = follow(&server, &name, &again).await;
    let cached = log.iter().filter(|e| e["message"] == "cached").count();
    assert!(cached >= 3, "{log:?}");

    // The template survives a restart, and sandboxes are still made from it.
    server.terminate();
    let server = Server::start(options).await;
    let (code, got) = json_of(server.get(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["builds"].as_array().map(Vec::len), Some(2), "{got}");
    let (code, _) = json_of(server.delete(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(code, 200);
    let id = server
        .create_sandbox(json!({"template": format!("{name}:default"), "timeout": 120}))
        .await;
    assert_eq!(sh(&server, &id, "cat /etc/tpl-marker").await, "from-run\n");
    let (code, _) = json_of(server.delete(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(code, 200);

    let template_id = got["id"].as_str().expect("template id").to_string();
    let (code, body) = json_of(server.delete(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 200, "{body}");
    assert!(!image_exists(&image), "the template's image is removed");
    // Both builds' images and the images derived from them for sandboxes, although the
    // last sandbox's container was still being deleted when the removal came.
    assert_eq!(images_naming(&template_id), Vec::<String>::new());
    let (code, _) = json_of(server.get(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 404);
    let (code, body) = json_of(server.post("/sandboxes/", json!({"template": name})).await).await;
    assert_eq!(code, 422, "{body}");
}

#[tokio::test]
async fn a_failing_step_is_reported_at_its_number_and_leaves_no_images() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let name = unique("failing");
    let before = dangling_images();
    // Names this build's steps in the engine's image history (other builds may run).
    // The failing step pauses before it fails: Podman 4.3's build endpoint can drop the
    // output written in the instant before a step fails (see README, Building templates).
    let marker = unique("marker");
    let dockerfile = format!(
        "FROM colima-e2b/base:latest\n\
         RUN echo {marker} > /tmp/one\n\
         RUN echo about to fail && sleep 1 && exit 3\n\
         RUN echo never\n"
    );
    let build_id = build(&server, &name, &[], context(&[("Dockerfile", &dockerfile)])).await;
    let log = follow(&server, &name, &build_id).await;
    let status = build_status(&server, &name, &build_id).await;
    assert_eq!(status["status"], "error", "{status}");
    assert_eq!(status["failed_step"], "3", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains('3'), "{error}");
    let last = log.last().expect("log");
    assert_eq!(last["level"], "error");
    assert_eq!(last["step"], "3");
    assert!(
        log.iter().any(|e| e["message"] == "about to fail"),
        "{log:?}"
    );
    assert!(!log.iter().any(|e| e["message"] == "never"), "{log:?}");
    let left: Vec<String> = dangling_images()
        .difference(&before)
        .filter(|id| history_mentions(id, &marker))
        .cloned()
        .collect();
    assert!(
        left.is_empty(),
        "a failed build left dangling images {left:?}"
    );
    // A template whose only build failed makes no sandboxes.
    let (code, body) = json_of(server.post("/sandboxes/", json!({"template": name})).await).await;
    assert_eq!(code, 422, "{body}");
    let (code, _) = json_of(server.delete(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn a_base_that_is_not_local_is_named_and_bad_requests_are_refused() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let name = unique("nobase");
    let build_id = build(
        &server,
        &name,
        &[],
        context(&[(
            "Dockerfile",
            "FROM colima-e2b-test/not-a-local-image:1\nRUN true\n",
        )]),
    )
    .await;
    follow(&server, &name, &build_id).await;
    let status = build_status(&server, &name, &build_id).await;
    assert_eq!(status["status"], "error", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("colima-e2b-test/not-a-local-image"),
        "{error}"
    );
    let (code, _) = json_of(server.delete(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 200);

    // Configured templates cannot be rebuilt or removed; bad names are refused.
    let resp = server
        .http
        .post(server.url("/templates/base/builds"))
        .body(context(&[("Dockerfile", "FROM scratch\n")]))
        .send()
        .await
        .expect("request");
    let (code, body) = json_of(resp).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("configuration")));
    let (code, body) = json_of(server.delete("/templates/base").await).await;
    assert_eq!(code, 409, "{body}");
    let resp = server
        .http
        .post(server.url("/templates/-bad/builds"))
        .body(context(&[("Dockerfile", "FROM scratch\n")]))
        .send()
        .await
        .expect("request");
    let (code, body) = json_of(resp).await;
    assert_eq!(code, 422, "{body}");
    assert!(body["code"].is_string() && body["message"].is_string());
    let (code, _) = json_of(server.get("/templates/never-built").await).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_ready_command_that_never_passes_fails_the_create_with_its_output() {
    let options = ServerOptions::new().env("COLIMA_E2B_BUILDS__READY_TIMEOUT", "3");
    let cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let name = unique("notready");
    let build_id = build(
        &server,
        &name,
        &[("ready_cmd", "echo still-warming-up; exit 1")],
        context(&[("Dockerfile", "FROM colima-e2b/base:latest\n")]),
    )
    .await;
    follow(&server, &name, &build_id).await;
    assert_eq!(
        build_status(&server, &name, &build_id).await["status"],
        "ready"
    );
    let (code, body) = json_of(
        server
            .post("/sandboxes/", json!({"template": name, "timeout": 60}))
            .await,
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("still-warming-up"), "{message}");
    assert!(message.contains("exit code 1"), "{message}");
    // Nothing of the failed create is left.
    let (_, list) = json_of(server.get("/sandboxes/").await).await;
    assert_eq!(list, json!([]));
    assert_eq!(tests::remove_owner_containers(&cleanup.0.owner), 0);
    let (code, _) = json_of(server.delete(&format!("/templates/{name}")).await).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_builds_with_live_logs_lists_and_removes() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let port = server.url.rsplit(':').next().expect("port").to_string();
    let dir = options.state_dir.join("cli-context");
    std::fs::create_dir_all(dir.join("sub")).expect("context dir");
    std::fs::write(dir.join("sub/data.txt"), "cli data\n").expect("file");
    // A RUN no earlier build can have cached, so its output is in the live log.
    let run_output = unique("cli-run-output");
    std::fs::write(
        dir.join("Build.dockerfile"),
        format!(
            "FROM colima-e2b/base:latest\nCOPY sub/data.txt /opt/data.txt\nRUN echo {run_output}\n"
        ),
    )
    .expect("dockerfile");
    let name = unique("cli");
    let cli = |args: &[&str]| {
        std::process::Command::new(tests::server_binary())
            .arg("template")
            .args(args)
            .args(["--port", &port])
            .env("COLIMA_E2B_OWNER", &options.owner)
            .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
            .env_remove("COLIMA_E2B_CONFIG")
            .output()
            .expect("run the CLI")
    };
    let dockerfile = dir.join("Build.dockerfile");
    let out = tokio::task::block_in_place(|| {
        cli(&[
            "build",
            &format!("{name}:v1"),
            "-f",
            dockerfile.to_str().expect("utf-8"),
            dir.to_str().expect("utf-8"),
        ])
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("==> Step 2/3"), "{stdout}");
    assert!(stdout.contains(&run_output), "{stdout}");
    assert!(stderr.contains("sending the build context"), "{stderr}");
    assert!(
        stderr.contains(&format!("built template {name}")),
        "{stderr}"
    );

    let id = server
        .create_sandbox(json!({"template": format!("{name}:v1"), "timeout": 120}))
        .await;
    assert_eq!(sh(&server, &id, "cat /opt/data.txt").await, "cli data\n");
    let (code, _) = json_of(server.delete(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(code, 200);

    let out = tokio::task::block_in_place(|| cli(&["ls"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains("built") && line.contains("ready") && line.contains("v1"),
        "{line}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("base ")), "{stdout}");

    // A failing build exits non-zero with the step's error.
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM colima-e2b/base:latest\nRUN exit 9\n",
    )
    .expect("dockerfile");
    let broken = unique("cli-broken");
    let out =
        tokio::task::block_in_place(|| cli(&["build", &broken, dir.to_str().expect("utf-8")]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains('9'), "{stderr}");

    for n in [&name, &broken] {
        let out = tokio::task::block_in_place(|| cli(&["rm", n]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = tokio::task::block_in_place(|| cli(&["rm", &name]));
    assert!(!out.status.success(), "removing twice fails");
}
