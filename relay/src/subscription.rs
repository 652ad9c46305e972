//! A member's subscription to one group on one connection, as a state
//! machine without I/O: where catch-up starts and ends, the gap past
//! retention, which clips went out on this connection, the acknowledgements
//! and the durable cursor they move, and the receipts they earn.
//!
//! The session feeds it what happened (`join`, `delivered`, `ack`,
//! `played`, `stored_own`) and acts on what it answers: the messages to send,
//! the receipts to route, the cursor to write. Everything a client can make
//! it hold is bounded by what the relay delivered to that client, never by
//! what the client claims: an ack or a Played for a clip this connection did
//! not deliver is ignored, and the set of delivered clips is pruned as the
//! cursor passes them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use ptt_protocol::ClipId;

use crate::store::SeqRange;

/// Most delivered, unacknowledged clips remembered per subscription; past
/// it the oldest is forgotten (its ack is then ignored, and the clip comes
/// again on the next connection: clients drop repeats by clip id).
pub const MAX_UNACKED: usize = 4096;

/// Acknowledged clips kept after the cursor passed them, so that a Played
/// that follows its ack finds its talker without a store read.
const RECENT_ACKED: usize = 64;

/// What a join decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinPlan {
    /// The cursor to report in `Joined`.
    pub cursor: u64,
    /// Clips `from..=to` were deleted by retention before this member got
    /// them: send `Gap`.
    pub gap: Option<(u64, u64)>,
    /// Catch-up sends stored clips with `after < seq <= to` …
    pub after: u64,
    /// … up to the group's last published clip at the join, which is also
    /// `CaughtUp.seq`.
    pub to: u64,
}

/// A clip delivered on this connection and not yet passed by the cursor.
#[derive(Debug, Clone)]
struct Delivered {
    clip_id: ClipId,
    talker: Arc<str>,
    acked: bool,
    played: bool,
}

/// Who gets a receipt for a clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptTo {
    /// The clip's id.
    pub clip_id: ClipId,
    /// Its talker.
    pub talker: Arc<str>,
}

/// What a Played asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlayedOutcome {
    /// Send this receipt.
    Receipt(ReceiptTo),
    /// The clip was delivered before this connection (it is at or below
    /// the cursor): look its talker up in the store, then send a receipt.
    Lookup,
    /// Not a clip delivered to this member, or played before: nothing.
    Ignore,
}

/// One member's subscription to one group on one connection. See the
/// module documentation.
#[derive(Debug)]
pub struct Subscription {
    member: Arc<str>,
    /// The durable cursor as far as this connection knows it.
    cursor: u64,
    /// Clips up to here are gone past retention (a gap was announced);
    /// the cursor moves past them once the clips after them are acked.
    floor: u64,
    /// Clips delivered on this connection above the cursor.
    delivered: BTreeMap<u64, Delivered>,
    /// Recently acknowledged clips below the cursor: `(seq, receipt, played)`.
    recent: VecDeque<(u64, ReceiptTo, bool)>,
    /// The cursor last handed out to be written.
    written: u64,
    /// The cursor known stored (at the join, or by a finished write).
    confirmed: u64,
}

impl Subscription {
    /// A new subscription of `member`.
    pub fn new(member: Arc<str>) -> Subscription {
        Subscription {
            member,
            cursor: 0,
            floor: 0,
            delivered: BTreeMap::new(),
            recent: VecDeque::new(),
            written: 0,
            confirmed: 0,
        }
    }

    /// The cursor as this connection knows it.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// A join (or a join again) with the member's stored cursor, the
    /// group's retained range and the last clip published at the join.
    pub fn join(&mut self, stored_cursor: u64, range: SeqRange, last_seq: u64) -> JoinPlan {
        self.confirmed = self.confirmed.max(stored_cursor);
        if stored_cursor > self.cursor {
            self.cursor = stored_cursor;
            self.written = self.written.max(stored_cursor);
            self.prune();
        }
        let reported = self.cursor;
        let mut after = self.cursor.max(self.floor);
        let mut gap = None;
        if range.first > after + 1 && after < last_seq {
            let to = (range.first - 1).min(last_seq);
            gap = Some((after + 1, to));
            self.floor = to;
            after = to;
            if to == last_seq {
                // Nothing stored follows the gap: nothing will be acked to
                // move the cursor past it, so it moves now.
                self.cursor = to;
            }
            // Acks already made above the gap may move the cursor now.
            self.advance();
        }
        JoinPlan {
            cursor: reported,
            gap,
            after,
            to: last_seq,
        }
    }

