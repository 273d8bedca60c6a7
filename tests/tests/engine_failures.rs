//! What the server does when its engine is missing at startup or goes away later.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tests::{OwnerCleanup, Server, ServerOptions};
use tokio::net::{UnixListener, UnixStream};

/// The engine's socket on these machines and the variable that points a backend elsewhere.
fn engine_socket() -> (&'static str, &'static str, &'static str) {
    match tests::engine_cli().as_str() {
        "podman" => (
            "/run/podman/podman.sock",
            "CONTAINER_HOST",
            "podman system service",
        ),
        _ => ("/var/run/docker.sock", "DOCKER_HOST", "start Docker"),
    }
}

#[tokio::test]
async fn unreachable_engine_at_startup_prints_one_clear_line_and_exits() {
    let (_, variable, advice) = engine_socket();
    let options = ServerOptions::new().env(variable, "unix:///tmp/colima-e2b-no-engine-here.sock");
    let (status, stderr) = options.run_to_exit(Duration::from_secs(30));
    assert!(!status.success(), "server started without an engine");
    let line: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("colima-e2b: error"))
        .collect();
    assert_eq!(line.len(), 1, "expected one error line, got: {stderr}");
    assert!(
        line[0].contains("/tmp/colima-e2b-no-engine-here.sock"),
        "{stderr}"
    );
    assert!(line[0].contains(advice), "no advice: {stderr}");
}

/// A unix socket that forwards to the real engine socket until stopped.
struct EngineProxy {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl EngineProxy {
    fn start(target: &'static str) -> Self {
        let path =
            std::env::temp_dir().join(format!("colima-e2b-proxy-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind proxy socket");
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut upstream) = UnixStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Self { path, task }
    }

    /// Stops accepting and drops every open connection, as a stopped engine would.
    fn stop(&self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn engine_that_goes_away_turns_health_and_creates_into_503() {
    let (socket, variable, _) = engine_socket();
    let proxy = EngineProxy::start(socket);
    let options = ServerOptions::new().env(variable, &format!("unix://{}", proxy.path.display()));
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    assert_eq!(server.get("/health").await.status(), 200);
    // Each scrape asks the engine, so an idle server's Prometheus sees it go.
    assert_eq!(server.metric("colima_e2b_engine_up", &[]).await, 1.0);

    proxy.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = server.get("/metrics").await.text().await.expect("metrics");
    let up: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("colima_e2b_engine_up{"))
        .collect();
    assert!(
        up.len() == 1 && up[0].ends_with(" 0"),
        "a scrape after the engine went away: {up:?}"
    );
    let resp = server.get("/health").await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["engine"]["reachable"], false);
    assert!(body["engine"]["error"].as_str().is_some());

    let resp = server
        .post("/sandboxes/", json!({"template": "base"}))
        .await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "engine_unavailable");
    // The server itself keeps answering.
    assert_eq!(server.get("/sandboxes/").await.status(), 200);
}
