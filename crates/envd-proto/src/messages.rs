//! Wire types of envd's `process.Process` and `filesystem.Filesystem` services in their
//! proto3 JSON form (lowerCamelCase out, snake_case accepted in, int64 as strings, bytes
//! as base64, enums by name), and of the REST endpoints (`/init`, `/metrics`, `/files`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Base64 (standard, padded) as proto3 JSON writes `bytes`.
pub mod b64 {
    use super::*;

    /// Serializes bytes as base64.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    /// Accepts standard or URL-safe base64, padded or not (proto3 JSON allows both).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }

    /// Decodes any proto3-JSON base64 flavour.
    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let s = s.trim();
        for e in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            if let Ok(v) = e.decode(s) {
                return Ok(v);
            }
        }
        Err("invalid base64".into())
    }
}

/// int64/uint64 as a JSON string on output; a string or a number on input.
pub mod i64_str {
    use super::*;

    /// Serializes as a decimal string.
    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    /// Accepts `"12"` or `12`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            I(i64),
        }
        match N::deserialize(d)? {
            N::S(s) => s.parse().map_err(serde::de::Error::custom),
            N::I(i) => Ok(i),
        }
    }
}

/// A uint32 that may arrive as a number or a string.
fn de_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(u32),
    }
    match N::deserialize(d)? {
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
        N::I(i) => Ok(i),
    }
}

fn de_opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    de_u32(d).map(Some)
}

/// Terminal size of a pty.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtySize {
    /// Columns.
    #[serde(default, deserialize_with = "de_u32")]
    pub cols: u32,
    /// Rows.
    #[serde(default, deserialize_with = "de_u32")]
    pub rows: u32,
}

/// `process.PTY`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pty {
    /// Requested size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<PtySize>,
}

/// `process.ProcessConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Executable (looked up in PATH).
    #[serde(default)]
    pub cmd: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    /// Working directory (relative to the user's home); default: the home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// `process.StartRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartRequest {
    /// What to run.
    #[serde(default)]
    pub process: ProcessConfig,
    /// Run in a pty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    /// Optional tag to find the process again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Keep stdin open (default true); false means stdin is /dev/null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

/// `process.ProcessSelector`: by pid or by tag.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessSelector {
    /// Process id.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_u32"
    )]
    pub pid: Option<u32>,
    /// Tag given at Start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl ProcessSelector {
    /// Selects the process with `pid`.
    pub fn by_pid(pid: u32) -> Self {
        Self {
            pid: Some(pid),
            tag: None,
        }
    }
}

/// A request that only selects a process (Connect, CloseStdin).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SelectRequest {
    /// Which process.
    #[serde(default)]
    pub process: ProcessSelector,
}

/// `process.ProcessInput`: stdin bytes or pty bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ProcessInput {
    /// Bytes for the stdin pipe.
    Stdin(#[serde(with = "b64")] Vec<u8>),
    /// Bytes typed into the pty.
    Pty(#[serde(with = "b64")] Vec<u8>),
}

/// `process.SendInputRequest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendInputRequest {
    /// Which process.
    #[serde(default)]
    pub process: ProcessSelector,
    /// The input.
    pub input: ProcessInput,
}

/// `process.StreamInputRequest` (one envelope of the client stream).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StreamInputEvent {
    /// First message: which process.
    Start {
        /// Which process.
        #[serde(default)]
        process: ProcessSelector,
    },
    /// Input bytes.
    Data {
        /// The input.
        input: ProcessInput,
    },
    /// Keeps the request alive.
    Keepalive {},
}

/// One StreamInput message. `event` is a proto oneof, so proto3 JSON puts its member
/// at the top level: `{"start": {...}}`, `{"data": {...}}`, `{"keepalive": {}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamInputRequest {
    /// The event.
    #[serde(flatten)]
    pub event: StreamInputEvent,
}

