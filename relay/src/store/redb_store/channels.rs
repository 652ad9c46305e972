//! Roles, channels, followers and invite codes in the redb store.
//!
//! A follower is one record in `followers` keyed by (channel, user); the
//! channel's count sits in `follower_count`. A follow, unfollow, mute or
//! unmute is a batched write of the writer thread (many share one fsync)
//! touching that record, the count and, for a new follower, its cursor:
//! O(1) whatever the following. It does not signal the group's watchers:
//! the group record their feed re-reads holds the channel's owner, admins
//! and publishers, never its followers.

use ptt_protocol::{ChannelLimits, GroupMode, Role};
use redb::{ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::{
    CHANNEL_COUNTS, Command, Context, FOLLOWER_COUNT, FOLLOWERS, GROUPS, GroupRecord, INVITES,
    MEMBERS, ROLES, RedbStore, decode_group, encode_group, require_group, writer_gone,
};
use crate::store::{ChannelInfo, FollowChange, Follower, StoreError, StoreFuture};

const MUTED: u8 = 0x01;

/// The roles of a group's members that are not `Member`.
pub(super) fn read_roles(
    roles: &impl ReadableTable<(&'static str, &'static str), u8>,
    group: &str,
) -> Result<std::collections::BTreeMap<String, Role>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    for entry in roles.range((group, "")..).ctx("reading roles")? {
        let (key, value) = entry.ctx("reading roles")?;
        let (g, user) = key.value();
        if g != group {
            break;
        }
        let role = Role::from_u8(value.value()).ok_or_else(|| StoreError::Corrupt {
            table: "roles",
            detail: format!("{group}/{user}: role {}", value.value()),
        })?;
        out.insert(user.to_owned(), role);
    }
    Ok(out)
}

/// One follower change inside the writer's batch (errors as
/// `append_one`'s: the outer one fails the batch).
pub(super) fn follow_one(
    groups: &Table<'_, &str, &[u8]>,
    followers: &mut Table<'_, (&str, &str), u8>,
    counts: &mut Table<'_, &str, u64>,
    cursors: &mut Table<'_, (&str, &str), u64>,
    group: &str,
    user: &str,
    change: FollowChange,
) -> Result<Result<bool, StoreError>, StoreError> {
    let Some(raw) = groups.get(group).ctx("reading groups")? else {
        return Ok(Err(StoreError::NoSuchGroup(group.to_owned())));
    };
    if decode_group(group, raw.value())?.channel.is_none() {
        return Ok(Err(StoreError::NotChannel(group.to_owned())));
    }
    let current = followers
        .get((group, user))
        .ctx("reading followers")?
        .map(|v| v.value());
    let count = counts
        .get(group)
        .ctx("reading follower_count")?
        .map_or(0, |v| v.value());
    let changed = match (change, current) {
        (FollowChange::Follow { start }, None) => {
            followers
                .insert((group, user), 0)
                .ctx("writing followers")?;
            counts
                .insert(group, count + 1)
                .ctx("writing follower_count")?;
            let cursor = cursors
                .get((group, user))
                .ctx("reading cursors")?
                .map_or(0, |v| v.value());
            if start > cursor {
                cursors
                    .insert((group, user), start)
                    .ctx("writing cursors")?;
            }
            true
        }
        (FollowChange::Unfollow, Some(_)) => {
            followers.remove((group, user)).ctx("writing followers")?;
            counts
                .insert(group, count.saturating_sub(1))
                .ctx("writing follower_count")?;
            true
        }
        (FollowChange::Mute(muted), Some(flags)) => {
            let new = if muted { flags | MUTED } else { flags & !MUTED };
            followers
                .insert((group, user), new)
                .ctx("writing followers")?;
            new != flags
        }
        (FollowChange::Mute(_), None) => {
            return Ok(Err(StoreError::NotFollower(group.to_owned())));
        }
        _ => false,
    };
    Ok(Ok(changed))
}

fn require_channel(
    groups: &impl ReadableTable<&'static str, &'static [u8]>,
    group: &str,
) -> Result<GroupRecord, StoreError> {
    let raw = groups
        .get(group)
        .ctx("reading groups")?
        .ok_or_else(|| StoreError::NoSuchGroup(group.to_owned()))?;
    let record = decode_group(group, raw.value())?;
    if record.channel.is_none() {
        return Err(StoreError::NotChannel(group.to_owned()));
    }
    Ok(record)
}

