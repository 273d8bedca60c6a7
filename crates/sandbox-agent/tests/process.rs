//! process.Process against the real agent binary (threat rows B1-B7).
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

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
fn kill_ends_children_that_setsid_double_fork_and_clear_their_environment() {
    let a = Agent::start();
    let mut s = a.start_sh(
        "setsid sleep 300 & echo $! > p1; \
         (env -i setsid sh -c 'echo $$ > p2; exec sleep 301' &); \
         env -i /bin/sh -c 'echo $$ > p3; exec sleep 303' & \
         sleep 302",
        json!({}),
        &[],
    );
    let pid = s.expect_start();
    let escaped: Vec<u32> = ["p1", "p2", "p3"]
        .iter()
        .map(|f| wait_pid_file(&a.home.join(f)))
        .collect();
    assert!(escaped.iter().all(|p| alive(*p)));
    assert_eq!(kill(&a, pid), 200);
    // The answer comes once the whole tree is dead: no waiting needed.
    for p in &escaped {
        assert!(!alive(*p), "escaped child {p} survived the kill");
    }
    let end = s.collect().end.unwrap();
    assert_eq!(end["status"], "signal: killed");
    assert_eq!(end["exitCode"], -1);
    assert!(eventually(|| descendants(a.pid()).is_empty()));
}

#[test]
fn kill_ends_daemons_left_by_a_command_that_already_exited() {
    let a = Agent::start();
    let c = a
        .start_sh(
            "env -i setsid sh -c 'echo $$ > d; exec sleep 1000' >/dev/null 2>&1 &",
            json!({}),
            &[],
        )
        .collect();
    assert_eq!(c.exit_code(), 0);
    let pid = c.pid.unwrap();
    let daemon = wait_pid_file(&a.home.join("d"));
    assert!(alive(daemon));
    assert!(
        !a.list_pids().contains(&pid),
        "the command itself has ended"
    );
    // Its leftovers still run, so the signal is not refused: it ends them.
    assert_eq!(kill(&a, pid), 200);
    assert!(!alive(daemon), "the daemon outlived the kill");
    // Once nothing of it is left, the ended command is gone for signals, as in envd.
    assert!(eventually(|| kill(&a, pid) == 404));
    assert!(eventually(|| descendants(a.pid()).is_empty()));
}

#[test]
fn sigterm_then_kill_ends_escaped_children_that_ignore_it() {
    let a = Agent::start();
    let mut s = a.start_sh(
        "env -i setsid sh -c 'trap \"\" TERM; echo $$ > t; while :; do sleep 1; done' & sleep 300",
        json!({}),
        &[],
    );
    let pid = s.expect_start();
    let stubborn = wait_pid_file(&a.home.join("t"));
    let (st, _) = a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
    );
    assert_eq!(st, 200);
    assert_eq!(s.collect().end.unwrap()["status"], "signal: terminated");
    // It ignores SIGTERM, so the grace period ends in SIGKILL.
    assert!(
        eventually(|| !alive(stubborn)),
        "a TERM-ignoring child survived"
    );
    assert!(eventually(|| descendants(a.pid()).is_empty()));
}

#[test]
fn kill_stops_a_fork_tree_and_a_respawning_fork_chain() {
    let a = Agent::start();
    // A tree of 2^7 shells (bounded: this also runs on hosts without a pids limit) and
    // a chain whose every member forks its successor and exits, so no pid stays put.
    let mut s = a.start_sh(
        "b() { if [ $1 -gt 0 ]; then b $(($1-1)) & b $(($1-1)) & fi; sleep 1000; }; \
         r() { (r &); }; \
         b 6 & r; sleep 1000",
        json!({}),
        &[],
    );
    let pid = s.expect_start();
    assert!(
        eventually(|| descendants(a.pid()).len() > 200),
        "the tree never grew"
    );
    assert_eq!(kill(&a, pid), 200);
    assert_eq!(s.collect().end.unwrap()["status"], "signal: killed");
    assert!(
        eventually(|| descendants(a.pid()).is_empty()),
        "{:?}",
        descendants(a.pid())
    );
}

