//! Control-stream bytes from a client: split into frames and decode each;
//! whatever decodes must encode and decode to itself.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::control_message(data));
