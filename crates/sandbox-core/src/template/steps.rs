//! E2B's template build steps (what the SDKs' `Template` sends) turned into a Dockerfile
//! the engine's builder runs, with a map from each Dockerfile instruction back to the
//! step it came from, so logs and errors name the user's step.
//!
//! Semantics kept from E2B: steps run as `user` unless a `USER` step or a RUN's own user
//! says otherwise; `COPY` files belong to the current user unless an owner is given;
//! `WORKDIR` creates the directory owned by the current user; `USER name [sudo]` creates
//! the user when missing; `ENV` values expand `$VAR` but never run `$(...)`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::template::{Template, DEFAULT_USER};

/// E2B's build request body (`POST /v2/templates/{id}/builds/{buildID}`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepsTemplate {
    /// Base image reference.
    #[serde(default)]
    pub from_image: Option<String>,
    /// Base template name (`name` or `name:tag`).
    #[serde(default)]
    pub from_template: Option<String>,
    /// A private registry's credentials: not supported here.
    #[serde(default)]
    pub from_image_registry: Option<serde_json::Value>,
    /// Rebuild everything, ignoring cached layers.
    #[serde(default)]
    pub force: bool,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Started in every sandbox of the template.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// Retried until it exits 0 before a sandbox is handed out.
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// One step.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The step's arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Build this step (and all after it) again.
    #[serde(default)]
    pub force: Option<bool>,
    /// For `COPY`: the hash naming the uploaded files.
    #[serde(default)]
    pub files_hash: Option<String>,
}

/// Where a build starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Base {
    /// Local image reference.
    pub image: String,
    /// The user steps run as at first.
    pub user: String,
    /// The working directory at first.
    pub workdir: Option<String>,
    /// Whether `user` may be missing from the image (a foreign image): a first step
    /// creates it.
    pub ensure_user: bool,
    /// Whether the image's own config already runs as root (no `USER root` needed).
    pub runs_as_root: bool,
}

/// The files of one COPY step in the build context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySource {
    /// Directory of the context the step's files go into.
    pub dir: String,
    /// The uploaded files' hash.
    pub hash: String,
    /// Permission bits forced on its regular files.
    pub mode: Option<u32>,
}

/// A Dockerfile for a steps template, and what the build needs besides.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The Dockerfile.
    pub dockerfile: String,
    /// For each Dockerfile instruction (index 0 is `FROM`): the step it belongs to,
    /// `base`, a 1-based step number, or `finalize`.
    pub step_of_instruction: Vec<String>,
    /// What each step does, for the log (index 0 is step 1).
    pub descriptions: Vec<String>,
    /// The uploaded files to put into the context.
    pub copies: Vec<CopySource>,
    /// The template a successful build makes (its image is filled in later).
    pub template: Template,
}

/// Whether `s` is a sha256 hex digest.
pub fn is_files_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn no_newline(what: &str, s: &str) -> Result<()> {
    if s.contains(['\n', '\r', '\0']) {
        return Err(Error::InvalidArgument(format!(
            "{what} must not contain line breaks or NUL bytes"
        )));
    }
    Ok(())
}

