//! process.Process against the real agent binary (threat rows B1-B7).
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[test]
fn start_streams_stdout_stderr_and_exit_code() {
    let a = Agent::start();
    let c = a
        .start_sh("echo out; echo err >&2; exit 3", json!({}), &[])
        .collect();
    assert!(c.pid.is_some());
    assert_eq!(c.stdout, b"out\n");
    assert_eq!(c.stderr, b"err\n");
    let end = c.end.clone().unwrap();
    assert_eq!(end["exitCode"], 3);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 3");
    assert_eq!(c.trailer, json!({}));
}

#[test]
fn command_gets_cwd_env_and_home() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("sub")).unwrap();
    let c = a
        .start_sh(
            "pwd; echo $FOO; echo $HOME",
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", "pwd; echo $FOO; echo $HOME; echo ${COLIMA_E2B_AGENT_SECRET:-nosecret}"], "envs": {"FOO": "bar"}, "cwd": "sub"}}),
            &[],
        )
        .collect();
    let out = String::from_utf8(c.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], a.home.join("sub").to_str().unwrap());
    assert_eq!(lines[1], "bar");
    assert_eq!(lines[2], a.home.to_str().unwrap());
    assert_eq!(
        lines[3], "nosecret",
        "the agent secret must not leak into commands"
    );
}

#[test]
fn missing_cwd_is_invalid_argument_and_unknown_pid_not_found() {
    let a = Agent::start();
    let c = a
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "/bin/true", "cwd": "/nonexistent/dir"}}),
            &[],
        )
        .collect();
    assert_eq!(c.trailer["error"]["code"], "invalid_argument");
    let (s, v) = a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(s, 404);
    assert_eq!(v["code"], "not_found");
    let c = a
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": 999999}}),
            &[],
        )
        .collect();
    assert_eq!(c.trailer["error"]["code"], "not_found");
}

#[test]
fn signalling_an_ended_process_is_not_found() {
    let a = Agent::start();
    let mut s = a.start_sh("true", json!({}), &[]);
    let pid = s.expect_start();
    let c = s.collect();
    assert_eq!(c.end.expect("end event")["exited"], true);
    let (status, v) = a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["code"], "not_found");
}

#[test]
fn stdin_input_reaches_process_and_close_stdin_ends_it() {
    let a = Agent::start();
    let mut s = a.start_sh("cat; echo done", json!({"stdin": true}), &[]);
    let pid = s.expect_start();
    let (st, _) = a.rpc(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": enc(b"hello\n")}}),
    );
    assert_eq!(st, 200);
    let (st, _) = a.rpc(
        "process.Process/CloseStdin",
        json!({"process": {"pid": pid}}),
    );
    assert_eq!(st, 200);
    let c = s.collect();
    assert_eq!(c.stdout, b"hello\ndone\n");
    assert_eq!(c.exit_code(), 0);
}

#[test]
fn stdin_disabled_reads_dev_null() {
    let a = Agent::start();
    let c = a
        .start_sh("cat; echo eof", json!({"stdin": false}), &[])
        .collect();
    assert_eq!(c.stdout, b"eof\n");
}

#[test]
fn stream_input_client_stream_writes_stdin() {
    let a = Agent::start();
    let mut s = a.start_sh("head -c 6; echo", json!({"stdin": true}), &[]);
    let pid = s.expect_start();
    // Client stream: start + data envelopes + end, in one chunked body.
    let mut body = Vec::new();
    for m in [
        json!({"start": {"process": {"pid": pid}}}),
        json!({"data": {"input": {"stdin": enc(b"abc")}}}),
        json!({"keepalive": {}}),
        json!({"data": {"input": {"stdin": enc(b"def")}}}),
    ] {
        let p = m.to_string();
        body.push(0u8);
        body.extend_from_slice(&(p.len() as u32).to_be_bytes());
        body.extend_from_slice(p.as_bytes());
    }
    let r = a.request(
        "POST",
        "/process.Process/StreamInput",
        &[("Content-Type", "application/connect+json")],
        &body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.last().copied(), Some(b'}'));
    let c = s.collect();
    assert_eq!(c.stdout, b"abcdef\n");
}

