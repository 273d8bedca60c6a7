//! The per-command supervisor: the agent binary re-executed (`/proc/self/exe`) in a hidden
//! mode, one per command, as root when the agent is root (so a non-root command cannot
//! signal it).
//!
//! It makes itself a child subreaper, starts the real command exactly as the agent used to
//! (own session, the pty as controlling terminal, the user's credentials, cwd, env),
//! reports the command's pid and later its exit status to the agent, reaps every orphan,
//! and lives until the last of its descendants is gone. Every process the command starts,
//! however it forks, setsids or clears its environment, re-parents to the supervisor
//! when its parent dies, so the command's whole tree is always the supervisor's
//! descendants ([`crate::tree`] kills them by that), and the supervisor's end tells the
//! agent that nothing of the command is left.
//!
//! The agent talks to it over a socket pair handed over as a numbered descriptor: first
//! the agent sends the spec (length-prefixed fields, so nothing of the command shows in
//! the supervisor's argv or environment, which stays empty), then the supervisor answers
//! with lines: `pid N`, or `error ERRNO MESSAGE` when the command could not start; then
//! `exit code N` or `exit signal N`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rustix::io::{Errno, FdFlags};
use rustix::process::{Gid, Uid, WaitOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::sys::{self, Creds, ExitKind};
use envd_proto::{Code, EnvdError, Reason};

/// First argument that selects the supervisor mode of the agent binary.
pub const SUPERVISE_ARG: &str = "__colima-e2b-supervise";
/// Largest spec a supervisor reads (args and env are bounded by the request cap anyway).
const MAX_SPEC: u64 = 32 << 20;
/// Longest status line.
const MAX_LINE: u64 = 512;
/// How long the agent waits for a supervisor to start its command.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the supervisor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Executable (looked up in the command's PATH).
    pub program: OsString,
    /// Arguments.
    pub args: Vec<OsString>,
    /// The command's whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Credentials to switch to, when the agent is root and the user is not.
    pub creds: Option<Creds>,
    /// Stdin is a pty slave that becomes the controlling terminal.
    pub pty: bool,
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(field);
}

impl Spec {
    /// The wire form: every field length-prefixed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put(&mut out, self.program.as_bytes());
        put(&mut out, self.cwd.as_os_str().as_bytes());
        put(&mut out, if self.pty { b"1" } else { b"0" });
        let creds = self.creds.as_ref().map_or(String::new(), |c| {
            let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
            format!("{}:{}:{}", c.uid, c.gid, groups.join(","))
        });
        put(&mut out, creds.as_bytes());
        put(&mut out, self.args.len().to_string().as_bytes());
        for a in &self.args {
            put(&mut out, a.as_bytes());
        }
        for (k, v) in &self.env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            put(&mut out, &kv);
        }
        out
    }

    /// Reads the wire form back.
    pub fn decode(mut b: &[u8]) -> Option<Spec> {
        let mut next = || -> Option<Vec<u8>> {
            let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
            let field = b.get(4..4 + len)?.to_vec();
            b = &b[4 + len..];
            Some(field)
        };
        let program = OsString::from_vec(next()?);
        let cwd = PathBuf::from(OsString::from_vec(next()?));
        let pty = next()? == b"1";
        let creds_raw = String::from_utf8(next()?).ok()?;
        let creds = if creds_raw.is_empty() {
            None
        } else {
            let mut f = creds_raw.splitn(3, ':');
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            let groups = f
                .next()?
                .split(',')
                .filter(|g| !g.is_empty())
                .map(|g| g.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some(Creds { uid, gid, groups })
        };
        let nargs: usize = String::from_utf8(next()?).ok()?.parse().ok()?;
        let mut args = Vec::new();
        for _ in 0..nargs {
            args.push(OsString::from_vec(next()?));
        }
        let mut env = Vec::new();
        while let Some(kv) = next() {
            let eq = kv.iter().position(|c| *c == b'=')?;
            env.push((
                OsString::from_vec(kv[..eq].to_vec()),
                OsString::from_vec(kv[eq + 1..].to_vec()),
            ));
        }
        Some(Spec {
            program,
            args,
            env,
            cwd,
            creds,
            pty,
        })
    }
}

// ------------------------------------------------------------------ agent side

/// The error for a fork that failed at the pids limit: names the limit where readable.
pub fn process_limit_error(what: &str) -> EnvdError {
    let limit = sys::pids_limit().map_or(String::new(), |n| format!(" ({n})"));
    EnvdError::new(
        Code::ResourceExhausted,
        format!("cannot start {what}: the sandbox's process limit{limit} is reached"),
    )
    .with_reason(Reason::ProcessLimit)
}

