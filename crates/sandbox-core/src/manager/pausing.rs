//! Pause and resume as E2B means them, and what a deadline does.
//!
//! - A pause that keeps memory freezes the container (the engine's cgroup freezer).
//! - A pause that keeps only the filesystem stops it (SIGKILL: writes already made are
//!   in its writable layer); resuming starts it again, hands its agent the create's
//!   settings once more and reruns the template's start command.
//! - A paused sandbox's deadline is the server's paused retention, not its timeout; a
//!   resume gives it a timeout again.
//! - At its deadline a sandbox created with `on_timeout: pause` is paused, not killed;
//!   with `auto_resume` a request into it resumes it first.
//!
//! What must survive a restart is one record per sandbox in the state directory
//! (`lifecycle/`): its lifecycle, the create's timeout, how to boot it again, and
//! whether (and how) it is paused. A stopped container with such a pause record is a
//! paused sandbox, not a dead one, to recovery; a frozen sandbox whose engine restarted
//! (its memory is gone) is resumed as a filesystem pause.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::records::SandboxRecords;
use super::sandbox_logs::{LogEntry, LogLevel};
use super::{lock, now_ms, SandboxManager};
use crate::error::{Error, Result};
use crate::labels;
use crate::template::Template;
use crate::types::{Lifecycle, OnTimeout, SandboxId, SandboxInfo, SandboxState};

/// How long a stopped container may take to leave the running state.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What a sandbox's agent is handed again when its container starts anew.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Boot {
    /// The template as the create resolved it (start and ready commands, workdir).
    pub(super) template: Template,
    /// The sandbox's default user.
    pub(super) user: String,
    /// The create's environment variables.
    pub(super) envs: BTreeMap<String, String>,
}

/// How a sandbox is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Paused {
    /// Frozen with its memory (else stopped, only its filesystem kept).
    pub(super) keep_memory: bool,
    /// When it was paused, unix milliseconds.
    pub(super) at_ms: i64,
}

/// What the server keeps of one sandbox's lifecycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct LifecycleRecord {
    pub(super) lifecycle: Lifecycle,
    /// The create's timeout, milliseconds: how long a resume that names none runs.
    pub(super) timeout_ms: u64,
    /// `None` for a sandbox without the agent.
    pub(super) boot: Option<Boot>,
    /// Set while the sandbox is paused.
    pub(super) paused: Option<Paused>,
}

/// The lifecycle records of this server's sandboxes, with the files that keep them.
pub(super) type LifecycleStore = SandboxRecords<LifecycleRecord>;

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

impl SandboxManager {
    /// Notes a new sandbox's lifecycle and how to boot it again (cold creates and pool
    /// claims, before the create answers).
    pub(super) fn note_lifecycle(
        &self,
        id: &SandboxId,
        lifecycle: Lifecycle,
        r: &super::create::Resolved,
        envs: &BTreeMap<String, String>,
    ) -> Result<()> {
        let record = LifecycleRecord {
            lifecycle,
            timeout_ms: u64::try_from(r.timeout.as_millis()).unwrap_or(u64::MAX),
            boot: self.inner.config.agent.is_some().then(|| Boot {
                template: r.template.clone(),
                user: r.user.clone(),
                envs: envs.clone(),
            }),
            paused: None,
        };
        self.inner.lifecycles.save(id, &record)
    }

    /// Sandbox `id`'s lifecycle (the default for one created before lifecycles were kept).
    pub fn lifecycle(&self, id: &SandboxId) -> Lifecycle {
        self.inner
            .lifecycles
            .get(id)
            .map(|r| r.lifecycle)
            .unwrap_or_default()
    }

    /// Whether paused sandbox `id` kept its memory (`None`: it is not paused).
    pub fn paused_with_memory(&self, id: &SandboxId) -> Option<bool> {
        let info = self.info(id).ok()?;
        if info.state != SandboxState::Paused {
            return None;
        }
        Some(
            self.inner
                .lifecycles
                .get(id)
                .and_then(|r| r.paused)
                .is_none_or(|p| p.keep_memory),
        )
    }

    /// Whether the record says sandbox `id` is paused (its container may be stopped).
    pub(super) fn parked(&self, id: &SandboxId) -> bool {
        self.inner
            .lifecycles
            .get(id)
            .is_some_and(|r| r.paused.is_some())
    }

