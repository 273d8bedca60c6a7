//! Templates as the manager decides them: which template a name means (configured ones
//! first, then built ones), builds from a Dockerfile or from E2B's steps (their base, the
//! `e2bdev/base` alias), removing a template and its images, and a new sandbox's start
//! and ready commands.

use std::time::{Duration, Instant};

use super::SandboxManager;
use crate::agent::command::ShellCommand;
use crate::agent::AgentClient;
use crate::error::{Error, Result};
use crate::template::registry::{
    split_reference, BuildJob, BuildRecord, JobContext, Registry, TemplateRecord,
};
use crate::template::steps::{self, Base, StepsTemplate};
use crate::template::{Template, DEFAULT_USER};

/// E2B's default base image, which means this server's `base` template when no image of
/// that name is local.
pub const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// Output of a failing ready command kept for the error, bytes.
const READY_OUTPUT: usize = 4096;

/// A Dockerfile build (the native API's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DockerfileBuild {
    /// Template name.
    pub name: String,
    /// Tag the build gets (default `default`).
    pub tag: Option<String>,
    /// Path of the Dockerfile in the context (default `Dockerfile`).
    pub dockerfile: Option<String>,
    /// User commands run as (default `user`).
    pub user: Option<String>,
    /// Working directory of commands.
    pub workdir: Option<String>,
    /// Start command of its sandboxes.
    pub start_cmd: Option<String>,
    /// Ready command of its sandboxes.
    pub ready_cmd: Option<String>,
    /// Ignore the engine's layer cache.
    pub no_cache: bool,
}

impl SandboxManager {
    /// The built templates.
    pub fn templates(&self) -> &std::sync::Arc<Registry> {
        &self.inner.templates
    }

    /// What `reference` means: a configured template's name, else a built template's
    /// name, `name:tag` or id.
    pub fn resolve_template(&self, reference: &str) -> Option<Template> {
        let configured = &self.inner.config.templates;
        configured
            .get(reference)
            .or_else(|| match split_reference(reference) {
                // A configured template has one build: any tag of E2B's means it.
                (name, Some(_)) => configured.get(name),
                _ => None,
            })
            .cloned()
            .or_else(|| self.inner.templates.resolve(reference))
    }

