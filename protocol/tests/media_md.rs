//! Keeps PROTOCOL.md's media-path test vectors (section 14) true to the
//! code: every ```` ```hex media=NAME ```` block must hold exactly the bytes
//! this test computes for NAME from the section's fixed exporter output,
//! and every vector must be in the document. A Swift or Kotlin client
//! checks its key split, nonce, header and AEAD against the same bytes.
//!
//! To print the blocks after a format change:
//! `cargo test -p ptt-protocol --test media_md -- --ignored --nocapture`.

use ptt_protocol::media::{
    FramePayload, FramesPayload, HeadedFramePayload, KEY_MATERIAL_LEN, MediaCrypto, PacketHeader,
    PacketType, Side, UplinkPayload,
};
use ptt_protocol::{ClipFormat, ClipHeader, ClipId};

/// The section's stand-in for `export_keying_material(56,
/// "EXPORTER-ptt-media", 00 00 00 00)`: the bytes 0x00, 0x01, … 0x37.
fn material() -> [u8; KEY_MATERIAL_LEN] {
    std::array::from_fn(|i| i as u8)
}

const CONN_ID: u64 = 0x0123_4567_89ab_cdef;
const OPUS: [u8; 8] = [0x48, 0x0b, 0xe4, 0xc1, 0x36, 0xec, 0xc5, 0x80];
const OPUS_2: [u8; 4] = [0x48, 0x0b, 0x01, 0x02];

/// The header of the clip in the HeadedFrame vector.
fn clip_header() -> ClipHeader {
    ClipHeader {
        group: "ops".into(),
        clip_id: ClipId::from_bytes(std::array::from_fn(|i| i as u8)),
        talker: "ana".into(),
        seq: 0,
        format: ClipFormat::Opus,
        sample_rate: 48_000,
        channels: 1,
        frame_ms: 20,
        created_ms: 1_767_225_600_123,
        flags: ClipHeader::FLAG_MEDIA,
    }
}

/// Every vector, by name, in document order.
fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    out.push(("exporter-output", material().to_vec()));
    // Client → relay: Bind #0 carrying the client's clock, 8 bytes.
    let mut client = MediaCrypto::new(Side::Client, CONN_ID, 0, &material());
    let mut bind = Vec::new();
    client
        .seal(
            PacketType::Bind,
            &1_767_225_600_123u64.to_be_bytes(),
            &mut bind,
        )
        .expect("a small plaintext");
    out.push(("bind", bind));
    // Client → relay: its second packet (counter 1), an Uplink of upload
    // stream 2 with frame 1 and, again, frame 0.
    let mut plain = Vec::new();
    UplinkPayload {
        stream: 2,
        frames: vec![(1, &OPUS_2[..]), (0, &OPUS[..])],
    }
    .encode(&mut plain);
    out.push(("uplink-plaintext", plain.clone()));
    let mut uplink = Vec::new();
    client
        .seal(PacketType::Uplink, &plain, &mut uplink)
        .expect("sealed");
    out.push(("uplink", uplink));
    // Relay → client: frame index 0 of the clip on stream 3, as the relay's
    // third packet (counter 2).
    let mut relay = MediaCrypto::new(Side::Relay, CONN_ID, 0, &material());
    relay
        .seal(PacketType::BindAck, &[0; 8], &mut Vec::new())
        .expect("sealed");
    relay
        .seal(PacketType::BindAck, &[0; 8], &mut Vec::new())
        .expect("sealed");
    let mut plain = Vec::new();
    FramePayload {
        stream: 3,
        index: 0,
        data: &OPUS,
    }
    .encode(&mut plain);
    out.push(("frame-plaintext", plain.clone()));
    let mut frame = Vec::new();
    relay
        .seal(PacketType::Frame, &plain, &mut frame)
        .expect("sealed");
    out.push(("frame", frame));
    // Relay → client: the same frame as a HeadedFrame (counter 3).
    let mut plain = Vec::new();
    HeadedFramePayload {
        stream: 3,
        index: 0,
        header: clip_header(),
        data: &OPUS,
    }
    .encode(&mut plain);
    out.push(("headed-frame-plaintext", plain.clone()));
    let mut headed = Vec::new();
    relay
        .seal(PacketType::HeadedFrame, &plain, &mut headed)
        .expect("sealed");
    out.push(("headed-frame", headed));
    // Relay → client: frames 1 and 2 of the same clip together, a Frames
    // packet (counter 4) as a notes group's member gets them.
    let mut plain = Vec::new();
    FramesPayload {
        stream: 3,
        header: None,
        frames: vec![(1, &OPUS_2[..]), (2, &OPUS[..])],
    }
    .encode(&mut plain);
    out.push(("frames-plaintext", plain.clone()));
    let mut frames = Vec::new();
    relay
        .seal(PacketType::Frames, &plain, &mut frames)
        .expect("sealed");
    out.push(("frames", frames));
    out
}

fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `(name, bytes)` of every ```` ```hex media=NAME ```` block.
fn parse_doc(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut blocks = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("```hex media=") else {
            continue;
        };
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            let content = line.split('#').next().unwrap_or("");
            for tok in content.split_whitespace() {
                bytes.push(
                    u8::from_str_radix(tok, 16)
                        .unwrap_or_else(|_| panic!("{name}: {tok:?} is not a hex byte")),
                );
            }
        }
        blocks.push((name.trim().to_owned(), bytes));
    }
    blocks
}

#[test]
fn protocol_md_media_vectors_are_what_the_code_computes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md at the repository root");
    let blocks = parse_doc(&doc);
    let expected = vectors();
    for (name, bytes) in &blocks {
        let (_, want) = expected
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("PROTOCOL.md block media={name}: no such vector"));
        assert_eq!(
            hex_lines(bytes),
            hex_lines(want),
            "PROTOCOL.md media={name}"
        );
    }
    for (name, _) in &expected {
        assert!(
            blocks.iter().any(|(n, _)| n == name),
            "PROTOCOL.md lost its media={name} vector"
        );
    }
}

#[test]
fn the_vectors_open_on_the_other_side() {
    let v = vectors();
    let get = |name: &str| v.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    let mut relay = MediaCrypto::new(Side::Relay, CONN_ID, 0, &material());
    let mut bind = get("bind");
    let (header, plain) = relay.open(&mut bind).expect("the relay opens the bind");
    assert_eq!(header.kind, PacketType::Bind);
    assert_eq!(plain, 1_767_225_600_123u64.to_be_bytes());
    let mut client = MediaCrypto::new(Side::Client, CONN_ID, 0, &material());
    let mut frame = get("frame");
    let (header, plain) = client.open(&mut frame).expect("the client opens the frame");
    assert_eq!(
        header,
        PacketHeader {
            kind: PacketType::Frame,
            conn_id: CONN_ID,
            epoch: 0,
            counter: 2
        }
    );
    let payload = FramePayload::decode(plain).unwrap();
    assert_eq!(
        (payload.stream, payload.index, payload.data),
        (3, 0, &OPUS[..])
    );
    let mut uplink = get("uplink");
    let (header, plain) = relay.open(&mut uplink).expect("the relay opens the uplink");
    assert_eq!((header.kind, header.counter), (PacketType::Uplink, 1));
    let payload = UplinkPayload::decode(plain).unwrap();
    assert_eq!(payload.stream, 2);
    assert_eq!(payload.frames, vec![(1, &OPUS_2[..]), (0, &OPUS[..])]);
    let mut headed = get("headed-frame");
    let (header, plain) = client.open(&mut headed).expect("the client opens it");
    assert_eq!((header.kind, header.counter), (PacketType::HeadedFrame, 3));
    let payload = HeadedFramePayload::decode(plain).unwrap();
    assert_eq!(
        (payload.stream, payload.index, payload.header, payload.data),
        (3, 0, clip_header(), &OPUS[..])
    );
}

#[test]
#[ignore = "prints the blocks for PROTOCOL.md"]
fn print_vectors() {
    for (name, bytes) in vectors() {
        println!("```hex media={name}\n{}\n```\n", hex_lines(&bytes));
    }
}
