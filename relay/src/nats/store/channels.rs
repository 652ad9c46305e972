//! Roles, channels, followers, invite codes and counts on NATS (issue
//! #14), as the embedded store keeps them (`redb_store/channels.rs`):
//!
//! - a channel's settings and its members' roles sit in its group record
//!   (`<prefix>_groups`, JSON, changed by compare-and-set), which every
//!   node's feed of the group watches;
//! - in `<prefix>_channels`, one key per follower `f.<channel>.<user>`
//!   (`0`, or `1` muted), the follower count `n.<channel>`, one key per
//!   invite code `i.<code>` (the channel id), and the followers'
//!   acknowledgements and Played `c.<channel>` (`<delivered> <played>`),
//!   each changed by compare-and-set.
//!
//! A follow or unfollow writes the follower's key, then the count (and, a
//! new follower, its cursor): O(1) whatever the following, and no group
//! record, so no feed wakes. The two keys are not written atomically: a
//! node that dies between them leaves the count one off (the follower
//! record is the truth). Publishing a clip writes nothing here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use ptt_protocol::{ChannelLimits, GroupMode, Role};
use serde::{Deserialize, Serialize};

use super::{GroupRecord, MAX_ATTEMPTS, NatsStore, backend, encode, read_group};
use crate::nats::{parse_u64, token};
use crate::store::{ChannelInfo, FollowChange, Follower, StoreCounters, StoreError};

/// A channel's settings in its group record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChannelRecord {
    public: bool,
    clips_per_day: u32,
    backlog_clips: u32,
    backlog_days: u32,
}

impl ChannelRecord {
    fn new(public: bool, limits: ChannelLimits) -> ChannelRecord {
        ChannelRecord {
            public,
            clips_per_day: limits.clips_per_day,
            backlog_clips: limits.backlog_clips,
            backlog_days: limits.backlog_days,
        }
    }

    /// The settings, with the group's longest clip.
    pub(super) fn info(&self, max_clip_ms: u32) -> ChannelInfo {
        ChannelInfo {
            public: self.public,
            limits: ChannelLimits {
                clips_per_day: self.clips_per_day,
                max_clip_ms,
                backlog_clips: self.backlog_clips,
                backlog_days: self.backlog_days,
            },
        }
    }
}

/// The writes a node's store was asked for (see [`StoreCounters`]).
#[derive(Debug, Default)]
pub(super) struct Writes {
    cursor_writes: AtomicU64,
    follower_writes: AtomicU64,
    count_writes: AtomicU64,
}

impl Writes {
    /// One cursor update.
    pub(super) fn cursor(&self) {
        self.cursor_writes.fetch_add(1, Relaxed);
    }
}

const MUTED: &[u8] = b"1";
const UNMUTED: &[u8] = b"0";

fn follower_key(channel: &str, user: &str) -> String {
    format!("f.{}.{}", token(channel), token(user))
}

fn count_key(channel: &str) -> String {
    format!("n.{}", token(channel))
}

fn invite_key(code: &str) -> String {
    format!("i.{}", token(code))
}

fn counts_key(channel: &str) -> String {
    format!("c.{}", token(channel))
}

/// `<delivered> <played>`.
fn parse_counts(raw: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (d, p) = text.split_once(' ')?;
    Some((d.parse().ok()?, p.parse().ok()?))
}

impl NatsStore {
    pub(super) fn channel_counters(&self) -> StoreCounters {
        StoreCounters {
            appends: 0,
            cursor_writes: self.writes.cursor_writes.load(Relaxed),
            follower_writes: self.writes.follower_writes.load(Relaxed),
            count_writes: self.writes.count_writes.load(Relaxed),
        }
    }

    /// Sets `key` of the channels bucket to what `change` makes of its
    /// value (`None`: absent or deleted), by compare-and-set; `change`
    /// answering `None` writes nothing. Returns whether it wrote.
    async fn change_key(
        &self,
        key: &str,
        change: impl Fn(Option<&[u8]>) -> Option<Bytes>,
    ) -> Result<bool, StoreError> {
        let bucket = &self.nats.channels;
        for _ in 0..MAX_ATTEMPTS {
            let entry = bucket
                .entry(key.to_owned())
                .await
                .map_err(|e| backend("reading a channel key", e))?;
            let current = entry
                .as_ref()
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .map(|e| &e.value[..]);
            let Some(value) = change(current) else {
                return Ok(false);
            };
            let written = match &entry {
                Some(e) => bucket.update(key, value, e.revision).await.is_ok(),
                None => bucket.create(key, value).await.is_ok(),
            };
            if written {
                return Ok(true);
            }
        }
        Err(StoreError::Backend(format!("NATS: {key} kept changing")))
    }

