//! Roles and broadcast channels (issue #14, PROTOCOL.md section 13):
//! CreateChannel, Follow, Unfollow, Mute, Unmute, ListChannels, SetRole,
//! CreateInvite, RevokeInvite, SetChannelLimits, ChannelStats.
//!
//! Who may do what: any authenticated user creates a channel (and owns
//! it), lists public channels and follows a public one; a private one
//! needs an invite code its owner or an admin created. Owners and admins
//! set roles (only an owner gives or takes the owner role) and manage
//! invite codes; the owner alone sets the channel's limits (capped by the
//! relay's configuration) and reads its counts. A token with the admin
//! claim may do everything.
//!
//! A follow writes one follower record (O(1), whatever the following) and
//! sets the new follower's cursor so that it receives the channel's last
//! `backlog_clips` clips, of the last `backlog_days` days, not its whole
//! history; it then joins the channel as any member joins a group.

use ptt_protocol::channel::ChannelMessage as C;
use ptt_protocol::{
    ChannelCounts, ChannelLimits, ClipHeader, ControlMessage, ErrorCode, Role, is_valid_id,
};

use crate::log::{FollowerChange, GroupLog};
use crate::session::Session;
use crate::session::cmd::Fatal;
use crate::store::{ChannelInfo, FollowChange, GroupInfo};

/// The most channels one ListChannels answers with.
const MAX_LISTED: usize = 100;

/// New channels start with at most this many clips for a new follower.
const DEFAULT_BACKLOG_CLIPS: u32 = 10;

impl Session {
    /// A roles-and-channels message; relay-sent ones close the connection.
    pub(super) async fn channel(&mut self, message: C) -> Result<(), Fatal> {
        if !message.is_request() {
            return Err((
                ErrorCode::Protocol,
                format!(
                    "message type {:#x} is sent by relays, not clients",
                    message.kind()
                ),
            ));
        }
        let request_id = message.request_id();
        let result = self.channel_request(message).await;
        self.reply_result(request_id, result).await;
        Ok(())
    }

