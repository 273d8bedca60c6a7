//! Each sandbox's log: what the server did to it (created, paused, resumed, timeout
//! changes, killed or expired) and what its agent saw inside (process starts and exits,
//! OOM kills, the agent's warnings), as E2B's `GET /v2/sandboxes/{id}/logs` serves it.
//!
//! The agent keeps its own events in a bounded ring; the server pulls them with the
//! resource samples (and before answering or removing a sandbox), so they are kept
//! here after the sandbox has gone. Memory is bounded: `entries` per sandbox, messages
//! and fields cut to size, and the logs of ended sandboxes dropped after `retention`
//! (and beyond [`MAX_ENDED`] of them, oldest first).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use super::{lock, SandboxManager};
use crate::error::Result;
pub use crate::template::log::LogLevel;
use crate::types::SandboxId;

/// Logs of ended sandboxes kept at most.
pub const MAX_ENDED: usize = 500;
/// Longest message kept, bytes.
const MAX_MESSAGE: usize = 4096;
/// Fields kept per entry, and the longest field value.
const MAX_FIELDS: usize = 16;
const MAX_FIELD_VALUE: usize = 512;
/// Largest page a client may ask for.
pub const MAX_LOG_PAGE: usize = 1000;

/// How much log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Entries kept per sandbox (the oldest go first).
    pub entries: usize,
    /// How long the log of a sandbox that ended stays readable.
    pub retention: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            entries: 1000,
            retention: Duration::from_secs(3600),
        }
    }
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogEntry {
    /// When it happened (millisecond precision).
    pub at: OffsetDateTime,
    /// Severity.
    pub level: LogLevel,
    /// What happened.
    pub message: String,
    /// Structured details (`pid`, `exit_code`, `template`, ...).
    pub fields: BTreeMap<String, String>,
}

impl LogEntry {
    /// An entry stamped now, cut to size.
    pub fn now(level: LogLevel, message: impl Into<String>, fields: &[(&str, String)]) -> Self {
        Self::at(OffsetDateTime::now_utc(), level, message.into(), fields)
    }

    fn at(at: OffsetDateTime, level: LogLevel, message: String, fields: &[(&str, String)]) -> Self {
        let ms = at.nanosecond() / 1_000_000 * 1_000_000;
        Self {
            at: at.replace_nanosecond(ms).unwrap_or(at),
            level,
            message: cut(message, MAX_MESSAGE),
            fields: fields
                .iter()
                .take(MAX_FIELDS)
                .map(|(k, v)| (cut((*k).to_string(), 64), cut(v.clone(), MAX_FIELD_VALUE)))
                .collect(),
        }
    }

    fn millis(&self) -> i128 {
        self.at.unix_timestamp_nanos() / 1_000_000
    }
}

/// RFC 3339, for log fields.
pub(super) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Which way a log is read from its cursor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first, from the cursor on (default: from the start).
    #[default]
    Forward,
    /// Newest first, from the cursor back (default: from now).
    Backward,
}

/// What a client asks a log for.
#[derive(Clone, Debug, Default)]
pub struct LogQuery {
    /// Unix milliseconds to start from (inclusive).
    pub cursor: Option<i128>,
    /// Most entries to return (1..=[`MAX_LOG_PAGE`]).
    pub limit: usize,
    /// Which way to read.
    pub direction: Direction,
    /// Only entries of this level or above.
    pub level: Option<LogLevel>,
    /// Only entries whose message contains this (case-insensitive).
    pub search: Option<String>,
}

#[derive(Debug, Default)]
struct SandboxLog {
    entries: VecDeque<LogEntry>,
    /// When the sandbox ended (its log then goes after the retention).
    ended: Option<Instant>,
    /// The agent's event sequence read so far.
    agent_seq: u64,
}

/// Every sandbox's log.
#[derive(Debug, Default)]
pub(super) struct Logs {
    all: Mutex<HashMap<SandboxId, SandboxLog>>,
}

