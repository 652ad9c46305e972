//! DeliveryAck and Played: the cursor and the talker's receipts.

use std::sync::Arc;

use ptt_protocol::ReceiptKind;

use crate::session::{MAX_LOOKUPS, Session, TaskDone};
use crate::subscription::PlayedOutcome;

impl Session {
    /// DeliveryAck: moves the cursor (written coalesced, one write at a
    /// time per group) and sends the talker a Delivered receipt. Ignored
    /// for clips not delivered on this connection.
    pub(super) fn ack(&mut self, group: &str, seq: u64) {
        self.sync_delivered(group);
        let Some(joined) = self.joined.get_mut(group) else {
            return;
        };
        if let Some(to) = joined.sub.ack(seq) {
            self.ctx.hub.send_receipt(
                &to.talker,
                group,
                seq,
                to.clip_id,
                &self.handle.user,
                ReceiptKind::Delivered,
            );
        }
        let key: Arc<str> = group.into();
        self.write_cursor(&key);
    }

    /// Played: a Played receipt to the talker, once per clip; for a clip
    /// delivered before this connection (at or below the cursor) the
    /// talker is looked up, a bounded number of look-ups at a time.
    pub(super) fn played(&mut self, group: &str, seq: u64) {
        self.sync_delivered(group);
        let Some(joined) = self.joined.get_mut(group) else {
            return;
        };
        match joined.sub.played(seq) {
            PlayedOutcome::Receipt(to) => self.ctx.hub.send_receipt(
                &to.talker,
                group,
                seq,
                to.clip_id,
                &self.handle.user,
                ReceiptKind::Played,
            ),
            PlayedOutcome::Lookup if self.lookups < MAX_LOOKUPS => {
                self.lookups += 1;
                let (log, hub) = (self.ctx.log.clone(), self.ctx.hub.clone());
                let member = self.handle.user.clone();
                let group = group.to_owned();
                self.deliveries.spawn(async move {
                    if let Ok(Some(meta)) = log.meta(&group, seq).await
                        && meta.talker != *member
                    {
                        hub.send_receipt(
                            &meta.talker,
                            &group,
                            seq,
                            meta.clip_id,
                            &member,
                            ReceiptKind::Played,
                        );
                    }
                    TaskDone::LookedUp
                });
            }
            PlayedOutcome::Lookup | PlayedOutcome::Ignore => {}
        }
    }
}
