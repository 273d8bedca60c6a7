//! Creating a sandbox: the spec's defaults and checks, admission (concurrent creates and
//! the sandbox limit, creates in flight included), the container, and its agent.

use std::time::{Duration, Instant};

use envd_proto::messages::InitRequest;

use super::sandbox_logs::{LogEntry, LogLevel};
use super::{now_ms, SandboxManager};
use crate::agent::{generate_secret, AgentClient, SECRET_ENV};
use crate::backend::ContainerSpec;
use crate::error::{Error, Result};
use crate::labels;
use crate::template::Template;
use crate::types::{
    validate_envs, validate_user, Limits, SandboxId, SandboxInfo, SandboxSpec, SandboxState,
};

/// Room a sandbox needs on its disk beyond its image, MiB.
const DISK_HEADROOM_MB: u64 = 32;

/// A create's place under the sandbox limit, given back when the create ends (its
/// sandbox, if any, is in the registry by then).
pub(super) struct Reservation<'a>(&'a SandboxManager);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reg = self.0.registry();
        reg.reserved = reg.reserved.saturating_sub(1);
    }
}

/// Refuses a disk quota too small for the template's image: engines whose quota counts
/// the image too (btrfs) could not even start it, and some leave storage behind when
/// they fail, so this is decided before asking.
fn check_disk_fits(r: &Resolved, image_size: Option<u64>) -> Result<()> {
    let (Some(disk), Some(size)) = (r.limits.disk_mb, image_size) else {
        return Ok(());
    };
    let need = (size >> 20) + DISK_HEADROOM_MB;
    if disk < need {
        return Err(Error::InvalidArgument(format!(
            "disk_mb {disk} is too small for template {:?}: its image takes {} MiB; ask for \
             at least {need}",
            r.template_name,
            size >> 20
        )));
    }
    Ok(())
}

/// A spec with every default decided.
pub(super) struct Resolved {
    pub(super) template_name: String,
    pub(super) template: Template,
    pub(super) timeout: Duration,
    pub(super) limits: Limits,
    pub(super) user: String,
    /// The engine volumes of `volume_mounts`.
    pub(super) volumes: Vec<crate::backend::VolumeBind>,
}

