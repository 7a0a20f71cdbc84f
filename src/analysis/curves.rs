//! Training curves: each run's validation loss against the training tokens it had seen, one
//! line per run, as a PNG (`ditmoe lm curves`). Tokens, not steps, are the x axis, so runs of
//! different batch shapes compare at equal data; every run's `eval.jsonl` carries them
//! ([`crate::lm::trainer::EvalLine::train_tokens`]).
//!
//! Drawn with plotters' `ChartBuilder` (axes, ticks, legend) and the bundled font
//! ([`super::text::register_bundled_font`]), so the chart needs no system fonts.
use super::chart;
use super::text::series_color;
use crate::lm::trainer::{EvalLine, EVAL_FILE};
use candle_core::{bail, Result};
use image::RgbImage;
use plotters::prelude::*;
use std::path::Path;

/// One line of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub label: String,
    /// (training tokens, validation loss), by tokens.
    pub points: Vec<(f64, f64)>,
}

impl Curve {
    /// The validation curve of the run folder `run` (its `eval.jsonl`). A step evaluated twice
    /// keeps its last line. Errors name the file and line.
    pub fn from_run(run: &Path, label: &str) -> Result<Self> {
        let path = run.join(EVAL_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let mut by_step = std::collections::BTreeMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let e: EvalLine = serde_json::from_str(line).map_err(|e| candle_core::Error::Msg(format!("{}: line {}: {e}", path.display(), i + 1)))?;
            by_step.insert(e.step, (e.train_tokens as f64, e.loss));
        }
        if by_step.is_empty() {
            bail!("{}: no evaluations", path.display())
        }
        Ok(Self { label: label.into(), points: by_step.into_values().collect() })
    }
}

const WHAT: &str = "curves chart";

/// The chart: validation loss (y) against training tokens in millions (x), a line with a
/// marker at each evaluation per curve, and a legend of the labels. The y axis spans the
/// losses with a twentieth of their range to spare on each side.
pub fn loss_chart(title: &str, curves: &[Curve]) -> Result<RgbImage> {
    let all: Vec<(f64, f64)> = curves.iter().flat_map(|c| c.points.iter().copied()).collect();
    if all.is_empty() || curves.iter().any(|c| c.points.is_empty()) {
        bail!("curves chart: every curve needs at least one point")
    }
    if all.iter().any(|(x, y)| !(x.is_finite() && y.is_finite())) {
        bail!("curves chart: a non-finite loss or token count")
    }
    let millions = |x: f64| x / 1e6;
    let x_max = all.iter().map(|p| millions(p.0)).fold(0.0, f64::max).max(1e-6);
    let (y_lo, y_hi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y_hi - y_lo) / 20.0).max(1e-3);
    chart::render(WHAT, (900, 560), |root| {
        let ranges = (0.0..x_max * 1.02, (y_lo - pad)..(y_hi + pad));
        let mut c = chart::axes(WHAT, root, Some(title), ranges, ("training tokens (millions)", "validation loss (nats per token)"))?;
        for (i, curve) in curves.iter().enumerate() {
            let color = series_color(i);
            let points: Vec<(f64, f64)> = curve.points.iter().map(|&(x, y)| (millions(x), y)).collect();
            chart::line(WHAT, &mut c, points.clone(), &curve.label, color)?;
            c.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| chart::chart_err(WHAT, e))?;
        }
        chart::legend(WHAT, &mut c, SeriesLabelPosition::UpperRight)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_line_per_curve() {
        let curve = |label: &str, base: f64| Curve { label: label.into(), points: (1..=5).map(|i| (i as f64 * 2e6, base - 0.3 * i as f64)).collect() };
        let img = loss_chart("validation loss", &[curve("dense", 6.0), curve("moe", 5.5)]).unwrap();
        let has = |c: RGBColor| img.pixels().any(|p| p.0 == [c.0, c.1, c.2]);
        assert!(has(series_color(0)) && has(series_color(1)), "both lines drawn in their colours");
        assert!(loss_chart("t", &[Curve { label: "empty".into(), points: vec![] }]).is_err());
    }

    #[test]
    fn a_run_keeps_the_last_line_of_each_step() {
        let dir = std::env::temp_dir().join(format!("ditmoe-curves-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = |step: u64, loss: f64| format!("{{\"step\":{step},\"loss\":{loss},\"perplexity\":1.0,\"tokens\":10,\"train_tokens\":{}}}\n", step * 100);
        std::fs::write(dir.join(EVAL_FILE), [line(2, 5.0), line(4, 4.0), line(4, 3.5)].concat()).unwrap();
        let c = Curve::from_run(&dir, "run").unwrap();
        assert_eq!(c.points, vec![(200.0, 5.0), (400.0, 3.5)]);
        std::fs::write(dir.join(EVAL_FILE), "{\"step\":2,\"loss\":5.0,\"perplexity\":1.0,\"tokens\":10}\n").unwrap();
        let err = Curve::from_run(&dir, "run").unwrap_err().to_string();
        assert!(err.contains("eval.jsonl: line 1") && err.contains("train_tokens"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
