//! CUDA launches of the MoE kernels (`kernels/moe_routing.cu`: gating, counting sort, gather,
//! combine; `kernels/grouped_gemm.cu`: the grouped expert GEMMs) and the grouped-GEMM kernel
//! choice, on candle's stream. Nothing here reads device memory back to the host.
use super::{Gating, GemmBackend, GemmConfig, Permutation};
use crate::runtime::cuda::{allow_dynamic_smem, arg_or_null, cfg1, cuda_dev, drv, dtype_suffix, grid_for, optional_view, target, view, wrap, Func, NvrtcModule, NULL};
use candle_core::cuda_backend::{cudarc, CudaDType, CudaDevice};
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use cudarc::driver::{CudaSlice, PushKernelArg};
use std::sync::OnceLock;

static ROUTING: NvrtcModule = NvrtcModule::new(nvrtc_source!("moe_routing.cu"), "ditmoe_moe_routing");
static GEMM: NvrtcModule = NvrtcModule::new(nvrtc_source!("grouped_gemm.cu"), "ditmoe_grouped_gemm");

fn routing_fn(dev: &CudaDevice, name: &str) -> Result<Func> {
    ROUTING.func(dev, name)
}

fn gemm_fn(dev: &CudaDevice, name: &str) -> Result<Func> {
    GEMM.func(dev, name)
}

fn start_offset_bytes(t: &Tensor) -> usize {
    t.layout().start_offset() * t.dtype().size_in_bytes()
}


/// `[0, s]` as a `[2]` u32 device tensor, written by a kernel (no host copy).
pub fn dense_offsets(dev: &Device, s: usize) -> Result<Tensor> {
    let cd = match dev {
        Device::Cuda(d) => d.clone(),
        d => bail!("expected a CUDA device, got {d:?}"),
    };
    let mut out = unsafe { cd.alloc::<u32>(2)? };
    let f = routing_fn(&cd, "dense_offsets")?;
    let s32 = s as u32;
    let mut b = f.0.launch_builder(&f.1);
    b.arg(&mut out);
    b.arg(&s32);
    drv(unsafe { b.launch(cfg1(1, 32, 0)) })?;
    Ok(wrap(out, &cd, 2))
}

/// See [`super::fused_topk_gating`].
pub fn fused_topk_gating(logits: &Tensor, k: usize) -> Result<Gating> {
    Ok(gating(logits, k, false)?.0)
}

/// See [`super::fused_gating_permute`]: for E <= 32 the gating kernel's last block also runs
/// the counting sort's scan on its per-block counts, and `perm_scatter` follows with the
/// gating blocks as its chunks (two launches instead of the gating's one and the sort's three).
pub fn fused_gating_permute(logits: &Tensor, k: usize) -> Result<(Gating, Permutation)> {
    let (s, e) = logits.dims2()?;
    if e > 32 || s == 0 {
        let g = fused_topk_gating(logits, k)?;
        let p = permute_by_expert(&g.ids, e)?;
        return Ok((g, p));
    }
    let (g, sort) = gating(logits, k, true)?;
    let (offsets, base) = sort.expect("the fused gating's scan");
    let dev = cuda_dev(logits)?;
    let n = s * k;
    let (order, inv) = {
        view!(g.ids, u32, _gi, iv);
        // one block per gating block: GATE_ROWS_BLOCK tokens, 8 warps of 32 k slots
        perm_scatter(&dev, &iv, n, e, &base, 32 * k, s.div_ceil(GATE_ROWS_BLOCK))?
    };
    let p = Permutation { order: wrap(order, &dev, n), inv: wrap(inv, &dev, n), offsets: wrap(offsets, &dev, e + 1), k, n_experts: e };
    Ok((g, p))
}

/// Tokens per block of the `gating_rows_*` kernels (GATE_ROWS_BLOCK in the kernel source).
const GATE_ROWS_BLOCK: usize = 256;

/// `perm_scatter` over `blocks` chunks of 8 warps x `sub` slots of `ids` (`n` slots, `e`
/// experts, per-chunk bases `base[blocks, e]`): the expert-sorted `order` and its inverse.
fn perm_scatter(
    dev: &CudaDevice,
    ids: &cudarc::driver::CudaView<u32>,
    n: usize,
    e: usize,
    base: &CudaSlice<u32>,
    sub: usize,
    blocks: usize,
) -> Result<(CudaSlice<u32>, CudaSlice<u32>)> {
    let mut order = unsafe { dev.alloc::<u32>(n)? };
    let mut inv = unsafe { dev.alloc::<u32>(n)? };
    let (n32, e32, sub32) = (n as u32, e as u32, sub as u32);
    let f = routing_fn(dev, "perm_scatter")?;
    let mut b = f.0.launch_builder(&f.1);
    b.arg(ids).arg(&n32).arg(&e32).arg(base).arg(&sub32).arg(&mut order).arg(&mut inv);
    // per-warp running counts in dynamic shared memory: [8 warps][e]
    drv(unsafe { b.launch(cfg1(blocks as u32, 256, (8 * e * 4) as u32)) })?;
    Ok((order, inv))
}

