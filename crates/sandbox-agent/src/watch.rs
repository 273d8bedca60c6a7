//! Directory watching with inotify (recursive on request): the streaming WatchDir and
//! the polling CreateWatcher / GetWatcherEvents / RemoveWatcher variant.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::sys::{self, AsyncFdIo};
use crate::users::Names;
use envd_proto::messages::{EventType, FilesystemEvent};
use envd_proto::{Code, EnvdError};
use rustix::fs::inotify::{ReadFlags, Reader, WatchFlags};
use std::mem::MaybeUninit;

/// Most directories one watcher follows.
const MAX_WATCHES: usize = 8192;
/// Most events a polling watcher keeps between two GetWatcherEvents.
const MAX_QUEUED: usize = 4096;
/// Most polling watchers at once.
const MAX_WATCHERS: usize = 256;

const MASK: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::ONLYDIR);

/// What a watch follows and reports (the WatchDir / CreateWatcher request's options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// Subdirectories too.
    pub recursive: bool,
    /// Each event carries the EntryInfo of its path, while that exists (envd 0.6.3).
    pub include_entry: bool,
    /// A directory on a network filesystem may be watched (envd 0.6.4); refused otherwise.
    pub allow_network_mounts: bool,
}

/// Filesystem magic numbers (`statfs` f_type, linux/magic.h) of the network and FUSE
/// filesystems envd refuses to watch unless asked: their events may never arrive.
const NETWORK_FS_MAGIC: [(u32, &str); 5] = [
    (0x6969, "NFS"),
    (0xFF53_4D42, "CIFS"),
    (0x517B, "SMB"),
    (0xFE53_4D42, "SMB2"),
    (0x6573_5546, "FUSE"),
];

/// The network filesystem a statfs `f_type` names, if it is one.
pub fn network_fs_name(f_type: u64) -> Option<&'static str> {
    // The magic numbers are 32-bit; a 32-bit f_type may arrive sign-extended.
    let magic = (f_type & 0xFFFF_FFFF) as u32;
    NETWORK_FS_MAGIC
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// Refuses to watch `dir` on a network filesystem unless allowed (envd's rule and text).
fn check_mount(dir: &Path, allow_network_mounts: bool) -> Result<(), EnvdError> {
    if allow_network_mounts {
        return Ok(());
    }
    let st = rustix::fs::statfs(dir).map_err(|e| {
        EnvdError::new(
            Code::Internal,
            format!("error checking mount status: {}", std::io::Error::from(e)),
        )
    })?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    match network_fs_name(st.f_type as u64) {
        Some(_) => Err(EnvdError::new(
            Code::InvalidArgument,
            format!("cannot watch path on network filesystem: {}", dir.display()),
        )),
        None => Ok(()),
    }
}

/// One inotify instance following a directory (and its subdirectories).
#[derive(Debug)]
pub struct Watcher {
    fd: AsyncFdIo,
    wds: HashMap<i32, PathBuf>,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    names: Names,
    buf: Vec<MaybeUninit<u8>>,
}

impl Watcher {
    /// Starts watching `root`, which must be a directory (on a local filesystem unless
    /// `opts` allow network mounts).
    pub fn new(root: PathBuf, opts: WatchOptions, names: Names) -> Result<Self, EnvdError> {
        match std::fs::metadata(&root) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(EnvdError::new(
                    Code::InvalidArgument,
                    format!("{} is not a directory", root.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EnvdError::new(
                    Code::NotFound,
                    format!("{} not found", root.display()),
                ))
            }
            Err(e) => return Err(EnvdError::from_io(&e, &root.display().to_string())),
        }
        check_mount(&root, opts.allow_network_mounts)?;
        let fd = sys::inotify_init().map_err(|e| EnvdError::from_io(&e, "inotify"))?;
        let fd = AsyncFdIo::new(fd).map_err(|e| EnvdError::from_io(&e, "inotify"))?;
        let mut w = Self {
            fd,
            wds: HashMap::new(),
            root: root.clone(),
            recursive: opts.recursive,
            include_entry: opts.include_entry,
            names,
            buf: vec![MaybeUninit::uninit(); 64 << 10],
        };
        w.add_tree(&root)
            .map_err(|e| EnvdError::from_io(&e, &root.display().to_string()))?;
        Ok(w)
    }

