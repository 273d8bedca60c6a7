//! Processes: spawning (own session, optional pty, user switch), output fan-out with
//! bounded buffers, stdin, signals to whole process groups, and PID-1 reaping.
//!
//! Reaping: one SIGCHLD-driven `waitpid(-1)` loop collects every child. Statuses of
//! commands we spawned go to their waiter; anything else (re-parented orphans) is just
//! collected. Spawning holds the same lock as the reaper, so a child that dies at once
//! cannot be reaped before it is registered (nor under std's feet while it checks exec).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::connect::{Code, RpcError};
use crate::proto::{DataEvent, EndEvent, ProcessConfig, ProcessEvent, ProcessInfo};
use crate::sys::{self, AsyncFdIo, ExitKind};
use crate::users::User;

/// Environment variable marking every command's processes, so that children that left
/// the process group (setsid + double fork) can still be found and killed.
pub const MARKER_ENV: &str = "COLIMA_E2B_CMD_ID";
/// Bytes read from a pipe at a time (also the largest data event).
const READ_CHUNK: usize = 32 << 10;
/// Messages queued per subscriber before the producer waits for it (backpressure).
const SUB_QUEUE: usize = 16;
/// After the command exits, how long to keep draining pipes held open by its children.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Ended processes kept so that Connect still yields their end event.
const KEEP_ENDED: usize = 64;
/// How long an ended process is kept.
const KEEP_ENDED_FOR: Duration = Duration::from_secs(300);
/// Output kept for an ended process.
const ENDED_RING: usize = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout pipe.
    Stdout,
    /// stderr pipe.
    Stderr,
    /// pty master.
    Pty,
}

/// One thing a subscriber receives.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Output.
    Data(Stream, Bytes),
    /// The end (always last).
    End(EndEvent),
}

impl Msg {
    /// As a wire event.
    pub fn to_event(&self) -> ProcessEvent {
        match self {
            Msg::Data(Stream::Stdout, b) => ProcessEvent::Data(DataEvent::Stdout(b.to_vec())),
            Msg::Data(Stream::Stderr, b) => ProcessEvent::Data(DataEvent::Stderr(b.to_vec())),
            Msg::Data(Stream::Pty, b) => ProcessEvent::Data(DataEvent::Pty(b.to_vec())),
            Msg::End(e) => ProcessEvent::End(e.clone()),
        }
    }
}

#[derive(Debug, Default)]
struct Out {
    ring: VecDeque<(Stream, Bytes)>,
    ring_bytes: usize,
    /// Bytes evicted from the ring (a late subscriber misses them).
    dropped: u64,
    subs: Vec<mpsc::Sender<Msg>>,
    end: Option<EndEvent>,
}

/// What a new subscriber gets: the buffered past, then live messages.
#[derive(Debug)]
pub struct Subscription {
    /// Buffered output (and the end, if the process already ended).
    pub replay: Vec<Msg>,
    /// Live messages; closed once the process ended.
    pub rx: mpsc::Receiver<Msg>,
    /// Output bytes no longer buffered (truncation flag for reconnecting clients).
    pub dropped: u64,
}

/// A command started through Start.
#[derive(Debug)]
pub struct Proc {
    /// Pid (also its process group and session id).
    pub pid: u32,
    /// Tag given at Start.
    pub tag: Option<String>,
    /// How it was started.
    pub config: ProcessConfig,
    marker: String,
    pty: Option<Arc<AsyncFdIo>>,
    stdin: tokio::sync::Mutex<Option<Arc<AsyncFdIo>>>,
    out: Mutex<Out>,
    ring_cap: usize,
    /// Set when its deadline killed it.
    pub timed_out: AtomicBool,
    exited: watch::Receiver<bool>,
}

impl Proc {
    /// Subscribes to output; with `replay`, the buffered past comes first.
    pub fn subscribe(&self, replay: bool) -> Subscription {
        let (tx, rx) = mpsc::channel(SUB_QUEUE);
        let mut out = lock(&self.out);
        let mut past: Vec<Msg> = if replay {
            out.ring
                .iter()
                .map(|(s, b)| Msg::Data(*s, b.clone()))
                .collect()
        } else {
            Vec::new()
        };
        match &out.end {
            Some(e) => past.push(Msg::End(e.clone())),
            None => out.subs.push(tx),
        }
        Subscription {
            replay: past,
            rx,
            dropped: out.dropped,
        }
    }

