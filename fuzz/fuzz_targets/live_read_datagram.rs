//! A QUIC datagram from a member: the `LiveRead` reports in it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::live_read_datagram(data));
