//! The command line against a real server on a real engine: `colima-e2b sandbox` and
//! `template` as a person or a script uses them (tables, `--json`, exit codes), the
//! interactive shell over the terminal WebSocket, and that WebSocket itself (sizes,
//! resize, refusals, the shell killed when its client leaves).

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tests::{OwnerCleanup, Server, ServerOptions};
use tokio_tungstenite::tungstenite::Message;

/// `colima-e2b <args>` pointed at `server`, with `stdin` piped in.
fn cli(server: &Server, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(tests::server_binary())
        // Before the subcommand's own arguments: `exec` takes everything after its id.
        .args(&args[..1])
        .args(["--port", &server.port().to_string()])
        .args(&args[1..])
        .env("COLIMA_E2B_OWNER", &server.options.owner)
        .env("COLIMA_E2B_STATE_DIR", &server.options.state_dir)
        .env_remove("COLIMA_E2B_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("stdin");
    }
    child.wait_with_output().expect("CLI output")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[tokio::test]
async fn the_sandbox_commands_drive_a_server_with_tables_json_and_exit_codes() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;

    let created = cli(
        &server,
        &[
            "sandbox",
            "create",
            "base",
            "--timeout",
            "300",
            "-e",
            "GREETING=hi",
        ],
        "",
    );
    assert_eq!(code(&created), 0, "{}", err(&created));
    let id = out(&created).trim().to_string();
    assert!(!id.is_empty() && !id.contains(' '), "{id:?}");

    let ls = cli(&server, &["sandbox", "ls"], "");
    assert_eq!(code(&ls), 0, "{}", err(&ls));
    let table = out(&ls);
    assert!(table.starts_with("SANDBOX"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("a row for the sandbox");
    assert!(row.contains("running") && row.contains("base"), "{row}");
    let ls_json: Value =
        serde_json::from_str(&out(&cli(&server, &["sandbox", "ls", "--json"], ""))).expect("json");
    assert!(
        ls_json
            .as_array()
            .expect("array")
            .iter()
            .any(|s| s["sandbox_id"] == id.as_str()),
        "{ls_json}"
    );

    // One argument is a command line; the exit code and both streams are the command's.
    let exec = cli(
        &server,
        &[
            "sandbox",
            "exec",
            &id,
            "echo $GREETING-$HOME; echo oops >&2; exit 7",
        ],
        "",
    );
    assert_eq!(
        (code(&exec), out(&exec).as_str()),
        (7, "hi-/home/user\n"),
        "{}",
        err(&exec)
    );
    assert!(err(&exec).contains("oops"), "{}", err(&exec));
    // Several are argv, each passed as is.
    let argv = cli(
        &server,
        &[
            "sandbox", "exec", &id, "--", "printf", "%s|", "a b", "$HOME", "it's",
        ],
        "",
    );
    assert_eq!(
        (code(&argv), out(&argv).as_str()),
        (0, "a b|$HOME|it's|"),
        "{}",
        err(&argv)
    );
    let late = cli(
        &server,
        &["sandbox", "exec", "--timeout", "1", &id, "sleep 30"],
        "",
    );
    assert_eq!(code(&late), 124, "{}", err(&late));

    // The shell: a real pty (a tty inside), input piped in, the shell's exit status out.
    let shell = cli(
        &server,
        &["sandbox", "shell", &id],
        "tty >/dev/null && echo pty-$((6*7))\nexit 5\n",
    );
    assert_eq!(code(&shell), 5, "{} {}", out(&shell), err(&shell));
    assert!(out(&shell).contains("pty-42"), "{}", out(&shell));

    // Input that ends without `exit` ends the shell as Ctrl-D would, even when a command
    // reading the terminal (`cat`) takes the first end-of-file.
    let piped = cli(&server, &["sandbox", "shell", &id], "cat\nfed-to-cat\n");
    assert_eq!(code(&piped), 0, "{} {}", out(&piped), err(&piped));
    assert!(out(&piped).contains("fed-to-cat"), "{}", out(&piped));

    let logs = cli(&server, &["sandbox", "logs", &id, "--json"], "");
    assert_eq!(code(&logs), 0, "{}", err(&logs));
    let lines: Vec<Value> = out(&logs)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains("exit"))),
        "{lines:?}"
    );

    let templates: Value =
        serde_json::from_str(&out(&cli(&server, &["template", "ls", "--json"], ""))).expect("json");
    assert!(
        templates
            .as_array()
            .expect("array")
            .iter()
            .any(|t| t["name"] == "base"),
        "{templates}"
    );

    let kill = cli(&server, &["sandbox", "kill", &id], "");
    assert_eq!(
        (code(&kill), out(&kill).trim()),
        (0, id.as_str()),
        "{}",
        err(&kill)
    );
    let again = cli(&server, &["sandbox", "kill", &id], "");
    assert_eq!(code(&again), 1, "a second kill is refused");
    assert!(
        err(&again).contains("404") && err(&again).contains("not found"),
        "{}",
        err(&again)
    );
    let gone = cli(&server, &["sandbox", "exec", &id, "true"], "");
    assert_eq!(code(&gone), 1, "{}", err(&gone));
    let usage = cli(&server, &["sandbox", "exec", &id], "");
    assert_eq!(code(&usage), 2, "a command is required: {}", err(&usage));
}

