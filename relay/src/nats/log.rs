//! The group log on JetStream: one stream, a subject per group, and core
//! NATS subjects for what is live.
//!
//! **Append.** A clip is one message on `<prefix>.clips.<group>`, with
//! `Nats-Msg-Id: <group>/<clip id>` (JetStream's deduplication within its
//! window), `Ptt-Seq: n` (the group's sequence number) and
//! `Nats-Expected-Last-Subject-Sequence` set to the stream sequence of the
//! group's last message: if another node appended in between, JetStream
//! refuses and the append reads the new last message and tries `n + 1`.
//! So two nodes never skip or reuse a number. Once acknowledged, the clip id
//! and the number's stream sequence go into the `<prefix>_clips` bucket
//! (deduplication beyond the window, and the index reads start from) and
//! the number into `<prefix>_last` (the group's last number, kept after
//! retention has deleted every clip so numbering goes on). A node that dies
//! between the acknowledgement and those writes leaves a clip the index
//! lacks: a retry within the duplicate window is still answered by
//! JetStream, and reads fall back to scanning the subject.
//!
//! **Read.** `seq.<group>.<n>` gives the stream sequence of clip `n`; the
//! next ones are read with "next message on the subject from" requests, one
//! per clip, so a read costs in proportion to what it returns.
//!
//! **Feed.** One per node and group: a core subscription to
//! `<prefix>.live.<group>` (other nodes' live frames, and "clip `n` is
//! stored" notices every appending node sends), a watch on the group's key
//! in `<prefix>_groups`, and a poll of the group's last number every
//! [`POLL`] in case a notice was lost (the appending node died after the
//! acknowledgement, or the connection was down). No durable consumer per
//! member or per node. The feed follows other nodes' clips in flight: a
//! frame lost on the way (core NATS does not retry) is filled in from the
//! stored clip before the clip's end is yielded, late live events of a
//! stored clip are dropped, and a clip silent for 10 s (its node died
//! mid-clip) is aborted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use ptt_protocol::{ClipId, ErrorCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Nats, backend, parse_u64, token};
use crate::log::{FeedEvent, FollowerChange, GroupFeed, GroupLog, LiveEvent, LogFuture};
use crate::store::redb_store::{decode_clip, encode_clip};
use crate::store::{AppendOutcome, ClipMeta, NewClip, SeqRange, StoreError, StoredClip};

/// How often a feed checks the group's last number without a notice.
pub const POLL: Duration = Duration::from_secs(2);
/// Clips a feed reads at once.
const FEED_BATCH: usize = 16;
/// Appends retried after a conflict with another node before giving up.
const MAX_ATTEMPTS: usize = 64;
/// Live events queued for publication before new ones are dropped.
const LIVE_QUEUE: usize = 8192;
/// A remote clip without a frame for this long is given up (its node died
/// mid-clip).
const STALE: Duration = Duration::from_secs(10);
/// Remote clips in flight one feed follows at most.
const MAX_REMOTE: usize = 256;
/// Stored clip ids a feed remembers, to drop their late live events.
const RECENTLY_STORED: usize = 64;

const KIND_STARTED: u8 = 1;
const KIND_FRAME: u8 = 2;
const KIND_ABORTED: u8 = 3;
const KIND_STORED: u8 = 4;
const KIND_DELETED: u8 = 5;
/// A follower muted, unmuted or unfollowed a channel on a node: `kind,
/// node, change (1 muted, 2 unmuted, 3 unfollowed), user id`.
const KIND_FOLLOWER: u8 = 6;
/// How long a follower notice may take to reach the NATS server.
const FOLLOWER_FLUSH: Duration = Duration::from_secs(2);
/// Tombstones kept per group (the oldest go first).
const MAX_TOMBSTONES: usize = 1024;

/// A deleted clip, as the `<prefix>_tombstones` bucket keeps it (a JSON
/// list per group).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Tombstone {
    seq: u64,
    /// The clip id in hex.
    clip_id: String,
    /// When it was deleted, Unix ms.
    at_ms: u64,
}

fn decode_tombstones(group: &str, raw: &[u8]) -> Result<Vec<Tombstone>, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        table: "tombstones",
        detail: format!("group {group}: {e}"),
    })
}

/// The [`GroupLog`] of a relay node on NATS JetStream. See the module
/// documentation.
#[derive(Clone)]
pub struct NatsLog {
    inner: Arc<Inner>,
}

struct Inner {
    nats: Arc<Nats>,
    live: mpsc::Sender<(String, Bytes)>,
    tasks: TaskTracker,
    closed: CancellationToken,
}

impl std::fmt::Debug for NatsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLog")
            .field("nats", &self.inner.nats)
            .finish()
    }
}

