//! Template images: a template's image is made available (pulled when missing), and with
//! the agent, the image sandboxes really run is derived from it once per (template image
//! and its engine id, agent build) and reused, also across restarts (the backend keeps a
//! tag).

use super::{lock, SandboxManager};
use crate::agent::AgentBinary;
use crate::error::Result;

/// A template's image as sandboxes run it.
pub(super) struct RunImage {
    /// Its reference.
    pub name: String,
    /// Its size, bytes, when the engine said.
    pub size: Option<u64>,
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
            }),
            Some(agent) => {
                let name = self.derived_image(base, info.id.as_deref(), agent).await?;
                // The derived image is the base plus the agent.
                let size = info.size.map(|s| s + agent.contents().len() as u64);
                Ok(RunImage { name, size })
            }
            None => Ok(RunImage {
                name: base.to_string(),
                size: info.size,
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
}
