//! The one framed reader every stream uses: reads chunks from a stream,
//! cuts them into frames with [`FrameDecoder`], and decodes control or clip
//! messages.
//!
//! [`FramedReader`] knows nothing of the transport: anything that hands out
//! chunks of bytes is a [`ChunkSource`] (a QUIC receive stream with the
//! `quinn` feature, a WebTransport stream, a test buffer). Its state lives
//! in the struct, not in the futures it returns, so a read may be
//! cancelled (by `tokio::select!` or a timeout) without losing bytes.

use std::future::Future;

use bytes::Bytes;

use crate::error::{DecodeError, ErrorCode};
use crate::message::{ClipMessage, ControlMessage};
use crate::stream::{Frame, FrameDecoder};

/// A stream that hands out chunks of bytes (a QUIC receive stream, a
/// WebTransport stream, a test buffer).
pub trait ChunkSource {
    /// Why the stream failed (reset by the peer, connection lost).
    type Error: std::fmt::Display + Send;

    /// The next chunk of at most `max` bytes, in stream order; `Ok(None)`
    /// once the peer finished the stream (FIN) and every byte was read.
    ///
    /// Must be cancel-safe: a future dropped before it completes must not
    /// lose bytes (quinn's `RecvStream::read_chunk` is).
    fn read_chunk(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<Bytes>, Self::Error>> + Send;
}

/// Why a [`FramedReader`] could not return the next message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    /// The bytes do not decode: a frame longer than allowed
    /// ([`DecodeError::TooLong`], found from the frame's header before its
    /// payload is read), or a payload that is not a valid message.
    ///
    /// Only a [`DecodeError::InvalidField`] (see
    /// [`ReadError::request_id`]) leaves the stream usable: that frame was
    /// read whole and the next call reads the one after it. Any other
    /// decode error is fatal for the stream.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The peer finished the stream (FIN) in the middle of a frame. On a
    /// clip stream this is a FIN before ClipEnd (PROTOCOL.md, section 5).
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The stream itself failed (reset, connection lost).
    #[error("stream error: {0}")]
    Stream(E),
}

impl<E> ReadError<E> {
    /// The wire code for this error: the decode error's code (`TooLarge`,
    /// `InvalidRequest` or `Protocol`), `Protocol` for
    /// [`ReadError::Truncated`], `None` for a stream error (nothing to
    /// tell the peer: the stream or connection is already gone).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ReadError::Decode(e) => Some(e.code()),
            ReadError::Truncated => Some(ErrorCode::Protocol),
            ReadError::Stream(_) => None,
        }
    }

    /// For an error that refuses one request and leaves the stream usable
    /// ([`DecodeError::InvalidField`]), the request to answer with
    /// `Error { request_id, InvalidRequest }`.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            ReadError::Decode(e) => e.request_id(),
            _ => None,
        }
    }
}

/// The longest frame header: a type and a length, 8 bytes each at most.
const MAX_HEADER_LEN: usize = 16;

/// Reads frames and messages from a [`ChunkSource`]; cancel-safe.
#[derive(Debug)]
pub struct FramedReader<S> {
    source: S,
    decoder: FrameDecoder,
    /// The source said FIN; do not read it again.
    finished: bool,
}

impl<S: ChunkSource> FramedReader<S> {
    /// A reader of `source` that refuses frames whose payload is longer
    /// than `max_payload` bytes.
    pub fn new(source: S, max_payload: usize) -> Self {
        FramedReader {
            source,
            decoder: FrameDecoder::new(max_payload),
            finished: false,
        }
    }

