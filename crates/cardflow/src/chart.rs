//! The chart of `cardflow bench --sweep`: latency percentiles against offered load,
//! one PNG a person can open. The DejaVu font is embedded (crate `dejavu`) so the
//! chart draws the same on a machine without system fonts.

use anyhow::anyhow;
use std::path::Path;

/// One step of a sweep: what was offered, what the ledger decided, the latencies of
/// those answers (`None` when there were none) and the requests that failed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepPoint {
    pub offered_tps: f64,
    pub achieved_tps: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub failures: u64,
}

/// Reads one percentile of a sweep step.
type Percentile = fn(&SweepPoint) -> Option<f64>;

fn register_font() -> anyhow::Result<()> {
    use plotters::style::{register_font, FontStyle};
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded DejaVu font did not load"))
}

/// Draws `points` to `path` (PNG).
pub fn draw(path: &Path, title: &str, points: &[SweepPoint]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    register_font()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let max_x = points.iter().map(|p| p.offered_tps).fold(1.0, f64::max) * 1.05;
    let max_y = points.iter().filter_map(|p| p.p999_ms).fold(1.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("offered load (transfers/s)")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let series: [(&str, RGBColor, Percentile); 4] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p90", GREEN, |p| p.p90_ms),
        ("p99", RED, |p| p.p99_ms),
        ("p99.9", MAGENTA, |p| p.p999_ms),
    ];
    for (label, color, value) in series {
        // A step where no request was answered has no latency to draw.
        let measured: Vec<(f64, f64)> = points.iter().filter_map(|p| Some((p.offered_tps, value(p)?))).collect();
        chart
            .draw_series(LineSeries::new(measured.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(measured.iter().map(|&xy| Circle::new(xy, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_draws_a_png() {
        let path = std::env::temp_dir().join(format!("cardflow-chart-{}.png", std::process::id()));
        let points: Vec<SweepPoint> = (1..=5)
            .map(|i| {
                let x = i as f64 * 100.0;
                SweepPoint {
                    offered_tps: x,
                    achieved_tps: x,
                    p50_ms: Some(2.0),
                    p90_ms: Some(4.0),
                    p99_ms: Some(8.0),
                    p999_ms: Some(16.0),
                    failures: 0,
                }
            })
            .collect();
        draw(&path, "test", &points).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_sweep_with_a_step_where_every_request_failed_still_draws() {
        let path = std::env::temp_dir().join(format!("cardflow-chart-failed-{}.png", std::process::id()));
        let answered = SweepPoint {
            offered_tps: 100.0,
            achieved_tps: 100.0,
            p50_ms: Some(2.0),
            p90_ms: Some(4.0),
            p99_ms: Some(8.0),
            p999_ms: Some(16.0),
            failures: 0,
        };
        let failed = SweepPoint {
            offered_tps: 200.0,
            achieved_tps: 0.0,
            p50_ms: None,
            p90_ms: None,
            p99_ms: None,
            p999_ms: None,
            failures: 400,
        };
        draw(&path, "test", &[answered, failed]).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        let _ = std::fs::remove_file(path);
    }
}
