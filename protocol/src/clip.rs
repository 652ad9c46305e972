//! The clip stream state machine: checks that the messages of one clip
//! arrive as the protocol says (header, frames numbered from 0, end with
//! the right count) and within the relay's limits.
//!
//! The relay runs one [`ClipReader`] per uploaded clip and the client one per
//! received clip; both feed it decoded messages and the current time, and
//! act on what it returns.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::ErrorCode;
use crate::message::{ClipFormat, ClipHeader, ClipMessage};

/// Limits a clip must stay within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipLimits {
    /// Longest clip in audio time (frames × frame duration), and in wall
    /// time from header to end plus [`ClipLimits::wall_slack`].
    pub max_duration: Duration,
    /// Most payload bytes over all frames.
    pub max_bytes: usize,
    /// Most payload bytes in one frame.
    pub max_frame_bytes: usize,
    /// Extra wall time allowed over `max_duration` for network jitter.
    pub wall_slack: Duration,
}

impl ClipLimits {
    /// No limits beyond the protocol's own; what a client applies to clips
    /// the relay sends.
    pub fn unlimited() -> ClipLimits {
        ClipLimits {
            max_duration: Duration::from_secs(24 * 3600),
            max_bytes: usize::MAX,
            max_frame_bytes: usize::MAX,
            wall_slack: Duration::ZERO,
        }
    }
}

/// Why a clip stream broke the protocol or a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClipError {
    /// The first message was not a header, or a message came after the end.
    #[error("clip messages out of order: {0}")]
    OutOfOrder(&'static str),
    /// A frame's index is not the one expected.
    #[error("frame {got} arrived where frame {expected} was expected")]
    FrameIndex {
        /// The index that was due.
        expected: u32,
        /// The index that arrived.
        got: u32,
    },
    /// The end's frame count differs from the frames received.
    #[error("clip end says {claimed} frames but {received} arrived")]
    FrameCount {
        /// What the end message says.
        claimed: u32,
        /// What arrived.
        received: u32,
    },
    /// The header's audio parameters are invalid.
    #[error("invalid clip header: {0}")]
    Header(&'static str),
    /// One frame is larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The clip's frames add up to more bytes than allowed.
    #[error("clip exceeds {max} bytes")]
    ClipTooLarge {
        /// The limit.
        max: usize,
    },
    /// The clip is longer than allowed, in audio or in wall time.
    #[error("clip exceeds the maximum duration of {max:?}")]
    TooLong {
        /// The limit.
        max: Duration,
    },
}

impl ClipError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClipError::OutOfOrder(_) | ClipError::FrameIndex { .. } => ErrorCode::OutOfOrder,
            ClipError::FrameCount { .. } => ErrorCode::OutOfOrder,
            ClipError::Header(_) => ErrorCode::Protocol,
            ClipError::FrameTooLarge { .. } | ClipError::ClipTooLarge { .. } => ErrorCode::TooLarge,
            ClipError::TooLong { .. } => ErrorCode::ClipTooLong,
        }
    }
}

/// What a message meant for the clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipEvent {
    /// The clip began.
    Started(ClipHeader),
    /// Frame `index` arrived.
    Frame {
        /// Its index.
        index: u32,
        /// Its bytes.
        data: Bytes,
    },
    /// The clip is complete.
    Ended {
        /// How many frames it has.
        frame_count: u32,
        /// The sequence number the sender gave (0 from talkers).
        seq: u64,
        /// The waveform preview.
        waveform: Bytes,
    },
}

/// Where a clip stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipPhase {
    /// Waiting for the header.
    AwaitingHeader,
    /// Between header and end.
    Receiving,
    /// The end arrived.
    Complete,
}

/// Checks one clip stream. See the module documentation.
#[derive(Debug)]
pub struct ClipReader {
    limits: ClipLimits,
    phase: ClipPhase,
    started: Option<Instant>,
    frame_duration: Duration,
    format: ClipFormat,
    frames: u32,
    bytes: usize,
}

/// Frame durations an Opus clip may declare, in milliseconds.
pub const OPUS_FRAME_MS: [u8; 7] = [10, 20, 40, 60, 80, 100, 120];