impl Logs {
    fn push(&self, id: &SandboxId, entry: LogEntry, cap: usize) {
        let mut all = lock(&self.all);
        let log = all.entry(id.clone()).or_default();
        if log.entries.len() >= cap.max(1) {
            log.entries.pop_front();
        }
        // Entries pulled from the agent may be older than the server's newest.
        let at = log
            .entries
            .iter()
            .rposition(|e| e.at <= entry.at)
            .map_or(0, |i| i + 1);
        log.entries.insert(at, entry);
    }

    pub(super) fn ended(&self, id: &SandboxId, retention: Duration) {
        let mut all = lock(&self.all);
        if let Some(log) = all.get_mut(id) {
            log.ended = Some(Instant::now());
        }
        // Drop logs past their retention, and the oldest beyond MAX_ENDED.
        all.retain(|_, l| l.ended.is_none_or(|t| t.elapsed() < retention));
        let mut ended: Vec<(Instant, SandboxId)> = all
            .iter()
            .filter_map(|(id, l)| l.ended.map(|t| (t, id.clone())))
            .collect();
        if ended.len() > MAX_ENDED {
            ended.sort();
            for (_, id) in ended.iter().take(ended.len() - MAX_ENDED) {
                all.remove(id);
            }
        }
    }

    fn query(&self, id: &SandboxId, q: &LogQuery) -> Option<Vec<LogEntry>> {
        let all = lock(&self.all);
        let log = all.get(id)?;
        let search = q.search.as_deref().map(str::to_lowercase);
        let keep = |e: &&LogEntry| {
            q.level.is_none_or(|l| e.level >= l)
                && search
                    .as_deref()
                    .is_none_or(|s| e.message.to_lowercase().contains(s))
        };
        let limit = q.limit.clamp(1, MAX_LOG_PAGE);
        let out = match q.direction {
            Direction::Forward => log
                .entries
                .iter()
                .filter(|e| q.cursor.is_none_or(|c| e.millis() >= c))
                .filter(keep)
                .take(limit)
                .cloned()
                .collect(),
            Direction::Backward => log
                .entries
                .iter()
                .rev()
                .filter(|e| q.cursor.is_none_or(|c| e.millis() <= c))
                .filter(keep)
                .take(limit)
                .cloned()
                .collect(),
        };
        Some(out)
    }

    fn agent_seq(&self, id: &SandboxId) -> u64 {
        lock(&self.all).get(id).map_or(0, |l| l.agent_seq)
    }

    fn set_agent_seq(&self, id: &SandboxId, seq: u64) {
        if let Some(l) = lock(&self.all).get_mut(id) {
            l.agent_seq = l.agent_seq.max(seq);
        }
    }

    /// Sandbox `id`'s agent started anew (a resume from the filesystem): its events
    /// are numbered from the start again.
    pub(super) fn agent_restarted(&self, id: &SandboxId) {
        if let Some(l) = lock(&self.all).get_mut(id) {
            l.agent_seq = 0;
        }
    }
}

impl SandboxManager {
    /// Adds `entry` to sandbox `id`'s log.
    pub fn log(&self, id: &SandboxId, entry: LogEntry) {
        self.inner
            .logs
            .push(id, entry, self.inner.config.logs.entries);
    }

    /// Marks sandbox `id`'s log as ended: it stays readable for the retention.
    pub(super) fn end_log(&self, id: &SandboxId, entry: LogEntry) {
        self.log(id, entry);
        self.inner.logs.ended(id, self.inner.config.logs.retention);
    }

    /// Sandbox `id`'s log as `q` asks for it, after pulling what its agent has new.
    /// The log of a sandbox that ended stays readable for the retention.
    pub async fn logs(&self, id: &SandboxId, q: &LogQuery) -> Result<Vec<LogEntry>> {
        if self.info(id).is_ok() {
            self.pull_agent_events(id).await;
        }
        self.inner
            .logs
            .query(id, q)
            .ok_or_else(|| super::not_found(id))
    }

