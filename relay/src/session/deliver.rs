//! The session's side of delivery: the tasks that write clips to this
//! connection (live, catch-up, recovery after a cut) and the cursor writes
//! that follow the member's acknowledgements.
//!
//! Every task of a joined group stops when the member leaves the group or
//! the session closes; a stream it leaves half-written is reset with the
//! group's drop code.

use std::collections::HashSet;
use std::sync::Arc;

use crate::transport::Connection;

use super::{Session, TaskDone};
use crate::delivery::{self, Delivery, Sink};
use crate::live::LiveClip;
use crate::log::GroupLog;

/// Most clips a catch-up reads from the log at once.
const CATCH_UP_BATCH: usize = 16;

impl Session {
    /// Runs a task of `group`'s subscription (aborted if the member is
    /// removed, its stream then reset with the group's drop code); `false`
    /// if not joined.
    fn spawn_for(
        &mut self,
        group: &str,
        task: impl Future<Output = TaskDone> + Send + 'static,
    ) -> bool {
        let Some(joined) = self.joined.get_mut(group) else {
            return false;
        };
        joined.tasks.push(self.deliveries.spawn(task));
        true
    }

    fn sink(&self, group: &str) -> Option<Sink> {
        self.joined.get(group).map(|j| j.sink.clone())
    }

    /// Delivers a clip in flight (or just complete) from its buffer.
    pub(super) fn spawn_live(&mut self, clip: Arc<LiveClip>) {
        let Some(sink) = self.sink(&clip.meta.group) else {
            return;
        };
        let conn = self.conn.clone();
        let lag = self.ctx.lag_policy(clip.meta.frame_ms);
        let group: Arc<str> = clip.meta.group.as_str().into();
        if let Some(peer) = self.bound_media() {
            self.spawn_for(&group.clone(), async move {
                let result =
                    crate::media::deliver_live_media(&conn, &clip, &sink, &peer, lag.max_stall)
                        .await;
                TaskDone::Clip {
                    group,
                    clip: Some(clip),
                    result,
                }
            });
            return;
        }
        let reads = self.live_reads.get_or_insert_default().clone();
        self.spawn_for(&group.clone(), async move {
            let result = delivery::deliver_live(&conn, &clip, lag, &sink, &reads).await;
            TaskDone::Clip {
                group,
                clip: Some(clip),
                result,
            }
        });
    }

    /// After a cut: wait for the clip to be stored, then send it from the
    /// log, whole.
    pub(super) fn spawn_recovery(&mut self, group: Arc<str>, clip: Arc<LiveClip>) {
        let Some(sink) = self.sink(&group) else {
            return;
        };
        let conn = self.conn.clone();
        let log = self.ctx.log.clone();
        self.spawn_for(&group.clone(), async move {
            let seq = clip.stored().await;
            drop(clip);
            let result = match seq {
                Some(seq) => match log.read(&group, seq - 1, 1).await {
                    Ok(clips) if clips.first().is_some_and(|c| c.seq == seq) => {
                        delivery::deliver_stored(&conn, &clips[0], false, &sink).await
                    }
                    _ => Delivery::Aborted,
                },
                None => Delivery::Aborted,
            };
            TaskDone::Clip {
                group,
                clip: None,
                result,
            }
        });
    }

    /// Sends the stored clips `after < seq <= to` this connection has not
    /// had, then `CaughtUp{to}`.
    pub(super) fn spawn_catch_up(&mut self, group: Arc<str>, after: u64, to: u64) {
        let Some(joined) = self.joined.get(&group) else {
            return;
        };
        let skip = joined.sub.delivered_in(after, to);
        let sink = joined.sink.clone();
        let conn = self.conn.clone();
        let log = self.ctx.log.clone();
        self.spawn_for(&group.clone(), async move {
            let deleted = catch_up(&conn, &*log, &group, after, to, &skip, &sink).await;
            TaskDone::CaughtUp {
                group,
                seq: to,
                deleted,
            }
        });
    }

