//! The embedded single-node [`ClipStore`]: one [redb] file, `relay.redb`, in
//! the relay's data directory.
//!
//! # Tables
//!
//! | table              | key                       | value                                   |
//! |--------------------|---------------------------|-----------------------------------------|
//! | `groups`           | group id                  | encoded group record (mode, max clip)  |
//! | `members`          | group id (multimap)       | user id                                 |
//! | `group_seq`        | group id                  | last sequence number ever assigned      |
//! | `clips`            | (group id, seq)           | encoded clip blob                       |
//! | `clip_ids`         | (group id, clip id)       | seq (the dedup index)                   |
//! | `expired_clip_ids` | (group id, seq)           | (clip id, ms the clip was deleted)      |
//! | `cursors`          | (group id, user id)       | seq of the member's cursor              |
//! | `roles`            | (group id, user id)       | role byte, for members not `Member`     |
//! | `followers`        | (channel id, user id)     | flags (bit 0: muted)                    |
//! | `follower_count`   | channel id                | followers                               |
//! | `invites`          | invite code               | channel id                              |
//!
//! A channel's followers are one record each in `followers`, not in
//! `members`: a follow or unfollow writes that record, the count and (a
//! follow) the cursor, O(1) whatever the following, and does not signal
//! the group's watchers, whose feed re-reads the group record with its
//! members (the channel's owner, admins and publishers only). See
//! `redb_store/channels.rs`.
//!
//! # Encoding
//!
//! A group record is version 1 (mode, max clip ms) for a plain group;
//! version 2 appends the kind (0 group, 1 channel), public (0 or 1), and
//! the channel's clips per day, backlog clips and backlog days as varints.
//! Plain groups are still written as version 1, so files stay readable by
//! the previous relay until a channel is created, and files of the previous
//! relay open as they are (no roles table entries: everyone a member).
//!
//! Records are encoded by hand with the protocol's varint helpers and start
//! with a version byte, so that a later layout can be told apart. A clip blob
//! is: version, clip id (16 bytes), talker (varint length + UTF-8), format,
//! sample rate (varint), channels, frame ms, created ms (8 bytes big
//! endian), flags, waveform (varint length + bytes), frame count (varint),
//! then each frame as (varint length, bytes). The group id is not repeated in
//! the blob: it is the key's first half. On read the blob is copied once into
//! a [`Bytes`] and every frame and the waveform are zero-copy slices of it.
//! A record that does not decode gives [`StoreError::Corrupt`], never a
//! panic.
//!
//! # Writes and group commit
//!
//! Every write goes through one dedicated writer thread fed by a channel, so
//! there is never contention for redb's single write transaction. The
//! thread takes the first pending command, drains whatever else is queued
//! (up to [`MAX_BATCH`] commands or [`MAX_BATCH_BYTES`] of clips), and writes all consecutive clip appends
//! and cursor updates in ONE write transaction with one commit: with many
//! talkers, many appends share one fsync. Each caller is answered through
//! its own oneshot channel only after the commit returned. A batch holding
//! at least one append commits with [`Durability::Immediate`] (fsync); a
//! batch of cursor updates alone commits with [`Durability::None`] and
//! becomes durable with the next durable commit (the next append, an admin
//! change, [`ClipStore::flush`], or the final commit the writer thread makes
//! when the store is dropped). Administrative writes (groups, members,
//! retention, flush) run as their own durable transactions in queue order.
//!
//! A write is queued when the trait method is called, not when its future
//! is first polled: dropping the future does not cancel it (an append whose
//! caller went away may still be stored; a retry is then a duplicate).
//!
//! Reads run on [`tokio::task::spawn_blocking`] with their own read
//! transaction (a consistent snapshot); they never wait for the writer.
//!
//! # Retention and dedup
//!
//! Retention deletes from the oldest sequence number forward and stops at
//! the first clip it keeps, so the retained clips of a group are always the
//! contiguous range [`SeqRange`] reports, less the clips an administrator
//! deleted ([`ClipStore::delete_clip`]: holes that catch-up steps over;
//! each leaves a tombstone, `(group, seq)` to the clip id and the time,
//! pruned with the dedup entries). Clips are appended in the order
//! they finish, so a clip can be up to one clip length older than a clip
//! before it; it is then deleted at most that much later than its age
//! allows. The cost is proportional to the clips deleted, not to the clips
//! stored.
//!
//! A clip whose blob does not decode stops its group's age-based retention
//! at that clip (its age is unknown; the error is logged) without failing
//! the other groups' retention; count-based retention deletes it.
//!
//! The dedup entry (`clip_ids`) of a deleted clip is kept: a talker's late
//! retry of a clip that was stored and then expired is still answered
//! [`AppendOutcome::Duplicate`] with the original sequence number instead of
//! being stored again. When retention deletes a clip it records the clip id
//! in `expired_clip_ids`; the dedup entry is dropped only once it has
//! outlived its clip by `max(max_age_ms, 24 h)`, which bounds the dedup
//! index without shortening the dedup window below the clip's own
//! lifetime. [`ClipStore::clip_seq`] answers from the same index, so it
//! knows a deleted clip for exactly as long.
//!
//! # Unknown groups
//!
//! Every operation naming a group that does not exist fails with
//! [`StoreError::NoSuchGroup`], except [`ClipStore::group`], which returns
//! `None`. Removing a member keeps its cursor, so that a member removed and
//! added back does not receive the group's history again.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ptt_protocol::coding::{
    get_array, get_bytes, get_count, get_u8, get_varint, get_varint_u32, put_bytes, put_varint,
};
use ptt_protocol::{ClipFormat, ClipId, ClipSummary, DecodeError, GroupMode, MemberState};
use redb::{
    Database, DatabaseError, Durability, MultimapTableDefinition, ReadTransaction,
    ReadableDatabase, ReadableMultimapTable, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use tokio::sync::oneshot;

use super::{
    AppendOutcome, ClipMeta, ClipStore, GroupInfo, NewClip, RetentionPolicy, SeqRange,
    StoreCounters, StoreError, StoreFuture, StoredClip,
};

/// The database file's name inside the data directory.
pub const DB_FILE_NAME: &str = "relay.redb";
/// The page cache of [`RedbStore::open`]: 64 MiB (redb's own default,
/// 1 GiB, let the process grow with the store).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// The most commands the writer thread takes into one batch.
pub const MAX_BATCH: usize = 1024;

/// The most writes queued for the writer thread. Writers beyond it wait
/// (backpressure to ingest and to cursor updates) instead of growing the
/// queue: a commit takes about one fsync, and this many writes fill
/// several batches.
pub const WRITE_QUEUE: usize = 4096;

/// The clip bytes past which the writer thread stops adding to a batch (a
/// batch always takes at least one command).
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// The shortest time a deleted clip's dedup entry is kept after the clip
/// was deleted (see the module documentation).
pub const MIN_DEDUP_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

const GROUPS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("groups");
const MEMBERS: MultimapTableDefinition<'static, &str, &str> =
    MultimapTableDefinition::new("members");
const GROUP_SEQ: TableDefinition<'static, &str, u64> = TableDefinition::new("group_seq");
const CLIPS: TableDefinition<'static, (&str, u64), &[u8]> = TableDefinition::new("clips");
const CLIP_IDS: TableDefinition<'static, (&str, &[u8; 16]), u64> = TableDefinition::new("clip_ids");
const EXPIRED: TableDefinition<'static, (&str, u64), (&[u8; 16], u64)> =
    TableDefinition::new("expired_clip_ids");
const CURSORS: TableDefinition<'static, (&str, &str), u64> = TableDefinition::new("cursors");
const ROLES: TableDefinition<'static, (&str, &str), u8> = TableDefinition::new("roles");
const FOLLOWERS: TableDefinition<'static, (&str, &str), u8> = TableDefinition::new("followers");
const FOLLOWER_COUNT: TableDefinition<'static, &str, u64> = TableDefinition::new("follower_count");
const INVITES: TableDefinition<'static, &str, &str> = TableDefinition::new("invites");
/// A channel's followers' acknowledgements and Played, (delivered,
/// played), added to in batches by the hub.
const CHANNEL_COUNTS: TableDefinition<'static, &str, (u64, u64)> =
    TableDefinition::new("channel_counts");

mod channels;
/// When each member's progress was last recorded (a cursor write or a
/// join), Unix ms.
const LAST_SEEN: TableDefinition<'static, (&str, &str), u64> = TableDefinition::new("last_seen");
/// Clips deleted by an administrator: `(group, seq)` to the clip id and
/// when it was deleted (Unix ms), so members that were away learn of it.
const TOMBSTONES: TableDefinition<'static, (&str, u64), (&[u8; 16], u64)> =
    TableDefinition::new("tombstones");

/// Groups with a live latency budget of their own, ms (others use the
/// relay's).
const LIVE_BUDGETS: TableDefinition<'static, &str, u32> = TableDefinition::new("live_budgets");

const GROUP_RECORD_V1: u8 = 1;
const GROUP_RECORD_V2: u8 = 2;
const CLIP_BLOB_V1: u8 = 1;

/// Maps any displayable error to [`StoreError::Backend`] with what was being
/// done.
trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, StoreError>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Backend(format!("{what}: {e}")))
    }
}

