//! User metadata of files (envd 0.6.2): given on upload as `X-Metadata-<key>: <value>`
//! headers, kept as `user.e2b.<key>` extended attributes of the file, and shown in
//! every EntryInfo and upload answer. An upload replaces the whole set.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;

use hyper::HeaderMap;
use rustix::fs::XattrFlags;
use rustix::io::Errno;

use envd_proto::EnvdError;

/// A file's metadata, by key.
pub type Metadata = BTreeMap<String, String>;

/// Namespace of the extended attributes that hold metadata (envd's): `user.` is what an
/// unprivileged owner may write, `e2b.` keeps other tools' `user.*` attributes out.
pub const XATTR_PREFIX: &str = "user.e2b.";
/// Upload header prefix naming one metadata key (matched case-insensitively).
pub const HEADER_PREFIX: &str = "x-metadata-";
/// Longest key: the kernel limits a whole attribute name to 255 bytes.
pub const MAX_KEY_LEN: usize = 255 - XATTR_PREFIX.len();
/// Most bytes of one file's metadata (names with their prefix, plus values), as envd
/// counts them: ext4 keeps all of an inode's attributes within one 4 KiB block.
pub const MAX_TOTAL_LEN: usize = 4096;
/// Largest attribute list or value the kernel hands out (XATTR_LIST_MAX, XATTR_SIZE_MAX).
const MAX_XATTR_BYTES: usize = 64 << 10;

fn invalid(message: String) -> EnvdError {
    EnvdError::from_rest_status(400, message)
}

