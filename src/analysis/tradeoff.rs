//! The guidance/steps trade-off chart of `ditmoe eval --sweep`, as a PNG. Guidance trades
//! diversity for class fidelity: as the scale grows, samples are classified right more often
//! while the generated set covers less of the data. Two panels show it: the Fréchet ratio
//! (distance over the real-vs-real floor) against generated accuracy, and precision against
//! recall (Kynkäänniemi et al. 2019). One line per step count runs through the guidance
//! scales, each point labelled with its scale.
//!
//! Drawn on the shared chart frame ([`super::chart`]), as [`super::curves`].
use super::chart;
use super::text::{series_color, CHART_FONT};
use candle_core::{bail, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One sweep point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TradeoffPoint {
    pub cfg_scale: f64,
    /// Generated accuracy, in [0, 1].
    pub accuracy: f64,
    /// Fréchet distance over the real-vs-real distance at the same sample size.
    pub frechet_ratio: f64,
    pub precision: f64,
    pub recall: f64,
}

/// One line: the points of one step count, in guidance order.
#[derive(Debug, Clone, PartialEq)]
pub struct TradeoffSeries {
    pub label: String,
    pub points: Vec<TradeoffPoint>,
}

const WHAT: &str = "trade-off chart";

/// `lo..hi` padded by a tenth of its span (at least `min_pad`) on each side, room for the
/// point labels.
fn padded(values: impl Iterator<Item = f64>, min_pad: f64) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let pad = ((hi - lo) / 10.0).max(min_pad);
    (lo - pad)..(hi + pad)
}

/// One panel: `xy` maps a point to its coordinates.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    series: &[TradeoffSeries],
    descs: (&str, &str),
    ranges: (std::ops::Range<f64>, std::ops::Range<f64>),
    xy: fn(&TradeoffPoint) -> (f64, f64),
) -> Result<()> {
    let mut c = chart::axes(WHAT, area, None, ranges, descs)?;
    let label_style = (CHART_FONT, 12).into_font().color(&chart::INK_COLOR);
    for (i, s) in series.iter().enumerate() {
        let color = series_color(i);
        let points: Vec<(f64, f64)> = s.points.iter().map(xy).collect();
        chart::line(WHAT, &mut c, points.clone(), &s.label, color)?;
        c.draw_series(s.points.iter().zip(points).map(|(p, at)| {
            EmptyElement::at(at) + Circle::new((0, 0), 4, color.filled()) + Text::new(format!("cfg {}", p.cfg_scale), (6, -16), label_style.clone())
        }))
        .map_err(|e| chart::chart_err(WHAT, e))?;
    }
    // Lower left: low accuracy at a low ratio, low precision at low recall, where a sweep's
    // points rarely fall.
    chart::legend(WHAT, &mut c, SeriesLabelPosition::LowerLeft)
}

/// The two-panel chart: Fréchet ratio (y) against generated accuracy in % (x), and precision
/// (y) against recall (x), one line per series.
pub fn tradeoff_chart(title: &str, series: &[TradeoffSeries]) -> Result<RgbImage> {
    let all: Vec<&TradeoffPoint> = series.iter().flat_map(|s| &s.points).collect();
    if all.is_empty() || series.iter().any(|s| s.points.is_empty()) {
        bail!("trade-off chart: every series needs at least one point")
    }
    if all.iter().any(|p| ![p.cfg_scale, p.accuracy, p.frechet_ratio, p.precision, p.recall].iter().all(|v| v.is_finite())) {
        bail!("trade-off chart: a non-finite measure")
    }
    chart::render(WHAT, (1400, 600), |root| {
        let root = root.titled(title, (CHART_FONT, 20).into_font().color(&chart::INK_COLOR)).map_err(|e| chart::chart_err(WHAT, e))?;
        let panels = root.split_evenly((1, 2));
        let accuracy = padded(all.iter().map(|p| 100.0 * p.accuracy), 0.5);
        // From 0, so that the floor (a ratio of 1) is in view.
        let ratio = 0.0..1.15 * all.iter().map(|p| p.frechet_ratio).fold(1.0, f64::max);
        panel(
            &panels[0],
            series,
            ("generated accuracy (%)", "Fréchet distance / real-vs-real distance"),
            (accuracy, ratio),
            |p| (100.0 * p.accuracy, p.frechet_ratio),
        )?;
        panel(&panels[1], series, ("recall", "precision"), (0.0..1.1, 0.0..1.1), |p| (p.recall, p.precision))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_line_per_step_count() {
        let point = |cfg: f64| TradeoffPoint { cfg_scale: cfg, accuracy: 0.5 + 0.1 * cfg, frechet_ratio: 10.0 + cfg, precision: 0.5, recall: 0.9 - 0.1 * cfg };
        let series = |label: &str| TradeoffSeries { label: label.into(), points: [1.0, 2.0, 4.0].map(point).to_vec() };
        let img = tradeoff_chart("sweep", &[series("10 steps"), series("30 steps")]).unwrap();
        let has = |c: RGBColor| img.pixels().any(|p| p.0 == [c.0, c.1, c.2]);
        assert!(has(series_color(0)) && has(series_color(1)), "both lines drawn in their colours");
        assert!(tradeoff_chart("t", &[TradeoffSeries { label: "empty".into(), points: vec![] }]).is_err());
    }
}