    /// One lifecycle change of sandbox `id` at a time (pause, resume, a wake by traffic).
    pub(super) async fn turn(&self, id: &SandboxId) -> tokio::sync::OwnedMutexGuard<()> {
        let cell = lock(&self.inner.turns)
            .entry(id.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        cell.lock_owned().await
    }

    /// Pauses a running sandbox: frozen with its memory (`keep_memory`), or stopped with
    /// only its filesystem kept. Its deadline becomes the paused retention.
    pub async fn pause(&self, id: &SandboxId, keep_memory: bool) -> Result<SandboxInfo> {
        let _turn = self.turn(id).await;
        self.pause_now(id, keep_memory).await
    }

    async fn pause_now(&self, id: &SandboxId, keep_memory: bool) -> Result<SandboxInfo> {
        let info = self.info(id)?;
        if info.state == SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is already paused")));
        }
        if keep_memory {
            self.require_pause()?;
        }
        let name = labels::container_name(id);
        let mut record = self.inner.lifecycles.get(id).unwrap_or(LifecycleRecord {
            lifecycle: Lifecycle::default(),
            timeout_ms: 0,
            boot: None,
            paused: None,
        });
        let before = record.clone();
        record.paused = Some(Paused {
            keep_memory,
            at_ms: unix_ms(now_ms()),
        });
        // On disk first: a crash between the two leaves a running sandbox with a pause
        // record (read as running) rather than a stopped one without (read as dead).
        self.inner.lifecycles.save(id, &record)?;
        let paused = if keep_memory {
            self.inner.backend.pause(&name).await
        } else {
            self.pull_agent_events(id).await;
            self.stop_and_wait(&name).await
        };
        if let Err(e) = paused {
            if let Err(k) = self.inner.lifecycles.save(id, &before) {
                tracing::warn!(sandbox = %id, error = %k, "could not restore a lifecycle record");
            }
            return Err(e);
        }
        if !keep_memory {
            // Its address goes back to the engine, and its agent with it.
            self.agents().remove(id);
            self.park_egress(id).await;
        }
        let mode = if keep_memory { "memory" } else { "filesystem" };
        self.log(
            id,
            LogEntry::now(LogLevel::Info, "sandbox paused", &[("keeps", mode.into())]),
        );
        metrics::counter!("colima_e2b_sandbox_pauses_total", "keeps" => mode).increment(1);
        self.set_state(id, SandboxState::Paused)?;
        self.set_deadline(id, now_ms() + self.inner.config.paused_retention)
    }

