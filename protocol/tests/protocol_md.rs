//! Keeps PROTOCOL.md true to the code: every ```` ```hex title=NAME ````
//! block in it must decode, with this crate, to the value the line
//! `decodes-to: `…`` under it states (the value's `Debug` form), to the
//! value this test expects for NAME, and must be exactly what the encoder
//! writes for that value. A block whose NAME starts with `datagram` is a
//! whole QUIC datagram, decoded with `ptt_protocol::live_reads` (its value
//! is the list of `LiveRead` reports in it); any other block is one frame
//! of a stream.
//!
//! To regenerate the examples after a format change, run
//! `cargo test -p ptt-protocol --test protocol_md -- --ignored --nocapture`
//! and paste the blocks it prints.

use bytes::{Bytes, BytesMut};
use ptt_protocol::coding::{put_bytes, put_string, put_varint};
use ptt_protocol::message::kind;
use ptt_protocol::{
    ClipFormat, ClipHeader, ClipId, ClipMessage, ClipSummary, ControlMessage, ErrorCode,
    FrameDecoder, GroupMode, GroupSummary, Limits, LiveRead, MemberState, ReceiptKind, Welcome,
    live_reads,
};

#[derive(Debug, Clone, PartialEq)]
enum Example {
    Control(ControlMessage),
    Clip(ClipMessage),
    /// A QUIC datagram: the reports in it.
    Datagram(Vec<LiveRead>),
}

impl Example {
    fn encode(&self) -> Bytes {
        match self {
            Example::Control(m) => m.to_bytes(),
            Example::Clip(m) => m.to_bytes(),
            Example::Datagram(reads) => {
                let mut buf = BytesMut::new();
                for r in reads {
                    r.encode(&mut buf);
                }
                buf.freeze()
            }
        }
    }

    fn debug(&self) -> String {
        match self {
            Example::Control(m) => format!("{m:?}"),
            Example::Clip(m) => format!("{m:?}"),
            Example::Datagram(reads) => format!("{reads:?}"),
        }
    }
}

const CLIP: ClipId = ClipId::from_bytes([
    0x6f, 0x1c, 0x2a, 0x90, 0x4b, 0x3e, 0x4d, 0x21, 0x9a, 0x07, 0x5c, 0xe1, 0x00, 0x42, 0xbe, 0xef,
]);
const TOKEN: &str = "ptt1.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";

