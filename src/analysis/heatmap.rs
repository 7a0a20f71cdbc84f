//! Heatmap PNGs: a grid of coloured cells (viridis for quantities, one colour per expert for
//! expert-id maps) with a title, axis labels, thinned tick labels and a legend (colour bar or
//! expert swatches), plus tiling panels into one figure as the official scripts' 2 x 6
//! subplot layout does. The explorer shows [`Heatmap::cells_image`] as a texture and exports
//! [`Heatmap::render`]. Cells are filled pixel by pixel at exact sizes; all text is drawn by
//! plotters through [`super::text`].
use super::colormap::{expert_color, viridis};
use super::text::{draw_text, draw_text_up, line_height, text_width};
use super::Matrix;
use crate::checkpoint::write_atomic;
use candle_core::{bail, Result};
use image::{imageops, ImageEncoder, Rgb, RgbImage};
use std::path::Path;

/// The figures' paper and text colours (heatmaps, their panels and other figures labelled
/// with [`super::text`]).
pub const BACKGROUND: [u8; 3] = [255, 255, 255];
pub const INK: [u8; 3] = [20, 20, 20];
const MARK: [u8; 3] = [230, 30, 30];
const MARGIN: u32 = 8;
const GAP: u32 = 4;
const COLORBAR_W: u32 = 12;
/// Pixel sizes of tick, axis-label and legend text, of a heatmap's title (both times
/// [`Heatmap::text_scale`]) and of a tiled figure's title.
const TICK_PX: f64 = 12.0;
const TITLE_PX: f64 = 15.0;
const FIGURE_TITLE_PX: f64 = 20.0;

/// How values map onto the colour map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// The matrix's own min..max (the official scripts' `normalization`).
    MinMax,
    /// A fixed range, e.g. 0..log2(E) for entropies, so several panels compare.
    Range(f64, f64),
}

#[derive(Debug, Clone, PartialEq)]
enum Legend {
    Colorbar { lo: f64, hi: f64 },
    Experts(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    pub rows: usize,
    pub cols: usize,
    colors: Vec<[u8; 3]>,
    legend: Legend,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// (column, label); thinned when drawn so labels never overlap.
    pub x_ticks: Vec<(usize, String)>,
    /// (row, label); thinned likewise.
    pub y_ticks: Vec<(usize, String)>,
    /// Pixels per cell (width, height).
    pub cell: (u32, u32),
    /// A column outlined in red (the current timestep).
    pub marked_col: Option<usize>,
    /// Integer scale of all text: ticks, axis labels and legends are 12 px at 1, titles 15 px.
    pub text_scale: u32,
}

impl Heatmap {
    fn with_colors(rows: usize, cols: usize, colors: Vec<[u8; 3]>, legend: Legend) -> Self {
        Self {
            rows,
            cols,
            colors,
            legend,
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            x_ticks: Vec::new(),
            y_ticks: Vec::new(),
            cell: (12, 12),
            marked_col: None,
            text_scale: 1,
        }
    }

    /// Quantities in viridis. A constant matrix under [`Scale::MinMax`] is drawn at the low end.
    pub fn values(m: &Matrix, scale: Scale) -> Self {
        let (lo, hi) = match scale {
            Scale::MinMax => m.range(),
            Scale::Range(lo, hi) => (lo, hi),
        };
        let span = hi - lo;
        let colors = m.data.iter().map(|&v| viridis(if span > 0.0 { (v - lo) / span } else { 0.0 })).collect();
        Self::with_colors(m.rows, m.cols, colors, Legend::Colorbar { lo, hi })
    }

    /// Expert ids (`rows * cols`, row-major), one colour each, with a swatch legend.
    pub fn experts(ids: &[usize], rows: usize, cols: usize, num_experts: usize) -> Result<Self> {
        if ids.len() != rows * cols {
            bail!("{} expert ids for a {rows} x {cols} map", ids.len())
        }
        if let Some(e) = ids.iter().find(|&&e| e >= num_experts) {
            bail!("expert id {e} out of range ({num_experts} experts)")
        }
        Ok(Self::with_colors(rows, cols, ids.iter().map(|&e| expert_color(e)).collect(), Legend::Experts(num_experts)))
    }

