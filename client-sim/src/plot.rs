//! An SVG of a run: frame latency over time (p50, p99, max per second)
//! above, the frame latency distribution below.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;
use crate::stats::Tick;

/// Draws `report` into the SVG file `path`.
pub fn plot(report: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (upper, lower) = root.split_vertically(400);

    let ticks = &report.timeline;
    let t_max = ticks.iter().map(|t| t.t).fold(1.0, f64::max);
    let y_max = ticks
        .iter()
        .map(|t| t.max)
        .fold(1.0f64, f64::max)
        .min(ticks.iter().map(|t| t.p99).fold(1.0f64, f64::max) * 4.0)
        * 1.1;
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            format!(
                "{}: frame latency over time ({} clients, {:.0} frames/s)",
                report.scenario, report.clients, report.frames_per_s
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since talking started")
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    let with_frames = || ticks.iter().filter(|t| t.frames > 0);
    type Pick = fn(&Tick) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("p50", BLUE, |t| t.p50),
        ("p99", RED, |t| t.p99),
        ("max", RGBColor(150, 150, 150), |t| t.max),
    ];
    for (name, color, pick) in series {
        chart
            .draw_series(LineSeries::new(
                with_frames().map(|t| (t.t, pick(t).min(y_max))),
                &color,
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    let buckets = &report.frame_histogram;
    let x_max = buckets.iter().map(|b| b.0).fold(1.0, f64::max);
    let c_max = buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64 * 1.1;
    let frame = report.latency_ms.get("frame").copied().unwrap_or_default();
    let mut chart = ChartBuilder::on(&lower)
        .caption(
            format!(
                "frame latency distribution: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} frames)",
                frame.p50, frame.p99, frame.max, frame.count
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..c_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (send to receive)")
        .y_desc("frames")
        .draw()
        .map_err(err)?;
    let mut lo = 0.0;
    let bars: Vec<_> = buckets
        .iter()
        .map(|&(hi, count)| {
            let bar = Rectangle::new([(lo, 0.0), (hi, count as f64)], BLUE.mix(0.6).filled());
            lo = hi;
            bar
        })
        .collect();
    chart.draw_series(bars).map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}
