//! Ending a sandbox's container: its processes are killed at once (the engine's kill),
//! and the container is deleted in the background, one at a time and after the creates
//! that run or wait. Deleting is the slow half: 1.5 s per container on btrfs with quotas
//! here, serialised by the engine, so 50 kills at once took 76 s when each waited for
//! its own deletion, and the creates beside them waited as long.
//!
//! Nothing is left behind: a deletion that fails is tried again, and a container a
//! restart finds stopped is removed by re-adoption.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{lock, SandboxManager};
use crate::error::{Error, Result};

/// Containers waiting to be deleted, and whether the deleting task runs.
#[derive(Default)]
pub(super) struct ReclaimQueue {
    names: VecDeque<(String, u32)>,
    running: bool,
}

/// Attempts per container before it is left to the next start's re-adoption.
const ATTEMPTS: u32 = 5;

/// Longest a deletion waits for creates to finish before it goes anyway.
const YIELD_AT_MOST: Duration = Duration::from_secs(30);

impl SandboxManager {
    /// Kills every process of container `name` now and deletes it in the background.
    /// Where the engine cannot kill it that way (paused), it is removed before this
    /// returns.
    pub(super) async fn retire(&self, name: &str) -> Result<()> {
        match self.inner.backend.stop(name).await {
            Ok(()) => {
                self.reclaim_later(name.to_string(), 0);
                Ok(())
            }
            Err(Error::NotFound { .. }) => Ok(()),
            Err(_) => match self.inner.backend.remove(name).await {
                Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    fn reclaim_later(&self, name: String, attempt: u32) {
        let start = {
            let mut q = lock(&self.inner.reclaim);
            q.names.push_back((name, attempt));
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            let manager = self.clone();
            tokio::spawn(async move { manager.reclaim_all().await });
        }
    }

    /// Deletes queued containers until none is left.
    async fn reclaim_all(&self) {
        loop {
            let next = {
                let mut q = lock(&self.inner.reclaim);
                let next = q.names.pop_front();
                if next.is_none() {
                    q.running = false;
                }
                next
            };
            let Some((name, attempt)) = next else { return };
            let waited = Instant::now();
            while self.creates_busy() && waited.elapsed() < YIELD_AT_MOST {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match self.inner.backend.remove(&name).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) if attempt + 1 < ATTEMPTS => {
                    tracing::debug!(container = %name, error = %e, "deleting a container failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    self.reclaim_later(name, attempt + 1);
                }
                Err(e) => {
                    tracing::warn!(container = %name, error = %e,
                        "could not delete a stopped sandbox container; the next start removes it");
                }
            }
        }
    }

    /// Containers still waiting to be deleted.
    pub fn pending_deletions(&self) -> usize {
        lock(&self.inner.reclaim).names.len()
    }

    /// Waits, at most `limit`, until every container handed to the background is
    /// deleted: an image can go only once no container, stopped or not, uses it.
    pub(super) async fn deletions_done(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            if !lock(&self.inner.reclaim).running {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes what is queued, for at most `limit` (a graceful shutdown).
    pub async fn finish_deletions(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let next = lock(&self.inner.reclaim).names.pop_front();
            let Some((name, _)) = next else { return };
            self.remove_quietly(&name).await;
        }
    }
}
