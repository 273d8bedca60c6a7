//! What the manager can tell about its deployment, in plain words with the fix: the
//! engine, its storage (disk quotas), cgroups, network isolation, the templates' images
//! and the state directory. `colima-e2b doctor` prints these and `/health` reports them.

use serde::Serialize;

use super::SandboxManager;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// As it should be.
    Ok,
    /// Works, with a limit worth knowing.
    Warn,
    /// Something is wrong: the server cannot do what it should.
    Fail,
}

/// One fact about the deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked (`engine`, `disk_quota`, ...).
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found, in plain words.
    pub message: String,
    /// How to fix it, when it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// A check that came out fine.
    pub fn ok(name: &str, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Ok,
            message: message.into(),
            fix: None,
        }
    }

    /// A check with a limit worth knowing.
    pub fn warn(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    /// A check that failed.
    pub fn fail(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

impl SandboxManager {
    /// Checks the engine and what the manager needs of it. Never pulls an image or
    /// creates a container.
    pub async fn diagnose(&self, allow_unlimited_disk: bool) -> Vec<Check> {
        let backend = &self.inner.backend;
        let mut checks = Vec::new();
        let info = match backend.check().await {
            Ok(info) => info,
            Err(e) => {
                checks.push(Check::fail(
                    "engine",
                    format!("the {} engine does not answer: {e}", backend.name()),
                    "start it (`bash deploy/engines.sh`, `colima start`, or your service \
                     manager) or point the configuration at it",
                ));
                return checks;
            }
        };
        checks.push(Check::ok(
            "engine",
            format!(
                "{} {} (API {}) at {}",
                info.engine, info.version, info.api_version, info.endpoint
            ),
        ));
        let caps = backend.capabilities();
        let storage = info
            .storage
            .clone()
            .unwrap_or_else(|| "unknown storage".into());
        checks.push(match (caps.disk_quota, allow_unlimited_disk) {
            (true, _) => Check::ok(
                "disk_quota",
                format!("{storage}: each sandbox's disk is capped (limits.disk_mb)"),
            ),
            (false, true) => Check::warn(
                "disk_quota",
                format!(
                    "{storage} cannot cap a sandbox's disk, and allow_unlimited_disk is set: \
                     one sandbox can fill the engine's disk"
                ),
                "run the engine on btrfs, zfs or XFS with project quotas (deploy/engines.sh \
                 prepares one for an engine it starts itself)",
            ),
            (false, false) => Check::fail(
                "disk_quota",
                format!("{storage} cannot cap a sandbox's disk; the server refuses to start"),
                "run the engine on btrfs, zfs or XFS with project quotas (deploy/engines.sh \
                 prepares one for an engine it starts itself), or set allow_unlimited_disk = true",
            ),
        });
        checks.push(match info.cgroup_version {
            Some(2) => Check::ok("cgroups", "cgroup v2"),
            Some(1) => Check::ok(
                "cgroups",
                "cgroup v1 (limits work; the engine's host uses the legacy layout)",
            ),
            _ => Check::warn(
                "cgroups",
                "the engine did not say which cgroup version it uses",
                "check `docker info` / `podman info`",
            ),
        });
        let firewall = self.firewall_check().await;
        let fenced = firewall.status == Status::Ok;
        checks.push(if caps.isolated_sandboxes || fenced {
            Check::ok(
                "isolation",
                "sandboxes cannot reach each other over the network",
            )
        } else {
            Check::warn(
                "isolation",
                format!(
                    "sandboxes of the {} backend on one network can reach each other",
                    backend.name()
                ),
                "run the server as root with the nft tool, so it installs the host \
                 firewall (see network_policy)",
            )
        });
        checks.push(firewall);
        for (name, template) in &self.inner.config.templates {
            checks.push(match backend.image_info(&template.image).await {
                Ok(Some(_)) => Check::ok(
                    &format!("template:{name}"),
                    format!("image {} is present", template.image),
                ),
                Ok(None) => Check::warn(
                    &format!("template:{name}"),
                    format!(
                        "image {} is not present; the first create pulls it (or fails where \
                         no registry is reachable)",
                        template.image
                    ),
                    "build the default templates offline with `bash deploy/images.sh` (and \
                     code-interpreter-v1 with `colima-e2b prepare`), or pull the image",
                ),
                Err(e) => Check::fail(
                    &format!("template:{name}"),
                    format!("image {} cannot be inspected: {e}", template.image),
                    "check the engine",
                ),
            });
        }
        checks.push(self.state_dir_check());
        checks
    }

    /// Whether the host firewall for the sandbox networks is installed.
    async fn firewall_check(&self) -> Check {
        use crate::network::{FirewallStatus, HostFirewall};
        // A started server keeps the status current; `doctor` asks the host itself.
        let status = match self.started_firewall_status() {
            Some(status) => status,
            None => {
                let firewall = HostFirewall::new(self.inner.config.network.clone());
                match self.inner.backend.host_networks().await {
                    Ok(networks) => firewall.status(&networks).await,
                    Err(e) => {
                        return Check::warn(
                            "network_policy",
                            format!("the sandbox networks could not be read: {e}"),
                            "check the engine",
                        )
                    }
                }
            }
        };
        match status {
            FirewallStatus::Active {
                table,
                interfaces,
                gaps,
            } if gaps.is_empty() => Check::ok(
                "network_policy",
                format!(
                    "active (nft table inet {table} on {}): sandboxes cannot reach this host, \
                     private networks or each other",
                    interfaces.join(" ")
                ),
            ),
            FirewallStatus::Active { gaps, .. } => Check::warn(
                "network_policy",
                format!("active, with gaps: {}", gaps.join("; ")),
                "modprobe br_netfilter; sysctl -w net.bridge.bridge-nf-call-iptables=1 \
                 net.bridge.bridge-nf-call-ip6tables=1",
            ),
            FirewallStatus::Inactive(why) => Check::warn(
                "network_policy",
                format!("inactive: {why}"),
                "run the server as root on the engine's host with the nft tool installed \
                 (it installs the rules at start); Colima: the rules would have to live in \
                 its VM",
            ),
            FirewallStatus::Off => Check::warn(
                "network_policy",
                "network.firewall = \"off\": sandboxes reach this host, private networks \
                 and each other as the engine lets them",
                "remove network.firewall = \"off\"",
            ),
        }
    }

    fn state_dir_check(&self) -> Check {
        let Some(dir) = &self.inner.config.state_dir else {
            return Check::warn(
                "state_dir",
                "no state directory: deadline changes and creates in flight are not kept \
                 across restarts",
                "set state_dir (or HOME)",
            );
        };
        let probe = dir.join(format!(".doctor-{}", std::process::id()));
        let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"x"));
        let _ = std::fs::remove_file(&probe);
        match written {
            Ok(()) => Check::ok("state_dir", format!("{} is writable", dir.display())),
            Err(e) => Check::fail(
                "state_dir",
                format!("{} is not writable: {e}", dir.display()),
                "fix its permissions or set state_dir",
            ),
        }
    }
}
