//! The device memory in use and its peak (`ditmoe train --profile`, `examples/bench_train`,
//! the trainer's out-of-memory report): what `torch.cuda.memory_allocated` and
//! `torch.cuda.max_memory_allocated` report for PyTorch. candle allocates every tensor with
//! `cuMemAllocAsync` from the device's default memory pool, whose `USED_MEM_CURRENT` and
//! `USED_MEM_HIGH` attributes count the bytes handed out to tensors (freed blocks the pool
//! keeps for reuse are not counted; cuBLAS's workspace, allocated outside the pool, is not
//! either). Setting `USED_MEM_HIGH` to 0 starts a new peak window.
use candle_core::{Device, Result};

/// Starts a new peak window on `device` (nothing on the CPU).
pub fn reset_peak(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => pool_attribute(d, PoolAttribute::UsedHigh, &mut 0, true),
        _ => Ok(()),
    }
}

/// The most bytes in use at once since the last [`reset_peak`]; None on the CPU.
pub fn peak_bytes(device: &Device) -> Result<Option<u64>> {
    pool_value(device, PoolAttribute::UsedHigh)
}

/// The bytes handed out to live tensors now (`torch.cuda.memory_allocated`); None on the CPU.
pub fn in_use_bytes(device: &Device) -> Result<Option<u64>> {
    pool_value(device, PoolAttribute::UsedCurrent)
}

/// The bytes the pool holds in freed blocks (reserved but not in use): free for this process's
/// next tensors, though the driver counts them as used (`cuMemGetInfo`). None on the CPU.
pub fn pooled_free_bytes(device: &Device) -> Result<Option<u64>> {
    let reserved = pool_value(device, PoolAttribute::ReservedCurrent)?;
    Ok(reserved.zip(in_use_bytes(device)?).map(|(reserved, used)| reserved.saturating_sub(used)))
}

/// `bytes` in GiB, as the memory reports print them.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Whether `e` is the CUDA allocator running out of device memory.
pub fn is_out_of_memory(e: &candle_core::Error) -> bool {
    format!("{e:?}").contains("OUT_OF_MEMORY")
}

/// The device's default pool's `attribute`; None on the CPU.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn pool_value(device: &Device, attribute: PoolAttribute) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let mut value = 0u64;
            pool_attribute(d, attribute, &mut value, false)?;
            Ok(Some(value))
        }
        _ => Ok(None),
    }
}

#[derive(Clone, Copy)]
enum PoolAttribute {
    UsedHigh,
    UsedCurrent,
    ReservedCurrent,
}

/// Reads (`set` false) or writes the default pool's `attribute` through `value`.
#[cfg(feature = "cuda")]
fn pool_attribute(dev: &candle_core::CudaDevice, attribute: PoolAttribute, value: &mut u64, set: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let attr = match attribute {
        PoolAttribute::UsedHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        PoolAttribute::UsedCurrent => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        PoolAttribute::ReservedCurrent => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
    };
    // Safety: `pool` receives the device's default pool; the attribute is a u64.
    let status = unsafe {
        match sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) {
            sys::CUresult::CUDA_SUCCESS if set => sys::cuMemPoolSetAttribute(pool, attr, value as *mut u64 as *mut std::ffi::c_void),
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolGetAttribute(pool, attr, value as *mut u64 as *mut std::ffi::c_void),
            e => e,
        }
    };
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => candle_core::bail!("cuda: the memory pool's bytes in use: {e:?}"),
    }
}
