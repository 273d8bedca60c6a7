//! Connect responses and request bodies on hyper: the response body type used by the
//! whole server, unary answers and errors, streaming responses. The framing itself is
//! the protocol crate's (`envd_proto::codec`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use envd_proto::codec::{self, EnvelopeDecoder};
use envd_proto::error::REASON_HEADER;
use envd_proto::{Code, EnvdError, Reason, MAX_UNARY_ANSWER, STREAM_CONTENT_TYPE};

/// Largest request message we accept (SendInput chunks, file paths, ...).
pub const MAX_MESSAGE: usize = 8 << 20;

/// Response body: a whole buffer, or a stream of chunks fed by a task.
#[derive(Debug)]
pub enum AgentBody {
    /// One buffer (taken when sent).
    Full(Option<Bytes>),
    /// Chunks from a channel; the stream ends when every sender is gone.
    Chan(mpsc::Receiver<Bytes>),
    /// A Connect stream fed by a [`StreamSender`].
    Stream(StreamBody),
}

/// The receiving side of a [`StreamSender`]: its frames in order, except that a final
/// frame set by [`StreamSender::abandon`] goes out before anything still queued.
#[derive(Debug)]
pub struct StreamBody {
    rx: mpsc::Receiver<Bytes>,
    last: Arc<Mutex<Option<Bytes>>>,
    done: bool,
}

impl StreamBody {
    fn take_last(&mut self) -> Option<Bytes> {
        let b = self.last.lock().unwrap_or_else(|p| p.into_inner()).take();
        if b.is_some() {
            self.done = true;
        }
        b
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(b) = self.take_last() {
            return Poll::Ready(Some(b));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(b)),
            // The sender sets the final frame before it goes away.
            Poll::Ready(None) => Poll::Ready(self.take_last()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The client went away.
    Gone,
    /// The client did not take a frame for the stall timeout.
    Stalled,
}

/// Feeds one streaming response, never waiting longer than the stall timeout for a
/// client that stopped reading.
#[derive(Debug)]
pub struct StreamSender {
    tx: mpsc::Sender<Bytes>,
    last: Arc<Mutex<Option<Bytes>>>,
    stall: Duration,
}

/// Frames queued per stream beyond what the HTTP connection has taken (the frames share
/// their bytes with the output ring, so this is a count, not a copy).
const STREAM_QUEUE: usize = 2;

/// A streaming response and its sender.
pub fn stream_channel(stall: Duration) -> (StreamSender, Response<AgentBody>) {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let last = Arc::new(Mutex::new(None));
    let body = StreamBody {
        rx,
        last: last.clone(),
        done: false,
    };
    let mut r = Response::new(AgentBody::Stream(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    (StreamSender { tx, last, stall }, r)
}

impl StreamSender {
    /// Sends one frame in order.
    pub async fn send(&self, b: Bytes) -> Result<(), SendError> {
        match tokio::time::timeout(self.stall, self.tx.send(b)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendError::Gone),
            Err(_) => Err(SendError::Stalled),
        }
    }

    /// Ends the stream with `last` ahead of anything still queued (a stalled client
    /// gets the reason if it ever reads again; the connection is closed if it does not).
    pub fn abandon(self, last: Bytes) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(last);
    }

    /// Resolves when the client is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// The stall timeout.
    pub fn stall(&self) -> Duration {
        self.stall
    }
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
            AgentBody::Stream(s) => s.poll(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, AgentBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AgentBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            AgentBody::Full(None) => SizeHint::with_exact(0),
            AgentBody::Chan(_) | AgentBody::Stream(_) => SizeHint::default(),
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

/// A 200 unary response with the message as JSON, refused when it would not fit the
/// largest answer a client reads.
pub fn unary_ok<T: Serialize>(msg: &T) -> Response<AgentBody> {
    match serde_json::to_vec(msg) {
        Ok(v) => unary_json(v),
        Err(e) => unary_err(&EnvdError::new(Code::Internal, e.to_string())),
    }
}

/// A 200 unary response with an already serialized message (same size check).
pub fn unary_json(v: Vec<u8>) -> Response<AgentBody> {
    if v.len() > MAX_UNARY_ANSWER {
        return unary_err(
            &EnvdError::new(
                Code::ResourceExhausted,
                format!(
                    "the answer ({} bytes) is larger than the largest answer ({} MiB)",
                    v.len(),
                    MAX_UNARY_ANSWER >> 20
                ),
            )
            .with_reason(Reason::TooLarge),
        );
    }
    json_response(StatusCode::OK, v)
}

fn with_reason(mut r: Response<AgentBody>, err: &EnvdError) -> Response<AgentBody> {
    if let Some(reason) = err.reason {
        r.headers_mut().insert(
            REASON_HEADER,
            hyper::header::HeaderValue::from_static(reason.as_str()),
        );
    }
    r
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A unary error: non-2xx status with `{"code","message"}`, the reason in a header.
pub fn unary_err(err: &EnvdError) -> Response<AgentBody> {
    with_reason(
        json_response(status(err.code.http_status()), err.connect_json()),
        err,
    )
}

/// Errors answered by the REST endpoints (`/files`, `/init`).
pub trait RestResponse {
    /// envd's status and `{"code": <status>, "message"}`, the reason in a header.
    fn rest_response(&self) -> Response<AgentBody>;
}

impl RestResponse for EnvdError {
    fn rest_response(&self) -> Response<AgentBody> {
        with_reason(
            json_response(status(self.rest_status()), self.rest_json()),
            self,
        )
    }
}

/// A streaming call that failed before it started: 200 with only the end-of-stream error.
pub fn stream_err(err: &EnvdError) -> Response<AgentBody> {
    let mut r = Response::new(AgentBody::full(codec::end_stream(Some(err))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    r
}

/// Reads a whole body, refusing more than `max` bytes.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, EnvdError> {
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(EnvdError::new(
                    Code::ResourceExhausted,
                    format!("request body larger than {max} bytes"),
                )
                .with_reason(Reason::TooLarge))
            } else {
                Err(EnvdError::new(
                    Code::Canceled,
                    format!("reading request: {e}"),
                ))
            }
        }
    }
}

/// Parses a JSON message; an empty body is the empty message.
pub fn parse_json<T: DeserializeOwned>(b: &[u8]) -> Result<T, EnvdError> {
    let b = if b.iter().all(|c| c.is_ascii_whitespace()) {
        &b"{}"[..]
    } else {
        b
    };
    serde_json::from_slice(b)
        .map_err(|e| EnvdError::new(Code::InvalidArgument, format!("invalid request: {e}")))
}

/// Reads the single request message of a server-streaming call.
pub async fn read_stream_request<T: DeserializeOwned>(body: Incoming) -> Result<T, EnvdError> {
    let b = read_body(body, MAX_MESSAGE + codec::HEADER_LEN).await?;
    let mut d = EnvelopeDecoder::new(MAX_MESSAGE);
    d.push(&b);
    match d.next_envelope()? {
        Some(envelope) => parse_json(&envelope.payload),
        None if b.is_empty() => parse_json(b"{}"),
        None => Err(EnvdError::new(
            Code::InvalidArgument,
            "truncated request envelope",
        )),
    }
}
