//! Template images: a template's image is made available (pulled when missing), and with
//! the agent, the image sandboxes really run is derived from it once per (template image
//! and its engine id, agent build) and reused, also across restarts (the backend keeps a
//! tag).

use super::{lock, SandboxManager};
use crate::agent::AgentBinary;
use crate::error::{Error, Result};
use crate::labels;

/// A template's image as sandboxes run it.
pub(super) struct RunImage {
    /// Its reference.
    pub name: String,
    /// Its size, bytes, when the engine said.
    pub size: Option<u64>,
    /// Bytes snapshots added to it over the template image their chain started from.
    pub carried: u64,
}

/// What snapshots added to `image` over their chain's first image (0 for an image
/// that is no snapshot).
pub(super) fn carried_bytes(image: &crate::backend::ImageInfo) -> u64 {
    let origin = image
        .labels
        .get(labels::ORIGIN_BYTES)
        .and_then(|v| v.parse::<u64>().ok());
    match (origin, image.size) {
        (Some(origin), Some(size)) => size.saturating_sub(origin),
        _ => 0,
    }
}

impl SandboxManager {
    fn derived_ready(&self, tag: &str) -> bool {
        lock(&self.inner.derived_ready).contains(tag)
    }

    /// Forgets that derived `image` was seen (it vanished from the engine).
    pub(super) fn forget_image(&self, image: &str) {
        lock(&self.inner.derived_ready).remove(image);
    }

    /// The image a sandbox of template image `base` runs: `base` itself without the
    /// agent, else the image derived from it with the agent as entrypoint.
    pub(super) async fn template_image(&self, base: &str) -> Result<RunImage> {
        // Asked every time (one inspect): a name given to a new image (rebuilt, pulled
        // again) is seen at the next create, and derived anew.
        let info = match self.inner.backend.image_info(base).await? {
            Some(info) => info,
            None => self.inner.backend.ensure_image(base).await?,
        };
        match &self.inner.config.agent {
            // A snapshot carries the agent already.
            Some(agent) if agent.carried_by(&info) => Ok(RunImage {
                name: base.to_string(),
                size: info.size,
                carried: carried_bytes(&info),
            }),
            Some(agent) => {
                let name = self.derived_image(base, info.id.as_deref(), agent).await?;
                // The derived image is the base plus the agent.
                let size = info.size.map(|s| s + agent.contents().len() as u64);
                Ok(RunImage {
                    name,
                    size,
                    carried: carried_bytes(&info),
                })
            }
            None => Ok(RunImage {
                name: base.to_string(),
                size: info.size,
                carried: carried_bytes(&info),
            }),
        }
    }

    async fn derived_image(
        &self,
        base: &str,
        base_id: Option<&str>,
        agent: &AgentBinary,
    ) -> Result<String> {
        let tag = agent.derived_tag(base, base_id);
        if self.derived_ready(&tag) {
            return Ok(tag);
        }
        let _one_at_a_time = self.inner.derive_lock.lock().await;
        if self.derived_ready(&tag) {
            return Ok(tag);
        }
        let req = agent.derive_request(base, base_id);
        self.inner.backend.derive_image(&req).await?;
        lock(&self.inner.derived_ready).insert(tag.clone());
        Ok(tag)
    }

    /// Removes derived images that no template needs any more: those of another agent
    /// build, and those derived from a base whose name now means another image
    /// (rebuilt, pulled again) or nothing. Images a container uses (the engine refuses),
    /// snapshots' images (removed with their snapshot) and images younger than
    /// `prune_min_age` stay. Returns how many were removed.
    pub async fn prune_derived_images(&self) -> usize {
        let Some(agent) = &self.inner.config.agent else {
            return 0;
        };
        let backend = &self.inner.backend;
        let Ok(images) = backend.list_images(labels::DERIVED_FROM).await else {
            return 0;
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let min_age = i64::try_from(self.inner.config.prune_min_age.as_secs()).unwrap_or(i64::MAX);
        let mut removed = 0;
        for image in images {
            if image.labels.contains_key(labels::SNAPSHOT_OF) || now - image.created < min_age {
                continue;
            }
            let Some(base) = image.labels.get(labels::DERIVED_FROM) else {
                continue;
            };
            let wanted = match backend.image_info(base).await {
                Ok(Some(info)) => Some(agent.derived_tag(base, info.id.as_deref())),
                Ok(None) => None,
                Err(_) => continue, // the engine did not say: keep it
            };
            if image.tags.iter().any(|t| Some(t) == wanted.as_ref()) {
                continue;
            }
            let refs: Vec<String> = if image.tags.is_empty() {
                vec![image.id.clone()]
            } else {
                image.tags.clone()
            };
            for r in refs {
                self.forget_image(&r);
                match backend.remove_image(&r).await {
                    Ok(()) => {
                        tracing::info!(image = %r, base = %base, "removed a derived image no template needs");
                        removed += 1;
                    }
                    Err(Error::Conflict(_) | Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(image = %r, error = %e, "could not remove a stale derived image")
                    }
                }
            }
        }
        removed
    }
}
