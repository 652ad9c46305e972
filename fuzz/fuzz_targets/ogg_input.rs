//! Any bytes as an Ogg Opus file to decode.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::ogg_input(data));