    /// Kills a container's processes and waits until the engine reports it stopped, so
    /// a start right after cannot find it still running.
    async fn stop_and_wait(&self, name: &str) -> Result<()> {
        self.inner.backend.stop(name).await?;
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            let state = self.inner.backend.inspect(name).await?.state;
            if !matches!(state, SandboxState::Running | SandboxState::Paused) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::backend(
                    self.inner.backend.name(),
                    format!(
                        "container {name} was still {state} {} s after it was killed",
                        STOP_WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resumes a paused sandbox; it then lives `timeout` (`None`: its create's timeout).
    /// `cold` starts it from its filesystem even when it kept its memory (E2B's
    /// `on_resume: reboot`).
    pub async fn resume(
        &self,
        id: &SandboxId,
        timeout: Option<Duration>,
        cold: bool,
    ) -> Result<SandboxInfo> {
        if let Some(t) = timeout {
            self.check_timeout(t)?;
        }
        let _turn = self.turn(id).await;
        self.resume_now(id, timeout, cold).await
    }

    async fn resume_now(
        &self,
        id: &SandboxId,
        timeout: Option<Duration>,
        cold: bool,
    ) -> Result<SandboxInfo> {
        let info = self.info(id)?;
        if info.state != SandboxState::Paused {
            return Err(Error::Conflict(format!("sandbox {id} is not paused")));
        }
        let name = labels::container_name(id);
        let record = self.inner.lifecycles.get(id);
        let container = self.sandbox_container(id).await?;
        let booted = match container.state {
            SandboxState::Paused if !cold => {
                self.require_pause()?;
                self.inner.backend.resume(&name).await?;
                false
            }
            SandboxState::Running => false,
            state => {
                if state == SandboxState::Paused {
                    // Thawed only to be stopped: a reboot from the filesystem.
                    self.inner.backend.resume(&name).await?;
                    self.pull_agent_events(id).await;
                    self.stop_and_wait(&name).await?;
                    self.agents().remove(id);
                    self.park_egress(id).await;
                }
                self.boot(id, record.as_ref().and_then(|r| r.boot.as_ref()))
                    .await?;
                true
            }
        };
        let timeout = timeout
            .or_else(|| {
                record
                    .as_ref()
                    .map(|r| Duration::from_millis(r.timeout_ms))
                    .filter(|t| !t.is_zero())
            })
            .unwrap_or(self.inner.config.default_timeout);
        if let Some(mut record) = record {
            record.paused = None;
            self.inner.lifecycles.save(id, &record)?;
        }
        self.log(
            id,
            LogEntry::now(
                LogLevel::Info,
                "sandbox resumed",
                &[("from", if booted { "filesystem" } else { "memory" }.into())],
            ),
        );
        metrics::counter!("colima_e2b_sandbox_resumes_total", "from" => if booted { "filesystem" } else { "memory" })
            .increment(1);
        self.set_state(id, SandboxState::Running)?;
        self.set_deadline(id, now_ms() + timeout)
    }

    /// Starts a stopped sandbox's container again and brings its agent up as its create
    /// did: the create's envs and default user, its egress rules at the new address,
    /// then the template's start command. A failure stops the container again (the
    /// sandbox stays paused).
    async fn boot(&self, id: &SandboxId, boot: Option<&Boot>) -> Result<()> {
        let name = labels::container_name(id);
        self.inner.backend.start(&name).await?;
        let started = async {
            self.unpark_egress(id).await?;
            if self.inner.config.agent.is_none() {
                return Ok(());
            }
            let client = self.container_agent(id).await?;
            self.await_health(&client, &name).await?;
            self.inner.logs.agent_restarted(id);
            if let Some(boot) = boot {
                self.init_agent(&client, &boot.template, &boot.user, &boot.envs)
                    .await?;
                if boot.template.start_cmd.is_some() || boot.template.ready_cmd.is_some() {
                    self.start_and_wait_ready(&client, &boot.template, &boot.user)
                        .await?;
                }
            }
            self.agents().insert(id.clone(), client);
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = started {
            tracing::warn!(sandbox = %id, error = %e, "a paused sandbox did not start again; it stays paused");
            self.agents().remove(id);
            if let Err(s) = self.stop_and_wait(&name).await {
                tracing::warn!(sandbox = %id, error = %s, "could not stop a sandbox that failed to start again");
            }
            self.park_egress(id).await;
            return Err(e);
        }
        Ok(())
    }

    /// A request is about to go into sandbox `id`: a paused one with `auto_resume` is
    /// resumed first (for its create's timeout). Anything else is left as it is.
    pub(super) async fn wake(&self, id: &SandboxId) -> Result<()> {
        let paused = self.info(id)?.state == SandboxState::Paused;
        if !paused || !self.lifecycle(id).auto_resume {
            return Ok(());
        }
        let _turn = self.turn(id).await;
        if self.info(id)?.state != SandboxState::Paused {
            return Ok(()); // another request woke it meanwhile
        }
        tracing::info!(sandbox = %id, "resuming a paused sandbox for a request (auto-resume)");
        // Boxed: a resume reaches the agent again, and so this function.
        Box::pin(self.resume_now(id, None, false)).await.map(drop)
    }

    /// At sandbox `info`'s deadline: `Some` pause to make instead of the kill (a running
    /// sandbox created with `on_timeout: pause`), keeping memory where it can.
    pub(super) fn pause_at_deadline(&self, info: &SandboxInfo) -> Option<bool> {
        if info.state != SandboxState::Running {
            return None;
        }
        let lifecycle = self.lifecycle(&info.id);
        (lifecycle.on_timeout == OnTimeout::Pause)
            .then(|| lifecycle.keep_memory && self.inner.backend.capabilities().pause)
    }

    /// Pauses a sandbox that reached its deadline (the reaper's turn for `on_timeout:
    /// pause`); a failure is tried again a little later.
    pub(super) async fn pause_expired(&self, id: &SandboxId, keep_memory: bool) {
        let _turn = self.turn(id).await;
        // A client may have paused, resumed or extended it since the reaper looked.
        let due = self.info(id).is_ok_and(|i| {
            i.state == SandboxState::Running && i.expires_at <= OffsetDateTime::now_utc()
        });
        if !due {
            return;
        }
        match self.pause_now(id, keep_memory).await {
            Ok(_) => {
                tracing::info!(sandbox = %id, "sandbox reached its timeout and was paused");
                metrics::counter!("colima_e2b_sandbox_auto_pauses_total").increment(1);
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "could not pause a sandbox at its deadline; trying again");
                let retry = now_ms() + Duration::from_secs(5);
                if let Some(s) = self.registry().sandboxes.get_mut(id) {
                    s.expires_at = retry;
                }
            }
        }
    }

    /// After recovery: a running sandbox whose pause record survived (the server died
    /// between the record and the engine's pause) is running, and its record says so.
    pub(super) fn settle_pause_records(&self, live: &HashSet<SandboxId>) {
        for id in live {
            let running = self
                .info(id)
                .is_ok_and(|i| i.state == SandboxState::Running);
            let Some(mut record) = self.inner.lifecycles.get(id) else {
                continue;
            };
            if running && record.paused.is_some() {
                record.paused = None;
                if let Err(e) = self.inner.lifecycles.save(id, &record) {
                    tracing::warn!(sandbox = %id, error = %e, "could not update a lifecycle record");
                }
            }
        }
    }

    pub(super) fn require_pause(&self) -> Result<()> {
        if self.inner.backend.capabilities().pause {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.inner.backend.name(),
                operation: "pause",
            })
        }
    }

    /// Drops sandbox `id`'s per-sandbox lifecycle state (it is gone).
    pub(super) fn forget_lifecycle(&self, id: &SandboxId) {
        let _ = self.inner.lifecycles.forget(id);
        lock(&self.inner.turns).remove(id);
    }
}
