//! Templates: what a sandbox is made from. Configuration names each template's image and
//! the user (and working directory) its commands run as by default; templates built by
//! the server ([`registry`]) add their own, from a Dockerfile or E2B's build steps.
//!
//! - [`registry`]: built templates, their builds, tags and names, kept in the state dir.
//! - [`steps`]: E2B's build steps turned into a Dockerfile and its context.
//! - [`files`]: uploaded build files, content-addressed.
//! - [`log`]: a build's log, bounded.

pub mod files;
pub mod log;
pub mod registry;
pub mod steps;

use serde::{Deserialize, Serialize};

/// One template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "TemplateForm", into = "TemplateTable")]
pub struct Template {
    /// Image reference, e.g. `colima-e2b/base:latest`.
    pub image: String,
    /// User commands run as when a request names none (E2B's default: `user`).
    pub user: String,
    /// Working directory when a command names none; `None`: the user's home.
    pub workdir: Option<String>,
    /// Started (in the background, as `user`) in every new sandbox of this template.
    pub start_cmd: Option<String>,
    /// Run until it exits 0 before a create returns (after `start_cmd`).
    pub ready_cmd: Option<String>,
    /// CPUs its sandboxes get when a create asks for none (E2B's `cpuCount`).
    pub cpus: Option<f64>,
    /// Memory its sandboxes get when a create asks for none, MiB (E2B's `memoryMB`).
    pub memory_mb: Option<u64>,
}

/// The user of templates that name none (E2B's).
pub const DEFAULT_USER: &str = "user";

impl Template {
    /// A template of `image` with E2B's default user.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            user: DEFAULT_USER.into(),
            workdir: None,
            start_cmd: None,
            ready_cmd: None,
            cpus: None,
            memory_mb: None,
        }
    }
}

/// How configuration writes a template: just the image, or a table.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateForm {
    Image(String),
    Table(TemplateTable),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateTable {
    image: String,
    #[serde(default = "default_user")]
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ready_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory_mb: Option<u64>,
}

fn default_user() -> String {
    DEFAULT_USER.into()
}

impl From<TemplateForm> for Template {
    fn from(form: TemplateForm) -> Self {
        match form {
            TemplateForm::Image(image) => Template::new(image),
            TemplateForm::Table(t) => Template {
                image: t.image,
                user: t.user,
                workdir: t.workdir,
                start_cmd: t.start_cmd,
                ready_cmd: t.ready_cmd,
                cpus: t.cpus,
                memory_mb: t.memory_mb,
            },
        }
    }
}

impl From<Template> for TemplateTable {
    fn from(t: Template) -> Self {
        TemplateTable {
            image: t.image,
            user: t.user,
            workdir: t.workdir,
            start_cmd: t.start_cmd,
            ready_cmd: t.ready_cmd,
            cpus: t.cpus,
            memory_mb: t.memory_mb,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_an_image_or_a_table() {
        let t: Template = serde_json::from_str(r#""colima-e2b/base:latest""#).expect("string");
        assert_eq!(t, Template::new("colima-e2b/base:latest"));
        let t: Template = serde_json::from_str(r#"{"image":"x","user":"root","workdir":"/work"}"#)
            .expect("table");
        assert_eq!(
            (t.user.as_str(), t.workdir.as_deref()),
            ("root", Some("/work"))
        );
        assert!(serde_json::from_str::<Template>(r#"{"image":"x","usr":"root"}"#).is_err());
    }
}
