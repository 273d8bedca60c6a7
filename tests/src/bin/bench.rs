//! Lifecycle benchmark: sandbox create-to-running and remove through `SandboxManager`,
//! next to the raw engine calls (bollard) measured in the same run.
//!
//! ```text
//! cargo run --release -p tests --bin bench -- [iterations] [image]
//! ```
//! Prints medians and p90 in milliseconds and the ratio of each to the raw floor.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_docker::{DockerBackend, DockerConfig};
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use sandbox_core::{ManagerConfig, SandboxBackend, SandboxManager, SandboxSpec};

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    (p(0.5), p(0.9))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(15);
    let image = args
        .next()
        .unwrap_or_else(|| "colima-e2b/base:latest".into());
    let backend = Arc::new(DockerBackend::connect(DockerConfig::default()).await?);
    let docker = backend.client().clone();

    // Raw floor: create + start, then force remove, minimal container.
    let (mut raw_create, mut raw_remove) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("colima-e2b-bench-raw-{}-{i}", std::process::id());
        let t = Instant::now();
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(image.clone()),
                    cmd: Some(vec!["sleep".into(), "infinity".into()]),
                    ..Default::default()
                },
            )
            .await?;
        docker.start_container(&name, None).await?;
        raw_create.push(t.elapsed());
        let t = Instant::now();
        docker
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await?;
        raw_remove.push(t.elapsed());
    }

    // Our backend alone: the same engine calls with the sandbox profile (dedicated
    // network, limits, log cap), to tell profile cost from manager overhead.
    let (mut b_create, mut b_remove) = (Vec::new(), Vec::new());
    for i in 0..n {
        let spec = sandbox_core::ContainerSpec {
            name: format!("colima-e2b-bench-be-{}-{i}", std::process::id()),
            image: image.clone(),
            command: vec!["sleep".into(), "infinity".into()],
            env: vec![],
            labels: BTreeMap::new(),
            limits: Default::default(),
            internet: true,
            user: None,
            agent_port: None,
        };
        let t = Instant::now();
        backend.create(&spec).await?;
        b_create.push(t.elapsed());
        let t = Instant::now();
        backend.remove(&spec.name).await?;
        b_remove.push(t.elapsed());
    }

    let mut templates = BTreeMap::new();
    templates.insert("base".to_string(), image.clone());
    let manager = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            owner: format!("bench-{}", std::process::id()),
            templates,
            ..ManagerConfig::default()
        },
    );
    manager.start().await?;
    let (mut m_create, mut m_kill) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let info = manager
            .create(SandboxSpec::new("base", Duration::from_secs(300)))
            .await?;
        m_create.push(t.elapsed());
        let t = Instant::now();
        manager.kill(&info.id).await?;
        m_kill.push(t.elapsed());
    }

    let rows = [
        (
            "create+start (raw bollard)",
            stats(raw_create.clone()),
            None,
        ),
        (
            "create (DockerBackend)",
            stats(b_create),
            Some(stats(raw_create.clone()).0),
        ),
        (
            "create (SandboxManager)",
            stats(m_create),
            Some(stats(raw_create).0),
        ),
        (
            "remove force (raw bollard)",
            stats(raw_remove.clone()),
            None,
        ),
        (
            "remove (DockerBackend)",
            stats(b_remove),
            Some(stats(raw_remove.clone()).0),
        ),
        (
            "kill (SandboxManager)",
            stats(m_kill),
            Some(stats(raw_remove).0),
        ),
    ];
    println!("docker, {image}, {n} iterations each");
    println!(
        "{:<30} {:>10} {:>10} {:>8}",
        "operation", "median ms", "p90 ms", "ratio"
    );
    for (name, (med, p90), floor) in rows {
        let ratio = floor
            .map(|f| format!("{:.2}x", med / f))
            .unwrap_or_else(|| "floor".into());
        println!("{name:<30} {med:>10.1} {p90:>10.1} {ratio:>8}");
    }
    Ok(())
}
