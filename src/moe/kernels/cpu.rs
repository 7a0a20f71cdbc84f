//! CPU reference implementations of the fused MoE kernels (same semantics as `kernels/*.cu`).
//!
//! These are what the public functions in [`super`] run on the CPU, and the oracles the GPU
//! checks compare against. They favour clarity over speed, except the GEMMs, which use candle's
//! CPU matmul per expert.
use super::{Gating, Permutation};
use candle_core::{bail, DType, Device, Result, Tensor};

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// See [`super::fused_topk_gating`].
pub fn fused_topk_gating(logits: &Tensor, k: usize) -> Result<Gating> {
    let (s, e) = logits.dims2()?;
    if k == 0 || k > e {
        bail!("fused_topk_gating: need 1 <= k <= E, got k={k}, E={e}")
    }
    let x = f32_vec(logits)?;
    let mut ids = Vec::with_capacity(s * k);
    let mut weights = Vec::with_capacity(s * k);
    let mut scores = vec![0f32; s * e];
    let mut counts = vec![0u32; e];
    let mut sums = vec![0f64; e];
    let mut taken = vec![false; e];
    for t in 0..s {
        let row = &x[t * e..(t + 1) * e];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let p = &mut scores[t * e..(t + 1) * e];
        let mut sum = 0f32;
        for (pi, &v) in p.iter_mut().zip(row) {
            *pi = (v - m).exp();
            sum += *pi;
        }
        let inv = 1.0 / sum;
        for (i, pi) in p.iter_mut().enumerate() {
            *pi *= inv;
            sums[i] += *pi as f64;
        }
        taken.iter_mut().for_each(|b| *b = false);
        for _ in 0..k {
            let mut best: Option<(f32, usize)> = None;
            for (i, &v) in row.iter().enumerate() {
                if taken[i] {
                    continue;
                }
                let key = if v.is_nan() { f32::NEG_INFINITY } else { v };
                // keys are never NaN: a later expert replaces the best only when strictly larger,
                // so ties keep the lower id
                if best.is_none_or(|(bv, _)| key > bv) {
                    best = Some((key, i));
                }
            }
            let (_, i) = best.expect("k <= E");
            taken[i] = true;
            counts[i] += 1;
            ids.push(i as u32);
            weights.push(p[i]);
        }
    }
    let dev = Device::Cpu;
    let mean: Vec<f32> = sums
        .iter()
        .map(|&v| if s == 0 { 0.0 } else { (v / s as f64) as f32 })
        .collect();
    Ok(Gating {
        ids: Tensor::from_vec(ids, (s, k), &dev)?,
        weights: Tensor::from_vec(weights, (s, k), &dev)?,
        scores: Tensor::from_vec(scores, (s, e), &dev)?,
        expert_counts: Tensor::from_vec(counts, e, &dev)?,
        mean_scores: Tensor::from_vec(mean, e, &dev)?,
    })
}

/// See [`super::permute_by_expert`].
pub fn permute_by_expert(ids: &Tensor, n_experts: usize) -> Result<Permutation> {
    let (s, k) = ids.dims2()?;
    let ids: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    let n = s * k;
    let mut counts = vec![0u32; n_experts];
    for &e in &ids {
        if e as usize >= n_experts {
            bail!("permute_by_expert: expert id {e} >= E = {n_experts}")
        }
        counts[e as usize] += 1;
    }
    let mut offsets = vec![0u32; n_experts + 1];
    for e in 0..n_experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut cursor = offsets[..n_experts].to_vec();
    let mut order = vec![0u32; n];
    let mut inv = vec![0u32; n];
    for (p, &e) in ids.iter().enumerate() {
        let pos = cursor[e as usize];
        cursor[e as usize] += 1;
        order[pos as usize] = p as u32;
        inv[p] = pos;
    }
    let dev = Device::Cpu;
    Ok(Permutation {
        order: Tensor::from_vec(order, n, &dev)?,
        inv: Tensor::from_vec(inv, n, &dev)?,
        offsets: Tensor::from_vec(offsets, n_experts + 1, &dev)?,
        k,
        n_experts,
    })
}

/// See [`super::gather_rows`].
pub fn gather_rows(x: &Tensor, perm: &Permutation) -> Result<Tensor> {
    let order: Vec<u32> = perm.order.to_vec1()?;
    let tok: Vec<u32> = order.iter().map(|&p| p / perm.k as u32).collect();
    let n = tok.len();
    x.index_select(&Tensor::from_vec(tok, n, x.device())?, 0)
}

