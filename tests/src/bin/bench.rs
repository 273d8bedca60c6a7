//! Benchmarks, each next to the raw engine calls (bollard) measured in the same run:
//! - lifecycle: sandbox create-to-running and remove through `SandboxManager`;
//! - `echo hi` through `AgentClient` vs the engine's exec (create + start + inspect);
//! - a 1 MiB file write + read through `AgentClient` vs the engine's archive API;
//! - the agent binary's size and its idle RSS inside a sandbox.
//!
//! ```text
//! cargo run --release -p tests --bin bench -- [iterations] [image] [agent-iterations]
//! ```
//! Prints medians and p90 in milliseconds and the ratio of each to the raw floor.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_docker::{DockerBackend, DockerConfig};
use bollard::query_parameters::{
    DownloadFromContainerOptions, InspectContainerOptions, UploadToContainerOptions,
};
use envd_proto::messages::{ProcessConfig, StartRequest};
use futures_util::StreamExt;
use sandbox_core::{
    AgentBinary, DeriveImage, ImageFile, ManagerConfig, SandboxBackend, SandboxManager, SandboxSpec,
};
use tests::raw::{self, stats};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(15);
    let image = args
        .next()
        .unwrap_or_else(|| "colima-e2b/base:latest".into());
    let agent_n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let backend = Arc::new(DockerBackend::connect(DockerConfig::default()).await?);
    let docker = backend.client().clone();

    // Raw floor: create + start, then force remove, minimal container.
    let (mut raw_create, mut raw_remove) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("colima-e2b-bench-raw-{}-{i}", std::process::id());
        let t = Instant::now();
        raw::create_started(&docker, &name, &image).await?;
        raw_create.push(t.elapsed());
        let t = Instant::now();
        raw::remove(&docker, &name).await?;
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
            profile: Default::default(),
            volumes: Vec::new(),
        };
        let t = Instant::now();
        backend.create(&spec).await?;
        b_create.push(t.elapsed());
        let t = Instant::now();
        backend.remove(&spec.name).await?;
        b_remove.push(t.elapsed());
    }

    let mut templates = BTreeMap::new();
    templates.insert(
        "base".to_string(),
        sandbox_core::Template::new(image.clone()),
    );
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

    let agent_rows = agent_bench(&backend, &image, agent_n).await?;

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
    println!();
    println!("agent vs engine, {agent_n} iterations each");
    println!(
        "{:<30} {:>10} {:>10} {:>8}",
        "operation", "median ms", "p90 ms", "speedup"
    );
    for (name, (med, p90), floor) in &agent_rows.rows {
        let speedup = floor
            .map(|f| format!("{:.1}x", f / med))
            .unwrap_or_else(|| "engine".into());
        println!("{name:<30} {med:>10.2} {p90:>10.2} {speedup:>8}");
    }
    println!(
        "agent binary: {:.2} MiB ({} bytes); agent RSS in a sandbox: idle {:.2} MiB, after the runs {:.2} MiB",
        agent_rows.binary_bytes as f64 / 1048576.0,
        agent_rows.binary_bytes,
        agent_rows.idle_rss_kib as f64 / 1024.0,
        agent_rows.busy_rss_kib as f64 / 1024.0,
    );
    Ok(())
}

