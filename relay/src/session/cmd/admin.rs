//! Group administration (admin tokens only) and the group and member
//! lists. Membership changes reach every subscription through the group
//! log's feed (see [`crate::hub`]), whoever made them.

use ptt_protocol::{ControlMessage, ErrorCode, GroupSummary};

use crate::session::Session;

impl Session {
    /// CreateGroup, AddMember, RemoveMember, SetMode, SetLiveBudget,
    /// DeleteClip.
    pub(super) async fn admin(&mut self, message: ControlMessage) {
        use ControlMessage as M;
        let request_id = match &message {
            M::CreateGroup { request_id, .. }
            | M::AddMember { request_id, .. }
            | M::RemoveMember { request_id, .. }
            | M::SetMode { request_id, .. }
            | M::SetLiveBudget { request_id, .. }
            | M::DeleteClip { request_id, .. } => *request_id,
            _ => unreachable!("admin is called with admin messages"),
        };
        let result = if !self.claims.adm {
            Err(ErrorCode::Forbidden)
        } else {
            crate::admin::apply(&self.ctx, message).await
        };
        let reply = result.map(|()| M::Ok { request_id });
        self.reply_result(request_id, reply).await;
    }

    /// ListMemberStatus: a group's members with their cursor and
    /// last-seen time (admins only).
    pub(super) async fn member_status(
        &self,
        request_id: u64,
        group: String,
    ) -> Result<ControlMessage, ErrorCode> {
        if !self.claims.adm {
            return Err(ErrorCode::Forbidden);
        }
        let members = self
            .ctx
            .store
            .member_status(&group)
            .await
            .map_err(|e| e.code())?;
        Ok(ControlMessage::MemberStatus {
            request_id,
            group,
            members,
        })
    }

    /// ListClips: summaries of a group's stored clips (admins only), at
    /// most [`crate::admin::MAX_LIST_CLIPS`].
    pub(super) async fn list_clips(
        &self,
        request_id: u64,
        group: String,
        after_seq: u64,
        limit: u32,
    ) -> Result<ControlMessage, ErrorCode> {
        if !self.claims.adm {
            return Err(ErrorCode::Forbidden);
        }
        let limit = (limit as usize).min(crate::admin::MAX_LIST_CLIPS);
        let clips = self
            .ctx
            .store
            .clip_summaries(&group, after_seq, limit)
            .await
            .map_err(|e| e.code())?;
        Ok(ControlMessage::ClipList {
            request_id,
            group,
            clips,
        })
    }

    /// ListGroups: the user's groups (every group for an admin).
    pub(super) async fn list_groups(&self, request_id: u64) -> Result<ControlMessage, ErrorCode> {
        let groups = self.ctx.store.groups().await.map_err(|e| e.code())?;
        let groups = groups
            .into_iter()
            .filter(|g| self.claims.adm || g.members.contains(&*self.handle.user))
            .map(|g| GroupSummary {
                group: g.id,
                mode: g.mode,
            })
            .collect();
        Ok(ControlMessage::GroupList { request_id, groups })
    }

    /// ListMembers: a group's members, for its members and admins.
    pub(super) async fn list_members(
        &self,
        request_id: u64,
        group: String,
    ) -> Result<ControlMessage, ErrorCode> {
        let info = self
            .ctx
            .store
            .group(&group)
            .await
            .map_err(|e| e.code())?
            .ok_or(ErrorCode::NoSuchGroup)?;
        if !self.claims.adm && !info.members.contains(&*self.handle.user) {
            return Err(ErrorCode::NotMember);
        }
        Ok(ControlMessage::MemberList {
            request_id,
            group,
            members: info.members.into_iter().collect(),
        })
    }
}
