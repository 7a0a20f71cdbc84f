//! Text on `RgbImage`s (figure titles, axis labels, ticks, legends, captions) drawn by
//! plotters with the bundled DejaVu Sans through ab_glyph: anti-aliased, upper and lower
//! case and every character the font has, and no system fonts or fontconfig, so figures
//! come out the same on a bare CI machine as on a desktop.
//!
//! Positions are the top-left corner of the text's line box, [`line_height`] tall and
//! [`text_width`] wide, so layouts can reserve room for labels before drawing them.
use image::RgbImage;
use plotters::prelude::{BitMapBackend, DrawingBackend, RGBColor};
use plotters::style::{register_font, FontDesc, FontFamily, FontStyle, FontTransform};
use std::sync::Once;

/// DejaVu Sans 2.37 (licence in `assets/fonts/LICENSE-DejaVu.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// DejaVu Sans's ascent as a fraction of its full height (hhea ascender 1901 and descender
/// -483 font units): ab_glyph scales a font so that ascent plus descent is the pixel size.
const ASCENT: f64 = 1901.0 / (1901.0 + 483.0);

/// The font family every chart draws its text in (the bundled DejaVu Sans once registered).
pub const CHART_FONT: &str = "sans-serif";
/// The charts' grid lines.
pub const CHART_GRID: RGBColor = RGBColor(225, 225, 225);

/// Line `i`'s colour in a chart of several series: matplotlib's tab10, the first ten of the
/// expert colours ([`super::colormap::expert_color`]), cycled.
pub fn series_color(i: usize) -> RGBColor {
    let [r, g, b] = super::colormap::expert_color(i % 10);
    RGBColor(r, g, b)
}

/// Registers the bundled font as plotters' `sans-serif`, the family plotters' charts use by
/// default, so that a [`ChartBuilder`](plotters::chart::ChartBuilder)'s captions and axis
/// labels find it as well as the functions here. Safe to call any number of times; every
/// function here calls it.
pub fn register_bundled_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if register_font("sans-serif", FontStyle::Normal, DEJAVU_SANS).is_err() {
            panic!("assets/fonts/DejaVuSans.ttf is not a font ab_glyph can read");
        }
    });
}

fn font(size: f64) -> FontDesc<'static> {
    register_bundled_font();
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal)
}

/// Height in pixels of a line of text of pixel size `size`: the font's ascent plus descent,
/// which holds DejaVu Sans's Latin letters, accents and descenders included, and a pixel
/// above and below for their anti-aliased edges.
pub fn line_height(size: f64) -> u32 {
    size.ceil() as u32 + 2
}

/// Width in pixels of `text` at pixel size `size` (advances and kerning).
pub fn text_width(text: &str, size: f64) -> u32 {
    if text.is_empty() {
        return 0;
    }
    font(size).box_size(text).map(|(w, _)| w).expect("the bundled font is registered")
}

/// How far below the line box's top plotters' ab_glyph renderer must be asked to draw: it
/// puts the baseline half the pixel size below the anchor, where the line box has it one
/// pixel (for anti-aliasing) plus [`ASCENT`] of the size below its top.
fn baseline_shift(size: f64) -> i32 {
    (size * (ASCENT - 0.5)).round() as i32 + 1
}

fn draw(img: &mut RgbImage, pos: (i64, i64), text: &str, size: f64, color: [u8; 3], transform: FontTransform) {
    if text.is_empty() || img.width() == 0 || img.height() == 0 {
        return;
    }
    let color = RGBColor(color[0], color[1], color[2]);
    let style = font(size).transform(transform).color(&color);
    let (w, h) = img.dimensions();
    let clamp = |v: i64| v.clamp(i32::MIN as i64 / 2, i32::MAX as i64 / 2) as i32;
    // The backend writes straight into the image's RGB8 buffer; pixels outside are skipped.
    let mut backend = BitMapBackend::with_buffer(&mut *img, (w, h));
    backend.draw_text(text, &style, (clamp(pos.0), clamp(pos.1))).expect("drawing text into a bitmap buffer");
}

/// Draws `text` with its line box's top-left corner at (x, y); pixels outside the image are
/// skipped.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, size: f64, color: [u8; 3]) {
    draw(img, (x, y + baseline_shift(size) as i64), text, size, color, FontTransform::None)
}

/// Draws `text` turned a quarter left, reading bottom to top (a y-axis label), in the box
/// [`line_height`] wide and [`text_width`] tall whose top-left corner is (x, y).
pub fn draw_text_up(img: &mut RgbImage, x: i64, y: i64, text: &str, size: f64, color: [u8; 3]) {
    // Rotate270 maps the text's (right, down) to (up, right): its start goes to the bottom
    // of the box, and its top to the box's left side.
    let bottom = y + text_width(text, size) as i64 - 1;
    draw(img, (x + baseline_shift(size) as i64, bottom), text, size, color, FontTransform::Rotate270)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// The bounding box (x0, y0, x1, y1), inclusive, of the pixels that are not white.
    fn ink(img: &RgbImage) -> Option<(u32, u32, u32, u32)> {
        let mut b: Option<(u32, u32, u32, u32)> = None;
        for (x, y, p) in img.enumerate_pixels() {
            if p.0 != [255, 255, 255] {
                b = Some(match b {
                    None => (x, y, x, y),
                    Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
                });
            }
        }
        b
    }

    #[test]
    fn text_stays_in_its_line_box() {
        for size in [9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 20.0, 24.0, 37.0] {
            // Capital accents, ascenders and descenders reach the top and bottom of the line.
            let text = "ÅÉ|bdgjpqy";
            let (w, h) = (text_width(text, size), line_height(size));
            let mut img = RgbImage::from_pixel(w + 40, h + 40, Rgb([255, 255, 255]));
            draw_text(&mut img, 20, 20, text, size, [0, 0, 0]);
            let (x0, y0, x1, y1) = ink(&img).expect("text drew something");
            // (The last glyph's anti-aliased edge may pass its advance by a pixel.)
            assert!(x0 >= 20 && y0 >= 20 && x1 < 20 + w + 1 && y1 < 20 + h, "size {size}: ink {:?} outside the {w}x{h} box at (20, 20)", (x0, y0, x1, y1));
            // ... and the line box is not much taller than the ink.
            assert!(y0 <= 22 && y1 + 3 >= 20 + h, "size {size}: ink rows {y0}..={y1} in a {h}-pixel line at 20");

            let mut up = RgbImage::from_pixel(h + 40, w + 40, Rgb([255, 255, 255]));
            draw_text_up(&mut up, 20, 20, text, size, [0, 0, 0]);
            let (x0, y0, x1, y1) = ink(&up).expect("turned text drew something");
            assert!(x0 >= 20 && y0 + 1 >= 20 && x1 < 20 + h && y1 < 20 + w + 1, "size {size}: turned ink {:?} outside the {h}x{w} box at (20, 20)", (x0, y0, x1, y1));
        }
    }

    #[test]
    fn widths_grow_with_text_and_size() {
        assert_eq!(text_width("", 12.0), 0);
        assert!(text_width("expert", 12.0) > text_width("E", 12.0));
        assert!(text_width("expert", 24.0) > text_width("expert", 12.0));
        assert_eq!(line_height(12.0), 14);
    }
}
