//! Group administration, shared by the `relay group` command line (against
//! the data directory) and admin control messages (against a running
//! relay), so both apply the same rules.

use ptt_protocol::{ControlMessage, ErrorCode, GroupMode, is_valid_id};

use crate::context::RelayContext;
use crate::store::{ClipStore, StoreError};

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A group or user id is empty, too long or has characters outside
    /// `A-Za-z0-9-_.@`.
    #[error("invalid id {0:?}: use 1 to 64 of A-Z a-z 0-9 - _ . @")]
    InvalidId(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A live latency budget above [`crate::config::MAX_LIVE_BUDGET_MS`].
    #[error("live budget {0} ms: at most {max} ms", max = crate::config::MAX_LIVE_BUDGET_MS)]
    BudgetTooLarge(u32),
}

impl AdminError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AdminError::InvalidId(_) => ErrorCode::InvalidRequest,
            AdminError::Store(e) => e.code(),
            AdminError::BudgetTooLarge(_) => ErrorCode::InvalidRequest,
        }
    }
}

fn check(id: &str) -> Result<(), AdminError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(AdminError::InvalidId(id.to_owned()))
    }
}

/// Creates a group.
pub async fn create_group(
    store: &dyn ClipStore,
    group: &str,
    mode: GroupMode,
    max_clip_ms: u32,
) -> Result<(), AdminError> {
    check(group)?;
    Ok(store.create_group(group, mode, max_clip_ms).await?)
}

/// Adds a member. A new member starts at the group's newest clip: it
/// receives what is said from now on, not the group's history (which it
/// can still fetch).
pub async fn add_member(store: &dyn ClipStore, group: &str, user: &str) -> Result<(), AdminError> {
    check(group)?;
    check(user)?;
    let before = store.group(group).await?;
    let is_new = before.is_some_and(|g| !g.members.contains(user));
    store.add_member(group, user).await?;
    if is_new {
        let last = store.seq_range(group).await?.last;
        store.advance_cursor(group, user, last).await?;
    }
    Ok(())
}

/// Removes a member.
pub async fn remove_member(
    store: &dyn ClipStore,
    group: &str,
    user: &str,
) -> Result<(), AdminError> {
    Ok(store.remove_member(group, user).await?)
}

/// Changes a group's mode.
pub async fn set_mode(
    store: &dyn ClipStore,
    group: &str,
    mode: GroupMode,
) -> Result<(), AdminError> {
    Ok(store.set_mode(group, mode).await?)
}

/// Sets a group's live latency budget in ms (`None`: back to the relay's
/// `live_budget_ms`). Members' live deliveries use it from their next Join.
pub async fn set_live_budget(
    store: &dyn ClipStore,
    group: &str,
    budget_ms: Option<u32>,
) -> Result<(), AdminError> {
    check(group)?;
    if let Some(ms) = budget_ms.filter(|&ms| ms > crate::config::MAX_LIVE_BUDGET_MS) {
        return Err(AdminError::BudgetTooLarge(ms));
    }
    Ok(store.set_live_budget(group, budget_ms).await?)
}

/// Most clips one `ListClips` answers with.
pub const MAX_LIST_CLIPS: usize = 100;

/// Deletes clip `seq` of `group` and tells the group's members connected
/// to this relay (`ClipDeleted`); members away learn of it when they join
/// again (see [`tombstones_for`]).
pub async fn delete_clip(ctx: &RelayContext, group: &str, seq: u64) -> Result<(), ErrorCode> {
    check(group).map_err(|e| e.code())?;
    let now = crate::auth::unix_millis(std::time::SystemTime::now());
    let clip_id = ctx
        .store
        .delete_clip(group, seq, now)
        .await
        .map_err(|e| e.code())?
        .ok_or(ErrorCode::NoSuchClip)?;
    tracing::info!(%group, seq, %clip_id, "clip deleted");
    ctx.hub.send_to_group(
        group,
        ControlMessage::ClipDeleted {
            group: group.to_owned(),
            seq,
            clip_id,
        },
    );
    Ok(())
}

