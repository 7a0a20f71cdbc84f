//! CPU checks of the fused-MoE kernel references (`ditmoe::moe::kernels`) against plain candle
//! computations: softmax + sort top-k, stable counting sort, per-expert index_select / matmul /
//! index_add loops. The CUDA kernels are checked against these references by
//! `tests/gpu.rs` on a GPU machine (and by the `cuda`-only test at the end).
use crate::common;

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use common::{max_abs, rel_l2 as rel};
use ditmoe::moe::kernels::{self as kx, cpu, ExpertWeights, SwigluWeights};

/// The default grouped-GEMM selection (the CPU references ignore it).
const GEMM: kx::GemmConfig = kx::GemmConfig::DEFAULT;



struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as u32) % n
    }
}

/// `[S, k]` ids with distinct experts per token, drawn by `pick`.
fn ids_from(
    s: usize,
    k: usize,
    e: usize,
    rng: &mut Lcg,
    pick: impl Fn(&mut Lcg) -> u32,
) -> Result<Tensor> {
    let mut v = Vec::new();
    for _ in 0..s {
        let mut row: Vec<u32> = Vec::new();
        let mut tries = 0;
        while row.len() < k {
            let c = if tries < 50 {
                pick(rng) % e as u32
            } else {
                rng.below(e as u32)
            };
            if !row.contains(&c) {
                row.push(c);
            }
            tries += 1;
        }
        v.extend(row);
    }
    Tensor::from_vec(v, (s, k), &Device::Cpu)
}

#[test]
fn gating_matches_softmax_and_sorted_topk() -> Result<()> {
    let dev = Device::Cpu;
    for &(s, e, k) in &[
        (300usize, 8usize, 2usize),
        (64, 16, 2),
        (17, 64, 4),
        (5, 3, 3),
        (1, 8, 1),
    ] {
        let logits = Tensor::randn(0f32, 2.0, (s, e), &dev)?;
        let g = kx::fused_topk_gating(&logits, k)?;
        let scores = candle_nn::ops::softmax_last_dim(&logits)?;
        assert!(max_abs(&g.scores, &scores) < 1e-6, "softmax");
        let sorted = scores
            .arg_sort_last_dim(false)?
            .narrow(1, 0, k)?
            .contiguous()?;
        assert_eq!(
            g.ids.to_vec2::<u32>()?,
            sorted.to_vec2::<u32>()?,
            "top-k ids S={s} E={e} k={k}"
        );
        let w = scores.gather(&sorted, 1)?;
        assert!(max_abs(&g.weights, &w) < 1e-6, "top-k weights");
        // counts: one-hot of the ids summed over tokens; mean scores: scores.mean(0)
        let mut counts = vec![0u32; e];
        for id in sorted.flatten_all()?.to_vec1::<u32>()? {
            counts[id as usize] += 1;
        }
        assert_eq!(g.expert_counts.to_vec1::<u32>()?, counts);
        assert!(
            max_abs(&g.mean_scores, &scores.mean(0)?) < 1e-6,
            "mean scores"
        );
        // the balance loss equals the official formula
        let ce = (Tensor::new(
            counts
                .iter()
                .map(|&c| c as f32)
                .collect::<Vec<_>>()
                .as_slice(),
            &dev,
        )? / (s * k) as f64)?;
        let official =
            ((scores.mean(0)? * (ce * e as f64)?)?.sum_all()? * 0.01)?.to_scalar::<f32>()?;
        let routing = ditmoe::moe::Routing { experts: g.ids.clone(), weights: g.weights.clone(), scores: g.scores.clone(), logits: logits.clone() };
        let ours = ditmoe::moe::balance_loss(&routing, s, 0.01, ditmoe::moe::BalanceForm::Batch)?.to_scalar::<f32>()?;
        assert!(
            (official - ours).abs() <= 1e-6 * official.abs().max(1.0),
            "balance loss {ours} vs {official}"
        );
    }
    Ok(())
}

