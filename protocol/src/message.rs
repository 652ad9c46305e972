//! Every message of the protocol, with its encoding.
//!
//! A message on any stream is a frame: `type (varint) | length (varint) |
//! payload (length bytes)`. Fields are read in order from the payload and
//! any bytes after the last known field are ignored, so a later version may
//! append fields. Control messages of an unknown type are skipped
//! ([`ControlMessage::Unknown`]); on clip streams an unknown type is an error
//! because the stream's order matters. PROTOCOL.md specifies each layout.

use bytes::{BufMut, Bytes, BytesMut};

use crate::coding::*;
use crate::error::{DecodeError, ErrorCode};
use crate::ids::{ClipId, GroupMode};

/// The protocol version this crate speaks, sent in the hello.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest payload of any message, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// The longest group or user id, in bytes of UTF-8.
pub const MAX_ID_LEN: usize = 64;
/// The longest token, in bytes.
pub const MAX_TOKEN_LEN: usize = 2048;
/// The longest free text (error messages, client names), in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// The longest address in a [`ControlMessage::GoAway`] (a DNS name of 253
/// bytes, a colon and a port).
pub const MAX_ADDRESS_LEN: usize = 260;
/// The most entries in a list (groups, members).
pub const MAX_LIST_LEN: usize = 4096;
/// The longest waveform preview, in buckets.
pub const MAX_WAVEFORM_LEN: usize = 256;
/// The largest frame payload the decoder accepts (relays set a lower limit).
pub const MAX_FRAME_LEN: usize = 32 * 1024;

/// Message type numbers (PROTOCOL.md, "Message types"). All are below 64,
/// so each takes one byte on the wire. `LIVE_READ` travels in QUIC
/// datagrams only ([`crate::datagram`]).
pub mod kind {
    #![allow(missing_docs)]
    pub const HELLO: u64 = 0x01;
    pub const JOIN: u64 = 0x02;
    pub const LEAVE: u64 = 0x03;
    pub const FLOOR_REQUEST: u64 = 0x04;
    pub const FLOOR_RELEASE: u64 = 0x05;
    pub const DELIVERY_ACK: u64 = 0x06;
    pub const PLAYED: u64 = 0x07;
    pub const FETCH_RECENT: u64 = 0x08;
    pub const CREATE_GROUP: u64 = 0x10;
    pub const ADD_MEMBER: u64 = 0x11;
    pub const REMOVE_MEMBER: u64 = 0x12;
    pub const LIST_GROUPS: u64 = 0x13;
    pub const SET_MODE: u64 = 0x14;
    pub const LIST_MEMBERS: u64 = 0x15;
    pub const LIST_MEMBER_STATUS: u64 = 0x16;
    pub const LIST_CLIPS: u64 = 0x17;
    pub const DELETE_CLIP: u64 = 0x18;
    pub const FETCH_CLIP: u64 = 0x19;

    pub const WELCOME: u64 = 0x20;
    pub const OK: u64 = 0x21;
    pub const ERROR: u64 = 0x22;
    pub const JOINED: u64 = 0x23;
    pub const CAUGHT_UP: u64 = 0x24;
    pub const GAP: u64 = 0x25;
    pub const STORED: u64 = 0x26;
    pub const CLIP_REJECTED: u64 = 0x27;
    pub const RECEIPT: u64 = 0x28;
    pub const FLOOR_GRANTED: u64 = 0x29;
    pub const FLOOR_DENIED: u64 = 0x2a;
    pub const FLOOR_TAKEN: u64 = 0x2b;
    pub const FLOOR_IDLE: u64 = 0x2c;
    pub const FLOOR_REVOKED: u64 = 0x2d;
    pub const GROUP_LIST: u64 = 0x2e;
    pub const MEMBER_LIST: u64 = 0x2f;
    pub const FETCH_DONE: u64 = 0x30;
    pub const GROUP_LEFT: u64 = 0x31;
    pub const MEMBER_STATUS: u64 = 0x32;
    pub const CLIP_LIST: u64 = 0x33;
    pub const CLIP_DELETED: u64 = 0x34;
    pub const GO_AWAY: u64 = 0x36;

    pub const CLIP_HEADER: u64 = 0x38;
    pub const CLIP_FRAME: u64 = 0x39;
    pub const CLIP_END: u64 = 0x3a;

    pub const LIVE_READ: u64 = 0x3b;
    /// Reserved for the measurement harness's QUIC DATAGRAM live plane
    /// (`quinn-floor --live datagram`, issue #15 item 5 (a)): live frames
    /// in datagrams, relay → client. The relay never sends it.
    pub const LIVE_FRAMES: u64 = 0x3c;

    pub const SET_LIVE_BUDGET: u64 = 0x68;
}

/// The limits a relay enforces, announced in [`Welcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest clip, in milliseconds.
    pub max_clip_ms: u32,
    /// Largest clip, in bytes of frame payload.
    pub max_clip_bytes: u32,
    /// Largest single frame payload, in bytes.
    pub max_frame_bytes: u32,
    /// Clips one user may upload at the same time.
    pub max_concurrent_clips: u32,
    /// Clips one user may start per minute.
    pub clips_per_minute: u32,
    /// Idle time after which the relay closes a silent connection, in ms.
    pub idle_timeout_ms: u32,
}

/// The relay's answer to a valid hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version the relay speaks.
    pub version: u32,
    /// The authenticated user id, from the token.
    pub user: String,
    /// The relay's clock, Unix milliseconds.
    pub server_time_ms: u64,
    /// What the relay enforces.
    pub limits: Limits,
}

/// Whether a receipt reports delivery or playback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReceiptKind {
    /// The member's client received the whole clip and acknowledged it.
    Delivered = 1,
    /// The member listened to the clip.
    Played = 2,
}

/// A group and its floor mode, as listed by [`ControlMessage::GroupList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group id.
    pub group: String,
    /// The group's mode.
    pub mode: GroupMode,
}

/// A member's progress in a group, as listed by
/// [`ControlMessage::MemberStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    /// The user id.
    pub user: String,
    /// The member's durable cursor: every clip up to it was acknowledged.
    pub cursor: u64,
    /// When the member last joined or left the group on a connection, Unix
    /// ms (0: never).
    pub last_seen_ms: u64,
}

/// A stored clip, as listed by [`ControlMessage::ClipList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipSummary {
    /// Its group sequence number.
    pub seq: u64,
    /// The talker's clip id.
    pub clip_id: ClipId,
    /// The talker's user id.
    pub talker: String,
    /// Audio duration in ms (frames × frame duration).
    pub duration_ms: u64,
    /// Bytes of Opus packets.
    pub bytes: u64,
    /// When it was started, Unix ms (relay clock).
    pub created_ms: u64,
}

