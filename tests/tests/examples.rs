//! The documentation's curl examples, run verbatim with the real `curl` against a real
//! server: the README's API section and the seed's flow (create a `python` sandbox,
//! write script.py, `python script.py`). Only the port and the example sandbox id are
//! replaced by this run's.

use serde_json::Value;
use tests::{OwnerCleanup, Server, ServerOptions};

/// The seed README's flow, exactly as it is written there.
const SEED_FLOW: [&str; 3] = [
    r#"curl -X POST http://localhost:8000/sandboxes/ \
  -H "Content-Type: application/json" \
  -d '{
    "template": "python",
    "timeout": 600,
    "envs": {"DEBUG": "1"},
    "metadata": {"purpose": "test"}
  }'"#,
    r#"curl -X POST http://localhost:8000/sandboxes/clm_abc123/files/write \
  -H "Content-Type: application/json" \
  -d '{
    "path": "/home/user/script.py",
    "data": "print(\"Hello, World!\")"
  }'"#,
    r#"curl -X POST http://localhost:8000/sandboxes/clm_abc123/commands/run \
  -H "Content-Type: application/json" \
  -d '{
    "cmd": "python script.py",
    "timeout": 30,
    "cwd": "/home/user"
  }'"#,
];

/// The sandbox id the README's examples use.
const README_ID: &str = "clm3k9x0a1b2c3d4e5f6";

