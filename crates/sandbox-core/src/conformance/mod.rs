//! The backend conformance suite: the contract of [`SandboxBackend`] as plain async
//! checks, one test per check in every backend's suite ([`conformance_tests!`]).
//!
//! Checks choose by [`crate::Capabilities`]: where a backend declares a capability off,
//! the check asserts the declared behaviour instead (an [`Error::Unsupported`]), so no
//! check is silently skipped. [`lifecycle`] holds the checks that need no running
//! process (the in-memory backend passes them all); [`inside`] the ones that look from
//! inside a real container through the agent; [`build`] those of image builds. Each check panics with a message naming
//! what broke, and removes every container it created (a failing one reports what is
//! left, labelled [`SUITE_LABEL`]).

pub mod build;
pub mod inside;
pub mod lifecycle;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::agent::AgentBinary;
use crate::backend::{ContainerSpec, SandboxBackend, SandboxProfile};
use crate::error::Error;
use crate::types::Limits;

/// Label carried by every container the suite creates, so leftovers can be found.
pub const SUITE_LABEL: &str = "dev.colima-e2b.conformance";
/// Label naming the check that created a container.
pub const CHECK_LABEL: &str = "dev.colima-e2b.check";

/// What the checks create containers from.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// A locally available image with `/bin/sh` and `sleep`.
    pub image: String,
    /// A main process that keeps running until killed.
    pub command: Vec<String>,
    /// Distinguishes this run's containers from other runs'.
    pub run_id: String,
    /// The static agent, for the checks that look inside containers.
    pub agent: Option<AgentBinary>,
}

impl Fixture {
    /// A fixture for `image`, whose main process is `sleep infinity`, without an agent.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            command: vec!["sleep".into(), "infinity".into()],
            run_id: crate::SandboxId::generate().to_string(),
            agent: None,
        }
    }

    /// A fixture for the engine suites: the image `COLIMA_E2B_TEST_IMAGE` (default
    /// `colima-e2b/base:latest`) and the static agent at `COLIMA_E2B_AGENT_BINARY`
    /// (default: the workspace's `deploy/build-agent.sh` output), loaded when present.
    pub fn from_env() -> Self {
        let image = std::env::var("COLIMA_E2B_TEST_IMAGE")
            .unwrap_or_else(|_| "colima-e2b/base:latest".into());
        let agent_path = std::env::var_os("COLIMA_E2B_AGENT_BINARY")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../target/x86_64-unknown-linux-gnu/agent/sandbox-agent")
            });
        Self {
            agent: AgentBinary::load(&agent_path).ok(),
            ..Self::new(image)
        }
    }

    /// Tag of the images the checks derive (the trait has no image removal; the engine
    /// suites remove them at the end).
    pub fn derived_tag(&self, what: &str) -> String {
        format!("colima-e2b-conformance/{what}:{}", self.run_id)
    }

    /// A container spec for check `check`, labelled for the suite.
    pub fn spec(&self, check: &str) -> ContainerSpec {
        let labels = BTreeMap::from([
            (SUITE_LABEL.to_string(), self.run_id.clone()),
            (CHECK_LABEL.to_string(), check.to_string()),
        ]);
        ContainerSpec {
            name: format!("colima-e2b-conf-{}-{check}", self.run_id),
            image: self.image.clone(),
            command: self.command.clone(),
            env: vec!["CONFORMANCE=1".into()],
            labels,
            limits: Limits {
                cpus: 0.5,
                memory_mb: 64,
                pids: 64,
                disk_mb: None,
            },
            internet: true,
            user: None,
            agent_port: None,
            profile: SandboxProfile::default(),
            volumes: Vec::new(),
        }
    }
}

/// Removes the containers of a check: call [`Cleanup::run`] at its end; dropped by a
/// panic, it says what is left (async cleanup is not possible there).
pub(crate) struct Cleanup<'a> {
    backend: &'a dyn SandboxBackend,
    names: Vec<String>,
}

impl<'a> Cleanup<'a> {
    pub(crate) fn new(backend: &'a dyn SandboxBackend, names: Vec<String>) -> Self {
        Self { backend, names }
    }

    pub(crate) async fn run(mut self) {
        for name in std::mem::take(&mut self.names) {
            match self.backend.remove(&name).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => panic!("conformance: could not remove {name}: {e}"),
            }
        }
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.names.is_empty() {
            eprintln!(
                "conformance: check failed; remove leftovers with the label {SUITE_LABEL}: {:?}",
                self.names
            );
        }
    }
}

/// Generates one `#[tokio::test]` per conformance check. `$backend` is an expression
/// (it may `.await`) giving a backend value; `$fixture` an expression giving the
/// [`Fixture`]. Needs tokio's `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr, $fixture:expr) => {
        $crate::conformance_tests!(@checks $backend, $fixture;
            lifecycle: engine_answers_with_a_version,
            lifecycle: created_container_runs_and_is_listed_until_removed,
            lifecycle: labels_round_trip_and_filter_lists,
            lifecycle: limits_read_back_as_asked,
            lifecycle: env_reads_back_as_given,
            lifecycle: pause_freezes_and_resume_thaws,
            lifecycle: pausing_twice_or_resuming_a_running_container_conflicts,
            lifecycle: a_main_process_that_ignores_sigterm_is_still_removed,
            lifecycle: stop_kills_at_once_and_leaves_a_removable_container,
            lifecycle: a_stopped_container_starts_again_as_it_was,
            lifecycle: operations_on_a_missing_container_are_not_found,
            lifecycle: a_create_whose_start_fails_leaves_nothing,
            lifecycle: a_create_from_a_missing_image_is_not_found_and_leaves_nothing,
            lifecycle: a_taken_name_is_a_conflict_and_keeps_the_existing_container,
            lifecycle: a_missing_image_that_cannot_be_pulled_is_named,
            lifecycle: concurrent_creates_give_distinct_running_containers,
            lifecycle: internet_off_is_accepted_where_declared,
            lifecycle: deriving_reuses_an_existing_tag_and_names_a_missing_base,
            build: a_build_reports_steps_output_and_cached_steps,
            build: a_failed_build_is_build_failed_and_leaves_no_step_images,
            build: a_build_from_a_base_that_is_not_local_is_not_found,
            build: an_abandoned_build_leaves_no_images,
            inside: a_derived_image_runs_the_agent_as_its_entrypoint,
            inside: the_baseline_profile_applies_inside,
            inside: limits_apply_inside,
            inside: the_disk_quota_stops_writes_inside,
            inside: a_volume_is_shared_by_containers_and_outlives_them,
        );
    };
    (@checks $backend:expr, $fixture:expr; $($module:ident: $check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let backend = $backend;
                let fixture = $fixture;
                $crate::conformance::$module::$check(&backend, &fixture).await;
            }
        )+
    };
}
