//! The native code API against a real `code-interpreter-v1` sandbox (built by
//! `colima-e2b prepare`): runs, contexts, timeouts, the WebSocket stream (with the seed's
//! Python `websocket-client`), a template without an interpreter, and the README's curl
//! example run verbatim.

use serde_json::{json, Value};
use tests::{json_of, OwnerCleanup, Server, ServerOptions};

const TEMPLATE: &str = "code-interpreter-v1";

/// One test at a time: a server's first create derives the agent's layer onto the 1 GB
/// image, and Podman holds its storage lock while it commits that (a starting server's
/// `/info` waits for it, 26 s here); three servers at once would each derive it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sandbox(server: &Server, template: &str) -> String {
    server
        .create_sandbox(json!({"template": template, "timeout": 600}))
        .await
}

async fn run(server: &Server, id: &str, body: Value) -> (u16, Value) {
    json_of(
        server
            .post(&format!("/sandboxes/{id}/code/run"), body)
            .await,
    )
    .await
}

#[tokio::test]
async fn native_code_runs_contexts_and_timeouts() {
    let _serial = SERIAL.lock().await;
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, TEMPLATE).await;

    let (status, v) = run(&server, &id, json!({"code": "print('hi')\n6 * 7"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["text"], "42", "{v}");
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["results"][0]["is_main_result"], true);
    assert!(v["error"].is_null());
    assert!(v["execution_count"].as_u64().is_some(), "{v}");

    let (status, v) = run(&server, &id, json!({"code": "raise ValueError('nope')"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["error"]["name"], "ValueError");
    assert_eq!(v["error"]["value"], "nope");
    assert!(v["error"]["traceback"]
        .as_str()
        .is_some_and(|t| t.contains("ValueError")));

    // Contexts: state kept, not shared, gone after restart, removed.
    let (status, ctx) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/code/contexts"),
                json!({"cwd": "/tmp"}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{ctx}");
    assert_eq!(ctx["language"], "python");
    assert_eq!(ctx["cwd"], "/tmp");
    let ctx_id = ctx["id"].as_str().expect("context id").to_string();
    let in_ctx = |code: &str| json!({"code": code, "context_id": ctx_id});
    assert_eq!(run(&server, &id, in_ctx("n = 1")).await.0, 200);
    assert_eq!(run(&server, &id, in_ctx("n + 1")).await.1["text"], "2");
    let (_, other) = run(&server, &id, json!({"code": "n"})).await;
    assert_eq!(other["error"]["name"], "NameError", "{other}");
    let (_, listed) = json_of(server.get(&format!("/sandboxes/{id}/code/contexts")).await).await;
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["id"] == ctx_id.as_str())),
        "{listed}"
    );
    let restart = server
        .post(
            &format!("/sandboxes/{id}/code/contexts/{ctx_id}/restart"),
            json!({}),
        )
        .await;
    assert_eq!(restart.status(), 204);
    let (_, gone) = run(&server, &id, in_ctx("n")).await;
    assert_eq!(gone["error"]["name"], "NameError", "{gone}");
    let removed = server
        .delete(&format!("/sandboxes/{id}/code/contexts/{ctx_id}"))
        .await;
    assert_eq!(removed.status(), 204);
    let (status, v) = run(&server, &id, in_ctx("1")).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["message"].is_string(), "{v}");

    // Both a context and a language, an unknown language: the client's mistakes (422,
    // as every invalid argument of the native API).
    let (status, v) = run(
        &server,
        &id,
        json!({"code": "1", "context_id": "x", "language": "python"}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    let (status, v) = run(&server, &id, json!({"code": "1", "language": "cobol"})).await;
    assert_eq!(status, 422, "{v}");

    // A timeout interrupts the run: 408, and the kernel is free again.
    let (status, v) = run(
        &server,
        &id,
        json!({"code": "import time\nwhile True: time.sleep(0.1)", "timeout": 2}),
    )
    .await;
    assert_eq!(status, 408, "{v}");
    let (status, v) = run(&server, &id, json!({"code": "'free'", "timeout": 30})).await;
    assert_eq!((status, v["text"].clone()), (200, json!("free")), "{v}");

    // Other languages.
    let (_, js) = run(
        &server,
        &id,
        json!({"code": "[1, 2].map(x => x * 2)", "language": "javascript"}),
    )
    .await;
    assert_eq!(js["text"], "[ 2, 4 ]", "{js}");
    let (_, sh) = run(
        &server,
        &id,
        json!({"code": "echo $((2 + 3))", "language": "bash"}),
    )
    .await;
    assert_eq!(sh["stdout"], "5\n", "{sh}");

    // A sandbox of a template without the interpreter: a clear conflict.
    let plain = sandbox(&server, "base").await;
    let (status, v) = run(&server, &plain, json!({"code": "1"})).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("code-interpreter-v1")),
        "{v}"
    );
}

