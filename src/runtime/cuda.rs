//! The CUDA runtime every kernel family shares: NVRTC compilation of the sources in `kernels/`
//! (once per process, cached on disk), the GPU generation they are compiled for, and the helpers
//! that turn candle tensors into kernel arguments and kernel outputs back into tensors.
use candle_core::cuda_backend::{cudarc, CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Result, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use std::sync::OnceLock;

/// The GPU generation the kernels are compiled for (the first device's).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// NVRTC target, one of [`ARCHS`].
    pub arch: &'static str,
    /// Whether the Hopper wgmma kernels exist (sm_90a).
    pub has_wgmma: bool,
}

/// Every NVRTC target [`target`] chooses. The kernels need sm_80 (bf16 conversions, `cp.async`,
/// the bf16 and TF32 tensor-core `mma`); newer GPUs than Hopper run the sm_90 PTX.
pub const ARCHS: [&str; 6] = ["sm_90a", "sm_90", "sm_89", "sm_87", "sm_86", "sm_80"];

/// The compile target for `dev`'s compute capability (decided once per process); an error
/// before Ampere (compute capability 8.0).
pub fn target(dev: &CudaDevice) -> Result<Target> {
    static TARGET: OnceLock<std::result::Result<Target, String>> = OnceLock::new();
    let t = TARGET.get_or_init(|| {
        let (maj, min) = dev.cuda_stream().context().compute_capability().map_err(|e| format!("{e:?}"))?;
        let arch: &'static str = match (maj, min) {
            (9, 0) => "sm_90a",
            (8, 6) => "sm_86",
            (8, 7) => "sm_87",
            (8, 9) => "sm_89",
            (m, _) if m >= 9 => "sm_90",
            (8, _) => "sm_80",
            _ => {
                return Err(format!(
                    "this GPU has compute capability {maj}.{min}; ditmoe's CUDA kernels need 8.0 or newer (Ampere: bf16 and cp.async). Run with --device cpu"
                ))
            }
        };
        Ok(Target { arch, has_wgmma: arch == "sm_90a" })
    });
    t.clone().map_err(candle_core::Error::Msg)
}

/// Compiles one kernel source (`kernels/common.cuh` then the file, as `nvrtc_source!` joins
/// them) to PTX for `arch`. Needs NVRTC, not a GPU: `tests/gpu.rs` compiles every source for
/// every target on the build machine.
pub fn compile_ptx(src: &str, arch: &'static str) -> std::result::Result<String, String> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map(|p| p.to_src())
        .map_err(|e| format!("nvrtc ({arch}): {e:?}"))
}

/// NVRTC with an on-disk cache of the PTX (`$DITMOE_KERNEL_CACHE`, default
/// `<tmp>/ditmoe-kernels`), keyed by the source, the target and the NVRTC version, so that a
/// process started again skips the few seconds of compilation.
pub(crate) fn nvrtc_cached(src: &str, arch: &'static str) -> std::result::Result<String, String> {
    use std::hash::{Hash, Hasher};
    let (mut maj, mut min) = (0i32, 0i32);
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (src, arch, maj, min).hash(&mut h);
    let dir = std::env::var_os("DITMOE_KERNEL_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("ditmoe-kernels"));
    let path = dir.join(format!("{:016x}-{arch}.ptx", h.finish()));
    if let Ok(p) = std::fs::read_to_string(&path) {
        if p.contains(".entry") {
            return Ok(p);
        }
    }
    let ptx = compile_ptx(src, arch)?;
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

/// A kernel source of `kernels/` compiled by NVRTC once per process (for the first device's
/// generation) and loaded into each device under its module name.
pub(crate) struct NvrtcModule {
    src: &'static str,
    module: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl NvrtcModule {
    pub(crate) const fn new(src: &'static str, module: &'static str) -> Self {
        Self { src, module, ptx: OnceLock::new() }
    }

    /// Kernel `name` on `dev`, with the stream to launch it on (candle's).
    pub(crate) fn func(&self, dev: &CudaDevice, name: &str) -> Result<Func> {
        let arch = target(dev)?.arch;
        let ptx = self.ptx.get_or_init(|| nvrtc_cached(self.src, arch)).as_ref().map_err(|e| candle_core::Error::Msg(e.clone()))?;
        let f = dev.get_or_load_custom_func(name, self.module, ptx)?;
        Ok((dev.cuda_stream(), f.into_cuda_function()))
    }
}

pub(crate) type Func = (
    std::sync::Arc<cudarc::driver::CudaStream>,
    cudarc::driver::CudaFunction,
);

pub(crate) fn drv<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| candle_core::Error::Msg(format!("cuda: {e:?}")))
}

pub(crate) fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => bail!("expected a CUDA tensor, got {d:?}"),
    }
}

