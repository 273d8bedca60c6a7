//! The agent inside real sandboxes on the real engine (`COLIMA_E2B_TEST_BACKEND`), driven
//! through `AgentClient`: sandboxes come from a `SandboxManager` over the real backend
//! (or from the real server binary, re-adopted by a manager), never from a host process.

use std::time::Duration;

use envd_proto::messages::{
    DataEvent, ProcessConfig, ProcessEvent, ProcessSelector, Signal, StartRequest,
};
use sandbox_core::{AgentClient, Error, SandboxManager, SandboxSpec};
use serde_json::json;
use tests::{agent_manager, engine_cli, OwnerGuard, Server, ServerOptions};

fn sh(script: &str) -> StartRequest {
    StartRequest {
        process: ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        },
        stdin: Some(false),
        ..Default::default()
    }
}

fn spec() -> SandboxSpec {
    SandboxSpec::new("base", Duration::from_secs(300))
}

async fn sandbox(owner: &OwnerGuard, spec: SandboxSpec) -> (SandboxManager, AgentClient) {
    let m = agent_manager(&owner.0).await;
    let info = m.create(spec).await.expect("create");
    let agent = m.agent(&info.id).await.expect("agent");
    (m, agent)
}

/// Runs `script` to the end; returns stdout and the exit code.
async fn run(agent: &AgentClient, script: &str) -> (String, i32) {
    let out = agent
        .start(&sh(script), Some(Duration::from_secs(60)))
        .await
        .expect("start")
        .collect_output(1 << 20)
        .await
        .expect("command completes");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.end.exit_code,
    )
}

/// Polls `f` (bounded), for effects that follow a signal asynchronously.
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn echo_hi_streams_stdout_and_exit_code() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let mut stream = agent
        .start(&sh("echo hi; exit 7"), None)
        .await
        .expect("start");
    assert!(matches!(
        stream.next().await,
        Some(Ok(ProcessEvent::Start { .. }))
    ));
    let mut stdout = Vec::new();
    let mut end = None;
    while let Some(event) = stream.next().await {
        match event.expect("event") {
            ProcessEvent::Data(DataEvent::Stdout(d)) => stdout.extend(d),
            ProcessEvent::End(e) => end = Some(e),
            _ => {}
        }
    }
    assert_eq!(stdout, b"hi\n");
    assert_eq!(end.expect("end event").exit_code, 7);
}

#[tokio::test]
async fn create_time_envs_reach_every_command() {
    let owner = OwnerGuard::new();
    let mut s = spec();
    s.envs.insert("GREETING".into(), "hello world".into());
    let (_m, agent) = sandbox(&owner, s).await;
    assert_eq!(run(&agent, "echo \"$GREETING\"").await.0, "hello world\n");
    // The agent's secret is not among them.
    assert_eq!(
        run(&agent, "echo \"[$COLIMA_E2B_AGENT_SECRET]\"").await.0,
        "[]\n"
    );
}

#[tokio::test]
async fn commands_run_as_user_in_home_by_default() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let (out, code) = run(&agent, "id -u; echo $HOME; pwd; id -un").await;
    assert_eq!(code, 0);
    assert_eq!(out, "1000\n/home/user\n/home/user\nuser\n");
}

#[tokio::test]
async fn sigkill_kills_a_double_forked_setsid_child() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let mut stream = agent
        .start(
            &sh("(setsid sh -c 'echo $$ > /tmp/b5.pid; exec sleep 301' &); sleep 302"),
            None,
        )
        .await
        .expect("start");
    let Some(Ok(ProcessEvent::Start { pid })) = stream.next().await else {
        panic!("no start event");
    };
    assert!(
        eventually(|| async { run(&agent, "cat /tmp/b5.pid").await.1 == 0 }).await,
        "the escaped child never wrote its pid"
    );
    let child = run(&agent, "cat /tmp/b5.pid").await.0.trim().to_string();
    assert_eq!(
        run(&agent, &format!("kill -0 {child}")).await.1,
        0,
        "child runs"
    );
    agent
        .send_signal(ProcessSelector::by_pid(pid), Signal::Kill)
        .await
        .expect("signal");
    let out = stream.collect_output(1 << 10).await.expect("ends");
    assert_eq!(out.end.status, "signal: killed");
    let gone = eventually(|| async { run(&agent, &format!("kill -0 {child}")).await.1 != 0 }).await;
    assert!(
        gone,
        "the setsid child {child} survived SIGKILL of its command:\n{}",
        run(&agent, "ps -eo pid,ppid,pgid,sid,stat,args").await.0
    );
}

#[tokio::test]
async fn a_command_past_its_deadline_is_killed() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let result = agent
        .start(
            &sh("sleep 300 & echo $! > /tmp/bg; sleep 301"),
            Some(Duration::from_millis(1500)),
        )
        .await
        .expect("start")
        .collect_output(1 << 10)
        .await;
    assert!(
        matches!(result, Err(Error::Timeout(d)) if d == Duration::from_millis(1500)),
        "{result:?}"
    );
    let bg = run(&agent, "cat /tmp/bg").await.0.trim().to_string();
    assert!(
        eventually(|| async { run(&agent, &format!("kill -0 {bg}")).await.1 != 0 }).await,
        "the background child survived the deadline"
    );
    let listed = agent.list().await.expect("list");
    assert!(
        listed
            .iter()
            .all(|p| p.config.args.iter().all(|a| !a.contains("sleep 301"))),
        "{listed:?}"
    );
}

