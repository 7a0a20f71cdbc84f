//! CUDA launches of `kernels/block_ops.cu` (see [`super::block_ops`] for the semantics).
//! Compiled with NVRTC once per process, launched on candle's stream, no host copies.
use super::block_ops::QkNormWeights;
use crate::runtime::cuda::{allow_dynamic_smem, arg_or_null, by_dtype, cfg1, cuda_dev, drv, dtype_suffix as suffix, grid_for, optional_view, view, view_of, wrap, Func, NvrtcModule, NULL};
use candle_core::cuda_backend::{cudarc, CudaDevice};
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};
use half::bf16;

const SRC: &str = nvrtc_source!("block_ops.cu");

static MODULE: NvrtcModule = NvrtcModule::new(SRC, "ditmoe_block_ops");

fn func(dev: &CudaDevice, name: &str) -> Result<Func> {
    MODULE.func(dev, name)
}

/// Contiguous, starting at a multiple of `elems` elements, for kernels that move `elems` elements
/// at a time (copied if the view starts elsewhere).
fn aligned(t: &Tensor, elems: usize) -> Result<Tensor> {
    let t = t.contiguous()?;
    if t.layout().start_offset() % elems == 0 {
        Ok(t)
    } else {
        t.copy()
    }
}

/// The row kernels' float4s per lane for a width (`RV` in `row_ln_modulate_body`): the smallest
/// of 4, 8, 12, 16 that holds a row (D <= 2048, checked by the callers).
fn row_vectors(d: usize) -> usize {
    (d.div_ceil(128).div_ceil(4) * 4).clamp(4, 16)
}

/// Launch shape of the row kernels: one warp per row, four warps per block.
fn row_cfg(rows: usize) -> cudarc::driver::LaunchConfig {
    cfg1(rows.div_ceil(4) as u32, 128, 0)
}

pub fn ln_modulate(x: &Tensor, mods: &Tensor, shift_off: usize, scale_off: usize, eps: f64, out_dtype: DType) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let (mn, ms) = mods.dims2()?;
    if x.dtype() != DType::F32 || mods.dtype() != DType::F32 || mn != n || shift_off + d > ms || scale_off + d > ms {
        bail!("ln_modulate: x {:?} {:?} and mods {:?} {:?} do not fit", x.dims(), x.dtype(), mods.dims(), mods.dtype())
    }
    if d % 4 != 0 || d > 2048 {
        bail!("ln_modulate: width {d} must be a multiple of 4, at most 2048")
    }
    let dev = cuda_dev(x)?;
    let (x, mods) = (aligned(x, 4)?, aligned(mods, 4)?);
    let rows = n * t;
    let name = format!("ln_modulate_{}_v{}", suffix(out_dtype, "ln_modulate")?, row_vectors(d));
    let f = func(&dev, &name)?;
    view!(x, f32, _gx, xv);
    view!(mods, f32, _gm, mv);
    let (ms32, sh32, sc32, t32, d32, eps32) = (ms as u32, shift_off as u32, scale_off as u32, t as u32, d as u32, eps as f32);
    by_dtype!(out_dtype, O, {
        let mut out = unsafe { dev.alloc::<O>(rows * d)? };
        let mut b = f.0.launch_builder(&f.1);
        let rows64 = rows as u64;
        b.arg(&xv).arg(&mv).arg(&ms32).arg(&sh32).arg(&sc32).arg(&t32).arg(&d32).arg(&eps32).arg(&rows64).arg(&mut out);
        drv(unsafe { b.launch(row_cfg(rows)) })?;
        Ok(wrap(out, &dev, (n, t, d)))
    })
}

