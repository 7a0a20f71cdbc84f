//! Model states as pictures: pixel-space states (1 or 3 channels in about [-1, 1]) as they
//! would be saved, latents (any other channel count) as their first three channels stretched
//! to their own range, since decoding every step through a VAE would cost more than the run.
use eframe::egui::ColorImage;
use image::{imageops, Rgb, RgbImage};

/// A (C, H, W) state as an RGB picture.
pub fn state_picture(state: &[f32], (c, h, w): (usize, usize, usize)) -> RgbImage {
    let plane = h * w;
    let channels: Vec<usize> = if c == 1 { vec![0, 0, 0] } else { (0..3).map(|i| i.min(c - 1)).collect() };
    let pixel_space = matches!(c, 1 | 3);
    let (lo, hi) = if pixel_space {
        (-1.0, 1.0)
    } else {
        let used = &state[..plane * c.min(3)];
        used.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    };
    let span = (hi - lo).max(1e-6);
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = y as usize * w + x as usize;
        Rgb(std::array::from_fn(|i| (((state[channels[i] * plane + at] - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8))
    })
}

/// Scales a picture up by an integer factor with nearest-neighbour sampling (pixels stay
/// square: a 32 x 32 sample is a grid of patches worth looking at).
pub fn upscale(img: &RgbImage, side: u32) -> RgbImage {
    let factor = (side / img.width().max(img.height()).max(1)).max(1);
    imageops::resize(img, img.width() * factor, img.height() * factor, imageops::FilterType::Nearest)
}

/// An `image` picture as an egui texture image.
pub fn color_image(img: &RgbImage) -> ColorImage {
    ColorImage::from_rgb([img.width() as usize, img.height() as usize], img.as_raw())
}
