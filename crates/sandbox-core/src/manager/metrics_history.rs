//! Resource use over time: every running sandbox is sampled periodically (CPU, memory,
//! disk, from its agent and the engine's quota figure), and the samples are kept for a
//! bounded time, so E2B's `get_metrics(start, end)` answers a range.
//!
//! Memory is bounded: at most `retention / interval` samples per sandbox (720 by
//! default), of the sandboxes that exist; a sandbox's samples go when it does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::{lock, Inner, SandboxManager};
use crate::error::{Error, Result};
use crate::types::{SandboxId, SandboxState};

/// How the sampler behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsHistoryConfig {
    /// Time between two samples of a sandbox; zero turns the sampler off (a range then
    /// holds the samples clients' own calls took).
    pub interval: Duration,
    /// How long samples are kept.
    pub retention: Duration,
}

impl Default for MetricsHistoryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            retention: Duration::from_secs(3600),
        }
    }
}

impl MetricsHistoryConfig {
    /// Most samples kept per sandbox.
    fn capacity(&self) -> usize {
        let every = self.interval.max(Duration::from_secs(1)).as_secs();
        usize::try_from(self.retention.as_secs() / every)
            .unwrap_or(usize::MAX)
            .clamp(1, 100_000)
    }
}

/// One sample of a sandbox's resource use.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricSample {
    /// When it was taken.
    pub at: OffsetDateTime,
    /// CPUs the sandbox may use (whole CPUs, at least 1).
    pub cpu_count: u32,
    /// CPU use since the agent's previous sample, percent of `cpu_count` CPUs.
    pub cpu_used_pct: f64,
    /// Memory used, bytes.
    pub mem_used: u64,
    /// Memory the sandbox may use, bytes.
    pub mem_total: u64,
    /// Page cache within the memory used, bytes.
    pub mem_cache: u64,
    /// Disk used as the quota counts it (else the filesystem's figure), bytes.
    pub disk_used: u64,
    /// The disk quota (else the filesystem's size), bytes.
    pub disk_total: u64,
}

/// The samples kept, per sandbox, oldest first.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: Mutex<HashMap<SandboxId, VecDeque<MetricSample>>>,
}

