//! The GPU backend: the [`Communicator`] collectives as NCCL calls, one process per GPU (the
//! `nccl` cargo feature).
//!
//! The communicator is made the way PyTorch's `ProcessGroupNCCL` makes one: rank 0 calls
//! `ncclGetUniqueId`, the rendezvous carries the 128-byte id to every rank
//! ([`Rendezvous::broadcast_blob`], the part torch's `TCPStore` plays), and every rank calls
//! `ncclCommInitRank` with it on its own GPU. The NCCL calls go on the candle device's stream,
//! so they are ordered after the kernels that produce their inputs and before those that use
//! their outputs, with no host synchronisation except where a result is needed on the host.
//!
//! The collectives (the trait's docs name the NCCL call for each):
//! - [`Communicator::all_reduce_sum`]: `ncclAllReduce` with `ncclSum`;
//! - [`Communicator::all_gather_counts`]: `ncclAllGather` of the counts as u64, copied back to
//!   the host (the splits are needed there);
//! - [`Communicator::all_to_all_v`]: NCCL's all-to-all recipe for variable sizes, since
//!   `ncclAlltoAll` takes equal counts only: `ncclGroupStart`, for every peer an `ncclSend` of
//!   its rows and an `ncclRecv` of the rows it sends, `ncclGroupEnd` (what
//!   `torch.distributed.all_to_all_single` with split sizes does on NCCL). Empty chunks post
//!   nothing on either side; since the receive splits come from the counts' all-gather, both
//!   sides agree. NCCL cannot check that they do: a mismatch hangs or corrupts, which is why the
//!   dispatch derives both splits from the same gathered counts;
//! - [`Communicator::barrier`]: an all-gather of one count, waited for on the host.
//!
//! Sub-groups ([`NcclComm::split`]) come from `ncclCommSplit` on the job's communicator, as
//! `ProcessGroupNCCL` makes `new_group`s when the parent communicator is up: a collective of the
//! job's ranks, with no unique id to carry.
//!
//! Failures: the rendezvous' connections stay open as the control plane. Every collective
//! first checks it, so a rank that reported an error or exited makes the others' next
//! collective fail with that rank's message, and an NCCL error on this rank is reported to the
//! others through it. A collective already waiting on the GPU for a peer that died would wait
//! for ever, so each communicator has a watchdog thread, PyTorch `ProcessGroupNCCL`'s
//! (`ncclCommWatchdog` / `watchdogHandler`, polling every 100 ms as `kWatchdogThreadSleepMillis`
//! says): when the rendezvous holds a failure (a peer's, relayed by rank 0, or this rank's own as
//! it ends with an error) it calls `ncclCommAbort`, which makes the blocked NCCL kernels and
//! calls return; and it polls `ncclCommGetAsyncError`, reporting an asynchronous NCCL error (a
//! network failure, a peer's abort) to every rank before it aborts. A collective that returns on
//! an aborted communicator fails with the failure's message, and no call uses the communicator
//! after it (NCCL frees it in the abort). As in `ProcessGroupNCCL`, the watchdog aborts a
//! communicator that a collective is inside: returning from it is the point, and
//! `ncclCommAbort` is NCCL's way to unblock a hung operation from another thread.
//!
//! Linking: cudarc links NCCL dynamically, like candle's other CUDA libraries, so a binary built
//! with this feature needs `libnccl.so.2` at run time; on the GPU machine it lives in PyTorch's
//! install (`nvidia/nccl/lib`, shared/docs/gpu.md). The bindings are pinned to the API of NCCL
//! 2.28 (Cargo.toml). NCCL refuses two ranks on one GPU, so one GPU runs world size 1 only.
//!
//! Compile-checked here; `tests/gpu.rs` runs it at world size 1 on a GPU.
use super::comm::{check_splits, Communicator};
use super::rendezvous::Rendezvous;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda::CudaDType;
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Error, Layout, Result, Shape, Tensor};
use cudarc::nccl::{result, sys, Id, NcclType};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the watchdog looks: `ProcessGroupNCCL`'s `kWatchdogThreadSleepMillis`.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(100);