#[test]
fn gating_ties_go_to_the_lower_id_and_bf16_logits_work() -> Result<()> {
    let dev = Device::Cpu;
    let logits = Tensor::new(
        &[
            [1f32, 3.0, 3.0, 0.5],
            [2.0, 2.0, 2.0, 2.0],
            [f32::NAN, 1.0, 0.0, 1.0],
        ],
        &dev,
    )?;
    let g = kx::fused_topk_gating(&logits, 2)?;
    assert_eq!(
        g.ids.to_vec2::<u32>()?,
        vec![vec![1, 2], vec![0, 1], vec![1, 3]]
    );
    let w = g.weights.to_vec2::<f32>()?;
    assert!((w[1][0] - 0.25).abs() < 1e-7 && (w[1][1] - 0.25).abs() < 1e-7);
    // bf16 logits: softmax in f32 of the exact bf16 values
    let l = Tensor::randn(0f32, 1.0, (40, 8), &dev)?.to_dtype(DType::BF16)?;
    let a = kx::fused_topk_gating(&l, 2)?;
    let b = kx::fused_topk_gating(&l.to_dtype(DType::F32)?, 2)?;
    assert_eq!(a.ids.to_vec2::<u32>()?, b.ids.to_vec2::<u32>()?);
    assert_eq!(max_abs(&a.scores, &b.scores), 0.0);
    Ok(())
}

fn check_permutation(ids: &Tensor, e: usize) -> Result<kx::Permutation> {
    let p = kx::permute_by_expert(ids, e)?;
    let flat = ids.flatten_all()?.to_vec1::<u32>()?;
    let order = p.order.to_vec1::<u32>()?;
    let inv = p.inv.to_vec1::<u32>()?;
    let off = p.offsets.to_vec1::<u32>()?;
    let n = flat.len();
    assert_eq!(off.len(), e + 1);
    assert_eq!(off[0], 0);
    assert_eq!(off[e] as usize, n);
    for ex in 0..e {
        let c = flat.iter().filter(|&&v| v as usize == ex).count();
        assert_eq!((off[ex + 1] - off[ex]) as usize, c, "count of expert {ex}");
        let seg = &order[off[ex] as usize..off[ex + 1] as usize];
        assert!(
            seg.iter().all(|&q| flat[q as usize] as usize == ex),
            "rows of expert {ex}"
        );
        assert!(
            seg.windows(2).all(|w| w[0] < w[1]),
            "stable: slots ascending within expert {ex}"
        );
    }
    for (pos, &q) in order.iter().enumerate() {
        assert_eq!(inv[q as usize] as usize, pos, "inv is the inverse of order");
    }
    Ok(p)
}

#[test]
fn permutation_is_a_stable_counting_sort() -> Result<()> {
    let mut rng = Lcg(7);
    // uniform, zero-token experts, everything on one expert, single token, many experts
    check_permutation(&ids_from(1000, 2, 8, &mut rng, |r| r.below(8))?, 8)?;
    let p = check_permutation(
        &ids_from(500, 2, 16, &mut rng, |r| {
            if r.below(10) < 8 {
                1
            } else {
                2 + r.below(2)
            }
        })?,
        16,
    )?;
    let off = p.offsets.to_vec1::<u32>()?;
    assert!(
        off.windows(2).filter(|w| w[0] == w[1]).count() >= 12,
        "zero-token experts present"
    );
    let p = check_permutation(&ids_from(300, 1, 8, &mut rng, |_| 5)?, 8)?;
    assert_eq!(
        p.offsets.to_vec1::<u32>()?,
        vec![0, 0, 0, 0, 0, 0, 300, 300, 300]
    );
    check_permutation(&ids_from(1, 1, 4, &mut rng, |r| r.below(4))?, 4)?;
    check_permutation(&ids_from(700, 4, 1024, &mut rng, |r| r.below(1024))?, 1024)?;
    // the slow oracle: a stable sort of slot indices by expert id
    let ids = ids_from(257, 2, 8, &mut rng, |r| r.below(8))?;
    let flat = ids.flatten_all()?.to_vec1::<u32>()?;
    let mut want: Vec<u32> = (0..flat.len() as u32).collect();
    want.sort_by_key(|&q| flat[q as usize]);
    assert_eq!(
        kx::permute_by_expert(&ids, 8)?.order.to_vec1::<u32>()?,
        want
    );
    assert!(kx::permute_by_expert(&Tensor::new(&[[9u32]], &Device::Cpu)?, 8).is_err());
    Ok(())
}