pub fn residual_ln_modulate(
    x: &Tensor,
    y: &Tensor,
    bias: Option<&Tensor>,
    mods: &Tensor,
    offsets: (usize, usize, usize),
    eps: f64,
    out_dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let (n, t, d) = x.dims3()?;
    let (mn, ms) = mods.dims2()?;
    let (gate_off, shift_off, scale_off) = offsets;
    if x.dtype() != DType::F32 || mods.dtype() != DType::F32 || y.dims() != x.dims() || mn != n || [gate_off, shift_off, scale_off].iter().any(|o| o + d > ms) {
        bail!("residual_ln_modulate: x {:?}, y {:?}, mods {:?} do not fit", x.dims(), y.dims(), mods.dims())
    }
    if d % 4 != 0 || d > 2048 {
        bail!("residual_ln_modulate: width {d} must be a multiple of 4, at most 2048")
    }
    if let Some(b) = bias {
        if b.dims() != [d] || b.dtype() != y.dtype() {
            bail!("residual_ln_modulate: bias {:?} {:?} is not [{d}] {:?}", b.dims(), b.dtype(), y.dtype())
        }
    }
    let dev = cuda_dev(x)?;
    let (x, y, mods) = (aligned(x, 4)?, aligned(y, 4)?, aligned(mods, 4)?);
    let bias = bias.map(|b| aligned(b, 4)).transpose()?;
    let rows = n * t;
    let name = format!(
        "residual_ln_modulate_{}_{}_v{}",
        suffix(y.dtype(), "residual_ln_modulate")?,
        suffix(out_dtype, "residual_ln_modulate")?,
        row_vectors(d)
    );
    let f = func(&dev, &name)?;
    view!(x, f32, _gx, xv);
    view!(mods, f32, _gm, mv);
    let mut x_mid = unsafe { dev.alloc::<f32>(rows * d)? };
    let (ms32, g32, sh32, sc32, t32, d32, eps32) = (ms as u32, gate_off as u32, shift_off as u32, scale_off as u32, t as u32, d as u32, eps as f32);
    by_dtype!(y.dtype(), Y, {
        view!(y, Y, _gy, yv);
        by_dtype!(out_dtype, O, {
            let mut out = unsafe { dev.alloc::<O>(rows * d)? };
            let mut b = f.0.launch_builder(&f.1);
            let rows64 = rows as u64;
            b.arg(&xv).arg(&yv);
            let bg = bias.as_ref().map(|t| t.storage_and_layout());
            let bv = optional_view::<Y, _>(bg.as_ref(), d, "residual_ln_modulate: bias")?;
            arg_or_null(&mut b, bv.as_ref());
            b.arg(&mv).arg(&ms32).arg(&g32).arg(&sh32).arg(&sc32).arg(&t32).arg(&d32).arg(&eps32).arg(&rows64);
            b.arg(&mut x_mid).arg(&mut out);
            drv(unsafe { b.launch(row_cfg(rows)) })?;
            let out = wrap(out, &dev, (n, t, d));
            Ok((wrap(x_mid, &dev, (n, t, d)), out))
        })
    })
}

pub fn gated_residual(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, mods: &Tensor, gate_off: usize) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let (mn, ms) = mods.dims2()?;
    if x.dtype() != DType::F32 || mods.dtype() != DType::F32 || y.dims() != x.dims() || mn != n || gate_off + d > ms {
        bail!("gated_residual: x {:?}, y {:?}, mods {:?} do not fit", x.dims(), y.dims(), mods.dims())
    }
    if let Some(b) = bias {
        if b.dims() != [d] || b.dtype() != y.dtype() {
            bail!("gated_residual: bias {:?} {:?} is not [{d}] {:?}", b.dims(), b.dtype(), y.dtype())
        }
    }
    if d % 4 != 0 {
        bail!("gated_residual: width {d} must be a multiple of 4")
    }
    let dev = cuda_dev(x)?;
    let (x, y, mods) = (aligned(x, 4)?, aligned(y, 4)?, aligned(mods, 4)?);
    let bias = bias.map(|b| aligned(b, 4)).transpose()?;
    let total = n * t * d;
    let f = func(&dev, &format!("gated_residual_{}", suffix(y.dtype(), "gated_residual")?))?;
    view!(x, f32, _gx, xv);
    view!(mods, f32, _gm, mv);
    let mut out = unsafe { dev.alloc::<f32>(total)? };
    let (ms32, g32, t32, d32, n64) = (ms as u32, gate_off as u32, t as u32, d as u32, total as u64);
    by_dtype!(y.dtype(), Y, {
        view!(y, Y, _gy, yv);
        let mut b = f.0.launch_builder(&f.1);
        b.arg(&xv).arg(&yv);
        let bg = bias.as_ref().map(|t| t.storage_and_layout());
        let bv = optional_view::<Y, _>(bg.as_ref(), d, "gated_residual: bias")?;
        arg_or_null(&mut b, bv.as_ref());
        b.arg(&mv).arg(&ms32).arg(&g32).arg(&t32).arg(&d32).arg(&n64).arg(&mut out);
        drv(unsafe { b.launch(cfg1(grid_for(total / 4), 256, 0)) })?;
    });
    Ok(wrap(out, &dev, (n, t, d)))
}