#[test]
fn pty_runs_with_size_echoes_input_and_resizes() {
    let a = Agent::start();
    let mut s = a.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/sh", "args": ["-c", "stty size; read line; echo got:$line; stty size"]},
               "pty": {"size": {"cols": 100, "rows": 30}}}),
        &[],
    );
    let pid = s.expect_start();
    let mut c = Collected::default();
    while !String::from_utf8_lossy(&c.pty).contains("30 100") {
        let (_, v) = s.next().expect("pty output");
        c.absorb(&v);
    }
    let (st, v) = a.rpc(
        "process.Process/Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 40}}}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, _) = a.rpc(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"pty": enc(b"ping\n")}}),
    );
    assert_eq!(st, 200);
    while let Some((flags, v)) = s.next() {
        if flags & 2 != 0 {
            break;
        }
        c.absorb(&v);
    }
    let out = String::from_utf8_lossy(&c.pty);
    assert!(out.contains("got:ping"), "{out}");
    assert!(out.contains("40 120"), "{out}");
    assert_eq!(c.exit_code(), 0);
}

#[test]
fn sigkill_kills_setsid_and_double_forked_children_b5() {
    let a = Agent::start();
    let f1 = a.home.join("p1");
    let f2 = a.home.join("p2");
    let mut s = a.start_sh(
        "setsid sleep 300 & echo $! > p1; (setsid sh -c 'echo $$ > p2; exec sleep 301' &); sleep 302",
        json!({}),
        &[],
    );
    let pid = s.expect_start();
    let p1 = wait_pid_file(&f1);
    let p2 = wait_pid_file(&f2);
    assert!(alive(p1) && alive(p2));
    let (st, _) = a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(st, 200);
    let c = s.collect();
    let end = c.end.unwrap();
    assert_eq!(end["status"], "signal: killed");
    assert_eq!(end["exitCode"], -1);
    assert!(
        eventually(|| !alive(p1) && !alive(p2)),
        "escaped children survived"
    );
}

#[test]
fn sigterm_reaches_the_whole_group() {
    let a = Agent::start();
    let mut s = a.start_sh("sleep 300 & echo $! > bg; wait", json!({}), &[]);
    let pid = s.expect_start();
    let bg = wait_pid_file(&a.home.join("bg"));
    let (st, _) = a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
    );
    assert_eq!(st, 200);
    let c = s.collect();
    assert_eq!(c.end.unwrap()["status"], "signal: terminated");
    assert!(eventually(|| !alive(bg)));
}

#[test]
fn deadline_kills_group_and_ends_with_deadline_exceeded_b4() {
    let a = Agent::start();
    let mut s = a.start_sh(
        "sleep 300 & echo $! > bg; sleep 301",
        json!({}),
        &[("Connect-Timeout-Ms", "1500")],
    );
    s.expect_start();
    let bg = wait_pid_file(&a.home.join("bg"));
    let c = s.collect();
    assert_eq!(c.trailer["error"]["code"], "deadline_exceeded");
    assert_eq!(c.end.unwrap()["status"], "signal: killed");
    assert!(
        eventually(|| !alive(bg)),
        "background child survived the deadline"
    );
    assert!(a.list_pids().is_empty());
}

#[test]
fn endless_output_keeps_agent_memory_bounded_b1() {
    let a = Agent::start();
    // A client that reads: the producer is throttled to the client, memory stays flat.
    let mut s = a.start_sh("exec yes", json!({}), &[]);
    let pid = s.expect_start();
    let mut got = 0usize;
    let mut max_rss = 0;
    while got < 64 << 20 {
        let (_, v) = s.next().expect("output");
        if let Some(d) = v["event"]["data"]["stdout"].as_str() {
            got += b64(d).len();
        }
        max_rss = max_rss.max(a.rss_bytes());
    }
    drop(s);
    // Nobody reading: output goes to the bounded ring only.
    let mut s2 = a.start_sh("exec yes", json!({"tag": "noreader"}), &[]);
    let pid2 = s2.expect_start();
    drop(s2);
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        max_rss = max_rss.max(a.rss_bytes());
    }
    assert!(max_rss < 48 << 20, "agent RSS grew to {max_rss}");
    // A late client is told how much output the bounded buffer no longer holds.
    let late = a.stream(
        "process.Process/Connect",
        json!({"process": {"tag": "noreader"}}),
        &[],
    );
    let dropped: u64 = late
        .header("x-output-dropped-bytes")
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 0);
    drop(late);
    for p in [pid, pid2] {
        a.rpc(
            "process.Process/SendSignal",
            json!({"process": {"pid": p}, "signal": "SIGNAL_SIGKILL"}),
        );
    }
    assert!(eventually(|| a.list_pids().is_empty()));
    // After the end, the replay is capped too.
    let c = a
        .stream(
            "process.Process/Connect",
            json!({"process": {"tag": "noreader"}}),
            &[],
        )
        .collect();
    assert!(
        c.stdout.len() <= 1 << 20,
        "replayed {} bytes",
        c.stdout.len()
    );
    assert_eq!(c.end.unwrap()["status"], "signal: killed");
}

