//! The per-sandbox secret (`X-Access-Token`), E2B's signed `/files` URLs, and the acting
//! user (`Authorization: Basic`).

use std::sync::Mutex;

use base64::Engine as _;
use hyper::HeaderMap;

pub use envd_proto::TOKEN_HEADER;

/// The secret every request (but /health) must carry.
#[derive(Debug, Default)]
pub struct Secret {
    token: Mutex<Option<Vec<u8>>>,
}

impl Secret {
    /// Starts with an optional secret (empty means none).
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: Mutex::new(token.filter(|t| !t.is_empty()).map(String::into_bytes)),
        }
    }

    fn current(&self) -> Option<Vec<u8>> {
        self.token
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// True when a secret is set.
    pub fn is_set(&self) -> bool {
        self.current().is_some()
    }

    /// True when the request may proceed: no secret is set, or it carries the secret.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        match self.current() {
            None => true,
            Some(t) => headers
                .get(TOKEN_HEADER)
                .is_some_and(|v| ct_eq(v.as_bytes(), &t)),
        }
    }

    /// Replaces the secret (the caller checked that it may).
    pub fn set(&self, token: &str) {
        let v = (!token.is_empty()).then(|| token.as_bytes().to_vec());
        match self.token.lock() {
            Ok(mut g) => *g = v,
            Err(p) => *p.into_inner() = v,
        }
    }
}

pub use envd_proto::signature::{ct_eq, file_signature, FileOp};

/// Why a `/files` request without the access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No `signature` parameter: an ordinary unauthenticated request.
    Missing,
    /// A signature that does not match this path, operation, user and expiration.
    Invalid,
    /// A valid signature whose `signature_expiration` has passed.
    Expired,
}

impl SignatureError {
    /// The message for the 401 body.
    pub fn message(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing or invalid access token",
            SignatureError::Invalid => "invalid signature",
            // envd's exact text (E2B's own SDK tests compare it).
            SignatureError::Expired => "signature is already expired",
        }
    }
}

impl Secret {
    /// Checks a signed `/files` URL (`path`, `username`, `signature`,
    /// `signature_expiration` in `query`) for operation `op` at unix time `now`.
    /// Never succeeds when no secret is set (callers let such requests through anyway).
    pub fn verify_file_url(
        &self,
        query: &[(String, String)],
        op: FileOp,
        now: i64,
    ) -> Result<(), SignatureError> {
        // A repeated parameter could be read differently here and by the handler.
        let one = |name: &str| -> Result<Option<&str>, SignatureError> {
            let mut it = query.iter().filter(|(k, _)| k == name);
            let first = it.next().map(|(_, v)| v.as_str());
            match it.next() {
                Some(_) => Err(SignatureError::Invalid),
                None => Ok(first),
            }
        };
        let Some(sig) = one("signature")? else {
            return Err(SignatureError::Missing);
        };
        let token = self.current().ok_or(SignatureError::Invalid)?;
        // Without a path a multipart upload would pick its own destinations.
        let path = one("path")?
            .filter(|p| !p.is_empty())
            .ok_or(SignatureError::Invalid)?;
        let user = one("username")?.unwrap_or_default();
        let expiration = one("signature_expiration")?
            .map(|e| e.parse::<i64>().map_err(|_| SignatureError::Invalid))
            .transpose()?;
        let want = file_signature(path, op, user, &token, expiration);
        if !ct_eq(sig.as_bytes(), want.as_bytes()) {
            return Err(SignatureError::Invalid);
        }
        match expiration {
            Some(e) if e < now => Err(SignatureError::Expired),
            _ => Ok(()),
        }
    }
}

