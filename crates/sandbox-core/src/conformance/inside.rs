//! Contract checks seen from inside a real container: the agent is derived into the
//! fixture's image and started as PID 1, and the checks ask it to look around. Backends
//! whose containers run nothing ([`crate::Capabilities::processes`] off) must say
//! unsupported when asked for an agent's address instead.

use std::time::{Duration, Instant};

use envd_proto::AGENT_PORT;

use super::{Cleanup, Fixture};
use crate::agent::command::ShellCommand;
use crate::agent::{generate_secret, AgentBinary, AgentClient, AGENT_PATH, SECRET_ENV, SUDO_PATH};
use crate::backend::{ContainerSpec, SandboxBackend, VolumeBind};
use crate::error::Error;
use crate::types::Limits;

/// How long a new container's agent may take to answer.
const AGENT_READY: Duration = Duration::from_secs(30);

/// A container of the fixture's image running the agent, and a client for it; `None`
/// when the backend declares that its containers run nothing (checked to say so).
async fn agent_container<'a>(
    backend: &'a dyn SandboxBackend,
    fixture: &Fixture,
    check: &str,
    limits: Option<Limits>,
) -> Option<(ContainerSpec, AgentClient, Cleanup<'a>)> {
    agent_container_with(backend, fixture, check, limits, Vec::new()).await
}