    /// True once the end event exists.
    pub fn ended(&self) -> bool {
        lock(&self.out).end.is_some()
    }

    /// The end event, once ended.
    pub fn end_event(&self) -> Option<EndEvent> {
        lock(&self.out).end.clone()
    }

    async fn push(&self, stream: Stream, data: Bytes) {
        let subs = {
            let mut out = lock(&self.out);
            out.ring_bytes += data.len();
            out.ring.push_back((stream, data.clone()));
            while out.ring_bytes > self.ring_cap {
                match out.ring.pop_front() {
                    Some((_, b)) => {
                        out.ring_bytes -= b.len();
                        out.dropped += b.len() as u64;
                    }
                    None => break,
                }
            }
            out.subs.retain(|s| !s.is_closed());
            out.subs.clone()
        };
        // Waiting on slow subscribers throttles the command (its pipe fills up) instead
        // of buffering without bound; a subscriber that went away fails at once.
        for s in subs {
            let _ = s.send(Msg::Data(stream, data.clone())).await;
        }
    }

    async fn finish(&self, end: EndEvent) {
        let subs = {
            let mut out = lock(&self.out);
            out.end = Some(end.clone());
            while out.ring_bytes > ENDED_RING {
                match out.ring.pop_front() {
                    Some((_, b)) => {
                        out.ring_bytes -= b.len();
                        out.dropped += b.len() as u64;
                    }
                    None => break,
                }
            }
            out.ring.shrink_to_fit();
            std::mem::take(&mut out.subs)
        };
        for s in subs {
            let _ = s.send(Msg::End(end.clone())).await;
        }
    }

    /// Signals the whole process group, plus any process carrying our marker that
    /// escaped the group (setsid, double fork).
    pub fn signal(&self, sig: i32) {
        let _ = sys::kill_group(self.pid, sig);
        for pid in find_marked(&self.marker) {
            let _ = sys::kill_pid(pid, sig);
        }
    }

    /// Writes to stdin (pipe) or to the pty.
    pub async fn write_input(&self, to_pty: bool, data: &[u8]) -> Result<(), RpcError> {
        let target = if to_pty {
            self.pty.clone()
        } else {
            match &*self.stdin.lock().await {
                Some(s) => Some(s.clone()),
                None => self.pty.clone(),
            }
        };
        let Some(fd) = target else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                if to_pty {
                    "process has no pty"
                } else {
                    "stdin is closed or was not requested"
                },
            ));
        };
        fd.write_all(data)
            .await
            .map_err(|e| RpcError::new(Code::FailedPrecondition, format!("writing input: {e}")))
    }

    /// Closes stdin (for a pty: sends EOF, ^D).
    pub async fn close_stdin(&self) -> Result<(), RpcError> {
        if self.stdin.lock().await.take().is_some() {
            return Ok(());
        }
        if let Some(p) = &self.pty {
            let _ = p.write_all(&[4]).await;
        }
        Ok(())
    }

    /// Resizes the pty.
    pub fn resize(&self, cols: u32, rows: u32) -> Result<(), RpcError> {
        let Some(p) = &self.pty else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                "process has no pty",
            ));
        };
        sys::set_winsize(p.raw(), clamp16(cols), clamp16(rows))
            .map_err(|e| RpcError::io(&e, "resizing pty"))
    }

    /// List entry.
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: self.config.clone(),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }

    /// Resolves once the process has exited.
    pub async fn wait_exited(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Opens `/proc/<pid>/environ`. Reading another user's environ needs CAP_SYS_PTRACE,
/// which sandboxes do not get; the kernel's check compares the caller's fs ids instead,
/// so on refusal the open is retried with this thread's fs ids set to the process's own.
fn open_environ(pid: u32) -> Option<std::fs::File> {
    let path = format!("/proc/{pid}/environ");
    match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let ids = |key: &str| -> Option<Vec<u32>> {
                let line = status.lines().find(|l| l.starts_with(key))?;
                line[key.len()..]
                    .split_whitespace()
                    .take(3)
                    .map(|v| v.parse().ok())
                    .collect()
            };
            let (uids, gids) = (ids("Uid:")?, ids("Gid:")?);
            // Real, effective and saved ids must all match for the kernel to allow it.
            if uids.windows(2).any(|w| w[0] != w[1]) || gids.windows(2).any(|w| w[0] != w[1]) {
                return None;
            }
            // Synchronous and restored on drop, before this thread runs anything else.
            let _as_owner = sys::FsIdentity::enter(*uids.first()?, *gids.first()?);
            std::fs::File::open(&path).ok()
        }
        Err(_) => None,
    }
}