    async fn channel_request(&mut self, message: C) -> Result<ControlMessage, ErrorCode> {
        let ok = |request_id| Ok(ControlMessage::Ok { request_id });
        let user = self.handle.user.clone();
        let store = self.ctx.store.clone();
        match message {
            C::CreateChannel {
                request_id,
                channel,
                public,
            } => {
                if !is_valid_id(&channel) {
                    return Err(ErrorCode::InvalidRequest);
                }
                let cfg = &self.ctx.config;
                let limits = ChannelLimits {
                    clips_per_day: cfg.channel_max_clips_per_day,
                    max_clip_ms: self.ctx.max_clip_ms(),
                    backlog_clips: cfg.channel_max_backlog_clips.min(DEFAULT_BACKLOG_CLIPS),
                    backlog_days: 0,
                };
                store
                    .create_channel(&channel, &user, public, limits)
                    .await
                    .map_err(|e| e.code())?;
                ok(request_id)
            }
            C::Follow {
                request_id,
                channel,
                invite,
            } => {
                let (info, settings) = self.channel_info(&channel).await?;
                if !settings.public && !self.claims.adm && info.role(&user).is_none() {
                    let opens = if invite.is_empty() {
                        None
                    } else {
                        store.invite(&invite).await.map_err(|e| e.code())?
                    };
                    if opens.as_deref() != Some(channel.as_str()) {
                        return Err(ErrorCode::BadInvite);
                    }
                }
                let start = backlog_start(&*self.ctx.log, &channel, settings.limits).await?;
                store
                    .change_follower(&channel, &user, FollowChange::Follow { start })
                    .await
                    .map_err(|e| e.code())?;
                ok(request_id)
            }
            C::Unfollow {
                request_id,
                channel,
            } => {
                store
                    .change_follower(&channel, &user, FollowChange::Unfollow)
                    .await
                    .map_err(|e| e.code())?;
                // Its connections on this node, and on the other nodes of
                // a cluster, stop receiving the channel (a publisher's
                // stay: it is a member).
                let info = self.channel_info(&channel).await?.0;
                if info.role(&user).is_none() {
                    self.ctx
                        .hub
                        .remove_user(&channel, &user, ErrorCode::NotMember);
                    self.tell_other_nodes(&channel, FollowerChange::Unfollowed)
                        .await;
                }
                ok(request_id)
            }
            C::Mute {
                request_id,
                channel,
            } => {
                self.mute(&channel, true).await?;
                ok(request_id)
            }
            C::Unmute {
                request_id,
                channel,
            } => {
                self.mute(&channel, false).await?;
                ok(request_id)
            }
            C::ListChannels { request_id, prefix } => {
                let channels = store
                    .public_channels(&prefix, MAX_LISTED)
                    .await
                    .map_err(|e| e.code())?;
                Ok(ControlMessage::Channel(C::ChannelList {
                    request_id,
                    channels,
                }))
            }
            C::SetRole {
                request_id,
                group,
                user: target,
                role,
            } => {
                if !is_valid_id(&target) {
                    return Err(ErrorCode::InvalidRequest);
                }
                let info = self.group_info(&group).await?;
                let mine = self.role_in(&info);
                let owner_change = role == Role::Owner || info.role(&target) == Some(Role::Owner);
                let allowed = match mine {
                    Some(Role::Owner) => true,
                    Some(Role::Admin) => !owner_change,
                    _ => false,
                };
                if !allowed {
                    return Err(ErrorCode::Forbidden);
                }
                store
                    .set_role(&group, &target, role)
                    .await
                    .map_err(|e| e.code())?;
                ok(request_id)
            }
            C::CreateInvite {
                request_id,
                channel,
            } => {
                let (info, _) = self.channel_info(&channel).await?;
                if !self.role_in(&info).is_some_and(Role::manages) {
                    return Err(ErrorCode::Forbidden);
                }
                let code = invite_code()?;
                store
                    .create_invite(&channel, &code)
                    .await
                    .map_err(|e| e.code())?;
                Ok(ControlMessage::Channel(C::Invite {
                    request_id,
                    channel,
                    code,
                }))
            }
            C::RevokeInvite {
                request_id,
                channel,
                code,
            } => {
                let (info, _) = self.channel_info(&channel).await?;
                if !self.role_in(&info).is_some_and(Role::manages) {
                    return Err(ErrorCode::Forbidden);
                }
                if !store
                    .revoke_invite(&channel, &code)
                    .await
                    .map_err(|e| e.code())?
                {
                    return Err(ErrorCode::BadInvite);
                }
                ok(request_id)
            }
            C::SetChannelLimits {
                request_id,
                channel,
                limits,
            } => {
                let (info, _) = self.channel_info(&channel).await?;
                if self.role_in(&info) != Some(Role::Owner) {
                    return Err(ErrorCode::Forbidden);
                }
                let limits = self.capped(limits);
                store
                    .set_channel_limits(&channel, limits)
                    .await
                    .map_err(|e| e.code())?;
                ok(request_id)
            }
            C::ChannelStats {
                request_id,
                channel,
            } => {
                let (info, _) = self.channel_info(&channel).await?;
                if self.role_in(&info) != Some(Role::Owner) {
                    return Err(ErrorCode::Forbidden);
                }
                let followers = store.follower_count(&channel).await.map_err(|e| e.code())?;
                let (online, delivered, played) = self.ctx.hub.channel_tally(&channel).await?;
                Ok(ControlMessage::Channel(C::ChannelCounts {
                    request_id,
                    channel,
                    counts: ChannelCounts {
                        followers,
                        online,
                        delivered,
                        played,
                    },
                }))
            }
            C::ChannelList { .. } | C::Invite { .. } | C::ChannelCounts { .. } => {
                unreachable!("answers are refused before")
            }
        }
    }

    /// The group's record.
    async fn group_info(&self, group: &str) -> Result<GroupInfo, ErrorCode> {
        self.ctx
            .store
            .group(group)
            .await
            .map_err(|e| e.code())?
            .ok_or(ErrorCode::NoSuchGroup)
    }