/// The gating kernels; `with_sort` (E <= 32): the last block also writes the sort's offsets
/// `[E + 1]` and per-block bases `[blocks, E]`, returned beside the gating.
type SortScan = (cudarc::driver::CudaSlice<u32>, cudarc::driver::CudaSlice<u32>);
fn gating(logits: &Tensor, k: usize, with_sort: bool) -> Result<(Gating, Option<SortScan>)> {
    let (s, e) = logits.dims2()?;
    if k == 0 || k > e || e > 256 {
        bail!("fused_topk_gating: need 1 <= k <= E <= 256, got k={k}, E={e}")
    }
    let dev = cuda_dev(logits)?;
    if s == 0 {
        let d = logits.device();
        let g = Gating {
            ids: Tensor::zeros((0, k), DType::U32, d)?,
            weights: Tensor::zeros((0, k), DType::F32, d)?,
            scores: Tensor::zeros((0, e), DType::F32, d)?,
            expert_counts: Tensor::zeros(e, DType::U32, d)?,
            mean_scores: Tensor::zeros(e, DType::F32, d)?,
        };
        return Ok((g, None));
    }
    let logits = match logits.dtype() {
        DType::F32 | DType::BF16 => logits.contiguous()?,
        _ => logits.to_dtype(DType::F32)?,
    };
    // E <= 32 (every DiT-MoE size): one thread per token (`gating_rows_*`, 256 tokens a block);
    // more experts: one warp per token (`fused_gating_*`, 64 tokens a block)
    let rows_kernel = e <= 32;
    let nb = if rows_kernel { s.div_ceil(GATE_ROWS_BLOCK) } else { s.div_ceil(64) };
    let mut ids = unsafe { dev.alloc::<u32>(s * k)? };
    let mut weights = unsafe { dev.alloc::<f32>(s * k)? };
    let mut scores = unsafe { dev.alloc::<f32>(s * e)? };
    let mut psum = unsafe { dev.alloc::<f32>(nb * e)? };
    let mut pcnt = unsafe { dev.alloc::<u32>(nb * e)? };
    let mut ticket = dev.alloc_zeros::<u32>(1)?;
    let mut counts = unsafe { dev.alloc::<u32>(e)? };
    let mut mean = unsafe { dev.alloc::<f32>(e)? };
    let mut sort = if with_sort && rows_kernel { Some(unsafe { (dev.alloc::<u32>(e + 1)?, dev.alloc::<u32>(nb * e)?) }) } else { None };
    let (s32, e32, k32) = (s as u32, e as u32, k as u32);
    let emax = match e {
        0..=8 => 8,
        9..=16 => 16,
        _ => 32,
    };
    macro_rules! go {
        ($t:ty, $name:expr) => {{
            view!(logits, $t, _g, lv);
            let f = routing_fn(&dev, &$name)?;
            let mut b = f.0.launch_builder(&f.1);
            b.arg(&lv);
            b.arg(&s32).arg(&e32).arg(&k32);
            b.arg(&mut ids).arg(&mut weights).arg(&mut scores);
            b.arg(&mut psum)
                .arg(&mut pcnt)
                .arg(&mut ticket)
                .arg(&mut counts)
                .arg(&mut mean);
            if rows_kernel {
                match sort.as_mut() {
                    Some((offsets, base)) => {
                        b.arg(offsets).arg(base);
                    }
                    None => {
                        b.arg(&NULL).arg(&NULL);
                    }
                }
            }
            drv(unsafe { b.launch(cfg1(nb as u32, 256, 0)) })?;
        }};
    }
    let name = |t: &str| if rows_kernel { format!("gating_rows_{t}_e{emax}") } else { format!("fused_gating_{t}") };
    if logits.dtype() == DType::BF16 {
        go!(half::bf16, name("bf16"))
    } else {
        go!(f32, name("f32"))
    }
    let d = &dev;
    let g = Gating {
        ids: wrap(ids, d, (s, k)),
        weights: wrap(weights, d, (s, k)),
        scores: wrap(scores, d, (s, e)),
        expert_counts: wrap(counts, d, e),
        mean_scores: wrap(mean, d, e),
    };
    Ok((g, sort))
}

const PERM_CHUNK: usize = 1024;
/// Slots per warp of `perm_scatter` after `perm_count` (PERM_SUB in the kernel source).
const PERM_SUB: usize = 128;

/// See [`super::permute_by_expert`].
pub fn permute_by_expert(ids: &Tensor, n_experts: usize) -> Result<Permutation> {
    let (s, k) = ids.dims2()?;
    if n_experts == 0 || n_experts > 1024 {
        bail!("permute_by_expert: need 1 <= E <= 1024, got {n_experts}")
    }
    let dev = cuda_dev(ids)?;
    let ids = ids.to_dtype(DType::U32)?.contiguous()?;
    let n = s * k;
    let e = n_experts;
    let mut offsets = dev.alloc_zeros::<u32>(e + 1)?;
    if n == 0 {
        let z = || unsafe { dev.alloc::<u32>(0) };
        return Ok(Permutation { order: wrap(z()?, &dev, 0), inv: wrap(z()?, &dev, 0), offsets: wrap(offsets, &dev, e + 1), k, n_experts });
    }
    let (order, inv) = {
        let nb = n.div_ceil(PERM_CHUNK);
        let mut hist = unsafe { dev.alloc::<u32>(nb * e)? };
        let mut base = unsafe { dev.alloc::<u32>(nb * e)? };
        let (n32, e32, nb32) = (n as u32, e as u32, nb as u32);
        view!(ids, u32, _g, iv);
        {
            let f = routing_fn(&dev, "perm_count")?;
            let mut b = f.0.launch_builder(&f.1);
            b.arg(&iv).arg(&n32).arg(&e32).arg(&mut hist);
            drv(unsafe { b.launch(cfg1(nb32, 256, 0)) })?;
        }
        {
            let f = routing_fn(&dev, "perm_scan")?;
            let mut b = f.0.launch_builder(&f.1);
            b.arg(&hist)
                .arg(&nb32)
                .arg(&e32)
                .arg(&mut offsets)
                .arg(&mut base);
            drv(unsafe { b.launch(cfg1(1, 1024, 0)) })?;
        }
        perm_scatter(&dev, &iv, n, e, &base, PERM_SUB, nb)?
    };
    Ok(Permutation {
        order: wrap(order, &dev, n),
        inv: wrap(inv, &dev, n),
        offsets: wrap(offsets, &dev, e + 1),
        k,
        n_experts,
    })
}


