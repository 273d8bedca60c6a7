//! The backend conformance suite: plain async checks that every backend's tests call
//! against a real engine.
//!
//! Each check panics (with a message naming what broke) on a contract violation and
//! removes every container it created, also when it fails half-way.

use std::collections::BTreeMap;

use crate::backend::{ContainerSpec, DeriveImage, ImageFile, SandboxBackend};
use crate::error::Error;
use crate::types::{Limits, SandboxState};

/// Label carried by every container the suite creates, so leftovers can be found.
pub const SUITE_LABEL: &str = "dev.colima-e2b.conformance";

/// The image and long-running command the checks create containers from.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// A locally available image.
    pub image: String,
    /// A main process that keeps running until killed.
    pub command: Vec<String>,
    /// Distinguishes this run's containers from other runs'.
    pub run_id: String,
}

impl Fixture {
    /// A fixture for `image`, whose main process is `sleep infinity`.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            command: vec!["sleep".into(), "infinity".into()],
            run_id: crate::SandboxId::generate().to_string(),
        }
    }

    /// Tag of the image [`derive_image_adds_files_and_entrypoint`] derives; the caller
    /// removes it after the run (the trait has no image removal).
    pub fn derived_tag(&self) -> String {
        format!("colima-e2b-conformance/probe:{}", self.run_id)
    }

    fn spec(&self, suffix: &str) -> ContainerSpec {
        let mut labels = BTreeMap::new();
        labels.insert(SUITE_LABEL.to_string(), self.run_id.clone());
        labels.insert("dev.colima-e2b.check".to_string(), suffix.to_string());
        ContainerSpec {
            name: format!("colima-e2b-conf-{}-{suffix}", self.run_id),
            image: self.image.clone(),
            command: self.command.clone(),
            env: vec!["CONFORMANCE=1".into()],
            labels,
            limits: Limits {
                cpus: 0.5,
                memory_mb: 64,
                pids: 64,
            },
            internet: true,
            user: None,
            agent_port: None,
        }
    }
}

/// Removes a container when dropped mid-check (a panicking assertion included).
struct Cleanup<'a> {
    backend: &'a dyn SandboxBackend,
    names: Vec<String>,
}

impl Cleanup<'_> {
    async fn run(mut self) {
        for name in std::mem::take(&mut self.names) {
            let _ = self.backend.remove(&name).await;
        }
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.names.is_empty() {
            // Dropped by a panic: say what is left, since async cleanup is not possible here.
            eprintln!(
                "conformance: check failed; remove leftovers with the label {SUITE_LABEL}: {:?}",
                self.names
            );
        }
    }
}

/// Runs every check, in order, choosing optional ones by capability.
pub async fn run_all(backend: &dyn SandboxBackend, fixture: &Fixture) {
    engine_answers(backend).await;
    create_inspect_list_remove(backend, fixture).await;
    labels_round_trip(backend, fixture).await;
    limits_are_applied(backend, fixture).await;
    pause_and_resume(backend, fixture).await;
    remove_running_container(backend, fixture).await;
    not_found_errors(backend).await;
    failed_create_leaves_nothing(backend, fixture).await;
    missing_image_is_named(backend).await;
    concurrent_creates(backend, fixture).await;
    internet_off_is_accepted(backend, fixture).await;
    derive_image_adds_files_and_entrypoint(backend, fixture).await;
}

/// `check` answers with a version.
pub async fn engine_answers(backend: &dyn SandboxBackend) {
    let info = backend.check().await.expect("engine answers");
    assert!(!info.version.is_empty(), "engine version is empty");
    assert!(!backend.name().is_empty());
}

