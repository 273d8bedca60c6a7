//! The in-sandbox agent: an envd-compatible process and filesystem daemon that runs as
//! PID 1 in every sandbox container and serves E2B's data plane on port 49983. Its wire
//! protocol is `envd_proto`'s, shared with the server.
//!
//! Starting it (see `--help`): `sandbox-agent [--listen 0.0.0.0:49983]`, with the
//! per-sandbox secret in env `COLIMA_E2B_AGENT_SECRET` (removed from the environment
//! before any command runs) or in a file named by `--secret-file` /
//! `COLIMA_E2B_AGENT_SECRET_FILE`. Every request but `GET /health` must then carry it in
//! `X-Access-Token`, except `GET`/`POST /files` through an E2B signed URL (the SDK's
//! `download_url`/`upload_url`, see `auth::file_signature`), which grants that one file
//! operation. `POST /init` may set the secret when none is set, or rotate it when the
//! request carries the current one.
//!
//! Every command runs under its own supervisor (the agent binary re-executed, see
//! [`supervisor`]), so the command's whole process tree can be found and killed by
//! parentage ([`tree`]); `POST /processes/kill-all` ends every user process of the
//! sandbox (as a host process: only the agent's own descendants) and answers
//! `{"killed": N}`. Output goes to one bounded ring per command that never waits for a
//! reader ([`output`]); what a lagging reader still needs when the ring drops it goes to a
//! bounded spill on disk ([`spill`], `--spill-bytes`, `--spill-total-bytes`), and a reader
//! behind even that ends with `data_loss`. A stream reader that takes nothing for
//! `--stall-timeout-ms` is dropped.
//!
//! The library exists for the agent's own integration tests; nothing else links it.

pub mod auth;
pub mod config;
pub mod connect;
pub mod connection;
pub mod events;
pub mod files;
pub mod metadata;
pub mod output;
pub mod process;
pub mod rpc;
pub mod server;
pub mod spill;
pub mod streams;
pub mod sudo;
pub mod supervisor;
pub mod sys;
pub mod tree;
pub mod users;
pub mod volume;
pub mod watch;

pub use envd_proto::ENVD_VERSION;
