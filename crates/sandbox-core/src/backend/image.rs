//! Images: references, and deriving an image from a base plus files (how the agent gets
//! into every template). The derivation algorithm is written once here; each backend
//! supplies the engine steps ([`DeriveSteps`]).

use std::collections::BTreeMap;
use std::time::Instant;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::types::SandboxId;

/// Label on the temporary containers of a derivation (so leftovers can be found).
pub const DERIVE_LABEL: &str = "dev.colima-e2b.derive";

/// Splits `repo[:tag]` (a registry port is not a tag; a digest stays with the repo);
/// the tag defaults to `latest`.
pub fn split_image(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    }
}

/// One file to add to a derived image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// Absolute path inside the image.
    pub path: String,
    /// Contents.
    pub contents: std::sync::Arc<[u8]>,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

/// A symbolic link to add to a derived image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLink {
    /// Absolute path of the link inside the image.
    pub path: String,
    /// What it points to.
    pub target: String,
}

/// An image to derive from a base image: the base plus files, with a new entrypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeriveImage {
    /// Local base image reference.
    pub base: String,
    /// Reference (`repo:tag`) of the image to produce.
    pub tag: String,
    /// Files to add (owned by root).
    pub files: Vec<ImageFile>,
    /// Symbolic links to add.
    pub links: Vec<ImageLink>,
    /// New entrypoint; the derived image has no CMD.
    pub entrypoint: Vec<String>,
    /// Labels added to the image.
    pub labels: BTreeMap<String, String>,
}

impl DeriveImage {
    /// The files as an uncompressed tar archive rooted at `/`, for engines' archive APIs.
    pub fn tar(&self) -> std::io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        let relative = |path: &str| {
            let rel = path.trim_start_matches('/');
            if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("image file path {path:?} must be absolute and normal"),
                ));
            }
            Ok(rel.to_string())
        };
        let header = |kind: tar::EntryType, mode: u32, size: usize| {
            let mut header = tar::Header::new_ustar();
            header.set_size(size as u64);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(kind);
            header
        };
        for file in &self.files {
            let mut h = header(tar::EntryType::Regular, file.mode, file.contents.len());
            builder.append_data(&mut h, relative(&file.path)?, &file.contents[..])?;
        }
        for link in &self.links {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            builder.append_link(&mut h, relative(&link.path)?, &link.target)?;
        }
        builder.into_inner()
    }

    /// Dockerfile-style changes both engines' commit APIs accept.
    pub fn commit_changes(&self) -> Vec<String> {
        let quote = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        let mut changes = vec![
            format!("ENTRYPOINT {}", quote(&self.entrypoint)),
            // A base image's CMD would otherwise become the entrypoint's arguments.
            "CMD []".to_string(),
        ];
        // Unquoted where safe: Podman's parser and Docker's differ on quoting.
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b))
        };
        let word = |s: &str| {
            if plain(s) {
                s.to_string()
            } else {
                serde_json::to_string(s).unwrap_or_default()
            }
        };
        for (k, v) in &self.labels {
            changes.push(format!("LABEL {}={}", word(k), word(v)));
        }
        changes
    }
}

/// The engine steps of [`derive_with`]; both engines have them.
#[async_trait]
pub trait DeriveSteps: Send + Sync {
    /// Whether an image tagged `tag` exists locally.
    async fn image_exists(&self, tag: &str) -> Result<bool>;
    /// Creates (never starts) container `name` from `base` with `entrypoint`, no network
    /// and `labels`. A missing base image is [`Error::NotFound`].
    async fn create_stopped(
        &self,
        name: &str,
        base: &str,
        entrypoint: &[String],
        labels: &BTreeMap<String, String>,
    ) -> Result<()>;
    /// Extracts the uncompressed tar `archive` at `/` in container `name`.
    async fn upload(&self, name: &str, archive: Vec<u8>) -> Result<()>;
    /// Commits container `name` as `repo:tag` with Dockerfile-style `changes`, frozen
    /// for the capture when `pause` (a running container).
    async fn commit(
        &self,
        name: &str,
        repo: &str,
        tag: &str,
        changes: &[String],
        pause: bool,
    ) -> Result<()>;
    /// Force-removes container `name`.
    async fn remove_temporary(&self, name: &str) -> Result<()>;
}