fn json(v: &[&str]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

/// Runs `script` with `args` through `/bin/sh` (exec form, so no Dockerfile quoting).
fn sh(script: &str, args: &[&str]) -> String {
    let mut all = vec!["/bin/sh", "-c", script, "sh"];
    all.extend_from_slice(args);
    format!("RUN {}", json(&all))
}

/// A user's command, as `user`: bash where the image has it (E2B runs steps with bash),
/// else sh. Every instruction costs the engine a container and a commit (seconds on
/// some storage drivers), so the Dockerfile stays root and each RUN switches to its
/// user itself (`su` keeps the environment but for HOME, USER, LOGNAME and SHELL).
fn run_cmd(user: &str, cmd: &str) -> String {
    sh(
        "s=/bin/sh; [ -x /bin/bash ] && s=/bin/bash; [ \"$1\" = root ] && exec \"$s\" -c \"$2\"; \
         exec su -s \"$s\" \"$1\" -c \"$2\"",
        &[user, cmd],
    )
}

fn ensure_user(name: &str, sudo: bool) -> String {
    sh(
        "id -u \"$1\" >/dev/null 2>&1 || useradd -m -s /bin/bash \"$1\" 2>/dev/null || \
         adduser -D \"$1\"; if [ \"$2\" = true ]; then usermod -aG sudo \"$1\" 2>/dev/null || \
         adduser \"$1\" sudo; fi",
        &[name, if sudo { "true" } else { "false" }],
    )
}

/// Expands `$HOME`/`${HOME}` and `$USER`/`${USER}` in an ENV value as the step's user's
/// shell would: the engine's builder only knows variables set by ENV, and these two are
/// the ones E2B programs use (`$HOME/.local/bin:$PATH`). Escaped `\$` stays.
fn expand_user_vars(value: &str, user: &str) -> String {
    let home = if user == "root" {
        "/root".to_string()
    } else {
        format!("/home/{user}")
    };
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        let escaped = rest[..i].ends_with('\\');
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let word = |name: &str| {
            after.strip_prefix(&format!("{{{name}}}")).or_else(|| {
                after
                    .strip_prefix(name)
                    .filter(|r| !r.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
            })
        };
        match (escaped, word("HOME"), word("USER")) {
            (false, Some(r), _) => {
                out.push_str(&home);
                rest = r;
            }
            (false, None, Some(r)) => {
                out.push_str(user);
                rest = r;
            }
            _ => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `ENV` with values double-quoted: `$VAR` still expands, nothing else does.
fn env_line(pairs: &[(String, String)]) -> String {
    let mut line = String::from("ENV");
    for (k, v) in pairs {
        let v = v.replace('\\', "\\\\").replace('"', "\\\"");
        line.push_str(&format!(" {k}=\"{v}\""));
    }
    line
}

fn valid_env_name(k: &str) -> bool {
    let mut bytes = k.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_user_name(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn parse_mode(s: &str) -> Result<Option<u32>> {
    if s.is_empty() {
        return Ok(None);
    }
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .map(Some)
        .ok_or_else(|| Error::InvalidArgument(format!("COPY mode {s:?} is not an octal mode")))
}

struct Writer {
    lines: Vec<String>,
    labels: Vec<String>,
}

impl Writer {
    fn emit(&mut self, step: &str, line: String) {
        self.lines.push(line);
        self.labels.push(step.to_string());
    }
}

/// The Dockerfile of `t` built on `base`; `nonce` makes forced steps miss the cache.
pub fn plan(t: &StepsTemplate, base: &Base, nonce: &str) -> Result<Plan> {
    if t.from_image_registry.is_some() {
        return Err(Error::InvalidArgument(
            "fromImageRegistry (a private registry) is not supported by this server: make \
             the image local (docker/podman load or pull) and use fromImage"
                .into(),
        ));
    }
    no_newline("the base image", &base.image)?;
    let mut w = Writer {
        lines: Vec::new(),
        labels: Vec::new(),
    };
    w.emit("base", format!("FROM {}", base.image));
    let mut user = base.user.clone();
    let mut workdir = base.workdir.clone();
    // Root throughout: RUN steps switch to their user (see `run_cmd`).
    if !base.runs_as_root {
        w.emit("base", "USER root".into());
    }
    if base.ensure_user {
        w.emit("base", ensure_user(&user, false));
    }
    let mut descriptions = Vec::new();
    let mut copies = Vec::new();
    for (i, step) in t.steps.iter().enumerate() {
        let n = (i + 1).to_string();
        let arg = |k: usize| step.args.get(k).map(String::as_str).unwrap_or("");
        // A RUN's command may span lines (the exec form keeps it on one); nothing else.
        if !step.kind.eq_ignore_ascii_case("RUN") {
            for a in &step.args {
                no_newline(&format!("step {n} ({})'s arguments", step.kind), a)?;
            }
        }
        if step.force == Some(true) {
            w.emit(&n, format!("LABEL dev.colima-e2b.rebuild=\"{nonce}-{n}\""));
        }
        let kind = step.kind.to_ascii_uppercase();
        let description = match kind.as_str() {
            "RUN" => {
                let cmd = arg(0);
                if cmd.trim().is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: RUN needs a command"
                    )));
                }
                if cmd.contains('\0') {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: RUN must not contain NUL bytes"
                    )));
                }
                let as_user = match arg(1) {
                    "" => user.clone(),
                    u => u.to_string(),
                };
                if !valid_user_name(&as_user) {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: {as_user:?} is not a user name"
                    )));
                }
                w.emit(&n, run_cmd(&as_user, cmd));
                if arg(1).is_empty() {
                    format!("RUN {cmd}")
                } else {
                    format!("RUN {cmd} (as {as_user})")
                }
            }
            "COPY" => {
                let (src, dest) = (arg(0), arg(1));
                if src.is_empty() || dest.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: COPY needs a source and a destination"
                    )));
                }
                if src.starts_with('/') || src.split('/').any(|c| c == "..") {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: COPY source {src:?} must be relative to the context"
                    )));
                }
                let hash = step
                    .files_hash
                    .as_deref()
                    .filter(|h| is_files_hash(h))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "step {n}: COPY needs the filesHash of its uploaded files"
                        ))
                    })?;
                let owner = match arg(2) {
                    "" => user.clone(),
                    o => o.to_string(),
                };
                if !valid_user_name(&owner) {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: {owner:?} is not an owner"
                    )));
                }
                let mode = parse_mode(arg(3))?;
                let dir = format!("step-{n}");
                let from = format!("{dir}/{}", src.trim_start_matches("./"));
                w.emit(&n, format!("COPY --chown={owner} {}", json(&[&from, dest])));
                copies.push(CopySource {
                    dir,
                    hash: hash.to_ascii_lowercase(),
                    mode,
                });
                format!("COPY {src} {dest}")
            }
            "ENV" => {
                if step.args.is_empty() || step.args.len() % 2 != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: ENV needs name and value pairs"
                    )));
                }
                let pairs: Vec<(String, String)> = step
                    .args
                    .chunks(2)
                    .map(|kv| (kv[0].clone(), expand_user_vars(&kv[1], &user)))
                    .collect();
                if let Some((k, _)) = pairs.iter().find(|(k, _)| !valid_env_name(k)) {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: {k:?} is not an environment variable name"
                    )));
                }
                w.emit(&n, env_line(&pairs));
                let shown: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("ENV {}", shown.join(" "))
            }
            "WORKDIR" => {
                let dir = arg(0);
                if dir.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: WORKDIR needs a path"
                    )));
                }
                w.emit(
                    &n,
                    sh("mkdir -p \"$1\" && chown \"$2\" \"$1\"", &[dir, &user]),
                );
                w.emit(&n, format!("WORKDIR {dir}"));
                workdir = Some(match (&workdir, dir.starts_with('/')) {
                    (Some(prev), false) => format!("{}/{dir}", prev.trim_end_matches('/')),
                    _ => dir.to_string(),
                });
                format!("WORKDIR {dir}")
            }
            "USER" => {
                let name = arg(0);
                if !valid_user_name(name) || name.contains(':') {
                    return Err(Error::InvalidArgument(format!(
                        "step {n}: USER needs a user name, not {name:?}"
                    )));
                }
                let sudo = arg(1) == "true";
                if name != "root" {
                    w.emit(&n, ensure_user(name, sudo));
                }
                user = name.to_string();
                format!("USER {name}")
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "step {n}: unknown step type {other:?} (RUN, COPY, ENV, WORKDIR or USER)"
                )))
            }
        };
        descriptions.push(description);
    }
    Ok(Plan {
        dockerfile: w.lines.join("\n") + "\n",
        step_of_instruction: w.labels,
        descriptions,
        copies,
        template: Template {
            image: String::new(),
            user,
            workdir,
            start_cmd: t.start_cmd.clone().filter(|c| !c.trim().is_empty()),
            ready_cmd: t.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
            cpus: None,
            memory_mb: None,
        },
    })
}

