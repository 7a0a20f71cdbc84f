//! The guidance/steps trade-off chart of `ditmoe eval --sweep`, as a PNG. Guidance trades
//! diversity for class fidelity: as the scale grows, samples are classified right more often
//! while the generated set covers less of the data. Two panels show it: the Fréchet ratio
//! (distance over the real-vs-real floor) against generated accuracy, and precision against
//! recall (Kynkäänniemi et al. 2019). One line per step count runs through the guidance
//! scales, each point labelled with its scale.
//!
//! Drawn with plotters' `ChartBuilder` and the bundled font, as [`super::curves`].
use super::heatmap::{BACKGROUND, INK};
use super::text::{register_bundled_font, series_color, CHART_FONT as FONT, CHART_GRID as GRID};
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

fn plot_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("trade-off chart: {e}"))
}

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
    (x_desc, y_desc): (&str, &str),
    (x_range, y_range): (std::ops::Range<f64>, std::ops::Range<f64>),
    xy: fn(&TradeoffPoint) -> (f64, f64),
) -> Result<()> {
    let (paper, ink) = (RGBColor(BACKGROUND[0], BACKGROUND[1], BACKGROUND[2]), RGBColor(INK[0], INK[1], INK[2]));
    let mut chart = ChartBuilder::on(area)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(paper)
        .axis_style(ink)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 13).into_font().color(&ink))
        .axis_desc_style((FONT, 14).into_font().color(&ink))
        .draw()
        .map_err(plot_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = series_color(i);
        let points: Vec<(f64, f64)> = s.points.iter().map(xy).collect();
        chart
            .draw_series(std::iter::once(PathElement::new(points.clone(), color.stroke_width(2))))
            .map_err(plot_err)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        let label_style = (FONT, 12).into_font().color(&ink);
        chart
            .draw_series(s.points.iter().zip(points).map(|(p, at)| {
                EmptyElement::at(at) + Circle::new((0, 0), 4, color.filled()) + Text::new(format!("cfg {}", p.cfg_scale), (6, -16), label_style.clone())
            }))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        // Lower left: low accuracy at a low ratio, low precision at low recall, where a
        // sweep's points rarely fall.
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(paper.mix(0.9))
        .border_style(ink)
        .label_font((FONT, 14).into_font().color(&ink))
        .draw()
        .map_err(plot_err)
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
    register_bundled_font();
    let (w, h) = (1400u32, 600u32);
    let (paper, ink) = (RGBColor(BACKGROUND[0], BACKGROUND[1], BACKGROUND[2]), RGBColor(INK[0], INK[1], INK[2]));
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&paper).map_err(plot_err)?;
        let root = root.titled(title, (FONT, 20).into_font().color(&ink)).map_err(plot_err)?;
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
        panel(&panels[1], series, ("recall", "precision"), (0.0..1.1, 0.0..1.1), |p| (p.recall, p.precision))?;
        root.present().map_err(plot_err)?;
    }
    RgbImage::from_raw(w, h, buf).ok_or_else(|| plot_err(format!("a {w}x{h} RGB buffer of the wrong size")))
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
