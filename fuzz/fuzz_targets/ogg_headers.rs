//! The Ogg Opus header packets' fields: OpusHead (version, channels,
//! pre-skip, rate, gain, mapping) and OpusTags (vendor and comment lengths
//! and counts). What parses writes back to bytes that parse the same.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::ogg_headers(data));