/// The base of a build from `from_image` (default E2B's `e2bdev/base`), with the image
/// reference rewritten through `aliases` (e.g. `e2bdev/base` to the local base image).
pub fn image_base(from_image: Option<&str>, aliases: &BTreeMap<String, String>) -> Base {
    let image = from_image.unwrap_or("e2bdev/base").to_string();
    let (repo, _) = crate::backend::split_image(&image);
    let image = aliases
        .get(&image)
        .or_else(|| aliases.get(repo))
        .cloned()
        .unwrap_or(image);
    Base {
        image,
        user: DEFAULT_USER.into(),
        workdir: None,
        ensure_user: true,
        runs_as_root: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Base {
        Base {
            image: "colima-e2b/base:latest".into(),
            user: "user".into(),
            workdir: None,
            ensure_user: false,
            runs_as_root: false,
        }
    }

    fn step(kind: &str, args: &[&str]) -> Step {
        Step {
            kind: kind.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            force: Some(false),
            files_hash: (kind == "COPY").then(|| "ab".repeat(32)),
        }
    }

    #[test]
    fn steps_become_a_dockerfile_whose_lines_name_their_step() {
        let t = StepsTemplate {
            steps: vec![
                step("RUN", &["apt-get update", "root"]),
                step("COPY", &["app.py", "/app/", "", "0755"]),
                step("ENV", &["A", "1", "B", "x $A \"q\""]),
                step("WORKDIR", &["/app"]),
                step("USER", &["bob", "true"]),
            ],
            start_cmd: Some("python app.py".into()),
            ready_cmd: Some("curl -s localhost:8000".into()),
            ..Default::default()
        };
        let p = plan(&t, &base(), "n").expect("plan");
        let lines: Vec<&str> = p.dockerfile.lines().collect();
        assert_eq!(lines.len(), p.step_of_instruction.len());
        assert_eq!(lines[0], "FROM colima-e2b/base:latest");
        assert_eq!(p.step_of_instruction[0], "base");
        let of = |needle: &str| {
            let i = lines.iter().position(|l| l.contains(needle)).expect(needle);
            p.step_of_instruction[i].clone()
        };
        assert_eq!(of("apt-get update"), "1");
        assert_eq!(of("COPY --chown=user [\"step-2/app.py\",\"/app/\"]"), "2");
        assert_eq!(of(r#"ENV A="1" B="x $A \"q\"""#), "3");
        assert_eq!(of("WORKDIR /app"), "4");
        assert_eq!(of("useradd"), "5");
        assert_eq!(p.copies[0].mode, Some(0o755));
        assert_eq!(p.template.user, "bob");
        assert_eq!(p.template.workdir.as_deref(), Some("/app"));
        assert_eq!(p.template.start_cmd.as_deref(), Some("python app.py"));
        assert_eq!(p.descriptions[0], "RUN apt-get update (as root)");
        // One instruction per step but WORKDIR's two; the Dockerfile stays root and
        // each RUN names its user.
        assert_eq!(lines.len(), 2 + 5 + 1);
        assert_eq!(lines[1], "USER root");
        assert!(lines.iter().filter(|l| l.starts_with("USER")).count() == 1);
        let run = lines.iter().find(|l| l.contains("apt-get")).expect("run");
        assert!(run.ends_with(r#""sh","root","apt-get update"]"#), "{run}");
    }

    #[test]
    fn bad_steps_are_refused_with_their_number() {
        for (s, needle) in [
            (step("FROB", &[]), "step 1: unknown step type"),
            (step("ENV", &["A"]), "pairs"),
            (step("ENV", &["1A", "x"]), "not an environment variable"),
            (step("COPY", &["/etc/passwd", "/x"]), "relative"),
            (step("COPY", &["../x", "/x"]), "relative"),
            (step("USER", &["a b"]), "user name"),
            (step("WORKDIR", &["/a\nRUN evil"]), "line breaks"),
            (step("COPY", &["a", "/x", "", "999"]), "octal"),
        ] {
            let t = StepsTemplate {
                steps: vec![s],
                ..Default::default()
            };
            let e = plan(&t, &base(), "n").expect_err(needle).to_string();
            assert!(e.contains(needle), "{e}");
        }
        let registry = StepsTemplate {
            from_image_registry: Some(serde_json::json!({"type": "registry"})),
            ..Default::default()
        };
        assert!(plan(&registry, &base(), "n").is_err());
    }

    #[test]
    fn home_and_user_expand_as_the_steps_user_would_see_them() {
        assert_eq!(
            expand_user_vars("$HOME/.local/bin:$PATH", "user"),
            "/home/user/.local/bin:$PATH"
        );
        assert_eq!(expand_user_vars("${HOME}x $USER", "root"), "/rootx root");
        assert_eq!(
            expand_user_vars("$HOMEDIR \\$HOME $", "user"),
            "$HOMEDIR \\$HOME $"
        );
    }

    #[test]
    fn a_multiline_run_stays_one_instruction() {
        let t = StepsTemplate {
            steps: vec![step("RUN", &["echo a\necho b"])],
            ..Default::default()
        };
        let p = plan(&t, &base(), "n").expect("plan");
        // JSON exec form keeps the line break escaped inside one line.
        assert_eq!(p.dockerfile.lines().count(), p.step_of_instruction.len());
        assert!(p.dockerfile.contains("echo a\\necho b"));
    }

    #[test]
    fn forced_steps_and_foreign_images() {
        let mut s = step("RUN", &["true"]);
        s.force = Some(true);
        let t = StepsTemplate {
            steps: vec![s],
            ..Default::default()
        };
        let aliases = BTreeMap::from([(
            "e2bdev/base".to_string(),
            "colima-e2b/base:latest".to_string(),
        )]);
        let b = image_base(None, &aliases);
        assert_eq!(b.image, "colima-e2b/base:latest");
        let b = image_base(Some("e2bdev/base:latest"), &aliases);
        assert_eq!(b.image, "colima-e2b/base:latest");
        let foreign = image_base(Some("python:3.12"), &aliases);
        assert!(foreign.ensure_user);
        let p = plan(&t, &foreign, "nonce").expect("plan");
        assert!(p.dockerfile.contains("FROM python:3.12\nUSER root\nRUN"));
        assert!(
            p.dockerfile.contains(r#""sh","user","true"]"#),
            "{}",
            p.dockerfile
        );
        assert!(p
            .dockerfile
            .contains("LABEL dev.colima-e2b.rebuild=\"nonce-1\""));
    }
}
