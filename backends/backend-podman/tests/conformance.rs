//! The shared conformance suite (one test per check) and the Podman-specific checks
//! (its inspect fields, networks, configuration), against the real engine.
//!
//! Needs a running Podman service (`bash deploy/engines.sh podman`) and the test image
//! (`bash deploy/images.sh podman`); `COLIMA_E2B_TEST_IMAGE` overrides the image. Without
//! an engine these tests fail: they never pass silently.

use std::time::Duration;

use backend_podman::{PodmanBackend, PodmanConfig};
use sandbox_core::conformance::Fixture;
use sandbox_core::{ContainerSpec, Error, SandboxBackend, SandboxProfile, SandboxState};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn connect(config: PodmanConfig) -> PodmanBackend {
    match PodmanBackend::connect(config).await {
        Ok(b) => b,
        Err(e) => panic!(
            "these tests need a running Podman service; start it with \
             `bash deploy/engines.sh podman`: {e}"
        ),
    }
}

async fn backend() -> PodmanBackend {
    connect(PodmanConfig::default()).await
}

/// A spec labelled for the suite, from the shared fixture.
fn spec(suffix: &str) -> ContainerSpec {
    Fixture::from_env().spec(suffix)
}

/// Removes the container when the test ends, also when it panics.
struct Guard<'a>(&'a PodmanBackend, String);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let name = self.1.clone();
        let backend = self.0;
        // Block on the async remove from a helper thread: Drop cannot be async.
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    let _ = rt.block_on(backend.remove(&name));
                }
            });
        });
    }
}

