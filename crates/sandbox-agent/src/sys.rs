//! Thin wrappers over the libc calls the agent needs (ptys, process groups, reaping,
//! per-thread filesystem identity, inotify, statvfs). All `unsafe` of the crate lives here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Puts a file descriptor into non-blocking mode (needed before registering it with tokio).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid, borrowed descriptor with integer arguments only.
    unsafe {
        let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        cvt(libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        ))?;
    }
    Ok(())
}

/// An owned, non-blocking descriptor driven by tokio's reactor: pipes and pty masters.
#[derive(Debug)]
pub struct AsyncFdIo {
    inner: AsyncFd<OwnedFd>,
}

impl AsyncFdIo {
    /// Wraps `fd` (switching it to non-blocking mode).
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd_borrowed())?;
        // SAFETY: OwnedFd is a valid open descriptor that the AsyncFd owns until dropped,
        // and its as_raw_fd never changes.
        let inner =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(io::Error::from)?;
        Ok(Self { inner })
    }

    /// Reads once; `Ok(0)` is end of file. EIO (a pty whose other side closed) is EOF too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.inner.readable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: buf is a valid writable region of buf.len() bytes.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes the whole buffer, waiting for the reader as needed.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.inner.writable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: buf is a valid readable region of buf.len() bytes.
                let n = unsafe {
                    libc::write(fd.get_ref().as_raw_fd(), buf.as_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// The raw descriptor (for ioctls such as a pty resize).
    pub fn raw(&self) -> RawFd {
        self.inner.get_ref().as_raw_fd()
    }
}

trait BorrowFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}
impl BorrowFd for OwnedFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// Opens a pseudo-terminal pair of the given size: (master, slave).
pub fn openpty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = winsize(cols, rows);
    // SAFETY: out-pointers are valid; name and termios may be null; ws is a valid winsize.
    cvt(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    })?;
    // SAFETY: openpty succeeded, so both are fresh descriptors that we now own.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &s] {
        // SAFETY: fcntl on a descriptor we own.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    Ok((m, s))
}

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Resizes the terminal behind a pty master.
pub fn set_winsize(master: RawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    cvt(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Credentials a child switches to before exec.
#[derive(Debug, Clone)]
pub struct Creds {
    /// Target uid.
    pub uid: u32,
    /// Target primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Configures the child: a new session (so the command and everything it forks share a
/// process group we can kill), the pty as controlling terminal, then the user's identity.
pub fn configure_child(cmd: &mut Command, creds: Option<Creds>, pty: bool) {
    let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
    // SAFETY: the closure runs between fork and exec; it only calls async-signal-safe
    // syscalls and does not allocate (everything is prepared before the fork).
    unsafe {
        cmd.pre_exec(move || {
            cvt(libc::setsid())?;
            if pty {
                cvt(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if let Some(c) = &creds {
                cvt(libc::setgroups(groups.len(), groups.as_ptr()))?;
                cvt(libc::setgid(c.gid))?;
                cvt(libc::setuid(c.uid))?;
            }
            Ok(())
        });
    }
}

/// Sends `sig` to a whole process group.
pub fn kill_group(pgid: u32, sig: i32) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pgid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: plain syscall; a negative pid addresses the process group.
    cvt(unsafe { libc::kill(-pgid, sig) })?;
    Ok(())
}

/// Sends `sig` to one process.
pub fn kill_pid(pid: u32, sig: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: plain syscall on a positive pid.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// Sends `sig` to every process we may signal except ourselves (only used as PID 1).
pub fn kill_all(sig: i32) {
    // SAFETY: plain syscall; -1 means every process but the caller (and init).
    unsafe {
        libc::kill(-1, sig);
    }
}

/// Collects one terminated child, any child, without blocking.
pub fn reap_one() -> Option<(u32, i32)> {
    let mut status: libc::c_int = 0;
    // SAFETY: status is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid > 0 {
        Some((pid as u32, status))
    } else {
        None
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

/// Decodes a waitpid status.
pub fn decode_status(status: i32) -> ExitKind {
    if libc::WIFEXITED(status) {
        ExitKind::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitKind::Signal(libc::WTERMSIG(status))
    } else {
        ExitKind::Code(-1)
    }
}

/// Effective uid of the agent.
pub fn geteuid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
}

/// Effective gid of the agent.
pub fn getegid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::getegid() }
}

/// Makes orphaned descendants re-parent to us (so we reap them) when we are not PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })?;
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
        // SAFETY: per-thread credential switch; restored in Drop on this same thread.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        Self { active: true }
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        if self.active {
            // SAFETY: restores root's fs identity on the thread that changed it.
            unsafe {
                libc::setfsuid(0);
                libc::setfsgid(0);
            }
        }
    }
}

/// (total, used) bytes of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zeroed statvfs is a valid out-buffer; c is a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    let total = st.f_blocks as u64 * st.f_frsize as u64;
    let free = st.f_bfree as u64 * st.f_frsize as u64;
    Ok((total, total.saturating_sub(free)))
}

/// A new non-blocking inotify instance.
pub fn inotify_init() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new descriptor.
    let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    // SAFETY: fd is fresh and owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds a watch; returns the watch descriptor.
pub fn inotify_add_watch(fd: RawFd, path: &Path, mask: u32) -> io::Result<i32> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a NUL-terminated path, fd an inotify descriptor.
    cvt(unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) })
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