/// See [`super::gather_rows`].
pub fn gather_rows(x: &Tensor, perm: &Permutation) -> Result<Tensor> {
    let dev = cuda_dev(x)?;
    let x = x.contiguous()?;
    let (_, d) = x.dims2()?;
    let r = perm.rows()?;
    let es = x.dtype().size_in_bytes();
    let row_bytes = d * es;
    let out_t = Tensor::zeros((r, d), x.dtype(), x.device())?;
    if r == 0 || d == 0 {
        return Ok(out_t);
    }
    let order = perm.order.contiguous()?;
    let k32 = perm.k as u32;
    let r32 = r as u32;
    let aligned16 = row_bytes % 16 == 0 && start_offset_bytes(&x).is_multiple_of(16);
    let (name, unit) = if aligned16 {
        ("gather_rows_v16", 16)
    } else if row_bytes % 4 == 0 && start_offset_bytes(&x).is_multiple_of(4) {
        ("gather_rows_v4", 4)
    } else if es == 2 {
        ("gather_rows_v2", 2)
    } else {
        bail!("gather_rows: unsupported dtype {:?}", x.dtype())
    };
    let vpr = (row_bytes / unit) as u32;
    // all paths move raw bytes: view the storages as u8 slices of the right element type
    macro_rules! go {
        ($t:ty) => {{
            view!(x, $t, _gx, xv);
            view!(order, u32, _go, ov);
            let mut out = unsafe { dev.alloc::<$t>(r * d)? };
            let f = routing_fn(&dev, name)?;
            let mut b = f.0.launch_builder(&f.1);
            b.arg(&xv)
                .arg(&ov)
                .arg(&k32)
                .arg(&mut out)
                .arg(&r32)
                .arg(&vpr);
            drv(unsafe { b.launch(cfg1(grid_for(r * vpr as usize), 256, 0)) })?;
            wrap(out, &dev, (r, d))
        }};
    }
    let out = match x.dtype() {
        DType::F32 => go!(f32),
        DType::BF16 => go!(half::bf16),
        DType::F16 => go!(half::f16),
        DType::U32 => go!(u32),
        dt => bail!("gather_rows: unsupported dtype {dt:?}"),
    };
    Ok(out)
}

/// See [`super::gather_rows_scaled`]: f32 or bf16 `dout`, the rows in its dtype.
pub fn gather_rows_scaled(dout: &Tensor, perm: &Permutation, weights: &Tensor) -> Result<Tensor> {
    let (r, d) = (perm.rows()?, dout.dim(1)?);
    let name = format!("gather_rows_scaled_{}", dtype_suffix(dout.dtype(), "gather_rows_scaled")?);
    match dout.dtype() {
        DType::BF16 => combine_grad::<half::bf16, f32, half::bf16>(&name, dout, weights, perm, grid_for(r * d), (r, d)),
        _ => combine_grad::<f32, f32, f32>(&name, dout, weights, perm, grid_for(r * d), (r, d)),
    }
}

/// See [`super::combine_weight_grad`]: `dout` and `expert_out` both f32 or both bf16.
pub fn combine_weight_grad(dout: &Tensor, expert_out: &Tensor, perm: &Permutation) -> Result<Tensor> {
    let r = perm.rows()?;
    // one warp per row, eight per block
    let blocks = r.div_ceil(8).min(1 << 20) as u32;
    let shape = (perm.tokens()?, perm.k);
    let name = format!("combine_weight_grad_{}", dtype_suffix(dout.dtype(), "combine_weight_grad")?);
    match dout.dtype() {
        DType::BF16 => combine_grad::<half::bf16, half::bf16, f32>(&name, dout, expert_out, perm, blocks, shape),
        _ => combine_grad::<f32, f32, f32>(&name, dout, expert_out, perm, blocks, shape),
    }
}

/// Launches one of the combine's gradient kernels `(a, b, order, k, R, D, out)` over the
/// permutation's R rows: `a` of element type `A`, `b` of `B`, `out` of `O` and `shape`, D the
/// width of `a`.
fn combine_grad<A, B, O>(name: &str, a: &Tensor, b: &Tensor, perm: &Permutation, blocks: u32, shape: (usize, usize)) -> Result<Tensor>
where
    A: CudaDType + cudarc::driver::DeviceRepr,
    B: CudaDType + cudarc::driver::DeviceRepr,
    O: CudaDType + cudarc::driver::DeviceRepr,
{
    let dev = cuda_dev(a)?;
    let (a, b, order) = (a.contiguous()?, b.contiguous()?, perm.order.contiguous()?);
    let len = shape.0 * shape.1;
    let mut out = unsafe { dev.alloc::<O>(len)? };
    if len > 0 {
        view!(a, A, _ga, av);
        view!(b, B, _gb, bv);
        view!(order, u32, _go, ov);
        let (k32, r32, d32) = (perm.k as u32, perm.rows()? as u32, a.dim(1)? as u32);
        let f = routing_fn(&dev, name)?;
        let mut l = f.0.launch_builder(&f.1);
        l.arg(&av).arg(&bv).arg(&ov).arg(&k32).arg(&r32).arg(&d32).arg(&mut out);
        drv(unsafe { l.launch(cfg1(blocks, 256, 0)) })?;
    }
    Ok(wrap(out, &dev, shape))
}

