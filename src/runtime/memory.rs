//! The peak of the device memory in use (`ditmoe train --profile`, `examples/bench_train`):
//! what `torch.cuda.max_memory_allocated` reports for PyTorch. candle allocates every tensor
//! with `cuMemAllocAsync` from the device's default memory pool, whose `USED_MEM_HIGH`
//! attribute is the high-water mark of the bytes handed out to tensors (freed blocks the pool
//! keeps for reuse are not counted; cuBLAS's workspace, allocated outside the pool, is not
//! either). Setting the attribute to 0 starts a new window.
use candle_core::{Device, Result};

/// Starts a new peak window on `device` (nothing on the CPU).
pub fn reset_peak(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => pool_attribute(d, &mut 0, true),
        _ => Ok(()),
    }
}

/// The most bytes in use at once since the last [`reset_peak`]; None on the CPU.
pub fn peak_bytes(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let mut high = 0u64;
            pool_attribute(d, &mut high, false)?;
            Ok(Some(high))
        }
        _ => Ok(None),
    }
}

/// Reads (`set` false) or writes the default pool's `USED_MEM_HIGH` through `value`.
#[cfg(feature = "cuda")]
fn pool_attribute(dev: &candle_core::CudaDevice, value: &mut u64, set: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
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
        e => candle_core::bail!("cuda: the memory pool's peak: {e:?}"),
    }
}