#[tokio::test]
async fn the_code_websocket_streams_events_as_they_happen() {
    let _serial = SERIAL.lock().await;
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = sandbox(&server, TEMPLATE).await;
    let script = format!(
        r#"
import json, time, websocket
ws = websocket.create_connection("ws://{host}/sandboxes/{id}/code/stream")
ws.send(json.dumps({{"code": "import time\nprint('a', flush=True)\ntime.sleep(1.5)\nprint('b')\n'done'"}}))
start = time.monotonic()
events = []
while True:
    e = json.loads(ws.recv())
    events.append((time.monotonic() - start, e))
    if e["type"] in ("end_of_execution", "stream_error"):
        break
kinds = [e["type"] for _, e in events]
first = next(t for t, e in events if e.get("text") == "a\n")
print(json.dumps({{"kinds": kinds, "early": events[-1][0] - first > 1.0,
    "main": [e.get("text") for _, e in events if e.get("is_main_result")]}}))
ws.close()
ws = websocket.create_connection("ws://{host}/sandboxes/{id}/code/stream")
ws.send("not json")
print(ws.recv())
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
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let summary: Value = serde_json::from_str(lines.next().unwrap_or_default()).expect("summary");
    assert_eq!(
        summary["kinds"],
        json!([
            "number_of_executions",
            "stdout",
            "stdout",
            "result",
            "end_of_execution"
        ]),
        "{summary}"
    );
    assert_eq!(
        summary["early"], true,
        "stdout came only at the end: {summary}"
    );
    assert_eq!(summary["main"], json!(["done"]));
    let refused: Value = serde_json::from_str(lines.next().unwrap_or_default()).expect("error");
    assert_eq!(refused["type"], "stream_error", "{refused}");
}

/// The README's "Code interpreter" curl block, run verbatim with the real curl.
#[tokio::test]
async fn the_readme_code_example_runs_verbatim() {
    let _serial = SERIAL.lock().await;
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Code interpreter\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README's Code interpreter section");
    let block = section
        .split("```bash\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a bash block");
    let mut commands = block.split("\ncurl").map(|c| {
        let c = if c.starts_with("curl") {
            c.to_string()
        } else {
            format!("curl{c}")
        };
        let port = server.url.rsplit(':').next().unwrap_or_default();
        c.replace("localhost:8000", &format!("localhost:{port}"))
    });
    let bash = |script: String| {
        let out = std::process::Command::new("bash")
            .args(["-c", &format!("set -e\n{script}")])
            .output()
            .expect("bash and curl");
        assert!(out.status.success(), "{script}");
        serde_json::from_slice::<Value>(&out.stdout).expect("a JSON answer")
    };
    let created = bash(commands.next().expect("create"));
    let id = created["sandbox_id"]
        .as_str()
        .expect("sandbox_id")
        .to_string();
    let ran = bash(
        commands
            .next()
            .expect("run")
            .replace("clm3k9x0a1b2c3d4e5f6", &id),
    );
    assert_eq!(ran["text"], "4.0", "{ran}");
    assert_eq!(ran["results"][0]["is_main_result"], true, "{ran}");
}
