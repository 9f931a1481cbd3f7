//! Varint-length-prefixed protobuf frames.
//!
//! The contract (as in wtransport-proto and mini-redis): `Ok(None)` means "need more
//! bytes", `Err` means the input is bad. A frame longer than the limit is never
//! buffered: [`FrameDecoder`] skips its body as it arrives, so a peer cannot make the
//! server hold more than `max_frame_size` plus one read of bytes per stream.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

/// The longest encoding of a u64 varint.
const MAX_VARINT_LEN: usize = 10;

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the configured maximum. The frame's
    /// bytes are skipped; the stream stays usable.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// The frame's bytes are not the expected protobuf message. The frame is consumed;
    /// the stream stays usable.
    #[error("frame does not decode: {0}")]
    Malformed(String),
    /// The length prefix is not a valid varint. The stream cannot be resynchronised.
    #[error("invalid length prefix")]
    BadLength,
}

impl FrameError {
    /// Whether the stream can go on after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FrameError::BadLength)
    }
}

/// Appends `msg` to `buf` as one frame.
pub fn encode_frame<M: Message>(msg: &M, buf: &mut BytesMut) {
    let len = msg.encoded_len();
    buf.reserve(len + MAX_VARINT_LEN);
    prost::encoding::encode_varint(len as u64, buf);
    msg.encode(buf)
        .expect("BytesMut grows, so encoding cannot run out of room");
}

/// `msg` as one length-prefixed frame, in a buffer of its own (to share one
/// encoding among many streams).
pub fn encoded_frame<M: Message>(msg: &M) -> bytes::Bytes {
    let mut buf = BytesMut::with_capacity(msg.encoded_len() + MAX_VARINT_LEN);
    encode_frame(msg, &mut buf);
    buf.freeze()
}

/// Reads the varint at the start of `buf` without consuming it.
/// `Ok(None)`: incomplete; `Ok(Some((value, prefix_len)))` otherwise.
fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err(FrameError::BadLength)
    } else {
        Ok(None)
    }
}

