//! filesystem.Filesystem, REST /files, auth and /init against the real agent binary
//! (threat rows C1-C3).
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::io::{BufReader, Read, Write};

use common::*;
use serde_json::{json, Value};

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "XtestBoundary123";
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn health_needs_no_token_but_everything_else_does() {
    let a = Agent::start();
    assert_eq!(a.request_no_auth("GET", "/health", &[], b"").status, 204);
    let r = a.request_no_auth("GET", "/files?path=x", &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], 401);
    let r = a.request_no_auth("GET", "/envs", &[], b"");
    assert_eq!(r.status, 401);
    let r = a.request_no_auth(
        "POST",
        "/filesystem.Filesystem/Stat",
        &[
            ("Content-Type", "application/json"),
            ("X-Access-Token", "wrong-secret-0123456789"),
        ],
        br#"{"path":"."}"#,
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "unauthenticated");
    // Streaming call without token: refused before any process starts.
    let marker = a.home.join("should-not-exist");
    let mut env = vec![0u8];
    let payload = json!({"process": {"cmd": "/usr/bin/touch", "args": [marker.to_str().unwrap()]}})
        .to_string();
    env.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    env.extend_from_slice(payload.as_bytes());
    let r = a.request_no_auth(
        "POST",
        "/process.Process/Start",
        &[("Content-Type", "application/connect+json")],
        &env,
    );
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("unauthenticated"));
    assert!(!marker.exists());
    // With the token it works.
    let (s, _) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "."}));
    assert_eq!(s, 200);
}

#[test]
fn init_sets_token_only_once_or_with_current_token_and_envs_reach_commands() {
    let mut a = Agent::start_with(None, &[]);
    // No secret yet: /init may set one.
    let r = a.request(
        "POST",
        "/init",
        &[("Content-Type", "application/json")],
        json!({"accessToken": "first-token-abcdef", "envVars": {"INIT_VAR": "v1"}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 204);
    // Now the old way (no token) is refused, and so is replacing the token without it.
    let r = a.request(
        "POST",
        "/init",
        &[("Content-Type", "application/json")],
        json!({"accessToken": "attacker"}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 401);
    a.token = Some("first-token-abcdef".into());
    let r = a.request("GET", "/envs", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["INIT_VAR"], "v1");
    let c = a.start_sh("echo $INIT_VAR", json!({}), &[]).collect();
    assert_eq!(c.stdout, b"v1\n");
    // Rotating with the current token works.
    let r = a.request(
        "POST",
        "/init",
        &[("Content-Type", "application/json")],
        json!({"accessToken": "second-token-abcdef"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 204);
    assert_eq!(a.request("GET", "/envs", &[], b"").status, 401);
    a.token = Some("second-token-abcdef".into());
    assert_eq!(a.request("GET", "/envs", &[], b"").status, 200);
}

#[test]
fn multipart_upload_then_download_roundtrip_with_gzip() {
    let a = Agent::start();
    let abs = a.home.join("abs/b.bin");
    let (ct, body) = multipart(&[
        ("dir/a.txt", b"alpha"),
        (abs.to_str().unwrap(), b"\x00\xffbeta"),
    ]);
    let r = a.request("POST", "/files", &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v[0]["path"], a.home.join("dir/a.txt").to_str().unwrap());
    assert_eq!(v[0]["name"], "a.txt");
    assert_eq!(v[0]["type"], "file");
    assert_eq!(v[1]["path"], abs.to_str().unwrap());
    assert_eq!(std::fs::read(a.home.join("dir/a.txt")).unwrap(), b"alpha");
    assert_eq!(std::fs::read(&abs).unwrap(), b"\x00\xffbeta");
    let r = a.request("GET", "/files?path=dir%2Fa.txt", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"alpha");
    let r = a.request(
        "GET",
        "/files?path=dir/a.txt",
        &[("Accept-Encoding", "gzip")],
        b"",
    );
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut d = flate2::read::GzDecoder::new(&r.body[..]);
    let mut out = Vec::new();
    d.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"alpha");
    let r = a.request(
        "GET",
        "/files?path=dir/a.txt",
        &[("Accept-Encoding", "br")],
        b"",
    );
    assert_eq!(r.status, 406);
}

#[test]
fn octet_stream_upload_with_gzip_overwrites_and_creates_parents() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("x")).unwrap();
    std::fs::write(a.home.join("x/f"), b"old content that is longer").unwrap();
    let r = a.request(
        "POST",
        "/files?path=x/f",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "gzip"),
        ],
        &gzip(b"new"),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::read(a.home.join("x/f")).unwrap(), b"new");
    let r = a.request(
        "POST",
        "/files?path=deep/er/g",
        &[("Content-Type", "application/octet-stream")],
        b"g",
    );
    assert_eq!(r.status, 200);
    assert_eq!(std::fs::read(a.home.join("deep/er/g")).unwrap(), b"g");
    let r = a.request(
        "POST",
        "/files?path=x/bad",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "gzip"),
        ],
        b"not gzip at all",
    );
    assert_eq!(r.status, 400);
    assert!(!a.home.join("x/bad").exists(), "partial file left behind");
}

#[test]
fn download_errors_missing_404_directory_400_device_400() {
    let a = Agent::start();
    assert_eq!(a.request("GET", "/files?path=nope", &[], b"").status, 404);
    std::fs::create_dir_all(a.home.join("d")).unwrap();
    assert_eq!(a.request("GET", "/files?path=d", &[], b"").status, 400);
    // Device files would never end (/dev/zero) or block: refused.
    assert_eq!(
        a.request("GET", "/files?path=/dev/zero", &[], b"").status,
        400
    );
    assert_eq!(a.request("GET", "/files?path=a%00b", &[], b"").status, 400);
    let r = a.request(
        "POST",
        "/files?path=/dev/null",
        &[("Content-Type", "application/octet-stream")],
        b"x",
    );
    assert_eq!(r.status, 400);
}

#[test]
fn relative_and_dotdot_paths_resolve_against_home() {
    let a = Agent::start();
    let r = a.request(
        "POST",
        "/files?path=a/../../HOMENAME/b.txt"
            .replace("HOMENAME", a.home.file_name().unwrap().to_str().unwrap())
            .as_str(),
        &[("Content-Type", "application/octet-stream")],
        b"ok",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::read(a.home.join("b.txt")).unwrap(), b"ok");
    let (s, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "./b.txt"}));
    assert_eq!(s, 200);
    assert_eq!(v["entry"]["path"], a.home.join("b.txt").to_str().unwrap());
    let (s, v) = a.rpc(
        "filesystem.Filesystem/Stat",
        json!({"path": "bad\u{0}path"}),
    );
    assert_eq!(s, 400);
    assert_eq!(v["code"], "invalid_argument");
}

