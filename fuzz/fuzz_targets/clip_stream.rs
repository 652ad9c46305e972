//! A talker's clip stream as the relay reads it: frames, decode, and the
//! clip state machine with its limits.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::clip_stream(data));
