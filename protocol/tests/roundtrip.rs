//! Property tests: every control message, clip message and `LiveRead`
//! datagram encodes to bytes that decode to the same value, also when the
//! bytes arrive cut into arbitrary chunks, and a cut-short message never
//! decodes.

use bytes::Bytes;
use proptest::prelude::*;
use ptt_protocol::message::{GroupSummary, Limits, MAX_PAYLOAD_LEN};
use ptt_protocol::{
    ClipFormat, ClipHeader, ClipId, ClipMessage, ControlMessage, ErrorCode, FrameDecoder,
    GroupMode, LiveRead, ReceiptKind, Welcome, live_reads,
};

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.@-]{1,64}"
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, up to 200 characters (at most 800 bytes, under the
    // 1 KiB text limit).
    proptest::collection::vec(any::<char>(), 0..200).prop_map(|c| c.into_iter().collect())
}

fn clip_id() -> impl Strategy<Value = ClipId> {
    any::<[u8; 16]>().prop_map(ClipId::from_bytes)
}

fn mode() -> impl Strategy<Value = GroupMode> {
    prop_oneof![Just(GroupMode::Walkie), Just(GroupMode::Notes)]
}

fn code() -> impl Strategy<Value = ErrorCode> {
    (0u64..256)
        .prop_map(ErrorCode::from_code)
        .prop_filter("a known code", |c| *c != ErrorCode::Unknown)
}

fn receipt() -> impl Strategy<Value = ReceiptKind> {
    prop_oneof![Just(ReceiptKind::Delivered), Just(ReceiptKind::Played)]
}

/// A QUIC varint's range (what sequence numbers and request ids may hold).
fn var() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, 0u64..16_384, 0u64..(1 << 30), 0u64..(1 << 62)]
}

fn limits() -> impl Strategy<Value = Limits> {
    any::<[u32; 6]>().prop_map(|l| Limits {
        max_clip_ms: l[0],
        max_clip_bytes: l[1],
        max_frame_bytes: l[2],
        max_concurrent_clips: l[3],
        clips_per_minute: l[4],
        idle_timeout_ms: l[5],
    })
}

fn client_message() -> impl Strategy<Value = ControlMessage> {
    use ControlMessage::*;
    prop_oneof![
        (any::<u32>(), "[!-~]{0,300}", text()).prop_map(|(version, token, client)| Hello {
            version,
            token,
            client
        }),
        (var(), id()).prop_map(|(request_id, group)| Join { request_id, group }),
        (var(), id()).prop_map(|(request_id, group)| Leave { request_id, group }),
        (var(), id(), any::<bool>()).prop_map(|(request_id, group, emergency)| FloorRequest {
            request_id,
            group,
            emergency
        }),
        id().prop_map(|group| FloorRelease { group }),
        (id(), var()).prop_map(|(group, seq)| DeliveryAck { group, seq }),
        (id(), var()).prop_map(|(group, seq)| Played { group, seq }),
        (var(), id(), any::<u32>()).prop_map(|(request_id, group, count)| FetchRecent {
            request_id,
            group,
            count
        }),
        (var(), id(), mode()).prop_map(|(request_id, group, mode)| CreateGroup {
            request_id,
            group,
            mode
        }),
        (var(), id(), id()).prop_map(|(request_id, group, user)| AddMember {
            request_id,
            group,
            user
        }),
        (var(), id(), id()).prop_map(|(request_id, group, user)| RemoveMember {
            request_id,
            group,
            user
        }),
        var().prop_map(|request_id| ListGroups { request_id }),
        (var(), id(), mode()).prop_map(|(request_id, group, mode)| SetMode {
            request_id,
            group,
            mode
        }),
        (var(), id()).prop_map(|(request_id, group)| ListMembers { request_id, group }),
        (var(), id(), proptest::option::of(any::<u32>())).prop_map(
            |(request_id, group, budget_ms)| SetLiveBudget {
                request_id,
                group,
                budget_ms
            }
        ),
    ]
}