/// The token of each expert-contiguous row (`order[r] / k`).
fn row_tokens(p: &kx::Permutation) -> Result<Vec<u32>> {
    Ok(p.order.to_vec1::<u32>()?.iter().map(|&q| q / p.k as u32).collect())
}

/// The combine as index ops: `base` plus the rows of `y` scaled by their slot's weight, added at
/// their tokens (`index_add`); differentiable in `y` and `w`.
fn index_combine(base: &Tensor, y: &Tensor, p: &kx::Permutation, w: &Tensor) -> Result<Tensor> {
    let w_rows = w.flatten_all()?.index_select(&p.order, 0)?.unsqueeze(1)?;
    base.index_add(&Tensor::new(row_tokens(p)?.as_slice(), y.device())?, &y.broadcast_mul(&w_rows)?, 0)
}

#[test]
fn gather_and_combine_match_index_ops() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Lcg(11);
    let (s, k, d, e) = (123usize, 2usize, 40usize, 6usize);
    let ids = ids_from(s, k, e, &mut rng, |r| r.below(e as u32))?;
    let p = kx::permute_by_expert(&ids, e)?;
    let x = Tensor::randn(0f32, 1.0, (s, d), &dev)?;
    let xr = kx::gather_rows(&x, &p)?;
    let want = x.index_select(&Tensor::new(row_tokens(&p)?.as_slice(), &dev)?, 0)?;
    assert_eq!(max_abs(&xr, &want), 0.0);
    // combine == scatter back with index_add of weighted rows
    let y = Tensor::randn(0f32, 1.0, (s * k, d), &dev)?;
    let w = Tensor::rand(0f32, 1.0, (s, k), &dev)?;
    let add = Tensor::randn(0f32, 1.0, (s, d), &dev)?;
    let out = kx::combine(&y, &p, &w, Some(&add))?;
    let want = index_combine(&add, &y, &p, &w)?;
    assert!(max_abs(&out, &want) < 1e-5);
    // deterministic: bit-identical on repeat, and the same in bf16 through the f32 path
    assert_eq!(max_abs(&out, &kx::combine(&y, &p, &w, Some(&add))?), 0.0);
    let yb = y.to_dtype(DType::BF16)?;
    let ob = kx::combine(&yb, &p, &w, None)?;
    assert_eq!(ob.dtype(), DType::BF16);
    let of = kx::combine(&yb.to_dtype(DType::F32)?, &p, &w, None)?;
    assert_eq!(max_abs(&ob, &of.to_dtype(DType::BF16)?), 0.0);
    // rows that do not match the permutation are refused (the CUDA kernels would read past them)
    let short = x.narrow(0, 0, s - 1)?;
    let err = kx::gather_rows(&short, &p).unwrap_err().to_string();
    assert!(err.contains("x has 122 rows") && err.contains("123 tokens"), "{err}");
    let w3 = Tensor::zeros((e, 8, d), DType::F32, &dev)?;
    assert!(kx::grouped_gate_up_gather(&short, &p, &w3, &w3, &GEMM).unwrap_err().to_string().contains("x has 122 rows"));
    let err = kx::combine(&y.narrow(0, 0, s * k - 2)?, &p, &w, None).unwrap_err().to_string();
    assert!(err.contains("expert_out has 244 rows") && err.contains("246 slots"), "{err}");
    Ok(())
}

