//! Warm pool benchmark, per engine, in one run: create-to-first-command warm (a claim of
//! a pool member) and cold, the engine's own create+start and create+start+exec floor,
//! a burst of 50 concurrent creates warm and cold (p50, p95, wall time), and the memory
//! an idle pool member uses.
//!
//! ```text
//! cargo build --release -p colima-e2b -p tests
//! COLIMA_E2B_BIN=target/release/colima-e2b target/release/pool-bench [iterations] [docker podman]
//! ```
//! Each phase starts its own server (a fresh owner); the floor talks to the engine's
//! Docker-compatible API with bollard (Podman serves one on its socket too): default
//! network, no limits, `sleep infinity`, the engine's exec. Ratios are against the floor's
//! create+start measured in the same run.

use std::time::{Duration, Instant};

use bollard::Docker;
use serde_json::{json, Value};
use tests::raw::{self, stats};
use tests::{OwnerCleanup, Server, ServerOptions};

const IMAGE: &str = "colima-e2b/base:latest";
const BURST: usize = 50;

fn percentile(mut v: Vec<Duration>, q: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0
}

async fn created_id(resp: reqwest::Response) -> Result<String, String> {
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("create: {status}: {v}"));
    }
    v["sandbox_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("create answered {v}"))
}

/// Create, then the first command's answer: what a client waits for before it can work.
async fn create_to_first_command(server: &Server) -> Result<(Duration, String), String> {
    let t0 = Instant::now();
    let id = created_id(server.post("/sandboxes/", json!({"timeout": 300})).await).await?;
    let (status, out) = server.run(&id, "echo hi").await;
    let took = t0.elapsed();
    if status != 200 || out["stdout"] != "hi\n" {
        return Err(format!("first command: {status} {out}"));
    }
    Ok((took, id))
}

async fn pool_size(server: &Server) -> f64 {
    server
        .metric("colima_e2b_pool_size", &[("template", "base")])
        .await
}