/// See [`super::combine`].
pub fn combine(expert_out: &Tensor, perm: &Permutation, weights: &Tensor, add: Option<&Tensor>) -> Result<Tensor> {
    let dev = cuda_dev(expert_out)?;
    let y = expert_out.contiguous()?;
    let (r, d) = y.dims2()?;
    let k = perm.k;
    let s = r / k.max(1);
    // shapes checked by `super::combine`
    let w = weights.to_dtype(DType::F32)?.contiguous()?;
    let add = add.map(|a| a.to_dtype(y.dtype())?.contiguous()).transpose()?;
    if s == 0 || d == 0 {
        return match add {
            Some(a) => Ok(a),
            None => Tensor::zeros((s, d), y.dtype(), y.device()),
        };
    }
    let inv = perm.inv.contiguous()?;
    let es = y.dtype().size_in_bytes();
    let per = 16 / es;
    let aligned = |t: &Tensor| start_offset_bytes(t).is_multiple_of(16);
    let vec = d % per == 0 && aligned(&y) && add.as_ref().map(aligned).unwrap_or(true);
    let (s32, k32, d32, vec32) = (s as u32, k as u32, d as u32, vec as u32);
    let total = s * if vec { d / per } else { d };
    macro_rules! go {
        ($t:ty, $name:expr) => {{
            view!(y, $t, _gy, yv);
            view!(inv, u32, _gi, iv);
            view!(w, f32, _gw, wv);
            let mut out = unsafe { dev.alloc::<$t>(s * d)? };
            let f = routing_fn(&dev, $name)?;
            let mut b = f.0.launch_builder(&f.1);
            b.arg(&yv).arg(&iv).arg(&wv);
            let ag = add.as_ref().map(|a| a.storage_and_layout());
            let av = optional_view::<$t, _>(ag.as_ref(), s * d, "combine: add")?;
            arg_or_null(&mut b, av.as_ref());
            b.arg(&mut out).arg(&s32).arg(&k32).arg(&d32).arg(&vec32);
            drv(unsafe { b.launch(cfg1(grid_for(total), 256, 0)) })?;
            wrap(out, &dev, (s, d))
        }};
    }
    match y.dtype() {
        DType::F32 => Ok(go!(f32, "combine_f32")),
        DType::BF16 => Ok(go!(half::bf16, "combine_bf16")),
        dt => bail!("combine: unsupported dtype {dt:?}"),
    }
}

/// The kernel that [`grouped_gemm`] launches for a dtype, projection kind and output width.
#[derive(Debug, Clone)]
pub struct GemmChoice {
    /// Kernel name in `kernels/grouped_gemm.cu`.
    pub name: String,
    /// Rows per tile.
    pub bm: usize,
    /// Output columns per tile.
    pub out_per_tile: usize,
    /// Dynamic shared memory in bytes.
    pub smem: u32,
    /// `Some(blocks per SM)` for persistent kernels (grid = SMs x that).
    pub persistent: Option<u32>,
    /// Clusters of two blocks that share each weight tile (TMA multicast): `bm` rows per
    /// cluster, the weights passed as tensor maps, the grid sized by cluster occupancy.
    pub multicast: bool,
    /// Multicast with the A tile shared instead (`gg_wgmma_plain_n192mca`): `bm` rows per
    /// cluster, whose two blocks compute neighbouring N tiles.
    pub split_n: bool,
}

impl GemmChoice {
    /// The split-N form of this kernel: the 192-wide plain multicast kernel has one.
    fn with_split_n(&self) -> Option<Self> {
        (self.multicast && !self.split_n && self.out_per_tile == 192).then(|| Self {
            name: format!("{}a", self.name),
            bm: 128,
            split_n: true,
            ..self.clone()
        })
    }

    /// Pair (multicast) or block tiles in the worst case: each expert may leave a partial
    /// `bm`-row tile.
    fn max_units(&self, rows: usize, experts: usize, n_tiles: usize) -> usize {
        (rows.div_ceil(self.bm) + experts) * if self.split_n { n_tiles / 2 } else { n_tiles }
    }
}

fn sm_count(dev: &CudaDevice) -> u32 {
    static SMS: OnceLock<u32> = OnceLock::new();
    *SMS.get_or_init(|| {
        dev.cuda_stream()
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map(|v| v.max(1) as u32)
            .unwrap_or(132)
    })
}