/// The `ClipDeleted` messages a member joining `group` is owed: the clips
/// deleted since it was last seen there (none for a member never seen,
/// who cannot hold any).
pub async fn tombstones_for(
    store: &dyn ClipStore,
    group: &str,
    user: &str,
) -> Result<Vec<ControlMessage>, StoreError> {
    let since = store.last_seen(group, user).await?;
    if since == 0 {
        return Ok(Vec::new());
    }
    Ok(store
        .tombstones(group, since)
        .await?
        .into_iter()
        .map(|(seq, clip_id)| ControlMessage::ClipDeleted {
            group: group.to_owned(),
            seq,
            clip_id,
        })
        .collect())
}

/// Applies an admin control message (the caller checked the admin claim).
pub async fn apply(ctx: &RelayContext, message: ControlMessage) -> Result<(), ErrorCode> {
    let store = &*ctx.store;
    let result = match message {
        ControlMessage::CreateGroup { group, mode, .. } => {
            create_group(store, &group, mode, ctx.max_clip_ms()).await
        }
        ControlMessage::AddMember { group, user, .. } => add_member(store, &group, &user).await,
        ControlMessage::RemoveMember { group, user, .. } => {
            remove_member(store, &group, &user).await
        }
        ControlMessage::SetMode { group, mode, .. } => set_mode(store, &group, mode).await,
        ControlMessage::SetLiveBudget {
            group, budget_ms, ..
        } => set_live_budget(store, &group, budget_ms).await,
        ControlMessage::DeleteClip { group, seq, .. } => {
            return delete_clip(ctx, &group, seq).await;
        }
        _ => return Err(ErrorCode::InvalidRequest),
    };
    result.map_err(|e| e.code())
}

/// Why a clip could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The clip has no frames, or frames of a duration Opus does not have.
    #[error("cannot export: {0}")]
    Unsupported(String),
    /// Writing failed.
    #[error(transparent)]
    Codec(#[from] ptt_codec::CodecError),
}

/// The pre-skip written in exported files: libopus's encoder delay at
/// 48 kHz (the talker's own is not stored; 312 samples is what libopus
/// reports for every application mode but restricted low delay).
pub const EXPORT_PRE_SKIP: u16 = 312;

/// Writes a stored clip's Opus packets as an Ogg Opus stream (RFC 7845)
/// that any player opens: OpusHead with the clip's channels and rate,
/// OpusTags naming the talker, group and sequence number, then the packets.
pub fn write_ogg_opus<W: std::io::Write>(
    writer: W,
    meta: &crate::store::ClipMeta,
    frames: &[bytes::Bytes],
) -> Result<W, ExportError> {
    use ptt_codec::{EncodedPacket, OggOpusWriter, OpusHead, OpusTags};
    if meta.format != ptt_protocol::ClipFormat::Opus {
        return Err(ExportError::Unsupported("not an Opus clip".into()));
    }
    if !matches!(meta.frame_ms, 10 | 20 | 40 | 60 | 80 | 100 | 120) {
        return Err(ExportError::Unsupported(format!(
            "frame duration {} ms",
            meta.frame_ms
        )));
    }
    let Some((last, rest)) = frames.split_last() else {
        return Err(ExportError::Unsupported("the clip has no audio".into()));
    };
    let head = OpusHead {
        channels: meta.channels.clamp(1, 2),
        pre_skip: EXPORT_PRE_SKIP,
        input_sample_rate: meta.sample_rate,
        output_gain: 0,
        mapping_family: 0,
    };
    let tags = OpusTags::with_comments(vec![
        ("ARTIST".into(), meta.talker.clone()),
        ("ALBUM".into(), meta.group.clone()),
        ("PTT_CLIP_ID".into(), meta.clip_id.to_string()),
        ("PTT_CREATED_MS".into(), meta.created_ms.to_string()),
    ]);
    let duration = u32::from(meta.frame_ms) * 48;
    let packet = |data: &bytes::Bytes| EncodedPacket {
        data: data.to_vec(),
        duration,
    };
    // The serial only tells streams apart within one file.
    let serial = meta
        .clip_id
        .as_bytes()
        .iter()
        .fold(0u32, |h, b| h.rotate_left(5) ^ u32::from(*b));
    let mut ogg = OggOpusWriter::new(writer, &head, &tags, serial, false)?;
    for frame in rest {
        ogg.write_packet(packet(frame))?;
    }
    let end = ogg.granule() + u64::from(duration);
    Ok(ogg.finish(packet(last), end)?)
}
