//! The one error type of the crate: every way an input, a setting or an
//! Opus/Ogg stream can be wrong, each with a message that says what is wrong.

use std::io;

/// Everything that can go wrong while reading, encoding or decoding audio.
///
/// No function of this crate panics on bad input: each case below is returned
/// instead, with a message meant for a person.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The input is zero bytes long.
    #[error("the file is empty")]
    EmptyInput,

    /// The input does not start with a RIFF/WAVE header.
    #[error("not a WAV file (no RIFF/WAVE header)")]
    NotWav,

    /// The input ends inside the WAV header, before the first sample.
    #[error("truncated WAV header: the file ends before the data chunk")]
    TruncatedHeader,

    /// The WAV header is structurally wrong (inconsistent sizes, missing fmt chunk…).
    #[error("malformed WAV header: {0}")]
    MalformedWav(String),

    /// The format chunk declares zero channels.
    #[error("the WAV header declares zero channels")]
    NoChannels,

    /// The sample rate is zero or outside 8 kHz to 192 kHz.
    #[error("unsupported sample rate {rate} Hz (expected 8000 to 192000 Hz)")]
    UnsupportedSampleRate {
        /// The sample rate that was given.
        rate: u32,
    },

    /// The samples are stored in a format this crate does not read
    /// (ADPCM, µ-law, 12-bit, 64-bit float…).
    #[error("unsupported WAV sample format: {0}")]
    UnsupportedFormat(String),

    /// The data chunk holds no samples.
    #[error("the file holds no audio samples")]
    NoSamples,

    /// The data chunk claims more bytes than the file holds and the
    /// configuration asks to refuse such files.
    #[error(
        "truncated WAV data: the header announces {expected} frames but the file holds {actual}"
    )]
    TruncatedData {
        /// Frames the data chunk header announces.
        expected: u64,
        /// Frames actually present in the file.
        actual: u64,
    },

    /// The clip is longer than [`EncoderConfig::max_duration`](crate::EncoderConfig::max_duration)
    /// (encoding) or [`DecoderConfig::max_duration`](crate::DecoderConfig::max_duration)
    /// (decoding).
    #[error("the clip is too long: {seconds:.1} s, the maximum is {max_seconds:.1} s")]
    TooLong {
        /// The clip's duration in seconds (as far as it is known).
        seconds: f64,
        /// The configured maximum in seconds.
        max_seconds: f64,
    },

    /// An encoder setting is out of range (bitrate, complexity, loss…).
    #[error("invalid encoder setting: {0}")]
    InvalidConfig(String),

    /// PCM handed to the streaming API does not fit its declared layout
    /// (length not a multiple of the channel count, push after finish…).
    #[error("invalid PCM input: {0}")]
    InvalidInput(String),

    /// libopus refused an operation.
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),

    /// The resampler could not be built or failed.
    #[error("resampler: {0}")]
    Resample(String),

    /// The Ogg container could not be read.
    #[error("invalid Ogg stream: {0}")]
    Ogg(String),

    /// The Ogg stream is valid but not Ogg Opus as RFC 7845 describes it
    /// (bad OpusHead/OpusTags, unsupported channel mapping…).
    #[error("invalid Ogg Opus stream: {0}")]
    InvalidOpusStream(String),

    /// The OpusHead header's major version is not 0: RFC 7845 streams have
    /// version 1, and versions 16 and above are incompatible by definition.
    #[error("unsupported OpusHead version {version} (only version 1 streams are read)")]
    UnsupportedOpusVersion {
        /// The version byte of the header.
        version: u8,
    },

    /// The OpusHead header declares a channel layout this crate does not
    /// decode: zero channels, or anything but mapping family 0 (mono or
    /// stereo).
    #[error(
        "unsupported channel layout: {channels} channels with mapping family {mapping_family} \
         (only family 0, mono or stereo, is decoded)"
    )]
    UnsupportedChannelLayout {
        /// The declared channel count.
        channels: u8,
        /// The declared channel mapping family.
        mapping_family: u8,
    },

    /// The OpusHead header declares an original input rate outside 8 kHz to
    /// 192 kHz, the range this crate encodes from (0, "unknown", is
    /// accepted and decodes at 48 kHz). The rate is the default output rate,
    /// so a hostile value would size the resampler and the output.
    #[error(
        "the OpusHead input sample rate {rate} Hz is outside 8000 to 192000 Hz (or 0 for unknown)"
    )]
    InvalidInputRate {
        /// The declared input rate.
        rate: u32,
    },

    /// The OpusHead pre-skip is longer than the audio the stream holds (or
    /// than the end granule position allows): nothing would be left to play.
    #[error(
        "the pre-skip of {pre_skip} samples is longer than the {available} samples the stream holds"
    )]
    PreSkipBeyondEnd {
        /// The OpusHead pre-skip, in 48 kHz samples.
        pre_skip: u16,
        /// The samples the stream holds before trimming, at 48 kHz.
        available: u64,
    },

    /// An Ogg packet is larger than this crate reads for its kind (see
    /// [`MAX_HEADER_PACKET_BYTES`](crate::MAX_HEADER_PACKET_BYTES) and
    /// [`MAX_AUDIO_PACKET_BYTES`](crate::MAX_AUDIO_PACKET_BYTES)); refused
    /// before the packet is buffered.
    #[error("the {what} packet is larger than {max} bytes")]
    PacketTooLarge {
        /// Which packet: `"OpusHead"`, `"OpusTags"` or `"audio"`.
        what: &'static str,
        /// The bound in bytes.
        max: usize,
    },

    /// The OpusTags header is structurally broken: cut short, or a length in
    /// it runs past the end of the packet.
    #[error("malformed OpusTags header: {0}")]
    MalformedOpusTags(&'static str),

    /// The OpusTags header declares more comments than
    /// [`MAX_COMMENTS`](crate::MAX_COMMENTS).
    #[error("the OpusTags header declares {count} comments (at most {max} are read)")]
    TooManyComments {
        /// The declared comment count.
        count: u32,
        /// The bound.
        max: u32,
    },

    /// Reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl From<ogg::OggReadError> for CodecError {
    fn from(e: ogg::OggReadError) -> Self {
        match e {
            ogg::OggReadError::ReadError(io) => CodecError::Io(io),
            other => CodecError::Ogg(other.to_string()),
        }
    }
}

