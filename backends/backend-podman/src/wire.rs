//! Translation between colima-e2b types and libpod JSON.
//!
//! Requests and responses go through `serde_json::Value` rather than podman-api's typed
//! models on purpose:
//! - its create builder sends `no_new_privilages` (sic), which libpod silently ignores, so
//!   the typed path would drop `no-new-privileges` without an error;
//! - its inspect and list models target libpod 4.3.1 and fail to deserialise Podman 5
//!   answers (e.g. `Config.StopSignal` became a string).
//!
//! Every field is read with a fallback, so an unexpected shape yields "unknown", not an error.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use sandbox_core::{ContainerInfo, ContainerSpec, Error, Limits, Result, SandboxState};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::PodmanConfig;

/// CFS period used for the CPU quota, in microseconds.
pub const CPU_PERIOD: u64 = 100_000;
/// Label keeping a container's disk quota, which libpod's inspect does not report.
pub const DISK_LABEL: &str = "dev.colima-e2b.podman.disk-mb";

/// Whether libpod's storage enforces `storage_opts.size`: btrfs and zfs always, overlay
/// only on XFS (with project quotas, which libpod does not report; without them every
/// sized create fails, naming the mount option).
pub fn storage_has_quota(info: &Value) -> bool {
    let driver = str_at(info, &["store", "graphDriverName"]).unwrap_or_default();
    let backing = str_at(info, &["store", "graphStatus", "Backing Filesystem"]).unwrap_or_default();
    match driver {
        "btrfs" | "zfs" => true,
        "overlay" => backing == "xfs",
        _ => false,
    }
}

/// Where the sandbox is attached and whether its agent port is published on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Network to attach to.
    pub network: String,
    /// Publish `agent_port` on 127.0.0.1 with an ephemeral host port.
    pub publish_agent_port: bool,
}

/// The libpod `SpecGenerator` body for `spec` with the baseline profile applied.
pub fn create_body(
    spec: &ContainerSpec,
    config: &PodmanConfig,
    place: &Placement,
) -> Result<Value> {
    spec.limits.validate()?;
    let profile = &spec.profile;
    let mut env = Map::new();
    for entry in &spec.env {
        // libpod takes a map; a bare `KEY` would mean "inherit from the host" elsewhere.
        let (k, v) = entry.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!("environment entry {entry:?} is not KEY=VALUE"))
        })?;
        env.insert(k.to_string(), Value::String(v.to_string()));
    }
    let memory = spec.limits.memory_mb.saturating_mul(1024 * 1024);
    let quota = (spec.limits.cpus * CPU_PERIOD as f64).round() as i64;
    let mut networks = Map::new();
    networks.insert(place.network.clone(), json!({}));
    let mut labels = spec.labels.clone();
    if let Some(mb) = spec.limits.disk_mb {
        labels.insert(DISK_LABEL.to_string(), mb.to_string());
    }
    let mut body = json!({
        "name": spec.name,
        "image": spec.image,
        "env": env,
        "labels": labels,
        "shm_size": profile.shm_bytes,
        "privileged": false,
        "cap_drop": ["ALL"],
        "cap_add": profile.capabilities,
        "no_new_privileges": true,
        "seccomp_policy": "default",
        // Never inherit anything from the host or the podman service environment.
        "env_host": false,
        "httpproxy": false,
        "resource_limits": {
            // OCI `swap` is memory + swap: equal values mean no swap at all.
            "memory": { "limit": memory, "swap": memory },
            "cpu": { "quota": quota, "period": CPU_PERIOD },
            "pids": { "limit": spec.limits.pids },
        },
        "hostname": profile.hostname,
        "r_limits": [
            { "type": "nofile", "soft": profile.nofile, "hard": profile.nofile },
            // Given explicitly: libpod otherwise raises nproc to its own maximum, which
            // runc cannot set where the host's hard limit is lower.
            { "type": "nproc", "soft": config.ulimit_nproc, "hard": config.ulimit_nproc },
            { "type": "fsize", "soft": profile.max_file_size, "hard": profile.max_file_size },
        ],
        "log_configuration": log_config(config, profile.log_max_bytes),
        "netns": { "nsmode": "bridge" },
        // Podman's default on cgroup v1 is the host's cgroup namespace.
        "cgroupns": { "nsmode": "private" },
        "Networks": networks,
    });
    if !spec.command.is_empty() {
        // The command is the whole main process: an image entrypoint must not wrap it.
        // No command runs the image's own entrypoint (the agent, in derived images).
        body["command"] = json!(spec.command);
        body["entrypoint"] = json!([]);
    }
    if let Some(user) = &spec.user {
        body["user"] = json!(user);
    }
    if !spec.volumes.is_empty() {
        // Named volumes, read-write; `nocopy`: the image's files at the path stay out.
        body["volumes"] = Value::Array(
            spec.volumes
                .iter()
                .map(|v| json!({ "Name": v.volume, "Dest": v.path, "Options": ["nocopy"] }))
                .collect(),
        );
    }
    if let Some(mb) = spec.limits.disk_mb {
        body["storage_opts"] = json!({ "size": format!("{mb}m") });
    }
    if let (Some(port), true) = (spec.agent_port, place.publish_agent_port) {
        body["portmappings"] = json!([{
            "host_ip": "127.0.0.1",
            "container_port": port,
            "host_port": 0,
            "protocol": "tcp",
        }]);
    }
    Ok(body)
}