/// Decodes one frame from the front of `buf`, consuming it.
///
/// `Ok(None)` leaves `buf` untouched until a whole frame is there. On
/// [`FrameError::TooLarge`] nothing is consumed: callers that want to go on use
/// [`FrameDecoder`], which skips the frame.
pub fn decode_frame<M: Message + Default>(
    buf: &mut BytesMut,
    max_frame_size: usize,
) -> Result<Option<M>, FrameError> {
    let Some((len, prefix)) = peek_varint(buf)? else {
        return Ok(None);
    };
    if len > max_frame_size as u64 {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_size,
        });
    }
    let len = len as usize;
    if buf.len() < prefix + len {
        buf.reserve(prefix + len - buf.len());
        return Ok(None);
    }
    buf.advance(prefix);
    let body = buf.split_to(len).freeze();
    M::decode(body)
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// An incremental decoder for one stream: feed it bytes with [`extend`](Self::extend),
/// take frames with [`decode`](Self::decode).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_size: usize,
    /// Bytes of an oversize frame still to be thrown away.
    skip: u64,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame_size` bytes.
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame_size,
            skip: 0,
        }
    }

    /// Adds bytes read from the stream. Bytes of a frame being skipped are dropped here.
    pub fn extend(&mut self, mut data: &[u8]) {
        if self.skip > 0 {
            let n = self.skip.min(data.len() as u64) as usize;
            self.skip -= n as u64;
            data = &data[n..];
        }
        self.buf.put_slice(data);
    }

    /// Bytes held, waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next frame, `Ok(None)` if more bytes are needed.
    ///
    /// After a non-fatal error the decoder has dropped the bad frame and can be
    /// called again.
    pub fn decode<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        match decode_frame(&mut self.buf, self.max_frame_size) {
            Err(FrameError::TooLarge { len, max }) => {
                let (_, prefix) = peek_varint(&self.buf)?.expect("the prefix was just read");
                self.buf.advance(prefix);
                let here = (self.buf.len() as u64).min(len);
                self.buf.advance(here as usize);
                self.skip = len - here;
                Err(FrameError::TooLarge { len, max })
            }
            Ok(Some(m)) => {
                // A session's decoder waits empty most of its life: it keeps no
                // allocation then (the next bytes bring their own).
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                Ok(Some(m))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v1::{ClientFrame, EchoRequest, Hello, Request, client_frame, request};

    fn echo(id: u64, payload: &[u8]) -> ClientFrame {
        ClientFrame {
            kind: Some(client_frame::Kind::Request(Request {
                id,
                body: Some(request::Body::Echo(EchoRequest {
                    payload: payload.to_vec().into(),
                    push: false,
                })),
            })),
        }
    }

    fn encoded(frames: &[ClientFrame]) -> BytesMut {
        let mut buf = BytesMut::new();
        for f in frames {
            encode_frame(f, &mut buf);
        }
        buf
    }

    #[test]
    fn round_trip() {
        let frame = ClientFrame {
            kind: Some(client_frame::Kind::Hello(Hello {
                token: "t".into(),
                ..Default::default()
            })),
        };
        let mut buf = encoded(std::slice::from_ref(&frame));
        assert_eq!(decode_frame::<ClientFrame>(&mut buf, 1024), Ok(Some(frame)));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_need_more_bytes_byte_by_byte() {
        let frame = echo(7, &[0xab; 300]); // a two-byte length prefix
        let all = encoded(std::slice::from_ref(&frame));
        let mut dec = FrameDecoder::new(1024);
        for (i, b) in all.iter().enumerate() {
            assert_eq!(dec.decode::<ClientFrame>(), Ok(None), "at byte {i}");
            dec.extend(&[*b]);
        }
        assert_eq!(dec.decode::<ClientFrame>(), Ok(Some(frame)));
        assert_eq!(dec.decode::<ClientFrame>(), Ok(None));
        assert_eq!(dec.buffered(), 0);
        assert_eq!(dec.buf.capacity(), 0, "an emptied decoder keeps no buffer");
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let frames: Vec<_> = (1..=5).map(|i| echo(i, b"hi")).collect();
        let mut buf = encoded(&frames);
        for f in &frames {
            assert_eq!(
                decode_frame::<ClientFrame>(&mut buf, 64),
                Ok(Some(f.clone()))
            );
        }
        assert_eq!(decode_frame::<ClientFrame>(&mut buf, 64), Ok(None));
    }

    #[test]
    fn oversize_is_an_error_and_is_skipped_without_buffering() {
        let big = echo(1, &[1; 5000]);
        let small = echo(2, b"after");
        let all = encoded(&[big, small.clone()]);
        let mut dec = FrameDecoder::new(1000);
        // Feed in small chunks: the oversize body must never accumulate.
        let mut errors = 0;
        let mut got = Vec::new();
        for chunk in all.chunks(100) {
            dec.extend(chunk);
            assert!(dec.buffered() <= 1000 + 100, "buffered {}", dec.buffered());
            loop {
                match dec.decode::<ClientFrame>() {
                    Ok(Some(f)) => got.push(f),
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max }) => {
                        assert!(len > 5000 && max == 1000);
                        errors += 1;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
        assert_eq!(errors, 1);
        assert_eq!(got, vec![small]);
    }

    #[test]
    fn oversize_prefix_alone_is_enough_to_refuse() {
        let mut buf = BytesMut::new();
        prost::encoding::encode_varint(1 << 40, &mut buf);
        let err = decode_frame::<ClientFrame>(&mut buf, 1 << 20).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 1 << 40,
                max: 1 << 20
            }
        );
        assert!(!err.is_fatal());
    }

    #[test]
    fn garbage_body_is_malformed_and_the_stream_goes_on() {
        let mut dec = FrameDecoder::new(1024);
        // Length 3, then bytes that are not a valid protobuf message (field 0 is invalid).
        dec.extend(&[3, 0x00, 0xff, 0xff]);
        let after = echo(9, b"ok");
        dec.extend(&encoded(std::slice::from_ref(&after)));
        assert!(matches!(
            dec.decode::<ClientFrame>(),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(dec.decode::<ClientFrame>(), Ok(Some(after)));
    }

    #[test]
    fn a_length_prefix_longer_than_ten_bytes_is_fatal() {
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&[0xff; 11]);
        let err = dec.decode::<ClientFrame>().unwrap_err();
        assert_eq!(err, FrameError::BadLength);
        assert!(err.is_fatal());
    }

    #[test]
    fn zero_length_frame_is_the_default_message() {
        let mut buf = BytesMut::from(&[0u8][..]);
        assert_eq!(
            decode_frame::<ClientFrame>(&mut buf, 16),
            Ok(Some(ClientFrame::default()))
        );
    }
}
