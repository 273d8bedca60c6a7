//! The seed's file and command API on the real server, over real engines.

use serde_json::{json, Value};
use tests::{OwnerCleanup, Server, ServerOptions};

async fn sandbox(server: &Server, body: Value) -> String {
    let resp = server.post("/sandboxes/", body).await;
    let status = resp.status();
    let v: Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "create failed: {v}");
    v["sandbox_id"].as_str().expect("id").to_string()
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let v = resp.json().await.expect("json body");
    (status, v)
}

async fn run(server: &Server, id: &str, body: Value) -> (u16, Value) {
    json_of(
        server
            .post(&format!("/sandboxes/{id}/commands/run"), body)
            .await,
    )
    .await
}

#[tokio::test]
async fn seed_examples_write_a_script_and_run_it() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(
        &server,
        json!({"template": "python", "timeout": 600, "envs": {"DEBUG": "1"}}),
    )
    .await;

    let (status, v) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/files/write"),
                json!({"path": "/home/user/script.py", "data": "print(\"Hello, World!\")"}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{v}");

    let (status, v) = run(
        &server,
        &id,
        json!({"cmd": "python script.py", "timeout": 30, "cwd": "/home/user"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"stdout": "Hello, World!\n", "stderr": "", "exit_code": 0, "error": null, "truncated": false})
    );

    // Sandbox envs apply to every command, command envs add to them, as user `user`.
    let (_, v) = run(
        &server,
        &id,
        json!({"cmd": "echo $DEBUG $EXTRA $(id -un) $HOME $PWD", "envs": {"EXTRA": "x"}}),
    )
    .await;
    assert_eq!(v["stdout"], "1 x user /home/user /home/user\n");
    let (_, v) = run(&server, &id, json!({"cmd": "echo oops >&2; exit 3"})).await;
    assert_eq!(
        (v["exit_code"].as_i64(), v["stderr"].as_str()),
        (Some(3), Some("oops\n"))
    );

    // What that did shows in the metrics: engine calls, agent calls, commands.
    let metrics = server.get("/metrics").await.text().await.expect("metrics");
    for needle in [
        r#"colima_e2b_engine_call_duration_seconds_count{backend=""#,
        r#"op="create",outcome="ok"}"#,
        r#"colima_e2b_agent_call_duration_seconds_count{call="process.Process/Start",outcome="ok"}"#,
        r#"colima_e2b_commands_total{outcome="ok"} 2"#,
        r#"colima_e2b_commands_total{outcome="nonzero"} 1"#,
        "colima_e2b_command_duration_seconds_count 3",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }

    // A user the sandbox does not have is the client's mistake.
    for path in ["commands/run", "commands/run/background"] {
        let (status, v) = json_of(
            server
                .post(
                    &format!("/sandboxes/{id}/{path}"),
                    json!({"cmd": "true", "user": "nobody2"}),
                )
                .await,
        )
        .await;
        assert_eq!(
            (status, &v["code"]),
            (422, &json!("invalid_argument")),
            "{v}"
        );
    }
}

#[tokio::test]
async fn files_read_list_exist_and_remove_with_json_errors() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, json!({"template": "base"})).await;
    let base = format!("/sandboxes/{id}/files");

    let binary: Vec<u8> = (0..=255u8).collect();
    let b64 = base64_encode(&binary);
    let (status, _) = json_of(
        server
            .post(
                &format!("{base}/write"),
                json!({"path": "dir/sub/bin.dat", "data": b64, "encoding": "base64"}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200);
    let (status, v) = json_of(
        server
            .get(&format!("{base}/read?path=dir/sub/bin.dat&encoding=base64"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"], b64);
    assert_eq!(v["path"], "/home/user/dir/sub/bin.dat");

    let (_, v) = json_of(
        server
            .get(&format!("{base}/list?path=/home/user/dir&depth=2"))
            .await,
    )
    .await;
    let names: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"sub") && names.contains(&"bin.dat"), "{v}");
    let (_, v) = json_of(
        server
            .get(&format!("{base}/exists?path=dir/sub/bin.dat"))
            .await,
    )
    .await;
    assert_eq!(v["exists"], true);

    let (status, _) = json_of(server.delete(&format!("{base}/?path=dir")).await).await;
    assert_eq!(status, 200);
    let (_, v) = json_of(
        server
            .get(&format!("{base}/exists?path=dir/sub/bin.dat"))
            .await,
    )
    .await;
    assert_eq!(v["exists"], false);

    for (path, want) in [
        (format!("{base}/read?path=/nope.txt"), 404),
        (format!("{base}/read?path=/home/user"), 422),
        (format!("{base}/list?path=/nope"), 404),
        (
            "/sandboxes/clmnosuch/files/read?path=/etc/hostname".to_string(),
            404,
        ),
    ] {
        let (status, v) = json_of(server.get(&path).await).await;
        assert_eq!(status, want, "{path}: {v}");
        assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
    }
    let (status, v) = json_of(server.delete(&format!("{base}/?path=/nope")).await).await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test]
async fn raw_files_stream_both_ways() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, json!({"template": "base"})).await;
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let resp = server
        .http
        .put(server.url(&format!("/sandboxes/{id}/files/raw?path=big.bin")))
        .body(data.clone())
        .send()
        .await
        .expect("upload");
    let (status, v) = json_of(resp).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["size"].as_u64(), Some(data.len() as u64));
    let resp = server
        .get(&format!("/sandboxes/{id}/files/raw?path=big.bin"))
        .await;
    assert_eq!(resp.status(), 200);
    let back = resp.bytes().await.expect("download");
    assert!(back.as_ref() == data.as_slice(), "downloaded bytes differ");
}

