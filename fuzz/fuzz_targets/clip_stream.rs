//! A talker's clip stream as the relay reads it: frames, decode, and the
//! clip state machine with its limits.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ptt_protocol::{ClipLimits, ClipMessage, ClipReader, FrameDecoder, message::MAX_PAYLOAD_LEN};

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
    decoder.push(Bytes::copy_from_slice(data));
    let mut reader = ClipReader::new(ClipLimits {
        max_duration: Duration::from_secs(60),
        max_bytes: 1 << 20,
        max_frame_bytes: 8192,
        wall_slack: Duration::from_secs(5),
    });
    let now = Instant::now();
    while let Ok(Some(frame)) = decoder.next_frame() {
        let Ok(message) = ClipMessage::decode(frame.kind, frame.payload) else {
            return;
        };
        if reader.handle_message(message, now).is_err() {
            return;
        }
    }
});
