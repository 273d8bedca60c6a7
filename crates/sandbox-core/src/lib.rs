//! The core of colima-e2b: domain types, the [`SandboxBackend`] trait and the
//! [`SandboxManager`] that owns every sandbox's lifecycle.
//!
//! # Highlights
//! - [`SandboxBackend`] is small on purpose: lifecycle only (create, inspect, list, pause,
//!   resume, remove, agent address). Everything that happens *inside* a sandbox belongs
//!   to the in-sandbox agent.
//! - [`SandboxManager`] decides: ids, templates, limits, admission, deadlines, the reaper
//!   and re-adoption of sandboxes after a server restart.
//! - [`AgentClient`] talks to the in-sandbox agent (processes, files) over envd's protocol.
//! - One error type, [`Error`], maps each variant to one HTTP status.
//!
//! # Available implementations
//! - `backend-docker`: Docker Engine and Colima, through bollard.
//!
//! With the `conformance` feature, [`conformance`] holds the checks every backend passes.

pub mod agent;
pub mod agent_client;
pub mod backend;
pub mod command;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod instrumented;
pub mod labels;
pub mod manager;
pub mod types;

pub use agent::AgentBinary;
pub use agent_client::{AgentClient, ProcessOutput, ProcessStream};
pub use backend::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, DynBackend, EngineInfo,
    ImageFile, SandboxBackend,
};
pub use error::{BoxError, Error, Result};
pub use manager::{ManagerConfig, RecoveryReport, SandboxManager};
pub use sandbox_agent::signature;
pub use types::{Limits, SandboxId, SandboxInfo, SandboxSpec, SandboxState};

#[cfg(test)]
mod manager_tests;