/// See [`super::gather_rows_scaled`].
pub fn gather_rows_scaled(dout: &Tensor, perm: &Permutation, weights: &Tensor) -> Result<Tensor> {
    let (g, w, d) = (f32_vec(dout)?, f32_vec(weights)?, dout.dim(1)?);
    let order: Vec<u32> = perm.order.to_vec1()?;
    let mut out = Vec::with_capacity(order.len() * d);
    for &slot in &order {
        let t = slot as usize / perm.k;
        out.extend(g[t * d..(t + 1) * d].iter().map(|&v| v * w[slot as usize]));
    }
    Tensor::from_vec(out, (order.len(), d), &Device::Cpu)
}

/// See [`super::combine_weight_grad`]. Each dot product summed in column order.
pub fn combine_weight_grad(dout: &Tensor, expert_out: &Tensor, perm: &Permutation) -> Result<Tensor> {
    let (g, y, d) = (f32_vec(dout)?, f32_vec(expert_out)?, dout.dim(1)?);
    let order: Vec<u32> = perm.order.to_vec1()?;
    let mut dw = vec![0f32; order.len()];
    for (r, &slot) in order.iter().enumerate() {
        let t = slot as usize / perm.k;
        dw[slot as usize] = g[t * d..(t + 1) * d].iter().zip(&y[r * d..(r + 1) * d]).map(|(a, b)| a * b).sum();
    }
    Tensor::from_vec(dw, (order.len() / perm.k.max(1), perm.k), &Device::Cpu)
}

/// See [`super::combine`]. f32 fused multiply-adds in slot order, like the CUDA kernel.
pub fn combine(expert_out: &Tensor, perm: &Permutation, weights: &Tensor, add: Option<&Tensor>) -> Result<Tensor> {
    // shapes checked by `super::combine`
    let (r, d) = expert_out.dims2()?;
    let k = perm.k;
    let s = r / k.max(1);
    let y = f32_vec(expert_out)?;
    let w = f32_vec(weights)?;
    let inv: Vec<u32> = perm.inv.to_vec1()?;
    let mut out = match add {
        Some(a) => f32_vec(a)?,
        None => vec![0f32; s * d],
    };
    for t in 0..s {
        let o = &mut out[t * d..(t + 1) * d];
        for j in 0..k {
            let wj = w[t * k + j];
            let row = inv[t * k + j] as usize;
            let yr = &y[row * d..(row + 1) * d];
            for (oc, &yc) in o.iter_mut().zip(yr) {
                *oc = wj.mul_add(yc, *oc);
            }
        }
    }
    Tensor::from_vec(out, (s, d), &Device::Cpu)?.to_dtype(expert_out.dtype())
}

/// SwiGLU of one expert in f32 with the hidden state rounded once to `dtype`, as the kernels do.
fn swiglu_one(xe: &Tensor, g: &Tensor, u: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
    let xe = xe.to_dtype(DType::F32)?;
    let a = xe.matmul(&g.to_dtype(DType::F32)?.t()?)?;
    let out = match u {
        Some(u) => {
            let b = xe.matmul(&u.to_dtype(DType::F32)?.t()?)?;
            (a.silu()? * b)?
        }
        None => a,
    };
    out.to_dtype(dtype)
}

/// See [`super::grouped_matmul`] / [`super::grouped_gate_up`]: `b1 = None` is the plain GEMM,
/// `Some(w_up)` the SwiGLU gate/up projection. With `gather`, row `r` of the input is
/// `x[order[r] / k]`.
pub fn grouped_gemm(
    x: &Tensor,
    gather: Option<&Permutation>,
    offsets: &Tensor,
    b0: &Tensor,
    b1: Option<&Tensor>,
) -> Result<Tensor> {
    let x = match gather {
        Some(p) => gather_rows(x, p)?,
        None => x.clone(),
    };
    // K and the gate/up shapes are checked by `super::grouped_dispatch`
    let (r, _) = x.dims2()?;
    let (e, n, _) = b0.dims3()?;
    let off: Vec<u32> = offsets.to_dtype(DType::U32)?.to_vec1()?;
    if off.len() != e + 1
        || off[0] != 0
        || off[e] as usize != r
        || off.windows(2).any(|w| w[1] < w[0])
    {
        bail!(
            "grouped_gemm: offsets {:?} are not a partition of {r} rows into {e} experts",
            off
        )
    }
    let mut parts = Vec::new();
    for ex in 0..e {
        let (a, c) = (off[ex] as usize, (off[ex + 1] - off[ex]) as usize);
        if c == 0 {
            continue;
        }
        let xe = x.narrow(0, a, c)?;
        let g = b0.get(ex)?;
        let u = b1.map(|b| b.get(ex)).transpose()?;
        parts.push(swiglu_one(&xe, &g, u.as_ref(), x.dtype())?);
    }
    if parts.is_empty() {
        return Tensor::zeros((r, n), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}

/// Dense SwiGLU MLP with the kernels' rounding (see [`super::swiglu_mlp`]).
pub fn swiglu_dense(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let h = swiglu_one(x, gate, Some(up), x.dtype())?;
    swiglu_one(&h, down, None, x.dtype())
}