    fn add_tree(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        let mut first = true;
        while let Some(d) = stack.pop() {
            if self.wds.len() >= MAX_WATCHES {
                break;
            }
            match sys::inotify_add_watch(self.fd.fd(), &d, MASK) {
                Ok(wd) => {
                    self.wds.insert(wd, d.clone());
                }
                Err(e) if first => return Err(e),
                Err(_) => continue,
            }
            first = false;
            if !self.recursive {
                break;
            }
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the next batch of events.
    pub async fn next(&mut self) -> Result<Vec<FilesystemEvent>, EnvdError> {
        loop {
            let buf = &mut self.buf;
            let raw = self
                .fd
                .read_with(|fd| {
                    let mut reader = Reader::new(fd, buf);
                    let mut out = Vec::new();
                    loop {
                        match reader.next() {
                            Ok(ev) => out.push((
                                ev.wd(),
                                ev.events(),
                                ev.file_name()
                                    .map(|n| n.to_string_lossy().into_owned())
                                    .unwrap_or_default(),
                            )),
                            Err(rustix::io::Errno::AGAIN) if !out.is_empty() => return Ok(out),
                            Err(e) => return Err(std::io::Error::from(e)),
                        }
                    }
                })
                .await
                .map_err(|e| EnvdError::from_io(&e, "reading inotify"))?;
            let events = self.interpret(raw);
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    fn interpret(&mut self, raw: Vec<(i32, ReadFlags, String)>) -> Vec<FilesystemEvent> {
        let mut out = Vec::new();
        for (wd, mask, name) in raw {
            if mask.contains(ReadFlags::IGNORED) {
                self.wds.remove(&wd);
                continue;
            }
            let Some(dir) = self.wds.get(&wd).cloned() else {
                continue;
            };
            let path = if name.is_empty() {
                dir.clone()
            } else {
                dir.join(&name)
            };
            let kind = if mask.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
                EventType::Create
            } else if mask.contains(ReadFlags::DELETE) {
                EventType::Remove
            } else if mask.contains(ReadFlags::MOVED_FROM) {
                EventType::Rename
            } else if mask.contains(ReadFlags::MODIFY) {
                EventType::Write
            } else if mask.contains(ReadFlags::ATTRIB) {
                EventType::Chmod
            } else {
                continue;
            };
            if self.recursive && kind == EventType::Create && mask.contains(ReadFlags::ISDIR) {
                let _ = self.add_tree(&path);
            }
            let rel = path
                .strip_prefix(&self.root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| path.to_string_lossy().into_owned());
            // As envd: the entry of whatever is at the path now, none once it is gone.
            let entry = if self.include_entry {
                crate::files::entry_info(&path, &self.names).ok()
            } else {
                None
            };
            out.push(FilesystemEvent {
                name: rel,
                event_type: kind,
                entry,
            });
        }
        out
    }
}

#[derive(Debug)]
struct Polled {
    events: Arc<Mutex<VecDeque<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Polling watchers by id.
#[derive(Debug, Default)]
pub struct WatcherRegistry {
    watchers: Mutex<HashMap<String, Polled>>,
    next: AtomicU64,
}

impl WatcherRegistry {
    /// Starts a polling watcher.
    pub fn create(&self, w: Watcher) -> Result<String, EnvdError> {
        let mut all = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= MAX_WATCHERS {
            return Err(EnvdError::new(
                Code::ResourceExhausted,
                format!("at most {MAX_WATCHERS} watchers"),
            ));
        }
        let id = format!(
            "w{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let q = events.clone();
        let task = tokio::spawn(async move {
            let mut w = w;
            while let Ok(batch) = w.next().await {
                let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
                for e in batch {
                    if q.len() >= MAX_QUEUED {
                        q.pop_front();
                    }
                    q.push_back(e);
                }
            }
        });
        all.insert(id.clone(), Polled { events, task });
        Ok(id)
    }

    /// Drains the events of a watcher.
    pub fn take(&self, id: &str) -> Result<Vec<FilesystemEvent>, EnvdError> {
        let all = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let w = all
            .get(id)
            .ok_or_else(|| EnvdError::new(Code::NotFound, format!("watcher {id} not found")))?;
        let mut q = w.events.lock().unwrap_or_else(|p| p.into_inner());
        Ok(q.drain(..).collect())
    }

    /// Stops a watcher.
    pub fn remove(&self, id: &str) -> Result<(), EnvdError> {
        let mut all = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        match all.remove(id) {
            Some(w) => {
                w.task.abort();
                Ok(())
            }
            None => Err(EnvdError::new(
                Code::NotFound,
                format!("watcher {id} not found"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_filesystems_are_recognised_by_magic() {
        assert_eq!(network_fs_name(0x6969), Some("NFS"));
        assert_eq!(network_fs_name(0xFF53_4D42), Some("CIFS"));
        assert_eq!(network_fs_name(0x517B), Some("SMB"));
        assert_eq!(network_fs_name(0xFE53_4D42), Some("SMB2"));
        assert_eq!(network_fs_name(0x6573_5546), Some("FUSE"));
        // Sign-extended, as a 32-bit f_type would read.
        assert_eq!(network_fs_name(0xFFFF_FFFF_FF53_4D42), Some("CIFS"));
        // ext4, btrfs, overlayfs, tmpfs, xfs are local.
        for local in [0xEF53, 0x9123_683E, 0x794C_7630, 0x0102_1994, 0x5846_5342] {
            assert_eq!(network_fs_name(local), None, "{local:#x}");
        }
    }

    #[test]
    fn a_local_directory_may_be_watched_either_way() {
        let dir = std::env::temp_dir();
        assert!(check_mount(&dir, false).is_ok());
        assert!(check_mount(&dir, true).is_ok());
    }
}
