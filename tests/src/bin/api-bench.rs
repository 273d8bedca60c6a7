//! HTTP API benchmark: create -> run `echo hi` -> kill, the exec round trip and a 1 MiB
//! file round trip through the native API, on each engine, measured in one run.
//!
//! ```text
//! cargo build --release -p colima-e2b -p tests
//! COLIMA_E2B_BIN=target/release/colima-e2b target/release/api-bench [iterations] [docker podman]
//! ```
//! Starts one server per engine (a fresh owner each), prints medians and p90 in ms.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{OwnerCleanup, Server, ServerOptions};

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    (p(0.5), p(0.9))
}

async fn ok_json(resp: reqwest::Response) -> Result<Value, String> {
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!("{status}: {v}"))
    }
}

async fn bench(engine: &str, n: usize) -> Result<Vec<(String, (f64, f64))>, String> {
    let mut options = ServerOptions::new();
    options.backend = engine.to_string();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let (mut create, mut run, mut kill, mut total) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let t0 = Instant::now();
        let v = ok_json(
            server
                .post("/sandboxes/", json!({"template": "base"}))
                .await,
        )
        .await?;
        let t1 = Instant::now();
        let id = v["sandbox_id"].as_str().ok_or("no id")?.to_string();
        let out = ok_json(
            server
                .post(
                    &format!("/sandboxes/{id}/commands/run"),
                    json!({"cmd": "echo hi"}),
                )
                .await,
        )
        .await?;
        if out["stdout"] != "hi\n" {
            return Err(format!("echo gave {out}"));
        }
        let t2 = Instant::now();
        ok_json(server.delete(&format!("/sandboxes/{id}")).await).await?;
        let t3 = Instant::now();
        create.push(t1 - t0);
        run.push(t2 - t1);
        kill.push(t3 - t2);
        total.push(t3 - t0);
    }
    let v = ok_json(
        server
            .post("/sandboxes/", json!({"template": "base"}))
            .await,
    )
    .await?;
    let id = v["sandbox_id"].as_str().ok_or("no id")?.to_string();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (mut exec, mut files) = (vec![], vec![]);
    for i in 0..(n * 4 + 3) {
        let t = Instant::now();
        ok_json(
            server
                .post(
                    &format!("/sandboxes/{id}/commands/run"),
                    json!({"cmd": "echo hi"}),
                )
                .await,
        )
        .await?;
        let e = t.elapsed();
        let t = Instant::now();
        let url = server.url(&format!("/sandboxes/{id}/files/raw?path=bench.bin"));
        ok_json(
            server
                .http
                .put(&url)
                .body(data.clone())
                .send()
                .await
                .map_err(|e| e.to_string())?,
        )
        .await?;
        let back = server
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        if back.len() != data.len() {
            return Err("file round trip lost bytes".into());
        }
        let f = t.elapsed();
        // The first rounds warm connections and caches.
        if i >= 3 {
            exec.push(e);
            files.push(f);
        }
    }
    ok_json(server.delete(&format!("/sandboxes/{id}")).await).await?;
    Ok(vec![
        ("create".into(), stats(create)),
        ("run echo hi (fresh sandbox)".into(), stats(run)),
        ("kill".into(), stats(kill)),
        ("create+run+kill".into(), stats(total)),
        ("exec round trip (echo hi)".into(), stats(exec)),
        ("1 MiB write+read (raw)".into(), stats(files)),
    ])
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse().map_err(|_| "iterations must be a number"))
        .transpose()?
        .unwrap_or(10);
    let mut engines: Vec<String> = args.collect();
    if engines.is_empty() {
        engines = vec!["docker".into(), "podman".into()];
    }
    let mut results = Vec::new();
    for engine in &engines {
        results.push((engine.clone(), bench(engine, n).await?));
    }
    println!(
        "HTTP API, template base, {n} lifecycles and {} exec/file rounds per engine",
        n * 4
    );
    print!("{:<30}", "operation (median / p90 ms)");
    for (engine, _) in &results {
        print!(" {engine:>18}");
    }
    println!();
    for row in 0..results[0].1.len() {
        print!("{:<30}", results[0].1[row].0);
        for (_, r) in &results {
            let (med, p90) = r[row].1;
            print!(" {:>18}", format!("{med:.1} / {p90:.1}"));
        }
        println!();
    }
    Ok(())
}
