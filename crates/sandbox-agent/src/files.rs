//! filesystem.Filesystem (Stat, ListDir, MakeDir, Move, Remove) and the REST `/files`
//! endpoints. Every filesystem access runs on a blocking thread whose filesystem
//! identity is the acting user's, so permissions are the user's and new files are theirs.

use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{HeaderMap, Response, StatusCode};
use tokio::sync::mpsc;

use crate::connect::{AgentBody, RestResponse};
use crate::metadata::Metadata as UserMetadata;
use crate::sys::FsIdentity;
use crate::users::{Names, User, UserDb};
use envd_proto::messages::{EntryInfo, FileType, WriteInfo};
use envd_proto::{Code, EnvdError, Reason, MAX_UNARY_ANSWER};

/// Most entries ListDir returns (bounded memory).
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Read/write chunk of /files.
const IO_CHUNK: usize = 64 << 10;

/// Runs `f` on a blocking thread with the user's filesystem identity.
pub async fn run_as<T, F>(user: &User, f: F) -> Result<T, EnvdError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, EnvdError> + Send + 'static,
{
    let (uid, gid, switch) = (user.uid, user.gid, user.switch);
    tokio::task::spawn_blocking(move || {
        let _id = switch.then(|| FsIdentity::enter(uid, gid));
        f()
    })
    .await
    .map_err(|e| EnvdError::new(Code::Internal, format!("worker failed: {e}")))?
}

/// Resolves a client path: `~` and relative paths against the user's home, then `.`/`..`
/// removed lexically. NUL bytes are refused.
pub fn resolve(user: &User, raw: &str) -> Result<PathBuf, EnvdError> {
    if raw.contains('\0') {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            "path contains a NUL byte",
        ));
    }
    if raw.is_empty() {
        return Err(EnvdError::new(Code::InvalidArgument, "path is empty"));
    }
    let joined = if raw == "~" {
        user.home.clone()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        user.home.join(rest)
    } else if raw.starts_with('/') {
        PathBuf::from(raw)
    } else {
        user.home.join(raw)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// RFC 3339 UTC with nanoseconds when present (proto3 JSON Timestamp).
pub fn rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (-(e.duration().as_secs() as i64), 0),
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if nanos == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{nanos:09}Z")
    }
}

