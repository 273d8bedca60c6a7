//! `colima-e2b template ...`: build templates from a Dockerfile on a running server (with
//! its log as it happens and a step progress display), list and remove them.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use serde_json::Value;

use crate::client::{answer, encode, print_json, print_table, Api, Failure};
use crate::config::Config;

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TemplateCommand {
    /// Build template NAME (or NAME:TAG) from a Dockerfile and its context directory.
    Build {
        /// Template name, optionally with a tag (`web:v2`).
        name: String,
        /// The build context directory.
        #[arg(default_value = ".")]
        context: PathBuf,
        /// The Dockerfile (default: `Dockerfile` in the context).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// User commands run as in its sandboxes (default `user`).
        #[arg(long)]
        user: Option<String>,
        /// Working directory of commands in its sandboxes.
        #[arg(long)]
        workdir: Option<String>,
        /// Started in the background in every new sandbox.
        #[arg(long)]
        start_cmd: Option<String>,
        /// Must exit 0 before a new sandbox is handed out (retried).
        #[arg(long)]
        ready_cmd: Option<String>,
        /// Build every step again, ignoring the engine's cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// List templates.
    #[command(visible_alias = "list")]
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a built template, its builds and images.
    Rm {
        /// Template name or id.
        name: String,
    },
}

/// Where the Dockerfile goes in the archive when it is outside the context.
const OUTSIDE_DOCKERFILE: &str = ".colima-e2b.Dockerfile";

/// Tars `context` (gzip) into a temporary file, with the Dockerfile; returns the file and
/// the Dockerfile's path inside the archive. `.git` directories are left out.
fn pack(
    context: &Path,
    dockerfile: Option<&Path>,
) -> Result<(tempfile::NamedTempFile, String), String> {
    if !context.is_dir() {
        return Err(format!(
            "the build context {} is not a directory",
            context.display()
        ));
    }
    let context = context
        .canonicalize()
        .map_err(|e| format!("{}: {e}", context.display()))?;
    let (dockerfile_path, inside) = match dockerfile {
        None => (context.join("Dockerfile"), Some("Dockerfile".to_string())),
        Some(f) => {
            let f = f
                .canonicalize()
                .map_err(|e| format!("{}: {e}", f.display()))?;
            let inside = f
                .strip_prefix(&context)
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
            (f, inside)
        }
    };
    if !dockerfile_path.is_file() {
        return Err(format!("no Dockerfile at {}", dockerfile_path.display()));
    }
    let file = tempfile::NamedTempFile::new().map_err(|e| format!("temporary file: {e}"))?;
    let gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file.reopen().map_err(|e| e.to_string())?),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let walk = |tar: &mut tar::Builder<_>| -> std::io::Result<()> {
        let mut stack = vec![context.clone()];
        while let Some(dir) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let path = entry.path();
                let rel = path.strip_prefix(&context).map_err(std::io::Error::other)?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    if entry.file_name() == ".git" {
                        continue;
                    }
                    tar.append_dir(rel, &path)?;
                    stack.push(path);
                } else {
                    tar.append_path_with_name(&path, rel)?;
                }
            }
        }
        Ok(())
    };
    walk(&mut tar).map_err(|e| format!("packing {}: {e}", context.display()))?;
    let inside = match inside {
        Some(p) => p,
        None => {
            tar.append_path_with_name(&dockerfile_path, OUTSIDE_DOCKERFILE)
                .map_err(|e| format!("packing {}: {e}", dockerfile_path.display()))?;
            OUTSIDE_DOCKERFILE.to_string()
        }
    };
    let gz = tar.into_inner().map_err(|e| format!("packing: {e}"))?;
    let mut out = gz.finish().map_err(|e| format!("packing: {e}"))?;
    out.flush().map_err(|e| format!("packing: {e}"))?;
    Ok((file, inside))
}

