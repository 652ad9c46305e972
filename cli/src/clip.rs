//! A clip received from the relay, gathered frame by frame, and saved as an
//! Ogg Opus file (RFC 7845) that any player opens.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ptt_client::{ClipFormat, ClipHeader};
use ptt_codec::{
    EncodedPacket, OggOpusWriter, OpusHead, OpusTags, random_serial, write_atomically,
};

/// The encoder delay written as the Ogg pre-skip, in 48 kHz samples.
///
/// The wire format carries raw Opus packets without the talker's encoder
/// delay; 312 samples (6.5 ms) is what libopus reports for the voip and
/// audio applications at every rate (120 for restricted-lowdelay), and what
/// `ptt_codec` and the relay's transcoder produce. A player skips it so
/// that the audio starts where the talker's recording did.
pub const PRE_SKIP: u16 = 312;

/// The most bytes of Opus kept for one clip (a relay's default limit is
/// 1 MiB; a clip beyond this is dropped rather than buffered without end).
pub const MAX_CLIP_BYTES: usize = 16 << 20;

/// A clip being received.
#[derive(Debug)]
pub struct ClipInProgress {
    /// The header the relay sent.
    pub header: ClipHeader,
    /// The talker.
    pub talker: String,
    /// The Opus packets so far, in index order from 0, without holes.
    pub frames: Vec<Bytes>,
    /// Packets that came ahead of a missing one (the UDP media path may
    /// reorder them, PROTOCOL.md §14.4), by index.
    ahead: std::collections::BTreeMap<u32, Bytes>,
    /// The total size of both.
    pub bytes: usize,
}

