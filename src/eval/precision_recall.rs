//! Precision and recall of a generated set in a feature space, by k-nearest-neighbour
//! manifolds: Kynkäänniemi, Karras, Laine, Lehtinen and Aila 2019, *Improved Precision and
//! Recall Metric for Assessing Generative Models* (NeurIPS; official code
//! `kynkaat/improved-precision-and-recall-metric`).
//!
//! The Fréchet distance folds two failures into one number: samples that look unlike any real
//! image (low fidelity) and a generator that covers only part of the data (low diversity, e.g.
//! what a high guidance scale does). The paper separates them. Each set's manifold is the union
//! of balls around its feature vectors, each ball's radius the distance to that vector's k-th
//! nearest neighbour in its own set. *Precision* is the fraction of generated samples inside
//! the real manifold; *recall* the fraction of real samples inside the generated manifold. The
//! paper uses k = 3 ([`DEFAULT_K`]) and sets of equal size, since the radii shrink as a set
//! grows.
use candle_core::{bail, DType, Result, Tensor};
use serde::Serialize;

/// The paper's neighbourhood size.
pub const DEFAULT_K: usize = 3;

/// Rows of the distance matrix computed at a time (bounds memory to `ROWS × n` f64s).
const ROWS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrecisionRecall {
    /// Fraction of generated samples within the k-NN manifold of the real set.
    pub precision: f64,
    /// Fraction of real samples within the k-NN manifold of the generated set.
    pub recall: f64,
    pub k: usize,
}

/// Squared Euclidean distances between every row of `a` (m, D) and every row of `b` (n, D),
/// in f64, row by row through `f(i, distances to b)`. |a|² + |b|² − 2 a·b, clamped at 0
/// against round-off.
fn for_each_distance_row(a: &Tensor, b: &Tensor, f: &mut dyn FnMut(usize, &[f64])) -> Result<()> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let b_norm = b.sqr()?.sum(1)?.unsqueeze(0)?;
    let bt = b.t()?.contiguous()?;
    let m = a.dim(0)?;
    for start in (0..m).step_by(ROWS) {
        let ab = a.narrow(0, start, ROWS.min(m - start))?;
        let a_norm = ab.sqr()?.sum_keepdim(1)?;
        let d2 = a_norm.broadcast_add(&b_norm)?.broadcast_sub(&(ab.matmul(&bt)? * 2.0)?)?.relu()?;
        for (i, row) in d2.to_vec2::<f64>()?.iter().enumerate() {
            f(start + i, row);
        }
    }
    Ok(())
}

/// Squared k-NN radius of every row of `x`: the squared distance to its k-th nearest other row
/// (the row itself, at distance 0, is not a neighbour; the official code takes the (k+1)-th
/// smallest distance including it).
pub fn knn_radii(x: &Tensor, k: usize) -> Result<Vec<f64>> {
    let n = x.dim(0)?;
    if k == 0 || n <= k {
        bail!("k-NN radii need more than k = {k} feature vectors, got {n}");
    }
    let mut radii = vec![0.0; n];
    for_each_distance_row(x, x, &mut |i, row| {
        let mut row = row.to_vec();
        row[i] = f64::INFINITY;
        let (_, kth, _) = row.select_nth_unstable_by(k - 1, f64::total_cmp);
        radii[i] = *kth;
    })?;
    Ok(radii)
}

/// Fraction of rows of `query` that lie within some ball of the manifold of `support`
/// (rows `support`, squared radii `radii`).
fn coverage(query: &Tensor, support: &Tensor, radii: &[f64]) -> Result<f64> {
    let mut inside = 0usize;
    for_each_distance_row(query, support, &mut |_, row| {
        inside += usize::from(row.iter().zip(radii).any(|(d, r)| d <= r));
    })?;
    Ok(inside as f64 / query.dim(0)? as f64)
}

/// Precision and recall of `generated` (N, D) against `real` (M, D) with k-NN manifolds of
/// neighbourhood size `k`. Both sets need more than k rows.
pub fn precision_recall(real: &Tensor, generated: &Tensor, k: usize) -> Result<PrecisionRecall> {
    if real.dim(1)? != generated.dim(1)? {
        bail!("precision/recall: real features are {}-d, generated {}-d", real.dim(1)?, generated.dim(1)?);
    }
    let real_radii = knn_radii(real, k)?;
    let gen_radii = knn_radii(generated, k)?;
    Ok(PrecisionRecall { precision: coverage(generated, real, &real_radii)?, recall: coverage(real, generated, &gen_radii)?, k })
}