impl CodecError {
    /// Maps a hound header error to the variant that names the problem.
    pub(crate) fn from_hound(e: hound::Error) -> Self {
        match e {
            // hound reports a short read inside the header either as
            // UnexpectedEof or as its own "Failed to read enough bytes.".
            hound::Error::IoError(io)
                if io.kind() == io::ErrorKind::UnexpectedEof
                    || io.to_string().contains("Failed to read enough bytes") =>
            {
                CodecError::TruncatedHeader
            }
            hound::Error::IoError(io) => CodecError::Io(io),
            hound::Error::FormatError(msg) => match msg {
                "no RIFF tag found" | "no WAVE tag found" => CodecError::NotWav,
                "file contains zero channels" => CodecError::NoChannels,
                "bits per sample is not a multiple of 8" => CodecError::UnsupportedFormat(
                    "bit depth that is not a multiple of 8 (e.g. 12-bit)".into(),
                ),
                "bits per sample is not 32" => {
                    CodecError::UnsupportedFormat("floating point samples other than 32-bit".into())
                }
                other => CodecError::MalformedWav(other.to_string()),
            },
            hound::Error::Unsupported => CodecError::UnsupportedFormat(
                "compressed or unknown format tag (only PCM and IEEE float are read)".into(),
            ),
            hound::Error::TooWide => {
                CodecError::UnsupportedFormat("samples wider than 32 bits".into())
            }
            other => CodecError::MalformedWav(other.to_string()),
        }
    }
}
