//! Control-stream bytes from a client: split into frames and decode each.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ptt_protocol::{ControlMessage, FrameDecoder, message::MAX_PAYLOAD_LEN};

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
    // Feed in two pieces to exercise frames that span chunks.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    decoder.push(Bytes::copy_from_slice(&data[..split]));
    decoder.push(Bytes::copy_from_slice(&data[split..]));
    while let Ok(Some(frame)) = decoder.next_frame() {
        if let Ok(message) = ControlMessage::decode(frame.kind, frame.payload) {
            // Whatever decodes must encode and decode to itself.
            let again = message.to_bytes();
            let mut d = FrameDecoder::new(MAX_PAYLOAD_LEN);
            d.push(again);
            let f = d.next_frame().expect("re-encoded frame").expect("whole");
            assert_eq!(
                ControlMessage::decode(f.kind, f.payload).expect("round trip"),
                message
            );
        }
    }
});