    pub fn title(mut self, t: impl Into<String>) -> Self {
        self.title = t.into();
        self
    }
    pub fn labels(mut self, x: impl Into<String>, y: impl Into<String>) -> Self {
        self.x_label = x.into();
        self.y_label = y.into();
        self
    }
    /// One tick label per column.
    pub fn x_tick_labels(mut self, labels: impl IntoIterator<Item = String>) -> Self {
        self.x_ticks = labels.into_iter().enumerate().collect();
        self
    }
    /// One tick label per row.
    pub fn y_tick_labels(mut self, labels: impl IntoIterator<Item = String>) -> Self {
        self.y_ticks = labels.into_iter().enumerate().collect();
        self
    }
    pub fn cell(mut self, w: u32, h: u32) -> Self {
        self.cell = (w.max(1), h.max(1));
        self
    }
    pub fn mark_col(mut self, col: Option<usize>) -> Self {
        self.marked_col = col;
        self
    }

    /// The colour of cell (row, col).
    pub fn color(&self, row: usize, col: usize) -> [u8; 3] {
        self.colors[row * self.cols + col]
    }

    /// One pixel per cell, no decorations.
    pub fn cells_image(&self) -> RgbImage {
        RgbImage::from_fn(self.cols as u32, self.rows as u32, |x, y| Rgb(self.color(y as usize, x as usize)))
    }

    /// The decorated figure: title, y label and ticks on the left, cells, x ticks and label
    /// below, legend on the right.
    pub fn render(&self) -> RgbImage {
        let ts = self.text_scale.max(1) as f64;
        let (tick_px, title_px) = (TICK_PX * ts, TITLE_PX * ts);
        let line = line_height(tick_px);
        let (cw, ch) = self.cell;
        let (plot_w, plot_h) = (self.cols as u32 * cw, self.rows as u32 * ch);
        // Labels may sit one font size apart, their line boxes overlapping by the anti-aliasing
        // pixels: the font's room above capitals and below the baseline keeps rows' ink apart.
        let y_ticks = thin(&self.y_ticks, ch, line - 2);
        let tick_w = y_ticks.iter().map(|(_, l)| text_width(l, tick_px)).max().unwrap_or(0);
        let x_tick_w = self.x_ticks.iter().map(|(_, l)| text_width(l, tick_px)).max().unwrap_or(0);
        let x_ticks = thin(&self.x_ticks, cw, x_tick_w + 2 * GAP);

        let title_h = if self.title.is_empty() { 0 } else { line_height(title_px) + GAP };
        let y_label_w = if self.y_label.is_empty() { 0 } else { line + GAP };
        let left = MARGIN + y_label_w + if tick_w > 0 { tick_w + GAP } else { 0 };
        let top = MARGIN + title_h;
        let x_tick_h = if x_ticks.is_empty() { 0 } else { line + GAP };
        let x_label_h = if self.x_label.is_empty() { 0 } else { line + GAP };
        let legend = self.legend_image(tick_px, plot_h);
        // The y label, read bottom to top, is centred on the cells but may be taller than them,
        // as the legend may be.
        let y_label_len = text_width(&self.y_label, tick_px);
        let y_label_top = (top + plot_h / 2).saturating_sub(y_label_len / 2).max(top);
        let below = top + plot_h + GAP;
        let bottom = (below + x_tick_h + x_label_h).max(top + legend.height()).max(y_label_top + y_label_len);
        let width = (left + plot_w + GAP * 2 + legend.width() + MARGIN).max(MARGIN * 2 + text_width(&self.title, title_px));
        let height = bottom + MARGIN;
        let mut img = RgbImage::from_pixel(width, height, Rgb(BACKGROUND));

        draw_text(&mut img, MARGIN as i64, MARGIN as i64, &self.title, title_px, INK);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let color = Rgb(self.color(r, c));
                for dy in 0..ch {
                    for dx in 0..cw {
                        img.put_pixel(left + c as u32 * cw + dx, top + r as u32 * ch + dy, color);
                    }
                }
            }
        }
        if let Some(c) = self.marked_col.filter(|&c| c < self.cols) {
            outline(&mut img, left + c as u32 * cw, top, cw, plot_h, MARK);
        }
        for (r, label) in &y_ticks {
            let y = top + *r as u32 * ch + ch / 2;
            draw_text(&mut img, (left - GAP - text_width(label, tick_px)) as i64, y as i64 - line as i64 / 2, label, tick_px, INK);
        }
        for (c, label) in &x_ticks {
            let x = left + *c as u32 * cw + cw / 2;
            draw_text(&mut img, x as i64 - text_width(label, tick_px) as i64 / 2, below as i64, label, tick_px, INK);
        }
        if !self.x_label.is_empty() {
            let x = left + plot_w / 2;
            draw_text(&mut img, x as i64 - text_width(&self.x_label, tick_px) as i64 / 2, (below + x_tick_h) as i64, &self.x_label, tick_px, INK);
        }
        draw_text_up(&mut img, MARGIN as i64, y_label_top as i64, &self.y_label, tick_px, INK);
        imageops::overlay(&mut img, &legend, (left + plot_w + 2 * GAP) as i64, top as i64);
        img
    }

    /// The colour bar (min and max values beside it) or the expert swatches, in columns
    /// no taller than the plot where possible.
    fn legend_image(&self, px: f64, plot_h: u32) -> RgbImage {
        let line = line_height(px);
        match self.legend {
            Legend::Colorbar { lo, hi } => {
                let (hi_s, lo_s) = (format_value(hi), format_value(lo));
                let h = plot_h.max(2 * line + 8);
                let w = COLORBAR_W + GAP + text_width(&hi_s, px).max(text_width(&lo_s, px));
                let mut img = RgbImage::from_pixel(w, h, Rgb(BACKGROUND));
                for y in 0..h {
                    let c = Rgb(viridis(1.0 - y as f64 / (h - 1).max(1) as f64));
                    (0..COLORBAR_W).for_each(|x| img.put_pixel(x, y, c));
                }
                draw_text(&mut img, (COLORBAR_W + GAP) as i64, 0, &hi_s, px, INK);
                draw_text(&mut img, (COLORBAR_W + GAP) as i64, (h - line) as i64, &lo_s, px, INK);
                img
            }
            Legend::Experts(n) => {
                let row_h = line + 3;
                let per_col = ((plot_h / row_h) as usize).max(1).min(n);
                let ncols = n.div_ceil(per_col) as u32;
                let col_w = line + GAP + text_width(&format!("E{}", n - 1), px) + 2 * GAP;
                let mut img = RgbImage::from_pixel(ncols * col_w, per_col as u32 * row_h, Rgb(BACKGROUND));
                for e in 0..n {
                    let (x, y) = ((e / per_col) as u32 * col_w, (e % per_col) as u32 * row_h);
                    for dy in 0..line {
                        (0..line).for_each(|dx| img.put_pixel(x + dx, y + dy, Rgb(expert_color(e))));
                    }
                    draw_text(&mut img, (x + line + GAP) as i64, y as i64, &format!("E{e}"), px, INK);
                }
                img
            }
        }
    }
}