/// A message on the control stream, in either direction.
///
/// Variants up to `FetchClip` are sent by clients, the rest by the relay.
/// Requests carry a `request_id` chosen by the client and echoed in the
/// reply (`Ok`, `Error`, or the request's own answer), so a client can match
/// replies to requests; `0` is reserved for errors not tied to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// First message of a connection: protocol version and token.
    Hello {
        /// The client's protocol version.
        version: u32,
        /// The signed token.
        token: String,
        /// Free text naming the client software, for logs.
        client: String,
    },
    /// Start receiving a group's clips: catch-up from the member's cursor,
    /// then live.
    Join {
        /// Echoed in the reply.
        request_id: u64,
        /// The group to listen to.
        group: String,
    },
    /// Stop receiving a group's clips on this connection.
    Leave {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
    },
    /// Ask for the floor of a walkie group before talking.
    FloorRequest {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// Ask with emergency priority (needs the token's emergency claim).
        emergency: bool,
    },
    /// Give the floor back without sending a clip.
    FloorRelease {
        /// The group.
        group: String,
    },
    /// The client has the whole clip `seq`; moves the member's cursor.
    DeliveryAck {
        /// The group.
        group: String,
        /// The clip's group sequence number.
        seq: u64,
    },
    /// The member listened to clip `seq`.
    Played {
        /// The group.
        group: String,
        /// The clip's group sequence number.
        seq: u64,
    },
    /// Send the group's last `count` stored clips again.
    FetchRecent {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// How many clips, newest last.
        count: u32,
    },
    /// Admin: create a group.
    CreateGroup {
        /// Echoed in the reply.
        request_id: u64,
        /// The new group's id.
        group: String,
        /// Its mode.
        mode: GroupMode,
    },
    /// Admin: add a member to a group.
    AddMember {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// The user to add.
        user: String,
    },
    /// Admin: remove a member from a group.
    RemoveMember {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// The user to remove.
        user: String,
    },
    /// The groups the user belongs to (every group, for an admin).
    ListGroups {
        /// Echoed in the reply.
        request_id: u64,
    },
    /// Admin: change a group's mode.
    SetMode {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// The new mode.
        mode: GroupMode,
    },
    /// Admin: set a group's live latency budget (PROTOCOL.md §4.1).
    SetLiveBudget {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// The budget in ms (`None`: back to the relay's default).
        budget_ms: Option<u32>,
    },
    /// The members of a group the user belongs to.
    ListMembers {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
    },

    /// Admin: the members of a group with their cursor and last-seen time.
    ListMemberStatus {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
    },
    /// Admin: the stored clips of a group with `seq > after_seq`, oldest
    /// first, at most `limit` (the relay caps it at 100).
    ListClips {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// List clips after this one.
        after_seq: u64,
        /// How many at most.
        limit: u32,
    },
    /// Admin: delete a stored clip; members get `ClipDeleted`.
    DeleteClip {
        /// Echoed in the reply.
        request_id: u64,
        /// The group.
        group: String,
        /// The clip.
        seq: u64,
    },
    /// Send one stored clip again (like `FetchRecent`, for one `seq`).
    FetchClip {
        /// Echoed in `FetchDone`.
        request_id: u64,
        /// The group.
        group: String,
        /// The clip.
        seq: u64,
    },

    /// The relay accepted the hello.
    Welcome(Welcome),
    /// A request succeeded and has no other answer.
    Ok {
        /// The request's id.
        request_id: u64,
    },
    /// A request failed, or (with `request_id` 0) the connection is about to
    /// be closed with this code.
    Error {
        /// The request's id, or 0.
        request_id: u64,
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// The answer to `Join`: catch-up follows.
    Joined {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// The group's mode.
        mode: GroupMode,
        /// The member's cursor: every clip up to it was acknowledged.
        cursor: u64,
        /// The newest stored clip's sequence number.
        last_seq: u64,
        /// The group's live latency budget, ms: live frames may arrive in
        /// bursts up to this old (0: each frame at once). Read as 0 from a
        /// relay that does not send it.
        live_budget_ms: u32,
    },
    /// Catch-up of a group reached `seq`; what follows is live.
    CaughtUp {
        /// The group.
        group: String,
        /// The newest clip sent by catch-up.
        seq: u64,
    },
    /// Clips `from_seq..=to_seq` expired before the member received them.
    Gap {
        /// The group.
        group: String,
        /// The first missing clip.
        from_seq: u64,
        /// The last missing clip.
        to_seq: u64,
    },
    /// An uploaded clip is durable in the store as `seq`.
    Stored {
        /// The group.
        group: String,
        /// The talker's clip id.
        clip_id: ClipId,
        /// Its group sequence number.
        seq: u64,
    },
    /// An uploaded clip was refused; its stream is closed with the same code.
    ClipRejected {
        /// The talker's clip id (all zero when the header was unreadable).
        clip_id: ClipId,
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// A member received or played the talker's clip.
    Receipt {
        /// The group.
        group: String,
        /// The clip's sequence number.
        seq: u64,
        /// The clip's id.
        clip_id: ClipId,
        /// The member.
        user: String,
        /// Delivered or played.
        kind: ReceiptKind,
    },
    /// The floor is the requester's for at most `max_ms`.
    FloorGranted {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// How long the talker may hold the floor, in ms.
        max_ms: u32,
    },
    /// The floor is held by someone else.
    FloorDenied {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// Who holds it.
        holder: String,
    },
    /// Sent to the group's members: `user` holds the floor now.
    FloorTaken {
        /// The group.
        group: String,
        /// The talker.
        user: String,
        /// Taken with emergency priority.
        emergency: bool,
    },
    /// Sent to the group's members: nobody holds the floor.
    FloorIdle {
        /// The group.
        group: String,
    },
    /// Sent to a talker who lost the floor before releasing it.
    FloorRevoked {
        /// The group.
        group: String,
        /// Why: [`ErrorCode::Preempted`] or [`ErrorCode::ClipTooLong`].
        code: ErrorCode,
    },
    /// The answer to `ListGroups`.
    GroupList {
        /// The request's id.
        request_id: u64,
        /// The groups.
        groups: Vec<GroupSummary>,
    },
    /// The answer to `ListMembers`.
    MemberList {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// Its members' user ids.
        members: Vec<String>,
    },
    /// `FetchRecent` sent its clips (on clip streams) and is done.
    FetchDone {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// How many clips were sent.
        count: u32,
    },
    /// This connection no longer receives the group: the member was
    /// removed from it ([`ErrorCode::NotMember`]) or the group was deleted
    /// ([`ErrorCode::NoSuchGroup`]). Live deliveries of the group to this
    /// connection are reset with the same code; the group is no longer
    /// joined here.
    GroupLeft {
        /// The group.
        group: String,
        /// Why.
        code: ErrorCode,
    },
    /// A roles-and-channels message (types `0x40..=0x5f`, see
    /// [`crate::channel`]).
    Channel(crate::channel::ChannelMessage),
    /// A media-path message (types `0x60..=0x67`, see [`crate::media`]).
    Media(crate::media::MediaMessage),
    /// The answer to `ListMemberStatus`.
    MemberStatus {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// Every member, sorted by user id.
        members: Vec<MemberState>,
    },
    /// The answer to `ListClips`.
    ClipList {
        /// The request's id.
        request_id: u64,
        /// The group.
        group: String,
        /// The clips, oldest first.
        clips: Vec<ClipSummary>,
    },
    /// A stored clip was deleted by an administrator: drop it.
    ClipDeleted {
        /// The group.
        group: String,
        /// Its sequence number.
        seq: u64,
        /// Its clip id.
        clip_id: ClipId,
    },
    /// The relay is draining (it is about to stop): reconnect after
    /// `reconnect_after_ms`, to `address` when it is not empty. Clips in
    /// flight may still finish; start no new upload on this connection.
    GoAway {
        /// How long to wait before reconnecting, in milliseconds.
        reconnect_after_ms: u32,
        /// Where to reconnect (`host:port`, at most [`MAX_ADDRESS_LEN`]
        /// bytes); empty: the same address as before.
        address: String,
    },
    /// A message type this version does not know; skipped.
    Unknown {
        /// Its type number.
        kind: u64,
    },
}

/// The audio format of a clip's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ClipFormat {
    /// Each frame is one Opus packet.
    Opus = 1,
    /// The frames are consecutive pieces of one WAV file, for clients that
    /// cannot encode; the relay transcodes it to Opus before delivering it.
    Wav = 2,
}