    /// Copies the agent's new events into sandbox `id`'s log (quietly: a sandbox that
    /// does not answer is read next time).
    pub(super) async fn pull_agent_events(&self, id: &SandboxId) {
        // Not `agent`: reading the log must never wake a paused sandbox (its callers
        // know it runs).
        let Ok(agent) = self.agent_client(id).await else {
            return;
        };
        let after = self.inner.logs.agent_seq(id);
        let read = tokio::time::timeout(Duration::from_secs(3), agent.events(after)).await;
        let Ok(Ok(batch)) = read else { return };
        for e in batch.events {
            let level = e.level.parse().unwrap_or(LogLevel::Info);
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.ts_ms) * 1_000_000)
                .unwrap_or_else(|_| OffsetDateTime::now_utc());
            let fields: Vec<(&str, String)> = e
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            self.log(id, LogEntry::at(at, level, e.message, &fields));
        }
        self.inner.logs.set_agent_seq(id, batch.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: i64, level: LogLevel, message: &str) -> LogEntry {
        let at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("time");
        LogEntry::at(at, level, message.into(), &[])
    }

    fn messages(v: &[LogEntry]) -> Vec<&str> {
        v.iter().map(|e| e.message.as_str()).collect()
    }

    #[test]
    fn cursor_direction_level_search_and_limit() {
        let logs = Logs::default();
        let id: SandboxId = "clmlog".parse().expect("id");
        logs.push(&id, entry(1000, LogLevel::Info, "created"), 10);
        logs.push(&id, entry(3000, LogLevel::Warn, "process 7 killed"), 10);
        logs.push(&id, entry(2000, LogLevel::Info, "process 7 started"), 10);
        logs.push(
            &id,
            entry(4000, LogLevel::Error, "process 9 OOM killed"),
            10,
        );
        let q = |cursor, direction, level, search: Option<&str>, limit| LogQuery {
            cursor,
            direction,
            level,
            search: search.map(String::from),
            limit,
        };
        let all = logs
            .query(&id, &q(None, Direction::Forward, None, None, 10))
            .expect("log");
        assert_eq!(
            messages(&all),
            [
                "created",
                "process 7 started",
                "process 7 killed",
                "process 9 OOM killed"
            ],
            "kept in time order whatever order they came in"
        );
        let back = logs
            .query(&id, &q(Some(3000), Direction::Backward, None, None, 2))
            .expect("log");
        assert_eq!(messages(&back), ["process 7 killed", "process 7 started"]);
        let warn = logs
            .query(
                &id,
                &q(None, Direction::Forward, Some(LogLevel::Warn), None, 10),
            )
            .expect("log");
        assert_eq!(
            messages(&warn),
            ["process 7 killed", "process 9 OOM killed"]
        );
        let found = logs
            .query(
                &id,
                &q(Some(2000), Direction::Forward, None, Some("PROCESS 7"), 10),
            )
            .expect("log");
        assert_eq!(messages(&found), ["process 7 started", "process 7 killed"]);
        assert!(logs
            .query(
                &"clmother".parse().expect("id"),
                &q(None, Direction::Forward, None, None, 1)
            )
            .is_none());
    }

    #[test]
    fn bounded_per_sandbox_and_after_the_end() {
        let logs = Logs::default();
        let id: SandboxId = "clmcap".parse().expect("id");
        for i in 0..5 {
            logs.push(&id, entry(i, LogLevel::Info, &format!("e{i}")), 3);
        }
        let q = LogQuery {
            limit: 10,
            ..LogQuery::default()
        };
        assert_eq!(
            messages(&logs.query(&id, &q).expect("log")),
            ["e2", "e3", "e4"]
        );
        logs.ended(&id, Duration::from_secs(60));
        assert!(logs.query(&id, &q).is_some(), "readable after the end");
        logs.ended(&id, Duration::ZERO);
        assert!(logs.query(&id, &q).is_none(), "gone after the retention");
        let long = LogEntry::now(LogLevel::Info, "é".repeat(MAX_MESSAGE), &[]);
        assert!(long.message.len() <= MAX_MESSAGE);
    }
}
