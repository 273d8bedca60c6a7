//! Commands: starting them under their own supervisor (see [`crate::supervisor`]), their
//! output (one bounded ring per command, see [`crate::output`]), stdin and pty, kills of
//! their whole tree (see [`crate::tree`]), and reaping.
//!
//! Reaping: one SIGCHLD-driven `waitpid(-1)` loop collects the agent's children, which
//! are the supervisors (and, as PID 1, orphans whose supervisor died). A command's exit
//! status comes from its supervisor, which reaps the command's own tree. Two locks keep
//! the reaper out of the way: forks (std checks exec success, then waits for a failed
//! child itself) and kills (a supervisor's pid must not be reaped, and so reused, while
//! its tree is being killed by that pid).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rustix::pipe::PipeFlags;
use rustix::process::Signal;
use tokio::sync::watch;

use crate::output::{Output, Reader, Stream};
use crate::spill::Spill;
use crate::supervisor::{self, Spec};
use crate::sys::{self, AsyncFdIo, ExitKind};
use crate::tree::{self, ProcStat, Snapshot};
use crate::users::User;
use envd_proto::messages::{EndEvent, ProcessConfig, ProcessInfo};
use envd_proto::{Code, EnvdError};

/// Bytes read from a pipe at a time (also the largest data event).
const READ_CHUNK: usize = 32 << 10;
/// After the command exits, how long to keep draining pipes held open by its children.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Ended commands kept so that Connect still yields their end event.
const KEEP_ENDED: usize = 64;
/// How long an ended command is kept.
const KEEP_ENDED_FOR: Duration = Duration::from_secs(300);
/// After SIGTERM, how long a command's tree may take to end before it is killed.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every descendant of each of `roots`: one command's tree, with what it ran through sudo.
fn descendants_of(roots: Vec<u32>) -> impl Fn(&Snapshot) -> Vec<ProcStat> {
    move |s: &Snapshot| roots.iter().flat_map(|r| s.descendants(*r)).collect()
}

/// A command started through Start.
#[derive(Debug)]
pub struct Proc {
    /// The command's own pid (what clients see; its session and process group id).
    pub pid: u32,
    /// Its supervisor's pid: every process of the command descends from it.
    pub supervisor: u32,
    /// Tag given at Start.
    pub tag: Option<String>,
    /// How it was started.
    pub config: ProcessConfig,
    pty: Option<Arc<AsyncFdIo>>,
    stdin: tokio::sync::Mutex<Option<Arc<AsyncFdIo>>>,
    /// Its output, shared by every reader.
    pub output: Arc<Output>,
    /// Set when its deadline killed it.
    pub timed_out: AtomicBool,
    /// Set once it is past the ended-process limits and kept only while its tree lives.
    forgotten: AtomicBool,
    exited: watch::Receiver<bool>,
    tree_gone: watch::Receiver<bool>,
}

impl Proc {
    /// A reader of its output; with `replay`, from the oldest byte still buffered.
    pub fn reader(&self, replay: bool) -> Reader {
        self.output.reader(replay)
    }

    /// True once the end event exists (the command itself has exited).
    pub fn ended(&self) -> bool {
        self.output.end_event().is_some()
    }

    /// The end event, once ended.
    pub fn end_event(&self) -> Option<EndEvent> {
        self.output.end_event()
    }

    /// True while anything of the command's tree is alive (its supervisor is).
    pub fn tree_alive(&self) -> bool {
        !*self.tree_gone.borrow()
    }