#[test]
fn one_500mb_line_streams_with_bounded_memory_b2() {
    let a = Agent::start();
    let mut s = a.start_sh("head -c 500000000 /dev/zero | tr '\\0' a", json!({}), &[]);
    s.expect_start();
    let mut got = 0usize;
    let mut max_rss = 0;
    let mut n = 0u64;
    let mut end = None;
    while let Some((flags, v)) = s.next() {
        if flags & 2 != 0 {
            break;
        }
        if let Some(d) = v["event"]["data"]["stdout"].as_str() {
            let b = b64(d);
            assert!(b.iter().all(|c| *c == b'a'));
            got += b.len();
        }
        if v["event"].get("end").is_some() {
            end = Some(v["event"]["end"].clone());
        }
        n += 1;
        if n % 256 == 0 {
            max_rss = max_rss.max(a.rss_bytes());
        }
    }
    assert_eq!(got, 500_000_000);
    assert_eq!(end.unwrap()["exitCode"], 0);
    assert!(max_rss < 48 << 20, "agent RSS grew to {max_rss}");
}

#[test]
fn invalid_utf8_and_binary_output_is_preserved_b3() {
    let a = Agent::start();
    let c = a
        .start_sh(
            "printf '\\377\\376\\000abc\\303'; printf '\\342\\202' >&2",
            json!({}),
            &[],
        )
        .collect();
    assert_eq!(c.stdout, b"\xff\xfe\x00abc\xc3");
    assert_eq!(c.stderr, b"\xe2\x82");
}

#[test]
fn command_that_closes_stdout_is_tracked_until_exit_b6() {
    let a = Agent::start();
    let mut s = a.start_sh("exec >&- 2>&-; read x; exit 7", json!({"stdin": true}), &[]);
    let pid = s.expect_start();
    assert!(a.list_pids().contains(&pid));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(a.list_pids().contains(&pid), "closed stdout ended tracking");
    a.rpc(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": enc(b"go\n")}}),
    );
    let c = s.collect();
    assert_eq!(c.exit_code(), 7);
}

#[test]
fn client_disconnect_keeps_process_and_frees_stream_b7() {
    let a = Agent::start();
    let mut s = a.start_sh(
        "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done",
        json!({"tag": "ticker"}),
        &[("Keepalive-Ping-Interval", "1")],
    );
    let pid = s.expect_start();
    s.next().expect("some output");
    assert_eq!(a.metrics()["agent_streams"], 1);
    drop(s);
    assert!(
        eventually(|| a.metrics()["agent_streams"] == 0),
        "stream task leaked after disconnect"
    );
    assert!(
        a.list_pids().contains(&pid),
        "disconnect killed the process"
    );
    // Reattach by tag: live output continues.
    let mut again = a.stream(
        "process.Process/Connect",
        json!({"process": {"tag": "ticker"}}),
        &[],
    );
    assert_eq!(again.expect_start(), pid);
    let mut c = Collected::default();
    while c.stdout.is_empty() {
        let (_, v) = again.next().unwrap();
        c.absorb(&v);
    }
    a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    let rest = again.collect();
    assert!(rest.end.is_some());
    assert!(eventually(|| a.metrics()["agent_streams"] == 0));
}

