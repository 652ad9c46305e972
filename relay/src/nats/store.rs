//! Groups, members and cursors in JetStream key-value buckets.
//!
//! A group is one key in `<prefix>_groups` whose value is the whole record
//! (mode, longest clip, members), changed by compare-and-set so that two
//! nodes adding members at once both land; every node's feed of the group
//! watches that key. A cursor is one key per member and group in
//! `<prefix>_cursors`, moved forward only, also by compare-and-set (and
//! beside it `seen.<group>.<member>`, when the member last joined). Clips
//! are the log's ([`super::NatsLog`]): the store's clip methods answer from
//! it. Roles and a channel's settings sit in its group record; followers,
//! invite codes and counts in `<prefix>_channels` (`channels.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use ptt_protocol::{ClipId, ClipSummary, GroupMode, MemberState};
use serde::{Deserialize, Serialize};

use super::{Nats, NatsLog, backend, parse_u64, token};
use crate::store::{
    AppendOutcome, ClipMeta, ClipStore, GroupInfo, NewClip, RetentionPolicy, SeqRange, StoreError,
    StoreFuture, StoredClip,
};

mod channels;

/// Compare-and-set attempts before an update gives up.
const MAX_ATTEMPTS: usize = 64;

/// The [`ClipStore`] of a relay node on NATS. See the module documentation.
#[derive(Debug, Clone)]
pub struct NatsStore {
    nats: Arc<Nats>,
    log: NatsLog,
    writes: Arc<channels::Writes>,
}

/// A group's record as stored (JSON). Records written before roles and
/// channels existed have neither field: everyone a member, not a channel.
#[derive(Debug, Serialize, Deserialize)]
struct GroupRecord {
    mode: u8,
    max_clip_ms: u32,
    members: BTreeSet<String>,
    /// The group's own live latency budget, ms (absent: the relay's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    live_budget_ms: Option<u32>,
    /// Members whose role is not Member (the role's wire byte).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    roles: std::collections::BTreeMap<String, u8>,
    /// Set for a channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel: Option<channels::ChannelRecord>,
}

impl NatsStore {
    /// A store over `nats`, answering clip questions from `log`.
    pub fn new(nats: Arc<Nats>, log: NatsLog) -> NatsStore {
        NatsStore {
            nats,
            log,
            writes: Arc::default(),
        }
    }

    /// Changes `group`'s record with `change` by compare-and-set.
    async fn modify(
        &self,
        group: &str,
        change: impl Fn(&mut GroupRecord),
    ) -> Result<(), StoreError> {
        self.modify_checked(group, |record| {
            change(record);
            Ok(())
        })
        .await
    }

    /// Changes `group`'s record by compare-and-set; `change` may refuse.
    async fn modify_checked(
        &self,
        group: &str,
        change: impl Fn(&mut GroupRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let key = token(group);
        for _ in 0..MAX_ATTEMPTS {
            let entry = self
                .nats
                .groups
                .entry(key.clone())
                .await
                .map_err(|e| backend("reading a group", e))?;
            let Some(entry) =
                entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
            else {
                return Err(StoreError::NoSuchGroup(group.to_owned()));
            };
            let mut record = decode(group, &entry.value)?;
            change(&mut record)?;
            if self
                .nats
                .groups
                .update(&key, encode(&record), entry.revision)
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!(
            "NATS: group {group} kept changing"
        )))
    }

    async fn advance(&self, group: &str, user: &str, seq: u64) -> Result<(), StoreError> {
        self.writes.cursor();
        let key = format!("{}.{}", token(group), token(user));
        let value = Bytes::from(seq.to_string());
        for _ in 0..MAX_ATTEMPTS {
            let entry = self
                .nats
                .cursors
                .entry(key.clone())
                .await
                .map_err(|e| backend("reading a cursor", e))?;
            let written = match entry {
                Some(e) if parse_u64(&e.value).is_some_and(|v| v >= seq) => return Ok(()),
                Some(e) => self
                    .nats
                    .cursors
                    .update(&key, value.clone(), e.revision)
                    .await
                    .is_ok(),
                None => self.nats.cursors.create(&key, value.clone()).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(StoreError::Backend("NATS: a cursor kept changing".into()))
    }
}

/// `group`'s record, if it exists.
pub(crate) async fn read_group(nats: &Nats, group: &str) -> Result<Option<GroupInfo>, StoreError> {
    let raw = nats
        .groups
        .get(token(group))
        .await
        .map_err(|e| backend("reading a group", e))?;
    raw.map(|raw| info(group, decode(group, &raw)?)).transpose()
}

fn encode(record: &GroupRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(record).expect("a group record serializes"))
}

fn decode(group: &str, raw: &[u8]) -> Result<GroupRecord, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        table: "groups",
        detail: format!("group {group}: {e}"),
    })
}