async fn wait_pool(server: &Server, n: f64) -> Result<Duration, String> {
    let t0 = Instant::now();
    while pool_size(server).await < n {
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(format!("the pool did not reach {n}: {}", server.log()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(t0.elapsed())
}

fn server_options(engine: &str, pool: usize) -> ServerOptions {
    let mut options = ServerOptions::new()
        .env("COLIMA_E2B_POOL__BASE", &pool.to_string())
        .env("COLIMA_E2B_POOL__MEMORY_BUDGET_MB", "1000000")
        .env("COLIMA_E2B_MAX_SANDBOXES", "200");
    options.backend = engine.to_string();
    options
}

/// `n` sequential creates to first command, each on a full pool (`warm`) or none.
async fn sequential(engine: &str, n: usize, warm: bool) -> Result<Vec<Duration>, String> {
    let options = server_options(engine, if warm { 2 } else { 0 });
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    // One create first: the derived image exists, every path is warmed up.
    if warm {
        wait_pool(&server, 2.0).await?;
    }
    let (_, first) = create_to_first_command(&server).await?;
    server.delete(&format!("/sandboxes/{first}")).await;
    let mut out = Vec::new();
    for _ in 0..n {
        if warm {
            wait_pool(&server, 2.0).await?;
        }
        let (took, id) = create_to_first_command(&server).await?;
        server.delete(&format!("/sandboxes/{id}")).await;
        out.push(took);
    }
    Ok(out)
}

struct Burst {
    p50: f64,
    p95: f64,
    wall: f64,
    /// Average memory of an idle pool member, MiB (warm bursts).
    member_mb: Option<f64>,
}

/// Average memory use of the owner's containers as the engine reports it, MiB.
fn idle_member_mb(engine: &str, owner: &str) -> Option<f64> {
    let mut cmd = std::process::Command::new(engine);
    if engine == "podman" {
        cmd.args(["--remote", "--url", "unix:///run/podman/podman.sock"]);
    }
    let ids = cmd
        .args([
            "ps",
            "-q",
            "--filter",
            &format!("label=dev.colima-e2b.owner={owner}"),
        ])
        .output()
        .ok()?;
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut cmd = std::process::Command::new(engine);
    if engine == "podman" {
        cmd.args(["--remote", "--url", "unix:///run/podman/podman.sock"]);
    }
    let out = cmd
        .args(["stats", "--no-stream", "--format", "{{.MemUsage}}"])
        .args(&ids)
        .output()
        .ok()?;
    let used: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let used = l.split('/').next()?.trim();
            let split = used.find(|c: char| c.is_ascii_alphabetic())?;
            let (n, unit) = used.split_at(split);
            let n: f64 = n.trim().parse().ok()?;
            Some(match unit.trim().to_ascii_lowercase().as_str() {
                "b" => n / 1048576.0,
                "kib" | "kb" => n / 1024.0,
                "mib" | "mb" => n,
                "gib" | "gb" => n * 1024.0,
                _ => return None,
            })
        })
        .collect();
    (!used.is_empty()).then(|| used.iter().sum::<f64>() / used.len() as f64)
}

/// `BURST` creates at once, each to its first command, on a full pool of `BURST`
/// (`warm`) or none.
async fn burst(engine: &str, warm: bool) -> Result<Burst, String> {
    let options = server_options(engine, if warm { BURST } else { 0 });
    let owner = options.owner.clone();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let mut member_mb = None;
    if warm {
        wait_pool(&server, BURST as f64).await?;
        // Idle members, settled.
        tokio::time::sleep(Duration::from_secs(2)).await;
        member_mb = idle_member_mb(engine, &owner);
    } else {
        let (_, first) = create_to_first_command(&server).await?;
        server.delete(&format!("/sandboxes/{first}")).await;
    }
    let t0 = Instant::now();
    let results =
        futures_util::future::join_all((0..BURST).map(|_| create_to_first_command(&server))).await;
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    let mut times = Vec::new();
    for r in results {
        let (took, id) = r?;
        times.push(took);
        server.delete(&format!("/sandboxes/{id}")).await;
    }
    Ok(Burst {
        p50: percentile(times.clone(), 0.5),
        p95: percentile(times, 0.95),
        wall,
        member_mb,
    })
}

/// The engine's own create+start, and create+start+exec `echo hi`, with bollard.
async fn floor(engine: &str, n: usize) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let docker = match engine {
        "podman" => {
            Docker::connect_with_unix("/run/podman/podman.sock", 120, bollard::API_DEFAULT_VERSION)
        }
        _ => Docker::connect_with_local_defaults(),
    }
    .map_err(|e| e.to_string())?;
    let (mut start, mut exec) = (Vec::new(), Vec::new());
    for i in 0..=n {
        let name = format!("colima-e2b-pool-bench-raw-{}-{i}", std::process::id());
        let t0 = Instant::now();
        raw::create_started(&docker, &name, IMAGE)
            .await
            .map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let (out, code) = raw::exec(&docker, &name, &["echo", "hi"], None)
            .await
            .map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        raw::remove(&docker, &name)
            .await
            .map_err(|e| e.to_string())?;
        if out != b"hi\n" || code != Some(0) {
            return Err(format!("raw exec gave {out:?} {code:?}"));
        }
        // The first round warms the engine's caches.
        if i > 0 {
            start.push(t1 - t0);
            exec.push(t2 - t0);
        }
    }
    Ok((start, exec))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let (n, engines) = raw::bench_args()?;
    for engine in &engines {
        eprintln!("[pool-bench] {engine}: engine floor");
        let (raw_start, raw_exec) = floor(engine, n).await?;
        eprintln!("[pool-bench] {engine}: sequential creates, cold then warm");
        let cold = sequential(engine, n, false).await?;
        let warm = sequential(engine, n, true).await?;
        eprintln!("[pool-bench] {engine}: bursts of {BURST}, cold then warm");
        let cold_burst = burst(engine, false).await?;
        let warm_burst = burst(engine, true).await?;
        let (floor_start, _) = stats(raw_start);
        let (floor_exec, _) = stats(raw_exec);
        let (cold_med, cold_p90) = stats(cold);
        let (warm_med, warm_p90) = stats(warm);
        println!("\n{engine}: {n} rounds each, template base (median / p90 ms)");
        println!("engine create+start (floor)      {floor_start:>9.1}");
        println!("engine create+start+exec         {floor_exec:>9.1}");
        println!(
            "cold create -> first command     {cold_med:>9.1} / {cold_p90:.1}   {:.2}x floor",
            cold_med / floor_start
        );
        println!(
            "warm create -> first command     {warm_med:>9.1} / {warm_p90:.1}   {:.3}x floor",
            warm_med / floor_start
        );
        for (name, b) in [("cold", &cold_burst), ("warm", &warm_burst)] {
            println!(
                "burst of {BURST}, {name}: p50 {:.0}  p95 {:.0}  (p95/p50 {:.2})  wall {:.0}",
                b.p50,
                b.p95,
                b.p95 / b.p50,
                b.wall
            );
        }
        if let Some(mb) = warm_burst.member_mb {
            println!("idle pool member memory (engine stats, mean of {BURST}): {mb:.1} MiB");
        }
    }
    Ok(())
}
