//! MediaOpen and MediaClose: the connection's UDP media path (PROTOCOL.md
//! §14).

use std::sync::Arc;
use std::time::Instant;

use ptt_protocol::{ControlMessage, ErrorCode, MediaMessage};

use super::Fatal;
use crate::media::MediaPeer;
use crate::session::Session;

impl Session {
    /// A media-path message from the client.
    pub(super) async fn media(&mut self, message: MediaMessage) -> Result<(), Fatal> {
        match message {
            MediaMessage::Open {
                request_id,
                features,
            } => {
                let answer = self.open_media(request_id, features);
                self.reply_result(request_id, answer).await;
            }
            MediaMessage::Close { request_id } => {
                self.close_media();
                self.send(ControlMessage::Ok { request_id }).await;
            }
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

    /// MediaOpen: an offer (the same again if the path is open already), or
    /// `MediaUnavailable` when the relay has no media socket or the
    /// connection is a browser's (WebTransport has no keying material
    /// exporter in browsers' APIs).
    ///
    /// `features`: what the client's path understands; the offer names the
    /// subset this relay uses (those of the first MediaOpen, if the path
    /// was open already).
    fn open_media(&mut self, request_id: u64, features: u64) -> Result<ControlMessage, ErrorCode> {
        let plane = self.ctx.media.as_ref().ok_or(ErrorCode::MediaUnavailable)?;
        if crate::transport::is_web(&self.conn) {
            return Err(ErrorCode::MediaUnavailable);
        }
        let peer = match &self.media {
            Some(peer) => peer.clone(),
            None => {
                let peer = plane
                    .open(&self.conn, features)
                    .ok_or(ErrorCode::MediaUnavailable)?;
                self.media = Some(peer.clone());
                peer
            }
        };
        Ok(ControlMessage::Media(MediaMessage::Offer {
            request_id,
            port: plane.port(),
            conn_id: peer.conn_id(),
            epoch: peer.epoch(),
            features: peer.features(),
        }))
    }

    /// Ends the media path (MediaClose, or the session's end): live clips
    /// started from now on carry their frames on streams.
    pub(crate) fn close_media(&mut self) {
        if let (Some(peer), Some(plane)) = (self.media.take(), &self.ctx.media) {
            plane.close(&peer);
        }
    }

    /// The media path, if a Bind authenticated recently enough for frames
    /// to go by UDP.
    pub(crate) fn bound_media(&self) -> Option<Arc<MediaPeer>> {
        self.media
            .as_ref()
            .filter(|peer| peer.is_bound(Instant::now()))
            .cloned()
    }
}
