//! The streaming encoder: PCM chunks of any size in, Opus packets out.
//!
//! [`StreamEncoder`] is the crate's single encoding path. Each pushed block
//! is converted to `f32`, downmixed (or reduced to stereo), measured for the
//! waveform, resampled with rubato when the input rate is not one Opus takes,
//! and cut into frames that go to libopus (`opus_encode_float`) as soon as
//! each is complete. All buffers are allocated once; the only allocation per
//! frame is the packet's own bytes, which the caller takes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::CodecError;
use crate::config::{
    BitrateMode, ChannelMode, EncoderConfig, FrameDuration, check_sample_rate, opus_rate_for,
};
use crate::pcm::{PcmSample, mix_into};
use crate::resample::{StreamResampler, expected_output_len};
use crate::waveform::WaveformAccumulator;

/// Largest packet libopus can produce for one call (its recommended buffer).
const MAX_PACKET: usize = 4_000;

/// Input frames converted per internal block, so scratch buffers stay small
/// whatever the size of a push.
const BLOCK_FRAMES: usize = 4_096;

/// Number of bars in [`EncodeSummary::waveform`].
pub const WAVEFORM_BARS: usize = 100;

/// One Opus packet: one frame of audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPacket {
    /// The Opus packet bytes (RFC 6716).
    pub data: Vec<u8>,
    /// Duration of the packet in 48 kHz samples (e.g. 960 for 20 ms).
    pub duration: u32,
}

/// Something worth telling about an input that was encoded anyway.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum Warning {
    /// The WAV data chunk claimed more frames than the file held; the frames
    /// that were there were encoded.
    TruncatedData {
        /// Frames the header announced.
        expected: u64,
        /// Frames actually encoded.
        actual: u64,
    },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::TruncatedData { expected, actual } => write!(
                f,
                "truncated WAV data: the header announces {expected} frames, encoded the {actual} present"
            ),
        }
    }
}

/// What an encode produced, known once it is finished.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EncodeSummary {
    /// Sample rate of the input in Hz (stored in OpusHead).
    pub input_rate: u32,
    /// Channels of the input.
    pub input_channels: u16,
    /// Rate libopus was fed, in Hz.
    pub opus_rate: u32,
    /// Channels of the encoded stream (1 or 2).
    pub channels: u16,
    /// Encoder delay to discard at the start, in 48 kHz samples.
    pub pre_skip: u16,
    /// Frame duration in milliseconds.
    pub frame_ms: u32,
    /// Input length in frames at the input rate.
    pub input_frames: u64,
    /// Decoded length in 48 kHz samples, after pre-skip and end trimming.
    pub length_48k: u64,
    /// Granule position of the last packet: `pre_skip + length_48k`.
    pub final_granule: u64,
    /// Number of Opus packets.
    pub packets: u64,
    /// Total Opus payload bytes (without Ogg overhead).
    pub payload_bytes: u64,
    /// [`WAVEFORM_BARS`] bars of 0 to 31.
    pub waveform: Vec<u8>,
    /// Wall time spent inside libopus's encode calls alone.
    pub opus_encode_time: Duration,
    /// Things noticed about the input.
    pub warnings: Vec<Warning>,
}

impl EncodeSummary {
    /// Duration of the clip in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.length_48k as f64 / 48_000.0
    }

    /// Average Opus payload bitrate in bit/s.
    pub fn average_bitrate(&self) -> f64 {
        let secs = self.duration_secs();
        if secs > 0.0 {
            self.payload_bytes as f64 * 8.0 / secs
        } else {
            0.0
        }
    }
}

/// The end of a stream: the packets [`StreamEncoder::finish`] produced
/// (always at least one) and the summary.
#[derive(Debug, Clone)]
pub struct FinishedStream {
    /// The remaining packets, in order; the last one carries the end of the clip.
    pub packets: Vec<EncodedPacket>,
    /// What was encoded.
    pub summary: EncodeSummary,
}

/// Cuts the (resampled) signal into frames and runs libopus on each.
struct Framer {
    encoder: opus::Encoder,
    frame: Vec<f32>,
    fill: usize,
    out: Vec<u8>,
    duration_48k: u32,
    packets: VecDeque<EncodedPacket>,
    frames_encoded: u64,
    payload_bytes: u64,
    opus_time: Duration,
}