impl SandboxManager {
    pub(super) fn resolve(&self, spec: &SandboxSpec) -> Result<Resolved> {
        let config = &self.inner.config;
        let template_name = spec
            .template
            .clone()
            .unwrap_or_else(|| config.default_template.clone());
        let template = self.resolve_template(&template_name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown template {template_name:?}; known templates: {}",
                self.template_names().join(", ")
            ))
        })?;
        let timeout = spec.timeout.unwrap_or(config.default_timeout);
        self.check_timeout(timeout)?;
        spec.lifecycle.check()?;
        validate_envs(&spec.envs)?;
        labels::validate_metadata(&spec.metadata)?;
        let limits = Limits {
            cpus: spec
                .cpus
                .or(template.cpus)
                .unwrap_or(config.default_limits.cpus),
            memory_mb: spec
                .memory_mb
                .or(template.memory_mb)
                .unwrap_or(config.default_limits.memory_mb),
            disk_mb: self.disk_quota(spec.disk_mb)?,
            ..config.default_limits
        };
        limits.validate()?;
        self.check_host_limits(&limits)?;
        let user = spec.user.clone().unwrap_or_else(|| template.user.clone());
        validate_user(&user)?;
        let volumes = self.volume_binds(&spec.volume_mounts)?;
        Ok(Resolved {
            template_name,
            template,
            timeout,
            limits,
            user,
            volumes,
        })
    }

    /// The most CPUs and memory (MiB) a sandbox may have: the configured maxima, within
    /// what the engine's host has (learnt at start).
    pub fn max_limits(&self) -> (Option<f64>, Option<u64>) {
        let config = &self.inner.config;
        let host = super::lock(&self.inner.host).clone();
        let host_cpus = host.as_ref().and_then(|h| h.cpus).map(f64::from);
        let host_mb = host.as_ref().and_then(|h| h.memory_bytes).map(|b| b >> 20);
        let min_f = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let min_u = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (
            min_f(config.max_cpus, host_cpus),
            min_u(config.max_memory_mb, host_mb),
        )
    }

    /// The disk quota of a new sandbox: the request's, else the default, where the
    /// engine's storage can enforce one (the binary refuses to start without quota
    /// support unless told to allow unlimited disks).
    fn disk_quota(&self, asked: Option<u64>) -> Result<Option<u64>> {
        let config = &self.inner.config;
        if !self.inner.backend.capabilities().disk_quota {
            return match asked {
                Some(_) => Err(Error::InvalidArgument(
                    "this server's engine storage cannot enforce disk quotas, so disk_mb \
                     cannot be set (see `colima-e2b doctor`)"
                        .into(),
                )),
                None => Ok(None),
            };
        }
        let disk = asked.or(config.default_limits.disk_mb);
        if let (Some(d), Some(max)) = (disk, config.max_disk_mb) {
            if d > max {
                return Err(Error::InvalidArgument(format!(
                    "disk_mb {d} is more than the {max} MiB a sandbox may have here (max_disk_mb)"
                )));
            }
        }
        Ok(disk)
    }

    fn check_host_limits(&self, limits: &Limits) -> Result<()> {
        let (max_cpus, max_mb) = self.max_limits();
        if let Some(max) = max_cpus.filter(|max| limits.cpus > *max) {
            return Err(Error::InvalidArgument(format!(
                "cpus {} is more than the {max} a sandbox may have here (max_cpus, at most \
                 the engine host's CPUs)",
                limits.cpus
            )));
        }
        if let Some(max) = max_mb.filter(|max| limits.memory_mb > *max) {
            return Err(Error::InvalidArgument(format!(
                "memory_mb {} is more than the {max} MiB a sandbox may have here \
                 (max_memory_mb, at most the engine host's memory)",
                limits.memory_mb
            )));
        }
        Ok(())
    }

    /// Whether a create (a client's or the pool's) runs or waits for its turn now.
    pub(super) fn creates_busy(&self) -> bool {
        let config = &self.inner.config;
        self.inner.creates.available_permits() < config.max_concurrent_creates.max(1)
            || self.inner.queued.load(std::sync::atomic::Ordering::Relaxed) > 0
            || self.pool_filling()
    }

    /// Takes a place under the sandbox limit (creates in flight count), or says it is
    /// reached.
    pub(super) fn reserve(&self) -> Result<Reservation<'_>> {
        let config = &self.inner.config;
        let mut reg = self.registry();
        if reg.sandboxes.len() + reg.reserved >= config.max_sandboxes {
            metrics::counter!("colima_e2b_sandbox_create_failures_total", "reason" => "limit")
                .increment(1);
            return Err(Error::ResourceExhausted {
                message: format!("the limit of {} sandboxes is reached", config.max_sandboxes),
                retry_after: Some(Duration::from_secs(5)),
            });
        }
        reg.reserved += 1;
        Ok(Reservation(self))
    }

    /// Takes a place under the sandbox limit, then a turn among the concurrent creates:
    /// a create beyond `max_concurrent_creates` waits in a bounded queue for at most
    /// `create_queue_wait`, and is refused only when the queue is full or the wait runs
    /// out.
    async fn admit(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, Reservation<'_>)> {
        use std::sync::atomic::Ordering;
        let config = &self.inner.config;
        let reservation = self.reserve()?;
        if let Ok(permit) = self.inner.creates.try_acquire() {
            return Ok((permit, reservation));
        }
        let busy = |why: String| {
            metrics::counter!("colima_e2b_sandbox_create_failures_total", "reason" => "busy")
                .increment(1);
            Error::ResourceExhausted {
                message: why,
                retry_after: Some(Duration::from_secs(1)),
            }
        };
        let queued = &self.inner.queued;
        if queued.fetch_add(1, Ordering::SeqCst) >= config.max_queued_creates {
            queued.fetch_sub(1, Ordering::SeqCst);
            return Err(busy(format!(
                "{} creates are running and {} more are waiting (max_queued_creates)",
                config.max_concurrent_creates, config.max_queued_creates
            )));
        }
        metrics::gauge!("colima_e2b_sandbox_creates_queued").increment(1.0);
        let waited =
            tokio::time::timeout(config.create_queue_wait, self.inner.creates.acquire()).await;
        queued.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("colima_e2b_sandbox_creates_queued").decrement(1.0);
        match waited {
            Ok(Ok(permit)) => Ok((permit, reservation)),
            Ok(Err(_)) => Err(busy("the server is shutting down".into())),
            Err(_) => Err(busy(format!(
                "more than {} sandbox creates at once, and none ended within {} s \
                 (create_queue_wait)",
                config.max_concurrent_creates,
                config.create_queue_wait.as_secs()
            ))),
        }
    }

    /// Creates and starts a sandbox: from its template's warm pool when the pool can
    /// serve the request, else cold.
    ///
    /// Refused with [`Error::ResourceExhausted`] when the sandbox limit is reached
    /// (creates in flight count) or the create waited for its turn too long. A failed
    /// create leaves no container behind.
    ///
    /// A network config (`spec.network`) is checked before anything is created and in
    /// force before this returns; a sandbox whose rules cannot be installed is removed.
    pub async fn create(&self, mut spec: SandboxSpec) -> Result<SandboxInfo> {
        let network = spec.network.take().map(|mut net| {
            if !spec.internet {
                // E2B's internet off with exceptions: an online sandbox that denies
                // everything but `allowOut` (a sandbox on the offline network could
                // reach nothing at all).
                net.internet = false;
                spec.internet = !net.allow_out.is_empty();
            }
            net
        });
        if let Some(net) = &network {
            self.check_network(net, spec.internet)?;
        }
        let info = self.create_unconfigured(spec).await?;
        self.release_address(&info.id).await;
        if let Some(net) = network {
            if let Err(e) = self.set_network(&info.id, net).await {
                if let Err(k) = self.kill(&info.id).await {
                    tracing::warn!(sandbox = %info.id, error = %k, "could not remove a sandbox whose network config failed");
                }
                return Err(e);
            }
        }
        Ok(info)
    }

    /// [`SandboxManager::create`] without the network config.
    async fn create_unconfigured(&self, spec: SandboxSpec) -> Result<SandboxInfo> {
        let resolved = self.resolve(&spec)?;
        if let Some(result) = self.claim(&spec, &resolved).await {
            return result;
        }
        let (_permit, reservation) = self.admit().await?;
        let used = {
            let reg = self.registry();
            reg.sandboxes.len() + reg.reserved
        };
        if used + self.pool_total() > self.inner.config.max_sandboxes {
            // Pool members give way to clients' sandboxes.
            self.evict_for_room().await;
        }
        let started = Instant::now();
        let id = SandboxId::generate();
        // Noted before the engine is asked: a crash from here on leaves a container that
        // the next start removes, since no client got an answer for it.
        self.inner.journal.begin(&id)?;
        let result = self
            .create_container(&spec, &resolved, id.clone(), false)
            .await;
        let result = match result {
            Ok((info, client)) => {
                if let Some(client) = client {
                    self.agents().insert(info.id.clone(), client);
                }
                self.registry()
                    .sandboxes
                    .insert(info.id.clone(), info.clone());
                // Registered before the place is given back: the limit never has a gap.
                drop(reservation);
                self.created(&info, started, "cold");
                Ok(info)
            }
            Err(e) => {
                self.forget_lifecycle(&id);
                metrics::histogram!("colima_e2b_sandbox_create_seconds", "outcome" => "error", "path" => "cold")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("colima_e2b_sandbox_create_failures_total", "reason" => e.code())
                    .increment(1);
                Err(e)
            }
        };
        self.inner.journal.end(&id);
        result
    }

    /// Notes a sandbox's successful create (either path) in its log and metrics.
    pub(super) fn created(&self, info: &SandboxInfo, started: Instant, path: &'static str) {
        metrics::histogram!("colima_e2b_sandbox_create_seconds", "outcome" => "ok", "path" => path)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("colima_e2b_sandbox_creates_total", "template" => info.template.clone())
            .increment(1);
        self.log(
            &info.id,
            LogEntry::now(
                LogLevel::Info,
                "sandbox created",
                &[
                    ("template", info.template.clone()),
                    ("image", info.image.clone()),
                    ("path", path.to_string()),
                    ("ends_at", super::sandbox_logs::rfc3339(info.expires_at)),
                ],
            ),
        );
        self.inner.reaper_wake.notify_one();
        self.update_gauges();
    }

    /// The container of a new sandbox, started, with its agent ready: initialised with
    /// the request's settings for a cold create, or left untouched (the template's start
    /// command running) for a warm pool member, which its claim initialises.
    pub(super) async fn create_container(
        &self,
        spec: &SandboxSpec,
        r: &Resolved,
        id: SandboxId,
        pool_member: bool,
    ) -> Result<(SandboxInfo, Option<AgentClient>)> {
        let backend = &self.inner.backend;
        let config = &self.inner.config;
        let run = self.template_image(&r.template.image).await?;
        check_disk_fits(r, run.size)?;
        let image = run.name;
        let agent = config.agent.as_ref();
        let secret = agent.map(|_| generate_secret());
        let now = now_ms();
        let mut info = SandboxInfo {
            id,
            template: r.template_name.clone(),
            image: image.clone(),
            state: SandboxState::Running,
            metadata: spec.metadata.clone(),
            started_at: now,
            expires_at: now + r.timeout,
            limits: r.limits,
            internet: spec.internet,
            secure: spec.secure,
            volume_mounts: spec.volume_mounts.clone(),
        };
        let name = labels::container_name(&info.id);
        let mut container = self.container_spec(spec, &info, secret.as_deref());
        container.volumes = r.volumes.clone();
        let carried = self.carried_quota(r, run.carried)?;
        if let (Some(disk), Some(carried)) = (container.limits.disk_mb, carried) {
            container.limits.disk_mb = Some(disk - carried);
        }
        if pool_member {
            container
                .labels
                .insert(labels::POOL.to_string(), "true".to_string());
        }
        if !pool_member {
            // Before the container exists: recovery reads a stopped container with a
            // pause record as paused, and this one must never be read so.
            self.note_lifecycle(&info.id, spec.lifecycle, r, &spec.envs)?;
        }
        let created = match backend.create(&container).await {
            Ok(created) => created,
            Err(e) => {
                // The backend cleans up after itself; this catches a create that
                // reported failure after the container came to exist.
                self.remove_quietly(&name).await;
                if matches!(e, Error::NotFound { .. }) {
                    // An image that vanished since it was checked.
                    self.forget_image(&info.image);
                }
                return Err(e);
            }
        };
        info.state = created.state;
        if let Some(applied) = created.limits {
            info.limits = applied;
        }
        if carried.is_some() {
            // The quota asked for covers the snapshot's files and the new writes.
            info.limits.disk_mb = r.limits.disk_mb;
        }
        let Some(secret) = secret else {
            return Ok((info, None));
        };
        let started = async {
            let client = self.wait_agent(&name, secret).await?;
            if !pool_member {
                self.init_agent(&client, &r.template, &r.user, &spec.envs)
                    .await?;
            }
            if r.template.start_cmd.is_some() || r.template.ready_cmd.is_some() {
                self.start_and_wait_ready(&client, &r.template, &r.template.user)
                    .await?;
            }
            Ok::<_, Error>(client)
        }
        .await;
        match started {
            Ok(client) => Ok((info, Some(client))),
            Err(e) => {
                // A failed create leaves nothing behind.
                self.remove_quietly(&name).await;
                Err(match e {
                    // The template exists; a container or address that is gone means the
                    // sandbox died while starting.
                    Error::NotFound { what } => Error::backend(
                        backend.name(),
                        format!(
                            "sandbox {} stopped while starting ({what} not found)",
                            info.id
                        ),
                    ),
                    e => e,
                })
            }
        }
    }

    /// MiB a sandbox's quota gives to the files its snapshot image carries, where the
    /// engine's quota counts only writes (the image's own bytes are outside it): those
    /// files count against the quota as if the sandbox had written them. `None`: no
    /// quota, nothing carried, or an engine whose quota counts the image already.
    fn carried_quota(&self, r: &Resolved, carried_bytes: u64) -> Result<Option<u64>> {
        let Some(disk) = r.limits.disk_mb else {
            return Ok(None);
        };
        if carried_bytes == 0 || self.inner.backend.capabilities().quota_counts_image {
            return Ok(None);
        }
        let carried = carried_bytes.div_ceil(1 << 20);
        if disk < carried + DISK_HEADROOM_MB {
            return Err(Error::InvalidArgument(format!(
                "disk_mb {disk} is too small for snapshot {:?}: its files take {carried} MiB \
                 of the quota; ask for at least {}",
                r.template_name,
                carried + DISK_HEADROOM_MB
            )));
        }
        Ok(Some(carried))
    }

    /// The container of a new sandbox: the image, the agent as its main process with
    /// its secret (when the server runs agents), labels, limits and the profile.
    fn container_spec(
        &self,
        spec: &SandboxSpec,
        info: &SandboxInfo,
        secret: Option<&str>,
    ) -> ContainerSpec {
        let config = &self.inner.config;
        let agent = config.agent.is_some();
        let mut env: Vec<String> = spec.envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(secret) = secret {
            // Lives with the container so a restarted server can talk to the agent again.
            env.push(format!("{SECRET_ENV}={secret}"));
            env.push(format!(
                "{}={}",
                envd_proto::STALL_TIMEOUT_ENV,
                config.stall_timeout.as_millis().max(1)
            ));
        }
        ContainerSpec {
            name: labels::container_name(&info.id),
            image: info.image.clone(),
            // With the agent, the derived image's entrypoint (the agent) is the main process.
            command: if agent {
                Vec::new()
            } else {
                config.main_command.clone()
            },
            env,
            labels: labels::for_sandbox(&config.owner, info),
            limits: info.limits,
            internet: spec.internet,
            // The agent switches to each command's user itself, so it starts as root.
            user: agent.then(|| "root".to_string()),
            agent_port: if agent {
                Some(self.agent_port())
            } else {
                config.agent_port
            },
            profile: config.profile.clone(),
            volumes: Vec::new(),
        }
    }

    /// Waits for a new sandbox's agent to answer `/health`.
    pub(super) async fn wait_agent(&self, name: &str, secret: String) -> Result<AgentClient> {
        let addr = self
            .inner
            .backend
            .agent_address(name, self.agent_port())
            .await?;
        let client = AgentClient::new(self.inner.http.clone(), addr.addr, secret);
        self.await_health(&client, name).await?;
        Ok(client)
    }

    /// Waits for the agent behind `client` (of container `name`) to answer `/health`.
    pub(super) async fn await_health(&self, client: &AgentClient, name: &str) -> Result<()> {
        let limit = self.inner.config.agent_ready_timeout;
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(5);
        loop {
            match client.health().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + pause >= deadline => {
                    tracing::warn!(container = name, agent = %client.addr(), error = %e,
                        "the sandbox agent did not answer /health in time");
                    return Err(Error::Timeout(limit));
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    /// Hands a sandbox's agent the request's settings: envs, default user and workdir,
    /// and its access token (the secret it already has).
    pub(super) async fn init_agent(
        &self,
        client: &AgentClient,
        template: &Template,
        user: &str,
        envs: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        // The user's own workdir only with the template's user: another user starts
        // in their home.
        let workdir = (user == template.user)
            .then(|| template.workdir.clone())
            .flatten();
        client
            .init(&InitRequest {
                env_vars: Some(envs.clone()),
                access_token: Some(client.token().to_string()),
                default_user: Some(user.to_string()),
                default_workdir: workdir,
            })
            .await
    }
}
