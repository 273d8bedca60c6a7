//! HTTP API benchmark: create -> run `echo hi` -> kill, the exec round trip, a 1 MiB
//! file round trip and the WebSocket first-output latency through the native API, on
//! each engine, measured in one run.
//!
//! ```text
//! cargo build --release -p colima-e2b -p tests
//! COLIMA_E2B_BIN=target/release/colima-e2b target/release/api-bench [iterations] [docker podman]
//! ```
//! Starts one server per engine (a fresh owner each), prints medians and p90 in ms.
//! With Docker, the same three steps done directly with bollard (default network, no
//! limits, `sleep infinity`, the engine's exec) are measured in the same run as the floor.
//!
//! WebSocket first-output latency: a background command `sleep 0.3; date +%s%N; sleep 1`
//! is followed over `WS /sandboxes/{id}/commands/stream/{pid}` (connected during the
//! first sleep); the latency is the host's clock when the stdout message arrives minus
//! the nanosecond timestamp the command printed. (The command outlives its output, so
//! output held back until the exit would show.) Host and container share the kernel's
//! clock on Linux (Docker, Podman); not so for Colima's VM, whose numbers would include
//! the clock offset. The seed server polled output every 100 ms instead of pushing it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tests::raw::{self, stats};
use tests::{OwnerCleanup, Server, ServerOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long the streamed command sleeps before printing, so that the WebSocket is
/// following it before the output exists.
const WS_SLEEP: &str = "0.3";

/// The seed server's WebSocket polling interval, ms (its README, "WebSocket Efficiency").
const SEED_POLL_MS: f64 = 100.0;

async fn ok_json(resp: reqwest::Response) -> Result<Value, String> {
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!("{status}: {v}"))
    }
}

/// A minimal WebSocket client (RFC 6455), enough to follow an output stream: the
/// handshake, then unmasked server frames. (The tests crate has no WebSocket client
/// dependency; this avoids adding one.)
struct WsClient {
    stream: BufReader<TcpStream>,
}

impl WsClient {
    /// Opens `ws://{host of server_url}{path}`.
    async fn connect(server_url: &str, path: &str) -> Result<Self, String> {
        let host = server_url
            .strip_prefix("http://")
            .ok_or("the server URL is not http://")?;
        let tcp = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut stream = BufReader::new(tcp);
        // The key is a nonce the server only echoes (hashed); a fixed one is fine here.
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut status = String::new();
        stream
            .read_line(&mut status)
            .await
            .map_err(|e| e.to_string())?;
        if !status.starts_with("HTTP/1.1 101") {
            return Err(format!("WebSocket upgrade refused: {}", status.trim()));
        }
        loop {
            let mut line = String::new();
            let n = stream
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed during the handshake".into());
            }
            if line == "\r\n" {
                return Ok(Self { stream });
            }
        }
    }

    /// The next text message, or `None` when the server closed the connection.
    async fn next_text(&mut self) -> Result<Option<String>, String> {
        let io = |e: std::io::Error| e.to_string();
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            match self.stream.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.to_string()),
            }
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => u64::from(self.stream.read_u16().await.map_err(io)?),
                127 => self.stream.read_u64().await.map_err(io)?,
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if head[1] & 0x80 != 0 {
                self.stream.read_exact(&mut mask).await.map_err(io)?;
            }
            let mut payload = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
            self.stream.read_exact(&mut payload).await.map_err(io)?;
            if head[1] & 0x80 != 0 {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                // Text, or a continuation of it.
                0x0 | 0x1 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8(message)
                            .map(Some)
                            .map_err(|e| e.to_string());
                    }
                }
                0x8 => return Ok(None),
                // Ping, pong, binary: not part of this API's stream.
                _ => {}
            }
        }
    }
}

fn unix_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default()
}

