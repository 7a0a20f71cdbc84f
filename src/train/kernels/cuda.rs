//! CUDA launches of `kernels/foreach.cu` (see [`super::foreach`] for the semantics): one table
//! of device pointers per call, one launch for every tensor of the lists.
use crate::runtime::cuda::{cfg1, cuda_dev, drv, Func, NvrtcModule};
use super::foreach::AdamWUpdate;
use candle_core::cuda_backend::{cudarc, CudaDevice};
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg};

const SRC: &str = nvrtc_source!("foreach.cu");
/// Elements per block and threads per block (`CHUNK`, `THREADS` in the source).
const CHUNK: usize = 4096;
const THREADS: u32 = 256;

static MODULE: NvrtcModule = NvrtcModule::new(SRC, "ditmoe_foreach");

fn func(dev: &CudaDevice, name: &str) -> Result<Func> {
    MODULE.func(dev, name)
}

/// The kernels' table for operand lists of equal length and matching sizes: the element
/// offsets `starts[0..=n]`, then one array of n device pointers per list. Returns the table on
/// the device, the element total and the list length.
///
/// The lists at indices `in_place` are written by the kernel: their tensors must not overlap
/// (an element updated twice in one launch, say moments made as clones of one zero tensor,
/// would silently corrupt the optimizer state), so the op `what` is refused if they do.
///
/// The pointers stay valid while the caller holds the tensors (candle frees a storage only
/// when its last tensor goes), and the kernels run on candle's stream, ordered after every
/// op that produced them.
fn table(dev: &CudaDevice, what: &str, lists: &[&[Tensor]], in_place: &[usize]) -> Result<(CudaSlice<u64>, usize, usize)> {
    let n = lists[0].len();
    let stream = dev.cuda_stream();
    let mut tab = Vec::with_capacity((lists.len() + 1) * n + 1);
    let mut total = 0usize;
    tab.push(0u64);
    for t in lists[0] {
        total += t.elem_count();
        tab.push(total as u64);
    }
    let mut written: Vec<(u64, u64)> = Vec::new();
    for (li, list) in lists.iter().enumerate() {
        if list.len() != n {
            bail!("{what}: operand lists of {} and {n} tensors", list.len());
        }
        for (i, t) in list.iter().enumerate() {
            if t.elem_count() != lists[0][i].elem_count() {
                bail!("{what}: tensor {i} has {} elements in one list and {} in another", t.elem_count(), lists[0][i].elem_count());
            }
            let (g, l) = t.storage_and_layout();
            let Some((o, e)) = l.contiguous_offsets() else { bail!("{what}: tensor {i} is not contiguous") };
            let ptr = match &*g {
                Storage::Cuda(c) => match t.dtype() {
                    DType::F32 => element_ptr(c.as_cuda_slice::<f32>()?, o, e, &stream),
                    DType::BF16 => element_ptr(c.as_cuda_slice::<half::bf16>()?, o, e, &stream),
                    dt => bail!("{what}: tensor {i} is {dt:?}, the kernels take f32 and bf16"),
                },
                _ => bail!("{what}: tensor {i} is not on the GPU"),
            };
            if in_place.contains(&li) && e > o {
                written.push((ptr, ptr + (t.dtype().size_in_bytes() * (e - o)) as u64));
            }
            tab.push(ptr);
        }
    }
    written.sort_unstable();
    if written.windows(2).any(|w| w[1].0 < w[0].1) {
        bail!("{what}: tensors updated in place share storage (make each one its own tensor, e.g. zeros_like per moment, not clones)")
    }
    Ok((stream.clone_htod(&tab).map_err(candle_core::Error::wrap)?, total, n))
}

/// The device address of element `o` of `s` (elements `o..e` are the tensor's).
fn element_ptr<T: DeviceRepr>(s: &CudaSlice<T>, o: usize, e: usize, stream: &CudaStream) -> u64 {
    let view = s.slice(o..e);
    let (p, _sync) = view.device_ptr(stream);
    p
}

/// The entry point of kernel `base` for the element type of `t` (`_f32` or `_bf16`).
fn for_dtype(dev: &CudaDevice, base: &str, t: &Tensor) -> Result<Func> {
    match t.dtype() {
        DType::F32 => func(dev, &format!("{base}_f32")),
        DType::BF16 => func(dev, &format!("{base}_bf16")),
        dt => bail!("{base}: no kernel for {dt:?}"),
    }
}

