//! Streaming sample-rate conversion with rubato.
//!
//! [`StreamResampler`] wraps rubato's synchronous FFT resampler (fixed input
//! chunk) so that it takes blocks of any size, trims the resampler's own delay
//! at the start and, at [`finish`](StreamResampler::finish), flushes exactly
//! [`expected_output_len`] frames: the output is aligned with the input and
//! as long as the input at the new rate, rounded to the nearest frame.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};

use crate::CodecError;

/// Input frames per resampler call. A few hundred frames per FFT sub-chunk
/// keeps the delay low while the anti-aliasing filter stays sharp.
const CHUNK_FRAMES: usize = 1024;

/// The number of frames a clip of `input_frames` at `from` Hz has at `to` Hz,
/// rounded to the nearest frame.
pub fn expected_output_len(input_frames: u64, from: u32, to: u32) -> u64 {
    let from = u128::from(from);
    ((u128::from(input_frames) * u128::from(to) + from / 2) / from) as u64
}

/// A resampler for interleaved `f32` audio fed in blocks of any size.
pub struct StreamResampler {
    inner: Fft<f32>,
    channels: usize,
    from: u32,
    to: u32,
    in_buf: Vec<f32>,
    in_fill: usize,
    out_buf: Vec<f32>,
    to_trim: usize,
    frames_in: u64,
    frames_out: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz for `channels` interleaved channels.
    pub fn new(from: u32, to: u32, channels: usize) -> Result<Self, CodecError> {
        let inner = Fft::<f32>::new(
            from as usize,
            to as usize,
            CHUNK_FRAMES,
            channels,
            FixedSync::Input,
        )
        .map_err(|e| CodecError::Resample(e.to_string()))?;
        let in_frames = inner.input_frames_max();
        let out_frames = inner.output_frames_max();
        let to_trim = inner.output_delay();
        Ok(StreamResampler {
            inner,
            channels,
            from,
            to,
            in_buf: vec![0.0; in_frames * channels],
            in_fill: 0,
            out_buf: vec![0.0; out_frames * channels],
            to_trim,
            frames_in: 0,
            frames_out: 0,
        })
    }

    /// Input frames taken so far.
    pub fn frames_in(&self) -> u64 {
        self.frames_in
    }

    /// Output frames handed to the sink so far.
    pub fn frames_out(&self) -> u64 {
        self.frames_out
    }

    /// Resamples `input` (interleaved, a whole number of frames) and hands
    /// every finished output block to `sink`.
    pub fn process(
        &mut self,
        mut input: &[f32],
        sink: &mut dyn FnMut(&[f32]) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let ch = self.channels;
        self.frames_in += (input.len() / ch) as u64;
        while !input.is_empty() {
            let need = self.inner.input_frames_next();
            if self.in_fill == 0 && input.len() >= need * ch {
                let (chunk, rest) = input.split_at(need * ch);
                self.run(Some(chunk), None, u64::MAX, sink)?;
                input = rest;
                continue;
            }
            let take = ((need - self.in_fill) * ch).min(input.len());
            let start = self.in_fill * ch;
            self.in_buf[start..start + take].copy_from_slice(&input[..take]);
            self.in_fill += take / ch;
            input = &input[take..];
            if self.in_fill == need {
                self.run(None, None, u64::MAX, sink)?;
                self.in_fill = 0;
            }
        }
        Ok(())
    }

    /// Flushes the buffered input and the resampler's delay line so that the
    /// sink has received exactly [`expected_output_len`] frames in total.
    pub fn finish(
        &mut self,
        sink: &mut dyn FnMut(&[f32]) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let target = expected_output_len(self.frames_in, self.from, self.to);
        if self.in_fill > 0 {
            let partial = self.in_fill;
            self.run(None, Some(partial), target, sink)?;
            self.in_fill = 0;
        }
        while self.frames_out < target {
            self.run(None, Some(0), target, sink)?;
        }
        Ok(())
    }

    /// Resamples one chunk: `chunk` if given, else the internal buffer.
    fn run(
        &mut self,
        chunk: Option<&[f32]>,
        partial: Option<usize>,
        limit: u64,
        sink: &mut dyn FnMut(&[f32]) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let ch = self.channels;
        let input = chunk.unwrap_or(&self.in_buf);
        let frames = input.len() / ch;
        let adapter_in = InterleavedSlice::new(input, ch, frames)
            .map_err(|e| CodecError::Resample(e.to_string()))?;
        let out_frames = self.out_buf.len() / ch;
        let mut adapter_out = InterleavedSlice::new_mut(&mut self.out_buf, ch, out_frames)
            .map_err(|e| CodecError::Resample(e.to_string()))?;
        let indexing = partial.map(|p| Indexing::new().partial_len(p));
        let (_, produced) = self
            .inner
            .process_into_buffer(&adapter_in, &mut adapter_out, indexing.as_ref())
            .map_err(|e| CodecError::Resample(e.to_string()))?;
        let skip = self.to_trim.min(produced);
        self.to_trim -= skip;
        let room = limit.saturating_sub(self.frames_out);
        let emit = ((produced - skip) as u64).min(room) as usize;
        if emit > 0 {
            self.frames_out += emit as u64;
            sink(&self.out_buf[skip * ch..(skip + emit) * ch])?;
        }
        Ok(())
    }
}

/// Resamples a whole interleaved clip in one call (used by the decoder to
/// return to the original rate).
pub fn resample_all(
    input: &[f32],
    channels: usize,
    from: u32,
    to: u32,
) -> Result<Vec<f32>, CodecError> {
    if from == to {
        return Ok(input.to_vec());
    }
    let mut r = StreamResampler::new(from, to, channels)?;
    let mut out = Vec::with_capacity(
        expected_output_len((input.len() / channels) as u64, from, to) as usize * channels,
    );
    let mut sink = |s: &[f32]| {
        out.extend_from_slice(s);
        Ok(())
    };
    r.process(input, &mut sink)?;
    r.finish(&mut sink)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f32, frames: usize) -> Vec<f32> {
        (0..frames)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    #[test]
    fn exact_length_and_alignment() {
        for (from, to) in [
            (44_100, 48_000),
            (22_050, 24_000),
            (96_000, 48_000),
            (11_025, 12_000),
        ] {
            for frames in [1usize, 100, 1023, 1024, 5000, 44_101] {
                let input = sine(from, 440.0, frames);
                // Feed in odd-sized blocks to exercise the buffering.
                let mut r = StreamResampler::new(from, to, 1).unwrap();
                let mut out = Vec::new();
                let mut sink = |s: &[f32]| {
                    out.extend_from_slice(s);
                    Ok(())
                };
                for block in input.chunks(333) {
                    r.process(block, &mut sink).unwrap();
                }
                r.finish(&mut sink).unwrap();
                assert_eq!(
                    out.len() as u64,
                    expected_output_len(frames as u64, from, to),
                    "{from}->{to} {frames}"
                );
            }
        }
        // Alignment: a resampled sine matches the sine generated at the new rate.
        let out = resample_all(&sine(44_100, 440.0, 44_100), 1, 44_100, 48_000).unwrap();
        let reference = sine(48_000, 440.0, 48_000);
        let err: f32 = out[1000..47_000]
            .iter()
            .zip(&reference[1000..47_000])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.01, "max error {err}");
    }
}
