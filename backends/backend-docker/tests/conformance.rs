//! The backend conformance suite against the real Docker engine, one test per check,
//! plus the checks of connecting that only a concrete backend has.

use backend_docker::{DockerBackend, DockerConfig};
use sandbox_core::conformance::Fixture;

async fn backend() -> DockerBackend {
    DockerBackend::connect(DockerConfig::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the Docker conformance suite needs a running engine ({e}); run deploy/engines.sh"
            )
        })
}

sandbox_core::conformance_tests!(backend().await, Fixture::from_env());

#[tokio::test]
async fn unreachable_engine_names_what_was_tried() {
    let err = DockerBackend::connect(DockerConfig {
        host: Some("unix:///tmp/colima-e2b-no-such.sock".into()),
        colima: true,
        colima_profile: "nope".into(),
        ..Default::default()
    })
    .await
    .expect_err("no engine there");
    let msg = err.to_string();
    assert!(
        matches!(err, sandbox_core::Error::EngineUnavailable(_)),
        "{msg}"
    );
    assert!(msg.contains("/tmp/colima-e2b-no-such.sock"), "{msg}");
    assert!(msg.contains("colima start"), "{msg}");
}
