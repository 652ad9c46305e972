//! Roles and broadcast channels (PROTOCOL.md, section 13): the messages of
//! types `0x40..=0x4f` (client → relay) and `0x50..=0x5f` (relay → client).
//!
//! A channel is a group in which only its owner, admins and publishers
//! (members) talk and any number of followers listen. Every message here
//! travels on the control stream inside [`crate::ControlMessage::Channel`],
//! framed as every other control message.

use bytes::{BufMut, Bytes, BytesMut};

use crate::coding::*;
use crate::error::DecodeError;
use crate::message::{MAX_ID_LEN, MAX_LIST_LEN, get_id, request};

/// Message type numbers of this module.
pub mod kind {
    #![allow(missing_docs)]
    pub const CREATE_CHANNEL: u64 = 0x40;
    pub const FOLLOW: u64 = 0x41;
    pub const UNFOLLOW: u64 = 0x42;
    pub const MUTE: u64 = 0x43;
    pub const UNMUTE: u64 = 0x44;
    pub const LIST_CHANNELS: u64 = 0x45;
    pub const SET_ROLE: u64 = 0x46;
    pub const CREATE_INVITE: u64 = 0x47;
    pub const REVOKE_INVITE: u64 = 0x48;
    pub const SET_CHANNEL_LIMITS: u64 = 0x49;
    pub const CHANNEL_STATS: u64 = 0x4a;

    pub const CHANNEL_LIST: u64 = 0x50;
    pub const INVITE: u64 = 0x51;
    pub const CHANNEL_COUNTS: u64 = 0x52;
}

/// Whether `kind` is one of this module's message types.
pub fn is_channel_kind(kind: u64) -> bool {
    (0x40..=0x5f).contains(&kind)
}

/// What a user may do in a group or channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Role {
    /// Owns the group: everything an admin may, plus the channel's limits
    /// and its counts, and naming admins.
    Owner = 1,
    /// Manages members and roles (not owners), invite codes; talks.
    Admin = 2,
    /// Talks and listens; in a channel, a publisher.
    Member = 3,
    /// Listens only: its uploads and floor requests are refused with
    /// `ListenerOnly`. A channel's followers are listeners.
    Listener = 4,
}

impl Role {
    /// The role for its wire byte.
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Owner),
            2 => Some(Role::Admin),
            3 => Some(Role::Member),
            4 => Some(Role::Listener),
            _ => None,
        }
    }

    /// Whether this role may upload clips and request the floor.
    pub fn talks(self) -> bool {
        self != Role::Listener
    }

    /// Whether this role manages members, roles and invite codes.
    pub fn manages(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// A channel's limits, set by its owner and capped by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelLimits {
    /// Clips the channel may publish in any 24 hours (0: the relay's cap).
    pub clips_per_day: u32,
    /// Longest clip, ms (0: the relay's cap).
    pub max_clip_ms: u32,
    /// A new follower receives at most this many of the newest clips (0:
    /// none).
    pub backlog_clips: u32,
    /// ... and only those of the last this many days (0: no age limit).
    pub backlog_days: u32,
}

/// A channel's counts, for its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelCounts {
    /// Followers.
    pub followers: u64,
    /// Followers connected and joined on this relay now.
    pub online: u64,
    /// Clips delivered to followers (acknowledged) since the relay started.
    pub delivered: u64,
    /// Clips followers played since the relay started.
    pub played: u64,
}

/// A roles-and-channels message. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMessage {
    /// Create a channel; the sender becomes its owner.
    CreateChannel {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel's id (a group id).
        channel: String,
        /// Listed and followed without an invite.
        public: bool,
    },
    /// Follow a channel (a public one, or a private one with an invite).
    Follow {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
        /// An invite code; empty for a public channel.
        invite: String,
    },
    /// Stop following a channel.
    Unfollow {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
    },
    /// Clips still arrive and are stored, flagged muted.
    Mute {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
    },
    /// Undo `Mute`.
    Unmute {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
    },
    /// Public channels whose id starts with `prefix`.
    ListChannels {
        /// Echoed in the reply.
        request_id: u64,
        /// The prefix (may be empty).
        prefix: String,
    },
    /// Give `user` a role in a group or channel (owners and admins).
    SetRole {
        /// Echoed in the reply.
        request_id: u64,
        /// The group or channel.
        group: String,
        /// The user.
        user: String,
        /// The role.
        role: Role,
    },
    /// Create an invite code for a channel (owners and admins).
    CreateInvite {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
    },
    /// Revoke an invite code (owners and admins).
    RevokeInvite {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
        /// The code.
        code: String,
    },
    /// Set a channel's limits (its owner).
    SetChannelLimits {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
        /// The limits asked for (the relay caps them).
        limits: ChannelLimits,
    },
    /// Ask for a channel's counts (its owner).
    ChannelStats {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: String,
    },
    /// Answer to `ListChannels`.
    ChannelList {
        /// The request's id.
        request_id: u64,
        /// Public channel ids, sorted.
        channels: Vec<String>,
    },
    /// Answer to `CreateInvite`.
    Invite {
        /// The request's id.
        request_id: u64,
        /// The channel.
        channel: String,
        /// The new code.
        code: String,
    },
    /// Answer to `ChannelStats`.
    ChannelCounts {
        /// The request's id.
        request_id: u64,
        /// The channel.
        channel: String,
        /// The counts.
        counts: ChannelCounts,
    },
}