/// A created container runs, is inspectable and listable, and is gone after remove.
pub async fn create_inspect_list_remove(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let spec = fixture.spec("cilr");
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
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

    let inspected = backend.inspect(&spec.name).await.expect("inspect");
    assert_eq!(inspected.state, SandboxState::Running);
    assert_eq!(inspected.id, created.id);

    let listed = backend
        .list(&[(SUITE_LABEL, &fixture.run_id)])
        .await
        .expect("list");
    assert!(
        listed.iter().any(|c| c.name == spec.name),
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

/// Labels come back exactly as given (unicode and JSON included), and list filters by them.
pub async fn labels_round_trip(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("labels");
    spec.labels.insert(
        "dev.colima-e2b.metadata".into(),
        r#"{"purpose":"tést \"q\""}"#.into(),
    );
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
    backend.create(&spec).await.expect("create");
    let inspected = backend.inspect(&spec.name).await.expect("inspect");
    for (k, v) in &spec.labels {
        assert_eq!(
            inspected.labels.get(k),
            Some(v),
            "label {k} did not round-trip"
        );
    }
    let filtered = backend
        .list(&[
            (SUITE_LABEL, &fixture.run_id),
            ("dev.colima-e2b.check", "labels"),
        ])
        .await
        .expect("list");
    assert_eq!(
        filtered.len(),
        1,
        "label filter should match exactly one container"
    );
    let none = backend
        .list(&[
            (SUITE_LABEL, &fixture.run_id),
            ("dev.colima-e2b.check", "no-such"),
        ])
        .await
        .expect("list");
    assert!(
        none.is_empty(),
        "label filter matched a container it should not"
    );
    cleanup.run().await;
}

/// CPU, memory and pids limits read back from the engine equal what was asked.
pub async fn limits_are_applied(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("limits");
    spec.limits = Limits {
        cpus: 0.25,
        memory_mb: 96,
        pids: 50,
    };
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
    backend.create(&spec).await.expect("create");
    let inspected = backend.inspect(&spec.name).await.expect("inspect");
    let applied = inspected.limits.expect("backend reads limits back");
    assert_eq!(
        applied, spec.limits,
        "limits read back differ from the spec"
    );
    cleanup.run().await;
}

/// Pause freezes and resume thaws, where supported; otherwise both say unsupported.
pub async fn pause_and_resume(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let spec = fixture.spec("pause");
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
    backend.create(&spec).await.expect("create");
    if backend.capabilities().pause {
        backend.pause(&spec.name).await.expect("pause");
        let paused = backend.inspect(&spec.name).await.expect("inspect");
        assert_eq!(paused.state, SandboxState::Paused);
        backend.resume(&spec.name).await.expect("resume");
        let resumed = backend.inspect(&spec.name).await.expect("inspect");
        assert_eq!(resumed.state, SandboxState::Running);
        // A paused container can be removed too.
        backend.pause(&spec.name).await.expect("pause again");
    } else {
        assert!(matches!(
            backend.pause(&spec.name).await,
            Err(Error::Unsupported { .. })
        ));
    }
    backend
        .remove(&spec.name)
        .await
        .expect("remove paused container");
    assert!(matches!(
        backend.inspect(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// A main process that ignores SIGTERM is still removed (kill, not stop).
pub async fn remove_running_container(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("stubborn");
    spec.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "trap '' TERM INT; while :; do sleep 1; done".into(),
    ];
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
    backend.create(&spec).await.expect("create");
    backend.remove(&spec.name).await.expect("remove");
    assert!(matches!(
        backend.inspect(&spec.name).await,
        Err(Error::NotFound { .. })
    ));
    cleanup.run().await;
}

/// Operations on a container that does not exist say not found.
pub async fn not_found_errors(backend: &dyn SandboxBackend) {
    let name = "colima-e2b-conf-does-not-exist";
    for (op, result) in [
        ("inspect", backend.inspect(name).await.map(|_| ())),
        ("remove", backend.remove(name).await),
        ("pause", backend.pause(name).await),
        ("resume", backend.resume(name).await),
    ] {
        match result {
            Err(Error::NotFound { .. }) => {}
            Err(Error::Unsupported { .. }) if matches!(op, "pause" | "resume") => {}
            other => panic!("{op} of a missing container should be not found, got {other:?}"),
        }
    }
}

/// A create whose start fails returns an error and leaves no container.
pub async fn failed_create_leaves_nothing(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("badcmd");
    spec.command = vec!["/no/such/binary".into()];
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
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

/// A missing image that cannot be pulled gives an error naming it.
pub async fn missing_image_is_named(backend: &dyn SandboxBackend) {
    let image = "colima-e2b.invalid/no-such-image:never";
    match backend.ensure_image(image).await {
        Err(e) => assert!(
            e.to_string().contains("no-such-image"),
            "error does not name the image: {e}"
        ),
        Ok(()) => panic!("ensure_image of a missing image succeeded"),
    }
}

/// Several creates at once all succeed with distinct containers.
pub async fn concurrent_creates(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let specs: Vec<ContainerSpec> = (0..4).map(|i| fixture.spec(&format!("conc{i}"))).collect();
    let cleanup = Cleanup {
        backend,
        names: specs.iter().map(|s| s.name.clone()).collect(),
    };
    let results = futures_util::future::join_all(specs.iter().map(|s| backend.create(s))).await;
    let mut ids = std::collections::HashSet::new();
    for r in results {
        let c = r.expect("concurrent create");
        assert_eq!(c.state, SandboxState::Running);
        ids.insert(c.id);
    }
    assert_eq!(ids.len(), specs.len(), "container ids are not distinct");
    futures_util::future::join_all(specs.iter().map(|s| backend.remove(&s.name)))
        .await
        .into_iter()
        .for_each(|r| r.expect("remove"));
    cleanup.run().await;
}

/// A sandbox without internet can be created where internal networks are supported.
pub async fn internet_off_is_accepted(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let mut spec = fixture.spec("offline");
    spec.internet = false;
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
    let result = backend.create(&spec).await;
    if backend.capabilities().internal_networks {
        let c = result.expect("create without internet");
        assert_eq!(c.state, SandboxState::Running);
    } else {
        assert!(matches!(result, Err(Error::Unsupported { .. })));
    }
    cleanup.run().await;
}

/// A derived image carries the added file (executable) as its entrypoint with no CMD:
/// a container created from it without a command runs that file, which exits at once
/// unless it got no arguments. Deriving again reuses the image; a missing base is named.
pub async fn derive_image_adds_files_and_entrypoint(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    const PROBE: &str = "/usr/local/bin/colima-e2b-probe";
    let mut labels = BTreeMap::new();
    labels.insert(SUITE_LABEL.to_string(), fixture.run_id.clone());
    let req = DeriveImage {
        base: fixture.image.clone(),
        tag: fixture.derived_tag(),
        files: vec![ImageFile {
            path: PROBE.into(),
            contents: b"#!/bin/sh\n[ \"$#\" -eq 0 ] || exit 3\nexec sleep infinity\n"
                .to_vec()
                .into(),
            mode: 0o755,
        }],
        entrypoint: vec![PROBE.into()],
        labels,
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

    let mut spec = fixture.spec("derived");
    spec.image = req.tag.clone();
    spec.command = Vec::new();
    let cleanup = Cleanup {
        backend,
        names: vec![spec.name.clone()],
    };
    let created = backend
        .create(&spec)
        .await
        .expect("a container of the derived image starts its entrypoint");
    assert_eq!(created.state, SandboxState::Running);
    // The probe exits 3 when it got arguments (a CMD left over from the base).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let info = backend.inspect(&spec.name).await.expect("inspect");
    assert_eq!(
        info.state,
        SandboxState::Running,
        "the derived entrypoint stopped (missing file, not executable, or a CMD was kept)"
    );
    assert!(
        info.env.iter().any(|e| e == "CONFORMANCE=1"),
        "inspect reports the container env: {:?}",
        info.env
    );
    cleanup.run().await;

    let missing = DeriveImage {
        base: "colima-e2b.invalid/no-such-base:never".into(),
        tag: format!("{}-missing", req.tag),
        ..req
    };
    match backend.derive_image(&missing).await {
        Err(Error::NotFound { what }) => {
            assert!(what.contains("no-such-base"), "not named: {what}")
        }
        other => panic!("deriving from a missing base gave {other:?}"),
    }
}