impl NatsLog {
    /// A log over `nats`; starts the task that publishes live events (it
    /// ends at [`GroupLog::close`]).
    pub fn new(nats: Arc<Nats>) -> NatsLog {
        let (tx, mut rx) = mpsc::channel::<(String, Bytes)>(LIVE_QUEUE);
        let tasks = TaskTracker::new();
        let closed = CancellationToken::new();
        let client = nats.client.clone();
        let stop = closed.clone();
        tasks.spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => None,
                    next = rx.recv() => next,
                };
                let Some((subject, payload)) = next else {
                    // Closing: what is queued goes out first (a deleted
                    // clip's notice from `relay group delete`), for a
                    // second at most (NATS may be away).
                    let drain = async {
                        while let Ok((subject, payload)) = rx.try_recv() {
                            if let Err(e) = client.publish(subject, payload).await {
                                tracing::debug!(error = %e, "publishing a live event");
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    return;
                };
                if let Err(e) = client.publish(subject, payload).await {
                    tracing::debug!(error = %e, "publishing a live event");
                }
            }
        });
        tasks.close();
        NatsLog {
            inner: Arc::new(Inner {
                nats,
                live: tx,
                tasks,
                closed,
            }),
        }
    }

    fn nats(&self) -> &Nats {
        &self.inner.nats
    }

    async fn append_clip(&self, clip: NewClip) -> Result<AppendOutcome, StoreError> {
        let nats = self.nats();
        let group = clip.meta.group.clone();
        let id_key = id_key(&group, clip.meta.clip_id);
        if let Some(seq) = self.indexed(&id_key).await? {
            return Ok(AppendOutcome::Duplicate { seq });
        }
        if nats
            .groups
            .get(token(&group))
            .await
            .map_err(|e| backend("reading the group", e))?
            .is_none()
        {
            return Err(StoreError::NoSuchGroup(group));
        }
        let payload = Bytes::from(encode_clip(&clip));
        if payload.len() + super::MESSAGE_OVERHEAD > nats.max_payload {
            return Err(StoreError::Backend(format!(
                "a clip of {} bytes does not fit NATS max_payload {}",
                payload.len(),
                nats.max_payload
            )));
        }
        let subject = nats.clip_subject(&group);
        let msg_id = format!("{}/{}", token(&group), hex(clip.meta.clip_id));
        for _ in 0..MAX_ATTEMPTS {
            let (last_stream, last_seq) = self.last_message(&group).await?;
            let seq = last_seq + 1;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                last_stream.to_string().as_str(),
            );
            headers.insert("Ptt-Seq", seq.to_string().as_str());
            let ack = match nats
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let ack = match ack {
                Ok(ack) => ack,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(backend("publishing a clip", e)),
            };
            if ack.duplicate {
                // Stored before, within JetStream's window: its number is
                // in the stored copy.
                let stored = nats
                    .stream
                    .get_raw_message(ack.sequence)
                    .await
                    .map_err(|e| backend("reading a duplicate's original", e))?;
                let seq = header_seq(&stored.headers).ok_or_else(|| StoreError::Corrupt {
                    table: "clips",
                    detail: format!("stream message {} has no Ptt-Seq", ack.sequence),
                })?;
                self.write_index(&group, &id_key, seq, ack.sequence).await;
                return Ok(AppendOutcome::Duplicate { seq });
            }
            self.write_index(&group, &id_key, seq, ack.sequence).await;
            // Through the live queue, so that it follows the clip's last
            // frames; if the queue is full the other nodes' poll finds it.
            let mut notice = BytesMut::with_capacity(17);
            notice.put_u8(KIND_STORED);
            notice.put_u64(nats.node);
            notice.put_u64(seq);
            let _ = self
                .inner
                .live
                .try_send((nats.live_subject(&group), notice.freeze()));
            return Ok(AppendOutcome::Stored { seq });
        }
        Err(StoreError::Backend(format!(
            "NATS: {MAX_ATTEMPTS} appends to {group} lost to other nodes in a row"
        )))
    }

    /// Writes the clip id's and the number's index entries and raises the
    /// group's last number. Failures are logged, not returned: the clip is
    /// stored, and reads and retries have their fallbacks (module docs).
    async fn write_index(&self, group: &str, id_key: &str, seq: u64, stream_seq: u64) {
        let nats = self.nats();
        let (a, b, c) = tokio::join!(
            nats.index.put(id_key, Bytes::from(seq.to_string())),
            nats.index
                .put(seq_key(group, seq), Bytes::from(stream_seq.to_string())),
            self.raise_last(group, seq),
        );
        if let Err(e) = a.map(drop).and(b.map(drop)) {
            tracing::warn!(%group, seq, error = %e, "writing the clip index failed");
        }
        if let Err(e) = c {
            tracing::warn!(%group, seq, error = %e, "writing the group's last number failed");
        }
    }

    /// Sets the group's last number to `seq` unless it is higher already.
    async fn raise_last(&self, group: &str, seq: u64) -> Result<(), StoreError> {
        let nats = self.nats();
        let key = token(group);
        for _ in 0..MAX_ATTEMPTS {
            let entry = nats
                .last
                .entry(key.clone())
                .await
                .map_err(|e| backend("reading the last number", e))?;
            let value = Bytes::from(seq.to_string());
            let written = match entry {
                Some(e) if parse_u64(&e.value).is_some_and(|v| v >= seq) => return Ok(()),
                Some(e) => nats.last.update(&key, value, e.revision).await.is_ok(),
                None => nats.last.create(&key, value).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(StoreError::Backend(
            "NATS: the last number kept changing".into(),
        ))
    }

    /// The stream sequence of the group's last retained clip (0 when none
    /// is retained) and the group's last number: the higher of that clip's
    /// and the `last` bucket's (which is ahead when an administrator
    /// deleted the newest clips, so their numbers are not given again).
    async fn last_message(&self, group: &str) -> Result<(u64, u64), StoreError> {
        let nats = self.nats();
        let subject = nats.clip_subject(group);
        let (message, recorded) = tokio::join!(
            nats.stream.get_last_raw_message_by_subject(&subject),
            self.last_number(group),
        );
        match message {
            Ok(message) => {
                let seq = header_seq(&message.headers).ok_or_else(|| StoreError::Corrupt {
                    table: "clips",
                    detail: format!("stream message {} has no Ptt-Seq", message.sequence),
                })?;
                Ok((message.sequence, seq.max(recorded?)))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((0, recorded?)),
            Err(e) => Err(backend("reading the last clip", e)),
        }
    }

    /// Deletes clip `seq` of `group` (an administrator's decision): a
    /// tombstone goes into the `<prefix>_tombstones` bucket first, then the
    /// message leaves the stream, and every node's feed of the group is
    /// told (a "deleted" notice on the live subject) so that its members
    /// get `ClipDeleted` at once. The group's last number is raised to
    /// `seq` first, so deleting the newest clip never frees its number.
    /// Returns the clip's id, or `None` if it is not stored.
    pub(crate) async fn delete_clip(
        &self,
        group: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<Option<ClipId>, StoreError> {
        let nats = self.nats();
        let Some((stream_seq, clip_id)) = self.locate(group, seq).await? else {
            return Ok(None);
        };
        self.raise_last(group, seq).await?;
        self.record_tombstone(group, seq, clip_id, now_ms).await?;
        nats.stream
            .delete_message(stream_seq)
            .await
            .map_err(|e| backend("deleting a clip", e))?;
        let mut notice = BytesMut::with_capacity(33);
        notice.put_u8(KIND_DELETED);
        notice.put_u64(nats.node);
        notice.put_u64(seq);
        notice.put_slice(clip_id.as_bytes());
        // Lost if the queue is full: members then learn it at their next
        // join, from the tombstone.
        let _ = self
            .inner
            .live
            .try_send((nats.live_subject(group), notice.freeze()));
        Ok(Some(clip_id))
    }

    /// The tombstones of `group` recorded at or after `since_ms`, in
    /// sequence order.
    pub(crate) async fn tombstones(
        &self,
        group: &str,
        since_ms: u64,
    ) -> Result<Vec<(u64, ClipId)>, StoreError> {
        let raw = self
            .nats()
            .tombstones
            .get(token(group))
            .await
            .map_err(|e| backend("reading tombstones", e))?;
        let Some(raw) = raw else {
            return Ok(Vec::new());
        };
        let mut out: Vec<(u64, ClipId)> = decode_tombstones(group, &raw)?
            .into_iter()
            .filter(|t| t.at_ms >= since_ms)
            .filter_map(|t| Some((t.seq, ClipId::from_hex(&t.clip_id)?)))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The stream sequence and clip id of clip `seq`, if it is stored.
    async fn locate(&self, group: &str, seq: u64) -> Result<Option<(u64, ClipId)>, StoreError> {
        if seq == 0 {
            return Ok(None);
        }
        let mut next = self.indexed(&seq_key(group, seq)).await?.unwrap_or(1);
        // The index entry is where clip `seq` was written; without it the
        // subject is read from its start (the index write failed).
        while let Some((stream_seq, clip)) = self.next_from(group, next).await? {
            if clip.seq == seq {
                return Ok(Some((stream_seq, clip.meta.clip_id)));
            }
            if clip.seq > seq {
                return Ok(None);
            }
            next = stream_seq + 1;
        }
        Ok(None)
    }

    /// Adds a tombstone to the group's list (compare-and-set; the oldest
    /// go beyond [`MAX_TOMBSTONES`], and the bucket's age limit, the
    /// retention's, drops a list untouched that long).
    async fn record_tombstone(
        &self,
        group: &str,
        seq: u64,
        clip_id: ClipId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let bucket = &self.nats().tombstones;
        let key = token(group);
        for _ in 0..MAX_ATTEMPTS {
            let entry = bucket
                .entry(key.clone())
                .await
                .map_err(|e| backend("reading tombstones", e))?;
            let mut list = match &entry {
                Some(e) => decode_tombstones(group, &e.value)?,
                None => Vec::new(),
            };
            if list.iter().any(|t| t.seq == seq) {
                return Ok(());
            }
            list.push(Tombstone {
                seq,
                clip_id: clip_id.to_string(),
                at_ms: now_ms,
            });
            if list.len() > MAX_TOMBSTONES {
                list.sort_by_key(|t| t.at_ms);
                list.drain(..list.len() - MAX_TOMBSTONES);
            }
            let value = Bytes::from(
                serde_json::to_vec(&list)
                    .map_err(|e| StoreError::Backend(format!("encoding tombstones: {e}")))?,
            );
            let written = match entry {
                Some(e) => bucket.update(&key, value, e.revision).await.is_ok(),
                None => bucket.create(&key, value).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(StoreError::Backend("NATS: tombstones kept changing".into()))
    }

    /// The group's last number as the `last` bucket has it.
    async fn last_number(&self, group: &str) -> Result<u64, StoreError> {
        let raw = self
            .nats()
            .last
            .get(token(group))
            .await
            .map_err(|e| backend("reading the last number", e))?;
        Ok(raw.as_deref().and_then(parse_u64).unwrap_or(0))
    }

    async fn indexed(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let raw = self
            .nats()
            .index
            .get(key)
            .await
            .map_err(|e| backend("reading the clip index", e))?;
        Ok(raw.as_deref().and_then(parse_u64))
    }

    /// The next clip on the group's subject at or after stream sequence
    /// `from`, with its stream sequence.
    async fn next_from(
        &self,
        group: &str,
        from: u64,
    ) -> Result<Option<(u64, StoredClip)>, StoreError> {
        let nats = self.nats();
        let message = match nats
            .stream
            .raw_message_builder()
            .next_by_subject(nats.clip_subject(group))
            .sequence(from.max(1))
            .send()
            .await
        {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(backend("reading a clip", e)),
        };
        let seq = header_seq(&message.headers).ok_or_else(|| StoreError::Corrupt {
            table: "clips",
            detail: format!("stream message {} has no Ptt-Seq", message.sequence),
        })?;
        Ok(Some((
            message.sequence,
            decode_clip(group, seq, &message.payload)?,
        )))
    }

    async fn read_clips(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredClip>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // Where to start: the index entry of `after + 1`, else of `after`,
        // else the subject's first retained clip.
        let from = match self.indexed(&seq_key(group, after + 1)).await? {
            Some(stream_seq) => stream_seq,
            None if after > 0 => match self.indexed(&seq_key(group, after)).await? {
                Some(stream_seq) => stream_seq + 1,
                None => 1,
            },
            None => 1,
        };
        let mut next = from;
        while out.len() < limit {
            let Some((stream_seq, clip)) = self.next_from(group, next).await? else {
                break;
            };
            next = stream_seq + 1;
            if clip.seq > after {
                out.push(clip);
            }
        }
        Ok(out)
    }

    async fn recent_clips(&self, group: &str, count: usize) -> Result<Vec<StoredClip>, StoreError> {
        let range = self.seq_range(group).await?;
        let after = range.last.saturating_sub(count as u64);
        self.read_clips(group, after, count).await
    }

    async fn seq_range(&self, group: &str) -> Result<SeqRange, StoreError> {
        let (_, last) = self.last_message(group).await?;
        let first = match self.next_from(group, 1).await? {
            Some((_, clip)) => clip.seq,
            None => last + 1,
        };
        Ok(SeqRange { first, last })
    }

    async fn clip_meta(&self, group: &str, seq: u64) -> Result<Option<ClipMeta>, StoreError> {
        if seq == 0 {
            return Ok(None);
        }
        let clips = self.read_clips(group, seq - 1, 1).await?;
        Ok(clips.into_iter().find(|c| c.seq == seq).map(|c| c.meta))
    }

    /// Appends a clip; see [`GroupLog::append`].
    pub(crate) fn append_future(&self, clip: NewClip) -> LogFuture<'_, AppendOutcome> {
        Box::pin(async move {
            let result = self.append_clip(clip).await;
            self.nats().track("append", result)
        })
    }

    /// See [`GroupLog::clip_seq`].
    pub(crate) fn clip_seq_future(
        &self,
        group: &str,
        clip_id: ClipId,
    ) -> LogFuture<'_, Option<u64>> {
        let key = id_key(group, clip_id);
        Box::pin(async move {
            let result = self.indexed(&key).await;
            self.nats().track("clip lookup", result)
        })
    }

    /// See [`GroupLog::read`].
    pub(crate) fn read_future(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> LogFuture<'_, Vec<StoredClip>> {
        let group = group.to_owned();
        Box::pin(async move { self.read_clips(&group, after, limit).await })
    }

    /// See [`GroupLog::recent`].
    pub(crate) fn recent_future(
        &self,
        group: &str,
        count: usize,
    ) -> LogFuture<'_, Vec<StoredClip>> {
        let group = group.to_owned();
        Box::pin(async move { self.recent_clips(&group, count).await })
    }

    /// See [`GroupLog::meta`].
    pub(crate) fn meta_future(&self, group: &str, seq: u64) -> LogFuture<'_, Option<ClipMeta>> {
        let group = group.to_owned();
        Box::pin(async move { self.clip_meta(&group, seq).await })
    }

    /// See [`GroupLog::range`].
    pub(crate) fn range_future(&self, group: &str) -> LogFuture<'_, SeqRange> {
        let group = group.to_owned();
        Box::pin(async move { self.seq_range(&group).await })
    }
}

impl GroupLog for NatsLog {
    fn append(&self, clip: NewClip) -> LogFuture<'_, AppendOutcome> {
        self.append_future(clip)
    }

    fn clip_seq(&self, group: &str, clip_id: ClipId) -> LogFuture<'_, Option<u64>> {
        self.clip_seq_future(group, clip_id)
    }

    fn read(&self, group: &str, after: u64, limit: usize) -> LogFuture<'_, Vec<StoredClip>> {
        self.read_future(group, after, limit)
    }

    fn recent(&self, group: &str, count: usize) -> LogFuture<'_, Vec<StoredClip>> {
        self.recent_future(group, count)
    }

    fn meta(&self, group: &str, seq: u64) -> LogFuture<'_, Option<ClipMeta>> {
        self.meta_future(group, seq)
    }

    fn range(&self, group: &str) -> LogFuture<'_, SeqRange> {
        self.range_future(group)
    }

    fn subscribe(&self, group: &str, after: u64) -> LogFuture<'_, Box<dyn GroupFeed>> {
        let group = group.to_owned();
        Box::pin(async move {
            let mut poll = tokio::time::interval(POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut feed = NatsFeed {
                log: self.clone(),
                group,
                after,
                known_last: 0,
                pending: VecDeque::new(),
                group_dirty: false,
                live: None,
                watch: None,
                poll,
                remote: HashMap::new(),
                recently_stored: VecDeque::new(),
            };
            feed.connect().await?;
            Ok(Box::new(feed) as Box<dyn GroupFeed>)
        })
    }

    fn publishes_live(&self) -> bool {
        true
    }

    fn publish_live(&self, event: LiveEvent) {
        let nats = self.nats();
        let subject = nats.live_subject(event.group());
        let payload = encode_live(nats.node, &event);
        if self.inner.live.try_send((subject, payload)).is_err() {
            tracing::warn!(
                group = event.group(),
                "live events to other nodes are dropped: the NATS connection is not keeping up"
            );
        }
    }

    fn publish_follower(
        &self,
        channel: &str,
        user: &str,
        change: FollowerChange,
    ) -> LogFuture<'_, ()> {
        let nats = self.nats();
        let subject = nats.live_subject(channel);
        let payload = encode_follower(nats.node, user, change);
        Box::pin(async move {
            // Straight to the connection, not through the live queue: the
            // answer to the follower waits until the server has it. The
            // connection keeps the order of what it is given, so a clip
            // this node starts after the answer reaches every feed after
            // the notice.
            nats.client
                .publish(subject, payload)
                .await
                .map_err(|e| backend("publishing a follower notice", e))?;
            match tokio::time::timeout(FOLLOWER_FLUSH, nats.client.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(backend("flushing a follower notice", e)),
                Err(_) => Err(StoreError::Backend(
                    "NATS: a follower notice was not flushed within 2 s".into(),
                )),
            }
        })
    }

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            self.inner.closed.cancel();
            self.inner.tasks.wait().await;
            self.nats().close().await;
            Ok(())
        })
    }
}

