//! Fréchet distance between two Gaussians fitted to feature sets (FID's formula):
//! `|mu1 - mu2|² + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1^½ S2 S1^½))`. The trace of the matrix square
//! root is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
//! `S1^½ S2 S1^½`, computed with a cyclic Jacobi eigen-solver in f64 (128×128 is small).
use candle_core::{bail, DType, Result, Tensor};

/// Mean and covariance (unbiased, as `np.cov`) of `x` (N, D).
pub fn gaussian_stats(x: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n, d) = x.dims2()?;
    if n < 2 {
        bail!("need at least 2 feature vectors, got {n}");
    }
    let v = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut mu = vec![0.0; d];
    for row in v.chunks(d) {
        mu.iter_mut().zip(row).for_each(|(m, x)| *m += x / n as f64);
    }
    let mut cov = vec![0.0; d * d];
    for row in v.chunks(d) {
        for i in 0..d {
            let ci = row[i] - mu[i];
            for j in i..d {
                cov[i * d + j] += ci * (row[j] - mu[j]);
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let c = cov[i * d + j] / (n - 1) as f64;
            cov[i * d + j] = c;
            cov[j * d + i] = c;
        }
    }
    Ok((mu, cov))
}

/// Eigen-decomposition of a symmetric matrix: (eigenvalues, eigenvectors as columns).
fn jacobi_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; d * d];
    (0..d).for_each(|i| v[i * d + i] = 1.0);
    for _sweep in 0..100 {
        let off: f64 = (0..d).flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i * d + j].powi(2)).sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                c[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    c
}

/// Symmetric PSD square root via the eigen-decomposition (negative round-off clamped to 0).
fn sqrtm_psd(a: &[f64], d: usize) -> Vec<f64> {
    let (w, v) = jacobi_eigen(a, d);
    let mut vs = v.clone();
    for i in 0..d {
        for j in 0..d {
            vs[i * d + j] *= w[j].max(0.0).sqrt();
        }
    }
    let vt: Vec<f64> = (0..d * d).map(|k| v[(k % d) * d + k / d]).collect();
    matmul(&vs, &vt, d)
}

/// The Fréchet distance between N(mu1, s1) and N(mu2, s2) (d-dimensional, row-major covariances).
pub fn frechet_distance(mu1: &[f64], s1: &[f64], mu2: &[f64], s2: &[f64]) -> f64 {
    let d = mu1.len();
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b).powi(2)).sum();
    let r1 = sqrtm_psd(s1, d);
    let m = matmul(&matmul(&r1, s2, d), &r1, d);
    let (w, _) = jacobi_eigen(&m, d);
    let tr_sqrt: f64 = w.iter().map(|x| x.max(0.0).sqrt()).sum();
    let tr = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    diff + tr(s1) + tr(s2) - 2.0 * tr_sqrt
}

/// The Fréchet distance between Gaussians fitted to the feature sets `a` (N, D) and `b` (M, D).
pub fn frechet_between(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (mu_a, s_a) = gaussian_stats(a)?;
    let (mu_b, s_b) = gaussian_stats(b)?;
    Ok(frechet_distance(&mu_a, &s_a, &mu_b, &s_b))
}

/// The rows of `x` whose label is `class`.
pub fn rows_of_class(x: &Tensor, labels: &[u32], class: u32) -> Result<Tensor> {
    let idx: Vec<u32> = (0..labels.len() as u32).filter(|&i| labels[i as usize] == class).collect();
    x.index_select(&Tensor::new(idx, x.device())?, 0)
}

/// Per-class Fréchet distance: `out[c]` compares the rows of `a` labelled c with the rows of
/// `b` labelled c. A class-conditional model can reach a fair overall distance while one
/// class is poor (its samples standing in for another class's); the overall Gaussian mixes
/// the classes and hides it. Every class needs at least 2 rows on each side.
pub fn per_class_frechet(a: &Tensor, a_labels: &[u32], b: &Tensor, b_labels: &[u32], num_classes: usize) -> Result<Vec<f64>> {
    (0..num_classes as u32)
        .map(|c| {
            let (xa, xb) = (rows_of_class(a, a_labels, c)?, rows_of_class(b, b_labels, c)?);
            if xa.dim(0)? < 2 || xb.dim(0)? < 2 {
                bail!("per-class Fréchet distance: class {c} has {} and {} feature vectors, needs at least 2 on each side", xa.dim(0)?, xb.dim(0)?);
            }
            frechet_between(&xa, &xb)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_gaussians_closed_form() {
        // FD of diagonal Gaussians = |dmu|² + sum (sqrt(a) - sqrt(b))².
        let (a, b) = ([4.0, 1.0, 9.0], [1.0, 1.0, 4.0]);
        let diag = |v: &[f64; 3]| {
            let mut m = vec![0.0; 9];
            (0..3).for_each(|i| m[i * 3 + i] = v[i]);
            m
        };
        let fd = frechet_distance(&[0.0, 1.0, 0.0], &diag(&a), &[0.0, 0.0, 2.0], &diag(&b));
        let want = (1.0 + 4.0) + (1.0 + 0.0 + 1.0);
        assert!((fd - want).abs() < 1e-9, "{fd} vs {want}");
    }

    #[test]
    fn identical_full_covariances_are_zero() {
        let s = vec![2.0, 0.5, 0.1, 0.5, 1.0, 0.3, 0.1, 0.3, 1.5];
        let mu = [0.3, -0.2, 1.0];
        assert!(frechet_distance(&mu, &s, &mu, &s).abs() < 1e-9);
    }
}