/// `ls -l` permission string.
pub fn permissions_string(md: &Metadata) -> String {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else {
        '-'
    };
    let m = md.mode();
    let mut s = String::with_capacity(10);
    s.push(kind);
    let bit = |b: u32, c: char| if m & b != 0 { c } else { '-' };
    let exec = |x: u32, special: u32, on: char, off: char| match (m & x != 0, m & special != 0) {
        (true, true) => on,
        (false, true) => off,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(exec(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(exec(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(exec(0o001, 0o1000, 't', 'T'));
    s
}

/// EntryInfo of `path` (not following a final symlink).
pub fn entry_info(path: &Path, names: &Names) -> io::Result<EntryInfo> {
    let md = std::fs::symlink_metadata(path)?;
    Ok(entry_from_metadata(path, &md, names))
}

/// The EntryInfo type of what `md` describes (after following any symlink).
fn type_of(md: &Metadata) -> FileType {
    if md.is_dir() {
        FileType::Directory
    } else {
        FileType::File
    }
}

/// EntryInfo from the link-level metadata `md` of `path`. A symlink is described as
/// envd does: `type` is its target's (unspecified when broken or neither file nor
/// directory), `symlinkTarget` the fully resolved absolute target (unset when broken),
/// `isSymlink` true; size, mode and permissions stay the link's own.
fn entry_from_metadata(path: &Path, md: &Metadata, names: &Names) -> EntryInfo {
    let is_symlink = md.file_type().is_symlink();
    let (file_type, symlink_target) = if is_symlink {
        match std::fs::canonicalize(path) {
            Ok(target) => {
                let kind = match std::fs::metadata(&target) {
                    Ok(t) if t.is_dir() || t.is_file() => type_of(&t),
                    _ => FileType::Unspecified,
                };
                (kind, Some(target.to_string_lossy().into_owned()))
            }
            Err(_) => (FileType::Unspecified, None),
        }
    } else {
        (type_of(md), None)
    };
    EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        file_type,
        path: path.to_string_lossy().into_owned(),
        size: i64::try_from(md.len()).unwrap_or(i64::MAX),
        mode: md.mode() & 0o7777,
        permissions: permissions_string(md),
        owner: names.user(md.uid()),
        group: names.group(md.gid()),
        modified_time: rfc3339(md.modified().unwrap_or(UNIX_EPOCH)),
        symlink_target,
        metadata: crate::metadata::read(path),
        is_symlink,
    }
}

fn not_found_or(e: &io::Error, path: &Path) -> EnvdError {
    if e.kind() == io::ErrorKind::NotFound {
        EnvdError::new(Code::NotFound, format!("{} not found", path.display()))
    } else {
        EnvdError::from_io(e, &path.display().to_string())
    }
}

/// Stat.
pub fn stat(path: &Path, names: &Names) -> Result<EntryInfo, EnvdError> {
    entry_info(path, names).map_err(|e| not_found_or(&e, path))
}

fn listing_too_large(path: &Path, depth: u32, what: String) -> EnvdError {
    EnvdError::new(
        Code::ResourceExhausted,
        format!(
            "the listing of {} at depth {depth} {what}; list with a smaller depth or a deeper path",
            path.display()
        ),
    )
    .with_reason(Reason::TooLarge)
}

/// ListDir: entries below `path` down to `depth` levels (0 counts as 1), not following
/// symlinks into other directories, as the serialized answer (`{"entries":[...]}`), in
/// lexical depth-first order (`a`, `a/a1`, `b`, `b/b1`), as envd walks.
/// A listing that would not fit the largest answer a client reads
/// ([`MAX_UNARY_ANSWER`]) or has more than [`MAX_LIST_ENTRIES`] entries is refused with
/// `resource_exhausted` before it is built further.
pub fn list_dir(path: &Path, depth: u32, names: &Names) -> Result<Vec<u8>, EnvdError> {
    let md = std::fs::metadata(path).map_err(|e| not_found_or(&e, path))?;
    if !md.is_dir() {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            format!("{} is not a directory", path.display()),
        ));
    }
    let depth = depth.max(1);
    const TAIL: &[u8] = b"]}";
    let mut out = br#"{"entries":["#.to_vec();
    let mut count = 0usize;
    // Sorted children still to list, per open directory; `pending` counts them all, so
    // the paths held stay within the entry cap however the tree is shaped.
    let mut pending = 0usize;
    let read_sorted = |dir: &Path, count: usize, pending: &mut usize| {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if dir == path => {
                return Err(EnvdError::from_io(&e, &dir.display().to_string()))
            }
            Err(_) => return Ok(Vec::new().into_iter()),
        };
        let mut children: Vec<PathBuf> = Vec::new();
        for e in rd.flatten() {
            if count + *pending + children.len() >= MAX_LIST_ENTRIES {
                return Err(listing_too_large(
                    path,
                    depth,
                    format!("has more than {MAX_LIST_ENTRIES} entries"),
                ));
            }
            children.push(e.path());
        }
        children.sort();
        *pending += children.len();
        Ok(children.into_iter())
    };
    let mut stack = vec![(read_sorted(path, count, &mut pending)?, 1u32)];
    while let Some((children, level)) = stack.last_mut() {
        let level = *level;
        let Some(child) = children.next() else {
            stack.pop();
            continue;
        };
        pending -= 1;
        let Ok(md) = std::fs::symlink_metadata(&child) else {
            continue;
        };
        let entry = serde_json::to_vec(&entry_from_metadata(&child, &md, names))
            .map_err(|e| EnvdError::new(Code::Internal, e.to_string()))?;
        if out.len() + 1 + entry.len() + TAIL.len() > MAX_UNARY_ANSWER {
            return Err(listing_too_large(
                path,
                depth,
                format!(
                    "is larger than the largest answer ({} MiB) after {count} entries",
                    MAX_UNARY_ANSWER >> 20
                ),
            ));
        }
        if count > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&entry);
        count += 1;
        // A directory's entries follow it, before its next sibling.
        if md.is_dir() && level < depth {
            let grandchildren = read_sorted(&child, count, &mut pending)?;
            stack.push((grandchildren, level + 1));
        }
    }
    out.extend_from_slice(TAIL);
    Ok(out)
}