/// A feed of one group on one node. See the module documentation.
struct NatsFeed {
    log: NatsLog,
    group: String,
    /// The last number yielded (or skipped as deleted).
    after: u64,
    /// The highest number known to be stored.
    known_last: u64,
    /// Events ready to yield (a stored clip, preceded by the frames its
    /// live copy missed).
    pending: VecDeque<FeedEvent>,
    group_dirty: bool,
    live: Option<async_nats::Subscriber>,
    watch: Option<async_nats::jetstream::kv::Watch>,
    poll: tokio::time::Interval,
    /// Other nodes' clips in flight: the next frame index expected and
    /// when the last one came.
    remote: HashMap<ClipId, RemoteClip>,
    /// The ids of the clips yielded as stored last, whose late live events
    /// are dropped.
    recently_stored: VecDeque<ClipId>,
}

/// What woke a waiting feed.
enum Wake {
    /// A remote clip may have gone silent.
    Stale,
    /// A message on the live subject (`None`: the subscription ended).
    Live(Option<Bytes>),
    /// The group's key changed (`None`: the watch ended).
    Watch(Option<Result<(), async_nats::jetstream::kv::WatcherError>>),
    /// Time to check the group's last number.
    Poll,
}

/// Another node's clip in flight, as a feed follows it.
struct RemoteClip {
    next_index: u32,
    last_seen: tokio::time::Instant,
}