/// The user named by `Authorization: Basic base64("<user>:")`, if any.
/// Err when the header is present but malformed.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(v) = headers.get(hyper::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| "invalid Authorization header")?;
    let Some(b) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Err("Authorization must be Basic".into());
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .map_err(|_| "invalid Basic credentials")?;
    let s = String::from_utf8(raw).map_err(|_| "invalid Basic credentials")?;
    let user = s.split(':').next().unwrap_or_default();
    Ok((!user.is_empty()).then(|| user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_requires_exact_header() {
        let s = Secret::new(Some("s3cret".into()));
        let mut h = HeaderMap::new();
        assert!(!s.allows(&h));
        h.insert(TOKEN_HEADER, "s3cre".parse().expect("hv"));
        assert!(!s.allows(&h));
        h.insert(TOKEN_HEADER, "s3cret".parse().expect("hv"));
        assert!(s.allows(&h));
        assert!(Secret::new(None).allows(&HeaderMap::new()));
    }

    const TOKEN: &[u8] = b"test-secret-0123456789";

    /// Computed by the e2b 2.63.0 Python SDK: `e2b.sandbox.signature.get_signature(...)`
    /// with token `test-secret-0123456789` (and `time.time` fixed at 1700000000 for C).
    #[test]
    fn signature_matches_python_sdk_vectors() {
        assert_eq!(
            file_signature("/home/user/hello.txt", FileOp::Read, "", TOKEN, None),
            "v1_k0g4Ym19YztTXD52ypeoBgjnaqHHfzUU9Mpt5PBFQIs"
        );
        assert_eq!(
            file_signature("docs/report.txt", FileOp::Write, "user", TOKEN, None),
            "v1_Of+Ai4QSCYeCwtYoIWHkm+PHHH8ruJp5xETQ56Asb4g"
        );
        assert_eq!(
            file_signature(
                "docs/report.txt",
                FileOp::Write,
                "user",
                TOKEN,
                Some(1_700_003_600)
            ),
            "v1_rwGdrqK5ofY2TjVRi4Ewu3bv2+vAjJhlKDVAP/pYdQg"
        );
    }

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn verify_file_url_binds_path_op_user_and_expiry() {
        let s = Secret::new(Some("test-secret-0123456789".into()));
        let sig = file_signature("a.txt", FileOp::Read, "", TOKEN, Some(100));
        let ok = q(&[
            ("path", "a.txt"),
            ("signature", &sig),
            ("signature_expiration", "100"),
        ]);
        assert_eq!(s.verify_file_url(&ok, FileOp::Read, 100), Ok(()));
        assert_eq!(
            s.verify_file_url(&ok, FileOp::Read, 101),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            s.verify_file_url(&ok, FileOp::Write, 0),
            Err(SignatureError::Invalid)
        );
        let mut other_user = ok.clone();
        other_user.push(("username".into(), "root".into()));
        assert_eq!(
            s.verify_file_url(&other_user, FileOp::Read, 0),
            Err(SignatureError::Invalid)
        );
        let mut dup = ok.clone();
        dup.push(("path".into(), "b.txt".into()));
        assert_eq!(
            s.verify_file_url(&dup, FileOp::Read, 0),
            Err(SignatureError::Invalid)
        );
        // Dropping the expiration does not make the signature last forever.
        assert_eq!(
            s.verify_file_url(&ok[..2], FileOp::Read, 0),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            s.verify_file_url(&q(&[("path", "a.txt")]), FileOp::Read, 0),
            Err(SignatureError::Missing)
        );
        let none = Secret::new(None);
        assert_eq!(
            none.verify_file_url(&ok, FileOp::Read, 0),
            Err(SignatureError::Invalid)
        );
        let empty_path = file_signature("", FileOp::Write, "", TOKEN, None);
        assert_eq!(
            s.verify_file_url(
                &q(&[("path", ""), ("signature", &empty_path)]),
                FileOp::Write,
                0
            ),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn basic_user_parses_user_colon() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic cm9vdDo=".parse().expect("hv"));
        assert_eq!(basic_user(&h), Ok(Some("root".into())));
    }
}
