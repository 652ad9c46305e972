//! A QUIC datagram from a member: the `LiveRead` reports in it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ptt_protocol::{LiveRead, live_reads};

fuzz_target!(|data: &[u8]| {
    let reads: Vec<LiveRead> = live_reads(data).collect();
    // Each report takes at least four bytes (type, length, two varints).
    assert!(reads.len() <= data.len() / 4);
    // What decodes encodes and decodes to itself, merged in one datagram.
    let mut again = BytesMut::new();
    for read in &reads {
        read.encode(&mut again);
    }
    assert_eq!(live_reads(&again).collect::<Vec<_>>(), reads);
});