/// [`agent_container`] with engine volumes mounted.
async fn agent_container_with<'a>(
    backend: &'a dyn SandboxBackend,
    fixture: &Fixture,
    check: &str,
    limits: Option<Limits>,
    volumes: Vec<VolumeBind>,
) -> Option<(ContainerSpec, AgentClient, Cleanup<'a>)> {
    let mut spec = fixture.spec(check);
    if let Some(limits) = limits {
        spec.limits = limits;
    }
    spec.volumes = volumes;
    if !backend.capabilities().processes {
        let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
        backend.create(&spec).await.expect("create");
        match backend.agent_address(&spec.name, AGENT_PORT).await {
            Err(Error::Unsupported { .. }) => {}
            other => panic!(
                "a backend whose containers run nothing must not give an agent address: {other:?}"
            ),
        }
        cleanup.run().await;
        return None;
    }
    let agent: &AgentBinary = fixture.agent.as_ref().unwrap_or_else(|| {
        panic!(
            "this check needs the static agent: build it with deploy/build-agent.sh or set \
             COLIMA_E2B_AGENT_BINARY"
        )
    });
    let base = backend
        .ensure_image(&fixture.image)
        .await
        .expect("the fixture image is available");
    let derive = agent.derive_request(&fixture.image, base.id.as_deref());
    let tag = derive.tag.clone();
    backend
        .derive_image(&derive)
        .await
        .expect("derive the agent image");
    let secret = generate_secret();
    spec.image = tag;
    spec.command = Vec::new();
    spec.user = Some("root".into());
    spec.agent_port = Some(AGENT_PORT);
    spec.env.push(format!("{SECRET_ENV}={secret}"));
    let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
    backend
        .create(&spec)
        .await
        .expect("create the agent container");
    let addr = backend
        .agent_address(&spec.name, AGENT_PORT)
        .await
        .expect("agent address");
    let client = AgentClient::new(crate::agent::http_client(), addr.addr, secret);
    let deadline = Instant::now() + AGENT_READY;
    while let Err(e) = client.health().await {
        assert!(
            Instant::now() < deadline,
            "the agent at {} did not answer within {AGENT_READY:?} ({e}); an entrypoint \
             that is missing or got a CMD kept from the base image exits at once",
            addr.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some((spec, client, cleanup))
}

/// Runs `script` with `/bin/sh` as `user` inside; returns its stdout, failing the check
/// on a non-zero exit.
async fn sh(client: &AgentClient, user: &str, script: &str) -> String {
    let out = ShellCommand {
        cmd: script.into(),
        user: Some(user.into()),
        ..ShellCommand::default()
    }
    .run(client, Duration::from_secs(30), 1 << 20)
    .await
    .unwrap_or_else(|e| panic!("running {script:?} inside failed: {e}"));
    assert_eq!(
        out.end.exit_code,
        0,
        "{script:?} exited {}: {}",
        out.end.exit_code,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `key:` in `/proc/self/status` text.
fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} missing from /proc/self/status"))
}

/// The capability bit mask of `names` (the subset a sandbox profile may keep).
fn capability_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| {
            let bit = match n.as_str() {
                "CHOWN" => 0,
                "DAC_OVERRIDE" => 1,
                "DAC_READ_SEARCH" => 2,
                "FOWNER" => 3,
                "FSETID" => 4,
                "KILL" => 5,
                "SETGID" => 6,
                "SETUID" => 7,
                "SETPCAP" => 8,
                "NET_BIND_SERVICE" => 10,
                "NET_RAW" => 13,
                "SYS_CHROOT" => 18,
                "MKNOD" => 27,
                "AUDIT_WRITE" => 29,
                "SETFCAP" => 31,
                other => panic!("capability {other} is not known to the conformance suite"),
            };
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

/// A derived image runs the added file as its entrypoint, with no CMD left from the base
/// (the agent would refuse extra arguments and exit): the agent answers, as PID 1.
pub async fn a_derived_image_runs_the_agent_as_its_entrypoint(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let Some((spec, client, cleanup)) = agent_container(backend, fixture, "entry", None).await
    else {
        return;
    };
    let cmdline = sh(&client, "root", "tr '\\0' ' ' < /proc/1/cmdline").await;
    assert_eq!(cmdline.trim(), AGENT_PATH, "PID 1 is not the agent alone");
    let link = sh(&client, "root", &format!("readlink {SUDO_PATH}")).await;
    assert_eq!(link.trim(), AGENT_PATH, "the derived image's link");
    let info = backend.inspect(&spec.name).await.expect("inspect");
    assert_eq!(info.state, crate::SandboxState::Running);
    cleanup.run().await;
}

/// The baseline profile holds inside: only the kept capabilities (none for the
/// non-root user), no-new-privileges, seccomp filtering, the ulimits, the host name, no
/// mounts, no engine socket.
pub async fn the_baseline_profile_applies_inside(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let Some((spec, client, cleanup)) = agent_container(backend, fixture, "profile", None).await
    else {
        return;
    };
    let profile = &spec.profile;
    let status = sh(&client, "root", "cat /proc/self/status").await;
    let mask = format!("{:016x}", capability_mask(&profile.capabilities));
    assert_eq!(
        status_field(&status, "CapEff"),
        mask,
        "effective capabilities of root"
    );
    assert_eq!(status_field(&status, "CapBnd"), mask, "bounding set");
    assert_eq!(
        status_field(&status, "NoNewPrivs"),
        "1",
        "no-new-privileges"
    );
    assert_eq!(status_field(&status, "Seccomp"), "2", "seccomp filtering");
    let user_status = sh(&client, "user", "cat /proc/self/status").await;
    assert_eq!(
        status_field(&user_status, "CapEff"),
        "0000000000000000",
        "the sandbox user has capabilities"
    );
    let ulimits = sh(&client, "root", "ulimit -n; ulimit -f; hostname").await;
    let lines: Vec<&str> = ulimits.lines().collect();
    assert_eq!(
        lines,
        vec![
            profile.nofile.to_string(),
            (profile.max_file_size / 1024).to_string(),
            profile.hostname.clone()
        ],
        "nofile, fsize (KiB) and host name"
    );
    let escapes = sh(
        &client,
        "root",
        "mount -t tmpfs none /mnt 2>/dev/null && echo mounted; \
         for s in /var/run/docker.sock /run/docker.sock /run/podman/podman.sock; do \
           [ -e $s ] && echo $s; done; true",
    )
    .await;
    assert!(escapes.trim().is_empty(), "escape routes inside: {escapes}");
    // The checks run on the engine's host: no namespace may be the host's own.
    let kinds = ["pid", "ipc", "uts", "net", "mnt", "cgroup"];
    let inside = sh(
        &client,
        "root",
        &format!(
            "for n in {}; do readlink /proc/self/ns/$n; done",
            kinds.join(" ")
        ),
    )
    .await;
    let inside: Vec<&str> = inside.lines().collect();
    assert_eq!(inside.len(), kinds.len(), "namespaces inside: {inside:?}");
    for (kind, inside) in kinds.iter().zip(inside) {
        let host = std::fs::read_link(format!("/proc/self/ns/{kind}"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        assert_ne!(
            inside.trim(),
            host,
            "the sandbox shares the host's {kind} namespace"
        );
    }
    cleanup.run().await;
}

/// Memory, pids and CPU limits are what the sandbox's cgroup enforces.
pub async fn limits_apply_inside(backend: &dyn SandboxBackend, fixture: &Fixture) {
    let limits = Limits {
        cpus: 0.25,
        memory_mb: 96,
        pids: 50,
        disk_mb: None,
    };
    let Some((_spec, client, cleanup)) =
        agent_container(backend, fixture, "climits", Some(limits)).await
    else {
        return;
    };
    // cgroup v2 files first, then v1's.
    let read = |v2: &'static str, v1: &'static str| {
        format!("cat /sys/fs/cgroup/{v2} 2>/dev/null || cat /sys/fs/cgroup/{v1}")
    };
    let pids = sh(&client, "root", &read("pids.max", "pids/pids.max")).await;
    assert_eq!(pids.trim(), "50", "pids limit");
    let memory = sh(
        &client,
        "root",
        &read("memory.max", "memory/memory.limit_in_bytes"),
    )
    .await;
    assert_eq!(memory.trim(), (96u64 << 20).to_string(), "memory limit");
    let cpu = sh(
        &client,
        "root",
        "cat /sys/fs/cgroup/cpu.max 2>/dev/null || \
         echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)",
    )
    .await;
    let parts: Vec<f64> = cpu
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(parts.len(), 2, "cpu quota and period: {cpu}");
    assert!(
        (parts[0] / parts[1] - 0.25).abs() < 1e-6,
        "cpu quota {cpu} is not a quarter core"
    );
    cleanup.run().await;
}

/// Writes past the disk quota fail inside with a quota error, and writing works again
/// once space is freed; a backend without quotas refuses a quota instead of ignoring it.
pub async fn the_disk_quota_stops_writes_inside(backend: &dyn SandboxBackend, fixture: &Fixture) {
    if !backend.capabilities().disk_quota {
        let mut spec = fixture.spec("noquota");
        spec.limits.disk_mb = Some(1024);
        let cleanup = Cleanup::new(backend, vec![spec.name.clone()]);
        match backend.create(&spec).await {
            Err(Error::Unsupported { .. }) => {}
            other => panic!("a backend without quotas must refuse disk_mb: {other:?}"),
        }
        cleanup.run().await;
        return;
    }
    // Where the quota counts the image too (btrfs with full qgroups), room beyond it;
    // where it counts only writes (XFS, btrfs simple quotas), the writes go further.
    let image_mb = backend
        .ensure_image(&fixture.image)
        .await
        .expect("image")
        .size
        .unwrap_or(0)
        >> 20;
    let limits = Limits {
        disk_mb: Some(image_mb + 96),
        ..fixture.spec("x").limits
    };
    let Some((spec, client, cleanup)) =
        agent_container(backend, fixture, "quota", Some(limits)).await
    else {
        return;
    };
    let out = ShellCommand {
        cmd: format!(
            "dd if=/dev/zero of=/tmp/fill bs=1M count={} 2>&1; echo status=$?; \
             rm -f /tmp/fill; dd if=/dev/zero of=/tmp/small bs=1M count=8 2>&1; echo again=$?",
            image_mb + 96 + 64
        ),
        user: Some("user".into()),
        ..ShellCommand::default()
    }
    .run(&client, Duration::from_secs(60), 1 << 20)
    .await
    .expect("run dd");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("status=1"),
        "writing past the quota did not fail: {text}"
    );
    assert!(
        text.contains("Disk quota exceeded") || text.contains("No space left on device"),
        "the failure is not a quota error: {text}"
    );
    assert!(
        text.contains("again=0"),
        "writing after freeing space failed: {text}"
    );
    // The usage the quota counts includes the 8 MiB still written, within the quota.
    let used = backend
        .disk_usage(&spec.name)
        .await
        .expect("disk usage")
        .expect("a backend with quotas reports the usage they count");
    let quota = (image_mb + 96) << 20;
    assert!(
        (8 << 20..=quota).contains(&used),
        "usage {used} is not between 8 MiB and the quota {quota}"
    );
    cleanup.run().await;
}

/// An engine volume mounted by two containers is shared; its files outlive them; it
/// cannot be removed while mounted, and once removed it is gone. (The in-memory
/// backend models no volumes and says so.)
pub async fn a_volume_is_shared_by_containers_and_outlives_them(
    backend: &dyn SandboxBackend,
    fixture: &Fixture,
) {
    let name = format!("colima-e2b-conformance-vol-{}", fixture.run_id);
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(super::SUITE_LABEL.to_string(), "true".to_string());
    labels.insert(super::CHECK_LABEL.to_string(), fixture.run_id.clone());
    match backend.create_volume(&name, &labels).await {
        Err(Error::Unsupported { .. }) if backend.name() == "memory" => return,
        other => other.expect("create the volume"),
    }
    let bind = |path: &str| {
        vec![VolumeBind {
            volume: name.clone(),
            path: path.to_string(),
        }]
    };
    let listed = backend
        .list_volumes(&[
            (super::SUITE_LABEL, "true"),
            (super::CHECK_LABEL, &fixture.run_id),
        ])
        .await
        .expect("list volumes");
    assert_eq!(
        listed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec![name.as_str()],
        "a listing by both labels"
    );
    assert!(
        backend
            .list_volumes(&[(super::SUITE_LABEL, "true"), (super::CHECK_LABEL, "other")])
            .await
            .expect("list volumes")
            .is_empty(),
        "every label pair must match"
    );
    let Some((a, ca, cleanup_a)) =
        agent_container_with(backend, fixture, "vol-a", None, bind("/mnt/a")).await
    else {
        backend
            .remove_volume(&name)
            .await
            .expect("remove the volume");
        return;
    };
    let (b, cb, cleanup_b) = agent_container_with(backend, fixture, "vol-b", None, bind("/mnt/b"))
        .await
        .expect("a second agent container");
    sh(&ca, "root", "echo shared > /mnt/a/f").await;
    assert_eq!(sh(&cb, "root", "cat /mnt/b/f").await, "shared\n");
    assert!(matches!(
        backend.remove_volume(&name).await,
        Err(Error::Conflict(_))
    ));
    for (spec, cleanup) in [(a, cleanup_a), (b, cleanup_b)] {
        backend.remove(&spec.name).await.expect("remove");
        cleanup.run().await;
    }
    let (c, cc, cleanup_c) = agent_container_with(backend, fixture, "vol-c", None, bind("/data"))
        .await
        .expect("a third agent container");
    assert_eq!(sh(&cc, "root", "cat /data/f").await, "shared\n");
    backend.remove(&c.name).await.expect("remove");
    cleanup_c.run().await;
    backend
        .remove_volume(&name)
        .await
        .expect("remove the volume");
    assert!(matches!(
        backend.remove_volume(&name).await,
        Err(Error::NotFound { .. })
    ));
}
