//! Join and Leave: a member's subscription to a group on this connection.

use std::sync::Arc;

use ptt_protocol::{ControlMessage, ErrorCode, GroupMode};

use crate::delivery::Sink;
use crate::session::{Joined, Session};
use crate::subscription::Subscription;

impl Session {
    /// Join: subscribe, answer `Joined` (with the cursor and where
    /// catch-up ends), announce a gap past retention and the floor's
    /// holder, then deliver what is in flight and catch up from the log.
    pub(super) async fn join(&mut self, request_id: u64, group: String) {
        let hub = self.ctx.hub.clone();
        let snapshot = match hub.join(&group, &self.handle).await {
            Ok(s) => s,
            Err(code_) => {
                self.reply_result(request_id, Err(code_)).await;
                return;
            }
        };
        let user = self.handle.user.clone();
        // Read after the hub registered the session: a clip deleted from
        // here on reaches it live, one deleted before is in the store.
        let looked_up = tokio::try_join!(
            self.ctx.store.cursor(&group, &user),
            self.ctx.log.range(&group),
            crate::admin::tombstones_for(&*self.ctx.store, &group, &user),
        );
        let (cursor, range, tombstones) = match looked_up {
            Ok(v) => v,
            Err(e) => {
                if !self.joined.contains_key(group.as_str()) {
                    hub.leave(&group, self.handle.id);
                }
                self.reply_result(request_id, Err(e.code())).await;
                return;
            }
        };
        let key: Arc<str> = group.as_str().into();
        self.joined.entry(key.clone()).or_insert_with(|| {
            Box::new(Joined {
                sub: Subscription::new(user.clone()),
                tasks: Vec::new(),
                sink: Sink::new(ErrorCode::ShuttingDown),
                writing: false,
            })
        });
        self.sync_delivered(&group);
        let joined = self.joined.get_mut(&key).expect("inserted above");
        joined.sink.set_header_flag(
            ptt_protocol::ClipHeader::FLAG_MUTED,
            snapshot.follower.is_some_and(|f| f.muted),
        );
        let live_budget_ms = self
            .ctx
            .live_budget_ms(snapshot.mode, snapshot.live_budget_ms);
        joined.sink.set_live_budget(live_budget_ms);
        let plan = joined.sub.join(cursor, range, snapshot.last_seq);
        self.send(ControlMessage::Joined {
            request_id,
            group: group.clone(),
            mode: snapshot.mode,
            cursor: plan.cursor,
            last_seq: plan.to,
            live_budget_ms,
        })
        .await;
        if let Some((from_seq, to_seq)) = plan.gap {
            self.send(ControlMessage::Gap {
                group: group.clone(),
                from_seq,
                to_seq,
            })
            .await;
        }
        // Clips deleted while the member was away: its app drops them.
        for tombstone in tombstones {
            if let ControlMessage::ClipDeleted { seq, .. } = &tombstone {
                self.joined
                    .get_mut(&key)
                    .expect("inserted above")
                    .sub
                    .deleted(*seq);
            }
            self.send(tombstone).await;
        }
        if let Err(e) = self.ctx.store.touch_member(&group, &user).await {
            tracing::debug!(error = %e, %group, "recording last seen failed");
        }
        if snapshot.mode == GroupMode::Walkie
            && let Some((user, emergency)) = snapshot.floor
        {
            // A reconnecting client learns who talks.
            self.send(ControlMessage::FloorTaken {
                group: group.clone(),
                user,
                emergency,
            })
            .await;
        }
        for clip in snapshot.active {
            if clip.talker_session != self.handle.id {
                self.spawn_live(clip);
            }
        }
        self.spawn_catch_up(key.clone(), plan.after, plan.to);
        // A gap with nothing after it moved the cursor.
        self.write_cursor(&key);
    }

    /// Leave: this connection stops receiving the group. Deliveries under
    /// way finish; the cursor is written; a floor it held is released.
    pub(super) async fn leave(&mut self, request_id: u64, group: String) {
        self.ctx.hub.leave(&group, self.handle.id);
        self.ctx.floor.release(&group, self.handle.id).await;
        let key: Arc<str> = group.as_str().into();
        self.sync_delivered(&group);
        self.final_cursor_write(&key);
        self.joined.remove(&key);
        self.send(ControlMessage::Ok { request_id }).await;
    }
}
