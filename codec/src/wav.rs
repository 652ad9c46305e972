//! WAV input: hound parses the header; the data chunk is then read in large
//! blocks and converted to `f32` with one tight loop per sample format.
//!
//! Read: integer PCM of 8 (unsigned), 16, 24 and 32 bits, 32-bit float,
//! `WAVE_FORMAT_EXTENSIBLE` with PCM or float sub-format (including 24 valid
//! bits in 32-bit containers), any channel count, 8 to 192 kHz, and any extra
//! chunks before the data (hound skips them; chunks after the data are never
//! read). Everything else is a typed [`CodecError`].

use std::io::{BufReader, Read, Seek, SeekFrom};

use crate::CodecError;
use crate::config::{EncoderConfig, TruncatedPolicy, check_sample_rate};
use crate::encoder::Warning;

/// How samples are stored in the data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WavSampleFormat {
    /// 8-bit unsigned integer.
    U8,
    /// 16-bit signed integer.
    I16,
    /// 24-bit signed integer in 3 bytes.
    I24,
    /// 24 valid bits in a 4-byte container (WAVE_FORMAT_EXTENSIBLE).
    I24In32,
    /// 32-bit signed integer.
    I32,
    /// 32-bit IEEE float.
    F32,
}

impl WavSampleFormat {
    /// Bytes per sample in the file.
    pub fn container_bytes(self) -> usize {
        match self {
            WavSampleFormat::U8 => 1,
            WavSampleFormat::I16 => 2,
            WavSampleFormat::I24 => 3,
            WavSampleFormat::I24In32 | WavSampleFormat::I32 | WavSampleFormat::F32 => 4,
        }
    }
}

/// What the WAV header says, and how much of it the file really holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WavInfo {
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Interleaved channels.
    pub channels: u16,
    /// Sample storage.
    pub format: WavSampleFormat,
    /// Frames the data chunk header announces.
    pub announced_frames: u64,
    /// Frames present in the file (less than announced if it is truncated).
    pub frames: u64,
}

impl WavInfo {
    /// Duration in seconds of the frames present.
    pub fn duration_secs(&self) -> f64 {
        self.frames as f64 / f64::from(self.sample_rate)
    }
}

/// Reads a WAV file's samples as interleaved `f32`.
pub struct WavSource<R> {
    reader: BufReader<R>,
    info: WavInfo,
    frames_left: u64,
    raw: Vec<u8>,
    /// For 24-in-32: `Some(true)` when samples sit in the low 24 bits
    /// (as hound writes them) rather than the high ones (as the format
    /// specifies); decided on the first block.
    low_justified: Option<bool>,
    warning: Option<Warning>,
}

