//! CUDA launches of `kernels/tensor_ops.cu` (see [`super::ops`] for the semantics).
use crate::runtime::cuda::{arg_or_null, by_dtype, cfg1, cuda_dev, drv, dtype_suffix as suffix, grid_for, optional_view, view, wrap, Func, NvrtcModule};
use candle_core::cuda_backend::{cudarc, CudaDevice};
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};
use half::bf16;

static MODULE: NvrtcModule = NvrtcModule::new(nvrtc_source!("tensor_ops.cu"), "ditmoe_tensor_ops");

fn func(dev: &CudaDevice, name: &str) -> Result<Func> {
    MODULE.func(dev, name)
}

pub fn bias_cast(y: &Tensor, bias: Option<&Tensor>, out_dtype: DType) -> Result<Tensor> {
    let cols = y.dim(candle_core::D::Minus1)?;
    if let Some(b) = bias {
        if b.dims() != [cols] || b.dtype() != y.dtype() {
            bail!("bias_cast: bias {:?} {:?} does not match y {:?} {:?}", b.dims(), b.dtype(), y.dims(), y.dtype())
        }
    }
    let dev = cuda_dev(y)?;
    let y = y.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let total = y.elem_count();
    let name = format!("bias_cast_{}_{}", suffix(y.dtype(), "bias_cast")?, suffix(out_dtype, "bias_cast")?);
    let f = func(&dev, &name)?;
    let (c32, n64) = (cols as u32, total as u64);
    by_dtype!(y.dtype(), I, {
        view!(y, I, _gy, yv);
        let bg = bias.as_ref().map(|t| t.storage_and_layout());
        let bv = optional_view::<I, _>(bg.as_ref(), cols, "bias_cast: bias")?;
        by_dtype!(out_dtype, O, {
            let mut out = unsafe { dev.alloc::<O>(total)? };
            let mut b = f.0.launch_builder(&f.1);
            b.arg(&yv);
            arg_or_null(&mut b, bv.as_ref());
            b.arg(&c32).arg(&n64).arg(&mut out);
            drv(unsafe { b.launch(cfg1(grid_for(total), 256, 0)) })?;
            Ok(wrap(out, &dev, y.shape().clone()))
        })
    })
}

/// The layout argument of `strided_copy_*` (`struct View6` in the kernel source).
#[repr(C)]
#[derive(Clone, Copy)]
struct View6 {
    dims: [u32; 6],
    strides: [u64; 6],
    offset: u64,
    rank: u32,
}
unsafe impl DeviceRepr for View6 {}

pub fn strided_copy(t: &Tensor) -> Result<Tensor> {
    let dev = cuda_dev(t)?;
    let l = t.layout();
    let mut v = View6 { dims: [1; 6], strides: [0; 6], offset: l.start_offset() as u64, rank: t.rank() as u32 };
    for (i, (&d, &s)) in l.dims().iter().zip(l.stride()).enumerate() {
        v.dims[i] = d as u32;
        v.strides[i] = s as u64;
    }
    let total = t.elem_count();
    let n64 = total as u64;
    let (g, _) = t.storage_and_layout();
    let Storage::Cuda(c) = &*g else { bail!("strided_copy: expected a CUDA tensor") };
    let vectors = vector_view(&v, t.dtype().size_in_bytes(), total);
    macro_rules! go {
        ($ty:ty, $name:expr) => {{
            let src = c.as_cuda_slice::<$ty>()?;
            let mut out = unsafe { dev.alloc::<$ty>(total)? };
            if let Some((vv, n)) = &vectors {
                let f = func(&dev, "strided_copy_v16")?;
                let mut b = f.0.launch_builder(&f.1);
                b.arg(src).arg(vv).arg(n).arg(&mut out);
                drv(unsafe { b.launch(cfg1(grid_for(*n as usize), 256, 0)) })?;
            } else {
                let f = func(&dev, $name)?;
                let mut b = f.0.launch_builder(&f.1);
                b.arg(src).arg(&v).arg(&n64).arg(&mut out);
                drv(unsafe { b.launch(cfg1(grid_for(total), 256, 0)) })?;
            }
            Ok(wrap(out, &dev, t.shape().clone()))
        }};
    }
    match t.dtype() {
        DType::BF16 => go!(bf16, "strided_copy_u16"),
        DType::F16 => go!(half::f16, "strided_copy_u16"),
        DType::F32 => go!(f32, "strided_copy_u32"),
        DType::U32 => go!(u32, "strided_copy_u32"),
        dt => bail!("strided_copy: unsupported dtype {dt:?}"),
    }
}

/// The view in 16-byte units for `strided_copy_v16`, with the number of units, when it is one:
/// the innermost dim contiguous, its size, every other stride and the offset whole multiples of
/// 16 bytes (so every unit is aligned), and all indices within 32 bits.
fn vector_view(v: &View6, elem_bytes: usize, total: usize) -> Option<(View6, u32)> {
    let per = (16 / elem_bytes) as u64;
    let last = (v.rank as usize).checked_sub(1)?;
    let aligned = v.strides[last] == 1
        && (v.dims[last] as u64).is_multiple_of(per)
        && v.offset.is_multiple_of(per)
        && (0..last).all(|d| v.dims[d] == 1 || v.strides[d].is_multiple_of(per));
    if !aligned || total == 0 {
        return None;
    }
    let mut w = *v;
    w.dims[last] = (v.dims[last] as u64 / per) as u32;
    w.offset = v.offset / per;
    for d in 0..last {
        w.strides[d] = if v.dims[d] == 1 { 0 } else { v.strides[d] / per };
    }
    let units = total as u64 / per;
    let max_off = w.offset + (0..=last).map(|d| (w.dims[d] as u64 - 1) * w.strides[d]).sum::<u64>();
    (units <= u32::MAX as u64 && max_off <= u32::MAX as u64).then_some((w, units as u32))
}