/// MakeDir with parents.
pub fn make_dir(path: &Path, names: &Names) -> Result<EntryInfo, EnvdError> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => {
            return Err(EnvdError::new(
                Code::AlreadyExists,
                format!("directory {} already exists", path.display()),
            ))
        }
        Ok(_) => {
            return Err(EnvdError::new(
                Code::InvalidArgument,
                format!("{} exists and is not a directory", path.display()),
            ))
        }
        Err(_) => {}
    }
    std::fs::create_dir_all(path)
        .map_err(|e| EnvdError::from_io(&e, &path.display().to_string()))?;
    stat(path, names)
}

/// Move (rename), creating the destination's parent directories.
pub fn rename(src: &Path, dst: &Path, names: &Names) -> Result<EntryInfo, EnvdError> {
    std::fs::symlink_metadata(src).map_err(|e| not_found_or(&e, src))?;
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| EnvdError::from_io(&e, &parent.display().to_string()))?;
    }
    std::fs::rename(src, dst)
        .map_err(|e| EnvdError::from_io(&e, &format!("moving {}", src.display())))?;
    stat(dst, names)
}

/// Remove, recursively; a missing path is fine.
pub fn remove(path: &Path) -> Result<(), EnvdError> {
    if path == Path::new("/") {
        return Err(EnvdError::new(
            Code::InvalidArgument,
            "refusing to remove /",
        ));
    }
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(EnvdError::from_io(&e, &path.display().to_string())),
    };
    let r = if md.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(EnvdError::from_io(&e, &path.display().to_string()))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------- REST /files

/// Query parameters, percent-decoded (`+` is a space; malformed escapes stay as written).
pub fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Which response encoding the client accepts: Ok(true) for gzip, Err when only
/// unsupported encodings are acceptable (406).
pub fn wants_gzip(headers: &HeaderMap) -> Result<bool, EnvdError> {
    let Some(v) = headers.get(hyper::header::ACCEPT_ENCODING) else {
        return Ok(false);
    };
    let v = v.to_str().unwrap_or_default();
    let mut identity_ok = v.trim().is_empty();
    let mut gzip = false;
    for part in v.split(',') {
        let mut it = part.split(';');
        let name = it.next().unwrap_or_default().trim().to_ascii_lowercase();
        let refused = it.any(|p| {
            let p = p.trim().replace(' ', "");
            p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
        });
        if refused {
            continue;
        }
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = true,
            "identity" | "*" | "" => identity_ok = true,
            _ => {}
        }
    }
    if gzip {
        Ok(true)
    } else if identity_ok {
        Ok(false)
    } else {
        Err(EnvdError::from_rest_status(
            406,
            format!("unsupported Accept-Encoding {v:?}"),
        ))
    }
}

/// Opens a regular file for reading (FIFOs and devices are refused: reading them
/// could block forever or never end).
fn open_regular(path: &Path) -> Result<File, EnvdError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(|e| EnvdError::from_io(&e, &path.display().to_string()))?;
    let md = f
        .metadata()
        .map_err(|e| EnvdError::from_io(&e, &path.display().to_string()))?;
    if md.is_dir() {
        return Err(EnvdError::from_rest_status(
            400,
            format!("{} is a directory", path.display()),
        ));
    }
    if !md.is_file() {
        return Err(EnvdError::from_rest_status(
            400,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// GET /files: streams the file (gzip when asked), never holding it in memory.
pub async fn download(user: &User, path: PathBuf, headers: &HeaderMap) -> Response<AgentBody> {
    let gzip = match wants_gzip(headers) {
        Ok(g) => g,
        Err(e) => return e.rest_response(),
    };
    let p = path.clone();
    let opened = run_as(user, move || Ok(open_regular(&p))).await;
    let mut file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return e.rest_response(),
        Err(e) => return e.rest_response(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; IO_CHUNK];
        let mut enc =
            gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // truncated body: the client sees an incomplete transfer
            };
            let chunk = match &mut enc {
                None => Bytes::copy_from_slice(&buf[..n]),
                Some(enc) => {
                    if enc.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    if enc.get_ref().len() < IO_CHUNK {
                        continue;
                    }
                    Bytes::from(std::mem::take(enc.get_mut()))
                }
            };
            if tx.blocking_send(chunk).is_err() {
                return; // client went away
            }
        }
        if let Some(enc) = enc {
            if let Ok(rest) = enc.finish() {
                let _ = tx.blocking_send(Bytes::from(rest));
            }
        }
    });
    let mut r = Response::new(AgentBody::Chan(rx));
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    if gzip {
        h.insert(
            hyper::header::CONTENT_ENCODING,
            hyper::header::HeaderValue::from_static("gzip"),
        );
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\', '\r', '\n'], "_"))
        .unwrap_or_default();
    if let Ok(v) = format!("attachment; filename=\"{name}\"").parse() {
        h.insert(hyper::header::CONTENT_DISPOSITION, v);
    }
    r
}