fn relay_message() -> impl Strategy<Value = ControlMessage> {
    use ControlMessage::*;
    prop_oneof![
        (any::<u32>(), id(), var(), limits()).prop_map(
            |(version, user, server_time_ms, limits)| Welcome(self::Welcome {
                version,
                user,
                server_time_ms,
                limits
            })
        ),
        var().prop_map(|request_id| Ok { request_id }),
        (var(), code(), text()).prop_map(|(request_id, code, message)| Error {
            request_id,
            code,
            message
        }),
        (var(), id(), mode(), var(), var(), any::<u32>()).prop_map(
            |(request_id, group, mode, cursor, last_seq, live_budget_ms)| Joined {
                request_id,
                group,
                mode,
                cursor,
                last_seq,
                live_budget_ms
            }
        ),
        (id(), var()).prop_map(|(group, seq)| CaughtUp { group, seq }),
        (id(), var(), var()).prop_map(|(group, from_seq, to_seq)| Gap {
            group,
            from_seq,
            to_seq
        }),
        (id(), clip_id(), var()).prop_map(|(group, clip_id, seq)| Stored {
            group,
            clip_id,
            seq
        }),
        (clip_id(), code(), text()).prop_map(|(clip_id, code, message)| ClipRejected {
            clip_id,
            code,
            message
        }),
        (id(), var(), clip_id(), id(), receipt()).prop_map(|(group, seq, clip_id, user, kind)| {
            Receipt {
                group,
                seq,
                clip_id,
                user,
                kind,
            }
        }),
        (var(), id(), any::<u32>()).prop_map(|(request_id, group, max_ms)| FloorGranted {
            request_id,
            group,
            max_ms
        }),
        (var(), id(), id()).prop_map(|(request_id, group, holder)| FloorDenied {
            request_id,
            group,
            holder
        }),
        (id(), id(), any::<bool>()).prop_map(|(group, user, emergency)| FloorTaken {
            group,
            user,
            emergency
        }),
        id().prop_map(|group| FloorIdle { group }),
        (id(), code()).prop_map(|(group, code)| FloorRevoked { group, code }),
        (
            var(),
            proptest::collection::vec(
                (id(), mode()).prop_map(|(group, mode)| GroupSummary { group, mode }),
                0..20
            )
        )
            .prop_map(|(request_id, groups)| GroupList { request_id, groups }),
        (var(), id(), proptest::collection::vec(id(), 0..20)).prop_map(
            |(request_id, group, members)| MemberList {
                request_id,
                group,
                members
            }
        ),
        (var(), id(), any::<u32>()).prop_map(|(request_id, group, count)| FetchDone {
            request_id,
            group,
            count
        }),
        (id(), code()).prop_map(|(group, code)| GroupLeft { group, code }),
    ]
}

fn clip_message() -> impl Strategy<Value = ClipMessage> {
    let header = (
        id(),
        clip_id(),
        prop_oneof![Just(String::new()), id()],
        var(),
        prop_oneof![Just(ClipFormat::Opus), Just(ClipFormat::Wav)],
        any::<u32>(),
        (any::<u8>(), any::<u8>(), var(), any::<u8>()),
    )
        .prop_map(
            |(
                group,
                clip_id,
                talker,
                seq,
                format,
                sample_rate,
                (channels, frame_ms, created_ms, flags),
            )| {
                ClipMessage::Header(ClipHeader {
                    group,
                    clip_id,
                    talker,
                    seq,
                    format,
                    sample_rate,
                    channels,
                    frame_ms,
                    created_ms,
                    flags,
                })
            },
        );
    prop_oneof![
        header,
        (
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(index, data)| ClipMessage::Frame {
                index,
                data: Bytes::from(data)
            }),
        (
            any::<u32>(),
            var(),
            proptest::collection::vec(0u8..32, 0..=256)
        )
            .prop_map(|(frame_count, seq, waveform)| ClipMessage::End {
                frame_count,
                seq,
                waveform: Bytes::from(waveform)
            }),
    ]
}

/// Decodes the frames of `wire` fed in chunks cut at `cuts`.
fn frames_of(wire: &[u8], cuts: &[usize]) -> Vec<(u64, Bytes)> {
    let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.sort_unstable();
    points.push(wire.len());
    let mut out = Vec::new();
    for point in points {
        decoder.push(Bytes::copy_from_slice(&wire[at..point]));
        at = point;
        while let Some(frame) = decoder.next_frame().expect("valid framing") {
            out.push((frame.kind, frame.payload));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn control_messages_round_trip(
        messages in proptest::collection::vec(prop_oneof![client_message(), relay_message()], 1..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let wire: Vec<u8> = messages.iter().flat_map(|m| m.to_bytes().to_vec()).collect();
        let frames = frames_of(&wire, &cuts);
        prop_assert_eq!(frames.len(), messages.len());
        for ((kind, payload), message) in frames.into_iter().zip(&messages) {
            prop_assert_eq!(kind, message.kind());
            prop_assert_eq!(&ControlMessage::decode(kind, payload).expect("decodes"), message);
        }
    }

    #[test]
    fn a_cut_short_control_message_does_not_decode(
        message in prop_oneof![client_message(), relay_message()],
        keep in any::<usize>(),
    ) {
        let wire = message.to_bytes();
        let keep = keep % wire.len();
        let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
        decoder.push(wire.slice(..keep));
        prop_assert!(decoder.next_frame().expect("a prefix is not an error").is_none());
    }

    #[test]
    fn clip_messages_round_trip(
        messages in proptest::collection::vec(clip_message(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let wire: Vec<u8> = messages.iter().flat_map(|m| m.to_bytes().to_vec()).collect();
        let frames = frames_of(&wire, &cuts);
        prop_assert_eq!(frames.len(), messages.len());
        for ((kind, payload), message) in frames.into_iter().zip(&messages) {
            prop_assert_eq!(kind, message.kind());
            prop_assert_eq!(&ClipMessage::decode(kind, payload).expect("decodes"), message);
        }
    }

    #[test]
    fn live_read_datagrams_round_trip(
        reports in proptest::collection::vec((0u64..(1 << 62), any::<u32>()), 0..20),
    ) {
        let reports: Vec<LiveRead> =
            reports.into_iter().map(|(stream, frames)| LiveRead { stream, frames }).collect();
        let datagram: Vec<u8> = reports.iter().flat_map(|r| r.to_bytes().to_vec()).collect();
        prop_assert_eq!(live_reads(&datagram).collect::<Vec<_>>(), reports);
    }
}
