//! Harness for the end-to-end suites: starts the real `colima-e2b` binary on a free
//! port against a real engine, and cleans up what a test leaves behind.
//!
//! Each server gets its own owner name and state directory, so suites running in
//! parallel never adopt or reap each other's sandboxes.

pub mod raw;
pub mod testhosts;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Path of the server binary: `COLIMA_E2B_BIN`, else the workspace's debug build.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("COLIMA_E2B_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug").join("colima-e2b");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p colima-e2b` first or set COLIMA_E2B_BIN",
        bin.display()
    );
    bin
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}{:x}", std::process::id(), nanos)
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Owner label of its sandboxes.
    pub owner: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `server`.
    pub args: Vec<String>,
    /// Backend name.
    pub backend: String,
}

impl ServerOptions {
    /// Fresh owner and state directory; backend from `COLIMA_E2B_TEST_BACKEND` (docker).
    pub fn new() -> Self {
        let owner = format!("e2e-{}", random_suffix());
        let state_dir = std::env::temp_dir().join(format!("colima-e2b-{owner}"));
        Self {
            owner,
            state_dir,
            env: Vec::new(),
            args: Vec::new(),
            backend: std::env::var("COLIMA_E2B_TEST_BACKEND").unwrap_or_else(|_| "docker".into()),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Puts the sandboxes on networks of their own, `colima-e2b-test-<name>` (and its
    /// `-offline` twin), on either engine: their bridges get a host firewall table of
    /// their own, so a test can change `[network]` without touching the other suites'
    /// sandboxes, which share the default networks' table.
    pub fn own_networks(self, name: &str) -> Self {
        let online = format!("colima-e2b-test-{name}");
        let offline = format!("{online}-offline");
        self.env("COLIMA_E2B_DOCKER__NETWORK", &online)
            .env("COLIMA_E2B_DOCKER__OFFLINE_NETWORK", &offline)
            .env("COLIMA_E2B_PODMAN__NETWORK", &online)
            .env("COLIMA_E2B_PODMAN__OFFLINE_NETWORK", &offline)
    }

    fn command(&self, port: u16) -> Command {
        let mut cmd = Command::new(server_binary());
        cmd.arg("server")
            .args(["--port", &port.to_string(), "--backend", &self.backend])
            .args(&self.args)
            .env("COLIMA_E2B_OWNER", &self.owner)
            .env("COLIMA_E2B_STATE_DIR", &self.state_dir)
            .env("COLIMA_E2B_LOG_LEVEL", "info")
            // Suites that are not about the warm pool start none (the `pool` suite asks).
            .env("COLIMA_E2B_POOL__BASE", "0")
            .env_remove("COLIMA_E2B_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the server to completion (for startup failures); returns status and stderr.
    pub fn run_to_exit(&self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self
            .command(free_port())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn colima-e2b");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("colima-e2b did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// A running server process; killed (SIGKILL) when dropped.
pub struct Server {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// How it was started (reuse to restart with the same owner and state).
    pub options: ServerOptions,
    child: Option<Child>,
    log: PathBuf,
    /// HTTP client for the tests.
    pub http: reqwest::Client,
}

impl Server {
    /// Starts a server and waits until `/health` answers.
    pub async fn start(options: ServerOptions) -> Self {
        let port = free_port();
        let log = options.state_dir.with_extension(format!("{port}.log"));
        std::fs::create_dir_all(&options.state_dir).expect("state dir");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = options
            .command(port)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn colima-e2b");
        let mut server = Self {
            url: format!("http://127.0.0.1:{port}"),
            options,
            child: Some(child),
            log,
            http: reqwest::Client::new(),
        };
        for _ in 0..300 {
            if server.http.get(server.url("/health")).send().await.is_ok() {
                return server;
            }
            if let Some(child) = server.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("server exited with {status}: {}", server.log());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server did not answer within 30 s: {}", server.log());
    }

    /// Full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// The key `colima-e2b env` prints for this server (generated into its state
    /// directory on first start).
    pub fn api_key(&self) -> String {
        let path = self
            .options
            .state_dir
            .join(&self.options.owner)
            .join("e2b-api-key");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the URL")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the server process, bytes (from `/proc`).
    pub fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server is running");
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        for _ in 0..200 {
            if let Ok(Some(s)) = c.try_wait() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        panic!("server did not exit within 10 s of SIGTERM: {}", self.log());
    }

    /// POSTs JSON.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// GETs a path.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("request")
    }

    /// Creates a sandbox through the native API; returns its id (the create must succeed).
    pub async fn create_sandbox(&self, body: serde_json::Value) -> String {
        let (status, body) = json_of(self.post("/sandboxes/", body).await).await;
        assert_eq!(status, 200, "create: {body}");
        body["sandbox_id"].as_str().expect("sandbox_id").to_string()
    }

    /// Runs `cmd` in sandbox `id` through the native API; returns the status and answer.
    pub async fn run(&self, id: &str, cmd: &str) -> (u16, serde_json::Value) {
        json_of(
            self.post(
                &format!("/sandboxes/{id}/commands/run"),
                serde_json::json!({"cmd": cmd, "timeout": 120}),
            )
            .await,
        )
        .await
    }

    /// Starts `cmd` in sandbox `id` in the background through the native API; its pid.
    pub async fn background(&self, id: &str, cmd: &str) -> u64 {
        let (status, body) = json_of(
            self.post(
                &format!("/sandboxes/{id}/commands/run/background"),
                serde_json::json!({"cmd": cmd}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["pid"].as_u64().expect("pid")
    }

    /// The sum of the `/metrics` series named `name` whose labels include every pair of
    /// `labels` (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics").await.text().await.expect("metrics");
        metric_sum(&text, name, labels)
    }

    /// DELETEs a path.
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The status and JSON body of a response (a body that is not JSON becomes a string).
pub async fn json_of(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, body)
}

/// The container engine's name for checks from outside the server (`docker` or `podman`).
pub fn engine_cli() -> String {
    std::env::var("COLIMA_E2B_TEST_BACKEND").unwrap_or_else(|_| "docker".into())
}

/// The engine's CLI, talking to the same service the server does (Podman's local CLI
/// would read its own storage rather than the service's).
pub fn engine_command() -> Command {
    let engine = engine_cli();
    let mut cmd = Command::new(&engine);
    if engine == "podman" {
        cmd.args(["--remote", "--url", "unix:///run/podman/podman.sock"]);
    }
    cmd
}

/// Whether the engine has a container for sandbox `id`, and its state.
pub fn container_state(id: &str) -> Option<String> {
    let out = engine_command()
        .args([
            "inspect",
            "--format",
            "{{.State.Status}}",
            &format!("colima-e2b-{id}"),
        ])
        .output()
        .expect("engine CLI");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The sum of the series named `name` in Prometheus text `text` whose labels include
/// every pair of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// Ids of every container of `owner`, sorted.
pub fn owner_containers(owner: &str) -> Vec<String> {
    let out = engine_command()
        .args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=dev.colima-e2b.owner={owner}"),
        ])
        .output()
        .expect("engine CLI");
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    ids.sort();
    ids
}

/// Removes every container of `owner` (test cleanup); returns how many there were.
pub fn remove_owner_containers(owner: &str) -> usize {
    let out = engine_command()
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.colima-e2b.owner={owner}"),
        ])
        .output()
        .expect("engine CLI");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        let _ = engine_command().arg("rm").arg("-f").args(&ids).output();
    }
    ids.len()
}

/// Removes every engine volume of `owner` (test cleanup, after its containers); returns
/// how many there were.
pub fn remove_owner_volumes(owner: &str) -> usize {
    let out = engine_command()
        .args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=dev.colima-e2b.owner={owner}"),
        ])
        .output()
        .expect("engine CLI");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !names.is_empty() {
        let _ = engine_command()
            .args(["volume", "rm", "-f"])
            .args(&names)
            .output();
    }
    names.len()
}

/// Removes an owner's containers, volumes and state directory when dropped.
pub struct OwnerCleanup(pub ServerOptions);

impl Drop for OwnerCleanup {
    fn drop(&mut self) {
        remove_owner_containers(&self.0.owner);
        remove_owner_volumes(&self.0.owner);
        // Its sandboxes' egress rules, which a server keeps through a crash and only
        // drops itself when it restarts or kills them.
        let table = sandbox_core::network::egress_table::table_name(&self.0.owner);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &table])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.0.state_dir);
    }
}

/// The static agent build the suites put into sandboxes: `COLIMA_E2B_AGENT_BINARY`, else
/// the workspace's deploy/build-agent.sh output.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("COLIMA_E2B_AGENT_BINARY") {
        return PathBuf::from(p);
    }
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-gnu/agent/sandbox-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `bash deploy/build-agent.sh` first",
        bin.display()
    );
    bin
}

