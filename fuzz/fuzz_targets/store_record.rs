//! The store's records as read back from disk (a damaged data directory):
//! a clip blob and a group record. Decoding fails with `Corrupt`, never
//! panics or allocates from an unchecked length; what decodes encodes to a
//! record that decodes to the same value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::store_record(data));
