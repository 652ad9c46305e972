//! Any bytes as a WAV upload (what the relay transcodes for clients that
//! cannot encode): a typed error or packets, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ptt_codec::{EncoderConfig, encode_wav_packets};

fuzz_target!(|data: &[u8]| {
    let config = EncoderConfig {
        complexity: 0,
        ..EncoderConfig::default()
    };
    let _ = encode_wav_packets(std::io::Cursor::new(data), &config);
});
