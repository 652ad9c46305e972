//! Ogg Opus as RFC 7845 lays it out, over any [`Write`].
//!
//! - Page 1 holds the OpusHead packet alone (beginning-of-stream flag set):
//!   version 1, channel count, the encoder's real pre-skip, the original input
//!   rate, output gain 0, channel mapping family 0.
//! - OpusTags (vendor string and `KEY=value` comments) ends page 2.
//! - Audio pages carry granule positions in 48 kHz samples, counted from the
//!   first sample of the stream including the pre-skip.
//! - A page is ended once it holds a second of audio (or after every packet
//!   in live mode), so a listener can start before the clip ends.
//! - The last page has the end-of-stream flag and the granule position
//!   `pre_skip + length`, which trims the padding of the last frame.
//!
//! Pages are written by the `ogg` crate's [`PacketWriter`].

use std::hash::{BuildHasher, Hasher};
use std::io::Write;

use ogg::writing::{PacketWriteEndInfo, PacketWriter};

use crate::config::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};
use crate::encoder::{EncodeSummary, EncodedPacket, StreamEncoder};
use crate::{CodecError, EncoderConfig};

/// Audio per page before a page is ended, in 48 kHz samples (one second).
pub const PAGE_INTERVAL_48K: u64 = 48_000;

/// The identification header (RFC 7845 §5.1), channel mapping family 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpusHead {
    /// Output channels, 1 or 2.
    pub channels: u8,
    /// Samples (at 48 kHz) to discard from the decoder output at the start.
    pub pre_skip: u16,
    /// Sample rate of the original input, in Hz (informational).
    pub input_sample_rate: u32,
    /// Gain to apply on output, Q7.8 dB.
    pub output_gain: i16,
    /// Channel mapping family (0 for mono/stereo).
    pub mapping_family: u8,
}

impl OpusHead {
    /// The 19-byte header packet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(19);
        b.extend_from_slice(b"OpusHead");
        b.push(1);
        b.push(self.channels);
        b.extend_from_slice(&self.pre_skip.to_le_bytes());
        b.extend_from_slice(&self.input_sample_rate.to_le_bytes());
        b.extend_from_slice(&self.output_gain.to_le_bytes());
        b.push(self.mapping_family);
        b
    }

    /// Parses an OpusHead packet, refusing every value this crate cannot
    /// decode safely (each with its own [`CodecError`] variant):
    ///
    /// - version: the major version (high nibble) must be 0, as RFC 7845
    ///   asks; a later minor version's extra bytes are ignored;
    /// - channels and mapping family: family 0 with 1 or 2 channels only
    ///   (the decoder is a mono/stereo `opus::Decoder`);
    /// - input rate: 0 ("unknown") or 8 to 192 kHz, the range the encoder
    ///   accepts. RFC 7845 calls the field informational, but here it is the
    ///   default output rate: the decoder resamples to it and sizes its
    ///   output by it, so an absurd value (3 GHz) would be an absurd
    ///   allocation. A file from this crate always passes, and a rate
    ///   outside the range can only come from a broken or hostile writer,
    ///   so it is refused rather than silently replaced;
    /// - pre-skip: any `u16` (at most 1.4 s); checked against the stream's
    ///   length once that is known;
    /// - output gain: any `i16` (±128 dB) is accepted. libopus applies it
    ///   as a float factor, so the worst case is clipped but finite audio,
    ///   which a hostile encoder could produce with the samples alone; no
    ///   size depends on it.
    pub fn parse(packet: &[u8]) -> Result<Self, CodecError> {
        if packet.len() < 19 || &packet[..8] != b"OpusHead" {
            return Err(CodecError::InvalidOpusStream(
                "the first packet is not an OpusHead header".into(),
            ));
        }
        if packet[8] & 0xF0 != 0 {
            return Err(CodecError::UnsupportedOpusVersion { version: packet[8] });
        }
        let head = OpusHead {
            channels: packet[9],
            pre_skip: u16::from_le_bytes([packet[10], packet[11]]),
            input_sample_rate: u32::from_le_bytes([packet[12], packet[13], packet[14], packet[15]]),
            output_gain: i16::from_le_bytes([packet[16], packet[17]]),
            mapping_family: packet[18],
        };
        if head.mapping_family != 0 || !(1..=2).contains(&head.channels) {
            return Err(CodecError::UnsupportedChannelLayout {
                channels: head.channels,
                mapping_family: head.mapping_family,
            });
        }
        if head.input_sample_rate != 0
            && !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&head.input_sample_rate)
        {
            return Err(CodecError::InvalidInputRate {
                rate: head.input_sample_rate,
            });
        }
        Ok(head)
    }
}

/// The comment header (RFC 7845 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusTags {
    /// Who encoded the stream.
    pub vendor: String,
    /// `KEY=value` comments.
    pub comments: Vec<(String, String)>,
}

impl OpusTags {
    /// Tags naming this crate and libopus as the vendor.
    pub fn with_comments(comments: Vec<(String, String)>) -> Self {
        OpusTags {
            vendor: format!(
                "ptt-codec {} ({})",
                env!("CARGO_PKG_VERSION"),
                opus::version()
            ),
            comments,
        }
    }