/// Runs `script` with bash after pointing it at `server` and sandbox `id`; returns stdout.
fn run(server: &Server, script: &str, example_id: &str, id: &str) -> String {
    let port = server.url.rsplit(':').next().unwrap_or_default();
    let script = script
        .replace("localhost:8000", &format!("localhost:{port}"))
        .replace(example_id, id);
    let out = std::process::Command::new("bash")
        .args(["-c", &format!("set -e\n{script}")])
        .output()
        .expect("bash and curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every JSON document in `text` (curl prints one answer after another).
fn documents(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|d| d.expect("JSON answer"))
        .collect()
}

/// The bash blocks of the README's API section that call this server.
fn readme_curl_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let api = readme
        .split("\n## API\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README's API section");
    api.split("```bash\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .filter(|b| b.contains("curl") && b.contains("localhost:8000"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_seed_curl_flow_runs_verbatim() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let created = documents(&run(&server, SEED_FLOW[0], "", ""));
    let id = created[0]["sandbox_id"]
        .as_str()
        .expect("sandbox_id")
        .to_string();
    assert_eq!(created[0]["template_id"], "python");
    assert_eq!(created[0]["metadata"]["purpose"], "test");
    run(&server, SEED_FLOW[1], "clm_abc123", &id);
    let ran = documents(&run(&server, SEED_FLOW[2], "clm_abc123", &id));
    assert_eq!(ran[0]["stdout"], "Hello, World!\n", "{}", ran[0]);
    assert_eq!(
        (&ran[0]["stderr"], &ran[0]["exit_code"], &ran[0]["error"]),
        (&Value::from(""), &Value::from(0), &Value::Null)
    );
}

#[tokio::test]
async fn the_readme_curl_examples_run_verbatim() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let blocks = readme_curl_blocks();
    assert_eq!(
        blocks.len(),
        4,
        "create, write and run, background, lifecycle: {blocks:#?}"
    );
    let created = documents(&run(&server, &blocks[0], "", ""));
    let id = created[0]["sandbox_id"]
        .as_str()
        .expect("sandbox_id")
        .to_string();
    let ran = documents(&run(&server, &blocks[1], README_ID, &id));
    assert_eq!(ran.len(), 2, "{ran:?}");
    assert_eq!(
        ran[1],
        serde_json::json!({"stdout": "Hello, World!\n", "stderr": "", "exit_code": 0, "error": null, "truncated": false})
    );
    let background = documents(&run(&server, &blocks[2], README_ID, &id));
    assert!(background[0]["pid"].as_u64().is_some(), "{background:?}");
    let lifecycle = documents(&run(&server, &blocks[3], README_ID, &id));
    let listed = |d: &Value| {
        d.as_array()
            .is_some_and(|a| a.iter().any(|s| s["sandbox_id"] == id.as_str()))
    };
    assert!(
        listed(&lifecycle[0]) && listed(&lifecycle[1]),
        "{lifecycle:?}"
    );
    assert_eq!(lifecycle[2]["sandbox_id"], id.as_str());
    for d in &lifecycle[3..] {
        assert!(d.get("code").is_none(), "an error: {d}");
    }
    assert_eq!(lifecycle[5]["state"], "paused", "{lifecycle:?}");
    assert_eq!(lifecycle[6]["state"], "running", "{lifecycle:?}");
    assert_eq!(lifecycle[7]["status"], "killed", "{lifecycle:?}");
    let (status, _) = tests::json_of(server.get(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(status, 404, "the README's DELETE removed it");
}

/// The bash blocks of the README's subsection `### heading`.
fn readme_subsection_blocks(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split(&format!("\n### {heading}\n"))
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .and_then(|s| s.split("\n### ").next())
        .unwrap_or_else(|| panic!("the README's {heading} section"));
    section
        .split("```bash\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .map(str::to_string)
        .collect()
}

/// Runs `script` with bash in `dir`, `colima-e2b` on PATH finding the server `options`
/// describes on `port` by the settings it runs with; its stdout and stderr (it must
/// succeed).
fn run_with_cli(
    script: &str,
    dir: &std::path::Path,
    port: &str,
    options: &ServerOptions,
) -> (String, String) {
    let bin_dir = tests::server_binary()
        .parent()
        .expect("binary dir")
        .to_path_buf();
    let out = std::process::Command::new("bash")
        .args(["-c", &format!("set -e\n{script}")])
        .current_dir(dir)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("COLIMA_E2B_PORT", port)
        .env("COLIMA_E2B_OWNER", &options.owner)
        .env("COLIMA_E2B_STATE_DIR", &options.state_dir)
        .env_remove("COLIMA_E2B_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{script}\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[tokio::test]
async fn the_readme_template_examples_run_verbatim() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let blocks = readme_subsection_blocks("Building templates");
    assert_eq!(blocks.len(), 2, "the CLI, then the API: {blocks:#?}");
    let port = server.port().to_string();
    let dir = options.state_dir.join("readme-templates");
    std::fs::create_dir_all(&dir).expect("work dir");
    let script = blocks
        .join("\n")
        .replace("localhost:8000", &format!("localhost:{port}"));
    let (stdout, stderr) = run_with_cli(&script, &dir, &port, &options);
    assert!(stderr.contains("built template my-app"), "{stderr}");
    let listed = stdout
        .lines()
        .find(|l| l.starts_with("my-app "))
        .unwrap_or_else(|| panic!("template ls: {stdout}"));
    assert!(listed.contains("ready"), "{listed}");
    assert!(stdout.contains(r#""step":"finalize""#), "{stdout}");
    let created = stdout
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("sandbox_id").is_some())
        })
        .unwrap_or_else(|| panic!("no created sandbox in {stdout}"));
    assert_eq!(created["template_id"], "my-app:v2", "{created}");
    let id = created["sandbox_id"].as_str().expect("sandbox_id");
    // The start command serves, as the ready command found before the create returned.
    let (status, ran) = server
        .run(id, "curl -s localhost:8080 | grep -c app.py")
        .await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["stdout"], "1\n", "{ran}");
    let (status, _) = tests::json_of(server.delete(&format!("/sandboxes/{id}")).await).await;
    assert_eq!(status, 200);
    let (status, body) = tests::json_of(server.delete("/templates/my-app").await).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_readme_cli_examples_run_verbatim() {
    let options = ServerOptions::new();
    let _cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let blocks = readme_subsection_blocks("From the terminal");
    assert_eq!(blocks.len(), 1, "{blocks:#?}");
    let port = server.port().to_string();
    let (stdout, stderr) = run_with_cli(&blocks[0], &options.state_dir, &port, &options);
    for want in [
        "SANDBOX ",
        "hello from user in /home/user\n",
        "\n42\n",
        "exit code 3\n",
        "sandbox created",
        "1 sandbox(es)\n",
        "NAME ",
    ] {
        assert!(
            stdout.contains(want),
            "{want:?} missing from\n{stdout}\n{stderr}"
        );
    }
    let (_, listed) = tests::json_of(server.get("/sandboxes").await).await;
    assert_eq!(
        listed,
        serde_json::json!([]),
        "the example's kill removed it"
    );
}
