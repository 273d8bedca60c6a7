//! E2B's signed file URLs: the signature both the agent (which checks it) and the
//! server (which finds the sandbox an unaddressed signed URL belongs to) compute.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// Constant-time comparison of secrets (only the length may leak).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
}

/// The one file operation a signed `/files` URL grants (E2B's `operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// `GET /files` (the SDK's `download_url`).
    Read,
    /// `POST /files` (the SDK's `upload_url`).
    Write,
}

impl FileOp {
    /// The name that goes into the signed string.
    pub fn as_str(self) -> &'static str {
        match self {
            FileOp::Read => "read",
            FileOp::Write => "write",
        }
    }
}

/// E2B's v1 file-URL signature, byte for byte as the Python SDK's `get_signature`:
/// `"v1_" + base64_nopad(sha256("<path>:<op>:<user>:<token>[:<expiration>]"))`.
/// `path` is the `path` query value exactly as the caller gave it (not resolved), `user`
/// is "" when the URL names none (the default user), `expiration` is unix seconds.
pub fn file_signature(
    path: &str,
    op: FileOp,
    user: &str,
    token: &[u8],
    expiration: Option<i64>,
) -> String {
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update(b":");
    h.update(op.as_str().as_bytes());
    h.update(b":");
    h.update(user.as_bytes());
    h.update(b":");
    h.update(token);
    if let Some(e) = expiration {
        h.update(format!(":{e}").as_bytes());
    }
    let enc = base64::engine::general_purpose::STANDARD_NO_PAD.encode(h.finalize());
    format!("v1_{enc}")
}