    /// The header packet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"OpusTags");
        b.extend_from_slice(&(self.vendor.len() as u32).to_le_bytes());
        b.extend_from_slice(self.vendor.as_bytes());
        b.extend_from_slice(&(self.comments.len() as u32).to_le_bytes());
        for (k, v) in &self.comments {
            let c = format!("{k}={v}");
            b.extend_from_slice(&(c.len() as u32).to_le_bytes());
            b.extend_from_slice(c.as_bytes());
        }
        b
    }

    /// Parses an OpusTags packet.
    ///
    /// Every length is checked against the bytes left in the packet before
    /// anything is taken, and a header declaring more than [`MAX_COMMENTS`]
    /// comments is refused before any is read; the packet itself is bounded by
    /// [`MAX_HEADER_PACKET_BYTES`](crate::MAX_HEADER_PACKET_BYTES) when it
    /// comes from [`decode_ogg_opus`](crate::decode_ogg_opus). Vendor and
    /// comments that are not UTF-8 are read lossily.
    pub fn parse(packet: &[u8]) -> Result<Self, CodecError> {
        if packet.len() < 8 || &packet[..8] != b"OpusTags" {
            return Err(CodecError::InvalidOpusStream(
                "the second packet is not an OpusTags header".into(),
            ));
        }
        let mut rest = &packet[8..];
        let vendor = take_string(&mut rest, "the vendor string runs past the end")?;
        let count = take_u32(&mut rest, "the comment count is missing")?;
        if count > MAX_COMMENTS {
            return Err(CodecError::TooManyComments {
                count,
                max: MAX_COMMENTS,
            });
        }
        let mut comments = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let c = take_string(&mut rest, "a comment runs past the end")?;
            let c = String::from_utf8_lossy(c);
            let (k, v) = c.split_once('=').unwrap_or((&c, ""));
            comments.push((k.to_string(), v.to_string()));
        }
        Ok(OpusTags {
            vendor: String::from_utf8_lossy(vendor).into_owned(),
            comments,
        })
    }
}

/// Most comments [`OpusTags::parse`] reads. A voice clip carries a handful;
/// the bound keeps the per-comment bookkeeping small whatever a header
/// declares.
pub const MAX_COMMENTS: u32 = 1_024;

/// Takes a little-endian `u32` from the front of `rest`.
fn take_u32(rest: &mut &[u8], missing: &'static str) -> Result<u32, CodecError> {
    let (bytes, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(CodecError::MalformedOpusTags(missing))?;
    *rest = tail;
    Ok(u32::from_le_bytes(*bytes))
}

/// Takes a length-prefixed byte string from the front of `rest`, checking
/// the length against what is left.
fn take_string<'a>(rest: &mut &'a [u8], short: &'static str) -> Result<&'a [u8], CodecError> {
    let len = take_u32(rest, short)? as usize;
    if len > rest.len() {
        return Err(CodecError::MalformedOpusTags(short));
    }
    let (s, tail) = rest.split_at(len);
    *rest = tail;
    Ok(s)
}

/// A random stream serial number, from the standard library's per-process
/// random hash keys mixed with the time.
pub fn random_serial() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let v = h.finish();
    (v ^ (v >> 32)) as u32
}

/// Writes Opus packets as an Ogg Opus stream.
///
/// Call [`write_packet`](Self::write_packet) for every packet but the last
/// and [`finish`](Self::finish) with the last one.
pub struct OggOpusWriter<W: Write> {
    inner: PacketWriter<'static, W>,
    serial: u32,
    granule: u64,
    page_start: u64,
    live: bool,
    pages_flushed: u64,
}

impl<W: Write> std::fmt::Debug for OggOpusWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OggOpusWriter")
            .field("serial", &self.serial)
            .field("granule", &self.granule)
            .finish_non_exhaustive()
    }
}

impl<W: Write> OggOpusWriter<W> {
    /// Starts a stream: writes the OpusHead page and the OpusTags page.
    /// `live` ends a page after every packet.
    pub fn new(
        writer: W,
        head: &OpusHead,
        tags: &OpusTags,
        serial: u32,
        live: bool,
    ) -> Result<Self, CodecError> {
        let mut inner = PacketWriter::new(writer);
        inner.write_packet(head.to_bytes(), serial, PacketWriteEndInfo::EndPage, 0)?;
        inner.write_packet(tags.to_bytes(), serial, PacketWriteEndInfo::EndPage, 0)?;
        inner.inner_mut().flush()?;
        Ok(OggOpusWriter {
            inner,
            serial,
            granule: 0,
            page_start: 0,
            live,
            pages_flushed: 2,
        })
    }

    /// The stream serial number.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Granule position after the packets written so far (48 kHz samples).
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Pages completed so far (including the two header pages).
    pub fn pages(&self) -> u64 {
        self.pages_flushed
    }