fn start_error(program: &OsString, errno: i32, message: &str) -> EnvdError {
    let what = format!("{:?}", program.to_string_lossy());
    if errno == Errno::AGAIN.raw_os_error() {
        process_limit_error(&what)
    } else {
        // A missing or non-executable command is the caller's mistake, as envd says.
        EnvdError::new(
            Code::InvalidArgument,
            format!("cannot start {what}: {message}"),
        )
    }
}

/// A started command: its supervisor, its own pid, and the channel its exit comes on.
#[derive(Debug)]
pub struct Supervised {
    /// The supervisor's pid (the agent's child).
    pub supervisor: u32,
    /// The command's pid (what clients see).
    pub pid: u32,
    /// Status lines from the supervisor; EOF once the command's whole tree is gone.
    pub status: StatusLines,
}

/// Status lines from a supervisor.
#[derive(Debug)]
pub struct StatusLines {
    inner: tokio::io::BufReader<tokio::net::UnixStream>,
}

impl StatusLines {
    /// The next line; `None` at EOF (the supervisor exited) or on garbage.
    pub async fn next_line(&mut self) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut line = Vec::new();
        let n = (&mut self.inner)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .ok()?;
        if n == 0 || line.last() != Some(&b'\n') {
            return None;
        }
        String::from_utf8(line)
            .ok()
            .map(|s| s.trim_end().to_string())
    }

    /// Waits for the command's exit line; `None` when the supervisor died without one.
    pub async fn exit(&mut self) -> Option<ExitKind> {
        loop {
            let line = self.next_line().await?;
            let mut f = line.split(' ');
            if f.next() != Some("exit") {
                continue;
            }
            let (kind, n) = (f.next()?, f.next()?.parse().ok()?);
            return Some(match kind {
                "signal" => ExitKind::Signal(n),
                _ => ExitKind::Code(n),
            });
        }
    }

    /// Waits until the supervisor is gone (the command's tree is empty).
    pub async fn closed(&mut self) {
        while self.next_line().await.is_some() {}
    }
}

/// Starts `spec` under a new supervisor. `spawn_lock` serialises every fork of the agent
/// (the reaper holds it too, see `ProcessTable::reap`), which also keeps the handed-over
/// descriptor from leaking into any other child.
/// `on_spawn` learns the supervisor's pid while the lock is still held, before the reaper
/// can see it.
pub async fn launch(
    spec: &Spec,
    stdio: [Stdio; 3],
    spawn_lock: &Mutex<()>,
    on_spawn: impl FnOnce(u32),
) -> Result<Supervised, EnvdError> {
    let internal = |e: io::Error| EnvdError::from_io(&e, "command supervisor channel");
    let (ours, theirs) = UnixStream::pair().map_err(internal)?;
    let [stdin, stdout, stderr] = stdio;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("sandbox-agent-supervisor")
        .arg(SUPERVISE_ARG)
        .arg(theirs.as_raw_fd().to_string())
        .env_clear()
        .current_dir("/")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    let child = {
        let _forks = spawn_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Inherited across exec by this one child only: every fork holds the lock.
        rustix::io::fcntl_setfd(&theirs, FdFlags::empty()).map_err(|e| internal(e.into()))?;
        let r = cmd.spawn();
        drop(theirs);
        if let Ok(c) = &r {
            on_spawn(c.id());
        }
        r
    };
    drop(cmd); // our copies of the command's stdio
    let child = child.map_err(|e| match e.raw_os_error() {
        Some(n) if n == Errno::AGAIN.raw_os_error() => {
            process_limit_error(&format!("{:?}", spec.program.to_string_lossy()))
        }
        _ => EnvdError::from_io(&e, "starting the command supervisor"),
    })?;
    let supervisor = child.id();
    drop(child); // never waited on through std: the agent's reaper collects it
    ours.set_nonblocking(true).map_err(internal)?;
    let mut sock = tokio::net::UnixStream::from_std(ours).map_err(internal)?;
    let first = async {
        sock.write_all(&spec.encode()).await?;
        sock.shutdown().await?;
        io::Result::Ok(())
    };
    // A supervisor that died at once is reported by the first line's absence.
    let _ = tokio::time::timeout(START_TIMEOUT, first).await;
    let mut status = StatusLines {
        inner: tokio::io::BufReader::new(sock),
    };
    let line = tokio::time::timeout(START_TIMEOUT, status.next_line())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut f = line.splitn(3, ' ');
    match (f.next(), f.next(), f.next()) {
        (Some("pid"), Some(pid), _) => match pid.parse() {
            Ok(pid) => Ok(Supervised {
                supervisor,
                pid,
                status,
            }),
            Err(_) => Err(EnvdError::new(Code::Internal, "supervisor sent a bad pid")),
        },
        (Some("error"), Some(errno), msg) => Err(start_error(
            &spec.program,
            errno.parse().unwrap_or(0),
            msg.unwrap_or_default(),
        )),
        _ => Err(EnvdError::new(
            Code::Internal,
            "the command supervisor ended before starting the command",
        )),
    }
}

