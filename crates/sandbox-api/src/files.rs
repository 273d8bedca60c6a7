//! The seed's file API: `/sandboxes/{id}/files/...`, plus streamed raw variants.

use base64::Engine as _;
use envd_proto::messages::{EntryInfo, FileType};
use futures_util::StreamExt;
use poem::web::Data;
use poem::Body;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{Enum, Object, OpenApi, Tags};
use sandbox_core::Error;

use crate::error::{parse_id, ApiError};
use crate::AppState;

/// Largest file `files/read` returns inside JSON; use `files/raw` for larger ones.
pub const MAX_JSON_READ: u64 = 10 << 20;

#[derive(Tags)]
enum FileTags {
    /// Read, write, list and remove files inside a sandbox.
    Files,
}

/// How `data` is encoded in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Encoding {
    /// Text; files that are not valid UTF-8 read back with U+FFFD replacements.
    #[default]
    #[oai(rename = "utf-8")]
    Utf8,
    /// Any bytes, base64-encoded.
    Base64,
}

/// The path of the examples: the seed README's script.
const EXAMPLE_PATH: &str = "/home/user/script.py";
/// The contents of the examples' file.
const EXAMPLE_DATA: &str = "print(\"Hello, World!\")";

/// A file to write.
#[derive(Debug, Object)]
#[oai(example)]
pub struct WriteFileRequest {
    /// Path inside the sandbox; relative paths resolve against `/home/user`. Parent
    /// directories are created.
    #[oai(validator(min_length = 1, max_length = 4096))]
    pub path: String,
    /// The contents.
    pub data: String,
    /// How `data` is encoded (default `utf-8`).
    #[oai(default)]
    pub encoding: Encoding,
}

impl poem_openapi::types::Example for WriteFileRequest {
    fn example() -> Self {
        Self {
            path: EXAMPLE_PATH.into(),
            data: EXAMPLE_DATA.into(),
            encoding: Encoding::Utf8,
        }
    }
}

/// A file written.
#[derive(Debug, Object)]
#[oai(example)]
pub struct WrittenFile {
    /// Absolute path written.
    pub path: String,
    /// Bytes written.
    pub size: u64,
}

impl poem_openapi::types::Example for WrittenFile {
    fn example() -> Self {
        Self {
            path: EXAMPLE_PATH.into(),
            size: EXAMPLE_DATA.len() as u64,
        }
    }
}

/// A file's contents.
#[derive(Debug, Object)]
#[oai(example)]
pub struct FileContent {
    /// Absolute path.
    pub path: String,
    /// The contents, encoded as `encoding` says.
    pub data: String,
    /// `utf-8` or `base64`.
    pub encoding: Encoding,
    /// Size in bytes.
    pub size: u64,
}

impl poem_openapi::types::Example for FileContent {
    fn example() -> Self {
        Self {
            path: EXAMPLE_PATH.into(),
            data: EXAMPLE_DATA.into(),
            encoding: Encoding::Utf8,
            size: EXAMPLE_DATA.len() as u64,
        }
    }
}

/// One directory entry.
#[derive(Debug, Object)]
#[oai(example)]
pub struct FileEntry {
    /// Base name.
    pub name: String,
    /// Absolute path.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    #[oai(rename = "type")]
    pub kind: String,
    /// Size in bytes.
    pub size: i64,
    /// `ls -l` style permissions, e.g. `-rw-r--r--`.
    pub permissions: String,
    /// Owner user name.
    pub owner: String,
    /// Group name.
    pub group: String,
    /// Modification time, RFC 3339.
    pub modified_time: String,
    /// Target of a symlink.
    #[oai(nullable)]
    pub symlink_target: Option<String>,
}

impl poem_openapi::types::Example for FileEntry {
    fn example() -> Self {
        Self {
            name: "script.py".into(),
            path: EXAMPLE_PATH.into(),
            kind: "file".into(),
            size: EXAMPLE_DATA.len() as i64,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: "2024-12-02T10:31:00Z".into(),
            symlink_target: None,
        }
    }
}

impl From<EntryInfo> for FileEntry {
    fn from(e: EntryInfo) -> Self {
        let kind = match e.file_type {
            FileType::Directory => "dir",
            FileType::Symlink => "symlink",
            _ if e.is_symlink => "symlink",
            _ => "file",
        };
        FileEntry {
            name: e.name,
            path: e.path,
            kind: kind.into(),
            size: e.size,
            permissions: e.permissions,
            owner: e.owner,
            group: e.group,
            modified_time: e.modified_time,
            symlink_target: e.symlink_target,
        }
    }
}

