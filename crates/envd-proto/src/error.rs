//! Errors on the wire: Connect's codes, the reason a client needs beyond the code, the
//! one errno table, and the HTTP statuses of the REST endpoints.
//!
//! The agent builds every error as an [`EnvdError`]; the server reads every error answer
//! back into one. Both directions go through this module, so they cannot disagree.

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

/// Header (unary and REST answers) and end-of-stream metadata key carrying a [`Reason`].
pub const REASON_HEADER: &str = "colima-e2b-reason";

/// Connect's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

/// Every code, for tables and tests.
pub const ALL_CODES: [Code; 16] = [
    Code::Canceled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

impl Code {
    /// The wire name (`not_found`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The code named `name`; names Connect does not define read as [`Code::Unknown`].
    pub fn parse(name: &str) -> Code {
        ALL_CODES
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(Code::Unknown)
    }

    /// HTTP status of a unary error with this code (Connect's table).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client needs to know beyond the code to answer precisely (a full disk is a
/// 507, not a "retry later"). Travels in [`REASON_HEADER`], which other clients ignore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The sandbox's disk or inode quota is used up (ENOSPC, EDQUOT).
    StorageFull,
    /// A single file or body is larger than allowed (EFBIG, the upload cap).
    TooLarge,
    /// The acting user does not exist in the sandbox (envd says `unauthenticated`).
    InvalidUser,
    /// The sandbox's process limit is reached (EAGAIN from fork).
    ProcessLimit,
    /// The client asked for a response encoding the endpoint does not offer.
    UnsupportedEncoding,
    /// The request body comes in an encoding the endpoint does not read.
    UnsupportedMediaType,
}

const REASONS: [Reason; 6] = [
    Reason::StorageFull,
    Reason::TooLarge,
    Reason::InvalidUser,
    Reason::ProcessLimit,
    Reason::UnsupportedEncoding,
    Reason::UnsupportedMediaType,
];

impl Reason {
    /// The wire name (`storage_full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::StorageFull => "storage_full",
            Reason::TooLarge => "too_large",
            Reason::InvalidUser => "invalid_user",
            Reason::ProcessLimit => "process_limit",
            Reason::UnsupportedEncoding => "unsupported_encoding",
            Reason::UnsupportedMediaType => "unsupported_media_type",
        }
    }

    /// The reason named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Reason> {
        REASONS.into_iter().find(|r| r.as_str() == name.trim())
    }
}

/// HTTP statuses of the REST endpoints (`/files`, `/init`), as envd answers them; read
/// top down in both directions, so the first row for a status or a code wins.
const REST_STATUSES: [(u16, Code, Option<Reason>); 15] = [
    (507, Code::ResourceExhausted, Some(Reason::StorageFull)),
    (413, Code::ResourceExhausted, Some(Reason::TooLarge)),
    (
        406,
        Code::InvalidArgument,
        Some(Reason::UnsupportedEncoding),
    ),
    (
        415,
        Code::InvalidArgument,
        Some(Reason::UnsupportedMediaType),
    ),
    (401, Code::Unauthenticated, None),
    (400, Code::InvalidArgument, None),
    (400, Code::FailedPrecondition, None),
    (400, Code::OutOfRange, None),
    (403, Code::PermissionDenied, None),
    (404, Code::NotFound, None),
    (409, Code::AlreadyExists, None),
    (429, Code::ResourceExhausted, None),
    (501, Code::Unimplemented, None),
    (503, Code::Unavailable, None),
    (504, Code::DeadlineExceeded, None),
];

/// An error as the agent sends it and the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvdError {
    /// Connect code.
    pub code: Code,
    /// For people.
    pub message: String,
    /// For clients that answer differently by cause.
    pub reason: Option<Reason>,
}

/// `{"code": "not_found", "message": "..."}`: Connect's error body.
#[derive(Debug, Serialize, Deserialize)]
struct ConnectErrorBody {
    code: serde_json::Value,
    #[serde(default)]
    message: String,
}

