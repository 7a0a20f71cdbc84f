//! The frame the line charts share (`curves::loss_chart`, `tradeoff::tradeoff_chart`): a
//! bitmap on the figures' paper colour, x/y axes with the grid and label styles, lines with a
//! legend entry each, and the legend box. Drawn with plotters' `ChartBuilder` and the bundled
//! font ([`super::text`]).
use super::heatmap::{BACKGROUND, INK};
use super::text::{register_bundled_font, CHART_FONT as FONT, CHART_GRID as GRID};
use candle_core::Result;
use image::RgbImage;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;

/// An x/y chart of f64 axes on a bitmap.
pub type XyChart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

pub const PAPER: RGBColor = RGBColor(BACKGROUND[0], BACKGROUND[1], BACKGROUND[2]);
pub const INK_COLOR: RGBColor = RGBColor(INK[0], INK[1], INK[2]);

/// An error of the chart named `what`.
pub fn chart_err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e}"))
}

/// A `w` x `h` image: the paper colour, then whatever `draw` puts on the root area.
pub fn render(what: &str, (w, h): (u32, u32), draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>) -> Result<RgbImage> {
    register_bundled_font();
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&PAPER).map_err(|e| chart_err(what, e))?;
        draw(&root)?;
        root.present().map_err(|e| chart_err(what, e))?;
    }
    RgbImage::from_raw(w, h, buf).ok_or_else(|| chart_err(what, format!("a {w}x{h} RGB buffer of the wrong size")))
}

/// Axes over `x` and `y` in `area`, with their descriptions, the grid and, where given, a
/// caption above.
pub fn axes<'a, 'b>(what: &str, area: &'a DrawingArea<BitMapBackend<'b>, Shift>, caption: Option<&str>, (x, y): (Range<f64>, Range<f64>), (x_desc, y_desc): (&str, &str)) -> Result<XyChart<'a, 'b>> {
    let mut builder = ChartBuilder::on(area);
    if let Some(c) = caption {
        builder.caption(c, (FONT, 20).into_font().color(&INK_COLOR));
    }
    let mut chart = builder.margin(16).x_label_area_size(44).y_label_area_size(60).build_cartesian_2d(x, y).map_err(|e| chart_err(what, e))?;
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(PAPER)
        .axis_style(INK_COLOR)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 13).into_font().color(&INK_COLOR))
        .axis_desc_style((FONT, 14).into_font().color(&INK_COLOR))
        .draw()
        .map_err(|e| chart_err(what, e))?;
    Ok(chart)
}

/// A line through `points` in `color`, with its legend entry `label`.
pub fn line(what: &str, chart: &mut XyChart, points: Vec<(f64, f64)>, label: &str, color: RGBColor) -> Result<()> {
    chart
        .draw_series(std::iter::once(PathElement::new(points, color.stroke_width(2))))
        .map_err(|e| chart_err(what, e))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}

/// The legend box of the lines' labels at `position`.
pub fn legend<'a, 'b: 'a>(what: &str, chart: &mut XyChart<'a, 'b>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(PAPER.mix(0.9))
        .border_style(INK_COLOR)
        .label_font((FONT, 14).into_font().color(&INK_COLOR))
        .draw()
        .map_err(|e| chart_err(what, e))
}
