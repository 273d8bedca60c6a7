//! The agent's errors in the core's terms: the one table from the protocol's code and
//! reason to [`Error`], used for every answer the agent gives (Connect unary, stream
//! ends, REST), so a full disk is the same error whichever call met it.

use std::time::Duration;

use envd_proto::{Code, EnvdError, Reason};

use crate::error::Error;

/// Maps an error the agent answered. `timeout` is the call's deadline, for
/// `deadline_exceeded`.
pub fn from_envd(e: EnvdError, timeout: Option<Duration>) -> Error {
    let message = e.message;
    match (e.reason, e.code) {
        (Some(Reason::StorageFull), _) => Error::InsufficientStorage(message),
        (Some(Reason::TooLarge), _) => Error::TooLarge(message),
        // The server's token was right; the acting user the client named does not exist.
        (Some(Reason::InvalidUser), _) => Error::InvalidArgument(message),
        (Some(Reason::UnsupportedEncoding | Reason::UnsupportedMediaType), _) => {
            Error::InvalidArgument(message)
        }
        (Some(Reason::ProcessLimit), _) | (None, Code::ResourceExhausted) => {
            Error::ResourceExhausted {
                message,
                retry_after: None,
            }
        }
        (None, Code::NotFound) => Error::NotFound { what: message },
        (None, Code::DeadlineExceeded) => Error::Timeout(timeout.unwrap_or_default()),
        (None, Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange) => {
            Error::InvalidArgument(message)
        }
        (None, Code::AlreadyExists | Code::Aborted) => Error::Conflict(message),
        (None, Code::PermissionDenied) => Error::PermissionDenied(message),
        // Agents built before the reason header (in sandboxes re-adopted after an
        // upgrade) say an unknown user only in the message.
        (None, Code::Unauthenticated) if message.starts_with("invalid user") => {
            Error::InvalidArgument(message)
        }
        (None, code) => Error::Agent {
            code: code.as_str().to_string(),
            message,
        },
    }
}

/// An agent that cannot be reached, or whose answer broke off.
pub fn unavailable(message: impl Into<String>) -> Error {
    Error::Agent {
        code: Code::Unavailable.as_str().to_string(),
        message: message.into(),
    }
}

/// An answer that does not parse.
pub fn unreadable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Agent {
        code: Code::Internal.as_str().to_string(),
        message: format!("unreadable {what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: Code, reason: Option<Reason>) -> EnvdError {
        EnvdError {
            code,
            message: "m".into(),
            reason,
        }
    }

    #[test]
    fn reasons_decide_before_codes() {
        let full = from_envd(
            err(Code::ResourceExhausted, Some(Reason::StorageFull)),
            None,
        );
        assert!(matches!(full, Error::InsufficientStorage(_)));
        let user = from_envd(err(Code::Unauthenticated, Some(Reason::InvalidUser)), None);
        assert!(matches!(user, Error::InvalidArgument(_)));
        let big = from_envd(err(Code::ResourceExhausted, Some(Reason::TooLarge)), None);
        assert!(matches!(big, Error::TooLarge(_)));
        let pids = from_envd(
            err(Code::ResourceExhausted, Some(Reason::ProcessLimit)),
            None,
        );
        assert!(matches!(pids, Error::ResourceExhausted { .. }));
    }

    #[test]
    fn codes_map_to_core_errors() {
        assert!(matches!(
            from_envd(err(Code::NotFound, None), None),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            from_envd(err(Code::DeadlineExceeded, None), Some(Duration::from_secs(2))),
            Error::Timeout(d) if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            from_envd(err(Code::PermissionDenied, None), None),
            Error::PermissionDenied(_)
        ));
        assert!(matches!(
            from_envd(err(Code::Unauthenticated, None), None),
            Error::Agent { code, .. } if code == "unauthenticated"
        ));
    }

    #[test]
    fn a_full_disk_is_the_same_error_over_rest_and_connect() {
        let e = EnvdError::new(Code::ResourceExhausted, "/x: no space")
            .with_reason(Reason::StorageFull);
        let rest = EnvdError::from_response(e.rest_status(), None, &e.rest_json());
        let rpc = EnvdError::from_response(
            e.code.http_status(),
            Some(Reason::StorageFull.as_str()),
            &e.connect_json(),
        );
        assert!(matches!(
            from_envd(rest, None),
            Error::InsufficientStorage(_)
        ));
        assert!(matches!(
            from_envd(rpc, None),
            Error::InsufficientStorage(_)
        ));
    }
}