/// The combine's gradients (training) against autograd through the composite combine: rows of
/// `dout` scaled per slot towards the expert outputs, dot products towards the weights.
#[test]
fn combine_gradients_match_autograd() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Lcg(5);
    let (s, k, d, e) = (97usize, 2usize, 24usize, 5usize);
    let ids = ids_from(s, k, e, &mut rng, |r| r.below(e as u32))?;
    let p = kx::permute_by_expert(&ids, e)?;
    let y0 = Tensor::randn(0f32, 1.0, (s * k, d), &dev)?;
    let w0 = Tensor::rand(0f32, 1.0, (s, k), &dev)?;
    let dout = Tensor::randn(0f32, 1.0, (s, d), &dev)?;
    // composite combine: index_add of the weighted rows, differentiable in both
    let (y, w) = (candle_core::Var::from_tensor(&y0)?, candle_core::Var::from_tensor(&w0)?);
    let out = index_combine(&Tensor::zeros((s, d), DType::F32, &dev)?, y.as_tensor(), &p, w.as_tensor())?;
    let g = (&out * &dout)?.sum_all()?.backward()?;
    let (dy_ref, dw_ref) = (g.get(y.as_tensor()).unwrap(), g.get(w.as_tensor()).unwrap());
    let dy = kx::gather_rows_scaled(&dout, &p, &w0)?;
    let dw = kx::combine_weight_grad(&dout, &y0, &p)?;
    assert_eq!(dw.dims(), [s, k]);
    assert_eq!(max_abs(&dy, dy_ref), 0.0, "the same product as the composite");
    assert!(rel(&dw, dw_ref) < 1e-6, "dw rel {}", rel(&dw, dw_ref));
    // bf16 rows: the same f32 maths on the rounded inputs, rounded once (dy) or kept in f32 (dw)
    let (dout16, y16) = (dout.to_dtype(DType::BF16)?, y0.to_dtype(DType::BF16)?);
    let dy16 = kx::gather_rows_scaled(&dout16, &p, &w0)?;
    assert_eq!(dy16.dtype(), DType::BF16);
    let dy16_ref = kx::gather_rows_scaled(&dout16.to_dtype(DType::F32)?, &p, &w0)?.to_dtype(DType::BF16)?;
    assert_eq!(max_abs(&dy16, &dy16_ref), 0.0, "bf16 dy is the f32 product rounded once");
    let dw16 = kx::combine_weight_grad(&dout16, &y16, &p)?;
    let dw16_ref = kx::combine_weight_grad(&dout16.to_dtype(DType::F32)?, &y16.to_dtype(DType::F32)?, &p)?;
    assert_eq!((dw16.dtype(), max_abs(&dw16, &dw16_ref)), (DType::F32, 0.0), "bf16 dw sums in f32");
    // mixed or other dtypes, and shapes that do not fit the permutation, are refused
    let err = kx::gather_rows_scaled(&dout.to_dtype(DType::F16)?, &p, &w0).unwrap_err().to_string();
    assert!(err.contains("gather_rows_scaled") && err.contains("bf16"), "{err}");
    let err = kx::combine_weight_grad(&dout16, &y0, &p).unwrap_err().to_string();
    assert!(err.contains("combine_weight_grad") && err.contains("BF16, F32"), "{err}");
    let err = kx::combine_weight_grad(&dout, &y0.narrow(0, 0, s * k - 1)?, &p).unwrap_err().to_string();
    assert!(err.contains("combine_weight_grad") && err.contains("expert_out"), "{err}");
    let err = kx::gather_rows_scaled(&dout, &p, &w0.narrow(1, 0, 1)?).unwrap_err().to_string();
    assert!(err.contains("weights"), "{err}");
    Ok(())
}

