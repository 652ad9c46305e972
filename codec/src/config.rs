//! Encoder settings: what libopus is asked to do and how the Ogg stream is cut.

use std::time::Duration;

use crate::CodecError;

/// The libopus application mode.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Application {
    /// Speech: favours intelligibility (the default for voice notes).
    #[default]
    Voip,
    /// Music or mixed content: favours fidelity to the input.
    Audio,
    /// Lowest algorithmic delay (CELT only, 2.5 ms lookahead).
    LowDelay,
}

impl Application {
    pub(crate) fn to_opus(self) -> opus::Application {
        match self {
            Application::Voip => opus::Application::Voip,
            Application::Audio => opus::Application::Audio,
            Application::LowDelay => opus::Application::LowDelay,
        }
    }
}

/// How the bitrate may vary from frame to frame.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BitrateMode {
    /// Unconstrained variable bitrate (the default, best quality per byte).
    #[default]
    Vbr,
    /// Variable bitrate that stays within a one-frame buffer of the target.
    ConstrainedVbr,
    /// Constant bitrate: every frame of the same duration has the same size.
    Cbr,
}

/// Channels of the encoded stream.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// Average all input channels into one (the default: voice).
    #[default]
    Mono,
    /// Keep left and right. A mono input stays mono; an input with more than
    /// two channels keeps its first two (front left and right in WAV order).
    Stereo,
}

/// The Opus frame duration.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum FrameDuration {
    /// 10 ms.
    Ms10,
    /// 20 ms (the default).
    #[default]
    Ms20,
    /// 40 ms.
    Ms40,
    /// 60 ms.
    Ms60,
}

impl FrameDuration {
    /// All supported durations, shortest first.
    pub const ALL: [FrameDuration; 4] = [
        FrameDuration::Ms10,
        FrameDuration::Ms20,
        FrameDuration::Ms40,
        FrameDuration::Ms60,
    ];

    /// The duration in milliseconds.
    pub fn millis(self) -> u32 {
        match self {
            FrameDuration::Ms10 => 10,
            FrameDuration::Ms20 => 20,
            FrameDuration::Ms40 => 40,
            FrameDuration::Ms60 => 60,
        }
    }

    /// The duration for a number of milliseconds, if Opus supports it here.
    pub fn from_millis(ms: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.millis() == ms)
    }

    /// Samples per channel in one frame at `rate` Hz.
    pub fn samples_at(self, rate: u32) -> usize {
        (rate / 1000 * self.millis()) as usize
    }
}

/// What to do with a WAV file whose data chunk claims more bytes than the
/// file holds (typically a recorder that crashed before fixing the header).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TruncatedPolicy {
    /// Encode what is there and report [`Warning::TruncatedData`](crate::Warning::TruncatedData)
    /// (the default).
    #[default]
    EncodeAvailable,
    /// Refuse the file with [`CodecError::TruncatedData`].
    Refuse,
}

/// Every encoding setting.
///
/// `Default` is the voice-note profile: VoIP application, 24 kbit/s VBR,
/// complexity 10, 20 ms frames, mono, no FEC, no DTX, a page at least every
/// second, clips up to one hour.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderConfig {
    /// libopus application mode.
    pub application: Application,
    /// Target bitrate in bit/s, 6 000 to 256 000.
    pub bitrate: u32,
    /// VBR, constrained VBR or CBR.
    pub bitrate_mode: BitrateMode,
    /// Encoder complexity, 0 (fastest) to 10 (best).
    pub complexity: u8,
    /// Frame duration.
    pub frame: FrameDuration,
    /// Mono (downmix) or stereo.
    pub channels: ChannelMode,
    /// In-band forward error correction, with the expected packet loss in
    /// percent (0 to 100). `None` disables FEC.
    pub fec_expected_loss: Option<u8>,
    /// Discontinuous transmission: near-empty packets during silence.
    pub dtx: bool,
    /// Longest clip accepted; longer inputs fail with [`CodecError::TooLong`].
    /// `None` accepts any length.
    pub max_duration: Option<Duration>,
    /// What to do with a WAV whose data chunk is cut short.
    pub truncated: TruncatedPolicy,
    /// Live mode: end an Ogg page after every packet so a listener receives
    /// each frame at once. Otherwise pages are ended at least once a second.
    pub live: bool,
    /// Ogg stream serial number; `None` picks a random one (RFC 7845 asks
    /// for a random serial so that chained streams can be told apart).
    pub serial: Option<u32>,
    /// Extra `KEY=value` comments for the OpusTags header.
    pub comments: Vec<(String, String)>,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            application: Application::Voip,
            bitrate: 24_000,
            bitrate_mode: BitrateMode::Vbr,
            complexity: 10,
            frame: FrameDuration::Ms20,
            channels: ChannelMode::Mono,
            fec_expected_loss: None,
            dtx: false,
            max_duration: Some(Duration::from_secs(3600)),
            truncated: TruncatedPolicy::EncodeAvailable,
            live: false,
            serial: None,
            comments: Vec::new(),
        }
    }
}

