//! Control messages, each handled in the module named for it (as
//! mini-redis's `cmd/`): [`join`] (Join, Leave), [`floor`] (FloorRequest,
//! FloorRelease), [`ack`] (DeliveryAck, Played), [`fetch`] (FetchRecent),
//! [`admin`] (group administration and lists), [`channel`] (roles and
//! broadcast channels), [`media`] (the UDP media path).
//!
//! Every message costs a token of the connection's rate limit, except an
//! acknowledgement or Played of a clip delivered on this connection and not
//! yet acknowledged or played (those are bounded by what the relay sent),
//! and except on connections whose token has the admin claim: operators'
//! tools create groups and add thousands of members in one go, and whoever
//! holds an admin token can change every group anyway.

use std::time::Instant;

use ptt_protocol::{ControlMessage, ErrorCode};

use super::Session;

mod ack;
mod admin;
mod channel;
mod fetch;
mod floor;
mod join;
mod media;

/// Why a message closes the connection: the code and the reason.
pub(super) type Fatal = (ErrorCode, String);

impl Session {
    /// Handles a control message; `Err` closes the connection.
    pub(super) async fn handle_control(&mut self, message: ControlMessage) -> Result<(), Fatal> {
        use ControlMessage as M;
        if !self.claims.adm && self.charged(&message) {
            let limited = self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle_control(Instant::now());
            if let Err(code) = limited {
                crate::metrics::Metrics::get()
                    .control_rate_limited
                    .increment(1);
                return Err((code, "too many control messages".into()));
            }
        }
        match message {
            M::Join { request_id, group } => self.join(request_id, group).await,
            M::Leave { request_id, group } => self.leave(request_id, group).await,
            M::FloorRequest {
                request_id,
                group,
                emergency,
            } => self.request_floor(request_id, group, emergency).await,
            M::FloorRelease { group } => self.release_floor(&group).await,
            M::DeliveryAck { group, seq } => self.ack(&group, seq),
            M::Played { group, seq } => self.played(&group, seq),
            M::FetchRecent {
                request_id,
                group,
                count,
            } => self.fetch(request_id, group, count).await,
            M::CreateGroup { .. }
            | M::AddMember { .. }
            | M::RemoveMember { .. }
            | M::SetMode { .. }
            | M::SetLiveBudget { .. }
            | M::DeleteClip { .. } => self.admin(message).await,
            M::ListMemberStatus { request_id, group } => {
                let result = self.member_status(request_id, group).await;
                self.reply_result(request_id, result).await;
            }
            M::ListClips {
                request_id,
                group,
                after_seq,
                limit,
            } => {
                let result = self.list_clips(request_id, group, after_seq, limit).await;
                self.reply_result(request_id, result).await;
            }
            M::FetchClip {
                request_id,
                group,
                seq,
            } => self.fetch_clip(request_id, group, seq).await,
            M::ListGroups { request_id } => {
                let result = self.list_groups(request_id).await;
                self.reply_result(request_id, result).await;
            }
            M::ListMembers { request_id, group } => {
                let result = self.list_members(request_id, group).await;
                self.reply_result(request_id, result).await;
            }
            M::Channel(message) => return self.channel(message).await,
            M::Media(message) => return self.media(message).await,
            M::Hello { .. } => return Err((ErrorCode::Protocol, "a second hello".into())),
            M::Unknown { kind } => tracing::debug!(kind, "unknown control message skipped"),
            other => {
                return Err((
                    ErrorCode::Protocol,
                    format!(
                        "message type {:#x} is sent by relays, not clients",
                        other.kind()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether `message` takes a token of the rate limit.
    fn charged(&mut self, message: &ControlMessage) -> bool {
        let (group, seq, played) = match message {
            ControlMessage::DeliveryAck { group, seq } => (group, *seq, false),
            ControlMessage::Played { group, seq } => (group, *seq, true),
            _ => return true,
        };
        self.sync_delivered(group);
        match self.joined.get(group.as_str()) {
            Some(joined) if played => !joined.sub.expects_played(seq),
            Some(joined) => !joined.sub.expects_ack(seq),
            None => true,
        }
    }

    /// Moves what the group's deliveries recorded into its subscription.
    pub(super) fn sync_delivered(&mut self, group: &str) {
        if let Some(joined) = self.joined.get_mut(group) {
            for (seq, clip_id, talker) in joined.sink.take_delivered() {
                joined.sub.delivered(seq, clip_id, talker);
            }
        }
    }
}