#[tokio::test]
async fn endless_output_keeps_the_agent_bounded() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let mut stream = agent
        .start(&sh("yes 0123456789abcdef"), None)
        .await
        .expect("start");
    let Some(Ok(ProcessEvent::Start { pid })) = stream.next().await else {
        panic!("no start event");
    };
    let mut received = 0usize;
    while received < 64 << 20 {
        match stream.next().await {
            Some(Ok(ProcessEvent::Data(DataEvent::Stdout(d)))) => received += d.len(),
            Some(Ok(_)) => {}
            // A reader slower than `yes` for longer than the agent keeps output for it
            // (memory, then a capped spill) is told what it missed; the command ran on.
            Some(Err(Error::Agent { code, message })) if code == "data_loss" => {
                assert!(received >= 4 << 20, "cut after {received} bytes: {message}");
                break;
            }
            other => panic!("endless output stopped: {other:?}"),
        }
    }
    // Disconnect mid-stream, while `yes` keeps writing into its bounded buffer.
    drop(stream);
    let rss_kib = run(&agent, "grep VmRSS /proc/1/status | tr -dc 0-9")
        .await
        .0
        .parse::<u64>()
        .expect("agent RSS");
    assert!(
        rss_kib < 32 << 10,
        "agent RSS {rss_kib} KiB after 64 MiB of output"
    );
    agent
        .send_signal(ProcessSelector::by_pid(pid), Signal::Kill)
        .await
        .expect("the agent still answers and kills the producer");
}

#[tokio::test]
async fn a_1_mib_file_written_then_read_round_trips() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let written = agent
        .write_file("dir/one.bin", data.clone())
        .await
        .expect("write");
    assert_eq!(written[0].path, "/home/user/dir/one.bin");
    let back = agent
        .read_file("/home/user/dir/one.bin")
        .await
        .expect("read")
        .read_to_end(2 << 20)
        .await
        .expect("body");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "contents differ");
    let entry = agent.stat("dir/one.bin").await.expect("stat");
    assert_eq!(entry.size, 1 << 20);
    assert_eq!(entry.owner, "user");
    assert!(matches!(
        agent.read_file("/no/such/file").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_refused() {
    let owner = OwnerGuard::new();
    let (_m, agent) = sandbox(&owner, spec()).await;
    let wrong = AgentClient::new(
        sandbox_core::agent::http_client(),
        agent.addr(),
        "not-the-secret",
    );
    assert!(wrong.health().await.is_ok(), "/health needs no secret");
    match wrong.list().await {
        Err(Error::Agent { code, .. }) => assert_eq!(code, "unauthenticated"),
        other => panic!("a wrong secret gave {other:?}"),
    }
    assert!(matches!(
        wrong.read_file("/etc/hostname").await,
        Err(Error::Agent { code, .. }) if code == "unauthenticated"
    ));
    let http = reqwest::Client::new();
    let base = format!("http://{}", agent.addr());
    let resp = http
        .post(format!("{base}/process.Process/List"))
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "unauthenticated");
    let resp = http
        .get(format!("{base}/files?path=/etc/hostname"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn killing_the_sandbox_ends_a_streaming_command_with_a_clear_error() {
    let owner = OwnerGuard::new();
    let m = agent_manager(&owner.0).await;
    let info = m.create(spec()).await.expect("create");
    let agent = m.agent(&info.id).await.expect("agent");
    let mut stream = agent.start(&sh("sleep 600"), None).await.expect("start");
    assert!(matches!(
        stream.next().await,
        Some(Ok(ProcessEvent::Start { .. }))
    ));
    m.kill(&info.id).await.expect("kill");
    // Bounded so a hang fails instead of blocking the suite.
    let next = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("the stream ended");
    match next {
        Some(Err(Error::Agent { code, message })) => {
            assert_eq!(code, "unavailable");
            assert!(message.contains("stream"), "{message}");
        }
        other => panic!("a killed sandbox's stream gave {other:?}"),
    }
    assert!(matches!(
        m.agent(&info.id).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn an_offline_sandbox_gets_an_agent_or_a_clear_unsupported_error() {
    let owner = OwnerGuard::new();
    let m = agent_manager(&owner.0).await;
    let mut s = spec();
    s.internet = false;
    match (engine_cli().as_str(), m.create(s).await) {
        ("podman", Err(Error::Unsupported { operation, .. })) => {
            // CNI's internal networks have no host gateway: the agent is unreachable.
            assert!(operation.contains("CNI"), "{operation}");
            assert!(tests::remove_owner_containers(&owner.0) == 0, "left behind");
        }
        ("podman", other) => panic!("podman offline sandbox: {other:?}"),
        (_, Ok(info)) => {
            let agent = m.agent(&info.id).await.expect("agent");
            assert_eq!(run(&agent, "echo offline").await.0, "offline\n");
        }
        (_, Err(e)) => panic!("docker offline sandbox failed: {e}"),
    }
}

#[tokio::test]
async fn a_sandbox_created_by_the_server_is_driven_after_readoption() {
    let options = ServerOptions::new();
    let _cleanup = tests::OwnerCleanup(options.clone());
    let server = Server::start(options.clone()).await;
    let resp = server
        .post(
            "/sandboxes/",
            json!({"template": "base", "timeout": 300, "envs": {"FROM_SERVER": "yes"}}),
        )
        .await;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    let id = body["sandbox_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("id");
    // Another manager with the server's owner: the secret comes back from the container.
    let m = agent_manager(&options.owner).await;
    let agent = m.agent(&id).await.expect("agent of a re-adopted sandbox");
    assert_eq!(run(&agent, "echo $FROM_SERVER").await.0, "yes\n");
}

#[test]
fn the_server_refuses_to_start_without_an_agent_binary() {
    let options = ServerOptions::new().env("COLIMA_E2B_AGENT_BINARY", "/nonexistent/sandbox-agent");
    let (status, stderr) = options.run_to_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(stderr.contains("deploy/build-agent.sh"), "{stderr}");
}