/// Counts bytes written and refuses past the cap.
struct Capped<W> {
    inner: W,
    written: u64,
    cap: Option<u64>,
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(cap) = self.cap {
            if self.written + buf.len() as u64 > cap {
                return Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::FBIG.raw_os_error(),
                ));
            }
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What the writer thread of an upload receives.
enum Feed {
    /// More body bytes.
    Data(Bytes),
    /// The body is complete: put the file in place.
    Commit,
}

/// One file being written by a blocking thread fed through a small channel. Without an
/// explicit commit (the client went away, the body was bad) nothing replaces the target.
struct Upload {
    tx: mpsc::Sender<Feed>,
    done: tokio::task::JoinHandle<Result<WriteInfo, EnvdError>>,
}

/// Symlinks followed when resolving an upload's target (the kernel's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// The file an upload to `path` writes: a symlink is followed (inside the sandbox, where
/// the agent runs) to the file it names, even one that does not exist yet.
fn upload_target(path: &Path) -> Result<PathBuf, EnvdError> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.file_type().is_symlink() => {
                let t = std::fs::read_link(&p)
                    .map_err(|e| EnvdError::from_io(&e, &p.display().to_string()))?;
                p = match p.parent() {
                    Some(dir) if t.is_relative() => dir.join(t),
                    _ => t,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(EnvdError::from_io(
        &io::Error::from(rustix::io::Errno::LOOP),
        &path.display().to_string(),
    ))
}

/// A fresh temporary name next to `target` (same directory, so the rename is atomic).
fn temp_name(target: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = target
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Keep the name within NAME_MAX whatever the target's length.
    let short: String = base.chars().take(64).collect();
    let name = format!(".{short}.colima-e2b-upload-{}-{n}", std::process::id());
    target.with_file_name(name)
}

/// Creates the missing directories of `dir`, component by component, with this thread's
/// identity (the agent's: root) and hands each one it created, and only those, to
/// `owner` (uid, gid). envd does the same, so a user may write `/0/x` though only root
/// may create `/0`.
fn create_parents(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::metadata(dir).is_ok_and(|md| md.is_dir()) {
        return Ok(());
    }
    let mut at = PathBuf::new();
    for c in dir.components() {
        at.push(c);
        match std::fs::metadata(&at) {
            Ok(md) if md.is_dir() => continue,
            Ok(_) => return Err(rustix::io::Errno::NOTDIR.into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&at) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    // Through a descriptor of the new directory itself: a symlink put in
                    // its place meanwhile is not followed to something else.
                    use rustix::fs::{Gid, OFlags, Uid};
                    let fd = rustix::fs::open(
                        &at,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    )?;
                    rustix::fs::fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
                }
            }
            // Someone else made it meanwhile: theirs, not ours to hand over.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && at.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The temporary file an upload writes into: created by the acting user (this thread's
/// fs identity), exclusively, readable by nobody else while partial. Returns it with
/// the mode the finished file gets (the old file's, else 0644). The target's directory
/// exists already ([`create_parents`]).
fn begin_write(target: &Path) -> Result<(PathBuf, File, u32), EnvdError> {
    let shown = || target.display().to_string();
    let mode = match std::fs::symlink_metadata(target) {
        Ok(md) if md.is_dir() => {
            return Err(EnvdError::from_rest_status(
                400,
                format!("{} is a directory", shown()),
            ))
        }
        Ok(md) if !md.is_file() => {
            return Err(EnvdError::from_rest_status(
                400,
                format!("{} is not a regular file", shown()),
            ))
        }
        // The new file takes the old one's permission bits, never set-id bits.
        Ok(md) => md.mode() & 0o777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0o644,
        Err(e) => return Err(EnvdError::from_io(&e, &shown())),
    };
    let temp = temp_name(target);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(&temp)
        .map_err(|e| EnvdError::from_io(&e, &shown()))?;
    Ok((temp, f, mode))
}

/// Puts the finished temporary file in place of `target`, with `md` as its whole
/// metadata (set on the temporary file, so the rename carries it over).
fn commit(temp: &Path, target: &Path, file: &File, mode: u32, md: &UserMetadata) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    crate::metadata::replace(file, md)?;
    match std::fs::rename(temp, target) {
        Ok(()) => Ok(()),
        // A bind-mounted file (/etc/hosts in a container) cannot be replaced, only
        // rewritten: copy into it, no longer atomically.
        Err(e) if matches!(e.raw_os_error(), Some(n) if n == rustix::io::Errno::BUSY.raw_os_error() || n == rustix::io::Errno::XDEV.raw_os_error()) =>
        {
            let mut src = File::open(temp)?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .custom_flags(
                    (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32,
                )
                .open(target)?;
            io::copy(&mut src, &mut dst)?;
            // The target keeps its inode, so its old metadata is replaced here.
            crate::metadata::replace(&dst, md)?;
            std::fs::remove_file(temp)
        }
        Err(e) => Err(e),
    }
}

fn begin_upload(
    user: &User,
    path: PathBuf,
    gzip: bool,
    cap: Option<u64>,
    md: Arc<UserMetadata>,
) -> Upload {
    let (tx, mut rx) = mpsc::channel::<Feed>(4);
    let (uid, gid, switch) = (user.uid, user.gid, user.switch);
    let done = tokio::task::spawn_blocking(move || {
        let target = {
            let _id = switch.then(|| FsIdentity::enter(uid, gid));
            upload_target(&path)?
        };
        // Missing directories are made by the agent and handed to the user (envd's
        // rule); everything else is done as the user.
        if let Some(parent) = target.parent() {
            create_parents(parent, switch.then_some((uid, gid)))
                .map_err(|e| EnvdError::from_io(&e, &parent.display().to_string()))?;
        }
        let _id = switch.then(|| FsIdentity::enter(uid, gid));
        let (temp, file, mode) = begin_write(&target)?;
        let sink = Capped {
            inner: &file,
            written: 0,
            cap,
        };
        let mut committed = false;
        let result = (|| -> io::Result<()> {
            let mut feed = |w: &mut dyn Write| -> io::Result<()> {
                while let Some(f) = rx.blocking_recv() {
                    match f {
                        Feed::Data(b) => w.write_all(&b)?,
                        Feed::Commit => {
                            committed = true;
                            return Ok(());
                        }
                    }
                }
                Ok(())
            };
            if gzip {
                let mut dec = flate2::write::MultiGzDecoder::new(sink);
                feed(&mut dec)?;
                dec.try_finish()?;
                dec.get_mut().flush()
            } else {
                let mut sink = sink;
                feed(&mut sink)?;
                sink.flush()
            }
        })();
        let result = result.and_then(|()| {
            if committed {
                commit(&temp, &target, &file, mode, &md)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upload ended before its body did",
                ))
            }
        });
        if let Err(e) = result {
            // The old file stays as it was; the partial one goes (it may be what filled
            // the disk).
            let _ = std::fs::remove_file(&temp);
            return Err(
                if e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) && cap.is_some()
                {
                    EnvdError::from_rest_status(
                        413,
                        format!("upload larger than {} bytes", cap.unwrap_or(0)),
                    )
                } else if e.kind() == io::ErrorKind::InvalidInput
                    || e.kind() == io::ErrorKind::InvalidData
                {
                    EnvdError::from_rest_status(400, format!("invalid gzip body: {e}"))
                } else if e.kind() == io::ErrorKind::UnexpectedEof && e.raw_os_error().is_none() {
                    EnvdError::from_rest_status(400, e.to_string())
                } else {
                    EnvdError::from_io(&e, &path.display().to_string())
                },
            );
        }
        Ok(WriteInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_string_lossy().into_owned(),
            file_type: "file".into(),
            // What the file really holds now (nothing where attributes are unsupported).
            metadata: crate::metadata::read(&target),
        })
    });
    Upload { tx, done }
}