#[test]
fn big_upload_and_download_stream_with_bounded_memory() {
    let a = Agent::start();
    let total: usize = 256 << 20;
    let s = a.connect();
    let mut w = s.try_clone().unwrap();
    w.write_all(
        format!(
            "POST /files?path=big.bin HTTP/1.1\r\nHost: a\r\nX-Access-Token: {SECRET}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let mut max_rss = 0;
    for i in 0..(total >> 20) {
        w.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .unwrap();
        w.write_all(&chunk).unwrap();
        w.write_all(b"\r\n").unwrap();
        if i % 16 == 0 {
            max_rss = max_rss.max(a.rss_bytes());
        }
    }
    w.write_all(b"0\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        std::fs::metadata(a.home.join("big.bin")).unwrap().len(),
        total as u64
    );

    // Download, reading slowly at first: the agent must not buffer the file.
    let s = a.connect();
    let mut w = s.try_clone().unwrap();
    w.write_all(format!("GET /files?path=big.bin HTTP/1.1\r\nHost: a\r\nX-Access-Token: {SECRET}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    max_rss = max_rss.max(a.rss_bytes());
    let body = read_body(&mut r, &headers);
    assert_eq!(body.len(), total);
    assert!(body[..1 << 20] == chunk[..]);
    assert!(max_rss < 48 << 20, "agent RSS grew to {max_rss}");
}

#[test]
fn upload_past_the_cap_is_413_and_leaves_nothing() {
    let a = Agent::start_with(Some(SECRET), &["--max-upload-bytes", "1000"]);
    let r = a.request(
        "POST",
        "/files?path=cap.bin",
        &[("Content-Type", "application/octet-stream")],
        &vec![7u8; 5000],
    );
    assert_eq!(r.status, 413);
    assert!(!a.home.join("cap.bin").exists());
    // A gzip bomb counts decompressed bytes.
    let r = a.request(
        "POST",
        "/files?path=bomb.bin",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "gzip"),
        ],
        &gzip(&vec![0u8; 1 << 20]),
    );
    assert_eq!(r.status, 413);
    let r = a.request(
        "POST",
        "/files?path=ok.bin",
        &[("Content-Type", "application/octet-stream")],
        &[1u8; 1000],
    );
    assert_eq!(r.status, 200);
}

fn entry(v: &Value) -> &Value {
    &v["entry"]
}

#[test]
fn stat_reports_complete_entry_info() {
    let a = Agent::start();
    let f = a.home.join("f.txt");
    std::fs::write(&f, b"12345").unwrap();
    std::process::Command::new("chmod")
        .args(["640", f.to_str().unwrap()])
        .status()
        .unwrap();
    std::os::unix::fs::symlink("f.txt", a.home.join("link")).unwrap();
    let (s, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "f.txt"}));
    assert_eq!(s, 200, "{v}");
    let e = entry(&v);
    assert_eq!(e["name"], "f.txt");
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["path"], f.to_str().unwrap());
    assert_eq!(e["size"], "5");
    assert_eq!(e["mode"], 0o640);
    assert_eq!(e["permissions"], "-rw-r-----");
    assert!(!e["owner"].as_str().unwrap().is_empty());
    assert!(!e["group"].as_str().unwrap().is_empty());
    let t = e["modifiedTime"].as_str().unwrap();
    assert!(
        t.len() >= 20 && t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T",
        "{t}"
    );
    let (_, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "link"}));
    assert_eq!(entry(&v)["type"], "FILE_TYPE_FILE");
    assert_eq!(entry(&v)["symlinkTarget"], f.to_str().unwrap());
    assert_eq!(entry(&v)["isSymlink"], true);
    let (_, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "."}));
    assert_eq!(entry(&v)["type"], "FILE_TYPE_DIRECTORY");
    assert!(entry(&v)["permissions"].as_str().unwrap().starts_with('d'));
    let (s, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "missing"}));
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn list_dir_respects_depth_and_does_not_follow_symlinked_dirs() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("l/a/b")).unwrap();
    std::fs::write(a.home.join("l/top"), b"").unwrap();
    std::fs::write(a.home.join("l/a/mid"), b"").unwrap();
    std::fs::write(a.home.join("l/a/b/deep"), b"").unwrap();
    std::os::unix::fs::symlink("/", a.home.join("l/rootlink")).unwrap();
    let names = |depth: u32| -> Vec<String> {
        let (s, v) = a.rpc(
            "filesystem.Filesystem/ListDir",
            json!({"path": "l", "depth": depth}),
        );
        assert_eq!(s, 200, "{v}");
        let mut n: Vec<String> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["path"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches(a.home.join("l/").to_str().unwrap())
                    .to_string()
            })
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(1), vec!["a", "rootlink", "top"]);
    assert_eq!(names(2), vec!["a", "a/b", "a/mid", "rootlink", "top"]);
    assert_eq!(
        names(5),
        vec!["a", "a/b", "a/b/deep", "a/mid", "rootlink", "top"]
    );
    let (s, v) = a.rpc(
        "filesystem.Filesystem/ListDir",
        json!({"path": "l/top", "depth": 1}),
    );
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_argument")));
}

