//! Waveform previews: the bars a messaging app draws under a voice note.
//!
//! [`WaveformAccumulator`] is fed the audio as it is encoded. The clip's
//! length is not known in advance, so it keeps the peak of every 10 ms block
//! (halving its resolution whenever the list grows past a bound, so memory
//! stays small for any length) and reduces those peaks to the requested
//! number of bars at [`finish`](WaveformAccumulator::finish).

/// Highest bar value: bars are 5-bit, 0 to 31.
pub const WAVEFORM_MAX: u8 = 31;

/// Fine-grained peaks kept before the resolution is halved.
const MAX_PEAKS: usize = 1 << 15;

/// Peaks at or below this amplitude (-40 dBFS) never fill a bar, so a silent
/// or noise-only clip draws as low bars instead of being blown up to full height.
const NORMALISATION_FLOOR: f32 = 0.01;

/// Collects block peaks while audio streams through.
#[derive(Debug, Clone)]
pub struct WaveformAccumulator {
    /// Samples (interleaved values) per block.
    block_len: usize,
    cur_peak: f32,
    cur_count: usize,
    peaks: Vec<f32>,
}

impl WaveformAccumulator {
    /// An accumulator for audio at `sample_rate` Hz with `channels` interleaved channels.
    pub fn new(sample_rate: u32, channels: usize) -> Self {
        WaveformAccumulator {
            block_len: (sample_rate as usize / 100).max(1) * channels.max(1),
            cur_peak: 0.0,
            cur_count: 0,
            peaks: Vec::new(),
        }
    }

    /// Takes the next interleaved samples.
    pub fn update(&mut self, mut samples: &[f32]) {
        while !samples.is_empty() {
            let take = (self.block_len - self.cur_count).min(samples.len());
            let (block, rest) = samples.split_at(take);
            let peak = block.iter().fold(0.0f32, |m, s| m.max(s.abs()));
            self.cur_peak = self.cur_peak.max(peak);
            self.cur_count += take;
            samples = rest;
            if self.cur_count == self.block_len {
                self.push_peak();
            }
        }
    }

    fn push_peak(&mut self) {
        self.peaks.push(self.cur_peak);
        self.cur_peak = 0.0;
        self.cur_count = 0;
        if self.peaks.len() >= MAX_PEAKS {
            let merged: Vec<f32> = self
                .peaks
                .chunks(2)
                .map(|p| p.iter().fold(0.0, |a: f32, b| a.max(*b)))
                .collect();
            self.peaks = merged;
            self.block_len *= 2;
        }
    }

    /// Reduces everything seen to `bars` values from 0 to [`WAVEFORM_MAX`],
    /// each the peak of its share of the clip relative to the clip's peak.
    pub fn finish(mut self, bars: usize) -> Vec<u8> {
        if self.cur_count > 0 {
            self.peaks.push(self.cur_peak);
        }
        reduce_peaks(&self.peaks, bars)
    }
}

/// Reduces block peaks to `bars` bars of 0 to [`WAVEFORM_MAX`].
pub fn reduce_peaks(peaks: &[f32], bars: usize) -> Vec<u8> {
    if peaks.is_empty() {
        return vec![0; bars];
    }
    let max = peaks.iter().fold(NORMALISATION_FLOOR, |a, b| a.max(*b));
    let n = peaks.len();
    (0..bars)
        .map(|i| {
            let start = i * n / bars;
            let end = ((i + 1) * n / bars).max(start + 1).min(n);
            let peak = peaks[start.min(n - 1)..end]
                .iter()
                .fold(0.0f32, |a, b| a.max(*b));
            (peak / max * f32::from(WAVEFORM_MAX))
                .round()
                .min(f32::from(WAVEFORM_MAX)) as u8
        })
        .collect()
}

/// Draws a waveform as one line of block characters (for `codec info`).
pub fn render_text(waveform: &[u8]) -> String {
    const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    waveform
        .iter()
        .map(|&v| LEVELS[(usize::from(v) * (LEVELS.len() - 1) + 15) / usize::from(WAVEFORM_MAX)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_follow_loudness() {
        // 1 s quiet, 1 s loud, at 8 kHz, fed in odd chunks.
        let mut signal = vec![0.1f32; 8_000];
        signal.extend(std::iter::repeat_n(-0.8f32, 8_000));
        let mut acc = WaveformAccumulator::new(8_000, 1);
        for c in signal.chunks(77) {
            acc.update(c);
        }
        let bars = acc.finish(10);
        assert_eq!(bars.len(), 10);
        assert!(bars[..5].iter().all(|&b| b == 4), "{bars:?}");
        assert!(bars[5..].iter().all(|&b| b == 31), "{bars:?}");
    }

    #[test]
    fn short_and_silent_clips() {
        let mut acc = WaveformAccumulator::new(48_000, 2);
        acc.update(&[0.5, -0.5]);
        assert_eq!(acc.finish(100), vec![31; 100]);
        let acc = WaveformAccumulator::new(48_000, 1);
        assert_eq!(acc.finish(5), vec![0; 5]);
        let mut acc = WaveformAccumulator::new(8_000, 1);
        acc.update(&vec![0.0; 80_000]);
        assert_eq!(acc.finish(3), vec![0; 3]);
    }

    #[test]
    fn long_clips_stay_bounded() {
        let mut acc = WaveformAccumulator::new(8_000, 1);
        let block = vec![0.25f32; 8_000];
        for _ in 0..(3 * 3600 / 4) {
            acc.update(&block);
        }
        assert!(acc.peaks.len() < MAX_PEAKS);
        assert_eq!(acc.finish(100), vec![31; 100]);
    }

    #[test]
    fn text_rendering() {
        assert_eq!(render_text(&[0, 31]), "▁█");
    }
}