    /// The clips in `after < seq <= to` this connection already had.
    pub fn delivered_in(&self, after: u64, to: u64) -> std::collections::HashSet<u64> {
        let above = after.max(self.cursor);
        // An empty range (nothing to catch up) must not reach `range`,
        // which panics when its start passes its end.
        let mut had: std::collections::HashSet<u64> = if above < to {
            self.delivered
                .range(above + 1..=to)
                .map(|(seq, _)| *seq)
                .collect()
        } else {
            Default::default()
        };
        had.extend(
            self.recent
                .iter()
                .map(|(seq, _, _)| *seq)
                .filter(|seq| *seq > after && *seq <= to),
        );
        had
    }

    /// Whether an ack of `seq` is one this connection is owed (a clip it
    /// delivered and that is not acknowledged yet).
    pub fn expects_ack(&self, seq: u64) -> bool {
        self.delivered.get(&seq).is_some_and(|d| !d.acked)
    }

    /// Whether a Played of `seq` is one this connection is owed.
    pub fn expects_played(&self, seq: u64) -> bool {
        self.delivered.get(&seq).is_some_and(|d| !d.played)
            || self
                .recent
                .iter()
                .any(|(s, _, played)| *s == seq && !played)
    }

    /// Clip `seq` by `talker` was written whole on this connection.
    pub fn delivered(&mut self, seq: u64, clip_id: ClipId, talker: Arc<str>) {
        if seq <= self.cursor || self.delivered.contains_key(&seq) {
            return;
        }
        if self.delivered.len() >= MAX_UNACKED {
            self.delivered.pop_first();
        }
        self.delivered.insert(
            seq,
            Delivered {
                clip_id,
                talker,
                acked: false,
                played: false,
            },
        );
    }

    /// This member talked clip `seq` on this connection: storing it is its
    /// delivery and its acknowledgement (no receipt to oneself).
    pub fn stored_own(&mut self, seq: u64, clip_id: ClipId) {
        if seq <= self.cursor {
            return;
        }
        self.delivered.insert(
            seq,
            Delivered {
                clip_id,
                talker: self.member.clone(),
                acked: true,
                played: true,
            },
        );
        self.advance();
    }

    /// Clip `seq` was deleted by an administrator (a `ClipDeleted`, or a
    /// hole a catch-up found): it counts as received and acknowledged, so
    /// the cursor moves past it.
    pub fn deleted(&mut self, seq: u64) {
        if seq <= self.cursor {
            return;
        }
        if let Some(entry) = self.delivered.get_mut(&seq) {
            entry.acked = true;
            entry.played = true;
        } else {
            if self.delivered.len() >= MAX_UNACKED {
                self.delivered.pop_first();
            }
            self.delivered.insert(
                seq,
                Delivered {
                    clip_id: ClipId::default(),
                    talker: self.member.clone(),
                    acked: true,
                    played: true,
                },
            );
        }
        self.advance();
    }

    /// A DeliveryAck for `seq`: the receipt to send, if it earns one. An
    /// ack for a clip not delivered on this connection is ignored.
    pub fn ack(&mut self, seq: u64) -> Option<ReceiptTo> {
        let entry = self.delivered.get_mut(&seq)?;
        if entry.acked {
            return None;
        }
        entry.acked = true;
        let receipt = (entry.talker != self.member).then(|| ReceiptTo {
            clip_id: entry.clip_id,
            talker: entry.talker.clone(),
        });
        self.advance();
        receipt
    }

    /// A Played for `seq`.
    pub fn played(&mut self, seq: u64) -> PlayedOutcome {
        let member = self.member.clone();
        if let Some(entry) = self.delivered.get_mut(&seq) {
            if entry.played || entry.talker == member {
                return PlayedOutcome::Ignore;
            }
            entry.played = true;
            return PlayedOutcome::Receipt(ReceiptTo {
                clip_id: entry.clip_id,
                talker: entry.talker.clone(),
            });
        }
        if let Some((_, receipt, played)) = self.recent.iter_mut().find(|(s, _, _)| *s == seq) {
            if *played || receipt.talker == member {
                return PlayedOutcome::Ignore;
            }
            *played = true;
            return PlayedOutcome::Receipt(receipt.clone());
        }
        if seq <= self.cursor && seq > 0 {
            PlayedOutcome::Lookup
        } else {
            PlayedOutcome::Ignore
        }
    }

    /// The cursor to write, if it moved since the last one handed out.
    /// Only the newest matters: the caller writes one at a time and asks
    /// again when that write is done.
    pub fn take_cursor_write(&mut self) -> Option<u64> {
        (self.cursor > self.written).then(|| {
            self.written = self.cursor;
            self.cursor
        })
    }

    /// A write of `cursor` finished.
    pub fn confirm(&mut self, cursor: u64) {
        self.confirmed = self.confirmed.max(cursor);
    }

    /// The cursor, if it moved beyond what is known stored (to write when
    /// the connection closes).
    pub fn unconfirmed(&self) -> Option<u64> {
        (self.cursor > self.confirmed).then_some(self.cursor)
    }

