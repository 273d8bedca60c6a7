//! The per-sandbox secret (`X-Access-Token`) and the acting user (`Authorization: Basic`).

use std::sync::Mutex;

use base64::Engine as _;
use hyper::HeaderMap;

/// Header carrying the per-sandbox secret (what the E2B SDK sends).
pub const TOKEN_HEADER: &str = "x-access-token";

/// Constant-time comparison (the length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

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

    #[test]
    fn basic_user_parses_user_colon() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic cm9vdDo=".parse().expect("hv"));
        assert_eq!(basic_user(&h), Ok(Some("root".into())));
    }
}
