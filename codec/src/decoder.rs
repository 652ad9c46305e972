//! Decoding: Ogg Opus files to PCM, and raw Opus packet sequences with gaps.
//!
//! [`decode_ogg_opus`] honours the OpusHead pre-skip and output gain and the
//! end trimming of the last page's granule position, so a clip decodes to
//! exactly its original length. [`PacketDecoder`] plays raw packets as they
//! arrive over the network: a missing packet is rebuilt from the in-band FEC
//! of the next one when it is there, and concealed (PLC) otherwise.
//!
//! A file to decode is untrusted: every header field, length and count that
//! could size an allocation is bounded before it is used (see
//! [`decode_ogg_opus_with`] and the crate README's "Untrusted input").

use std::io::{Read, Seek, Write};
use std::time::Duration;

use crate::CodecError;
use crate::config::opus_rate_for;
use crate::ogg_reader::OggPacketReader;
use crate::ogg_writer::{OpusHead, OpusTags};
use crate::pcm::f32_to_i16;
use crate::resample::resample_all;
use crate::waveform::WaveformAccumulator;

/// Longest Opus packet duration: 120 ms at 48 kHz.
const MAX_FRAME_48K: usize = 5_760;

/// Decoded audio, interleaved `f32` (full scale ±1.0).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Sample rate of `samples` in Hz.
    pub sample_rate: u32,
    /// Interleaved channels (1 or 2).
    pub channels: u16,
    /// The samples.
    pub samples: Vec<f32>,
    /// The original input rate from OpusHead.
    pub input_sample_rate: u32,
    /// Pre-skip from OpusHead, in 48 kHz samples.
    pub pre_skip: u16,
    /// Number of audio packets in the stream.
    pub packets: u64,
    /// Total audio packet bytes.
    pub payload_bytes: u64,
    /// The OpusTags header.
    pub tags: OpusTags,
}

impl DecodedAudio {
    /// Frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / usize::from(self.channels.max(1))
    }

    /// Duration in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.frames() as f64 / f64::from(self.sample_rate)
    }

    /// The samples as 16-bit PCM.
    pub fn to_i16(&self) -> Vec<i16> {
        let mut out = Vec::with_capacity(self.samples.len());
        f32_to_i16(&self.samples, &mut out);
        out
    }

    /// Writes the audio as a 16-bit PCM WAV file.
    pub fn write_wav<W: Write + Seek>(&self, writer: W) -> Result<(), CodecError> {
        let spec = hound::WavSpec {
            channels: self.channels,
            sample_rate: self.sample_rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let map = |e: hound::Error| match e {
            hound::Error::IoError(io) => CodecError::Io(io),
            other => CodecError::InvalidInput(other.to_string()),
        };
        // A WAV data chunk holds at most 4 GiB (2 bytes a sample); hound
        // would panic on a count that does not fit its u32.
        let count = u32::try_from(self.samples.len())
            .ok()
            .filter(|&n| n <= u32::MAX / 2 - 64)
            .ok_or_else(|| {
                CodecError::InvalidInput(format!(
                    "{} samples do not fit in a WAV file (4 GiB at most)",
                    self.samples.len()
                ))
            })?;
        let mut w = hound::WavWriter::new(writer, spec).map_err(map)?;
        {
            let mut w16 = w.get_i16_writer(count);
            for s in self.to_i16() {
                w16.write_sample(s);
            }
            w16.flush().map_err(map)?;
        }
        w.finalize().map_err(map)
    }

    /// Waveform bars (0 to 31) of the decoded audio.
    pub fn waveform(&self, bars: usize) -> Vec<u8> {
        let mut acc = WaveformAccumulator::new(self.sample_rate, usize::from(self.channels));
        acc.update(&self.samples);
        acc.finish(bars)
    }
}

/// The rate to decode to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputRate {
    /// The original input rate from OpusHead (the default): decoded directly
    /// when Opus supports that rate, else decoded at the next Opus rate and
    /// resampled with rubato. The length then equals the input's.
    #[default]
    Original,
    /// 48 kHz, as players and `opusdec`/`ffmpeg` produce it.
    Native48k,
    /// One of the rates libopus decodes to directly: 8, 12, 16, 24 or 48 kHz.
    Opus(u32),
}