    /// Adds `delta` to the follower count.
    async fn add_followers(&self, channel: &str, delta: i64) -> Result<(), StoreError> {
        self.change_key(&count_key(channel), |raw| {
            let n = raw.and_then(parse_u64).unwrap_or(0);
            Some(Bytes::from(n.saturating_add_signed(delta).to_string()))
        })
        .await
        .map(|_| ())
    }

    /// The channel's group record; `NotChannel` for a plain group.
    async fn require_channel(&self, channel: &str) -> Result<(), StoreError> {
        match read_group(&self.nats, channel).await? {
            None => Err(StoreError::NoSuchGroup(channel.to_owned())),
            Some(info) if info.channel.is_none() => Err(StoreError::NotChannel(channel.to_owned())),
            Some(_) => Ok(()),
        }
    }

    pub(super) async fn create_channel_impl(
        &self,
        channel: &str,
        owner: &str,
        public: bool,
        limits: ChannelLimits,
    ) -> Result<(), StoreError> {
        let record = GroupRecord {
            mode: GroupMode::Notes as u8,
            max_clip_ms: limits.max_clip_ms,
            members: [owner.to_owned()].into(),
            roles: [(owner.to_owned(), Role::Owner as u8)].into(),
            live_budget_ms: None,
            channel: Some(ChannelRecord::new(public, limits)),
        };
        match self
            .nats
            .groups
            .create(token(channel), encode(&record))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                Err(StoreError::GroupExists(channel.to_owned()))
            }
            Err(e) => Err(backend("creating a channel", e)),
        }
    }

    pub(super) async fn set_role_impl(
        &self,
        group: &str,
        user: &str,
        role: Role,
    ) -> Result<(), StoreError> {
        self.modify_checked(group, |r| {
            if r.channel.is_some() && role == Role::Listener {
                // Back to a follower (if it follows): no longer staff.
                r.members.remove(user);
                r.roles.remove(user);
                return Ok(());
            }
            r.members.insert(user.to_owned());
            if role == Role::Member {
                r.roles.remove(user);
            } else {
                r.roles.insert(user.to_owned(), role as u8);
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn set_channel_limits_impl(
        &self,
        channel: &str,
        limits: ChannelLimits,
    ) -> Result<(), StoreError> {
        self.modify_checked(channel, |r| {
            let public = r
                .channel
                .as_ref()
                .ok_or_else(|| StoreError::NotChannel(channel.to_owned()))?
                .public;
            r.max_clip_ms = limits.max_clip_ms;
            r.channel = Some(ChannelRecord::new(public, limits));
            Ok(())
        })
        .await
    }

    pub(super) async fn change_follower_impl(
        &self,
        channel: &str,
        user: &str,
        change: FollowChange,
    ) -> Result<bool, StoreError> {
        self.writes.follower_writes.fetch_add(1, Relaxed);
        self.require_channel(channel).await?;
        let key = follower_key(channel, user);
        match change {
            FollowChange::Follow { start } => {
                let new = self
                    .change_key(&key, |current| {
                        current.is_none().then(|| Bytes::from_static(UNMUTED))
                    })
                    .await?;
                if new {
                    self.add_followers(channel, 1).await?;
                    self.advance(channel, user, start).await?;
                }
                Ok(new)
            }
            FollowChange::Unfollow => {
                for _ in 0..MAX_ATTEMPTS {
                    let entry = self
                        .nats
                        .channels
                        .entry(key.clone())
                        .await
                        .map_err(|e| backend("reading a follower", e))?;
                    let Some(entry) =
                        entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                    else {
                        return Ok(false);
                    };
                    if self
                        .nats
                        .channels
                        .delete_expect_revision(&key, Some(entry.revision))
                        .await
                        .is_ok()
                    {
                        self.add_followers(channel, -1).await?;
                        return Ok(true);
                    }
                }
                Err(StoreError::Backend("NATS: a follower kept changing".into()))
            }
            FollowChange::Mute(muted) => {
                let want = if muted { MUTED } else { UNMUTED };
                let wrote = self
                    .change_key(&key, |current| {
                        current
                            .filter(|v| *v != want)
                            .map(|_| Bytes::from_static(want))
                    })
                    .await?;
                if !wrote && self.follower_impl(channel, user).await?.is_none() {
                    return Err(StoreError::NotFollower(channel.to_owned()));
                }
                Ok(wrote)
            }
        }
    }

    pub(super) async fn follower_impl(
        &self,
        channel: &str,
        user: &str,
    ) -> Result<Option<Follower>, StoreError> {
        if read_group(&self.nats, channel).await?.is_none() {
            return Err(StoreError::NoSuchGroup(channel.to_owned()));
        }
        let raw = self
            .nats
            .channels
            .get(follower_key(channel, user))
            .await
            .map_err(|e| backend("reading a follower", e));
        let raw = self.nats.track("reading a follower", raw)?;
        Ok(raw.map(|v| Follower {
            muted: &v[..] == MUTED,
        }))
    }

    pub(super) async fn follower_count_impl(&self, channel: &str) -> Result<u64, StoreError> {
        if read_group(&self.nats, channel).await?.is_none() {
            return Err(StoreError::NoSuchGroup(channel.to_owned()));
        }
        let raw = self
            .nats
            .channels
            .get(count_key(channel))
            .await
            .map_err(|e| backend("reading a follower count", e))?;
        Ok(raw.as_deref().and_then(parse_u64).unwrap_or(0))
    }

    /// Lists the groups bucket's keys (one per group, not per follower).
    pub(super) async fn public_channels_impl(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        use futures_util::TryStreamExt;
        let keys: Vec<String> = match self.nats.groups.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| backend("listing groups", e))?,
            Err(e) => return Err(backend("listing groups", e)),
        };
        let mut ids: Vec<String> = keys
            .iter()
            .filter_map(|k| super::untoken(k))
            .filter(|id| id.starts_with(prefix))
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            if out.len() >= limit {
                break;
            }
            if read_group(&self.nats, &id)
                .await?
                .and_then(|info| info.channel)
                .is_some_and(|c| c.public)
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    pub(super) async fn create_invite_impl(
        &self,
        channel: &str,
        code: &str,
    ) -> Result<(), StoreError> {
        self.require_channel(channel).await?;
        self.nats
            .channels
            .put(invite_key(code), Bytes::from(channel.to_owned()))
            .await
            .map_err(|e| backend("writing an invite", e))?;
        Ok(())
    }

    pub(super) async fn revoke_invite_impl(
        &self,
        channel: &str,
        code: &str,
    ) -> Result<bool, StoreError> {
        let key = invite_key(code);
        let entry = self
            .nats
            .channels
            .entry(key.clone())
            .await
            .map_err(|e| backend("reading an invite", e))?;
        let Some(entry) = entry.filter(|e| {
            e.operation == async_nats::jetstream::kv::Operation::Put
                && &e.value[..] == channel.as_bytes()
        }) else {
            return Ok(false);
        };
        self.nats
            .channels
            .delete_expect_revision(&key, Some(entry.revision))
            .await
            .map_err(|e| backend("revoking an invite", e))?;
        Ok(true)
    }

    pub(super) async fn invite_impl(&self, code: &str) -> Result<Option<String>, StoreError> {
        let raw = self
            .nats
            .channels
            .get(invite_key(code))
            .await
            .map_err(|e| backend("reading an invite", e))?;
        Ok(raw.and_then(|v| String::from_utf8(v.to_vec()).ok()))
    }

    pub(super) async fn add_channel_counts_impl(
        &self,
        channel: &str,
        delivered: u64,
        played: u64,
    ) -> Result<(), StoreError> {
        self.writes.count_writes.fetch_add(1, Relaxed);
        self.require_channel(channel).await?;
        self.change_key(&counts_key(channel), |raw| {
            let (d, p) = raw.and_then(parse_counts).unwrap_or((0, 0));
            let (d, p) = (d.saturating_add(delivered), p.saturating_add(played));
            Some(Bytes::from(format!("{d} {p}")))
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn channel_counts_impl(
        &self,
        channel: &str,
    ) -> Result<(u64, u64), StoreError> {
        if read_group(&self.nats, channel).await?.is_none() {
            return Err(StoreError::NoSuchGroup(channel.to_owned()));
        }
        let raw = self
            .nats
            .channels
            .get(counts_key(channel))
            .await
            .map_err(|e| backend("reading a channel's counts", e))?;
        Ok(raw.as_deref().and_then(parse_counts).unwrap_or((0, 0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_bad_values_read_as_none() {
        assert_eq!(parse_counts(b"12 3"), Some((12, 3)));
        assert_eq!(parse_counts(b"12"), None);
        assert_eq!(parse_counts(b"x 3"), None);
    }
}