/// A copy of an error, to answer every caller of a failed batch.
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::NoSuchGroup(g) => StoreError::NoSuchGroup(g.clone()),
        StoreError::GroupExists(g) => StoreError::GroupExists(g.clone()),
        StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
        StoreError::Corrupt { table, detail } => StoreError::Corrupt {
            table,
            detail: detail.clone(),
        },
        StoreError::Backend(s) => StoreError::Backend(s.clone()),
        StoreError::NotChannel(g) => StoreError::NotChannel(g.clone()),
        StoreError::NotFollower(g) => StoreError::NotFollower(g.clone()),
    }
}

fn writer_gone() -> StoreError {
    StoreError::Backend("the store's writer thread has stopped".into())
}

/// A write for the writer thread.
enum Command {
    /// Append an encoded clip (batched).
    Append {
        group: String,
        clip_id: ClipId,
        blob: Vec<u8>,
        reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    },
    /// Advance a cursor (batched).
    Cursor {
        group: String,
        user: String,
        seq: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Change a follower's record (batched, durable).
    Follow {
        group: String,
        user: String,
        change: super::FollowChange,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Run one durable transaction on its own; returns whether it
    /// committed.
    Exec(Box<dyn FnOnce(&Database) -> bool + Send>),
}

impl Command {
    /// The clip bytes this command writes.
    fn blob_len(&self) -> usize {
        match self {
            Command::Append { blob, .. } => blob.len(),
            _ => 0,
        }
    }
}

/// The embedded single-node store. See the module documentation.
pub struct RedbStore {
    db: Arc<Database>,
    tx: Option<tokio::sync::mpsc::Sender<Command>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Per watched group: bumped after every committed change of the
    /// group's record or members.
    group_changes: dashmap::DashMap<String, tokio::sync::watch::Sender<u64>>,
    appends: std::sync::atomic::AtomicU64,
    cursor_writes: std::sync::atomic::AtomicU64,
    follower_writes: std::sync::atomic::AtomicU64,
    count_writes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store in `dir` (created if missing), creating
    /// `dir/relay.redb` on first use.
    ///
    /// Fails with [`StoreError::Locked`] if the database is open elsewhere
    /// (another relay process, or another `RedbStore` in this process).
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// As [`open`](Self::open), with a page cache of at most `cache_bytes`
    /// (the relay's `store_cache_mib`).
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).ctx(&format!("creating {}", dir.display()))?;
        let path = dir.join(DB_FILE_NAME);
        let db = match Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
        {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Locked {
                    path: path.display().to_string(),
                });
            }
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "opening {}: {e}",
                    path.display()
                )));
            }
        };
        RedbStore::with_database(db, path)
    }

    /// Opens a store kept on `backend` instead of a file: the power-loss
    /// test gives it storage that forgets every write not followed by a
    /// `sync_data`, as a machine losing power does. `label` names it in
    /// errors and [`RedbStore::path`].
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        label: PathBuf,
    ) -> Result<RedbStore, StoreError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", label.display())))?;
        RedbStore::with_database(db, label)
    }

    fn with_database(db: Database, path: PathBuf) -> Result<RedbStore, StoreError> {
        // Create every table once, so that read transactions always find them.
        let txn = db.begin_write().ctx("begin write")?;
        {
            txn.open_table(GROUPS).ctx("creating groups")?;
            txn.open_multimap_table(MEMBERS).ctx("creating members")?;
            txn.open_table(GROUP_SEQ).ctx("creating group_seq")?;
            txn.open_table(CLIPS).ctx("creating clips")?;
            txn.open_table(CLIP_IDS).ctx("creating clip_ids")?;
            txn.open_table(EXPIRED).ctx("creating expired_clip_ids")?;
            txn.open_table(CURSORS).ctx("creating cursors")?;
            txn.open_table(ROLES).ctx("creating roles")?;
            txn.open_table(FOLLOWERS).ctx("creating followers")?;
            txn.open_table(FOLLOWER_COUNT)
                .ctx("creating follower_count")?;
            txn.open_table(INVITES).ctx("creating invites")?;
            txn.open_table(CHANNEL_COUNTS)
                .ctx("creating channel_counts")?;
            txn.open_table(LAST_SEEN).ctx("creating last_seen")?;
            txn.open_table(TOMBSTONES).ctx("creating tombstones")?;
            txn.open_table(LIVE_BUDGETS).ctx("creating live_budgets")?;
        }
        txn.commit().ctx("commit")?;

        let db = Arc::new(db);
        let (tx, mut rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("relay-store-writer".into())
            .spawn(move || writer_loop(&writer_db, &mut rx))
            .ctx("starting the store writer thread")?;
        Ok(RedbStore {
            db,
            tx: Some(tx),
            writer: Some(writer),
            path,
            group_changes: dashmap::DashMap::new(),
            appends: Default::default(),
            cursor_writes: Default::default(),
            follower_writes: Default::default(),
            count_writes: Default::default(),
        })
    }

    /// A signal that changes after every committed change of `group`'s
    /// record or members (whoever made it: an admin message, the command
    /// line in the same process, a test). Pair with
    /// [`RedbStore::unwatch_group`] when the receiver is dropped.
    pub fn watch_group(&self, group: &str) -> tokio::sync::watch::Receiver<u64> {
        self.group_changes
            .entry(group.to_owned())
            .or_insert_with(|| tokio::sync::watch::Sender::new(0))
            .subscribe()
    }

    /// Forgets `group`'s change signal if nobody watches it any more.
    pub fn unwatch_group(&self, group: &str) {
        self.group_changes
            .remove_if(group, |_, tx| tx.receiver_count() == 0);
    }

    fn group_changed(&self, group: &str) {
        if let Some(tx) = self.group_changes.get(group) {
            tx.send_modify(|v| *v += 1);
        }
    }

    /// Runs `change` and then signals watchers of `group`.
    fn changing<'a>(&'a self, group: &str, change: StoreFuture<'a, ()>) -> StoreFuture<'a, ()> {
        let group = group.to_owned();
        Box::pin(async move {
            change.await?;
            self.group_changed(&group);
            Ok(())
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a command for the writer thread, waiting while the queue is
    /// full.
    async fn send(&self, cmd: Command) -> Result<(), StoreError> {
        self.tx
            .as_ref()
            .ok_or_else(writer_gone)?
            .send(cmd)
            .await
            .map_err(|_| writer_gone())
    }

    /// Runs `f` in its own durable write transaction on the writer thread;
    /// commits if it returns `Ok`, aborts otherwise.
    fn write<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = move |db: &Database| {
            let result = (|| {
                let txn = db.begin_write().ctx("begin write")?;
                let out = f(&txn)?;
                txn.commit().ctx("commit")?;
                Ok(out)
            })();
            let committed = result.is_ok();
            let _ = reply.send(result);
            committed
        };
        Box::pin(async move {
            self.send(Command::Exec(Box::new(job))).await?;
            rx.await.map_err(|_| writer_gone())?
        })
    }

    /// Runs `f` in a read transaction on the blocking pool.
    fn read<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().ctx("begin read")?;
                f(&txn)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("store read task failed: {e}")))?
        })
    }

    /// Overwrites a clip's stored blob, for tests of damaged records.
    #[cfg(test)]
    pub(crate) fn put_raw_clip(&self, group: &str, seq: u64, blob: &[u8]) {
        let txn = self.db.begin_write().expect("begin write");
        {
            let mut clips = txn.open_table(CLIPS).expect("clips");
            clips.insert((group, seq), blob).expect("insert");
        }
        txn.commit().expect("commit");
    }
}

impl Drop for RedbStore {
    /// Stops the writer thread after it has answered everything queued and
    /// made every commit durable, so that the file is closed (and can be
    /// reopened) when this returns.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Writer thread.

fn writer_loop(db: &Database, rx: &mut tokio::sync::mpsc::Receiver<Command>) {
    // Whether a non-durable commit happened since the last durable one.
    let mut unsynced = false;
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.blob_len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(cmd) => {
                    bytes += cmd.blob_len();
                    batch.push(cmd);
                }
                Err(_) => break,
            }
        }
        tracing::trace!(commands = batch.len(), bytes, "store write batch");
        let mut pending = Vec::new();
        for cmd in batch {
            match cmd {
                Command::Exec(job) => {
                    if !pending.is_empty() {
                        commit_batch(db, std::mem::take(&mut pending), &mut unsynced);
                    }
                    if job(db) {
                        unsynced = false;
                    }
                }
                other => pending.push(other),
            }
        }
        if !pending.is_empty() {
            commit_batch(db, pending, &mut unsynced);
        }
    }
    if unsynced {
        // Make the last cursor updates durable before the file is closed.
        if let Ok(txn) = db.begin_write() {
            let _ = txn.commit();
        }
    }
}