/// Largest OpusHead or OpusTags packet read, in bytes (1 MiB).
///
/// An OpusHead of mapping family 0 is 19 bytes, and a voice clip's OpusTags
/// holds a vendor string and a few comments. RFC 7845 lets a comment header
/// grow much larger (cover art in a `METADATA_BLOCK_PICTURE` comment); this
/// crate refuses such a header with [`CodecError::PacketTooLarge`] rather
/// than buffer it, since nothing here would use it.
pub const MAX_HEADER_PACKET_BYTES: usize = 1 << 20;

/// Largest audio packet read, in bytes (60 KiB).
///
/// The largest valid Opus packet is 120 ms of 2.5 ms frames, 48 frames of at
/// most 1,275 bytes (RFC 6716 §3.2.1) plus their length bytes, 61,298 bytes
/// at most; anything longer is padding or garbage, refused before it is
/// buffered.
pub const MAX_AUDIO_PACKET_BYTES: usize = 61_440;

/// How to decode an Ogg Opus stream.
///
/// `Default` decodes at the original input rate and refuses streams that
/// decode to more than an hour (the encoder's default maximum,
/// [`EncoderConfig::max_duration`](crate::EncoderConfig::max_duration)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderConfig {
    /// The rate to decode to.
    pub rate: OutputRate,
    /// Longest audio decoded; a longer stream fails with
    /// [`CodecError::TooLong`] as soon as it has decoded past the bound.
    /// `None` decodes any length.
    ///
    /// This is the bound on the decoder's memory: Opus packets are tiny
    /// against what they decode to (a 2-byte packet is 120 ms of silence),
    /// so a small file can claim hours of audio. The whole clip is held as
    /// `f32`: an hour of mono at 48 kHz is 691 MB (and four times that at
    /// an original rate of 192 kHz).
    pub max_duration: Option<Duration>,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            rate: OutputRate::Original,
            max_duration: Some(Duration::from_secs(3600)),
        }
    }
}

/// Decodes a whole Ogg Opus stream at the original input rate, with the
/// default [`DecoderConfig`].
pub fn decode_ogg_opus<R: Read>(reader: R) -> Result<DecodedAudio, CodecError> {
    decode_ogg_opus_with(reader, &DecoderConfig::default())
}

/// Decodes a whole Ogg Opus stream at the chosen rate (otherwise the default
/// [`DecoderConfig`]).
pub fn decode_ogg_opus_at<R: Read>(
    reader: R,
    rate: OutputRate,
) -> Result<DecodedAudio, CodecError> {
    decode_ogg_opus_with(
        reader,
        &DecoderConfig {
            rate,
            ..DecoderConfig::default()
        },
    )
}

