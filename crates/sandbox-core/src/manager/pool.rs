//! The warm pool: per template, sandboxes started ahead of demand with their agent ready
//! (and the template's start command running), each handed to exactly one create and
//! never reused.
//!
//! A create the pool can serve *claims* a member: the claim decides what a cold create
//! writes into labels (metadata, deadline, `secure`, the start time), and labels cannot
//! change once the container exists, so the claim's record goes to the state directory
//! (`claims/`) before the client gets its answer; a restart reads it back. The member's
//! agent then gets the request's envs, user and workdir (`/init`), which is all a claim
//! costs. Unclaimed members carry the [`labels::POOL`] label: a restart takes them back
//! into the pool when they still fit and answer, else removes them.
//!
//! Members are not sandboxes: they are not listed, not counted against the clients'
//! sandbox limit, and not reaped. Refill runs in one background task, one member at a
//! time, never while a client's create waits for its turn, bounded by `max_sandboxes`
//! (members and clients' sandboxes together) and a memory budget.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::create::Resolved;
use super::{lock, now_ms, Inner, SandboxManager};
use crate::agent::AgentClient;
use crate::error::{Error, Result};
use crate::labels;
use crate::types::{SandboxId, SandboxInfo, SandboxSpec, SandboxState};

/// How many pre-started sandboxes each template keeps, and what they may cost.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// Template name to the number of members it keeps (0 or absent: no pool).
    pub sizes: BTreeMap<String, usize>,
    /// Most memory the pool's members may be given together, MiB (their memory
    /// limits, not what they use idle).
    pub memory_budget_mb: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            sizes: BTreeMap::new(),
            memory_budget_mb: 4096,
        }
    }
}

impl PoolConfig {
    /// Members template `name` keeps.
    pub fn size(&self, name: &str) -> usize {
        self.sizes.get(name).copied().unwrap_or(0)
    }

    fn enabled(&self) -> bool {
        self.sizes.values().any(|n| *n > 0)
    }
}

/// A pre-started sandbox nobody has touched.
pub(super) struct Member {
    id: SandboxId,
    client: AgentClient,
    /// What it was started as (template, image, limits); the claim fills in the rest.
    info: SandboxInfo,
}

/// The pool's members and the fills in flight, per template.
#[derive(Default)]
pub(super) struct PoolState {
    members: HashMap<String, VecDeque<Member>>,
    filling: HashMap<String, usize>,
    /// After a failed fill: when to try that template again, and the current backoff.
    retry: HashMap<String, (Instant, Duration)>,
    /// When a member was last claimed.
    last_claim: Option<Instant>,
}

impl PoolState {
    fn len(&self, template: &str) -> usize {
        self.members.get(template).map_or(0, VecDeque::len)
    }

    fn total(&self) -> usize {
        self.members.values().map(VecDeque::len).sum::<usize>()
            + self.filling.values().sum::<usize>()
    }
}

/// What a claim decided, kept where a restarted server finds it.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimRecord {
    template: String,
    metadata: BTreeMap<String, String>,
    started_at_ms: i64,
    expires_at_ms: i64,
    secure: bool,
}

fn to_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// Claim records, one JSON file per claimed sandbox.
#[derive(Debug)]
pub(super) struct ClaimStore {
    dir: Option<PathBuf>,
}