    /// The channel's record (`NotChannel` for a plain group).
    async fn channel_info(&self, channel: &str) -> Result<(GroupInfo, ChannelInfo), ErrorCode> {
        let info = self.group_info(channel).await?;
        let settings = info.channel.ok_or(ErrorCode::NotChannel)?;
        Ok((info, settings))
    }

    /// This user's role in `info` (a token with the admin claim counts as
    /// the owner).
    fn role_in(&self, info: &GroupInfo) -> Option<Role> {
        if self.claims.adm {
            return Some(Role::Owner);
        }
        info.role(&self.handle.user)
    }

    /// An owner's limits, capped by the relay's configuration (0 means
    /// the cap).
    fn capped(&self, asked: ChannelLimits) -> ChannelLimits {
        let cfg = &self.ctx.config;
        let cap = |v: u32, max: u32| if v == 0 { max } else { v.min(max) };
        ChannelLimits {
            clips_per_day: cap(asked.clips_per_day, cfg.channel_max_clips_per_day),
            max_clip_ms: cap(asked.max_clip_ms, self.ctx.max_clip_ms()),
            backlog_clips: asked.backlog_clips.min(cfg.channel_max_backlog_clips),
            backlog_days: asked.backlog_days.min(3650),
        }
    }

    /// Mute or Unmute: the follower record, this connection's deliveries
    /// of the channel from now on, and those of the user's other
    /// connections on this node from when they read the hub's command
    /// (before any clip published after this answer).
    async fn mute(&mut self, channel: &str, muted: bool) -> Result<(), ErrorCode> {
        self.ctx
            .store
            .change_follower(channel, &self.handle.user, FollowChange::Mute(muted))
            .await
            .map_err(|e| e.code())?;
        if let Some(joined) = self.joined.get(channel) {
            joined.sink.set_header_flag(ClipHeader::FLAG_MUTED, muted);
        }
        self.ctx.hub.mute_user(channel, &self.handle.user, muted);
        let change = if muted {
            FollowerChange::Muted
        } else {
            FollowerChange::Unmuted
        };
        self.tell_other_nodes(channel, change).await;
        Ok(())
    }

    /// Tells the other nodes of a cluster that this user muted, unmuted
    /// or unfollowed `channel`, for the user's connections there. A
    /// failure is logged, not answered: the follower record has changed,
    /// and those connections read it when they join again.
    async fn tell_other_nodes(&self, channel: &str, change: FollowerChange) {
        if let Err(e) = self
            .ctx
            .log
            .publish_follower(channel, &self.handle.user, change)
            .await
        {
            tracing::warn!(
                %channel,
                ?change,
                error = %e,
                "the other nodes were not told; the user's connections there follow at their next join"
            );
        }
    }
}

/// Where a new follower's cursor starts: before the channel's last
/// `backlog_clips` clips, and past those older than `backlog_days` (a
/// binary search over the clips' times: O(log clips) reads).
async fn backlog_start(
    log: &dyn GroupLog,
    channel: &str,
    limits: ChannelLimits,
) -> Result<u64, ErrorCode> {
    let range = log.range(channel).await.map_err(|e| e.code())?;
    let mut start = range
        .last
        .saturating_sub(u64::from(limits.backlog_clips))
        .max(range.first.saturating_sub(1));
    if limits.backlog_days > 0 && start < range.last {
        let now = crate::auth::unix_millis(std::time::SystemTime::now());
        let cutoff = now.saturating_sub(u64::from(limits.backlog_days) * 24 * 3600 * 1000);
        // The first clip in (start, last] created at or after the cutoff.
        let (mut lo, mut hi) = (start + 1, range.last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match log.meta(channel, mid).await.map_err(|e| e.code())? {
                Some(m) if m.created_ms >= cutoff => hi = mid,
                _ => lo = mid + 1,
            }
        }
        start = lo - 1;
    }
    Ok(start)
}

/// A new invite code: 12 random bytes, hex.
fn invite_code() -> Result<String, ErrorCode> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ErrorCode::Internal)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