/// See [`GemmChoice`]; follows `cfg`.
/// `aligned`: K is a multiple of 4 and every operand starts 16-byte aligned (the 3xTF32 f32
/// kernel loads 16-byte chunks). `m_tiles`: the expected number of 128-row tiles (routing
/// balanced over the experts).
pub fn gemm_choice(dev: &CudaDevice, cfg: &GemmConfig, dtype: DType, swiglu: bool, n: usize, aligned: bool, m_tiles: usize) -> Result<GemmChoice> {
    let m = target(dev)?;
    match dtype {
        DType::F32 => {
            use super::F32Kernel;
            let kind = if swiglu { "swiglu" } else { "plain" };
            let simt128 = || GemmChoice {
                name: format!("gg_f32b_{kind}"),
                bm: 128,
                out_per_tile: if swiglu { 64 } else { 128 },
                smem: 0,
                persistent: None,
                multicast: false,
                split_n: false,
            };
            match cfg.f32_kernel {
                F32Kernel::Simt64 => Ok(GemmChoice {
                    name: format!("gg_f32_{kind}"),
                    bm: 64,
                    out_per_tile: if swiglu { 32 } else { 64 },
                    smem: 0,
                    persistent: None,
                    multicast: false,
                    split_n: false,
                }),
                F32Kernel::Simt128 => Ok(simt128()),
                F32Kernel::Tf32x3 | F32Kernel::Tf32 | F32Kernel::Auto | F32Kernel::AutoTf32 if aligned => Ok(GemmChoice {
                    name: match cfg.f32_kernel {
                        F32Kernel::Tf32 | F32Kernel::AutoTf32 => format!("gg_tf32_{kind}"),
                        _ => format!("gg_tf32x3_{kind}"),
                    },
                    bm: 128,
                    out_per_tile: if swiglu { 64 } else { 128 },
                    // 3 stages of (128 + 128) rows of 128 bytes, 1024-byte aligned
                    smem: 3 * 256 * 128 + 1024,
                    persistent: None,
                    multicast: false,
                    split_n: false,
                }),
                F32Kernel::Tf32x3 | F32Kernel::Tf32 => bail!("the TF32 kernels need K % 4 == 0 with aligned rows"),
                F32Kernel::Auto | F32Kernel::AutoTf32 => Ok(simt128()),
            }
        }
        DType::BF16 => {
            let wg = match cfg.backend {
                GemmBackend::Auto => m.has_wgmma,
                GemmBackend::Wgmma => {
                    if !m.has_wgmma {
                        bail!("wgmma needs sm_90a (have {})", m.arch)
                    }
                    true
                }
                GemmBackend::MmaSync => false,
            };
            let bn = match cfg.block_n {
                128 => 128,
                // 192 exists only as a multicast kernel for the plain projection (below)
                192 | 256 => 256,
                // Measured on an H100 (docs/benchmarks.md): with wgmma, N tile 256 (persistent)
                // gives the fastest whole MoE layer at XL and G widths, also for the down
                // projection whose N (1152, 1408) is not a multiple of 256. Narrow outputs
                // (a single 128-wide tile) use 128, and so do products whose 256-wide tiles do
                // not fill the SMs once (few tokens) when the 128-wide ones still take a single
                // wave of half the work each: XL at 256 tokens, down projection 0.061 -> 0.045
                // ms, shared expert 0.056 -> 0.039 ms; G's down projection (16 experts), whose
                // narrow tiles would take two waves, lost 14%. With many tiles the wide ones
                // win (S gate/up at 16384 tokens 0.227 against 0.298 ms).
                _ if wg => {
                    let per256 = if swiglu { 128 } else { 256 };
                    let sms = sm_count(dev) as usize;
                    let narrow_wins = m_tiles * n.div_ceil(per256 / 2) <= sms;
                    if n <= per256 / 2 || narrow_wins {
                        128
                    } else {
                        256
                    }
                }
                _ => {
                    // mma.sync: output columns per tile, BN/2 for SwiGLU (gate and up interleaved)
                    let per256 = if swiglu { 128 } else { 256 };
                    if n.is_multiple_of(per256) && n >= 1024 {
                        256
                    } else {
                        128
                    }
                }
            };
            let stages = match (bn, cfg.stages) {
                (128, 3) if wg => 3,
                (128, _) => 5,
                _ => 4,
            };
            // persistent kernels exist for wgmma (all tiles) and mma.sync with N tile 256
            let persistent = cfg.persistent.unwrap_or(true) && (wg || bn == 256);
            let kind = if swiglu { "swiglu" } else { "plain" };
            // Measured on an H100 at 16384 tokens (docs/benchmarks.md, run 5): the multicast
            // kernel beats the cp.async one for every gate/up projection (S 0.215 -> 0.165 ms,
            // XL 1.343 -> 1.169, G 1.991 -> 1.737) and for the down projections with at least
            // four 256-wide tiles (XL 0.650 -> 0.542, G 1.033 -> 0.954), but not for S's
            // 384-wide one (0.094 -> 0.097 ms; 0.089 -> 0.101 in an earlier run).
            // The plain multicast kernel also comes with 192-wide tiles, for outputs that 192
            // divides better than 256: 256-wide tiles compute 1280 columns for XL's 1152 (11%
            // wasted) and 512 for S's 384 (33%). With A by TMA (the down projections' A is not
            // gathered) it is the fastest down projection there (MoE run 7: XL 0.553 -> 0.51
            // ms, S 0.092 -> 0.084 ms against the best 256-wide kernels).
            let pad = |b: usize| n.div_ceil(b) * b;
            let n192 = !swiglu && pad(192) < pad(256);
            let multicast = wg && bn == 256 && persistent && cfg.multicast.unwrap_or(swiglu || n >= 1024 || n192);
            let bn = if multicast && !swiglu && (cfg.block_n == 192 || (cfg.block_n == 0 && n192)) { 192 } else { bn };
            let smem = stages * (128 * 64 * 2 + bn * 64 * 2) + 1024;
            let name = if multicast {
                format!("gg_wgmma_{kind}_n{bn}mc")
            } else {
                format!(
                    "gg_{}_{kind}_n{bn}s{stages}{}",
                    if wg { "wgmma" } else { "mma" },
                    if persistent { "p" } else { "" }
                )
            };
            let per_sm = if stages == 3 { 2 } else { 1 };
            Ok(GemmChoice {
                name,
                bm: if multicast { 256 } else { 128 },
                out_per_tile: if swiglu { bn / 2 } else { bn },
                smem: smem as u32,
                persistent: if persistent { Some(per_sm) } else { None },
                multicast,
                split_n: false,
            })
        }
        dt => bail!("grouped GEMM: unsupported dtype {dt:?}"),
    }
}