/// An answer to send once the batch's commit has returned.
enum Answer {
    Append(
        oneshot::Sender<Result<AppendOutcome, StoreError>>,
        Result<AppendOutcome, StoreError>,
    ),
    Cursor(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
    Follow(
        oneshot::Sender<Result<bool, StoreError>>,
        Result<bool, StoreError>,
    ),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Append(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Cursor(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Follow(reply, result) => {
                let _ = reply.send(result);
            }
        }
    }

    fn fail(self, e: &StoreError) {
        match self {
            Answer::Append(reply, _) => {
                let _ = reply.send(Err(copy_error(e)));
            }
            Answer::Cursor(reply, _) => {
                let _ = reply.send(Err(copy_error(e)));
            }
            Answer::Follow(reply, _) => {
                let _ = reply.send(Err(copy_error(e)));
            }
        }
    }
}

/// Writes a batch of appends and cursor updates in one transaction.
fn commit_batch(db: &Database, cmds: Vec<Command>, unsynced: &mut bool) {
    let durable = cmds
        .iter()
        .any(|c| matches!(c, Command::Append { .. } | Command::Follow { .. }));
    let mut answers = Vec::with_capacity(cmds.len());
    // Commands that were not reached because the batch failed part-way.
    let mut unreached = Vec::new();
    let result = (|| -> Result<(), StoreError> {
        let mut txn = db.begin_write().ctx("begin write")?;
        if !durable {
            txn.set_durability(Durability::None)
                .ctx("setting durability")?;
        }
        {
            let groups = txn.open_table(GROUPS).ctx("opening groups")?;
            let mut seqs = txn.open_table(GROUP_SEQ).ctx("opening group_seq")?;
            let mut clips = txn.open_table(CLIPS).ctx("opening clips")?;
            let mut clip_ids = txn.open_table(CLIP_IDS).ctx("opening clip_ids")?;
            let mut cursors = txn.open_table(CURSORS).ctx("opening cursors")?;
            let mut followers = txn.open_table(FOLLOWERS).ctx("opening followers")?;
            let mut counts = txn
                .open_table(FOLLOWER_COUNT)
                .ctx("opening follower_count")?;
            let mut last_seen = txn.open_table(LAST_SEEN).ctx("opening last_seen")?;
            let now_ms = crate::auth::unix_millis(std::time::SystemTime::now());
            let mut cmds = cmds.into_iter();
            while let Some(cmd) = cmds.next() {
                let fatal = match cmd {
                    Command::Append {
                        group,
                        clip_id,
                        blob,
                        reply,
                    } => {
                        let step = append_one(
                            &groups,
                            &mut seqs,
                            &mut clips,
                            &mut clip_ids,
                            &group,
                            &clip_id,
                            &blob,
                        );
                        let (answer, fatal) = split_step(step);
                        answers.push(Answer::Append(reply, answer));
                        fatal
                    }
                    Command::Cursor {
                        group,
                        user,
                        seq,
                        reply,
                    } => {
                        let step = advance_one(&groups, &mut cursors, &group, &user, seq).and_then(
                            |answer| {
                                if answer.is_ok() {
                                    last_seen
                                        .insert((group.as_str(), user.as_str()), now_ms)
                                        .ctx("writing last_seen")?;
                                }
                                Ok(answer)
                            },
                        );
                        let (answer, fatal) = split_step(step);
                        answers.push(Answer::Cursor(reply, answer));
                        fatal
                    }
                    Command::Follow {
                        group,
                        user,
                        change,
                        reply,
                    } => {
                        let step = channels::follow_one(
                            &groups,
                            &mut followers,
                            &mut counts,
                            &mut cursors,
                            &group,
                            &user,
                            change,
                        );
                        let (answer, fatal) = split_step(step);
                        answers.push(Answer::Follow(reply, answer));
                        fatal
                    }
                    Command::Exec(_) => None,
                };
                if let Some(e) = fatal {
                    unreached.extend(cmds);
                    return Err(e);
                }
            }
        }
        txn.commit().ctx("commit")?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            *unsynced = !durable;
            answers.into_iter().for_each(Answer::send);
        }
        Err(e) => {
            tracing::warn!(error = %e, "store write batch failed");
            answers.into_iter().for_each(|a| a.fail(&e));
            for cmd in unreached {
                match cmd {
                    Command::Append { reply, .. } => {
                        let _ = reply.send(Err(copy_error(&e)));
                    }
                    Command::Cursor { reply, .. } => {
                        let _ = reply.send(Err(copy_error(&e)));
                    }
                    Command::Follow { reply, .. } => {
                        let _ = reply.send(Err(copy_error(&e)));
                    }
                    Command::Exec(_) => {}
                }
            }
        }
    }
}

/// Splits a step's result into this caller's answer and the error that
/// fails the whole batch.
fn split_step<T>(
    step: Result<Result<T, StoreError>, StoreError>,
) -> (Result<T, StoreError>, Option<StoreError>) {
    match step {
        Ok(answer) => (answer, None),
        Err(e) => (Err(copy_error(&e)), Some(e)),
    }
}

/// One append inside the batch's transaction. The outer error fails the
/// whole batch (a storage failure); the inner one is this caller's answer.
fn append_one(
    groups: &Table<'_, &str, &[u8]>,
    seqs: &mut Table<'_, &str, u64>,
    clips: &mut Table<'_, (&str, u64), &[u8]>,
    clip_ids: &mut Table<'_, (&str, &[u8; 16]), u64>,
    group: &str,
    clip_id: &ClipId,
    blob: &[u8],
) -> Result<Result<AppendOutcome, StoreError>, StoreError> {
    if groups.get(group).ctx("reading groups")?.is_none() {
        return Ok(Err(StoreError::NoSuchGroup(group.to_owned())));
    }
    let id = clip_id.as_bytes();
    if let Some(seq) = clip_ids.get((group, id)).ctx("reading clip_ids")? {
        return Ok(Ok(AppendOutcome::Duplicate { seq: seq.value() }));
    }
    let last = seqs
        .get(group)
        .ctx("reading group_seq")?
        .map_or(0, |v| v.value());
    let seq = last + 1;
    clips.insert((group, seq), blob).ctx("writing clips")?;
    clip_ids.insert((group, id), seq).ctx("writing clip_ids")?;
    seqs.insert(group, seq).ctx("writing group_seq")?;
    Ok(Ok(AppendOutcome::Stored { seq }))
}

/// One cursor update inside the batch's transaction (errors as
/// [`append_one`]).
fn advance_one(
    groups: &Table<'_, &str, &[u8]>,
    cursors: &mut Table<'_, (&str, &str), u64>,
    group: &str,
    user: &str,
    seq: u64,
) -> Result<Result<(), StoreError>, StoreError> {
    if groups.get(group).ctx("reading groups")?.is_none() {
        return Ok(Err(StoreError::NoSuchGroup(group.to_owned())));
    }
    let current = cursors
        .get((group, user))
        .ctx("reading cursors")?
        .map_or(0, |v| v.value());
    if seq > current {
        cursors.insert((group, user), seq).ctx("writing cursors")?;
    }
    Ok(Ok(()))
}

// ---------------------------------------------------------------------------
// Encoding.

/// A group's stored attributes (its members live in their own table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupRecord {
    mode: GroupMode,
    max_clip_ms: u32,
    /// Set for a channel (version 2 records).
    channel: Option<super::ChannelInfo>,
}

fn encode_group(record: GroupRecord) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16);
    buf.put_u8(match record.channel {
        None => GROUP_RECORD_V1,
        Some(_) => GROUP_RECORD_V2,
    });
    buf.put_u8(record.mode as u8);
    put_varint(&mut buf, u64::from(record.max_clip_ms));
    if let Some(c) = record.channel {
        buf.put_u8(1);
        buf.put_u8(u8::from(c.public));
        put_varint(&mut buf, u64::from(c.limits.clips_per_day));
        put_varint(&mut buf, u64::from(c.limits.backlog_clips));
        put_varint(&mut buf, u64::from(c.limits.backlog_days));
    }
    buf
}

fn decode_group(group: &str, mut raw: &[u8]) -> Result<GroupRecord, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "groups",
        detail: format!("group {group}: {detail}"),
    };
    let de = |e: DecodeError| corrupt(e.to_string());
    let version = get_u8(&mut raw).map_err(de)?;
    if version != GROUP_RECORD_V1 && version != GROUP_RECORD_V2 {
        return Err(corrupt(format!("unknown record version {version}")));
    }
    let mode_byte = get_u8(&mut raw).map_err(de)?;
    let mode =
        GroupMode::from_u8(mode_byte).ok_or_else(|| corrupt(format!("bad mode {mode_byte}")))?;
    let max_clip_ms = get_varint_u32(&mut raw, "max_clip_ms").map_err(de)?;
    let mut channel = None;
    if version == GROUP_RECORD_V2 {
        let kind = get_u8(&mut raw).map_err(de)?;
        let public = get_u8(&mut raw).map_err(de)? == 1;
        let clips_per_day = get_varint_u32(&mut raw, "clips_per_day").map_err(de)?;
        let backlog_clips = get_varint_u32(&mut raw, "backlog_clips").map_err(de)?;
        let backlog_days = get_varint_u32(&mut raw, "backlog_days").map_err(de)?;
        if kind == 1 {
            channel = Some(super::ChannelInfo {
                public,
                limits: ptt_protocol::ChannelLimits {
                    clips_per_day,
                    max_clip_ms,
                    backlog_clips,
                    backlog_days,
                },
            });
        }
    }
    if !raw.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", raw.len())));
    }
    Ok(GroupRecord {
        mode,
        max_clip_ms,
        channel,
    })
}

fn format_from_u8(v: u8) -> Option<ClipFormat> {
    match v {
        1 => Some(ClipFormat::Opus),
        2 => Some(ClipFormat::Wav),
        _ => None,
    }
}

/// Encodes a clip's blob (everything but the group and the seq, which are
/// the key).
pub(crate) fn encode_clip(clip: &NewClip) -> Vec<u8> {
    let meta = &clip.meta;
    let frames_len: usize = clip.frames.iter().map(|f| f.len() + 8).sum();
    let mut buf =
        BytesMut::with_capacity(64 + meta.talker.len() + clip.waveform.len() + frames_len);
    buf.put_u8(CLIP_BLOB_V1);
    buf.put_slice(meta.clip_id.as_bytes());
    put_bytes(&mut buf, meta.talker.as_bytes());
    buf.put_u8(meta.format as u8);
    put_varint(&mut buf, u64::from(meta.sample_rate));
    buf.put_u8(meta.channels);
    buf.put_u8(meta.frame_ms);
    buf.put_u64(meta.created_ms);
    buf.put_u8(meta.flags);
    put_bytes(&mut buf, &clip.waveform);
    put_varint(&mut buf, clip.frames.len() as u64);
    for frame in &clip.frames {
        put_bytes(&mut buf, frame);
    }
    buf.into()
}

