//! `FusedSwiglu`: the MoE layer on the fused GPU kernels of [`crate::kernels`] (top-k gating,
//! counting-sort permutation, grouped gate/up + SiLU·mul with the gather fused in, grouped
//! down projection, deterministic combine). It computes what [`super::routed_forward`] does
//! with [`super::TopKRouter`] and SwiGLU experts, without reading anything back to the host,
//! so a forward pass never waits on the GPU.
//!
//! This whole-layer path serves inference: on CUDA, with weights that are not training
//! variables (training runs the routed experts through the differentiable
//! [`kernels::routed_experts`] instead). `norm_topk_prob` renormalises the gating kernel's
//! chosen scores with the router's own formula.
use super::{MoeOutput, Routing, SwigluExpert, TopKRouter};
use crate::kernels::{self, ExpertWeights};
use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct FusedSwiglu {
    weights: ExpertWeights,
    /// The shared expert's weights (the same tensors as the layer's `SwigluExpert`).
    shared: Option<kernels::SwigluWeights>,
}

impl FusedSwiglu {
    /// Whether the fused path can serve these experts (see the module docs).
    pub fn serves(experts: &[SwigluExpert]) -> bool {
        super::experts::frozen_on_gpu(experts[0].weights()[0])
    }

    /// Stacks the experts' weights into `[E, I, D]`/`[E, D, I]` tensors and returns experts
    /// rebuilt as views into them, so both paths share one copy of the weights; the shared
    /// expert (if any) runs on the grouped kernels as a single expert.
    pub fn stack(experts: &[SwigluExpert], shared: Option<&SwigluExpert>) -> Result<(Self, Vec<SwigluExpert>)> {
        let (stacks, views) = super::experts::stack_frozen(experts)?;
        let kernels::ExpertStacks::Swiglu(weights) = stacks else { unreachable!("SwiGLU experts stack as SwiGLU") };
        let shared = shared.map(|s| {
            let [gate, up, down] = s.weights().map(Tensor::clone);
            kernels::SwigluWeights { gate, up, down }
        });
        Ok((Self { weights, shared }, views))
    }

    /// x: (N, T, D) activations (f32, or already in the weights' dtype). The output is in the
    /// weights' dtype: the combine adds the shared expert's output (also run on the grouped
    /// kernels, as one expert) while it sums the routed rows, in f32, rounding once.
    pub fn forward(&self, router: &TopKRouter, x: &Tensor) -> Result<MoeOutput> {
        let (n, t, d) = x.dims3()?;
        // The grouped GEMMs run in the weights' dtype (bf16 on tensor cores), like every
        // other matmul of the model (`crate::nn::Linear`).
        let flat = x.reshape((n * t, d))?.to_dtype(self.weights.gate.dtype())?;
        // The shared expert needs no routing: on the GPU it runs on a second stream while the
        // router, gating and sort (small, latency-bound launches) run on the main one.
        let shared = self.shared.as_ref().map(|w| kernels::swiglu_mlp_start(&flat, w)).transpose()?;
        let logits = router.logits(&flat)?;
        // The gating kernel reads bf16 or f32 logits and does its softmax in f32 either way.
        let logits = match logits.dtype() {
            DType::BF16 | DType::F32 => logits,
            _ => logits.to_dtype(DType::F32)?,
        };
        let (mut g, perm) = kernels::fused_gating_permute(&logits, router.top_k())?;
        // the kernel keeps the chosen scores; `norm_topk_prob` renormalises them on the device
        g.weights = router.gate_weights(g.weights)?;
        let h = kernels::grouped_gate_up_gather(&flat, &perm, &self.weights.gate, &self.weights.up)?;
        let y = kernels::grouped_matmul(&h, &perm.offsets, &self.weights.down)?;
        let shared = shared.map(|p| p.join()).transpose()?;
        let out = kernels::combine(&y, &perm, &g.weights, shared.as_ref())?.reshape((n, t, d))?;
        let shared = shared.map(|s| s.reshape((n, t, d))).transpose()?;
        let routing = Routing { experts: g.ids, weights: g.weights, scores: g.scores };
        Ok(MoeOutput { out, routed: None, shared, routing, expert_counts: g.expert_counts, dispatch: None })
    }
}
