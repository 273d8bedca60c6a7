//! Contract checks that need no running process: lifecycle, labels, limits as stored,
//! errors, images. Every backend passes them, the in-memory one included.

use std::collections::{BTreeMap, HashSet};

use super::{Cleanup, Fixture, CHECK_LABEL, SUITE_LABEL};
use crate::backend::{DeriveImage, ImageFile, SandboxBackend};
use crate::error::Error;
use crate::types::{Limits, SandboxState};

/// `check` answers with a version, and the backend names itself.
pub async fn engine_answers_with_a_version(backend: &dyn SandboxBackend, _fixture: &Fixture) {
    let info = backend.check().await.expect("engine answers");
    assert!(!info.version.is_empty(), "engine version is empty");
    assert!(!info.engine.is_empty(), "engine product is empty");
    assert!(!backend.name().is_empty(), "backend name is empty");
    let shown = backend.to_string();
    assert!(
        shown.contains(backend.name()),
        "Display ({shown}) does not name the backend"
    );
}

/// A created container runs, is inspectable and listable, and is gone after remove.
pub async fn created_container_runs_and_is_listed_until_removed(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let spec = fixture.spec("cilr");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend
        .ensure_image(&spec.image)
        .await
        .expect("image is available");
    let created = backend.create(&spec).await.expect("create");
    assert_eq!(
        created.state,
        SandboxState::Running,
        "created container is not running"
    );
    assert_eq!(created.name, spec.name);
    // Engines may qualify the reference (`localhost/...`, `docker.io/library/...`).
    assert!(
        created.image.ends_with(&spec.image),
        "create reports another image: {}",
        created.image
    );

    let inspected = backend.inspect(&spec.name).await.expect("inspect");
    assert_eq!(inspected.state, SandboxState::Running);
    assert_eq!(inspected.id, created.id);

    let listed = backend
        .list(&[(SUITE_LABEL, &fixture.run_id)])
        .await
        .expect("list");
    assert!(
        listed
            .iter()
            .any(|c| c.name == spec.name && c.id == created.id),
        "list does not contain the created container"
    );

    backend.remove(&spec.name).await.expect("remove");
    match backend.inspect(&spec.name).await {
        Err(Error::NotFound { .. }) => {}
        other => panic!("inspect after remove should be not found, got {other:?}"),
    }
    let listed = backend
        .list(&[(SUITE_LABEL, &fixture.run_id)])
        .await
        .expect("list");
    assert!(
        listed.iter().all(|c| c.name != spec.name),
        "removed container still listed"
    );
    cleanup.run().await;
}

/// Labels come back exactly as given (unicode and JSON included), and list filters by
/// every label given.
pub async fn labels_round_trip_and_filter_lists(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("labels");
    spec.labels.insert(
        "dev.colima-e2b.metadata".into(),
        r#"{"purpose":"tést \"q\""}"#.into(),
    );
    let other = fixture.spec("labels-other");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone(), other.name.clone()]);
    backend.create(&spec).await.expect("create");
    backend.create(&other).await.expect("create the other");
    let inspected = backend.inspect(&spec.name).await.expect("inspect");
    for (k, v) in &spec.labels {
        assert_eq!(
            inspected.labels.get(k),
            Some(v),
            "label {k} did not round-trip"
        );
    }
    let filtered = backend
        .list(&[(SUITE_LABEL, &fixture.run_id), (CHECK_LABEL, "labels")])
        .await
        .expect("list");
    let names: Vec<&str> = filtered.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        vec![spec.name.as_str()],
        "the label filter must match exactly one"
    );
    let none = backend
        .list(&[(SUITE_LABEL, &fixture.run_id), (CHECK_LABEL, "no-such")])
        .await
        .expect("list");
    assert!(
        none.is_empty(),
        "label filter matched a container it should not"
    );
    cleanup.run().await;
}

