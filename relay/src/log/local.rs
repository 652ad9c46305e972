//! The single-node group log: the embedded redb store, and an in-process
//! signal per group that says how far the log has been committed.
//!
//! A feed reads by sequence number, as a JetStream consumer would: it
//! remembers the last sequence number it yielded and, whenever the group's
//! committed sequence number passes it, reads the clips in between from the
//! store. So the order members see is the store's order, whatever order the
//! appending tasks finish in, and a feed that falls behind (or starts far
//! back) only reads more; no queue grows with the number of clips or feeds.
//! Membership and mode changes come from the store's own per-group change
//! signal ([`RedbStore::watch_group`]), whoever made them.

use std::sync::Arc;

use dashmap::DashMap;
use ptt_protocol::ClipId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{FeedEvent, GroupFeed, GroupLog, LiveEvent, LogFuture};
use crate::store::{AppendOutcome, ClipMeta, ClipStore, NewClip, RedbStore, SeqRange, StoredClip};

/// Clips a feed reads from the store at once.
const FEED_BATCH: usize = 16;

/// The single-node [`GroupLog`]. See the module documentation.
#[derive(Clone)]
pub struct LocalLog {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<RedbStore>,
    /// Per group with a feed: the highest sequence number known committed.
    committed: DashMap<String, watch::Sender<u64>>,
    closed: CancellationToken,
}

impl std::fmt::Debug for LocalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLog")
            .field("store", &self.inner.store)
            .field("fed_groups", &self.inner.committed.len())
            .finish()
    }
}

impl LocalLog {
    /// A log over `store`.
    pub fn new(store: Arc<RedbStore>) -> LocalLog {
        LocalLog {
            inner: Arc::new(Inner {
                store,
                committed: DashMap::new(),
                closed: CancellationToken::new(),
            }),
        }
    }
}

impl GroupLog for LocalLog {
    fn append(&self, clip: NewClip) -> LogFuture<'_, AppendOutcome> {
        Box::pin(async move {
            let group = clip.meta.group.clone();
            let outcome = self.inner.store.append_clip(clip).await?;
            if let AppendOutcome::Stored { seq } = outcome
                && let Some(tx) = self.inner.committed.get(&group)
            {
                tx.send_if_modified(|last| raise(last, seq));
            }
            Ok(outcome)
        })
    }

    fn clip_seq(&self, group: &str, clip_id: ClipId) -> LogFuture<'_, Option<u64>> {
        self.inner.store.clip_seq(group, clip_id)
    }

    fn read(&self, group: &str, after: u64, limit: usize) -> LogFuture<'_, Vec<StoredClip>> {
        self.inner.store.clips_after(group, after, limit)
    }

    fn recent(&self, group: &str, count: usize) -> LogFuture<'_, Vec<StoredClip>> {
        self.inner.store.recent_clips(group, count)
    }

    fn meta(&self, group: &str, seq: u64) -> LogFuture<'_, Option<ClipMeta>> {
        self.inner.store.clip_meta(group, seq)
    }

    fn range(&self, group: &str) -> LogFuture<'_, SeqRange> {
        self.inner.store.seq_range(group)
    }

    fn subscribe(&self, group: &str, after: u64) -> LogFuture<'_, Box<dyn GroupFeed>> {
        let group = group.to_owned();
        Box::pin(async move {
            // Register first, then read how far the log is: an append that
            // commits after the read finds the registration and raises it.
            let committed = self
                .inner
                .committed
                .entry(group.clone())
                .or_insert_with(|| watch::Sender::new(0))
                .subscribe();
            let changes = self.inner.store.watch_group(&group);
            let feed = LocalFeed {
                inner: self.inner.clone(),
                group,
                after,
                committed: Some(committed),
                changes: Some(changes),
                pending: std::collections::VecDeque::new(),
                group_dirty: false,
            };
            let last = feed.inner.store.seq_range(&feed.group).await?.last;
            if let Some(tx) = feed.inner.committed.get(&feed.group) {
                tx.send_if_modified(|v| raise(v, last));
            }
            Ok(Box::new(feed) as Box<dyn GroupFeed>)
        })
    }

    fn publishes_live(&self) -> bool {
        false
    }

    fn publish_live(&self, _event: LiveEvent) {
        // One node: its own hub already has every live clip.
    }

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            self.inner.closed.cancel();
            self.inner.store.flush().await
        })
    }
}

fn raise(value: &mut u64, to: u64) -> bool {
    if to > *value {
        *value = to;
        true
    } else {
        false
    }
}

/// A feed of one group from [`LocalLog`].
struct LocalFeed {
    inner: Arc<Inner>,
    group: String,
    /// The last sequence number yielded (or skipped as deleted).
    after: u64,
    committed: Option<watch::Receiver<u64>>,
    changes: Option<watch::Receiver<u64>>,
    pending: std::collections::VecDeque<StoredClip>,
    /// The group's record changed and has not been yielded yet.
    group_dirty: bool,
}

impl LocalFeed {
    async fn next_event(&mut self) -> Result<Option<FeedEvent>, crate::store::StoreError> {
        loop {
            if let Some(clip) = self.pending.pop_front() {
                self.after = clip.seq;
                return Ok(Some(FeedEvent::Stored(clip)));
            }
            let (Some(committed), Some(changes)) = (&mut self.committed, &mut self.changes) else {
                return Ok(None);
            };
            if changes.has_changed().unwrap_or(false) {
                changes.borrow_and_update();
                self.group_dirty = true;
            }
            if self.group_dirty {
                // Cleared only once read: a cancelled read is retried.
                let info = self.inner.store.group(&self.group).await?;
                self.group_dirty = false;
                return Ok(Some(FeedEvent::Group(info)));
            }
            let last = *committed.borrow_and_update();
            if last > self.after {
                let clips = self
                    .inner
                    .store
                    .clips_after(&self.group, self.after, FEED_BATCH)
                    .await?;
                if clips.is_empty() {
                    // Retention deleted what was in between: skip it.
                    self.after = last;
                }
                self.pending
                    .extend(clips.into_iter().filter(|c| c.seq <= last));
                continue;
            }
            tokio::select! {
                _ = self.inner.closed.cancelled() => return Ok(None),
                changed = committed.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                    self.group_dirty = true;
                }
            }
        }
    }
}

impl GroupFeed for LocalFeed {
    fn next(&mut self) -> LogFuture<'_, Option<FeedEvent>> {
        Box::pin(self.next_event())
    }
}

impl Drop for LocalFeed {
    fn drop(&mut self) {
        drop(self.committed.take());
        drop(self.changes.take());
        self.inner
            .committed
            .remove_if(&self.group, |_, tx| tx.receiver_count() == 0);
        self.inner.store.unwatch_group(&self.group);
    }
}