/// Lowest accepted bitrate in bit/s.
pub const MIN_BITRATE: u32 = 6_000;
/// Highest accepted bitrate in bit/s.
pub const MAX_BITRATE: u32 = 256_000;
/// Lowest accepted input sample rate in Hz.
pub const MIN_SAMPLE_RATE: u32 = 8_000;
/// Highest accepted input sample rate in Hz.
pub const MAX_SAMPLE_RATE: u32 = 192_000;

impl EncoderConfig {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), CodecError> {
        if !(MIN_BITRATE..=MAX_BITRATE).contains(&self.bitrate) {
            return Err(CodecError::InvalidConfig(format!(
                "bitrate {} bit/s is outside {MIN_BITRATE} to {MAX_BITRATE}",
                self.bitrate
            )));
        }
        if self.complexity > 10 {
            return Err(CodecError::InvalidConfig(format!(
                "complexity {} is outside 0 to 10",
                self.complexity
            )));
        }
        if let Some(loss) = self.fec_expected_loss
            && loss > 100
        {
            return Err(CodecError::InvalidConfig(format!(
                "expected loss {loss}% is outside 0 to 100"
            )));
        }
        for (key, _) in &self.comments {
            if key.is_empty() || key.contains('=') || !key.is_ascii() {
                return Err(CodecError::InvalidConfig(format!(
                    "comment key {key:?} must be non-empty ASCII without '='"
                )));
            }
        }
        Ok(())
    }
}

/// The rate libopus is fed for an input at `input_rate` Hz.
///
/// Opus accepts 8, 12, 16, 24 and 48 kHz directly, so those are used as they
/// are (no resampling, and a lower rate is less work for libopus). Any other
/// rate is resampled to the smallest Opus rate at or above it (11.025 kHz to
/// 12 kHz, 22.05 kHz to 24 kHz, 32 and 44.1 kHz to 48 kHz), capped at 48 kHz:
/// that keeps the whole band the input has, since Opus codes at most 20 kHz,
/// while giving libopus the fewest samples to analyse.
pub fn opus_rate_for(input_rate: u32) -> u32 {
    const RATES: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];
    RATES
        .into_iter()
        .find(|&r| r >= input_rate)
        .unwrap_or(48_000)
}

/// Checks that an input sample rate is one this crate accepts.
pub fn check_sample_rate(rate: u32) -> Result<(), CodecError> {
    if (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(CodecError::UnsupportedSampleRate { rate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_rates() {
        assert_eq!(opus_rate_for(8_000), 8_000);
        assert_eq!(opus_rate_for(11_025), 12_000);
        assert_eq!(opus_rate_for(16_000), 16_000);
        assert_eq!(opus_rate_for(22_050), 24_000);
        assert_eq!(opus_rate_for(32_000), 48_000);
        assert_eq!(opus_rate_for(44_100), 48_000);
        assert_eq!(opus_rate_for(96_000), 48_000);
    }

    #[test]
    fn validate_ranges() {
        assert!(EncoderConfig::default().validate().is_ok());
        let bad = EncoderConfig {
            bitrate: 5_000,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(CodecError::InvalidConfig(_))));
        let bad = EncoderConfig {
            complexity: 11,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(CodecError::InvalidConfig(_))));
    }
}