fn put_role(txn: &WriteTransaction, group: &str, user: &str, role: Role) -> Result<(), StoreError> {
    let mut roles = txn.open_table(ROLES).ctx("opening roles")?;
    if role == Role::Member {
        roles.remove((group, user)).ctx("writing roles")?;
    } else {
        roles
            .insert((group, user), role as u8)
            .ctx("writing roles")?;
    }
    Ok(())
}

impl RedbStore {
    pub(super) fn create_channel_impl(
        &self,
        channel: &str,
        owner: &str,
        public: bool,
        limits: ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        let name = channel;
        let (channel, owner) = (channel.to_owned(), owner.to_owned());
        let change = self.write(move |txn| {
            let mut groups = txn.open_table(GROUPS).ctx("opening groups")?;
            if groups
                .get(channel.as_str())
                .ctx("reading groups")?
                .is_some()
            {
                return Err(StoreError::GroupExists(channel));
            }
            let record = encode_group(GroupRecord {
                mode: GroupMode::Notes,
                max_clip_ms: limits.max_clip_ms,
                channel: Some(ChannelInfo { public, limits }),
            });
            groups
                .insert(channel.as_str(), record.as_slice())
                .ctx("writing groups")?;
            let mut members = txn.open_multimap_table(MEMBERS).ctx("opening members")?;
            members
                .insert(channel.as_str(), owner.as_str())
                .ctx("writing members")?;
            put_role(txn, &channel, &owner, Role::Owner)
        });
        self.changing(name, change)
    }

