//! A clip's waveform preview (one byte 0 to 31 per bucket, from ClipEnd)
//! drawn as one line of Unicode block characters.

/// The blocks from quiet to loud.
const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Draws `preview` in `width` characters (fewer if it has fewer buckets);
/// each character shows the loudest bucket it covers. Values above 31 are
/// drawn as 31. An empty preview is `-`.
pub fn render(preview: &[u8], width: usize) -> String {
    if preview.is_empty() || width == 0 {
        return "-".to_owned();
    }
    let columns = width.min(preview.len());
    (0..columns)
        .map(|c| {
            let start = c * preview.len() / columns;
            let end = ((c + 1) * preview.len() / columns).max(start + 1);
            let peak = preview[start..end]
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .min(31);
            BLOCKS[usize::from(peak) * BLOCKS.len() / 32]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_blocks_and_buckets_fold_into_columns() {
        assert_eq!(render(&[0, 4, 8, 12, 16, 20, 24, 28, 31], 9), "▁▂▃▄▅▆▇██");
        // Two buckets per column: the louder one is shown.
        assert_eq!(render(&[0, 31, 0, 0, 8, 0], 3), "█▁▃");
        // Fewer buckets than columns: one character each.
        assert_eq!(render(&[31, 0], 40), "█▁");
        assert_eq!(render(&[200], 1), "█");
        assert_eq!(render(&[], 40), "-");
        assert_eq!(render(&[5; 100], 40).chars().count(), 40);
    }
}