#[tokio::test]
async fn command_timeout_is_408_and_kills_the_process_group() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, json!({"template": "base"})).await;
    let (status, v) = run(
        &server,
        &id,
        json!({"cmd": "(setsid sleep 1000 &); sleep 1000", "timeout": 1}),
    )
    .await;
    assert_eq!(status, 408, "{v}");
    assert_eq!(v["code"], "timeout");
    // Nothing of it survives: the agent kills the group and its escaped children.
    let (_, v) = run(&server, &id, json!({"cmd": "pgrep -c sleep || true"})).await;
    assert_eq!(v["stdout"], "0\n", "{v}");
}

#[tokio::test]
async fn background_commands_list_stream_and_kill() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, json!({"template": "base"})).await;
    let (status, v) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/commands/run/background"),
                json!({"cmd": "sleep 1000"}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let pid = v["pid"].as_u64().expect("pid");
    let (_, list) = json_of(server.get(&format!("/sandboxes/{id}/commands/")).await).await;
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .any(|p| p["pid"].as_u64() == Some(pid)),
        "{list}"
    );
    let (status, _) = json_of(
        server
            .delete(&format!("/sandboxes/{id}/commands/{pid}"))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    let (status, v) = json_of(
        server
            .delete(&format!("/sandboxes/{id}/commands/999999"))
            .await,
    )
    .await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test]
async fn seed_python_websocket_client_streams_output_and_exit() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, json!({"template": "base"})).await;
    let (_, v) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/commands/run/background"),
                json!({"cmd": "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo err >&2; exit 7"}),
            )
            .await,
    )
    .await;
    let pid = v["pid"].as_u64().expect("pid");
    // The seed README's client, verbatim but for the URL and a collected transcript.
    let script = format!(
        r#"
import json, sys
import websocket
sandbox_id, pid = "{id}", {pid}
ws = websocket.create_connection(
    f"ws://{host}/sandboxes/{{sandbox_id}}/commands/stream/{{pid}}"
)
out = []
while True:
    msg = ws.recv()
    data = json.loads(msg)
    if data["type"] == "stdout":
        print(data["data"], end="")
    elif data["type"] == "stderr":
        print(data["data"], end="", file=sys.stderr)
    elif data["type"] == "exit":
        print(f"\nProcess exited with code {{data['code']}}")
        break
    elif data["type"] == "error":
        print(f"Error: {{data['message']}}")
        break
ws.close()
"#,
        host = server.url.trim_start_matches("http://"),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed: {stderr}");
    assert_eq!(
        stdout, "line1\nline2\nline3\n\nProcess exited with code 7\n",
        "stderr: {stderr}"
    );
    assert_eq!(stderr, "err\n");

    // A stream that joins after the command ended still gets its output and exit.
    let late = format!(
        r#"
import json, websocket
ws = websocket.create_connection("ws://{host}/sandboxes/{id}/commands/stream/{pid}")
msgs = []
while True:
    data = json.loads(ws.recv())
    msgs.append(data)
    if data["type"] in ("exit", "error"):
        break
print(json.dumps(msgs))
"#,
        host = server.url.trim_start_matches("http://"),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &late])
            .output()
            .expect("python3")
    })
    .await
    .expect("join");
    let msgs: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("late client: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let msgs = msgs.as_array().expect("messages");
    let stdout: String = msgs
        .iter()
        .filter(|m| m["type"] == "stdout")
        .filter_map(|m| m["data"].as_str())
        .collect();
    assert_eq!(stdout, "line1\nline2\nline3\n");
    assert_eq!(msgs.last(), Some(&json!({"type": "exit", "code": 7})));
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
