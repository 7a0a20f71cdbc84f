//! The execution plan: every decision about *how* a model runs, made once where the model is
//! loaded for inference or built for training, and passed down to every layer.
//!
//! Layers never infer these from their tensors (whether a weight is a training variable, which
//! device a tensor sits on) or from process-wide switches: the same weights can be run by two
//! plans (a trainer's model and its frozen teacher or EMA copy), and a test can build the plan
//! it means to check.
use crate::dist::{Communicator, ExpertParallel};
use crate::moe::kernels::GemmConfig;
use candle_core::{DType, Device};
use std::sync::Arc;

/// Whether the weights are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Inference: weights are constants. On CUDA the layers stack them once for the fused
    /// kernels and a forward never reads from the device, so it can be captured as a CUDA graph.
    Frozen,
    /// Training: weights are `Var`s; every op on them records autograd history.
    Trainable,
}

/// The precision of the matmuls. The residual stream, LayerNorm statistics, softmaxes and
/// losses stay f32 in every mode, as under `torch.autocast`; the activations between matmuls
/// follow [`ExecutionPlan::matmul_input_dtype`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights and f32-accurate products (on CUDA tensor cores: 3xTF32 in the grouped GEMMs).
    F32,
    /// f32 weights, products with TF32 operands (about 1e-3 relative): candle's matmuls and the
    /// grouped GEMMs alike.
    Tf32,
    /// bf16 weights, bf16 products with f32 accumulation.
    Bf16,
    /// f16 weights, f16 products with f32 accumulation.
    F16,
}

impl Precision {
    /// The weights' dtype, in which the matmuls run.
    pub fn weight_dtype(self) -> DType {
        match self {
            Self::F32 | Self::Tf32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The plain precision of a weight dtype (`--dtype`).
    pub fn of_dtype(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Self::Bf16,
            DType::F16 => Self::F16,
            _ => Self::F32,
        }
    }
}

impl Precision {
    pub const ALL: [Self; 4] = [Self::F32, Self::Tf32, Self::Bf16, Self::F16];

    /// The names the command line takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| format!("unknown precision `{s}` (f32, tf32, bf16 or f16)"))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A plan's data-parallel setting for training (the trainers read it; layers never do): the
/// ranks that each run a slice of every global batch and sum their gradients, as PyTorch DDP's
/// process group does.
///
/// With expert parallelism as well ([`ExecutionPlan::expert_parallel`]), the ranks form
/// Megatron-Core's layout: `P` data-parallel ranks in blocks of `EP` consecutive ranks, each
/// block an expert-parallel group (rank `r` is expert-parallel rank `r % EP`), and the ranks
/// that hold the same experts (equal `r % EP`) an expert-data-parallel group of `P / EP`
/// (Megatron's `expert_data_parallel_group`). Replicated weights' gradients are summed over
/// every rank, expert gradients over the expert-data-parallel group; with `EP = P` each
/// expert lives on one rank and needs no sum, so `expert_data_parallel` is None.
#[derive(Debug, Clone)]
pub struct DataParallel {
    /// Every rank of the job; its rank picks the slice of each global batch.
    pub comm: Arc<dyn Communicator>,
    /// The ranks holding this rank's experts, when expert parallelism spans fewer ranks than
    /// `comm` (`EP < P`); None otherwise.
    pub expert_data_parallel: Option<Arc<dyn Communicator>>,
}

impl DataParallel {
    /// Data parallelism over `comm` (pure data parallelism, or expert parallelism over the same
    /// ranks).
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm, expert_data_parallel: None }
    }