/// Commits sandbox container `name` as `image` with `labels` set on it, frozen for the
/// capture when `running`, and reports the image (see
/// [`crate::SandboxBackend::snapshot`]).
pub async fn snapshot_with<B: DeriveSteps + crate::SandboxBackend>(
    backend: &B,
    name: &str,
    image: &str,
    labels: &BTreeMap<String, String>,
    running: bool,
) -> Result<crate::backend::ImageInfo> {
    let (repo, tag) = split_image(image);
    let changes: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("LABEL {k}={}", serde_json::Value::from(v.as_str())))
        .collect();
    backend.commit(name, repo, tag, &changes, running).await?;
    backend
        .image_info(image)
        .await?
        .ok_or_else(|| Error::not_found(format!("image {image} (just committed)")))
}

/// Derives `req.tag` (see [`crate::SandboxBackend::derive_image`]): reuses an existing
/// tag; otherwise creates a stopped container from the base, uploads the files, commits
/// it, and removes the container whatever happened.
pub async fn derive_with(steps: &dyn DeriveSteps, req: &DeriveImage) -> Result<()> {
    if steps.image_exists(&req.tag).await? {
        return Ok(());
    }
    let archive = req
        .tar()
        .map_err(|e| Error::InvalidArgument(format!("image {}: {e}", req.tag)))?;
    let temp = format!("colima-e2b-derive-{}", SandboxId::generate());
    let labels = BTreeMap::from([(DERIVE_LABEL.to_string(), "true".to_string())]);
    let started = Instant::now();
    steps
        .create_stopped(&temp, &req.base, &req.entrypoint, &labels)
        .await?;
    let (repo, tag) = split_image(&req.tag);
    let result = async {
        steps.upload(&temp, archive).await?;
        steps
            .commit(&temp, repo, tag, &req.commit_changes(), false)
            .await
    }
    .await;
    match steps.remove_temporary(&temp).await {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(container = %temp, error = %e, "could not remove the derive container")
        }
    }
    if result.is_ok() {
        tracing::info!(base = %req.base, image = %req.tag,
            elapsed_ms = started.elapsed().as_millis() as u64, "derived image");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_into_repo_and_tag() {
        assert_eq!(
            split_image("colima-e2b/base:latest"),
            ("colima-e2b/base", "latest")
        );
        assert_eq!(split_image("python"), ("python", "latest"));
        assert_eq!(
            split_image("registry:5000/x/y"),
            ("registry:5000/x/y", "latest")
        );
        assert_eq!(
            split_image("registry:5000/x/y:3.12"),
            ("registry:5000/x/y", "3.12")
        );
        assert_eq!(split_image("x@sha256:ab"), ("x@sha256:ab", ""));
    }

    #[test]
    fn derived_files_must_be_absolute_and_normal() {
        let req = |path: &str| DeriveImage {
            base: "b".into(),
            tag: "t".into(),
            files: vec![ImageFile {
                path: path.into(),
                contents: std::sync::Arc::from(&b"x"[..]),
                mode: 0o755,
            }],
            links: vec![ImageLink {
                path: "/usr/local/bin/link".into(),
                target: "agent".into(),
            }],
            entrypoint: vec![],
            labels: BTreeMap::new(),
        };
        let tar = req("/usr/local/bin/agent").tar().expect("tar");
        let mut archive = tar::Archive::new(&tar[..]);
        let kinds: Vec<(String, tar::EntryType)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let path = e.path().expect("path").to_string_lossy().into_owned();
                (path, e.header().entry_type())
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("usr/local/bin/agent".to_string(), tar::EntryType::Regular),
                ("usr/local/bin/link".to_string(), tar::EntryType::Symlink),
            ]
        );
        for bad in ["/", "/a/../b", "/a//b", "relative/.."] {
            assert!(req(bad).tar().is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_changes_set_the_entrypoint_clear_cmd_and_quote_odd_labels() {
        let req = DeriveImage {
            base: "b".into(),
            tag: "t".into(),
            files: vec![],
            links: vec![],
            entrypoint: vec!["/usr/local/bin/sandbox-agent".into()],
            labels: BTreeMap::from([
                (
                    "dev.colima-e2b.derived-from".to_string(),
                    "a/b:c".to_string(),
                ),
                ("odd".to_string(), "with space".to_string()),
            ]),
        };
        let changes = req.commit_changes();
        assert_eq!(changes[0], r#"ENTRYPOINT ["/usr/local/bin/sandbox-agent"]"#);
        assert_eq!(changes[1], "CMD []");
        assert!(changes.contains(&"LABEL dev.colima-e2b.derived-from=a/b:c".to_string()));
        assert!(changes.contains(&r#"LABEL odd="with space""#.to_string()));
    }
}