impl Framer {
    fn feed(&mut self, mut samples: &[f32]) -> Result<(), CodecError> {
        let frame_len = self.frame.len();
        while !samples.is_empty() {
            if self.fill == 0 && samples.len() >= frame_len {
                let (frame, rest) = samples.split_at(frame_len);
                Self::encode(
                    &mut self.encoder,
                    frame,
                    &mut self.out,
                    self.duration_48k,
                    &mut self.packets,
                    &mut self.opus_time,
                    &mut self.payload_bytes,
                )?;
                self.frames_encoded += 1;
                samples = rest;
                continue;
            }
            let take = (frame_len - self.fill).min(samples.len());
            self.frame[self.fill..self.fill + take].copy_from_slice(&samples[..take]);
            self.fill += take;
            samples = &samples[take..];
            if self.fill == frame_len {
                self.flush_frame()?;
            }
        }
        Ok(())
    }

    /// Encodes the frame buffer, zero-padding what is not filled.
    fn flush_frame(&mut self) -> Result<(), CodecError> {
        self.frame[self.fill..].fill(0.0);
        Self::encode(
            &mut self.encoder,
            &self.frame,
            &mut self.out,
            self.duration_48k,
            &mut self.packets,
            &mut self.opus_time,
            &mut self.payload_bytes,
        )?;
        self.frames_encoded += 1;
        self.fill = 0;
        Ok(())
    }

    fn encode(
        encoder: &mut opus::Encoder,
        frame: &[f32],
        out: &mut [u8],
        duration: u32,
        packets: &mut VecDeque<EncodedPacket>,
        opus_time: &mut Duration,
        payload_bytes: &mut u64,
    ) -> Result<(), CodecError> {
        let start = Instant::now();
        let n = encoder.encode_float(frame, out)?;
        *opus_time += start.elapsed();
        *payload_bytes += n as u64;
        packets.push_back(EncodedPacket {
            data: out[..n].to_vec(),
            duration,
        });
        Ok(())
    }
}

/// Streaming Opus encoder: push PCM as it arrives, take packets as soon as
/// each frame is complete, [`finish`](Self::finish) to flush the end.
///
/// At 8, 12, 16, 24 and 48 kHz a packet is ready the moment its frame's last
/// sample is pushed. At other rates the resampler works on chunks of 1024
/// input frames, so packets lag the input by up to one chunk (23 ms at
/// 44.1 kHz) plus the resampler's filter delay.
///
/// ```
/// use ptt_codec::{EncoderConfig, StreamEncoder};
///
/// let mut enc = StreamEncoder::new(16_000, 1, &EncoderConfig::default())?;
/// let mut packets = Vec::new();
/// for chunk in vec![0i16; 16_000].chunks(441) {
///     enc.push_i16(chunk)?;
///     while let Some(p) = enc.next_packet() {
///         packets.push(p);
///     }
/// }
/// let end = enc.finish()?;
/// packets.extend(end.packets);
/// assert_eq!(end.summary.length_48k, 48_000);
/// # Ok::<(), ptt_codec::CodecError>(())
/// ```
pub struct StreamEncoder {
    input_rate: u32,
    input_channels: usize,
    out_channels: usize,
    opus_rate: u32,
    frame_ms: u32,
    lookahead: usize,
    mix: Vec<f32>,
    resampler: Option<StreamResampler>,
    framer: Framer,
    waveform: WaveformAccumulator,
    input_frames: u64,
    max_frames: Option<u64>,
    warnings: Vec<Warning>,
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncoder")
            .field("input_rate", &self.input_rate)
            .field("input_channels", &self.input_channels)
            .field("opus_rate", &self.opus_rate)
            .field("channels", &self.out_channels)
            .field("input_frames", &self.input_frames)
            .finish_non_exhaustive()
    }
}