/// The q/k/v head size of a packed `(B, T, 3·H·hd)` projection.
fn qkv_dims(qkv: &Tensor, heads: usize) -> Result<(usize, usize, usize, usize)> {
    let (b, t, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads.max(1);
    if heads == 0 || d3 != 3 * heads * hd {
        bail!("split_qkv: width {d3} is not 3 x {heads} heads")
    }
    Ok((b, t, heads * hd, hd))
}

/// Whether the thread-per-row split kernel (and the attention that reads the packed
/// projection) applies: bf16 rows of whole 16-byte chunks, every DiT-MoE size.
fn rows_kernel(dt: DType, hd: usize) -> bool {
    dt == DType::BF16 && hd.is_multiple_of(8) && hd <= 128
}

pub fn split_qkv(qkv: &Tensor, bias: Option<&Tensor>, norm: Option<QkNormWeights>, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, d, hd) = qkv_dims(qkv, heads)?;
    let d3 = 3 * d;
    let dev = cuda_dev(qkv)?;
    let dt = qkv.dtype();
    let rows = rows_kernel(dt, hd);
    let qkv = aligned(qkv, 8)?;
    let bias = bias.map(|x| aligned(&x.to_dtype(dt)?, 8)).transpose()?;
    let norm_w = norm
        .map(|n| -> Result<_> {
            let c = |w: &Tensor| w.to_dtype(DType::F32)?.contiguous();
            Ok((c(n.q_weight)?, c(n.q_bias)?, c(n.k_weight)?, c(n.k_bias)?, n.eps as f32))
        })
        .transpose()?;
    let pairs = b * t * heads;
    let f = if rows {
        func(&dev, "split_qkv_rows_bf16")?
    } else {
        func(&dev, &format!("split_qkv_{}", suffix(dt, "split_qkv")?))?
    };
    let (b32, t32, h32, hd32) = (b as u32, t as u32, heads as u32, hd as u32);
    by_dtype!(dt, E, {
        view!(qkv, E, _gq, qv);
        let mut q = unsafe { dev.alloc::<E>(b * t * d)? };
        let mut k = unsafe { dev.alloc::<E>(b * t * d)? };
        let mut v = unsafe { dev.alloc::<E>(b * t * d)? };
        {
            let mut l = f.0.launch_builder(&f.1);
            l.arg(&qv);
            let bg = bias.as_ref().map(|x| x.storage_and_layout());
            let bv = optional_view::<E, _>(bg.as_ref(), d3, "split_qkv: bias")?;
            arg_or_null(&mut l, bv.as_ref());
            let guards = norm_w.as_ref().map(|(a, b2, c, d2, _)| [a, b2, c, d2].map(|w| w.storage_and_layout()));
            let views = match &guards {
                Some(gs) => Some(gs.iter().map(|g| optional_view::<f32, _>(Some(g), hd, "split_qkv: norm weights").map(|v| v.expect("a view"))).collect::<Result<Vec<_>>>()?),
                None => None,
            };
            match &views {
                Some(vs) => {
                    for x in vs {
                        l.arg(x);
                    }
                }
                None => {
                    for _ in 0..4 {
                        l.arg(&NULL);
                    }
                }
            }
            let eps = norm_w.as_ref().map_or(0f32, |n| n.4);
            l.arg(&eps).arg(&b32).arg(&t32).arg(&h32).arg(&hd32).arg(&mut q).arg(&mut k).arg(&mut v);
            let cfg = if rows {
                // one thread per (token, head) of each of q, k and v
                cfg1((3 * pairs).div_ceil(256) as u32, 256, 0)
            } else {
                // 8 warps per block, one (token, head) pair per warp
                cfg1(pairs.div_ceil(8) as u32, 256, 0)
            };
            drv(unsafe { l.launch(cfg) })?;
        }
        let shape = (b, heads, t, hd);
        Ok((wrap(q, &dev, shape), wrap(k, &dev, shape), wrap(v, &dev, shape)))
    })
}

