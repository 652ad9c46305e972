//! What every connection task shares: the node's live plane, the group
//! log, the floor arbiter, the directory of groups and cursors, the token
//! verifier, the configuration and the shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use ptt_protocol::{ClipFormat, ClipLimits, GroupMode, Limits, SessionLimits};
use tokio_util::sync::CancellationToken;

use crate::auth::TokenVerifier;
use crate::config::RelayConfig;
use crate::delivery::LagPolicy;
use crate::floor::FloorArbiter;
use crate::hub::Hub;
use crate::log::GroupLog;
use crate::store::ClipStore;

/// What every connection task shares.
pub struct RelayContext {
    /// This node's live plane: listeners, clips in flight, publication.
    pub hub: Arc<Hub>,
    /// Each group's clips, in order.
    pub log: Arc<dyn GroupLog>,
    /// Who holds the floor of each walkie group.
    pub floor: Arc<dyn FloorArbiter>,
    /// Groups, members and cursors.
    pub store: Arc<dyn ClipStore>,
    /// Checks tokens.
    pub verifier: TokenVerifier,
    /// The configuration.
    pub config: RelayConfig,
    /// The limits announced in `Welcome`.
    pub limits: Limits,
    /// Fired when the relay starts draining.
    pub shutdown: CancellationToken,
    /// Clips each user started in the last minute, over all connections.
    pub user_clips: crate::limits::ClipsPerUser,
    /// The UDP media path, if on (`media`).
    pub media: Option<Arc<crate::media::MediaPlane>>,
    /// Clip frames each user uploads per second, over all connections.
    pub user_frames: crate::limits::FramesPerUser,
}

impl std::fmt::Debug for RelayContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayContext")
            .field("hub", &self.hub)
            .field("log", &self.log)
            .field("floor", &self.floor)
            .finish_non_exhaustive()
    }
}

impl RelayContext {
    /// Session limits from the configuration.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            auth_timeout: self.config.auth_timeout,
            max_concurrent_clips: self.config.max_concurrent_clips,
            clips_per_minute: self.config.clips_per_minute,
            control_burst: self.config.control_burst,
            control_per_second: self.config.control_per_second,
        }
    }

    /// Limits for an uploaded clip of `format`.
    pub fn clip_limits(&self, format: ClipFormat) -> ClipLimits {
        let c = &self.config;
        match format {
            ClipFormat::Opus => ClipLimits {
                max_duration: c.max_clip,
                max_bytes: c.max_clip_bytes as usize,
                max_frame_bytes: c.max_frame_bytes as usize,
                wall_slack: Duration::from_secs(5),
            },
            ClipFormat::Wav => ClipLimits {
                // An upload of a recorded clip may take longer than the
                // clip on a slow link.
                max_duration: c.max_clip * 4,
                max_bytes: c.max_wav_bytes as usize,
                max_frame_bytes: ptt_protocol::message::MAX_FRAME_LEN,
                wall_slack: Duration::from_secs(30),
            },
        }
    }

    /// The lag policy for live delivery of clips with `frame_ms` frames.
    pub fn lag_policy(&self, frame_ms: u8) -> LagPolicy {
        let frame = Duration::from_millis(u64::from(frame_ms.max(10)));
        LagPolicy {
            max_frames: self.config.live_lag_frames,
            max_stall: frame * self.config.live_lag_frames as u32,
        }
    }

    /// The live latency budget of a group in `mode` whose own budget is
    /// `group_budget_ms` (`None`: the relay's `live_budget_ms`), ms:
    /// walkie groups deliver each frame at once (0).
    pub fn live_budget_ms(&self, mode: GroupMode, group_budget_ms: Option<u32>) -> u32 {
        crate::delivery::live_budget_ms(mode, group_budget_ms, self.config.live_budget_ms)
    }

    /// Longest clip in new groups, ms.
    pub fn max_clip_ms(&self) -> u32 {
        self.config.max_clip.as_millis().min(u128::from(u32::MAX)) as u32
    }
}
