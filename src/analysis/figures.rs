//! The standard figures of a trajectory, labelled, one per MoE layer: what `ditmoe routes`
//! writes and the explorer shows, built in one place so both draw the same thing.
use super::aggregate::{load_by_class, load_by_step, load_entropy, top_expert_by_patch};
use super::heatmap::{Heatmap, Scale};
use super::RoutingTrajectory;
use candle_core::Result;

/// A timestep as a tick label: integer DDPM steps as integers, flow times to 2 decimals.
pub fn timestep_label(t: f64) -> String {
    if t.fract() == 0.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.2}")
    }
}

fn expert_labels(n: usize) -> impl Iterator<Item = String> {
    (0..n).map(|e| format!("E{e}"))
}

/// Expert load over the run of `layer`: experts (rows) x evaluations (columns, noise to data
/// left to right), min-max normalised as official `heatmap_step.py`; `current` outlines a
/// column.
pub fn step_figure(traj: &RoutingTrajectory, layer: usize, current: Option<usize>) -> Heatmap {
    let d = traj.dims();
    let cell_w = (480 / d.steps.max(1) as u32).clamp(2, 16);
    Heatmap::values(&load_by_step(traj, layer).transposed(), Scale::MinMax)
        .title(format!("layer {layer}"))
        .labels("timestep", "expert")
        .x_tick_labels(traj.meta.timesteps.iter().map(|&t| timestep_label(t)))
        .y_tick_labels(expert_labels(d.experts))
        .cell(cell_w, 12)
        .mark_col(current)
}

/// The most-chosen expert at each patch position of `layer` over the run, on the patch grid.
pub fn patch_figure(traj: &RoutingTrajectory, layer: usize) -> Result<Heatmap> {
    let d = traj.dims();
    let cell = (192 / d.grid.max(1) as u32).clamp(4, 24);
    Ok(Heatmap::experts(&top_expert_by_patch(traj, layer), d.grid, d.grid, d.experts)?
        .title(format!("layer {layer}"))
        .labels("patch column", "patch row")
        .x_tick_labels((0..d.grid).map(|c| c.to_string()))
        .y_tick_labels((0..d.grid).map(|r| r.to_string()))
        .cell(cell, cell))
}

/// The fraction of `layer`'s selections each expert got per class: classes x experts,
/// min-max normalised per panel (official `heatmap_class.py` lets `imshow` do the same).
pub fn class_figure(traj: &RoutingTrajectory, layer: usize) -> Heatmap {
    let (classes, m) = load_by_class(traj, layer);
    Heatmap::values(&m, Scale::MinMax)
        .title(format!("layer {layer}"))
        .labels("expert", "class")
        .x_tick_labels(expert_labels(traj.dims().experts))
        .y_tick_labels(classes.iter().map(|&c| traj.meta.class_name(c)))
        .cell(24, 12)
}

/// Entropy (bits) of the expert load of every layer (rows) at every evaluation (columns), on
/// the fixed scale 0..log2(E) so runs compare.
pub fn entropy_figure(traj: &RoutingTrajectory) -> Heatmap {
    let d = traj.dims();
    let cell_w = (480 / d.steps.max(1) as u32).clamp(2, 16);
    Heatmap::values(&load_entropy(traj).transposed(), Scale::Range(0.0, (d.experts as f64).log2()))
        .title("expert-load entropy (bits)")
        .labels("timestep", "layer")
        .x_tick_labels(traj.meta.timesteps.iter().map(|&t| timestep_label(t)))
        .y_tick_labels((0..d.layers).map(|l| l.to_string()))
        .cell(cell_w, 14)
}

/// A language model's expert load: one row per MoE layer, one column per expert, the share of
/// the layer's routed slots (`ditmoe lm eval --heatmap`), on a 0..2/E scale so a balanced layer
/// sits mid-scale and layers compare. Layers may differ in expert count (a pyramid): the map
/// is as wide as the widest, shorter rows padded with 0.
pub fn expert_load_figure(layers: &[usize], load: &[Vec<f64>]) -> Result<Heatmap> {
    let width = load.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 || layers.len() != load.len() {
        candle_core::bail!("expert load: {} layers with {} load rows", layers.len(), load.len())
    }
    let rows: Vec<Vec<f64>> = load.iter().map(|r| (0..width).map(|e| r.get(e).copied().unwrap_or(0.0)).collect()).collect();
    let m = super::Matrix::from_rows(&rows)?;
    Ok(Heatmap::values(&m, Scale::Range(0.0, 2.0 / width as f64))
        .title("expert load (share of routed slots)")
        .labels("expert", "layer")
        .x_tick_labels((0..width).map(|e| e.to_string()))
        .y_tick_labels(layers.iter().map(|l| l.to_string()))
        .cell(28, 28))
}