    /// Writes to stdin (pipe) or to the pty.
    pub async fn write_input(&self, to_pty: bool, data: &[u8]) -> Result<(), EnvdError> {
        let target = if to_pty {
            self.pty.clone()
        } else {
            match &*self.stdin.lock().await {
                Some(s) => Some(s.clone()),
                None => self.pty.clone(),
            }
        };
        let Some(fd) = target else {
            return Err(EnvdError::new(
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
            .map_err(|e| EnvdError::new(Code::FailedPrecondition, format!("writing input: {e}")))
    }

    /// Closes stdin (for a pty: sends EOF, ^D).
    pub async fn close_stdin(&self) -> Result<(), EnvdError> {
        if self.stdin.lock().await.take().is_some() {
            return Ok(());
        }
        if let Some(p) = &self.pty {
            let _ = p.write_all(&[4]).await;
        }
        Ok(())
    }

    /// Resizes the pty.
    pub fn resize(&self, cols: u32, rows: u32) -> Result<(), EnvdError> {
        let Some(p) = &self.pty else {
            return Err(EnvdError::new(
                Code::FailedPrecondition,
                "process has no pty",
            ));
        };
        sys::set_winsize(p.fd(), clamp16(cols), clamp16(rows))
            .map_err(|e| EnvdError::from_io(&e, "resizing pty"))
    }

    /// List entry.
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: self.config.clone(),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }

    /// Resolves once the command itself has exited.
    pub async fn wait_exited(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
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
    /// Kill the command's tree at this instant.
    pub deadline: Option<Instant>,
}

/// All commands, running and recently ended.
#[derive(Debug)]
pub struct ProcessTable {
    /// Held by every fork of the agent and by the reaper.
    spawn_lock: Mutex<()>,
    /// Read-held by kills, write-held by the reaper (see the module docs).
    gate: RwLock<()>,
    reap_pending: AtomicBool,
    /// Live supervisors: never targets of a kill-all.
    supervisors: Mutex<HashSet<u32>>,
    /// Supervisors of commands run through sudo, with the supervisor of the command
    /// that called sudo: killing that command kills them too.
    escalated: Mutex<HashMap<u32, u32>>,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    ended: Mutex<VecDeque<(u32, Instant)>>,
    ring_cap: usize,
    spill: Option<Arc<Spill>>,
}

/// How a [`ProcessTable::kill_all`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillAllReport {
    /// Processes killed.
    pub killed: usize,
}

impl ProcessTable {
    /// A table keeping up to `ring_cap` output bytes per command in memory and, for
    /// readers that lag, more in `spill`.
    pub fn new(ring_cap: usize, spill: Option<Arc<Spill>>) -> Self {
        Self {
            spawn_lock: Mutex::new(()),
            gate: RwLock::new(()),
            reap_pending: AtomicBool::new(false),
            supervisors: Mutex::new(HashSet::new()),
            escalated: Mutex::new(HashMap::new()),
            procs: Mutex::new(HashMap::new()),
            ended: Mutex::new(VecDeque::new()),
            ring_cap: ring_cap.max(READ_CHUNK),
            spill,
        }
    }

    /// Collects every terminated child (call on SIGCHLD). While a kill runs it only
    /// notes that reaping is due; the kill reaps when it is done.
    pub fn reap(&self) {
        let _forks = lock(&self.spawn_lock);
        let Ok(_gate) = self.gate.try_write() else {
            self.reap_pending.store(true, Ordering::SeqCst);
            return;
        };
        self.reap_pending.store(false, Ordering::SeqCst);
        let mut sups = lock(&self.supervisors);
        while let Some((pid, _)) = sys::reap_one() {
            sups.remove(&pid);
            lock(&self.escalated).remove(&pid);
        }
    }

    /// Runs a kill on a blocking thread with the reaper held off.
    async fn with_gate<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ProcessTable) -> T + Send + 'static,
    ) -> Option<T> {
        let table = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _gate = table.gate.read().unwrap_or_else(|p| p.into_inner());
            f(&table)
        })
        .await
        .ok();
        if self.reap_pending.load(Ordering::SeqCst) {
            self.reap();
        }
        out
    }

    /// Ends a command's whole tree: SIGKILL freezes and kills every descendant of its
    /// supervisor; SIGTERM reaches every one once and, after [`TERM_GRACE`], whatever is
    /// left is killed. Returns how many processes got the signal.
    pub async fn signal(self: &Arc<Self>, proc: &Arc<Proc>, sig: Signal) -> usize {
        if sig == Signal::KILL {
            return self.kill_tree(proc.supervisor).await;
        }
        let roots = self.tree_roots(proc.supervisor);
        let n = self
            .with_gate(move |_| tree::signal_once(&descendants_of(roots), sig))
            .await
            .unwrap_or(0);
        let (table, p) = (self.clone(), proc.clone());
        tokio::spawn(async move {
            let mut gone = p.tree_gone.clone();
            let ended = tokio::time::timeout(TERM_GRACE, gone.wait_for(|g| *g))
                .await
                .is_ok();
            if !ended {
                table.kill_tree(p.supervisor).await;
            }
        });
        n
    }

    /// Whether anything `proc` started still runs, its supervisors aside. Right after
    /// the end event the supervisor may not have exited yet, so its being alive is
    /// not enough to make an ended command signallable.
    pub fn has_leftovers(&self, proc: &Proc) -> bool {
        if !proc.tree_alive() {
            return false;
        }
        let roots = self.tree_roots(proc.supervisor);
        descendants_of(roots)(&Snapshot::take())
            .iter()
            .any(|p| !p.dead())
    }

    /// `supervisor` and the supervisors of what its command ran through sudo, theirs too.
    fn tree_roots(&self, supervisor: u32) -> Vec<u32> {
        let escalated = lock(&self.escalated);
        let mut roots = vec![supervisor];
        let mut i = 0;
        while i < roots.len() {
            let parent = roots[i];
            for (sup, _) in escalated.iter().filter(|(_, p)| **p == parent) {
                if !roots.contains(sup) {
                    roots.push(*sup);
                }
            }
            i += 1;
        }
        roots
    }

    /// The supervisor of the command `pid` belongs to: its nearest supervisor ancestor.
    pub fn supervisor_of(&self, pid: u32) -> Option<u32> {
        let sups = lock(&self.supervisors).clone();
        let mut p = pid;
        for _ in 0..4096 {
            if sups.contains(&p) {
                return Some(p);
            }
            let st = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            p = tree::ProcStat::parse(p, &st)?.ppid;
            if p <= 1 {
                return None;
            }
        }
        None
    }

    /// Starts `spec` for sudo under a supervisor of its own, with the caller's stdio,
    /// as part of the command whose supervisor is `parent` (see [`crate::sudo`]).
    pub async fn start_escalated(
        &self,
        spec: &Spec,
        stdio: [Stdio; 3],
        parent: Option<u32>,
    ) -> Result<supervisor::Supervised, EnvdError> {
        supervisor::launch(spec, stdio, &self.spawn_lock, |sup| {
            lock(&self.supervisors).insert(sup);
            if let Some(parent) = parent {
                lock(&self.escalated).insert(sup, parent);
            }
        })
        .await
    }

    /// Kills what sudo started under `supervisor` (its client is gone).
    pub async fn kill_escalated(self: &Arc<Self>, supervisor: u32) -> usize {
        self.kill_tree(supervisor).await
    }

    /// Process groups a kill must never signal whole: the agent's own (the supervisors'
    /// first moments are in it) and the supervisors' (a command's first moments are).
    fn protected_group(&self, pgid: u32) -> bool {
        let own = rustix::process::getpgrp()
            .as_raw_nonzero()
            .get()
            .unsigned_abs();
        pgid == own || lock(&self.supervisors).contains(&pgid)
    }

    /// Freezes and kills every descendant of `supervisor`.
    async fn kill_tree(self: &Arc<Self>, supervisor: u32) -> usize {
        // The first stop right here, before any hop to another thread: a fork bomb leaves
        // each thread of the sandbox a sliver of CPU. (The reaper runs on this thread, so
        // the supervisor's pid cannot be reaped and reused meanwhile.)
        let roots = self.tree_roots(supervisor);
        let first: Vec<u32> = roots
            .iter()
            .flat_map(|r| tree::children_groups(*r))
            .collect();
        for g in first.iter().filter(|g| !self.protected_group(**g)) {
            let _ = sys::kill_group(*g, Signal::STOP);
        }
        self.with_gate(move |t| t.freeze_and_kill(&descendants_of(roots), &first))
            .await
            .unwrap_or(0)
    }

    /// Freezes and kills `scope`, starting with the process groups `first`; never a
    /// protected group whole.
    fn freeze_and_kill(&self, scope: &dyn tree::Scope, first: &[u32]) -> usize {
        let protected = |g: u32| self.protected_group(g);
        tree::freeze_and_kill(
            scope,
            first,
            &protected,
            Instant::now() + tree::KILL_DEADLINE,
        )
    }

    /// The processes a kill-all addresses: as PID 1 every process of the sandbox, else
    /// only the agent's own descendants (a host process must not touch the host's); never
    /// the agent or a supervisor (they end by themselves once their command's tree has).
    fn everything_scope(&self) -> impl Fn(&Snapshot) -> Vec<ProcStat> + '_ {
        let me = std::process::id();
        move |s: &Snapshot| {
            let sups = lock(&self.supervisors);
            let all = if me == 1 {
                s.all_but(me)
            } else {
                s.descendants(me)
            };
            all.into_iter().filter(|p| !sups.contains(&p.pid)).collect()
        }
    }

    /// Ends every user process of the sandbox (see `everything_scope`).
    pub async fn kill_all(self: &Arc<Self>) -> KillAllReport {
        let killed = self
            .with_gate(|t| {
                let sups: Vec<u32> = lock(&t.supervisors).iter().copied().collect();
                let first: Vec<u32> = sups.into_iter().flat_map(tree::children_groups).collect();
                t.freeze_and_kill(&t.everything_scope(), &first)
            })
            .await
            .unwrap_or(0);
        KillAllReport { killed }
    }

    /// Agent shutdown: SIGTERM to every user process, a moment to exit, then kill-all.
    pub async fn shutdown(self: &Arc<Self>) {
        self.with_gate(|t| tree::signal_once(&t.everything_scope(), Signal::TERM))
            .await;
        for _ in 0..20 {
            if self.running() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_all().await;
        // Let the supervisors report and go.
        for _ in 0..20 {
            self.reap();
            if lock(&self.supervisors).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Finds a command by pid or tag (running or recently ended).
    pub fn find(&self, pid: Option<u32>, tag: Option<&str>) -> Result<Arc<Proc>, EnvdError> {
        let procs = lock(&self.procs);
        let found = match (pid, tag) {
            (Some(p), _) if p != 0 => procs.get(&p).cloned(),
            (_, Some(t)) => procs
                .values()
                .filter(|p| p.tag.as_deref() == Some(t))
                .max_by_key(|p| (!p.ended(), p.pid))
                .cloned(),
            _ => {
                return Err(EnvdError::new(
                    Code::InvalidArgument,
                    "process selector needs a pid or a tag",
                ))
            }
        };
        found.ok_or_else(|| {
            EnvdError::new(
                Code::NotFound,
                match (pid, tag) {
                    (Some(p), _) if p != 0 => format!("process with pid {p} not found"),
                    (_, t) => format!("process with tag {:?} not found", t.unwrap_or_default()),
                },
            )
        })
    }

    /// Running commands.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut v: Vec<ProcessInfo> = lock(&self.procs)
            .values()
            .filter(|p| !p.ended())
            .map(|p| p.info())
            .collect();
        v.sort_by_key(|p| p.pid);
        v
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
            if ended.len() <= KEEP_ENDED && now.duration_since(at) <= KEEP_ENDED_FOR {
                break;
            }
            ended.pop_front();
            let Some(p) = procs.get(&pid).cloned() else {
                continue;
            };
            if !p.ended() {
                continue;
            }
            if p.tree_alive() {
                // Leftovers still run: keep it killable, but not its output.
                p.forgotten.store(true, Ordering::SeqCst);
                p.output.discard();
            } else {
                procs.remove(&pid);
            }
        }
    }

    /// Starts a command; the returned reader sees all of its output.
    pub async fn start(
        self: &Arc<Self>,
        spec: SpawnSpec,
    ) -> Result<(Arc<Proc>, Reader), EnvdError> {
        self.forget_old();
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
                return Err(EnvdError::new(
                    Code::InvalidArgument,
                    format!("invalid environment variable {k:?}"),
                ));
            }
            env.insert(k.into(), v.into());
        }

        let io_err = |what: &'static str| move |e: std::io::Error| EnvdError::from_io(&e, what);
        let pipe = || {
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC)
                .map_err(|e| EnvdError::from_io(&e.into(), "pipe"))
        };
        let mut ours: Vec<(Stream, OwnedFd)> = Vec::new();
        let mut stdin_ours = None;
        let stdio: [Stdio; 3] = if let Some((cols, rows)) = spec.pty {
            let (m, s) = sys::openpty(cols, rows).map_err(io_err("openpty"))?;
            let dup = |s: &OwnedFd| s.try_clone().map_err(io_err("dup"));
            let io = [Stdio::from(dup(&s)?), Stdio::from(dup(&s)?), Stdio::from(s)];
            ours.push((Stream::Pty, m));
            io
        } else {
            let stdin = if spec.stdin {
                let (r, w) = pipe()?;
                stdin_ours = Some(w);
                Stdio::from(r)
            } else {
                Stdio::null()
            };
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            ours.push((Stream::Stdout, out_r));
            ours.push((Stream::Stderr, err_r));
            [stdin, Stdio::from(out_w), Stdio::from(err_w)]
        };
        let creds = spec.user.switch.then(|| sys::Creds {
            uid: spec.user.uid,
            gid: spec.user.gid,
            groups: spec.user.groups.clone(),
        });
        let sup_spec = Spec {
            program: spec.config.cmd.clone().into(),
            args: spec.config.args.iter().map(OsString::from).collect(),
            env: env.into_iter().collect(),
            cwd: spec.cwd.clone(),
            creds,
            pty: spec.pty.is_some(),
        };
        let started = supervisor::launch(&sup_spec, stdio, &self.spawn_lock, |sup| {
            lock(&self.supervisors).insert(sup);
        })
        .await?;
        let pid = started.pid;
        let mut command = spec.config.cmd.clone();
        for a in &spec.config.args {
            command.push(' ');
            command.push_str(a);
        }
        crate::events::record(
            "info",
            &format!("process {pid} started"),
            &[
                ("pid", pid.to_string()),
                ("user", spec.user.name.clone()),
                ("cmd", command),
                ("tag", spec.tag.clone().unwrap_or_default()),
            ],
        );

        let wrap = |fd: OwnedFd| AsyncFdIo::new(fd).map(Arc::new);
        let mut readers: Vec<(Stream, Arc<AsyncFdIo>)> = Vec::new();
        let mut pty = None;
        for (stream, fd) in ours {
            let fd = wrap(fd).map_err(io_err("output pipe"))?;
            if stream == Stream::Pty {
                pty = Some(fd.clone());
            }
            readers.push((stream, fd));
        }
        let stdin_writer = match stdin_ours {
            Some(w) => Some(wrap(w).map_err(io_err("stdin"))?),
            None => None,
        };

        let (exited_tx, exited_rx) = watch::channel(false);
        let (tree_tx, tree_rx) = watch::channel(false);
        let proc = Arc::new(Proc {
            pid,
            supervisor: started.supervisor,
            tag: spec.tag,
            config: spec.config,
            pty,
            stdin: tokio::sync::Mutex::new(stdin_writer),
            output: Output::with_spill(self.ring_cap, self.spill.clone()),
            timed_out: AtomicBool::new(false),
            forgotten: AtomicBool::new(false),
            exited: exited_rx.clone(),
            tree_gone: tree_rx,
        });
        let reader = proc.reader(false);
        lock(&self.procs).insert(pid, proc.clone());

        let mut handles = Vec::new();
        for (stream, fd) in readers {
            handles.push(tokio::spawn(read_output(
                proc.output.clone(),
                stream,
                fd,
                exited_rx.clone(),
            )));
        }
        if let Some(deadline) = spec.deadline {
            let (table, p) = (self.clone(), proc.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        p.timed_out.store(true, Ordering::SeqCst);
                        table.signal(&p, Signal::KILL).await;
                    }
                    _ = p.wait_exited() => {}
                }
            });
        }
        let (table, p) = (self.clone(), proc.clone());
        let mut status = started.status;
        tokio::spawn(async move {
            let exit = status.exit().await;
            let _ = exited_tx.send(true);
            for h in handles {
                let _ = h.await;
            }
            p.stdin.lock().await.take();
            let mut end = match exit {
                Some(kind) => end_event(kind),
                // Only a root command (or the OOM killer) can kill a supervisor.
                None => EndEvent {
                    error: Some("the command's supervisor ended unexpectedly".into()),
                    ..end_event(ExitKind::Signal(9))
                },
            };
            if p.timed_out.load(Ordering::SeqCst) {
                end.error = Some("command timed out (deadline exceeded)".into());
            }
            let killed = !end.exited;
            let oom = killed && crate::events::note_oom_kills(Some(p.pid));
            crate::events::record(
                if killed && !oom { "warn" } else { "info" },
                &format!("process {} ended: {}", p.pid, end.status),
                &[
                    ("pid", p.pid.to_string()),
                    ("exit_code", end.exit_code.to_string()),
                    ("status", end.status.clone()),
                    ("error", end.error.clone().unwrap_or_default()),
                ],
            );
            p.output.finish(end);
            lock(&table.ended).push_back((p.pid, Instant::now()));
            status.closed().await;
            let _ = tree_tx.send(true);
            if p.forgotten.load(Ordering::SeqCst) {
                let mut procs = lock(&table.procs);
                if procs.get(&p.pid).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                    procs.remove(&p.pid);
                }
            }
        });
        Ok((proc, reader))
    }
}

