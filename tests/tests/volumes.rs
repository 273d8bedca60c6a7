//! Volumes on the real server over real engines, through the native API and E2B's
//! volume content API: two sandboxes share one volume, its files outlive them and a
//! server SIGKILL, the content API answers only to the volume's token, and a deleted
//! volume frees its engine volume.

use serde_json::{json, Value};
use tests::{engine_command, json_of, OwnerCleanup, Server, ServerOptions};

const KEY: &str = "e2b_00112233445566778899aabbccddeeff00112233";

/// Runs `cmd` and returns its stdout (the command must succeed).
async fn sh(server: &Server, id: &str, cmd: &str) -> String {
    let (status, body) = server.run(id, cmd).await;
    assert_eq!(status, 200, "{cmd}: {body}");
    assert_eq!(body["exit_code"], 0, "{cmd}: {body}");
    body["stdout"].as_str().unwrap_or_default().to_string()
}

fn engine_volume_exists(id: &str) -> bool {
    engine_command()
        .args(["volume", "inspect", &format!("colima-e2b-vol-{id}")])
        .output()
        .expect("engine CLI")
        .status
        .success()
}

/// A content API request with `token` as its bearer token (no API key).
async fn content(
    server: &Server,
    method: reqwest::Method,
    volume: &str,
    op_and_query: &str,
    token: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .request(
            method,
            server.url(&format!("/volumecontent/{volume}/{op_and_query}")),
        )
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// GET `file?path=` of the content API: status and body.
async fn read(server: &Server, volume: &str, path: &str, token: &str) -> (u16, String) {
    let query = format!("file?path={path}");
    content(server, reqwest::Method::GET, volume, &query, token, None).await
}

#[tokio::test]
async fn a_volume_is_shared_outlives_its_sandboxes_and_a_server_sigkill() {
    let options = ServerOptions::new().env("COLIMA_E2B_E2B__API_KEY", KEY);
    let _cleanup = OwnerCleanup(options.clone());
    let mut server = Server::start(options.clone()).await;

    let (status, vol) = json_of(server.post("/volumes", json!({"name": "shared"})).await).await;
    assert_eq!(status, 200, "{vol}");
    let id = vol["volume_id"].as_str().expect("id").to_string();
    let token = vol["token"].as_str().expect("token").to_string();
    assert!(engine_volume_exists(&id));
    let (status, again) = json_of(server.post("/volumes", json!({"name": "shared"})).await).await;
    assert_eq!(
        (status, again["code"].clone()),
        (409, json!("conflict")),
        "{again}"
    );

    let mount = |path: &str| json!({"template": "base", "timeout": 600, "volume_mounts": [{"name": "shared", "path": path}]});
    let a = server.create_sandbox(mount("/mnt/data")).await;
    let b = server.create_sandbox(mount("/home/user/data")).await;
    let (_, got) = json_of(server.get(&format!("/sandboxes/{a}")).await).await;
    assert_eq!(
        got["volume_mounts"],
        json!([{"name": "shared", "path": "/mnt/data"}])
    );
    // The sandboxes' default user writes at the top of the volume; the other sees it.
    sh(&server, &a, "echo from-a > /mnt/data/a.txt").await;
    assert_eq!(
        sh(&server, &b, "cat /home/user/data/a.txt").await,
        "from-a\n"
    );

    // The content API: the volume's token only.
    let (status, text) = read(&server, &id, "a.txt", &token).await;
    assert_eq!((status, text.as_str()), (200, "from-a\n"));
    let (status, _) = read(&server, &id, "a.txt", "not-the-token").await;
    assert_eq!(status, 401);
    // Neither the volume's name nor a percent-encoded form of it opens it without the
    // token.
    for alias in ["shared", "%73hared", &id.replacen('_', "%5F", 1)] {
        let (status, _) = read(&server, alias, "a.txt", "not-the-token").await;
        assert!(matches!(status, 401 | 404), "{alias}: {status}");
        let (status, _) = reqwest::Client::new()
            .get(server.url(&format!("/volumecontent/{alias}/file?path=a.txt")))
            .send()
            .await
            .map(|r| (r.status().as_u16(), ()))
            .expect("request");
        assert!(
            matches!(status, 401 | 404),
            "{alias} without a token: {status}"
        );
    }
    let (status, stat) = content(
        &server,
        reqwest::Method::PUT,
        &id,
        "file?path=dir/c.txt",
        &token,
        Some("from-api"),
    )
    .await;
    assert_eq!(status, 201, "{stat}");
    let stat: Value = serde_json::from_str(&stat).expect("json");
    assert_eq!(
        (stat["path"].clone(), stat["size"].clone()),
        (json!("/dir/c.txt"), json!(8))
    );
    assert_eq!(
        sh(&server, &b, "cat /home/user/data/dir/c.txt").await,
        "from-api"
    );

    // Mounted, it cannot go.
    let (status, refused) = json_of(server.delete(&format!("/volumes/{id}")).await).await;
    assert_eq!(status, 409, "{refused}");

    // Across a server SIGKILL: the volume, its token and its files are found again.
    server.kill9();
    let server = Server::start(options).await;
    let (_, listed) = json_of(server.get("/volumes").await).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["volume_id"], json!(id));
    let (_, got) = json_of(server.get(&format!("/volumes/{id}")).await).await;
    assert_eq!(got["token"], json!(token));
    let (_, got) = json_of(server.get(&format!("/sandboxes/{b}")).await).await;
    assert_eq!(got["volume_mounts"][0]["name"], "shared", "{got}");
    let (status, text) = read(&server, &id, "dir/c.txt", &token).await;
    assert_eq!((status, text.as_str()), (200, "from-api"));

    for s in [&a, &b] {
        let resp = server.delete(&format!("/sandboxes/{s}")).await;
        assert_eq!(resp.status().as_u16(), 200);
    }
    let c = server.create_sandbox(mount("/data")).await;
    assert_eq!(
        sh(&server, &c, "cat /data/a.txt /data/dir/c.txt").await,
        "from-a\nfrom-api"
    );
    let resp = server.delete(&format!("/sandboxes/{c}")).await;
    assert_eq!(resp.status().as_u16(), 200);

    let (status, gone) = json_of(server.delete(&format!("/volumes/{id}")).await).await;
    assert_eq!(status, 200, "{gone}");
    assert!(!engine_volume_exists(&id), "the engine volume is left");
    let (status, _) = json_of(server.get(&format!("/volumes/{id}")).await).await;
    assert_eq!(status, 404);
    let (status, _) = read(&server, &id, "a.txt", &token).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn mounts_name_known_volumes_at_plain_paths() {
    let options = ServerOptions::new().env("COLIMA_E2B_E2B__API_KEY", KEY);
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let (status, _) = json_of(server.post("/volumes", json!({"name": "v1"})).await).await;
    assert_eq!(status, 200);
    for (name, path) in [
        ("nope", "/mnt/x"),
        ("v1", "relative"),
        ("v1", "/proc/x"),
        ("v1", "/"),
        ("v1", "/mnt/../etc"),
    ] {
        let (status, body) = json_of(
            server
                .post(
                    "/sandboxes/",
                    json!({"template": "base", "volume_mounts": [{"name": name, "path": path}]}),
                )
                .await,
        )
        .await;
        assert_eq!(status, 422, "{name} at {path}: {body}");
    }
    let (status, body) = json_of(
        server
            .post(
                "/sandboxes/",
                json!({"template": "base", "volume_mounts": [
                    {"name": "v1", "path": "/mnt/a"}, {"name": "v1", "path": "/mnt/a/"}]}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 422, "two mounts at one path: {body}");
    let (status, body) = json_of(server.post("/volumes", json!({"name": "a/b"})).await).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        json_of(server.get("/sandboxes/").await).await.1,
        json!([]),
        "a refused create left a sandbox"
    );
}