impl ChannelMessage {
    /// The message's type number.
    pub fn kind(&self) -> u64 {
        use ChannelMessage::*;
        match self {
            CreateChannel { .. } => kind::CREATE_CHANNEL,
            Follow { .. } => kind::FOLLOW,
            Unfollow { .. } => kind::UNFOLLOW,
            Mute { .. } => kind::MUTE,
            Unmute { .. } => kind::UNMUTE,
            ListChannels { .. } => kind::LIST_CHANNELS,
            SetRole { .. } => kind::SET_ROLE,
            CreateInvite { .. } => kind::CREATE_INVITE,
            RevokeInvite { .. } => kind::REVOKE_INVITE,
            SetChannelLimits { .. } => kind::SET_CHANNEL_LIMITS,
            ChannelStats { .. } => kind::CHANNEL_STATS,
            ChannelList { .. } => kind::CHANNEL_LIST,
            Invite { .. } => kind::INVITE,
            ChannelCounts { .. } => kind::CHANNEL_COUNTS,
        }
    }

    /// The request id (of the request, or of the request answered).
    pub fn request_id(&self) -> u64 {
        use ChannelMessage::*;
        match self {
            CreateChannel { request_id, .. }
            | Follow { request_id, .. }
            | Unfollow { request_id, .. }
            | Mute { request_id, .. }
            | Unmute { request_id, .. }
            | ListChannels { request_id, .. }
            | SetRole { request_id, .. }
            | CreateInvite { request_id, .. }
            | RevokeInvite { request_id, .. }
            | SetChannelLimits { request_id, .. }
            | ChannelStats { request_id, .. }
            | ChannelList { request_id, .. }
            | Invite { request_id, .. }
            | ChannelCounts { request_id, .. } => *request_id,
        }
    }

    /// Whether clients send this message (the relay sends the others).
    pub fn is_request(&self) -> bool {
        self.kind() < 0x50
    }

    /// Appends the payload (without type and length).
    pub(crate) fn encode_payload(&self, p: &mut BytesMut) {
        use ChannelMessage::*;
        put_varint(p, self.request_id());
        match self {
            CreateChannel {
                channel, public, ..
            } => {
                put_string(p, channel);
                p.put_u8(u8::from(*public));
            }
            Follow {
                channel, invite, ..
            } => {
                put_string(p, channel);
                put_string(p, invite);
            }
            Unfollow { channel, .. }
            | Mute { channel, .. }
            | Unmute { channel, .. }
            | CreateInvite { channel, .. }
            | ChannelStats { channel, .. } => put_string(p, channel),
            ListChannels { prefix, .. } => put_string(p, prefix),
            SetRole {
                group, user, role, ..
            } => {
                put_string(p, group);
                put_string(p, user);
                p.put_u8(*role as u8);
            }
            RevokeInvite { channel, code, .. } | Invite { channel, code, .. } => {
                put_string(p, channel);
                put_string(p, code);
            }
            SetChannelLimits {
                channel, limits, ..
            } => {
                put_string(p, channel);
                put_varint(p, u64::from(limits.clips_per_day));
                put_varint(p, u64::from(limits.max_clip_ms));
                put_varint(p, u64::from(limits.backlog_clips));
                put_varint(p, u64::from(limits.backlog_days));
            }
            ChannelList { channels, .. } => {
                put_varint(p, channels.len() as u64);
                for c in channels {
                    put_string(p, c);
                }
            }
            ChannelCounts {
                channel, counts, ..
            } => {
                put_string(p, channel);
                put_varint(p, counts.followers);
                put_varint(p, counts.online);
                put_varint(p, counts.delivered);
                put_varint(p, counts.played);
            }
        }
    }