/// Every example the document must show, by title, in document order.
fn examples() -> Vec<(&'static str, Example)> {
    use ControlMessage as C;
    use Example::{Clip, Control};
    let g = || "team-1".to_string();
    vec![
        (
            "hello",
            Control(C::Hello {
                version: 1,
                token: TOKEN.into(),
                client: "ios/2.3".into(),
            }),
        ),
        (
            "welcome",
            Control(C::Welcome(Welcome {
                version: 1,
                user: "alice".into(),
                server_time_ms: 1_767_225_600_000,
                limits: Limits {
                    max_clip_ms: 60_000,
                    max_clip_bytes: 1_048_576,
                    max_frame_bytes: 8192,
                    max_concurrent_clips: 2,
                    clips_per_minute: 60,
                    idle_timeout_ms: 30_000,
                },
            })),
        ),
        (
            "error-invalid-token",
            Control(C::Error {
                request_id: 0,
                code: ErrorCode::InvalidToken,
                message: "bad signature".into(),
            }),
        ),
        (
            "join",
            Control(C::Join {
                request_id: 1,
                group: g(),
            }),
        ),
        (
            "joined",
            Control(C::Joined {
                request_id: 1,
                group: g(),
                mode: GroupMode::Walkie,
                cursor: 41,
                last_seq: 300,
                live_budget_ms: 0,
            }),
        ),
        (
            "error-not-member",
            Control(C::Error {
                request_id: 1,
                code: ErrorCode::NotMember,
                message: "alice is not in team-1".into(),
            }),
        ),
        (
            "gap",
            Control(C::Gap {
                group: g(),
                from_seq: 42,
                to_seq: 99,
            }),
        ),
        (
            "caught-up",
            Control(C::CaughtUp {
                group: g(),
                seq: 300,
            }),
        ),
        (
            "clip-header-upload",
            Clip(ClipMessage::Header(ClipHeader {
                group: g(),
                clip_id: CLIP,
                talker: String::new(),
                seq: 0,
                format: ClipFormat::Opus,
                sample_rate: 48_000,
                channels: 1,
                frame_ms: 20,
                created_ms: 1_767_225_600_123,
                flags: 0,
            })),
        ),
        (
            "clip-frame",
            Clip(ClipMessage::Frame {
                index: 0,
                data: Bytes::from_static(&[0x48, 0x0b, 0xe4, 0xc1, 0x36, 0xec, 0xc5, 0x80]),
            }),
        ),
        (
            "clip-frame-200",
            Clip(ClipMessage::Frame {
                index: 200,
                data: Bytes::from_static(&[0x48, 0x0b, 0xe4]),
            }),
        ),
        (
            "clip-end-upload",
            Clip(ClipMessage::End {
                frame_count: 201,
                seq: 0,
                waveform: Bytes::from_static(&[0, 4, 17, 31, 22, 9, 2, 0]),
            }),
        ),
        (
            "clip-header-live",
            Clip(ClipMessage::Header(ClipHeader {
                group: g(),
                clip_id: CLIP,
                talker: "alice".into(),
                seq: 0,
                format: ClipFormat::Opus,
                sample_rate: 48_000,
                channels: 1,
                frame_ms: 20,
                created_ms: 1_767_225_600_123,
                flags: 0,
            })),
        ),
        (
            "clip-header-history",
            Clip(ClipMessage::Header(ClipHeader {
                group: g(),
                clip_id: CLIP,
                talker: "alice".into(),
                seq: 301,
                format: ClipFormat::Opus,
                sample_rate: 48_000,
                channels: 1,
                frame_ms: 20,
                created_ms: 1_767_225_600_123,
                flags: ClipHeader::FLAG_HISTORY | ClipHeader::FLAG_EMERGENCY,
            })),
        ),
        (
            "clip-end-delivered",
            Clip(ClipMessage::End {
                frame_count: 201,
                seq: 301,
                waveform: Bytes::from_static(&[0, 4, 17, 31, 22, 9, 2, 0]),
            }),
        ),
        (
            "stored",
            Control(C::Stored {
                group: g(),
                clip_id: CLIP,
                seq: 301,
            }),
        ),
        (
            "clip-rejected",
            Control(C::ClipRejected {
                clip_id: CLIP,
                code: ErrorCode::FloorTaken,
                message: "bob holds the floor".into(),
            }),
        ),
        (
            "delivery-ack",
            Control(C::DeliveryAck {
                group: g(),
                seq: 301,
            }),
        ),
        (
            "played",
            Control(C::Played {
                group: g(),
                seq: 301,
            }),
        ),
        (
            "receipt",
            Control(C::Receipt {
                group: g(),
                seq: 301,
                clip_id: CLIP,
                user: "bob".into(),
                kind: ReceiptKind::Delivered,
            }),
        ),
        (
            "floor-request",
            Control(C::FloorRequest {
                request_id: 7,
                group: g(),
                emergency: false,
            }),
        ),
        (
            "floor-granted",
            Control(C::FloorGranted {
                request_id: 7,
                group: g(),
                max_ms: 60_000,
            }),
        ),
        (
            "floor-denied",
            Control(C::FloorDenied {
                request_id: 7,
                group: g(),
                holder: "bob".into(),
            }),
        ),
        (
            "floor-taken",
            Control(C::FloorTaken {
                group: g(),
                user: "alice".into(),
                emergency: true,
            }),
        ),
        ("floor-release", Control(C::FloorRelease { group: g() })),
        ("floor-idle", Control(C::FloorIdle { group: g() })),
        (
            "floor-revoked",
            Control(C::FloorRevoked {
                group: g(),
                code: ErrorCode::Preempted,
            }),
        ),
        (
            "fetch-recent",
            Control(C::FetchRecent {
                request_id: 9,
                group: g(),
                count: 5,
            }),
        ),
        (
            "fetch-done",
            Control(C::FetchDone {
                request_id: 9,
                group: g(),
                count: 5,
            }),
        ),
        (
            "leave",
            Control(C::Leave {
                request_id: 10,
                group: g(),
            }),
        ),
        ("ok", Control(C::Ok { request_id: 10 })),
        (
            "create-group",
            Control(C::CreateGroup {
                request_id: 11,
                group: g(),
                mode: GroupMode::Walkie,
            }),
        ),
        (
            "add-member",
            Control(C::AddMember {
                request_id: 12,
                group: g(),
                user: "bob".into(),
            }),
        ),
        (
            "remove-member",
            Control(C::RemoveMember {
                request_id: 13,
                group: g(),
                user: "bob".into(),
            }),
        ),
        (
            "group-left",
            Control(C::GroupLeft {
                group: g(),
                code: ErrorCode::NotMember,
            }),
        ),
        (
            "set-mode",
            Control(C::SetMode {
                request_id: 14,
                group: g(),
                mode: GroupMode::Notes,
            }),
        ),
        (
            "set-live-budget",
            Control(C::SetLiveBudget {
                request_id: 16,
                group: g(),
                budget_ms: Some(40),
            }),
        ),
        ("list-groups", Control(C::ListGroups { request_id: 15 })),
        (
            "group-list",
            Control(C::GroupList {
                request_id: 15,
                groups: vec![
                    GroupSummary {
                        group: g(),
                        mode: GroupMode::Walkie,
                    },
                    GroupSummary {
                        group: "notes".into(),
                        mode: GroupMode::Notes,
                    },
                ],
            }),
        ),
        (
            "list-members",
            Control(C::ListMembers {
                request_id: 16,
                group: g(),
            }),
        ),
        (
            "member-list",
            Control(C::MemberList {
                request_id: 16,
                group: g(),
                members: vec!["alice".into(), "bob".into()],
            }),
        ),
        (
            "datagram-live-read",
            Example::Datagram(vec![LiveRead {
                stream: 3,
                frames: 25,
            }]),
        ),
        (
            "list-member-status",
            Control(C::ListMemberStatus {
                request_id: 17,
                group: g(),
            }),
        ),
        (
            "member-status",
            Control(C::MemberStatus {
                request_id: 17,
                group: g(),
                members: vec![MemberState {
                    user: "bob".into(),
                    cursor: 300,
                    last_seen_ms: 1_767_225_600_000,
                }],
            }),
        ),
        (
            "list-clips",
            Control(C::ListClips {
                request_id: 18,
                group: g(),
                after_seq: 300,
                limit: 100,
            }),
        ),
        (
            "clip-list",
            Control(C::ClipList {
                request_id: 18,
                group: g(),
                clips: vec![ClipSummary {
                    seq: 301,
                    clip_id: CLIP,
                    talker: "alice".into(),
                    duration_ms: 4020,
                    bytes: 12_060,
                    created_ms: 1_767_225_600_123,
                }],
            }),
        ),
        (
            "delete-clip",
            Control(C::DeleteClip {
                request_id: 19,
                group: g(),
                seq: 301,
            }),
        ),
        (
            "clip-deleted",
            Control(C::ClipDeleted {
                group: g(),
                seq: 301,
                clip_id: CLIP,
            }),
        ),
        (
            "error-no-such-clip",
            Control(C::Error {
                request_id: 19,
                code: ErrorCode::NoSuchClip,
                message: "no clip 301 in team-1".into(),
            }),
        ),
        (
            "fetch-clip",
            Control(C::FetchClip {
                request_id: 20,
                group: g(),
                seq: 301,
            }),
        ),
        (
            "go-away",
            Control(C::GoAway {
                reconnect_after_ms: 1500,
                address: "relay-2.example.com:4433".into(),
            }),
        ),
    ]
    .into_iter()
    .chain(channel_examples())
    .chain(media_examples())
    .collect()
}

