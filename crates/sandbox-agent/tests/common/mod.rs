//! Test harness: runs the real agent binary as a host process over a temp dir and talks
//! to it over real HTTP/1.1 with a small hand-written client.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

pub const SECRET: &str = "test-secret-0123456789";
pub const ALICE: u32 = 4242;

pub fn my_id(flag: &str) -> u32 {
    let out = Command::new("id").arg(flag).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Agent {
    pub child: Child,
    pub addr: String,
    pub home: PathBuf,
    pub token: Option<String>,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_with(Some(SECRET), &[])
    }

    pub fn start_with(secret: Option<&str>, extra: &[&str]) -> Agent {
        Self::start_wrapped(secret, extra, &[])
    }

    /// Starts the agent through `wrapper` (a command that ends by exec'ing its arguments,
    /// so the agent keeps its pid), e.g. `unshare` to give it mounts of its own.
    pub fn start_wrapped(secret: Option<&str>, extra: &[&str], wrapper: &[&str]) -> Agent {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let home = std::env::temp_dir().join(format!("sbx-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        // Our own passwd/group: `user` is whoever runs the tests; as root, `alice` is a
        // real other uid so identity switching is exercised too.
        let etc = home.join(".etc");
        std::fs::create_dir_all(&etc).unwrap();
        let (uid, gid) = (my_id("-u"), my_id("-g"));
        std::fs::write(
            etc.join("passwd"),
            format!("root:x:0:0:root:/root:/bin/sh\nuser:x:{uid}:{gid}::/home/user:/bin/sh\nalice:x:{ALICE}:{ALICE}::/home/alice:/bin/sh\n"),
        )
        .unwrap();
        std::fs::write(
            etc.join("group"),
            format!("root:x:0:\nusers:x:{gid}:\nalice:x:{ALICE}:\n"),
        )
        .unwrap();
        let agent = env!("CARGO_BIN_EXE_sandbox-agent");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(agent);
                c
            }
            None => Command::new(agent),
        };
        cmd.args(["--listen", "127.0.0.1:0", "--home-override"])
            .arg(&home)
            .arg("--etc-dir")
            .arg(&etc)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match secret {
            Some(s) => cmd.env("COLIMA_E2B_AGENT_SECRET", s),
            None => cmd.env_remove("COLIMA_E2B_AGENT_SECRET"),
        };
        let mut child = cmd.spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .expect("listening line")
            .to_string();
        assert!(
            addr.starts_with("127.0.0.1:"),
            "unexpected first line {line:?}"
        );
        // Keep draining stderr so the agent never blocks on it.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = err.read_to_end(&mut sink);
        });
        Agent {
            child,
            addr,
            home,
            token: secret.map(str::to_string),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }

    fn auth_headers(&self) -> Vec<(String, String)> {
        match &self.token {
            Some(t) => vec![("X-Access-Token".into(), t.clone())],
            None => vec![],
        }
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s
    }

    /// One request with a complete body; returns (status, headers, body).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let mut all = self.auth_headers();
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        raw_request(&self.connect(), method, path, &all, body)
    }

    /// A request without the access token.
    pub fn request_no_auth(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let all: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        raw_request(&self.connect(), method, path, &all, body)
    }

    /// Unary Connect call.
    pub fn rpc(&self, method: &str, req: Value) -> (u16, Value) {
        let r = self.request(
            "POST",
            &format!("/{method}"),
            &[("Content-Type", "application/json")],
            req.to_string().as_bytes(),
        );
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// Opens a server stream (the request body is sent chunked, like the SDK does).
    pub fn stream(&self, method: &str, req: Value, headers: &[(&str, &str)]) -> EventStream {
        let s = self.connect();
        let mut w = s.try_clone().unwrap();
        let mut head = format!(
            "POST /{method} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\nTransfer-Encoding: chunked\r\n",
            self.addr
        );
        for (k, v) in self.auth_headers() {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let payload = req.to_string();
        let mut env = vec![0u8];
        env.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        env.extend_from_slice(payload.as_bytes());
        w.write_all(head.as_bytes()).unwrap();
        // The agent may answer (and close) before reading a rejected body.
        let _ = w.write_all(format!("{:x}\r\n", env.len()).as_bytes());
        let _ = w.write_all(&env);
        let _ = w.write_all(b"\r\n0\r\n\r\n");
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r);
        let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let buf = if chunked {
            Vec::new()
        } else {
            read_body(&mut r, &headers)
        };
        EventStream {
            r,
            status,
            headers,
            chunk_left: 0,
            done: !chunked,
            buf,
        }
    }

    /// Starts `sh -c script` and returns its event stream.
    pub fn start_sh(&self, script: &str, extra: Value, headers: &[(&str, &str)]) -> EventStream {
        let mut req = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}});
        if let (Some(m), Some(e)) = (req.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        self.stream("process.Process/Start", req, headers)
    }

    pub fn metrics(&self) -> Value {
        let r = self.request("GET", "/metrics", &[], b"");
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).unwrap()
    }

    pub fn list_pids(&self) -> Vec<u64> {
        let (s, v) = self.rpc("process.Process/List", json!({}));
        assert_eq!(s, 200, "{v}");
        v["processes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first: the agent then stops its commands (they run in their own sessions).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..40 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

pub fn raw_request(
    s: &TcpStream,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Resp {
    let mut w = s.try_clone().unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    w.write_all(head.as_bytes()).unwrap();
    let _ = w.write_all(body);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers);
    Resp {
        status,
        headers,
        body,
    }
}

pub fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

pub fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    if header(headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let n = usize::from_str_radix(l.trim(), 16).unwrap_or(0);
            if n == 0 {
                let mut end = String::new();
                let _ = r.read_line(&mut end);
                break;
            }
            let mut chunk = vec![0u8; n];
            r.read_exact(&mut chunk).unwrap();
            out.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).unwrap();
        }
    } else if let Some(len) =
        header(headers, "content-length").and_then(|v| v.parse::<usize>().ok())
    {
        out.resize(len, 0);
        r.read_exact(&mut out).unwrap();
    } else {
        let _ = r.read_to_end(&mut out);
    }
    out
}