// ------------------------------------------------------------- supervisor side

/// Runs the supervisor mode (`args` follow [`SUPERVISE_ARG`]); never returns.
pub fn main(args: &[String]) -> ! {
    let code = match supervise(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sandbox-agent supervisor: {e}");
            125
        }
    };
    std::process::exit(code)
}

#[allow(unsafe_code)]
fn supervise(args: &[String]) -> io::Result<()> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    let fd: i32 = args
        .first()
        .and_then(|a| a.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| bad("usage: __colima-e2b-supervise FD"))?;
    let owned = {
        // SAFETY: the agent placed its end of our socket pair at this number for us and
        // nothing else in this fresh process owns it; it is checked to be a socket next.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let st = rustix::fs::fstat(&owned)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Err(bad("descriptor is not the agent's socket"));
    }
    // The command must never inherit it (it could forge our status lines).
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC)?;
    let mut chan = UnixStream::from(owned);
    let mut raw = Vec::new();
    (&mut chan).take(MAX_SPEC).read_to_end(&mut raw)?;
    let spec = Spec::decode(&raw).ok_or_else(|| bad("unreadable spec"))?;
    drop(raw);
    // Our own session: signals to the agent's group or terminal do not reach us.
    let _ = rustix::process::setsid();
    sys::set_child_subreaper()?;

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd);
    let pty = spec.pty;
    let creds = spec.creds.clone().map(|c| {
        let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        (Uid::from_raw(c.uid), Gid::from_raw(c.gid), groups)
    });
    // SAFETY: this process is single-threaded, and the closure only makes raw syscalls
    // through rustix on data prepared before the fork (it does not allocate).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            if pty {
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            }
            if let Some((uid, gid, groups)) = &creds {
                rustix::thread::set_thread_groups(groups)?;
                rustix::thread::set_thread_gid(*gid)?;
                rustix::thread::set_thread_uid(*uid)?;
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            let msg = e.to_string().replace('\n', " ");
            let _ = writeln!(chan, "error {errno} {msg}");
            return Ok(());
        }
    };
    drop(cmd);
    let pid = child.id();
    drop(child);
    let _ = writeln!(chan, "pid {pid}");
    // Let go of the command's stdio, so its pipes and pty end when it does.
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
    }
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((p, status))) => {
                if p.as_raw_nonzero().get().unsigned_abs() == pid {
                    let _ = match ExitKind::from_wait(status) {
                        ExitKind::Code(c) => writeln!(chan, "exit code {c}"),
                        ExitKind::Signal(s) => writeln!(chan, "exit signal {s}"),
                    };
                }
            }
            Ok(None) => {}
            Err(Errno::INTR) => {}
            // ECHILD: the last descendant is gone.
            Err(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_with_odd_bytes() {
        let spec = Spec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo 'a b'\n=x".into(), OsString::new()],
            env: vec![
                ("A".into(), "1=2".into()),
                (OsString::from_vec(vec![b'K', 0xff]), OsString::new()),
            ],
            cwd: "/home/user/dir with space".into(),
            creds: Some(Creds {
                uid: 1000,
                gid: 1001,
                groups: vec![1001, 27],
            }),
            pty: true,
        };
        assert_eq!(Spec::decode(&spec.encode()), Some(spec.clone()));
        let plain = Spec {
            creds: None,
            pty: false,
            env: vec![],
            args: vec![],
            ..spec
        };
        assert_eq!(Spec::decode(&plain.encode()), Some(plain.clone()));
        let enc = plain.encode();
        assert_eq!(Spec::decode(&enc[..enc.len() - 1]), None, "truncated spec");
    }

    #[test]
    fn eagain_is_the_process_limit_and_other_errors_are_the_callers() {
        let e = start_error(&"/bin/x".into(), Errno::AGAIN.raw_os_error(), "busy");
        assert_eq!(
            (e.code, e.reason),
            (Code::ResourceExhausted, Some(Reason::ProcessLimit))
        );
        assert!(e.message.contains("process limit"), "{e}");
        if let Some(n) = sys::pids_limit() {
            assert!(e.message.contains(&format!("({n})")), "{e}");
        }
        let e = start_error(
            &"/bin/x".into(),
            Errno::NOENT.raw_os_error(),
            "No such file",
        );
        assert_eq!(e.code, Code::InvalidArgument);
    }
}