/// The first message of every clip stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipHeader {
    /// The group the clip is spoken into.
    pub group: String,
    /// The talker's id for this clip, unique per talker; retries reuse it.
    pub clip_id: ClipId,
    /// The talker's user id (empty from talkers; the relay fills it in).
    pub talker: String,
    /// The group sequence number, or 0 while the clip is still live.
    pub seq: u64,
    /// The frames' format.
    pub format: ClipFormat,
    /// The sample rate of the audio the frames encode (Opus: the input rate).
    pub sample_rate: u32,
    /// Channels in the frames.
    pub channels: u8,
    /// Duration of each frame in ms (0 for WAV).
    pub frame_ms: u8,
    /// When the talker started, Unix ms (the relay's clock on delivery).
    pub created_ms: u64,
    /// Bit flags, see [`ClipHeader::FLAG_HISTORY`],
    /// [`ClipHeader::FLAG_EMERGENCY`] and [`ClipHeader::FLAG_FETCHED`];
    /// unknown bits are ignored.
    pub flags: u8,
}

impl ClipHeader {
    /// The clip comes from the store (catch-up or fetch), not live.
    pub const FLAG_HISTORY: u8 = 0x01;
    /// The clip was spoken with emergency priority.
    pub const FLAG_EMERGENCY: u8 = 0x02;
    /// The clip answers a `FetchRecent` request (always with
    /// [`ClipHeader::FLAG_HISTORY`]): the client asked for it again, so it
    /// is not a repeated delivery.
    pub const FLAG_FETCHED: u8 = 0x04;
    /// The receiver muted the clip's channel: the app stores the clip but
    /// does not notify (PROTOCOL.md, section 13).
    pub const FLAG_MUTED: u8 = 0x08;
    /// A live delivery to a member on the media path (PROTOCOL.md §14):
    /// the stream carries the header and the end, the frames come in UDP
    /// `Frame` packets.
    pub const FLAG_MEDIA: u8 = 0x10;
}

/// A message on a clip stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipMessage {
    /// What the clip is; first on the stream.
    Header(ClipHeader),
    /// One frame: an Opus packet (or a piece of WAV).
    Frame {
        /// 0 for the first frame, then one more each frame.
        index: u32,
        /// The frame's bytes.
        data: Bytes,
    },
    /// The clip is complete; last on the stream.
    End {
        /// How many frames the clip has.
        frame_count: u32,
        /// Its group sequence number (0 from talkers).
        seq: u64,
        /// A waveform preview, one byte (0 to 31) per bucket; may be empty.
        waveform: Bytes,
    },
}

impl ControlMessage {
    /// The message's type number.
    pub fn kind(&self) -> u64 {
        use ControlMessage::*;
        match self {
            Hello { .. } => kind::HELLO,
            Join { .. } => kind::JOIN,
            Leave { .. } => kind::LEAVE,
            FloorRequest { .. } => kind::FLOOR_REQUEST,
            FloorRelease { .. } => kind::FLOOR_RELEASE,
            DeliveryAck { .. } => kind::DELIVERY_ACK,
            Played { .. } => kind::PLAYED,
            FetchRecent { .. } => kind::FETCH_RECENT,
            CreateGroup { .. } => kind::CREATE_GROUP,
            AddMember { .. } => kind::ADD_MEMBER,
            RemoveMember { .. } => kind::REMOVE_MEMBER,
            ListGroups { .. } => kind::LIST_GROUPS,
            SetMode { .. } => kind::SET_MODE,
            SetLiveBudget { .. } => kind::SET_LIVE_BUDGET,
            ListMembers { .. } => kind::LIST_MEMBERS,
            ListMemberStatus { .. } => kind::LIST_MEMBER_STATUS,
            ListClips { .. } => kind::LIST_CLIPS,
            DeleteClip { .. } => kind::DELETE_CLIP,
            FetchClip { .. } => kind::FETCH_CLIP,
            Welcome(_) => kind::WELCOME,
            Ok { .. } => kind::OK,
            Error { .. } => kind::ERROR,
            Joined { .. } => kind::JOINED,
            CaughtUp { .. } => kind::CAUGHT_UP,
            Gap { .. } => kind::GAP,
            Stored { .. } => kind::STORED,
            ClipRejected { .. } => kind::CLIP_REJECTED,
            Receipt { .. } => kind::RECEIPT,
            FloorGranted { .. } => kind::FLOOR_GRANTED,
            FloorDenied { .. } => kind::FLOOR_DENIED,
            FloorTaken { .. } => kind::FLOOR_TAKEN,
            FloorIdle { .. } => kind::FLOOR_IDLE,
            FloorRevoked { .. } => kind::FLOOR_REVOKED,
            GroupList { .. } => kind::GROUP_LIST,
            MemberList { .. } => kind::MEMBER_LIST,
            FetchDone { .. } => kind::FETCH_DONE,
            GroupLeft { .. } => kind::GROUP_LEFT,
            Channel(m) => m.kind(),
            Media(m) => m.kind(),
            MemberStatus { .. } => kind::MEMBER_STATUS,
            ClipList { .. } => kind::CLIP_LIST,
            ClipDeleted { .. } => kind::CLIP_DELETED,
            GoAway { .. } => kind::GO_AWAY,
            Unknown { kind } => *kind,
        }
    }

