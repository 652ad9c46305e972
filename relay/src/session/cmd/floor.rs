//! FloorRequest and FloorRelease.

use std::time::Duration;

use ptt_protocol::{ControlMessage, ErrorCode, GroupMode};

use crate::floor::{FloorGrant, Talker};
use crate::session::Session;

impl Session {
    /// FloorRequest: in a walkie group the arbiter decides (a request from
    /// the holder answers `FloorGranted` again, with nothing broadcast and
    /// the hold not extended); in a notes group everyone may talk, so it is
    /// granted at once and nothing is held.
    pub(super) async fn request_floor(&mut self, request_id: u64, group: String, emergency: bool) {
        let result = self.decide_floor(request_id, group, emergency).await;
        self.reply_result(request_id, result).await;
    }

    async fn decide_floor(
        &mut self,
        request_id: u64,
        group: String,
        emergency: bool,
    ) -> Result<ControlMessage, ErrorCode> {
        if emergency && !self.claims.emg {
            return Err(ErrorCode::Forbidden);
        }
        let info = self.ctx.hub.talker_group(&group, &self.handle.user).await?;
        let max_ms = info.max_clip_ms;
        if info.mode == GroupMode::Notes {
            return Ok(ControlMessage::FloorGranted {
                request_id,
                group,
                max_ms,
            });
        }
        let talker = Talker {
            session: self.handle.id,
            user: self.handle.user.clone(),
        };
        let hold = Duration::from_millis(u64::from(max_ms));
        let grant = self
            .ctx
            .floor
            .request(&group, &talker, emergency, hold)
            .await;
        let metrics = crate::metrics::Metrics::get();
        Ok(match grant {
            FloorGrant::Granted => {
                metrics.floor_grants.increment(1);
                ControlMessage::FloorGranted {
                    request_id,
                    group,
                    max_ms,
                }
            }
            FloorGrant::Denied { holder } => {
                metrics.floor_denials.increment(1);
                ControlMessage::FloorDenied {
                    request_id,
                    group,
                    holder,
                }
            }
            FloorGrant::Unavailable => return Err(ErrorCode::Internal),
        })
    }

    /// FloorRelease: frees the floor if this connection holds it (a no-op
    /// otherwise, and in notes groups).
    pub(super) async fn release_floor(&mut self, group: &str) {
        self.ctx.floor.release(group, self.handle.id).await;
    }
}
