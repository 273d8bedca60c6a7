//! Build files: uploads kept by content hash (E2B's `filesHash`, so unchanged files are
//! not uploaded again), and the build context of a steps template assembled from them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::template::steps::{is_files_hash, CopySource};

/// Uploaded build files under one directory, one archive per hash.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::backend("templates", format!("{what}: {e}"))
}

impl FileStore {
    /// A store in `dir` (created when needed).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where the files of `hash` are kept.
    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{}.tar", hash.to_ascii_lowercase()))
    }

    /// Whether the files of `hash` were uploaded.
    pub fn has(&self, hash: &str) -> bool {
        is_files_hash(hash) && self.path(hash).is_file()
    }

    /// Keeps the archive `body` (plain or gzip tar) as the files of `hash`, refusing more
    /// than `max` bytes. Written beside and renamed, so a broken upload leaves nothing.
    pub async fn put<S>(&self, hash: &str, body: S, max: u64) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send,
    {
        if !is_files_hash(hash) {
            return Err(Error::InvalidArgument(format!(
                "{hash:?} is not a sha256 files hash"
            )));
        }
        write_capped(&self.dir, &self.path(hash), body, max, "build files").await
    }
}

/// Writes `body` to `path` (in `dir`, created when needed), refusing more than `max`
/// bytes: written beside and renamed, so a broken or refused upload leaves nothing.
pub async fn write_capped<S>(dir: &Path, path: &Path, body: S, max: u64, what: &str) -> Result<u64>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send,
{
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io_err("template files directory", e))?;
    let temp = dir.join(format!(".upload-{}", crate::types::SandboxId::generate()));
    let result = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .map_err(|e| io_err(what, e))?;
        let mut body = std::pin::pin!(body);
        let mut total = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| Error::InvalidArgument(format!("the upload broke off: {e}")))?;
            total += chunk.len() as u64;
            if total > max {
                return Err(Error::TooLarge(format!(
                    "{what} larger than {} MiB",
                    max >> 20
                )));
            }
            file.write_all(&chunk).await.map_err(|e| io_err(what, e))?;
        }
        file.flush().await.map_err(|e| io_err(what, e))?;
        Ok(total)
    }
    .await;
    match result {
        Ok(total) => {
            tokio::fs::rename(&temp, path)
                .await
                .map_err(|e| io_err(what, e))?;
            Ok(total)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            Err(e)
        }
    }
}

/// Opens a tar archive that may be gzip-compressed.
fn open_archive(path: &Path) -> std::io::Result<tar::Archive<Box<dyn Read>>> {
    let mut file = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    drop(file);
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(tar::Archive::new(reader))
}

/// Whether an archive path stays inside its directory.
fn normal(path: &Path) -> bool {
    path.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    })
}

