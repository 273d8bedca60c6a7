//! A sandbox's disk usage as its quota counts it. The agent sees only its filesystem,
//! which on some storages (btrfs) is the engine's whole one; the engine knows the
//! container's own size, but takes a while to add it up (it walks the layer), so the
//! answer is kept for a while and bounded in time.

use std::time::{Duration, Instant};

use super::{lock, SandboxManager};
use crate::labels;
use crate::types::{SandboxId, SandboxInfo};

/// How long a usage read from the engine is reused.
const FRESH_FOR: Duration = Duration::from_secs(30);
/// How long one read from the engine may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

impl SandboxManager {
    /// Sandbox `id`'s disk as (used, total) bytes, given what its agent sees of its
    /// filesystem. With a quota, the total is the quota and the usage what the engine
    /// counts against it (the filesystem's figure, capped at the quota, when the engine
    /// does not say in time); without one, the agent's figures.
    pub async fn disk(&self, info: &SandboxInfo, fs_used: u64, fs_total: u64) -> (u64, u64) {
        let Some(mb) = info.limits.disk_mb else {
            return (fs_used, fs_total);
        };
        let total = mb << 20;
        let used = match self.disk_used(&info.id).await {
            Some(bytes) => bytes,
            None => fs_used.min(total),
        };
        (used, total)
    }

    /// [`disk`](Self::disk) without waiting for the engine: the last figure it gave (or
    /// the filesystem's, capped at the quota), with a read in the background when that
    /// is stale. The periodic sampler uses it, so one slow engine read (Podman adds up a
    /// large container for seconds) does not hold up every sandbox's sample.
    pub(super) fn disk_without_waiting(
        &self,
        info: &SandboxInfo,
        fs_used: u64,
        fs_total: u64,
    ) -> (u64, u64) {
        let Some(mb) = info.limits.disk_mb else {
            return (fs_used, fs_total);
        };
        let total = mb << 20;
        let cached = lock(&self.inner.disk_used).get(&info.id).cloned();
        if cached.is_none_or(|(at, _)| at.elapsed() >= FRESH_FOR)
            && lock(&self.inner.disk_refreshing).insert(info.id.clone())
        {
            let (manager, id) = (self.clone(), info.id.clone());
            tokio::spawn(async move {
                manager.disk_used(&id).await;
                lock(&manager.inner.disk_refreshing).remove(&id);
            });
        }
        let used = cached.map_or(fs_used.min(total), |(_, bytes)| bytes);
        (used, total)
    }

    /// Bytes of sandbox `id`'s storage that its disk quota counts, when the engine says
    /// (in time); a value up to [`FRESH_FOR`] old may be given.
    async fn disk_used(&self, id: &SandboxId) -> Option<u64> {
        let cached = lock(&self.inner.disk_used).get(id).cloned();
        if let Some((at, bytes)) = cached {
            if at.elapsed() < FRESH_FOR {
                return Some(bytes);
            }
        }
        let name = labels::container_name(id);
        let read = tokio::time::timeout(READ_TIMEOUT, self.inner.backend.disk_usage(&name));
        match read.await {
            Ok(Ok(Some(bytes))) => {
                // Sandboxes that are gone leave no entries behind.
                let live: Vec<SandboxId> = self.registry().sandboxes.keys().cloned().collect();
                let mut cache = lock(&self.inner.disk_used);
                cache.retain(|k, _| live.contains(k));
                cache.insert(id.clone(), (Instant::now(), bytes));
                Some(bytes)
            }
            _ => cached.map(|(_, bytes)| bytes),
        }
    }
}
