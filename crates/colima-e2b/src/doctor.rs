//! `colima-e2b doctor`: the deployment checked and explained, each finding with its fix.
//! The manager's checks (engine, storage, cgroups, isolation, templates, state) come
//! from `sandbox_core`; these are the binary's own (exposure and auth, keys, the agent).

use std::os::unix::fs::PermissionsExt;

use sandbox_api::auth::AuthMode;
use sandbox_core::manager::diagnosis::{Check, Status};

use crate::config::Config;

/// The binary's own checks. `trust_loopback`: the backend keeps sandboxes off the host's
/// loopback (`None` when the engine could not be asked).
pub fn own_checks(config: &Config, trust_loopback: Option<bool>) -> Vec<Check> {
    let mut checks = vec![exposure(config, trust_loopback)];
    checks.push(key_file(config));
    checks.push(match config.load_agent() {
        Ok((path, agent)) => Check::ok(
            "agent",
            format!(
                "{} ({} bytes, sha256 {:.12})",
                path.display(),
                agent.contents().len(),
                agent.sha256()
            ),
        ),
        Err(e) => Check::fail("agent", e, "build it with `bash deploy/build-agent.sh`"),
    });
    checks
}

fn exposure(config: &Config, trust_loopback: Option<bool>) -> Check {
    let bind = format!("{}:{}", config.host, config.port);
    match (config.auth.mode, config.binds_loopback()) {
        (AuthMode::Off, false) => Check::fail(
            "auth",
            format!("auth is off and the server binds {bind}: it refuses to start"),
            "bind to 127.0.0.1, or set auth.mode = \"auto\" or \"required\"",
        ),
        (AuthMode::Off, true) => Check::warn(
            "auth",
            format!("auth is off on {bind}: any local process may drive every sandbox"),
            "set auth.mode = \"auto\" (the default)",
        ),
        (mode, false) => Check::warn(
            "auth",
            format!(
                "{bind} is reachable beyond this machine's loopback (other hosts, and \
                 sandboxes through their gateway); every such request needs a key (mode {})",
                if mode == AuthMode::Required {
                    "required"
                } else {
                    "auto"
                }
            ),
            "bind to 127.0.0.1 unless other hosts must reach the server; hand out the key \
             (`colima-e2b env`) only to clients that may drive sandboxes",
        ),
        (AuthMode::Required, true) => Check::ok(
            "auth",
            format!("{bind} is loopback only and every request needs a key"),
        ),
        (AuthMode::Auto, true) => match trust_loopback {
            Some(false) => Check::ok(
                "auth",
                format!(
                    "{bind} is loopback only; sandboxes of this engine can reach the host's \
                     loopback, so every request needs a key"
                ),
            ),
            _ => Check::ok(
                "auth",
                format!(
                    "{bind} is loopback only; local development mode: loopback clients need \
                     no key, except to drive sandboxes created secure"
                ),
            ),
        },
    }
}

fn key_file(config: &Config) -> Check {
    if config.e2b.api_key.as_ref().is_some_and(|k| !k.is_empty()) {
        return Check::ok(
            "api_key",
            "the key comes from the configuration (e2b.api_key)",
        );
    }
    let Some(path) = config.state_dir().map(|d| d.join("e2b-api-key")) else {
        return Check::fail(
            "api_key",
            "no state directory to keep the generated key in",
            "set state_dir (or HOME)",
        );
    };
    match std::fs::metadata(&path) {
        Err(_) => Check::ok(
            "api_key",
            format!("{} is created on first start", path.display()),
        ),
        Ok(md) if md.permissions().mode() & 0o077 != 0 => Check::fail(
            "api_key",
            format!(
                "{} is readable by other users (mode {:o})",
                path.display(),
                md.permissions().mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(_) => Check::ok("api_key", format!("{} (mode 600)", path.display())),
    }
}

/// Prints `checks` for people; returns whether none failed.
pub fn report(checks: &[Check]) -> bool {
    for c in checks {
        let mark = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("[{mark}] {}: {}", c.name, c.message);
        if let (Some(fix), true) = (&c.fix, c.status != Status::Ok) {
            println!("       fix: {fix}");
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    println!(
        "{} checks: {failed} failed, {warned} with warnings",
        checks.len()
    );
    failed == 0
}

/// `colima-e2b doctor`: runs every check; Ok(false) when something failed.
pub async fn run(config: &Config) -> Result<bool, String> {
    let mut checks = Vec::new();
    let manager = match crate::engine::connect(config).await {
        Ok(backend) => {
            let trust = backend.capabilities().host_loopback_isolated;
            checks.extend(own_checks(config, Some(trust)));
            Some(sandbox_core::SandboxManager::new(
                backend,
                crate::server::manager_config(config, None),
            ))
        }
        Err(e) => {
            checks.extend(own_checks(config, None));
            checks.push(Check::fail(
                "engine",
                e,
                "start the engine (`bash deploy/engines.sh`, `colima start`) or point the \
                 configuration at it",
            ));
            None
        }
    };
    if let Some(manager) = manager {
        checks.extend(manager.diagnose(config.allow_unlimited_disk).await);
    }
    Ok(report(&checks))
}