#[tokio::test]
async fn no_server_is_exit_code_3_and_completions_cover_every_command() {
    let port = tests::free_port().to_string();
    let o = Command::new(tests::server_binary())
        .args(["sandbox", "ls", "--port", &port])
        .env(
            "COLIMA_E2B_STATE_DIR",
            std::env::temp_dir().join(format!("colima-e2b-cli-{port}")),
        )
        .env_remove("COLIMA_E2B_CONFIG")
        .output()
        .expect("run the CLI");
    assert_eq!(code(&o), 3, "{}", err(&o));
    assert!(err(&o).contains("cannot reach the server"), "{}", err(&o));
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(tests::server_binary())
            .args(["completions", shell])
            .output()
            .expect("completions");
        let script = out(&o);
        assert!(o.status.success(), "{shell}");
        for word in ["sandbox", "exec", "shell", "kill-processes", "template"] {
            assert!(script.contains(word), "{shell} completions miss {word}");
        }
    }
}

/// How many `sleep 4242` run in sandbox `id`.
async fn sleeping(server: &Server, id: &str) -> String {
    let (status, out) = server.run(id, "pgrep -f 'slee[p] 4242' | wc -l").await;
    assert_eq!(status, 200, "{out}");
    out["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Polls (10 s at most) until [`sleeping`] says `want`; the last answer.
async fn await_sleeping(server: &Server, id: &str, want: &str) -> String {
    let mut seen = String::new();
    for _ in 0..100 {
        seen = sleeping(server, id).await;
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn terminal(server: &Server, id: &str, query: &str) -> Result<Socket, (u16, Value)> {
    let url = format!(
        "{}/sandboxes/{id}/terminal{query}",
        server.url.replacen("http", "ws", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("terminal: {e}"),
    }
}

/// Sends a JSON control frame (input, resize).
async fn control(ws: &mut Socket, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send a control frame");
}

/// Types `keys` into the terminal.
async fn type_in(ws: &mut Socket, keys: &[u8]) {
    ws.send(Message::Binary(keys.to_vec().into()))
        .await
        .expect("type");
}

/// Reads the terminal until its output contains `want` (or its exit, or a bound).
async fn read_until(ws: &mut Socket, want: &str) -> String {
    let mut seen = String::new();
    let reading = async {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Message::Text(t) => seen.push_str(&format!("\n<{t}>\n")),
                _ => {}
            }
            if seen.contains(want) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), reading).await;
    seen
}

#[tokio::test]
async fn the_terminal_websocket_sizes_resizes_refuses_and_kills_its_shell_on_leaving() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = server
        .create_sandbox(json!({"template": "base", "timeout": 300}))
        .await;

    // Refusals are HTTP errors with the API's JSON body, before any upgrade.
    let (status, body) = terminal(&server, &id, "?cols=0")
        .await
        .expect_err("refused");
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_argument")),
        "{body}"
    );
    let (status, _) = terminal(&server, "nosuchsandbox0000000", "")
        .await
        .expect_err("refused");
    assert_eq!(status, 404);

    let mut ws = terminal(&server, &id, "?cols=91&rows=17")
        .await
        .expect("terminal");
    let started = read_until(&mut ws, "\"started\"").await;
    assert!(started.contains("\"pid\""), "{started}");
    control(
        &mut ws,
        json!({"type": "input", "data": "stty size; echo TERM=$TERM\r"}),
    )
    .await;
    let seen = read_until(&mut ws, "TERM=xterm-256color").await;
    assert!(seen.contains("17 91"), "the pty has the asked size: {seen}");
    control(&mut ws, json!({"type": "resize", "cols": 120, "rows": 40})).await;
    type_in(&mut ws, b"stty size\r").await;
    let seen = read_until(&mut ws, "40 120").await;
    assert!(seen.contains("40 120"), "resized: {seen}");
    // A bad resize is answered, and the terminal goes on.
    control(&mut ws, json!({"type": "resize", "cols": 0, "rows": 40})).await;
    type_in(&mut ws, b"echo still-$((1+1))\r").await;
    let seen = read_until(&mut ws, "still-2").await;
    assert!(
        seen.contains("\"error\"") && seen.contains("still-2"),
        "{seen}"
    );

    // Leaving kills the shell and what it started.
    type_in(&mut ws, b"sleep 4242 &\r").await;
    let _ = read_until(&mut ws, "sleep 4242").await;
    assert_eq!(
        await_sleeping(&server, &id, "1").await,
        "1",
        "the terminal's background job runs"
    );
    drop(ws);
    assert_eq!(
        await_sleeping(&server, &id, "0").await,
        "0",
        "the shell's children outlived it"
    );
}