/// The official moe_infer structure with candle ops, from given ids/weights.
fn naive_routed(x: &Tensor, ids: &Tensor, w: &Tensor, ex: &ExpertWeights) -> Result<Tensor> {
    let (s, k) = ids.dims2()?;
    let e = ex.gate.dim(0)?;
    let flat = ids.flatten_all()?.to_vec1::<u32>()?;
    let wflat = w.flatten_all()?;
    let mut out = x.zeros_like()?;
    for j in 0..e {
        let slots: Vec<u32> = (0..s * k)
            .filter(|&q| flat[q] as usize == j)
            .map(|q| q as u32)
            .collect();
        if slots.is_empty() {
            continue;
        }
        let tok: Vec<u32> = slots.iter().map(|&q| q / k as u32).collect();
        let tok = Tensor::new(tok.as_slice(), x.device())?;
        let xe = x.index_select(&tok, 0)?;
        let h = (xe.matmul(&ex.gate.i(j)?.t()?)?.silu()? * xe.matmul(&ex.up.i(j)?.t()?)?)?;
        let y = h.matmul(&ex.down.i(j)?.t()?)?;
        let we = wflat
            .index_select(&Tensor::new(slots.as_slice(), x.device())?, 0)?
            .unsqueeze(1)?;
        out = out.index_add(&tok, &y.broadcast_mul(&we)?, 0)?;
    }
    Ok(out)
}

fn experts(e: usize, d: usize, i: usize, dt: DType) -> Result<ExpertWeights> {
    let dev = Device::Cpu;
    let sd = 1.0 / (d as f64).sqrt();
    let si = 1.0 / (i as f64).sqrt();
    Ok(ExpertWeights {
        gate: (Tensor::randn(0f32, 1.0, (e, i, d), &dev)? * sd)?.to_dtype(dt)?,
        up: (Tensor::randn(0f32, 1.0, (e, i, d), &dev)? * sd)?.to_dtype(dt)?,
        down: (Tensor::randn(0f32, 1.0, (e, d, i), &dev)? * si)?.to_dtype(dt)?,
    })
}

#[test]
fn grouped_swiglu_matches_per_expert_loop() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Lcg(3);
    let (d, i, e) = (48usize, 64usize, 6usize);
    let ex = experts(e, d, i, DType::F32)?;
    type Pick = Box<dyn Fn(&mut Lcg) -> u32>;
    let cases: Vec<(usize, usize, Pick)> = vec![
        (200, 2, Box::new(move |r: &mut Lcg| r.below(e as u32))),
        (
            150,
            2,
            Box::new(|r: &mut Lcg| if r.below(10) < 9 { 0 } else { 4 }),
        ), // zero-token experts
        (90, 1, Box::new(|_: &mut Lcg| 2)), // all on one expert
    ];
    for (s, k, pick) in cases {
        let ids = ids_from(s, k, e, &mut rng, pick)?;
        let w = Tensor::rand(0f32, 1.0, (s, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (s, d), &dev)?;
        let p = kx::permute_by_expert(&ids, e)?;
        let xr = kx::gather_rows(&x, &p)?;
        let y1 = kx::grouped_swiglu(&xr, &p.offsets, &ex.gate, &ex.up, &ex.down, &GEMM)?;
        let y2 = kx::grouped_swiglu_gather(&x, &p, &ex.gate, &ex.up, &ex.down, &GEMM)?;
        assert_eq!(max_abs(&y1, &y2), 0.0, "fused gather == explicit gather");
        let out = kx::combine(&y1, &p, &w, None)?;
        let want = naive_routed(&x, &ids, &w, &ex)?;
        let r = rel(&out, &want);
        assert!(r < 1e-5, "S={s} k={k}: rel {r:e}");
    }
    Ok(())
}

#[test]
fn grouped_gemm_bf16_rounds_like_the_kernels() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Lcg(5);
    let (s, k, d, i, e) = (64usize, 2usize, 32usize, 48usize, 4usize);
    let ex = experts(e, d, i, DType::BF16)?;
    let ids = ids_from(s, k, e, &mut rng, |r| r.below(4))?;
    let x = Tensor::randn(0f32, 1.0, (s, d), &dev)?.to_dtype(DType::BF16)?;
    let p = kx::permute_by_expert(&ids, e)?;
    let h = kx::grouped_gate_up_gather(&x, &p, &ex.gate, &ex.up, &GEMM)?;
    assert_eq!(h.dtype(), DType::BF16);
    assert_eq!(h.dims(), &[s * k, i]);
    // f32 computation of the same bf16 values, hidden state not rounded: within bf16 rounding
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let hf = kx::grouped_gate_up_gather(&f(&x)?, &p, &f(&ex.gate)?, &f(&ex.up)?, &GEMM)?;
    assert!(rel(&h, &hf) < 1e-2);
    let y = kx::grouped_matmul(&h, &p.offsets, &ex.down, &GEMM)?;
    let yf = kx::grouped_matmul(&hf, &p.offsets, &f(&ex.down)?, &GEMM)?;
    assert!(rel(&y, &yf) < 1e-2);
    Ok(())
}