/// A streaming response read envelope by envelope.
pub struct EventStream {
    r: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunk_left: usize,
    done: bool,
    buf: Vec<u8>,
}

impl EventStream {
    /// Reads up to n body bytes (None at end of body).
    fn read_some(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        if self.chunk_left == 0 {
            let mut l = String::new();
            if self.r.read_line(&mut l).ok()? == 0 {
                self.done = true;
                return None;
            }
            if l.trim().is_empty() {
                l.clear();
                self.r.read_line(&mut l).ok()?;
            }
            let n = usize::from_str_radix(l.trim(), 16).ok()?;
            if n == 0 {
                self.done = true;
                return None;
            }
            self.chunk_left = n;
        }
        let mut b = vec![0u8; self.chunk_left.min(256 << 10)];
        let n = self.r.read(&mut b).ok()?;
        if n == 0 {
            self.done = true;
            return None;
        }
        self.chunk_left -= n;
        b.truncate(n);
        if self.chunk_left == 0 {
            let mut crlf = [0u8; 2];
            let _ = self.r.read_exact(&mut crlf);
        }
        Some(b)
    }

    /// Next envelope: (flags, JSON).
    pub fn next(&mut self) -> Option<(u8, Value)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    let v = serde_json::from_slice(&self.buf[5..5 + len]).unwrap_or(Value::Null);
                    self.buf.drain(..5 + len);
                    return Some((flags, v));
                }
            }
            let b = self.read_some()?;
            self.buf.extend_from_slice(&b);
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Reads events until the end of the stream.
    pub fn collect(mut self) -> Collected {
        let mut c = Collected::default();
        while let Some((flags, v)) = self.next() {
            if flags & 2 != 0 {
                c.trailer = v;
                break;
            }
            c.absorb(&v);
        }
        c
    }

    /// The stream's first event must be `start`; returns the pid.
    pub fn expect_start(&mut self) -> u64 {
        let (flags, v) = self.next().expect("start event");
        assert_eq!(flags, 0, "expected a start event, got {v}");
        v["event"]["start"]["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("not a start event: {v}"))
    }
}