/// The raw NCCL communicator, shared by the collectives and the watchdog. cudarc's safe `Comm`
/// keeps its handle private and aborts it on drop, so an abort from the watchdog would free it
/// twice: the handle is owned here instead, and the collectives use cudarc's `result` calls.
struct Handle {
    raw: sys::ncclComm_t,
    /// Held by a collective while it uses `raw` (calls on one communicator must not overlap);
    /// the watchdog aborts an idle communicator under it, a busy one without it.
    calls: Mutex<()>,
    /// Set when `raw` is aborted (and freed): no call uses it after.
    aborted: AtomicBool,
}

// SAFETY: NCCL lets any thread use a communicator as long as calls on it do not overlap (the
// `calls` lock), and `ncclCommAbort` / `ncclCommGetAsyncError` are meant for another thread.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Handle {
    /// Aborts the communicator once.
    fn abort(&self) {
        let _idle = match self.calls.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: `raw` is a live communicator (not aborted before: the flag).
            let _ = unsafe { result::comm_abort(self.raw) };
        }
    }
}

impl Drop for Handle {
    /// Aborts rather than destroys, as cudarc's `Comm` does: `ncclCommDestroy` waits for
    /// pending work, which a failed peer never completes.
    fn drop(&mut self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the last owner; nothing else uses `raw`.
            let _ = unsafe { result::comm_abort(self.raw) };
        }
    }
}

/// One rank's NCCL communicator on its GPU (the job's, or a group split from it), with the
/// job's rendezvous as its control plane and a watchdog thread (module docs).
pub struct NcclComm {
    handle: Arc<Handle>,
    rank: usize,
    world: usize,
    device: CudaDevice,
    rdv: Arc<Rendezvous>,
    watchdog: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm {{ rank: {}, world: {}, device: {:?} }}", self.rank, self.world, self.device)
    }
}

fn nccl_error(what: &str, e: result::NcclError) -> Error {
    Error::Msg(format!("{what}: NCCL error {:?}", e.0))
}

/// The watchdog's loop (module docs): aborts `handle` when the job has failed or NCCL reports
/// an asynchronous error, until `stop`.
fn watch(handle: Arc<Handle>, rdv: Arc<Rendezvous>, ctx: Arc<CudaContext>, stop: Arc<AtomicBool>, rank: usize) {
    // NCCL's calls act on the communicator's device, which they find through the thread's context
    let _ = ctx.bind_to_thread();
    while !stop.load(Ordering::SeqCst) && !handle.aborted.load(Ordering::SeqCst) {
        if rdv.failure().is_some() {
            handle.abort();
            return;
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `raw` is live: only this thread aborts it while the communicator exists.
        let polled = unsafe { sys::ncclCommGetAsyncError(handle.raw, &mut state) };
        let failed = [polled, state].into_iter().find(|r| !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress));
        if let Some(e) = failed {
            rdv.report_error(format!("rank {rank}: NCCL asynchronous error {e:?} (ncclCommGetAsyncError); the watchdog aborted the communicator"));
            handle.abort();
            return;
        }
        std::thread::sleep(WATCHDOG_PERIOD);
    }
}