fn log_config(config: &PodmanConfig, max_bytes: u64) -> Value {
    if config.log_driver == "k8s-file" {
        // conmon truncates the file at `size`, so container output cannot fill the disk.
        json!({ "driver": "k8s-file", "size": max_bytes })
    } else {
        json!({ "driver": config.log_driver })
    }
}

/// Maps a libpod state name to a sandbox state.
pub fn state(s: &str) -> SandboxState {
    match s.to_ascii_lowercase().as_str() {
        "created" | "configured" | "initialized" => SandboxState::Created,
        "running" => SandboxState::Running,
        "paused" => SandboxState::Paused,
        _ => SandboxState::Exited,
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn num_at(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn labels_of(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_time(s: Option<&str>) -> Option<OffsetDateTime> {
    s.and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
}

/// Limits as applied by the engine, from `HostConfig` of an inspect answer.
pub fn applied_limits(inspect: &Value) -> Option<Limits> {
    let host = inspect.get("HostConfig")?;
    let nano = num_at(host, &["NanoCpus"]).unwrap_or(0.0);
    let cpus = if nano > 0.0 {
        nano / 1e9
    } else {
        let quota = num_at(host, &["CpuQuota"]).unwrap_or(0.0);
        let period = num_at(host, &["CpuPeriod"]).unwrap_or(0.0);
        if quota <= 0.0 || period <= 0.0 {
            return None;
        }
        quota / period
    };
    let memory = num_at(host, &["Memory"])?;
    let pids = num_at(host, &["PidsLimit"])?;
    if memory <= 0.0 || pids <= 0.0 {
        // Unlimited: report nothing rather than a made-up limit.
        return None;
    }
    Some(Limits {
        cpus,
        memory_mb: (memory as u64) / (1024 * 1024),
        pids: pids as i64,
        disk_mb: None,
    })
}

/// A [`ContainerInfo`] from a `GET /libpod/containers/{name}/json` answer.
pub fn info_from_inspect(v: &Value) -> ContainerInfo {
    ContainerInfo {
        id: str_at(v, &["Id"]).unwrap_or_default().to_string(),
        name: str_at(v, &["Name"])
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: str_at(v, &["ImageName"])
            .or_else(|| str_at(v, &["Config", "Image"]))
            .unwrap_or_default()
            .to_string(),
        labels: labels_of(v.get("Config").and_then(|c| c.get("Labels"))),
        state: state(str_at(v, &["State", "Status"]).unwrap_or("unknown")),
        created_at: parse_time(str_at(v, &["Created"])),
        limits: applied_limits(v).map(|l| Limits {
            disk_mb: labels_of(v.get("Config").and_then(|c| c.get("Labels")))
                .get(DISK_LABEL)
                .and_then(|mb| mb.parse().ok()),
            ..l
        }),
        env: v
            .get("Config")
            .and_then(|c| c.get("Env"))
            .and_then(Value::as_array)
            .map(|e| {
                e.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A [`ContainerInfo`] from one entry of `GET /libpod/containers/json` (no limits there).
pub fn info_from_list(v: &Value) -> ContainerInfo {
    let name = v
        .get("Names")
        .and_then(Value::as_array)
        .and_then(|n| n.first())
        .and_then(Value::as_str)
        .unwrap_or_default();
    // `Created` is RFC 3339 in libpod 4.x; `CreatedAt` is a Docker-like string elsewhere.
    let created_at = parse_time(str_at(v, &["Created"])).or_else(|| {
        num_at(v, &["Created"]).and_then(|s| OffsetDateTime::from_unix_timestamp(s as i64).ok())
    });
    ContainerInfo {
        id: str_at(v, &["Id"]).unwrap_or_default().to_string(),
        name: name.trim_start_matches('/').to_string(),
        image: str_at(v, &["Image"]).unwrap_or_default().to_string(),
        labels: labels_of(v.get("Labels")),
        state: state(str_at(v, &["State"]).unwrap_or("unknown")),
        created_at,
        limits: None,
        env: Vec::new(),
    }
}

/// The 127.0.0.1 host port publishing `port/tcp`, if any.
pub fn published_port(inspect: &Value, port: u16) -> Option<u16> {
    let key = format!("{port}/tcp");
    let bindings = inspect
        .get("NetworkSettings")
        .and_then(|n| n.get("Ports"))
        .and_then(|p| p.get(&key))
        .and_then(Value::as_array)?;
    bindings.iter().find_map(|b| {
        let ip = b.get("HostIp").and_then(Value::as_str).unwrap_or("");
        let loopback_reachable = matches!(ip, "" | "0.0.0.0" | "127.0.0.1");
        let host_port = b.get("HostPort").and_then(Value::as_str)?.parse().ok()?;
        (loopback_reachable && host_port != 0).then_some(host_port)
    })
}

/// The container's IPv4 addresses by network name.
pub fn container_ips(inspect: &Value) -> Vec<(String, Ipv4Addr)> {
    inspect
        .get("NetworkSettings")
        .and_then(|n| n.get("Networks"))
        .and_then(Value::as_object)
        .map(|nets| {
            nets.iter()
                .filter_map(|(name, n)| {
                    let ip = n.get("IPAddress")?.as_str()?.parse().ok()?;
                    Some((name.clone(), ip))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `ip` is on a subnet directly attached to this host (a bridge the engine made),
/// read from `/proc/net/route` text. The default route never counts: a container address
/// reached through it would leave the machine instead of reaching the container.
pub fn directly_routed(proc_net_route: &str, ip: Ipv4Addr) -> bool {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    proc_net_route.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dest), Some(gw), Some(flags), Some(mask)) = (
            f.get(1).and_then(|s| hex(s)),
            f.get(2).and_then(|s| hex(s)),
            f.get(3).and_then(|s| hex(s)),
            f.get(7).and_then(|s| hex(s)),
        ) else {
            return false;
        };
        // /proc prints the addresses in native byte order.
        let dest = u32::from_be_bytes(dest.to_ne_bytes());
        let mask = u32::from_be_bytes(mask.to_ne_bytes());
        flags & RTF_UP != 0
            && flags & RTF_GATEWAY == 0
            && gw == 0
            && mask != 0
            && u32::from(ip) & mask == dest & mask
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "c1".into(),
            image: "img".into(),
            command: vec!["sleep".into(), "infinity".into()],
            env: vec!["A=1".into(), "B=x=y".into()],
            labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
            limits: Limits {
                cpus: 0.25,
                memory_mb: 96,
                pids: 50,
                disk_mb: None,
            },
            internet: true,
            user: Some("user".into()),
            agent_port: Some(49983),
            profile: Default::default(),
            volumes: Vec::new(),
        }
    }

    #[test]
    fn create_body_applies_the_baseline_profile() {
        let place = Placement {
            network: "net".into(),
            publish_agent_port: true,
        };
        let b = create_body(&spec(), &PodmanConfig::default(), &place).expect("body");
        assert_eq!(b["privileged"], json!(false));
        assert_eq!(b["no_new_privileges"], json!(true));
        assert_eq!(b["cap_drop"], json!(["ALL"]));
        assert_eq!(b["env"], json!({"A": "1", "B": "x=y"}));
        assert_eq!(b["resource_limits"]["cpu"]["quota"], json!(25_000));
        assert_eq!(
            b["resource_limits"]["memory"]["swap"],
            json!(96 * 1024 * 1024)
        );
        assert_eq!(b["resource_limits"]["pids"]["limit"], json!(50));
        assert_eq!(b["Networks"], json!({"net": {}}));
        assert_eq!(b["portmappings"][0]["host_ip"], json!("127.0.0.1"));
        assert_eq!(b["user"], json!("user"));
        // The typo in podman-api's builder must not creep in.
        assert!(b.get("no_new_privilages").is_none());
    }

    #[test]
    fn env_without_equals_is_rejected() {
        let mut s = spec();
        s.env = vec!["NOVALUE".into()];
        let place = Placement {
            network: "n".into(),
            publish_agent_port: false,
        };
        assert!(matches!(
            create_body(&s, &PodmanConfig::default(), &place),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn podman5_inspect_with_string_stop_signal_is_read() {
        let v = json!({
            "Id": "abc", "Name": "c1", "ImageName": "localhost/img:latest",
            "Created": "2026-01-02T03:04:05.123456789Z",
            "State": {"Status": "paused"},
            "Config": {"Labels": {"k": "tést"}, "StopSignal": "SIGTERM"},
            "HostConfig": {"NanoCpus": 0, "CpuQuota": 25000, "CpuPeriod": 100000,
                           "Memory": 100663296, "PidsLimit": 50},
        });
        let info = info_from_inspect(&v);
        assert_eq!(info.state, SandboxState::Paused);
        assert_eq!(info.labels.get("k").map(String::as_str), Some("tést"));
        assert!(info.created_at.is_some());
        assert_eq!(
            info.limits,
            Some(Limits {
                cpus: 0.25,
                memory_mb: 96,
                pids: 50,
                disk_mb: None,
            })
        );
    }

    #[test]
    fn unlimited_or_missing_limits_are_none() {
        assert_eq!(applied_limits(&json!({})), None);
        let v = json!({"HostConfig": {"NanoCpus": 1e9, "Memory": 0, "PidsLimit": 50}});
        assert_eq!(applied_limits(&v), None);
    }

    #[test]
    fn states_map() {
        for (s, want) in [
            ("created", SandboxState::Created),
            ("configured", SandboxState::Created),
            ("initialized", SandboxState::Created),
            ("running", SandboxState::Running),
            ("paused", SandboxState::Paused),
            ("exited", SandboxState::Exited),
            ("stopping", SandboxState::Exited),
            ("removing", SandboxState::Exited),
        ] {
            assert_eq!(state(s), want, "{s}");
        }
    }

    #[test]
    fn published_port_prefers_loopback_bindings() {
        let v = json!({"NetworkSettings": {"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40001"}]}}});
        assert_eq!(published_port(&v, 8000), Some(40001));
        assert_eq!(published_port(&v, 8001), None);
    }

    #[test]
    fn only_directly_attached_subnets_count_as_routed() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            cni-podman1\t0000590A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            assert!(directly_routed(table, Ipv4Addr::new(10, 89, 0, 3)));
            assert!(!directly_routed(table, Ipv4Addr::new(10, 89, 1, 3)));
            assert!(!directly_routed(table, Ipv4Addr::new(8, 8, 8, 8)));
        }
    }
}
