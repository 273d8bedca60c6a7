//! The content of an engine volume, for E2B's volume content API: the server runs this
//! agent in a small keeper container with the volume mounted at
//! [`envd_proto::VOLUME_ROOT`] and forwards `/volumecontent/{id}/…` here as `/volume/…`.
//!
//! Every path is the client's, relative to the volume: `.`/`..` are removed lexically
//! (never above the volume), and a path whose symlinks lead out of the volume is
//! refused, so a link a sandbox planted cannot expose the keeper's own files.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envd_proto::error::{Code, EnvdError};
use envd_proto::VOLUME_ROOT;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::connect::{self, AgentBody, RestResponse};
use crate::files;
use crate::server::Agent;
use crate::users::User;

/// Deepest listing a client may ask for.
const MAX_DEPTH: u32 = 16;
/// Owner of what the content API creates when the request names none: E2B's `user`
/// (uid and gid 1000), the default user of sandboxes, so their commands may change it.
const DEFAULT_OWNER: u32 = 1000;

/// One entry as E2B's `VolumeEntryStat` has it.
#[derive(Debug, Serialize)]
struct EntryStat {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    /// The entry's path inside the volume, from `/`.
    path: String,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    atime: String,
    mtime: String,
    ctime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

/// `PATCH /volume/path` body.
#[derive(Debug, Default, Deserialize)]
struct MetaBody {
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
}

/// Owner and mode a client asks an entry to get.
#[derive(Clone, Copy, Debug, Default)]
struct Meta {
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
}

fn bad(message: impl Into<String>) -> EnvdError {
    EnvdError::from_rest_status(400, message)
}

fn not_found(path: &str) -> EnvdError {
    EnvdError::from_rest_status(404, format!("path {path} not found"))
}

fn root() -> PathBuf {
    PathBuf::from(VOLUME_ROOT)
}

/// The volume path `raw` names (lexically inside the volume), and its form shown to
/// clients (`/a/b`).
fn lexical(raw: &str) -> Result<(PathBuf, String), EnvdError> {
    if raw.contains('\0') {
        return Err(bad("path contains a NUL byte"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(n) => parts.push(n.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    let mut full = root();
    for p in &parts {
        full.push(p);
    }
    Ok((full, format!("/{}", parts.join("/"))))
}

/// Refuses `path` when, with its symlinks followed (`follow`: the last one too), it
/// leaves the volume. Missing trailing components are fine (they are about to be made).
fn confine(path: &Path, follow: bool) -> Result<(), EnvdError> {
    let base =
        std::fs::canonicalize(VOLUME_ROOT).map_err(|e| EnvdError::from_io(&e, "the volume"))?;
    // The deepest part of the path that exists, resolved.
    let mut probe = if follow || path == Path::new(VOLUME_ROOT) {
        path.to_path_buf()
    } else {
        path.parent().map_or_else(root, Path::to_path_buf)
    };
    loop {
        match std::fs::canonicalize(&probe) {
            Ok(real) if real.starts_with(&base) => return Ok(()),
            Ok(_) => return Err(bad("the path leads out of the volume through a symlink")),
            Err(_) if probe.pop() && probe.starts_with(VOLUME_ROOT) => continue,
            Err(e) => return Err(EnvdError::from_io(&e, "the volume")),
        }
    }
}

fn time_of(t: io::Result<SystemTime>) -> String {
    files::rfc3339(t.unwrap_or(SystemTime::UNIX_EPOCH))
}

fn ctime_of(md: &std::fs::Metadata) -> String {
    let secs = u64::try_from(md.ctime()).unwrap_or(0);
    let nanos = u32::try_from(md.ctime_nsec()).unwrap_or(0);
    files::rfc3339(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// What `full` (shown as `shown`) is, without following a final symlink.
fn stat_entry(full: &Path, shown: &str) -> Result<EntryStat, EnvdError> {
    let md = std::fs::symlink_metadata(full).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => not_found(shown),
        _ => EnvdError::from_io(&e, shown),
    })?;
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "file"
    } else {
        "unknown"
    };
    let target = ft
        .is_symlink()
        .then(|| std::fs::read_link(full).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    let name = if shown == "/" {
        String::new()
    } else {
        shown.rsplit('/').next().unwrap_or_default().to_string()
    };
    Ok(EntryStat {
        name,
        kind,
        path: shown.to_string(),
        size: md.len(),
        mode: md.permissions().mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        atime: time_of(md.accessed()),
        mtime: time_of(md.modified()),
        ctime: ctime_of(&md),
        target,
    })
}

/// The entries under directory `full`, `depth` levels deep (1: its children).
fn list(full: &Path, shown: &str, depth: u32) -> Result<Vec<EntryStat>, EnvdError> {
    let top = stat_entry(full, shown)?;
    if top.kind != "directory" {
        return Err(bad(format!("{shown} is not a directory")));
    }
    let mut out = Vec::new();
    let mut stack = vec![(full.to_path_buf(), shown.to_string(), 1u32)];
    while let Some((dir, dir_shown, level)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| EnvdError::from_io(&e, &dir_shown))?;
        for entry in rd.flatten() {
            if out.len() >= files::MAX_LIST_ENTRIES {
                return Err(bad(format!(
                    "{shown} holds more than {} entries at depth {depth}",
                    files::MAX_LIST_ENTRIES
                )));
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_shown = if dir_shown == "/" {
                format!("/{name}")
            } else {
                format!("{dir_shown}/{name}")
            };
            let child = dir.join(entry.file_name());
            let Ok(stat) = stat_entry(&child, &child_shown) else {
                continue; // removed meanwhile
            };
            if stat.kind == "directory" && level < depth {
                stack.push((child, child_shown, level + 1));
            }
            out.push(stat);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Gives `full` the owner and mode asked for (a symlink itself is never changed).
fn apply(full: &Path, shown: &str, meta: Meta) -> Result<(), EnvdError> {
    let io_err = |e: io::Error| EnvdError::from_io(&e, shown);
    if meta.uid.is_some() || meta.gid.is_some() {
        std::os::unix::fs::lchown(full, meta.uid, meta.gid).map_err(io_err)?;
    }
    if let Some(mode) = meta.mode {
        if mode > 0o7777 {
            return Err(bad(format!("mode {mode:o} is not a permission mode")));
        }
        let md = std::fs::symlink_metadata(full).map_err(io_err)?;
        if !md.file_type().is_symlink() {
            std::fs::set_permissions(full, std::fs::Permissions::from_mode(mode))
                .map_err(io_err)?;
        }
    }
    Ok(())
}

/// The directories from the volume's root down to `dir` that do not exist, topmost
/// first.
fn missing_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut at = dir.to_path_buf();
    while at.starts_with(VOLUME_ROOT) && at != Path::new(VOLUME_ROOT) {
        if std::fs::symlink_metadata(&at).is_ok() {
            break;
        }
        out.push(at.clone());
        if !at.pop() {
            break;
        }
    }
    out.reverse();
    out
}

/// Hands what a request created to the owner it asked for, else [`DEFAULT_OWNER`].
fn own(created: &[PathBuf], meta: Meta) {
    let uid = meta.uid.unwrap_or(DEFAULT_OWNER);
    let gid = meta.gid.unwrap_or(DEFAULT_OWNER);
    for p in created {
        // Best effort: the entry exists either way, and a stat shows its owner.
        let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
    }
}

fn make_dir(full: &Path, shown: &str, force: bool, meta: Meta) -> Result<EntryStat, EnvdError> {
    match std::fs::symlink_metadata(full) {
        Ok(md) if md.is_dir() && force => {}
        Ok(_) => {
            return Err(EnvdError::from_rest_status(
                409,
                format!("{shown} exists already"),
            ))
        }
        Err(_) => {
            let created = missing_dirs(full);
            let made = if force {
                std::fs::create_dir_all(full)
            } else {
                std::fs::create_dir(full)
            };
            made.map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => not_found(shown.rsplit_once('/').map_or("/", |p| p.0)),
                _ => EnvdError::from_io(&e, shown),
            })?;
            own(&created, meta);
        }
    }
    apply(full, shown, meta)?;
    stat_entry(full, shown)
}

fn remove(full: &Path, shown: &str) -> Result<(), EnvdError> {
    if shown == "/" {
        return Err(bad("the volume's root cannot be removed"));
    }
    let md = std::fs::symlink_metadata(full).map_err(|_| not_found(shown))?;
    let r = if md.is_dir() {
        std::fs::remove_dir_all(full)
    } else {
        std::fs::remove_file(full)
    };
    r.map_err(|e| EnvdError::from_io(&e, shown))
}

fn query_u32(q: &[(String, String)], key: &str) -> Result<Option<u32>, EnvdError> {
    match q.iter().find(|(k, _)| k == key) {
        None => Ok(None),
        Some((_, v)) if v.is_empty() => Ok(None),
        Some((_, v)) => v
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("{key} must be a non-negative integer, not {v:?}"))),
    }
}

fn query_bool(q: &[(String, String)], key: &str) -> bool {
    q.iter()
        .any(|(k, v)| k == key && matches!(v.as_str(), "true" | "1" | ""))
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<AgentBody> {
    connect::json_response(status, serde_json::to_vec(body).unwrap_or_default())
}

/// Runs blocking filesystem work off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EnvdError> + Send + 'static,
) -> Result<T, EnvdError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EnvdError::new(Code::Internal, format!("worker failed: {e}")))?
}

/// `/volume/{path|dir|file}`: one volume content operation.
pub async fn handle(agent: Arc<Agent>, req: Request<Incoming>, op: &str) -> Response<AgentBody> {
    let query = files::parse_query(req.uri().query());
    let method = req.method().clone();
    let answer = async {
        let raw = query
            .iter()
            .find(|(k, _)| k == "path")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| bad("missing ?path="))?;
        let (full, shown) = lexical(&raw)?;
        let meta = Meta {
            uid: query_u32(&query, "uid")?,
            gid: query_u32(&query, "gid")?,
            mode: query_u32(&query, "mode")?,
        };
        let follow = matches!(
            (&method, op),
            (&Method::GET, "file") | (&Method::PUT, "file")
        );
        {
            let full = full.clone();
            blocking(move || confine(&full, follow)).await?;
        }
        Ok::<_, EnvdError>(match (&method, op) {
            (&Method::GET, "path") => {
                let stat = blocking(move || stat_entry(&full, &shown)).await?;
                json(StatusCode::OK, &stat)
            }
            (&Method::GET, "dir") => {
                let depth = query_u32(&query, "depth")?.unwrap_or(1).clamp(1, MAX_DEPTH);
                let entries = blocking(move || list(&full, &shown, depth)).await?;
                json(StatusCode::OK, &entries)
            }
            (&Method::POST, "dir") => {
                let force = query_bool(&query, "force");
                let stat = blocking(move || make_dir(&full, &shown, force, meta)).await?;
                json(StatusCode::CREATED, &stat)
            }
            (&Method::PATCH, "path") => {
                let body = connect::read_body(req.into_body(), 64 << 10).await?;
                let asked: MetaBody = if body.is_empty() {
                    MetaBody::default()
                } else {
                    serde_json::from_slice(&body).map_err(|e| bad(format!("bad body: {e}")))?
                };
                let meta = Meta {
                    uid: asked.uid,
                    gid: asked.gid,
                    mode: asked.mode,
                };
                let stat = blocking(move || {
                    stat_entry(&full, &shown)?;
                    apply(&full, &shown, meta)?;
                    stat_entry(&full, &shown)
                })
                .await?;
                json(StatusCode::OK, &stat)
            }
            (&Method::DELETE, "path") => {
                blocking(move || remove(&full, &shown)).await?;
                let mut r = Response::new(AgentBody::empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            (&Method::GET, "file") => {
                let user = root_user(&agent)?;
                files::download(&user, full, req.headers()).await
            }
            (&Method::PUT, "file") => {
                if shown == "/" {
                    return Err(bad("the volume's root is a directory"));
                }
                let user = root_user(&agent)?;
                let created = {
                    let full = full.clone();
                    blocking(move || {
                        let mut created = full.parent().map(missing_dirs).unwrap_or_default();
                        if std::fs::symlink_metadata(&full).is_err() {
                            created.push(full);
                        }
                        Ok(created)
                    })
                    .await?
                };
                let (parts, mut body) = req.into_parts();
                let target = full.to_string_lossy().into_owned();
                let written = files::upload_inner(
                    &user,
                    Some(target),
                    &parts.headers,
                    &mut body,
                    agent.cfg.max_upload_bytes,
                    true,
                )
                .await;
                files::drain_upload(&mut body).await;
                written?;
                let stat = blocking(move || {
                    own(&created, meta);
                    apply(&full, &shown, meta)?;
                    stat_entry(&full, &shown)
                })
                .await?;
                json(StatusCode::CREATED, &stat)
            }
            _ => {
                return Err(EnvdError::from_rest_status(
                    405,
                    format!("{method} /volume/{op} is not a volume operation"),
                ))
            }
        })
    }
    .await;
    answer.unwrap_or_else(|e| e.rest_response())
}

fn root_user(agent: &Agent) -> Result<User, EnvdError> {
    agent
        .acting_user(Some("root".into()))
        .map_err(|e| EnvdError::new(Code::Internal, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_volume() {
        let (full, shown) = lexical("../../etc/passwd").expect("valid");
        assert_eq!(full, Path::new(VOLUME_ROOT).join("etc/passwd"));
        assert_eq!(shown, "/etc/passwd");
        let (full, shown) = lexical("/").expect("valid");
        assert_eq!(full, Path::new(VOLUME_ROOT));
        assert_eq!(shown, "/");
        let (_, shown) = lexical("a/./b/../c").expect("valid");
        assert_eq!(shown, "/a/c");
        assert!(lexical("a\0b").is_err());
    }
}