pub fn softmax_scaled(s: &Tensor, scale: f64) -> Result<Tensor> {
    let cols = s.dim(candle_core::D::Minus1)?;
    let rows = s.elem_count() / cols.max(1);
    let dev = cuda_dev(s)?;
    let s = s.contiguous()?;
    // rows up to 128 wide: one warp per row, eight rows per block (the same bits)
    let warp = cols <= 128;
    let f = func(&dev, &format!("softmax_scaled_{}{}", if warp { "warp_" } else { "" }, suffix(s.dtype(), "softmax_scaled")?))?;
    let (sc, c32, r32) = (scale as f32, cols as u32, rows as u32);
    by_dtype!(s.dtype(), E, {
        view!(s, E, _gs, sv);
        let mut out = unsafe { dev.alloc::<E>(rows * cols)? };
        let mut b = f.0.launch_builder(&f.1);
        b.arg(&sv).arg(&sc).arg(&c32);
        if warp {
            b.arg(&r32);
        }
        b.arg(&mut out);
        let cfg = if warp { cfg1(rows.div_ceil(8) as u32, 256, 0) } else { cfg1(rows as u32, 128, 0) };
        drv(unsafe { b.launch(cfg) })?;
        Ok(wrap(out, &dev, s.shape().clone()))
    })
}

/// Element strides (image, head, token) of q, k and v (`struct FlashStrides` in the kernel).
#[repr(C)]
#[derive(Clone, Copy)]
struct FlashStrides {
    image: [u64; 3],
    head: [u64; 3],
    token: [u64; 3],
}
unsafe impl DeviceRepr for FlashStrides {}

/// Head size padded to the kernel's multiple of 16.
fn flash_hdp(hd: usize) -> Result<usize> {
    Ok(match hd {
        0..=16 => 16,
        17..=32 => 32,
        33..=64 => 64,
        65..=80 => 80,
        81..=96 => 96,
        97..=128 => 128,
        _ => bail!("flash_attention: head size {hd} > 128"),
    })
}

/// The optional biases of the q, k and v views a flash kernel reads.
type FlashBiases<'a, 'b> = [Option<&'a cudarc::driver::CudaView<'b, bf16>>; 3];

/// The fused attention kernel over views of q, k and v laid out as `st` says, with the optional
/// projection biases and the flash form's q/k norm (see `flash_attn_body`), into a new
/// `(B, T, H·hd)` bf16 tensor.
#[allow(clippy::too_many_arguments)]
fn launch_flash(
    dev: &CudaDevice,
    (q, k, v): (&cudarc::driver::CudaView<bf16>, &cudarc::driver::CudaView<bf16>, &cudarc::driver::CudaView<bf16>),
    biases: FlashBiases,
    norm: Option<&QkNormViews>,
    st: FlashStrides,
    (b, h, t, hd): (usize, usize, usize, usize),
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let hdp = flash_hdp(hd)?;
    // Queries per block: 16 per warp. 8 warps share each key tile among twice the queries;
    // 4 give more blocks for short sequences.
    let warps = if t >= 256 { 8 } else { 4 };
    let kind = if norm.is_some() { "qkn_bf16" } else { "bf16" };
    let f = func(dev, &format!("flash_attn_{kind}_hd{hdp}_w{warps}"))?;
    let mut out = unsafe { dev.alloc::<bf16>(b * t * h * hd)? };
    let (t32, h32, hd32) = (t as u32, h as u32, hd as u32);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let mut l = f.0.launch_builder(&f.1);
    l.arg(q).arg(k).arg(v);
    for bias in biases {
        arg_or_null(&mut l, bias);
    }
    match norm {
        Some(n) => {
            for w in &n.weights {
                l.arg(w);
            }
            l.arg(&n.eps);
        }
        None => {
            for _ in 0..4 {
                l.arg(&NULL);
            }
            l.arg(&0f32);
        }
    }
    let causal = u32::from(causal);
    l.arg(&st).arg(&t32).arg(&h32).arg(&hd32).arg(&scale_log2).arg(&causal).arg(&mut out);
    // two buffers of a k and a v tile of 64 keys (FLASH_KT), rows of hdp + 8 elements
    let smem = (2 * 2 * 64 * (hdp + 8) * 2) as u32;
    allow_dynamic_smem(&f.1, smem)?;
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (t.div_ceil(16 * warps) as u32, (b * h) as u32, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: smem,
    };
    drv(unsafe { l.launch(cfg) })?;
    Ok(wrap(out, dev, (b, t, h * hd)))
}