impl ClipInProgress {
    /// A clip that just started.
    pub fn new(header: ClipHeader, talker: String) -> ClipInProgress {
        ClipInProgress {
            header,
            talker,
            frames: Vec::new(),
            ahead: std::collections::BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Adds frame `index`, placed by its index (a frame that came twice is
    /// kept once); false if the clip grew past [`MAX_CLIP_BYTES`].
    pub fn push(&mut self, index: u32, data: Bytes) -> bool {
        let next = self.frames.len();
        if (index as usize) < next || self.ahead.contains_key(&index) {
            return true;
        }
        self.bytes += data.len();
        if index as usize == next {
            self.frames.push(data);
            while let Some(d) = u32::try_from(self.frames.len())
                .ok()
                .and_then(|i| self.ahead.remove(&i))
            {
                self.frames.push(d);
            }
        } else {
            self.ahead.insert(index, data);
        }
        self.bytes <= MAX_CLIP_BYTES
    }

    /// The clip's audio length in milliseconds: each packet's own duration
    /// (from its TOC byte), or the header's `frame_ms` for a packet that
    /// does not parse.
    pub fn duration_ms(&self) -> u64 {
        self.frames
            .iter()
            .map(|f| u64::from(self.packet_samples_48k(f)))
            .sum::<u64>()
            / 48
    }

    fn packet_samples_48k(&self, packet: &[u8]) -> u32 {
        opus::packet::get_nb_samples(packet, 48_000)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0 && n <= 5_760)
            .unwrap_or(u32::from(self.header.frame_ms).clamp(1, 120) * 48)
    }

    /// Writes the clip as Ogg Opus to `path` (atomically: a failure leaves
    /// no file), with the talker, group and sequence number as comments.
    pub fn save_ogg(&self, path: &Path, seq: u64) -> Result<()> {
        if self.header.format != ClipFormat::Opus {
            bail!("the clip is not Opus ({:?})", self.header.format);
        }
        let Some((last, rest)) = self.frames.split_last() else {
            bail!("the clip has no audio");
        };
        let head = OpusHead {
            channels: self.header.channels.clamp(1, 2),
            pre_skip: PRE_SKIP,
            input_sample_rate: self.header.sample_rate,
            output_gain: 0,
            mapping_family: 0,
        };
        let created =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.header.created_ms);
        let tags = OpusTags::with_comments(vec![
            ("ARTIST".into(), self.talker.clone()),
            ("ALBUM".into(), self.header.group.clone()),
            ("TITLE".into(), format!("{} #{seq}", self.header.group)),
            ("TRACKNUMBER".into(), seq.to_string()),
            (
                "DATE".into(),
                humantime::format_rfc3339_seconds(created).to_string(),
            ),
            ("PTT_CLIP_ID".into(), self.header.clip_id.to_string()),
        ]);
        let packet = |data: &Bytes| EncodedPacket {
            data: data.to_vec(),
            duration: self.packet_samples_48k(data),
        };
        write_atomically(path, |w| {
            let mut writer = OggOpusWriter::new(w, &head, &tags, random_serial(), false)?;
            for frame in rest {
                writer.write_packet(packet(frame))?;
            }
            let last = packet(last);
            let end = writer.granule() + u64::from(last.duration);
            writer.finish(last, end)?;
            Ok(())
        })
        .with_context(|| format!("cannot save {}", path.display()))
    }
}

/// Where clip `seq` of `group` is saved in `dir`: `GROUP-SEQ.opus`, the
/// sequence number padded so that files sort in order.
pub fn file_name(dir: &Path, group: &str, seq: u64) -> PathBuf {
    dir.join(format!("{group}-{seq:06}.opus"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ptt_client::ClipId;
    use ptt_codec::{EncoderConfig, StreamEncoder, decode_ogg_opus};

    fn header(sample_rate: u32) -> ClipHeader {
        ClipHeader {
            group: "team".into(),
            clip_id: ClipId::from_bytes([7; 16]),
            talker: "alice".into(),
            seq: 3,
            format: ClipFormat::Opus,
            sample_rate,
            channels: 1,
            frame_ms: 20,
            created_ms: 1_767_225_600_123,
            flags: 0,
        }
    }

    #[test]
    fn a_saved_clip_decodes_to_the_length_of_its_packets_less_the_pre_skip() {
        let mut enc = StreamEncoder::new(16_000, 1, &EncoderConfig::default()).unwrap();
        let tone: Vec<i16> = (0..16_000)
            .map(|i| ((i as f32 * 0.05).sin() * 8_000.0) as i16)
            .collect();
        enc.push_i16(&tone).unwrap();
        let finished = enc.finish().unwrap();
        let mut clip = ClipInProgress::new(header(16_000), "alice".into());
        // Out of order, one twice: placed by index.
        let n = finished.packets.len() as u32;
        for i in (0..n).step_by(2).chain((1..n).step_by(2)).chain([0]) {
            let p = &finished.packets[i as usize];
            assert!(clip.push(i, Bytes::from(p.data.clone())));
        }
        let data: Vec<&[u8]> = clip.frames.iter().map(|f| &f[..]).collect();
        let want: Vec<&[u8]> = finished.packets.iter().map(|p| &p.data[..]).collect();
        assert_eq!(data, want);
        assert_eq!(clip.duration_ms(), finished.packets.len() as u64 * 20);
        let dir = tempfile::tempdir().unwrap();
        let path = file_name(dir.path(), "team", 3);
        clip.save_ogg(&path, 3).unwrap();
        assert!(path.ends_with("team-000003.opus"));
        let audio = decode_ogg_opus(std::fs::File::open(&path).unwrap()).unwrap();
        // Decoded at the talker's rate, 16 kHz: 960 samples at 48 kHz per
        // packet, less the pre-skip, divided by 3.
        let expected = (finished.packets.len() * 960 - usize::from(PRE_SKIP)) / 3;
        assert_eq!(audio.frames(), expected);
        assert!(audio.frames() >= 16_000 && audio.frames() < 16_000 + 320);
    }

    #[test]
    fn an_empty_clip_is_not_saved() {
        let clip = ClipInProgress::new(header(48_000), "alice".into());
        let dir = tempfile::tempdir().unwrap();
        let path = file_name(dir.path(), "team", 1);
        assert!(clip.save_ogg(&path, 1).is_err());
        assert!(!path.exists());
    }
}
