//! Command-line flags and environment of the agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use envd_proto::SECRET_ENV;
/// Environment variable naming a file that holds the secret.
pub const SECRET_FILE_ENV: &str = "COLIMA_E2B_AGENT_SECRET_FILE";
/// Environment variable for the listen address.
pub const LISTEN_ENV: &str = "COLIMA_E2B_AGENT_LISTEN";
/// Default listen address (envd's port).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:49983";

/// Runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// When set, every user's home is this directory (tests run the agent over a temp dir).
    pub home_override: Option<PathBuf>,
    /// Directory holding passwd and group.
    pub etc_dir: PathBuf,
    /// Initial secret.
    pub secret: Option<String>,
    /// Output kept in memory per process, for readers that lag or (re)connect later.
    pub output_buffer_bytes: usize,
    /// Largest accepted upload (after decompression); None = limited by the disk only.
    pub max_upload_bytes: Option<u64>,
    /// User when a request names none.
    pub default_user: String,
    /// A stream reader that takes nothing for this long is dropped (its connection is
    /// closed after twice as long without write progress).
    pub stall_timeout: Duration,
    /// Where output that lagging readers still need is spilled (unnamed files).
    pub spill_dir: PathBuf,
    /// Spill cap per command in bytes on disk; 0 turns spilling off.
    pub spill_bytes: u64,
    /// Spill cap of all commands together in bytes on disk; 0 turns spilling off.
    pub spill_total_bytes: u64,
    /// Abstract socket of the sudo service (see [`crate::sudo`]); `None`: no sudo.
    pub sudo_socket: Option<String>,
}

/// Default `--spill-bytes`.
pub const DEFAULT_SPILL_BYTES: u64 = 256 << 20;
/// Default `--spill-total-bytes`.
pub const DEFAULT_SPILL_TOTAL_BYTES: u64 = 512 << 20;

/// Usage text.
pub const USAGE: &str = "sandbox-agent: envd-compatible in-sandbox daemon

USAGE: sandbox-agent [FLAGS]
  --listen ADDR              listen address (default 0.0.0.0:49983; env COLIMA_E2B_AGENT_LISTEN)
  --secret-file PATH         read the per-sandbox secret from PATH (env COLIMA_E2B_AGENT_SECRET_FILE)
                             (or pass it in env COLIMA_E2B_AGENT_SECRET, removed before commands run)
  --home-override DIR        use DIR as every user's home (tests)
  --etc-dir DIR              read passwd/group from DIR (default /etc)
  --default-user NAME        user when a request names none (default user)
  --output-buffer-bytes N    output kept in memory per process, for reconnecting and lagging
                             readers (default 1048576)
  --max-upload-bytes N       refuse uploads larger than N bytes with 413 (default: no cap)
  --stall-timeout-ms N       drop a stream reader that takes nothing for N ms (default 30000;
                             env COLIMA_E2B_AGENT_STALL_TIMEOUT_MS)
  --spill-dir DIR            where output that a lagging reader still needs goes once it no
                             longer fits the output buffer: files with no name (O_TMPFILE, or
                             0600 and unlinked at once), freed when no reader needs them
                             (default $TMPDIR or /tmp)
  --spill-bytes N            spill cap per process, in bytes on disk (output is framed there,
                             about 4/3 of its size); beyond it the oldest is dropped and a
                             reader that needed it ends with data_loss (default 268435456;
                             0: no spill, at least 1048576 otherwise)
  --spill-total-bytes N      spill cap of all processes together, oldest dropped first
                             (default 536870912; 0: no spill, at least 1048576 otherwise)
  --sudo-socket NAME         serve sudo on the abstract socket NAME (default, when the agent
                             is PID 1 and root: colima-e2b-sudo; empty: no sudo). Commands find
                             it by env COLIMA_E2B_SUDO_SOCKET, else the default name
  --version                  print the envd version this agent implements
";

