//! Draws one benchmark job of `docs/bench-logs/` as a PNG: milliseconds per forward of the
//! official PyTorch code (grey, with its min–max over the timed forwards) and of ditmoe (blue,
//! the faster of eager and CUDA graph) for each model and batch, one log-scale panel per
//! precision, with the speed-up over each pair. `docs/benchmarks.md`'s tables as a picture.
//!
//! cargo run --example bench_chart -- docs/bench-logs/2026-11-24/job14 docs/benchmarks-job14.png
//!
//! The job folder holds `official.json` (`bench_official_ditmoe.py --out`) and `ditmoe.txt`
//! (`bench_model`'s output), as every job of the GPU runs does.
use anyhow::{bail, Context, Result};
use ditmoe::analysis::glyphs::{draw_text, text_width, GLYPH_H};
use ditmoe::analysis::heatmap::{save_png, tile, BACKGROUND, INK};
use image::{Rgb, RgbImage};
use std::path::Path;

const OFFICIAL: [u8; 3] = [160, 160, 160];
const OURS: [u8; 3] = [31, 119, 180];
const GRID: [u8; 3] = [225, 225, 225];
const BAR_W: u32 = 22;
const GROUP_GAP: u32 = 26;
const PLOT_H: u32 = 300;
const LEFT: u32 = 64;
const TOP: u32 = 46;

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

fn fill(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, color: [u8; 3]) {
    for y in y0.min(y1)..y0.max(y1).min(img.height()) {
        for x in x0..x1.min(img.width()) {
            img.put_pixel(x, y, Rgb(color));
        }
    }
}

/// One panel: bars on a log axis spanning the decades that hold every value, starting at
/// least a tenth of a decade below the smallest (a bar of exactly 1 ms on an axis starting at
/// 1 ms would have no height).
fn panel(title: &str, rows: &[Row]) -> RgbImage {
    let values = rows.iter().flat_map(|r| [r.ours_ms, r.official_range.0, r.official_range.1]);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (d0, d1) = ((lo.log10() - 0.1).floor(), hi.log10().ceil());
    let y_of = |ms: f64| TOP + PLOT_H - (((ms.log10() - d0) / (d1 - d0)) * PLOT_H as f64).round() as u32;
    let group_w = 2 * BAR_W + GROUP_GAP;
    let width = LEFT + rows.len() as u32 * group_w + 20;
    let mut img = RgbImage::from_pixel(width.max(text_width(title, 2) + 20), TOP + PLOT_H + 40, Rgb(BACKGROUND));
    draw_text(&mut img, 10, 10, title, 2, INK);
    // decades: grid line and label
    for e in d0 as i32..=d1 as i32 {
        let y = y_of(10f64.powi(e));
        fill(&mut img, LEFT, y, width - 10, y + 1, GRID);
        let label = if e >= 0 { format!("{}", 10u64.pow(e as u32)) } else { format!("{}", 10f64.powi(e)) };
        draw_text(&mut img, (LEFT - 8 - text_width(&label, 1)) as i64, y as i64 - 3, &label, 1, INK);
    }
    draw_text(&mut img, 4, (TOP - 12) as i64, "MS", 1, INK);
    for (i, r) in rows.iter().enumerate() {
        let x = LEFT + 10 + i as u32 * group_w;
        let base = TOP + PLOT_H;
        fill(&mut img, x, y_of(r.official_ms), x + BAR_W, base, OFFICIAL);
        // the official time's spread over its timed forwards
        let (ylo, yhi) = (y_of(r.official_range.0), y_of(r.official_range.1));
        fill(&mut img, x + BAR_W / 2 - 1, yhi, x + BAR_W / 2 + 1, ylo + 1, INK);
        fill(&mut img, x + 5, yhi, x + BAR_W - 5, yhi + 1, INK);
        fill(&mut img, x + 5, ylo, x + BAR_W - 5, ylo + 1, INK);
        fill(&mut img, x + BAR_W, y_of(r.ours_ms), x + 2 * BAR_W, base, OURS);
        let speedup = r.official_ms / r.ours_ms;
        let s = if speedup >= 10.0 { format!("{speedup:.0}X") } else { format!("{speedup:.2}X") };
        let sx = x + BAR_W - text_width(&s, 1) / 2;
        draw_text(&mut img, sx as i64, y_of(r.official_range.1.max(r.official_ms)) as i64 - 12, &s, 1, INK);
        let lx = (x + BAR_W).saturating_sub(text_width(&r.label, 1) / 2);
        draw_text(&mut img, lx as i64, (base + 8) as i64, &r.label, 1, INK);
    }
    // legend
    let ly = (TOP + PLOT_H + 24) as i64;
    fill(&mut img, LEFT, ly as u32, LEFT + 10, ly as u32 + GLYPH_H, OFFICIAL);
    draw_text(&mut img, (LEFT + 14) as i64, ly, "OFFICIAL PYTORCH (MEDIAN, MIN-MAX)", 1, INK);
    let x2 = LEFT + 24 + text_width("OFFICIAL PYTORCH (MEDIAN, MIN-MAX)", 1);
    fill(&mut img, x2, ly as u32, x2 + 10, ly as u32 + GLYPH_H, OURS);
    draw_text(&mut img, (x2 + 14) as i64, ly, "DITMOE", 1, INK);
    img
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, out) = match args.as_slice() {
        [d, o] => (Path::new(d), Path::new(o)),
        _ => bail!("usage: bench_chart JOB_DIR OUT.png   (JOB_DIR holds official.json and ditmoe.txt)"),
    };
    let job = dir.file_name().map(|n| n.to_string_lossy().to_uppercase()).unwrap_or_default();
    let bf16 = panel("BF16: MS PER FORWARD, LOWER IS BETTER", &rows(dir, "bf16-autocast", "bf16")?);
    let f32 = panel("FP32: MS PER FORWARD, LOWER IS BETTER", &rows(dir, "fp32", "f32")?);
    let img = tile(&[bf16, f32], 1, &format!("DIT-MOE FORWARD, ONE H100 ({job}): OFFICIAL VS DITMOE"));
    save_png(&img, out)?;
    println!("wrote {}", out.display());
    Ok(())
}