    /// Appends the framed message (type, length, payload) to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut payload = BytesMut::new();
        self.encode_payload(&mut payload);
        put_frame(buf, self.kind(), &payload);
    }

    /// The framed message as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    fn encode_payload(&self, p: &mut BytesMut) {
        use ControlMessage::*;
        match self {
            Hello {
                version,
                token,
                client,
            } => {
                put_varint(p, u64::from(*version));
                put_string(p, token);
                put_string(p, client);
            }
            Join { request_id, group }
            | Leave { request_id, group }
            | ListMembers { request_id, group }
            | ListMemberStatus { request_id, group } => {
                put_varint(p, *request_id);
                put_string(p, group);
            }
            ListClips {
                request_id,
                group,
                after_seq,
                limit,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, *after_seq);
                put_varint(p, u64::from(*limit));
            }
            DeleteClip {
                request_id,
                group,
                seq,
            }
            | FetchClip {
                request_id,
                group,
                seq,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, *seq);
            }
            MemberStatus {
                request_id,
                group,
                members,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, members.len() as u64);
                for m in members {
                    put_string(p, &m.user);
                    put_varint(p, m.cursor);
                    put_varint(p, m.last_seen_ms);
                }
            }
            ClipList {
                request_id,
                group,
                clips,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, clips.len() as u64);
                for c in clips {
                    put_varint(p, c.seq);
                    p.put_slice(c.clip_id.as_bytes());
                    put_string(p, &c.talker);
                    put_varint(p, c.duration_ms);
                    put_varint(p, c.bytes);
                    put_varint(p, c.created_ms);
                }
            }
            ClipDeleted {
                group,
                seq,
                clip_id,
            } => {
                put_string(p, group);
                put_varint(p, *seq);
                p.put_slice(clip_id.as_bytes());
            }
            FloorRequest {
                request_id,
                group,
                emergency,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                p.put_u8(u8::from(*emergency));
            }
            FloorRelease { group } | FloorIdle { group } => put_string(p, group),
            DeliveryAck { group, seq } | Played { group, seq } | CaughtUp { group, seq } => {
                put_string(p, group);
                put_varint(p, *seq);
            }
            FetchRecent {
                request_id,
                group,
                count,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, u64::from(*count));
            }
            CreateGroup {
                request_id,
                group,
                mode,
            }
            | SetMode {
                request_id,
                group,
                mode,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                p.put_u8(*mode as u8);
            }
            AddMember {
                request_id,
                group,
                user,
            }
            | RemoveMember {
                request_id,
                group,
                user,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_string(p, user);
            }
            ListGroups { request_id } | Ok { request_id } => put_varint(p, *request_id),
            Welcome(w) => {
                put_varint(p, u64::from(w.version));
                put_string(p, &w.user);
                put_varint(p, w.server_time_ms);
                let l = &w.limits;
                for v in [
                    l.max_clip_ms,
                    l.max_clip_bytes,
                    l.max_frame_bytes,
                    l.max_concurrent_clips,
                    l.clips_per_minute,
                    l.idle_timeout_ms,
                ] {
                    put_varint(p, u64::from(v));
                }
            }
            Error {
                request_id,
                code,
                message,
            } => {
                put_varint(p, *request_id);
                put_varint(p, u64::from(code.code()));
                put_string(p, truncate_text(message));
            }
            Joined {
                request_id,
                group,
                mode,
                cursor,
                last_seq,
                live_budget_ms,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                p.put_u8(*mode as u8);
                put_varint(p, *cursor);
                put_varint(p, *last_seq);
                put_varint(p, u64::from(*live_budget_ms));
            }
            SetLiveBudget {
                request_id,
                group,
                budget_ms,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                p.put_u8(u8::from(budget_ms.is_none()));
                put_varint(p, u64::from(budget_ms.unwrap_or(0)));
            }
            Gap {
                group,
                from_seq,
                to_seq,
            } => {
                put_string(p, group);
                put_varint(p, *from_seq);
                put_varint(p, *to_seq);
            }
            Stored {
                group,
                clip_id,
                seq,
            } => {
                put_string(p, group);
                p.put_slice(clip_id.as_bytes());
                put_varint(p, *seq);
            }
            ClipRejected {
                clip_id,
                code,
                message,
            } => {
                p.put_slice(clip_id.as_bytes());
                put_varint(p, u64::from(code.code()));
                put_string(p, truncate_text(message));
            }
            Receipt {
                group,
                seq,
                clip_id,
                user,
                kind,
            } => {
                put_string(p, group);
                put_varint(p, *seq);
                p.put_slice(clip_id.as_bytes());
                put_string(p, user);
                p.put_u8(*kind as u8);
            }
            FloorGranted {
                request_id,
                group,
                max_ms,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, u64::from(*max_ms));
            }
            FloorDenied {
                request_id,
                group,
                holder,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_string(p, holder);
            }
            FloorTaken {
                group,
                user,
                emergency,
            } => {
                put_string(p, group);
                put_string(p, user);
                p.put_u8(u8::from(*emergency));
            }
            FloorRevoked { group, code } | GroupLeft { group, code } => {
                put_string(p, group);
                put_varint(p, u64::from(code.code()));
            }
            GroupList { request_id, groups } => {
                put_varint(p, *request_id);
                put_varint(p, groups.len() as u64);
                for g in groups {
                    put_string(p, &g.group);
                    p.put_u8(g.mode as u8);
                }
            }
            MemberList {
                request_id,
                group,
                members,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, members.len() as u64);
                for m in members {
                    put_string(p, m);
                }
            }
            FetchDone {
                request_id,
                group,
                count,
            } => {
                put_varint(p, *request_id);
                put_string(p, group);
                put_varint(p, u64::from(*count));
            }
            GoAway {
                reconnect_after_ms,
                address,
            } => {
                put_varint(p, u64::from(*reconnect_after_ms));
                put_string(p, address);
            }
            Channel(m) => m.encode_payload(p),
            Media(m) => m.encode_payload(p),
            Unknown { .. } => {}
        }
    }

    /// Decodes the payload of a control message of type `kind`.
    pub fn decode(kind: u64, mut p: Bytes) -> Result<ControlMessage, DecodeError> {
        let p = &mut p;
        let result = Self::decode_fields(kind, p);
        // A payload that ends inside its fields is malformed, not "wait for
        // more": the frame length said how long it is.
        result.map_err(|e| match e {
            DecodeError::Short => DecodeError::Truncated { kind },
            e => e,
        })
    }

    fn decode_fields(k: u64, p: &mut Bytes) -> Result<ControlMessage, DecodeError> {
        use ControlMessage::*;
        let group = |p: &mut Bytes| get_string(p, MAX_ID_LEN, "group");
        let user = |p: &mut Bytes| get_string(p, MAX_ID_LEN, "user");
        Ok(match k {
            kind::HELLO => Hello {
                version: get_varint_u32(p, "version")?,
                token: get_string(p, MAX_TOKEN_LEN, "token")?,
                client: get_string(p, MAX_TEXT_LEN, "client")?,
            },
            kind::JOIN => request(p, |request_id, p| {
                Ok(Join {
                    request_id,
                    group: get_id(p, "group")?,
                })
            })?,
            kind::LEAVE => request(p, |request_id, p| {
                Ok(Leave {
                    request_id,
                    group: get_id(p, "group")?,
                })
            })?,
            kind::FLOOR_REQUEST => request(p, |request_id, p| {
                Ok(FloorRequest {
                    request_id,
                    group: get_id(p, "group")?,
                    emergency: get_bool(p, "emergency")?,
                })
            })?,
            kind::FLOOR_RELEASE => FloorRelease { group: group(p)? },
            kind::DELIVERY_ACK => DeliveryAck {
                group: group(p)?,
                seq: get_varint(p)?,
            },
            kind::PLAYED => Played {
                group: group(p)?,
                seq: get_varint(p)?,
            },
            kind::FETCH_RECENT => request(p, |request_id, p| {
                Ok(FetchRecent {
                    request_id,
                    group: get_id(p, "group")?,
                    count: get_varint_u32(p, "count")?,
                })
            })?,
            kind::CREATE_GROUP => request(p, |request_id, p| {
                Ok(CreateGroup {
                    request_id,
                    group: get_id(p, "group")?,
                    mode: get_mode(p)?,
                })
            })?,
            kind::ADD_MEMBER => request(p, |request_id, p| {
                Ok(AddMember {
                    request_id,
                    group: get_id(p, "group")?,
                    user: get_id(p, "user")?,
                })
            })?,
            kind::REMOVE_MEMBER => request(p, |request_id, p| {
                Ok(RemoveMember {
                    request_id,
                    group: get_id(p, "group")?,
                    user: get_id(p, "user")?,
                })
            })?,
            kind::LIST_GROUPS => ListGroups {
                request_id: get_varint(p)?,
            },
            kind::SET_MODE => request(p, |request_id, p| {
                Ok(SetMode {
                    request_id,
                    group: get_id(p, "group")?,
                    mode: get_mode(p)?,
                })
            })?,
            kind::LIST_MEMBERS => request(p, |request_id, p| {
                Ok(ListMembers {
                    request_id,
                    group: get_id(p, "group")?,
                })
            })?,
            kind::LIST_MEMBER_STATUS => request(p, |request_id, p| {
                Ok(ListMemberStatus {
                    request_id,
                    group: get_id(p, "group")?,
                })
            })?,
            kind::LIST_CLIPS => request(p, |request_id, p| {
                Ok(ListClips {
                    request_id,
                    group: get_id(p, "group")?,
                    after_seq: get_varint(p)?,
                    limit: get_varint_u32(p, "limit")?,
                })
            })?,
            kind::DELETE_CLIP => request(p, |request_id, p| {
                Ok(DeleteClip {
                    request_id,
                    group: get_id(p, "group")?,
                    seq: get_varint(p)?,
                })
            })?,
            kind::FETCH_CLIP => request(p, |request_id, p| {
                Ok(FetchClip {
                    request_id,
                    group: get_id(p, "group")?,
                    seq: get_varint(p)?,
                })
            })?,
            kind::WELCOME => Welcome(self::Welcome {
                version: get_varint_u32(p, "version")?,
                user: user(p)?,
                server_time_ms: get_varint(p)?,
                limits: Limits {
                    max_clip_ms: get_varint_u32(p, "max_clip_ms")?,
                    max_clip_bytes: get_varint_u32(p, "max_clip_bytes")?,
                    max_frame_bytes: get_varint_u32(p, "max_frame_bytes")?,
                    max_concurrent_clips: get_varint_u32(p, "max_concurrent_clips")?,
                    clips_per_minute: get_varint_u32(p, "clips_per_minute")?,
                    idle_timeout_ms: get_varint_u32(p, "idle_timeout_ms")?,
                },
            }),
            kind::OK => Ok {
                request_id: get_varint(p)?,
            },
            kind::ERROR => Error {
                request_id: get_varint(p)?,
                code: ErrorCode::from_code(get_varint(p)?),
                message: get_string(p, MAX_TEXT_LEN, "message")?,
            },
            kind::JOINED => Joined {
                request_id: get_varint(p)?,
                group: group(p)?,
                mode: get_mode(p)?,
                cursor: get_varint(p)?,
                last_seq: get_varint(p)?,
                // Appended in this version: absent from older relays.
                live_budget_ms: if p.is_empty() {
                    0
                } else {
                    get_varint_u32(p, "live_budget_ms")?
                },
            },
            kind::SET_LIVE_BUDGET => request(p, |request_id, p| {
                let group = get_id(p, "group")?;
                let default = get_bool(p, "default")?;
                let budget_ms = get_varint_u32(p, "budget_ms")?;
                Ok(SetLiveBudget {
                    request_id,
                    group,
                    budget_ms: (!default).then_some(budget_ms),
                })
            })?,
            kind::CAUGHT_UP => CaughtUp {
                group: group(p)?,
                seq: get_varint(p)?,
            },
            kind::GAP => Gap {
                group: group(p)?,
                from_seq: get_varint(p)?,
                to_seq: get_varint(p)?,
            },
            kind::STORED => Stored {
                group: group(p)?,
                clip_id: ClipId::from_bytes(get_array(p)?),
                seq: get_varint(p)?,
            },
            kind::CLIP_REJECTED => ClipRejected {
                clip_id: ClipId::from_bytes(get_array(p)?),
                code: ErrorCode::from_code(get_varint(p)?),
                message: get_string(p, MAX_TEXT_LEN, "message")?,
            },
            kind::RECEIPT => Receipt {
                group: group(p)?,
                seq: get_varint(p)?,
                clip_id: ClipId::from_bytes(get_array(p)?),
                user: user(p)?,
                kind: match get_u8(p)? {
                    1 => ReceiptKind::Delivered,
                    2 => ReceiptKind::Played,
                    v => {
                        return Err(DecodeError::OutOfRange {
                            field: "receipt kind",
                            value: u64::from(v),
                        });
                    }
                },
            },
            kind::FLOOR_GRANTED => FloorGranted {
                request_id: get_varint(p)?,
                group: group(p)?,
                max_ms: get_varint_u32(p, "max_ms")?,
            },
            kind::FLOOR_DENIED => FloorDenied {
                request_id: get_varint(p)?,
                group: group(p)?,
                holder: user(p)?,
            },
            kind::FLOOR_TAKEN => FloorTaken {
                group: group(p)?,
                user: user(p)?,
                emergency: get_bool(p, "emergency")?,
            },
            kind::FLOOR_IDLE => FloorIdle { group: group(p)? },
            kind::FLOOR_REVOKED => FloorRevoked {
                group: group(p)?,
                code: ErrorCode::from_code(get_varint(p)?),
            },
            kind::GROUP_LIST => {
                let request_id = get_varint(p)?;
                let n = get_count(p, MAX_LIST_LEN, 2, "groups")?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    groups.push(GroupSummary {
                        group: group(p)?,
                        mode: get_mode(p)?,
                    });
                }
                GroupList { request_id, groups }
            }
            kind::MEMBER_LIST => {
                let request_id = get_varint(p)?;
                let group = group(p)?;
                let n = get_count(p, MAX_LIST_LEN, 1, "members")?;
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    members.push(user(p)?);
                }
                MemberList {
                    request_id,
                    group,
                    members,
                }
            }
            kind::FETCH_DONE => FetchDone {
                request_id: get_varint(p)?,
                group: group(p)?,
                count: get_varint_u32(p, "count")?,
            },
            kind::GROUP_LEFT => GroupLeft {
                group: group(p)?,
                code: ErrorCode::from_code(get_varint(p)?),
            },
            kind::MEMBER_STATUS => {
                let request_id = get_varint(p)?;
                let group = group(p)?;
                // Each entry takes at least 3 bytes.
                let n = get_count(p, MAX_LIST_LEN, 3, "members")?;
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    members.push(MemberState {
                        user: user(p)?,
                        cursor: get_varint(p)?,
                        last_seen_ms: get_varint(p)?,
                    });
                }
                MemberStatus {
                    request_id,
                    group,
                    members,
                }
            }
            kind::CLIP_LIST => {
                let request_id = get_varint(p)?;
                let group = group(p)?;
                // Each entry takes at least 21 bytes.
                let n = get_count(p, MAX_LIST_LEN, 21, "clips")?;
                let mut clips = Vec::with_capacity(n);
                for _ in 0..n {
                    clips.push(ClipSummary {
                        seq: get_varint(p)?,
                        clip_id: ClipId::from_bytes(get_array(p)?),
                        talker: user(p)?,
                        duration_ms: get_varint(p)?,
                        bytes: get_varint(p)?,
                        created_ms: get_varint(p)?,
                    });
                }
                ClipList {
                    request_id,
                    group,
                    clips,
                }
            }
            kind::CLIP_DELETED => ClipDeleted {
                group: group(p)?,
                seq: get_varint(p)?,
                clip_id: ClipId::from_bytes(get_array(p)?),
            },
            kind::GO_AWAY => GoAway {
                reconnect_after_ms: get_varint_u32(p, "reconnect_after_ms")?,
                address: get_string(p, MAX_ADDRESS_LEN, "address")?,
            },
            kind::CLIP_HEADER | kind::CLIP_FRAME | kind::CLIP_END => {
                return Err(DecodeError::Unexpected {
                    kind: k,
                    stream: "control",
                });
            }
            k if crate::channel::is_channel_kind(k) => {
                match crate::channel::ChannelMessage::decode_fields(k, p)? {
                    Some(m) => Channel(m),
                    None => Unknown { kind: k },
                }
            }
            k if crate::media::is_media_kind(k) => {
                match crate::media::MediaMessage::decode_fields(k, p)? {
                    Some(m) => Media(m),
                    None => Unknown { kind: k },
                }
            }
            other => Unknown { kind: other },
        })
    }
}