    /// Delivered clips remembered above the cursor.
    pub fn pending(&self) -> usize {
        self.delivered.len()
    }

    /// Moves the cursor over the contiguous acknowledged clips (past the
    /// gap, if one was announced).
    fn advance(&mut self) {
        let mut next = self.cursor.max(self.floor) + 1;
        while self.delivered.get(&next).is_some_and(|d| d.acked) {
            self.cursor = next;
            next += 1;
        }
        self.prune();
    }

    /// Forgets delivered clips at or below the cursor (keeping a few for
    /// late Played messages).
    fn prune(&mut self) {
        while let Some(entry) = self.delivered.first_entry() {
            if *entry.key() > self.cursor {
                break;
            }
            let (seq, d) = entry.remove_entry();
            self.recent.push_back((
                seq,
                ReceiptTo {
                    clip_id: d.clip_id,
                    talker: d.talker,
                },
                d.played,
            ));
            if self.recent.len() > RECENT_ACKED {
                self.recent.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ClipId {
        ClipId::from_bytes([n; 16])
    }

    fn alice() -> Subscription {
        Subscription::new("alice".into())
    }

    fn deliver(sub: &mut Subscription, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            sub.delivered(seq, id(seq as u8), "bob".into());
        }
    }

    #[test]
    fn join_without_history_catches_up_to_the_snapshot() {
        let mut sub = alice();
        let plan = sub.join(3, SeqRange { first: 1, last: 7 }, 7);
        assert_eq!(
            plan,
            JoinPlan {
                cursor: 3,
                gap: None,
                after: 3,
                to: 7
            }
        );
        // Nothing to send: CaughtUp still names the snapshot.
        let plan = alice().join(7, SeqRange { first: 1, last: 7 }, 7);
        assert_eq!((plan.after, plan.to), (7, 7));
    }

    /// Issue #9, bug 1: 8 clips, retention keeps 4..8, a member that never
    /// connected joins, gets Gap{1..3} and clips 4..8, acks them: the cursor
    /// moves to 8 and the next join reports it, without the gap.
    #[test]
    fn the_cursor_moves_past_a_gap_once_the_clips_after_it_are_acked() {
        let range = SeqRange { first: 4, last: 8 };
        let mut sub = alice();
        let plan = sub.join(0, range, 8);
        assert_eq!(plan.gap, Some((1, 3)));
        assert_eq!((plan.cursor, plan.after, plan.to), (0, 3, 8));
        deliver(&mut sub, 4..=8);
        // Acks out of order: nothing moves until 4 is acked.
        for seq in [8, 6, 5, 7] {
            sub.ack(seq);
            assert_eq!(sub.cursor(), 0);
        }
        sub.ack(4);
        assert_eq!(sub.cursor(), 8);
        assert_eq!(sub.take_cursor_write(), Some(8));
        assert_eq!(sub.take_cursor_write(), None);
        // The next connection starts from the stored cursor.
        let mut next = alice();
        let plan = next.join(8, range, 8);
        assert_eq!(plan.gap, None);
        assert_eq!((plan.cursor, plan.after), (8, 8));
    }

    #[test]
    fn a_gap_with_nothing_after_it_moves_the_cursor_at_once() {
        let range = SeqRange { first: 9, last: 8 };
        let mut sub = alice();
        let plan = sub.join(2, range, 8);
        assert_eq!(plan.gap, Some((3, 8)));
        assert_eq!((plan.cursor, plan.after, plan.to), (2, 8, 8));
        assert_eq!(sub.cursor(), 8);
        assert_eq!(sub.take_cursor_write(), Some(8));
        let again = alice().join(8, range, 8);
        assert_eq!(again.gap, None);
    }

    #[test]
    fn acks_for_clips_never_delivered_are_ignored() {
        let mut sub = alice();
        sub.join(0, SeqRange { first: 1, last: 0 }, 0);
        for seq in [1, 2, 1_000_000, u64::MAX] {
            assert_eq!(sub.ack(seq), None);
        }
        assert_eq!(sub.cursor(), 0);
        assert_eq!(sub.take_cursor_write(), None);
        assert_eq!(sub.pending(), 0);
        assert_eq!(sub.played(1), PlayedOutcome::Ignore);
    }

    #[test]
    fn each_ack_earns_one_receipt_and_the_delivered_set_is_pruned_at_the_cursor() {
        let mut sub = alice();
        sub.join(0, SeqRange { first: 1, last: 0 }, 0);
        deliver(&mut sub, 1..=3);
        assert_eq!(
            sub.ack(1),
            Some(ReceiptTo {
                clip_id: id(1),
                talker: "bob".into()
            })
        );
        assert_eq!(sub.ack(1), None, "a repeated ack earns nothing");
        assert_eq!(sub.pending(), 2);
        sub.ack(3);
        assert_eq!(sub.cursor(), 1);
        sub.ack(2);
        assert_eq!(sub.cursor(), 3);
        assert_eq!(sub.pending(), 0);
        assert!(sub.delivered_in(0, 3).contains(&2));
        // A clip delivered again below the cursor is not remembered twice.
        sub.delivered(2, id(2), "bob".into());
        assert_eq!(sub.pending(), 0);
    }

    /// A join again with nothing to catch up, while clips delivered on
    /// this connection are remembered, asks for an empty range.
    #[test]
    fn an_empty_catch_up_range_is_empty_not_a_panic() {
        let mut sub = alice();
        sub.join(0, SeqRange { first: 1, last: 0 }, 0);
        deliver(&mut sub, [1, 2]);
        assert!(sub.delivered_in(2, 2).is_empty());
        assert!(sub.delivered_in(5, 2).is_empty());
        assert_eq!(sub.delivered_in(0, 2).len(), 2);
    }

    #[test]
    fn cursor_writes_coalesce_to_the_newest() {
        let mut sub = alice();
        sub.join(0, SeqRange { first: 1, last: 0 }, 0);
        deliver(&mut sub, 1..=100);
        sub.ack(1);
        assert_eq!(sub.take_cursor_write(), Some(1));
        // While that write is in flight, 99 more acks: one write follows.
        for seq in 2..=100 {
            sub.ack(seq);
        }
        assert_eq!(sub.take_cursor_write(), Some(100));
        assert_eq!(sub.take_cursor_write(), None);
        // Until a write is confirmed, closing writes the cursor.
        assert_eq!(sub.unconfirmed(), Some(100));
        sub.confirm(1);
        assert_eq!(sub.unconfirmed(), Some(100));
        sub.confirm(100);
        assert_eq!(sub.unconfirmed(), None);
    }

    #[test]
    fn played_earns_one_receipt_even_after_the_ack() {
        let mut sub = alice();
        sub.join(5, SeqRange { first: 1, last: 5 }, 5);
        deliver(&mut sub, [6]);
        sub.ack(6);
        assert_eq!(
            sub.played(6),
            PlayedOutcome::Receipt(ReceiptTo {
                clip_id: id(6),
                talker: "bob".into()
            })
        );
        assert_eq!(sub.played(6), PlayedOutcome::Ignore);
        // Delivered on an earlier connection: at or below the cursor.
        assert_eq!(sub.played(3), PlayedOutcome::Lookup);
        assert_eq!(sub.played(7), PlayedOutcome::Ignore);
        assert_eq!(sub.played(0), PlayedOutcome::Ignore);
    }

    #[test]
    fn own_clips_count_as_acked_without_a_receipt() {
        let mut sub = alice();
        sub.join(0, SeqRange { first: 1, last: 0 }, 0);
        deliver(&mut sub, [1]);
        sub.stored_own(2, id(2));
        assert_eq!(sub.cursor(), 0);
        sub.ack(1);
        assert_eq!(sub.cursor(), 2);
        assert_eq!(sub.played(2), PlayedOutcome::Ignore);
        // Another device of the same user: no receipt to oneself.
        sub.delivered(3, id(3), "alice".into());
        assert_eq!(sub.ack(3), None);
        assert_eq!(sub.cursor(), 3);
    }

    #[test]
    fn a_client_that_never_acks_is_remembered_up_to_a_bound() {
        let mut sub = alice();
        sub.join(0, SeqRange { first: 1, last: 0 }, 0);
        deliver(&mut sub, 1..=(MAX_UNACKED as u64 + 100));
        assert_eq!(sub.pending(), MAX_UNACKED);
    }

    #[test]
    fn a_deleted_clip_counts_as_received_and_moves_the_cursor() {
        let mut sub = Subscription::new("bob".into());
        sub.join(0, SeqRange { first: 1, last: 4 }, 4);
        let id = ClipId::from_bytes([1; 16]);
        for seq in [1, 3] {
            sub.delivered(seq, id, "alice".into());
            sub.ack(seq);
        }
        assert_eq!(sub.cursor(), 1, "2 is missing");
        sub.deleted(2);
        assert_eq!(sub.cursor(), 3, "2 deleted: the cursor moves past it");
        // Deleted while delivered and not yet acknowledged: no receipt
        // is owed, the cursor moves.
        sub.delivered(4, id, "alice".into());
        sub.deleted(4);
        assert_eq!(sub.cursor(), 4);
        assert!(!sub.expects_ack(4));
        // At or below the cursor: nothing changes.
        sub.deleted(1);
        assert_eq!((sub.cursor(), sub.pending()), (4, 0));
    }
}