/// Pids of processes whose initial environment holds `marker` (`NAME=value`).
fn find_marked(marker: &str) -> Vec<u32> {
    use std::io::Read;
    let me = std::process::id();
    let needle = marker.as_bytes();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || pid <= 1 {
            continue;
        }
        let Some(f) = open_environ(pid) else {
            continue;
        };
        let mut buf = Vec::new();
        if f.take(1 << 20).read_to_end(&mut buf).is_err() {
            continue;
        }
        if buf.split(|b| *b == 0).any(|kv| kv == needle) {
            out.push(pid);
        }
    }
    out
}

/// Everything needed to start a command.
#[derive(Debug)]
pub struct SpawnSpec {
    /// What to run.
    pub config: ProcessConfig,
    /// As whom.
    pub user: User,
    /// Resolved working directory.
    pub cwd: PathBuf,
    /// Environment before the request's own envs (agent env, /init envs).
    pub base_env: Vec<(OsString, OsString)>,
    /// Pty size, when a pty is wanted.
    pub pty: Option<(u16, u16)>,
    /// Keep stdin open.
    pub stdin: bool,
    /// Tag.
    pub tag: Option<String>,
    /// Kill the command (SIGKILL, whole group) at this instant.
    pub deadline: Option<Instant>,
}

/// All commands, running and recently ended.
#[derive(Debug)]
pub struct ProcessTable {
    /// Held by the reaper while it collects and by spawn until the child is registered.
    waiters: Mutex<HashMap<u32, oneshot::Sender<i32>>>,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    ended: Mutex<VecDeque<(u32, Instant)>>,
    next_id: AtomicU64,
    ring_cap: usize,
}

impl ProcessTable {
    /// A table keeping up to `ring_cap` output bytes per process.
    pub fn new(ring_cap: usize) -> Self {
        Self {
            waiters: Mutex::new(HashMap::new()),
            procs: Mutex::new(HashMap::new()),
            ended: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
            ring_cap: ring_cap.max(READ_CHUNK),
        }
    }

    /// Collects every terminated child (call on SIGCHLD).
    pub fn reap(&self) {
        let mut w = lock(&self.waiters);
        while let Some((pid, status)) = sys::reap_one() {
            if let Some(tx) = w.remove(&pid) {
                let _ = tx.send(status);
            }
        }
    }