/// A `CUtensorMap` passed by value as a kernel parameter (`const __grid_constant__ GgTmaMap`).
#[repr(transparent)]
struct TensorMapArg(cudarc::driver::sys::CUtensorMap);
// SAFETY: plain bytes, copied into the kernel's parameter space by the driver.
unsafe impl cudarc::driver::DeviceRepr for TensorMapArg {}

/// The TMA descriptor of a bf16 matrix `[rows, k]` (weights: all experts' rows stacked):
/// boxes of `box_rows` rows x 64 K-values (128 bytes) with the 128-byte swizzle the wgmma
/// descriptors expect; reads past the last row or past K are zero-filled.
fn tensor_map_2d(ptr: cudarc::driver::sys::CUdeviceptr, rows: usize, k: usize, box_rows: usize) -> Result<TensorMapArg> {
    use cudarc::driver::sys::*;
    if !ptr.is_multiple_of(16) || !(k * 2).is_multiple_of(16) || rows > i32::MAX as usize || k > i32::MAX as usize {
        bail!("grouped_gemm: matrix [{rows}, {k}] at {ptr:#x} cannot be read through TMA (need 16-byte alignment)")
    }
    let dims = [k as u64, rows as u64];
    let strides = [(k * 2) as u64];
    let boxes = [64u32, box_rows as u32];
    let elem = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    let r = unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != CUresult::CUDA_SUCCESS {
        bail!("grouped_gemm: cuTensorMapEncodeTiled for [{rows}, {k}] failed: {r:?}")
    }
    Ok(TensorMapArg(unsafe { map.assume_init() }))
}

