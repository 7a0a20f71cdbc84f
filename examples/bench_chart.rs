//! Draws one benchmark run as a PNG: milliseconds per forward of the
//! official PyTorch code (grey, with its min–max over the timed forwards) and of ditmoe (blue,
//! the faster of eager and CUDA graph) for each model and batch, one log-scale panel per
//! precision, with the speed-up over each pair. `docs/benchmarks.md`'s tables as a picture.
//!
//! cargo run --example bench_chart -- RUN_DIR docs/benchmarks-forward.png ["NVIDIA H100 80GB HBM3"]
//!
//! The run folder holds `official.json` (`bench_official_ditmoe.py --out`) and `ditmoe.txt`
//! (`bench_model`'s output), as the device command of `docs/benchmarks.md` writes them; the
//! third argument names the GPU in the title.
//!
//! Drawn with plotters' `ChartBuilder` (axes, log scale, ticks, labels) and the bundled font
//! that [`register_bundled_font`] gives it, so the chart needs no system fonts.
use anyhow::{anyhow, bail, Context, Result};
use ditmoe::analysis::heatmap::{save_png, BACKGROUND, INK};
use ditmoe::analysis::text::register_bundled_font;
use image::RgbImage;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;
use std::path::Path;

const OFFICIAL: RGBColor = RGBColor(160, 160, 160);
const OURS: RGBColor = RGBColor(31, 119, 180);
const GRID: RGBColor = RGBColor(225, 225, 225);
const PAPER: RGBColor = RGBColor(BACKGROUND[0], BACKGROUND[1], BACKGROUND[2]);
const TEXT: RGBColor = RGBColor(INK[0], INK[1], INK[2]);
/// Horizontal room per model-and-batch group, and the figure's fixed parts, in pixels.
const GROUP_W: u32 = 78;
const Y_AXIS_W: u32 = 72;
const PANEL_H: u32 = 380;
const LEGEND_H: u32 = 30;
const FONT: &str = "sans-serif";

/// One model and batch of one precision.
struct Row {
    label: String,
    official_ms: f64,
    official_range: (f64, f64),
    ours_ms: f64,
}

/// One official model row of `official.json`.
struct Official {
    /// Without the `DiT-MoE-` prefix, e.g. `XL/2-8E2A`.
    model: String,
    batch: usize,
    ms: f64,
    ms_min: f64,
    ms_max: f64,
}

/// The official rows of `official.json` for `prec` (`bf16-autocast` or `fp32`).
fn official(path: &Path, prec: &str) -> Result<Vec<Official>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let results = json["results"].as_array().with_context(|| format!("{}: no `results` array", path.display()))?;
    let mut rows = Vec::new();
    for r in results.iter().filter(|r| r["kind"] == "model" && r["prec"] == prec) {
        let field = |k: &str| r[k].as_f64().with_context(|| format!("{}: a model row without `{k}`", path.display()));
        rows.push(Official {
            model: r["model"].as_str().unwrap_or_default().trim_start_matches("DiT-MoE-").to_string(),
            batch: field("batch")? as usize,
            ms: field("ms")?,
            ms_min: field("ms_min")?,
            ms_max: field("ms_max")?,
        });
    }
    Ok(rows)
}

/// ditmoe's ms per forward from `bench_model`'s table rows `| model | dtype | batch | eager |
/// graph | ...`: the faster of eager and graph, for `dtype` (`bf16` or `f32`).
fn ours(table: &str, dtype: &str, model: &str, batch: usize) -> Option<f64> {
    table.lines().filter(|l| l.starts_with("| ")).find_map(|line| {
        let c: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if c.len() >= 5 && c[0] == model && c[1] == dtype && c[2].parse::<usize>().ok() == Some(batch) {
            Some(c[3].parse::<f64>().ok()?.min(c[4].parse::<f64>().ok()?))
        } else {
            None
        }
    })
}

fn rows(dir: &Path, prec: &str, dtype: &str) -> Result<Vec<Row>> {
    let path = dir.join("ditmoe.txt");
    let table = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    official(&dir.join("official.json"), prec)?
        .into_iter()
        .map(|o| {
            let ours_ms = ours(&table, dtype, &o.model, o.batch).with_context(|| format!("{}: no row for {} {dtype} batch {}", path.display(), o.model, o.batch))?;
            let label = format!("{} B{}", o.model.trim_end_matches("-8E2A"), o.batch);
            Ok(Row { label, official_ms: o.ms, official_range: (o.ms_min, o.ms_max), ours_ms })
        })
        .collect()
}

/// A tick label of the log axis: whole milliseconds as integers, fractions without trailing
/// zeros.
fn ms_label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn speedup_label(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}x")
    } else {
        format!("{x:.2}x")
    }
}

/// The two series' swatches and names, once for the whole figure.
fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let font = (FONT, 14).into_font().color(&TEXT);
    let mut x = Y_AXIS_W as i32;
    for (color, name) in [(OFFICIAL, "official PyTorch (median, min–max)"), (OURS, "ditmoe (faster of eager and CUDA graph)")] {
        area.draw(&Rectangle::new([(x, 8), (x + 14, 22)], color.filled()))?;
        area.draw(&Text::new(name, (x + 20, 15), font.pos(Pos::new(HPos::Left, VPos::Center))))?;
        x += 20 + area.estimate_text_size(name, &font)?.0 as i32 + 28;
    }
    Ok(())
}