impl Upload {
    /// Feeds a chunk; false when the writer already stopped (its error comes from finish).
    async fn feed(&self, b: Bytes) -> bool {
        self.tx.send(Feed::Data(b)).await.is_ok()
    }

    /// The body is complete: the file replaces its target, or the writer's error.
    async fn finish(self) -> Result<WriteInfo, EnvdError> {
        let _ = self.tx.send(Feed::Commit).await;
        self.result().await
    }

    /// The body failed: nothing is replaced, the temporary file goes.
    async fn abort(self) {
        let _ = self.result().await;
    }

    async fn result(self) -> Result<WriteInfo, EnvdError> {
        drop(self.tx);
        self.done
            .await
            .map_err(|e| EnvdError::from_rest_status(500, format!("writer failed: {e}")))?
    }
}

/// POST /files: multipart (each part's filename is its destination, the first may be
/// named by `?path=`) or a raw body with `?path=` (optionally gzip-encoded).
/// `only_query_path` (a signed URL): the upload may write `?path=` alone, so a second
/// multipart part is refused with 401.
pub async fn upload(
    user: &User,
    query_path: Option<String>,
    headers: &HeaderMap,
    mut body: Incoming,
    cap: Option<u64>,
    only_query_path: bool,
) -> Response<AgentBody> {
    let answer = upload_inner(user, query_path, headers, &mut body, cap, only_query_path).await;
    // An answer decided before the body ended (a bad request, a writer that failed)
    // reaches a client still sending only if the rest is read: else it sees EPIPE.
    drain_upload(&mut body).await;
    match answer {
        Ok(infos) => crate::connect::json_response(
            StatusCode::OK,
            serde_json::to_vec(&infos).unwrap_or_default(),
        ),
        Err(e) => e.rest_response(),
    }
}