#[test]
fn kill_all_ends_every_user_process_and_nothing_outside_the_agent() {
    let a = Agent::start();
    // Not the agent's: must survive (on a host, kill-all never reaches the host).
    struct Outsider(std::process::Child);
    impl Drop for Outsider {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let outsider = Outsider(
        std::process::Command::new("sleep")
            .arg("1000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = a
        .start_sh(
            "env -i setsid sh -c 'echo $$ > d; exec sleep 1000' >/dev/null 2>&1 &",
            json!({}),
            &[],
        )
        .collect();
    assert_eq!(c.exit_code(), 0);
    let daemon = wait_pid_file(&a.home.join("d"));
    let mut s = a.start_sh("exec sleep 1001", json!({}), &[]);
    let pid = s.expect_start() as u32;

    let r = a.request_no_auth("POST", "/processes/kill-all", &[], b"");
    assert_eq!(r.status, 401, "kill-all needs the token");
    assert!(alive(daemon) && alive(pid));

    let r = a.request("POST", "/processes/kill-all", &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"killed": 2}));
    assert!(!alive(daemon) && !alive(pid));
    assert_eq!(s.collect().end.unwrap()["status"], "signal: killed");
    assert!(
        alive(outsider.0.id()),
        "kill-all reached a process that is not the agent's"
    );
    assert!(eventually(|| descendants(a.pid()).is_empty()));
    assert!(a.list_pids().is_empty());
    // Nothing left: a second kill-all kills nothing, and new commands still run.
    let r = a.request("POST", "/processes/kill-all", &[], b"");
    assert_eq!(r.json(), json!({"killed": 0}));
    let c = a.start_sh("echo again", json!({}), &[]).collect();
    assert_eq!(c.stdout, b"again\n");
    drop(outsider);
}

/// Reads this sandbox's pids.max / pids.current.
fn pids(file: &str) -> Option<u64> {
    own_cgroup_file("pids", file).and_then(|s| s.parse().ok())
}

#[test]
#[ignore = "fills the pids limit: run alone in a sandbox of its own by deploy/agent-suite-in-container.sh"]
fn fork_bomb_is_stopped_and_starting_at_the_process_limit_is_resource_exhausted() {
    let limit = pids("pids.max").filter(|l| *l <= 8192).unwrap_or_else(|| {
        panic!("refusing to fork-bomb a machine without a small pids limit (pids.max)")
    });
    let current = || pids("pids.current").unwrap_or(0);
    let a = Agent::start();
    let base = current();

    // Fill the limit and hold it: every fork in the sandbox fails now (bash, unlike dash,
    // keeps trying instead of exiting when fork fails, so no pid frees up).
    let mut filler = a.start_sh(
        "exec bash -c 'while :; do sleep 1000 & done' 2>/dev/null",
        json!({}),
        &[],
    );
    let fpid = filler.expect_start();
    assert!(
        eventually(|| current() >= limit),
        "the limit was never reached"
    );
    let c = a.start_sh("echo hi", json!({}), &[]).collect();
    let err = &c.trailer["error"];
    assert_eq!(err["code"], "resource_exhausted", "{}", c.trailer);
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains(&format!("process limit ({limit})")), "{msg}");
    assert_eq!(
        c.trailer["metadata"]["colima-e2b-reason"][0],
        "process_limit"
    );
    // The agent keeps answering, and the kill works.
    let (st, _) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "."}));
    assert_eq!(st, 200);
    assert_eq!(kill(&a, fpid), 200);
    assert!(filler.collect().end.is_some());
    assert!(
        eventually(|| current() <= base + 2),
        "{} > {base}",
        current()
    );

    // A real fork bomb: its first shell returns at once, its offspring multiply. In bash:
    // dash exits when a fork fails, so at the limit its bomb is a critical branching
    // process that often dies out by itself within milliseconds (nothing left to kill,
    // and the growth check below flaked); bash retries a failed fork, so it stays.
    let c = a
        .start_sh(
            "exec bash -c 'b() { b | b & }; b' 2>/dev/null",
            json!({}),
            &[],
        )
        .collect();
    let bomb = c.pid.unwrap();
    assert!(eventually(|| current() >= limit / 2), "the bomb never grew");
    let (t, at) = (std::time::Instant::now(), current());
    assert_eq!(kill(&a, bomb), 200);
    eprintln!(
        "killing a fork bomb at {at} of {limit} pids took {:?}",
        t.elapsed()
    );
    assert!(
        eventually(|| current() <= base + 2),
        "{} > {base}",
        current()
    );
    assert!(eventually(|| descendants(a.pid()).is_empty()));
    let c = a.start_sh("echo alive", json!({}), &[]).collect();
    assert_eq!(c.stdout, b"alive\n");
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
fn deadline_kills_the_whole_tree_and_ends_with_deadline_exceeded() {
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

/// Reads a stream to its end: (stdout bytes, end event, trailer, largest agent RSS seen
/// when `rss_of_agent` is given). Data must all be `fill` when that is given.
fn drain_stream(
    s: &mut EventStream,
    fill: Option<u8>,
    rss_of_agent: Option<&Agent>,
) -> (usize, Option<serde_json::Value>, serde_json::Value, u64) {
    let (mut got, mut end, mut max_rss, mut n) = (0usize, None, 0u64, 0u64);
    while let Some((flags, v)) = s.next() {
        if flags & 2 != 0 {
            return (got, end, v, max_rss);
        }
        if let Some(d) = v["event"]["data"]["stdout"].as_str() {
            let b = b64(d);
            if let Some(f) = fill {
                assert!(b.iter().all(|c| *c == f));
            }
            got += b.len();
        }
        if v["event"].get("end").is_some() {
            end = Some(v["event"]["end"].clone());
        }
        n += 1;
        if let (Some(a), 1) = (rss_of_agent, n % 16) {
            max_rss = max_rss.max(a.rss_bytes());
        }
    }
    (got, end, serde_json::Value::Null, max_rss)
}

/// The end of a stream whose reader fell behind what the agent keeps (ring and spill):
/// the missed byte count.
fn missed_bytes(trailer: &serde_json::Value) -> u64 {
    let err = &trailer["error"];
    assert_eq!(err["code"], "data_loss", "{trailer}");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("fell behind"), "{msg}");
    msg.split(": ")
        .nth(1)
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {msg:?}"))
}

