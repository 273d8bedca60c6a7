//! Command-line flags and environment of the agent.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Environment variable holding the per-sandbox secret; removed from the environment at start.
pub const SECRET_ENV: &str = "COLIMA_E2B_AGENT_SECRET";
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
    /// Output kept per process for clients that (re)connect later.
    pub output_buffer_bytes: usize,
    /// Largest accepted upload (after decompression); None = limited by the disk only.
    pub max_upload_bytes: Option<u64>,
    /// User when a request names none.
    pub default_user: String,
}

/// Usage text.
pub const USAGE: &str = "sandbox-agent: envd-compatible in-sandbox daemon

USAGE: sandbox-agent [FLAGS]
  --listen ADDR              listen address (default 0.0.0.0:49983; env COLIMA_E2B_AGENT_LISTEN)
  --secret-file PATH         read the per-sandbox secret from PATH (env COLIMA_E2B_AGENT_SECRET_FILE)
                             (or pass it in env COLIMA_E2B_AGENT_SECRET, removed before commands run)
  --home-override DIR        use DIR as every user's home (tests)
  --etc-dir DIR              read passwd/group from DIR (default /etc)
  --default-user NAME        user when a request names none (default user)
  --output-buffer-bytes N    output kept per process for reconnecting clients (default 1048576)
  --max-upload-bytes N       refuse uploads larger than N bytes with 413 (default: no cap)
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
