//! The in-memory backend passes every conformance check that needs no running process
//! (and declares, as the checks verify, that its containers run nothing).

use sandbox_core::conformance::Fixture;
use sandbox_core::InMemoryBackend;

fn backend() -> InMemoryBackend {
    InMemoryBackend::new().with_image("conformance/base", &["sleep", "/bin/sh"])
}

sandbox_core::conformance_tests!(backend(), Fixture::new("conformance/base"));
