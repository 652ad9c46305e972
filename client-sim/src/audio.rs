//! The audio the talkers replay: a WAV encoded once with the codec crate,
//! kept as shared [`Bytes`] Opus packets with their hashes precomputed.

use std::io::Cursor;

use anyhow::Context;
use bytes::Bytes;

use crate::verify::{Digest, frame_hash};

/// The repository's speech fixture, built into the binary.
pub const SPEECH_WAV: &[u8] = include_bytes!("../../codec/tests/fixtures/speech.wav");

/// Encoded audio, replayed in a loop to make clips of any length.
#[derive(Debug, Clone)]
pub struct Audio {
    /// The Opus packets, in order.
    pub packets: Vec<Bytes>,
    /// [`frame_hash`] of each packet.
    pub hashes: Vec<u64>,
    /// Duration of one packet, ms.
    pub frame_ms: u32,
    /// Sample rate of the source.
    pub sample_rate: u32,
    /// Channels encoded.
    pub channels: u8,
    /// Waveform preview sent with each clip.
    pub waveform: Bytes,
}

impl Audio {
    /// Encodes `wav` with the codec's default settings (voice, 20 ms).
    pub fn encode(wav: &[u8]) -> anyhow::Result<Audio> {
        let clip =
            ptt_codec::encode_wav_packets(Cursor::new(wav), &ptt_codec::EncoderConfig::default())
                .context("encoding the WAV")?;
        anyhow::ensure!(!clip.packets.is_empty(), "the WAV encoded to no packets");
        let packets: Vec<Bytes> = clip
            .packets
            .into_iter()
            .map(|p| Bytes::from(p.data))
            .collect();
        let hashes = packets.iter().map(|p| frame_hash(p)).collect();
        Ok(Audio {
            packets,
            hashes,
            frame_ms: clip.frame_ms,
            sample_rate: clip.input_rate,
            channels: clip.channels.clamp(1, 2) as u8,
            waveform: Bytes::from(clip.waveform),
        })
    }

    /// Reads and encodes a WAV file, or the built-in fixture for `None`.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Audio> {
        match path {
            Some(p) => {
                let wav = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                Audio::encode(&wav)
            }
            None => Audio::encode(SPEECH_WAV),
        }
    }

    /// Frame `i` of a clip that starts at packet `start`.
    pub fn frame(&self, start: usize, i: u32) -> (&Bytes, u64) {
        let k = (start + i as usize) % self.packets.len();
        (&self.packets[k], self.hashes[k])
    }

    /// The digest of a clip of `count` frames starting at packet `start`.
    pub fn digest(&self, start: usize, count: u32) -> Digest {
        (0..count).fold(Digest::EMPTY, |d, i| d.push(i, self.frame(start, i).1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_encodes_to_20ms_opus_packets() {
        let a = Audio::load(None).unwrap();
        assert_eq!(a.frame_ms, 20);
        assert!(a.packets.len() > 100, "{}", a.packets.len());
        let n = a.packets.len() as u32;
        // Clips longer than the recording wrap around.
        assert_eq!(a.frame(3, n).0, &a.packets[3]);
        assert_ne!(a.digest(0, 10), a.digest(1, 10));
        assert_eq!(a.digest(5, 10), a.digest(5, 10));
    }
}