    /// Finds a process by pid or tag (running or recently ended).
    pub fn find(&self, pid: Option<u32>, tag: Option<&str>) -> Result<Arc<Proc>, RpcError> {
        let procs = lock(&self.procs);
        let found = match (pid, tag) {
            (Some(p), _) if p != 0 => procs.get(&p).cloned(),
            (_, Some(t)) => procs
                .values()
                .filter(|p| p.tag.as_deref() == Some(t))
                .max_by_key(|p| (!p.ended(), p.pid))
                .cloned(),
            _ => {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    "process selector needs a pid or a tag",
                ))
            }
        };
        found.ok_or_else(|| {
            RpcError::new(
                Code::NotFound,
                match (pid, tag) {
                    (Some(p), _) if p != 0 => format!("process with pid {p} not found"),
                    (_, t) => format!("process with tag {:?} not found", t.unwrap_or_default()),
                },
            )
        })
    }

    /// Running processes.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut v: Vec<ProcessInfo> = lock(&self.procs)
            .values()
            .filter(|p| !p.ended())
            .map(|p| p.info())
            .collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// Signals every running command (agent shutdown).
    pub fn signal_all(&self, sig: i32) {
        let procs: Vec<Arc<Proc>> = lock(&self.procs).values().cloned().collect();
        for p in procs.iter().filter(|p| !p.ended()) {
            p.signal(sig);
        }
    }

    /// Number of commands not yet ended.
    pub fn running(&self) -> usize {
        lock(&self.procs).values().filter(|p| !p.ended()).count()
    }

    fn forget_old(&self) {
        let mut ended = lock(&self.ended);
        let now = Instant::now();
        let mut procs = lock(&self.procs);
        while let Some((pid, at)) = ended.front().copied() {
            if ended.len() > KEEP_ENDED || now.duration_since(at) > KEEP_ENDED_FOR {
                ended.pop_front();
                if procs.get(&pid).is_some_and(|p| p.ended()) {
                    procs.remove(&pid);
                }
            } else {
                break;
            }
        }
    }

    /// Starts a command; the returned subscription sees all of its output.
    pub fn start(self: &Arc<Self>, spec: SpawnSpec) -> Result<(Arc<Proc>, Subscription), RpcError> {
        self.forget_old();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{MARKER_ENV}={}-{id}", std::process::id());
        let mut cmd = Command::new(&spec.config.cmd);
        cmd.args(&spec.config.args);
        cmd.current_dir(&spec.cwd);
        cmd.env_clear();
        let mut env: BTreeMap<OsString, OsString> = spec.base_env.into_iter().collect();
        env.entry("PATH".into()).or_insert_with(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        env.insert("HOME".into(), spec.user.home.clone().into_os_string());
        env.insert("USER".into(), spec.user.name.clone().into());
        env.insert("LOGNAME".into(), spec.user.name.clone().into());
        env.insert("PWD".into(), spec.cwd.clone().into_os_string());
        if spec.pty.is_some() {
            env.entry("TERM".into())
                .or_insert_with(|| "xterm-256color".into());
        }
        for (k, v) in &spec.config.envs {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!("invalid environment variable {k:?}"),
                ));
            }
            env.insert(k.into(), v.into());
        }
        let (k, v) = marker.split_once('=').unwrap_or((MARKER_ENV, ""));
        env.insert(k.into(), v.into());
        cmd.envs(env);

        let mut pty_master = None;
        let mut stdin_writer = None;
        if let Some((cols, rows)) = spec.pty {
            let (m, s) = sys::openpty(cols, rows).map_err(|e| RpcError::io(&e, "openpty"))?;
            let dup = |s: &OwnedFd| s.try_clone().map_err(|e| RpcError::io(&e, "dup"));
            cmd.stdin(Stdio::from(dup(&s)?));
            cmd.stdout(Stdio::from(dup(&s)?));
            cmd.stderr(Stdio::from(s));
            pty_master = Some(m);
        } else {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stdout(Stdio::piped());
            cmd.stderr(Stdio::piped());
        }
        let creds = spec.user.switch.then(|| sys::Creds {
            uid: spec.user.uid,
            gid: spec.user.gid,
            groups: spec.user.groups.clone(),
        });
        sys::configure_child(&mut cmd, creds, spec.pty.is_some());

        let (exit_tx, exit_rx) = oneshot::channel();
        let mut child = {
            let mut waiters = lock(&self.waiters);
            let child = cmd.spawn().map_err(|e| {
                RpcError::new(
                    Code::InvalidArgument,
                    format!("cannot start {:?}: {e}", spec.config.cmd),
                )
            })?;
            waiters.insert(child.id(), exit_tx);
            child
        };
        drop(cmd); // closes our copies of the pty slave
        let pid = child.id();

        let wrap = |fd: OwnedFd| AsyncFdIo::new(fd).map(Arc::new);
        let mut readers: Vec<(Stream, Arc<AsyncFdIo>)> = Vec::new();
        let pty = match pty_master {
            Some(m) => {
                let m = wrap(m).map_err(|e| RpcError::io(&e, "pty"))?;
                readers.push((Stream::Pty, m.clone()));
                Some(m)
            }
            None => None,
        };
        if let Some(s) = child.stdin.take() {
            stdin_writer = Some(wrap(OwnedFd::from(s)).map_err(|e| RpcError::io(&e, "stdin"))?);
        }
        if let Some(s) = child.stdout.take() {
            readers.push((
                Stream::Stdout,
                wrap(OwnedFd::from(s)).map_err(|e| RpcError::io(&e, "stdout"))?,
            ));
        }
        if let Some(s) = child.stderr.take() {
            readers.push((
                Stream::Stderr,
                wrap(OwnedFd::from(s)).map_err(|e| RpcError::io(&e, "stderr"))?,
            ));
        }
        drop(child); // never waited on through std: the reaper owns exit statuses

        let (exited_tx, exited_rx) = watch::channel(false);
        let proc = Arc::new(Proc {
            pid,
            tag: spec.tag,
            config: spec.config,
            marker,
            pty,
            stdin: tokio::sync::Mutex::new(stdin_writer),
            out: Mutex::new(Out::default()),
            ring_cap: self.ring_cap,
            timed_out: AtomicBool::new(false),
            exited: exited_rx.clone(),
        });
        let sub = proc.subscribe(false);
        lock(&self.procs).insert(pid, proc.clone());

        let mut handles = Vec::new();
        for (stream, fd) in readers {
            handles.push(tokio::spawn(read_output(
                proc.clone(),
                stream,
                fd,
                exited_rx.clone(),
            )));
        }
        if let Some(deadline) = spec.deadline {
            let p = proc.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        p.timed_out.store(true, Ordering::SeqCst);
                        p.signal(libc::SIGKILL);
                    }
                    _ = p.wait_exited() => {}
                }
            });
        }
        let table = self.clone();
        let p = proc.clone();
        tokio::spawn(async move {
            let status = exit_rx.await.unwrap_or(-1);
            let _ = exited_tx.send(true);
            for h in handles {
                let _ = h.await;
            }
            p.stdin.lock().await.take();
            let mut end = end_event(sys::decode_status(status));
            if p.timed_out.load(Ordering::SeqCst) {
                end.error = Some("command timed out (deadline exceeded)".into());
            }
            p.finish(end).await;
            lock(&table.ended).push_back((p.pid, Instant::now()));
        });
        Ok((proc, sub))
    }
}