/// The shared expert's kernel helper against candle ops, and the public API's CPU path against
/// the reference module.
#[test]
fn shared_expert_helper_and_cpu_dispatch() -> Result<()> {
    let dev = Device::Cpu;
    let (s, d, e, k) = (96usize, 32usize, 8usize, 2usize);
    let sh = SwigluWeights {
        gate: (Tensor::randn(0f32, 1.0, (2 * d, d), &dev)? * 0.2)?,
        up: (Tensor::randn(0f32, 1.0, (2 * d, d), &dev)? * 0.2)?,
        down: (Tensor::randn(0f32, 1.0, (d, 2 * d), &dev)? * 0.2)?,
    };
    let x = Tensor::randn(0f32, 1.0, (s, d), &dev)?;
    let want =
        (x.matmul(&sh.gate.t()?)?.silu()? * x.matmul(&sh.up.t()?)?)?.matmul(&sh.down.t()?)?;
    assert!(rel(&kx::swiglu_mlp(&x, &sh, &GEMM)?, &want) < 1e-5);
    let mut rng = Lcg(3);
    let ids = ids_from(s, k, e, &mut rng, |r| r.below(8))?;
    let w = Tensor::rand(0f32, 1.0, (s, k), &dev)?;
    let p = kx::permute_by_expert(&ids, e)?;
    let yr = Tensor::randn(0f32, 1.0, (s * k, d), &dev)?;
    let a = cpu::combine(&yr, &p, &w, None)?;
    assert_eq!(max_abs(&a, &kx::combine(&yr, &p, &w, None)?), 0.0);
    Ok(())
}

/// On a CUDA build with a GPU: the kernels against the CPU references on one small layer.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_cpu_reference() -> Result<()> {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: skipped");
        return Ok(());
    };
    let cpu_dev = Device::Cpu;
    let mut rng = Lcg(13);
    let (s, k, e, d, i) = (300usize, 2usize, 8usize, 64usize, 128usize);
    for dt in [DType::F32, DType::BF16] {
        let logits = Tensor::randn(0f32, 1.0, (s, e), &cpu_dev)?;
        let gc = cpu::fused_topk_gating(&logits, k)?;
        let gg = kx::fused_topk_gating(&logits.to_device(&gpu)?, k)?;
        assert_eq!(gc.ids.to_vec2::<u32>()?, gg.ids.to_vec2::<u32>()?);
        let ids = ids_from(s, k, e, &mut rng, |r| r.below(3))?;
        let pc = cpu::permute_by_expert(&ids, e)?;
        let pg = kx::permute_by_expert(&ids.to_device(&gpu)?, e)?;
        assert_eq!(pc.order.to_vec1::<u32>()?, pg.order.to_vec1::<u32>()?);
        let ex = experts(e, d, i, dt)?;
        let x = Tensor::randn(0f32, 1.0, (s, d), &cpu_dev)?.to_dtype(dt)?;
        let hc = cpu::grouped_gemm(&x, Some(&pc), &pc.offsets, &ex.gate, Some(&ex.up))?;
        let hg = kx::grouped_gate_up_gather(
            &x.to_device(&gpu)?,
            &pg,
            &ex.gate.to_device(&gpu)?,
            &ex.up.to_device(&gpu)?,
            &GEMM,
        )?;
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        assert!(rel(&hg.to_device(&cpu_dev)?, &hc) < tol);
    }
    Ok(())
}