#[derive(Default, Debug)]
pub struct Collected {
    pub pid: Option<u64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub end: Option<Value>,
    pub keepalives: usize,
    pub trailer: Value,
}

pub fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

pub fn enc(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Collected {
    pub fn absorb(&mut self, v: &Value) {
        let e = &v["event"];
        if let Some(p) = e["start"]["pid"].as_u64() {
            self.pid = Some(p);
        }
        if let Some(d) = e.get("data") {
            if let Some(s) = d["stdout"].as_str() {
                self.stdout.extend(b64(s));
            }
            if let Some(s) = d["stderr"].as_str() {
                self.stderr.extend(b64(s));
            }
            if let Some(s) = d["pty"].as_str() {
                self.pty.extend(b64(s));
            }
        }
        if e.get("keepalive").is_some() {
            self.keepalives += 1;
        }
        if e.get("end").is_some() {
            self.end = Some(e["end"].clone());
        }
    }

    pub fn exit_code(&self) -> i64 {
        let end = self.end.as_ref().expect("end event");
        end["exitCode"].as_i64().unwrap_or(0)
    }
}

pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Polls `f` until true (bounded number of tries, sleeping between them).
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Reads a pid written by a command into a file under home.
pub fn wait_pid_file(p: &Path) -> u32 {
    assert!(
        eventually(|| std::fs::read_to_string(p).is_ok_and(|s| s.trim().parse::<u32>().is_ok())),
        "pid file {} never appeared",
        p.display()
    );
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

/// Live (non-zombie) descendants of `pid`, read from /proc by parentage.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if matches!(rest.first(), Some(&"Z") | Some(&"X")) {
            continue;
        }
        if let Some(pp) = rest.get(1).and_then(|v| v.parse::<u32>().ok()) {
            parent.insert(p, pp);
        }
    }
    parent
        .keys()
        .copied()
        .filter(|p| {
            let mut cur = *p;
            for _ in 0..4096 {
                match parent.get(&cur) {
                    Some(&pp) if pp == pid => return true,
                    Some(&pp) if pp > 1 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// True inside the sandbox container of deploy/agent-suite-in-container.sh, where the
/// test binary itself is PID 1.
pub fn in_container() -> bool {
    std::process::id() == 1
}

/// A cgroup file of this process's own cgroup (v2, or the v1 `controller` hierarchy).
pub fn own_cgroup_file(controller: &str, file: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let rel = path.trim_start_matches('/');
        let dir = if id == "0" && ctrls.is_empty() {
            Path::new("/sys/fs/cgroup").join(rel)
        } else if ctrls.split(',').any(|c| c == controller) {
            Path::new("/sys/fs/cgroup").join(ctrls).join(rel)
        } else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(dir.join(file)) {
            return Some(s.trim().to_string());
        }
    }
    // A container sees its own cgroup at the hierarchy's root.
    [
        format!("/sys/fs/cgroup/{controller}/{file}"),
        format!("/sys/fs/cgroup/{file}"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|s| s.trim().to_string())
}

/// SIGKILLs the command `pid` through the API; returns the HTTP status.
pub fn kill(a: &Agent, pid: u64) -> u16 {
    a.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .0
}

/// A directory of its own under the temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("sbx-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Files under `dir` that process `pid` holds open (spill files have no name: their
/// links read `<dir>/#<inode> (deleted)`).
pub fn open_files_under(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| t.starts_with(dir))
                .count()
        })
        .unwrap_or(0)
}

/// Polls `f` until true or `limit` has passed.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
