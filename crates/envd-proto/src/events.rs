//! The agent's event log: what happened inside the sandbox (process starts and exits,
//! OOM kills, the agent's own warnings), kept by the agent in a bounded ring and read by
//! the server, which merges it into the sandbox's log (E2B's sandbox logs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// REST endpoint (GET, token required): `?after=<seq>` answers [`EventBatch`] with the
/// events whose sequence number is greater than `after`.
pub const EVENTS_PATH: &str = "/colima/events";
/// Most events one answer carries.
pub const MAX_EVENTS_PER_ANSWER: usize = 1000;

/// One event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, from 1, increasing.
    pub seq: u64,
    /// Unix milliseconds.
    pub ts_ms: i64,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// What happened.
    pub message: String,
    /// Details (`pid`, `cmd`, `exit_code`, ...).
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

/// An answer of [`EVENTS_PATH`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventBatch {
    /// The events after the asked sequence number, oldest first.
    pub events: Vec<Event>,
    /// The sequence number to ask after next time.
    pub next: u64,
    /// Events that were dropped from the ring before they were read.
    #[serde(default)]
    pub dropped: u64,
}
