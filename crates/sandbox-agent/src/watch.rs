//! Directory watching with inotify (recursive on request): the streaming WatchDir and
//! the polling CreateWatcher / GetWatcherEvents / RemoveWatcher variant.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::connect::{Code, RpcError};
use crate::proto::{EventType, FilesystemEvent};
use crate::sys::{self, AsyncFdIo};
use crate::users::Names;

/// Most directories one watcher follows.
const MAX_WATCHES: usize = 8192;
/// Most events a polling watcher keeps between two GetWatcherEvents.
const MAX_QUEUED: usize = 4096;
/// Most polling watchers at once.
const MAX_WATCHERS: usize = 256;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR;

/// One inotify instance following a directory (and its subdirectories).
#[derive(Debug)]
pub struct Watcher {
    fd: AsyncFdIo,
    wds: HashMap<i32, PathBuf>,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    names: Names,
    buf: Vec<u8>,
}

impl Watcher {
    /// Starts watching `root`, which must be a directory.
    pub fn new(
        root: PathBuf,
        recursive: bool,
        include_entry: bool,
        names: Names,
    ) -> Result<Self, RpcError> {
        match std::fs::metadata(&root) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!("{} is not a directory", root.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RpcError::new(
                    Code::NotFound,
                    format!("{} not found", root.display()),
                ))
            }
            Err(e) => return Err(RpcError::io(&e, &root.display().to_string())),
        }
        let fd = sys::inotify_init().map_err(|e| RpcError::io(&e, "inotify"))?;
        let fd = AsyncFdIo::new(fd).map_err(|e| RpcError::io(&e, "inotify"))?;
        let mut w = Self {
            fd,
            wds: HashMap::new(),
            root: root.clone(),
            recursive,
            include_entry,
            names,
            buf: vec![0u8; 64 << 10],
        };
        w.add_tree(&root)
            .map_err(|e| RpcError::io(&e, &root.display().to_string()))?;
        Ok(w)
    }

    fn add_tree(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        let mut first = true;
        while let Some(d) = stack.pop() {
            if self.wds.len() >= MAX_WATCHES {
                break;
            }
            match sys::inotify_add_watch(self.fd.raw(), &d, MASK) {
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
    pub async fn next(&mut self) -> Result<Vec<FilesystemEvent>, RpcError> {
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let n = self.fd.read(&mut buf).await;
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.buf = buf;
                    return Err(RpcError::io(&e, "reading inotify"));
                }
            };
            let events = self.parse(&buf[..n]);
            self.buf = buf;
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    fn parse(&mut self, data: &[u8]) -> Vec<FilesystemEvent> {
        let mut out = Vec::new();
        let mut off = 0usize;
        const HDR: usize = 16; // wd, mask, cookie, len: four 32-bit fields
        while off + HDR <= data.len() {
            let word = |i: usize| -> [u8; 4] {
                let s = off + i * 4;
                [data[s], data[s + 1], data[s + 2], data[s + 3]]
            };
            let wd = i32::from_ne_bytes(word(0));
            let mask = u32::from_ne_bytes(word(1));
            let len = u32::from_ne_bytes(word(3)) as usize;
            let name_bytes = data.get(off + HDR..off + HDR + len).unwrap_or_default();
            off += HDR + len;
            let name_end = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..name_end]).into_owned();
            if mask & libc::IN_IGNORED != 0 {
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
            let kind = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                EventType::Create
            } else if mask & libc::IN_DELETE != 0 {
                EventType::Remove
            } else if mask & libc::IN_MOVED_FROM != 0 {
                EventType::Rename
            } else if mask & libc::IN_MODIFY != 0 {
                EventType::Write
            } else if mask & libc::IN_ATTRIB != 0 {
                EventType::Chmod
            } else {
                continue;
            };
            if self.recursive && kind == EventType::Create && mask & libc::IN_ISDIR != 0 {
                let _ = self.add_tree(&path);
            }
            let rel = path
                .strip_prefix(&self.root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| path.to_string_lossy().into_owned());
            let entry = if self.include_entry
                && matches!(
                    kind,
                    EventType::Create | EventType::Write | EventType::Chmod
                ) {
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
    pub fn create(&self, w: Watcher) -> Result<String, RpcError> {
        let mut all = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= MAX_WATCHERS {
            return Err(RpcError::new(
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
    pub fn take(&self, id: &str) -> Result<Vec<FilesystemEvent>, RpcError> {
        let all = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let w = all
            .get(id)
            .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher {id} not found")))?;
        let mut q = w.events.lock().unwrap_or_else(|p| p.into_inner());
        Ok(q.drain(..).collect())
    }

    /// Stops a watcher.
    pub fn remove(&self, id: &str) -> Result<(), RpcError> {
        let mut all = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        match all.remove(id) {
            Some(w) => {
                w.task.abort();
                Ok(())
            }
            None => Err(RpcError::new(
                Code::NotFound,
                format!("watcher {id} not found"),
            )),
        }
    }
}