impl NatsFeed {
    /// Subscribes to what is missing (after a failure, again), then reads
    /// how far the group is: whatever happened while it was not
    /// subscribed is found by that read.
    async fn connect(&mut self) -> Result<(), StoreError> {
        let nats = self.log.inner.nats.clone();
        if self.live.is_none() {
            let sub = nats
                .client
                .subscribe(nats.live_subject(&self.group))
                .await
                .map_err(|e| backend("subscribing to live events", e))?;
            self.live = Some(sub);
        }
        if self.watch.is_none() {
            let watch = nats
                .groups
                .watch(token(&self.group))
                .await
                .map_err(|e| backend("watching the group", e))?;
            self.watch = Some(watch);
            // Changes while unwatched.
            self.group_dirty = true;
        }
        let last = self.log.last_message(&self.group).await?.1;
        self.known_last = self.known_last.max(last);
        Ok(())
    }

    async fn next_event(&mut self) -> Result<Option<FeedEvent>, StoreError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if let FeedEvent::Stored(clip) = &event {
                    self.after = clip.seq;
                }
                return Ok(Some(event));
            }
            if self.log.inner.closed.is_cancelled() {
                return Ok(None);
            }
            if self.live.is_none() || self.watch.is_none() {
                self.connect().await?;
            }
            if self.group_dirty {
                let info = super::store::read_group(&self.log.inner.nats, &self.group).await?;
                self.group_dirty = false;
                return Ok(Some(FeedEvent::Group(info)));
            }
            if self.known_last > self.after {
                let clips = self
                    .log
                    .read_clips(&self.group, self.after, FEED_BATCH)
                    .await?;
                if clips.is_empty() {
                    // Retention deleted what was in between: skip it.
                    self.after = self.known_last;
                }
                let last = self.known_last;
                for clip in clips.into_iter().filter(|c| c.seq <= last) {
                    self.stored(clip);
                }
                continue;
            }
            let stale = self.remote.values().map(|r| r.last_seen + STALE).min();
            let (Some(live), Some(watch)) = (&mut self.live, &mut self.watch) else {
                continue;
            };
            let wake = tokio::select! {
                () = sleep_until(stale) => Wake::Stale,
                _ = self.log.inner.closed.cancelled() => return Ok(None),
                message = live.next() => Wake::Live(message.map(|m| m.payload)),
                entry = watch.next() => Wake::Watch(entry.map(|e| e.map(drop))),
                _ = self.poll.tick() => Wake::Poll,
            };
            match wake {
                Wake::Stale => {
                    if let Some(event) = self.abort_stale() {
                        return Ok(Some(FeedEvent::Live(event)));
                    }
                }
                Wake::Live(Some(payload)) => {
                    if let Some((seq, clip_id)) = self.deleted_message(&payload) {
                        return Ok(Some(FeedEvent::Deleted { seq, clip_id }));
                    }
                    if let Some((user, change)) =
                        decode_follower(&payload, self.log.inner.nats.node)
                    {
                        return Ok(Some(FeedEvent::Follower { user, change }));
                    }
                    if let Some(event) = self.live_message(&payload) {
                        return Ok(Some(FeedEvent::Live(event)));
                    }
                }
                Wake::Live(None) => self.live = None,
                Wake::Watch(Some(Ok(()))) => self.group_dirty = true,
                Wake::Watch(Some(Err(e))) => {
                    self.watch = None;
                    return Err(backend("watching the group", e));
                }
                Wake::Watch(None) => self.watch = None,
                Wake::Poll => {
                    let last = self.log.last_number(&self.group).await?;
                    self.known_last = self.known_last.max(last);
                }
            }
        }
    }

    /// Another node's "clip deleted" notice: the clip's number and id
    /// (this node's own deletions reached its members already).
    fn deleted_message(&self, payload: &Bytes) -> Option<(u64, ClipId)> {
        let mut buf = payload.clone();
        if buf.remaining() < 33 || buf.get_u8() != KIND_DELETED {
            return None;
        }
        if buf.get_u64() == self.log.inner.nats.node {
            return None;
        }
        let seq = buf.get_u64();
        let mut id = [0u8; 16];
        buf.copy_to_slice(&mut id);
        Some((seq, ClipId::from_bytes(id)))
    }

    /// A message on the group's live subject: raises `known_last` for a
    /// stored notice, returns another node's live event.
    fn live_message(&mut self, payload: &Bytes) -> Option<LiveEvent> {
        let mut buf = payload.clone();
        if buf.remaining() < 9 {
            return None;
        }
        let kind = buf.get_u8();
        let node = buf.get_u64();
        if kind == KIND_STORED {
            if buf.remaining() >= 8 {
                let seq = buf.get_u64();
                self.known_last = self.known_last.max(seq);
            }
            return None;
        }
        if node == self.log.inner.nats.node {
            // This node's own talkers: its hub has them already.
            return None;
        }
        let event = decode_live(&self.group, kind, buf)?;
        let now = tokio::time::Instant::now();
        match &event {
            LiveEvent::Started { meta } => {
                if self.recently_stored.contains(&meta.clip_id) || self.remote.len() >= MAX_REMOTE {
                    return None;
                }
                self.remote.insert(
                    meta.clip_id,
                    RemoteClip {
                        next_index: 0,
                        last_seen: now,
                    },
                );
            }
            LiveEvent::Frame { clip_id, index, .. } => {
                // A frame out of order (one was lost on the way) waits for
                // the stored clip, which fills in from the gap on.
                let remote = self.remote.get_mut(clip_id)?;
                if *index != remote.next_index {
                    return None;
                }
                remote.next_index += 1;
                remote.last_seen = now;
            }
            LiveEvent::Aborted { clip_id, .. } => {
                self.remote.remove(clip_id)?;
            }
        }
        Some(event)
    }

    /// Queues a stored clip, after the frames its live copy here lacks.
    fn stored(&mut self, clip: StoredClip) {
        let id = clip.meta.clip_id;
        if let Some(remote) = self.remote.remove(&id) {
            for (index, data) in clip
                .frames
                .iter()
                .enumerate()
                .skip(remote.next_index as usize)
            {
                self.pending.push_back(FeedEvent::Live(LiveEvent::Frame {
                    group: self.group.clone(),
                    clip_id: id,
                    index: index as u32,
                    data: data.clone(),
                }));
            }
        }
        if self.recently_stored.len() >= RECENTLY_STORED {
            self.recently_stored.pop_front();
        }
        self.recently_stored.push_back(id);
        self.pending.push_back(FeedEvent::Stored(clip));
    }

    /// Gives up on the remote clip silent the longest, if it has been
    /// silent for [`STALE`] (its node died mid-clip): its members get it
    /// aborted, and the clip again if a re-send stores it.
    fn abort_stale(&mut self) -> Option<LiveEvent> {
        let now = tokio::time::Instant::now();
        let (&clip_id, _) = self
            .remote
            .iter()
            .filter(|(_, r)| r.last_seen + STALE <= now)
            .min_by_key(|(_, r)| r.last_seen)?;
        self.remote.remove(&clip_id);
        tracing::debug!(group = %self.group, "a clip from another node went silent; aborted");
        Some(LiveEvent::Aborted {
            group: self.group.clone(),
            clip_id,
            code: ErrorCode::ClipAborted,
        })
    }
}