/// How many clusters of two blocks of a multicast kernel fit on the device at once (its
/// persistent grid): a cluster needs two SMs of one GPC, so this can be below SMs / 2. A
/// host-side query (no stream), so it is safe inside a CUDA-graph capture. Both multicast
/// kernels hold one block per SM (their shared memory), so the first answer serves both;
/// kernel `name` is loaded for the question only the first time.
fn max_active_pairs(dev: &CudaDevice, name: &str, smem: u32, block: u32) -> Result<u32> {
    static PAIRS: OnceLock<u32> = OnceLock::new();
    if let Some(p) = PAIRS.get() {
        return Ok(*p);
    }
    let f = gemm_fn(dev, name)?.1;
    allow_dynamic_smem(&f, smem)?;
    let sms = sm_count(dev);
    let cfg = cudarc::driver::sys::CUlaunchConfig {
        gridDimX: sms.max(2) & !1,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: std::ptr::null_mut(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    let r = unsafe { cudarc::driver::sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &cfg) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS || n < 1 {
        bail!("grouped_gemm: no cluster of two blocks fits ({r:?}, {n})")
    }
    Ok(*PAIRS.get_or_init(|| n as u32))
}

/// One grouped GEMM, checked and with its operands contiguous, ready to launch on a stream.
struct GroupedGemm {
    x: Tensor,
    order: Option<Tensor>,
    gk: u32,
    offsets: Tensor,
    b0: Tensor,
    b1: Tensor,
    choice: GemmChoice,
    cfg: GemmConfig,
    dev: CudaDevice,
    swiglu: bool,
    /// rows, output columns, K, experts
    r: usize,
    n: usize,
    kdim: usize,
    e: usize,
}

impl GroupedGemm {
    /// `None` where the product is all zeros (no rows, no columns or K = 0).
    fn new(x: &Tensor, gather: Option<&Permutation>, offsets: &Tensor, b0: &Tensor, b1: Option<&Tensor>, cfg: &GemmConfig) -> Result<Option<Self>> {
        let dev = cuda_dev(x)?;
        let dtype = x.dtype();
        let x = x.contiguous()?;
        let (xr, kdim) = x.dims2()?;
        // K and the gate/up shapes are checked by `super::grouped_dispatch`
        let (e, n, _) = b0.dims3()?;
        if e == 0 || e > 1024 {
            bail!("grouped_gemm: need 1 <= E <= 1024, got {e}")
        }
        if offsets.dims() != [e + 1] {
            bail!("grouped_gemm: offsets {:?} is not [E + 1 = {}]", offsets.dims(), e + 1)
        }
        let swiglu = b1.is_some();
        if b0.dtype() != dtype || b1.map(|b| b.dtype() != dtype).unwrap_or(false) {
            bail!("grouped_gemm: weights must have the input dtype {dtype:?}")
        }
        let r = match gather {
            Some(p) => p.rows()?,
            None => xr,
        };
        if r == 0 || n == 0 || kdim == 0 {
            return Ok(None);
        }
        if dtype == DType::BF16 && (kdim % 8 != 0 || n % 8 != 0) {
            bail!("grouped_gemm bf16: need K % 8 == 0 and N % 8 == 0, got K={kdim}, N={n}")
        }
        let b0 = b0.contiguous()?;
        let b1 = match b1 {
            Some(b) => b.contiguous()?,
            None => b0.clone(),
        };
        let aligned = kdim % 4 == 0 && [&x, &b0, &b1].iter().all(|t| t.layout().start_offset() % 4 == 0);
        let m_tiles = e * r.div_ceil(128 * e);
        let choice = gemm_choice(&dev, cfg, dtype, swiglu, n, aligned, m_tiles)?;
        Ok(Some(Self {
            order: gather.map(|p| p.order.contiguous()).transpose()?,
            gk: gather.map(|p| p.k).unwrap_or(1) as u32,
            offsets: offsets.to_dtype(DType::U32)?.contiguous()?,
            x,
            b0,
            b1,
            choice,
            cfg: *cfg,
            dev,
            swiglu,
            r,
            n,
            kdim,
            e,
        }))
    }

    /// Launches on `stream`, writing the `[r, n]` product into `out`.
    fn launch<T: CudaDType + cudarc::driver::DeviceRepr>(&self, stream: &std::sync::Arc<cudarc::driver::CudaStream>, out: &mut CudaSlice<T>) -> Result<()> {
        use cudarc::driver::DevicePtr;
        let base = &self.choice;
        let n_tiles = self.n.div_ceil(base.out_per_tile);
        // the multicast kernel adds a producer warpgroup to the two computing ones
        let block = if base.multicast { 384 } else { 256 };
        let pairs = match base.multicast {
            true => max_active_pairs(&self.dev, &base.name, base.smem, block)? as usize,
            false => 0,
        };
        // A rows not gathered (down projections, the shared expert) come by TMA
        let tma_a = base.multicast && self.order.is_none() && self.cfg.tma_a.unwrap_or(true);
        // The 192-wide plain kernel's pair tiles are 256 rows of one expert, so each expert
        // may leave a nearly empty one; with the A tile shared instead (128 rows, two N tiles)
        // the worst-case count of pair tiles can need a wave fewer. Decided on the worst case:
        // the expert sizes stay on the GPU.
        let waves = |c: &GemmChoice| c.max_units(self.r, self.e, n_tiles).div_ceil(pairs);
        let split = base.with_split_n().filter(|split| {
            tma_a
                && n_tiles.is_multiple_of(2)
                && self.x.layout().start_offset().is_multiple_of(8) // 16-byte aligned rows for the A map
                && self.cfg.split_n.unwrap_or_else(|| waves(split) < waves(base))
        });
        let ch = split.as_ref().unwrap_or(base);
        let f = gemm_fn(&self.dev, &ch.name)?.1;
        allow_dynamic_smem(&f, ch.smem)?;
        let m_tiles_max = self.r.div_ceil(ch.bm) + self.e;
        let mut grid = ch.max_units(self.r, self.e, n_tiles);
        if ch.multicast {
            grid = 2 * grid.min(pairs);
        } else if let Some(per_sm) = ch.persistent {
            grid = grid.min(sm_count(&self.dev) as usize * per_sm as usize);
        }
        if grid > u32::MAX as usize {
            bail!("grouped_gemm: grid too large")
        }
        let (e32, n32, k32, max_m32) = (self.e as u32, self.n as u32, self.kdim as u32, m_tiles_max as u32);
        view!(self.x, T, _gx, xv);
        view!(self.offsets, u32, _go, ov);
        view!(self.b0, T, _g0, b0v);
        view!(self.b1, T, _g1, b1v);
        let og = self.order.as_ref().map(|o| o.storage_and_layout());
        let orv = optional_view::<u32, _>(og.as_ref(), self.r, "grouped_gemm: permutation")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&xv);
        arg_or_null(&mut b, orv.as_ref());
        b.arg(&self.gk).arg(&ov).arg(&e32);
        // the multicast kernel reads the weights, and A where it is not gathered, through TMA
        // tensor maps (kernel parameters by value); the pointers stay valid while the views
        // are borrowed
        let mut _reads = None;
        let maps = if ch.multicast {
            let ((p0, s0), (p1, s1), (pa, sa)) =
                (b0v.device_ptr(stream), b1v.device_ptr(stream), xv.device_ptr(stream));
            _reads = Some((s0, s1, sa));
            let rows = self.e * self.n;
            // each block of the pair loads half of a plain weight tile, or SwiGLU's gate (rank
            // 0) or up (rank 1) rows of a tile's outputs, or (split N) a whole weight tile and
            // half of the shared A tile
            let boxr = if self.swiglu || ch.split_n { ch.out_per_tile } else { ch.out_per_tile / 2 };
            let (m0, m1) = (
                tensor_map_2d(p0, rows, self.kdim, boxr)?,
                tensor_map_2d(p1, rows, self.kdim, boxr)?,
            );
            // (an A that starts off 16-byte alignment keeps the cp.async loads; the split
            // kernel needs the map)
            let ma = match (tma_a, ch.split_n) {
                (_, true) => Some(tensor_map_2d(pa, self.r, self.kdim, 64)?),
                (true, false) => tensor_map_2d(pa, self.r, self.kdim, 128).ok(),
                (false, false) => None,
            };
            Some((m0, m1, ma))
        } else {
            None
        };
        match &maps {
            Some((m0, m1, ma)) => {
                b.arg(m0).arg(m1);
                // without an A map the kernel ignores the parameter; any map fills it
                b.arg(ma.as_ref().unwrap_or(m0)).arg(if ma.is_some() { &1u32 } else { &0u32 })
            }
            None => b.arg(&b0v).arg(&b1v),
        };
        b.arg(out).arg(&n32).arg(&k32);
        if ch.persistent.is_some() {
            b.arg(&max_m32);
        }
        drv(unsafe { b.launch(cfg1(grid as u32, block, ch.smem)) })?;
        Ok(())
    }

    /// A new `[r, n]` output on the device's stream, launched there.
    fn run(&self) -> Result<Tensor> {
        let stream = self.dev.cuda_stream();
        macro_rules! go {
            ($t:ty) => {{
                let mut out = unsafe { self.dev.alloc::<$t>(self.r * self.n)? };
                self.launch(&stream, &mut out)?;
                Ok(wrap(out, &self.dev, (self.r, self.n)))
            }};
        }
        match self.x.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => bail!("grouped_gemm: unsupported dtype {dt:?}"),
        }
    }
}