/// Every n-th tick so that labels `need` pixels apart fit cells `cell` pixels apart.
fn thin(ticks: &[(usize, String)], cell: u32, need: u32) -> Vec<(usize, String)> {
    let every = need.div_ceil(cell.max(1)).max(1) as usize;
    ticks.iter().filter(|(i, _)| i % every == 0).cloned().collect()
}

fn outline(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, color: [u8; 3]) {
    for dx in 0..w {
        img.put_pixel(x + dx, y, Rgb(color));
        img.put_pixel(x + dx, y + h - 1, Rgb(color));
    }
    for dy in 0..h {
        img.put_pixel(x, y + dy, Rgb(color));
        img.put_pixel(x + w - 1, y + dy, Rgb(color));
    }
}

/// Short labels for legend values: integers as such, others to 3 significant digits.
fn format_value(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Panels side by side, `cols` per row, in columns as wide as the widest panel and rows as
/// tall as their tallest, with a figure title on top (the official scripts' subplot grid,
/// one panel per MoE layer).
pub fn tile(panels: &[RgbImage], cols: usize, title: &str) -> RgbImage {
    let cols = cols.max(1);
    let pw = panels.iter().map(|p| p.width()).max().unwrap_or(1);
    let row_heights: Vec<u32> = panels.chunks(cols).map(|row| row.iter().map(|p| p.height()).max().unwrap_or(1)).collect();
    let title_h = if title.is_empty() { 0 } else { line_height(FIGURE_TITLE_PX) + 2 * MARGIN };
    let width = (cols.min(panels.len().max(1)) as u32 * pw).max(text_width(title, FIGURE_TITLE_PX) + 2 * MARGIN);
    let mut img = RgbImage::from_pixel(width, title_h + row_heights.iter().sum::<u32>().max(1), Rgb(BACKGROUND));
    draw_text(&mut img, MARGIN as i64, MARGIN as i64, title, FIGURE_TITLE_PX, INK);
    let mut y = title_h;
    for (row, height) in panels.chunks(cols).zip(&row_heights) {
        for (c, p) in row.iter().enumerate() {
            imageops::overlay(&mut img, p, (c as u32 * pw) as i64, y as i64);
        }
        y += height;
    }
    img
}

/// PNG encoding of an RGB image.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| candle_core::Error::Msg(format!("PNG encoding: {e}")))?;
    Ok(bytes)
}

/// Writes `img` as a PNG, atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    write_atomic(path, &png_bytes(img)?)
}
