//! The one error type every layer of colima-e2b speaks.

use std::time::Duration;

/// Boxed source error from a backend or transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core, a backend or the agent client.
///
/// The domain knows no HTTP: the API layer maps each variant to its status (one table,
/// in sandbox-api).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The sandbox, file, process or image does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `sandbox clm123`.
        what: String,
    },
    /// The operation conflicts with the current state (e.g. already paused).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller supplied something invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An operation ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The container engine could not be reached.
    #[error("container engine unavailable: {0}")]
    EngineUnavailable(String),
    /// A configured limit was reached; retry later.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// What limit was hit.
        message: String,
        /// When the caller may try again.
        retry_after: Option<Duration>,
    },
    /// The sandbox's disk (or inode table) is full.
    #[error("no space left in the sandbox: {0}")]
    InsufficientStorage(String),
    /// Something is larger than the limit that applies to it (a file, an answer).
    #[error("too large: {0}")]
    TooLarge(String),
    /// The acting user inside the sandbox may not do this (file modes, ownership).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The backend cannot do this (see [`crate::Capabilities`]).
    #[error("unsupported by the {backend} backend: {operation}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What was asked.
        operation: &'static str,
    },
    /// The sandbox's agent refused or failed a request, or cannot be reached.
    #[error("sandbox agent: {code}: {message}")]
    Agent {
        /// Connect code the agent (or the transport) reported, e.g. `unavailable`,
        /// `unauthenticated`, `internal`.
        code: String,
        /// What happened.
        message: String,
    },
    /// An image build failed on its own terms (a step exited non-zero, a file it names
    /// is missing): the engine worked, the Dockerfile or template did not.
    #[error("build failed: {0}")]
    BuildFailed(String),
    /// A new sandbox's template did not come up: its ready command never passed.
    #[error("template not ready: {0}")]
    TemplateNotReady(String),
    /// Anything else a backend reported.
    #[error("{backend} backend error: {source}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    /// Shorthand for [`Error::Backend`].
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }

    /// A stable machine-readable code for JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not_found",
            Error::Conflict(_) => "conflict",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Timeout(_) => "timeout",
            Error::EngineUnavailable(_) => "engine_unavailable",
            Error::ResourceExhausted { .. } => "resource_exhausted",
            Error::InsufficientStorage(_) => "insufficient_storage",
            Error::TooLarge(_) => "too_large",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Unsupported { .. } => "unsupported",
            Error::Backend { .. } => "backend_error",
            Error::Agent { .. } => "agent_error",
            Error::BuildFailed(_) => "build_failed",
            Error::TemplateNotReady(_) => "template_not_ready",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_distinct_code() {
        let errors = [
            Error::not_found("x"),
            Error::Conflict("x".into()),
            Error::InvalidArgument("x".into()),
            Error::Timeout(Duration::from_secs(1)),
            Error::EngineUnavailable("x".into()),
            Error::ResourceExhausted {
                message: "x".into(),
                retry_after: None,
            },
            Error::InsufficientStorage("x".into()),
            Error::TooLarge("x".into()),
            Error::PermissionDenied("x".into()),
            Error::Unsupported {
                backend: "b",
                operation: "o",
            },
            Error::backend("b", "boom"),
            Error::BuildFailed("x".into()),
            Error::TemplateNotReady("x".into()),
            Error::Agent {
                code: "unavailable".into(),
                message: "x".into(),
            },
        ];
        let mut codes: Vec<&str> = errors.iter().map(Error::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errors.len());
    }
}
