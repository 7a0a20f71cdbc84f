//! The official analysis views (`analysis/heatmap_step.py`, `heatmap_patch.py`,
//! `heatmap_class.py`) as functions of a [`RoutingTrajectory`]: how often each expert is
//! chosen, per timestep, per patch position and per class, counting every top-k slot as the
//! official scripts do, plus the entropy of those distributions.
use super::{Matrix, RoutingTrajectory};

/// Selections of each expert at each evaluation of `layer`, summed over images and tokens:
/// (steps x experts). Official `heatmap_step.py` (there min-max normalised for display).
pub fn load_by_step(traj: &RoutingTrajectory, layer: usize) -> Matrix {
    count_selections(traj, layer, traj.dims().steps, |_, s, _| s)
}

/// Selections of each expert at each patch position of `layer`, summed over images and
/// evaluations: (tokens x experts), tokens row-major over the patch grid. Official
/// `heatmap_patch.py`.
pub fn load_by_patch(traj: &RoutingTrajectory, layer: usize) -> Matrix {
    count_selections(traj, layer, traj.dims().tokens, |_, _, t| t)
}

/// Every top-k selection of `layer` counted into row `row(image, step, token)`: (rows x experts).
fn count_selections(traj: &RoutingTrajectory, layer: usize, rows: usize, row: impl Fn(usize, usize, usize) -> usize) -> Matrix {
    let d = traj.dims();
    let mut m = Matrix::zeros(rows, d.experts);
    for n in 0..d.images {
        for s in 0..d.steps {
            for t in 0..d.tokens {
                let r = row(n, s, t);
                traj.token_experts(n, s, layer, t).iter().for_each(|&e| m.add(r, e as usize, 1.0));
            }
        }
    }
    m
}

/// The expert chosen most often at each patch position of `layer` over the whole run (ties
/// to the lowest id): a (grid x grid) map, row-major, of [`load_by_patch`]'s argmax.
pub fn top_expert_by_patch(traj: &RoutingTrajectory, layer: usize) -> Vec<usize> {
    load_by_patch(traj, layer).argmax_rows()
}

/// Each token's first-choice expert at evaluation `step` of `layer` for image `image`:
/// what the explorer colours the patch grid with.
pub fn first_choice(traj: &RoutingTrajectory, image: usize, step: usize, layer: usize) -> Vec<usize> {
    (0..traj.dims().tokens).map(|t| traj.token_experts(image, step, layer, t)[0] as usize).collect()
}

/// Fraction of `layer`'s selections each expert got, per class of the run: (classes x
/// experts), rows in [`RoutingTrajectory::classes`] order. Official `heatmap_class.py`
/// plots the raw counts; fractions keep classes with different image counts comparable.
pub fn load_by_class(traj: &RoutingTrajectory, layer: usize) -> (Vec<usize>, Matrix) {
    let classes = traj.classes();
    let rows: Vec<usize> = traj.meta.classes.iter().map(|c| classes.binary_search(c).expect("the run's own class")).collect();
    let m = count_selections(traj, layer, classes.len(), |n, _, _| rows[n]);
    (classes, m.row_normalized())
}

/// Shannon entropy in bits of a distribution given by non-negative weights (normalised here);
/// 0 for an empty or all-zero one. log2(E) means perfectly balanced over E experts.
pub fn entropy_bits(weights: &[f64]) -> f64 {
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return 0.0;
    }
    -weights.iter().filter(|&&w| w > 0.0).map(|&w| w / sum * (w / sum).log2()).sum::<f64>()
}

/// Entropy (bits) of the expert-load distribution of every (evaluation, layer): (steps x
/// layers). Low = a few experts take the step's tokens; log2(E) = perfectly balanced.
pub fn load_entropy(traj: &RoutingTrajectory) -> Matrix {
    let d = traj.dims();
    let mut m = Matrix::zeros(d.steps, d.layers);
    for l in 0..d.layers {
        let load = load_by_step(traj, l);
        for s in 0..d.steps {
            m.add(s, l, entropy_bits(load.row(s)));
        }
    }
    m
}