/// CPU, memory and pids limits read back from the engine equal what was asked.
pub async fn limits_read_back_as_asked(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("limits");
    spec.limits = Limits {
        cpus: 0.25,
        memory_mb: 96,
        pids: 50,
        disk_mb: backend.capabilities().disk_quota.then_some(1024),
    };
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    let created = backend.create(&spec).await.expect("create");
    assert_eq!(
        created.limits,
        Some(spec.limits),
        "create reports other limits"
    );
    let inspected = backend.inspect(&spec.name).await.expect("inspect");
    assert_eq!(
        inspected.limits,
        Some(spec.limits),
        "limits read back differ from the spec"
    );
    cleanup.run().await;
}

/// Inspect reports the main process's environment (it carries the agent's secret across
/// server restarts).
pub async fn env_reads_back_as_given(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("env");
    spec.env.push("WITH_SPACES=a b =c".into());
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend.create(&spec).await.expect("create");
    let info = backend.inspect(&spec.name).await.expect("inspect");
    for var in &spec.env {
        assert!(
            info.env.contains(var),
            "inspect does not report {var}: {:?}",
            info.env
        );
    }
    cleanup.run().await;
}

/// Pause freezes and resume thaws, and a paused container can be removed, where pause is
/// declared; otherwise both say unsupported.
pub async fn pause_freezes_and_resume_thaws(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let spec = fixture.spec("pause");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend.create(&spec).await.expect("create");
    if backend.capabilities().pause {
        backend.pause(&spec.name).await.expect("pause");
        let paused = backend.inspect(&spec.name).await.expect("inspect");
        assert_eq!(paused.state, SandboxState::Paused);
        backend.resume(&spec.name).await.expect("resume");
        let resumed = backend.inspect(&spec.name).await.expect("inspect");
        assert_eq!(resumed.state, SandboxState::Running);
        backend.pause(&spec.name).await.expect("pause again");
    } else {
        assert!(
            matches!(
                backend.pause(&spec.name).await,
                Err(Error::Unsupported { .. })
            ),
            "pause is declared off but did not say unsupported"
        );
    }
    backend
        .remove(&spec.name)
        .await
        .expect("remove a paused container");
    assert!(matches!(
        backend.inspect(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// Pausing a paused container, or resuming a running one, is a conflict (where pause is
/// declared).
pub async fn pausing_twice_or_resuming_a_running_container_conflicts(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let spec = fixture.spec("pause2");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend.create(&spec).await.expect("create");
    if backend.capabilities().pause {
        match backend.resume(&spec.name).await {
            Err(Error::Conflict(_)) => {}
            other => panic!("resuming a running container gave {other:?}"),
        }
        backend.pause(&spec.name).await.expect("pause");
        match backend.pause(&spec.name).await {
            Err(Error::Conflict(_)) => {}
            other => panic!("pausing a paused container gave {other:?}"),
        }
    } else {
        assert!(matches!(
            backend.resume(&spec.name).await,
            Err(Error::Unsupported { .. })
        ));
    }
    cleanup.run().await;
}

/// A container whose main process ignores SIGTERM and SIGINT.
fn stubborn_spec(fixture: &Fixture, name: &str) -> crate::backend::ContainerSpec {
    let mut spec = fixture.spec(name);
    spec.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "trap '' TERM INT; while :; do sleep 1; done".into(),
    ];
    spec
}

/// A main process that ignores SIGTERM is still removed (kill, not stop).
pub async fn a_main_process_that_ignores_sigterm_is_still_removed(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let spec = stubborn_spec(fixture, "stubborn");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend.create(&spec).await.expect("create");
    backend.remove(&spec.name).await.expect("remove");
    assert!(matches!(
        backend.inspect(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// Stopping kills even a main process that ignores SIGTERM, leaves the container
/// stopped (or gone, where the backend removes it) and removable; stopping a missing
/// container is not found.
pub async fn stop_kills_at_once_and_leaves_a_removable_container(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let spec = stubborn_spec(fixture, "stop");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend.create(&spec).await.expect("create");
    backend.stop(&spec.name).await.expect("stop");
    match backend.inspect(&spec.name).await {
        Ok(c) => assert!(
            !matches!(c.state, SandboxState::Running | SandboxState::Paused),
            "still {} after stop",
            c.state
        ),
        Err(Error::NotFound { .. }) => {}
        Err(e) => panic!("inspect after stop: {e}"),
    }
    match backend.remove(&spec.name).await {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => panic!("remove after stop: {e}"),
    }
    assert!(matches!(
        backend.inspect(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        backend.stop(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// A stopped container starts again as the same container, its labels and environment
/// as they were (what a pause that keeps only the filesystem relies on); starting a
/// missing container is not found.
pub async fn a_stopped_container_starts_again_as_it_was(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let mut spec = fixture.spec("restart");
    spec.env.push("KEPT=yes".into());
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    let created = backend.create(&spec).await.expect("create");
    backend.stop(&spec.name).await.expect("stop");
    let mut stopped = false;
    for _ in 0..200 {
        let state = backend.inspect(&spec.name).await.expect("inspect").state;
        if !matches!(state, SandboxState::Running | SandboxState::Paused) {
            stopped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(stopped, "the container did not stop");
    let started = backend.start(&spec.name).await.expect("start");
    assert_eq!(started.state, SandboxState::Running);
    assert_eq!(started.id, created.id, "start made another container");
    for (k, v) in &spec.labels {
        assert_eq!(started.labels.get(k), Some(v), "label {k} changed");
    }
    assert!(
        started.env.iter().any(|e| e == "KEPT=yes"),
        "env changed: {:?}",
        started.env
    );
    backend.remove(&spec.name).await.expect("remove");
    assert!(matches!(
        backend.start(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// Operations on a container that does not exist say not found.
pub async fn operations_on_a_missing_container_are_not_found(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let name = format!("colima-e2b-conf-{}-missing", fixture.run_id);
    let pause_declared = backend.capabilities().pause;
    for (op, result) in [
        ("inspect", backend.inspect(&name).await.map(drop)),
        ("remove", backend.remove(&name).await),
        ("pause", backend.pause(&name).await),
        ("resume", backend.resume(&name).await),
        (
            "agent_address",
            backend.agent_address(&name, 49983).await.map(drop),
        ),
    ] {
        match result {
            Err(Error::NotFound { .. }) => {}
            Err(Error::Unsupported { .. })
                if matches!(op, "pause" | "resume") && !pause_declared => {}
            other => panic!("{op} of a missing container should be not found, got {other:?}"),
        }
    }
}

/// A create whose start fails returns an error and leaves no container.
pub async fn a_create_whose_start_fails_leaves_nothing(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let mut spec = fixture.spec("badcmd");
    spec.command = vec!["/no/such/binary".into()];
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    let result = backend.create(&spec).await;
    assert!(result.is_err(), "create with a missing binary succeeded");
    assert!(
        matches!(
            backend.inspect(&spec.name).await,
            Err(Error::NotFound { .. })
        ),
        "a failed create left its container behind"
    );
    cleanup.run().await;
}

/// A create from an image that does not exist is not found (naming the image) and
/// leaves nothing.
pub async fn a_create_from_a_missing_image_is_not_found_and_leaves_nothing(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let mut spec = fixture.spec("noimage");
    spec.image = "colima-e2b.invalid/no-such-image:never".into();
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    match backend.create(&spec).await {
        Err(Error::NotFound { what }) => {
            assert!(what.contains("no-such-image"), "not named: {what}")
        }
        other => panic!("create from a missing image gave {other:?}"),
    }
    assert!(matches!(
        backend.inspect(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// Creating a container under a name that is taken is a conflict, and the existing
/// container is left running (it is not the create's to remove).
pub async fn a_taken_name_is_a_conflict_and_keeps_the_existing_container(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let spec = fixture.spec("taken");
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    let first = backend.create(&spec).await.expect("create");
    match backend.create(&spec).await {
        Err(Error::Conflict(_)) => {}
        other => panic!("a second create under the same name gave {other:?}"),
    }
    let still = backend
        .inspect(&spec.name)
        .await
        .expect("the first is still there");
    assert_eq!(still.id, first.id);
    assert_eq!(still.state, SandboxState::Running);
    cleanup.run().await;
}

/// A missing image that cannot be pulled gives an error naming it.
pub async fn a_missing_image_that_cannot_be_pulled_is_named(
    backend: &dyn SandboxBackend,
    _fixture: &Fixture,
) {
    let image = "colima-e2b.invalid/no-such-image:never";
    match backend.ensure_image(image).await {
        Err(Error::NotFound { what }) => {
            assert!(
                what.contains("no-such-image"),
                "error does not name the image: {what}"
            )
        }
        other => panic!("ensure_image of a missing image gave {other:?}"),
    }
}

/// Several creates at once all succeed with distinct running containers.
pub async fn concurrent_creates_give_distinct_running_containers(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let specs: Vec<_> = (0..4).map(|i| fixture.spec(&format!("conc{i}"))).collect();
    let cleanup = Cleanup::new(backend, specs.iter().map(|s| s.name.clone()).collect());
    let results = futures_util::future::join_all(specs.iter().map(|s| backend.create(s))).await;
    let mut ids = HashSet::new();
    for r in results {
        let c = r.expect("concurrent create");
        assert_eq!(c.state, SandboxState::Running);
        ids.insert(c.id);
    }
    assert_eq!(ids.len(), specs.len(), "container ids are not distinct");
    for r in futures_util::future::join_all(specs.iter().map(|s| backend.remove(&s.name))).await {
        r.expect("remove");
    }
    cleanup.run().await;
}

/// A sandbox without internet can be created where internal networks are declared;
/// otherwise the create says unsupported.
pub async fn internet_off_is_accepted_where_declared(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let mut spec = fixture.spec("offline");
    spec.internet = false;
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    let result = backend.create(&spec).await;
    if backend.capabilities().internal_networks {
        let c = result.expect("create without internet");
        assert_eq!(c.state, SandboxState::Running);
    } else {
        assert!(
            matches!(result, Err(Error::Unsupported { .. })),
            "{result:?}"
        );
    }
    cleanup.run().await;
}

/// Deriving an image that exists reuses it; deriving from a missing base is not found,
/// naming the base.
pub async fn deriving_reuses_an_existing_tag_and_names_a_missing_base(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let req = DeriveImage {
        base: fixture.image.clone(),
        tag: fixture.derived_tag("reuse"),
        files: vec![ImageFile {
            path: "/usr/local/bin/colima-e2b-probe".into(),
            contents: b"#!/bin/sh\nexec sleep infinity\n".to_vec().into(),
            mode: 0o755,
        }],
        links: vec![],
        entrypoint: vec!["/usr/local/bin/colima-e2b-probe".into()],
        labels: BTreeMap::from([(SUITE_LABEL.to_string(), fixture.run_id.clone())]),
    };
    backend
        .ensure_image(&req.base)
        .await
        .expect("base image is available");
    backend.derive_image(&req).await.expect("derive");
    backend
        .derive_image(&req)
        .await
        .expect("deriving an existing image reuses it");
    backend
        .ensure_image(&req.tag)
        .await
        .expect("the derived image exists");
    let missing = DeriveImage {
        base: "colima-e2b.invalid/no-such-base:never".into(),
        tag: fixture.derived_tag("missing"),
        ..req
    };
    match backend.derive_image(&missing).await {
        Err(Error::NotFound { what }) => {
            assert!(what.contains("no-such-base"), "not named: {what}")
        }
        other => panic!("deriving from a missing base gave {other:?}"),
    }
}
