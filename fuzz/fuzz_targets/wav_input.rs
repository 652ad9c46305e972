//! Any bytes as a WAV upload (what the relay transcodes for clients that
//! cannot encode): a typed error or packets, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::wav_input(data));