impl<R> std::fmt::Debug for WavSource<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WavSource")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<R: Read + Seek> WavSource<R> {
    /// Parses the header and checks it against `config` (sample rate range,
    /// maximum duration, truncation policy).
    pub fn open(mut reader: R, config: &EncoderConfig) -> Result<Self, CodecError> {
        let file_len = reader.seek(SeekFrom::End(0))?;
        if file_len == 0 {
            return Err(CodecError::EmptyInput);
        }
        reader.seek(SeekFrom::Start(0))?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut reader, &mut magic)?;
        if magic[..n] != b"RIFF"[..n] {
            return Err(CodecError::NotWav);
        }
        if n < 4 {
            return Err(CodecError::TruncatedHeader);
        }
        reader.seek(SeekFrom::Start(0))?;

        let fmt_tag = scan_fmt_tag(&mut reader);
        reader.seek(SeekFrom::Start(0))?;
        let wav = hound::WavReader::new(BufReader::with_capacity(1 << 16, reader)).map_err(
            |e| match (CodecError::from_hound(e), fmt_tag) {
                (CodecError::UnsupportedFormat(reason), Some((tag, bits))) => {
                    CodecError::UnsupportedFormat(describe_format(tag, bits).unwrap_or(reason))
                }
                (err, _) => err,
            },
        )?;
        let spec = wav.spec();
        let samples = u64::from(wav.len());
        let mut reader = wav.into_inner();
        let data_start = reader.stream_position()?;
        // hound does not expose the container size, so read the data chunk's
        // length back from its header, just before the data.
        reader.seek(SeekFrom::Start(data_start - 4))?;
        let mut len = [0u8; 4];
        reader.read_exact(&mut len)?;
        let data_len = u64::from(u32::from_le_bytes(len));

        check_sample_rate(spec.sample_rate)?;
        if samples == 0 {
            return Err(CodecError::NoSamples);
        }
        let container = data_len / samples;
        let format = match (spec.sample_format, spec.bits_per_sample, container) {
            (hound::SampleFormat::Int, 8, 1) => WavSampleFormat::U8,
            (hound::SampleFormat::Int, 16, 2) => WavSampleFormat::I16,
            (hound::SampleFormat::Int, 24, 3) => WavSampleFormat::I24,
            (hound::SampleFormat::Int, 24, 4) => WavSampleFormat::I24In32,
            (hound::SampleFormat::Int, 32, 4) => WavSampleFormat::I32,
            (hound::SampleFormat::Float, 32, 4) => WavSampleFormat::F32,
            (fmt, bits, bytes) => {
                return Err(CodecError::UnsupportedFormat(format!(
                    "{bits}-bit {} samples in {bytes}-byte containers",
                    match fmt {
                        hound::SampleFormat::Int => "integer",
                        hound::SampleFormat::Float => "float",
                    }
                )));
            }
        };
        let block = container * u64::from(spec.channels);
        let announced_frames = data_len / block;
        let present = file_len.saturating_sub(data_start).min(data_len) / block;
        let mut warning = None;
        if present < announced_frames {
            if config.truncated == TruncatedPolicy::Refuse || present == 0 {
                if present == 0 {
                    return Err(CodecError::NoSamples);
                }
                return Err(CodecError::TruncatedData {
                    expected: announced_frames,
                    actual: present,
                });
            }
            warning = Some(Warning::TruncatedData {
                expected: announced_frames,
                actual: present,
            });
        }
        if let Some(max) = config.max_duration {
            let secs = present as f64 / f64::from(spec.sample_rate);
            if secs > max.as_secs_f64() {
                return Err(CodecError::TooLong {
                    seconds: secs,
                    max_seconds: max.as_secs_f64(),
                });
            }
        }
        Ok(WavSource {
            reader,
            info: WavInfo {
                sample_rate: spec.sample_rate,
                channels: spec.channels,
                format,
                announced_frames,
                frames: present,
            },
            frames_left: present,
            raw: Vec::new(),
            low_justified: None,
            warning,
        })
    }

    /// The header's facts.
    pub fn info(&self) -> &WavInfo {
        &self.info
    }

    /// A warning about the file (truncated data), if any.
    pub fn warning(&self) -> Option<&Warning> {
        self.warning.as_ref()
    }

    /// Replaces `out` with up to `max_frames` interleaved frames as `f32`
    /// (full scale ±1.0). Returns the number of frames; 0 at the end.
    pub fn read_f32(&mut self, out: &mut Vec<f32>, max_frames: usize) -> Result<usize, CodecError> {
        out.clear();
        let frames = (max_frames as u64).min(self.frames_left) as usize;
        if frames == 0 {
            return Ok(0);
        }
        let bytes = self.info.format.container_bytes();
        let n = frames * usize::from(self.info.channels) * bytes;
        self.raw.resize(n, 0);
        self.reader.read_exact(&mut self.raw)?;
        self.frames_left -= frames as u64;
        let raw = &self.raw[..];
        match self.info.format {
            WavSampleFormat::U8 => {
                out.extend(raw.iter().map(|&b| (f32::from(b) - 128.0) * (1.0 / 128.0)));
            }
            WavSampleFormat::I16 => out.extend(
                raw.chunks_exact(2)
                    .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) * (1.0 / 32_768.0)),
            ),
            WavSampleFormat::I24 => out.extend(raw.chunks_exact(3).map(|c| {
                i32::from_le_bytes([0, c[0], c[1], c[2]]) as f32 * (1.0 / 2_147_483_648.0)
            })),
            WavSampleFormat::I32 => out.extend(raw.chunks_exact(4).map(|c| {
                i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32 * (1.0 / 2_147_483_648.0)
            })),
            WavSampleFormat::I24In32 => {
                let low = *self.low_justified.get_or_insert_with(|| {
                    let mut any_low_byte = false;
                    let mut all_fit_24 = true;
                    for c in raw.chunks_exact(4) {
                        let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        any_low_byte |= c[0] != 0;
                        all_fit_24 &= (v << 8) >> 8 == v;
                    }
                    any_low_byte && all_fit_24
                });
                let shift = if low { 8 } else { 0 };
                out.extend(raw.chunks_exact(4).map(|c| {
                    (i32::from_le_bytes([c[0], c[1], c[2], c[3]]) << shift) as f32
                        * (1.0 / 2_147_483_648.0)
                }));
            }
            WavSampleFormat::F32 => out.extend(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
        Ok(frames)
    }
}

/// Best effort: the format tag and bits per sample of the fmt chunk, to
/// name an unsupported format in the error message.
fn scan_fmt_tag<R: Read + Seek>(reader: &mut R) -> Option<(u16, u16)> {
    reader.seek(SeekFrom::Start(12)).ok()?;
    for _ in 0..64 {
        let mut h = [0u8; 8];
        reader.read_exact(&mut h).ok()?;
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if &h[..4] == b"fmt " {
            let mut f = [0u8; 16];
            reader.read_exact(&mut f).ok()?;
            return Some((
                u16::from_le_bytes([f[0], f[1]]),
                u16::from_le_bytes([f[14], f[15]]),
            ));
        }
        reader
            .seek(SeekFrom::Current(i64::from(len) + i64::from(len % 2)))
            .ok()?;
    }
    None
}

/// A name for a format this crate does not read, from its fmt tag.
fn describe_format(tag: u16, bits: u16) -> Option<String> {
    let name = match tag {
        0x0001 | 0xFFFE if !bits.is_multiple_of(8) => {
            return Some(format!(
                "{bits}-bit integer PCM (only 8, 16, 24 and 32 bits are read)"
            ));
        }
        0x0003 if bits != 32 => {
            return Some(format!("{bits}-bit float (only 32-bit float is read)"));
        }
        0x0002 => "Microsoft ADPCM",
        0x0006 => "A-law",
        0x0007 => "µ-law",
        0x0011 => "IMA ADPCM",
        0x0031 => "GSM 6.10",
        0x0055 => "MPEG layer 3",
        0x0001 | 0x0003 | 0xFFFE => return None,
        other => {
            return Some(format!(
                "format tag 0x{other:04x} (only PCM and IEEE float are read)"
            ));
        }
    };
    Some(format!("{name} (only PCM and IEEE float are read)"))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
