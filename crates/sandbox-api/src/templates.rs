//! The native template API: `/templates/...`. Build a template from a Dockerfile and its
//! context (a tar upload), follow its log as it happens, see builds, list and delete.

use futures_util::StreamExt;
use poem::web::Data;
use poem::Body;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sandbox_core::manager::DockerfileBuild;
use sandbox_core::template::registry::{BuildRecord, TemplateRecord};
use sandbox_core::Error;

use crate::error::ApiError;
use crate::{rfc3339, AppState};

#[derive(Tags)]
enum TemplateTags {
    /// Build templates from Dockerfiles, follow their builds, list and delete them.
    Templates,
}

/// One build of a template.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none, example)]
pub struct TemplateBuild {
    /// Build id.
    pub build_id: String,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    /// The image it makes.
    pub image: String,
    /// Tags pointing at it (or that will, once it is ready).
    pub tags: Vec<String>,
    /// When it was requested (RFC 3339).
    pub created_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Seconds it took.
    pub seconds: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The step that failed (`base`, a number, or `finalize`).
    pub failed_step: Option<String>,
}

fn build_view(t: &TemplateRecord, b: &BuildRecord) -> TemplateBuild {
    let mut tags = t.tags_of(&b.id);
    if tags.is_empty() && b.status != sandbox_core::template::registry::BuildStatus::Ready {
        tags = b.tags.clone();
    }
    TemplateBuild {
        build_id: b.id.clone(),
        status: b.status.as_str().into(),
        image: b.image.clone(),
        tags,
        created_at: rfc3339(b.created_at),
        finished_at: b.finished_at.map(rfc3339),
        seconds: b.seconds,
        error: b.reason.as_ref().map(|r| r.message.clone()),
        failed_step: b.reason.as_ref().and_then(|r| r.step.clone()),
    }
}

/// A template sandboxes can be made from.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none, example)]
pub struct TemplateView {
    /// Name to create sandboxes with.
    pub name: String,
    /// `config` (from the server's configuration) or `built` (by this API or E2B's).
    pub source: String,
    /// Template id (built templates).
    pub id: Option<String>,
    /// Image of its current build.
    pub image: Option<String>,
    /// User commands run as.
    pub user: Option<String>,
    /// Working directory of commands.
    pub workdir: Option<String>,
    /// Started in each new sandbox.
    pub start_cmd: Option<String>,
    /// Must pass before a new sandbox is handed out.
    pub ready_cmd: Option<String>,
    /// Status of its current (or newest) build.
    pub status: Option<String>,
    /// Tags and the builds they point at.
    pub tags: Vec<String>,
    /// Builds, oldest first (`GET /templates/{name}` only).
    pub builds: Option<Vec<TemplateBuild>>,
}

fn built_view(t: &TemplateRecord, with_builds: bool) -> TemplateView {
    let current = t.current();
    let template = current.and_then(|b| b.template.clone());
    TemplateView {
        name: t.name.clone(),
        source: "built".into(),
        id: Some(t.id.clone()),
        image: template.as_ref().map(|x| x.image.clone()),
        user: template.as_ref().map(|x| x.user.clone()),
        workdir: template.as_ref().and_then(|x| x.workdir.clone()),
        start_cmd: template.as_ref().and_then(|x| x.start_cmd.clone()),
        ready_cmd: template.as_ref().and_then(|x| x.ready_cmd.clone()),
        status: current
            .or_else(|| t.builds.last())
            .map(|b| b.status.as_str().to_string()),
        tags: t.tags.keys().cloned().collect(),
        builds: with_builds.then(|| t.builds.iter().map(|b| build_view(t, b)).collect()),
    }
}

fn config_view(name: &str, t: &sandbox_core::Template) -> TemplateView {
    TemplateView {
        name: name.into(),
        source: "config".into(),
        id: None,
        image: Some(t.image.clone()),
        user: Some(t.user.clone()),
        workdir: t.workdir.clone(),
        start_cmd: t.start_cmd.clone(),
        ready_cmd: t.ready_cmd.clone(),
        status: Some("ready".into()),
        tags: Vec::new(),
        builds: None,
    }
}

/// A build that was started.
#[derive(Debug, Object)]
#[oai(example)]
pub struct BuildStarted {
    /// Template name.
    pub name: String,
    /// Template id.
    pub template_id: String,
    /// Build id: follow it at `/templates/{name}/builds/{build_id}/logs?follow=true`.
    pub build_id: String,
    /// `waiting` (for a build slot) at first.
    pub status: String,
    /// Tags it gets when ready.
    pub tags: Vec<String>,
}