pub(crate) fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// `let (guard, view, byte_offset) = ...`: a contiguous view of a CUDA tensor's storage.
macro_rules! view {
    ($t:expr, $ty:ty, $g:ident, $v:ident) => {
        let ($g, layout) = $t.storage_and_layout();
        let (o, e) = match layout.contiguous_offsets() {
            Some(x) => x,
            None => bail!("expected a contiguous tensor"),
        };
        let $v = match &*$g {
            Storage::Cuda(c) => c.as_cuda_slice::<$ty>()?.slice(o..e),
            _ => bail!("expected a CUDA tensor"),
        };
    };
}

pub(crate) use view;

/// Copies an f32 CUDA tensor's values into `host`, resized to fit and otherwise reused: a
/// buffer filled every step (the host EMA's copy of each weight) is not faulted in again each
/// time, as a fresh `to_vec1` would be.
pub(crate) fn copy_to_host(t: &Tensor, host: &mut Vec<f32>) -> Result<()> {
    let dev = cuda_dev(t)?;
    let t = t.contiguous()?;
    view!(t, f32, guard, v);
    host.resize(v.len(), 0.0);
    let stream = dev.cuda_stream();
    drv(stream.memcpy_dtoh(&v, host.as_mut_slice()))?;
    drv(stream.synchronize())
}

/// The null pointer passed for an absent optional kernel argument.
pub(crate) const NULL: u64 = 0;

/// The first `len` elements of a tensor's storage (`storage_and_layout`'s guard) as a kernel
/// argument.
pub(crate) fn view_of<'a, T: CudaDType + cudarc::driver::DeviceRepr, G: std::ops::Deref<Target = Storage>>(
    (g, l): &'a (G, &'a candle_core::Layout),
    len: usize,
    what: &str,
) -> Result<cudarc::driver::CudaView<'a, T>> {
    match &**g {
        Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?.slice(l.start_offset()..l.start_offset() + len)),
        _ => bail!("{what} must be on the GPU"),
    }
}

/// [`view_of`] an optional tensor (None: the kernel gets a null pointer, see [`arg_or_null`]).
pub(crate) fn optional_view<'a, T: CudaDType + cudarc::driver::DeviceRepr, G: std::ops::Deref<Target = Storage>>(
    guard: Option<&'a (G, &'a candle_core::Layout)>,
    len: usize,
    what: &str,
) -> Result<Option<cudarc::driver::CudaView<'a, T>>> {
    guard.map(|g| view_of(g, len, what)).transpose()
}

/// Pushes an optional view, or [`NULL`] where it is absent.
pub(crate) fn arg_or_null<'a, 'b: 'a, 'c: 'b, T>(b: &mut cudarc::driver::LaunchArgs<'a>, v: Option<&'b cudarc::driver::CudaView<'c, T>>) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

/// Lets `f` use `bytes` of dynamic shared memory (beyond the default 48 KiB it must opt in).
pub(crate) fn allow_dynamic_smem(f: &cudarc::driver::CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        drv(f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        ))?;
    }
    Ok(())
}

/// A one-dimensional launch: `grid` blocks (at least one) of `block` threads.
pub(crate) fn cfg1(grid: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Blocks of 256 threads for a grid-stride loop over `total` elements.
pub(crate) fn grid_for(total: usize) -> u32 {
    total.div_ceil(256).clamp(1, 1 << 20) as u32
}

/// The kernel-name suffix of an element type (f32 or bf16).
pub(crate) fn dtype_suffix(dt: DType, what: &str) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        dt => bail!("{what}: unsupported dtype {dt:?} (f32 or bf16)"),
    }
}

/// Dispatches `$body` with `$t` bound to the Rust element type of `$dt` (f32 or bf16).
macro_rules! by_dtype {
    ($dt:expr, $t:ident, $body:block) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            dt => bail!("unsupported dtype {dt:?}"),
        }
    };
}

pub(crate) use by_dtype;
