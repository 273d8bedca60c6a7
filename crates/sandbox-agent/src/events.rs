//! The agent's event log: process starts and exits, OOM kills and the agent's own
//! warnings, in a bounded ring the server reads ([`envd_proto::events::EVENTS_PATH`])
//! into the sandbox's log. Recording never blocks and never grows past [`CAPACITY`]
//! events: the oldest go first, and the server is told how many it missed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use envd_proto::events::{Event, EventBatch, MAX_EVENTS_PER_ANSWER};

/// Events kept.
pub const CAPACITY: usize = 2000;
/// Longest message or field value kept, bytes.
const MAX_TEXT: usize = 512;
/// The cgroup v2 file whose `oom_kill` line counts OOM kills in this container.
const MEMORY_EVENTS: &str = "/sys/fs/cgroup/memory.events";

#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    next_seq: u64,
    dropped: u64,
    /// OOM kills counted so far (`memory.events`).
    oom_seen: Option<u64>,
}

fn ring() -> std::sync::MutexGuard<'static, Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Records an event (`level`: debug, info, warn or error).
pub fn record(level: &str, message: &str, fields: &[(&str, String)]) {
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut r = ring();
    r.next_seq += 1;
    let event = Event {
        seq: r.next_seq,
        ts_ms,
        level: level.to_string(),
        message: cut(message),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_string(), cut(v)))
            .collect::<BTreeMap<_, _>>(),
    };
    if r.events.len() >= CAPACITY {
        r.events.pop_front();
        r.dropped += 1;
    }
    r.events.push_back(event);
}

/// The events after sequence number `after`, oldest first (at most
/// [`MAX_EVENTS_PER_ANSWER`]).
pub fn after(after: u64) -> EventBatch {
    let r = ring();
    let events: Vec<Event> = r
        .events
        .iter()
        .filter(|e| e.seq > after)
        .take(MAX_EVENTS_PER_ANSWER)
        .cloned()
        .collect();
    let next = events.last().map_or(after, |e| e.seq);
    // Events the caller never saw because the ring dropped them first.
    let first_kept = r.events.front().map_or(r.next_seq + 1, |e| e.seq);
    let dropped = first_kept.saturating_sub(after + 1).min(r.dropped);
    EventBatch {
        events,
        next,
        dropped,
    }
}

/// The `oom_kill` count of a `memory.events` text.
fn oom_kills_in(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Records an OOM kill if the container's count rose since last asked; `pid` names the
/// command that just ended killed, when one did. Returns whether one was recorded.
pub fn note_oom_kills(pid: Option<u32>) -> bool {
    let Some(now) = std::fs::read_to_string(MEMORY_EVENTS)
        .ok()
        .as_deref()
        .and_then(oom_kills_in)
    else {
        return false;
    };
    let seen = {
        let mut r = ring();
        let seen = r.oom_seen.unwrap_or(0);
        r.oom_seen = Some(now);
        seen
    };
    if now <= seen {
        return false;
    }
    let mut fields = vec![("oom_kills", (now - seen).to_string())];
    if let Some(pid) = pid {
        fields.push(("pid", pid.to_string()));
    }
    record(
        "error",
        "a process was killed by the OOM killer: the sandbox reached its memory limit",
        &fields,
    );
    true
}

/// Remembers the OOM count at start, so kills before the agent ran are not reported.
pub fn init() {
    let now = std::fs::read_to_string(MEMORY_EVENTS)
        .ok()
        .as_deref()
        .and_then(oom_kills_in);
    ring().oom_seen = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_pages_by_sequence_and_counts_what_it_dropped() {
        let start = after(0).next;
        for i in 0..5 {
            record("info", &format!("e{i}"), &[("i", i.to_string())]);
        }
        let b = after(start);
        assert!(b.events.len() >= 5);
        let mine: Vec<&str> = b
            .events
            .iter()
            .filter(|e| e.message.starts_with('e') && e.message.len() == 2)
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(mine, ["e0", "e1", "e2", "e3", "e4"]);
        assert!(after(b.next).events.is_empty());
        assert_eq!(cut(&"é".repeat(600)).len(), MAX_TEXT);
    }

    #[test]
    fn oom_kill_counts_parse() {
        let text = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills_in(text), Some(2));
        assert_eq!(oom_kills_in("low 0\n"), None);
    }
}
