//! Sandbox logs in the native API: `GET /sandboxes/{sandbox_id}/logs`, the same log E2B's
//! `GET /v2/sandboxes/{id}/logs` serves (see [`sandbox_core::manager::sandbox_logs`]).

use std::collections::BTreeMap;

use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use sandbox_core::manager::{Direction, LogEntry, LogLevel, LogQuery};

use crate::error::{parse_id, ApiError};
use crate::{rfc3339, AppState};

#[derive(Tags)]
enum LogTags {
    /// What happened to and inside a sandbox.
    Logs,
}

/// Severity of a log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Level {
    /// Detail.
    Debug,
    /// Something happened.
    Info,
    /// Something went wrong in the sandbox (a process killed, an agent warning).
    Warn,
    /// Something failed (an OOM kill).
    Error,
}

impl From<LogLevel> for Level {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Debug => Level::Debug,
            LogLevel::Info => Level::Info,
            LogLevel::Warn => Level::Warn,
            LogLevel::Error => Level::Error,
        }
    }
}

impl From<Level> for LogLevel {
    fn from(l: Level) -> Self {
        match l {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        }
    }
}

/// Which way the log is read from the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ReadDirection {
    /// Oldest first, from the cursor on (default: from the start).
    Forward,
    /// Newest first, from the cursor back (default: from now).
    Backward,
}

/// One log entry.
#[derive(Debug, Object)]
#[oai(example)]
pub struct LogLine {
    /// When it happened, RFC 3339.
    pub timestamp: String,
    /// Unix milliseconds of `timestamp` (the cursor of a next read).
    pub timestamp_ms: i64,
    /// Severity.
    pub level: Level,
    /// What happened.
    pub message: String,
    /// Details (`pid`, `exit_code`, `template`, ...).
    pub fields: BTreeMap<String, String>,
}

impl From<&LogEntry> for LogLine {
    fn from(e: &LogEntry) -> Self {
        LogLine {
            timestamp: rfc3339(e.at),
            timestamp_ms: i64::try_from(e.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            level: e.level.into(),
            message: e.message.clone(),
            fields: e.fields.clone(),
        }
    }
}

/// A page of a sandbox's log.
#[derive(Debug, Object)]
#[oai(example)]
pub struct SandboxLogs {
    /// The entries, in the order asked for.
    pub logs: Vec<LogLine>,
}

impl poem_openapi::types::Example for LogLine {
    fn example() -> Self {
        LogLine {
            timestamp: "2026-01-01T12:00:00.250Z".into(),
            timestamp_ms: 1_767_268_800_250,
            level: Level::Info,
            message: "process 12 ended: exit status 0".into(),
            fields: BTreeMap::from([
                ("pid".to_string(), "12".to_string()),
                ("exit_code".to_string(), "0".to_string()),
            ]),
        }
    }
}

impl poem_openapi::types::Example for SandboxLogs {
    fn example() -> Self {
        SandboxLogs {
            logs: vec![LogLine::example()],
        }
    }
}

/// The sandbox log endpoint.
pub struct LogApi;

#[OpenApi(tag = "LogTags::Logs")]
impl LogApi {
    /// Sandbox logs
    ///
    /// What the server did to the sandbox (created, timeout changes, paused, resumed,
    /// killed or expired) and what its agent saw inside (process starts and exits, OOM
    /// kills, warnings), readable for a while after the sandbox ended. `cursor` is unix
    /// milliseconds (inclusive), `limit` at most 1000, `level` the lowest level shown,
    /// `search` a case-insensitive substring of the message. 404 for an unknown sandbox.
    #[oai(
        path = "/sandboxes/:sandbox_id/logs",
        method = "get",
        operation_id = "get_sandbox_logs"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn logs(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        cursor: Query<Option<i64>>,
        limit: Query<Option<u32>>,
        direction: Query<Option<ReadDirection>>,
        level: Query<Option<Level>>,
        search: Query<Option<String>>,
    ) -> Result<Json<SandboxLogs>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let q = LogQuery {
            cursor: cursor.0.map(i128::from),
            limit: limit
                .0
                .map_or(sandbox_core::manager::sandbox_logs::MAX_LOG_PAGE, |l| {
                    l as usize
                }),
            direction: match direction.0 {
                Some(ReadDirection::Backward) => Direction::Backward,
                _ => Direction::Forward,
            },
            level: level.0.map(LogLevel::from),
            search: search.0.map(|s| s.chars().take(256).collect()),
        };
        let entries = state.manager.logs(&id, &q).await?;
        Ok(Json(SandboxLogs {
            logs: entries.iter().map(LogLine::from).collect(),
        }))
    }
}