impl Config {
    /// Parses flags (without the program name) and the environment.
    pub fn parse(args: &[String]) -> Result<Config, String> {
        let mut listen = std::env::var(LISTEN_ENV).unwrap_or_else(|_| DEFAULT_LISTEN.into());
        let mut secret_file = std::env::var(SECRET_FILE_ENV)
            .ok()
            .filter(|s| !s.is_empty());
        let mut cfg = Config {
            listen: ([0, 0, 0, 0], 49983).into(),
            home_override: None,
            etc_dir: PathBuf::from("/etc"),
            secret: std::env::var(SECRET_ENV).ok().filter(|s| !s.is_empty()),
            output_buffer_bytes: 1 << 20,
            max_upload_bytes: None,
            default_user: "user".into(),
            stall_timeout: match std::env::var(envd_proto::STALL_TIMEOUT_ENV) {
                Ok(ms) => Duration::from_millis(
                    ms.trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| {
                            format!(
                                "{}: {ms:?} is not a positive number",
                                envd_proto::STALL_TIMEOUT_ENV
                            )
                        })?,
                ),
                Err(_) => Duration::from_secs(30),
            },
            spill_dir: std::env::temp_dir(),
            spill_bytes: DEFAULT_SPILL_BYTES,
            spill_total_bytes: DEFAULT_SPILL_TOTAL_BYTES,
            // Only inside a sandbox by default: on a host it would be a way to root.
            sudo_socket: (std::process::id() == 1 && crate::sys::geteuid() == 0)
                .then(|| crate::sudo::DEFAULT_SOCKET.to_string()),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (a.as_str(), None),
            };
            let mut value = || -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag {
                "--listen" => listen = value()?,
                "--secret-file" => secret_file = Some(value()?),
                "--home-override" => cfg.home_override = Some(PathBuf::from(value()?)),
                "--etc-dir" => cfg.etc_dir = PathBuf::from(value()?),
                "--default-user" => cfg.default_user = value()?,
                "--output-buffer-bytes" => {
                    cfg.output_buffer_bytes = value()?
                        .parse()
                        .map_err(|e| format!("--output-buffer-bytes: {e}"))?
                }
                "--max-upload-bytes" => {
                    cfg.max_upload_bytes = Some(
                        value()?
                            .parse()
                            .map_err(|e| format!("--max-upload-bytes: {e}"))?,
                    )
                }
                "--stall-timeout-ms" => {
                    let ms: u64 = value()?
                        .parse()
                        .map_err(|e| format!("--stall-timeout-ms: {e}"))?;
                    if ms == 0 {
                        return Err("--stall-timeout-ms must be positive".into());
                    }
                    cfg.stall_timeout = Duration::from_millis(ms);
                }
                "--spill-dir" => cfg.spill_dir = PathBuf::from(value()?),
                "--sudo-socket" => cfg.sudo_socket = Some(value()?).filter(|s| !s.is_empty()),
                "--spill-bytes" => cfg.spill_bytes = spill_cap(flag, &value()?)?,
                "--spill-total-bytes" => cfg.spill_total_bytes = spill_cap(flag, &value()?)?,
                other => return Err(format!("unknown flag {other}\n\n{USAGE}")),
            }
        }
        cfg.listen = listen
            .parse()
            .map_err(|e| format!("bad listen address {listen:?}: {e}"))?;
        if let Some(p) = secret_file {
            let s = std::fs::read_to_string(&p).map_err(|e| format!("reading {p}: {e}"))?;
            let s = s.trim().to_string();
            if !s.is_empty() {
                cfg.secret = Some(s);
            }
        }
        Ok(cfg)
    }
}

/// A spill cap: 0 (off) or at least [`crate::spill::MIN_CAP`].
fn spill_cap(flag: &str, v: &str) -> Result<u64, String> {
    let n: u64 = v.parse().map_err(|e| format!("{flag}: {e}"))?;
    if n != 0 && n < crate::spill::MIN_CAP {
        return Err(format!(
            "{flag} must be 0 (no spill) or at least {}",
            crate::spill::MIN_CAP
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn spill_flags_default_and_parse_and_caps_are_off_or_at_least_a_mebibyte() {
        let c = parse(&[]).expect("defaults");
        assert_eq!((c.spill_bytes, c.spill_total_bytes), (256 << 20, 512 << 20));
        assert_eq!(c.spill_dir, std::env::temp_dir());
        let c = parse(&[
            "--spill-dir=/x",
            "--spill-bytes",
            "0",
            "--spill-total-bytes",
            "1048576",
        ])
        .expect("flags");
        assert_eq!(c.spill_dir, PathBuf::from("/x"));
        assert_eq!((c.spill_bytes, c.spill_total_bytes), (0, 1 << 20));
        let e = parse(&["--spill-bytes", "4096"]).expect_err("too small");
        assert!(e.contains("at least 1048576"), "{e}");
        assert!(parse(&["--spill-total-bytes", "lots"]).is_err());
    }
}