/// Decodes a whole Ogg Opus stream as `config` says.
///
/// Everything taken from the stream is bounded before it sizes anything:
/// the OpusHead fields by [`OpusHead::parse`], the OpusTags lengths and
/// counts by [`OpusTags::parse`], every packet by [`MAX_HEADER_PACKET_BYTES`]
/// or [`MAX_AUDIO_PACKET_BYTES`] before it is buffered, the decoded length by
/// [`DecoderConfig::max_duration`], and the pre-skip by the length of the
/// stream. The last page's granule position only ever trims the end: one
/// beyond the decoded audio is ignored (the stream keeps all it decoded).
/// Pages of other logical streams are skipped; a stream cut short (no
/// end-of-stream page, or a last page cut in the middle) decodes what is
/// complete.
pub fn decode_ogg_opus_with<R: Read>(
    reader: R,
    config: &DecoderConfig,
) -> Result<DecodedAudio, CodecError> {
    let mut ogg = OggPacketReader::new(reader);
    let first = ogg
        .next_packet(MAX_HEADER_PACKET_BYTES, "OpusHead")?
        .ok_or_else(|| CodecError::InvalidOpusStream("no Ogg pages found".into()))?;
    let head = OpusHead::parse(&first.data)?;
    let second = ogg
        .next_packet(MAX_HEADER_PACKET_BYTES, "OpusTags")?
        .ok_or_else(|| CodecError::InvalidOpusStream("missing OpusTags header".into()))?;
    let tags = OpusTags::parse(&second.data)?;

    // `OpusHead::parse` has bounded the rate to 8..=192 kHz (or 0).
    let original = if head.input_sample_rate == 0 {
        48_000
    } else {
        head.input_sample_rate
    };
    let decode_rate = match config.rate {
        OutputRate::Original => opus_rate_for(original),
        OutputRate::Native48k => 48_000,
        OutputRate::Opus(r) => {
            if ![8_000, 12_000, 16_000, 24_000, 48_000].contains(&r) {
                return Err(CodecError::InvalidInput(format!(
                    "{r} Hz is not a rate libopus decodes to"
                )));
            }
            r
        }
    };
    let factor = u64::from(48_000 / decode_rate);
    let channels = usize::from(head.channels);
    let mut decoder = opus::Decoder::new(
        decode_rate,
        if channels == 1 {
            opus::Channels::Mono
        } else {
            opus::Channels::Stereo
        },
    )?;
    decoder.set_gain(i32::from(head.output_gain))?;

    let pre_skip = u64::from(head.pre_skip);
    let max_48k = config
        .max_duration
        .map(|d| (d.as_secs_f64() * 48_000.0).ceil() as u64);
    let too_long = |length_48k: u64, max_48k: u64| CodecError::TooLong {
        seconds: length_48k as f64 / 48_000.0,
        max_seconds: max_48k as f64 / 48_000.0,
    };
    let mut pcm: Vec<f32> = Vec::new();
    let mut buf = vec![0f32; MAX_FRAME_48K / factor as usize * channels];
    let mut packets = 0u64;
    let mut payload_bytes = 0u64;
    let mut decoded_48k = 0u64;
    let mut end_granule: Option<u64> = None;
    while let Some(p) = ogg.next_packet(MAX_AUDIO_PACKET_BYTES, "audio")? {
        let n = decoder.decode_float(&p.data, &mut buf, false)?;
        pcm.extend_from_slice(&buf[..n * channels]);
        packets += 1;
        payload_bytes += p.data.len() as u64;
        decoded_48k += n as u64 * factor;
        // Stop as soon as the stream is longer than the bound could allow
        // after end trimming (at most one packet is trimmed).
        if let Some(max) = max_48k
            && decoded_48k > pre_skip + max + MAX_FRAME_48K as u64
        {
            return Err(too_long(decoded_48k - pre_skip, max));
        }
        if p.last_in_stream() {
            end_granule = Some(p.absgp_page());
            break;
        }
    }
    if packets == 0 {
        return Err(CodecError::InvalidOpusStream(
            "the stream holds no audio packets".into(),
        ));
    }
    // Without an end-of-stream page (a stream cut short), keep all that
    // decoded; a granule position beyond the decoded audio cannot add any.
    let end_48k = end_granule
        .filter(|&g| g != u64::MAX)
        .unwrap_or(decoded_48k)
        .min(decoded_48k);
    if end_48k < pre_skip {
        return Err(CodecError::PreSkipBeyondEnd {
            pre_skip: head.pre_skip,
            available: end_48k,
        });
    }
    if let Some(max) = max_48k
        && end_48k - pre_skip > max
    {
        return Err(too_long(end_48k - pre_skip, max));
    }
    let start = (pre_skip / factor) as usize;
    let end = ((end_48k / factor) as usize).max(start);
    let mut samples = pcm;
    samples.truncate(end * channels);
    samples.drain(..start.min(samples.len() / channels) * channels);

    let (samples, sample_rate) = match config.rate {
        OutputRate::Original if decode_rate != original => (
            resample_all(&samples, channels, decode_rate, original)?,
            original,
        ),
        _ => (samples, decode_rate),
    };
    Ok(DecodedAudio {
        sample_rate,
        channels: u16::from(head.channels),
        samples,
        input_sample_rate: head.input_sample_rate,
        pre_skip: head.pre_skip,
        packets,
        payload_bytes,
        tags,
    })
}

/// Decodes a sequence of raw Opus packets where some may be missing.
///
/// ```
/// use ptt_codec::{EncoderConfig, PacketDecoder, StreamEncoder};
///
/// let mut enc = StreamEncoder::new(48_000, 1, &EncoderConfig::default())?;
/// enc.push_f32(&vec![0.0; 4_800])?;
/// let packets = enc.finish()?.packets;
/// let mut dec = PacketDecoder::new(48_000, 1)?;
/// let mut pcm = Vec::new();
/// // Packet 2 was lost: FEC from packet 3 if it has any, else concealment.
/// for i in 0..packets.len() {
///     let this = (i != 2).then(|| packets[i].data.as_slice());
///     let next = packets.get(i + 1).map(|p| p.data.as_slice());
///     pcm.extend_from_slice(dec.decode(this, next)?);
/// }
/// assert_eq!(pcm.len(), packets.len() * 960);
/// # Ok::<(), ptt_codec::CodecError>(())
/// ```
pub struct PacketDecoder {
    decoder: opus::Decoder,
    rate: u32,
    channels: usize,
    last_frame: usize,
    buf: Vec<f32>,
    recovered: u64,
    concealed: u64,
}