    /// Appends a packet that is not the last of the stream.
    pub fn write_packet(&mut self, packet: EncodedPacket) -> Result<(), CodecError> {
        self.granule += u64::from(packet.duration);
        let end_page = self.live || self.granule - self.page_start >= PAGE_INTERVAL_48K;
        let info = if end_page {
            PacketWriteEndInfo::EndPage
        } else {
            PacketWriteEndInfo::NormalPacket
        };
        self.inner
            .write_packet(packet.data, self.serial, info, self.granule)?;
        if end_page {
            // Hand the finished page on at once (a socket, a pipe, a
            // BufWriter): a listener can start before the clip ends.
            self.page_start = self.granule;
            self.pages_flushed += 1;
            self.inner.inner_mut().flush()?;
        }
        Ok(())
    }

    /// Appends the last packet on a page with the end-of-stream flag and
    /// `final_granule` as its granule position (end trimming), flushes and
    /// returns the writer.
    ///
    /// `final_granule` is `pre_skip + length` in 48 kHz samples; it must not
    /// be below the granule before this packet nor above the one after it.
    pub fn finish(mut self, last: EncodedPacket, final_granule: u64) -> Result<W, CodecError> {
        let full = self.granule + u64::from(last.duration);
        if final_granule <= self.granule || final_granule > full {
            return Err(CodecError::InvalidInput(format!(
                "final granule {final_granule} outside the last packet ({}..={full})",
                self.granule + 1
            )));
        }
        self.inner.write_packet(
            last.data,
            self.serial,
            PacketWriteEndInfo::EndStream,
            final_granule,
        )?;
        let mut w = self.inner.into_inner();
        w.flush()?;
        Ok(w)
    }
}

/// Streaming PCM to Ogg Opus: a [`StreamEncoder`] feeding an [`OggOpusWriter`].
///
/// Pages go to the writer as soon as they are complete.
pub struct OggOpusEncoder<W: Write> {
    encoder: StreamEncoder,
    writer: OggOpusWriter<W>,
}

impl<W: Write> std::fmt::Debug for OggOpusEncoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OggOpusEncoder")
            .field("encoder", &self.encoder)
            .field("writer", &self.writer)
            .finish()
    }
}

impl<W: Write> OggOpusEncoder<W> {
    /// Starts an Ogg Opus stream for PCM at `input_rate` Hz with
    /// `input_channels` channels; the two header pages are written at once.
    pub fn new(
        writer: W,
        input_rate: u32,
        input_channels: u16,
        config: &EncoderConfig,
    ) -> Result<Self, CodecError> {
        let encoder = StreamEncoder::new(input_rate, input_channels, config)?;
        let head = OpusHead {
            channels: encoder.channels() as u8,
            pre_skip: encoder.pre_skip(),
            input_sample_rate: input_rate,
            output_gain: 0,
            mapping_family: 0,
        };
        let tags = OpusTags::with_comments(config.comments.clone());
        let serial = config.serial.unwrap_or_else(random_serial);
        let writer = OggOpusWriter::new(writer, &head, &tags, serial, config.live)?;
        Ok(OggOpusEncoder { encoder, writer })
    }

    /// The underlying packet encoder.
    pub fn encoder_mut(&mut self) -> &mut StreamEncoder {
        &mut self.encoder
    }

    /// Pushes interleaved 16-bit PCM.
    pub fn push_i16(&mut self, interleaved: &[i16]) -> Result<(), CodecError> {
        self.encoder.push_i16(interleaved)?;
        self.drain()
    }

    /// Pushes interleaved `f32` PCM (full scale ±1.0).
    pub fn push_f32(&mut self, interleaved: &[f32]) -> Result<(), CodecError> {
        self.encoder.push_f32(interleaved)?;
        self.drain()
    }

    fn drain(&mut self) -> Result<(), CodecError> {
        while let Some(p) = self.encoder.next_packet() {
            self.writer.write_packet(p)?;
        }
        Ok(())
    }

    /// Encodes the end of the clip, writes the last page and returns the
    /// writer with the summary.
    pub fn finish(self) -> Result<(W, EncodeSummary), CodecError> {
        let OggOpusEncoder {
            encoder,
            mut writer,
        } = self;
        let finished = encoder.finish()?;
        let mut packets = finished.packets;
        let last = packets.pop().ok_or_else(|| {
            CodecError::InvalidInput("the encoder produced no final packet".into())
        })?;
        for p in packets {
            writer.write_packet(p)?;
        }
        let w = writer.finish(last, finished.summary.final_granule)?;
        Ok((w, finished.summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_tags_round_trip() {
        let head = OpusHead {
            channels: 2,
            pre_skip: 312,
            input_sample_rate: 44_100,
            output_gain: -256,
            mapping_family: 0,
        };
        let bytes = head.to_bytes();
        assert_eq!(bytes.len(), 19);
        assert_eq!(OpusHead::parse(&bytes).unwrap(), head);
        let tags = OpusTags::with_comments(vec![("TITLE".into(), "hi=there".into())]);
        assert_eq!(OpusTags::parse(&tags.to_bytes()).unwrap(), tags);
        assert!(OpusTags::parse(b"OpusTags\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn serials_differ() {
        assert_ne!(random_serial(), random_serial());
    }
}
