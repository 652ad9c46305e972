//! WAV to Ogg Opus at the edge: encoding, decoding and waveform previews for
//! push-to-talk voice messages.
//!
//! One encoding path serves every use: [`StreamEncoder`] takes PCM chunks of
//! any size (a microphone's callbacks, a WAV file read in blocks) and hands out
//! Opus packets as soon as each frame is complete. On top of it:
//!
//! - [`OggOpusEncoder`] / [`OggOpusWriter`]: Ogg Opus (RFC 7845) over any `Write`;
//! - [`encode_wav`]: a WAV reader to an Ogg Opus writer;
//! - [`encode_wav_packets`]: a WAV to raw packets plus metadata (the relay's
//!   edge transcoding);
//! - [`encode_wav_file`]: file to file, never leaving a partial output behind.
//!
//! Decoding: [`decode_ogg_opus`] (pre-skip, gain and end trimming honoured;
//! every header field bounded, bad input a typed error) and
//! [`PacketDecoder`] for raw packets with gaps (FEC, then PLC).
//!
//! ```
//! use std::io::Cursor;
//! use ptt_codec::{EncoderConfig, decode_ogg_opus, encode_wav};
//!
//! // One second of a 440 Hz tone as a 16 kHz WAV, in memory.
//! let mut wav = Cursor::new(Vec::new());
//! let spec = hound::WavSpec { channels: 1, sample_rate: 16_000, bits_per_sample: 16,
//!     sample_format: hound::SampleFormat::Int };
//! let mut w = hound::WavWriter::new(&mut wav, spec).unwrap();
//! for i in 0..16_000 {
//!     let t = i as f32 / 16_000.0;
//!     w.write_sample(((t * 440.0 * std::f32::consts::TAU).sin() * 10_000.0) as i16).unwrap();
//! }
//! w.finalize().unwrap();
//! wav.set_position(0);
//!
//! let mut opus = Cursor::new(Vec::new());
//! let summary = encode_wav(wav, &mut opus, &EncoderConfig::default())?;
//! assert_eq!(summary.length_48k, 48_000);
//! opus.set_position(0);
//! let decoded = decode_ogg_opus(opus)?;
//! assert_eq!((decoded.sample_rate, decoded.frames()), (16_000, 16_000));
//! # Ok::<(), ptt_codec::CodecError>(())
//! ```

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::Path;

mod config;
mod decoder;
mod encoder;
mod error;
mod ogg_reader;
mod ogg_writer;
mod pcm;
pub mod resample;
mod wav;
pub mod waveform;

pub use config::{
    Application, BitrateMode, ChannelMode, EncoderConfig, FrameDuration, MAX_BITRATE,
    MAX_SAMPLE_RATE, MIN_BITRATE, MIN_SAMPLE_RATE, TruncatedPolicy, check_sample_rate,
    opus_rate_for,
};
pub use decoder::{
    DecodedAudio, DecoderConfig, MAX_AUDIO_PACKET_BYTES, MAX_HEADER_PACKET_BYTES, OggOpusInfo,
    OutputRate, PacketDecoder, decode_ogg_opus, decode_ogg_opus_at, decode_ogg_opus_with,
    inspect_ogg_opus,
};
pub use encoder::{
    EncodeSummary, EncodedPacket, FinishedStream, StreamEncoder, WAVEFORM_BARS, Warning,
};
pub use error::CodecError;
pub use ogg_writer::{
    MAX_COMMENTS, OggOpusEncoder, OggOpusWriter, OpusHead, OpusTags, PAGE_INTERVAL_48K,
    random_serial,
};
pub use pcm::{F32_LIMIT, PcmSample};
pub use wav::{WavInfo, WavSampleFormat, WavSource};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctest;

/// Most frames read from a WAV per block.
const READ_BLOCK_FRAMES: usize = 8_192;

/// Most samples (frames × channels) read from a WAV per block: 8,192 frames
/// of stereo. The header's channel count (up to 65,535) must not scale the
/// block: 8,192 frames of 65,535 channels would be a 2 GiB read buffer plus
/// 2 GiB of `f32`.
const READ_BLOCK_SAMPLES: usize = 16_384;

/// A clip encoded to raw Opus packets, one per frame, with what a player or
/// a container needs to know about them.
#[derive(Debug, Clone)]
pub struct EncodedClip {
    /// The Opus packets in order.
    pub packets: Vec<EncodedPacket>,
    /// Frame duration in milliseconds.
    pub frame_ms: u32,
    /// Encoder delay to skip at the start, in 48 kHz samples.
    pub pre_skip: u16,
    /// Original input rate in Hz.
    pub input_rate: u32,
    /// Channels of the encoded stream (1 or 2).
    pub channels: u16,
    /// Decoded length in 48 kHz samples after pre-skip and end trimming.
    pub length_48k: u64,
    /// 100 waveform bars, 0 to 31.
    pub waveform: Vec<u8>,
    /// Everything else known about the encode.
    pub summary: EncodeSummary,
}