impl History {
    fn push(&self, id: &SandboxId, sample: MetricSample, cap: usize) {
        let mut all = lock(&self.samples);
        let ring = all.entry(id.clone()).or_default();
        // A sample older than the newest (the clock stepped back) keeps the order.
        if ring.back().is_some_and(|last| last.at > sample.at) {
            return;
        }
        if ring.len() >= cap {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    fn between(
        &self,
        id: &SandboxId,
        start: Option<OffsetDateTime>,
        end: Option<OffsetDateTime>,
    ) -> Vec<MetricSample> {
        lock(&self.samples)
            .get(id)
            .map(|ring| {
                ring.iter()
                    .filter(|s| start.is_none_or(|t| s.at >= t) && end.is_none_or(|t| s.at <= t))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn latest(&self, id: &SandboxId) -> Option<MetricSample> {
        lock(&self.samples).get(id).and_then(|r| r.back().cloned())
    }

    /// Forgets the samples of sandboxes not in `live`.
    fn retain(&self, live: &dyn Fn(&SandboxId) -> bool) {
        lock(&self.samples).retain(|id, _| live(id));
    }

    pub(super) fn forget(&self, id: &SandboxId) {
        lock(&self.samples).remove(id);
    }
}

impl SandboxManager {
    /// Takes a sample of running sandbox `id` now and keeps it.
    pub async fn sample_metrics(&self, id: &SandboxId) -> Result<MetricSample> {
        self.sample(id, true).await
    }

    /// A sample; with `wait_for_engine` false the disk figure is the engine's last (see
    /// [`SandboxManager::disk_without_waiting`]).
    async fn sample(&self, id: &SandboxId, wait_for_engine: bool) -> Result<MetricSample> {
        let info = self.info(id)?;
        if info.state != SandboxState::Running {
            return Err(Error::Conflict(format!("sandbox {id} is not running")));
        }
        // Not `agent`: a sample must never wake a paused sandbox.
        let m = self.agent_client(id).await?.metrics().await?;
        // The sandbox's limit bounds what it has, whatever the kernel reports.
        let limit = info.limits.memory_mb.saturating_mul(1 << 20);
        let mem_total = if m.mem_total == 0 {
            limit
        } else {
            m.mem_total.min(limit)
        };
        let (disk_used, disk_total) = if wait_for_engine {
            self.disk(&info, m.disk_used, m.disk_total).await
        } else {
            self.disk_without_waiting(&info, m.disk_used, m.disk_total)
        };
        let now = OffsetDateTime::now_utc();
        let at = i64::try_from(m.ts)
            .ok()
            .and_then(|ts| OffsetDateTime::from_unix_timestamp(ts).ok())
            // The agent's clock is the container's, which is the host's; a wild value
            // (or none) reads as now.
            .filter(|t| (*t - now).abs() < time::Duration::minutes(5))
            .unwrap_or(now);
        let sample = MetricSample {
            at,
            cpu_count: info.limits.cpus.ceil().max(1.0) as u32,
            cpu_used_pct: m.cpu_used_pct,
            mem_used: m.mem_used.min(mem_total),
            mem_total,
            mem_cache: m.mem_cache.min(mem_total),
            disk_used,
            disk_total,
        };
        let cap = self.inner.config.metrics_history.capacity();
        self.inner.metrics_history.push(id, sample.clone(), cap);
        Ok(sample)
    }

    /// The samples of sandbox `id` taken between `start` and `end` (inclusive; open
    /// ends are unbounded), oldest first. A running sandbox with none yet in range
    /// that includes now is sampled at once, so a first call does not come back empty.
    pub async fn metrics_between(
        &self,
        id: &SandboxId,
        start: Option<OffsetDateTime>,
        end: Option<OffsetDateTime>,
    ) -> Result<Vec<MetricSample>> {
        let info = self.info(id)?;
        let mut samples = self.inner.metrics_history.between(id, start, end);
        let now = OffsetDateTime::now_utc();
        let includes_now = end.is_none_or(|e| e >= now - time::Duration::seconds(1));
        if samples.is_empty() && includes_now && info.state == SandboxState::Running {
            let s = self.sample_metrics(id).await?;
            if start.is_none_or(|t| s.at >= t) {
                samples.push(s);
            }
        }
        Ok(samples)
    }

    /// The newest sample of each of `ids` that exists and is running (sampled now when
    /// there is none yet); unknown ids are left out.
    pub async fn latest_metrics(&self, ids: &[SandboxId]) -> BTreeMap<SandboxId, MetricSample> {
        let mut out = BTreeMap::new();
        for id in ids {
            let sample = match self.inner.metrics_history.latest(id) {
                Some(s) => Some(s),
                None => self.sample_metrics(id).await.ok(),
            };
            if let Some(s) = sample {
                out.insert(id.clone(), s);
            }
        }
        out
    }

    /// Starts the sampler: every interval, one sample of each running sandbox.
    pub(super) fn spawn_sampler(&self) {
        let interval = self.inner.config.metrics_history.interval;
        if interval.is_zero() {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let manager = SandboxManager { inner };
                manager.sample_all().await;
            }
        });
    }

    async fn sample_all(&self) {
        let running = self.running_ids();
        for id in &running {
            // A sandbox that does not answer in time is sampled next round.
            let sample = tokio::time::timeout(Duration::from_secs(5), self.sample(id, false));
            if let Ok(Err(e)) = sample.await {
                tracing::debug!(sandbox = %id, error = %e, "metrics sample failed");
            }
            // The agent's events, so they are kept when the sandbox goes.
            self.pull_agent_events(id).await;
        }
        let reg = self.registry();
        self.inner
            .metrics_history
            .retain(&|id| reg.sandboxes.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(secs: i64) -> MetricSample {
        MetricSample {
            at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).expect("time"),
            cpu_count: 1,
            cpu_used_pct: 0.0,
            mem_used: 0,
            mem_total: 0,
            mem_cache: 0,
            disk_used: 0,
            disk_total: 0,
        }
    }

    #[test]
    fn ranges_are_inclusive_and_retention_drops_the_oldest() {
        let h = History::default();
        let id: SandboxId = "clmabc".parse().expect("id");
        for s in 0..5 {
            h.push(&id, sample(s * 10), 4);
        }
        let at = |s: i64| sample(s).at;
        assert_eq!(h.between(&id, None, None).len(), 4, "the oldest went");
        assert_eq!(h.between(&id, Some(at(10)), Some(at(30))).len(), 3);
        assert_eq!(h.between(&id, Some(at(41)), None).len(), 0);
        assert_eq!(h.latest(&id).map(|s| s.at), Some(at(40)));
        h.push(&id, sample(5), 4);
        assert_eq!(h.latest(&id).map(|s| s.at), Some(at(40)), "order is kept");
        h.retain(&|_| false);
        assert!(h.between(&id, None, None).is_empty());
    }

    #[test]
    fn capacity_follows_retention_over_interval() {
        let c = MetricsHistoryConfig::default();
        assert_eq!(c.capacity(), 720);
        let c = MetricsHistoryConfig {
            interval: Duration::ZERO,
            retention: Duration::from_secs(60),
        };
        assert_eq!(c.capacity(), 60);
    }
}