/// Whether a path exists.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Exists {
    /// The path asked about.
    pub path: String,
    /// True when it exists (file, directory or symlink).
    pub exists: bool,
}

impl poem_openapi::types::Example for Exists {
    fn example() -> Self {
        Self {
            path: EXAMPLE_PATH.into(),
            exists: true,
        }
    }
}

/// Confirmation of a removal.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Removed {
    /// The removed path.
    pub path: String,
    /// Always `removed`.
    pub status: String,
}

impl poem_openapi::types::Example for Removed {
    fn example() -> Self {
        Self {
            path: EXAMPLE_PATH.into(),
            status: "removed".into(),
        }
    }
}

fn check_path(path: &str) -> Result<(), ApiError> {
    if path.is_empty() || path.contains('\0') || path.len() > 4096 {
        return Err(Error::InvalidArgument("path must be 1-4096 bytes without NUL".into()).into());
    }
    Ok(())
}

/// The file endpoints.
pub struct FileApi;

#[OpenApi(tag = "FileTags::Files")]
impl FileApi {
    /// Write file
    ///
    /// Creates or replaces a file (parents included) as the sandbox user. `encoding`
    /// `base64` writes any bytes. The JSON body is limited to 1 MiB: larger files go
    /// through `PUT /sandboxes/{id}/files/raw`. 507 when the sandbox's disk is full.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/write",
        method = "post",
        operation_id = "write_file"
    )]
    async fn write(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        body: Json<WriteFileRequest>,
    ) -> Result<Json<WrittenFile>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        let WriteFileRequest {
            path,
            data,
            encoding,
        } = body.0;
        check_path(&path)?;
        let bytes = match encoding {
            Encoding::Utf8 => data.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map_err(|e| {
                    ApiError::from(Error::InvalidArgument(format!("data is not base64: {e}")))
                })?,
        };
        let size = bytes.len() as u64;
        let agent = state.manager.agent(&id).await?;
        let written = agent.write_file(&path, bytes).await?;
        let path = written.into_iter().next().map(|w| w.path).unwrap_or(path);
        Ok(Json(WrittenFile { path, size }))
    }

    /// Read file
    ///
    /// A file's contents in JSON (at most 10 MiB; 413 past it, use `files/raw`). 404 when
    /// it does not exist, 422 when it is a directory.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/read",
        method = "get",
        operation_id = "read_file"
    )]
    async fn read(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        #[oai(validator(min_length = 1, max_length = 4096))] path: Query<String>,
        #[oai(default)] encoding: Query<Encoding>,
    ) -> Result<Json<FileContent>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        check_path(&path.0)?;
        let agent = state.manager.agent(&id).await?;
        let entry = agent.stat(&path.0).await?;
        if entry.file_type == FileType::Directory {
            return Err(Error::InvalidArgument(format!("{} is a directory", entry.path)).into());
        }
        if entry.size as u64 > MAX_JSON_READ {
            return Err(ApiError::from_status(
                413,
                "payload_too_large",
                format!(
                    "{} is larger than {MAX_JSON_READ} bytes; use files/raw",
                    entry.path
                ),
            ));
        }
        let bytes = agent
            .read_file(&path.0)
            .await?
            .read_to_end(MAX_JSON_READ as usize)
            .await?;
        let size = bytes.len() as u64;
        let data = match encoding.0 {
            Encoding::Utf8 => String::from_utf8_lossy(&bytes).into_owned(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&bytes),
        };
        Ok(Json(FileContent {
            path: entry.path,
            data,
            encoding: encoding.0,
            size,
        }))
    }

    /// List directory
    ///
    /// Entries of a directory, `depth` levels deep (default 1). 404 when it does not exist.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/list",
        method = "get",
        operation_id = "list_files"
    )]
    async fn list(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        #[oai(validator(min_length = 1, max_length = 4096))] path: Query<String>,
        #[oai(validator(minimum(value = "1"), maximum(value = "32")))] depth: Query<Option<u32>>,
    ) -> Result<Json<Vec<FileEntry>>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        check_path(&path.0)?;
        let depth = depth.0.unwrap_or(1);
        if !(1..=32).contains(&depth) {
            return Err(Error::InvalidArgument("depth must be between 1 and 32".into()).into());
        }
        let agent = state.manager.agent(&id).await?;
        let entries = agent.list_dir(&path.0, depth).await?;
        Ok(Json(entries.into_iter().map(FileEntry::from).collect()))
    }

    /// Check file exists
    ///
    /// Whether a file, directory or symlink exists at `path`.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/exists",
        method = "get",
        operation_id = "file_exists"
    )]
    async fn exists(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        #[oai(validator(min_length = 1, max_length = 4096))] path: Query<String>,
    ) -> Result<Json<Exists>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        check_path(&path.0)?;
        let agent = state.manager.agent(&id).await?;
        let exists = match agent.stat(&path.0).await {
            Ok(_) => true,
            Err(Error::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Json(Exists {
            path: path.0,
            exists,
        }))
    }

    /// Remove file
    ///
    /// Removes a file, or a directory with everything in it. 404 when nothing is there.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/",
        method = "delete",
        operation_id = "remove_file"
    )]
    async fn remove(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        #[oai(validator(min_length = 1, max_length = 4096))] path: Query<String>,
    ) -> Result<Json<Removed>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        check_path(&path.0)?;
        let agent = state.manager.agent(&id).await?;
        agent.stat(&path.0).await?;
        agent.remove(&path.0).await?;
        Ok(Json(Removed {
            path: path.0,
            status: "removed".into(),
        }))
    }

    /// Download file (raw)
    ///
    /// Streams a file's bytes of any size as `application/octet-stream`.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/raw",
        method = "get",
        operation_id = "download_file"
    )]
    async fn download(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        #[oai(validator(min_length = 1, max_length = 4096))] path: Query<String>,
    ) -> Result<Binary<Body>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        check_path(&path.0)?;
        let agent = state.manager.agent(&id).await?;
        let file = agent.read_file(&path.0).await?;
        let stream = file
            .into_stream()
            .map(|c| c.map_err(|e| std::io::Error::other(e.to_string())));
        Ok(Binary(Body::from_bytes_stream(stream)))
    }

    /// Upload file (raw)
    ///
    /// Streams the request body into a file (created or replaced, parents included),
    /// never holding it in memory. Up to 1 GiB; 413 past it. 507 when the disk is full.
    #[oai(
        path = "/sandboxes/:sandbox_id/files/raw",
        method = "put",
        operation_id = "upload_file"
    )]
    async fn upload(
        &self,
        state: Data<&AppState>,
        sandbox_id: Path<String>,
        #[oai(validator(min_length = 1, max_length = 4096))] path: Query<String>,
        body: Binary<Body>,
    ) -> Result<Json<WrittenFile>, ApiError> {
        let id = parse_id(&sandbox_id.0)?;
        check_path(&path.0)?;
        let max = state.limits.max_upload;
        let agent = state.manager.agent(&id).await?;
        // The client's body goes to the agent through a channel, so that what the agent
        // did not take (it answered early: a full disk, a bad path) can still be drained
        // and the client reads the answer instead of a reset connection.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
        let to_agent = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let mut client = body.0.into_bytes_stream();
        let mut size = 0u64;
        let feed = async {
            // Owned here, so the agent's body ends when the client's does.
            let tx = tx;
            while let Some(chunk) = client.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                size += chunk.len() as u64;
                if size > max {
                    // Past the cap the stream fails, which ends the upload (the agent
                    // keeps the old file).
                    let _ = tx
                        .send(Err(std::io::Error::other("upload too large")))
                        .await;
                    return;
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the agent stopped reading: it has answered
                }
            }
        };
        let (result, ()) = tokio::join!(
            agent.write_file(&path.0, reqwest::Body::wrap_stream(to_agent)),
            feed
        );
        if result.is_err() || size > max {
            crate::drain(Body::from_bytes_stream(client)).await;
        }
        if size > max {
            return Err(ApiError::from_status(
                413,
                "payload_too_large",
                format!("upload is larger than {max} bytes; the file was left as it was"),
            ));
        }
        let written = result?;
        let path = written.into_iter().next().map(|w| w.path).unwrap_or(path.0);
        Ok(Json(WrittenFile { path, size }))
    }
}