/// Sleeps until `deadline`, or forever.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl GroupFeed for NatsFeed {
    fn next(&mut self) -> LogFuture<'_, Option<FeedEvent>> {
        Box::pin(self.next_event())
    }
}

fn id_key(group: &str, clip_id: ClipId) -> String {
    format!("id.{}.{}", token(group), hex(clip_id))
}

fn seq_key(group: &str, seq: u64) -> String {
    format!("seq.{}.{seq}", token(group))
}

fn hex(clip_id: ClipId) -> String {
    clip_id
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn header_seq(headers: &HeaderMap) -> Option<u64> {
    headers.get("Ptt-Seq")?.as_str().parse().ok()
}

/// A follower notice: see [`KIND_FOLLOWER`].
fn encode_follower(node: u64, user: &str, change: FollowerChange) -> Bytes {
    let mut buf = BytesMut::with_capacity(10 + user.len());
    buf.put_u8(KIND_FOLLOWER);
    buf.put_u64(node);
    buf.put_u8(match change {
        FollowerChange::Muted => 1,
        FollowerChange::Unmuted => 2,
        FollowerChange::Unfollowed => 3,
    });
    buf.put_slice(user.as_bytes());
    buf.freeze()
}

/// Another node's follower notice (`None` for this node's own, which its
/// members had at once, for anything else, and for a malformed one).
fn decode_follower(payload: &Bytes, this_node: u64) -> Option<(String, FollowerChange)> {
    let mut buf = payload.clone();
    if buf.remaining() < 10 || buf.get_u8() != KIND_FOLLOWER || buf.get_u64() == this_node {
        return None;
    }
    let change = match buf.get_u8() {
        1 => FollowerChange::Muted,
        2 => FollowerChange::Unmuted,
        3 => FollowerChange::Unfollowed,
        _ => return None,
    };
    let user = std::str::from_utf8(&buf).ok()?;
    ptt_protocol::is_valid_id(user).then(|| (user.to_owned(), change))
}

/// `kind, node, body`: see [`decode_live`].
fn encode_live(node: u64, event: &LiveEvent) -> Bytes {
    let mut buf = BytesMut::new();
    match event {
        LiveEvent::Started { meta } => {
            buf.put_u8(KIND_STARTED);
            buf.put_u64(node);
            buf.put_slice(&encode_clip(&NewClip {
                meta: meta.clone(),
                frames: Vec::new(),
                waveform: Bytes::new(),
            }));
        }
        LiveEvent::Frame {
            clip_id,
            index,
            data,
            ..
        } => {
            buf.reserve(29 + data.len());
            buf.put_u8(KIND_FRAME);
            buf.put_u64(node);
            buf.put_slice(clip_id.as_bytes());
            buf.put_u32(*index);
            buf.put_slice(data);
        }
        LiveEvent::Aborted { clip_id, code, .. } => {
            buf.put_u8(KIND_ABORTED);
            buf.put_u64(node);
            buf.put_slice(clip_id.as_bytes());
            buf.put_u64(u64::from(code.code()));
        }
    }
    buf.freeze()
}

/// The body of a live event of `kind` (after its kind and node), or `None`
/// if it does not decode (logged: only relays publish there).
fn decode_live(group: &str, kind: u8, mut buf: Bytes) -> Option<LiveEvent> {
    let clip_id = |buf: &mut Bytes| -> Option<ClipId> {
        if buf.remaining() < 16 {
            return None;
        }
        let mut id = [0u8; 16];
        buf.copy_to_slice(&mut id);
        Some(ClipId::from_bytes(id))
    };
    let event = match kind {
        KIND_STARTED => decode_clip(group, 0, &buf)
            .ok()
            .map(|clip| LiveEvent::Started { meta: clip.meta }),
        KIND_FRAME => clip_id(&mut buf).and_then(|clip_id| {
            (buf.remaining() >= 4).then(|| {
                let index = buf.get_u32();
                LiveEvent::Frame {
                    group: group.to_owned(),
                    clip_id,
                    index,
                    data: buf,
                }
            })
        }),
        KIND_ABORTED => clip_id(&mut buf).and_then(|clip_id| {
            (buf.remaining() >= 8).then(|| LiveEvent::Aborted {
                group: group.to_owned(),
                clip_id,
                code: ErrorCode::from_code(buf.get_u64()),
            })
        }),
        _ => None,
    };
    if event.is_none() {
        tracing::warn!(%group, kind, "a live event from another node does not decode");
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use ptt_protocol::ClipFormat;

    #[test]
    fn follower_notices_round_trip_and_skip_this_node_and_garbage() {
        for change in [
            FollowerChange::Muted,
            FollowerChange::Unmuted,
            FollowerChange::Unfollowed,
        ] {
            let payload = encode_follower(1, "carol@x.org", change);
            assert_eq!(
                decode_follower(&payload, 2),
                Some(("carol@x.org".to_owned(), change))
            );
            assert_eq!(decode_follower(&payload, 1), None, "this node's own");
        }
        let mut bad = BytesMut::from(&encode_follower(1, "carol", FollowerChange::Muted)[..]);
        bad[9] = 9;
        assert_eq!(decode_follower(&bad.freeze(), 2), None, "unknown change");
        let bad = encode_follower(1, "no spaces", FollowerChange::Muted);
        assert_eq!(decode_follower(&bad, 2), None, "not a valid id");
        let other = encode_live(
            1,
            &LiveEvent::Aborted {
                group: "team".into(),
                clip_id: ClipId::from_bytes([7; 16]),
                code: ErrorCode::ClipAborted,
            },
        );
        assert_eq!(decode_follower(&other, 2), None, "another kind");
    }

    fn meta() -> ClipMeta {
        ClipMeta {
            group: "team".into(),
            clip_id: ClipId::from_bytes([7; 16]),
            talker: "alice".into(),
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms: 5,
            flags: 1,
        }
    }

    #[test]
    fn live_events_round_trip() {
        let events = [
            LiveEvent::Started { meta: meta() },
            LiveEvent::Frame {
                group: "team".into(),
                clip_id: ClipId::from_bytes([7; 16]),
                index: 3,
                data: Bytes::from_static(b"opus"),
            },
            LiveEvent::Aborted {
                group: "team".into(),
                clip_id: ClipId::from_bytes([7; 16]),
                code: ErrorCode::Preempted,
            },
        ];
        for event in events {
            let mut raw = encode_live(9, &event);
            let kind = raw.get_u8();
            assert_eq!(raw.get_u64(), 9);
            let back = decode_live("team", kind, raw).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{event:?}"));
        }
        assert!(decode_live("team", KIND_FRAME, Bytes::from_static(b"short")).is_none());
    }
}
