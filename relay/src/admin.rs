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
}

impl AdminError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AdminError::InvalidId(_) => ErrorCode::InvalidRequest,
            AdminError::Store(e) => e.code(),
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
        _ => return Err(ErrorCode::InvalidRequest),
    };
    result.map_err(|e| e.code())
}