fn clip_corrupt(group: &str, seq: u64, detail: impl Display) -> StoreError {
    StoreError::Corrupt {
        table: "clips",
        detail: format!("clip {group}/{seq}: {detail}"),
    }
}

/// Decodes the metadata at the start of a clip blob, advancing `raw` past
/// it. Borrows, so that retention can read a clip's age without copying it.
fn decode_meta(group: &str, seq: u64, raw: &mut &[u8]) -> Result<ClipMeta, StoreError> {
    let de = |e: DecodeError| clip_corrupt(group, seq, e);
    let version = get_u8(raw).map_err(de)?;
    if version != CLIP_BLOB_V1 {
        return Err(clip_corrupt(
            group,
            seq,
            format!("unknown blob version {version}"),
        ));
    }
    let clip_id = ClipId::from_bytes(get_array::<16>(raw).map_err(de)?);
    let talker_len = get_varint(raw).map_err(de)?;
    if talker_len > raw.len() as u64 {
        return Err(de(DecodeError::Short));
    }
    let (talker, rest) = raw.split_at(talker_len as usize);
    *raw = rest;
    let talker = std::str::from_utf8(talker)
        .map_err(|_| clip_corrupt(group, seq, "talker is not UTF-8"))?
        .to_owned();
    let format_byte = get_u8(raw).map_err(de)?;
    let format = format_from_u8(format_byte)
        .ok_or_else(|| clip_corrupt(group, seq, format!("bad format {format_byte}")))?;
    let sample_rate = get_varint_u32(raw, "sample_rate").map_err(de)?;
    let channels = get_u8(raw).map_err(de)?;
    let frame_ms = get_u8(raw).map_err(de)?;
    let created_ms = u64::from_be_bytes(get_array::<8>(raw).map_err(de)?);
    let flags = get_u8(raw).map_err(de)?;
    Ok(ClipMeta {
        group: group.to_owned(),
        clip_id,
        talker,
        format,
        sample_rate,
        channels,
        frame_ms,
        created_ms,
        flags,
    })
}

/// Decodes a whole clip: one copy of the blob, then zero-copy slices.
pub(crate) fn decode_clip(group: &str, seq: u64, raw: &[u8]) -> Result<StoredClip, StoreError> {
    let mut header = raw;
    let meta = decode_meta(group, seq, &mut header)?;
    let consumed = raw.len() - header.len();
    let mut buf = Bytes::copy_from_slice(raw);
    buf.advance(consumed);
    let de = |e: DecodeError| clip_corrupt(group, seq, e);
    let waveform = get_bytes(&mut buf, usize::MAX, "waveform").map_err(de)?;
    let count = get_count(&mut buf, usize::MAX, 1, "frames").map_err(de)?;
    let mut frames = Vec::with_capacity(count);
    for _ in 0..count {
        frames.push(get_bytes(&mut buf, usize::MAX, "frame").map_err(de)?);
    }
    if buf.has_remaining() {
        return Err(clip_corrupt(
            group,
            seq,
            format!("{} trailing bytes", buf.remaining()),
        ));
    }
    Ok(StoredClip {
        seq,
        meta,
        frames,
        waveform,
    })
}

/// Decodes `raw` as a stored clip record (the `clips` table's value for
/// `group`/`seq`), as the store does when it reads one from disk. Public
/// for the fuzz target `store_record` and the property tests: a damaged
/// record must be a [`StoreError::Corrupt`], never a panic.
pub fn decode_clip_record(group: &str, seq: u64, raw: &[u8]) -> Result<StoredClip, StoreError> {
    decode_clip(group, seq, raw)
}

/// Encodes a clip record as the store writes it (the inverse of
/// [`decode_clip_record`]).
pub fn encode_clip_record(clip: &NewClip) -> Vec<u8> {
    encode_clip(clip)
}

/// Decodes `raw` as a stored group record (mode, longest clip in ms), as
/// the store does when it reads one; see [`decode_clip_record`].
pub fn decode_group_record(group: &str, raw: &[u8]) -> Result<(GroupMode, u32), StoreError> {
    decode_group(group, raw).map(|r| (r.mode, r.max_clip_ms))
}

/// Encodes a group record as the store writes it (the inverse of
/// [`decode_group_record`]).
pub fn encode_group_record(mode: GroupMode, max_clip_ms: u32) -> Vec<u8> {
    encode_group(GroupRecord {
        mode,
        max_clip_ms,
        channel: None,
    })
}

// ---------------------------------------------------------------------------
// Reads.

/// The group's clips after `after`, at most `limit`, each turned into a
/// `T` by `f(group, seq, record)`.
fn scan_clips<T>(
    txn: &ReadTransaction,
    group: &str,
    after: u64,
    limit: usize,
    f: impl Fn(&str, u64, &[u8]) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    require_group(txn, group)?;
    let clips = txn.open_table(CLIPS).ctx("opening clips")?;
    let mut out = Vec::new();
    if limit == 0 || after == u64::MAX {
        return Ok(out);
    }
    for entry in clips
        .range((group, after + 1)..=(group, u64::MAX))
        .ctx("reading clips")?
        .take(limit)
    {
        let (key, value) = entry.ctx("reading clips")?;
        out.push(f(group, key.value().1, value.value())?);
    }
    Ok(out)
}

fn require_group(txn: &ReadTransaction, group: &str) -> Result<GroupRecord, StoreError> {
    let groups = txn.open_table(GROUPS).ctx("opening groups")?;
    let raw = groups
        .get(group)
        .ctx("reading groups")?
        .ok_or_else(|| StoreError::NoSuchGroup(group.to_owned()))?;
    decode_group(group, raw.value())
}

fn read_group(txn: &ReadTransaction, group: &str) -> Result<Option<GroupInfo>, StoreError> {
    let groups = txn.open_table(GROUPS).ctx("opening groups")?;
    let Some(raw) = groups.get(group).ctx("reading groups")? else {
        return Ok(None);
    };
    let record = decode_group(group, raw.value())?;
    let members = txn.open_multimap_table(MEMBERS).ctx("opening members")?;
    let roles = txn.open_table(ROLES).ctx("opening roles")?;
    let mut info = group_info(&members, &roles, group, record)?;
    let budgets = txn.open_table(LIVE_BUDGETS).ctx("opening live_budgets")?;
    info.live_budget_ms = live_budget(&budgets, group)?;
    Ok(Some(info))
}

fn live_budget(
    budgets: &impl ReadableTable<&'static str, u32>,
    group: &str,
) -> Result<Option<u32>, StoreError> {
    Ok(budgets
        .get(group)
        .ctx("reading live_budgets")?
        .map(|v| v.value()))
}

fn group_info(
    members: &impl ReadableMultimapTable<&'static str, &'static str>,
    roles: &impl ReadableTable<(&'static str, &'static str), u8>,
    group: &str,
    record: GroupRecord,
) -> Result<GroupInfo, StoreError> {
    let mut set = std::collections::BTreeSet::new();
    for user in members.get(group).ctx("reading members")? {
        set.insert(user.ctx("reading members")?.value().to_owned());
    }
    let mut info = GroupInfo::plain(group, record.mode, record.max_clip_ms, set);
    info.roles = channels::read_roles(roles, group)?;
    info.channel = record.channel;
    Ok(info)
}

fn last_seq(txn: &ReadTransaction, group: &str) -> Result<u64, StoreError> {
    let seqs = txn.open_table(GROUP_SEQ).ctx("opening group_seq")?;
    Ok(seqs
        .get(group)
        .ctx("reading group_seq")?
        .map_or(0, |v| v.value()))
}

// ---------------------------------------------------------------------------
// Retention.