/// The engine named by `COLIMA_E2B_TEST_BACKEND` (docker by default), connected.
pub async fn test_backend() -> sandbox_core::DynBackend {
    let backend: sandbox_core::DynBackend = match engine_cli().as_str() {
        "podman" => std::sync::Arc::new(
            backend_podman::PodmanBackend::connect(Default::default())
                .await
                .expect("podman answers (bash deploy/engines.sh)"),
        ),
        _ => std::sync::Arc::new(
            backend_docker::DockerBackend::connect(Default::default())
                .await
                .expect("docker answers (bash deploy/engines.sh)"),
        ),
    };
    backend
}

/// A started manager over the test engine whose sandboxes run the agent, with its own
/// owner (so parallel tests never touch each other's sandboxes).
pub async fn agent_manager(owner: &str) -> sandbox_core::SandboxManager {
    let agent = sandbox_core::AgentBinary::load(&agent_binary()).expect("agent binary loads");
    let mut templates = std::collections::BTreeMap::new();
    templates.insert(
        "base".to_string(),
        sandbox_core::Template::new("colima-e2b/base:latest"),
    );
    let manager = sandbox_core::SandboxManager::new(
        test_backend().await,
        sandbox_core::ManagerConfig {
            owner: owner.to_string(),
            templates,
            agent: Some(agent),
            ..Default::default()
        },
    );
    manager.start().await.expect("manager starts");
    manager
}

/// A fresh owner name whose containers are removed when the guard drops.
pub struct OwnerGuard(pub String);

impl OwnerGuard {
    /// A new unique owner.
    pub fn new() -> Self {
        Self(format!("e2e-{}", sandbox_core::SandboxId::generate()))
    }
}

impl Default for OwnerGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        remove_owner_containers(&self.0);
    }
}
