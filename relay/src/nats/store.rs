//! Groups, members and cursors in JetStream key-value buckets.
//!
//! A group is one key in `<prefix>_groups` whose value is the whole record
//! (mode, longest clip, members), changed by compare-and-set so that two
//! nodes adding members at once both land; every node's feed of the group
//! watches that key. A cursor is one key per member and group in
//! `<prefix>_cursors`, moved forward only, also by compare-and-set (and
//! beside it `seen.<group>.<member>`, when the member last joined). Clips
//! are the log's ([`super::NatsLog`]): the store's clip methods answer from
//! it.

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

/// Compare-and-set attempts before an update gives up.
const MAX_ATTEMPTS: usize = 64;

/// The [`ClipStore`] of a relay node on NATS. See the module documentation.
#[derive(Debug, Clone)]
pub struct NatsStore {
    nats: Arc<Nats>,
    log: NatsLog,
}

/// A group's record as stored (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct GroupRecord {
    mode: u8,
    max_clip_ms: u32,
    members: BTreeSet<String>,
    /// The group's own live latency budget, ms (absent: the relay's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    live_budget_ms: Option<u32>,
}

impl NatsStore {
    /// A store over `nats`, answering clip questions from `log`.
    pub fn new(nats: Arc<Nats>, log: NatsLog) -> NatsStore {
        NatsStore { nats, log }
    }

    /// Changes `group`'s record with `change` by compare-and-set.
    async fn modify(
        &self,
        group: &str,
        change: impl Fn(&mut GroupRecord),
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
            change(&mut record);
            let value = encode(&record);
            if self
                .nats
                .groups
                .update(&key, value, entry.revision)
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
    // Roles and channels are kept by the embedded store only (issue #14):
    // on NATS every member is a plain member.
    let mut info = GroupInfo::plain(group, mode, record.max_clip_ms, record.members);
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
