//! The envd protocol that the colima-e2b agent (inside every sandbox) and the server
//! (its client) share: messages, Connect's streaming framing, error codes with the one
//! errno table, signed file URLs, versions and constants. No I/O lives here.
//!
//! # Highlights
//! - [`messages`]: envd's `process.Process` and `filesystem.Filesystem` messages in
//!   proto3 JSON, and the REST bodies (`/init`, `/metrics`, `/files`).
//! - [`codec`]: envelopes, end-of-stream messages, an incremental decoder.
//! - [`error`]: [`Code`], [`Reason`] and [`EnvdError`], the REST statuses, errno.
//! - [`signature`]: E2B's v1 file-URL signature.

pub mod codec;
pub mod error;
pub mod events;
pub mod messages;
pub mod signature;

pub use error::{Code, EnvdError, Reason};

/// The envd version whose features the agent implements (the SDKs gate features on it:
/// 0.6.2 file metadata, 0.6.3 entry info in watch events, 0.6.4 watching network mounts).
pub const ENVD_VERSION: &str = "0.6.4";
/// Port the agent listens on inside every sandbox (envd's).
pub const AGENT_PORT: u16 = 49983;
/// Where a volume's keeper container mounts the volume whose content its agent serves
/// under `/volume/{path|dir|file}`.
pub const VOLUME_ROOT: &str = "/colima-e2b-volume";
/// Header carrying the per-sandbox access token on every request but `/health`.
pub const TOKEN_HEADER: &str = "x-access-token";
/// Container environment variable that hands the agent its per-sandbox secret; the agent
/// removes it before any command runs.
pub const SECRET_ENV: &str = "COLIMA_E2B_AGENT_SECRET";
/// Container environment variable setting how long the agent lets a stream's reader
/// take nothing before dropping it, in milliseconds (the `--stall-timeout-ms` flag).
pub const STALL_TIMEOUT_ENV: &str = "COLIMA_E2B_AGENT_STALL_TIMEOUT_MS";
/// Header of a streaming call's deadline in milliseconds (for Start: the command's).
pub const TIMEOUT_HEADER: &str = "connect-timeout-ms";
/// Header asking for keepalive events every so many seconds.
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";
/// Content type of streaming calls.
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
/// Response header of Connect: output bytes a reconnecting follower missed because the
/// agent's bounded buffer had already dropped them.
pub const DROPPED_HEADER: &str = "x-output-dropped-bytes";

/// Largest unary answer (JSON body) the agent sends; the server reads at most this much,
/// so the agent refuses, with `resource_exhausted` and [`Reason::TooLarge`], to build a
/// larger one.
pub const MAX_UNARY_ANSWER: usize = 16 << 20;
/// REST endpoint (POST, token required) that ends every user process of the sandbox:
/// everything but the agent (and the supervisors it runs commands under, which end on
/// their own once their command's processes are gone). Answers
/// [`messages::KillAllResponse`].
pub const KILL_ALL_PATH: &str = "/processes/kill-all";

/// The `Authorization` value naming the acting user (`Basic base64("<user>:")`).
pub fn basic_user(user: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    format!("Basic {encoded}")
}
