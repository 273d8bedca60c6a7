//! A build's log: entries with a level and the step they belong to, read by offset (what
//! E2B's status polling and the native log stream both do), bounded in bytes. When full,
//! the oldest entries go; offsets stay absolute, so a reader never sees an entry twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

/// How important an entry is (E2B's levels, for build logs and sandbox logs; ordered,
/// so a level filter keeps that level and above).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Detail.
    Debug,
    /// Progress: a build's steps and output, what happened to a sandbox.
    Info,
    /// Something odd that did not stop the build; a process killed, an agent warning.
    Warn,
    /// What ended the build; an OOM kill.
    Error,
}

impl std::str::FromStr for LogLevel {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "debug" => Ok(Self::Debug),
            "info" => Ok(Self::Info),
            "warn" | "warning" => Ok(Self::Warn),
            "error" => Ok(Self::Error),
            other => Err(crate::Error::InvalidArgument(format!(
                "level must be debug, info, warn or error, not {other:?}"
            ))),
        }
    }
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When it was logged.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// Its level.
    pub level: LogLevel,
    /// The text, one line.
    pub message: String,
    /// The step it belongs to: `base`, a 1-based step number, or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[derive(Debug, Default)]
struct Entries {
    /// Absolute offset of the first entry kept.
    first: u64,
    entries: VecDeque<LogEntry>,
    bytes: usize,
    /// Entries dropped to stay under the limit.
    dropped: u64,
}

/// A bounded, shared build log; writers append, readers read from an offset and can wait
/// for more.
#[derive(Clone, Debug)]
pub struct BuildLog {
    inner: Arc<Mutex<Entries>>,
    max_bytes: usize,
    /// Bumped on every append and when the build ends (`true`).
    changed: watch::Sender<bool>,
}

/// Bytes an entry is counted as beyond its text (timestamp, level, step).
const ENTRY_OVERHEAD: usize = 64;

impl BuildLog {
    /// An empty log keeping at most `max_bytes` of entries.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Entries::default())),
            max_bytes: max_bytes.max(1024),
            changed: watch::channel(false).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an entry, dropping the oldest ones past the limit.
    pub fn push(&self, level: LogLevel, step: Option<String>, message: impl Into<String>) {
        let entry = LogEntry {
            timestamp: OffsetDateTime::now_utc(),
            level,
            message: message.into(),
            step,
        };
        {
            let mut e = self.lock();
            e.bytes += entry.message.len() + ENTRY_OVERHEAD;
            e.entries.push_back(entry);
            while e.bytes > self.max_bytes && e.entries.len() > 1 {
                if let Some(old) = e.entries.pop_front() {
                    e.bytes -= old.message.len() + ENTRY_OVERHEAD;
                    e.first += 1;
                    e.dropped += 1;
                }
            }
        }
        self.changed.send_modify(|_| {});
    }

    /// Says the build ended: waiting readers wake and see no more will come.
    pub fn close(&self) {
        self.changed.send_replace(true);
    }

    /// Whether the build ended.
    pub fn closed(&self) -> bool {
        *self.changed.borrow()
    }

    /// Up to `limit` entries from absolute offset `offset` (an offset before the oldest
    /// entry kept reads from the oldest), and the offset after them.
    pub fn read(&self, offset: u64, limit: usize) -> (Vec<LogEntry>, u64) {
        let e = self.lock();
        let start = offset.max(e.first);
        let skip = (start - e.first) as usize;
        let out: Vec<LogEntry> = e.entries.iter().skip(skip).take(limit).cloned().collect();
        let next = start + out.len() as u64;
        (out, next)
    }

    /// Every entry kept.
    pub fn all(&self) -> Vec<LogEntry> {
        self.lock().entries.iter().cloned().collect()
    }

    /// Entries dropped so far to stay under the limit.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Waits until there is an entry at `offset` or the build ended.
    pub async fn wait_past(&self, offset: u64) {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let e = self.lock();
                if e.first + e.entries.len() as u64 > offset {
                    return;
                }
            }
            if *rx.borrow_and_update() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A log holding `entries` (read back from disk), already ended.
    pub fn restored(entries: Vec<LogEntry>, max_bytes: usize) -> Self {
        let log = Self::new(max_bytes);
        {
            let mut e = log.lock();
            for entry in entries {
                e.bytes += entry.message.len() + ENTRY_OVERHEAD;
                e.entries.push_back(entry);
            }
        }
        log.close();
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_stay_absolute_when_old_entries_go() {
        let log = BuildLog::new(1024);
        for i in 0..100 {
            log.push(LogLevel::Info, Some("1".into()), format!("line {i:03}"));
        }
        let (first, next) = log.read(0, 5);
        assert!(log.dropped() > 0);
        assert_eq!(first[0].message, format!("line {:03}", log.dropped()));
        assert_eq!(next, log.dropped() + 5);
        let (rest, end) = log.read(next, 1000);
        assert_eq!(end, 100);
        assert_eq!(rest.last().map(|e| e.message.as_str()), Some("line 099"));
        assert!(log.read(end, 10).0.is_empty());
    }

    #[tokio::test]
    async fn readers_wake_on_new_entries_and_on_close() {
        let log = BuildLog::new(1 << 20);
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move { log.wait_past(0).await })
        };
        log.push(LogLevel::Info, None, "x");
        waiter.await.expect("woke");
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move { log.wait_past(1).await })
        };
        log.close();
        waiter.await.expect("woke on close");
        assert!(log.closed());
    }

    #[test]
    fn entries_serialise_as_e2b_log_entries() {
        let log = BuildLog::new(4096);
        log.push(LogLevel::Error, Some("finalize".into()), "boom");
        let v = serde_json::to_value(&log.all()[0]).expect("json");
        assert_eq!(v["level"], "error");
        assert_eq!(v["step"], "finalize");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
