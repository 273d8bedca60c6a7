//! The agent port: the in-sandbox agent as the core sees it. [`AgentClient`] speaks the
//! protocol (`envd_proto`) to one sandbox's agent; [`AgentBinary`] is the build that goes
//! into every sandbox; [`command`] turns the native API's shell commands into agent
//! calls; [`interpreter`] is a sandbox's code interpreter service; [`errors`] is the one table from the agent's errors to the core's.

pub mod binary;
pub mod client;
pub mod command;
pub mod errors;
pub mod interpreter;
pub mod stream;

pub use binary::{generate_hex, generate_secret, AgentBinary, AGENT_PATH, DERIVED_REPO, SUDO_PATH};
pub use client::{http_client, AgentClient, MAX_UNARY_RESPONSE};
pub use envd_proto::{AGENT_PORT, ENVD_VERSION, SECRET_ENV};
pub use stream::{FileStream, ProcessOutput, ProcessStream};