/// Section 14, the UDP media path.
fn media_examples() -> Vec<(&'static str, Example)> {
    use ptt_protocol::MediaMessage as M;
    let m = |m| Example::Control(ControlMessage::Media(m));
    vec![
        (
            "media-open",
            m(M::Open {
                request_id: 40,
                features: ptt_protocol::media::FEATURE_FRAMES,
            }),
        ),
        (
            "media-offer",
            m(M::Offer {
                request_id: 40,
                port: 4434,
                conn_id: 0x0123_4567_89ab_cdef,
                epoch: 0,
                features: ptt_protocol::media::FEATURE_FRAMES,
            }),
        ),
        (
            "error-media-unavailable",
            Example::Control(ControlMessage::Error {
                request_id: 40,
                code: ErrorCode::MediaUnavailable,
                message: "no media path".into(),
            }),
        ),
        ("media-close", m(M::Close { request_id: 41 })),
    ]
}

/// Section 12, roles and channels (issue #14).
fn channel_examples() -> Vec<(&'static str, Example)> {
    use ptt_protocol::{ChannelCounts, ChannelLimits, ChannelMessage as M, Role};
    let c = |m| Example::Control(ControlMessage::Channel(m));
    let news = || "news-daily".to_string();
    let club = || "club-news".to_string();
    let code = || "9f2c4e1a7b3d5f60a1b2c3d4".to_string();
    vec![
        (
            "create-channel",
            c(M::CreateChannel {
                request_id: 20,
                channel: news(),
                public: true,
            }),
        ),
        (
            "list-channels",
            c(M::ListChannels {
                request_id: 21,
                prefix: "news".into(),
            }),
        ),
        (
            "channel-list",
            c(M::ChannelList {
                request_id: 21,
                channels: vec![news(), "news-weekly".into()],
            }),
        ),
        (
            "follow",
            c(M::Follow {
                request_id: 22,
                channel: news(),
                invite: String::new(),
            }),
        ),
        (
            "create-invite",
            c(M::CreateInvite {
                request_id: 23,
                channel: club(),
            }),
        ),
        (
            "invite",
            c(M::Invite {
                request_id: 23,
                channel: club(),
                code: code(),
            }),
        ),
        (
            "follow-with-invite",
            c(M::Follow {
                request_id: 24,
                channel: club(),
                invite: code(),
            }),
        ),
        (
            "revoke-invite",
            c(M::RevokeInvite {
                request_id: 25,
                channel: club(),
                code: code(),
            }),
        ),
        (
            "mute",
            c(M::Mute {
                request_id: 26,
                channel: news(),
            }),
        ),
        (
            "unmute",
            c(M::Unmute {
                request_id: 27,
                channel: news(),
            }),
        ),
        (
            "unfollow",
            c(M::Unfollow {
                request_id: 28,
                channel: news(),
            }),
        ),
        (
            "set-role",
            c(M::SetRole {
                request_id: 29,
                group: "team-1".into(),
                user: "bob".into(),
                role: Role::Listener,
            }),
        ),
        (
            "error-listener-only",
            Example::Control(ControlMessage::Error {
                request_id: 30,
                code: ErrorCode::ListenerOnly,
                message: "ListenerOnly (30)".into(),
            }),
        ),
        (
            "set-channel-limits",
            c(M::SetChannelLimits {
                request_id: 31,
                channel: news(),
                limits: ChannelLimits {
                    clips_per_day: 20,
                    max_clip_ms: 30_000,
                    backlog_clips: 5,
                    backlog_days: 2,
                },
            }),
        ),
        (
            "channel-stats",
            c(M::ChannelStats {
                request_id: 32,
                channel: news(),
            }),
        ),
        (
            "channel-counts",
            c(M::ChannelCounts {
                request_id: 32,
                channel: news(),
                counts: ChannelCounts {
                    followers: 100_000,
                    online: 30_000,
                    delivered: 1_250_000,
                    played: 400_000,
                },
            }),
        ),
    ]
}