sandbox_core::conformance_tests!(backend().await, Fixture::from_env());

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_the_baseline_profile() {
    let backend = backend().await;
    let s = spec("profile");
    let _guard = Guard(&backend, s.name.clone());
    backend.create(&s).await.expect("create");
    let v = backend.inspect_json(&s.name).await.expect("inspect");
    let host = &v["HostConfig"];

    assert_eq!(host["Privileged"], Value::Bool(false), "privileged");
    let mut caps = strings(&v["EffectiveCaps"]);
    caps.sort();
    assert_eq!(
        caps,
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FOWNER",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID"
        ],
        "effective capabilities"
    );
    let mut bounding = strings(&v["BoundingCaps"]);
    bounding.sort();
    assert_eq!(bounding, caps, "bounding capabilities");

    let security = strings(&host["SecurityOpt"]);
    assert!(
        security.iter().any(|o| o == "no-new-privileges"),
        "{security:?}"
    );
    assert!(
        !security.iter().any(|o| o.contains("unconfined")),
        "seccomp or apparmor disabled: {security:?}"
    );

    let memory = host["Memory"].as_i64().expect("Memory");
    assert_eq!(memory, 64 * 1024 * 1024);
    assert_eq!(
        host["MemorySwap"].as_i64(),
        Some(memory),
        "swap must equal memory"
    );
    assert_eq!(host["PidsLimit"].as_i64(), Some(64));
    assert_eq!(host["CpuQuota"].as_i64(), Some(50_000));
    assert_eq!(host["CpuPeriod"].as_i64(), Some(100_000));

    let ulimits: Vec<(String, i64, i64)> = host["Ulimits"]
        .as_array()
        .expect("Ulimits")
        .iter()
        .map(|u| {
            (
                u["Name"].as_str().unwrap_or_default().to_string(),
                u["Soft"].as_i64().unwrap_or(-1),
                u["Hard"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let cfg = PodmanConfig::default();
    let profile = SandboxProfile::default();
    let nofile = profile.nofile as i64;
    let fsize = profile.max_file_size as i64;
    assert!(
        ulimits.contains(&("RLIMIT_NOFILE".into(), nofile, nofile)),
        "{ulimits:?}"
    );
    assert!(
        ulimits.contains(&("RLIMIT_FSIZE".into(), fsize, fsize)),
        "{ulimits:?}"
    );

    assert_eq!(host["LogConfig"]["Type"], "k8s-file");
    assert!(
        !host["LogConfig"]["Size"]
            .as_str()
            .unwrap_or("0B")
            .starts_with('0'),
        "log size is not capped: {}",
        host["LogConfig"]
    );

    for ns in [
        "PidMode",
        "IpcMode",
        "UTSMode",
        "CgroupnsMode",
        "NetworkMode",
        "UsernsMode",
    ] {
        assert_ne!(
            host[ns].as_str(),
            Some("host"),
            "{ns} shares the host namespace"
        );
    }
    assert!(
        v["Mounts"].as_array().is_none_or(Vec::is_empty),
        "unexpected mounts: {}",
        v["Mounts"]
    );
    let networks: Vec<&String> = v["NetworkSettings"]["Networks"]
        .as_object()
        .expect("networks")
        .keys()
        .collect();
    assert_eq!(networks, [&cfg.network]);
    let net = backend.network_json(&cfg.network).await.expect("network");
    assert_eq!(net["internal"], Value::Bool(false));
    assert_eq!(net["options"]["isolate"], "true");

    let info = backend.inspect(&s.name).await.expect("inspect");
    assert_eq!(info.state, SandboxState::Running);
    assert!(info.created_at.is_some(), "creation time not read");
    // The spec's labels read back; the image's own labels show on a container too.
    for (k, v) in &s.labels {
        assert_eq!(info.labels.get(k), Some(v), "label {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_off_uses_the_internal_network() {
    let backend = backend().await;
    let cfg = PodmanConfig::default();
    let mut s = spec("offline");
    s.internet = false;
    let _guard = Guard(&backend, s.name.clone());
    backend.create(&s).await.expect("create offline");
    let v = backend.inspect_json(&s.name).await.expect("inspect");
    let networks: Vec<&String> = v["NetworkSettings"]["Networks"]
        .as_object()
        .expect("networks")
        .keys()
        .collect();
    assert_eq!(networks, [&cfg.offline_network]);
    let net = backend
        .network_json(&cfg.offline_network)
        .await
        .expect("network");
    assert_eq!(
        net["internal"],
        Value::Bool(true),
        "offline network has a way out"
    );

    // CNI internal networks are not reachable from the host: refused up front there.
    let mut with_agent = spec("offline-agent");
    with_agent.internet = false;
    with_agent.agent_port = Some(49983);
    let _guard2 = Guard(&backend, with_agent.name.clone());
    let result = backend.create(&with_agent).await;
    if backend.network_backend() == "cni" {
        assert!(
            matches!(result, Err(Error::Unsupported { .. })),
            "{result:?}"
        );
        assert!(matches!(
            backend.inspect(&with_agent.name).await,
            Err(Error::NotFound { .. })
        ));
    } else {
        result.expect("create offline with agent port");
    }
}

/// Connects to `addr` until an HTTP server answers there (python needs a moment to start).
async fn http_answers(addr: std::net::SocketAddr) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(answer)) if answer.starts_with("HTTP/1.0 200") => return Ok(answer),
            Ok(Ok(answer)) => last = format!("unexpected answer: {answer:.80}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

async fn agent_is_reachable(config: PodmanConfig, suffix: &str) -> std::net::SocketAddr {
    let backend = connect(config).await;
    let port = 49983;
    let mut s = spec(suffix);
    s.command = vec![
        "python3".into(),
        "-m".into(),
        "http.server".into(),
        port.to_string(),
        "--directory".into(),
        "/".into(),
    ];
    s.agent_port = Some(port);
    let _guard = Guard(&backend, s.name.clone());
    backend.create(&s).await.expect("create");
    let addr = backend
        .agent_address(&s.name, port)
        .await
        .expect("agent address")
        .addr;
    if let Err(e) = http_answers(addr).await {
        panic!("agent address {addr} of {} does not answer: {e}", s.name);
    }
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_agent_port_accepts_connections() {
    let config = PodmanConfig {
        publish_agent_port: true,
        ..PodmanConfig::default()
    };
    let addr = agent_is_reachable(config, "published").await;
    assert!(
        addr.ip().is_loopback(),
        "published address {addr} is not on 127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_socket_is_engine_unavailable() {
    let config = PodmanConfig {
        socket: Some("unix:///nonexistent/colima-e2b/podman.sock".into()),
        ..PodmanConfig::default()
    };
    match PodmanBackend::connect(config).await {
        Err(Error::EngineUnavailable(msg)) => {
            assert!(msg.contains("/nonexistent/colima-e2b/podman.sock"), "{msg}");
            assert!(msg.contains("podman system service"), "{msg}");
        }
        other => panic!("expected engine unavailable, got {other:?}"),
    }
}
