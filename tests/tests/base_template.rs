//! The default `base` template, seen from inside a real sandbox: the tools E2B programs
//! assume, and `sudo` for `user` without any setuid binary (the agent's), confined to
//! the sandbox's profile and tracked like every other process of the command that ran
//! it. Run on Docker and on Podman (`COLIMA_E2B_TEST_BACKEND`).

use std::time::Duration;

use serde_json::{json, Value};
use tests::{json_of, OwnerCleanup, Server, ServerOptions};

/// Runs `cmd` as the template's user; returns (exit code, stdout, stderr).
async fn sh(server: &Server, id: &str, cmd: &str) -> (i64, String, String) {
    let (status, out) = server.run(id, cmd).await;
    assert_eq!(status, 200, "{cmd}: {out}");
    let text = |k: &str| out[k].as_str().unwrap_or_default().to_string();
    (
        out["exit_code"].as_i64().unwrap_or(-1),
        text("stdout"),
        text("stderr"),
    )
}

/// Runs `cmd` as `user`.
async fn sh_as(server: &Server, id: &str, user: &str, cmd: &str) -> Value {
    let (status, out) = json_of(
        server
            .post(
                &format!("/sandboxes/{id}/commands/run"),
                json!({"cmd": cmd, "user": user, "cwd": "/tmp", "timeout": 60}),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{cmd}: {out}");
    out
}

async fn start() -> (Server, String, OwnerCleanup) {
    let options = ServerOptions::new();
    let cleanup = OwnerCleanup(options.clone());
    let server = Server::start(options).await;
    let id = server
        .create_sandbox(json!({"template": "base", "timeout": 300}))
        .await;
    (server, id, cleanup)
}

#[tokio::test]
async fn the_base_template_has_what_e2b_programs_expect() {
    let (server, id, _cleanup) = start().await;
    let (code, out, err) = sh(
        &server,
        &id,
        "set -e; bash --version | head -1; python --version; python3 -m pip --version; \
         pip --version; python3 -m venv --help >/dev/null && echo venv; node --version; \
         npm --version; git --version; curl --version | head -1; wget --version | head -1; \
         ps -p $$ -o comm=; ls --version | head -1; ss -V; test -x /usr/sbin/useradd && test -x /usr/sbin/usermod && echo useradd-ok; test -s /etc/ssl/certs/ca-certificates.crt \
         && echo certs; stat -c '%U %a' /home/user; id -un; echo $HOME",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "GNU bash",
        "Python 3.",
        "pip ",
        "venv",
        "git version",
        "curl ",
        "GNU Wget",
        "bash\n",
        "coreutils",
        "certs",
        "ss utility, iproute2",
        "useradd-ok",
        "user 755",
        "\nuser\n/home/user\n",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    assert!(
        out.lines().any(|l| l.starts_with('v') && l.contains('.')),
        "node --version: {out}"
    );
    // pip installs outside a venv, as in E2B's template (into ~/.local for `user`).
    let (code, out, err) = sh(
        &server,
        &id,
        "python3 -c 'import sys, sysconfig, os; \
         print(os.path.exists(os.path.join(sysconfig.get_path(\"stdlib\"), \"EXTERNALLY-MANAGED\")))'",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "False"), "{err}");
    // The seed's program, by the name the seed uses.
    let (code, out, _) = sh(&server, &id, "python -c 'print(\"Hello, World!\")'").await;
    assert_eq!((code, out.as_str()), (0, "Hello, World!\n"));
}

#[tokio::test]
async fn sudo_makes_user_root_within_the_sandbox_profile_and_nothing_else_escalates() {
    let (server, id, _cleanup) = start().await;
    let (code, out, err) = sh(
        &server,
        &id,
        "sudo id -u; sudo -n whoami; sudo -u user id -un; env -i /usr/local/bin/sudo id -u; \
         echo piped | sudo cat; sudo sh -c 'echo $HOME $SUDO_USER $USER'; \
         sudo FOO=bar sh -c 'echo $FOO'; sudo -i pwd; sudo touch /root/made-by-sudo && echo touched",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out, "0\nroot\nuser\n0\npiped\n/root user root\nbar\n/root\ntouched\n",
        "{err}"
    );
    // The exit status is the command's; a refused or failed command says why.
    let (code, _, _) = sh(&server, &id, "sudo sh -c 'exit 7'").await;
    assert_eq!(code, 7);
    let (code, _, err) = sh(&server, &id, "sudo /no/such/program").await;
    assert_ne!(code, 0);
    assert!(err.contains("sudo:"), "{err}");
    // Root through sudo is the sandbox's root: no new privileges, the same capabilities
    // as a command asked for as root.
    let (_, via_sudo, _) = sh(
        &server,
        &id,
        "sudo grep -E '^(CapEff|NoNewPrivs|Seccomp)' /proc/self/status",
    )
    .await;
    let as_root = sh_as(
        &server,
        &id,
        "root",
        "grep -E '^(CapEff|NoNewPrivs|Seccomp)' /proc/self/status",
    )
    .await;
    assert_eq!(via_sudo, as_root["stdout"].as_str().unwrap_or_default());
    assert!(via_sudo.contains("NoNewPrivs:\t1"), "{via_sudo}");
    // A setuid binary raises no one (no-new-privileges): only sudo, which is the agent's.
    let made = sh_as(
        &server,
        &id,
        "root",
        "cp /usr/bin/id /home/user/suid-id && chmod 4755 /home/user/suid-id",
    )
    .await;
    assert_eq!(made["exit_code"].as_i64(), Some(0), "{made}");
    let (code, out, _) = sh(
        &server,
        &id,
        "/home/user/suid-id -u; su -c id root </dev/null >/dev/null 2>&1 || echo su-failed",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "1000\nsu-failed\n"));
    // Users outside group sudo are refused, with the reason.
    let refused = sh_as(&server, &id, "nobody", "sudo id -u").await;
    assert_eq!(refused["exit_code"].as_i64(), Some(1), "{refused}");
    assert!(
        refused["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("may not use sudo")),
        "{refused}"
    );
}

/// How many processes match `pattern`, counted as root (sudo's commands are root's).
async fn count(server: &Server, id: &str, pattern: &str) -> usize {
    let out = sh_as(server, id, "root", &format!("pgrep -f '{pattern}' | wc -l")).await;
    out["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .expect("a count")
}

async fn wait_count(server: &Server, id: &str, pattern: &str, want: usize) {
    let start = std::time::Instant::now();
    loop {
        let n = count(server, id, pattern).await;
        if n == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{n} processes match {pattern:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn what_sudo_ran_ends_with_the_command_or_the_sudo_that_ran_it() {
    let (server, id, _cleanup) = start().await;
    // Killing the command ends what it ran through sudo, escaped or not.
    let pid = server
        .background(&id, "sudo sleep 3001 & sudo setsid sleep 3002 & wait")
        .await;
    wait_count(&server, &id, "^slee[p] 300[12]", 2).await;
    let killed = server
        .delete(&format!("/sandboxes/{id}/commands/{pid}"))
        .await;
    assert!(killed.status().is_success(), "{}", killed.status());
    assert_eq!(count(&server, &id, "^slee[p] 300[12]").await, 0);

    // Killing the sudo client ends its command (the user cannot signal root's).
    server.background(&id, "sudo sleep 3003").await;
    wait_count(&server, &id, "^slee[p] 3003", 1).await;
    let (code, _, err) = sh(&server, &id, "pkill -KILL -x sudo").await;
    assert_eq!(code, 0, "{err}");
    wait_count(&server, &id, "^slee[p] 3003", 0).await;

    // A signal the client gets reaches the command: it ends as the command did.
    let (code, out, _) = sh(
        &server,
        &id,
        "rm -f /tmp/ready; sudo sh -c 'trap \"echo got-term; exit 3\" TERM; touch /tmp/ready; sleep 30 & wait' & \
         while [ ! -e /tmp/ready ]; do sleep 0.05; done; kill -TERM $!; wait $!; echo status=$?",
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("got-term") && out.contains("status=3"),
        "{out}"
    );
}