impl ClipMessage {
    /// The message's type number.
    pub fn kind(&self) -> u64 {
        match self {
            ClipMessage::Header(_) => kind::CLIP_HEADER,
            ClipMessage::Frame { .. } => kind::CLIP_FRAME,
            ClipMessage::End { .. } => kind::CLIP_END,
        }
    }

    /// Appends the framed message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            ClipMessage::Frame { index, data } => encode_frame(buf, *index, data),
            _ => {
                let mut p = BytesMut::new();
                self.encode_payload(&mut p);
                put_frame(buf, self.kind(), &p);
            }
        }
    }

    /// The framed message as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    fn encode_payload(&self, p: &mut BytesMut) {
        match self {
            ClipMessage::Header(h) => {
                put_string(p, &h.group);
                p.put_slice(h.clip_id.as_bytes());
                put_string(p, &h.talker);
                put_varint(p, h.seq);
                p.put_u8(h.format as u8);
                put_varint(p, u64::from(h.sample_rate));
                p.put_u8(h.channels);
                p.put_u8(h.frame_ms);
                put_varint(p, h.created_ms);
                p.put_u8(h.flags);
            }
            ClipMessage::Frame { index, data } => {
                put_varint(p, u64::from(*index));
                put_bytes(p, data);
            }
            ClipMessage::End {
                frame_count,
                seq,
                waveform,
            } => {
                put_varint(p, u64::from(*frame_count));
                put_varint(p, *seq);
                put_bytes(p, waveform);
            }
        }
    }

    /// Decodes the payload of a clip-stream message of type `kind`. The
    /// frame data shares `payload`'s memory.
    pub fn decode(kind: u64, mut payload: Bytes) -> Result<ClipMessage, DecodeError> {
        let p = &mut payload;
        let result = (|| {
            Ok(match kind {
                kind::CLIP_HEADER => ClipMessage::Header(ClipHeader {
                    group: get_string(p, MAX_ID_LEN, "group")?,
                    clip_id: ClipId::from_bytes(get_array(p)?),
                    talker: get_string(p, MAX_ID_LEN, "talker")?,
                    seq: get_varint(p)?,
                    format: match get_u8(p)? {
                        1 => ClipFormat::Opus,
                        2 => ClipFormat::Wav,
                        v => {
                            return Err(DecodeError::OutOfRange {
                                field: "format",
                                value: u64::from(v),
                            });
                        }
                    },
                    sample_rate: get_varint_u32(p, "sample_rate")?,
                    channels: get_u8(p)?,
                    frame_ms: get_u8(p)?,
                    created_ms: get_varint(p)?,
                    flags: get_u8(p)?,
                }),
                kind::CLIP_FRAME => ClipMessage::Frame {
                    index: get_varint_u32(p, "index")?,
                    data: get_bytes(p, MAX_FRAME_LEN, "frame")?,
                },
                kind::CLIP_END => ClipMessage::End {
                    frame_count: get_varint_u32(p, "frame_count")?,
                    seq: get_varint(p)?,
                    waveform: get_bytes(p, MAX_WAVEFORM_LEN, "waveform")?,
                },
                other => {
                    return Err(DecodeError::Unexpected {
                        kind: other,
                        stream: "clip",
                    });
                }
            })
        })();
        result.map_err(|e| match e {
            DecodeError::Short => DecodeError::Truncated { kind },
            e => e,
        })
    }
}

