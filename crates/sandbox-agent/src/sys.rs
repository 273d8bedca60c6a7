//! The kernel interfaces the agent needs (ptys, signals, reaping, per-thread filesystem
//! identity, inotify, statvfs, cgroup files), through `rustix` (raw syscalls, no libc
//! wrappers of our own) and `nix` for the fs-id calls rustix lacks. The one `unsafe` is
//! tokio's descriptor registration.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};
use rustix::pty::OpenptFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An owned, non-blocking descriptor driven by tokio's reactor: pipes, pty masters,
/// inotify instances.
#[derive(Debug)]
pub struct AsyncFdIo {
    inner: AsyncFd<OwnedFd>,
}

impl AsyncFdIo {
    /// Wraps `fd` (switching it to non-blocking mode).
    #[allow(unsafe_code)]
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        // SAFETY: the AsyncFd owns the OwnedFd, a valid open descriptor that stays open
        // and the same until the AsyncFd drops it (tokio's safe constructors are
        // deprecated as unsound for types whose descriptor can change; OwnedFd's cannot).
        let inner =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(io::Error::from)?;
        Ok(Self { inner })
    }

    /// Waits until readable and runs `f` on the descriptor, again while it would block.
    pub async fn read_with<R>(
        &self,
        mut f: impl FnMut(std::os::fd::BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| f(fd.get_ref().as_fd())) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads once; `Ok(0)` is end of file. EIO (a pty whose other side closed) is EOF too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(io::Error::from))
            {
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::IO.raw_os_error()) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes the whole buffer, waiting for the reader as needed.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.inner.writable().await?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// The descriptor (for ioctls such as a pty resize).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

/// Opens a pseudo-terminal pair of the given size: (master, slave), both close-on-exec.
pub fn openpty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    // TIOCGPTPEER opens the peer without a path lookup (Linux 4.13); else by name.
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(s) => s,
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())?;
            rustix::fs::open(
                name.as_c_str(),
                OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        }
    };
    set_winsize(slave.as_fd(), cols, rows)?;
    Ok((master, slave))
}

/// Resizes the terminal behind a pty descriptor.
pub fn set_winsize(fd: std::os::fd::BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = rustix::termios::Winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(fd, ws)?;
    Ok(())
}

/// Credentials a command switches to before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// Target uid.
    pub uid: u32,
    /// Target primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

fn pid_of(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from(Errno::INVAL))
}

/// Sends `sig` to one process (never to PID 1 or below).
pub fn kill_pid(pid: u32, sig: Signal) -> io::Result<()> {
    rustix::process::kill_process(pid_of(pid)?, sig)?;
    Ok(())
}

/// Sends `sig` to a whole process group (never group 1 or below).
pub fn kill_group(pgid: u32, sig: Signal) -> io::Result<()> {
    rustix::process::kill_process_group(pid_of(pgid)?, sig)?;
    Ok(())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl ExitKind {
    /// Decodes a wait status.
    pub fn from_wait(status: WaitStatus) -> Self {
        match (status.exit_status(), status.terminating_signal()) {
            (Some(c), _) => ExitKind::Code(c),
            (None, Some(s)) => ExitKind::Signal(s),
            (None, None) => ExitKind::Code(-1),
        }
    }
}

/// Collects one terminated child, any child, without blocking.
pub fn reap_one() -> Option<(u32, ExitKind)> {
    match rustix::process::wait(WaitOptions::NOHANG) {
        Ok(Some((pid, status))) => Some((
            pid.as_raw_nonzero().get().unsigned_abs(),
            ExitKind::from_wait(status),
        )),
        _ => None,
    }
}

/// Effective uid of the agent.
pub fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Effective gid of the agent.
pub fn getegid() -> u32 {
    rustix::process::getegid().as_raw()
}

/// Makes orphaned descendants re-parent to this process (so it reaps them and they stay
/// its descendants) when it is not PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    Ok(())
}

/// While alive, this thread's filesystem accesses are checked (and files created owned)
/// as the given user. setfsuid/setfsgid are per thread, so run it on a blocking thread.
#[derive(Debug)]
pub struct FsIdentity {
    active: bool,
}

impl FsIdentity {
    /// Switches this thread's fs identity when we are root and the target is not.
    pub fn enter(uid: u32, gid: u32) -> Self {
        if geteuid() != 0 || uid == 0 {
            return Self { active: false };
        }
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
        Self { active: true }
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        if self.active {
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
        }
    }
}

/// (total, used) bytes of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(path)?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bfree.saturating_mul(st.f_frsize);
    Ok((total, total.saturating_sub(free)))
}

/// A new non-blocking inotify instance.
pub fn inotify_init() -> io::Result<OwnedFd> {
    use rustix::fs::inotify::CreateFlags;
    Ok(rustix::fs::inotify::init(
        CreateFlags::NONBLOCK | CreateFlags::CLOEXEC,
    )?)
}

/// Adds a watch; returns the watch descriptor.
pub fn inotify_add_watch(
    fd: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    mask: rustix::fs::inotify::WatchFlags,
) -> io::Result<i32> {
    Ok(rustix::fs::inotify::add_watch(fd, path, mask)?)
}

/// The cgroup (v2 unified, or v1 `controller`) directory of this process under `root`,
/// from /proc/self/cgroup. Inside a container with its own cgroup namespace that is
/// `root` itself.
fn own_cgroup_dir(root: &Path, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut v1 = None;
    let mut v2 = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let rel = path.trim_start_matches('/');
        if id == "0" && ctrls.is_empty() {
            v2 = Some(root.join(rel));
        } else if ctrls.split(',').any(|c| c == controller) {
            v1 = Some(root.join(ctrls).join(rel));
        }
    }
    // Prefer the hierarchy that really has the controller's files.
    let probe = format!("{controller}.max");
    [v2, v1]
        .into_iter()
        .flatten()
        .find(|d| d.join(&probe).exists() || d.join(format!("{controller}.current")).exists())
}

