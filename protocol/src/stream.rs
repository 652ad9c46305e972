//! Splitting a byte stream into frames (`type | length | payload`).
//!
//! [`FrameDecoder`] is fed the chunks a QUIC stream delivers, of any size,
//! and hands out whole frames. When a frame lies inside one chunk it is
//! sliced out without copying, so a relay can forward the very bytes it
//! received to every member.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use crate::coding::{get_varint, varint_len};
use crate::error::DecodeError;

/// One frame cut from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type.
    pub kind: u64,
    /// The payload.
    pub payload: Bytes,
    /// The whole frame as it was on the wire (type, length and payload),
    /// sharing memory with `payload`; forward this to re-send the message.
    pub raw: Bytes,
}

/// Accumulates stream chunks and cuts them into frames.
#[derive(Debug)]
pub struct FrameDecoder {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    max_payload: usize,
}

impl FrameDecoder {
    /// A decoder that refuses payloads longer than `max_payload` bytes.
    pub fn new(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            chunks: VecDeque::new(),
            buffered: 0,
            max_payload,
        }
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The longest payload accepted.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Changes the longest payload accepted, from the next frame on (a
    /// relay reads the hello with a small limit, then the full one).
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_payload = max_payload;
    }

    /// The next whole frame, `None` if more bytes are needed, or an error if
    /// the stream announces a frame longer than allowed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let Some((kind, header_len, payload_len)) = self.peek_header()? else {
            return Ok(None);
        };
        let total = header_len + payload_len;
        if self.buffered < total {
            return Ok(None);
        }
        let raw = self.take(total);
        let payload = raw.slice(header_len..);
        Ok(Some(Frame { kind, payload, raw }))
    }

    /// Reads the type and length without consuming them.
    fn peek_header(&self) -> Result<Option<(u64, usize, usize)>, DecodeError> {
        // The header is at most 16 bytes; copy that much into a small buffer
        // so it may span chunks.
        let mut head = [0u8; 16];
        let mut filled = 0;
        for chunk in &self.chunks {
            let n = (head.len() - filled).min(chunk.len());
            head[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == head.len() {
                break;
            }
        }
        let mut cursor = &head[..filled];
        let kind = match get_varint(&mut cursor) {
            Ok(k) => k,
            Err(DecodeError::Short) => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = match get_varint(&mut cursor) {
            Ok(l) => l,
            Err(DecodeError::Short) => return Ok(None),
            Err(e) => return Err(e),
        };
        if len > self.max_payload as u64 {
            return Err(DecodeError::TooLong {
                field: "message",
                len,
                cap: self.max_payload,
            });
        }
        Ok(Some((
            kind,
            varint_len(kind) + varint_len(len),
            len as usize,
        )))
    }

    /// Removes `n` buffered bytes, without copying when they lie in one
    /// chunk.
    fn take(&mut self, n: usize) -> Bytes {
        self.buffered -= n;
        let front = self
            .chunks
            .front_mut()
            .expect("caller checked buffered >= n");
        if front.len() >= n {
            let out = front.split_to(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let front = self
                .chunks
                .front_mut()
                .expect("caller checked buffered >= n");
            let k = (n - out.len()).min(front.len());
            out.extend_from_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ClipMessage, encode_frame};

    #[test]
    fn frames_split_across_chunks_of_every_size_reassemble() {
        let mut wire = BytesMut::new();
        for i in 0..20u32 {
            encode_frame(&mut wire, i, &vec![i as u8; (i * 37 % 300) as usize]);
        }
        let wire = wire.freeze();
        for step in [1, 2, 3, 7, 64, 1000] {
            let mut dec = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                dec.push(Bytes::copy_from_slice(piece));
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(ClipMessage::decode(f.kind, f.payload).unwrap());
                }
            }
            assert_eq!(got.len(), 20, "step {step}");
            for (i, m) in got.iter().enumerate() {
                let ClipMessage::Frame { index, data } = m else {
                    panic!("not a frame")
                };
                assert_eq!(*index as usize, i);
                assert_eq!(data.len(), i * 37 % 300);
            }
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn a_frame_inside_one_chunk_is_not_copied() {
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, 0, &[5; 100]);
        let wire = wire.freeze();
        let mut dec = FrameDecoder::new(1024);
        dec.push(wire.clone());
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!(f.raw.as_ptr(), wire.as_ptr());
        assert_eq!(f.raw, wire);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(100);
        dec.push(Bytes::from_static(&[0x39, 0x80, 0x01, 0x00, 0x00]));
        assert!(matches!(dec.next_frame(), Err(DecodeError::TooLong { .. })));
    }
}