/// Examples written by hand-picked bytes rather than the encoder: what a
/// reader must tolerate. (title, bytes, decoded value)
fn tolerance_examples() -> Vec<(&'static str, Vec<u8>, Example)> {
    vec![
        (
            "ok-with-a-later-field",
            vec![0x21, 0x03, 0x0a, 0x41, 0x2c],
            Example::Control(ControlMessage::Ok { request_id: 10 }),
        ),
        (
            "unknown-control-message",
            vec![0x3e, 0x02, 0xca, 0xfe],
            Example::Control(ControlMessage::Unknown { kind: 0x3e }),
        ),
        (
            "datagram-tolerated",
            vec![
                0x3e, 0x02, 0xca, 0xfe, 0x3b, 0x02, 0x07, 0x32, 0x3b, 0x05, 0x0b,
            ],
            Example::Datagram(vec![LiveRead {
                stream: 7,
                frames: 50,
            }]),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One parsed block of the document.
#[derive(Debug)]
struct Block {
    title: String,
    bytes: Vec<u8>,
    decodes_to: Option<String>,
    line: usize,
}

fn parse_doc(doc: &str) -> Vec<Block> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(title) = lines[i].trim().strip_prefix("```hex title=") else {
            i += 1;
            continue;
        };
        let start = i + 1;
        let mut bytes = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            let content = lines[i].split('#').next().unwrap_or("");
            for tok in content.split_whitespace() {
                let b = u8::from_str_radix(tok, 16).unwrap_or_else(|_| {
                    panic!("PROTOCOL.md line {}: {tok:?} is not a hex byte", i + 1)
                });
                bytes.push(b);
            }
            i += 1;
        }
        i += 1;
        // The first non-empty line after the block.
        while i < lines.len() && lines[i].trim().is_empty() {
            i += 1;
        }
        let decodes_to = lines.get(i).and_then(|l| {
            l.trim()
                .strip_prefix("decodes-to: `")
                .and_then(|r| r.strip_suffix('`'))
                .map(str::to_owned)
        });
        blocks.push(Block {
            title: title.trim().to_owned(),
            bytes,
            decodes_to,
            line: start,
        });
    }
    blocks
}

