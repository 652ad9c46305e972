//! Any bytes as an Ogg Opus file to decode.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ptt_codec::decode_ogg_opus(std::io::Cursor::new(data));
});
