//! The checks behind every fuzz target, one function per target, so that
//! the fuzz targets (`fuzz_targets/*.rs`) and the replay of the seed
//! corpus and of every crash found (`relay/tests/reliability.rs`, which
//! includes this file) run the same code. Each function takes any bytes
//! and panics only when it finds a bug.

use std::sync::OnceLock;
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::{Bytes, BytesMut};
use ptt_codec::{EncoderConfig, OpusHead, OpusTags, encode_wav_packets};
use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::{
    ClipLimits, ClipMessage, ClipReader, ControlMessage, FrameDecoder, LiveRead, live_reads,
};
use ptt_relay::auth::{TokenError, TokenVerifier};
use ptt_relay::store::NewClip;
use ptt_relay::store::redb_store::{
    decode_clip_record, decode_group_record, encode_clip_record, encode_group_record,
};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A target's check.
pub type Check = fn(&[u8]);

/// Every target by name, as `scripts/fuzz.sh` and the replay know them.
pub const TARGETS: [(&str, Check); 8] = [
    ("control_message", control_message),
    ("clip_stream", clip_stream),
    ("live_read_datagram", live_read_datagram),
    ("wav_input", wav_input),
    ("ogg_input", ogg_input),
    ("auth_token", auth_token),
    ("store_record", store_record),
    ("ogg_headers", ogg_headers),
];

/// Control-stream bytes from a client: split into frames and decode each;
/// whatever decodes must encode and decode to itself.
pub fn control_message(data: &[u8]) {
    let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
    // Feed in two pieces to exercise frames that span chunks.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    decoder.push(Bytes::copy_from_slice(&data[..split]));
    decoder.push(Bytes::copy_from_slice(&data[split..]));
    while let Ok(Some(frame)) = decoder.next_frame() {
        if let Ok(message) = ControlMessage::decode(frame.kind, frame.payload) {
            let again = message.to_bytes();
            let mut d = FrameDecoder::new(MAX_PAYLOAD_LEN);
            d.push(again);
            let f = d.next_frame().expect("re-encoded frame").expect("whole");
            assert_eq!(
                ControlMessage::decode(f.kind, f.payload).expect("round trip"),
                message
            );
        }
    }
}

/// A talker's clip stream as the relay reads it: frames, decode, and the
/// clip state machine with its limits.
pub fn clip_stream(data: &[u8]) {
    let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
    decoder.push(Bytes::copy_from_slice(data));
    let mut reader = ClipReader::new(ClipLimits {
        max_duration: Duration::from_secs(60),
        max_bytes: 1 << 20,
        max_frame_bytes: 8192,
        wall_slack: Duration::from_secs(5),
    });
    let now = Instant::now();
    while let Ok(Some(frame)) = decoder.next_frame() {
        let Ok(message) = ClipMessage::decode(frame.kind, frame.payload) else {
            return;
        };
        if reader.handle_message(message, now).is_err() {
            return;
        }
    }
}

/// A QUIC datagram: the `LiveRead` reports a relay reads in it, and the
/// `LiveFrames` a client reads in it (from the measurement harness).
pub fn live_read_datagram(data: &[u8]) {
    live_frames_datagram(data);
    let reads: Vec<LiveRead> = live_reads(data).collect();
    // Each report takes at least four bytes (type, length, two varints).
    assert!(reads.len() <= data.len() / 4);
    // What decodes encodes and decodes to itself, merged in one datagram.
    let mut again = BytesMut::new();
    for read in &reads {
        read.encode(&mut again);
    }
    assert_eq!(live_reads(&again).collect::<Vec<_>>(), reads);
}

/// The `LiveFrames` in a datagram: what decodes encodes to a datagram that
/// decodes to the same frames.
fn live_frames_datagram(data: &[u8]) {
    let decoded: Vec<_> = ptt_protocol::datagram::live_frames(data).collect();
    let mut again = Vec::new();
    for f in &decoded {
        let header = f
            .header
            .as_ref()
            .map(|h| ClipMessage::Header(h.clone()).to_bytes());
        ptt_protocol::datagram::encode_live_frames(
            f.stream,
            header.as_deref(),
            f.frames.iter().map(|(i, d)| (*i, *d)),
            &mut again,
        );
    }
    let redecoded: Vec<_> = ptt_protocol::datagram::live_frames(&again).collect();
    assert_eq!(redecoded, decoded);
}

/// Any bytes as a WAV upload (what the relay transcodes for clients that
/// cannot encode): a typed error or packets, never a panic.
pub fn wav_input(data: &[u8]) {
    let config = EncoderConfig {
        complexity: 0,
        ..EncoderConfig::default()
    };
    let _ = encode_wav_packets(std::io::Cursor::new(data), &config);
}

/// Any bytes as an Ogg Opus file to decode.
pub fn ogg_input(data: &[u8]) {
    let _ = ptt_codec::decode_ogg_opus(std::io::Cursor::new(data));
}

/// Bearer tokens from a client's hello. The first byte picks the mode:
/// even, the rest is any text as a token; odd, the rest is the claims'
/// bytes, validly signed, so that the base64 and JSON decoding of the
/// claims is reached, not only the signature check. A token is accepted
/// only for a valid user id, unexpired, and a signed token never fails its
/// signature check.
pub fn auth_token(data: &[u8]) {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    // A fixed key, so that a crash replays.
    let key = KEY.get_or_init(|| Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a seed"));
    let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32 bytes");
    let verifier = TokenVerifier::new(public);
    let now = 1_700_000_000;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let signed = mode % 2 == 1;
    let token = if signed {
        let mut token = format!("ptt1.{}", B64.encode(rest));
        let sig = key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&B64.encode(sig.as_ref()));
        token
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };
    match verifier.verify(&token, UNIX_EPOCH + Duration::from_secs(now)) {
        Ok(claims) => {
            assert!(ptt_protocol::is_valid_id(&claims.sub));
            assert!(claims.exp > now);
        }
        Err(TokenError::BadSignature) => assert!(!signed, "a signed token failed its check"),
        Err(_) => {}
    }
}

/// The store's records as read back from disk (a damaged data directory):
/// a clip blob and a group record. Decoding fails with `Corrupt`, never
/// panics or allocates from an unchecked length; what decodes encodes to a
/// record that decodes to the same value.
pub fn store_record(data: &[u8]) {
    if let Ok(clip) = decode_clip_record("g", 7, data) {
        let again = encode_clip_record(&NewClip {
            meta: clip.meta.clone(),
            frames: clip.frames.clone(),
            waveform: clip.waveform.clone(),
        });
        assert_eq!(
            decode_clip_record("g", 7, &again).expect("round trip"),
            clip
        );
    }
    if let Ok((mode, max_clip_ms)) = decode_group_record("g", data) {
        let again = encode_group_record(mode, max_clip_ms);
        assert_eq!(
            decode_group_record("g", &again).expect("round trip"),
            (mode, max_clip_ms)
        );
    }
}

/// The Ogg Opus header packets' fields: OpusHead (version, channels,
/// pre-skip, rate, gain, mapping) and OpusTags (vendor and comment lengths
/// and counts). What parses writes back to bytes that parse the same.
pub fn ogg_headers(data: &[u8]) {
    if let Ok(head) = OpusHead::parse(data) {
        let again = OpusHead::parse(&head.to_bytes()).expect("round trip");
        assert_eq!(again, head);
    }
    if let Ok(tags) = OpusTags::parse(data) {
        let again = OpusTags::parse(&tags.to_bytes()).expect("round trip");
        assert_eq!(again, tags);
    }
}