/// Writes the build context of a steps template to `out`: the `Dockerfile`, and each
/// COPY step's uploaded files under its own directory (with its mode forced on regular
/// files). Refuses archive entries that would leave their directory. Blocking.
pub fn write_steps_context(
    out: &Path,
    dockerfile: &str,
    copies: &[CopySource],
    store: &FileStore,
) -> Result<()> {
    let file = std::fs::File::create(out).map_err(|e| io_err("build context", e))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let mut header = tar::Header::new_ustar();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .map_err(|e| io_err("build context", e))?;
    for copy in copies {
        let path = store.path(&copy.hash);
        if !path.is_file() {
            return Err(Error::InvalidArgument(format!(
                "the files of hash {} were never uploaded (GET the upload link and PUT them \
                 first)",
                copy.hash
            )));
        }
        let bad = |e: std::io::Error| {
            Error::InvalidArgument(format!(
                "the uploaded files of hash {} are not a readable tar archive: {e}",
                copy.hash
            ))
        };
        let mut archive = open_archive(&path).map_err(bad)?;
        // An empty directory entry, so a COPY of nothing still finds its source dir.
        let mut dir_header = tar::Header::new_ustar();
        dir_header.set_entry_type(tar::EntryType::Directory);
        dir_header.set_mode(0o755);
        dir_header.set_size(0);
        dir_header.set_mtime(0);
        builder
            .append_data(&mut dir_header, format!("{}/", copy.dir), std::io::empty())
            .map_err(|e| io_err("build context", e))?;
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let rel = entry.path().map_err(bad)?.into_owned();
            if !normal(&rel) {
                return Err(Error::InvalidArgument(format!(
                    "the uploaded files of hash {} hold the path {rel:?}, outside the context",
                    copy.hash
                )));
            }
            let mut header = entry.header().clone();
            let kind = header.entry_type();
            if let (Some(mode), true) = (copy.mode, kind.is_file()) {
                header.set_mode(mode);
            }
            let target = Path::new(&copy.dir).join(&rel);
            if kind.is_symlink() || kind.is_hard_link() {
                let link = entry.link_name().map_err(bad)?.map(|l| l.into_owned());
                let Some(link) = link else { continue };
                if kind.is_hard_link() {
                    // Hard links name archive paths: keep them inside this step's dir.
                    if !normal(&link) {
                        continue;
                    }
                    builder
                        .append_link(&mut header, &target, Path::new(&copy.dir).join(link))
                        .map_err(|e| io_err("build context", e))?;
                } else {
                    builder
                        .append_link(&mut header, &target, link)
                        .map_err(|e| io_err("build context", e))?;
                }
                continue;
            }
            builder
                .append_data(&mut header, &target, &mut entry)
                .map_err(|e| io_err("build context", e))?;
        }
    }
    let mut inner = builder
        .into_inner()
        .map_err(|e| io_err("build context", e))?;
    inner.flush().map_err(|e| io_err("build context", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("gz");
        e.finish().expect("gz")
    }

    #[tokio::test]
    async fn uploads_are_kept_by_hash_and_assembled_into_a_context() {
        let dir = std::env::temp_dir().join(format!("files-test-{}", crate::SandboxId::generate()));
        let store = FileStore::new(dir.clone());
        let hash = "ab".repeat(32);
        let body = gzip(&tar_of(&[("app/main.py", b"print(1)\n", 0o600)]));
        let n = store
            .put(
                &hash,
                futures_util::stream::iter([Ok(Bytes::from(body.clone()))]),
                1 << 20,
            )
            .await
            .expect("put");
        assert_eq!(n, body.len() as u64);
        assert!(store.has(&hash));
        assert!(!store.has(&"cd".repeat(32)));
        let too_big = store
            .put(
                &"cd".repeat(32),
                futures_util::stream::iter([Ok(Bytes::from(vec![0u8; 100]))]),
                10,
            )
            .await;
        assert!(matches!(too_big, Err(Error::TooLarge(_))));
        assert!(
            !store.has(&"cd".repeat(32)),
            "a refused upload leaves nothing"
        );

        let out = dir.join("ctx.tar");
        let copies = [CopySource {
            dir: "step-1".into(),
            hash: hash.clone(),
            mode: Some(0o755),
        }];
        write_steps_context(&out, "FROM x\n", &copies, &store).expect("context");
        let mut archive = tar::Archive::new(std::fs::File::open(&out).expect("open"));
        let entries: Vec<(String, u32)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let mode = e.header().mode().expect("mode");
                (e.path().expect("path").to_string_lossy().into_owned(), mode)
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("Dockerfile".to_string(), 0o644),
                ("step-1/".to_string(), 0o755),
                ("step-1/app/main.py".to_string(), 0o755),
            ]
        );
        let missing = [CopySource {
            dir: "step-1".into(),
            hash: "ef".repeat(32),
            mode: None,
        }];
        let e = write_steps_context(&out, "FROM x\n", &missing, &store).expect_err("missing");
        assert!(e.to_string().contains("never uploaded"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
