//! `GraphedForward`: a forward function of any number of input tensors replayed as one CUDA
//! graph (a DiT step takes x, t and labels; a decoder step its tokens and positions).
//!
//! A DiT-MoE forward issues a few hundred small kernels; at batch 1 a GPU finishes each long
//! before the host has launched the next, so the pass is bound by launch overhead (the official
//! code is worse still: it syncs with the host in every MoE layer). Our forward never waits on
//! the device (the fused MoE path keeps routing on the GPU), so the whole pass can be captured
//! once into a CUDA graph and replayed with a single launch, the technique of
//! `torch.cuda.graphs` / vLLM's decode graphs.
//!
//! How: the first call with a given set of input shapes and dtypes runs eagerly (it loads
//! kernels, creates cuBLAS state and fills the allocator). The second captures the pass on
//! static input buffers: everything allocated inside the capture is also freed inside it, and
//! the result is copied into a static output allocated beforehand, so the graph owns no memory
//! across launches. Later calls copy their inputs into the static buffers, launch the graph and
//! hand back a copy of the output. A new shape or dtype captures again. On the CPU, and on a
//! CUDA build whose device is not a GPU, every call simply runs the function.
//!
//! The captured function must be a pure function of its inputs on the GPU: no host reads and
//! no host data that changes between calls (checked: capturing fails on either, and then this
//! type keeps running eagerly, see [`GraphedForward::capture_error`]), no host-side randomness.
//! Host-to-device copies of small constants (candle's layout parameters for strided kernels)
//! go through candle's graph upload cache, so the replay reads them from device buffers that
//! outlive the capture.
use candle_core::{DType, Device, Result, Shape, Tensor};

/// The input shapes and dtypes a graph was captured for.
type Key = Vec<(Shape, DType)>;

pub struct GraphedForward<F> {
    f: F,
    /// The key of the last eager call, whose output shape the capture needs.
    warmed: Option<(Key, Shape, DType)>,
    #[cfg(feature = "cuda")]
    graph: Option<Captured>,
    capture_error: Option<String>,
    replays: usize,
}

#[cfg(feature = "cuda")]
struct Captured {
    key: Key,
    inputs: Vec<Tensor>,
    out: Tensor,
    exec: Option<candle_core::cuda_backend::cudarc::driver::CudaGraph>,
}

#[cfg(feature = "cuda")]
impl Drop for Captured {
    /// Destroys the graph, then hands the memory its allocations reserved back to the driver:
    /// the graph memory pool keeps it otherwise, out of reach of later (non-graph) allocations.
    fn drop(&mut self) {
        drop(self.exec.take());
        if let Ok(dev) = self.out.device().as_cuda_device() {
            let ctx = dev.cuda_stream().context().clone();
            let _ = ctx.synchronize();
            unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
        }
    }
}

impl<F> std::fmt::Debug for GraphedForward<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphedForward").field("replays", &self.replays).field("capture_error", &self.capture_error).finish()
    }
}

fn key_of(inputs: &[&Tensor]) -> Key {
    inputs.iter().map(|t| (t.shape().clone(), t.dtype())).collect()
}

impl<F: FnMut(&[&Tensor]) -> Result<Tensor>> GraphedForward<F> {
    pub fn new(f: F) -> Self {
        Self {
            f,
            warmed: None,
            #[cfg(feature = "cuda")]
            graph: None,
            capture_error: None,
            replays: 0,
        }
    }

    /// A forward that is never captured: every call runs `f`; `why` is its
    /// [`GraphedForward::capture_error`].
    pub fn eager(f: F, why: &str) -> Self {
        Self { capture_error: Some(why.to_string()), ..Self::new(f) }
    }

    /// Why capturing failed, if it did (the calls then run eagerly).
    pub fn capture_error(&self) -> Option<&str> {
        self.capture_error.as_deref()
    }

    /// How many calls were served by a graph launch.
    pub fn replays(&self) -> usize {
        self.replays
    }

