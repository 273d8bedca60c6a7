//! Where the Podman service listens: explicit configuration, `CONTAINER_HOST`, the rootless
//! socket, then the rootful one.

use std::path::{Path, PathBuf};

/// The rootful service socket (`podman system service` run as root, or `podman.socket`).
pub const ROOTFUL_SOCKET: &str = "unix:///run/podman/podman.sock";

/// Socket URLs to try, in order.
///
/// - `explicit` (from [`crate::PodmanConfig::socket`]) wins alone: a configured socket that
///   does not answer is an error, never a silent fallback to another engine.
/// - else `CONTAINER_HOST` (what the `podman --remote` CLI reads), alone for the same reason;
/// - else the rootless socket `$XDG_RUNTIME_DIR/podman/podman.sock` when that file exists,
///   followed by the rootful [`ROOTFUL_SOCKET`].
///
/// `env` looks up an environment variable and `exists` a path, so the order can be tested
/// without touching the process environment.
pub fn candidates(
    explicit: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    exists: impl Fn(&Path) -> bool,
) -> Vec<String> {
    if let Some(url) = explicit.map(str::trim).filter(|s| !s.is_empty()) {
        return vec![normalize(url)];
    }
    if let Some(url) = env("CONTAINER_HOST").filter(|s| !s.trim().is_empty()) {
        return vec![normalize(url.trim())];
    }
    let mut out = Vec::new();
    if let Some(dir) = env("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()) {
        let path = PathBuf::from(dir).join("podman").join("podman.sock");
        if exists(&path) {
            out.push(format!("unix://{}", path.display()));
        }
    }
    out.push(ROOTFUL_SOCKET.to_string());
    out
}

/// The candidates for the real process environment and file system.
pub fn from_env(explicit: Option<&str>) -> Vec<String> {
    candidates(explicit, |k| std::env::var(k).ok(), Path::exists)
}

/// Accepts a bare socket path as shorthand for `unix://<path>`.
fn normalize(url: &str) -> String {
    if url.starts_with('/') {
        format!("unix://{url}")
    } else {
        url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn explicit_socket_wins_over_everything() {
        let env = env_of(&[
            ("CONTAINER_HOST", "unix:///env.sock"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        assert_eq!(
            candidates(Some("unix:///cfg.sock"), env, |_| true),
            vec!["unix:///cfg.sock"]
        );
    }

    #[test]
    fn container_host_comes_before_the_rootless_socket() {
        let env = env_of(&[
            ("CONTAINER_HOST", "/env.sock"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        assert_eq!(candidates(None, env, |_| true), vec!["unix:///env.sock"]);
    }

    #[test]
    fn rootless_socket_is_tried_only_when_it_exists() {
        let env = env_of(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
        assert_eq!(
            candidates(None, &env, |p| p
                == Path::new("/run/user/1000/podman/podman.sock")),
            vec!["unix:///run/user/1000/podman/podman.sock", ROOTFUL_SOCKET]
        );
        assert_eq!(candidates(None, &env, |_| false), vec![ROOTFUL_SOCKET]);
    }

    #[test]
    fn empty_values_are_ignored() {
        let env = env_of(&[("CONTAINER_HOST", " "), ("XDG_RUNTIME_DIR", "")]);
        assert_eq!(candidates(Some(""), env, |_| true), vec![ROOTFUL_SOCKET]);
    }
}