#[test]
fn connect_to_ended_process_replays_output_and_end() {
    let a = Agent::start();
    let c = a
        .start_sh("echo hi; exit 4", json!({"tag": "short"}), &[])
        .collect();
    let pid = c.pid.unwrap();
    let again = a
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .collect();
    assert_eq!(again.stdout, b"hi\n");
    assert_eq!(again.exit_code(), 4);
    assert!(!a.list_pids().contains(&pid));
}

#[test]
fn list_shows_running_process_with_tag_and_config() {
    let a = Agent::start();
    let mut s = a.start_sh("sleep 300", json!({"tag": "sleeper"}), &[]);
    let pid = s.expect_start();
    let (st, v) = a.rpc("process.Process/List", json!({}));
    assert_eq!(st, 200);
    let p = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .cloned()
        .unwrap();
    assert_eq!(p["tag"], "sleeper");
    assert_eq!(p["config"]["cmd"], "/bin/sh");
    assert_eq!(p["config"]["args"][1], "sleep 300");
    a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert!(s.collect().end.is_some());
}

#[test]
fn keepalive_events_are_sent_when_asked() {
    let a = Agent::start();
    let c = a
        .start_sh("sleep 3", json!({}), &[("Keepalive-Ping-Interval", "1")])
        .collect();
    assert!(c.keepalives >= 1);
    assert_eq!(c.exit_code(), 0);
}

#[test]
fn orphaned_grandchildren_are_reaped() {
    let a = Agent::start();
    let c = a
        .start_sh(
            "for i in 1 2 3 4 5; do (sleep 0.2 &) ; done; exit 0",
            json!({}),
            &[],
        )
        .collect();
    assert_eq!(c.exit_code(), 0);
    let me = a.pid();
    let zombies_or_children = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|s| {
                let rest: Vec<&str> = s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                rest.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me)
            })
            .count()
    };
    assert!(
        eventually(|| zombies_or_children() == 0),
        "children or zombies left under the agent"
    );
}

#[test]
fn agent_exits_cleanly_on_sigterm_and_stops_commands() {
    let mut a = Agent::start();
    let mut s = a.start_sh("sleep 300", json!({}), &[]);
    let pid = s.expect_start() as u32;
    std::process::Command::new("kill")
        .args(["-TERM", &a.pid().to_string()])
        .status()
        .unwrap();
    let status = a.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(eventually(|| !alive(pid)));
}

#[test]
fn unknown_user_is_unauthenticated() {
    let a = Agent::start();
    let c = a
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "/bin/true"}}),
            &[("Authorization", "Basic bm9ib2R5LXN1Y2gtdXNlcjo=")],
        )
        .collect();
    assert_eq!(c.trailer["error"]["code"], "unauthenticated");
}

#[test]
fn commands_and_files_run_as_the_acting_user() {
    let a = Agent::start();
    // "alice:" in Basic auth.
    let alice = [("Authorization", "Basic YWxpY2U6")];
    std::process::Command::new("chmod")
        .args(["777", a.home.to_str().unwrap()])
        .status()
        .unwrap();
    let c = a.start_sh("id -u; id -g", json!({}), &alice).collect();
    let out = String::from_utf8(c.stdout).unwrap();
    let r = a.request(
        "POST",
        "/files?path=owned.txt&username=alice",
        &[("Content-Type", "application/octet-stream")],
        b"x",
    );
    assert_eq!(r.status, 200);
    let (s, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "owned.txt"}));
    assert_eq!(s, 200);
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(a.home.join("owned.txt")).unwrap();
    if my_id("-u") == 0 {
        assert_eq!(out, format!("{ALICE}\n{ALICE}\n"));
        assert_eq!(md.uid(), ALICE);
        assert_eq!(v["entry"]["owner"], "alice");
        // alice may not read root's private files.
        std::fs::write(a.home.join("secret"), b"s").unwrap();
        std::process::Command::new("chmod")
            .args(["600", a.home.join("secret").to_str().unwrap()])
            .status()
            .unwrap();
        let r = a.request("GET", "/files?path=secret&username=alice", &[], b"");
        assert_eq!(r.status, 403);
    } else {
        // Not root: the agent can only act as itself.
        assert_eq!(out, format!("{}\n{}\n", my_id("-u"), my_id("-g")));
        assert_eq!(md.uid(), my_id("-u"));
    }
}
