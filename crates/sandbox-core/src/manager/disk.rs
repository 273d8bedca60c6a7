//! A sandbox's disk usage as its quota counts it. The agent sees only its filesystem,
//! which on some storages (btrfs) is the engine's whole one; the engine knows the
//! container's own size, but takes a while to add it up (it walks the layer: Podman
//! takes 18 s for a 1 GB image on btrfs, and goes on walking when its client gives up).
//! So one read per sandbox runs at a time, in the background and to its end; the answer
//! is kept, and the next read waits the longer of [`FRESH_FOR`] and [`COST_FACTOR`]
//! times what the last one took, so the engine spends at most a tenth of its time
//! adding up any sandbox. A caller that needs the figure waits for a read at most
//! [`READ_TIMEOUT`].

use std::time::{Duration, Instant};

use super::{lock, SandboxManager};
use crate::labels;
use crate::types::{SandboxId, SandboxInfo};

/// How long a usage read from the engine is reused at least.
const FRESH_FOR: Duration = Duration::from_secs(30);
/// How many times the duration of the last read passes before the next one.
const COST_FACTOR: u32 = 10;
/// How long a caller waits for a read from the engine.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The last read of a sandbox's disk usage from the engine.
#[derive(Clone, Copy, Debug)]
pub(super) struct DiskRead {
    /// When it ended.
    at: Instant,
    /// What the engine said (the last figure it gave, if this read failed).
    bytes: Option<u64>,
    /// How long it took.
    took: Duration,
}

impl DiskRead {
    fn is_fresh(&self) -> bool {
        self.at.elapsed() < FRESH_FOR.max(self.took * COST_FACTOR)
    }
}

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
    /// is stale. The periodic sampler uses it, so one slow engine read does not hold up
    /// every sandbox's sample.
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
        let last = self.refresh_disk(&info.id);
        let used = last
            .and_then(|r| r.bytes)
            .unwrap_or_else(|| fs_used.min(total));
        (used, total)
    }

    /// Starts a background read of sandbox `id`'s usage unless one runs or the last is
    /// fresh; returns the last read.
    fn refresh_disk(&self, id: &SandboxId) -> Option<DiskRead> {
        let last = lock(&self.inner.disk_used).get(id).copied();
        if last.is_some_and(|r| r.is_fresh())
            || !lock(&self.inner.disk_refreshing).insert(id.clone())
        {
            return last;
        }
        let (manager, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            // One engine walk at a time: on Podman each holds the storage lock that every
            // create, inspect and removal also needs.
            let _turn = manager.inner.disk_reads.acquire().await;
            // And none while a create runs or waits (a client's, or the pool's): a walk
            // made 50 concurrent creates on Podman take 60 s instead of 8.
            while manager.creates_busy() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !manager.registry().sandboxes.contains_key(&id) {
                lock(&manager.inner.disk_refreshing).remove(&id);
                return;
            }
            let started = Instant::now();
            let read = manager
                .inner
                .backend
                .disk_usage(&labels::container_name(&id))
                .await;
            let took = started.elapsed();
            if took > READ_TIMEOUT {
                tracing::debug!(sandbox = %id, ?took, "the engine took long to add up a sandbox's disk");
            }
            // Sandboxes that are gone leave no entries behind.
            let live: Vec<SandboxId> = manager.registry().sandboxes.keys().cloned().collect();
            {
                let mut cache = lock(&manager.inner.disk_used);
                cache.retain(|k, _| live.contains(k));
                if live.contains(&id) {
                    let previous = cache.get(&id).and_then(|r| r.bytes);
                    let bytes = match read {
                        Ok(Some(bytes)) => Some(bytes),
                        _ => previous,
                    };
                    cache.insert(
                        id.clone(),
                        DiskRead {
                            at: Instant::now(),
                            bytes,
                            took,
                        },
                    );
                }
            }
            lock(&manager.inner.disk_refreshing).remove(&id);
        });
        last
    }

    /// Bytes of sandbox `id`'s storage that its disk quota counts, when the engine says
    /// (within [`READ_TIMEOUT`]); a figure from an earlier read may be given.
    async fn disk_used(&self, id: &SandboxId) -> Option<u64> {
        let asked = Instant::now();
        let last = self.refresh_disk(id);
        if let Some(r) = last.filter(|r| r.is_fresh()) {
            return r.bytes;
        }
        // Wait for the read in flight (ours or another caller's).
        while asked.elapsed() < READ_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = lock(&self.inner.disk_used).get(id).copied();
            if let Some(r) = now.filter(|r| r.at >= asked) {
                return r.bytes;
            }
        }
        last.and_then(|r| r.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_read_waits_ten_times_its_duration_before_the_next() {
        let ago = |secs: u64| {
            Instant::now()
                .checked_sub(Duration::from_secs(secs))
                .expect("the monotonic clock is older than a few minutes")
        };
        let quick = DiskRead {
            at: Instant::now(),
            bytes: Some(1),
            took: Duration::from_millis(200),
        };
        assert!(quick.is_fresh(), "a quick read is kept for FRESH_FOR");
        let old = DiskRead {
            at: ago(FRESH_FOR.as_secs() + 1),
            ..quick
        };
        assert!(!old.is_fresh(), "and read again after it");
        let slow = DiskRead {
            took: Duration::from_secs(18),
            ..old
        };
        assert!(slow.is_fresh(), "an 18 s read is kept for 180 s");
        let slow_and_old = DiskRead {
            at: ago(181),
            ..slow
        };
        assert!(!slow_and_old.is_fresh());
    }
}