    /// The next whole frame. `Ok(None)`: the peer finished the stream at a
    /// frame boundary. A frame announcing a payload over the limit is
    /// refused ([`DecodeError::TooLong`]) as soon as its header is in,
    /// before its payload is read.
    ///
    /// Cancel-safe: dropping the future loses nothing; the next call
    /// carries on where this one stopped.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ReadError<S::Error>> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            if self.finished {
                return match self.decoder.buffered() {
                    0 => Ok(None),
                    _ => Err(ReadError::Truncated),
                };
            }
            // A chunk never needs to be larger than one whole frame.
            let max = self.decoder.max_payload().saturating_add(MAX_HEADER_LEN);
            match self.source.read_chunk(max).await {
                Ok(Some(chunk)) => self.decoder.push(chunk),
                Ok(None) => self.finished = true,
                Err(e) => return Err(ReadError::Stream(e)),
            }
        }
    }

    /// The next control message. Unknown types come back as
    /// [`ControlMessage::Unknown`]: after the welcome they are skipped,
    /// before the hello they are an error; the caller knows which.
    /// Cancel-safe.
    pub async fn next_control(&mut self) -> Result<Option<ControlMessage>, ReadError<S::Error>> {
        let Some(frame) = self.next_frame().await? else {
            return Ok(None);
        };
        Ok(Some(ControlMessage::decode(frame.kind, frame.payload)?))
    }

    /// The next clip message, with the frame it came in: `frame.raw` is the
    /// message as it was on the wire, to forward without re-encoding (and,
    /// when it arrived in one chunk, without copying). Cancel-safe.
    pub async fn next_clip(&mut self) -> Result<Option<(ClipMessage, Frame)>, ReadError<S::Error>> {
        let Some(frame) = self.next_frame().await? else {
            return Ok(None);
        };
        let message = ClipMessage::decode(frame.kind, frame.payload.clone())?;
        Ok(Some((message, frame)))
    }
}

impl<S> FramedReader<S> {
    /// Changes the longest payload accepted, from the next frame on.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.decoder.set_max_payload(max_payload);
    }

    /// Bytes read from the source but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// The source.
    pub fn get_ref(&self) -> &S {
        &self.source
    }

    /// The source, to act on the stream (stop it, read its id). Reading
    /// from it directly would take bytes away from the reader.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The source; bytes buffered but not yet returned as frames are lost.
    pub fn into_inner(self) -> S {
        self.source
    }
}

#[cfg(feature = "quinn")]
impl ChunkSource for quinn::RecvStream {
    type Error = quinn::ReadError;