#[test]
fn make_dir_creates_parents_and_reports_conflicts() {
    let a = Agent::start();
    let (s, v) = a.rpc("filesystem.Filesystem/MakeDir", json!({"path": "m/n/o"}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(entry(&v)["type"], "FILE_TYPE_DIRECTORY");
    assert!(a.home.join("m/n/o").is_dir());
    let (s, v) = a.rpc("filesystem.Filesystem/MakeDir", json!({"path": "m/n/o"}));
    assert_eq!((s, v["code"].as_str()), (409, Some("already_exists")));
    std::fs::write(a.home.join("file"), b"").unwrap();
    let (s, v) = a.rpc("filesystem.Filesystem/MakeDir", json!({"path": "file"}));
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_argument")));
}

#[test]
fn move_and_recursive_remove() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("src/inner")).unwrap();
    std::fs::write(a.home.join("src/inner/f"), b"x").unwrap();
    let (s, v) = a.rpc(
        "filesystem.Filesystem/Move",
        json!({"source": "src", "destination": "new/place"}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        entry(&v)["path"],
        a.home.join("new/place").to_str().unwrap()
    );
    assert!(a.home.join("new/place/inner/f").exists());
    assert!(!a.home.join("src").exists());
    let (s, v) = a.rpc(
        "filesystem.Filesystem/Move",
        json!({"source": "nope", "destination": "x"}),
    );
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
    let (s, _) = a.rpc("filesystem.Filesystem/Remove", json!({"path": "new"}));
    assert_eq!(s, 200);
    assert!(!a.home.join("new").exists());
    let (s, _) = a.rpc("filesystem.Filesystem/Remove", json!({"path": "new"}));
    assert_eq!(s, 200, "removing a missing path is fine");
}

#[test]
fn watch_dir_streams_recursive_events() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("w/sub")).unwrap();
    let mut s = a.stream(
        "filesystem.Filesystem/WatchDir",
        json!({"path": "w", "recursive": true, "includeEntry": true}),
        &[],
    );
    let (_, first) = s.next().unwrap();
    assert!(first.get("start").is_some(), "{first}");
    std::fs::write(a.home.join("w/top.txt"), b"1").unwrap();
    std::fs::write(a.home.join("w/sub/inner.txt"), b"2").unwrap();
    std::fs::remove_file(a.home.join("w/top.txt")).unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(n, t): &(String, String)| n == "top.txt" && t == "EVENT_TYPE_REMOVE")
    {
        let (flags, v) = s.next().expect("event");
        assert_eq!(flags, 0, "{v}");
        if let Some(fs) = v.get("filesystem") {
            if fs["name"] == "sub/inner.txt" && fs["type"] == "EVENT_TYPE_CREATE" {
                assert_eq!(fs["entry"]["name"], "inner.txt");
            }
            seen.push((
                fs["name"].as_str().unwrap().to_string(),
                fs["type"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(
        seen.contains(&("top.txt".into(), "EVENT_TYPE_CREATE".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("top.txt".into(), "EVENT_TYPE_WRITE".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("sub/inner.txt".into(), "EVENT_TYPE_CREATE".into())),
        "{seen:?}"
    );
}

#[test]
fn polling_watcher_collects_and_removes() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("pw")).unwrap();
    let (s, v) = a.rpc(
        "filesystem.Filesystem/CreateWatcher",
        json!({"path": "pw", "recursive": false}),
    );
    assert_eq!(s, 200, "{v}");
    let id = v["watcherId"].as_str().unwrap().to_string();
    std::fs::write(a.home.join("pw/x"), b"1").unwrap();
    let mut events = Vec::new();
    assert!(eventually(|| {
        let (_, v) = a.rpc(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        );
        events.extend(v["events"].as_array().cloned().unwrap_or_default());
        events
            .iter()
            .any(|e| e["name"] == "x" && e["type"] == "EVENT_TYPE_CREATE")
    }));
    let (s, _) = a.rpc(
        "filesystem.Filesystem/RemoveWatcher",
        json!({"watcher_id": id}),
    );
    assert_eq!(s, 200);
    let (s, v) = a.rpc(
        "filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": id}),
    );
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn watch_on_missing_dir_is_not_found() {
    let a = Agent::start();
    let c = a
        .stream(
            "filesystem.Filesystem/WatchDir",
            json!({"path": "nowhere"}),
            &[],
        )
        .collect();
    assert_eq!(c.trailer["error"]["code"], "not_found");
}

#[test]
fn malformed_json_is_invalid_argument_not_a_crash() {
    let a = Agent::start();
    let r = a.request(
        "POST",
        "/filesystem.Filesystem/Stat",
        &[("Content-Type", "application/json")],
        b"{\"path\": [[[[",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "invalid_argument");
    let r = a.request(
        "POST",
        "/filesystem.Filesystem/ListDir",
        &[("Content-Type", "application/json")],
        br#"{"path": ".", "depth": 99999999999999999999}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(a.request("GET", "/health", &[], b"").status, 204);
}

fn meminfo_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The memory limit of the cgroup the agent reads (the hierarchy's root: a container's own
/// cgroup), when one is set.
fn cgroup_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse::<u64>().ok())
    .filter(|v| *v < 1 << 60)
}

#[test]
fn metrics_report_the_sandbox_and_the_agent_as_they_are() {
    let a = Agent::start();
    let m = a.metrics();
    let n = |k: &str| {
        m[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {m}"))
    };
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert!((1..=cpus).contains(&n("cpu_count")), "{m}");
    let host = meminfo_total();
    match cgroup_memory_limit() {
        Some(limit) => assert_eq!(n("mem_total"), limit.min(host), "{m}"),
        None => assert_eq!(n("mem_total"), host, "{m}"),
    }
    assert_eq!(n("mem_total_mib"), n("mem_total") >> 20);
    assert!(n("mem_used") > 0 && n("mem_used") <= n("mem_total"), "{m}");
    let rss = n("agent_rss");
    assert!((1 << 20..64 << 20).contains(&rss), "agent_rss {rss}");
    assert!(
        n("disk_total") > 0 && n("disk_total") >= n("disk_used"),
        "{m}"
    );
    assert_eq!(n("agent_processes"), 0);
    assert_eq!(n("agent_streams"), 0);
    // A running command and its open stream are counted, and stop being counted.
    let mut s = a.start_sh("exec sleep 300", json!({}), &[]);
    let pid = s.expect_start();
    let m = a.metrics();
    assert_eq!(
        (m["agent_processes"].as_u64(), m["agent_streams"].as_u64()),
        (Some(1), Some(1)),
        "{m}"
    );
    assert_eq!(kill(&a, pid), 200);
    assert!(s.collect().end.is_some());
    assert!(eventually(|| {
        let m = a.metrics();
        m["agent_processes"] == 0 && m["agent_streams"] == 0
    }));
}

// ------------------------------------------------------------ failing uploads

/// Temporary upload files left in `dir`.
fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".colima-e2b-upload-"))
        .collect()
}

#[test]
fn failed_uploads_leave_the_old_file_as_it_was() {
    let a = Agent::start_with(Some(SECRET), &["--max-upload-bytes", "1000"]);
    let f = a.home.join("keep.txt");
    std::fs::write(&f, b"old").unwrap();
    let untouched = |why: &str| {
        assert_eq!(std::fs::read(&f).unwrap(), b"old", "{why} changed the file");
        assert!(
            leftovers(&a.home).is_empty(),
            "{why} left {:?}",
            leftovers(&a.home)
        );
    };
    // Past the cap: 413.
    let r = a.request("POST", "/files?path=keep.txt", &[OCTET], &[7u8; 5000]);
    assert_eq!(r.status, 413);
    untouched("a raw upload past the cap");
    let (ct, body) = multipart(&[("keep.txt", &[7u8; 5000])]);
    let r = a.request("POST", "/files", &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 413);
    untouched("a multipart upload past the cap");
    // Bad gzip: 400.
    let r = a.request(
        "POST",
        "/files?path=keep.txt",
        &[OCTET, ("Content-Encoding", "gzip")],
        b"not gzip at all",
    );
    assert_eq!(r.status, 400);
    untouched("a bad gzip body");
    let mut truncated = gzip(&[1u8; 500]);
    truncated.truncate(truncated.len() / 2);
    let r = a.request(
        "POST",
        "/files?path=keep.txt",
        &[OCTET, ("Content-Encoding", "gzip")],
        &truncated,
    );
    assert_eq!(r.status, 400);
    untouched("a truncated gzip body");
    // The client goes away mid-body.
    {
        let s = a.connect();
        let mut w = s.try_clone().unwrap();
        w.write_all(
            format!("POST /files?path=keep.txt HTTP/1.1\r\nHost: a\r\nX-Access-Token: {SECRET}\r\nContent-Type: application/octet-stream\r\nContent-Length: 900\r\n\r\n").as_bytes(),
        )
        .unwrap();
        w.write_all(&[9u8; 400]).unwrap();
        // Wait until the agent has begun the upload, then hang up.
        assert!(
            eventually(|| !leftovers(&a.home).is_empty()),
            "no temporary file appeared"
        );
        drop(w);
        drop(s);
    }
    assert!(
        eventually(|| leftovers(&a.home).is_empty()),
        "{:?}",
        leftovers(&a.home)
    );
    untouched("a client that went away");
    // A good upload still replaces it.
    let r = a.request("POST", "/files?path=keep.txt", &[OCTET], b"new");
    assert_eq!(r.status, 200);
    assert_eq!(std::fs::read(&f).unwrap(), b"new");
    assert!(leftovers(&a.home).is_empty());
}

#[test]
fn an_upload_in_progress_is_private_and_the_result_belongs_to_the_acting_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let a = Agent::start();
    let root = my_id("-u") == 0;
    // As root, upload as alice into a directory she may write.
    let (user, uid) = if root {
        ("alice", ALICE)
    } else {
        ("user", my_id("-u"))
    };
    let dir = a.home.join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = dir.join("f.txt");
    std::fs::write(&f, b"old").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();

    let s = a.connect();
    let mut w = s.try_clone().unwrap();
    w.write_all(
        format!("POST /files?path=shared/f.txt&username={user} HTTP/1.1\r\nHost: a\r\nX-Access-Token: {SECRET}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    w.write_all(b"4\r\nnew \r\n").unwrap();
    assert!(
        eventually(|| !leftovers(&dir).is_empty()),
        "no temporary file appeared"
    );
    let temp = dir.join(&leftovers(&dir)[0]);
    let md = std::fs::metadata(&temp).unwrap();
    assert_eq!(
        md.mode() & 0o777,
        0o600,
        "a partial upload is readable by others"
    );
    assert_eq!(md.uid(), uid);
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"old",
        "the target changed before the end"
    );
    w.write_all(b"7\r\ncontent\r\n0\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(std::fs::read(&f).unwrap(), b"new content");
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!(md.mode() & 0o777, 0o640, "the old file's mode is kept");
    assert_eq!(md.uid(), uid, "the new file is the acting user's");
    assert!(leftovers(&dir).is_empty());
    // A new file gets 0644.
    let r = a.request(
        "POST",
        &format!("/files?path=shared/fresh.txt&username={user}"),
        &[OCTET],
        b"x",
    );
    assert_eq!(r.status, 200);
    let md = std::fs::metadata(dir.join("fresh.txt")).unwrap();
    assert_eq!((md.mode() & 0o777, md.uid()), (0o644, uid));
}

#[test]
fn uploads_through_a_symlink_write_its_target_and_special_files_are_refused() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("real")).unwrap();
    std::fs::write(a.home.join("real/target.txt"), b"old").unwrap();
    std::os::unix::fs::symlink("real/target.txt", a.home.join("link")).unwrap();
    std::os::unix::fs::symlink("link", a.home.join("link2")).unwrap();
    let r = a.request("POST", "/files?path=link2", &[OCTET], b"through two links");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(a.home.join("real/target.txt")).unwrap(),
        b"through two links"
    );
    assert!(std::fs::symlink_metadata(a.home.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    // A dangling link: its target is created.
    std::os::unix::fs::symlink("real/new.txt", a.home.join("dangling")).unwrap();
    let r = a.request("POST", "/files?path=dangling", &[OCTET], b"created");
    assert_eq!(r.status, 200);
    assert_eq!(
        std::fs::read(a.home.join("real/new.txt")).unwrap(),
        b"created"
    );
    // FIFOs and devices are refused, as is a directory.
    let st = std::process::Command::new("mkfifo")
        .arg(a.home.join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    for p in ["fifo", "/dev/null", "real"] {
        let r = a.request("POST", &format!("/files?path={p}"), &[OCTET], b"x");
        assert_eq!(r.status, 400, "{p}: {}", String::from_utf8_lossy(&r.body));
    }
    assert!(leftovers(&a.home).is_empty() && leftovers(&a.home.join("real")).is_empty());
    // A loop of links is refused, not followed forever.
    std::os::unix::fs::symlink("loop2", a.home.join("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", a.home.join("loop2")).unwrap();
    let r = a.request("POST", "/files?path=loop1", &[OCTET], b"x");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
}

/// A small filesystem to fill: a fresh 2 MiB tmpfs where mounting is allowed (a host run
/// as root), else the sandbox's /dev/shm when it is a small tmpfs (a container's 64 MiB).
struct SmallFs {
    dir: std::path::PathBuf,
    mounted: bool,
}

impl SmallFs {
    fn new(a: &Agent) -> Option<SmallFs> {
        let dir = a.home.join("smallfs");
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            return Some(SmallFs { dir, mounted });
        }
        let shm = std::path::Path::new("/dev/shm");
        let out = std::process::Command::new("df")
            .args(["-k", "--output=size,fstype"])
            .arg(shm)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().nth(1)?;
        let mut f = line.split_whitespace();
        let (kb, fstype): (u64, &str) = (f.next()?.parse().ok()?, f.next()?);
        if fstype != "tmpfs" || kb > 256 << 10 {
            return None;
        }
        let dir = shm.join(format!("agent-test-{}-{}", std::process::id(), a.pid()));
        std::fs::create_dir_all(&dir).unwrap();
        Some(SmallFs {
            dir,
            mounted: false,
        })
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["-k", "--output=avail"])
            .arg(&self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1024
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn upload_onto_a_full_disk_is_507_and_keeps_the_old_file() {
    let a = Agent::start();
    let Some(fs) = SmallFs::new(&a) else {
        eprintln!("SKIPPED: no small filesystem to fill here (no mount, no small /dev/shm)");
        return;
    };
    let f = fs.dir.join("keep.bin");
    std::fs::write(&f, b"old").unwrap();
    let before = fs.free();
    let too_big = (before + (4 << 20)) as usize;
    let path = f.to_str().unwrap().to_string();
    let r = a.request(
        "POST",
        &format!("/files?path={path}"),
        &[OCTET],
        &vec![5u8; too_big],
    );
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("colima-e2b-reason"), Some("storage_full"));
    assert_eq!(std::fs::read(&f).unwrap(), b"old");
    assert!(leftovers(&fs.dir).is_empty(), "{:?}", leftovers(&fs.dir));
    // The space the partial file took is free again.
    assert!(
        eventually(|| fs.free() >= before),
        "{} < {before}",
        fs.free()
    );
    let (ct, body) = multipart(&[(path.as_str(), &vec![6u8; too_big])]);
    let r = a.request("POST", "/files", &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 507);
    assert_eq!(std::fs::read(&f).unwrap(), b"old");
    assert!(leftovers(&fs.dir).is_empty());
}

// ------------------------------------------------------------ permissions

#[test]
fn permission_errors_are_403_on_files_and_permission_denied_on_rpcs() {
    use std::os::unix::fs::PermissionsExt;
    let a = Agent::start();
    if my_id("-u") != 0 {
        // Not root: the agent acts as the test's own user only, who owns everything here;
        // /root is the one place it surely may not write.
        let r = a.request(
            "POST",
            "/files?path=/root/agent-test-denied",
            &[OCTET],
            b"x",
        );
        assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
        return;
    }
    // alice (uid 4242) against root's private files.
    let private = a.home.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("f"), b"root only").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(a.home.join("secret"), b"s").unwrap();
    std::fs::set_permissions(
        a.home.join("secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let alice = [("Authorization", "Basic YWxpY2U6")];

    let rest = |method: &str, url: &str, body: &[u8]| {
        let r = a.request(method, url, &[OCTET], body);
        assert_eq!(
            r.status,
            403,
            "{method} {url}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], 403);
    };
    rest("GET", "/files?path=secret&username=alice", b"");
    rest("GET", "/files?path=private/f&username=alice", b"");
    rest("POST", "/files?path=private/new&username=alice", b"x");
    rest(
        "POST",
        "/files?path=/root/agent-test-denied&username=alice",
        b"x",
    );
    let (ct, body) = multipart(&[("private/new2", b"x")]);
    let r = a.request(
        "POST",
        "/files?username=alice",
        &[("Content-Type", &ct)],
        &body,
    );
    assert_eq!(r.status, 403);
    assert!(!std::path::Path::new("/root/agent-test-denied").exists());

    let rpc = |method: &str, req: Value| {
        let r = a.request(
            "POST",
            &format!("/filesystem.Filesystem/{method}"),
            &[("Content-Type", "application/json"), alice[0]],
            req.to_string().as_bytes(),
        );
        assert_eq!(
            r.status,
            403,
            "{method} {req}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "permission_denied");
    };
    rpc("Stat", json!({"path": "private/f"}));
    rpc("ListDir", json!({"path": "private"}));
    rpc("MakeDir", json!({"path": "private/sub"}));
    rpc("Remove", json!({"path": "private/f"}));
    rpc(
        "Move",
        json!({"source": "private/f", "destination": "moved"}),
    );
    rpc("CreateWatcher", json!({"path": "private"}));
    let c = a
        .stream(
            "filesystem.Filesystem/WatchDir",
            json!({"path": "private"}),
            &alice,
        )
        .collect();
    assert_eq!(
        c.trailer["error"]["code"], "permission_denied",
        "{}",
        c.trailer
    );
    assert_eq!(std::fs::read(private.join("f")).unwrap(), b"root only");
    assert!(!a.home.join("moved").exists());
}

// ------------------------------------------------------------ answers that fit

#[test]
fn a_listing_larger_than_the_largest_answer_is_refused_with_advice() {
    let a = Agent::start();
    let big = a.home.join("big");
    std::fs::create_dir_all(big.join("sub")).unwrap();
    std::fs::write(big.join("sub/only"), b"").unwrap();
    let long = "n".repeat(200);
    for i in 0..30_000 {
        std::fs::File::create(big.join(format!("{long}{i:06}"))).unwrap();
    }
    let r = a.request(
        "POST",
        "/filesystem.Filesystem/ListDir",
        &[("Content-Type", "application/json")],
        json!({"path": "big", "depth": 1}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 429, "{} bytes", r.body.len());
    assert_eq!(r.header("colima-e2b-reason"), Some("too_large"));
    let v = r.json();
    assert_eq!(v["code"], "resource_exhausted");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("16 MiB") && msg.contains("smaller depth or a deeper path"),
        "{msg}"
    );
    // A deeper path still lists.
    let (s, v) = a.rpc("filesystem.Filesystem/ListDir", json!({"path": "big/sub"}));
    assert_eq!(s, 200);
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
}

// ------------------------------------------------------------ signed /files URLs

/// E2B's v1 signature, computed here independently of the agent.
fn sign(path: &str, op: &str, user: &str, exp: Option<i64>) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut raw = format!("{path}:{op}:{user}:{SECRET}");
    if let Some(e) = exp {
        raw.push_str(&format!(":{e}"));
    }
    let digest = sha2::Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Percent-encodes a query value (everything but unreserved characters).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/files?...` with the given (unencoded) query parameters.
fn files_url(params: &[(&str, &str)]) -> String {
    let q: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", pct(v)))
        .collect();
    format!("/files?{}", q.join("&"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const OCTET: (&str, &str) = ("Content-Type", "application/octet-stream");

#[test]
fn signed_urls_download_and_upload_without_token() {
    let a = Agent::start();
    std::fs::write(a.home.join("hello world.txt"), b"hi there").unwrap();

    // Download, as the SDK does for the default user: no username, signed with "".
    let p = "hello world.txt";
    let url = files_url(&[("path", p), ("signature", &sign(p, "read", "", None))]);
    let r = a.request_no_auth("GET", &url, &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, b"hi there");

    // With a username and an expiration in the future.
    let exp = now() + 600;
    let url = files_url(&[
        ("path", p),
        ("username", "user"),
        ("signature", &sign(p, "read", "user", Some(exp))),
        ("signature_expiration", &exp.to_string()),
    ]);
    let r = a.request_no_auth("GET", &url, &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, b"hi there");

    // Raw upload.
    let up = "up/new.txt";
    let url = files_url(&[("path", up), ("signature", &sign(up, "write", "", None))]);
    let r = a.request_no_auth("POST", &url, &[OCTET], b"uploaded");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::read(a.home.join(up)).unwrap(), b"uploaded");

    // Multipart upload: the signed path wins over the part's filename.
    let (ct, body) = multipart(&[("elsewhere.txt", b"form data")]);
    let r = a.request_no_auth("POST", &url, &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::read(a.home.join(up)).unwrap(), b"form data");
    assert!(!a.home.join("elsewhere.txt").exists());

    // A second part would write a path the URL did not sign.
    let (ct, body) = multipart(&[("one.txt", b"1"), ("two.txt", b"2")]);
    let r = a.request_no_auth("POST", &url, &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 401);
    assert!(!a.home.join("two.txt").exists());

    // The token still works on its own, and a wrong one does not spoil a valid signature.
    let r = a.request("GET", &files_url(&[("path", p)]), &[], b"");
    assert_eq!(r.status, 200);
    let url = files_url(&[("path", p), ("signature", &sign(p, "read", "", None))]);
    let r = a.request_no_auth("GET", &url, &[("X-Access-Token", "wrong")], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn signed_urls_grant_only_their_path_operation_user_and_time() {
    let a = Agent::start();
    std::fs::write(a.home.join("a.txt"), b"a").unwrap();
    std::fs::write(a.home.join("b.txt"), b"b").unwrap();
    let refused = |method: &str, url: &str, msg: &str| {
        let r = a.request_no_auth(method, url, &[OCTET], b"x");
        assert_eq!(r.status, 401, "{method} {url}");
        let v = r.json();
        assert_eq!(v["code"], 401, "{v}");
        assert!(v["message"].as_str().unwrap().contains(msg), "{v}");
    };

    // Wrong signature, and none at all.
    let bad = sign("a.txt", "read", "", None).replace("v1_", "v1_x");
    refused(
        "GET",
        &files_url(&[("path", "a.txt"), ("signature", &bad)]),
        "invalid signature",
    );
    refused("GET", &files_url(&[("path", "a.txt")]), "access token");

    // Signed for a.txt, used for b.txt (and for an equivalent spelling of a.txt).
    let sig_a = sign("a.txt", "read", "", None);
    for other in ["b.txt", "./a.txt"] {
        refused(
            "GET",
            &files_url(&[("path", other), ("signature", &sig_a)]),
            "invalid signature",
        );
    }

    // Read signature used to write, write signature used to read.
    refused(
        "POST",
        &files_url(&[("path", "a.txt"), ("signature", &sig_a)]),
        "invalid signature",
    );
    let sig_w = sign("a.txt", "write", "", None);
    refused(
        "GET",
        &files_url(&[("path", "a.txt"), ("signature", &sig_w)]),
        "invalid signature",
    );
    assert_eq!(std::fs::read(a.home.join("a.txt")).unwrap(), b"a");

    // Signed for the default user, used for another user.
    refused(
        "GET",
        &files_url(&[
            ("path", "a.txt"),
            ("username", "root"),
            ("signature", &sig_a),
        ]),
        "invalid signature",
    );

    // Expired; and dropping the expiration does not revive it.
    let exp = now() - 5;
    let sig_exp = sign("a.txt", "read", "", Some(exp));
    refused(
        "GET",
        &files_url(&[
            ("path", "a.txt"),
            ("signature", &sig_exp),
            ("signature_expiration", &exp.to_string()),
        ]),
        "expired",
    );
    refused(
        "GET",
        &files_url(&[("path", "a.txt"), ("signature", &sig_exp)]),
        "invalid signature",
    );

    // A signed query grants nothing on other endpoints.
    let q = format!("path=a.txt&signature={}", pct(&sig_a));
    assert_eq!(
        a.request_no_auth("GET", &format!("/envs?{q}"), &[], b"")
            .status,
        401
    );
    let r = a.request_no_auth(
        "POST",
        &format!("/filesystem.Filesystem/Stat?{q}"),
        &[("Content-Type", "application/json")],
        br#"{"path":"a.txt"}"#,
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "unauthenticated");
}

/// Queries produced by the real e2b 2.63.0 Python SDK (`Sandbox.download_url` /
/// `upload_url`, envd 0.5.7, token `test-secret-0123456789`; `time.time` fixed so the
/// expirations are 2100-01-01 and 2023-11-14).
#[test]
fn signed_urls_from_the_python_sdk_work() {
    const DOWNLOAD: &str =
        "/files?path=hello%20sdk.txt&signature=v1_Qf4Y%2Fhqq6C0BuTCmVCSo%2FvU606O38Dn3LrJZiphdFUs";
    const UPLOAD: &str = "/files?path=docs%2Fsdk%20upload.txt&signature=v1_R1ehbNa4LOu7XWlANkjIRAQzXgY%2BlWzBjLEWiZskn2Y&signature_expiration=4102444800";
    const EXPIRED: &str = "/files?path=hello%20sdk.txt&signature=v1_b0I1cySXoIenqCzyUcogXNCJ4e9y8ymjaD1fuxXDxlc&signature_expiration=1700000060";
    assert_eq!(SECRET, "test-secret-0123456789");
    // Our independent signer agrees with the SDK.
    assert!(DOWNLOAD.ends_with(&pct(&sign("hello sdk.txt", "read", "", None))));

    let a = Agent::start();
    std::fs::write(a.home.join("hello sdk.txt"), b"from sdk").unwrap();
    let r = a.request_no_auth("GET", DOWNLOAD, &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, b"from sdk");

    let (ct, body) = multipart(&[("sdk upload.txt", b"uploaded via sdk url")]);
    let r = a.request_no_auth("POST", UPLOAD, &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(a.home.join("docs/sdk upload.txt")).unwrap(),
        b"uploaded via sdk url"
    );

    let r = a.request_no_auth("GET", EXPIRED, &[], b"");
    assert_eq!(r.status, 401);
    assert!(r.json()["message"].as_str().unwrap().contains("expired"));
}

#[test]
fn without_a_secret_signatures_are_irrelevant() {
    let a = Agent::start_with(None, &[]);
    std::fs::write(a.home.join("f.txt"), b"open").unwrap();
    let r = a.request_no_auth("GET", "/files?path=f.txt&signature=v1_bogus", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"open");
}

// ------------------------------------------------------------ envd parity

/// The paths of a ListDir answer, relative to `base`, in the order given.
fn listed(v: &Value, base: &std::path::Path) -> Vec<String> {
    let prefix = format!("{}/", base.display());
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["path"]
                .as_str()
                .unwrap()
                .trim_start_matches(&prefix)
                .to_string()
        })
        .collect()
}

#[test]
fn list_dir_is_a_lexical_depth_first_walk() {
    let a = Agent::start();
    let d = a.home.join("walk");
    for dir in ["b/b1", "a/a1", "c"] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    std::fs::write(d.join("a/a2"), b"").unwrap();
    std::fs::write(d.join("a/a1/deep"), b"").unwrap();
    std::fs::write(d.join("ab"), b"").unwrap();
    let list = |depth: u32| {
        let (s, v) = a.rpc(
            "filesystem.Filesystem/ListDir",
            json!({"path": "walk", "depth": depth}),
        );
        assert_eq!(s, 200, "{v}");
        listed(&v, &d)
    };
    assert_eq!(list(1), ["a", "ab", "b", "c"]);
    assert_eq!(list(2), ["a", "a/a1", "a/a2", "ab", "b", "b/b1", "c"]);
    assert_eq!(
        list(3),
        ["a", "a/a1", "a/a1/deep", "a/a2", "ab", "b", "b/b1", "c"]
    );
}

#[test]
fn symlinks_report_their_target_type_and_resolved_absolute_target() {
    let a = Agent::start();
    let d = a.home.join("links");
    std::fs::create_dir_all(d.join("dir")).unwrap();
    std::fs::write(d.join("file.txt"), b"12345678").unwrap();
    std::os::unix::fs::symlink("file.txt", d.join("to_file")).unwrap();
    std::os::unix::fs::symlink(d.join("dir"), d.join("to_dir")).unwrap();
    // A chain, resolved to its end.
    std::os::unix::fs::symlink("to_file", d.join("to_link")).unwrap();
    std::os::unix::fs::symlink("missing", d.join("broken")).unwrap();
    std::os::unix::fs::symlink("/dev/null", d.join("to_dev")).unwrap();
    let real = std::fs::canonicalize(&d).unwrap();
    let stat = |name: &str| {
        let (s, v) = a.rpc(
            "filesystem.Filesystem/Stat",
            json!({"path": format!("links/{name}")}),
        );
        assert_eq!(s, 200, "{v}");
        v["entry"].clone()
    };
    for (name, kind, target) in [
        ("to_file", "FILE_TYPE_FILE", real.join("file.txt")),
        ("to_link", "FILE_TYPE_FILE", real.join("file.txt")),
        ("to_dir", "FILE_TYPE_DIRECTORY", real.join("dir")),
        ("to_dev", "FILE_TYPE_UNSPECIFIED", "/dev/null".into()),
    ] {
        let e = stat(name);
        assert_eq!(e["type"], kind, "{name}: {e}");
        assert_eq!(e["symlinkTarget"], target.to_str().unwrap(), "{name}: {e}");
        assert_eq!(e["isSymlink"], true, "{name}: {e}");
        // Size and permissions are the link's own.
        assert!(e["permissions"].as_str().unwrap().starts_with('l'), "{e}");
        let link_len = std::fs::read_link(d.join(name)).unwrap().as_os_str().len();
        assert_eq!(e["size"], link_len.to_string(), "{name}: {e}");
    }
    let e = stat("broken");
    assert_eq!(e["type"], "FILE_TYPE_UNSPECIFIED", "{e}");
    assert!(e.get("symlinkTarget").is_none(), "{e}");
    assert_eq!(e["isSymlink"], true);
    let e = stat("file.txt");
    assert_eq!(
        (e["type"].as_str(), e["isSymlink"].as_bool()),
        (Some("FILE_TYPE_FILE"), Some(false))
    );
    assert!(e.get("symlinkTarget").is_none(), "{e}");
    // ListDir describes links the same way, without descending into linked directories.
    let (s, v) = a.rpc(
        "filesystem.Filesystem/ListDir",
        json!({"path": "links", "depth": 2}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        listed(&v, &d),
        ["broken", "dir", "file.txt", "to_dev", "to_dir", "to_file", "to_link"]
    );
    let to_dir = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "to_dir")
        .unwrap();
    assert_eq!(to_dir["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(to_dir["symlinkTarget"], real.join("dir").to_str().unwrap());
}

#[test]
fn an_expired_signed_url_says_signature_is_already_expired() {
    let a = Agent::start();
    std::fs::write(a.home.join("a.txt"), b"a").unwrap();
    let exp = now() - 5;
    for (method, op) in [("GET", "read"), ("POST", "write")] {
        let url = files_url(&[
            ("path", "a.txt"),
            ("signature", &sign("a.txt", op, "", Some(exp))),
            ("signature_expiration", &exp.to_string()),
        ]);
        let r = a.request_no_auth(method, &url, &[OCTET], b"x");
        assert_eq!(r.status, 401);
        assert_eq!(
            r.json(),
            json!({"code": 401, "message": "signature is already expired"})
        );
    }
    assert_eq!(std::fs::read(a.home.join("a.txt")).unwrap(), b"a");
}

#[test]
fn a_write_creates_missing_parents_the_user_could_not_and_hands_them_over() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let a = Agent::start();
    if my_id("-u") != 0 {
        eprintln!("SKIPPED: needs root (the agent creates the parents as root)");
        return;
    }
    // Only root may create entries in `locked`; alice writes below it.
    let locked = a.home.join("locked");
    std::fs::create_dir_all(locked.join("existing")).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        locked.join("existing"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let r = a.request(
        "POST",
        "/files?path=locked/new/sub/x.txt&username=alice",
        &[OCTET],
        b"hello",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for dir in ["locked/new", "locked/new/sub"] {
        let md = std::fs::metadata(a.home.join(dir)).unwrap();
        assert_eq!((md.uid(), md.gid()), (ALICE, ALICE), "{dir}");
        assert_eq!(md.mode() & 0o777, 0o755, "{dir}");
    }
    let f = std::fs::metadata(a.home.join("locked/new/sub/x.txt")).unwrap();
    assert_eq!(f.uid(), ALICE, "the file is written as the user");
    // Directories that existed keep their owner.
    assert_eq!(std::fs::metadata(&locked).unwrap().uid(), 0);
    let r = a.request(
        "POST",
        "/files?path=locked/existing/y/z.txt&username=alice",
        &[OCTET],
        b"z",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::metadata(locked.join("existing")).unwrap().uid(), 0);
    assert_eq!(
        std::fs::metadata(locked.join("existing/y")).unwrap().uid(),
        ALICE
    );
    // The file itself still needs the user's permission.
    let r = a.request(
        "POST",
        "/files?path=locked/not-hers.txt&username=alice",
        &[OCTET],
        b"x",
    );
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // A parent that is a file is an error, not a directory made over it.
    std::fs::write(a.home.join("plain"), b"").unwrap();
    let r = a.request("POST", "/files?path=plain/x", &[OCTET], b"x");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
}

/// Sends a whole request (the body must go through: the agent reads it all), then reads
/// the answer; panics if the agent stopped reading the body (EPIPE, reset).
fn send_fully(a: &Agent, head: &str, body: &[u8]) -> (u16, Value) {
    let s = a.connect();
    let mut w = s.try_clone().unwrap();
    w.write_all(head.as_bytes()).unwrap();
    for chunk in body.chunks(1 << 20) {
        if let Err(e) = w.write_all(chunk) {
            panic!("the agent stopped reading the body: {e} ({head:?})");
        }
    }
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn errors_decided_before_a_big_body_is_read_still_reach_the_client() {
    let a = Agent::start();
    let big = vec![b'x'; 20 << 20];
    let (ct, multi) = multipart(&[("/proc/nope/x", &big)]);
    let raw = |url: &str, extra: &str| {
        format!(
            "POST {url} HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            big.len()
        )
    };
    let token = format!("X-Access-Token: {SECRET}\r\n");
    let cases: Vec<(&str, String, &[u8], u16)> = vec![
        ("no token", raw("/files?path=f", ""), &big, 401),
        (
            "bad signature",
            raw("/files?path=f&signature=v1_bogus", ""),
            &big,
            401,
        ),
        (
            "unknown user",
            raw("/files?path=f&username=mallory", &token),
            &big,
            401,
        ),
        (
            "unsupported encoding",
            raw("/files?path=f", &format!("{token}Content-Encoding: br\r\n")),
            &big,
            415,
        ),
        ("no path", raw("/files", &token), &big, 400),
        (
            "bad metadata",
            raw("/files?path=f", &format!("{token}X-Metadata-K: caf\u{e9}\r\n")),
            &big,
            400,
        ),
        (
            "writer fails at once",
            raw("/files?path=/proc/nope/x", &token),
            &big,
            404,
        ),
        (
            "multipart writer fails at once",
            format!(
                "POST /files HTTP/1.1\r\nHost: a\r\n{token}Content-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                multi.len()
            ),
            &multi,
            404,
        ),
    ];
    for (why, head, body, want) in cases {
        let (status, v) = send_fully(&a, &head, body);
        assert_eq!(status, want, "{why}: {v}");
        assert_eq!(v["code"], want, "{why}: {v}");
    }
    assert!(!a.home.join("f").exists());
}

#[test]
fn upload_metadata_is_stored_as_xattrs_shown_everywhere_and_replaced_on_overwrite() {
    let a = Agent::start();
    let f = a.home.join("md.txt");
    let up = |headers: &[(&str, &str)]| {
        let mut h = vec![OCTET];
        h.extend_from_slice(headers);
        let r = a.request("POST", "/files?path=md.txt", &h, b"data");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()[0].clone()
    };
    let info = up(&[
        ("X-Metadata-Author", "mish"),
        ("x-metadata-purpose", "up load"),
    ]);
    if info.get("metadata").is_none() {
        eprintln!("SKIPPED: {} keeps no extended attributes", a.home.display());
        return;
    }
    let want = json!({"author": "mish", "purpose": "up load"});
    assert_eq!(info["metadata"], want, "{info}");
    assert_eq!(
        (info["type"].as_str(), info["name"].as_str()),
        (Some("file"), Some("md.txt"))
    );
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(&f, "user.e2b.author", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"mish");
    let (_, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "md.txt"}));
    assert_eq!(v["entry"]["metadata"], want, "{v}");
    let (_, v) = a.rpc("filesystem.Filesystem/ListDir", json!({"path": "."}));
    let listed = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "md.txt")
        .cloned()
        .unwrap();
    assert_eq!(listed["metadata"], want);
    // Foreign user.* attributes are not metadata, and survive an overwrite.
    rustix::fs::setxattr(&f, "user.other", b"x", rustix::fs::XattrFlags::empty()).unwrap();
    // An overwrite replaces the whole set...
    let info = up(&[("X-Metadata-Author", "alice")]);
    assert_eq!(info["metadata"], json!({"author": "alice"}));
    let (_, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "md.txt"}));
    assert_eq!(v["entry"]["metadata"], json!({"author": "alice"}), "{v}");
    // ...even with no metadata at all.
    let info = up(&[]);
    assert!(info.get("metadata").is_none(), "{info}");
    let (_, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": "md.txt"}));
    assert!(v["entry"].get("metadata").is_none(), "{v}");
    // Multipart: the same set on every file; Move keeps it.
    let (ct, body) = multipart(&[("m1.txt", b"1"), ("m2.txt", b"2")]);
    let r = a.request(
        "POST",
        "/files",
        &[("Content-Type", &ct), ("X-Metadata-Tag", "both")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for e in r.json().as_array().unwrap() {
        assert_eq!(e["metadata"], json!({"tag": "both"}), "{e}");
    }
    let (_, v) = a.rpc(
        "filesystem.Filesystem/Move",
        json!({"source": "m1.txt", "destination": "moved/m1.txt"}),
    );
    assert_eq!(v["entry"]["metadata"], json!({"tag": "both"}), "{v}");
    // Bad values are refused and change nothing.
    let r = a.request(
        "POST",
        "/files?path=md.txt",
        &[OCTET, ("X-Metadata-K", "tab\there")],
        b"new",
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let big = "v".repeat(5000);
    let r = a.request(
        "POST",
        "/files?path=md.txt",
        &[OCTET, ("X-Metadata-K", &big)],
        b"new",
    );
    assert_eq!(r.status, 400);
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
}

#[test]
fn metadata_is_skipped_where_the_filesystem_keeps_no_xattrs() {
    // /proc keeps no user attributes: reading gives none, and never an error.
    let a = Agent::start();
    let (s, v) = a.rpc(
        "filesystem.Filesystem/Stat",
        json!({"path": "/proc/self/status"}),
    );
    assert_eq!(s, 200, "{v}");
    assert!(v["entry"].get("metadata").is_none(), "{v}");
}

#[test]
fn watch_events_carry_the_entry_when_asked_and_it_still_exists() {
    let a = Agent::start();
    std::fs::create_dir_all(a.home.join("we")).unwrap();
    for include in [true, false] {
        let mut s = a.stream(
            "filesystem.Filesystem/WatchDir",
            json!({"path": "we", "includeEntry": include, "allowNetworkMounts": include}),
            &[],
        );
        let (_, first) = s.next().unwrap();
        assert!(first.get("start").is_some(), "{first}");
        let r = a.request(
            "POST",
            "/files?path=we/f.txt",
            &[OCTET, ("X-Metadata-K", "v")],
            b"1",
        );
        assert_eq!(r.status, 200);
        // The file's own event first, while it exists (an entry is read when the event
        // is, so removing the file before would race with it).
        let appeared = loop {
            let (flags, v) = s.next().expect("event");
            assert_eq!(flags, 0, "{v}");
            match v.get("filesystem") {
                Some(fs) if fs["name"] == "f.txt" && fs["type"] != "EVENT_TYPE_REMOVE" => {
                    break fs.clone()
                }
                _ => continue,
            }
        };
        if include {
            // The rename into place creates f.txt: its entry is the finished file's.
            let e = appeared.get("entry").expect("an event with the entry");
            assert_eq!(e["name"], "f.txt");
            assert_eq!(e["type"], "FILE_TYPE_FILE");
            assert_eq!(e["path"], a.home.join("we/f.txt").to_str().unwrap());
        } else {
            assert!(appeared.get("entry").is_none(), "{appeared}");
        }
        std::fs::remove_file(a.home.join("we/f.txt")).unwrap();
        loop {
            let (flags, v) = s.next().expect("event");
            assert_eq!(flags, 0, "{v}");
            let Some(fs) = v.get("filesystem") else {
                continue;
            };
            if fs["name"] == "f.txt" && fs["type"] == "EVENT_TYPE_REMOVE" {
                assert!(
                    fs.get("entry").is_none(),
                    "a removed path has no entry: {fs}"
                );
                break;
            }
        }
    }
    // The polling variant too.
    let (s, v) = a.rpc(
        "filesystem.Filesystem/CreateWatcher",
        json!({"path": "we", "includeEntry": true}),
    );
    assert_eq!(s, 200, "{v}");
    let id = v["watcherId"].as_str().unwrap().to_string();
    std::fs::write(a.home.join("we/p.txt"), b"x").unwrap();
    let mut events = Vec::new();
    assert!(
        eventually(|| {
            let (_, v) = a.rpc(
                "filesystem.Filesystem/GetWatcherEvents",
                json!({"watcherId": id}),
            );
            events.extend(v["events"].as_array().cloned().unwrap_or_default());
            events
                .iter()
                .any(|e| e["name"] == "p.txt" && e["entry"]["name"] == "p.txt")
        }),
        "{events:?}"
    );
}

#[test]
fn an_upload_onto_a_bind_mounted_file_replaces_its_metadata_too() {
    // A bind-mounted file (/etc/hosts in a container) cannot be renamed over: the agent
    // copies into it, and must then replace the metadata of that same inode.
    let dir = std::env::temp_dir().join(format!("agent-bind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, target) = (dir.join("src"), dir.join("target"));
    std::fs::write(&src, b"old").unwrap();
    std::fs::write(&target, b"").unwrap();
    let can_mount = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if my_id("-u") != 0 || !can_mount {
        eprintln!("SKIPPED: needs root and unshare --mount");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let (src_s, target_s) = (src.to_str().unwrap(), target.to_str().unwrap());
    let a = Agent::start_wrapped(
        Some(SECRET),
        &[],
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$0\" \"$1\" && shift && exec \"$@\"",
            src_s,
            target_s,
        ],
    );
    let url = files_url(&[("path", target_s)]);
    let r = a.request(
        "POST",
        &url,
        &[OCTET, ("X-Metadata-Tag", "bound"), ("X-Metadata-Old", "1")],
        b"new",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    if r.json()[0].get("metadata").is_none() {
        eprintln!("SKIPPED: {} keeps no extended attributes", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    assert_eq!(r.json()[0]["metadata"], json!({"tag": "bound", "old": "1"}));
    // Outside the agent's mounts, the bound file is `src`: written in place.
    assert_eq!(std::fs::read(&src).unwrap(), b"new");
    let r = a.request(
        "POST",
        &url,
        &[OCTET, ("X-Metadata-Tag", "again")],
        b"newer",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (_, v) = a.rpc("filesystem.Filesystem/Stat", json!({"path": target_s}));
    assert_eq!(v["entry"]["metadata"], json!({"tag": "again"}), "{v}");
    assert_eq!(std::fs::read(&src).unwrap(), b"newer");
    let mut buf = [0u8; 16];
    assert!(rustix::fs::getxattr(&src, "user.e2b.old", &mut buf[..]).is_err());
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}
