//! PCM sample conversion and channel mixing.
//!
//! The loops here run once per input block with the channel layout chosen
//! before the loop, so the per-sample work has no branches and vectorises.

/// A PCM sample type the encoder accepts: `i16` (full scale ±32768) or `f32`
/// (full scale ±1.0).
pub trait PcmSample: Copy + Send + Sync + 'static {
    /// The sample as `f32` with full scale ±1.0.
    fn to_f32(self) -> f32;
}

impl PcmSample for i16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from(self) * (1.0 / 32_768.0)
    }
}

/// Largest magnitude passed on from `f32` input (+12 dBFS): enough headroom
/// for float recordings that go over full scale, while infinities and absurd
/// values from a broken file cannot overflow the resampler's FFT.
pub const F32_LIMIT: f32 = 4.0;

impl PcmSample for f32 {
    /// NaN becomes silence and the value is clamped to ±[`F32_LIMIT`]
    /// (a select, not a branch, once vectorised).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        if self.is_nan() {
            0.0
        } else {
            self.clamp(-F32_LIMIT, F32_LIMIT)
        }
    }
}

/// Appends `input` (interleaved, `in_channels` per frame) to `out` as `f32`
/// with `out_channels` per frame.
///
/// One output channel averages every input channel. Two output channels take
/// the first two input channels (`in_channels` must then be at least 2).
/// `input.len()` must be a multiple of `in_channels`.
pub fn mix_into<S: PcmSample>(
    input: &[S],
    in_channels: usize,
    out_channels: usize,
    out: &mut Vec<f32>,
) {
    debug_assert!(input.len().is_multiple_of(in_channels));
    match (in_channels, out_channels) {
        (1, _) => out.extend(input.iter().map(|s| s.to_f32())),
        (2, 1) => out.extend(
            input
                .chunks_exact(2)
                .map(|f| (f[0].to_f32() + f[1].to_f32()) * 0.5),
        ),
        (2, 2) => out.extend(input.iter().map(|s| s.to_f32())),
        (n, 1) => {
            let scale = 1.0 / n as f32;
            out.extend(
                input
                    .chunks_exact(n)
                    .map(|f| f.iter().fold(0.0f32, |acc, s| acc + s.to_f32()) * scale),
            );
        }
        (n, _) => {
            let start = out.len();
            out.resize(start + input.len() / n * 2, 0.0);
            for (o, f) in out[start..].chunks_exact_mut(2).zip(input.chunks_exact(n)) {
                o[0] = f[0].to_f32();
                o[1] = f[1].to_f32();
            }
        }
    }
}

/// Converts `f32` samples to `i16` with rounding and saturation.
pub fn f32_to_i16(input: &[f32], out: &mut Vec<i16>) {
    out.extend(
        input
            .iter()
            .map(|&s| (s * 32_768.0).round().clamp(-32_768.0, 32_767.0) as i16),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_and_select() {
        let mut out = Vec::new();
        mix_into(&[16_384i16, -16_384, 32_767, 32_767], 2, 1, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[0].abs() < 1e-6);
        assert!((out[1] - 32_767.0 / 32_768.0).abs() < 1e-6);

        out.clear();
        mix_into(&[0.3f32, 0.6, 0.9], 3, 1, &mut out);
        assert!((out[0] - 0.6).abs() < 1e-6);

        out.clear();
        mix_into(&[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6], 3, 2, &mut out);
        assert_eq!(out, vec![0.1, 0.2, 0.4, 0.5]);
    }

    #[test]
    fn to_i16_saturates() {
        let mut out = Vec::new();
        f32_to_i16(&[2.0, -2.0, 0.5], &mut out);
        assert_eq!(out, vec![32_767, -32_768, 16_384]);
    }
}