    async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, quinn::ReadError> {
        let chunk = quinn::RecvStream::read_chunk(self, max, true).await?;
        Ok(chunk.map(|c| c.bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::coding::{put_string, put_varint};
    use crate::ids::ClipId;
    use crate::message::{ClipFormat, ClipHeader, MAX_PAYLOAD_LEN, kind};

    /// What the scripted source does on each read.
    enum Step {
        Data(Bytes),
        /// Not ready this time (the next poll goes on with the next step).
        Pending,
        Fail(&'static str),
    }

    /// An in-memory stream; FIN after the last step.
    struct Script {
        steps: VecDeque<Step>,
        /// The largest `max` a read asked for.
        largest_max: usize,
    }

    impl Script {
        fn new(steps: impl IntoIterator<Item = Step>) -> Script {
            Script {
                steps: steps.into_iter().collect(),
                largest_max: 0,
            }
        }

        /// `wire` cut at the given offsets.
        fn cut(wire: &Bytes, cuts: &[usize]) -> Script {
            let mut at = 0;
            let mut steps = Vec::new();
            for &c in cuts.iter().chain([wire.len()].iter()) {
                steps.push(Step::Data(wire.slice(at..c)));
                at = c;
            }
            Script::new(steps)
        }
    }

    impl ChunkSource for Script {
        type Error = &'static str;

        fn read_chunk(
            &mut self,
            max: usize,
        ) -> impl Future<Output = Result<Option<Bytes>, &'static str>> + Send {
            self.largest_max = self.largest_max.max(max);
            std::future::poll_fn(move |_| match self.steps.pop_front() {
                Some(Step::Pending) => Poll::Pending,
                Some(Step::Data(mut data)) => {
                    if data.len() > max {
                        let rest = data.split_off(max);
                        self.steps.push_front(Step::Data(rest));
                    }
                    Poll::Ready(Ok(Some(data)))
                }
                Some(Step::Fail(e)) => Poll::Ready(Err(e)),
                None => Poll::Ready(Ok(None)),
            })
        }
    }

    /// Runs a future to completion, polling again whenever it is pending.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    fn header() -> ClipMessage {
        ClipMessage::Header(ClipHeader {
            group: "team-1".into(),
            clip_id: ClipId::from_bytes([9; 16]),
            talker: String::new(),
            seq: 0,
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms: 1_767_225_600_123,
            flags: 0,
        })
    }

    /// A clip stream: header, three frames (one with a 2-byte length), end.
    fn clip_messages() -> Vec<ClipMessage> {
        vec![
            header(),
            ClipMessage::Frame {
                index: 0,
                data: Bytes::from_static(&[1, 2, 3]),
            },
            ClipMessage::Frame {
                index: 1,
                data: Bytes::from(vec![7; 300]),
            },
            ClipMessage::Frame {
                index: 2,
                data: Bytes::new(),
            },
            ClipMessage::End {
                frame_count: 3,
                seq: 0,
                waveform: Bytes::from_static(&[0, 31]),
            },
        ]
    }

    fn wire(messages: &[ClipMessage]) -> Bytes {
        let mut buf = BytesMut::new();
        for m in messages {
            m.encode(&mut buf);
        }
        buf.freeze()
    }

    fn read_all(reader: &mut FramedReader<Script>) -> Result<Vec<ClipMessage>, String> {
        let mut got = Vec::new();
        loop {
            match block_on(reader.next_clip()) {
                Ok(Some((message, frame))) => {
                    assert_eq!(frame.raw, message.to_bytes());
                    got.push(message);
                }
                Ok(None) => return Ok(got),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    #[test]
    fn frames_split_at_every_byte_position_reassemble() {
        let messages = clip_messages();
        let wire = wire(&messages);
        for cut in 0..=wire.len() {
            let mut reader = FramedReader::new(Script::cut(&wire, &[cut]), MAX_PAYLOAD_LEN);
            assert_eq!(read_all(&mut reader), Ok(messages.clone()), "cut at {cut}");
            // FIN is sticky.
            assert!(matches!(block_on(reader.next_frame()), Ok(None)));
        }
        // And one byte at a time.
        let cuts: Vec<usize> = (1..wire.len()).collect();
        let mut reader = FramedReader::new(Script::cut(&wire, &cuts), MAX_PAYLOAD_LEN);
        assert_eq!(read_all(&mut reader), Ok(messages));
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn fin_inside_a_frame_is_truncated() {
        let messages = clip_messages();
        let whole = wire(&messages);
        let last_len = messages.last().unwrap().to_bytes().len();
        // Every cut inside the last frame, its header included.
        for len in whole.len() - last_len + 1..whole.len() {
            let cut = whole.slice(..len);
            let mut reader = FramedReader::new(Script::cut(&cut, &[]), MAX_PAYLOAD_LEN);
            for expected in &messages[..messages.len() - 1] {
                let (got, _) = block_on(reader.next_clip()).unwrap().unwrap();
                assert_eq!(&got, expected);
            }
            let err = block_on(reader.next_clip()).unwrap_err();
            assert!(matches!(err, ReadError::Truncated), "{len}: {err}");
            assert_eq!(err.code(), Some(ErrorCode::Protocol));
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header() {
        // A frame announcing 5000 bytes; the source fails if the reader
        // asks for anything after the header.
        let mut head = BytesMut::new();
        put_varint(&mut head, kind::CLIP_FRAME);
        put_varint(&mut head, 5000);
        let source = Script::new([
            Step::Data(head.freeze()),
            Step::Fail("read the payload of a refused frame"),
        ]);
        let mut reader = FramedReader::new(source, 4096);
        let err = block_on(reader.next_frame()).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::Decode(DecodeError::TooLong { len: 5000, .. })
            ),
            "{err}"
        );
        assert_eq!(err.code(), Some(ErrorCode::TooLarge));
        assert_eq!(err.request_id(), None);
        // Reads never ask for more than one whole frame.
        assert_eq!(reader.get_ref().largest_max, 4096 + 16);
    }

    #[test]
    fn the_limit_can_change_between_frames() {
        let big = ClipMessage::Frame {
            index: 0,
            data: Bytes::from(vec![1; 5000]),
        };
        let wire = wire(&[header(), big.clone()]);
        let mut reader = FramedReader::new(Script::cut(&wire, &[]), 4096);
        assert_eq!(block_on(reader.next_clip()).unwrap().unwrap().0, header());
        reader.set_max_payload(MAX_PAYLOAD_LEN);
        assert_eq!(block_on(reader.next_clip()).unwrap().unwrap().0, big);

        let mut reader = FramedReader::new(Script::cut(&wire, &[]), MAX_PAYLOAD_LEN);
        assert_eq!(block_on(reader.next_clip()).unwrap().unwrap().0, header());
        reader.set_max_payload(4096);
        assert!(matches!(
            block_on(reader.next_clip()),
            Err(ReadError::Decode(DecodeError::TooLong { .. }))
        ));
    }

    #[test]
    fn a_cancelled_read_loses_nothing() {
        let messages = clip_messages();
        let wire = wire(&messages);
        // Half of the header, then a pause, then the rest.
        let source = Script::new([
            Step::Data(wire.slice(..10)),
            Step::Pending,
            Step::Data(wire.slice(10..)),
        ]);
        let mut reader = FramedReader::new(source, MAX_PAYLOAD_LEN);
        {
            let mut read = pin!(reader.next_frame());
            let mut cx = Context::from_waker(Waker::noop());
            assert!(read.as_mut().poll(&mut cx).is_pending());
            // Dropped here, as `select!` drops the branch that lost.
        }
        assert_eq!(reader.buffered(), 10);
        assert_eq!(read_all(&mut reader), Ok(messages));
    }

    #[test]
    fn a_whole_frame_in_one_chunk_is_forwarded_without_copying() {
        let wire = wire(&clip_messages());
        let mut reader = FramedReader::new(Script::cut(&wire, &[]), MAX_PAYLOAD_LEN);
        let (_, frame) = block_on(reader.next_clip()).unwrap().unwrap();
        assert_eq!(frame.raw.as_ptr(), wire.as_ptr());
    }

    #[test]
    fn control_messages_unknown_types_and_invalid_requests() {
        let mut buf = BytesMut::new();
        // An unknown type, a CreateGroup with mode 7, then an Ok.
        buf.put_slice(&[0x3e, 0x02, 0xca, 0xfe]);
        let mut payload = BytesMut::new();
        put_varint(&mut payload, 11);
        put_string(&mut payload, "team-1");
        payload.put_u8(7);
        put_varint(&mut buf, kind::CREATE_GROUP);
        put_varint(&mut buf, payload.len() as u64);
        buf.put_slice(&payload);
        ControlMessage::Ok { request_id: 12 }.encode(&mut buf);
        let wire = buf.freeze();
        let mut reader = FramedReader::new(Script::cut(&wire, &[5, 6]), MAX_PAYLOAD_LEN);
        assert_eq!(
            block_on(reader.next_control()).unwrap(),
            Some(ControlMessage::Unknown { kind: 0x3e })
        );
        let err = block_on(reader.next_control()).unwrap_err();
        assert_eq!(err.request_id(), Some(11));
        assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
        // The stream is still in step.
        assert_eq!(
            block_on(reader.next_control()).unwrap(),
            Some(ControlMessage::Ok { request_id: 12 })
        );
        assert_eq!(block_on(reader.next_control()).unwrap(), None);
    }

    #[test]
    fn stream_errors_pass_through() {
        let wire = ControlMessage::Ok { request_id: 1 }.to_bytes();
        let source = Script::new([Step::Data(wire), Step::Fail("reset by peer")]);
        let mut reader = FramedReader::new(source, MAX_PAYLOAD_LEN);
        assert!(block_on(reader.next_control()).unwrap().is_some());
        let err = block_on(reader.next_control()).unwrap_err();
        assert!(matches!(err, ReadError::Stream("reset by peer")));
        assert_eq!(err.code(), None);
        assert_eq!(err.request_id(), None);
    }
}
