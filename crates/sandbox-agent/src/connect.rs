//! Connect protocol framing (JSON codec): unary bodies and errors, stream envelopes,
//! end-of-stream messages, and the response body type used by the whole server.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::proto::ConnectErrorBody;

/// Envelope flag: the message is compressed (we never accept compressed messages).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: end of stream.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Largest request message we accept (SendInput chunks, file paths, ...).
pub const MAX_MESSAGE: usize = 8 << 20;

/// Connect error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// HTTP status for a unary error, per the Connect spec.
    pub fn http_status(self) -> StatusCode {
        let n = match self {
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
        };
        StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// An RPC error with a Connect code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// Code.
    pub code: Code,
    /// Message for humans.
    pub message: String,
}

impl RpcError {
    /// Builds an error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Maps an I/O error on `what` to the closest code.
    pub fn io(e: &std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind as K;
        let code = match e.kind() {
            K::NotFound => Code::NotFound,
            K::PermissionDenied => Code::PermissionDenied,
            K::AlreadyExists => Code::AlreadyExists,
            K::InvalidInput | K::InvalidData => Code::InvalidArgument,
            _ => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
                Some(libc::ENOTDIR)
                | Some(libc::EISDIR)
                | Some(libc::ENAMETOOLONG)
                | Some(libc::ELOOP)
                | Some(libc::EXDEV)
                | Some(libc::ENOTEMPTY) => Code::InvalidArgument,
                Some(libc::EPERM) | Some(libc::EROFS) => Code::PermissionDenied,
                _ => Code::Internal,
            },
        };
        Self::new(code, format!("{what}: {e}"))
    }

    fn body(&self) -> ConnectErrorBody {
        ConnectErrorBody {
            code: self.code.as_str().to_string(),
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for RpcError {}

/// Response body: a whole buffer, or a stream of chunks fed by a task.
#[derive(Debug)]
pub enum AgentBody {
    /// One buffer (taken when sent).
    Full(Option<Bytes>),
    /// Chunks from a channel; the stream ends when every sender is gone.
    Chan(mpsc::Receiver<Bytes>),
}

impl AgentBody {
    /// A body from one buffer.
    pub fn full(b: impl Into<Bytes>) -> Self {
        AgentBody::Full(Some(b.into()))
    }

    /// An empty body.
    pub fn empty() -> Self {
        AgentBody::Full(None)
    }
}

impl Body for AgentBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            AgentBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            AgentBody::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, AgentBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AgentBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            AgentBody::Full(None) => SizeHint::with_exact(0),
            AgentBody::Chan(_) => SizeHint::default(),
        }
    }
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<AgentBody> {
    let mut r = Response::new(AgentBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A 200 unary response with the message as JSON.
pub fn unary_ok<T: Serialize>(msg: &T) -> Response<AgentBody> {
    match serde_json::to_vec(msg) {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => unary_err(&RpcError::new(Code::Internal, e.to_string())),
    }
}

/// A unary error: non-2xx status with `{"code","message"}`.
pub fn unary_err(err: &RpcError) -> Response<AgentBody> {
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    json_response(err.code.http_status(), body)
}

/// Frames one message.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(flags);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Frames a stream message holding `msg` as JSON.
pub fn message_envelope<T: Serialize>(msg: &T) -> Bytes {
    envelope(
        0,
        &serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// The end-of-stream envelope: `{}` or `{"error":{...}}`.
pub fn end_stream(err: Option<&RpcError>) -> Bytes {
    let body = match err {
        None => b"{}".to_vec(),
        Some(e) => serde_json::to_vec(&serde_json::json!({ "error": e.body() }))
            .unwrap_or_else(|_| b"{}".to_vec()),
    };
    envelope(FLAG_END_STREAM, &body)
}

/// A streaming response whose envelopes come from `rx`.
pub fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<AgentBody> {
    let mut r = Response::new(AgentBody::Chan(rx));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/connect+json"),
    );
    r
}

/// A streaming call that failed before it started: 200 with only the end-of-stream error.
pub fn stream_err(err: &RpcError) -> Response<AgentBody> {
    let mut r = Response::new(AgentBody::full(end_stream(Some(err))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/connect+json"),
    );
    r
}

/// Reads a whole body, refusing more than `max` bytes.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, RpcError> {
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("request body larger than {max} bytes"),
                ))
            } else {
                Err(RpcError::new(
                    Code::Canceled,
                    format!("reading request: {e}"),
                ))
            }
        }
    }
}

/// Parses a JSON message; an empty body is the empty message.
pub fn parse_json<T: DeserializeOwned>(b: &[u8]) -> Result<T, RpcError> {
    let b = if b.iter().all(|c| c.is_ascii_whitespace()) {
        &b"{}"[..]
    } else {
        b
    };
    serde_json::from_slice(b)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("invalid request: {e}")))
}

/// Incremental decoder of a stream of envelopes (request bodies may arrive in any chunks).
#[derive(Debug, Default)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
}

impl EnvelopeDecoder {
    /// Adds bytes.
    pub fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Takes the next complete envelope: (flags, payload).
    pub fn next_envelope(&mut self) -> Result<Option<(u8, Bytes)>, RpcError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("message of {len} bytes is larger than {MAX_MESSAGE}"),
            ));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(RpcError::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some((flags, self.buf.split_to(len).freeze())))
    }

    /// Bytes buffered but not yet a whole envelope.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Reads the single request message of a server-streaming call.
pub async fn read_stream_request<T: DeserializeOwned>(body: Incoming) -> Result<T, RpcError> {
    let b = read_body(body, MAX_MESSAGE + 5).await?;
    let mut d = EnvelopeDecoder::default();
    d.push(&b);
    match d.next_envelope()? {
        Some((_, payload)) => parse_json(&payload),
        None if b.is_empty() => parse_json(b"{}"),
        None => Err(RpcError::new(
            Code::InvalidArgument,
            "truncated request envelope",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_handles_split_envelopes() {
        let e1 = envelope(0, b"{\"a\":1}");
        let e2 = end_stream(None);
        let mut all = e1.to_vec();
        all.extend_from_slice(&e2);
        let mut d = EnvelopeDecoder::default();
        let mut got = Vec::new();
        for chunk in all.chunks(3) {
            d.push(chunk);
            while let Ok(Some(m)) = d.next_envelope() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].1[..], b"{\"a\":1}");
        assert_eq!(got[1].0, FLAG_END_STREAM);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn error_end_stream_carries_code() {
        let e = end_stream(Some(&RpcError::new(Code::DeadlineExceeded, "late")));
        let v: serde_json::Value = serde_json::from_slice(&e[5..]).unwrap_or_default();
        assert_eq!(v["error"]["code"], "deadline_exceeded");
        assert_eq!(e[0], FLAG_END_STREAM);
    }
}