/// Appends a clip frame message without building a [`ClipMessage`]; the
/// talker's hot path.
pub fn encode_frame(buf: &mut BytesMut, index: u32, data: &[u8]) {
    let payload_len = varint_len(u64::from(index)) + varint_len(data.len() as u64) + data.len();
    buf.reserve(1 + varint_len(payload_len as u64) + payload_len);
    put_varint(buf, kind::CLIP_FRAME);
    put_varint(buf, payload_len as u64);
    put_varint(buf, u64::from(index));
    put_bytes(buf, data);
}

fn put_frame(buf: &mut BytesMut, kind: u64, payload: &[u8]) {
    buf.reserve(varint_len(kind) + varint_len(payload.len() as u64) + payload.len());
    put_varint(buf, kind);
    put_varint(buf, payload.len() as u64);
    buf.put_slice(payload);
}

/// Decodes a request: its `request_id`, then the fields `decode` reads.
///
/// A field whose bytes are all there but whose value is invalid refuses
/// this request alone ([`DecodeError::InvalidField`]), since the frame was
/// read whole and the stream is still in step; a payload that ends inside
/// a field stays malformed. A request with id 0 cannot be answered (an
/// `Error` with id 0 announces a close), so its invalid fields stay fatal.
pub(crate) fn request<T>(
    p: &mut Bytes,
    decode: impl FnOnce(u64, &mut Bytes) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let request_id = get_varint(p)?;
    decode(request_id, p).map_err(|e| match e {
        DecodeError::OutOfRange { field, .. }
        | DecodeError::InvalidUtf8 { field }
        | DecodeError::TooLong { field, .. }
            if request_id != 0 =>
        {
            DecodeError::InvalidField { request_id, field }
        }
        e => e,
    })
}

/// Reads a group or user id of a request. Unlike [`get_string`], a length
/// longer than the payload is [`DecodeError::Short`] (malformed) before it
/// is [`DecodeError::TooLong`] (an invalid id, refused as a request).
pub(crate) fn get_id(p: &mut Bytes, field: &'static str) -> Result<String, DecodeError> {
    let mut after_len = &p[..];
    let len = get_varint(&mut after_len)?;
    if len > after_len.len() as u64 {
        return Err(DecodeError::Short);
    }
    get_string(p, MAX_ID_LEN, field)
}