impl ClaimStore {
    pub(super) fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    fn path(&self, id: &SandboxId) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(id.as_str()))
    }

    /// Writes the record of a claim, on disk before the claim's answer goes out.
    fn save(&self, info: &SandboxInfo) -> Result<()> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(&info.id)) else {
            return Ok(());
        };
        let record = ClaimRecord {
            template: info.template.clone(),
            metadata: info.metadata.clone(),
            started_at_ms: to_ms(info.started_at),
            expires_at_ms: to_ms(info.expires_at),
            secure: info.secure,
        };
        let io = |e: std::io::Error| Error::backend("state", e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(&record).map_err(|e| Error::backend("state", e))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&body).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Applies the record of a claimed sandbox to what its labels say; `false` when
    /// there is none (an unclaimed member) or it cannot be read.
    pub(super) fn apply(&self, info: &mut SandboxInfo) -> bool {
        let Some(raw) = self.path(&info.id).and_then(|p| std::fs::read(p).ok()) else {
            return false;
        };
        let Ok(record) = serde_json::from_slice::<ClaimRecord>(&raw) else {
            return false;
        };
        let (Some(started), Some(expires)) =
            (from_ms(record.started_at_ms), from_ms(record.expires_at_ms))
        else {
            return false;
        };
        info.template = record.template;
        info.metadata = record.metadata;
        info.started_at = started;
        info.expires_at = expires;
        info.secure = record.secure;
        true
    }

    pub(super) fn forget(&self, id: &SandboxId) {
        if let Some(path) = self.path(id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Deletes records of sandboxes that no longer exist.
    pub(super) fn retain(&self, live: &HashSet<SandboxId>) {
        if let Some(dir) = &self.dir {
            super::deadlines::retain_sandbox_files(dir, live);
        }
    }
}

/// The request a member of `template` is started for: nothing but the template.
fn member_spec(template: &str) -> SandboxSpec {
    SandboxSpec {
        template: Some(template.to_string()),
        ..SandboxSpec::default()
    }
}

/// Why a create was not served from its template's pool (a metric label).
fn miss(template: &str, reason: &'static str) {
    metrics::counter!("colima_e2b_pool_misses_total", "template" => template.to_string(), "reason" => reason)
        .increment(1);
}

/// Whether two references name the same image: engines report a local image with their
/// registry prefix (Podman's `localhost/`) where the server named it without.
fn same_image(a: &str, b: &str) -> bool {
    let bare = |s: &str| s.strip_prefix("localhost/").unwrap_or(s).to_string();
    bare(a) == bare(b)
}

/// Longest pause between fill attempts of a template that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(120);

/// How often the refiller looks at the pool without being woken (stale images, retries).
const REFILL_TICK: Duration = Duration::from_secs(10);

/// How long after the last claim the refiller waits before it starts a member: a client's
/// first commands come right after its create, and an engine create beside them (on two
/// cores) doubled their time.
const REFILL_AFTER_CLAIM: Duration = Duration::from_millis(500);

impl SandboxManager {
    fn pool(&self) -> std::sync::MutexGuard<'_, PoolState> {
        lock(&self.inner.pool)
    }

    /// Members of every template, and fills in flight.
    pub(super) fn pool_total(&self) -> usize {
        self.pool().total()
    }

    /// Whether the pool is starting a member now.
    pub(super) fn pool_filling(&self) -> bool {
        self.pool().filling.values().any(|n| *n > 0)
    }

    /// What a member of `template` is started as: the template's defaults.
    fn resolve_member(&self, template: &str) -> Result<Resolved> {
        self.resolve(&member_spec(template))
    }

    /// Kills a member now and deletes it in the background.
    async fn retire_member(&self, id: &SandboxId) {
        if let Err(e) = self.retire(&labels::container_name(id)).await {
            tracing::warn!(sandbox = %id, error = %e, "could not remove a pool member");
        }
    }

    fn update_pool_gauge(&self, template: &str) {
        let n = self.pool().len(template);
        metrics::gauge!("colima_e2b_pool_size", "template" => template.to_string()).set(n as f64);
    }

    fn wake_refill(&self) {
        self.inner.pool_wake.notify_one();
    }

    /// Why the pool of the request's template cannot serve it, if it cannot: a member has
    /// the template's default limits and the internet; everything else a claim applies.
    fn unpoolable(&self, spec: &SandboxSpec, r: &Resolved) -> Result<Option<&'static str>> {
        if !spec.internet {
            return Ok(Some("internet_off"));
        }
        if !spec.volume_mounts.is_empty() {
            return Ok(Some("volumes"));
        }
        let default = self.resolve_member(&r.template_name)?;
        if default.limits != r.limits || default.template != r.template {
            return Ok(Some("limits"));
        }
        Ok(None)
    }

    /// Serves a create from its template's pool: `None` when the template has no pool,
    /// the request needs what members lack, or the pool is empty (the create goes cold).
    pub(super) async fn claim(
        &self,
        spec: &SandboxSpec,
        r: &Resolved,
    ) -> Option<Result<SandboxInfo>> {
        let template = r.template_name.as_str();
        if self.inner.config.pool.size(template) == 0 {
            return None;
        }
        match self.unpoolable(spec, r) {
            Ok(None) => {}
            Ok(Some(reason)) => {
                miss(template, reason);
                return None;
            }
            Err(e) => return Some(Err(e)),
        }
        loop {
            let member = {
                let mut pool = self.pool();
                pool.last_claim = Some(Instant::now());
                pool.members.get_mut(template).and_then(VecDeque::pop_front)
            };
            self.update_pool_gauge(template);
            self.wake_refill();
            let Some(member) = member else {
                miss(template, "empty");
                return None;
            };
            let id = member.id.clone();
            match self.claim_member(spec, r, member).await {
                Ok(info) => return Some(Ok(info)),
                Err(Claim::Refused(e)) => return Some(Err(e)),
                Err(Claim::Broken(e)) => {
                    // A member that died or stopped answering: drop it, try the next.
                    tracing::warn!(sandbox = %id, error = %e, "removing a pool member that failed its claim");
                    self.retire_member(&id).await;
                    miss(template, "broken");
                }
            }
        }
    }

    async fn claim_member(
        &self,
        spec: &SandboxSpec,
        r: &Resolved,
        member: Member,
    ) -> std::result::Result<SandboxInfo, Claim> {
        let started = Instant::now();
        let id = member.id.clone();
        let now = now_ms();
        let info = SandboxInfo {
            id: id.clone(),
            template: r.template_name.clone(),
            image: member.info.image.clone(),
            state: SandboxState::Running,
            metadata: spec.metadata.clone(),
            started_at: now,
            expires_at: now + r.timeout,
            limits: member.info.limits,
            internet: member.info.internet,
            secure: spec.secure,
            volume_mounts: spec.volume_mounts.clone(),
        };
        // The limit, the journal and the record: a failure here touched nothing in the
        // member, so it goes back to the pool.
        let noted = self.reserve().and_then(|reservation| {
            self.inner.journal.begin(&id)?;
            if let Err(e) = self
                .inner
                .claims
                .save(&info)
                .and_then(|()| self.note_lifecycle(&id, spec.lifecycle, r, &spec.envs))
            {
                self.inner.claims.forget(&id);
                self.inner.journal.end(&id);
                return Err(e);
            }
            Ok(reservation)
        });
        let reservation = match noted {
            Ok(reservation) => reservation,
            Err(e) => {
                let template = member.info.template.clone();
                self.pool()
                    .members
                    .entry(template.clone())
                    .or_default()
                    .push_front(member);
                self.update_pool_gauge(&template);
                return Err(Claim::Refused(e));
            }
        };
        if let Err(e) = self
            .init_agent(&member.client, &r.template, &r.user, &spec.envs)
            .await
        {
            self.inner.claims.forget(&id);
            self.forget_lifecycle(&id);
            self.inner.journal.end(&id);
            return Err(Claim::Broken(e));
        }
        self.agents().insert(id.clone(), member.client);
        self.registry().sandboxes.insert(id.clone(), info.clone());
        drop(reservation);
        self.inner.journal.end(&id);
        metrics::counter!("colima_e2b_pool_claims_total", "template" => info.template.clone())
            .increment(1);
        self.created(&info, started, "warm");
        Ok(info)
    }

    /// Removes one member (the largest pool's newest) to make room under `max_sandboxes`
    /// for a client's cold create.
    pub(super) async fn evict_for_room(&self) {
        let victim = {
            let mut pool = self.pool();
            let template = pool
                .members
                .iter()
                .filter(|(_, m)| !m.is_empty())
                .max_by_key(|(_, m)| m.len())
                .map(|(t, _)| t.clone());
            template.and_then(|t| pool.members.get_mut(&t).and_then(VecDeque::pop_back))
        };
        if let Some(member) = victim {
            tracing::info!(sandbox = %member.id, "removing a pool member to make room for a create");
            self.update_pool_gauge(&member.info.template);
            self.retire_member(&member.id).await;
        }
    }

    /// Starts the task that keeps every pool full (nothing when no template has a pool).
    pub(super) fn spawn_refiller(&self) {
        if !self.inner.config.pool.enabled() {
            return;
        }
        for template in self.inner.config.pool.sizes.keys() {
            self.update_pool_gauge(template);
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let wake = self.inner.pool_wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { break };
                let manager = SandboxManager { inner };
                manager.drop_stale_members().await;
                // Claims first: the refill waits until they pause.
                while let Some(wait) = manager.until_claims_pause() {
                    tokio::time::sleep(wait).await;
                }
                while let Some(template) = manager.next_fill() {
                    manager.fill(&template).await;
                }
                drop(manager);
                tokio::select! {
                    _ = tokio::time::sleep(REFILL_TICK) => {}
                    _ = wake.notified() => {}
                }
            }
        });
    }

    /// How long until [`REFILL_AFTER_CLAIM`] has passed since the last claim, if it has not.
    fn until_claims_pause(&self) -> Option<Duration> {
        let last = self.pool().last_claim?;
        REFILL_AFTER_CLAIM.checked_sub(last.elapsed())
    }

    /// The template whose pool is shortest of its size, if one may grow now; marks the
    /// fill as in flight.
    fn next_fill(&self) -> Option<String> {
        let config = &self.inner.config;
        if self.inner.queued.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            // A client's create is waiting for its turn: it goes first.
            return None;
        }
        let (user, reserved) = {
            let reg = self.registry();
            (reg.sandboxes.len(), reg.reserved)
        };
        let mut pool = self.pool();
        if user + reserved + pool.total() >= config.max_sandboxes {
            return None;
        }
        let now = Instant::now();
        let mut best: Option<(String, usize)> = None;
        for (template, size) in &config.pool.sizes {
            let have = pool.len(template) + pool.filling.get(template).copied().unwrap_or(0);
            if have >= *size || pool.retry.get(template).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            let short = size - have;
            if best.as_ref().is_none_or(|(_, s)| short > *s) {
                best = Some((template.clone(), short));
            }
        }
        let (template, _) = best?;
        let mb = self.pool_member_memory(&template)?;
        let used: u64 = config
            .pool
            .sizes
            .keys()
            .map(|t| {
                let n = pool.len(t) + pool.filling.get(t).copied().unwrap_or(0);
                n as u64 * self.pool_member_memory(t).unwrap_or(0)
            })
            .sum();
        if used + mb > config.pool.memory_budget_mb {
            return None;
        }
        *pool.filling.entry(template.clone()).or_default() += 1;
        Some(template)
    }

    /// The memory limit a member of `template` gets, MiB (`None`: not a known template).
    fn pool_member_memory(&self, template: &str) -> Option<u64> {
        self.resolve_member(template)
            .ok()
            .map(|r| r.limits.memory_mb)
    }

    /// Starts one member of `template` (its fill was marked in flight by `next_fill`).
    async fn fill(&self, template: &str) {
        let started = Instant::now();
        let result = self.start_member(template).await;
        let mut pool = self.pool();
        if let Some(n) = pool.filling.get_mut(template) {
            *n = n.saturating_sub(1);
        }
        match result {
            Ok(member) => {
                pool.retry.remove(template);
                pool.members
                    .entry(template.to_string())
                    .or_default()
                    .push_back(member);
                drop(pool);
                metrics::histogram!("colima_e2b_pool_refill_seconds", "template" => template.to_string())
                    .record(started.elapsed().as_secs_f64());
                self.update_pool_gauge(template);
            }
            Err(e) => {
                let backoff = pool
                    .retry
                    .get(template)
                    .map_or(Duration::from_secs(2), |(_, b)| (*b * 2).min(MAX_BACKOFF));
                pool.retry
                    .insert(template.to_string(), (Instant::now() + backoff, backoff));
                drop(pool);
                metrics::counter!("colima_e2b_pool_refill_failures_total", "template" => template.to_string())
                    .increment(1);
                tracing::warn!(template, error = %e, retry_in_s = backoff.as_secs(),
                    "could not start a pool member");
            }
        }
    }

    async fn start_member(&self, template: &str) -> Result<Member> {
        let spec = member_spec(template);
        let r = self.resolve(&spec)?;
        let id = SandboxId::generate();
        // A crash mid-fill leaves a container the next start removes.
        self.inner.journal.begin(&id)?;
        let result = self.create_container(&spec, &r, id.clone(), true).await;
        self.inner.journal.end(&id);
        let (info, client) = result?;
        let client = client.ok_or_else(|| {
            crate::agent::errors::unavailable("a warm pool needs the agent in its sandboxes")
        })?;
        Ok(Member { id, client, info })
    }

    /// Removes members whose template now runs another image (rebuilt, re-derived).
    async fn drop_stale_members(&self) {
        let templates: Vec<String> = self
            .pool()
            .members
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(t, _)| t.clone())
            .collect();
        for template in templates {
            let Some(t) = self.resolve_template(&template) else {
                continue;
            };
            let Ok(current) = self.template_image(&t.image).await else {
                continue;
            };
            let stale: Vec<Member> = {
                let mut pool = self.pool();
                let Some(members) = pool.members.get_mut(&template) else {
                    continue;
                };
                let (keep, stale): (Vec<Member>, Vec<Member>) = std::mem::take(members)
                    .into_iter()
                    .partition(|m| same_image(&m.info.image, &current.name));
                *members = keep.into();
                stale
            };
            for member in stale {
                tracing::info!(sandbox = %member.id, template, "removing a pool member of an older image");
                self.retire_member(&member.id).await;
            }
            self.update_pool_gauge(&template);
        }
    }

    /// Takes unclaimed members found at start back into their pools when their template
    /// still pools, runs the same image and their agent answers; removes the others.
    pub(super) async fn readopt_members(&self, found: Vec<SandboxInfo>) -> (usize, usize) {
        let (mut kept, mut removed) = (0, 0);
        let mut current: HashMap<String, Option<String>> = HashMap::new();
        for info in found {
            let template = info.template.clone();
            if !current.contains_key(&template) {
                let image = match self.resolve_template(&template) {
                    Some(t) => self.template_image(&t.image).await.ok().map(|i| i.name),
                    None => None,
                };
                current.insert(template.clone(), image);
            }
            let fits = info.state == SandboxState::Running
                && self.pool().len(&template) < self.inner.config.pool.size(&template)
                && current
                    .get(&template)
                    .cloned()
                    .flatten()
                    .is_some_and(|image| same_image(&image, &info.image));
            let client = if fits {
                self.container_agent(&info.id).await.ok()
            } else {
                None
            };
            let healthy = match &client {
                Some(c) => tokio::time::timeout(Duration::from_secs(2), c.health())
                    .await
                    .is_ok_and(|r| r.is_ok()),
                None => false,
            };
            match client.filter(|_| healthy) {
                Some(client) => {
                    self.pool()
                        .members
                        .entry(template.clone())
                        .or_default()
                        .push_back(Member {
                            id: info.id.clone(),
                            client,
                            info,
                        });
                    kept += 1;
                }
                None => {
                    tracing::info!(sandbox = %info.id, "removing a pool member that no longer fits its pool");
                    // Killed now, deleted in the background: startup does not wait for
                    // the storage.
                    self.retire_member(&info.id).await;
                    removed += 1;
                }
            }
        }
        (kept, removed)
    }
}

/// How a claim failed: the client's create is refused (limit reached), or the member is
/// unusable and the next one is tried.
enum Claim {
    Refused(Error),
    Broken(Error),
}
