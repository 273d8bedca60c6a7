//! The colima-e2b server binary's library: CLI, configuration, backend selection,
//! startup and shutdown.

pub mod client;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod listener;
pub mod prepare;
pub mod running;
pub mod sandbox_cli;
pub mod server;
pub mod template_cli;
pub mod terminal_mode;
