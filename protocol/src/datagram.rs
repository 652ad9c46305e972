//! QUIC datagrams (RFC 9221): unacknowledged, unordered messages beside the
//! streams, for reports where only the newest matters.
//!
//! A datagram holds one or more messages with the framing of streams
//! (`type | length | payload`, [`crate::message`]); a message never spans
//! two datagrams. This version has one datagram message, [`LiveRead`]: a
//! member tells the relay how far it has read a live clip stream, so that
//! the relay can measure its lag against what the application read rather
//! than against QUIC flow control (PROTOCOL.md, sections 4.3 and 9.7).
//!
//! Reading a datagram never fails: [`live_reads`] yields its `LiveRead`s,
//! skips messages of other types and `LiveRead`s with an invalid field, and
//! stops at a damaged tail (a type, length or payload running past the
//! end). A lost or damaged report costs nothing; the next one supersedes
//! it.

use std::iter::FusedIterator;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::coding::{get_varint, put_varint, varint_len};
use crate::media::FramesPayload;
use crate::message::kind;

/// A member reports at least this often while reading a live clip: after
/// its header, then after each this much audio read
/// ([`LiveRead::interval_frames`]). The relay allows a report this old (and
/// one round trip) on top of its lag limit.
pub const LIVE_READ_INTERVAL: Duration = Duration::from_secs(1);

/// The largest datagram the relay accepts (its QUIC transport parameter
/// `max_datagram_frame_size`), and the bytes of datagrams it queues per
/// connection: reports are a few bytes each and only the newest matter.
pub const LIVE_READ_BUFFER: usize = 1024;

/// How many frames of a live clip stream a member has read (message type
/// [`kind::LIVE_READ`], in datagrams from members to the relay only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LiveRead {
    /// The QUIC stream id of the live clip stream (a relay-initiated
    /// unidirectional stream: 3, 7, 11 …).
    pub stream: u64,
    /// ClipFrames the application has read from it (0 right after the
    /// header).
    pub frames: u32,
}

impl LiveRead {
    /// The longest encoding of a `LiveRead`, type and length included.
    pub const MAX_LEN: usize = 1 + 1 + 8 + 8;

    /// Frames between two reports of a clip with `frame_ms` frames:
    /// [`LIVE_READ_INTERVAL`] of audio, rounded up (50 at 20 ms, 17 at
    /// 60 ms). Frames are taken to be at least 10 ms long, as the relay
    /// does, so a clip with `frame_ms` 0 is reported every 100 frames.
    pub fn interval_frames(frame_ms: u8) -> u32 {
        let interval = LIVE_READ_INTERVAL.as_millis() as u32;
        interval.div_ceil(u32::from(frame_ms.max(10)))
    }

    /// Bytes [`LiveRead::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        let payload = self.payload_len();
        varint_len(kind::LIVE_READ) + varint_len(payload as u64) + payload
    }

    /// Appends the framed message (type, length, payload) to `buf`;
    /// several may share one datagram.
    ///
    /// # Panics
    /// If `stream` exceeds [`crate::coding::VARINT_MAX`]; QUIC stream ids
    /// never do.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, kind::LIVE_READ);
        put_varint(buf, self.payload_len() as u64);
        put_varint(buf, self.stream);
        put_varint(buf, u64::from(self.frames));
    }

    /// The framed message as one buffer: a datagram holding this report.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }

    fn payload_len(&self) -> usize {
        varint_len(self.stream) + varint_len(u64::from(self.frames))
    }
}

/// Appends a `LiveFrames` message (type [`kind::LIVE_FRAMES`]) to `buf`:
/// live frames of one clip stream in a QUIC datagram, its payload that of
/// a `Frames` media packet ([`FramesPayload`], PROTOCOL.md §14.3).
///
/// Only the measurement harness sends these (`quinn-floor --live
/// datagram`, the QUIC DATAGRAM live plane that issue #15 measured and did
/// not adopt); the relay's live planes are streams and the UDP media path.
/// The reference client reads them as it reads `Frames` packets, so the
/// harness can be driven by `client-sim`.
pub fn encode_live_frames<'d>(
    stream: u64,
    framed_header: Option<&[u8]>,
    frames: impl ExactSizeIterator<Item = (u32, &'d [u8])> + Clone,
    buf: &mut Vec<u8>,
) {
    let lens = frames
        .clone()
        .map(|(i, d)| FramesPayload::frame_len(i, d))
        .sum();
    let payload = FramesPayload::encoded_len(stream, framed_header, lens);
    put_varint(buf, kind::LIVE_FRAMES);
    put_varint(buf, payload as u64);
    FramesPayload::encode_with(stream, framed_header, frames, buf);
}

