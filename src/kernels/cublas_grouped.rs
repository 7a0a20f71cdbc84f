//! cuBLAS's grouped batched GEMM (`cublasGemmGroupedBatchedEx`, CUDA 12.5+) over
//! expert-contiguous rows: the library alternative to the grouped kernels of
//! `kernels/grouped_gemm.cu`, which `bench_moe` measures against them (the GPU issue asks for
//! whichever is faster). It cannot replace them in the model: its per-group sizes are *host*
//! arrays, so the per-expert row counts must be read back first (the host synchronisation the
//! fused path avoids, and which a CUDA graph cannot capture), and it fuses neither the row
//! gather nor the SwiGLU epilogue.
use super::cuda::view;
use candle_core::cuda_backend::cudarc::{self, cublas::sys};
use candle_core::{bail, DType, Result, Storage, Tensor};

/// `out[r] = x[r] · w[e]ᵀ` for expert `e`'s rows `offsets[e] .. offsets[e + 1]` (host offsets):
/// `x` `[R, K]`, `w` `[E, N, K]` bf16 → `[R, N]` bf16, f32 accumulation; one group per expert
/// with rows (cuBLAS is column-major: each product runs as `outᵀ = w[e] · xᵀ`).
pub fn grouped_matmul(x: &Tensor, offsets: &[usize], w: &Tensor) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let ((r, k), (e, n, kw)) = (x.dims2()?, w.dims3()?);
    if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || kw != k || offsets.len() != e + 1 || offsets[e] != r {
        bail!("cublas grouped_matmul: x {:?} {:?}, w {:?} {:?}, {} offsets ending at {:?}", x.dims(), x.dtype(), w.dims(), w.dtype(), offsets.len(), offsets.last())
    }
    let out = Tensor::zeros((r, n), DType::BF16, x.device())?;
    if r == 0 {
        return Ok(out);
    }
    let dev = x.device().as_cuda_device()?;
    let stream = dev.cuda_stream();
    {
        view!(x, half::bf16, _gx, xv);
        view!(w, half::bf16, _gw, wv);
        view!(out, half::bf16, _go, ov);
        let ((px, _sx), (pw, _sw), (po, _so)) = (
            cudarc::driver::DevicePtr::device_ptr(&xv, &stream),
            cudarc::driver::DevicePtr::device_ptr(&wv, &stream),
            cudarc::driver::DevicePtr::device_ptr(&ov, &stream),
        );
        let groups: Vec<(usize, usize)> = offsets.windows(2).enumerate().filter(|(_, o)| o[1] > o[0]).map(|(g, o)| (g, o[0])).collect();
        let rows: Vec<i32> = offsets.windows(2).filter(|o| o[1] > o[0]).map(|o| (o[1] - o[0]) as i32).collect();
        let count = groups.len();
        // device arrays of device pointers, one problem per group: A' = w[e], B' = x rows, C' = out rows
        let ptrs = |f: &dyn Fn(usize, usize) -> u64| -> Vec<u64> { groups.iter().map(|&(g, o)| f(g, o)).collect() };
        let a = stream.clone_htod(&ptrs(&|g, _| pw + (g * n * k * 2) as u64)).map_err(candle_core::Error::wrap)?;
        let b = stream.clone_htod(&ptrs(&|_, o| px + (o * k * 2) as u64)).map_err(candle_core::Error::wrap)?;
        let c = stream.clone_htod(&ptrs(&|_, o| po + (o * n * 2) as u64)).map_err(candle_core::Error::wrap)?;
        let ((pa, _a), (pb, _b), (pc, _c)) = (
            cudarc::driver::DevicePtr::device_ptr(&a, &stream),
            cudarc::driver::DevicePtr::device_ptr(&b, &stream),
            cudarc::driver::DevicePtr::device_ptr(&c, &stream),
        );
        let same = |v: i32| vec![v; count];
        let (ta, tb) = (vec![sys::cublasOperation_t::CUBLAS_OP_T; count], vec![sys::cublasOperation_t::CUBLAS_OP_N; count]);
        let (alpha, beta, ones) = (vec![1f32; count], vec![0f32; count], same(1));
        let blas = dev.cublas_handle();
        // SAFETY: every pointer array holds `count` device pointers into live, contiguous
        // tensors of the sizes the host arrays give; the host arrays outlive the call, which
        // only enqueues work on the handle's stream (candle's stream, as for every matmul).
        let status = unsafe {
            sys::cublasGemmGroupedBatchedEx(
                *blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                same(n as i32).as_ptr(),
                rows.as_ptr(),
                same(k as i32).as_ptr(),
                alpha.as_ptr().cast(),
                pa as *const *const std::ffi::c_void,
                sys::cudaDataType_t::CUDA_R_16BF,
                same(k as i32).as_ptr(),
                pb as *const *const std::ffi::c_void,
                sys::cudaDataType_t::CUDA_R_16BF,
                same(k as i32).as_ptr(),
                beta.as_ptr().cast(),
                pc as *const *mut std::ffi::c_void,
                sys::cudaDataType_t::CUDA_R_16BF,
                same(n as i32).as_ptr(),
                count as i32,
                ones.as_ptr(),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cublasGemmGroupedBatchedEx: {status:?}")
        }
    }
    Ok(out)
}
