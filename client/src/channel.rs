//! Roles and broadcast channels (PROTOCOL.md section 13): the requests of
//! [`ptt_protocol::ChannelMessage`] as methods of [`Client`]. A follower
//! receives a channel by [`Client::join`]ing it after [`Client::follow`],
//! as a member joins a group; clips of a muted channel arrive with
//! [`ptt_protocol::ClipHeader::FLAG_MUTED`] set.

use ptt_protocol::{ChannelCounts, ChannelLimits, ChannelMessage as C, ControlMessage, Role};

use crate::client::{checked, unexpected};
use crate::driver::PendingKind;
use crate::{Client, ClientError};

impl Client {
    /// Creates a channel owned by this user; `public` ones are listed and
    /// followed without an invite.
    pub async fn create_channel(&self, channel: &str, public: bool) -> Result<(), ClientError> {
        let channel = checked(channel)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(C::CreateChannel {
                request_id,
                channel,
                public,
            })
        })
        .await
    }

    /// Follows a channel: a public one with `invite` empty, a private one
    /// with an invite code. Then [`Client::join`] it to receive its clips.
    pub async fn follow(&self, channel: &str, invite: &str) -> Result<(), ClientError> {
        let channel = checked(channel)?;
        let invite = invite.to_owned();
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(C::Follow {
                request_id,
                channel,
                invite,
            })
        })
        .await
    }

    /// Stops following a channel (joined connections get `GroupLeft`).
    pub async fn unfollow(&self, channel: &str) -> Result<(), ClientError> {
        let channel = checked(channel)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(C::Unfollow {
                request_id,
                channel,
            })
        })
        .await
    }

    /// Mutes (or with `false` unmutes) a followed channel: its clips still
    /// arrive, flagged muted.
    pub async fn mute(&self, channel: &str, muted: bool) -> Result<(), ClientError> {
        let channel = checked(channel)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(if muted {
                C::Mute {
                    request_id,
                    channel,
                }
            } else {
                C::Unmute {
                    request_id,
                    channel,
                }
            })
        })
        .await
    }

    /// Public channels whose id starts with `prefix`.
    pub async fn list_channels(&self, prefix: &str) -> Result<Vec<String>, ClientError> {
        let prefix = prefix.to_owned();
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| ControlMessage::Channel(C::ListChannels { request_id, prefix }),
            )
            .await?
        {
            ControlMessage::Channel(C::ChannelList { channels, .. }) => Ok(channels),
            other => Err(unexpected(other)),
        }
    }

    /// Gives `user` a role in a group or channel (owners and admins).
    pub async fn set_role(&self, group: &str, user: &str, role: Role) -> Result<(), ClientError> {
        let (group, user) = (checked(group)?, checked(user)?);
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(C::SetRole {
                request_id,
                group,
                user,
                role,
            })
        })
        .await
    }

    /// Creates an invite code for a channel (owners and admins).
    pub async fn create_invite(&self, channel: &str) -> Result<String, ClientError> {
        let channel = checked(channel)?;
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| {
                    ControlMessage::Channel(C::CreateInvite {
                        request_id,
                        channel,
                    })
                },
            )
            .await?
        {
            ControlMessage::Channel(C::Invite { code, .. }) => Ok(code),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes an invite code (owners and admins).
    pub async fn revoke_invite(&self, channel: &str, code: &str) -> Result<(), ClientError> {
        let (channel, code) = (checked(channel)?, code.to_owned());
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(C::RevokeInvite {
                request_id,
                channel,
                code,
            })
        })
        .await
    }

    /// Sets a channel's limits (its owner; the relay caps them).
    pub async fn set_channel_limits(
        &self,
        channel: &str,
        limits: ChannelLimits,
    ) -> Result<(), ClientError> {
        let channel = checked(channel)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::Channel(C::SetChannelLimits {
                request_id,
                channel,
                limits,
            })
        })
        .await
    }

    /// A channel's counts (its owner).
    pub async fn channel_stats(&self, channel: &str) -> Result<ChannelCounts, ClientError> {
        let channel = checked(channel)?;
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| {
                    ControlMessage::Channel(C::ChannelStats {
                        request_id,
                        channel,
                    })
                },
            )
            .await?
        {
            ControlMessage::Channel(C::ChannelCounts { counts, .. }) => Ok(counts),
            other => Err(unexpected(other)),
        }
    }
}
