//! Just enough of the WAV format to label an upload.

/// The sample rate and channel count from a RIFF/WAVE file's `fmt ` chunk.
pub fn wav_format(wav: &[u8]) -> Option<(u32, u16)> {
    if wav.len() < 12 || &wav[0..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
        return None;
    }
    let mut at = 12;
    while at + 8 <= wav.len() {
        let id = &wav[at..at + 4];
        let len = u32::from_le_bytes(wav[at + 4..at + 8].try_into().ok()?) as usize;
        let body = at + 8;
        if id == b"fmt " {
            let fmt = wav.get(body..body + 16)?;
            let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
            let rate = u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]);
            return Some((rate, channels));
        }
        // Chunks are padded to an even length.
        at = body.checked_add(len)?.checked_add(len & 1)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 16-bit PCM WAV header with an extra chunk before `fmt `.
    fn wav(rate: u32, channels: u16) -> Vec<u8> {
        let mut v = b"RIFF\0\0\0\0WAVE".to_vec();
        v.extend_from_slice(b"LIST\x03\0\0\0abc\0");
        v.extend_from_slice(b"fmt \x10\0\0\0");
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        v.extend_from_slice(&(rate * 2 * u32::from(channels)).to_le_bytes());
        v.extend_from_slice(&(2 * channels).to_le_bytes());
        v.extend_from_slice(&16u16.to_le_bytes());
        v.extend_from_slice(b"data\0\0\0\0");
        v
    }

    #[test]
    fn the_fmt_chunk_is_found_after_other_chunks() {
        assert_eq!(wav_format(&wav(16_000, 1)), Some((16_000, 1)));
        assert_eq!(wav_format(&wav(44_100, 2)), Some((44_100, 2)));
        assert_eq!(wav_format(b"RIFF\0\0\0\0AVI "), None);
        assert_eq!(wav_format(&wav(8_000, 1)[..30]), None);
    }
}
