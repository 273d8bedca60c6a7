//! Built templates: each has an id, a name, tags pointing at its builds, and builds with
//! their status, log and resulting image. Records live as JSON files in the state dir, so
//! templates survive restarts; a build cut off by a restart is marked failed on the next
//! start. Builds run on the configured engine, a bounded number at once, each within a
//! time limit; the rest wait in a bounded queue.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::backend::{BuildEvent, BuildRequest, DynBackend, ImageInfo};
use crate::error::{Error, Result};
use crate::template::files::{write_steps_context, FileStore};
use crate::template::log::{BuildLog, LogEntry, LogLevel};
use crate::template::steps::CopySource;
use crate::template::Template;

/// Repository of built template images: `colima-e2b-template/<template id>:<build id>`.
pub const IMAGE_REPO: &str = "colima-e2b-template";
/// The tag a build gets when it is given none (as E2B).
pub const DEFAULT_TAG: &str = "default";
/// Entries per page of a build's log (E2B's status endpoint returns at most 100).
pub const LOG_PAGE: usize = 100;

/// Where a build is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Requested but not started (no steps yet, or waiting for a build slot).
    Waiting,
    /// Running on the engine.
    Building,
    /// Done: sandboxes can be made from it.
    Ready,
    /// Failed; `reason` says why.
    Error,
}

impl BuildStatus {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Waiting => "waiting",
            BuildStatus::Building => "building",
            BuildStatus::Ready => "ready",
            BuildStatus::Error => "error",
        }
    }
}

/// Why a build failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildReason {
    /// What happened.
    pub message: String,
    /// The step that failed: `base`, a 1-based step number, or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// One build of a template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Build id (a UUID).
    pub id: String,
    /// Where it is.
    pub status: BuildStatus,
    /// When it was requested.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it ended.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// The image it makes.
    pub image: String,
    /// Tags it gets when it is ready.
    pub tags: Vec<String>,
    /// The template it makes (image, user, workdir, start and ready commands); set when
    /// it is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildReason>,
    /// Seconds it took, when it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The image it was built on, when known (a steps build's base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// A built template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Template id (20 characters, `[a-z0-9]`).
    pub id: String,
    /// Its name (E2B's alias), unique on this server.
    pub name: String,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Tag to build id.
    pub tags: BTreeMap<String, String>,
    /// Builds, oldest first.
    pub builds: Vec<BuildRecord>,
    /// CPUs its sandboxes ask for by default (E2B's `cpuCount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// Memory its sandboxes ask for by default, MiB (E2B's `memoryMB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// A snapshot (E2B's): the sandbox its builds were captured from last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
    /// Captured for a fork: removed once no sandbox uses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

impl TemplateRecord {
    /// Build `id`.
    pub fn build(&self, id: &str) -> Option<&BuildRecord> {
        self.builds.iter().find(|b| b.id == id)
    }

    /// The build a reference without a tag means: the default tag's, else the newest
    /// ready build.
    pub fn current(&self) -> Option<&BuildRecord> {
        self.tags
            .get(DEFAULT_TAG)
            .and_then(|id| self.build(id))
            .or_else(|| {
                self.builds
                    .iter()
                    .rev()
                    .find(|b| b.status == BuildStatus::Ready)
            })
    }