/// The x axis: `n` model-and-batch groups, group `i` spanning `i..i + 1` with its bars at
/// fractions of that and its one tick, labelled with its model and batch, at the middle.
struct Groups(usize);

impl Ranged for Groups {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, (from, to): (i32, i32)) -> i32 {
        from + ((to - from) as f64 * v / self.0.max(1) as f64).round() as i32
    }
    fn key_points<Hint: KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }
    fn range(&self) -> Range<f64> {
        0.0..self.0 as f64
    }
}

/// Tick labels come from the chart's `x_label_formatter`; this is only its fallback.
impl ValueFormatter<f64> for Groups {
    fn format(v: &f64) -> String {
        format!("{}", v.floor())
    }
}

/// One panel: bars on a log axis spanning the decades that hold every value, starting at
/// least a tenth of a decade below the smallest (a bar of exactly 1 ms on an axis starting at
/// 1 ms would have no height) and ending at least a third of a decade above the largest, so
/// the speed-up over the tallest bar has room.
fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, rows: &[Row]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let values = rows.iter().flat_map(|r| [r.ours_ms, r.official_range.0, r.official_range.1]);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if !(lo > 0.0 && hi.is_finite()) {
        bail!("{title}: no positive times to draw")
    }
    let (bottom, top) = (10f64.powf((lo.log10() - 0.1).floor()), 10f64.powf((hi.log10() + 0.3).ceil()));
    // A hair wider, so that plotters' log-axis ticks (found through ln(start) / ln(10), which
    // rounds to just above -1 for 0.1) include both end decades.
    let (bottom, top) = (bottom * (1.0 - 1e-9), top * (1.0 + 1e-9));
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 17).into_font().color(&TEXT))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(Y_AXIS_W - 10)
        .build_cartesian_2d(Groups(rows.len()), (bottom..top).log_scale())?;
    let x_label = |x: &f64| rows.get(x.floor() as usize).map(|r| r.label.clone()).unwrap_or_default();
    let y_label = |y: &f64| ms_label(*y);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .light_line_style(PAPER)
        .axis_style(TEXT)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .y_desc("ms per forward (log scale)")
        .label_style((FONT, 13).into_font().color(&TEXT))
        .axis_desc_style((FONT, 14).into_font().color(&TEXT))
        .draw()?;

    let bar = |i: usize, from: f64, to: f64, ms: f64, color: RGBColor| Rectangle::new([(i as f64 + from, bottom), (i as f64 + to, ms)], color.filled());
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| bar(i, 0.12, 0.5, r.official_ms, OFFICIAL)))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| bar(i, 0.5, 0.88, r.ours_ms, OURS)))?;
    // The official time's spread over its timed forwards: a whisker with caps.
    for (i, r) in rows.iter().enumerate() {
        let (x, (min, max)) = (i as f64 + 0.31, r.official_range);
        let whisker = [vec![(x, min), (x, max)], vec![(x - 0.09, min), (x + 0.09, min)], vec![(x - 0.09, max), (x + 0.09, max)]];
        chart.draw_series(whisker.into_iter().map(|p| PathElement::new(p, TEXT.stroke_width(1))))?;
    }
    let above = (FONT, 13).into_font().color(&TEXT).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        EmptyElement::at((i as f64 + 0.5, r.official_range.1.max(r.official_ms).max(r.ours_ms)))
            + Text::new(speedup_label(r.official_ms / r.ours_ms), (0, -5), above.clone())
    }))?;
    Ok(())
}

/// The figure: title, legend, then one panel per precision, stacked.
fn chart(title: &str, panels: &[(&str, Vec<Row>)]) -> Result<RgbImage> {
    register_bundled_font();
    let groups = panels.iter().map(|(_, r)| r.len()).max().unwrap_or(1) as u32;
    let (w, h) = ((Y_AXIS_W + groups * GROUP_W + 30).max(760), 40 + LEGEND_H + PANEL_H * panels.len() as u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&PAPER)?;
        let body = root.titled(title, (FONT, 22).into_font().color(&TEXT))?;
        let (legend_area, body) = body.split_vertically(LEGEND_H);
        legend(&legend_area)?;
        for (area, (name, rows)) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
            panel(area, name, rows)?;
        }
        root.present()?;
    }
    RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("a {w}x{h} RGB buffer of the wrong size"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, out, gpu) = match args.as_slice() {
        [d, o] => (Path::new(d), Path::new(o), "NVIDIA H100 80GB HBM3"),
        [d, o, g] => (Path::new(d), Path::new(o), g.as_str()),
        _ => bail!("usage: bench_chart RUN_DIR OUT.png [GPU]   (RUN_DIR holds official.json and ditmoe.txt)"),
    };
    let panels = [
        ("bf16: ms per forward, lower is better", rows(dir, "bf16-autocast", "bf16")?),
        ("fp32: ms per forward, lower is better", rows(dir, "fp32", "f32")?),
    ];
    let img = chart(&format!("DiT-MoE forward on one {gpu}: official vs ditmoe"), &panels)?;
    save_png(&img, out)?;
    println!("wrote {}", out.display());
    Ok(())
}