/// The process limit of the sandbox's cgroup (`pids.max`), when one is set and readable.
pub fn pids_limit() -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    // A container sees its own cgroup at the hierarchy's root (v1 mounts, cgroupns).
    let candidates = [
        own_cgroup_dir(root, "pids"),
        Some(root.join("pids")),
        Some(root.to_path_buf()),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|d| std::fs::read_to_string(d.join("pids.max")).ok())
        .and_then(|raw| raw.trim().parse().ok())
}

/// Resource use of the sandbox's own cgroup (v2 or v1), so that metrics describe the
/// sandbox and not the host the kernel's /proc files describe.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupUsage {
    /// CPU time used by the cgroup since it began, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// CPUs the cgroup may use (its quota), if limited.
    pub cpus: Option<f64>,
    /// Memory in use, bytes.
    pub mem_used: Option<u64>,
    /// Memory limit, bytes (`None` when unlimited).
    pub mem_limit: Option<u64>,
    /// Page cache within the memory in use, bytes.
    pub mem_cache: Option<u64>,
}

/// Reads [`CgroupUsage`] under `root` (normally `/sys/fs/cgroup`).
pub fn cgroup_usage(root: &Path) -> CgroupUsage {
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
    let num = |rel: &str| read(rel).and_then(|s| s.trim().parse::<u64>().ok());
    let stat = |rel: &str, key: &str| {
        read(rel).and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
            })
        })
    };
    // Limits above this are "unlimited" written as a huge number (v1).
    let real_limit = |v: u64| (v < 1 << 60).then_some(v);
    if root.join("cgroup.controllers").exists() {
        let cpus = read("cpu.max").and_then(|s| {
            let mut it = s.split_whitespace();
            let quota: f64 = it.next()?.parse().ok()?;
            let period: f64 = it.next()?.parse().ok()?;
            (period > 0.0).then(|| quota / period)
        });
        return CgroupUsage {
            cpu_ns: stat("cpu.stat", "usage_usec").map(|us| us * 1000),
            cpus,
            mem_used: num("memory.current"),
            mem_limit: read("memory.max").and_then(|s| s.trim().parse().ok()),
            mem_cache: stat("memory.stat", "file"),
        };
    }
    let cpu_dir = ["cpu,cpuacct", "cpuacct,cpu", "cpuacct", "cpu"]
        .into_iter()
        .find(|d| root.join(d).join("cpuacct.usage").exists())
        .unwrap_or("cpuacct");
    let quota_dir = ["cpu,cpuacct", "cpuacct,cpu", "cpu"]
        .into_iter()
        .find(|d| root.join(d).join("cpu.cfs_quota_us").exists())
        .unwrap_or("cpu");
    let cpus = read(&format!("{quota_dir}/cpu.cfs_quota_us"))
        .and_then(|q| q.trim().parse::<i64>().ok())
        .filter(|q| *q > 0)
        .zip(num(&format!("{quota_dir}/cpu.cfs_period_us")).filter(|p| *p > 0))
        .map(|(q, p)| q as f64 / p as f64);
    CgroupUsage {
        cpu_ns: num(&format!("{cpu_dir}/cpuacct.usage")),
        cpus,
        mem_used: num("memory/memory.usage_in_bytes"),
        mem_limit: num("memory/memory.limit_in_bytes").and_then(real_limit),
        mem_cache: stat("memory/memory.stat", "total_cache")
            .or_else(|| stat("memory/memory.stat", "cache")),
    }
}

#[cfg(test)]
mod cgroup_tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("agent-cgroup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn write(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, body).expect("write");
    }

    #[test]
    fn reads_cgroup_v2() {
        let dir = scratch("v2");
        let r = dir.as_path();
        write(r, "cgroup.controllers", "cpu memory pids\n");
        write(r, "cpu.max", "50000 100000\n");
        write(r, "cpu.stat", "usage_usec 1500\nuser_usec 1000\n");
        write(r, "memory.current", "4096\n");
        write(r, "memory.max", "max\n");
        write(r, "memory.stat", "anon 1\nfile 2048\n");
        let u = cgroup_usage(r);
        assert_eq!(u.cpu_ns, Some(1_500_000));
        assert_eq!(u.cpus, Some(0.5));
        assert_eq!(u.mem_used, Some(4096));
        assert_eq!(u.mem_limit, None);
        assert_eq!(u.mem_cache, Some(2048));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_cgroup_v1() {
        let dir = scratch("v1");
        let r = dir.as_path();
        write(r, "cpu,cpuacct/cpuacct.usage", "123456\n");
        write(r, "cpu,cpuacct/cpu.cfs_quota_us", "200000\n");
        write(r, "cpu,cpuacct/cpu.cfs_period_us", "100000\n");
        write(r, "memory/memory.usage_in_bytes", "8192\n");
        write(r, "memory/memory.limit_in_bytes", "536870912\n");
        write(r, "memory/memory.stat", "cache 100\ntotal_cache 300\n");
        let u = cgroup_usage(r);
        assert_eq!(u.cpu_ns, Some(123_456));
        assert_eq!(u.cpus, Some(2.0));
        assert_eq!(u.mem_used, Some(8192));
        assert_eq!(u.mem_limit, Some(536_870_912));
        assert_eq!(u.mem_cache, Some(300));
        write(r, "memory/memory.limit_in_bytes", "9223372036854771712\n");
        write(r, "cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
        let u = cgroup_usage(r);
        assert_eq!(u.mem_limit, None);
        assert_eq!(u.cpus, None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