/// Decodes the block `title`: a datagram, or one frame of a stream.
fn decode(title: &str, bytes: &[u8]) -> Example {
    if title.starts_with("datagram") {
        return Example::Datagram(live_reads(bytes).collect());
    }
    let mut dec = FrameDecoder::new(ptt_protocol::message::MAX_PAYLOAD_LEN);
    dec.push(Bytes::copy_from_slice(bytes));
    let frame = dec
        .next_frame()
        .expect("a valid frame header")
        .expect("one whole frame");
    assert_eq!(dec.buffered(), 0, "bytes after the frame");
    match frame.kind {
        kind::CLIP_HEADER | kind::CLIP_FRAME | kind::CLIP_END => Example::Clip(
            ClipMessage::decode(frame.kind, frame.payload).expect("a valid clip message"),
        ),
        _ => Example::Control(
            ControlMessage::decode(frame.kind, frame.payload).expect("a valid control message"),
        ),
    }
}

#[test]
fn every_hex_example_in_protocol_md_decodes_to_its_stated_value() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md at the repository root");
    let blocks = parse_doc(&doc);
    let encoded = examples();
    let tolerated = tolerance_examples();
    let mut seen = Vec::new();
    for block in &blocks {
        let at = format!("PROTOCOL.md block {:?} (line {})", block.title, block.line);
        let decoded = decode(&block.title, &block.bytes);
        let stated = block
            .decodes_to
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no `decodes-to:` line under it"));
        assert_eq!(&decoded.debug(), stated, "{at}: decodes to something else");
        if let Some((_, expected)) = encoded.iter().find(|(t, _)| *t == block.title) {
            assert_eq!(&decoded, expected, "{at}");
            assert_eq!(
                hex(&expected.encode()),
                hex(&block.bytes),
                "{at}: not what the encoder writes"
            );
        } else if let Some((_, bytes, expected)) =
            tolerated.iter().find(|(t, ..)| *t == block.title)
        {
            assert_eq!(&decoded, expected, "{at}");
            assert_eq!(bytes, &block.bytes, "{at}");
        } else {
            panic!("{at}: no expected value in protocol/tests/protocol_md.rs");
        }
        seen.push(block.title.clone());
    }
    for title in encoded
        .iter()
        .map(|(t, _)| *t)
        .chain(tolerated.iter().map(|(t, ..)| *t))
    {
        assert!(
            seen.iter().any(|s| s == title),
            "PROTOCOL.md lost its {title:?} example"
        );
    }
}

