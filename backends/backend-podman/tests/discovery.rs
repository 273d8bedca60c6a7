//! Socket discovery through the real process environment. One test in its own binary, so
//! changing environment variables races with nothing.

use backend_podman::discovery::ROOTFUL_SOCKET;
use backend_podman::{PodmanBackend, PodmanConfig};
use sandbox_core::Error;

#[tokio::test(flavor = "current_thread")]
async fn discovery_order_follows_config_then_env_then_rootless_then_rootful() {
    let bogus = "unix:///nonexistent/colima-e2b/env-podman.sock";

    // CONTAINER_HOST is used, and alone: no silent fallback to another engine.
    std::env::set_var("CONTAINER_HOST", bogus);
    match PodmanBackend::connect(PodmanConfig::default()).await {
        Err(Error::EngineUnavailable(msg)) => {
            assert!(msg.contains("env-podman.sock"), "{msg}");
            assert!(
                !msg.contains(&format!("{ROOTFUL_SOCKET}: ")),
                "fell back past CONTAINER_HOST: {msg}"
            );
        }
        other => panic!("expected engine unavailable, got {other:?}"),
    }

    // The configured socket wins over CONTAINER_HOST.
    let config = PodmanConfig {
        socket: Some(ROOTFUL_SOCKET.into()),
        ..PodmanConfig::default()
    };
    let backend = PodmanBackend::connect(config)
        .await
        .expect("explicit socket wins over CONTAINER_HOST (is podman running?)");
    assert_eq!(backend.endpoint(), ROOTFUL_SOCKET);

    // Without both, a rootless socket that does not exist is skipped for the rootful one.
    std::env::remove_var("CONTAINER_HOST");
    let dir = std::env::temp_dir().join(format!("colima-e2b-xdg-{}", std::process::id()));
    std::env::set_var("XDG_RUNTIME_DIR", &dir);
    assert_eq!(
        backend_podman::discovery::from_env(None),
        vec![ROOTFUL_SOCKET.to_string()]
    );
    // A rootless socket that exists comes first (a plain file stands in for it here).
    std::fs::create_dir_all(dir.join("podman")).expect("mkdir");
    std::fs::write(dir.join("podman/podman.sock"), b"").expect("touch");
    let candidates = backend_podman::discovery::from_env(None);
    assert_eq!(
        candidates,
        vec![
            format!("unix://{}/podman/podman.sock", dir.display()),
            ROOTFUL_SOCKET.to_string()
        ]
    );
    // ... and when it does not answer, the rootful service is used.
    let backend = PodmanBackend::connect(PodmanConfig::default())
        .await
        .expect("falls back to the rootful socket");
    assert_eq!(backend.endpoint(), ROOTFUL_SOCKET);
    let _ = std::fs::remove_dir_all(&dir);
}
