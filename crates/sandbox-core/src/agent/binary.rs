//! The agent build that goes into every sandbox: its bytes, its hash, the image derived
//! from each template with it, and per-sandbox secrets.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where the agent binary lives inside a derived image (its entrypoint).
pub const AGENT_PATH: &str = "/usr/local/bin/sandbox-agent";
/// Where derived images have `sudo`: a link to the agent, ahead of `/usr/bin` in PATH.
pub const SUDO_PATH: &str = "/usr/local/bin/sudo";
/// Repository prefix of derived images.
pub const DERIVED_REPO: &str = "colima-e2b-derived";

/// One agent build: the static binary and its sha256.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentBinary {
    contents: Arc<[u8]>,
    sha256: String,
}

impl fmt::Debug for AgentBinary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBinary")
            .field("len", &self.contents.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl AgentBinary {
    /// An agent build from its bytes.
    pub fn from_bytes(contents: impl Into<Arc<[u8]>>) -> Self {
        let contents = contents.into();
        let sha256 = hex(&Sha256::digest(&contents));
        Self { contents, sha256 }
    }

    /// Reads the agent binary at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot read the agent binary {}: {e}; build it with deploy/build-agent.sh \
                 or set agent_binary (env COLIMA_E2B_AGENT_BINARY)",
                path.display()
            ))
        })?;
        match elf_interpreter(&bytes) {
            None => Err(Error::InvalidArgument(format!(
                "{} is not a 64-bit Linux executable; build the agent with deploy/build-agent.sh",
                path.display()
            ))),
            Some(true) => Err(Error::InvalidArgument(format!(
                "{} is dynamically linked, so it would not run in every template image; \
                 build the static agent with deploy/build-agent.sh",
                path.display()
            ))),
            Some(false) => Ok(Self::from_bytes(bytes)),
        }
    }

    /// The binary.
    pub fn contents(&self) -> &Arc<[u8]> {
        &self.contents
    }

    /// Lowercase hex sha256 of the binary.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The derived image for template image `base` (engine image id `base_id`):
    /// `colima-e2b-derived/<base as a repository path>:<12 hex>`, where the hex digits
    /// hash this agent build, `base` and its id, so different bases never share a tag,
    /// and a name given to a new image (rebuilt, pulled again) gets a new derivation.
    pub fn derived_tag(&self, base: &str, base_id: Option<&str>) -> String {
        let mut h = Sha256::new();
        h.update(self.sha256.as_bytes());
        h.update(b"\n");
        h.update(base.as_bytes());
        if let Some(id) = base_id {
            h.update(b"\n");
            h.update(id.as_bytes());
        }
        let digest = hex(&h.finalize());
        format!("{DERIVED_REPO}/{}:{}", repo_path(base), &digest[..12])
    }
}

impl AgentBinary {
    /// Whether image `info` already runs this agent build as its entrypoint (a
    /// snapshot, committed from a sandbox of a derived image): it needs no deriving.
    pub fn carried_by(&self, info: &crate::backend::ImageInfo) -> bool {
        info.labels.get(crate::labels::AGENT_SHA256) == Some(&self.sha256)
            && info.entrypoint.as_deref() == Some(&[AGENT_PATH.to_string()][..])
    }

    /// The derivation that puts this agent into `base` as its entrypoint, tagged
    /// [`AgentBinary::derived_tag`].
    pub fn derive_request(&self, base: &str, base_id: Option<&str>) -> crate::backend::DeriveImage {
        crate::backend::DeriveImage {
            base: base.to_string(),
            tag: self.derived_tag(base, base_id),
            files: vec![crate::backend::ImageFile {
                path: AGENT_PATH.into(),
                contents: self.contents.clone(),
                mode: 0o755,
            }],
            // The agent is `sudo` too (see the agent's `sudo` module).
            links: vec![crate::backend::ImageLink {
                path: SUDO_PATH.into(),
                target: AGENT_PATH.into(),
            }],
            entrypoint: vec![AGENT_PATH.into()],
            labels: std::collections::BTreeMap::from([
                (crate::labels::AGENT_SHA256.to_string(), self.sha256.clone()),
                (crate::labels::DERIVED_FROM.to_string(), base.to_string()),
            ]),
        }
    }
}

/// For a little-endian ELF64 file: whether it names a program interpreter (is dynamically
/// linked). `None` when it is not such a file.
fn elf_interpreter(b: &[u8]) -> Option<bool> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// `base` as a valid repository path: lowercase alphanumerics in components separated by
/// single `-`, `.` or `_`; anything else (`:`, `@`, ...) becomes `-`.
fn repo_path(base: &str) -> String {
    let components: Vec<String> = base
        .split('/')
        .map(|c| {
            let mut out = String::new();
            let mut pending_sep: Option<char> = None;
            for ch in c.chars().map(|c| c.to_ascii_lowercase()) {
                if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
                    if let Some(sep) = pending_sep.take() {
                        if !out.is_empty() {
                            out.push(sep);
                        }
                    }
                    out.push(ch);
                } else {
                    let sep = if matches!(ch, '.' | '_' | '-') {
                        ch
                    } else {
                        '-'
                    };
                    pending_sep.get_or_insert(sep);
                }
            }
            out
        })
        .filter(|c| !c.is_empty())
        .collect();
    if components.is_empty() {
        "image".into()
    } else {
        components.join("/")
    }
}

/// A fresh per-sandbox secret: 32 lowercase hex characters (128 random bits).
pub fn generate_secret() -> String {
    generate_hex(16)
}

/// `bytes` random bytes from the OS, as lowercase hex.
pub fn generate_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    // getrandom only fails when the OS has no entropy source at all.
    getrandom::fill(&mut raw).expect("the OS random source is available");
    hex(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_tags_are_valid_references_and_differ_by_base_and_build() {
        let a = AgentBinary::from_bytes(b"\x7fELF one".to_vec());
        let b = AgentBinary::from_bytes(b"\x7fELF two".to_vec());
        let tag = a.derived_tag("colima-e2b/base:latest", None);
        assert!(
            tag.starts_with("colima-e2b-derived/colima-e2b/base-latest:"),
            "{tag}"
        );
        assert_eq!(tag.rsplit(':').next().map(str::len), Some(12));
        assert_eq!(tag, a.derived_tag("colima-e2b/base:latest", None));
        assert_ne!(tag, b.derived_tag("colima-e2b/base:latest", None));
        assert_ne!(
            a.derived_tag("foo/bar:latest", None),
            a.derived_tag("foo-bar:latest", None)
        );
        // The same name on a new image derives anew.
        assert_ne!(
            a.derived_tag("colima-e2b/base:latest", Some("sha256:1")),
            a.derived_tag("colima-e2b/base:latest", Some("sha256:2"))
        );
        assert_eq!(
            repo_path("Registry.io:5000/A__b/c@sha256:ab"),
            "registry.io-5000/a_b/c-sha256-ab"
        );
    }

    #[test]
    fn only_static_elf_executables_load() {
        let dir = std::env::temp_dir().join(format!("agent-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let text = dir.join("text");
        std::fs::write(&text, b"#!/bin/sh\n").expect("write");
        assert!(AgentBinary::load(&text).is_err());
        let missing = AgentBinary::load(&dir.join("missing")).expect_err("missing");
        assert!(
            missing.to_string().contains("deploy/build-agent.sh"),
            "{missing}"
        );
        // /bin/sh on this machine is a dynamically linked ELF64.
        if let Ok(sh) = std::fs::read("/bin/sh") {
            assert_eq!(elf_interpreter(&sh), Some(true));
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secrets_are_32_hex_chars_and_unique() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