/// The `LiveFrames` messages in `datagram` ([`encode_live_frames`]), in
/// order; as [`live_reads`], messages of other types and malformed ones
/// are skipped and a damaged tail ends the iteration.
pub fn live_frames(datagram: &[u8]) -> impl Iterator<Item = FramesPayload<'_>> {
    let mut messages = LiveReadIter { rest: datagram };
    std::iter::from_fn(move || messages.next_message())
        .filter(|(kind, _)| *kind == kind::LIVE_FRAMES)
        .filter_map(|(_, payload)| FramesPayload::decode(payload).ok())
}

/// The [`LiveRead`] reports in `datagram`, in order.
///
/// Messages of other types are skipped (their length says how far), and so
/// is a `LiveRead` whose payload ends inside its fields or whose `frames`
/// exceeds `u32`; bytes after its last field are ignored (a later version
/// may append fields). A message whose type, length or payload runs past
/// the end of the datagram ends the iteration. Work is linear in the
/// datagram's length: each message consumes at least two bytes.
pub fn live_reads(datagram: &[u8]) -> LiveReadIter<'_> {
    LiveReadIter { rest: datagram }
}

/// The iterator of [`live_reads`].
#[derive(Debug, Clone)]
pub struct LiveReadIter<'a> {
    rest: &'a [u8],
}

impl Iterator for LiveReadIter<'_> {
    type Item = LiveRead;

    fn next(&mut self) -> Option<LiveRead> {
        while !self.rest.is_empty() {
            let Some((kind, mut payload)) = self.next_message() else {
                // A damaged tail: nothing after it can be found.
                self.rest = &[];
                return None;
            };
            if kind != kind::LIVE_READ {
                continue;
            }
            let (Ok(stream), Ok(frames)) = (get_varint(&mut payload), get_varint(&mut payload))
            else {
                continue;
            };
            let Ok(frames) = u32::try_from(frames) else {
                continue;
            };
            return Some(LiveRead { stream, frames });
        }
        None
    }
}

impl FusedIterator for LiveReadIter<'_> {}