/// Drains one output descriptor into the ring until EOF, or until the command has
/// exited and the pipe stayed quiet for a moment (a background child may hold it open
/// forever). Never waits for a reader.
async fn read_output(
    output: Arc<Output>,
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
        output.push(stream, &buf[..n]);
        // One chunk per turn: readers on this single-threaded runtime get to take each
        // chunk before the next (without this, tokio's I/O budget lets the drain run
        // ~128 chunks ahead, and a reader that keeps up would still fall behind).
        tokio::task::yield_now().await;
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
) -> Result<PathBuf, EnvdError> {
    let raw = cwd
        .filter(|c| !c.is_empty())
        .or(default.filter(|c| !c.is_empty()));
    let p = match raw {
        None => user.home.clone(),
        Some(c) => crate::files::resolve(user, c)?,
    };
    match std::fs::metadata(Path::new(&p)) {
        Ok(md) if md.is_dir() => Ok(p),
        // As envd: a cwd that does not exist is the caller's mistake.
        Ok(_) => Err(EnvdError::new(
            Code::InvalidArgument,
            format!("cwd {} is not a directory", p.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(EnvdError::new(
            Code::InvalidArgument,
            format!("cwd {} does not exist", p.display()),
        )),
        Err(e) => Err(EnvdError::from_io(&e, &format!("cwd {}", p.display()))),
    }
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
