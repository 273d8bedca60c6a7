//! `sudo` in sandboxes without any setuid binary.
//!
//! Sandboxes run with `no-new-privileges`, so a setuid `sudo` cannot raise anyone to
//! root. E2B programs still expect `sudo` to work, without a password, for `user`. The
//! agent binary is installed as `sudo` too (a link to it; [`client`] runs when it is
//! called by that name): it hands its stdin, stdout and stderr, its arguments, working
//! directory and environment to the agent over an abstract Unix socket. The agent
//! ([`service`]), which is root, checks who asks by the socket's peer credentials (root,
//! or a member of group `sudo` or `wheel`), starts the command as the target user under
//! a supervisor of its own, with the caller's descriptors as its stdio, relays the
//! signals the client gets and reports the exit status, which the client exits with.
//!
//! What this keeps: no process can gain privileges by exec, so every other setuid binary
//! still fails; root inside is the container's root (its capability set, seccomp, quotas
//! and network policy), the same root a client gets by asking for user `root`. A command
//! run through sudo belongs to the command that called sudo: killing that command (or
//! every process of the sandbox) ends it too, and so does killing the sudo client.

pub mod client;
pub mod service;

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Environment variable naming the service's abstract socket (the default otherwise).
pub const SOCKET_ENV: &str = "COLIMA_E2B_SUDO_SOCKET";
/// The service's abstract socket name unless [`SOCKET_ENV`] or `--sudo-socket` names one.
pub const DEFAULT_SOCKET: &str = "colima-e2b-sudo";
/// Groups whose members may use sudo, without a password.
pub const SUDO_GROUPS: [&str; 2] = ["sudo", "wheel"];
/// PATH of commands run through sudo without `-E` (Debian's `secure_path`).
pub const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest request a client may send.
pub const MAX_REQUEST: usize = 1 << 20;

/// Which of the caller's environment a command run through sudo keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preserve {
    /// A fresh environment (sudo's `env_reset`), keeping terminal and locale variables.
    #[default]
    Reset,
    /// All of it (`-E`).
    All,
    /// These names besides the fresh ones (`--preserve-env=A,B`).
    Names(Vec<String>),
}

/// What a client asks the service for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The command and its arguments; empty with `login` or `shell` (an interactive shell).
    pub command: Vec<String>,
    /// Target user; root when `None`.
    pub user: Option<String>,
    /// `-i`: the target's login shell, in its home.
    pub login: bool,
    /// `-s`: the caller's `$SHELL` (else the target's shell).
    pub shell: bool,
    /// How much of `env` the command keeps.
    pub preserve: Preserve,
    /// `NAME=value` words before the command.
    pub assignments: Vec<(String, String)>,
    /// The caller's environment.
    pub env: Vec<(String, String)>,
    /// The caller's working directory.
    pub cwd: String,
}

/// The abstract socket address of `name`.
pub fn address(name: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(name.as_bytes())
}

/// The socket name clients use: [`SOCKET_ENV`], else [`DEFAULT_SOCKET`].
pub fn socket_name() -> String {
    std::env::var(SOCKET_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SOCKET.to_string())
}

/// Whether `name` can be an environment variable name in `NAME=value`.
pub fn env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