/// Runs `command` against the server `config` describes; `Ok` is the exit code.
pub async fn run(config: &Config, command: TemplateCommand) -> Result<u8, Failure> {
    let api = Api::new(config)?;
    match command {
        TemplateCommand::Ls { json } => {
            let body = api.get("/templates").await?;
            if json {
                print_json(&body);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    let text = |k: &str| t[k].as_str().unwrap_or("").to_string();
                    let tags: Vec<&str> = t["tags"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    vec![
                        text("name"),
                        text("source"),
                        text("status"),
                        tags.join(","),
                        text("image"),
                    ]
                })
                .collect();
            print_table(&["NAME", "SOURCE", "STATUS", "TAGS", "IMAGE"], &rows);
            Ok(0)
        }
        TemplateCommand::Rm { name } => {
            let path = format!("/templates/{}", encode(&name));
            api.send(api.request(reqwest::Method::DELETE, &path))
                .await?;
            println!("removed {name}");
            Ok(0)
        }
        TemplateCommand::Build {
            name,
            context,
            file,
            user,
            workdir,
            start_cmd,
            ready_cmd,
            no_cache,
        } => {
            let (name, tag) = match name.rsplit_once(':') {
                Some((n, t)) => (n.to_string(), Some(t.to_string())),
                None => (name, None),
            };
            let (ctx, dockerfile) =
                tokio::task::block_in_place(|| pack(&context, file.as_deref()))?;
            let size = ctx.as_file().metadata().map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "sending the build context {} ({:.1} MiB)",
                context.display(),
                size as f64 / (1 << 20) as f64
            );
            let mut query: Vec<(&str, String)> = vec![("dockerfile", dockerfile)];
            for (k, v) in [
                ("tag", tag),
                ("user", user),
                ("workdir", workdir),
                ("start_cmd", start_cmd),
                ("ready_cmd", ready_cmd),
            ] {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            if no_cache {
                query.push(("no_cache", "true".into()));
            }
            let upload = tokio::fs::File::open(ctx.path())
                .await
                .map_err(|e| format!("build context: {e}"))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(upload));
            let path = format!("/templates/{}/builds", encode(&name));
            let started = api
                .send(
                    api.request(reqwest::Method::POST, &path)
                        .query(&query)
                        .header("content-type", "application/gzip")
                        .header("content-length", size)
                        .body(body),
                )
                .await?;
            let build_id = started["build_id"].as_str().unwrap_or_default().to_string();
            eprintln!("build {build_id} of template {name} started");
            follow(&api, &name, &build_id).await?;
            Ok(0)
        }
    }
}

/// Prints the build's log as it happens, with `[step/total]` progress, then its outcome.
async fn follow(api: &Api, name: &str, build_id: &str) -> Result<(), Failure> {
    let path = format!("/templates/{}/builds/{build_id}", encode(name));
    let resp = api
        .request(reqwest::Method::GET, &format!("{path}/logs"))
        .query(&[("follow", "true")])
        .send()
        .await
        .map_err(|e| api.unreachable(e))?;
    if !resp.status().is_success() {
        return answer(resp).await.map(drop);
    }
    let tty = std::io::stdout().is_terminal();
    let mut stream = resp.bytes_stream();
    let mut pending = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("following the build: {e}"))?;
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let Ok(entry) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let message = entry["message"].as_str().unwrap_or("");
            let step = entry["step"].as_str().unwrap_or("");
            let level = entry["level"].as_str().unwrap_or("info");
            if level == "debug" {
                continue;
            }
            let shown = if message.starts_with("Step ") {
                // A new step: the progress line.
                if tty {
                    format!("\x1b[1m==> {message}\x1b[0m")
                } else {
                    format!("==> {message}")
                }
            } else if step.is_empty() {
                message.to_string()
            } else {
                format!("  #{step} {message}")
            };
            let _ = writeln!(out, "{shown}");
        }
    }
    let build = api.get(&path).await?;
    match build["status"].as_str() {
        Some("ready") => {
            eprintln!(
                "built template {name} ({}) in {:.1} s",
                build["image"].as_str().unwrap_or(""),
                build["seconds"].as_f64().unwrap_or(0.0)
            );
            Ok(())
        }
        Some(status) => Err(format!(
            "the build {status}: {}",
            build["error"].as_str().unwrap_or("no reason given")
        )
        .into()),
        None => Err("the build's status is unknown".to_string().into()),
    }
}
