//! Snapshots and forks (E2B's): a sandbox's filesystem committed as an image and kept as
//! a template of the registry (its `snapshot_of` names the source), so creates start
//! from it as from any built template, with the source's settings (its template's start
//! command, user, workdir, CPUs and memory).
//!
//! Only the filesystem is captured: a container has no checkpoint of its processes
//! here, so sandboxes made from a snapshot boot fresh (the start command runs again).
//! The engine freezes a running source for the commit; it goes on afterwards.
//!
//! A fork captures once and creates its sandboxes from that capture: an ephemeral
//! template, removed once no sandbox uses it (never while a fork is under way).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::SandboxManager;
use crate::error::{Error, Result};
use crate::labels;
use crate::template::registry::{BuildStatus, TemplateRecord};
use crate::template::Template;
use crate::types::{SandboxId, SandboxInfo, SandboxSpec, SandboxState};

/// Most sandboxes one fork may make (E2B's limit).
pub const MAX_FORKS: usize = 100;

/// Counts a fork as under way while it lives.
struct ForkUnderWay<'a>(&'a AtomicUsize);

impl<'a> ForkUnderWay<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for ForkUnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SandboxManager {
    /// Captures sandbox `id`'s filesystem as snapshot `name` (a new build of it when a
    /// snapshot of that name exists; `None`: a new unnamed snapshot). The sandbox may be
    /// running or paused, and stays as it was.
    pub async fn snapshot(&self, id: &SandboxId, name: Option<&str>) -> Result<TemplateRecord> {
        self.capture(id, name, false).await
    }

    async fn capture(
        &self,
        id: &SandboxId,
        name: Option<&str>,
        ephemeral: bool,
    ) -> Result<TemplateRecord> {
        let started = Instant::now();
        let _turn = self.turn(id).await;
        let info = self.info(id)?;
        let container = labels::container_name(id);
        let state = self.sandbox_container(id).await?;
        let boot = self.inner.lifecycles.get(id).and_then(|r| r.boot);
        let mut template = boot
            .as_ref()
            .map(|b| b.template.clone())
            .or_else(|| self.resolve_template(&info.template))
            .unwrap_or_else(|| Template::new(info.image.clone()));
        let base = template.image.clone();
        if let Some(boot) = &boot {
            template.user = boot.user.clone();
        }
        template.cpus = Some(info.limits.cpus);
        template.memory_mb = Some(info.limits.memory_mb);
        let (record, build) =
            self.inner
                .templates
                .request_snapshot(name, id.as_str(), ephemeral)?;
        let mut image_labels = BTreeMap::from([
            (labels::SNAPSHOT_OF.to_string(), id.to_string()),
            (labels::POOL.to_string(), "false".to_string()),
        ]);
        // The chain's first image: what the source runs, unless that is a snapshot too.
        if let Ok(Some(source)) = self.inner.backend.image_info(&info.image).await {
            let origin = source
                .labels
                .get(labels::ORIGIN_BYTES)
                .cloned()
                .or_else(|| source.size.map(|s| s.to_string()));
            if let Some(origin) = origin {
                image_labels.insert(labels::ORIGIN_BYTES.to_string(), origin);
            }
        }
        let running = state.state == SandboxState::Running;
        if let Err(e) = self
            .inner
            .backend
            .snapshot(&container, &build.image, &image_labels, running)
            .await
        {
            self.inner.templates.fail_snapshot(&record.id, &build.id);
            let _ = self.inner.backend.remove_image(&build.image).await;
            return Err(e);
        }
        template.image = build.image.clone();
        self.inner
            .templates
            .finish_snapshot(&record.id, &build.id, template, Some(base));
        let seconds = started.elapsed().as_secs_f64();
        self.log(
            id,
            super::LogEntry::now(
                super::LogLevel::Info,
                if ephemeral {
                    "sandbox captured for a fork"
                } else {
                    "snapshot taken"
                },
                &[
                    ("snapshot", record.id.clone()),
                    ("seconds", format!("{seconds:.2}")),
                ],
            ),
        );
        metrics::histogram!("colima_e2b_snapshot_seconds", "kind" => if ephemeral { "fork" } else { "snapshot" })
            .record(seconds);
        self.inner
            .templates
            .find(&record.id)
            .ok_or_else(|| Error::not_found(format!("snapshot {}", record.id)))
    }

    /// The snapshots kept (forks' captures are not), of source sandbox `source` only
    /// when given, oldest first.
    pub fn snapshots(&self, source: Option<&str>) -> Vec<TemplateRecord> {
        let mut out: Vec<TemplateRecord> = self
            .inner
            .templates
            .list()
            .into_iter()
            .filter(|t| !t.ephemeral)
            // A capture a restart cut off has no image to start from.
            .filter(|t| t.current().is_some_and(|b| b.status == BuildStatus::Ready))
            .filter(|t| match (&t.snapshot_of, source) {
                (Some(of), Some(s)) => of == s,
                (Some(_), None) => true,
                (None, _) => false,
            })
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// Removes snapshot `id` with its images (a fork's capture or a template that is not
    /// a snapshot is not found); refused while a sandbox of it exists.
    pub async fn delete_snapshot(&self, id: &str) -> Result<TemplateRecord> {
        let is_snapshot = self
            .inner
            .templates
            .find(id)
            .is_some_and(|t| t.snapshot_of.is_some() && !t.ephemeral);
        if !is_snapshot {
            return Err(Error::not_found(format!("snapshot {id}")));
        }
        self.remove_template(id).await
    }

    /// E2B's fork: one capture of sandbox `id`, then `count` sandboxes from it living
    /// `timeout`, each with the source's settings (metadata, envs, user, limits,
    /// network rules, lifecycle); one result per fork. Processes are not carried over.
    pub async fn fork(
        &self,
        id: &SandboxId,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Result<SandboxInfo>>> {
        if count == 0 || count > MAX_FORKS {
            return Err(Error::InvalidArgument(format!(
                "count must be between 1 and {MAX_FORKS}, not {count}"
            )));
        }
        self.check_timeout(timeout)?;
        let info = self.info(id)?;
        // Sweeps wait until no fork is under way: from its capture until its creates have
        // registered their sandboxes, nothing uses the capture yet.
        let _under_way = ForkUnderWay::new(&self.inner.forks_under_way);
        let capture = self.capture(id, None, true).await?;
        let boot = self.inner.lifecycles.get(id).and_then(|r| r.boot);
        let spec = SandboxSpec {
            template: Some(capture.id.clone()),
            timeout: Some(timeout),
            envs: boot.as_ref().map(|b| b.envs.clone()).unwrap_or_default(),
            metadata: info.metadata.clone(),
            cpus: Some(info.limits.cpus),
            memory_mb: Some(info.limits.memory_mb),
            disk_mb: info.limits.disk_mb,
            internet: info.internet,
            user: boot.map(|b| b.user),
            secure: info.secure,
            network: self.network(id).map(|n| n.config),
            lifecycle: self.lifecycle(id),
            // Volumes are shared, not copied: the forks mount the source's.
            volume_mounts: info.volume_mounts.clone(),
        };
        let creates = (0..count).map(|_| self.create(spec.clone()));
        let results = futures_util::future::join_all(creates).await;
        drop(_under_way);
        let made = results.iter().filter(|r| r.is_ok()).count();
        tracing::info!(sandbox = %id, capture = %capture.id, asked = count, made, "sandbox forked");
        metrics::counter!("colima_e2b_forks_total").increment(made as u64);
        if made == 0 {
            self.sweep_fork_captures().await;
        }
        Ok(results)
    }

    /// Removes forks' captures that no sandbox uses any more, with their images (not
    /// while a fork is under way: the next sweep takes what this one left).
    pub(super) async fn sweep_fork_captures(&self) {
        if self.inner.forks_under_way.load(Ordering::SeqCst) > 0 {
            return;
        }
        let _one_at_a_time = self.inner.sweep_lock.lock().await;
        let in_use: std::collections::HashSet<String> = self
            .registry()
            .sandboxes
            .values()
            .map(|s| s.template.clone())
            .collect();
        let unused: Vec<TemplateRecord> = self
            .inner
            .templates
            .list()
            .into_iter()
            .filter(|t| t.ephemeral && !in_use.contains(&t.id))
            .collect();
        for t in unused {
            match self.remove_template(&t.id).await {
                Ok(_) => {
                    tracing::info!(capture = %t.id, "removed a fork's capture no sandbox uses")
                }
                Err(Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(capture = %t.id, error = %e, "could not remove a fork's capture")
                }
            }
        }
    }
}