impl std::fmt::Debug for PacketDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketDecoder")
            .field("rate", &self.rate)
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl PacketDecoder {
    /// A decoder producing `channels` (1 or 2) at `rate` Hz (8, 12, 16, 24 or 48 kHz).
    pub fn new(rate: u32, channels: u16) -> Result<Self, CodecError> {
        let ch = match channels {
            1 => opus::Channels::Mono,
            2 => opus::Channels::Stereo,
            n => {
                return Err(CodecError::InvalidInput(format!(
                    "{n} channels: raw packets decode to mono or stereo"
                )));
            }
        };
        let decoder = opus::Decoder::new(rate, ch)?;
        let max = (rate as usize) * 120 / 1000;
        Ok(PacketDecoder {
            decoder,
            rate,
            channels: usize::from(channels),
            last_frame: (rate as usize) / 50,
            buf: vec![0.0; max * usize::from(channels)],
            recovered: 0,
            concealed: 0,
        })
    }

    /// Decodes one packet slot. `packet` is `None` when the packet was lost;
    /// `next` is the packet after it, if it has arrived, used for FEC.
    /// Returns the interleaved samples for this slot.
    pub fn decode(
        &mut self,
        packet: Option<&[u8]>,
        next: Option<&[u8]>,
    ) -> Result<&[f32], CodecError> {
        let n = match (packet, next) {
            (Some(p), _) => {
                let n = self.decoder.decode_float(p, &mut self.buf, false)?;
                self.last_frame = n;
                n
            }
            (None, Some(next)) => {
                // Recover the lost frame from the next packet's LBRR data
                // (libopus falls back to concealment when there is none).
                let len = self.last_frame * self.channels;
                let n = self
                    .decoder
                    .decode_float(next, &mut self.buf[..len], true)?;
                self.recovered += 1;
                n
            }
            (None, None) => {
                let len = self.last_frame * self.channels;
                let n = self
                    .decoder
                    .decode_float(&[], &mut self.buf[..len], false)?;
                self.concealed += 1;
                n
            }
        };
        Ok(&self.buf[..n * self.channels])
    }

    /// Lost packets rebuilt with the next packet's FEC (or PLC inside libopus
    /// when it had none).
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    /// Lost packets concealed without a next packet.
    pub fn concealed(&self) -> u64 {
        self.concealed
    }
}

/// Facts about an Ogg Opus file, for `codec info`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OggOpusInfo {
    /// Duration in seconds after pre-skip and end trimming.
    pub duration_secs: f64,
    /// Original input rate from OpusHead.
    pub input_sample_rate: u32,
    /// Channels.
    pub channels: u16,
    /// Pre-skip in 48 kHz samples.
    pub pre_skip: u16,
    /// Audio packets.
    pub packets: u64,
    /// Average payload bitrate in bit/s.
    pub average_bitrate: f64,
    /// Vendor string.
    pub vendor: String,
    /// Comments.
    pub comments: Vec<(String, String)>,
    /// 100 waveform bars, 0 to 31.
    pub waveform: Vec<u8>,
}

/// Reads and decodes an Ogg Opus file (at 48 kHz, with the default bounds
/// of [`DecoderConfig`]) to describe it.
pub fn inspect_ogg_opus<R: Read>(reader: R) -> Result<OggOpusInfo, CodecError> {
    let audio = decode_ogg_opus_at(reader, OutputRate::Native48k)?;
    let duration = audio.duration_secs();
    Ok(OggOpusInfo {
        duration_secs: duration,
        input_sample_rate: audio.input_sample_rate,
        channels: audio.channels,
        pre_skip: audio.pre_skip,
        packets: audio.packets,
        average_bitrate: if duration > 0.0 {
            audio.payload_bytes as f64 * 8.0 / duration
        } else {
            0.0
        },
        vendor: audio.tags.vendor.clone(),
        comments: audio.tags.comments.clone(),
        waveform: audio.waveform(crate::WAVEFORM_BARS),
    })
}