/// Deletes one group's expired clips (oldest first, stopping at the first
/// kept one) and the dedup entries that have outlived their grace.
fn retain_group(
    txn: &WriteTransaction,
    group: &str,
    policy: RetentionPolicy,
    now_ms: u64,
) -> Result<u64, StoreError> {
    let last = {
        let seqs = txn.open_table(GROUP_SEQ).ctx("opening group_seq")?;
        seqs.get(group)
            .ctx("reading group_seq")?
            .map_or(0, |v| v.value())
    };
    // Seqs below this are beyond the newest `max_clips_per_group`.
    let keep_from = match policy.max_clips_per_group {
        0 => 0,
        cap => (last + 1).saturating_sub(cap),
    };
    let cutoff = match policy.max_age_ms {
        0 => None,
        age => Some(now_ms.saturating_sub(age)),
    };
    let mut clips = txn.open_table(CLIPS).ctx("opening clips")?;
    let mut expired = txn.open_table(EXPIRED).ctx("opening expired_clip_ids")?;
    let mut deleted = 0;
    loop {
        let (seq, meta) = {
            let mut range = clips
                .range((group, 0)..=(group, u64::MAX))
                .ctx("reading clips")?;
            let Some(entry) = range.next() else { break };
            let (key, value) = entry.ctx("reading clips")?;
            let seq = key.value().1;
            let mut raw = value.value();
            (seq, decode_meta(group, seq, &mut raw))
        };
        let too_many = seq < keep_from;
        let meta = match meta {
            Ok(meta) => Some(meta),
            Err(e) if too_many => {
                // Past the cap it goes whatever it holds; its dedup entry
                // (unknown now) stays.
                tracing::warn!(error = %e, "retention: deleting a damaged clip");
                None
            }
            Err(e) => {
                // Its age is unknown: keep it (and the clips after it), and
                // let the other groups' retention go on.
                tracing::error!(error = %e, "retention: damaged clip stops age retention");
                break;
            }
        };
        let too_old = meta
            .as_ref()
            .is_some_and(|m| cutoff.is_some_and(|cutoff| m.created_ms < cutoff));
        if !too_many && !too_old {
            break;
        }
        clips.remove((group, seq)).ctx("deleting clips")?;
        if let Some(meta) = meta {
            expired
                .insert((group, seq), (meta.clip_id.as_bytes(), now_ms))
                .ctx("writing expired_clip_ids")?;
        }
        deleted += 1;
    }

    // Drop the dedup entries whose clip was deleted long enough ago.
    let grace = policy.max_age_ms.max(MIN_DEDUP_GRACE_MS);
    prune_tombstones(txn, group, now_ms.saturating_sub(grace))?;
    let mut clip_ids = txn.open_table(CLIP_IDS).ctx("opening clip_ids")?;
    loop {
        let (seq, clip_id) = {
            let mut range = expired
                .range((group, 0)..=(group, u64::MAX))
                .ctx("reading expired_clip_ids")?;
            let Some(entry) = range.next() else { break };
            let (key, value) = entry.ctx("reading expired_clip_ids")?;
            let (clip_id, deleted_ms) = value.value();
            if deleted_ms.saturating_add(grace) > now_ms {
                break;
            }
            (key.value().1, *clip_id)
        };
        expired
            .remove((group, seq))
            .ctx("deleting expired_clip_ids")?;
        clip_ids
            .remove((group, &clip_id))
            .ctx("deleting clip_ids")?;
    }
    Ok(deleted)
}

/// Drops `group`'s tombstones of clips deleted before `before_ms`: a member
/// away for longer than that has its whole history resent anyway or
/// retention took the clip from its peers too.
fn prune_tombstones(txn: &WriteTransaction, group: &str, before_ms: u64) -> Result<(), StoreError> {
    let mut tombstones = txn.open_table(TOMBSTONES).ctx("opening tombstones")?;
    let mut old = Vec::new();
    for entry in tombstones
        .range((group, 0)..=(group, u64::MAX))
        .ctx("reading tombstones")?
    {
        let (key, value) = entry.ctx("reading tombstones")?;
        if value.value().1 < before_ms {
            old.push(key.value().1);
        }
    }
    for seq in old {
        tombstones.remove((group, seq)).ctx("deleting tombstones")?;
    }
    Ok(())
}

/// A clip's summary from its blob: the metadata, the frame count and the
/// bytes of its frames, read without copying the frames.
fn summarize(group: &str, seq: u64, raw: &[u8]) -> Result<ClipSummary, StoreError> {
    let mut rest = raw;
    let meta = decode_meta(group, seq, &mut rest)?;
    let de = |e: DecodeError| clip_corrupt(group, seq, e);
    let waveform_len = get_varint(&mut rest).map_err(de)?;
    if waveform_len > rest.len() as u64 {
        return Err(de(DecodeError::Short));
    }
    rest = &rest[waveform_len as usize..];
    let count = get_varint(&mut rest).map_err(de)?;
    let mut bytes = 0u64;
    for _ in 0..count {
        let len = get_varint(&mut rest).map_err(de)?;
        if len > rest.len() as u64 {
            return Err(de(DecodeError::Short));
        }
        rest = &rest[len as usize..];
        bytes += len;
    }
    Ok(ClipSummary {
        seq,
        clip_id: meta.clip_id,
        talker: meta.talker,
        duration_ms: count * u64::from(meta.frame_ms),
        bytes,
        created_ms: meta.created_ms,
    })
}

impl RedbStore {
    /// Records that `user` was seen in `group` now (at a join) without
    /// moving its cursor: a cursor write of 0, batched like the others.
    fn touch(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Cursor {
            group: group.to_owned(),
            user: user.to_owned(),
            seq: 0,
            reply,
        };
        Box::pin(async move {
            self.send(cmd).await?;
            rx.await.map_err(|_| writer_gone())?
        })
    }
}

// ---------------------------------------------------------------------------
// The trait.

impl RedbStore {
    /// Adds (`add`) or removes a member of an existing group.
    fn change_member(&self, group: &str, user: &str, add: bool) -> StoreFuture<'_, ()> {
        let name = group;
        let (group, user) = (group.to_owned(), user.to_owned());
        let change = self.write(move |txn| {
            let groups = txn.open_table(GROUPS).ctx("opening groups")?;
            if groups.get(group.as_str()).ctx("reading groups")?.is_none() {
                return Err(StoreError::NoSuchGroup(group));
            }
            let mut members = txn.open_multimap_table(MEMBERS).ctx("opening members")?;
            if add {
                members.insert(group.as_str(), user.as_str())
            } else {
                members.remove(group.as_str(), user.as_str())
            }
            .ctx("writing members")?;
            if !add {
                let mut roles = txn.open_table(ROLES).ctx("opening roles")?;
                roles
                    .remove((group.as_str(), user.as_str()))
                    .ctx("writing roles")?;
            }
            Ok(())
        });
        self.changing(name, change)
    }
}