fn get_bool(p: &mut Bytes, field: &'static str) -> Result<bool, DecodeError> {
    match get_u8(p)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::OutOfRange {
            field,
            value: u64::from(v),
        }),
    }
}

fn get_mode(p: &mut Bytes) -> Result<GroupMode, DecodeError> {
    let v = get_u8(p)?;
    GroupMode::from_u8(v).ok_or(DecodeError::OutOfRange {
        field: "mode",
        value: u64::from(v),
    })
}

fn truncate_text(s: &str) -> &str {
    if s.len() <= MAX_TEXT_LEN {
        return s;
    }
    let mut end = MAX_TEXT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::FrameDecoder;

    fn control_samples() -> Vec<ControlMessage> {
        use ControlMessage::*;
        let id = ClipId::from_bytes([7; 16]);
        vec![
            Hello {
                version: 1,
                token: "ptt1.abc.def".into(),
                client: "test".into(),
            },
            Join {
                request_id: 1,
                group: "g".into(),
            },
            Leave {
                request_id: 2,
                group: "g".into(),
            },
            FloorRequest {
                request_id: 3,
                group: "g".into(),
                emergency: true,
            },
            FloorRelease { group: "g".into() },
            DeliveryAck {
                group: "g".into(),
                seq: 300,
            },
            Played {
                group: "g".into(),
                seq: 1,
            },
            FetchRecent {
                request_id: 4,
                group: "g".into(),
                count: 10,
            },
            CreateGroup {
                request_id: 5,
                group: "g".into(),
                mode: GroupMode::Walkie,
            },
            AddMember {
                request_id: 6,
                group: "g".into(),
                user: "bob".into(),
            },
            RemoveMember {
                request_id: 7,
                group: "g".into(),
                user: "bob".into(),
            },
            ListGroups { request_id: 8 },
            SetMode {
                request_id: 9,
                group: "g".into(),
                mode: GroupMode::Notes,
            },
            ListMembers {
                request_id: 10,
                group: "g".into(),
            },
            SetLiveBudget {
                request_id: 10,
                group: "g".into(),
                budget_ms: Some(40),
            },
            SetLiveBudget {
                request_id: 10,
                group: "g".into(),
                budget_ms: None,
            },
            Welcome(self::Welcome {
                version: 1,
                user: "alice".into(),
                server_time_ms: 1_763_700_000_000,
                limits: Limits {
                    max_clip_ms: 60_000,
                    max_clip_bytes: 1 << 20,
                    max_frame_bytes: 4000,
                    max_concurrent_clips: 2,
                    clips_per_minute: 30,
                    idle_timeout_ms: 30_000,
                },
            }),
            Ok { request_id: 11 },
            Error {
                request_id: 0,
                code: ErrorCode::NotMember,
                message: "no".into(),
            },
            Joined {
                request_id: 12,
                group: "g".into(),
                mode: GroupMode::Notes,
                cursor: 3,
                last_seq: 9,
                live_budget_ms: 60,
            },
            CaughtUp {
                group: "g".into(),
                seq: 9,
            },
            Gap {
                group: "g".into(),
                from_seq: 1,
                to_seq: 4,
            },
            Stored {
                group: "g".into(),
                clip_id: id,
                seq: 5,
            },
            ClipRejected {
                clip_id: id,
                code: ErrorCode::TooLarge,
                message: "big".into(),
            },
            Receipt {
                group: "g".into(),
                seq: 5,
                clip_id: id,
                user: "bob".into(),
                kind: ReceiptKind::Played,
            },
            FloorGranted {
                request_id: 13,
                group: "g".into(),
                max_ms: 60_000,
            },
            FloorDenied {
                request_id: 14,
                group: "g".into(),
                holder: "carol".into(),
            },
            FloorTaken {
                group: "g".into(),
                user: "carol".into(),
                emergency: false,
            },
            FloorIdle { group: "g".into() },
            FloorRevoked {
                group: "g".into(),
                code: ErrorCode::Preempted,
            },
            GroupList {
                request_id: 15,
                groups: vec![GroupSummary {
                    group: "g".into(),
                    mode: GroupMode::Walkie,
                }],
            },
            MemberList {
                request_id: 16,
                group: "g".into(),
                members: vec!["a".into(), "b".into()],
            },
            FetchDone {
                request_id: 17,
                group: "g".into(),
                count: 2,
            },
            GroupLeft {
                group: "g".into(),
                code: ErrorCode::NotMember,
            },
            ListMemberStatus {
                request_id: 18,
                group: "g".into(),
            },
            ListClips {
                request_id: 19,
                group: "g".into(),
                after_seq: 4,
                limit: 100,
            },
            DeleteClip {
                request_id: 20,
                group: "g".into(),
                seq: 5,
            },
            FetchClip {
                request_id: 21,
                group: "g".into(),
                seq: 5,
            },
            MemberStatus {
                request_id: 18,
                group: "g".into(),
                members: vec![MemberState {
                    user: "bob".into(),
                    cursor: 4,
                    last_seen_ms: 1_763_700_000_000,
                }],
            },
            ClipList {
                request_id: 19,
                group: "g".into(),
                clips: vec![ClipSummary {
                    seq: 5,
                    clip_id: id,
                    talker: "alice".into(),
                    duration_ms: 4000,
                    bytes: 12_000,
                    created_ms: 1_763_700_000_000,
                }],
            },
            ClipDeleted {
                group: "g".into(),
                seq: 5,
                clip_id: id,
            },
            GoAway {
                reconnect_after_ms: 1500,
                address: "relay-2.example.com:4433".into(),
            },
        ]
    }

    #[test]
    fn every_control_message_round_trips() {
        for msg in control_samples() {
            let mut dec = FrameDecoder::new(MAX_PAYLOAD_LEN);
            dec.push(msg.to_bytes());
            let frame = dec.next_frame().unwrap().expect("a whole frame");
            assert_eq!(
                ControlMessage::decode(frame.kind, frame.payload).unwrap(),
                msg
            );
            assert!(dec.next_frame().unwrap().is_none());
        }
    }

    #[test]
    fn every_clip_message_round_trips() {
        let msgs = [
            ClipMessage::Header(ClipHeader {
                group: "g".into(),
                clip_id: ClipId::from_bytes([1; 16]),
                talker: "alice".into(),
                seq: 0,
                format: ClipFormat::Opus,
                sample_rate: 48_000,
                channels: 1,
                frame_ms: 20,
                created_ms: 5,
                flags: ClipHeader::FLAG_EMERGENCY,
            }),
            ClipMessage::Frame {
                index: 70_000,
                data: Bytes::from_static(&[0xfc, 1, 2, 3]),
            },
            ClipMessage::End {
                frame_count: 3,
                seq: 9,
                waveform: Bytes::from_static(&[0, 31, 4]),
            },
        ];
        for msg in msgs {
            let bytes = msg.to_bytes();
            let mut dec = FrameDecoder::new(MAX_PAYLOAD_LEN);
            dec.push(bytes);
            let frame = dec.next_frame().unwrap().unwrap();
            assert_eq!(ClipMessage::decode(frame.kind, frame.payload).unwrap(), msg);
        }
    }

    #[test]
    fn unknown_control_types_and_trailing_fields_are_tolerated() {
        // Type 0x3f with a 2-byte payload, then an Ok with an extra byte.
        let mut dec = FrameDecoder::new(MAX_PAYLOAD_LEN);
        dec.push(Bytes::from_static(&[
            0x3f, 0x02, 0xaa, 0xbb, 0x21, 0x02, 0x05, 0xff,
        ]));
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!(
            ControlMessage::decode(f.kind, f.payload).unwrap(),
            ControlMessage::Unknown { kind: 0x3f }
        );
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!(
            ControlMessage::decode(f.kind, f.payload).unwrap(),
            ControlMessage::Ok { request_id: 5 }
        );
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        // A Join whose group string claims more bytes than the payload holds.
        let err = ControlMessage::decode(kind::JOIN, Bytes::from_static(&[0x01, 0x09, b'g']));
        assert_eq!(err, Err(DecodeError::Truncated { kind: kind::JOIN }));
        // A clip message on the control stream.
        assert!(matches!(
            ControlMessage::decode(kind::CLIP_FRAME, Bytes::new()),
            Err(DecodeError::Unexpected { .. })
        ));
        // An unknown type on a clip stream.
        assert!(matches!(
            ClipMessage::decode(0x99, Bytes::new()),
            Err(DecodeError::Unexpected { .. })
        ));
        // A group id over the cap in a relay message.
        let mut p = BytesMut::new();
        put_string(&mut p, &"x".repeat(MAX_ID_LEN + 1));
        assert!(matches!(
            ControlMessage::decode(kind::FLOOR_IDLE, p.freeze()),
            Err(DecodeError::TooLong { .. })
        ));
        // A member list whose count is larger than the payload could hold.
        let mut p = BytesMut::new();
        put_varint(&mut p, 1);
        put_string(&mut p, "g");
        put_varint(&mut p, 4000);
        assert!(ControlMessage::decode(kind::MEMBER_LIST, p.freeze()).is_err());
    }

    /// A request payload: `request_id`, then `rest`.
    fn request_payload(request_id: u64, rest: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut p = BytesMut::new();
        put_varint(&mut p, request_id);
        rest(&mut p);
        p.freeze()
    }

    /// A Joined from a relay of before the live budget (no trailing
    /// field) reads as budget 0; bytes after the field are ignored.
    #[test]
    fn joined_without_a_live_budget_reads_as_zero() {
        let full = ControlMessage::Joined {
            request_id: 1,
            group: "g".into(),
            mode: GroupMode::Notes,
            cursor: 0,
            last_seq: 0,
            live_budget_ms: 60,
        }
        .to_bytes();
        // type, length, then the payload: drop the last byte (60).
        let payload = full.slice(2..full.len() - 1);
        match ControlMessage::decode(kind::JOINED, payload).unwrap() {
            ControlMessage::Joined { live_budget_ms, .. } => assert_eq!(live_budget_ms, 0),
            other => panic!("{other:?}"),
        }
        let mut longer = full.slice(2..).to_vec();
        longer.push(0x07);
        match ControlMessage::decode(kind::JOINED, longer.into()).unwrap() {
            ControlMessage::Joined { live_budget_ms, .. } => assert_eq!(live_budget_ms, 60),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_value_in_a_request_refuses_the_request_alone() {
        let invalid = |request_id, field| {
            Err::<ControlMessage, _>(DecodeError::InvalidField { request_id, field })
        };
        for k in [kind::CREATE_GROUP, kind::SET_MODE] {
            for mode in [0u8, 3, 0xff] {
                let p = request_payload(11, |p| {
                    put_string(p, "team-1");
                    p.put_u8(mode);
                });
                let got = ControlMessage::decode(k, p);
                assert_eq!(got, invalid(11, "mode"), "type {k:#x} mode {mode}");
                let err = got.unwrap_err();
                assert_eq!(err.request_id(), Some(11));
                assert_eq!(err.code(), ErrorCode::InvalidRequest);
            }
        }
        let p = request_payload(7, |p| {
            put_string(p, "team-1");
            p.put_u8(2);
        });
        assert_eq!(
            ControlMessage::decode(kind::FLOOR_REQUEST, p),
            invalid(7, "emergency")
        );
        let p = request_payload(9, |p| {
            put_string(p, "team-1");
            put_varint(p, u64::from(u32::MAX) + 1);
        });
        assert_eq!(
            ControlMessage::decode(kind::FETCH_RECENT, p),
            invalid(9, "count")
        );
        // Ids: longer than 64 bytes, or not UTF-8.
        let p = request_payload(1, |p| put_string(p, &"x".repeat(MAX_ID_LEN + 1)));
        assert_eq!(ControlMessage::decode(kind::JOIN, p), invalid(1, "group"));
        let p = request_payload(12, |p| {
            put_string(p, "team-1");
            put_bytes(p, &[0xff, 0xfe]);
        });
        assert_eq!(
            ControlMessage::decode(kind::ADD_MEMBER, p),
            invalid(12, "user")
        );
    }

    #[test]
    fn a_request_that_cannot_be_answered_stays_fatal() {
        // A payload that ends inside its fields is malformed, even when the
        // field it ends in claims an over-long id.
        let p = request_payload(1, |p| {
            put_varint(p, 1000);
            p.put_slice(b"abc");
        });
        assert_eq!(
            ControlMessage::decode(kind::JOIN, p),
            Err(DecodeError::Truncated { kind: kind::JOIN })
        );
        let p = request_payload(11, |p| put_string(p, "team-1"));
        assert_eq!(
            ControlMessage::decode(kind::CREATE_GROUP, p),
            Err(DecodeError::Truncated {
                kind: kind::CREATE_GROUP
            })
        );
        // Request id 0: an `Error` with id 0 would announce a close.
        let p = request_payload(0, |p| {
            put_string(p, "team-1");
            p.put_u8(3);
        });
        let err = ControlMessage::decode(kind::SET_MODE, p).unwrap_err();
        assert!(matches!(err, DecodeError::OutOfRange { field: "mode", .. }));
        assert_eq!((err.request_id(), err.code()), (None, ErrorCode::Protocol));
        // A relay message with a bad mode is malformed, not a request.
        let mut p = BytesMut::new();
        put_varint(&mut p, 1);
        put_string(&mut p, "team-1");
        p.put_u8(3);
        put_varint(&mut p, 0);
        put_varint(&mut p, 0);
        let err = ControlMessage::decode(kind::JOINED, p.freeze()).unwrap_err();
        assert_eq!(err.request_id(), None);
    }

    #[test]
    fn encode_frame_matches_the_generic_encoder() {
        let mut fast = BytesMut::new();
        encode_frame(&mut fast, 3, &[9; 200]);
        let generic = {
            let mut p = BytesMut::new();
            ClipMessage::Frame {
                index: 3,
                data: Bytes::from(vec![9; 200]),
            }
            .encode_payload(&mut p);
            let mut b = BytesMut::new();
            put_frame(&mut b, kind::CLIP_FRAME, &p);
            b
        };
        assert_eq!(fast, generic);
    }
}