    /// Names of every template a create may name.
    pub fn template_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.config.templates.keys().cloned().collect();
        names.extend(
            self.inner
                .templates
                .list()
                .into_iter()
                .filter(|t| t.current().is_some())
                .map(|t| t.name),
        );
        names
    }

    fn check_buildable_name(&self, name: &str) -> Result<()> {
        let (name, _) = split_reference(name);
        if self.inner.config.templates.contains_key(name) {
            return Err(Error::Conflict(format!(
                "{name:?} is a template of this server's configuration; it cannot be built \
                 or removed through the API"
            )));
        }
        Ok(())
    }

    /// A new build of template `name` (E2B's `POST /v3/templates`), waiting for its steps.
    pub fn request_build(
        &self,
        name: &str,
        tags: Vec<String>,
        cpu_count: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<(TemplateRecord, BuildRecord)> {
        self.check_buildable_name(name)?;
        let (name, tag) = split_reference(name);
        let mut tags = tags;
        if let Some(tag) = tag {
            tags.insert(0, tag.to_string());
        }
        self.inner
            .templates
            .request(name, tags, cpu_count, memory_mb)
    }

    /// Where a steps build starts: a template (`fromTemplate`), or an image, with
    /// `e2bdev/base` meaning the `base` template where no such image is local.
    async fn steps_base(&self, t: &StepsTemplate) -> Result<Base> {
        if let Some(from) = t.from_template.as_deref() {
            let base = self.resolve_template(from).ok_or_else(|| {
                Error::InvalidArgument(format!("fromTemplate {from:?} is not a template here"))
            })?;
            return Ok(Base {
                image: base.image,
                user: base.user,
                workdir: base.workdir,
                ensure_user: false,
                runs_as_root: false,
            });
        }
        let image = t.from_image.as_deref().unwrap_or(E2B_BASE_IMAGE);
        let (repo, _) = crate::backend::split_image(image);
        if repo == E2B_BASE_IMAGE && self.inner.backend.image_info(image).await?.is_none() {
            if let Some(base) = self.inner.config.templates.get("base") {
                return Ok(Base {
                    image: base.image.clone(),
                    user: base.user.clone(),
                    workdir: base.workdir.clone(),
                    ensure_user: false,
                    runs_as_root: false,
                });
            }
        }
        Ok(steps::image_base(Some(image), &Default::default()))
    }

    /// Starts build `build_id` of template `template_id` from E2B's steps.
    pub async fn start_steps_build(
        &self,
        template_id: &str,
        build_id: &str,
        t: &StepsTemplate,
    ) -> Result<()> {
        let mut base = self.steps_base(t).await?;
        // A base whose config runs as root needs no `USER root` (each instruction costs
        // the engine a commit).
        if let Some(info) = self.inner.backend.image_info(&base.image).await? {
            base.runs_as_root = matches!(info.user.as_deref(), None | Some("" | "root" | "0"));
        }
        let mut plan = steps::plan(t, &base, build_id)?;
        if let Some(from) = t.from_template.as_deref() {
            // A template made from another keeps its start and ready commands.
            if let Some(parent) = self.resolve_template(from) {
                if plan.template.start_cmd.is_none() && plan.template.ready_cmd.is_none() {
                    plan.template.start_cmd = parent.start_cmd;
                    plan.template.ready_cmd = parent.ready_cmd;
                }
            }
        }
        for copy in &plan.copies {
            if !self.inner.templates.files().has(&copy.hash) {
                return Err(Error::InvalidArgument(format!(
                    "the files of hash {} were never uploaded (GET \
                     /templates/{template_id}/files/{} for the upload link)",
                    copy.hash, copy.hash
                )));
            }
        }
        let job = BuildJob {
            context: JobContext::Steps {
                dockerfile: plan.dockerfile,
                copies: plan.copies,
            },
            dockerfile: "Dockerfile".into(),
            step_of_instruction: plan.step_of_instruction,
            descriptions: plan.descriptions,
            base: Some(base.image),
            template: plan.template,
            no_cache: t.force,
        };
        self.inner
            .templates
            .start(self.inner.backend.clone(), template_id, build_id, job)
    }

    /// Builds template `b.name` from the Dockerfile in the uploaded context `context`
    /// (moved into the registry; removed when the build ends).
    pub fn start_dockerfile_build(
        &self,
        b: &DockerfileBuild,
        context: std::path::PathBuf,
    ) -> Result<(TemplateRecord, BuildRecord)> {
        let result = self.dockerfile_build(b, context.clone());
        if result.is_err() {
            // Nothing will take the upload.
            let _ = std::fs::remove_file(&context);
        }
        result
    }

    fn dockerfile_build(
        &self,
        b: &DockerfileBuild,
        context: std::path::PathBuf,
    ) -> Result<(TemplateRecord, BuildRecord)> {
        self.check_buildable_name(&b.name)?;
        let user = b.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string());
        crate::types::validate_user(&user)?;
        let dockerfile = b.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into());
        if dockerfile.starts_with('/') || dockerfile.split('/').any(|c| c == "..") {
            return Err(Error::InvalidArgument(format!(
                "dockerfile {dockerfile:?} must be a path inside the context"
            )));
        }
        let (record, build) = self.inner.templates.request(
            &b.name,
            b.tag.clone().into_iter().collect(),
            None,
            None,
        )?;
        let job = BuildJob {
            context: JobContext::Upload(context),
            dockerfile,
            step_of_instruction: Vec::new(),
            descriptions: Vec::new(),
            base: None,
            template: Template {
                image: String::new(),
                user,
                workdir: b.workdir.clone(),
                start_cmd: b.start_cmd.clone().filter(|c| !c.trim().is_empty()),
                ready_cmd: b.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
                cpus: None,
                memory_mb: None,
            },
            no_cache: b.no_cache,
        };
        self.inner
            .templates
            .start(self.inner.backend.clone(), &record.id, &build.id, job)?;
        Ok((record, build))
    }

    /// Removes built template `id_or_name` with its images; refused while a sandbox of
    /// it runs.
    pub async fn remove_template(&self, id_or_name: &str) -> Result<TemplateRecord> {
        self.check_buildable_name(id_or_name)?;
        let record = self
            .inner
            .templates
            .find(id_or_name)
            .ok_or_else(|| Error::not_found(format!("template {id_or_name}")))?;
        let users: Vec<String> = self
            .registry()
            .sandboxes
            .values()
            .filter(|s| {
                let (name, _) = split_reference(&s.template);
                name == record.name || name == record.id
            })
            .map(|s| s.id.to_string())
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "template {} is used by sandboxes {}; kill them first",
                record.name,
                users.join(", ")
            )));
        }
        // Templates built on this one need its image (the engine keeps it for them).
        let images: Vec<&str> = record.builds.iter().map(|b| b.image.as_str()).collect();
        let children: Vec<String> = self
            .inner
            .templates
            .list()
            .into_iter()
            .filter(|t| t.id != record.id)
            .filter(|t| {
                t.builds
                    .iter()
                    .any(|b| b.base.as_deref().is_some_and(|base| images.contains(&base)))
            })
            .map(|t| t.name)
            .collect();
        if !children.is_empty() {
            return Err(Error::Conflict(format!(
                "templates {} are built on template {}; remove them first",
                children.join(", "),
                record.name
            )));
        }
        let record = self.inner.templates.remove(&record.id)?;
        // Killed sandboxes of it may still be waiting for their deletion, and an engine
        // refuses to remove the image their containers use.
        if !self.deletions_done(Duration::from_secs(60)).await {
            tracing::warn!(template = %record.name, "container deletions still pending; its images may stay");
        }
        for build in &record.builds {
            self.remove_build_images(&build.image).await;
        }
        self.prune_derived_images().await;
        Ok(record)
    }

    /// Removes a build's image and the image derived from it with the agent.
    pub(super) async fn remove_build_images(&self, image: &str) {
        let backend = &self.inner.backend;
        let info = match backend.image_info(image).await {
            Ok(Some(info)) => info,
            _ => return,
        };
        if let Some(agent) = &self.inner.config.agent {
            let derived = agent.derived_tag(image, info.id.as_deref());
            self.forget_image(&derived);
            match backend.remove_image(&derived).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(image = %derived, error = %e, "derived image not removed"),
            }
        }
        match backend.remove_image(image).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(image, error = %e, "template image not removed"),
        }
    }

    /// Runs a new sandbox's start command (in the background) and waits for its ready
    /// command to exit 0; past the ready timeout the error carries the last output.
    pub(super) async fn start_and_wait_ready(
        &self,
        agent: &AgentClient,
        template: &Template,
        user: &str,
    ) -> Result<()> {
        let command = |cmd: &str| ShellCommand {
            cmd: cmd.to_string(),
            cwd: template.workdir.clone(),
            envs: Default::default(),
            user: Some(user.to_string()),
        };
        if let Some(start) = &template.start_cmd {
            command(start).spawn(agent).await?;
        }
        let Some(ready) = &template.ready_cmd else {
            return Ok(());
        };
        let limit = self.inner.templates.config().ready_timeout;
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = left
                .min(Duration::from_secs(10))
                .max(Duration::from_secs(1));
            match command(ready).run(agent, attempt, READY_OUTPUT).await {
                Ok(out) if out.end.exit_code == 0 => return Ok(()),
                Ok(out) => {
                    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                    last = format!("exit code {}: {}", out.end.exit_code, text.trim());
                }
                Err(Error::Timeout(t)) => last = format!("did not end within {} s", t.as_secs()),
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200).min(left)).await;
        }
        Err(Error::TemplateNotReady(format!(
            "the template's ready command {ready:?} did not pass within {} s (last attempt: {})",
            limit.as_secs(),
            if last.is_empty() { "none" } else { &last }
        )))
    }
}
