//! Bearer tokens from a client's hello. The first byte picks the mode:
//! even, the rest is any text as a token; odd, the rest is the claims'
//! bytes, validly signed, so that the base64 and JSON decoding of the
//! claims is reached, not only the signature check. A token is accepted
//! only for a valid user id, unexpired, and a signed token never fails its
//! signature check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ptt_fuzz::auth_token(data));