impl ClipReader {
    /// A reader waiting for the header.
    pub fn new(limits: ClipLimits) -> ClipReader {
        ClipReader {
            limits,
            phase: ClipPhase::AwaitingHeader,
            started: None,
            frame_duration: Duration::ZERO,
            format: ClipFormat::Opus,
            frames: 0,
            bytes: 0,
        }
    }

    /// Replaces the limits, e.g. once the header says which format the
    /// clip has; frames already received count against the new limits.
    pub fn set_limits(&mut self, limits: ClipLimits) {
        self.limits = limits;
    }

    /// Where the stream is.
    pub fn phase(&self) -> ClipPhase {
        self.phase
    }

    /// Frames received so far.
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// Payload bytes received so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The latest time the clip may still be running: the header's arrival
    /// plus the maximum duration and the slack. `None` before the header.
    pub fn deadline(&self) -> Option<Instant> {
        self.started
            .map(|t| t + self.limits.max_duration + self.limits.wall_slack)
    }

    /// Feeds one message received at `now`.
    pub fn handle_message(
        &mut self,
        message: ClipMessage,
        now: Instant,
    ) -> Result<ClipEvent, ClipError> {
        if let Some(deadline) = self.deadline()
            && now > deadline
            && self.phase == ClipPhase::Receiving
        {
            return Err(ClipError::TooLong {
                max: self.limits.max_duration,
            });
        }
        match (self.phase, message) {
            (ClipPhase::AwaitingHeader, ClipMessage::Header(header)) => {
                self.check_header(&header)?;
                self.phase = ClipPhase::Receiving;
                self.started = Some(now);
                self.format = header.format;
                self.frame_duration = Duration::from_millis(u64::from(header.frame_ms));
                Ok(ClipEvent::Started(header))
            }
            (ClipPhase::AwaitingHeader, _) => Err(ClipError::OutOfOrder(
                "the first message must be the header",
            )),
            (ClipPhase::Receiving, ClipMessage::Frame { index, data }) => {
                if index != self.frames {
                    return Err(ClipError::FrameIndex {
                        expected: self.frames,
                        got: index,
                    });
                }
                if data.len() > self.limits.max_frame_bytes {
                    return Err(ClipError::FrameTooLarge {
                        len: data.len(),
                        max: self.limits.max_frame_bytes,
                    });
                }
                self.bytes += data.len();
                if self.bytes > self.limits.max_bytes {
                    return Err(ClipError::ClipTooLarge {
                        max: self.limits.max_bytes,
                    });
                }
                self.frames += 1;
                if self.format == ClipFormat::Opus
                    && self.frame_duration * self.frames > self.limits.max_duration
                {
                    return Err(ClipError::TooLong {
                        max: self.limits.max_duration,
                    });
                }
                Ok(ClipEvent::Frame { index, data })
            }
            (
                ClipPhase::Receiving,
                ClipMessage::End {
                    frame_count,
                    seq,
                    waveform,
                },
            ) => {
                if frame_count != self.frames {
                    return Err(ClipError::FrameCount {
                        claimed: frame_count,
                        received: self.frames,
                    });
                }
                self.phase = ClipPhase::Complete;
                Ok(ClipEvent::Ended {
                    frame_count,
                    seq,
                    waveform,
                })
            }
            (ClipPhase::Receiving, ClipMessage::Header(_)) => {
                Err(ClipError::OutOfOrder("a second header"))
            }
            (ClipPhase::Complete, _) => Err(ClipError::OutOfOrder("a message after the end")),
        }
    }

