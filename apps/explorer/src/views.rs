//! The pictures of the explorer's two views, built from a trajectory alone: the same images
//! are shown in the window and written by "Export view".
use crate::pictures::{state_picture, upscale};
use ditmoe::analysis::aggregate::first_choice;
use ditmoe::analysis::figures::{class_figure, patch_figure, step_figure, timestep_label};
use ditmoe::analysis::heatmap::{tile, BACKGROUND, INK};
use ditmoe::analysis::text::{draw_text, line_height, text_width};
use ditmoe::analysis::{Heatmap, RoutingTrajectory};
use image::{imageops, Rgb, RgbImage};

/// Side in pixels of the state and patch-map pictures.
pub const PICTURE_SIDE: u32 = 256;

/// Pixel size of captions, as the heatmaps' tick and axis labels.
const CAPTION_PX: f64 = 12.0;

/// `img` with `caption` above it, on the figures' paper.
pub fn captioned(img: &RgbImage, caption: &str) -> RgbImage {
    let pad = 6;
    let line = line_height(CAPTION_PX);
    let width = img.width().max(text_width(caption, CAPTION_PX)) + 2 * pad;
    let mut out = RgbImage::from_pixel(width, img.height() + line + 3 * pad, Rgb(BACKGROUND));
    draw_text(&mut out, pad as i64, pad as i64, caption, CAPTION_PX, INK);
    imageops::overlay(&mut out, img, pad as i64, (line + 2 * pad) as i64);
    out
}

/// The state image `image` was fed at evaluation `step`, upscaled.
pub fn state_view(traj: &RoutingTrajectory, image: usize, step: usize) -> RgbImage {
    upscale(&state_picture(traj.state(image, step), traj.dims().state), PICTURE_SIDE)
}

/// The final sample of `image`, upscaled.
pub fn sample_view(traj: &RoutingTrajectory, image: usize) -> RgbImage {
    upscale(&state_picture(traj.sample(image), traj.dims().state), PICTURE_SIDE)
}

/// Each patch's first-choice expert at (`image`, `step`, `layer`), as a labelled map.
pub fn patch_choice_figure(traj: &RoutingTrajectory, image: usize, step: usize, layer: usize) -> Heatmap {
    let d = traj.dims();
    let cell = (PICTURE_SIDE / d.grid.max(1) as u32).max(1);
    Heatmap::experts(&first_choice(traj, image, step, layer), d.grid, d.grid, d.experts)
        .expect("first choices are valid expert ids")
        .title(format!("layer {layer}: first-choice expert"))
        .cell(cell, cell)
}

/// The trajectory view of one image at one step and layer: state, patch map and final
/// sample side by side, the layer's expert load over the run (current step outlined) below.
pub fn trajectory_view(traj: &RoutingTrajectory, image: usize, step: usize, layer: usize) -> RgbImage {
    let t = timestep_label(traj.meta.timesteps[step]);
    let class = traj.meta.class_name(traj.meta.classes[image]);
    let row = [
        captioned(&state_view(traj, image, step), &format!("x_t at t = {t}")),
        patch_choice_figure(traj, image, step, layer).render(),
        captioned(&sample_view(traj, image), "final sample"),
    ];
    let row = tile(&row, 3, "");
    let load = step_figure(traj, layer, Some(step)).title(format!("layer {layer}: expert load over the run")).render();
    tile(&[row, load], 1, &format!("{class}, seed {}, {} step {}/{}", traj.meta.seed, traj.meta.sampler, step + 1, traj.dims().steps))
}

/// The class comparison of one layer: the expert share of each class, then each class's
/// most-chosen expert per patch.
pub fn class_view(traj: &RoutingTrajectory, layer: usize) -> RgbImage {
    let table = class_figure(traj, layer).title(format!("layer {layer}: expert share by class")).render();
    let maps: Vec<RgbImage> = traj
        .classes()
        .into_iter()
        .filter_map(|c| {
            let sub = traj.select_images(&traj.images_of_class(c)).ok()?;
            Some(patch_figure(&sub, layer).ok()?.title(traj.meta.class_name(c)).cell(12, 12).render())
        })
        .collect();
    let maps = tile(&maps, 5, "");
    tile(&[table, maps], 1, "")
}