/// Feeds a WAV source through `push` in blocks.
fn pump_wav<R: Read + Seek>(
    source: &mut WavSource<R>,
    mut push: impl FnMut(&[f32]) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    // Sized by the data actually present and by samples, not by the
    // header's channel count (a corrupt header may claim 65,535 channels):
    // at least one frame, at most READ_BLOCK_SAMPLES samples unless one
    // frame alone is larger.
    let channels = usize::from(source.info().channels).max(1);
    let block_frames = (READ_BLOCK_SAMPLES / channels).clamp(1, READ_BLOCK_FRAMES);
    let frames = usize::try_from(source.info().frames)
        .unwrap_or(usize::MAX)
        .min(block_frames);
    let mut buf = Vec::with_capacity(frames * channels);
    while source.read_f32(&mut buf, block_frames)? > 0 {
        push(&buf)?;
    }
    Ok(())
}

/// Encodes a WAV read from `reader` to raw Opus packets (the relay's edge
/// transcoding for clients that cannot encode).
pub fn encode_wav_packets(
    reader: impl Read + Seek,
    config: &EncoderConfig,
) -> Result<EncodedClip, CodecError> {
    let mut source = WavSource::open(reader, config)?;
    let info = source.info().clone();
    let mut enc = StreamEncoder::new(info.sample_rate, info.channels, config)?;
    if let Some(w) = source.warning() {
        enc.add_warning(w.clone());
    }
    let mut packets = Vec::with_capacity(
        (info.duration_secs() * 1000.0 / f64::from(config.frame.millis())) as usize + 2,
    );
    pump_wav(&mut source, |pcm| {
        enc.push_f32(pcm)?;
        while let Some(p) = enc.next_packet() {
            packets.push(p);
        }
        Ok(())
    })?;
    let end = enc.finish()?;
    packets.extend(end.packets);
    let s = end.summary;
    Ok(EncodedClip {
        packets,
        frame_ms: s.frame_ms,
        pre_skip: s.pre_skip,
        input_rate: s.input_rate,
        channels: s.channels,
        length_48k: s.length_48k,
        waveform: s.waveform.clone(),
        summary: s,
    })
}

/// Encodes a WAV read from `reader` to Ogg Opus written to `writer`.
pub fn encode_wav<R: Read + Seek, W: Write>(
    reader: R,
    writer: W,
    config: &EncoderConfig,
) -> Result<EncodeSummary, CodecError> {
    let mut source = WavSource::open(reader, config)?;
    let info = source.info().clone();
    let mut enc = OggOpusEncoder::new(writer, info.sample_rate, info.channels, config)?;
    if let Some(w) = source.warning() {
        enc.encoder_mut().add_warning(w.clone());
    }
    pump_wav(&mut source, |pcm| enc.push_f32(pcm))?;
    let (_, summary) = enc.finish()?;
    Ok(summary)
}

/// Encodes the WAV file `input` to the Ogg Opus file `output`.
///
/// The stream goes to a temporary file in the output's directory, renamed
/// over `output` only once the encode succeeded: a failed encode leaves no
/// output file behind (and never a half-written one).
pub fn encode_wav_file(
    input: &Path,
    output: &Path,
    config: &EncoderConfig,
) -> Result<EncodeSummary, CodecError> {
    let reader = fs::File::open(input)?;
    write_atomically(output, |w| encode_wav(reader, w, config))
}

/// Runs `write` on a temporary file next to `path` and renames it to `path`
/// if it succeeds; the temporary file is removed otherwise.
pub fn write_atomically<T>(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&mut fs::File>) -> Result<T, CodecError>,
) -> Result<T, CodecError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let value = {
        let mut w = std::io::BufWriter::with_capacity(1 << 16, tmp.as_file_mut());
        let value = write(&mut w)?;
        w.flush()?;
        value
    };
    tmp.persist(path).map_err(|e| CodecError::Io(e.error))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoders_and_decoders_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<StreamEncoder>();
        assert_send::<OggOpusEncoder<Vec<u8>>>();
        assert_send::<PacketDecoder>();
        assert_send::<EncodedClip>();
        assert_send::<CodecError>();
    }

    #[test]
    fn wav_blocks_are_sized_by_samples_not_by_the_channel_count() {
        let mut wav = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 64,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut wav, spec).unwrap();
        for i in 0..64 * 10_000 {
            w.write_sample((i % 1_000) as i16).unwrap();
        }
        w.finalize().unwrap();
        wav.set_position(0);
        let mut source = WavSource::open(wav, &EncoderConfig::default()).unwrap();
        let mut largest = 0;
        let mut total = 0;
        pump_wav(&mut source, |pcm| {
            largest = largest.max(pcm.len());
            total += pcm.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(total, 64 * 10_000);
        assert_eq!(largest, READ_BLOCK_SAMPLES);
    }
}
