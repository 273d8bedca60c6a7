//! The shared backend conformance suite against the real Docker engine.

use backend_docker::{DockerBackend, DockerConfig};
use sandbox_core::conformance::{self, Fixture};

fn image() -> String {
    std::env::var("COLIMA_E2B_TEST_IMAGE").unwrap_or_else(|_| "colima-e2b/base:latest".into())
}

async fn backend() -> DockerBackend {
    DockerBackend::connect(DockerConfig::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the Docker conformance suite needs a running engine ({e}); run deploy/engines.sh"
            )
        })
}

#[tokio::test]
async fn docker_passes_the_conformance_suite() {
    let backend = backend().await;
    let fixture = Fixture::new(image());
    conformance::run_all(&backend, &fixture).await;
    // The trait has no image removal: drop the derived probe image here.
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &fixture.derived_tag()])
        .output();
}
