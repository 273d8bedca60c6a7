//! Connect's streaming framing (JSON codec): envelopes of one flag byte, a 4-byte
//! big-endian length and the message; the last one (flag [`FLAG_END_STREAM`]) holds `{}`
//! or `{"error": {...}, "metadata": {...}}`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::error::{Code, EnvdError, Reason, REASON_HEADER};

/// Envelope flag: the message is compressed (never sent, refused when received).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: end of stream.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Bytes before an envelope's message.
pub const HEADER_LEN: usize = 5;

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Its flags.
    pub flags: u8,
    /// Its message.
    pub payload: Bytes,
}

impl Envelope {
    /// True for the end-of-stream envelope.
    pub fn is_end(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }

    /// For the end-of-stream envelope: `Ok` for a clean end, the error otherwise.
    pub fn end_result(&self) -> Result<(), EnvdError> {
        parse_end_stream(&self.payload)
    }
}

/// Frames one message.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
    b.put_u8(flags);
    // Messages are capped far below 4 GiB by both ends (see `EnvelopeDecoder`).
    b.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    b.put_slice(payload);
    b.freeze()
}

/// Frames `msg` as a JSON stream message.
pub fn message_envelope<T: Serialize>(msg: &T) -> Bytes {
    envelope(
        0,
        &serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// The end-of-stream envelope: `{}` or the error, its reason in the metadata.
pub fn end_stream(err: Option<&EnvdError>) -> Bytes {
    let body = match err {
        None => serde_json::json!({}),
        Some(e) => {
            let mut body = serde_json::json!({
                "error": {"code": e.code.as_str(), "message": e.message}
            });
            if let (Some(reason), Some(obj)) = (e.reason, body.as_object_mut()) {
                obj.insert(
                    "metadata".into(),
                    serde_json::json!({ REASON_HEADER: [reason.as_str()] }),
                );
            }
            body
        }
    };
    envelope(FLAG_END_STREAM, body.to_string().as_bytes())
}

/// Reads an end-of-stream message: `Ok` for a clean end.
pub fn parse_end_stream(payload: &[u8]) -> Result<(), EnvdError> {
    let v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        EnvdError::new(
            Code::Internal,
            format!("unreadable end-of-stream message: {e}"),
        )
    })?;
    let Some(err) = v.get("error") else {
        return Ok(());
    };
    let code = err
        .get("code")
        .and_then(|c| c.as_str())
        .map_or(Code::Unknown, Code::parse);
    let message = err
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    let reason = v
        .pointer(&format!("/metadata/{REASON_HEADER}/0"))
        .and_then(|r| r.as_str())
        .and_then(Reason::parse);
    Err(EnvdError {
        code,
        message,
        reason,
    })
}

/// Incremental decoder of a stream of envelopes (bodies arrive in any chunks), refusing
/// messages over a cap and compressed ones.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max: usize,
}

impl EnvelopeDecoder {
    /// A decoder accepting messages of up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds bytes.
    pub fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Takes the next complete envelope, if one is buffered.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvdError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(EnvdError::new(
                Code::ResourceExhausted,
                format!("a message of {len} bytes is larger than {}", self.max),
            )
            .with_reason(Reason::TooLarge));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvdError::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some(Envelope {
            flags,
            payload: self.buf.split_to(len).freeze(),
        }))
    }

    /// Bytes buffered but not yet a whole envelope.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_envelopes_are_reassembled() {
        let mut all = envelope(0, b"{\"a\":1}").to_vec();
        all.extend_from_slice(&end_stream(None));
        let mut d = EnvelopeDecoder::new(1 << 20);
        let mut got = Vec::new();
        for chunk in all.chunks(3) {
            d.push(chunk);
            while let Ok(Some(m)) = d.next_envelope() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], b"{\"a\":1}");
        assert!(got[1].is_end());
        assert_eq!(got[1].end_result(), Ok(()));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn the_end_of_stream_carries_code_and_reason() {
        let err = EnvdError::new(Code::ResourceExhausted, "disk").with_reason(Reason::StorageFull);
        let mut d = EnvelopeDecoder::new(1 << 20);
        d.push(&end_stream(Some(&err)));
        let end = d.next_envelope().ok().flatten().expect("one envelope");
        assert!(end.is_end());
        assert_eq!(end.end_result(), Err(err));
    }

    #[test]
    fn oversized_and_compressed_messages_are_refused() {
        let mut d = EnvelopeDecoder::new(4);
        d.push(&envelope(0, b"12345"));
        assert_eq!(
            d.next_envelope().map_err(|e| e.code),
            Err(Code::ResourceExhausted)
        );
        let mut d = EnvelopeDecoder::new(64);
        d.push(&envelope(FLAG_COMPRESSED, b"x"));
        assert_eq!(
            d.next_envelope().map_err(|e| e.code),
            Err(Code::Unimplemented)
        );
    }
}