impl NcclComm {
    /// Creates the communicator of the joined rendezvous' ranks on `device`, this rank's GPU
    /// (`LOCAL_RANK`'s, by torchrun's convention): rank 0's `ncclGetUniqueId` carried by the
    /// rendezvous, `ncclCommInitRank` on every rank. Every rank calls it; it returns once NCCL
    /// has connected them all. A failure on one rank is reported to the others.
    pub fn new(rdv: Arc<Rendezvous>, device: &Device) -> Result<Self> {
        let (rank, world) = (rdv.rank(), rdv.world_size());
        let device = match device {
            Device::Cuda(d) => d.clone(),
            other => return Err(rdv.report_error(format!("rank {rank}: NCCL needs a CUDA device, not {other:?}"))),
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| rdv.report_error(nccl_error("rank 0: ncclGetUniqueId", e).to_string()))?;
            Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        let blob = rdv.broadcast_blob(id.as_deref())?;
        let internal: [std::ffi::c_char; 128] = match blob.iter().map(|&b| b as std::ffi::c_char).collect::<Vec<_>>().try_into() {
            Ok(internal) => internal,
            Err(v) => return Err(rdv.report_error(format!("rank {rank}: an NCCL unique id of {} bytes, not 128", v.len()))),
        };
        device.cuda_stream().context().bind_to_thread().map_err(Error::wrap)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives the new communicator; the id is rank 0's.
        unsafe { result::comm_init_rank(&mut raw, world as i32, sys::ncclUniqueId { internal }, rank as i32) }
            .map_err(|e| rdv.report_error(format!("rank {rank}: {}", nccl_error("ncclCommInitRank", e))))?;
        Ok(Self::watched(raw, rank, world, device, rdv))
    }

    /// This rank's group of `groups`, a partition of this communicator's ranks (each group's
    /// ranks in group-rank order): `ncclCommSplit` with the group as color and the place in it
    /// as key. Every rank calls it with the same partition.
    pub fn split(&self, groups: &[Vec<usize>]) -> Result<Self> {
        const OP: &str = "ncclCommSplit";
        let me = self.rank;
        let Some((color, key)) = groups.iter().enumerate().find_map(|(g, ranks)| Some((g, ranks.iter().position(|&r| r == me)?))) else {
            return Err(self.fail(OP, Error::Msg(format!("rank {me} is in none of the groups {groups:?}"))));
        };
        let guard = self.lock(OP)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a live parent (checked under the lock); a null config inherits the parent's.
        let split = unsafe { sys::ncclCommSplit(self.handle.raw, color as i32, key as i32, &mut raw, std::ptr::null_mut()) }.result();
        drop(guard);
        split.map_err(|e| self.fail(OP, nccl_error(OP, e)))?;
        self.check_aborted(OP)?;
        Ok(Self::watched(raw, key, groups[color].len(), self.device.clone(), self.rdv.clone()))
    }

    /// The communicator `raw` with its watchdog started.
    fn watched(raw: sys::ncclComm_t, rank: usize, world: usize, device: CudaDevice, rdv: Arc<Rendezvous>) -> Self {
        let handle = Arc::new(Handle { raw, calls: Mutex::new(()), aborted: AtomicBool::new(false) });
        let stop = Arc::new(AtomicBool::new(false));
        let (h, r, c, s) = (handle.clone(), rdv.clone(), device.cuda_stream().context().clone(), stop.clone());
        let watchdog = std::thread::Builder::new().name(format!("nccl-watchdog-rank{}", rdv.rank())).spawn(move || watch(h, r, c, s, rank)).ok();
        Self { handle, rank, world, device, rdv, watchdog, stop }
    }

    /// The control plane: to report an error that ends the job on every rank.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rdv
    }

    /// The right to call NCCL on the communicator, once the job is known to be healthy.
    fn lock(&self, op: &str) -> Result<std::sync::MutexGuard<'_, ()>> {
        if let Some(why) = self.rdv.failure() {
            bail!("rank {}: {op} after the job failed: {why}", self.rdv.rank())
        }
        let guard = self.handle.calls.lock().unwrap_or_else(PoisonError::into_inner);
        self.check_aborted(op)?;
        Ok(guard)
    }

    /// An error once the watchdog has aborted the communicator: whatever a call returned then
    /// is not a result.
    fn check_aborted(&self, op: &str) -> Result<()> {
        if !self.handle.aborted.load(Ordering::SeqCst) {
            return Ok(());
        }
        let why = self.rdv.failure().unwrap_or_else(|| "the communicator was aborted".into());
        bail!("rank {}: {op}: the watchdog aborted the NCCL communicator: {why}", self.rdv.rank())
    }

    /// Reports a failure of this rank's `op` to the others and returns it.
    fn fail(&self, op: &str, e: Error) -> Error {
        self.rdv.report_error(format!("rank {}: {op}: {e}", self.rdv.rank()))
    }

    /// A CUDA tensor on this communicator's GPU, or an error saying where it is.
    fn check_device(&self, op: &str, t: &Tensor) -> Result<()> {
        match t.device() {
            d if d.same_device(&Device::Cuda(self.device.clone())) => Ok(()),
            other => Err(self.fail(op, Error::Msg(format!("the tensor is on {other:?}, the communicator on {:?}", self.device)))),
        }
    }
}