    fn check_header(&self, h: &ClipHeader) -> Result<(), ClipError> {
        if !crate::ids::is_valid_id(&h.group) {
            return Err(ClipError::Header("invalid group id"));
        }
        if h.channels == 0 || h.channels > 2 {
            return Err(ClipError::Header("channels must be 1 or 2"));
        }
        match h.format {
            ClipFormat::Opus => {
                if !OPUS_FRAME_MS.contains(&h.frame_ms) {
                    return Err(ClipError::Header(
                        "frame_ms must be 10, 20, 40, 60, 80, 100 or 120",
                    ));
                }
                if !(8_000..=192_000).contains(&h.sample_rate) {
                    return Err(ClipError::Header("sample_rate must be 8000 to 192000"));
                }
            }
            ClipFormat::Wav => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ClipId;

    fn header() -> ClipHeader {
        ClipHeader {
            group: "g".into(),
            clip_id: ClipId::from_bytes([1; 16]),
            talker: String::new(),
            seq: 0,
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms: 0,
            flags: 0,
        }
    }

    fn frame(index: u32, len: usize) -> ClipMessage {
        ClipMessage::Frame {
            index,
            data: Bytes::from(vec![0; len]),
        }
    }

    fn end(frame_count: u32) -> ClipMessage {
        ClipMessage::End {
            frame_count,
            seq: 0,
            waveform: Bytes::new(),
        }
    }

    fn limits() -> ClipLimits {
        ClipLimits {
            max_duration: Duration::from_secs(1),
            max_bytes: 1000,
            max_frame_bytes: 200,
            wall_slack: Duration::from_millis(500),
        }
    }

    #[test]
    fn a_well_formed_clip_completes() {
        let now = Instant::now();
        let mut r = ClipReader::new(limits());
        assert!(matches!(
            r.handle_message(ClipMessage::Header(header()), now),
            Ok(ClipEvent::Started(_))
        ));
        for i in 0..3 {
            r.handle_message(frame(i, 10), now).unwrap();
        }
        assert!(matches!(
            r.handle_message(end(3), now),
            Ok(ClipEvent::Ended { .. })
        ));
        assert_eq!(r.phase(), ClipPhase::Complete);
        assert!(r.handle_message(frame(3, 1), now).is_err());
    }

    #[test]
    fn each_violation_has_its_error_and_code() {
        let now = Instant::now();
        let started = |r: &mut ClipReader| {
            r.handle_message(ClipMessage::Header(header()), now)
                .unwrap();
        };

        let mut r = ClipReader::new(limits());
        let e = r.handle_message(frame(0, 1), now).unwrap_err();
        assert_eq!(e.code(), ErrorCode::OutOfOrder);

        let mut r = ClipReader::new(limits());
        started(&mut r);
        let e = r.handle_message(frame(1, 1), now).unwrap_err();
        assert_eq!(
            e,
            ClipError::FrameIndex {
                expected: 0,
                got: 1
            }
        );

        let mut r = ClipReader::new(limits());
        started(&mut r);
        let e = r.handle_message(frame(0, 201), now).unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooLarge);

        let mut r = ClipReader::new(limits());
        started(&mut r);
        let mut err = None;
        for i in 0..10 {
            if let Err(e) = r.handle_message(frame(i, 150), now) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(ClipError::ClipTooLarge { max: 1000 }));

        // 51 frames of 20 ms exceed one second of audio.
        let mut r = ClipReader::new(limits());
        started(&mut r);
        let results: Vec<_> = (0..51)
            .map(|i| r.handle_message(frame(i, 1), now))
            .collect();
        assert!(results[..50].iter().all(Result::is_ok));
        assert_eq!(
            results[50].as_ref().unwrap_err().code(),
            ErrorCode::ClipTooLong
        );

        let mut r = ClipReader::new(limits());
        started(&mut r);
        r.handle_message(frame(0, 1), now).unwrap();
        assert_eq!(
            r.handle_message(end(2), now).unwrap_err(),
            ClipError::FrameCount {
                claimed: 2,
                received: 1
            }
        );

        let mut bad = header();
        bad.frame_ms = 25;
        let mut r = ClipReader::new(limits());
        assert_eq!(
            r.handle_message(ClipMessage::Header(bad), now)
                .unwrap_err()
                .code(),
            ErrorCode::Protocol
        );
    }

    #[test]
    fn a_talker_that_trickles_frames_past_the_wall_deadline_is_cut() {
        // Simulated clock: the talker sends a frame every 100 ms, so audio
        // time stays short while wall time runs past max + slack.
        let t0 = Instant::now();
        let mut r = ClipReader::new(limits());
        r.handle_message(ClipMessage::Header(header()), t0).unwrap();
        assert_eq!(r.deadline(), Some(t0 + Duration::from_millis(1500)));
        for i in 0..15 {
            r.handle_message(frame(i, 1), t0 + Duration::from_millis(100 * u64::from(i)))
                .unwrap();
        }
        let e = r
            .handle_message(frame(15, 1), t0 + Duration::from_millis(1501))
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::ClipTooLong);
    }
}
