//! Talking from PCM: the client encodes with [`ptt_codec::StreamEncoder`]
//! and sends each Opus packet as soon as it is complete.

use ptt_codec::{EncoderConfig, StreamEncoder};

use crate::error::ClientError;
use crate::shared::StoredClip;
use crate::talk::Talk;
use ptt_protocol::ClipId;

impl From<ptt_codec::CodecError> for ClientError {
    fn from(err: ptt_codec::CodecError) -> ClientError {
        ClientError::Codec(err.to_string())
    }
}

/// A clip spoken from PCM samples (a microphone callback's buffers, of any
/// size). Created by [`crate::Client::talk_pcm`].
pub struct PcmTalk {
    talk: Talk,
    encoder: StreamEncoder,
}

impl std::fmt::Debug for PcmTalk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcmTalk")
            .field("talk", &self.talk)
            .field("encoder", &self.encoder)
            .finish()
    }
}

impl PcmTalk {
    pub(crate) fn new(talk: Talk, encoder: StreamEncoder) -> PcmTalk {
        PcmTalk { talk, encoder }
    }

    /// Builds the encoder for `input_rate`/`input_channels` PCM.
    pub(crate) fn encoder(
        input_rate: u32,
        input_channels: u16,
        config: &EncoderConfig,
    ) -> Result<StreamEncoder, ClientError> {
        Ok(StreamEncoder::new(input_rate, input_channels, config)?)
    }

    /// The clip's id.
    pub fn clip_id(&self) -> ClipId {
        self.talk.clip_id()
    }

    /// Encodes interleaved 16-bit samples and sends every packet completed.
    pub async fn push_i16(&mut self, pcm: &[i16]) -> Result<(), ClientError> {
        self.encoder.push_i16(pcm)?;
        self.flush().await
    }

    /// Encodes interleaved float samples (-1.0 to 1.0) and sends every
    /// packet completed.
    pub async fn push_f32(&mut self, pcm: &[f32]) -> Result<(), ClientError> {
        self.encoder.push_f32(pcm)?;
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        while let Some(packet) = self.encoder.next_packet() {
            self.talk.send_frame(packet.data).await?;
        }
        Ok(())
    }

    /// Encodes the rest (padding the last frame), ends the clip with the
    /// encoder's waveform preview, and waits until it is stored.
    pub async fn finish(mut self) -> Result<StoredClip, ClientError> {
        self.flush().await?;
        let finished = self.encoder.finish()?;
        for packet in finished.packets {
            self.talk.send_frame(packet.data).await?;
        }
        self.talk.finish(finished.summary.waveform).await
    }

    /// Abandons the clip.
    pub fn abort(self) {
        self.talk.abort();
    }
}