    pub(super) fn set_role_impl(&self, group: &str, user: &str, role: Role) -> StoreFuture<'_, ()> {
        let name = group;
        let (group, user) = (group.to_owned(), user.to_owned());
        let change = self.write(move |txn| {
            let record = {
                let groups = txn.open_table(GROUPS).ctx("opening groups")?;
                let raw = groups
                    .get(group.as_str())
                    .ctx("reading groups")?
                    .ok_or_else(|| StoreError::NoSuchGroup(group.clone()))?;
                decode_group(&group, raw.value())?
            };
            let mut members = txn.open_multimap_table(MEMBERS).ctx("opening members")?;
            if record.channel.is_some() && role == Role::Listener {
                // Back to a follower (if it follows): no longer staff.
                members
                    .remove(group.as_str(), user.as_str())
                    .ctx("writing members")?;
                return put_role(txn, &group, &user, Role::Member);
            }
            members
                .insert(group.as_str(), user.as_str())
                .ctx("writing members")?;
            put_role(txn, &group, &user, role)
        });
        self.changing(name, change)
    }

    pub(super) fn set_channel_limits_impl(
        &self,
        channel: &str,
        limits: ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        let name = channel;
        let channel = channel.to_owned();
        let change = self.write(move |txn| {
            let mut groups = txn.open_table(GROUPS).ctx("opening groups")?;
            let mut record = require_channel(&groups, &channel)?;
            record.max_clip_ms = limits.max_clip_ms;
            if let Some(c) = record.channel.as_mut() {
                c.limits = limits;
            }
            groups
                .insert(channel.as_str(), encode_group(record).as_slice())
                .ctx("writing groups")?;
            Ok(())
        });
        self.changing(name, change)
    }

    pub(super) fn change_follower_impl(
        &self,
        channel: &str,
        user: &str,
        change: FollowChange,
    ) -> StoreFuture<'_, bool> {
        self.follower_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Follow {
            group: channel.to_owned(),
            user: user.to_owned(),
            change,
            reply,
        };
        Box::pin(async move {
            self.send(cmd).await?;
            rx.await.map_err(|_| writer_gone())?
        })
    }

    pub(super) fn follower_impl(
        &self,
        channel: &str,
        user: &str,
    ) -> StoreFuture<'_, Option<Follower>> {
        let (channel, user) = (channel.to_owned(), user.to_owned());
        self.read(move |txn| {
            require_group(txn, &channel)?;
            let followers = txn.open_table(FOLLOWERS).ctx("opening followers")?;
            Ok(followers
                .get((channel.as_str(), user.as_str()))
                .ctx("reading followers")?
                .map(|v| Follower {
                    muted: v.value() & MUTED != 0,
                }))
        })
    }

    pub(super) fn follower_count_impl(&self, channel: &str) -> StoreFuture<'_, u64> {
        let channel = channel.to_owned();
        self.read(move |txn| {
            require_group(txn, &channel)?;
            let counts = txn
                .open_table(FOLLOWER_COUNT)
                .ctx("opening follower_count")?;
            Ok(counts
                .get(channel.as_str())
                .ctx("reading follower_count")?
                .map_or(0, |v| v.value()))
        })
    }

    pub(super) fn public_channels_impl(
        &self,
        prefix: &str,
        limit: usize,
    ) -> StoreFuture<'_, Vec<String>> {
        let prefix = prefix.to_owned();
        self.read(move |txn| {
            let groups = txn.open_table(GROUPS).ctx("opening groups")?;
            let mut out = Vec::new();
            for entry in groups.range(prefix.as_str()..).ctx("reading groups")? {
                if out.len() >= limit {
                    break;
                }
                let (key, value) = entry.ctx("reading groups")?;
                let id = key.value();
                if !id.starts_with(prefix.as_str()) {
                    break;
                }
                if decode_group(id, value.value())?
                    .channel
                    .is_some_and(|c| c.public)
                {
                    out.push(id.to_owned());
                }
            }
            Ok(out)
        })
    }

    pub(super) fn create_invite_impl(&self, channel: &str, code: &str) -> StoreFuture<'_, ()> {
        let (channel, code) = (channel.to_owned(), code.to_owned());
        self.write(move |txn| {
            require_channel(&txn.open_table(GROUPS).ctx("opening groups")?, &channel)?;
            let mut invites = txn.open_table(INVITES).ctx("opening invites")?;
            invites
                .insert(code.as_str(), channel.as_str())
                .ctx("writing invites")?;
            Ok(())
        })
    }

    pub(super) fn revoke_invite_impl(&self, channel: &str, code: &str) -> StoreFuture<'_, bool> {
        let (channel, code) = (channel.to_owned(), code.to_owned());
        self.write(move |txn| {
            let mut invites = txn.open_table(INVITES).ctx("opening invites")?;
            let matches = invites
                .get(code.as_str())
                .ctx("reading invites")?
                .is_some_and(|v| v.value() == channel);
            if matches {
                invites.remove(code.as_str()).ctx("writing invites")?;
            }
            Ok(matches)
        })
    }

    pub(super) fn add_channel_counts_impl(
        &self,
        channel: &str,
        delivered: u64,
        played: u64,
    ) -> StoreFuture<'_, ()> {
        self.count_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let channel = channel.to_owned();
        self.write(move |txn| {
            require_channel(&txn.open_table(GROUPS).ctx("opening groups")?, &channel)?;
            let mut counts = txn
                .open_table(CHANNEL_COUNTS)
                .ctx("opening channel_counts")?;
            let (d, p) = counts
                .get(channel.as_str())
                .ctx("reading channel_counts")?
                .map_or((0, 0), |v| v.value());
            counts
                .insert(
                    channel.as_str(),
                    (d.saturating_add(delivered), p.saturating_add(played)),
                )
                .ctx("writing channel_counts")?;
            Ok(())
        })
    }

    pub(super) fn channel_counts_impl(&self, channel: &str) -> StoreFuture<'_, (u64, u64)> {
        let channel = channel.to_owned();
        self.read(move |txn| {
            require_group(txn, &channel)?;
            let counts = txn
                .open_table(CHANNEL_COUNTS)
                .ctx("opening channel_counts")?;
            Ok(counts
                .get(channel.as_str())
                .ctx("reading channel_counts")?
                .map_or((0, 0), |v| v.value()))
        })
    }

    pub(super) fn invite_impl(&self, code: &str) -> StoreFuture<'_, Option<String>> {
        let code = code.to_owned();
        self.read(move |txn| {
            let invites = txn.open_table(INVITES).ctx("opening invites")?;
            Ok(invites
                .get(code.as_str())
                .ctx("reading invites")?
                .map(|v| v.value().to_owned()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ClipStore;

    fn limits(max_clip_ms: u32) -> ChannelLimits {
        ChannelLimits {
            max_clip_ms,
            ..ChannelLimits::default()
        }
    }

    #[tokio::test]
    async fn a_file_of_the_previous_relay_opens_with_everyone_a_member() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The tables and the version 1 record the previous relay wrote,
            // and none of the new tables.
            let db = redb::Database::create(dir.path().join(super::super::DB_FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut groups = txn.open_table(GROUPS).unwrap();
                groups
                    .insert("team", &[1u8, 1, 0x80, 0x01, 0x86, 0xa0][..])
                    .unwrap();
                let mut members = txn.open_multimap_table(MEMBERS).unwrap();
                members.insert("team", "alice").unwrap();
                members.insert("team", "bob").unwrap();
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let info = store.group("team").await.unwrap().unwrap();
        assert_eq!(info.max_clip_ms, 100_000);
        assert_eq!(info.channel, None);
        assert_eq!(info.role("alice"), Some(Role::Member));
        assert_eq!(info.role("bob"), Some(Role::Member));
        assert_eq!(info.role("carol"), None);
        // Roles are kept from then on, and removal forgets them.
        store.set_role("team", "bob", Role::Listener).await.unwrap();
        let info = store.group("team").await.unwrap().unwrap();
        assert_eq!(info.role("bob"), Some(Role::Listener));
        store.remove_member("team", "bob").await.unwrap();
        store.add_member("team", "bob").await.unwrap();
        let info = store.group("team").await.unwrap().unwrap();
        assert_eq!(info.role("bob"), Some(Role::Member));
    }

    #[tokio::test]
    async fn follows_are_one_record_each_and_do_not_touch_the_group_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .create_channel("news", "owner", true, limits(30_000))
            .await
            .unwrap();
        let info = store.group("news").await.unwrap().unwrap();
        assert_eq!(info.role("owner"), Some(Role::Owner));
        assert!(info.channel.is_some_and(|c| c.public));
        let changes = store.watch_group("news");
        let follow = FollowChange::Follow { start: 7 };
        for i in 0..50 {
            assert!(
                store
                    .change_follower("news", &format!("f{i}"), follow)
                    .await
                    .unwrap()
            );
        }
        assert!(!store.change_follower("news", "f1", follow).await.unwrap());
        assert_eq!(store.follower_count("news").await.unwrap(), 50);
        assert_eq!(store.cursor("news", "f3").await.unwrap(), 7);
        // The group record (what feeds re-read) holds the owner alone, and
        // nobody watching it was woken.
        assert!(!changes.has_changed().unwrap());
        let info = store.group("news").await.unwrap().unwrap();
        assert_eq!(info.members.len(), 1);

        assert!(
            store
                .change_follower("news", "f3", FollowChange::Mute(true))
                .await
                .unwrap()
        );
        assert_eq!(
            store.follower("news", "f3").await.unwrap(),
            Some(Follower { muted: true })
        );
        assert!(
            store
                .change_follower("news", "f3", FollowChange::Unfollow)
                .await
                .unwrap()
        );
        assert_eq!(store.follower("news", "f3").await.unwrap(), None);
        assert_eq!(store.follower_count("news").await.unwrap(), 49);
        // Following again keeps the cursor where it got to.
        store.advance_cursor("news", "f3", 20).await.unwrap();
        store.change_follower("news", "f3", follow).await.unwrap();
        assert_eq!(store.cursor("news", "f3").await.unwrap(), 20);
        assert_eq!(store.counters().follower_writes, 54);

        store
            .create_group("team", GroupMode::Walkie, 1000)
            .await
            .unwrap();
        assert!(matches!(
            store.change_follower("team", "x", follow).await,
            Err(StoreError::NotChannel(_))
        ));
    }

    #[tokio::test]
    async fn public_channels_by_prefix_and_invites() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        for (name, public) in [("bank-a", true), ("bank-b", false), ("bank-c", true)] {
            store
                .create_channel(name, "o", public, limits(1000))
                .await
                .unwrap();
        }
        store
            .create_channel("blog", "o", true, limits(1000))
            .await
            .unwrap();
        store
            .create_group("bank-team", GroupMode::Notes, 1000)
            .await
            .unwrap();
        assert_eq!(
            store.public_channels("bank", 10).await.unwrap(),
            ["bank-a", "bank-c"]
        );
        assert_eq!(store.public_channels("bank", 1).await.unwrap(), ["bank-a"]);
        assert_eq!(store.public_channels("", 10).await.unwrap().len(), 3);

        store.create_invite("bank-b", "k1").await.unwrap();
        assert_eq!(store.invite("k1").await.unwrap().as_deref(), Some("bank-b"));
        assert!(!store.revoke_invite("bank-a", "k1").await.unwrap());
        assert!(store.revoke_invite("bank-b", "k1").await.unwrap());
        assert_eq!(store.invite("k1").await.unwrap(), None);
        assert!(matches!(
            store.create_invite("bank-team", "k2").await,
            Err(StoreError::NotChannel(_))
        ));
    }
}