fn info(group: &str, record: GroupRecord) -> Result<GroupInfo, StoreError> {
    let mode = GroupMode::from_u8(record.mode).ok_or_else(|| StoreError::Corrupt {
        table: "groups",
        detail: format!("group {group}: bad mode {}", record.mode),
    })?;
    let mut info = GroupInfo::plain(group, mode, record.max_clip_ms, record.members);
    for (user, role) in record.roles {
        let role = ptt_protocol::Role::from_u8(role).ok_or_else(|| StoreError::Corrupt {
            table: "groups",
            detail: format!("group {group}: {user} has role {role}"),
        })?;
        info.roles.insert(user, role);
    }
    info.channel = record.channel.map(|c| c.info(record.max_clip_ms));
    info.live_budget_ms = record.live_budget_ms;
    Ok(info)
}

/// When `user` was last seen in `group`: `seen.<group>.<user>` in the
/// cursors bucket (three tokens, so never a cursor's `<group>.<user>`).
fn seen_key(group: &str, user: &str) -> String {
    format!("seen.{}.{}", token(group), token(user))
}

/// The id a key of the groups bucket stands for (the inverse of
/// [`token`]).
fn untoken(key: &str) -> Option<String> {
    let mut out = Vec::with_capacity(key.len());
    let bytes = key.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = key.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl ClipStore for NatsStore {
    fn create_group(&self, group: &str, mode: GroupMode, max_clip_ms: u32) -> StoreFuture<'_, ()> {
        let group = group.to_owned();
        Box::pin(async move {
            let record = GroupRecord {
                mode: mode as u8,
                max_clip_ms,
                members: BTreeSet::new(),
                live_budget_ms: None,
                roles: Default::default(),
                channel: None,
            };
            match self
                .nats
                .groups
                .create(token(&group), encode(&record))
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                    Err(StoreError::GroupExists(group))
                }
                Err(e) => Err(backend("creating a group", e)),
            }
        })
    }

    fn set_mode(&self, group: &str, mode: GroupMode) -> StoreFuture<'_, ()> {
        let group = group.to_owned();
        Box::pin(async move { self.modify(&group, |r| r.mode = mode as u8).await })
    }

    fn set_live_budget(&self, group: &str, budget_ms: Option<u32>) -> StoreFuture<'_, ()> {
        let group = group.to_owned();
        Box::pin(async move { self.modify(&group, |r| r.live_budget_ms = budget_ms).await })
    }

    fn add_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        let (group, user) = (group.to_owned(), user.to_owned());
        Box::pin(async move {
            self.modify(&group, |r| {
                r.members.insert(user.clone());
            })
            .await
        })
    }

    fn remove_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        let (group, user) = (group.to_owned(), user.to_owned());
        Box::pin(async move {
            self.modify(&group, |r| {
                r.members.remove(&user);
                r.roles.remove(&user);
            })
            .await
        })
    }

    fn group(&self, group: &str) -> StoreFuture<'_, Option<GroupInfo>> {
        let group = group.to_owned();
        Box::pin(async move {
            let result = read_group(&self.nats, &group).await;
            self.nats.track("reading a group", result)
        })
    }

    fn groups(&self) -> StoreFuture<'_, Vec<GroupInfo>> {
        use futures_util::TryStreamExt;
        Box::pin(async move {
            let keys: Vec<String> = match self.nats.groups.keys().await {
                Ok(keys) => keys
                    .try_collect()
                    .await
                    .map_err(|e| backend("listing groups", e))?,
                Err(e) => return Err(backend("listing groups", e)),
            };
            let mut out = Vec::new();
            for key in keys {
                let Some(id) = untoken(&key) else { continue };
                if let Some(info) = read_group(&self.nats, &id).await? {
                    out.push(info);
                }
            }
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
    }

    fn append_clip(&self, clip: NewClip) -> StoreFuture<'_, AppendOutcome> {
        self.log.append_future(clip)
    }

    fn clip_seq(&self, group: &str, clip_id: ClipId) -> StoreFuture<'_, Option<u64>> {
        self.log.clip_seq_future(group, clip_id)
    }

    fn clips_after(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredClip>> {
        self.log.read_future(group, after, limit)
    }

    fn recent_clips(&self, group: &str, count: usize) -> StoreFuture<'_, Vec<StoredClip>> {
        self.log.recent_future(group, count)
    }

    fn clip_meta(&self, group: &str, seq: u64) -> StoreFuture<'_, Option<ClipMeta>> {
        self.log.meta_future(group, seq)
    }

    fn seq_range(&self, group: &str) -> StoreFuture<'_, SeqRange> {
        self.log.range_future(group)
    }

    fn cursor(&self, group: &str, user: &str) -> StoreFuture<'_, u64> {
        let key = format!("{}.{}", token(group), token(user));
        Box::pin(async move {
            let raw = self
                .nats
                .cursors
                .get(key)
                .await
                .map_err(|e| backend("reading a cursor", e));
            let raw = self.nats.track("reading a cursor", raw)?;
            Ok(raw.as_deref().and_then(parse_u64).unwrap_or(0))
        })
    }

    fn advance_cursor(&self, group: &str, user: &str, seq: u64) -> StoreFuture<'_, ()> {
        let (group, user) = (group.to_owned(), user.to_owned());
        Box::pin(async move { self.advance(&group, &user, seq).await })
    }

    fn clip_summaries(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClipSummary>> {
        let group = group.to_owned();
        Box::pin(async move {
            let clips = self.log.read_future(&group, after, limit).await?;
            Ok(clips
                .into_iter()
                .map(|c| ClipSummary {
                    seq: c.seq,
                    clip_id: c.meta.clip_id,
                    duration_ms: c.frames.len() as u64 * u64::from(c.meta.frame_ms),
                    bytes: c.frames.iter().map(|f| f.len() as u64).sum(),
                    created_ms: c.meta.created_ms,
                    talker: c.meta.talker,
                })
                .collect())
        })
    }

    fn member_status(&self, group: &str) -> StoreFuture<'_, Vec<MemberState>> {
        let group = group.to_owned();
        Box::pin(async move {
            let info = read_group(&self.nats, &group)
                .await?
                .ok_or_else(|| StoreError::NoSuchGroup(group.clone()))?;
            let mut out = Vec::with_capacity(info.members.len());
            for user in info.members {
                let (cursor, last_seen_ms) =
                    tokio::try_join!(self.cursor(&group, &user), self.last_seen(&group, &user))?;
                out.push(MemberState {
                    user,
                    cursor,
                    last_seen_ms,
                });
            }
            Ok(out)
        })
    }

    fn delete_clip(&self, group: &str, seq: u64, now_ms: u64) -> StoreFuture<'_, Option<ClipId>> {
        let group = group.to_owned();
        Box::pin(async move {
            let deleted = self.log.delete_clip(&group, seq, now_ms).await;
            self.nats.track("deleting a clip", deleted)
        })
    }

    fn tombstones(&self, group: &str, since_ms: u64) -> StoreFuture<'_, Vec<(u64, ClipId)>> {
        let group = group.to_owned();
        Box::pin(async move {
            let tombstones = self.log.tombstones(&group, since_ms).await;
            self.nats.track("reading tombstones", tombstones)
        })
    }

    fn last_seen(&self, group: &str, user: &str) -> StoreFuture<'_, u64> {
        let key = seen_key(group, user);
        Box::pin(async move {
            let raw = self
                .nats
                .cursors
                .get(key)
                .await
                .map_err(|e| backend("reading last seen", e));
            let raw = self.nats.track("reading last seen", raw)?;
            Ok(raw.as_deref().and_then(parse_u64).unwrap_or(0))
        })
    }

    fn touch_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        let key = seen_key(group, user);
        Box::pin(async move {
            let now = crate::auth::unix_millis(std::time::SystemTime::now());
            self.nats
                .cursors
                .put(key, Bytes::from(now.to_string()))
                .await
                .map(drop)
                .map_err(|e| backend("recording last seen", e))
        })
    }

    fn apply_retention(&self, _policy: RetentionPolicy, _now_ms: u64) -> StoreFuture<'_, u64> {
        // The stream's own limits (max age, clips per subject) apply it.
        Box::pin(async { Ok(0) })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        // Every write was acknowledged by JetStream before it returned.
        Box::pin(async { Ok(()) })
    }

    // Roles and channels: `channels.rs`.

    fn create_channel(
        &self,
        channel: &str,
        owner: &str,
        public: bool,
        limits: ptt_protocol::ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        let (channel, owner) = (channel.to_owned(), owner.to_owned());
        Box::pin(async move {
            self.create_channel_impl(&channel, &owner, public, limits)
                .await
        })
    }

    fn set_role(&self, group: &str, user: &str, role: ptt_protocol::Role) -> StoreFuture<'_, ()> {
        let (group, user) = (group.to_owned(), user.to_owned());
        Box::pin(async move { self.set_role_impl(&group, &user, role).await })
    }

    fn set_channel_limits(
        &self,
        channel: &str,
        limits: ptt_protocol::ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        let channel = channel.to_owned();
        Box::pin(async move { self.set_channel_limits_impl(&channel, limits).await })
    }

    fn change_follower(
        &self,
        channel: &str,
        user: &str,
        change: crate::store::FollowChange,
    ) -> StoreFuture<'_, bool> {
        let (channel, user) = (channel.to_owned(), user.to_owned());
        Box::pin(async move { self.change_follower_impl(&channel, &user, change).await })
    }

    fn follower(
        &self,
        channel: &str,
        user: &str,
    ) -> StoreFuture<'_, Option<crate::store::Follower>> {
        let (channel, user) = (channel.to_owned(), user.to_owned());
        Box::pin(async move { self.follower_impl(&channel, &user).await })
    }

    fn follower_count(&self, channel: &str) -> StoreFuture<'_, u64> {
        let channel = channel.to_owned();
        Box::pin(async move { self.follower_count_impl(&channel).await })
    }

    fn public_channels(&self, prefix: &str, limit: usize) -> StoreFuture<'_, Vec<String>> {
        let prefix = prefix.to_owned();
        Box::pin(async move { self.public_channels_impl(&prefix, limit).await })
    }

    fn create_invite(&self, channel: &str, code: &str) -> StoreFuture<'_, ()> {
        let (channel, code) = (channel.to_owned(), code.to_owned());
        Box::pin(async move { self.create_invite_impl(&channel, &code).await })
    }

    fn revoke_invite(&self, channel: &str, code: &str) -> StoreFuture<'_, bool> {
        let (channel, code) = (channel.to_owned(), code.to_owned());
        Box::pin(async move { self.revoke_invite_impl(&channel, &code).await })
    }

    fn invite(&self, code: &str) -> StoreFuture<'_, Option<String>> {
        let code = code.to_owned();
        Box::pin(async move { self.invite_impl(&code).await })
    }

    fn add_channel_counts(
        &self,
        channel: &str,
        delivered: u64,
        played: u64,
    ) -> StoreFuture<'_, ()> {
        let channel = channel.to_owned();
        Box::pin(async move {
            self.add_channel_counts_impl(&channel, delivered, played)
                .await
        })
    }

    fn channel_counts(&self, channel: &str) -> StoreFuture<'_, (u64, u64)> {
        let channel = channel.to_owned();
        Box::pin(async move { self.channel_counts_impl(&channel).await })
    }

    fn counters(&self) -> crate::store::StoreCounters {
        self.channel_counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_back_to_ids() {
        for id in ["team", "a.b@c", "x-y_z.1"] {
            assert_eq!(untoken(&token(id)).as_deref(), Some(id));
        }
        assert_eq!(untoken("bad=Z"), None);
    }
}