/// Pumps one output descriptor into the process's subscribers until EOF, or until the
/// command has exited and the pipe stayed quiet for a moment (a background child may
/// hold it open forever).
async fn read_output(
    proc: Arc<Proc>,
    stream: Stream,
    fd: Arc<AsyncFdIo>,
    mut exited: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = exited.wait_for(|e| *e).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::pin!(stop);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = tokio::select! {
            r = fd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = &mut stop => break,
        };
        proc.push(stream, Bytes::copy_from_slice(&buf[..n])).await;
    }
}

/// Go-style end event for an exit status.
pub fn end_event(kind: ExitKind) -> EndEvent {
    match kind {
        ExitKind::Code(c) => EndEvent {
            exit_code: c,
            exited: true,
            status: format!("exit status {c}"),
            error: None,
        },
        ExitKind::Signal(s) => EndEvent {
            exit_code: -1,
            exited: false,
            status: format!("signal: {}", signal_name(s)),
            error: None,
        },
    }
}

fn signal_name(s: i32) -> String {
    match s {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        3 => "quit".into(),
        4 => "illegal instruction".into(),
        6 => "aborted".into(),
        7 => "bus error".into(),
        8 => "floating point exception".into(),
        9 => "killed".into(),
        10 => "user defined signal 1".into(),
        11 => "segmentation fault".into(),
        12 => "user defined signal 2".into(),
        13 => "broken pipe".into(),
        14 => "alarm clock".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// Resolves a command's working directory; it must be an existing directory.
pub fn resolve_cwd(
    user: &User,
    cwd: Option<&str>,
    default: Option<&str>,
) -> Result<PathBuf, RpcError> {
    let raw = cwd
        .filter(|c| !c.is_empty())
        .or(default.filter(|c| !c.is_empty()));
    let p = match raw {
        None => user.home.clone(),
        Some(c) => crate::files::resolve(user, c)?,
    };
    if !Path::new(&p).is_dir() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("cwd {} does not exist or is not a directory", p.display()),
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_look_like_go() {
        assert_eq!(end_event(ExitKind::Code(2)).status, "exit status 2");
        let k = end_event(ExitKind::Signal(9));
        assert_eq!(
            (k.exit_code, k.exited, k.status.as_str()),
            (-1, false, "signal: killed")
        );
    }
}