    /// `f(inputs)`, through the captured graph where there is one for these inputs' shapes and
    /// dtypes. The inputs must sit on one device.
    pub fn call(&mut self, inputs: &[&Tensor]) -> Result<Tensor> {
        let Some(first) = inputs.first() else { candle_core::bail!("GraphedForward::call needs at least one input") };
        let device = first.device().clone();
        if !device.is_cuda() || self.capture_error.is_some() {
            return (self.f)(inputs);
        }
        let key = key_of(inputs);
        // candle's strided kernels upload their layout from the host on every call; with this
        // cache on, those uploads go to persistent device buffers keyed by content (filled by
        // the eager warm-up call), so a captured graph replays valid layouts.
        #[cfg(feature = "cuda")]
        let _htod_cache = device.as_cuda_device()?.enable_cuda_graph_htod_cache();
        #[cfg(feature = "cuda")]
        {
            if self.graph.as_ref().is_some_and(|g| g.key == key) {
                return self.replay(inputs);
            }
            if let Some((warm_key, out_shape, out_dtype)) = self.warmed.take() {
                if warm_key == key {
                    self.graph = None; // free the old graph's buffers before capturing anew
                    match self.capture(&device, inputs, key, out_shape, out_dtype) {
                        Ok(g) => {
                            self.graph = Some(g);
                            return self.replay(inputs);
                        }
                        Err(e) => {
                            self.capture_error = Some(e.to_string());
                            return (self.f)(inputs);
                        }
                    }
                }
            }
        }
        let out = (self.f)(inputs)?;
        self.warmed = Some((key, out.shape().clone(), out.dtype()));
        Ok(out)
    }

    #[cfg(feature = "cuda")]
    fn capture(&mut self, device: &Device, inputs: &[&Tensor], key: Key, out_shape: Shape, out_dtype: DType) -> Result<Captured> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let statics = inputs.iter().map(|t| t.contiguous()?.copy()).collect::<Result<Vec<_>>>()?;
        let out = Tensor::zeros(out_shape, out_dtype, device)?;
        device.synchronize()?;
        let stream = device.as_cuda_device()?.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        // Every intermediate is dropped before the capture ends, so its free is in the graph.
        let result = (self.f)(&statics.iter().collect::<Vec<_>>()).and_then(|o| out.slice_set(&o, 0, 0));
        let exec = stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(candle_core::Error::wrap);
        result?;
        let exec = exec?.ok_or_else(|| candle_core::Error::Msg("CUDA graph capture recorded nothing".into()))?;
        exec.upload().map_err(candle_core::Error::wrap)?;
        Ok(Captured { key, inputs: statics, out, exec: Some(exec) })
    }

    #[cfg(feature = "cuda")]
    fn replay(&mut self, inputs: &[&Tensor]) -> Result<Tensor> {
        let g = self.graph.as_ref().expect("replay needs a captured graph");
        for (dst, src) in g.inputs.iter().zip(inputs) {
            dst.slice_set(&src.contiguous()?, 0, 0)?;
        }
        g.exec.as_ref().expect("a captured graph").launch().map_err(candle_core::Error::wrap)?;
        self.replays += 1;
        // The next launch overwrites the static output.
        g.out.copy()
    }
}

/// A CUDA device on its own stream (stream capture is not allowed on the legacy default
/// stream) with cudarc's per-allocation event tracking off: candle issues all work on that one
/// stream, so the events only cost two driver calls per tensor. On the CPU this is an error, as
/// `Device::new_cuda` is.
///
/// Freed memory stays in the device's memory pool (see [`keep_freed_memory`]).
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal)?;
    #[cfg(feature = "cuda")]
    {
        // Safety: every tensor of this device is used on its single stream.
        unsafe { device.as_cuda_device()?.disable_event_tracking() };
        keep_freed_memory(device.as_cuda_device()?)?;
    }
    Ok(device)
}

/// cudarc allocates with `cuMemAllocAsync` from the device's default memory pool, whose release
/// threshold is 0: at every synchronisation (a loss read back, a training step's checks) the
/// pool returns its free memory to the driver, and the next step's allocations map it again.
/// A threshold of "all of it" keeps freed memory for reuse, as PyTorch's caching allocator and
/// its `cudaMallocAsync` backend do. (Other processes on the GPU see that memory as in use.)
#[cfg(feature = "cuda")]
fn keep_freed_memory(dev: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // Safety: `pool` receives the device's default pool; the attribute takes a u64.
    let status = unsafe {
        match sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) {
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut std::ffi::c_void),
            e => e,
        }
    };
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => candle_core::bail!("cuda: keeping freed memory in the pool: {e:?}"),
    }
}
