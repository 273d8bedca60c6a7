//! Streams from the agent: Connect envelopes of a process's events, and file downloads.
//!
//! Memory is bounded (one message at a time is buffered, with a cap), and a stream that
//! carries nothing for [`STREAM_IDLE`] (not even the keepalives the client asks for)
//! ends with an error instead of hanging, so a killed or frozen sandbox cannot hold a
//! caller.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use envd_proto::codec::EnvelopeDecoder;
use envd_proto::messages::{DataEvent, EndEvent, ProcessEvent, ProcessEventMessage};
use futures_util::{Stream, StreamExt};

use super::errors::{from_envd, unavailable, unreadable};
use crate::error::{Error, Result};

/// Largest single stream message accepted (the agent sends output in 32 KiB chunks).
pub const MAX_STREAM_MESSAGE: usize = 16 << 20;
/// A stream silent for this long (no output, no keepalive) is treated as dead.
pub const STREAM_IDLE: Duration = Duration::from_secs(20);

/// What a whole command produced (see [`ProcessStream::collect_output`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessOutput {
    /// Pid from the start event.
    pub pid: Option<u32>,
    /// Standard output (or pty output), up to the cap.
    pub stdout: Vec<u8>,
    /// Standard error, up to the cap.
    pub stderr: Vec<u8>,
    /// Output bytes dropped because the cap was reached.
    pub truncated: u64,
    /// The end event.
    pub end: EndEvent,
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Decodes Connect envelopes from a streaming response.
pub(crate) struct EnvelopeReader {
    body: ByteStream,
    decoder: EnvelopeDecoder,
    done: bool,
    timeout: Option<Duration>,
    addr: SocketAddr,
}

impl EnvelopeReader {
    pub(crate) fn new(
        resp: reqwest::Response,
        timeout: Option<Duration>,
        addr: SocketAddr,
    ) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            decoder: EnvelopeDecoder::new(MAX_STREAM_MESSAGE),
            done: false,
            timeout,
            addr,
        }
    }

    fn dead(&mut self, why: String) -> Option<Result<Bytes>> {
        self.done = true;
        Some(Err(unavailable(format!(
            "the stream from the sandbox agent at {} broke: {why}",
            self.addr
        ))))
    }

    /// The next message; `None` after a clean end of stream.
    async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            match self.decoder.next_envelope() {
                Err(e) => return self.dead(e.to_string()),
                Ok(Some(envelope)) if envelope.is_end() => {
                    self.done = true;
                    return envelope
                        .end_result()
                        .err()
                        .map(|e| Err(from_envd(e, self.timeout)));
                }
                Ok(Some(envelope)) => return Some(Ok(envelope.payload)),
                Ok(None) => {}
            }
            match tokio::time::timeout(STREAM_IDLE, self.body.next()).await {
                Err(_) => {
                    return self.dead(format!(
                        "nothing (not even a keepalive) for {STREAM_IDLE:?}; the sandbox may \
                         be paused or gone"
                    ))
                }
                Ok(None) => {
                    return self.dead(
                        "it ended without an end-of-stream message (was the sandbox killed?)"
                            .into(),
                    )
                }
                Ok(Some(Err(e))) => return self.dead(e.to_string()),
                Ok(Some(Ok(chunk))) => self.decoder.push(&chunk),
            }
        }
    }
}

/// The events of one process (Start or Connect), read as they arrive.
///
/// Memory is bounded: one message at a time is buffered, and the agent cannot send faster
/// than it is read (HTTP flow control).
pub struct ProcessStream {
    pub(crate) reader: EnvelopeReader,
}

impl fmt::Debug for ProcessStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessStream")
            .field("addr", &self.reader.addr)
            .finish_non_exhaustive()
    }
}

impl ProcessStream {
    /// The next event (keepalives included); `None` after the end of the stream. An
    /// error (deadline, killed sandbox, broken stream) is the last item.
    pub async fn next(&mut self) -> Option<Result<ProcessEvent>> {
        let msg = match self.reader.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        Some(
            serde_json::from_slice::<ProcessEventMessage>(&msg)
                .map(|m| m.event)
                .map_err(|e| unreadable("process event", e)),
        )
    }

    /// The events as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<ProcessEvent>> + Send {
        futures_util::stream::unfold(self, |mut s| async move { s.next().await.map(|e| (e, s)) })
    }

    /// Reads to the end, keeping at most `max_output` bytes of stdout and stderr each
    /// (the rest is counted in `truncated`). Fails when the stream ends with an error or
    /// without an end event.
    pub async fn collect_output(mut self, max_output: usize) -> Result<ProcessOutput> {
        let mut out = ProcessOutput::default();
        let keep = |buf: &mut Vec<u8>, data: Vec<u8>, dropped: &mut u64| {
            let room = max_output.saturating_sub(buf.len());
            let n = data.len().min(room);
            buf.extend_from_slice(&data[..n]);
            *dropped += (data.len() - n) as u64;
        };
        let mut ended = false;
        while let Some(event) = self.next().await {
            match event? {
                ProcessEvent::Start { pid } => out.pid = Some(pid),
                ProcessEvent::Data(DataEvent::Stdout(d) | DataEvent::Pty(d)) => {
                    keep(&mut out.stdout, d, &mut out.truncated)
                }
                ProcessEvent::Data(DataEvent::Stderr(d)) => {
                    keep(&mut out.stderr, d, &mut out.truncated)
                }
                ProcessEvent::End(end) => {
                    out.end = end;
                    ended = true;
                }
                ProcessEvent::Keepalive {} => {}
            }
        }
        if ended {
            Ok(out)
        } else {
            Err(unavailable("the process stream ended without an end event"))
        }
    }
}

/// A file's contents as they arrive from the agent.
pub struct FileStream {
    len: Option<u64>,
    body: ByteStream,
    addr: SocketAddr,
}

impl FileStream {
    pub(crate) fn new(resp: reqwest::Response, addr: SocketAddr) -> Self {
        Self {
            len: resp.content_length(),
            body: Box::pin(resp.bytes_stream()),
            addr,
        }
    }
}

impl fmt::Debug for FileStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStream")
            .field("len", &self.len)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FileStream {
    /// The size, when the agent announced it.
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// Whether the agent announced an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == Some(0)
    }

    /// The next chunk; `None` at the end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        match tokio::time::timeout(STREAM_IDLE, self.body.next()).await {
            Err(_) => Some(Err(unavailable(format!(
                "the file download from the sandbox agent at {} stalled",
                self.addr
            )))),
            Ok(None) => None,
            Ok(Some(Ok(b))) => Some(Ok(b)),
            Ok(Some(Err(e))) => Some(Err(unavailable(format!("the file download broke: {e}")))),
        }
    }

    /// The chunks as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes>> + Send {
        futures_util::stream::unfold(
            self,
            |mut s| async move { s.next_chunk().await.map(|c| (c, s)) },
        )
    }

    /// Reads the whole file, refusing one larger than `max` bytes.
    pub async fn read_to_end(mut self, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len.unwrap_or(0).min(max as u64) as usize);
        while let Some(chunk) = self.next_chunk().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > max {
                return Err(Error::TooLarge(format!(
                    "the file is larger than {max} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}