    /// Tags of build `id`.
    pub fn tags_of(&self, id: &str) -> Vec<String> {
        self.tags
            .iter()
            .filter(|(_, b)| b.as_str() == id)
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// How the registry runs builds.
#[derive(Clone, Debug, PartialEq)]
pub struct RegistryConfig {
    /// Where records, uploads and logs are kept; `None`: in memory only (tests).
    pub dir: Option<PathBuf>,
    /// Builds running at once.
    pub max_concurrent_builds: usize,
    /// Builds allowed to wait for a slot; more are refused.
    pub max_queued_builds: usize,
    /// Memory of each build step, MiB.
    pub build_memory_mb: u64,
    /// CPUs of each build step.
    pub build_cpus: f64,
    /// Longest a build may take.
    pub build_timeout: Duration,
    /// Whether RUN steps may reach the network.
    pub build_network: bool,
    /// Bytes of log kept per build.
    pub max_log_bytes: usize,
    /// Largest upload (build context or COPY files), bytes.
    pub max_upload_bytes: u64,
    /// How long a new sandbox's ready command may take to pass.
    pub ready_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_concurrent_builds: 2,
            max_queued_builds: 16,
            build_memory_mb: 2048,
            build_cpus: 2.0,
            build_timeout: Duration::from_secs(30 * 60),
            build_network: true,
            max_log_bytes: 2 << 20,
            max_upload_bytes: 2 << 30,
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// Where a build's context comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum JobContext {
    /// An uploaded context archive (removed when the build ends).
    Upload(PathBuf),
    /// A steps template: its Dockerfile and COPY files, assembled when the build starts.
    Steps {
        /// The Dockerfile.
        dockerfile: String,
        /// The uploaded files it copies.
        copies: Vec<CopySource>,
    },
}

/// One build to run.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildJob {
    /// Its context.
    pub context: JobContext,
    /// Path of the Dockerfile in the context.
    pub dockerfile: String,
    /// Step of each Dockerfile instruction (see [`crate::template::steps::Plan`]);
    /// empty: steps are the instructions' numbers.
    pub step_of_instruction: Vec<String>,
    /// What each step does (index 0 is step 1), for the log.
    pub descriptions: Vec<String>,
    /// A base image to make local first (pulled where possible), if known.
    pub base: Option<String>,
    /// The template the build makes (its image is filled in).
    pub template: Template,
    /// Build every step again.
    pub no_cache: bool,
}

#[derive(Default)]
struct State {
    templates: BTreeMap<String, TemplateRecord>,
    logs: HashMap<String, BuildLog>,
    tasks: HashMap<String, tokio::task::AbortHandle>,
    queued: usize,
}

/// The server's built templates.
pub struct Registry {
    config: RegistryConfig,
    state: Mutex<State>,
    slots: Arc<Semaphore>,
    files: FileStore,
    scratch: PathBuf,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.config.dir)
            .finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A new template id: 20 characters of `[a-z0-9]`.
fn template_id() -> String {
    crate::types::random_alphanumeric(20)
}

/// Checks a template name: what E2B allows in aliases, plus `/` for namespaces.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "template name {name:?} must be 1 to 128 letters, digits, '-', '_', '.' or '/', \
             starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a tag.
pub fn validate_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "tag {tag:?} must be 1 to 128 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Splits `name[:tag]`.
pub fn split_reference(reference: &str) -> (&str, Option<&str>) {
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (reference, None),
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, data)?;
    std::fs::rename(&temp, path)
}

/// The message of a failed step, in the user's terms: its number, what it is and the
/// exit code where the engine said one.
fn step_failure(step: Option<&str>, description: Option<&str>, engine: &str) -> String {
    let code = engine
        .rsplit_once("non-zero code: ")
        .or_else(|| engine.rsplit_once("exit status "))
        .and_then(|(_, c)| c.trim().parse::<i64>().ok());
    match (step, description, code) {
        (Some(step), Some(d), Some(code)) => {
            format!("step {step} ({d}) failed with exit code {code}")
        }
        (Some(step), Some(d), None) => format!("step {step} ({d}) failed: {engine}"),
        _ => engine.to_string(),
    }
}