#[test]
fn endless_output_never_waits_for_readers_and_keeps_agent_memory_bounded() {
    let a = Agent::start();
    // A reader slower than `yes` falls behind the bounded buffer: it is told so, with
    // how much it missed, instead of throttling the command or growing memory.
    let mut s = a.start_sh("exec yes", json!({}), &[]);
    let pid = s.expect_start();
    let (mut got, mut max_rss, mut n) = (0usize, 0, 0u64);
    while got < 64 << 20 {
        let (flags, v) = s.next().expect("output");
        if flags & 2 != 0 {
            // Fell behind the ring: told so, with a count, never silently.
            assert!(missed_bytes(&v) > 0);
            break;
        }
        if let Some(d) = v["event"]["data"]["stdout"].as_str() {
            got += b64(d).len();
        }
        n += 1;
        if n % 16 == 1 {
            max_rss = max_rss.max(a.rss_bytes());
        }
    }
    assert!(got > 0);
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
        assert_eq!(kill(&a, p), 200);
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
fn one_500mb_line_streams_with_bounded_memory() {
    let a = Agent::start();
    let mut s = a.start_sh(
        "head -c 500000000 /dev/zero | tr '\\0' a",
        json!({"tag": "line"}),
        &[],
    );
    let pid = s.expect_start();
    let (got, end, trailer, max_rss) = drain_stream(&mut s, Some(b'a'), Some(&a));
    match end {
        // The reader kept up.
        Some(end) => {
            assert_eq!(got, 500_000_000);
            assert_eq!(end["exitCode"], 0);
        }
        // It fell behind: it got a clear count, and the command was never held up.
        None => {
            assert!(got as u64 + missed_bytes(&trailer) <= 500_000_000);
            assert!(eventually(|| !a.list_pids().contains(&pid)));
            let c = a
                .stream(
                    "process.Process/Connect",
                    json!({"process": {"tag": "line"}}),
                    &[],
                )
                .collect();
            assert_eq!(c.exit_code(), 0);
        }
    }
    assert!(max_rss < 48 << 20, "agent RSS grew to {max_rss}");
}

#[test]
fn stalled_readers_never_block_the_command_and_memory_stays_bounded() {
    let a = Agent::start_with(Some(SECRET), &["--stall-timeout-ms", "1000"]);
    let total: usize = 100_000_000;
    let mut s = a.start_sh(
        &format!("yes | head -c {total}"),
        json!({"tag": "flood"}),
        &[],
    );
    let pid = s.expect_start();
    // Twenty readers that never read.
    let stalled: Vec<EventStream> = (0..20)
        .map(|_| {
            a.stream(
                "process.Process/Connect",
                json!({"process": {"tag": "flood"}}),
                &[],
            )
        })
        .collect();
    assert!(stalled.iter().all(|st| st.status == 200));
    // One that reads as fast as it can.
    let (got, end, trailer, max_rss) = drain_stream(&mut s, None, Some(&a));
    match end {
        Some(end) => {
            assert_eq!(got, total);
            assert_eq!(end["exitCode"], 0);
        }
        None => assert!(got as u64 + missed_bytes(&trailer) <= total as u64),
    }
    // The command ran to its end although twenty readers took nothing.
    assert!(eventually(|| !a.list_pids().contains(&pid)));
    let c = a
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .collect();
    assert_eq!(c.exit_code(), 0);
    eprintln!("agent RSS with 20 stalled readers: {max_rss} bytes (max sampled)");
    assert!(max_rss < 48 << 20, "agent RSS grew to {max_rss}");
    // The stalled readers were dropped after the stall timeout...
    assert!(eventually(|| a.metrics()["agent_streams"] == 0));
    // ...and their connections end: with the reason if it could still be written (it
    // stalled, or it had fallen behind the buffer first), else simply closed; never with
    // a clean end.
    for st in stalled {
        let c = st.collect();
        assert!(c.end.is_none(), "a stalled reader got the whole output");
        if let Some(err) = c.trailer.get("error") {
            let msg = err["message"].as_str().unwrap();
            match err["code"].as_str() {
                Some("deadline_exceeded") => assert!(msg.contains("stalled"), "{msg}"),
                _ => assert!(missed_bytes(&c.trailer) > 0),
            }
        }
    }
}

#[test]
fn a_reader_behind_the_buffer_and_spill_caps_gets_data_loss_naming_the_missed_bytes() {
    // The spill off (the ring alone) and a small spill cap.
    for (spill, kept) in [("0", 65536), ("2097152", 65536 + 2097152)] {
        let a = Agent::start_with(
            Some(SECRET),
            &[
                "--output-buffer-bytes",
                "65536",
                "--spill-bytes",
                spill,
                "--stall-timeout-ms",
                "300000",
            ],
        );
        let total: u64 = 64_000_000;
        let mut s = a.start_sh(&format!("head -c {total} /dev/zero"), json!({}), &[]);
        let pid = s.expect_start();
        // Not reading: the command still runs to its end (it never waits for a reader).
        assert!(
            wait_until(Duration::from_secs(60), || !a.list_pids().contains(&pid)),
            "the command was held up"
        );
        let (got, end, trailer, _) = drain_stream(&mut s, Some(0), None);
        assert!(
            end.is_none(),
            "no silent gap: the stream must not end cleanly"
        );
        let missed = missed_bytes(&trailer);
        assert!(missed > 0);
        // What it got plus what it missed is everything but what is kept (the ring, and
        // the spill, whose cap counts the envelopes on disk: more than the output).
        let unread = total - got as u64 - missed;
        assert!(
            unread <= kept,
            "spill {spill}: got {got}, missed {missed} of {total}"
        );
    }
}

#[test]
fn a_stalled_reader_is_dropped_and_told_why_if_it_reads_again() {
    let a = Agent::start_with(Some(SECRET), &["--stall-timeout-ms", "2000"]);
    let mut s = a.start_sh(
        "head -c 64000000 /dev/zero; exec sleep 1000",
        json!({}),
        &[],
    );
    let pid = s.expect_start();
    // Its socket fills and it takes nothing more: the agent drops the stream...
    assert!(
        eventually(|| a.metrics()["agent_streams"] == 0),
        "the stalled stream was kept"
    );
    // ...while the command goes on.
    assert!(a.list_pids().contains(&pid));
    // Its output kept being drained meanwhile: the 1 MiB buffer rolled over.
    let dropped: u64 = a
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .header("x-output-dropped-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(dropped > 0);
    // Reading again: what was already on its way, then the reason.
    let (_, end, trailer, _) = drain_stream(&mut s, Some(0), None);
    assert!(end.is_none());
    assert_eq!(trailer["error"]["code"], "deadline_exceeded", "{trailer}");
    assert!(trailer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("stalled"));
    assert_eq!(kill(&a, pid), 200);
}

#[test]
fn invalid_utf8_and_binary_output_is_preserved() {
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
fn command_that_closes_stdout_is_tracked_until_it_exits() {
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
fn client_disconnect_keeps_the_command_and_frees_the_stream() {
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

/// Checks `seq 1 N` output as it streams: every line the next number.
struct SeqCheck {
    next: u64,
    line: Vec<u8>,
    bytes: u64,
}

impl SeqCheck {
    fn new() -> Self {
        Self {
            next: 1,
            line: Vec::new(),
            bytes: 0,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        for &c in data {
            if c == b'\n' {
                let n: u64 = std::str::from_utf8(&self.line).unwrap().parse().unwrap();
                assert_eq!(n, self.next, "out of order at byte {}", self.bytes);
                self.next += 1;
                self.line.clear();
            } else {
                assert!(c.is_ascii_digit() && self.line.len() < 20, "garbage {c}");
                self.line.push(c);
            }
        }
    }
}

/// Bytes `seq 1 n` writes.
fn seq_len(n: u64) -> u64 {
    let (mut total, mut lo, mut digits) = (0, 1, 1);
    while lo <= n {
        let hi = (lo * 10 - 1).min(n);
        total += (hi - lo + 1) * (digits + 1);
        lo *= 10;
        digits += 1;
    }
    total
}

#[test]
fn a_slow_reader_gets_every_byte_in_order_from_the_spill_while_the_command_finishes() {
    let dir = TempDir::new("spill");
    // It stops reading for as long as the command takes: no stall timeout meanwhile.
    let a = Agent::start_with(
        Some(SECRET),
        &["--spill-dir", dir.path(), "--stall-timeout-ms", "300000"],
    );
    let n: u64 = 12_500_000;
    let total = seq_len(n);
    assert!(total > 100_000_000);
    let mut s = a.start_sh(&format!("seq 1 {n}"), json!({}), &[]);
    let pid = s.expect_start();
    let mut check = SeqCheck::new();
    let (mut end, mut trailer, mut envelopes) = (None, None, 0u64);
    let (mut max_rss, mut ended_at) = (0, None);
    while let Some((flags, v)) = s.next() {
        if flags & 2 != 0 {
            trailer = Some(v);
            break;
        }
        if let Some(d) = v["event"]["data"]["stdout"].as_str() {
            check.feed(&b64(d));
        }
        if v["event"].get("end").is_some() {
            end = Some(v["event"]["end"].clone());
        }
        envelopes += 1;
        if envelopes % 64 == 0 {
            max_rss = max_rss.max(a.rss_bytes());
        }
        if ended_at.is_none() && check.bytes >= 4 << 20 {
            // A reader far slower than the command: it stops for a while. The command
            // runs to its end meanwhile, its output going to the spill.
            assert!(
                wait_until(Duration::from_secs(60), || {
                    max_rss = max_rss.max(a.rss_bytes());
                    !a.list_pids().contains(&pid)
                }),
                "the command waited for its reader"
            );
            ended_at = Some(check.bytes);
            assert!(
                open_files_under(a.pid(), dir.path()) > 0,
                "nothing was spilled"
            );
        } else if envelopes % 16 == 0 {
            // Then it reads on, still slowly.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let ended_at = ended_at.expect("the reader never got 4 MiB");
    assert!(
        ended_at < total / 2,
        "the command ended only once its reader had {ended_at} of {total} bytes"
    );
    assert_eq!(trailer, Some(json!({})), "the stream did not end cleanly");
    assert_eq!(end.expect("end event")["exitCode"], 0);
    assert_eq!(check.bytes, total);
    assert_eq!(check.next, n + 1);
    assert!(check.line.is_empty());
    eprintln!(
        "agent RSS while spilling {total} bytes for a slow reader: {max_rss} bytes (max sampled)"
    );
    assert!(max_rss < 48 << 20, "agent RSS grew to {max_rss}");
    // Read to the end: the spill files are gone.
    assert!(
        wait_until(Duration::from_secs(10), || open_files_under(
            a.pid(),
            dir.path()
        ) == 0),
        "spill files left open"
    );
}

#[test]
fn readers_that_keep_up_never_spill() {
    let dir = TempDir::new("spill");
    let a = Agent::start_with(Some(SECRET), &["--spill-dir", dir.path()]);
    // 8 MiB through the 1 MiB buffer in lockstep with two readers: the command writes
    // its next 64 KiB only once both have read the last.
    let bursts = 128;
    let mut s = a.start_sh(
        &format!("for i in $(seq 1 {bursts}); do head -c 65536 /dev/zero; read x; done"),
        json!({"stdin": true, "tag": "lockstep"}),
        &[],
    );
    let pid = s.expect_start();
    let mut c = a.stream(
        "process.Process/Connect",
        json!({"process": {"tag": "lockstep"}}),
        &[],
    );
    assert_eq!(c.expect_start(), pid);
    let mut spilled = 0;
    for burst in 1..=bursts {
        for r in [&mut s, &mut c] {
            let mut got = Collected::default();
            while got.stdout.len() < 65536 {
                let (_, v) = r.next().expect("output");
                got.absorb(&v);
            }
            assert_eq!(got.stdout.len(), 65536, "burst {burst}");
        }
        spilled = spilled.max(open_files_under(a.pid(), dir.path()));
        let (st, _) = a.rpc(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": enc(b"\n")}}),
        );
        assert_eq!(st, 200);
    }
    for r in [s, c] {
        let rest = r.collect();
        assert!(rest.stdout.is_empty());
        assert_eq!(rest.exit_code(), 0);
        assert_eq!(rest.trailer, json!({}));
    }
    assert_eq!(spilled, 0, "output its readers kept up with was spilled");
}

/// A spill directory on a full (1 MiB) filesystem, and the wrapper the agent needs to see
/// it: a tmpfs the container script mounts, or one in a mount namespace of the agent's
/// own (root on a host).
fn full_disk() -> Option<(String, Vec<String>, Option<TempDir>)> {
    if let Ok(d) = std::env::var("COLIMA_E2B_TEST_TINY_FS") {
        return Some((d, Vec::new(), None));
    }
    if my_id("-u") != 0 || in_container() {
        return None;
    }
    let dir = TempDir::new("tinyfs");
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o size=1m tmpfs \"$0\" && exec \"$@\"",
        dir.path(),
    ];
    Some((
        dir.path().to_string(),
        wrapper.iter().map(|s| s.to_string()).collect(),
        Some(dir),
    ))
}

#[test]
fn a_full_disk_stops_the_spill_and_the_command_still_completes() {
    let Some((dir, wrapper, _keep)) = full_disk() else {
        eprintln!("skipped: no small filesystem (needs root or COLIMA_E2B_TEST_TINY_FS)");
        return;
    };
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let a = Agent::start_wrapped(
        Some(SECRET),
        &["--spill-dir", &dir, "--stall-timeout-ms", "300000"],
        &wrapper,
    );
    let total: u64 = 32_000_000;
    let mut s = a.start_sh(
        &format!("head -c {total} /dev/zero"),
        json!({"tag": "full"}),
        &[],
    );
    let pid = s.expect_start();
    // Not reading: the spill fills the disk and stops; the command is not held up.
    assert!(
        wait_until(Duration::from_secs(60), || !a.list_pids().contains(&pid)),
        "the command was held up"
    );
    let (got, end, trailer, _) = drain_stream(&mut s, Some(0), None);
    assert!(end.is_none(), "the reader cannot have got everything");
    let missed = missed_bytes(&trailer);
    let msg = trailer["error"]["message"].as_str().unwrap();
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(got as u64 + missed <= total);
    // The command completed, and what was spilled is freed.
    let c = a
        .stream(
            "process.Process/Connect",
            json!({"process": {"tag": "full"}}),
            &[],
        )
        .collect();
    assert_eq!(c.exit_code(), 0);
    assert!(wait_until(Duration::from_secs(10), || open_files_under(
        a.pid(),
        &dir
    ) == 0));
    // The agent goes on.
    let c = a.start_sh("echo ok", json!({}), &[]).collect();
    assert_eq!(c.stdout, b"ok\n");
}