fn blocks(total: usize) -> u32 {
    total.div_ceil(CHUNK) as u32
}

pub fn sum_of_squares(ts: &[Tensor]) -> Result<f32> {
    let dev = cuda_dev(&ts[0])?;
    let (tab, total, n) = table(&dev, "sum_of_squares", &[ts], &[])?;
    if total == 0 {
        return Ok(0.0);
    }
    let nb = blocks(total);
    let mut partial = unsafe { dev.alloc::<f32>(nb as usize)? };
    let mut out = unsafe { dev.alloc::<f32>(1)? };
    let n32 = n as i32;
    let f = for_dtype(&dev, "foreach_sumsq_partial", &ts[0])?;
    let mut b = f.0.launch_builder(&f.1);
    b.arg(&tab).arg(&n32).arg(&mut partial);
    drv(unsafe { b.launch(cfg1(nb, THREADS, 0)) })?;
    let f = func(&dev, "foreach_sum_partials")?;
    let nb32 = nb as i32;
    let mut b = f.0.launch_builder(&f.1);
    b.arg(&partial).arg(&nb32).arg(&mut out);
    drv(unsafe { b.launch(cfg1(1, THREADS, 0)) })?;
    let host = f.0.clone_dtoh(&out).map_err(candle_core::Error::wrap)?;
    Ok(host[0])
}

/// `copies`: the bf16 model copies to write from the updated masters, or empty.
pub fn adamw(params: &[Tensor], copies: &[Tensor], grads: &[Tensor], m: &[Tensor], v: &[Tensor], u: &AdamWUpdate) -> Result<()> {
    let dev = cuda_dev(&params[0])?;
    let copy = !copies.is_empty();
    let (tab, total, n) = match copy {
        true => table(&dev, "AdamW", &[params, grads, m, v, copies], &[0, 2, 3, 4])?,
        false => table(&dev, "AdamW", &[params, grads, m, v], &[0, 2, 3])?,
    };
    if total == 0 {
        return Ok(());
    }
    let f = for_dtype(&dev, "foreach_adamw", &grads[0])?;
    let (n32, copy) = (n as i32, copy as i32);
    // The constants as candle's scalar ops would pass them (f64 rounded to f32).
    let (gscale, b1, omb1, b2, omb2) = (u.grad_scale.unwrap_or(1.0) as f32, u.beta1 as f32, (1.0 - u.beta1) as f32, u.beta2 as f32, (1.0 - u.beta2) as f32);
    let (decay, apply_decay) = (u.decay.unwrap_or(1.0) as f32, u.decay.is_some() as i32);
    let (inv_bc2, eps, step) = (u.inv_bias_correction2 as f32, u.eps as f32, u.step_size as f32);
    let mut b = f.0.launch_builder(&f.1);
    b.arg(&tab).arg(&n32).arg(&copy).arg(&gscale).arg(&b1).arg(&omb1).arg(&b2).arg(&omb2).arg(&decay).arg(&apply_decay).arg(&inv_bc2).arg(&eps).arg(&step);
    // SAFETY: the table holds n pointers per list into live storages of the sizes its offsets
    // give, of the dtypes the kernel reads (f32 p, m, v; the gradients' dtype picked the entry
    // point; bf16 copies, checked by the caller); p, m, v and the copies are written in place,
    // which is what `Var::set` and the moment replacement of the candle path amount to (the
    // caller owns m and v alone).
    drv(unsafe { b.launch(cfg1(blocks(total), THREADS, 0)) })?;
    Ok(())
}

pub fn ema(ema: &[Tensor], params: &[Tensor], decay: f64) -> Result<()> {
    let dev = cuda_dev(&ema[0])?;
    let (tab, total, n) = table(&dev, "EMA", &[ema, params], &[0])?;
    if total == 0 {
        return Ok(());
    }
    let f = func(&dev, "foreach_ema")?;
    let (n32, d, omd) = (n as i32, decay as f32, (1.0 - decay) as f32);
    let mut b = f.0.launch_builder(&f.1);
    b.arg(&tab).arg(&n32).arg(&d).arg(&omd);
    // SAFETY: as in `adamw`; the averages are written in place (the caller owns them alone).
    drv(unsafe { b.launch(cfg1(blocks(total), THREADS, 0)) })?;
    Ok(())
}