impl ClipStore for RedbStore {
    fn create_group(&self, group: &str, mode: GroupMode, max_clip_ms: u32) -> StoreFuture<'_, ()> {
        let name = group;
        let group = group.to_owned();
        let change = self.write(move |txn| {
            let mut groups = txn.open_table(GROUPS).ctx("opening groups")?;
            if groups.get(group.as_str()).ctx("reading groups")?.is_some() {
                return Err(StoreError::GroupExists(group));
            }
            let record = encode_group(GroupRecord {
                mode,
                max_clip_ms,
                channel: None,
            });
            groups
                .insert(group.as_str(), record.as_slice())
                .ctx("writing groups")?;
            Ok(())
        });
        self.changing(name, change)
    }

    fn set_mode(&self, group: &str, mode: GroupMode) -> StoreFuture<'_, ()> {
        let name = group;
        let group = group.to_owned();
        let change = self.write(move |txn| {
            let mut groups = txn.open_table(GROUPS).ctx("opening groups")?;
            let mut record = {
                let raw = groups
                    .get(group.as_str())
                    .ctx("reading groups")?
                    .ok_or_else(|| StoreError::NoSuchGroup(group.clone()))?;
                decode_group(&group, raw.value())?
            };
            record.mode = mode;
            groups
                .insert(group.as_str(), encode_group(record).as_slice())
                .ctx("writing groups")?;
            Ok(())
        });
        self.changing(name, change)
    }

    fn add_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        self.change_member(group, user, true)
    }

    fn set_live_budget(&self, group: &str, budget_ms: Option<u32>) -> StoreFuture<'_, ()> {
        let name = group;
        let group = group.to_owned();
        let change = self.write(move |txn| {
            let groups = txn.open_table(GROUPS).ctx("opening groups")?;
            if groups.get(group.as_str()).ctx("reading groups")?.is_none() {
                return Err(StoreError::NoSuchGroup(group));
            }
            let mut budgets = txn.open_table(LIVE_BUDGETS).ctx("opening live_budgets")?;
            match budget_ms {
                Some(ms) => budgets.insert(group.as_str(), ms).map(drop),
                None => budgets.remove(group.as_str()).map(drop),
            }
            .ctx("writing live_budgets")?;
            Ok(())
        });
        self.changing(name, change)
    }

    fn remove_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        self.change_member(group, user, false)
    }

    fn group(&self, group: &str) -> StoreFuture<'_, Option<GroupInfo>> {
        let group = group.to_owned();
        self.read(move |txn| read_group(txn, &group))
    }

    fn groups(&self) -> StoreFuture<'_, Vec<GroupInfo>> {
        self.read(|txn| {
            let groups = txn.open_table(GROUPS).ctx("opening groups")?;
            let members = txn.open_multimap_table(MEMBERS).ctx("opening members")?;
            let roles = txn.open_table(ROLES).ctx("opening roles")?;
            let budgets = txn.open_table(LIVE_BUDGETS).ctx("opening live_budgets")?;
            let mut out = Vec::new();
            for entry in groups.iter().ctx("reading groups")? {
                let (key, value) = entry.ctx("reading groups")?;
                let id = key.value();
                let record = decode_group(id, value.value())?;
                let mut info = group_info(&members, &roles, id, record)?;
                info.live_budget_ms = live_budget(&budgets, id)?;
                out.push(info);
            }
            Ok(out)
        })
    }

    fn append_clip(&self, clip: NewClip) -> StoreFuture<'_, AppendOutcome> {
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let blob = encode_clip(&clip);
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Append {
            group: clip.meta.group,
            clip_id: clip.meta.clip_id,
            blob,
            reply,
        };
        Box::pin(async move {
            self.send(cmd).await?;
            rx.await.map_err(|_| writer_gone())?
        })
    }

    fn clip_seq(&self, group: &str, clip_id: ClipId) -> StoreFuture<'_, Option<u64>> {
        let group = group.to_owned();
        self.read(move |txn| {
            require_group(txn, &group)?;
            let clip_ids = txn.open_table(CLIP_IDS).ctx("opening clip_ids")?;
            Ok(clip_ids
                .get((group.as_str(), clip_id.as_bytes()))
                .ctx("reading clip_ids")?
                .map(|v| v.value()))
        })
    }

    fn clips_after(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredClip>> {
        let group = group.to_owned();
        self.read(move |txn| scan_clips(txn, &group, after, limit, decode_clip))
    }

    fn recent_clips(&self, group: &str, count: usize) -> StoreFuture<'_, Vec<StoredClip>> {
        let group = group.to_owned();
        self.read(move |txn| {
            require_group(txn, &group)?;
            let clips = txn.open_table(CLIPS).ctx("opening clips")?;
            let g = group.as_str();
            let mut out = Vec::new();
            for entry in clips
                .range((g, 0)..=(g, u64::MAX))
                .ctx("reading clips")?
                .rev()
                .take(count)
            {
                let (key, value) = entry.ctx("reading clips")?;
                out.push(decode_clip(g, key.value().1, value.value())?);
            }
            out.reverse();
            Ok(out)
        })
    }

    fn clip_meta(&self, group: &str, seq: u64) -> StoreFuture<'_, Option<ClipMeta>> {
        let group = group.to_owned();
        self.read(move |txn| {
            require_group(txn, &group)?;
            let clips = txn.open_table(CLIPS).ctx("opening clips")?;
            let Some(raw) = clips.get((group.as_str(), seq)).ctx("reading clips")? else {
                return Ok(None);
            };
            let mut raw = raw.value();
            decode_meta(&group, seq, &mut raw).map(Some)
        })
    }

    fn seq_range(&self, group: &str) -> StoreFuture<'_, SeqRange> {
        let group = group.to_owned();
        self.read(move |txn| {
            require_group(txn, &group)?;
            let last = last_seq(txn, &group)?;
            let clips = txn.open_table(CLIPS).ctx("opening clips")?;
            let g = group.as_str();
            let first = match clips
                .range((g, 0)..=(g, u64::MAX))
                .ctx("reading clips")?
                .next()
            {
                Some(entry) => entry.ctx("reading clips")?.0.value().1,
                None => last + 1,
            };
            Ok(SeqRange { first, last })
        })
    }

    fn cursor(&self, group: &str, user: &str) -> StoreFuture<'_, u64> {
        let (group, user) = (group.to_owned(), user.to_owned());
        self.read(move |txn| {
            require_group(txn, &group)?;
            let cursors = txn.open_table(CURSORS).ctx("opening cursors")?;
            Ok(cursors
                .get((group.as_str(), user.as_str()))
                .ctx("reading cursors")?
                .map_or(0, |v| v.value()))
        })
    }

    fn advance_cursor(&self, group: &str, user: &str, seq: u64) -> StoreFuture<'_, ()> {
        self.cursor_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Cursor {
            group: group.to_owned(),
            user: user.to_owned(),
            seq,
            reply,
        };
        Box::pin(async move {
            self.send(cmd).await?;
            rx.await.map_err(|_| writer_gone())?
        })
    }

    fn apply_retention(&self, policy: RetentionPolicy, now_ms: u64) -> StoreFuture<'_, u64> {
        self.write(move |txn| {
            let names = {
                let groups = txn.open_table(GROUPS).ctx("opening groups")?;
                let mut names = Vec::new();
                for entry in groups.iter().ctx("reading groups")? {
                    names.push(entry.ctx("reading groups")?.0.value().to_owned());
                }
                names
            };
            let mut deleted = 0;
            for group in &names {
                deleted += retain_group(txn, group, policy, now_ms)?;
            }
            Ok(deleted)
        })
    }

    fn clip_summaries(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClipSummary>> {
        let group = group.to_owned();
        self.read(move |txn| scan_clips(txn, &group, after, limit, summarize))
    }

    fn delete_clip(&self, group: &str, seq: u64, now_ms: u64) -> StoreFuture<'_, Option<ClipId>> {
        let group = group.to_owned();
        self.write(move |txn| {
            {
                let groups = txn.open_table(GROUPS).ctx("opening groups")?;
                if groups.get(group.as_str()).ctx("reading groups")?.is_none() {
                    return Err(StoreError::NoSuchGroup(group));
                }
            }
            let g = group.as_str();
            let mut clips = txn.open_table(CLIPS).ctx("opening clips")?;
            let Some(raw) = clips.remove((g, seq)).ctx("deleting clips")? else {
                return Ok(None);
            };
            let mut blob = raw.value();
            // A damaged clip is deleted all the same; its id is unknown.
            let clip_id = decode_meta(g, seq, &mut blob)
                .map(|m| m.clip_id)
                .unwrap_or_default();
            drop(raw);
            // The dedup entry ages out like a clip retention deleted.
            txn.open_table(EXPIRED)
                .ctx("opening expired_clip_ids")?
                .insert((g, seq), (clip_id.as_bytes(), now_ms))
                .ctx("writing expired_clip_ids")?;
            txn.open_table(TOMBSTONES)
                .ctx("opening tombstones")?
                .insert((g, seq), (clip_id.as_bytes(), now_ms))
                .ctx("writing tombstones")?;
            Ok(Some(clip_id))
        })
    }

    fn tombstones(&self, group: &str, since_ms: u64) -> StoreFuture<'_, Vec<(u64, ClipId)>> {
        let group = group.to_owned();
        self.read(move |txn| {
            let tombstones = txn.open_table(TOMBSTONES).ctx("opening tombstones")?;
            let g = group.as_str();
            let mut out = Vec::new();
            for entry in tombstones
                .range((g, 0)..=(g, u64::MAX))
                .ctx("reading tombstones")?
            {
                let (key, value) = entry.ctx("reading tombstones")?;
                let (clip_id, deleted_ms) = value.value();
                if deleted_ms >= since_ms {
                    out.push((key.value().1, ClipId::from_bytes(*clip_id)));
                }
            }
            Ok(out)
        })
    }

    fn member_status(&self, group: &str) -> StoreFuture<'_, Vec<MemberState>> {
        let group = group.to_owned();
        self.read(move |txn| {
            let info = read_group(txn, &group)?.ok_or(StoreError::NoSuchGroup(group.clone()))?;
            let cursors = txn.open_table(CURSORS).ctx("opening cursors")?;
            let seen = txn.open_table(LAST_SEEN).ctx("opening last_seen")?;
            let g = group.as_str();
            let mut out = Vec::with_capacity(info.members.len());
            for user in info.members {
                let key = (g, user.as_str());
                let cursor = cursors
                    .get(key)
                    .ctx("reading cursors")?
                    .map_or(0, |v| v.value());
                let last_seen_ms = seen
                    .get(key)
                    .ctx("reading last_seen")?
                    .map_or(0, |v| v.value());
                out.push(MemberState {
                    user,
                    cursor,
                    last_seen_ms,
                });
            }
            Ok(out)
        })
    }

    fn last_seen(&self, group: &str, user: &str) -> StoreFuture<'_, u64> {
        let (group, user) = (group.to_owned(), user.to_owned());
        self.read(move |txn| {
            let seen = txn.open_table(LAST_SEEN).ctx("opening last_seen")?;
            Ok(seen
                .get((group.as_str(), user.as_str()))
                .ctx("reading last_seen")?
                .map_or(0, |v| v.value()))
        })
    }

    fn touch_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        self.touch(group, user)
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        // An empty durable commit also makes every earlier non-durable one
        // durable.
        self.write(|_| Ok(()))
    }

    fn create_channel(
        &self,
        channel: &str,
        owner: &str,
        public: bool,
        limits: ptt_protocol::ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        self.create_channel_impl(channel, owner, public, limits)
    }

    fn set_role(&self, group: &str, user: &str, role: ptt_protocol::Role) -> StoreFuture<'_, ()> {
        self.set_role_impl(group, user, role)
    }

    fn set_channel_limits(
        &self,
        channel: &str,
        limits: ptt_protocol::ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        self.set_channel_limits_impl(channel, limits)
    }

    fn change_follower(
        &self,
        channel: &str,
        user: &str,
        change: super::FollowChange,
    ) -> StoreFuture<'_, bool> {
        self.change_follower_impl(channel, user, change)
    }

    fn follower(&self, channel: &str, user: &str) -> StoreFuture<'_, Option<super::Follower>> {
        self.follower_impl(channel, user)
    }

    fn follower_count(&self, channel: &str) -> StoreFuture<'_, u64> {
        self.follower_count_impl(channel)
    }

    fn public_channels(&self, prefix: &str, limit: usize) -> StoreFuture<'_, Vec<String>> {
        self.public_channels_impl(prefix, limit)
    }

    fn create_invite(&self, channel: &str, code: &str) -> StoreFuture<'_, ()> {
        self.create_invite_impl(channel, code)
    }

    fn revoke_invite(&self, channel: &str, code: &str) -> StoreFuture<'_, bool> {
        self.revoke_invite_impl(channel, code)
    }

    fn invite(&self, code: &str) -> StoreFuture<'_, Option<String>> {
        self.invite_impl(code)
    }

    fn add_channel_counts(
        &self,
        channel: &str,
        delivered: u64,
        played: u64,
    ) -> StoreFuture<'_, ()> {
        self.add_channel_counts_impl(channel, delivered, played)
    }

    fn channel_counts(&self, channel: &str) -> StoreFuture<'_, (u64, u64)> {
        self.channel_counts_impl(channel)
    }

    fn counters(&self) -> StoreCounters {
        use std::sync::atomic::Ordering::Relaxed;
        StoreCounters {
            appends: self.appends.load(Relaxed),
            cursor_writes: self.cursor_writes.load(Relaxed),
            follower_writes: self.follower_writes.load(Relaxed),
            count_writes: self.count_writes.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(group: &str, id: u8, created_ms: u64) -> ClipMeta {
        ClipMeta {
            group: group.to_owned(),
            clip_id: ClipId::from_bytes([id; 16]),
            talker: "alice".to_owned(),
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms,
            flags: 0,
        }
    }

    fn clip(group: &str, id: u8, created_ms: u64) -> NewClip {
        NewClip {
            meta: meta(group, id, created_ms),
            frames: (0..5u8)
                .map(|i| Bytes::from(vec![id.wrapping_add(i); 10 + usize::from(i) * 7]))
                .collect(),
            waveform: Bytes::from_static(&[1, 2, 3, 250, 0]),
        }
    }

    async fn store_with_group(dir: &Path) -> RedbStore {
        let store = RedbStore::open(dir).unwrap();
        store
            .create_group("g", GroupMode::Walkie, 60_000)
            .await
            .unwrap();
        store
    }

    #[test]
    fn blob_round_trips_and_shares_one_buffer() {
        let c = clip("g", 7, 123_456_789_012);
        let blob = encode_clip(&c);
        let stored = decode_clip("g", 3, &blob).unwrap();
        assert_eq!(stored.seq, 3);
        assert_eq!(stored.meta, c.meta);
        assert_eq!(stored.frames, c.frames);
        assert_eq!(stored.waveform, c.waveform);
        // Every frame points into the same allocation, in order.
        let base = stored.waveform.as_ptr() as usize;
        for pair in stored.frames.windows(2) {
            assert!(pair[0].as_ptr() as usize > base);
            assert_eq!(
                pair[0].as_ptr() as usize + pair[0].len() + 1,
                pair[1].as_ptr() as usize
            );
        }
    }

    #[test]
    fn every_truncation_of_a_blob_is_corrupt_not_a_panic() {
        let blob = encode_clip(&clip("g", 7, 1));
        for len in 0..blob.len() {
            assert!(
                matches!(
                    decode_clip("g", 1, &blob[..len]),
                    Err(StoreError::Corrupt { table: "clips", .. })
                ),
                "{len}"
            );
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(decode_clip("g", 1, &long).is_err());
        assert!(decode_group("g", &[1, 9, 0]).is_err());
        assert!(decode_group("g", &[]).is_err());
        assert!(decode_group("g", &[2, 1, 0]).is_err());
    }

    #[tokio::test]
    async fn groups_and_members() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(store.groups().await.unwrap().is_empty());
        store
            .create_group("zulu", GroupMode::Notes, 30_000)
            .await
            .unwrap();
        store
            .create_group("alpha", GroupMode::Walkie, 60_000)
            .await
            .unwrap();
        assert!(matches!(
            store.create_group("alpha", GroupMode::Notes, 1).await,
            Err(StoreError::GroupExists(g)) if g == "alpha"
        ));
        store.add_member("alpha", "bob").await.unwrap();
        store.add_member("alpha", "ann").await.unwrap();
        store.add_member("alpha", "bob").await.unwrap();
        store.add_member("zulu", "cy").await.unwrap();
        store.remove_member("zulu", "cy").await.unwrap();
        store.remove_member("zulu", "nobody").await.unwrap();
        store.set_mode("alpha", GroupMode::Notes).await.unwrap();

        let groups = store.groups().await.unwrap();
        let ids: Vec<_> = groups.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, ["alpha", "zulu"]);
        assert_eq!(groups[0].mode, GroupMode::Notes);
        assert_eq!(groups[0].max_clip_ms, 60_000);
        assert_eq!(groups[0].members.iter().collect::<Vec<_>>(), ["ann", "bob"]);
        assert!(groups[1].members.is_empty());
        assert_eq!(
            store.group("alpha").await.unwrap().as_ref(),
            Some(&groups[0])
        );
        assert_eq!(store.group("nope").await.unwrap(), None);

        for result in [
            store.add_member("nope", "x").await,
            store.remove_member("nope", "x").await,
            store.set_mode("nope", GroupMode::Walkie).await,
            store.advance_cursor("nope", "x", 1).await,
        ] {
            assert!(matches!(result, Err(StoreError::NoSuchGroup(g)) if g == "nope"));
        }
        assert!(matches!(
            store.append_clip(clip("nope", 1, 0)).await,
            Err(StoreError::NoSuchGroup(_))
        ));
        assert!(matches!(
            store.seq_range("nope").await,
            Err(StoreError::NoSuchGroup(_))
        ));
        assert!(matches!(
            store.clips_after("nope", 0, 10).await,
            Err(StoreError::NoSuchGroup(_))
        ));
        assert!(matches!(
            store.cursor("nope", "x").await,
            Err(StoreError::NoSuchGroup(_))
        ));
    }

    #[tokio::test]
    async fn append_assigns_seqs_and_dedups() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        store.create_group("h", GroupMode::Notes, 1).await.unwrap();
        assert_eq!(
            store.seq_range("g").await.unwrap(),
            SeqRange { first: 1, last: 0 }
        );
        for (i, id) in [1u8, 2, 3].into_iter().enumerate() {
            assert_eq!(
                store.append_clip(clip("g", id, 10)).await.unwrap(),
                AppendOutcome::Stored { seq: i as u64 + 1 }
            );
        }
        // Same clip id in another group is a different clip.
        assert_eq!(
            store.append_clip(clip("h", 2, 10)).await.unwrap(),
            AppendOutcome::Stored { seq: 1 }
        );
        // A retry (even with different content) is a duplicate.
        let mut retry = clip("g", 2, 99);
        retry.frames.clear();
        assert_eq!(
            store.append_clip(retry).await.unwrap(),
            AppendOutcome::Duplicate { seq: 2 }
        );
        assert_eq!(
            store.seq_range("g").await.unwrap(),
            SeqRange { first: 1, last: 3 }
        );
        let all = store.clips_after("g", 0, 100).await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].meta, meta("g", 2, 10));
        assert_eq!(all[1].frames, clip("g", 2, 10).frames);
    }

    #[tokio::test]
    async fn queued_appends_dedup_and_isolate_failures() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        // Every future sends its command when created, so the writer
        // usually finds them all queued and writes them in one transaction
        // (the outcome is the same if it does not).
        let futs = vec![
            store.append_clip(clip("g", 1, 0)),
            store.append_clip(clip("nope", 2, 0)),
            store.append_clip(clip("g", 1, 0)),
            store.append_clip(clip("g", 3, 0)),
        ];
        let cursor = store.advance_cursor("g", "ann", 2);
        let results = futures_join(futs.into_iter()).await;
        cursor.await.unwrap();
        assert_eq!(
            results[0].as_ref().unwrap(),
            &AppendOutcome::Stored { seq: 1 }
        );
        assert!(matches!(&results[1], Err(StoreError::NoSuchGroup(g)) if g == "nope"));
        assert_eq!(
            results[2].as_ref().unwrap(),
            &AppendOutcome::Duplicate { seq: 1 }
        );
        assert_eq!(
            results[3].as_ref().unwrap(),
            &AppendOutcome::Stored { seq: 2 }
        );
        assert_eq!(store.cursor("g", "ann").await.unwrap(), 2);
        assert_eq!(
            store
                .clip_seq("g", ClipId::from_bytes([3; 16]))
                .await
                .unwrap(),
            Some(2)
        );
        assert_eq!(
            store
                .clip_seq("g", ClipId::from_bytes([2; 16]))
                .await
                .unwrap(),
            None
        );
        assert!(matches!(
            store.clip_seq("nope", ClipId::from_bytes([2; 16])).await,
            Err(StoreError::NoSuchGroup(_))
        ));
    }

    #[tokio::test]
    async fn reads_order_limit_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        // A neighbouring group whose keys sort right after "g".
        store.create_group("g2", GroupMode::Notes, 1).await.unwrap();
        store.append_clip(clip("g2", 200, 0)).await.unwrap();
        let mut sent = Vec::new();
        for id in 1..=6u8 {
            let mut c = clip("g", id, u64::from(id));
            c.meta.flags = id;
            c.meta.format = if id % 2 == 0 {
                ClipFormat::Opus
            } else {
                ClipFormat::Wav
            };
            c.meta.talker = format!("talker-{id}-ünï");
            if id == 4 {
                c.waveform = Bytes::new();
                c.frames = vec![Bytes::new(), Bytes::from(vec![0u8; 70_000])];
            }
            store.append_clip(c.clone()).await.unwrap();
            sent.push(c);
        }
        let after = store.clips_after("g", 2, 3).await.unwrap();
        assert_eq!(after.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4, 5]);
        for got in &after {
            let want = &sent[got.seq as usize - 1];
            assert_eq!(got.meta, want.meta);
            assert_eq!(got.frames, want.frames);
            assert_eq!(got.waveform, want.waveform);
        }
        assert!(store.clips_after("g", 6, 10).await.unwrap().is_empty());
        assert!(store.clips_after("g", 0, 0).await.unwrap().is_empty());
        assert!(
            store
                .clips_after("g", u64::MAX, 5)
                .await
                .unwrap()
                .is_empty()
        );
        let recent = store.recent_clips("g", 2).await.unwrap();
        assert_eq!(recent.iter().map(|c| c.seq).collect::<Vec<_>>(), [5, 6]);
        let recent = store.recent_clips("g", 100).await.unwrap();
        assert_eq!(recent.len(), 6);
        assert_eq!(recent[0].seq, 1);
        assert_eq!(
            store.clip_meta("g", 4).await.unwrap(),
            Some(sent[3].meta.clone())
        );
        assert_eq!(store.clip_meta("g", 7).await.unwrap(), None);
    }

    #[tokio::test]
    async fn cursors_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        assert_eq!(store.cursor("g", "ann").await.unwrap(), 0);
        store.advance_cursor("g", "ann", 5).await.unwrap();
        store.advance_cursor("g", "ann", 3).await.unwrap();
        assert_eq!(store.cursor("g", "ann").await.unwrap(), 5);
        store.advance_cursor("g", "ann", 9).await.unwrap();
        assert_eq!(store.cursor("g", "ann").await.unwrap(), 9);
        assert_eq!(store.cursor("g", "bob").await.unwrap(), 0);
        // Many concurrent updates: the maximum wins.
        let updates = (1..=50u64)
            .rev()
            .map(|s| store.advance_cursor("g", "bob", s));
        for r in futures_join(updates).await {
            r.unwrap();
        }
        assert_eq!(store.cursor("g", "bob").await.unwrap(), 50);
    }

    /// Awaits every future concurrently (they were all sent to the writer
    /// when created, so they are batched together).
    async fn futures_join<F: Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
        let futs: Vec<F> = futs.collect();
        let mut out = Vec::with_capacity(futs.len());
        for f in futs {
            out.push(f.await);
        }
        out
    }

    #[tokio::test]
    async fn retention_by_count_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        store.create_group("h", GroupMode::Notes, 1).await.unwrap();
        for id in 1..=10u8 {
            store
                .append_clip(clip("g", id, 1_000 * u64::from(id)))
                .await
                .unwrap();
        }
        store.append_clip(clip("h", 1, 500)).await.unwrap();
        let keep_all = RetentionPolicy {
            max_age_ms: 0,
            max_clips_per_group: 0,
        };
        assert_eq!(store.apply_retention(keep_all, 1_000_000).await.unwrap(), 0);

        let by_count = RetentionPolicy {
            max_age_ms: 0,
            max_clips_per_group: 7,
        };
        assert_eq!(store.apply_retention(by_count, 10_000).await.unwrap(), 3);
        assert_eq!(
            store.seq_range("g").await.unwrap(),
            SeqRange { first: 4, last: 10 }
        );
        assert_eq!(
            store.seq_range("h").await.unwrap(),
            SeqRange { first: 1, last: 1 }
        );
        assert_eq!(store.clip_meta("g", 3).await.unwrap(), None);
        assert_eq!(store.clips_after("g", 0, 1).await.unwrap()[0].seq, 4);

        // Age: at 10_500 with max age 4_000 the cutoff is 6_500, so clips
        // created at 4_000, 5_000 and 6_000 go (and h's clip at 500).
        let by_age = RetentionPolicy {
            max_age_ms: 4_000,
            max_clips_per_group: 0,
        };
        assert_eq!(store.apply_retention(by_age, 10_500).await.unwrap(), 4);
        assert_eq!(
            store.seq_range("g").await.unwrap(),
            SeqRange { first: 7, last: 10 }
        );
        assert_eq!(
            store.seq_range("h").await.unwrap(),
            SeqRange { first: 2, last: 1 }
        );
        assert!(store.clips_after("h", 0, 10).await.unwrap().is_empty());

        // The dedup entry of a deleted clip still answers a late retry, and
        // no seq is reused.
        assert_eq!(
            store.append_clip(clip("g", 1, 0)).await.unwrap(),
            AppendOutcome::Duplicate { seq: 1 }
        );
        assert_eq!(
            store.append_clip(clip("h", 9, 20_000)).await.unwrap(),
            AppendOutcome::Stored { seq: 2 }
        );
        // Past the dedup grace, the entries of deleted clips are dropped:
        // clips 1-3 were deleted at 10_000, clips 4-6 at 10_500.
        let later = 10_000 + MIN_DEDUP_GRACE_MS;
        assert_eq!(store.apply_retention(keep_all, later - 1).await.unwrap(), 0);
        assert_eq!(
            store
                .clip_seq("g", ClipId::from_bytes([1; 16]))
                .await
                .unwrap(),
            Some(1)
        );
        assert_eq!(store.apply_retention(keep_all, later).await.unwrap(), 0);
        assert_eq!(
            store
                .clip_seq("g", ClipId::from_bytes([1; 16]))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .clip_seq("g", ClipId::from_bytes([4; 16]))
                .await
                .unwrap(),
            Some(4)
        );
        assert_eq!(
            store.append_clip(clip("g", 1, later)).await.unwrap(),
            AppendOutcome::Stored { seq: 11 }
        );
        assert_eq!(
            store.append_clip(clip("g", 4, later)).await.unwrap(),
            AppendOutcome::Duplicate { seq: 4 }
        );
        // A retained clip's dedup entry is never dropped.
        assert_eq!(
            store.append_clip(clip("g", 8, 0)).await.unwrap(),
            AppendOutcome::Duplicate { seq: 8 }
        );
    }

    #[tokio::test]
    async fn corrupt_blob_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        store.append_clip(clip("g", 1, 0)).await.unwrap();
        store.append_clip(clip("g", 2, 0)).await.unwrap();
        store.put_raw_clip("g", 2, &[1, 0xff, 0xfe, 0x00]);
        for result in [
            store.clips_after("g", 0, 10).await.map(|_| ()),
            store.recent_clips("g", 1).await.map(|_| ()),
            store.clip_meta("g", 2).await.map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(StoreError::Corrupt { table: "clips", .. })),
                "{result:?}"
            );
        }
        // The intact clip still reads.
        assert_eq!(store.clips_after("g", 0, 1).await.unwrap().len(), 1);
        // Age retention keeps a clip whose age it cannot read (and logs
        // it); count retention deletes it.
        let by_age = RetentionPolicy {
            max_age_ms: 1,
            max_clips_per_group: 0,
        };
        assert_eq!(store.apply_retention(by_age, 1_000).await.unwrap(), 1);
        assert_eq!(
            store.seq_range("g").await.unwrap(),
            SeqRange { first: 2, last: 2 }
        );
        assert_eq!(store.apply_retention(by_age, 1_000).await.unwrap(), 0);
        let by_count = RetentionPolicy {
            max_age_ms: 0,
            max_clips_per_group: 1,
        };
        store.append_clip(clip("g", 3, 5_000)).await.unwrap();
        assert_eq!(store.apply_retention(by_count, 1_000).await.unwrap(), 1);
        assert_eq!(
            store.seq_range("g").await.unwrap(),
            SeqRange { first: 3, last: 3 }
        );
        assert_eq!(store.clips_after("g", 0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn second_open_in_the_same_process_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(matches!(
            RedbStore::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        drop(store);
        RedbStore::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn summaries_deletion_tombstones_and_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_group(dir.path()).await;
        for id in 1..=3 {
            store.append_clip(clip("g", id, 1_000)).await.unwrap();
        }
        let summaries = store.clip_summaries("g", 1, 10).await.unwrap();
        let seqs: Vec<u64> = summaries.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [2, 3]);
        let frames = clip("g", 2, 1_000).frames;
        let m = meta("g", 2, 1_000);
        assert_eq!(summaries[0].clip_id, m.clip_id);
        assert_eq!(summaries[0].talker, m.talker);
        assert_eq!(
            summaries[0].bytes,
            frames.iter().map(|f| f.len() as u64).sum::<u64>()
        );
        assert_eq!(
            summaries[0].duration_ms,
            frames.len() as u64 * u64::from(m.frame_ms)
        );

        assert_eq!(
            store.delete_clip("g", 2, 5_000).await.unwrap(),
            Some(m.clip_id)
        );
        assert_eq!(store.delete_clip("g", 2, 6_000).await.unwrap(), None);
        assert!(matches!(
            store.delete_clip("nope", 1, 5_000).await,
            Err(StoreError::NoSuchGroup(_))
        ));
        let left: Vec<u64> = store
            .clip_summaries("g", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect();
        assert_eq!(left, [1, 3]);
        // Still known to dedup: a retry is not stored again.
        assert_eq!(
            store.append_clip(clip("g", 2, 1_000)).await.unwrap(),
            AppendOutcome::Duplicate { seq: 2 }
        );
        assert_eq!(
            store.tombstones("g", 5_000).await.unwrap(),
            [(2, m.clip_id)]
        );
        assert!(store.tombstones("g", 5_001).await.unwrap().is_empty());

        store.add_member("g", "bob").await.unwrap();
        store.add_member("g", "carol").await.unwrap();
        store.advance_cursor("g", "bob", 3).await.unwrap();
        store.touch_member("g", "carol").await.unwrap();
        let status = store.member_status("g").await.unwrap();
        assert_eq!(status.len(), 2);
        assert_eq!((status[0].user.as_str(), status[0].cursor), ("bob", 3));
        assert_eq!((status[1].user.as_str(), status[1].cursor), ("carol", 0));
        assert!(status.iter().all(|m| m.last_seen_ms > 0));
        assert_eq!(
            store.last_seen("g", "carol").await.unwrap(),
            status[1].last_seen_ms
        );
        assert_eq!(store.last_seen("g", "dave").await.unwrap(), 0);

        // Retention drops tombstones as old as the dedup window.
        let policy = RetentionPolicy {
            max_age_ms: 0,
            max_clips_per_group: 0,
        };
        store
            .apply_retention(policy, 5_000 + MIN_DEDUP_GRACE_MS + 1)
            .await
            .unwrap();
        assert!(store.tombstones("g", 0).await.unwrap().is_empty());
    }
}