type Row = (&'static str, (f64, f64), Option<f64>);

struct AgentRows {
    rows: Vec<Row>,
    binary_bytes: usize,
    idle_rss_kib: u64,
    busy_rss_kib: u64,
}

/// VmRSS of a container's main process (the agent), read on the host.
async fn agent_rss_kib(
    docker: &bollard::Docker,
    name: &str,
) -> Result<u64, Box<dyn std::error::Error>> {
    let c = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await?;
    let pid = c.state.and_then(|s| s.pid).ok_or("no pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or("no VmRSS")?;
    Ok(kib)
}

async fn agent_bench(
    backend: &Arc<DockerBackend>,
    image: &str,
    n: usize,
) -> Result<AgentRows, Box<dyn std::error::Error>> {
    let docker = backend.client().clone();
    let agent = AgentBinary::load(&tests::agent_binary())?;
    let binary_bytes = agent.contents().len();
    let mut templates = BTreeMap::new();
    templates.insert("base".to_string(), sandbox_core::Template::new(image));
    let manager = SandboxManager::new(
        backend.clone(),
        ManagerConfig {
            owner: format!("bench-agent-{}", std::process::id()),
            templates,
            agent: Some(agent),
            ..ManagerConfig::default()
        },
    );
    manager.start().await?;
    let info = manager
        .create(SandboxSpec::new("base", Duration::from_secs(600)))
        .await?;
    let name = sandbox_core::labels::container_name(&info.id);
    let result = async {
        // Settle, then read the idle agent's memory before any command runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_rss_kib = agent_rss_kib(&docker, &name).await?;
        let client = manager.agent(&info.id).await?;
        let echo = StartRequest {
            process: ProcessConfig {
                cmd: "echo".into(),
                args: vec!["hi".into()],
                ..Default::default()
            },
            stdin: Some(false),
            ..Default::default()
        };
        // The transport floor: one unary call (no process spawned).
        let mut a_list = Vec::new();
        for i in 0..n + 3 {
            let t = Instant::now();
            client.list().await?;
            if i >= 3 {
                a_list.push(t.elapsed());
            }
        }
        let (mut a_echo, mut e_echo) = (Vec::new(), Vec::new());
        // Warm up both paths (connection pool, page cache) before measuring.
        for i in 0..n + 3 {
            let t = Instant::now();
            let out = client
                .start(&echo, None)
                .await?
                .collect_output(1024)
                .await?;
            let took = t.elapsed();
            if out.stdout != b"hi\n" || out.end.exit_code != 0 {
                return Err(format!("agent echo gave {out:?}").into());
            }
            if i >= 3 {
                a_echo.push(took);
            }
            let t = Instant::now();
            let (stdout, code) = raw::exec(&docker, &name, &["echo", "hi"], Some("user")).await?;
            let took = t.elapsed();
            if stdout != b"hi\n" || code != Some(0) {
                return Err(format!("engine exec gave {stdout:?} {code:?}").into());
            }
            if i >= 3 {
                e_echo.push(took);
            }
        }

        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let (mut a_file, mut e_file) = (Vec::new(), Vec::new());
        for i in 0..n + 3 {
            let t = Instant::now();
            client
                .write_file("/home/user/bench-agent.bin", data.clone())
                .await?;
            let back = client
                .read_file("/home/user/bench-agent.bin")
                .await?
                .read_to_end(2 << 20)
                .await?;
            let took = t.elapsed();
            if back != data {
                return Err("agent file round trip differs".into());
            }
            if i >= 3 {
                a_file.push(took);
            }
            let t = Instant::now();
            let tar = DeriveImage {
                base: String::new(),
                tag: String::new(),
                files: vec![ImageFile {
                    path: "/home/user/bench-engine.bin".into(),
                    contents: data.clone().into(),
                    mode: 0o644,
                }],
                links: vec![],
                entrypoint: vec![],
                labels: BTreeMap::new(),
            }
            .tar()?;
            docker
                .upload_to_container(
                    &name,
                    Some(UploadToContainerOptions {
                        path: "/".into(),
                        ..Default::default()
                    }),
                    bollard::body_full(tar.into()),
                )
                .await?;
            let mut got = 0usize;
            let mut download = docker.download_from_container(
                &name,
                Some(DownloadFromContainerOptions {
                    path: "/home/user/bench-engine.bin".into(),
                }),
            );
            while let Some(chunk) = download.next().await {
                got += chunk?.len();
            }
            let took = t.elapsed();
            if got < data.len() {
                return Err(format!("engine archive download gave {got} bytes").into());
            }
            if i >= 3 {
                e_file.push(took);
            }
        }
        let busy_rss_kib = agent_rss_kib(&docker, &name).await?;
        let e_echo_med = stats(e_echo.clone()).0;
        let e_file_med = stats(e_file.clone()).0;
        Ok::<_, Box<dyn std::error::Error>>(AgentRows {
            rows: vec![
                ("echo hi (engine exec)", stats(e_echo), None),
                ("echo hi (AgentClient)", stats(a_echo), Some(e_echo_med)),
                ("List unary (AgentClient)", stats(a_list), Some(e_echo_med)),
                ("1 MiB write+read (archive)", stats(e_file), None),
                (
                    "1 MiB write+read (AgentClient)",
                    stats(a_file),
                    Some(e_file_med),
                ),
            ],
            binary_bytes,
            idle_rss_kib,
            busy_rss_kib,
        })
    }
    .await;
    manager.kill(&info.id).await?;
    result
}
