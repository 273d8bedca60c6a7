//! JSON error responses: every error a client sees is `{code, message}`.

use poem::http::StatusCode;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};
use sandbox_core::Error;

/// The body of every error response.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_argument`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl poem_openapi::types::Example for ErrorBody {
    fn example() -> Self {
        ErrorBody {
            code: "not_found".into(),
            message: "sandbox clm0123456789abcdef not found".into(),
        }
    }
}

impl ErrorBody {
    /// A body with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Error responses of the native API.
#[derive(Debug, ApiResponse)]
#[oai(bad_request_handler = "request_error")]
pub enum ApiError {
    /// The request is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The acting user inside the sandbox may not do this.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The sandbox, file or process does not exist.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The command ran past its timeout.
    #[oai(status = 408)]
    Timeout(Json<ErrorBody>),
    /// The sandbox is in the wrong state for this operation.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body, a file or an answer is larger than the limit that applies.
    #[oai(status = 413)]
    TooLarge(Json<ErrorBody>),
    /// The request body's Content-Type is not one the operation takes.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The request data is invalid (wrong types, out-of-range values, unknown template).
    #[oai(status = 422)]
    Validation(Json<ErrorBody>),
    /// A limit is reached (concurrent creates, sandbox count); retry after the given seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] Option<u64>),
    /// The container engine failed.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The backend in use cannot do this.
    #[oai(status = 501)]
    Unsupported(Json<ErrorBody>),
    /// The sandbox's agent failed or cannot be reached.
    #[oai(status = 502)]
    BadGateway(Json<ErrorBody>),
    /// The container engine cannot be reached.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
    /// The sandbox's disk is full.
    #[oai(status = 507)]
    InsufficientStorage(Json<ErrorBody>),
}

impl ApiError {
    /// The HTTP status of this response.
    pub fn status(&self) -> StatusCode {
        let code = match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::Timeout(_) => 408,
            ApiError::Conflict(_) => 409,
            ApiError::TooLarge(_) => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Validation(_) => 422,
            ApiError::TooManyRequests(..) => 429,
            ApiError::Internal(_) => 500,
            ApiError::Unsupported(_) => 501,
            ApiError::BadGateway(_) => 502,
            ApiError::Unavailable(_) => 503,
            ApiError::InsufficientStorage(_) => 507,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// A response for `status` with `code` and `message`.
    pub fn from_status(status: u16, code: &str, message: String) -> Self {
        let body = Json(ErrorBody::new(code, message));
        match status {
            403 => ApiError::Forbidden(body),
            404 => ApiError::NotFound(body),
            408 => ApiError::Timeout(body),
            409 => ApiError::Conflict(body),
            413 => ApiError::TooLarge(body),
            415 => ApiError::UnsupportedMediaType(body),
            422 => ApiError::Validation(body),
            429 => ApiError::TooManyRequests(body, None),
            501 => ApiError::Unsupported(body),
            502 => ApiError::BadGateway(body),
            503 => ApiError::Unavailable(body),
            507 => ApiError::InsufficientStorage(body),
            400..=499 => ApiError::BadRequest(body),
            _ => ApiError::Internal(body),
        }
    }
}

/// Parses a sandbox id from a path; an id that cannot exist is simply not found.
pub fn parse_id(id: &str) -> Result<sandbox_core::SandboxId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::from(Error::not_found(format!("sandbox {id}"))))
}

/// The HTTP status of each core error: the one table of the native API (the E2B control
/// plane starts from it too).
pub fn status_of(e: &Error) -> u16 {
    match e {
        Error::NotFound { .. } => 404,
        Error::Conflict(_) => 409,
        // As in the seed's API: invalid request data is a validation error.
        Error::InvalidArgument(_) => 422,
        Error::Timeout(_) => 408,
        Error::EngineUnavailable(_) => 503,
        Error::ResourceExhausted { .. } => 429,
        Error::InsufficientStorage(_) => 507,
        Error::TooLarge(_) => 413,
        Error::PermissionDenied(_) => 403,
        Error::Unsupported { .. } => 501,
        Error::Agent { .. } => 502,
        Error::Backend { .. } => 500,
        // The client's Dockerfile or template failed, not the server.
        Error::BuildFailed(_) => 422,
        // The template's own ready command failed: the template is at fault.
        Error::TemplateNotReady(_) => 422,
        // `Error` is non-exhaustive: anything new is the server's own failure until mapped.
        _ => 500,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = status_of(&e);
        if status >= 500 {
            tracing::warn!(error = %e, "request failed");
        }
        match &e {
            Error::ResourceExhausted { retry_after, .. } => ApiError::TooManyRequests(
                Json(ErrorBody::new(e.code(), e.to_string())),
                retry_after.map(|d| d.as_secs().max(1)),
            ),
            _ => ApiError::from_status(status, e.code(), e.to_string()),
        }
    }
}

/// Turns request parsing failures (bad JSON, wrong types, missing fields) into JSON errors.
fn request_error(err: poem::Error) -> ApiError {
    let status = err.status().as_u16();
    let message = err.to_string();
    match status {
        413 => ApiError::from_status(413, "payload_too_large", message),
        // As in the seed's API: a body that does not match the schema is a validation error.
        400 | 415 | 422 => ApiError::from_status(422, "validation_error", message),
        _ => ApiError::from_status(status, "bad_request", message),
    }
}

/// Renders any poem error (unknown route, wrong method, body too large) as `{code, message}`;
/// errors that already are JSON API responses pass through unchanged.
pub async fn any_error_to_json(err: poem::Error) -> poem::Response {
    let resp = err.into_response();
    let is_json = resp
        .content_type()
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    // As in the seed's API, a request that does not parse is a validation error.
    let status = match resp.status() {
        StatusCode::BAD_REQUEST => StatusCode::UNPROCESSABLE_ENTITY,
        other => other,
    };
    let code = match status.as_u16() {
        422 => "validation_error",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        431 => "headers_too_large",
        400..=499 => "bad_request",
        _ => "internal",
    };
    let text = resp.into_body().into_string().await.unwrap_or_default();
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let body = serde_json::json!({ "code": code, "message": message });
    poem::Response::builder()
        .status(status)
        .content_type("application/json")
        .body(body.to_string())
}