/// See [`super::grouped_matmul`] and [`super::grouped_gate_up`].
pub fn grouped_gemm(x: &Tensor, gather: Option<&Permutation>, offsets: &Tensor, b0: &Tensor, b1: Option<&Tensor>, cfg: &GemmConfig) -> Result<Tensor> {
    match GroupedGemm::new(x, gather, offsets, b0, b1, cfg)? {
        Some(g) => g.run(),
        None => {
            let r = gather.map(|p| p.rows()).transpose()?.unwrap_or(x.dim(0)?);
            Tensor::zeros((r, b0.dim(1)?), x.dtype(), x.device())
        }
    }
}

/// A second stream of a device, for work that can run beside the main (candle's) stream, and
/// the two events that order it: `fork` (main → side) and `join` (side → main). Events are
/// created once (not during a CUDA-graph capture) and re-recorded: a wait takes the event's
/// state at the time it is enqueued.
struct SideStream {
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    fork: cudarc::driver::CudaEvent,
    join: cudarc::driver::CudaEvent,
}

fn side_stream(dev: &CudaDevice) -> Result<&'static SideStream> {
    static SIDES: std::sync::Mutex<Vec<(usize, &'static SideStream)>> = std::sync::Mutex::new(Vec::new());
    let ctx = dev.cuda_stream().context().clone();
    let key = std::sync::Arc::as_ptr(&ctx) as usize;
    let mut sides = SIDES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = sides.iter().find(|(k, _)| *k == key) {
        return Ok(s);
    }
    let side: &'static SideStream = Box::leak(Box::new(SideStream {
        stream: drv(ctx.new_stream())?,
        fork: drv(ctx.new_event(None))?,
        join: drv(ctx.new_event(None))?,
    }));
    sides.push((key, side));
    Ok(side)
}

/// The output of work launched on the side stream; [`Beside::join`] makes the main stream wait
/// for it. It holds the work's inputs and intermediates: their memory is freed on the main
/// stream, so it must not be returned there before the join (dropping a `Beside` joins too).
pub struct Beside {
    out: Option<Tensor>,
    _keep: Vec<Tensor>,
    main: std::sync::Arc<cudarc::driver::CudaStream>,
    side: &'static SideStream,
}

impl Beside {
    /// The main stream waits for the side work; its output is then safe to use there.
    pub fn join(mut self) -> Result<Tensor> {
        drv(self.main.wait(&self.side.join))?;
        Ok(self.out.take().expect("joined once"))
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.main.wait(&self.side.join);
        }
    }
}

/// The shared expert `down(silu(gate x) ⊙ up x)` (see [`super::swiglu_mlp`]) launched on the
/// side stream, so that it runs while the main stream routes the tokens (router matmul, gating
/// and sort are small, latency-bound launches that leave most SMs idle). Every buffer it
/// writes is allocated on the main stream before the fork, so the stream-ordered allocator
/// cannot hand the side stream memory that pending main-stream work still uses.
pub fn swiglu_mlp_beside(x: &Tensor, w: &super::SwigluWeights, cfg: &GemmConfig) -> Result<Beside> {
    let dev = cuda_dev(x)?;
    let side = side_stream(&dev)?;
    let main = dev.cuda_stream();
    let s = x.dim(0)?;
    if s == 0 {
        return Ok(Beside { out: Some(Tensor::zeros((0, w.down.dim(0)?), x.dtype(), x.device())?), _keep: vec![], main, side });
    }
    let offsets = dense_offsets(x.device(), s)?;
    let (gate, up, down) = (w.gate.unsqueeze(0)?, w.up.unsqueeze(0)?, w.down.unsqueeze(0)?);
    let gu = GroupedGemm::new(x, None, &offsets, &gate, Some(&up), cfg)?;
    let i = w.gate.dim(0)?;
    let d = w.down.dim(0)?;
    macro_rules! go {
        ($t:ty) => {{
            let mut h = unsafe { dev.alloc::<$t>(s * i)? };
            let mut out = unsafe { dev.alloc::<$t>(s * d)? };
            drv(side.fork.record(&main))?;
            drv(side.stream.wait(&side.fork))?;
            if let Some(gu) = &gu {
                gu.launch(&side.stream, &mut h)?;
            }
            // (host-side only: h, offsets and the weights are contiguous already, so building
            // the down projection enqueues nothing on the main stream)
            let h = wrap(h, &dev, (s, i));
            let dn = GroupedGemm::new(&h, None, &offsets, &down, None, cfg)?;
            match &dn {
                Some(dn) => dn.launch(&side.stream, &mut out)?,
                None => bail!("swiglu_mlp_beside: empty shared expert {:?}", w.down.dims()),
            }
            drv(side.join.record(&side.stream))?;
            (h, wrap(out, &dev, (s, d)))
        }};
    }
    let (h, out) = match x.dtype() {
        DType::F32 => go!(f32),
        DType::BF16 => go!(half::bf16),
        dt => bail!("swiglu_mlp_beside: unsupported dtype {dt:?}"),
    };
    Ok(Beside { out: Some(out), _keep: vec![x.clone(), h, offsets, gate, up, down], main, side })
}