/// The metadata an upload carries in its `X-Metadata-*` headers: keys lowercased (the
/// first value of a repeated header wins, an empty key is ignored, as envd does).
/// A value that is not printable US-ASCII, a key that is too long or a set over
/// [`MAX_TOTAL_LEN`] is a 400.
pub fn from_headers(headers: &HeaderMap) -> Result<Metadata, EnvdError> {
    let mut out = Metadata::new();
    let mut total = 0usize;
    // Header names are HTTP tokens and already lowercase, so every key is one too.
    for name in headers.keys() {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        if key.len() > MAX_KEY_LEN {
            return Err(invalid(format!(
                "metadata key {key:?} exceeds {MAX_KEY_LEN} bytes"
            )));
        }
        let Some(value) = headers.get(name) else {
            continue;
        };
        let bytes = value.as_bytes();
        if let Some(i) = bytes.iter().position(|b| !(0x20..=0x7e).contains(b)) {
            return Err(invalid(format!(
                "metadata value for key {key:?} contains non-printable-ASCII byte 0x{:02x} at offset {i}",
                bytes[i]
            )));
        }
        total += XATTR_PREFIX.len() + key.len() + bytes.len();
        if total > MAX_TOTAL_LEN {
            return Err(invalid(format!(
                "total metadata size exceeds {MAX_TOTAL_LEN} bytes"
            )));
        }
        // Checked above: printable ASCII is UTF-8.
        let value = String::from_utf8_lossy(bytes).into_owned();
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// True for the error of a filesystem that keeps no (user) extended attributes.
fn unsupported(e: Errno) -> bool {
    e == Errno::NOTSUP || e == Errno::OPNOTSUPP
}

/// Runs a size query and a fetch of an attribute list or value until they agree (the
/// attributes may change in between), within the kernel's bound.
fn fetch(
    query: impl Fn() -> rustix::io::Result<usize>,
    get: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    for _ in 0..3 {
        let size = query()?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size.min(MAX_XATTR_BYTES)];
        match get(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::RANGE.into())
}

/// The metadata attribute names in a `listxattr` answer.
fn metadata_names(list: &[u8]) -> impl Iterator<Item = &str> {
    list.split(|b| *b == 0)
        .filter_map(|n| std::str::from_utf8(n).ok())
        .filter(|n| n.len() > XATTR_PREFIX.len() && n.starts_with(XATTR_PREFIX))
}

/// The metadata of `path` (of a symlink's target, as envd reads it). Empty when there is
/// none, the filesystem keeps no attributes, or they cannot be read; attributes set
/// inside the sandbox that are not UTF-8 are skipped.
pub fn read(path: &Path) -> Metadata {
    let mut out = Metadata::new();
    let Ok(list) = fetch(
        || rustix::fs::listxattr_query(path),
        |b| rustix::fs::listxattr(path, b),
    ) else {
        return out;
    };
    for name in metadata_names(&list) {
        let Ok(value) = fetch(
            || rustix::fs::getxattr_query(path, name),
            |b| rustix::fs::getxattr(path, name, b),
        ) else {
            continue;
        };
        if let Ok(value) = String::from_utf8(value) {
            out.insert(name[XATTR_PREFIX.len()..].to_string(), value);
        }
    }
    out
}

/// Makes `md` the whole metadata of the open `file`: metadata attributes it does not
/// name are removed (an overwrite leaves no stale keys), other attributes stay.
/// Ok(false) when the filesystem keeps no extended attributes (the file is still fine).
pub fn replace(file: &File, md: &Metadata) -> io::Result<bool> {
    let list = match fetch(
        || rustix::fs::flistxattr_query(file),
        |b| rustix::fs::flistxattr(file, b),
    ) {
        Ok(list) => list,
        Err(e)
            if e.raw_os_error()
                .is_some_and(|n| unsupported(Errno::from_raw_os_error(n))) =>
        {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    for name in metadata_names(&list) {
        if md.contains_key(&name[XATTR_PREFIX.len()..]) {
            continue;
        }
        match rustix::fs::fremovexattr(file, name) {
            Ok(()) | Err(Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (k, v) in md {
        let name = format!("{XATTR_PREFIX}{k}");
        match rustix::fs::fsetxattr(file, name.as_str(), v.as_bytes(), XattrFlags::empty()) {
            Ok(()) => {}
            Err(e) if unsupported(e) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                hyper::header::HeaderValue::from_bytes(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn metadata_headers_are_lowercased_and_first_value_wins() {
        let h = headers(&[
            ("X-Metadata-Author", b"mish"),
            ("x-metadata-author", b"second"),
            ("X-METADATA-Purpose", b"up load"),
            ("X-Metadata-", b"ignored"),
            ("Content-Type", b"application/octet-stream"),
        ]);
        let md = from_headers(&h).expect("valid");
        assert_eq!(
            md.into_iter().collect::<Vec<_>>(),
            vec![
                ("author".to_string(), "mish".to_string()),
                ("purpose".to_string(), "up load".to_string())
            ]
        );
        assert!(from_headers(&HeaderMap::new()).expect("none").is_empty());
    }

    #[test]
    fn bad_or_oversized_metadata_is_a_400() {
        for h in [
            headers(&[("X-Metadata-K", b"caf\xc3\xa9")]),
            headers(&[("X-Metadata-K", b"tab\there")]),
            headers(&[(&format!("X-Metadata-{}", "k".repeat(MAX_KEY_LEN + 1)), b"v")]),
            headers(&[
                ("X-Metadata-A", "a".repeat(2100).as_bytes()),
                ("X-Metadata-B", "b".repeat(2100).as_bytes()),
            ]),
        ] {
            let e = from_headers(&h).expect_err("refused");
            assert_eq!(e.rest_status(), 400, "{e}");
        }
        let fits = headers(&[(
            "X-Metadata-K",
            "v".repeat(MAX_TOTAL_LEN - XATTR_PREFIX.len() - 1)
                .as_bytes(),
        )]);
        assert!(from_headers(&fits).is_ok());
    }

    #[test]
    fn only_user_e2b_attributes_are_metadata() {
        let list = b"user.e2b.a\0user.other\0security.selinux\0user.e2b.\0user.e2b.b\0";
        assert_eq!(
            metadata_names(list).collect::<Vec<_>>(),
            ["user.e2b.a", "user.e2b.b"]
        );
    }

    #[test]
    fn replace_sets_exactly_the_new_set_and_keeps_foreign_attributes() {
        let dir = std::env::temp_dir().join(format!("agent-md-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("f");
        let file = File::create(&path).expect("create");
        let first: Metadata = [("author", "mish"), ("purpose", "upload")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match replace(&file, &first) {
            Ok(true) => {}
            Ok(false) => {
                eprintln!("SKIPPED: {} keeps no extended attributes", dir.display());
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
            Err(e) => panic!("replace: {e}"),
        }
        assert_eq!(read(&path), first);
        rustix::fs::setxattr(&path, "user.foreign", b"keep", XattrFlags::empty()).expect("set");
        let second: Metadata = [("author".to_string(), "alice".to_string())].into();
        assert!(replace(&file, &second).expect("replace"));
        assert_eq!(read(&path), second);
        assert!(replace(&file, &Metadata::new()).expect("clear"));
        assert!(read(&path).is_empty());
        let mut buf = [0u8; 8];
        assert_eq!(
            rustix::fs::getxattr(&path, "user.foreign", &mut buf[..]).expect("foreign kept"),
            4
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