#[test]
fn the_block_parser_reads_comments_and_statements() {
    let doc = "x\n```hex title=ok\n21 01  # Ok, 1 byte\n05     # request_id 5\n```\n\ndecodes-to: `Ok { request_id: 5 }`\n";
    let blocks = parse_doc(doc);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].bytes, [0x21, 0x01, 0x05]);
    assert_eq!(
        decode(&blocks[0].title, &blocks[0].bytes).debug(),
        blocks[0].decodes_to.clone().unwrap()
    );
}

/// Field-by-field layouts of a few examples, for annotated blocks: each
/// field encoded on its own with the crate's primitives. The test above
/// checks that the concatenation is what the encoder writes.
fn annotated(title: &str) -> Option<Vec<(Vec<u8>, String)>> {
    let v = |n: u64| {
        let mut b = BytesMut::new();
        put_varint(&mut b, n);
        b.to_vec()
    };
    let s = |t: &str| {
        let mut b = BytesMut::new();
        put_string(&mut b, t);
        b.to_vec()
    };
    let raw = |b: &[u8]| b.to_vec();
    let by = |b: &[u8]| {
        let mut out = BytesMut::new();
        put_bytes(&mut out, b);
        out.to_vec()
    };
    let fields: Vec<(Vec<u8>, String)> = match title {
        "hello" => vec![
            (v(1), "version = 1".into()),
            (
                s(TOKEN),
                format!("token: length {}, then UTF-8", TOKEN.len()),
            ),
            (s("ios/2.3"), "client: length 7, \"ios/2.3\"".into()),
        ],
        "clip-list" => vec![
            (v(18), "request_id = 18".into()),
            (s("team-1"), "group: length 6, \"team-1\"".into()),
            (v(1), "clips: 1 entry".into()),
            (v(301), "seq = 301".into()),
            (raw(CLIP.as_bytes()), "clip_id: 16 raw bytes".into()),
            (s("alice"), "talker: length 5, \"alice\"".into()),
            (v(4020), "duration_ms = 4020".into()),
            (v(12_060), "bytes = 12060".into()),
            (v(1_767_225_600_123), "created_ms (8-byte varint)".into()),
        ],
        "member-status" => vec![
            (v(17), "request_id = 17".into()),
            (s("team-1"), "group: length 6, \"team-1\"".into()),
            (v(1), "members: 1 entry".into()),
            (s("bob"), "user: length 3, \"bob\"".into()),
            (v(300), "cursor = 300".into()),
            (v(1_767_225_600_000), "last_seen_ms (8-byte varint)".into()),
        ],
        "clip-header-upload" | "clip-header-history" => {
            let history = title == "clip-header-history";
            vec![
                (s("team-1"), "group: length 6, \"team-1\"".into()),
                (raw(CLIP.as_bytes()), "clip_id: 16 raw bytes".into()),
                if history {
                    (s("alice"), "talker: length 5, \"alice\"".into())
                } else {
                    (s(""), "talker: empty (the relay fills it in)".into())
                },
                if history {
                    (v(301), "seq = 301 (2-byte varint)".into())
                } else {
                    (v(0), "seq = 0".into())
                },
                (raw(&[1]), "format = 1 (Opus)".into()),
                (v(48_000), "sample_rate = 48000 (4-byte varint)".into()),
                (raw(&[1]), "channels = 1".into()),
                (raw(&[20]), "frame_ms = 20".into()),
                (
                    v(1_767_225_600_123),
                    "created_ms = 1767225600123 (8-byte varint)".into(),
                ),
                if history {
                    (raw(&[3]), "flags = HISTORY | EMERGENCY".into())
                } else {
                    (raw(&[0]), "flags = 0".into())
                },
            ]
        }
        "clip-frame" => vec![
            (v(0), "index = 0".into()),
            (
                by(&[0x48, 0x0b, 0xe4, 0xc1, 0x36, 0xec, 0xc5, 0x80]),
                "data: length 8, one Opus packet".into(),
            ),
        ],
        "clip-end-upload" => vec![
            (v(201), "frame_count = 201 (2-byte varint)".into()),
            (v(0), "seq = 0 (talkers send 0)".into()),
            (
                by(&[0, 4, 17, 31, 22, 9, 2, 0]),
                "waveform: length 8, one byte 0..31 per bucket".into(),
            ),
        ],
        "group-left" => vec![
            (s("team-1"), "group: length 6, \"team-1\"".into()),
            (v(6), "code = 6 (NotMember)".into()),
        ],
        "go-away" => vec![
            (v(1500), "reconnect_after_ms = 1500 (2-byte varint)".into()),
            (
                s("relay-2.example.com:4433"),
                "address: length 24, \"relay-2.example.com:4433\"".into(),
            ),
        ],
        "datagram-live-read" => vec![
            (
                v(3),
                "stream = 3 (the relay's first unidirectional stream)".into(),
            ),
            (v(25), "frames = 25 (500 ms of 20 ms frames)".into()),
        ],
        "stored" => vec![
            (s("team-1"), "group".into()),
            (raw(CLIP.as_bytes()), "clip_id".into()),
            (v(301), "seq = 301".into()),
        ],
        _ => return None,
    };
    Some(fields)
}

/// Prints every example as a Markdown block, ready to paste.
#[test]
#[ignore = "generator for PROTOCOL.md; run with --ignored --nocapture"]
fn print_examples() {
    for (title, example) in examples() {
        let bytes = example.encode();
        println!("```hex title={title}");
        if let Some(fields) = annotated(title) {
            let payload_len: usize = fields.iter().map(|(b, _)| b.len()).sum();
            let kind = bytes[0];
            let header_len = bytes.len() - payload_len;
            println!(
                "{:<47} # type {kind:#04x}, payload length {payload_len}",
                hex(&bytes[..header_len])
            );
            for (field, note) in fields {
                for (i, chunk) in field.chunks(16).enumerate() {
                    if i == 0 {
                        println!("{:<47} # {note}", hex(chunk));
                    } else {
                        println!("{}", hex(chunk));
                    }
                }
            }
        } else {
            for chunk in bytes.chunks(16) {
                println!("{}", hex(chunk));
            }
        }
        println!("```");
        println!("decodes-to: `{}`", example.debug());
        println!();
    }
    for (title, bytes, example) in tolerance_examples() {
        println!("```hex title={title}\n{}\n```", hex(&bytes));
        println!("decodes-to: `{}`\n", example.debug());
    }
}