    /// Decodes the payload of a message of type `k` (one of this module's).
    pub(crate) fn decode_fields(k: u64, p: &mut Bytes) -> Result<Option<Self>, DecodeError> {
        use ChannelMessage::*;
        let channel = |p: &mut Bytes| get_id(p, "channel");
        Ok(Some(match k {
            kind::CREATE_CHANNEL => request(p, |request_id, p| {
                Ok(CreateChannel {
                    request_id,
                    channel: channel(p)?,
                    public: get_flag(p, "public")?,
                })
            })?,
            kind::FOLLOW => request(p, |request_id, p| {
                Ok(Follow {
                    request_id,
                    channel: channel(p)?,
                    invite: get_id(p, "invite")?,
                })
            })?,
            kind::UNFOLLOW => request(p, |request_id, p| {
                Ok(Unfollow {
                    request_id,
                    channel: channel(p)?,
                })
            })?,
            kind::MUTE => request(p, |request_id, p| {
                Ok(Mute {
                    request_id,
                    channel: channel(p)?,
                })
            })?,
            kind::UNMUTE => request(p, |request_id, p| {
                Ok(Unmute {
                    request_id,
                    channel: channel(p)?,
                })
            })?,
            kind::LIST_CHANNELS => request(p, |request_id, p| {
                Ok(ListChannels {
                    request_id,
                    prefix: get_id(p, "prefix")?,
                })
            })?,
            kind::SET_ROLE => request(p, |request_id, p| {
                let group = get_id(p, "group")?;
                let user = get_id(p, "user")?;
                let v = get_u8(p)?;
                let role = Role::from_u8(v).ok_or(DecodeError::OutOfRange {
                    field: "role",
                    value: u64::from(v),
                })?;
                Ok(SetRole {
                    request_id,
                    group,
                    user,
                    role,
                })
            })?,
            kind::CREATE_INVITE => request(p, |request_id, p| {
                Ok(CreateInvite {
                    request_id,
                    channel: channel(p)?,
                })
            })?,
            kind::REVOKE_INVITE => request(p, |request_id, p| {
                Ok(RevokeInvite {
                    request_id,
                    channel: channel(p)?,
                    code: get_id(p, "code")?,
                })
            })?,
            kind::SET_CHANNEL_LIMITS => request(p, |request_id, p| {
                Ok(SetChannelLimits {
                    request_id,
                    channel: channel(p)?,
                    limits: ChannelLimits {
                        clips_per_day: get_varint_u32(p, "clips_per_day")?,
                        max_clip_ms: get_varint_u32(p, "max_clip_ms")?,
                        backlog_clips: get_varint_u32(p, "backlog_clips")?,
                        backlog_days: get_varint_u32(p, "backlog_days")?,
                    },
                })
            })?,
            kind::CHANNEL_STATS => request(p, |request_id, p| {
                Ok(ChannelStats {
                    request_id,
                    channel: channel(p)?,
                })
            })?,
            kind::CHANNEL_LIST => {
                let request_id = get_varint(p)?;
                let n = get_count(p, MAX_LIST_LEN, 1, "channels")?;
                let mut channels = Vec::with_capacity(n);
                for _ in 0..n {
                    channels.push(get_string(p, MAX_ID_LEN, "channel")?);
                }
                ChannelList {
                    request_id,
                    channels,
                }
            }
            kind::INVITE => Invite {
                request_id: get_varint(p)?,
                channel: get_string(p, MAX_ID_LEN, "channel")?,
                code: get_string(p, MAX_ID_LEN, "code")?,
            },
            kind::CHANNEL_COUNTS => ChannelCounts {
                request_id: get_varint(p)?,
                channel: get_string(p, MAX_ID_LEN, "channel")?,
                counts: self::ChannelCounts {
                    followers: get_varint(p)?,
                    online: get_varint(p)?,
                    delivered: get_varint(p)?,
                    played: get_varint(p)?,
                },
            },
            _ => return Ok(None),
        }))
    }
}

fn get_flag(p: &mut Bytes, field: &'static str) -> Result<bool, DecodeError> {
    match get_u8(p)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::OutOfRange {
            field,
            value: u64::from(v),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ControlMessage;

    #[test]
    fn every_message_round_trips_and_bad_roles_refuse_the_request() {
        let all = vec![
            ChannelMessage::SetRole {
                request_id: 3,
                group: "g".into(),
                user: "u".into(),
                role: Role::Listener,
            },
            ChannelMessage::ChannelList {
                request_id: 4,
                channels: vec!["a".into(), "b".into()],
            },
            ChannelMessage::SetChannelLimits {
                request_id: 5,
                channel: "c".into(),
                limits: ChannelLimits {
                    clips_per_day: 10,
                    max_clip_ms: 30_000,
                    backlog_clips: 5,
                    backlog_days: 2,
                },
            },
        ];
        for m in all {
            let m = ControlMessage::Channel(m);
            let bytes = m.to_bytes();
            let mut dec = crate::FrameDecoder::new(crate::message::MAX_PAYLOAD_LEN);
            dec.push(bytes);
            let frame = dec.next_frame().expect("decodes").expect("whole");
            assert_eq!(ControlMessage::decode(frame.kind, frame.payload), Ok(m));
        }
        // Role 9 refuses the request alone.
        let mut p = BytesMut::new();
        put_varint(&mut p, 7);
        put_string(&mut p, "g");
        put_string(&mut p, "u");
        p.put_u8(9);
        assert_eq!(
            ControlMessage::decode(kind::SET_ROLE, p.freeze()),
            Err(DecodeError::InvalidField {
                request_id: 7,
                field: "role"
            })
        );
    }
}
