//! The core of colima-e2b: domain types, the [`SandboxBackend`] trait and the
//! [`SandboxManager`] that owns every sandbox's lifecycle.
//!
//! # Highlights
//! - [`SandboxBackend`] is small on purpose: lifecycle only (create, inspect, list, pause,
//!   resume, remove, agent address). Everything that happens *inside* a sandbox belongs
//!   to the in-sandbox agent.
//! - [`SandboxManager`] decides: ids, templates, limits, admission, deadlines, the reaper
//!   and re-adoption of sandboxes after a server restart.
//! - One error type, [`Error`], maps each variant to one HTTP status.
//!
//! # Available implementations
//! - `backend-docker`: Docker Engine and Colima, through bollard.
//!
//! With the `conformance` feature, [`conformance`] holds the checks every backend passes.

pub mod backend;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod labels;
pub mod manager;
pub mod types;

pub use backend::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DynBackend, EngineInfo,
    SandboxBackend,
};
pub use error::{BoxError, Error, Result};
pub use manager::{ManagerConfig, RecoveryReport, SandboxManager};
pub use types::{Limits, SandboxId, SandboxInfo, SandboxSpec, SandboxState};

#[cfg(test)]
mod manager_tests;