pub(crate) async fn upload_inner(
    user: &User,
    query_path: Option<String>,
    headers: &HeaderMap,
    body: &mut Incoming,
    cap: Option<u64>,
    only_query_path: bool,
) -> Result<Vec<WriteInfo>, EnvdError> {
    let ctype = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let encoding = headers
        .get(hyper::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let gzip = match encoding.as_str() {
        "" | "identity" => false,
        "gzip" | "x-gzip" => true,
        other => {
            return Err(EnvdError::from_rest_status(
                415,
                format!("unsupported Content-Encoding {other:?}"),
            ))
        }
    };
    // One set for every file of the upload, as envd applies it.
    let md = Arc::new(crate::metadata::from_headers(headers)?);
    let resolve_path = |raw: &str| resolve(user, raw);

    if ctype
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        let boundary = multer::parse_boundary(&ctype).map_err(|e| {
            EnvdError::from_rest_status(400, format!("bad multipart Content-Type: {e}"))
        })?;
        let stream = http_body_util::BodyDataStream::new(body);
        let mut mp = multer::Multipart::new(stream, boundary);
        let mut out = Vec::new();
        let mut first_query = query_path;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(EnvdError::from_rest_status(
                        400,
                        format!("bad multipart body: {e}"),
                    ))
                }
            };
            if only_query_path && !out.is_empty() {
                return Err(EnvdError::from_rest_status(
                    401,
                    "a signed upload URL writes only its own path (one file)",
                ));
            }
            let target = match (first_query.take(), field.file_name()) {
                (Some(q), _) if !q.is_empty() => q,
                (_, Some(f)) if !f.is_empty() => f.to_string(),
                _ => {
                    return Err(EnvdError::from_rest_status(
                        400,
                        "multipart part without a file name or ?path=",
                    ))
                }
            };
            let path = resolve_path(&target)?;
            let up = begin_upload(user, path, gzip, cap, md.clone());
            let mut field = field;
            loop {
                match field.chunk().await {
                    Ok(Some(b)) => {
                        if !up.feed(b).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        up.abort().await;
                        return Err(EnvdError::from_rest_status(
                            400,
                            format!("bad multipart body: {e}"),
                        ));
                    }
                }
            }
            out.push(up.finish().await?);
        }
        if out.is_empty() {
            return Err(EnvdError::from_rest_status(
                400,
                "no file in multipart body",
            ));
        }
        Ok(out)
    } else {
        let Some(raw) = query_path.filter(|p| !p.is_empty()) else {
            return Err(EnvdError::from_rest_status(
                400,
                "missing ?path= for a raw upload",
            ));
        };
        let path = resolve_path(&raw)?;
        let up = begin_upload(user, path, gzip, cap, md);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        if !up.feed(data).await {
                            // The writer failed (a full disk, the cap): its error is the
                            // answer (the caller reads the rest of the body first).
                            return up.finish().await.map(|info| vec![info]);
                        }
                    }
                }
                Err(e) => {
                    up.abort().await;
                    return Err(EnvdError::from_rest_status(
                        400,
                        format!("reading upload: {e}"),
                    ));
                }
            }
        }
        Ok(vec![up.finish().await?])
    }
}