const EXAMPLE_BUILD: &str = "9d30ca74-feb0-4265-8e2b-4c07c688130d";
const EXAMPLE_ID: &str = "x8hl0dgsbbufvn6mrbsp";
const EXAMPLE_IMAGE: &str =
    "colima-e2b-template/x8hl0dgsbbufvn6mrbsp:9d30ca74-feb0-4265-8e2b-4c07c688130d";

impl poem_openapi::types::Example for TemplateBuild {
    fn example() -> Self {
        Self {
            build_id: EXAMPLE_BUILD.into(),
            status: "ready".into(),
            image: EXAMPLE_IMAGE.into(),
            tags: vec!["default".into()],
            created_at: "2026-12-02T02:45:44Z".into(),
            finished_at: Some("2026-12-02T02:46:27Z".into()),
            seconds: Some(43.0),
            error: None,
            failed_step: None,
        }
    }
}

impl poem_openapi::types::Example for TemplateView {
    fn example() -> Self {
        Self {
            name: "my-app".into(),
            source: "built".into(),
            id: Some(EXAMPLE_ID.into()),
            image: Some(EXAMPLE_IMAGE.into()),
            user: Some("user".into()),
            workdir: None,
            start_cmd: Some("python3 -m http.server 8080".into()),
            ready_cmd: Some("curl -sf localhost:8080".into()),
            status: Some("ready".into()),
            tags: vec!["default".into()],
            builds: None,
        }
    }
}

impl poem_openapi::types::Example for BuildStarted {
    fn example() -> Self {
        Self {
            name: "my-app".into(),
            template_id: EXAMPLE_ID.into(),
            build_id: EXAMPLE_BUILD.into(),
            status: "waiting".into(),
            tags: vec!["default".into()],
        }
    }
}

/// The answer to a build request.
#[derive(ApiResponse)]
pub enum BuildAccepted {
    /// The build is queued; follow its log.
    #[oai(status = 202)]
    Accepted(Json<BuildStarted>),
}

/// A streamed build log.
#[derive(ApiResponse)]
pub enum LogStream {
    /// One JSON object per line: `{timestamp, level, message, step}`; with `follow`, the
    /// stream stays open until the build ends.
    #[oai(status = 200, content_type = "application/x-ndjson")]
    Ok(Binary<Body>),
}

/// The native template API.
pub struct TemplateApi;

#[OpenApi(tag = "TemplateTags::Templates")]
impl TemplateApi {
    /// List templates
    ///
    /// Configured templates and built ones.
    #[oai(path = "/templates", method = "get", operation_id = "list_templates")]
    async fn list(&self, state: Data<&AppState>) -> Result<Json<Vec<TemplateView>>, ApiError> {
        let mut all: Vec<TemplateView> = state
            .manager
            .config()
            .templates
            .iter()
            .map(|(n, t)| config_view(n, t))
            .collect();
        all.extend(
            state
                .manager
                .templates()
                .list()
                .iter()
                .map(|t| built_view(t, false)),
        );
        Ok(Json(all))
    }