impl StreamEncoder {
    /// An encoder for interleaved PCM at `input_rate` Hz with `input_channels`
    /// channels.
    pub fn new(
        input_rate: u32,
        input_channels: u16,
        config: &EncoderConfig,
    ) -> Result<Self, CodecError> {
        config.validate()?;
        check_sample_rate(input_rate)?;
        if input_channels == 0 {
            return Err(CodecError::NoChannels);
        }
        let input_channels = usize::from(input_channels);
        let out_channels = match config.channels {
            ChannelMode::Mono => 1,
            ChannelMode::Stereo => input_channels.min(2),
        };
        let opus_rate = opus_rate_for(input_rate);
        let opus_channels = if out_channels == 1 {
            opus::Channels::Mono
        } else {
            opus::Channels::Stereo
        };
        let mut encoder =
            opus::Encoder::new(opus_rate, opus_channels, config.application.to_opus())?;
        encoder.set_bitrate(opus::Bitrate::Bits(config.bitrate as i32))?;
        match config.bitrate_mode {
            BitrateMode::Vbr => {
                encoder.set_vbr(true)?;
                encoder.set_vbr_constraint(false)?;
            }
            BitrateMode::ConstrainedVbr => {
                encoder.set_vbr(true)?;
                encoder.set_vbr_constraint(true)?;
            }
            BitrateMode::Cbr => encoder.set_vbr(false)?,
        }
        encoder.set_complexity(i32::from(config.complexity))?;
        match config.fec_expected_loss {
            Some(loss) => {
                encoder.set_inband_fec(true)?;
                encoder.set_packet_loss_perc(i32::from(loss))?;
            }
            None => encoder.set_inband_fec(false)?,
        }
        encoder.set_dtx(config.dtx)?;
        let lookahead = usize::try_from(encoder.get_lookahead()?)
            .map_err(|_| CodecError::InvalidConfig("negative encoder lookahead".into()))?;

        let frame_samples = config.frame.samples_at(opus_rate);
        let resampler = if opus_rate == input_rate {
            None
        } else {
            Some(StreamResampler::new(input_rate, opus_rate, out_channels)?)
        };
        let max_frames = config
            .max_duration
            .map(|d| (d.as_secs_f64() * f64::from(input_rate)).floor() as u64);
        Ok(StreamEncoder {
            input_rate,
            input_channels,
            out_channels,
            opus_rate,
            frame_ms: config.frame.millis(),
            lookahead,
            mix: Vec::with_capacity(BLOCK_FRAMES * out_channels),
            resampler,
            framer: Framer {
                encoder,
                frame: vec![0.0; frame_samples * out_channels],
                fill: 0,
                out: vec![0; MAX_PACKET],
                duration_48k: (48_000 / 1_000 * config.frame.millis()),
                packets: VecDeque::new(),
                frames_encoded: 0,
                payload_bytes: 0,
                opus_time: Duration::ZERO,
            },
            waveform: WaveformAccumulator::new(input_rate, out_channels),
            input_frames: 0,
            max_frames,
            warnings: Vec::new(),
        })
    }

    /// Rate libopus is fed, in Hz (see [`opus_rate_for`](crate::opus_rate_for)).
    pub fn opus_rate(&self) -> u32 {
        self.opus_rate
    }

    /// Channels of the encoded stream (1 or 2).
    pub fn channels(&self) -> u16 {
        self.out_channels as u16
    }

    /// Input sample rate in Hz.
    pub fn input_rate(&self) -> u32 {
        self.input_rate
    }

    /// Frame duration.
    pub fn frame_duration(&self) -> FrameDuration {
        FrameDuration::from_millis(self.frame_ms).unwrap_or_default()
    }

    /// The encoder's delay in 48 kHz samples: the OpusHead pre-skip.
    pub fn pre_skip(&self) -> u16 {
        (self.lookahead * (48_000 / self.opus_rate as usize)) as u16
    }

    /// Input frames taken so far.
    pub fn input_frames(&self) -> u64 {
        self.input_frames
    }

    /// Records a warning to report in the summary.
    pub fn add_warning(&mut self, warning: Warning) {
        self.warnings.push(warning);
    }

    /// Pushes interleaved 16-bit PCM (any number of whole frames).
    pub fn push_i16(&mut self, interleaved: &[i16]) -> Result<(), CodecError> {
        self.push(interleaved)
    }

    /// Pushes interleaved `f32` PCM, full scale ±1.0 (any number of whole frames).
    pub fn push_f32(&mut self, interleaved: &[f32]) -> Result<(), CodecError> {
        self.push(interleaved)
    }

