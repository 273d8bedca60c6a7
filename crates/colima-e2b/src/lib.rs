//! The colima-e2b server binary's library: CLI, configuration, backend selection,
//! startup and shutdown.

pub mod config;
pub mod engine;
pub mod server;