/// `process.Signal`, by name (`SIGNAL_SIGKILL`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
    /// Anything else / unspecified.
    Unspecified,
}

impl Signal {
    /// The libc signal number, if any.
    pub fn number(self) -> Option<i32> {
        match self {
            Signal::Term => Some(15),
            Signal::Kill => Some(9),
            Signal::Unspecified => None,
        }
    }
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Signal::Term => "SIGNAL_SIGTERM",
            Signal::Kill => "SIGNAL_SIGKILL",
            Signal::Unspecified => "SIGNAL_UNSPECIFIED",
        })
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(match v {
            serde_json::Value::String(s) => match s.as_str() {
                "SIGNAL_SIGTERM" | "SIGTERM" => Signal::Term,
                "SIGNAL_SIGKILL" | "SIGKILL" => Signal::Kill,
                _ => Signal::Unspecified,
            },
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(15) => Signal::Term,
                Some(9) => Signal::Kill,
                _ => Signal::Unspecified,
            },
            _ => Signal::Unspecified,
        })
    }
}

/// `process.SendSignalRequest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendSignalRequest {
    /// Which process.
    #[serde(default)]
    pub process: ProcessSelector,
    /// The signal.
    pub signal: Signal,
}

/// `process.UpdateRequest` (pty resize).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpdateRequest {
    /// Which process.
    #[serde(default)]
    pub process: ProcessSelector,
    /// New pty settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
}

/// `process.ProcessInfo` in List.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    /// How it was started.
    pub config: ProcessConfig,
    /// Its pid.
    pub pid: u32,
    /// Its tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `process.ListResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListResponse {
    /// Running processes.
    #[serde(default)]
    pub processes: Vec<ProcessInfo>,
}

/// `process.ProcessEvent.EndEvent`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    /// Exit code; -1 when killed by a signal.
    #[serde(default, alias = "exit_code")]
    pub exit_code: i32,
    /// True when the process exited normally (not by a signal).
    #[serde(default)]
    pub exited: bool,
    /// Like Go's ProcessState: `exit status 1`, `signal: killed`.
    #[serde(default)]
    pub status: String,
    /// An error that ended the process, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `data` event: one chunk of output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DataEvent {
    /// From stdout.
    Stdout(#[serde(with = "b64")] Vec<u8>),
    /// From stderr.
    Stderr(#[serde(with = "b64")] Vec<u8>),
    /// From the pty.
    Pty(#[serde(with = "b64")] Vec<u8>),
}

/// `process.ProcessEvent` (its oneof).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ProcessEvent {
    /// The process started.
    Start {
        /// Its pid.
        #[serde(deserialize_with = "de_u32")]
        pid: u32,
    },
    /// Output.
    Data(DataEvent),
    /// The process ended.
    End(EndEvent),
    /// Nothing happened for a while.
    Keepalive {},
}

/// `StartResponse` / `ConnectResponse`: `{"event": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessEventMessage {
    /// The event.
    pub event: ProcessEvent,
}

/// `filesystem.FileType`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileType {
    /// Unknown (also a symlink whose target is missing or neither file nor directory).
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified,
    /// Regular file (and anything that is neither a directory nor a symlink).
    #[serde(rename = "FILE_TYPE_FILE")]
    File,
    /// Directory.
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory,
    /// Symbolic link: what envd before 0.6 reported for a link; newer envd (and the
    /// agent) report the target's type and set [`EntryInfo::is_symlink`].
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink,
}

