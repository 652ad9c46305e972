//! FetchRecent: a group's (or a followed channel's) newest stored clips
//! again; FetchClip: one stored clip again (members and admins: the
//! command line exports clips with it).

use std::sync::Arc;

use ptt_protocol::ErrorCode;

use crate::delivery::{self, Delivery, Sink};
use crate::session::{Session, TaskDone};
use crate::store::StoredClip;

/// Most clips one fetch may ask for.
const MAX_FETCH: u32 = 100;

/// Most fetches in flight per connection: each may read up to `MAX_FETCH`
/// clips into memory.
pub(in crate::session) const MAX_FETCHES: usize = 2;

impl Session {
    /// FetchRecent: the newest `count` clips (at most 100), flagged
    /// FETCHED, then FetchDone; for the group's members and a channel's
    /// followers alike. A third fetch while two are under way is refused
    /// with `RateLimited`.
    pub(super) async fn fetch(&mut self, request_id: u64, group: String, count: u32) {
        if let Err(code_) = self.ctx.hub.listener_group(&group, &self.handle.user).await {
            self.reply_result(request_id, Err(code_)).await;
            return;
        }
        let log = self.ctx.log.clone();
        let key: Arc<str> = group.as_str().into();
        let read = {
            let key = key.clone();
            async move {
                log.recent(&key, count.min(MAX_FETCH) as usize)
                    .await
                    .unwrap_or_default()
            }
        };
        self.spawn_fetch(request_id, key, read).await;
    }

    /// FetchClip: clip `seq` of the group, flagged FETCHED, then
    /// FetchDone (count 1); `NoSuchClip` if it is not stored. For the
    /// group's members and for admins; counts as a fetch in flight.
    pub(super) async fn fetch_clip(&mut self, request_id: u64, group: String, seq: u64) {
        if !self.claims.adm
            && let Err(code_) = self.ctx.hub.member_group(&group, &self.handle.user).await
        {
            self.reply_result(request_id, Err(code_)).await;
            return;
        }
        match self.ctx.log.meta(&group, seq).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.reply_result(request_id, Err(ErrorCode::NoSuchClip))
                    .await;
                return;
            }
            Err(e) => {
                self.reply_result(request_id, Err(e.code())).await;
                return;
            }
        }
        let log = self.ctx.log.clone();
        let key: Arc<str> = group.as_str().into();
        let read = {
            let key = key.clone();
            async move {
                let mut clips = log
                    .read(&key, seq.saturating_sub(1), 1)
                    .await
                    .unwrap_or_default();
                clips.retain(|c| c.seq == seq);
                clips
            }
        };
        self.spawn_fetch(request_id, key, read).await;
    }

    /// Takes one of the connection's fetch slots (or answers
    /// `RateLimited`) and delivers the clips `read` yields, flagged
    /// FETCHED, then FetchDone with how many were delivered whole.
    async fn spawn_fetch(
        &mut self,
        request_id: u64,
        group: Arc<str>,
        read: impl Future<Output = Vec<StoredClip>> + Send + 'static,
    ) {
        if self.fetches >= MAX_FETCHES {
            self.reply_result(request_id, Err(ErrorCode::RateLimited))
                .await;
            return;
        }
        self.fetches += 1;
        let conn = self.conn.clone();
        self.deliveries.spawn(async move {
            let sink = Sink::new(ErrorCode::ShuttingDown);
            let mut count = 0;
            for clip in &read.await {
                if let Delivery::Complete = delivery::deliver_stored(&conn, clip, true, &sink).await
                {
                    count += 1;
                }
            }
            TaskDone::Fetched {
                request_id,
                group,
                count,
            }
        });
    }
}
