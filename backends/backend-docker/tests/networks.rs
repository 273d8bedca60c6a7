//! Docker's sandbox networks, verified with real containers: sandboxes cannot reach each
//! other, offline sandboxes cannot reach outside hosts, and servers starting at once
//! survive the same-named twin networks old engines let them create.

use std::collections::BTreeMap;

use backend_docker::{DockerBackend, DockerConfig};
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::StreamExt;
use sandbox_core::{ContainerSpec, Limits, SandboxBackend, SandboxId};

fn image() -> String {
    std::env::var("COLIMA_E2B_TEST_IMAGE").unwrap_or_else(|_| "colima-e2b/base:latest".into())
}

async fn backend() -> DockerBackend {
    DockerBackend::connect(DockerConfig::default())
        .await
        .unwrap_or_else(|e| {
            panic!("these tests need a running Docker engine ({e}); run deploy/engines.sh")
        })
}

fn spec(tag: &str, command: &[&str], internet: bool) -> ContainerSpec {
    let mut labels = BTreeMap::new();
    labels.insert(
        "dev.colima-e2b.conformance".to_string(),
        "profile".to_string(),
    );
    ContainerSpec {
        name: format!("colima-e2b-profile-{tag}-{}", SandboxId::generate()),
        image: image(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        labels,
        limits: Limits {
            cpus: 0.5,
            memory_mb: 128,
            pids: 64,
            disk_mb: None,
        },
        internet,
        user: None,
        agent_port: None,
        profile: Default::default(),
        volumes: Vec::new(),
    }
}

/// Runs `cmd` in the container with the engine's exec; returns (exit code, output).
async fn exec(backend: &DockerBackend, name: &str, cmd: &str) -> (i64, String) {
    let docker = backend.client();
    let created = docker
        .create_exec(
            name,
            CreateExecOptions {
                cmd: Some(vec!["/bin/sh", "-c", cmd]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("create exec");
    let mut out = String::new();
    if let StartExecResults::Attached { mut output, .. } = docker
        .start_exec(&created.id, None)
        .await
        .expect("start exec")
    {
        while let Some(Ok(chunk)) = output.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
    }
    let code = docker
        .inspect_exec(&created.id)
        .await
        .expect("inspect exec")
        .exit_code
        .unwrap_or(-1);
    (code, out)
}

#[tokio::test]
async fn sandboxes_cannot_reach_each_other() {
    let backend = backend().await;
    let server = spec(
        "icc-server",
        &["python3", "-m", "http.server", "8080"],
        true,
    );
    let client = spec("icc-client", &["sleep", "infinity"], true);
    backend.create(&server).await.expect("create server");
    backend.create(&client).await.expect("create client");
    let server_addr = backend
        .agent_address(&server.name, 8080)
        .await
        .expect("server address");
    // The host reaches the server (so it is listening) ...
    let mut host_ok = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(server_addr.addr)
            .await
            .is_ok()
        {
            host_ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // ... but the other sandbox does not.
    let probe = format!(
        "python3 -c \"import socket; socket.create_connection(('{}', 8080), timeout=3)\"",
        server_addr.addr.ip()
    );
    let (code, _) = exec(&backend, &client.name, &probe).await;
    backend.remove(&server.name).await.expect("remove");
    backend.remove(&client.name).await.expect("remove");
    assert!(host_ok, "the host could not reach the sandbox's port");
    assert_ne!(code, 0, "one sandbox reached another");
}

/// A test host outside the sandbox networks: a network namespace of this machine with
/// a veth link and a TCP listener, standing in for "the internet".
struct OutsideHost {
    ns: String,
    veth: String,
    addr: String,
    listener: std::process::Child,
}

fn sh(cmd: &str) {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("run sh");
    assert!(status.success(), "`{cmd}` failed (these tests run as root)");
}

impl OutsideHost {
    fn start() -> Self {
        let n = std::process::id() % 200 + 20;
        let ns = format!("ce2b-ext{n}");
        let veth = format!("ce2b-h{n}");
        let peer = format!("ce2b-x{n}");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &veth])
            .status();
        sh(&format!(
            "ip netns add {ns} && ip link add {veth} type veth peer name {peer} && \
             ip link set {peer} netns {ns} && ip addr add 198.18.{n}.1/30 dev {veth} && \
             ip link set {veth} up && ip -n {ns} addr add 198.18.{n}.2/30 dev {peer} && \
             ip -n {ns} link set {peer} up && ip -n {ns} link set lo up && \
             ip -n {ns} route add default via 198.18.{n}.1"
        ));
        let listener = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('0.0.0.0',8099))\ns.listen()\nwhile True: s.accept()[0].close()",
            )
            .spawn()
            .expect("start listener");
        Self {
            ns,
            veth,
            addr: format!("198.18.{n}.2"),
            listener,
        }
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[tokio::test]
async fn offline_sandbox_cannot_reach_outside_hosts() {
    let backend = backend().await;
    let outside = OutsideHost::start();
    // The online sandbox reaches the outside host (so the probe can succeed); the
    // offline one must not.
    let probe = format!(
        "python3 -c \"import socket,time\nfor i in range(20):\n  try: socket.create_connection(('{}', 8099), timeout=2); break\n  except ConnectionRefusedError: time.sleep(0.2)\nelse: raise SystemExit(1)\"",
        outside.addr
    );
    let online = spec("online", &["sleep", "infinity"], true);
    let offline = spec("offline", &["sleep", "infinity"], false);
    backend.create(&online).await.expect("create");
    backend.create(&offline).await.expect("create");
    let (online_code, online_out) = exec(&backend, &online.name, &probe).await;
    let (offline_code, _) = exec(&backend, &offline.name, &probe).await;
    backend.remove(&online.name).await.expect("remove");
    backend.remove(&offline.name).await.expect("remove");
    drop(outside);
    assert_eq!(
        online_code, 0,
        "online sandbox could not reach the outside host: {online_out}"
    );
    assert_ne!(
        offline_code, 0,
        "offline sandbox reached a host outside its network"
    );
}

/// Several servers starting at once on an engine without the sandbox networks: Docker
/// (API < 1.44) lets them create same-named twins, which must not break any create.
#[tokio::test]
async fn concurrent_first_creates_survive_twin_networks() {
    let suffix = SandboxId::generate();
    let config = DockerConfig {
        network: format!("colima-e2b-twin-{suffix}"),
        offline_network: format!("colima-e2b-twin-off-{suffix}"),
        ..Default::default()
    };
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(
            DockerBackend::connect(config.clone())
                .await
                .expect("docker engine"),
        );
    }
    let specs: Vec<ContainerSpec> = (0..4)
        .map(|i| spec(&format!("twin{i}"), &["sleep", "infinity"], true))
        .collect();
    let results =
        futures_util::future::join_all(backends.iter().zip(&specs).map(|(b, s)| b.create(s))).await;
    for s in &specs {
        let _ = backends[0].remove(&s.name).await;
    }
    let docker = backends[0].client();
    let twins = docker
        .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
        .await
        .expect("list networks");
    for n in twins {
        if n.name
            .as_deref()
            .is_some_and(|name| name.contains(suffix.as_str()))
        {
            let _ = docker
                .remove_network(n.id.as_deref().unwrap_or_default())
                .await;
        }
    }
    for r in results {
        let info = r.expect("create with twin networks");
        assert_eq!(info.state, sandbox_core::SandboxState::Running);
    }
}
