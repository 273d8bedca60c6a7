//! The in-sandbox agent: an envd-compatible process and filesystem daemon that runs as
//! PID 1 in every sandbox container and serves E2B's data plane on port 49983.
//!
//! Wire types live in [`proto`] so other crates can reuse them as a client: with
//! `default-features = false` (no `daemon` feature) the crate is only those types.
//!
//! Starting it (see `--help`): `sandbox-agent [--listen 0.0.0.0:49983]`, with the
//! per-sandbox secret in env `COLIMA_E2B_AGENT_SECRET` (removed from the environment
//! before any command runs) or in a file named by `--secret-file` /
//! `COLIMA_E2B_AGENT_SECRET_FILE`. Every request but `GET /health` must then carry it in
//! `X-Access-Token`, except `GET`/`POST /files` through an E2B signed URL (the SDK's
//! `download_url`/`upload_url`, see `auth::file_signature`), which grants that one file
//! operation. `POST /init` may set the secret when none is set, or rotate it when the
//! request carries the current one.

#[cfg(feature = "daemon")]
pub mod auth;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod connect;
#[cfg(feature = "daemon")]
pub mod files;
#[cfg(feature = "daemon")]
pub mod process;
pub mod proto;
#[cfg(feature = "daemon")]
pub mod server;
pub mod signature;
#[cfg(feature = "daemon")]
pub mod sys;
#[cfg(feature = "daemon")]
pub mod users;
#[cfg(feature = "daemon")]
pub mod watch;

/// The envd version whose features this agent implements (the SDK gates features on it).
pub const ENVD_VERSION: &str = "0.5.7";
