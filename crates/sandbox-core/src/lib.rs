//! The core of colima-e2b: the domain, its two ports, and the manager that decides.
//!
//! # Highlights
//! - The engine port, [`backend`]: [`SandboxBackend`] is small on purpose (lifecycle
//!   only: create, inspect, list, pause, resume, remove, derive an image, the agent's
//!   address), with a written contract, [`Capabilities`] and one [`SandboxProfile`] that
//!   every backend applies. Everything that happens *inside* a sandbox is the agent's.
//! - The agent port, [`agent`]: [`AgentClient`] speaks envd's protocol (`envd_proto`) to
//!   the agent in every sandbox; [`AgentBinary`] is the build that goes into them.
//! - [`SandboxManager`] decides: ids, templates, defaults and limits, admission,
//!   deadlines and the reaper, re-adoption after a restart, commands' timeouts.
//! - One error type, [`Error`]; it knows no HTTP (the API maps it).
//!
//! # Available implementations
//! - `backend-docker`: Docker Engine and Colima, through bollard.
//! - `backend-podman`: Podman, through its libpod API.
//! - [`InMemoryBackend`]: containers in memory, for engine-free tests.
//!
//! With the `conformance` feature, [`conformance`] holds the checks every backend passes.

pub mod agent;
pub mod backend;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod labels;
pub mod listing;
pub mod manager;
pub mod network;
pub mod template;
pub mod types;

pub use agent::{AgentBinary, AgentClient, ProcessOutput, ProcessStream};
pub use backend::memory::InMemoryBackend;
pub use backend::{
    AgentAddress, Capabilities, ContainerInfo, ContainerSpec, DeriveImage, DynBackend, EngineInfo,
    ImageFile, ImageInfo, ImageLink, SandboxBackend, SandboxProfile, VolumeBind,
};
pub use error::{BoxError, Error, Result};
pub use manager::{
    CommandLimits, ManagerConfig, ProxyTarget, RecoveryReport, SandboxManager, Vouch,
};
pub use template::Template;
pub use types::{
    Lifecycle, Limits, NetworkConfig, OnTimeout, SandboxId, SandboxInfo, SandboxSpec, SandboxState,
    VolumeMount,
};