impl<'a> LiveReadIter<'a> {
    /// Cuts the next message off `rest`: its type and payload, or `None`
    /// if its header or payload runs past the end.
    fn next_message(&mut self) -> Option<(u64, &'a [u8])> {
        let mut rest = self.rest;
        let kind = get_varint(&mut rest).ok()?;
        let len = get_varint(&mut rest).ok()?;
        let len = usize::try_from(len).ok().filter(|&len| len <= rest.len())?;
        let (payload, after) = rest.split_at(len);
        self.rest = after;
        Some((kind, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(reads: &[LiveRead]) -> Vec<u8> {
        let mut buf = Vec::new();
        for r in reads {
            r.encode(&mut buf);
        }
        buf
    }

    #[test]
    fn reports_round_trip_at_every_width() {
        let reads = [
            LiveRead {
                stream: 3,
                frames: 25,
            },
            LiveRead {
                stream: 1 << 20,
                frames: 70_000,
            },
            LiveRead {
                stream: crate::coding::VARINT_MAX,
                frames: u32::MAX,
            },
            LiveRead {
                stream: 0,
                frames: 0,
            },
        ];
        for r in reads {
            let bytes = r.to_bytes();
            assert_eq!(bytes.len(), r.encoded_len());
            assert!(bytes.len() <= LiveRead::MAX_LEN);
            assert_eq!(live_reads(&bytes).collect::<Vec<_>>(), [r]);
        }
        // Merged into one datagram.
        let merged = datagram(&reads);
        assert_eq!(live_reads(&merged).collect::<Vec<_>>(), reads);
        assert!(merged.len() <= LIVE_READ_BUFFER);
    }

    #[test]
    fn the_wire_form_is_type_length_stream_frames() {
        let r = LiveRead {
            stream: 3,
            frames: 25,
        };
        assert_eq!(&r.to_bytes()[..], [0x3b, 0x02, 0x03, 0x19]);
        let r = LiveRead {
            stream: 7,
            frames: 200,
        };
        assert_eq!(&r.to_bytes()[..], [0x3b, 0x03, 0x07, 0x40, 0xc8]);
    }

    #[test]
    fn other_types_invalid_reports_and_later_fields_are_skipped() {
        let mut d = vec![0x3e, 0x02, 0xca, 0xfe]; // unknown type
        d.extend([0x3b, 0x01, 0x03]); // a LiveRead without frames
        d.extend([0x3b, 0x09, 0x03, 0xc0, 0, 0, 1, 0, 0, 0, 0]); // frames > u32
        d.extend([0x3b, 0x04, 0x07, 0x32, 0xaa, 0xbb]); // a later field
        d.extend([0x3b, 0x00]); // empty payload
        d.extend([0x3b, 0x02, 0x0b, 0x01]);
        assert_eq!(
            live_reads(&d).collect::<Vec<_>>(),
            [
                LiveRead {
                    stream: 7,
                    frames: 50
                },
                LiveRead {
                    stream: 11,
                    frames: 1
                },
            ]
        );
    }

    #[test]
    fn live_frames_round_trip_beside_reports() {
        let header = crate::media::tests::media_header();
        let framed = crate::ClipMessage::Header(header.clone()).to_bytes();
        let mut d = datagram(&[LiveRead {
            stream: 3,
            frames: 25,
        }]);
        let frames = [(0u32, &b"abc"[..]), (1, &b"de"[..])];
        encode_live_frames(7, Some(&framed), frames.iter().copied(), &mut d);
        encode_live_frames(11, None, [(300u32, &b"f"[..])].into_iter(), &mut d);
        let got: Vec<_> = live_frames(&d).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].stream, 7);
        assert_eq!(got[0].header.as_ref(), Some(&header));
        assert_eq!(got[0].frames, frames);
        assert_eq!(got[1].stream, 11);
        assert_eq!(got[1].header, None);
        assert_eq!(got[1].frames, [(300, &b"f"[..])]);
        // Reports still read past them.
        assert_eq!(live_reads(&d).count(), 1);
        // A damaged LiveFrames (no frames) is skipped, a cut one ends it.
        let mut bad = vec![0x3c, 0x02, 0x07, 0x00];
        encode_live_frames(3, None, [(1u32, &b"x"[..])].into_iter(), &mut bad);
        bad.extend([0x3c, 0x09, 0x03]);
        let got: Vec<_> = live_frames(&bad).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].frames, [(1, &b"x"[..])]);
    }

    #[test]
    fn a_damaged_tail_ends_the_datagram() {
        let good = datagram(&[LiveRead {
            stream: 3,
            frames: 25,
        }]);
        for tail in [
            &[0x40][..],                                             // a type cut inside its varint
            &[0x3b],                                                 // no length
            &[0x3b, 0x80, 0x00],       // a length cut inside its varint
            &[0x3b, 0x05, 0x03, 0x19], // a payload shorter than its length
            &[0x3b, 0xc0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // 2^62 bytes
        ] {
            let mut d = good.clone();
            d.extend_from_slice(tail);
            let got: Vec<_> = live_reads(&d).collect();
            assert_eq!(got.len(), 1, "tail {tail:02x?}");
        }
        // A length past the end hides what follows: the framing is lost.
        let mut d = vec![0x3b, 0x20];
        d.extend_from_slice(&good);
        assert_eq!(live_reads(&d).next(), None);
        assert_eq!(live_reads(&[]).next(), None);
    }

    #[test]
    fn every_truncation_of_a_datagram_decodes_without_panicking() {
        let d = datagram(&[
            LiveRead {
                stream: 3,
                frames: 25,
            },
            LiveRead {
                stream: 1 << 40,
                frames: u32::MAX,
            },
        ]);
        for end in 0..=d.len() {
            let got = live_reads(&d[..end]).count();
            let whole = usize::from(end >= 4) + usize::from(end == d.len());
            assert_eq!(got, whole, "first {end} bytes");
        }
    }

    #[test]
    fn the_interval_is_a_second_of_audio_rounded_up() {
        assert_eq!(LiveRead::interval_frames(20), 50);
        assert_eq!(LiveRead::interval_frames(10), 100);
        assert_eq!(LiveRead::interval_frames(60), 17);
        assert_eq!(LiveRead::interval_frames(120), 9);
        assert_eq!(LiveRead::interval_frames(0), 100);
        assert_eq!(LiveRead::interval_frames(255), 4);
    }
}