    /// The same setting with experts replicated over `group`, the expert-data-parallel group.
    pub fn with_expert_data_parallel(mut self, group: Arc<dyn Communicator>) -> Self {
        self.expert_data_parallel = Some(group);
        self
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ExecutionPlan {
    pub device: Device,
    pub weights: Weights,
    pub precision: Precision,
    /// Whether the MoE layers run the kernel pipeline (fused gating, permutation, grouped
    /// GEMMs, combine) instead of the reference dispatch. On by default on CUDA. On the CPU
    /// the kernels run their CPU references, which is how tests check the pipeline without a
    /// GPU.
    pub moe_kernels: bool,
    /// The grouped-GEMM kernel selection on CUDA (tuning data; the default is the measured
    /// best, `docs/design.md`). Its f32 kernel follows `precision`.
    pub gemm: GemmConfig,
    /// Expert parallelism: the MoE layers build only this rank's block of routed experts and
    /// exchange tokens with the other ranks of the group (`crate::dist::expert_parallel`);
    /// None (the default), or a group of one rank, runs every expert here.
    pub expert_parallel: Option<ExpertParallel>,
    /// Data parallelism in training ([`DataParallel`]): None (the default) trains on the whole
    /// batch here, unless `expert_parallel` spans several ranks, whose group then is the
    /// data-parallel group as well (each of its ranks runs its own tokens, `EP = P`).
    pub data_parallel: Option<DataParallel>,
}

impl ExecutionPlan {
    /// Frozen weights in `precision` on `device`.
    pub fn inference(device: &Device, precision: Precision) -> Self {
        Self::new(device, Weights::Frozen, precision)
    }

    /// Trainable weights in `precision` on `device`.
    pub fn training(device: &Device, precision: Precision) -> Self {
        Self::new(device, Weights::Trainable, precision)
    }

    fn new(device: &Device, weights: Weights, precision: Precision) -> Self {
        Self { device: device.clone(), weights, precision, moe_kernels: device.is_cuda(), gemm: GemmConfig::for_precision(precision), expert_parallel: None, data_parallel: None }
    }

    /// The same plan with frozen weights (a training run's sample grids, a frozen teacher).
    pub fn frozen(&self) -> Self {
        Self { weights: Weights::Frozen, ..self.clone() }
    }

    /// The same plan with the MoE layers on the kernel pipeline (`true`) or the reference
    /// dispatch.
    pub fn with_moe_kernels(mut self, on: bool) -> Self {
        self.moe_kernels = on;
        self
    }

    /// The same plan with another grouped-GEMM selection (benchmarks and kernel tests).
    pub fn with_gemm(mut self, gemm: GemmConfig) -> Self {
        self.gemm = gemm;
        self
    }

    /// The same plan with the MoE layers' experts spread over `comm`'s ranks (each rank builds
    /// its plan with its own communicator).
    pub fn with_expert_parallel(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.expert_parallel = Some(ExpertParallel::new(comm));
        self
    }

    /// The same plan training data-parallel as `dp` says (each rank builds its plan with its
    /// own communicators).
    pub fn with_data_parallel(mut self, dp: DataParallel) -> Self {
        self.data_parallel = Some(dp);
        self
    }

    /// The same plan data-parallel over `dp` with Megatron-Core's expert groups: the MoE layers'
    /// experts split over `ep` when it spans more than one rank, `edp` the ranks holding the same
    /// experts (None when `ep` is the whole job). An `ep` of one rank replicates the experts:
    /// data parallelism alone.
    pub fn with_parallel_groups(self, dp: Arc<dyn Communicator>, ep: Arc<dyn Communicator>, edp: Option<Arc<dyn Communicator>>) -> Self {
        if ep.world_size() == 1 {
            return self.with_data_parallel(DataParallel::new(dp));
        }
        let dp = match edp {
            Some(g) => DataParallel::new(dp).with_expert_data_parallel(g),
            None => DataParallel::new(dp),
        };
        self.with_data_parallel(dp).with_expert_parallel(ep)
    }

    /// Ranks the MoE layers split their routed experts over (1: every rank holds them all).
    pub fn expert_parallel_size(&self) -> usize {
        self.expert_parallel.as_ref().map_or(1, |ep| ep.world_size())
    }

    pub fn weight_dtype(&self) -> DType {
        self.precision.weight_dtype()
    }

    pub fn trainable(&self) -> bool {
        self.weights == Weights::Trainable
    }

    /// Whether the layers run the CUDA kernels (else the CPU reference).
    pub fn on_cuda(&self) -> bool {
        self.device.is_cuda()
    }

    /// Whether layers run their fused inference forms: CUDA with frozen weights.
    pub fn fused_inference(&self) -> bool {
        self.on_cuda() && !self.trainable()
    }

    /// The dtype a layer stores a matmul's input in (a LayerNorm + modulate's output, the
    /// activations between an MLP's matmuls): the weights' dtype where every `Linear` casts its
    /// input to it anyway, that is fused inference on CUDA and training (a bf16 plan then keeps
    /// linear outputs and the activations between them in bf16, as `torch.autocast` does, while
    /// the residual stream, LayerNorm statistics, softmaxes and losses stay f32); f32 on the CPU
    /// inference path, which keeps it the one checked against the official code.
    pub fn matmul_input_dtype(&self) -> DType {
        match self.fused_inference() || self.trainable() {
            true => self.weight_dtype(),
            false => DType::F32,
        }
    }

    /// Memory the plan's device has available now, in bytes: on CUDA the GPU's free memory plus
    /// the freed blocks candle's memory pool keeps (an earlier model's, say), which the driver
    /// counts as used; the system's `MemAvailable` on the CPU (Linux); None where it cannot be
    /// told.
    pub fn available_memory(&self) -> Option<u64> {
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let free = d.cuda_stream().context().mem_get_info().ok()?.0 as u64;
                Some(free + crate::runtime::memory::pooled_free_bytes(&self.device).ok().flatten().unwrap_or(0))
            }
            Device::Cpu => {
                let info = std::fs::read_to_string("/proc/meminfo").ok()?;
                let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            }
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Refuses, before anything is allocated, work whose estimated memory exceeds what the
    /// device has available, naming the estimate (`what` says what needs it).
    pub fn check_fits(&self, what: &str, bytes: u64) -> candle_core::Result<()> {
        match self.available_memory() {
            Some(avail) if bytes > avail => candle_core::bail!(
                "{what} needs about {:.1} GiB, but the {} has {:.1} GiB available",
                crate::runtime::memory::gib(bytes),
                if self.on_cuda() { "GPU" } else { "machine" },
                crate::runtime::memory::gib(avail)
            ),
            _ => Ok(()),
        }
    }

    /// Applies the plan's one process-wide consequence: candle's own cuBLAS matmuls take their
    /// TF32 switch from a global (`candle_core::cuda::set_gemm_reduced_precision_f32`), so a
    /// TF32 plan sets it, and any other plan clears it. Called where a plan is built for a run
    /// (the CLI), not by layers.
    #[cfg(feature = "cuda")]
    pub fn apply_matmul_precision(&self) {
        if self.on_cuda() {
            candle_core::cuda::set_gemm_reduced_precision_f32(self.precision == Precision::Tf32);
        }
    }

    /// Without CUDA there is no global to set.
    #[cfg(not(feature = "cuda"))]
    pub fn apply_matmul_precision(&self) {}
}