    /// Writes `group`'s cursor if it moved, one write at a time per group:
    /// acknowledgements that arrive meanwhile coalesce into the next write.
    pub(super) fn write_cursor(&mut self, group: &Arc<str>) {
        let Some(joined) = self.joined.get_mut(group) else {
            return;
        };
        if joined.writing {
            return;
        }
        let Some(cursor) = joined.sub.take_cursor_write() else {
            return;
        };
        joined.writing = true;
        self.spawn_cursor_write(group.clone(), cursor);
    }

    fn spawn_cursor_write(&mut self, group: Arc<str>, cursor: u64) {
        let store = self.ctx.store.clone();
        let user = self.handle.user.clone();
        self.writes += 1;
        self.deliveries.spawn(async move {
            let stored = match store.advance_cursor(&group, &user, cursor).await {
                Ok(()) => Some(cursor),
                Err(e) => {
                    tracing::warn!(error = %e, %group, "cursor update failed");
                    None
                }
            };
            TaskDone::CursorWritten(group, stored)
        });
    }

    /// A cursor write finished: write the newest, if it moved meanwhile.
    pub(super) fn cursor_written(&mut self, group: &Arc<str>) {
        if let Some(joined) = self.joined.get_mut(group) {
            joined.writing = false;
        }
        self.write_cursor(group);
    }

    /// Writes the cursor of a group this connection stops receiving
    /// (leave, removal, close), even if a write is in flight: the newest
    /// value is the one that counts, and cursors only move forward.
    pub(super) fn final_cursor_write(&mut self, group: &Arc<str>) {
        if let Some(cursor) = self
            .joined
            .get_mut(group)
            .and_then(|j| j.sub.take_cursor_write())
        {
            self.spawn_cursor_write(group.clone(), cursor);
        }
    }
}

/// Most holes (deleted clips) one catch-up reports; past it the cursor
/// waits for the next join to move past the rest.
const MAX_HOLES: usize = crate::subscription::MAX_UNACKED;

/// Sends stored clips with `after < seq <= to` that are not in `skip`;
/// returns the seqs missing between the clips it read (deleted by an
/// administrator; a read that failed reports none).
async fn catch_up(
    conn: &Connection,
    log: &dyn GroupLog,
    group: &str,
    after: u64,
    to: u64,
    skip: &HashSet<u64>,
    sink: &Sink,
) -> Vec<u64> {
    let mut holes = Vec::new();
    let mut reached = after;
    let complete = send_stored(conn, log, group, after, to, skip, sink, &mut |seq| {
        holes.extend((reached + 1..seq).take(MAX_HOLES.saturating_sub(holes.len())));
        reached = seq;
    })
    .await;
    if complete && reached < to {
        holes.extend((reached + 1..=to).take(MAX_HOLES.saturating_sub(holes.len())));
    }
    holes
}

/// The catch-up loop: `seen` is called with each stored seq read, in
/// order; returns whether it read to the end of the log (no failure).
#[allow(clippy::too_many_arguments)]
async fn send_stored(
    conn: &Connection,
    log: &dyn GroupLog,
    group: &str,
    mut after: u64,
    to: u64,
    skip: &HashSet<u64>,
    sink: &Sink,
    seen: &mut impl FnMut(u64),
) -> bool {
    while after < to {
        let clips = match log.read(group, after, CATCH_UP_BATCH).await {
            Ok(clips) if !clips.is_empty() => clips,
            Ok(_) => return true,
            Err(crate::store::StoreError::Corrupt { .. }) => {
                // One damaged clip must not hide the ones after it: read
                // one at a time and step over the damaged one.
                match log.read(group, after, 1).await {
                    Ok(clips) if !clips.is_empty() => clips,
                    Ok(_) => return true,
                    Err(e) => {
                        tracing::error!(error = %e, seq = after + 1, "skipping a damaged clip");
                        after += 1;
                        // Not a hole: the clip is there, only unreadable.
                        seen(after);
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "catch-up read failed");
                return false;
            }
        };
        for clip in clips {
            if clip.seq > to {
                return true;
            }
            after = clip.seq;
            seen(clip.seq);
            if skip.contains(&clip.seq) {
                continue;
            }
            if let Delivery::Failed = delivery::deliver_stored(conn, &clip, false, sink).await {
                return false;
            }
        }
    }
    true
}