impl Registry {
    /// Opens the registry, reading the records kept in `config.dir`. Builds that were
    /// running when the server stopped are marked failed; their images are returned,
    /// for the caller to remove.
    pub fn open(config: RegistryConfig) -> (Self, Vec<String>) {
        let scratch = config
            .dir
            .as_ref()
            .map(|d| d.join("scratch"))
            .unwrap_or_else(|| std::env::temp_dir().join("colima-e2b-builds"));
        let files = FileStore::new(
            config
                .dir
                .as_ref()
                .map(|d| d.join("files"))
                .unwrap_or_else(|| scratch.join("files")),
        );
        let mut state = State::default();
        let mut interrupted = Vec::new();
        if let Some(dir) = &config.dir {
            let _ = std::fs::create_dir_all(dir.join("logs"));
            // Contexts of builds that a restart cut off.
            let _ = std::fs::remove_dir_all(&scratch);
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().and_then(|e| e.to_str()) != Some("json") {
                        continue;
                    }
                    let record = std::fs::read(&path)
                        .ok()
                        .and_then(|d| serde_json::from_slice::<TemplateRecord>(&d).ok());
                    let Some(mut record) = record else {
                        tracing::warn!(file = %path.display(), "unreadable template record skipped");
                        continue;
                    };
                    let mut changed = false;
                    for b in &mut record.builds {
                        if matches!(b.status, BuildStatus::Waiting | BuildStatus::Building) {
                            b.status = BuildStatus::Error;
                            b.finished_at = Some(now());
                            b.reason = Some(BuildReason {
                                message: "the server stopped during this build".into(),
                                step: None,
                            });
                            interrupted.push(b.image.clone());
                            changed = true;
                        }
                    }
                    if changed {
                        let _ = write_json(&path, &record);
                    }
                    state.templates.insert(record.id.clone(), record);
                }
            }
        }
        let slots = Arc::new(Semaphore::new(config.max_concurrent_builds.max(1)));
        (
            Self {
                config,
                state: Mutex::new(state),
                slots,
                files,
                scratch,
            },
            interrupted,
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How builds run.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// The uploaded build files.
    pub fn files(&self) -> &FileStore {
        &self.files
    }

    /// Receives an uploaded build context (plain or gzip tar, at most the upload cap)
    /// into the scratch directory; the build that takes it removes it.
    pub async fn receive_context<S>(&self, body: S) -> Result<PathBuf>
    where
        S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send,
    {
        let path = self.scratch.join(format!(
            "context-{}.tar",
            crate::types::SandboxId::generate()
        ));
        crate::template::files::write_capped(
            &self.scratch,
            &path,
            body,
            self.config.max_upload_bytes,
            "the build context",
        )
        .await?;
        Ok(path)
    }

    fn persist(&self, record: &TemplateRecord) {
        if let Some(dir) = &self.config.dir {
            let path = dir.join(format!("{}.json", record.id));
            if let Err(e) = std::fs::create_dir_all(dir).and_then(|_| write_json(&path, record)) {
                tracing::warn!(template = %record.id, error = %e, "could not save the template record");
            }
        }
    }

    fn log_file(&self, build_id: &str) -> Option<PathBuf> {
        let safe = build_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        safe.then(|| {
            self.config
                .dir
                .as_ref()
                .map(|d| d.join("logs").join(format!("{build_id}.json")))
        })
        .flatten()
    }

    /// Every template, by name.
    pub fn list(&self) -> Vec<TemplateRecord> {
        let mut all: Vec<TemplateRecord> = self.lock().templates.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The template whose id or name is `id_or_name`.
    pub fn find(&self, id_or_name: &str) -> Option<TemplateRecord> {
        let state = self.lock();
        state
            .templates
            .get(id_or_name)
            .or_else(|| state.templates.values().find(|t| t.name == id_or_name))
            .cloned()
    }

    /// What a sandbox of `reference` (`name`, `name:tag` or the template id, with an
    /// optional tag) is made from, if it names a ready build here.
    pub fn resolve(&self, reference: &str) -> Option<Template> {
        let (name, tag) = split_reference(reference);
        let record = self.find(name).or_else(|| self.find(reference))?;
        let build = match tag {
            Some(tag) if record.name != reference && record.id != reference => {
                record.tags.get(tag).and_then(|id| record.build(id))
            }
            _ => record.current(),
        }?;
        let mut template = build
            .template
            .clone()
            .filter(|_| build.status == BuildStatus::Ready)?;
        // What the template was built for (E2B's cpuCount and memoryMB).
        template.cpus = template.cpus.or(record.cpu_count.map(f64::from));
        template.memory_mb = template.memory_mb.or(record.memory_mb);
        Some(template)
    }

    /// A new build of template `name` (created when missing), waiting for its steps;
    /// `tags` (default [`DEFAULT_TAG`]) point at it once it is ready.
    pub fn request(
        &self,
        name: &str,
        tags: Vec<String>,
        cpu_count: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<(TemplateRecord, BuildRecord)> {
        validate_name(name)?;
        let mut tags = if tags.is_empty() {
            vec![DEFAULT_TAG.to_string()]
        } else {
            tags
        };
        tags.sort();
        tags.dedup();
        for t in &tags {
            validate_tag(t)?;
        }
        let mut state = self.lock();
        let existing = state
            .templates
            .values()
            .find(|t| t.name == name)
            .map(|t| t.id.clone());
        let id = existing.unwrap_or_else(template_id);
        let build_id = uuid::Uuid::new_v4().to_string();
        let record = state
            .templates
            .entry(id.clone())
            .or_insert_with(|| TemplateRecord {
                id: id.clone(),
                name: name.to_string(),
                created_at: now(),
                tags: BTreeMap::new(),
                builds: Vec::new(),
                cpu_count: None,
                memory_mb: None,
                snapshot_of: None,
                ephemeral: false,
            });
        if cpu_count.is_some() {
            record.cpu_count = cpu_count;
        }
        if memory_mb.is_some() {
            record.memory_mb = memory_mb;
        }
        let build = BuildRecord {
            id: build_id.clone(),
            status: BuildStatus::Waiting,
            created_at: now(),
            finished_at: None,
            image: format!("{IMAGE_REPO}/{id}:{build_id}"),
            tags,
            template: None,
            reason: None,
            seconds: None,
            base: None,
        };
        record.builds.push(build.clone());
        // Requested builds that never got their steps are forgotten after a while.
        let cutoff = now() - time::Duration::hours(24);
        record.builds.retain(|b| {
            b.status != BuildStatus::Waiting || b.created_at > cutoff || b.id == build_id
        });
        let record = record.clone();
        let log = BuildLog::new(self.config.max_log_bytes);
        state.logs.insert(build_id, log);
        drop(state);
        self.persist(&record);
        Ok((record, build))
    }

    /// Template `template_id`'s build `build_id`.
    pub fn build(
        &self,
        template_id: &str,
        build_id: &str,
    ) -> Result<(TemplateRecord, BuildRecord)> {
        let record = self
            .find(template_id)
            .ok_or_else(|| Error::not_found(format!("template {template_id}")))?;
        let build = record.build(build_id).cloned().ok_or_else(|| {
            Error::not_found(format!("build {build_id} of template {template_id}"))
        })?;
        Ok((record, build))
    }

    /// The log of build `build_id` (read back from disk for builds of earlier runs).
    pub fn log(&self, build_id: &str) -> Option<BuildLog> {
        if let Some(log) = self.lock().logs.get(build_id) {
            return Some(log.clone());
        }
        let path = self.log_file(build_id)?;
        let entries: Vec<LogEntry> = std::fs::read(path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())?;
        Some(BuildLog::restored(entries, self.config.max_log_bytes))
    }

    fn update(&self, template_id: &str, f: impl FnOnce(&mut TemplateRecord)) {
        let record = {
            let mut state = self.lock();
            let Some(record) = state.templates.get_mut(template_id) else {
                return;
            };
            f(record);
            record.clone()
        };
        self.persist(&record);
    }

    /// Starts build `build_id` of template `template_id` (which must be waiting for its
    /// steps) in the background. Refused when the queue is full.
    pub fn start(
        self: &Arc<Self>,
        backend: DynBackend,
        template_id: &str,
        build_id: &str,
        job: BuildJob,
    ) -> Result<()> {
        let (_, build) = self.build(template_id, build_id)?;
        let mut state = self.lock();
        if build.status != BuildStatus::Waiting || state.tasks.contains_key(build_id) {
            return Err(Error::Conflict(format!(
                "build {build_id} was already started ({})",
                build.status.as_str()
            )));
        }
        let running = self.config.max_concurrent_builds.max(1);
        if state.queued >= running + self.config.max_queued_builds {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "{} builds are running or waiting; try again later",
                    state.queued
                ),
                retry_after: Some(Duration::from_secs(10)),
            });
        }
        state.queued += 1;
        if let Some(b) = state
            .templates
            .get_mut(template_id)
            .and_then(|r| r.builds.iter_mut().find(|b| b.id == build_id))
        {
            b.base = job.base.clone();
        }
        let log = state
            .logs
            .entry(build_id.to_string())
            .or_insert_with(|| BuildLog::new(self.config.max_log_bytes))
            .clone();
        let this = self.clone();
        let (tid, bid) = (template_id.to_string(), build_id.to_string());
        let task = tokio::spawn(async move {
            this.run(backend, &tid, &bid, job, log).await;
        });
        state
            .tasks
            .insert(build_id.to_string(), task.abort_handle());
        Ok(())
    }

    async fn run(&self, backend: DynBackend, tid: &str, bid: &str, job: BuildJob, log: BuildLog) {
        struct Done<'a>(&'a Registry, &'a str);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock();
                state.queued = state.queued.saturating_sub(1);
                state.tasks.remove(self.1);
            }
        }
        let _done = Done(self, bid);
        if self.slots.available_permits() == 0 {
            log.push(
                LogLevel::Info,
                None,
                format!(
                    "waiting for a build slot ({} builds run at once)",
                    self.config.max_concurrent_builds.max(1)
                ),
            );
        }
        let Ok(_slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        self.update(tid, |r| {
            if let Some(b) = r.builds.iter_mut().find(|b| b.id == bid) {
                b.status = BuildStatus::Building;
            }
        });
        let started = Instant::now();
        let (_, build) = match self.build(tid, bid) {
            Ok(b) => b,
            Err(_) => return,
        };
        let outcome = self.execute(&backend, &build.image, &job, &log).await;
        let seconds = started.elapsed().as_secs_f64();
        if let JobContext::Upload(path) = &job.context {
            let _ = tokio::fs::remove_file(path).await;
        }
        match outcome {
            Ok(_) => {
                log.push(
                    LogLevel::Info,
                    Some("finalize".into()),
                    format!("built {} in {seconds:.1} s", build.image),
                );
                let template = Template {
                    image: build.image.clone(),
                    ..job.template.clone()
                };
                self.update(tid, |r| {
                    for tag in &build.tags {
                        r.tags.insert(tag.clone(), bid.to_string());
                    }
                    if let Some(b) = r.builds.iter_mut().find(|b| b.id == bid) {
                        b.status = BuildStatus::Ready;
                        b.template = Some(template);
                        b.finished_at = Some(now());
                        b.seconds = Some(seconds);
                    }
                });
                metrics::counter!("colima_e2b_template_builds_total", "outcome" => "ready")
                    .increment(1);
            }
            Err(reason) => {
                log.push(LogLevel::Error, reason.step.clone(), reason.message.clone());
                self.update(tid, |r| {
                    if let Some(b) = r.builds.iter_mut().find(|b| b.id == bid) {
                        b.status = BuildStatus::Error;
                        b.reason = Some(reason);
                        b.finished_at = Some(now());
                        b.seconds = Some(seconds);
                    }
                });
                metrics::counter!("colima_e2b_template_builds_total", "outcome" => "error")
                    .increment(1);
            }
        }
        metrics::histogram!("colima_e2b_template_build_seconds").record(seconds);
        log.close();
        if let Some(path) = self.log_file(bid) {
            if let Err(e) = write_json(&path, &log.all()) {
                tracing::warn!(build = bid, error = %e, "could not save the build log");
            }
        }
    }

    async fn execute(
        &self,
        backend: &DynBackend,
        image: &str,
        job: &BuildJob,
        log: &BuildLog,
    ) -> std::result::Result<ImageInfo, BuildReason> {
        let base_failed = |e: Error| BuildReason {
            message: e.to_string(),
            step: Some("base".into()),
        };
        if let Some(base) = &job.base {
            log.push(LogLevel::Info, Some("base".into()), format!("FROM {base}"));
            backend.ensure_image(base).await.map_err(base_failed)?;
        }
        let context = match &job.context {
            JobContext::Upload(path) => path.clone(),
            JobContext::Steps { dockerfile, copies } => {
                let out = self.scratch.join(format!(
                    "{}.tar",
                    image.rsplit(':').next().unwrap_or("build")
                ));
                let (files, df, copies, target) = (
                    self.files.clone(),
                    dockerfile.clone(),
                    copies.clone(),
                    out.clone(),
                );
                let scratch = self.scratch.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&scratch)
                        .map_err(|e| Error::backend("templates", format!("scratch dir: {e}")))?;
                    write_steps_context(&target, &df, &copies, &files)
                })
                .await
                .map_err(|e| base_failed(Error::backend("templates", e.to_string())))?
                .map_err(|e| BuildReason {
                    message: e.to_string(),
                    step: None,
                })?;
                out
            }
        };
        let req = BuildRequest {
            tag: image.to_string(),
            context: context.clone(),
            dockerfile: job.dockerfile.clone(),
            // No labels: Docker's builder adds a LABEL step (a container and a commit)
            // for them; the image's name already says which template it is.
            labels: BTreeMap::new(),
            memory_bytes: self.config.build_memory_mb << 20,
            cpus: self.config.build_cpus,
            network: self.config.build_network,
            no_cache: job.no_cache,
        };
        let current: Mutex<Option<String>> = Mutex::new(None);
        let steps = job.descriptions.len();
        let sink = |event: BuildEvent| {
            let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                BuildEvent::Step {
                    number,
                    total,
                    text,
                } => {
                    let label = if job.step_of_instruction.is_empty() {
                        number.to_string()
                    } else {
                        job.step_of_instruction
                            .get(number.saturating_sub(1) as usize)
                            .cloned()
                            .unwrap_or_else(|| "finalize".into())
                    };
                    if cur.as_deref() == Some(label.as_str()) {
                        return;
                    }
                    *cur = Some(label.clone());
                    if job.step_of_instruction.is_empty() {
                        log.push(
                            LogLevel::Info,
                            Some(label),
                            format!("Step {number}/{total}: {text}"),
                        );
                    } else if let Some(d) = label
                        .parse::<usize>()
                        .ok()
                        .and_then(|k| job.descriptions.get(k.wrapping_sub(1)))
                    {
                        log.push(
                            LogLevel::Info,
                            Some(label.clone()),
                            format!("[{label}/{steps}] {d}"),
                        );
                    }
                }
                BuildEvent::Cached => {
                    log.push(LogLevel::Debug, cur.clone(), "cached");
                }
                BuildEvent::Output(line) => log.push(LogLevel::Info, cur.clone(), line),
            }
        };
        let result =
            tokio::time::timeout(self.config.build_timeout, backend.build_image(&req, &sink)).await;
        if matches!(job.context, JobContext::Steps { .. }) {
            let _ = tokio::fs::remove_file(&context).await;
        }
        let step = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let description = step
            .as_deref()
            .and_then(|s| s.parse::<usize>().ok())
            .and_then(|k| job.descriptions.get(k.wrapping_sub(1)))
            .map(String::as_str);
        match result {
            Ok(Ok(info)) => Ok(info),
            Ok(Err(Error::BuildFailed(m))) => Err(BuildReason {
                message: step_failure(step.as_deref(), description, &m),
                step,
            }),
            Ok(Err(e)) => Err(BuildReason {
                message: e.to_string(),
                step,
            }),
            Err(_) => Err(BuildReason {
                message: format!(
                    "the build took longer than {} s and was stopped",
                    self.config.build_timeout.as_secs()
                ),
                step,
            }),
        }
    }

    /// Points `tags` of template `name` at the build `target` (`name:tag`) names.
    pub fn assign_tags(&self, target: &str, tags: &[String]) -> Result<(String, Vec<String>)> {
        let (name, tag) = split_reference(target);
        for t in tags {
            validate_tag(t)?;
        }
        let record = self
            .find(name)
            .ok_or_else(|| Error::not_found(format!("template {name}")))?;
        let build = match tag {
            Some(tag) => record
                .tags
                .get(tag)
                .and_then(|id| record.build(id))
                .ok_or_else(|| Error::not_found(format!("tag {tag} of template {name}")))?,
            None => record
                .current()
                .ok_or_else(|| Error::not_found(format!("a ready build of template {name}")))?,
        };
        if build.status != BuildStatus::Ready {
            return Err(Error::Conflict(format!("build {} is not ready", build.id)));
        }
        let bid = build.id.clone();
        self.update(&record.id, |r| {
            for t in tags {
                r.tags.insert(t.clone(), bid.clone());
            }
        });
        Ok((bid, tags.to_vec()))
    }

    /// Removes `tags` from template `name`.
    pub fn remove_tags(&self, name: &str, tags: &[String]) -> Result<()> {
        let record = self
            .find(name)
            .ok_or_else(|| Error::not_found(format!("template {name}")))?;
        if let Some(t) = tags.iter().find(|t| !record.tags.contains_key(*t)) {
            return Err(Error::not_found(format!("tag {t} of template {name}")));
        }
        self.update(&record.id, |r| {
            for t in tags {
                r.tags.remove(t);
            }
        });
        Ok(())
    }

    /// A new capture of sandbox `source` (E2B's snapshot): a build of snapshot template
    /// `name` (created when missing; `None`: a new unnamed one, `ephemeral` for a fork's),
    /// its image to be committed by the caller, then [`finish_snapshot`](Self::finish_snapshot)
    /// or [`fail_snapshot`](Self::fail_snapshot). A template of that name that is not a
    /// snapshot is a conflict.
    pub fn request_snapshot(
        &self,
        name: Option<&str>,
        source: &str,
        ephemeral: bool,
    ) -> Result<(TemplateRecord, BuildRecord)> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        let mut state = self.lock();
        let existing = name.and_then(|n| state.templates.values().find(|t| t.name == n));
        if let Some(t) = existing {
            if t.snapshot_of.is_none() {
                return Err(Error::Conflict(format!(
                    "template {} exists and is not a snapshot",
                    t.name
                )));
            }
        }
        let id = existing.map(|t| t.id.clone()).unwrap_or_else(template_id);
        let build_id = uuid::Uuid::new_v4().to_string();
        let record = state
            .templates
            .entry(id.clone())
            .or_insert_with(|| TemplateRecord {
                id: id.clone(),
                name: name.map_or_else(|| id.clone(), str::to_string),
                created_at: now(),
                tags: BTreeMap::new(),
                builds: Vec::new(),
                cpu_count: None,
                memory_mb: None,
                snapshot_of: None,
                ephemeral,
            });
        record.snapshot_of = Some(source.to_string());
        let build = BuildRecord {
            id: build_id,
            // A restart during the capture fails it and removes its image (`open`).
            status: BuildStatus::Building,
            created_at: now(),
            finished_at: None,
            image: format!("{IMAGE_REPO}/{id}:{}", uuid::Uuid::new_v4()),
            tags: vec![DEFAULT_TAG.to_string()],
            template: None,
            reason: None,
            seconds: None,
            base: None,
        };
        record.builds.push(build.clone());
        let record = record.clone();
        drop(state);
        self.persist(&record);
        Ok((record, build))
    }

    /// Snapshot build `build_id` of `template_id` was captured: it is ready as
    /// `template`, built on `base` (the image the source ran from, when known), and
    /// its template's default.
    pub fn finish_snapshot(
        &self,
        template_id: &str,
        build_id: &str,
        template: Template,
        base: Option<String>,
    ) {
        self.update(template_id, |r| {
            let Some(b) = r.builds.iter_mut().find(|b| b.id == build_id) else {
                return;
            };
            b.status = BuildStatus::Ready;
            b.finished_at = Some(now());
            b.seconds = Some((now() - b.created_at).as_seconds_f64());
            b.template = Some(template);
            b.base = base;
            r.tags.insert(DEFAULT_TAG.to_string(), build_id.to_string());
        });
    }

    /// Snapshot build `build_id` of `template_id` failed: it is forgotten, and so is a
    /// template it was the only build of.
    pub fn fail_snapshot(&self, template_id: &str, build_id: &str) {
        let empty = {
            let mut state = self.lock();
            let Some(r) = state.templates.get_mut(template_id) else {
                return;
            };
            r.builds.retain(|b| b.id != build_id);
            r.builds.is_empty()
        };
        if empty {
            let _ = self.remove(template_id);
        } else {
            self.update(template_id, |_| {});
        }
    }

    /// Forgets template `id_or_name`, stopping its running builds; returns its record
    /// (the caller removes its images).
    pub fn remove(&self, id_or_name: &str) -> Result<TemplateRecord> {
        let record = self
            .find(id_or_name)
            .ok_or_else(|| Error::not_found(format!("template {id_or_name}")))?;
        {
            let mut state = self.lock();
            for b in &record.builds {
                if let Some(task) = state.tasks.remove(&b.id) {
                    task.abort();
                }
                state.logs.remove(&b.id);
            }
            state.templates.remove(&record.id);
        }
        if let Some(dir) = &self.config.dir {
            let _ = std::fs::remove_file(dir.join(format!("{}.json", record.id)));
            for b in &record.builds {
                if let Some(p) = self.log_file(&b.id) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(dir: Option<PathBuf>) -> Registry {
        Registry::open(RegistryConfig {
            dir,
            ..Default::default()
        })
        .0
    }

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(split_reference("web"), ("web", None));
        assert_eq!(split_reference("web:v1"), ("web", Some("v1")));
        assert_eq!(split_reference("team/web:v1"), ("team/web", Some("v1")));
    }

    #[test]
    fn requests_make_one_template_per_name_and_check_names() {
        let r = registry(None);
        let (t1, b1) = r.request("web", vec![], None, None).expect("request");
        let (t2, b2) = r
            .request("web", vec!["v2".into()], Some(2), None)
            .expect("again");
        assert_eq!(t1.id, t2.id);
        assert_ne!(b1.id, b2.id);
        assert_eq!(b1.tags, vec![DEFAULT_TAG]);
        assert_eq!(t2.cpu_count, Some(2));
        assert!(uuid::Uuid::parse_str(&b1.id).is_ok());
        assert_eq!(t1.id.len(), 20);
        assert!(b1.image.starts_with("colima-e2b-template/"));
        for bad in ["", "-x", "a b", "a:b", &"x".repeat(200)] {
            assert!(r.request(bad, vec![], None, None).is_err(), "{bad:?}");
        }
        assert!(r.request("ok", vec!["bad tag".into()], None, None).is_err());
        // Not ready: nothing resolves yet.
        assert!(r.resolve("web").is_none());
    }

    #[test]
    fn records_survive_a_restart_and_cut_builds_are_failed() {
        let dir = std::env::temp_dir().join(format!("registry-{}", crate::SandboxId::generate()));
        let (t, b) = registry(Some(dir.clone()))
            .request("web", vec![], None, None)
            .expect("request");
        {
            let r = registry(Some(dir.clone()));
            r.update(&t.id, |rec| {
                let b = &mut rec.builds[0];
                b.status = BuildStatus::Ready;
                b.template = Some(Template::new(b.image.clone()));
                rec.tags.insert(DEFAULT_TAG.into(), b.id.clone());
            });
        }
        let (r, interrupted) = Registry::open(RegistryConfig {
            dir: Some(dir.clone()),
            ..Default::default()
        });
        assert!(interrupted.is_empty());
        assert_eq!(r.resolve("web").map(|t| t.image), Some(b.image.clone()));
        assert_eq!(
            r.resolve(&format!("web:{DEFAULT_TAG}")).map(|t| t.image),
            Some(b.image.clone())
        );
        assert_eq!(r.resolve(&t.id).map(|t| t.image), Some(b.image.clone()));
        assert!(r.resolve("web:nope").is_none());
        let (_, waiting) = r
            .request("web", vec!["v2".into()], None, None)
            .expect("request");
        let (r, interrupted) = Registry::open(RegistryConfig {
            dir: Some(dir.clone()),
            ..Default::default()
        });
        assert_eq!(interrupted, vec![waiting.image.clone()]);
        let (_, cut) = r.build("web", &waiting.id).expect("build");
        assert_eq!(cut.status, BuildStatus::Error);
        r.assign_tags("web", &["stable".into()]).expect("tag");
        assert_eq!(
            r.resolve("web:stable").map(|t| t.image),
            Some(b.image.clone())
        );
        r.remove_tags("web", &["stable".into()]).expect("untag");
        assert!(r.remove_tags("web", &["stable".into()]).is_err());
        r.remove("web").expect("remove");
        assert!(r.find("web").is_none());
        assert!(registry(Some(dir.clone())).find("web").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_template_built_for_cpus_and_memory_gives_them_to_its_sandboxes() {
        let r = registry(None);
        let (t, b) = r
            .request("sized", vec![], Some(2), Some(1024))
            .expect("request");
        r.update(&t.id, |rec| {
            let build = &mut rec.builds[0];
            build.status = BuildStatus::Ready;
            build.template = Some(Template::new(b.image.clone()));
        });
        let got = r.resolve("sized").expect("ready");
        assert_eq!((got.cpus, got.memory_mb), (Some(2.0), Some(1024)));
    }

    #[test]
    fn step_failures_name_the_step_and_exit_code() {
        assert_eq!(
            step_failure(
                Some("3"),
                Some("RUN exit 3"),
                "The command '/bin/sh -c x' returned a non-zero code: 3"
            ),
            "step 3 (RUN exit 3) failed with exit code 3"
        );
        assert_eq!(
            step_failure(
                Some("2"),
                Some("RUN x"),
                "building at STEP \"RUN\": while running runtime: exit status 7"
            ),
            "step 2 (RUN x) failed with exit code 7"
        );
        assert_eq!(step_failure(None, None, "boom"), "boom");
    }
}