    /// Get a template
    ///
    /// A template by name (or id), with its builds.
    #[oai(
        path = "/templates/:name",
        method = "get",
        operation_id = "get_template"
    )]
    async fn get(
        &self,
        state: Data<&AppState>,
        name: Path<String>,
    ) -> Result<Json<TemplateView>, ApiError> {
        if let Some(t) = state.manager.config().templates.get(&name.0) {
            return Ok(Json(config_view(&name.0, t)));
        }
        let t = state
            .manager
            .templates()
            .find(&name.0)
            .ok_or_else(|| Error::not_found(format!("template {}", name.0)))?;
        Ok(Json(built_view(&t, true)))
    }

    /// Delete a template
    ///
    /// Removes a built template, its builds and images (stopping a running build).
    /// 409 while sandboxes of it run, or for a configured template.
    #[oai(
        path = "/templates/:name",
        method = "delete",
        operation_id = "delete_template"
    )]
    async fn delete(
        &self,
        state: Data<&AppState>,
        name: Path<String>,
    ) -> Result<poem_openapi::payload::Response<Json<TemplateView>>, ApiError> {
        let t = state.manager.remove_template(&name.0).await?;
        Ok(poem_openapi::payload::Response::new(Json(built_view(
            &t, false,
        ))))
    }

    /// Build a template
    ///
    /// Builds template `name` from a Dockerfile in the request body, a tar archive (plain
    /// or gzip) of the build context, on the server's engine without pulling (the base
    /// image must be local, or pullable where a registry is reachable). Answers 202 at
    /// once; follow the log at `/templates/{name}/builds/{build_id}/logs?follow=true`.
    /// The context is at most the server's upload cap (413 past it).
    #[oai(
        path = "/templates/:name/builds",
        method = "post",
        operation_id = "build_template"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        state: Data<&AppState>,
        name: Path<String>,
        /// Tag of this build (default `default`; `name:tag` names it).
        tag: Query<Option<String>>,
        /// Path of the Dockerfile inside the context (default `Dockerfile`).
        dockerfile: Query<Option<String>>,
        /// User commands run as in its sandboxes (default `user`; the image must have it).
        user: Query<Option<String>>,
        /// Working directory of commands (default: the user's home).
        workdir: Query<Option<String>>,
        /// Started in the background in every new sandbox.
        start_cmd: Query<Option<String>>,
        /// Retried until it exits 0 before a new sandbox is handed out.
        ready_cmd: Query<Option<String>>,
        /// Build every step again, ignoring the engine's cache.
        no_cache: Query<Option<bool>>,
        body: Binary<Body>,
    ) -> Result<BuildAccepted, ApiError> {
        let templates = state.manager.templates();
        let stream = body.0.into_bytes_stream();
        let context = match templates.receive_context(stream).await {
            Ok(path) => path,
            Err(e) => return Err(e.into()),
        };
        let req = DockerfileBuild {
            name: name.0.clone(),
            tag: tag.0,
            dockerfile: dockerfile.0,
            user: user.0,
            workdir: workdir.0,
            start_cmd: start_cmd.0,
            ready_cmd: ready_cmd.0,
            no_cache: no_cache.0.unwrap_or(false),
        };
        let (t, b) = state.manager.start_dockerfile_build(&req, context)?;
        Ok(BuildAccepted::Accepted(Json(BuildStarted {
            name: t.name,
            template_id: t.id,
            build_id: b.id,
            status: b.status.as_str().into(),
            tags: b.tags,
        })))
    }

    /// Get a build
    ///
    /// A build's status (`waiting`, `building`, `ready`, `error`), its image and tags,
    /// and for a failed build the step that failed and why.
    #[oai(
        path = "/templates/:name/builds/:build_id",
        method = "get",
        operation_id = "get_template_build"
    )]
    async fn get_build(
        &self,
        state: Data<&AppState>,
        name: Path<String>,
        build_id: Path<String>,
    ) -> Result<Json<TemplateBuild>, ApiError> {
        let (t, b) = state.manager.templates().build(&name.0, &build_id.0)?;
        Ok(Json(build_view(&t, &b)))
    }

    /// Follow a build's log
    ///
    /// The log from `offset` (default 0) as JSON lines; with `follow=true` new entries
    /// are sent as they happen until the build ends.
    #[oai(
        path = "/templates/:name/builds/:build_id/logs",
        method = "get",
        operation_id = "template_build_logs"
    )]
    async fn logs(
        &self,
        state: Data<&AppState>,
        name: Path<String>,
        build_id: Path<String>,
        offset: Query<Option<u64>>,
        follow: Query<Option<bool>>,
    ) -> Result<LogStream, ApiError> {
        let (_, b) = state.manager.templates().build(&name.0, &build_id.0)?;
        let log = state
            .manager
            .templates()
            .log(&b.id)
            .ok_or_else(|| Error::not_found(format!("the log of build {}", b.id)))?;
        let follow = follow.0.unwrap_or(false);
        let start = offset.0.unwrap_or(0);
        let lines = futures_util::stream::unfold(
            (log, start, false),
            move |(log, offset, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let (entries, next) = log.read(offset, 256);
                    if !entries.is_empty() {
                        let mut chunk = Vec::new();
                        for e in &entries {
                            if let Ok(line) = serde_json::to_vec(e) {
                                chunk.extend_from_slice(&line);
                                chunk.push(b'\n');
                            }
                        }
                        return Some((
                            Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)),
                            (log, next, false),
                        ));
                    }
                    if !follow || log.closed() {
                        return None;
                    }
                    log.wait_past(offset).await;
                    if log.closed() && log.read(offset, 1).0.is_empty() {
                        return None;
                    }
                }
            },
        );
        Ok(LogStream::Ok(Binary(Body::from_bytes_stream(
            lines.boxed(),
        ))))
    }
}