/// One sample of the WebSocket first-output latency in sandbox `id`.
async fn ws_first_output(server: &Server, id: &str) -> Result<Duration, String> {
    let v = ok_json(
        server
            .post(
                &format!("/sandboxes/{id}/commands/run/background"),
                json!({"cmd": format!("sleep {WS_SLEEP}; date +%s%N; sleep 1")}),
            )
            .await,
    )
    .await?;
    let pid = v["pid"].as_u64().ok_or("no pid")?;
    let mut ws = WsClient::connect(
        &server.url,
        &format!("/sandboxes/{id}/commands/stream/{pid}"),
    )
    .await?;
    let connected = unix_nanos();
    while let Some(text) = ws.next_text().await? {
        let received = unix_nanos();
        let msg: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        match msg["type"].as_str() {
            // The first output is all this measures: the connection is dropped, and the
            // command ends on its own a second later.
            Some("stdout") => {
                let data = msg["data"].as_str().unwrap_or_default();
                let printed: i128 = data
                    .trim()
                    .parse()
                    .map_err(|_| format!("unexpected stdout {data:?}"))?;
                if printed < connected {
                    return Err(format!(
                        "the output came before the WebSocket connected; raise WS_SLEEP ({WS_SLEEP} s)"
                    ));
                }
                let ns = received - printed;
                if ns < 0 {
                    return Err(format!(
                        "the container's clock is {} ms ahead of the host's",
                        -ns / 1_000_000
                    ));
                }
                return Ok(Duration::from_nanos(ns as u64));
            }
            Some("exit") | Some("error") => return Err(format!("no stdout before {msg}")),
            _ => {}
        }
    }
    Err("the stream ended without stdout".into())
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
    let mut ws = vec![];
    for i in 0..(n * 4 + 1) {
        let latency = ws_first_output(&server, &id).await?;
        // The first round warms the connection to the agent.
        if i >= 1 {
            ws.push(latency);
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
        ("WS first output (push)".into(), stats(ws)),
    ])
}

/// create+start -> exec `echo hi` -> force remove, straight to Docker with bollard.
async fn raw_floor(n: usize) -> Result<Vec<(String, (f64, f64))>, String> {
    let backend = backend_docker::DockerBackend::connect(Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let docker = backend.client();
    let image = "colima-e2b/base:latest";
    let (mut create, mut run, mut kill, mut total) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let name = format!("colima-e2b-api-bench-raw-{}-{i}", std::process::id());
        let t0 = Instant::now();
        raw::create_started(docker, &name, image)
            .await
            .map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let (out, code) = raw::exec(docker, &name, &["echo", "hi"], None)
            .await
            .map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        raw::remove(docker, &name)
            .await
            .map_err(|e| e.to_string())?;
        let t3 = Instant::now();
        if out != b"hi\n" || code != Some(0) {
            return Err(format!("raw exec gave {out:?} {code:?}"));
        }
        create.push(t1 - t0);
        run.push(t2 - t1);
        kill.push(t3 - t2);
        total.push(t3 - t0);
    }
    Ok(vec![
        ("create+start".into(), stats(create)),
        ("exec echo hi".into(), stats(run)),
        ("remove (force)".into(), stats(kill)),
        ("create+exec+remove".into(), stats(total)),
    ])
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let (n, engines) = raw::bench_args()?;
    let mut results = Vec::new();
    for engine in &engines {
        results.push((engine.clone(), bench(engine, n).await?));
    }
    let floor = if engines.iter().any(|e| e == "docker") {
        Some(raw_floor(n).await?)
    } else {
        None
    };
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
    println!(
        "WS first output: output printed in the sandbox -> stdout message received, {} \
         samples per engine; the seed polled every {SEED_POLL_MS:.0} ms, which alone adds \
         ~{:.0} ms median / ~{:.0} ms p90 on top of its transport.",
        n * 4,
        SEED_POLL_MS * 0.5,
        SEED_POLL_MS * 0.9
    );
    if let Some(floor) = floor {
        println!("\nDocker floor, same run: bollard directly (default network, no limits)");
        for (name, (med, p90)) in &floor {
            println!("{name:<30} {:>18}", format!("{med:.1} / {p90:.1}"));
        }
        let api = results
            .iter()
            .find(|(e, _)| e == "docker")
            .and_then(|(_, r)| r.iter().find(|(n, _)| n == "create+run+kill"))
            .map(|(_, (med, _))| *med);
        if let (Some(api), Some((_, (raw, _)))) = (api, floor.last()) {
            println!(
                "API create+run+kill / bollard create+exec+remove: {:.2}x",
                api / raw
            );
        }
    }
    Ok(())
}
