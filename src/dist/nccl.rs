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
//! Failures: the rendezvous' connections stay open as the control plane. Every collective
//! first checks it, so a rank that reported an error or exited makes the others' next
//! collective fail with that rank's message, and an NCCL error on this rank is reported to the
//! others through it. A collective already running on the GPU when a peer dies is not
//! interrupted (that needs `ncclCommAbort` from a watchdog thread, as `ProcessGroupNCCL` does);
//! under `ditmoe launch` the launcher ends the other ranks when one fails.
//!
//! Linking: cudarc links NCCL dynamically, like candle's other CUDA libraries, so a binary built
//! with this feature needs `libnccl.so.2` at run time; on the GPU machine it lives in PyTorch's
//! install (`nvidia/nccl/lib`, shared/docs/gpu.md). The bindings are pinned to the API of NCCL
//! 2.28 (Cargo.toml). NCCL refuses two ranks on one GPU, so one GPU runs world size 1 only.
//!
//! Compile-checked only so far: it has not yet run on GPUs.
use super::comm::{check_splits, Communicator};
use super::rendezvous::Rendezvous;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::DeviceRepr;
use candle_core::cuda::CudaDType;
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Error, Layout, Result, Shape, Tensor};
use cudarc::nccl::{group_end, group_start, Comm, Id, NcclType, ReduceOp};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// One rank's NCCL communicator on its GPU, with the rendezvous as its control plane.
pub struct NcclComm {
    /// Calls on one NCCL communicator must not overlap: the lock serialises them.
    comm: Mutex<Comm>,
    device: CudaDevice,
    rdv: Rendezvous,
}

// SAFETY: `Comm` holds the raw `ncclComm_t` handle, which NCCL lets any thread use as long as
// calls on it do not run concurrently; every use goes through the mutex.
unsafe impl Send for NcclComm {}
// SAFETY: as above: shared references reach the handle only through the mutex.
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm {{ rank: {}, world: {}, device: {:?} }}", self.rdv.rank(), self.rdv.world_size(), self.device)
    }
}

fn nccl_error(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Msg(format!("{what}: NCCL error {e:?}"))
}

impl NcclComm {
    /// Creates the communicator of the joined rendezvous' ranks on `device`, this rank's GPU
    /// (`LOCAL_RANK`'s, by torchrun's convention). Every rank calls it; it returns once NCCL has
    /// connected them all. A failure on one rank is reported to the others.
    pub fn new(rdv: Rendezvous, device: &Device) -> Result<Self> {
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
        let comm = Comm::from_rank(device.cuda_stream(), rank, world, Id::uninit(internal))
            .map_err(|e| rdv.report_error(format!("rank {rank}: {}", nccl_error("ncclCommInitRank", e))))?;
        Ok(Self { comm: Mutex::new(comm), device, rdv })
    }

    /// The control plane: to report an error that ends the job on every rank.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rdv
    }

    /// The communicator, once the group is known to be healthy.
    fn comm(&self, op: &str) -> Result<MutexGuard<'_, Comm>> {
        if let Some(why) = self.rdv.failure() {
            bail!("rank {}: {op} after the group failed: {why}", self.rdv.rank())
        }
        Ok(self.comm.lock().unwrap_or_else(PoisonError::into_inner))
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
struct AllReduce<'a>(&'a Comm);

/// The grouped sends and receives of an all-to-all with variable splits, in rows of `d`.
struct AllToAllV<'a> {
    comm: &'a Comm,
    send_counts: &'a [usize],
    recv_counts: &'a [usize],
    d: usize,
}

fn contiguous(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    layout.contiguous_offsets().ok_or_else(|| Error::Msg(format!("{op}: the tensor is not contiguous")))
}

fn all_reduce<T: NcclType + CudaDType + DeviceRepr>(comm: &Comm, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let (start, end) = contiguous(l, "all_reduce_sum")?;
    let src = s.as_cuda_slice::<T>()?.slice(start..end);
    // SAFETY: NCCL writes every element before the stream lets anything read it.
    let mut dst = unsafe { s.device.alloc::<T>(end - start)? };
    comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| nccl_error("ncclAllReduce", e))?;
    Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
}

fn all_to_all_v<T: NcclType + CudaDType + DeviceRepr>(op: &AllToAllV, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let (start, _) = contiguous(l, "all_to_all_v")?;
    let src = s.as_cuda_slice::<T>()?;
    let d = op.d;
    // SAFETY: every row is received before the stream lets anything read it (the receive
    // counts sum to the buffer's rows). One element at least: CUDA allocates no empty buffer,
    // and the result's layout covers none of it when nothing arrives.
    let mut dst = unsafe { s.device.alloc::<T>((op.recv_counts.iter().sum::<usize>() * d).max(1))? };
    group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
    let (mut sent, mut received) = (0, 0);
    let mut posted = Ok(());
    for peer in 0..op.send_counts.len() {
        let (ns, nr) = (op.send_counts[peer] * d, op.recv_counts[peer] * d);
        if ns > 0 && posted.is_ok() {
            posted = op.comm.send(&src.slice(start + sent..start + sent + ns), peer as i32).map_err(|e| nccl_error("ncclSend", e));
        }
        if nr > 0 && posted.is_ok() {
            posted = op.comm.recv(&mut dst.slice_mut(received..received + nr), peer as i32).map(|_| ()).map_err(|e| nccl_error("ncclRecv", e));
        }
        (sent, received) = (sent + ns, received + nr);
    }
    // the group is closed whatever happened inside it, or NCCL's group state stays open
    let ended = group_end().map(|_| ()).map_err(|e| nccl_error("ncclGroupEnd", e));
    posted.and(ended)?;
    Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
}

impl CustomOp1 for AllReduce<'_> {
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
        self.rdv.rank()
    }

    fn world_size(&self) -> usize {
        self.rdv.world_size()
    }

    fn barrier(&self) -> Result<()> {
        self.all_gather_counts(&[1]).map(|_| ())
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        self.check_device(OP, t)?;
        let t = t.detach().contiguous()?;
        let comm = self.comm(OP)?;
        t.apply_op1_no_bwd(&AllReduce(&comm)).map_err(|e| self.fail(OP, e))
    }

    fn all_gather_counts(&self, counts: &[usize]) -> Result<Vec<Vec<usize>>> {
        const OP: &str = "all_gather_counts";
        if counts.is_empty() {
            // every rank passes vectors of one length: all skip the call
            return Ok(vec![Vec::new(); self.world_size()]);
        }
        let comm = self.comm(OP)?;
        let gathered = (|| {
            let send = self.device.clone_htod(&counts.iter().map(|&c| c as u64).collect::<Vec<u64>>())?;
            let mut recv = self.device.alloc_zeros::<u64>(counts.len() * self.world_size())?;
            comm.all_gather(&send, &mut recv).map_err(|e| nccl_error("ncclAllGather", e))?;
            self.device.clone_dtoh(&recv)
        })()
        .map_err(|e| self.fail(OP, e))?;
        Ok(gathered.chunks(counts.len()).map(|c| c.iter().map(|&v| v as usize).collect()).collect())
    }

    fn all_to_all_v(&self, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        const OP: &str = "all_to_all_v";
        check_splits(self, send, send_counts, recv_counts).map_err(|e| self.fail(OP, e))?;
        self.check_device(OP, send)?;
        let send = send.detach().contiguous()?;
        let d = send.dim(1)?;
        let comm = self.comm(OP)?;
        send.apply_op1_no_bwd(&AllToAllV { comm: &comm, send_counts, recv_counts, d }).map_err(|e| self.fail(OP, e))
    }
}