/// The flash form's q/k LayerNorm weights as f32 device views (`q_weight, q_bias, k_weight,
/// k_bias`) and eps, for the `qkn` flash kernels.
struct QkNormViews<'a> {
    weights: [cudarc::driver::CudaView<'a, f32>; 4],
    eps: f32,
}

pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || [q.dtype(), k.dtype(), v.dtype()] != [DType::BF16; 3] {
        bail!("flash_attention: q {:?}, k {:?}, v {:?} must be bf16 of one shape", q.dims(), k.dims(), v.dims())
    }
    let dev = cuda_dev(q)?;
    let (q, k, v) = (aligned(q, 8)?, aligned(k, 8)?, aligned(v, 8)?);
    view!(q, bf16, _gq, qv);
    view!(k, bf16, _gk, kv);
    view!(v, bf16, _gv, vv);
    let (sb, sh) = ((h * t * hd) as u64, (t * hd) as u64);
    let st = FlashStrides { image: [sb; 3], head: [sh; 3], token: [hd as u64; 3] };
    launch_flash(&dev, (&qv, &kv, &vv), [None; 3], None, st, (b, h, t, hd), scale, causal)
}

/// See [`super::block_ops::qkv_attention`]: one kernel reads q, k and v straight from the
/// packed projection and folds the biases in. Without the q/k norm (timm form) v's bias goes
/// into the output; with it (flash form) the kernel adds the biases and normalises q and k as
/// [`split_qkv`] does (the same roundings: b_k before the norm, v + b_v rounded to bf16).
pub fn qkv_attention(qkv: &Tensor, bias: Option<&Tensor>, norm: Option<QkNormWeights>, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, t, d, hd) = qkv_dims(qkv, heads)?;
    if !rows_kernel(qkv.dtype(), hd) {
        bail!("qkv_attention: needs bf16 and a head size that is a multiple of 8 up to 128, got {:?} and {hd}", qkv.dtype())
    }
    let dev = cuda_dev(qkv)?;
    let qkv = aligned(qkv, 8)?;
    let bias = bias.map(|x| aligned(&x.to_dtype(DType::BF16)?, 8)).transpose()?;
    let norm_w = norm
        .map(|n| -> Result<_> {
            let c = |w: &Tensor| w.to_dtype(DType::F32)?.contiguous();
            Ok(([c(n.q_weight)?, c(n.q_bias)?, c(n.k_weight)?, c(n.k_bias)?], n.eps as f32))
        })
        .transpose()?;
    view!(qkv, bf16, _gp, pv);
    let bg = bias.as_ref().map(|x| x.storage_and_layout());
    let bv = optional_view::<bf16, _>(bg.as_ref(), 3 * d, "qkv_attention: bias")?;
    let ng = norm_w.as_ref().map(|(ws, _)| ws.each_ref().map(|w| w.storage_and_layout()));
    let norm_views = match (&ng, &norm_w) {
        (Some(gs), Some((_, eps))) => {
            let [a, b2, c, d2] = gs.each_ref().map(|g| view_of::<f32, _>(g, hd, "qkv_attention: norm weights"));
            Some(QkNormViews { weights: [a?, b2?, c?, d2?], eps: *eps })
        }
        _ => None,
    };
    let (q, k, v) = (pv.slice(0..d), pv.slice(d..2 * d), pv.slice(2 * d..));
    let bias_of = |i: usize| bv.as_ref().map(|x| x.slice(i * d..(i + 1) * d));
    let (q_bias, k_bias, v_bias) = (bias_of(0), bias_of(1), bias_of(2));
    // the timm form drops b_k (softmax is shift-invariant); the norm needs it
    let k_bias = if norm_views.is_some() { k_bias } else { None };
    // packed [B, T, 3, H, hd]: images T·3D apart, heads hd, tokens 3D
    let st = FlashStrides { image: [(t * 3 * d) as u64; 3], head: [hd as u64; 3], token: [(3 * d) as u64; 3] };
    launch_flash(&dev, (&q, &k, &v), [q_bias.as_ref(), k_bias.as_ref(), v_bias.as_ref()], norm_views.as_ref(), st, (b, heads, t, hd), scale, false)
}