impl EnvdError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// The same error, with `reason`.
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.reason = Some(reason);
        self
    }

    /// The error a REST endpoint answers with `status`.
    pub fn from_rest_status(status: u16, message: impl Into<String>) -> Self {
        let (code, reason) = REST_STATUSES
            .iter()
            .find(|(s, _, _)| *s == status)
            .map_or((Code::Internal, None), |(_, c, r)| (*c, *r));
        Self {
            code,
            message: message.into(),
            reason,
        }
    }

    /// An I/O error on `what`: the one errno table of the protocol.
    pub fn from_io(e: &io::Error, what: &str) -> Self {
        let (code, reason) = errno_code(e);
        Self {
            code,
            message: format!("{what}: {e}"),
            reason,
        }
    }

    /// The status of this error on a REST endpoint.
    pub fn rest_status(&self) -> u16 {
        REST_STATUSES
            .iter()
            .find(|(_, c, r)| *c == self.code && (r.is_none() || *r == self.reason))
            .map_or(500, |(s, _, _)| *s)
    }

    /// Connect's JSON body: `{"code":"not_found","message":"..."}`.
    pub fn connect_json(&self) -> Vec<u8> {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
            .to_string()
            .into_bytes()
    }

    /// envd's REST body: `{"code": 404, "message": "..."}`.
    pub fn rest_json(&self) -> Vec<u8> {
        serde_json::json!({"code": self.rest_status(), "message": self.message})
            .to_string()
            .into_bytes()
    }

    /// Reads an error answer of either kind back: a Connect body names its code, a REST
    /// body its status (or nothing), and then the HTTP status decides.
    pub fn from_response(status: u16, reason: Option<&str>, body: &[u8]) -> Self {
        let parsed: Option<ConnectErrorBody> = serde_json::from_slice(body).ok();
        let message = match &parsed {
            Some(b) if !b.message.is_empty() => b.message.clone(),
            _ => {
                let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
                format!("HTTP {status}: {text}")
            }
        };
        let reason = reason.and_then(Reason::parse);
        let named = parsed
            .as_ref()
            .and_then(|b| b.code.as_str().map(Code::parse));
        let (code, implied) = match named {
            Some(code) => (code, None),
            None => {
                let e = Self::from_rest_status(status, "");
                (e.code, e.reason)
            }
        };
        Self {
            code,
            message,
            reason: reason.or(implied),
        }
    }
}

impl fmt::Display for EnvdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for EnvdError {}

/// The errno table: what each kernel error means to a client.
fn errno_code(e: &io::Error) -> (Code, Option<Reason>) {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => (Code::ResourceExhausted, Some(Reason::StorageFull)),
        Some(libc::EFBIG) => (Code::ResourceExhausted, Some(Reason::TooLarge)),
        Some(libc::EAGAIN) => (Code::ResourceExhausted, Some(Reason::ProcessLimit)),
        Some(libc::ENOENT) => (Code::NotFound, None),
        Some(libc::EEXIST) => (Code::AlreadyExists, None),
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => (Code::PermissionDenied, None),
        Some(
            libc::ENOTDIR
            | libc::EISDIR
            | libc::ENAMETOOLONG
            | libc::ELOOP
            | libc::EXDEV
            | libc::ENOTEMPTY
            | libc::ENXIO
            | libc::EINVAL,
        ) => (Code::InvalidArgument, None),
        Some(_) => (Code::Internal, None),
        None => match e.kind() {
            io::ErrorKind::NotFound => (Code::NotFound, None),
            io::ErrorKind::PermissionDenied => (Code::PermissionDenied, None),
            io::ErrorKind::AlreadyExists => (Code::AlreadyExists, None),
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
                (Code::InvalidArgument, None)
            }
            _ => (Code::Internal, None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_round_trip_and_unknown_names_are_unknown() {
        for c in ALL_CODES {
            assert_eq!(Code::parse(c.as_str()), c);
        }
        assert_eq!(Code::parse("no_such_code"), Code::Unknown);
    }

    #[test]
    fn a_full_disk_is_507_on_rest_and_reads_back_as_storage_full() {
        let e = EnvdError::from_io(&io::Error::from_raw_os_error(libc::ENOSPC), "/x");
        assert_eq!(
            (e.code, e.reason),
            (Code::ResourceExhausted, Some(Reason::StorageFull))
        );
        assert_eq!(e.rest_status(), 507);
        let back = EnvdError::from_response(507, None, &e.rest_json());
        assert_eq!((back.code, back.reason), (e.code, e.reason));
        assert!(back.message.contains("/x"), "{back}");
        // Over Connect the reason travels in the header.
        let back = EnvdError::from_response(
            e.code.http_status(),
            Some(Reason::StorageFull.as_str()),
            &e.connect_json(),
        );
        assert_eq!((back.code, back.reason), (e.code, e.reason));
    }

    #[test]
    fn every_rest_status_reads_back_as_the_error_that_produced_it() {
        for (status, code, reason) in REST_STATUSES {
            let e = EnvdError {
                code,
                message: "m".into(),
                reason,
            };
            let back = EnvdError::from_response(e.rest_status(), None, &e.rest_json());
            assert_eq!(back.rest_status(), e.rest_status(), "{status} {code}");
        }
        let e = EnvdError::new(Code::PermissionDenied, "no");
        assert_eq!(e.rest_status(), 403);
        let e = EnvdError::from_io(&io::Error::from_raw_os_error(libc::EACCES), "/root");
        assert_eq!(e.rest_status(), 403);
    }

    #[test]
    fn bodies_that_are_not_json_keep_their_text() {
        let e = EnvdError::from_response(503, None, b"gateway down");
        assert_eq!(e.code, Code::Unavailable);
        assert!(e.message.contains("gateway down"));
    }
}