impl Drop for NcclComm {
    /// Stops the watchdog before the handle can be freed.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

/// Calls `$f::<T>` with the Rust type of `$dtype`: the dtypes NCCL reduces and moves.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
            DType::U32 => $f::<u32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            other => bail!("NCCL backend: no NCCL type for {other:?}"),
        }
    };
}

/// `ncclAllReduce` (sum) into a fresh buffer.
struct AllReduce(sys::ncclComm_t);

/// The grouped sends and receives of an all-to-all with variable splits, in rows of `d`.
struct AllToAllV<'a> {
    comm: sys::ncclComm_t,
    send_counts: &'a [usize],
    recv_counts: &'a [usize],
    d: usize,
}

fn contiguous(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    layout.contiguous_offsets().ok_or_else(|| Error::Msg(format!("{op}: the tensor is not contiguous")))
}

fn raw_stream(stream: &CudaStream) -> sys::cudaStream_t {
    stream.cu_stream() as sys::cudaStream_t
}

fn all_reduce<T: NcclType + CudaDType + DeviceRepr>(comm: sys::ncclComm_t, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let (start, end) = contiguous(l, "all_reduce_sum")?;
    let stream = s.device.cuda_stream();
    let src = s.as_cuda_slice::<T>()?.slice(start..end);
    // SAFETY: NCCL writes every element before the stream lets anything read it.
    let mut dst = unsafe { s.device.alloc::<T>(end - start)? };
    {
        let (src_ptr, _src_sync) = src.device_ptr(&stream);
        let (dst_ptr, _dst_sync) = dst.device_ptr_mut(&stream);
        // SAFETY: both buffers hold `end - start` elements of T on the communicator's stream.
        unsafe { result::all_reduce(src_ptr as _, dst_ptr as _, end - start, T::as_nccl_type(), sys::ncclRedOp_t::ncclSum, comm, raw_stream(&stream)) }.map_err(|e| nccl_error("ncclAllReduce", e))?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
}

fn all_to_all_v<T: NcclType + CudaDType + DeviceRepr>(op: &AllToAllV, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let (start, _) = contiguous(l, "all_to_all_v")?;
    let stream = s.device.cuda_stream();
    let src = s.as_cuda_slice::<T>()?;
    let d = op.d;
    // SAFETY: every row is received before the stream lets anything read it (the receive
    // counts sum to the buffer's rows). One element at least: CUDA allocates no empty buffer,
    // and the result's layout covers none of it when nothing arrives.
    let mut dst = unsafe { s.device.alloc::<T>((op.recv_counts.iter().sum::<usize>() * d).max(1))? };
    result::group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
    let (mut sent, mut received) = (0, 0);
    let mut posted = Ok(());
    for peer in 0..op.send_counts.len() {
        let (ns, nr) = (op.send_counts[peer] * d, op.recv_counts[peer] * d);
        if ns > 0 && posted.is_ok() {
            let chunk = src.slice(start + sent..start + sent + ns);
            let (ptr, _sync) = chunk.device_ptr(&stream);
            // SAFETY: `ns` elements of T at `ptr`, on the communicator's stream.
            posted = unsafe { result::send(ptr as _, ns, T::as_nccl_type(), peer as i32, op.comm, raw_stream(&stream)) }.map(|_| ()).map_err(|e| nccl_error("ncclSend", e));
        }
        if nr > 0 && posted.is_ok() {
            let mut chunk = dst.slice_mut(received..received + nr);
            let (ptr, _sync) = chunk.device_ptr_mut(&stream);
            // SAFETY: room for `nr` elements of T at `ptr`, on the communicator's stream.
            posted = unsafe { result::recv(ptr as _, nr, T::as_nccl_type(), peer as i32, op.comm, raw_stream(&stream)) }.map(|_| ()).map_err(|e| nccl_error("ncclRecv", e));
        }
        (sent, received) = (sent + ns, received + nr);
    }
    // the group is closed whatever happened inside it, or NCCL's group state stays open
    let ended = result::group_end().map(|_| ()).map_err(|e| nccl_error("ncclGroupEnd", e));
    posted.and(ended)?;
    Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("NCCL runs on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((by_dtype!(s.dtype(), all_reduce(self.0, s, l))?, l.shape().clone()))
    }
}

impl CustomOp1 for AllToAllV<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-to-all-v"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("NCCL runs on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(s.dtype(), all_to_all_v(self, s, l))?;
        Ok((out, Shape::from((self.recv_counts.iter().sum::<usize>(), self.d))))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn barrier(&self) -> Result<()> {
        self.all_gather_counts(&[1]).map(|_| ())
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        self.check_device(OP, t)?;
        let t = t.detach().contiguous()?;
        let guard = self.lock(OP)?;
        let out = t.apply_op1_no_bwd(&AllReduce(self.handle.raw)).map_err(|e| self.fail(OP, e));
        drop(guard);
        self.check_aborted(OP)?;
        out
    }

    fn all_gather_counts(&self, counts: &[usize]) -> Result<Vec<Vec<usize>>> {
        const OP: &str = "all_gather_counts";
        if counts.is_empty() {
            // every rank passes vectors of one length: all skip the call
            return Ok(vec![Vec::new(); self.world_size()]);
        }
        let guard = self.lock(OP)?;
        let gathered = (|| {
            let stream = self.device.cuda_stream();
            let send = self.device.clone_htod(&counts.iter().map(|&c| c as u64).collect::<Vec<u64>>())?;
            let mut recv = self.device.alloc_zeros::<u64>(counts.len() * self.world_size())?;
            {
                let (src, _src_sync) = send.device_ptr(&stream);
                let (dst, _dst_sync) = recv.device_ptr_mut(&stream);
                // SAFETY: `counts.len()` u64 to send, `world` times that to receive, on the stream.
                unsafe { result::all_gather(src as _, dst as _, counts.len(), sys::ncclDataType_t::ncclUint64, self.handle.raw, raw_stream(&stream)) }.map_err(|e| nccl_error("ncclAllGather", e))?;
            }
            // the host wait a dead peer would block for ever without the watchdog
            self.device.clone_dtoh(&recv)
        })()
        .map_err(|e| self.fail(OP, e));
        drop(guard);
        self.check_aborted(OP)?;
        Ok(gathered?.chunks(counts.len()).map(|c| c.iter().map(|&v| v as usize).collect()).collect())
    }

    fn all_to_all_v(&self, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        const OP: &str = "all_to_all_v";
        check_splits(self, send, send_counts, recv_counts).map_err(|e| self.fail(OP, e))?;
        self.check_device(OP, send)?;
        let send = send.detach().contiguous()?;
        let d = send.dim(1)?;
        let guard = self.lock(OP)?;
        let out = send.apply_op1_no_bwd(&AllToAllV { comm: self.handle.raw, send_counts, recv_counts, d }).map_err(|e| self.fail(OP, e));
        drop(guard);
        self.check_aborted(OP)?;
        out
    }
}