/// `filesystem.EntryInfo`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    /// Base name.
    pub name: String,
    /// Type; for a symlink, its target's (unspecified when the link is broken), with
    /// `isSymlink` set.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Absolute path.
    pub path: String,
    /// Size in bytes (int64: a string on the wire); a symlink's own.
    #[serde(with = "i64_str")]
    pub size: i64,
    /// Permission bits (`0o644`); a symlink's own.
    pub mode: u32,
    /// `ls -l` style: `-rw-r--r--`.
    pub permissions: String,
    /// Owner user name (or the uid when unknown).
    pub owner: String,
    /// Group name (or the gid when unknown).
    pub group: String,
    /// Modification time, RFC 3339 UTC.
    #[serde(alias = "modified_time")]
    pub modified_time: String,
    /// When this is a symlink: its target, absolute and fully resolved; unset when the
    /// link is broken.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "symlink_target"
    )]
    pub symlink_target: Option<String>,
    /// User metadata (envd 0.6.2): the file's `user.e2b.<key>` extended attributes,
    /// prefix stripped. Empty (and not sent) when there is none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// True when the entry itself is a symlink.
    #[serde(default, alias = "is_symlink")]
    pub is_symlink: bool,
}

/// A request carrying one path (Stat, MakeDir, Remove).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathRequest {
    /// The path.
    #[serde(default)]
    pub path: String,
}

/// `filesystem.ListDirRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListDirRequest {
    /// Directory.
    #[serde(default)]
    pub path: String,
    /// How deep to descend (0 and 1 both mean the directory's own entries).
    #[serde(default, deserialize_with = "de_u32")]
    pub depth: u32,
}

/// `filesystem.MoveRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MoveRequest {
    /// From.
    #[serde(default)]
    pub source: String,
    /// To.
    #[serde(default)]
    pub destination: String,
}

/// `{entry}` responses (Stat, MakeDir, Move).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryResponse {
    /// The entry.
    pub entry: EntryInfo,
}

/// `filesystem.ListDirResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListDirResponse {
    /// Entries, depth-first.
    #[serde(default)]
    pub entries: Vec<EntryInfo>,
}

/// `filesystem.WatchDirRequest` / `CreateWatcherRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WatchDirRequest {
    /// Directory to watch.
    #[serde(default)]
    pub path: String,
    /// Watch subdirectories too.
    #[serde(default)]
    pub recursive: bool,
    /// Attach the EntryInfo of the affected path to each event, while it exists
    /// (envd 0.6.3).
    #[serde(default, alias = "include_entry")]
    pub include_entry: bool,
    /// Allow watching a directory on a network filesystem (NFS, CIFS/SMB, FUSE), which
    /// is refused with `invalid_argument` otherwise (envd 0.6.4).
    #[serde(default, alias = "allow_network_mounts")]
    pub allow_network_mounts: bool,
}

/// `filesystem.EventType`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EventType {
    /// Created (or moved in).
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create,
    /// Written.
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write,
    /// Removed.
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove,
    /// Renamed (moved away).
    #[serde(rename = "EVENT_TYPE_RENAME")]
    Rename,
    /// Attributes changed.
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod,
}

/// `filesystem.FilesystemEvent`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FilesystemEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Entry after the event, when asked for and still present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// `filesystem.WatchDirResponse` (its oneof).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WatchDirResponse {
    /// The watch is set up.
    Start {},
    /// A change.
    Filesystem(Box<FilesystemEvent>),
    /// Nothing happened for a while.
    Keepalive {},
}

/// `CreateWatcherResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WatcherIdMessage {
    /// Watcher id.
    #[serde(alias = "watcher_id")]
    pub watcher_id: String,
}

/// `GetWatcherEventsResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatcherEventsResponse {
    /// Events since the last call.
    #[serde(default)]
    pub events: Vec<FilesystemEvent>,
}

/// An entry of the `POST /files` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriteInfo {
    /// Absolute path written.
    pub path: String,
    /// Base name.
    pub name: String,
    /// Always `file`.
    #[serde(rename = "type")]
    pub file_type: String,
    /// The metadata stored on the file (envd 0.6.2); empty (and not sent) when none
    /// was given or the filesystem keeps no extended attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /init` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    /// Environment for every command.
    #[serde(default, alias = "env_vars")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Access token to require from now on.
    #[serde(default, alias = "access_token")]
    pub access_token: Option<String>,
    /// User when a request names none.
    #[serde(default, alias = "default_user")]
    pub default_user: Option<String>,
    /// Working directory when a command names none.
    #[serde(default, alias = "default_workdir")]
    pub default_workdir: Option<String>,
}