    fn push<S: PcmSample>(&mut self, interleaved: &[S]) -> Result<(), CodecError> {
        let ch = self.input_channels;
        if !interleaved.len().is_multiple_of(ch) {
            return Err(CodecError::InvalidInput(format!(
                "{} samples is not a whole number of {ch}-channel frames",
                interleaved.len()
            )));
        }
        let frames = (interleaved.len() / ch) as u64;
        if let Some(max) = self.max_frames
            && self.input_frames + frames > max
        {
            return Err(CodecError::TooLong {
                seconds: (self.input_frames + frames) as f64 / f64::from(self.input_rate),
                max_seconds: max as f64 / f64::from(self.input_rate),
            });
        }
        self.input_frames += frames;
        for block in interleaved.chunks(BLOCK_FRAMES * ch) {
            self.mix.clear();
            mix_into(block, ch, self.out_channels, &mut self.mix);
            self.waveform.update(&self.mix);
            match &mut self.resampler {
                Some(r) => {
                    let framer = &mut self.framer;
                    r.process(&self.mix, &mut |s| framer.feed(s))?;
                }
                None => self.framer.feed(&self.mix)?,
            }
        }
        Ok(())
    }

    /// Takes the oldest finished packet, if any.
    pub fn next_packet(&mut self) -> Option<EncodedPacket> {
        self.framer.packets.pop_front()
    }

    /// Number of finished packets waiting in [`next_packet`](Self::next_packet).
    pub fn pending_packets(&self) -> usize {
        self.framer.packets.len()
    }

    /// Flushes the resampler, pads the last frame with silence and encodes
    /// enough frames to cover the encoder's delay, so that the decoded stream,
    /// after pre-skip and end trimming, is exactly as long as the input.
    ///
    /// Returns every packet not yet taken (at least one) and the summary.
    pub fn finish(mut self) -> Result<FinishedStream, CodecError> {
        if let Some(r) = &mut self.resampler {
            let framer = &mut self.framer;
            r.finish(&mut |s| framer.feed(s))?;
        }
        let resampled = expected_output_len(self.input_frames, self.input_rate, self.opus_rate);
        let frame_samples = (self.framer.frame.len() / self.out_channels) as u64;
        let needed_frames = (self.lookahead as u64 + resampled).div_ceil(frame_samples);
        while self.framer.frames_encoded < needed_frames {
            self.framer.flush_frame()?;
        }
        let factor = u64::from(48_000 / self.opus_rate);
        let pre_skip = self.pre_skip();
        let length_48k = resampled * factor;
        let summary = EncodeSummary {
            input_rate: self.input_rate,
            input_channels: self.input_channels as u16,
            opus_rate: self.opus_rate,
            channels: self.out_channels as u16,
            pre_skip,
            frame_ms: self.frame_ms,
            input_frames: self.input_frames,
            length_48k,
            final_granule: u64::from(pre_skip) + length_48k,
            packets: self.framer.frames_encoded,
            payload_bytes: self.framer.payload_bytes,
            waveform: self.waveform.finish(WAVEFORM_BARS),
            opus_encode_time: self.framer.opus_time,
            warnings: self.warnings,
        };
        Ok(FinishedStream {
            packets: self.framer.packets.into(),
            summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_come_out_as_frames_complete() {
        let mut enc = StreamEncoder::new(48_000, 1, &EncoderConfig::default()).unwrap();
        enc.push_f32(&[0.0; 959]).unwrap();
        assert!(enc.next_packet().is_none());
        enc.push_f32(&[0.0; 1]).unwrap();
        let p = enc.next_packet().unwrap();
        assert_eq!(p.duration, 960);
        assert_eq!(enc.pre_skip(), 312);
        let end = enc.finish().unwrap();
        // 960 samples + 312 pre-skip need two 20 ms frames.
        assert_eq!(end.packets.len(), 1);
        assert_eq!(end.summary.packets, 2);
        assert_eq!(end.summary.final_granule, 312 + 960);
    }

    #[test]
    fn misaligned_and_too_long_input() {
        let mut enc = StreamEncoder::new(16_000, 2, &EncoderConfig::default()).unwrap();
        assert!(matches!(
            enc.push_i16(&[0; 3]),
            Err(CodecError::InvalidInput(_))
        ));
        let config = EncoderConfig {
            max_duration: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let mut enc = StreamEncoder::new(8_000, 1, &config).unwrap();
        enc.push_i16(&[0; 8_000]).unwrap();
        assert!(matches!(
            enc.push_i16(&[0; 1]),
            Err(CodecError::TooLong { .. })
        ));
        assert!(matches!(
            StreamEncoder::new(7_999, 1, &config),
            Err(CodecError::UnsupportedSampleRate { rate: 7_999 })
        ));
        assert!(matches!(
            StreamEncoder::new(8_000, 0, &config),
            Err(CodecError::NoChannels)
        ));
    }
}