/// Most of an upload's body read (and discarded) after its answer is decided.
pub const UPLOAD_DRAIN_BYTES: usize = 256 << 20;
/// Longest time spent reading an upload's body after its answer is decided.
pub const UPLOAD_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads and discards what is left of an upload, up to [`UPLOAD_DRAIN_BYTES`] or
/// [`UPLOAD_DRAIN_TIME`], so a client still sending reads the answer instead of a
/// reset. Returns at once when the body is already complete.
pub async fn drain_upload(body: &mut Incoming) {
    crate::server::drain_up_to(body, UPLOAD_DRAIN_BYTES, UPLOAD_DRAIN_TIME).await;
}

/// Names for EntryInfo, read on a blocking thread.
pub async fn names(db: &UserDb) -> Names {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.names())
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(home: &str) -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![],
            home: home.into(),
            shell: "/bin/sh".into(),
            switch: false,
        }
    }

    #[test]
    fn relative_paths_resolve_against_home_and_dotdot_is_lexical() {
        let u = user("/home/user");
        assert_eq!(
            resolve(&u, "a/b").ok(),
            Some(PathBuf::from("/home/user/a/b"))
        );
        assert_eq!(resolve(&u, "~/x").ok(), Some(PathBuf::from("/home/user/x")));
        assert_eq!(
            resolve(&u, "../../../etc/./passwd").ok(),
            Some(PathBuf::from("/etc/passwd"))
        );
        assert_eq!(resolve(&u, "/a/../../b").ok(), Some(PathBuf::from("/b")));
        assert!(resolve(&u, "a\0b").is_err());
        assert!(resolve(&u, "").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::new(1_709_251_199, 5);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000005Z");
    }

    #[test]
    fn query_is_percent_decoded() {
        let q = parse_query(Some("path=%2Ftmp%2Fa+b&username=user"));
        assert_eq!(q[0], ("path".into(), "/tmp/a b".into()));
        assert_eq!(q[1], ("username".into(), "user".into()));
        assert_eq!(
            parse_query(Some("path=%zz")),
            vec![("path".into(), "%zz".into())]
        );
    }

    #[test]
    fn accept_encoding_negotiation() {
        let mut h = HeaderMap::new();
        assert!(matches!(wants_gzip(&h), Ok(false)));
        h.insert("accept-encoding", "gzip, deflate".parse().expect("hv"));
        assert!(matches!(wants_gzip(&h), Ok(true)));
        h.insert("accept-encoding", "br".parse().expect("hv"));
        assert!(wants_gzip(&h).is_err());
        h.insert("accept-encoding", "br, identity".parse().expect("hv"));
        assert!(matches!(wants_gzip(&h), Ok(false)));
    }
}