/// `POST /processes/kill-all` answer: `{"killed": N}`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KillAllResponse {
    /// Processes that were killed.
    pub killed: u64,
}

/// `GET /metrics`: the sandbox's resource use (its cgroup's, where readable) and the
/// agent's own footprint. Fields an older agent does not send read as zero.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Metrics {
    /// Unix seconds of the sample.
    pub ts: u64,
    /// CPUs the sandbox may use.
    pub cpu_count: u64,
    /// CPU use since the previous sample, percent of `cpu_count` CPUs.
    pub cpu_used_pct: f64,
    /// Memory the sandbox may use, bytes.
    pub mem_total: u64,
    /// Memory used, bytes.
    pub mem_used: u64,
    /// Page cache within the memory used, bytes.
    pub mem_cache: u64,
    /// `mem_total` in MiB.
    pub mem_total_mib: u64,
    /// `mem_used` in MiB.
    pub mem_used_mib: u64,
    /// Size of the filesystem holding `/`, bytes.
    pub disk_total: u64,
    /// Used on the filesystem holding `/`, bytes.
    pub disk_used: u64,
    /// The agent's resident memory, bytes.
    pub agent_rss: u64,
    /// Open streaming responses.
    pub agent_streams: u64,
    /// Commands still running.
    pub agent_processes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_event_uses_camel_case_and_accepts_snake_case() {
        let m = ProcessEventMessage {
            event: ProcessEvent::End(EndEvent {
                exit_code: 3,
                exited: true,
                status: "exit status 3".into(),
                error: None,
            }),
        };
        let s = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(
            s,
            r#"{"event":{"end":{"exitCode":3,"exited":true,"status":"exit status 3"}}}"#
        );
        let back: ProcessEventMessage =
            serde_json::from_str(r#"{"event":{"end":{"exit_code":3,"exited":true,"status":"x"}}}"#)
                .expect("parse");
        assert!(matches!(
            back.event,
            ProcessEvent::End(EndEvent { exit_code: 3, .. })
        ));
    }

    #[test]
    fn data_event_is_base64() {
        let m = ProcessEventMessage {
            event: ProcessEvent::Data(DataEvent::Stdout(vec![0xff, 0, b'a'])),
        };
        let s = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(s, r#"{"event":{"data":{"stdout":"/wBh"}}}"#);
    }

    #[test]
    fn entry_metadata_is_sent_only_when_there_is_some() {
        let mut e = EntryInfo {
            name: "f".into(),
            file_type: FileType::File,
            path: "/f".into(),
            size: 1,
            mode: 0o644,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: "1970-01-01T00:00:00Z".into(),
            symlink_target: None,
            metadata: BTreeMap::new(),
            is_symlink: false,
        };
        let v = serde_json::to_value(&e).unwrap_or_default();
        assert!(v.get("metadata").is_none(), "{v}");
        e.metadata.insert("author".into(), "mish".into());
        let v = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(v["metadata"], serde_json::json!({"author": "mish"}));
        let back: EntryInfo = serde_json::from_value(v).expect("parse");
        assert_eq!(back, e);
        let w: WriteInfo =
            serde_json::from_str(r#"{"path":"/f","name":"f","type":"file"}"#).expect("parse");
        assert!(w.metadata.is_empty());
    }

    #[test]
    fn signal_accepts_names_and_numbers() {
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"12"},"signal":"SIGNAL_SIGKILL"}"#)
                .expect("parse");
        assert_eq!(r.signal, Signal::Kill);
        assert_eq!(r.process.pid, Some(12));
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":12},"signal":15}"#).expect("parse");
        assert_eq!(r.signal, Signal::Term);
    }
}
