//! Token dispatch: sort the (token, slot) pairs by expert, run each expert once on its
//! contiguous rows, scatter-add the weighted outputs back. This is the structure of the
//! official `SparseMoeBlock.moe_infer` (argsort + bincount + per-expert loop + scatter_reduce);
//! the official training path (`repeat_interleave` + masked calls) computes the same sums in
//! another order, so one dispatch serves both modes. ProMoE's `SparseMoeBlock.forward` loops
//! over experts the same way (`index_add_` of each expert's weighted rows), so the dispatch is
//! shared by every router and expert form. The GPU kernels replace its pieces.
use candle_core::{DType, Device, Module, Result, Tensor};

/// A stable counting sort of token slots by expert.
#[derive(Debug, Clone)]
pub struct ExpertDispatch {
    /// Slot indices `token * k + j`, expert-contiguous, tokens ascending within an expert.
    pub order: Vec<u32>,
    /// `offsets[e]..offsets[e + 1]` are expert e's rows of `order`.
    pub offsets: Vec<usize>,
    pub top_k: usize,
}

impl ExpertDispatch {
    /// `experts`: (S, k) expert ids; the kernels' stable counting sort
    /// ([`crate::moe::kernels::permute_by_expert`]), read back to the host.
    pub fn new(experts: &Tensor, num_experts: usize) -> Result<Self> {
        let (_, k) = experts.dims2()?;
        let ids = experts.to_device(&Device::Cpu)?.to_dtype(DType::U32)?;
        let perm = crate::moe::kernels::permute_by_expert(&ids, num_experts)?;
        let order = perm.order.to_vec1::<u32>()?;
        let offsets = perm.offsets.to_vec1::<u32>()?.into_iter().map(|o| o as usize).collect();
        Ok(Self { order, offsets, top_k: k })
    }

    /// Tokens routed to each expert.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The tokens whose picks include expert `e`, ascending; with `first_pick_only`, those whose
    /// first (highest-weight) pick is `e`. Each token appears once: a token's k picks are
    /// distinct experts (top-k), except the unconditional expert, which fills all k slots.
    pub fn tokens_of(&self, e: usize, first_pick_only: bool) -> Vec<u32> {
        let k = self.top_k as u32;
        let mut tokens: Vec<u32> = self.order[self.offsets[e]..self.offsets[e + 1]]
            .iter()
            .filter(|&&slot| !first_pick_only || slot % k == 0)
            .map(|&slot| slot / k)
            .collect();
        tokens.dedup(); // slots are ascending, so a token's repeated slots are adjacent
        tokens
    }

    /// `sum_j w_j * expert_{i_j}(x)` for every token: x (S, D), weights (S, k) -> (S, D).
    /// Experts without tokens are skipped; every step is differentiable (index_select, matmul,
    /// index_add), so training backpropagates through it. Any expert form works (SwiGLU,
    /// GELU MLP): `experts[e]` is expert id e.
    pub fn run<M: Module>(&self, x: &Tensor, weights: &Tensor, experts: &[M]) -> Result<Tensor> {
        let dev = x.device();
        let flat_w = weights.to_dtype(x.dtype())?.flatten_all()?;
        let mut outs = Vec::with_capacity(experts.len());
        let mut token_rows = Vec::with_capacity(experts.len());
        for (e, expert) in experts.iter().enumerate() {
            let slots = &self.order[self.offsets[e]..self.offsets[e + 1]];
            if slots.is_empty() {
                continue;
            }
            let tokens = index_tensor(slots.iter().map(|s| s / self.top_k as u32), dev)?;
            let slot_idx = index_tensor(slots.iter().copied(), dev)?;
            let y = expert.forward(&x.index_select(&tokens, 0)?)?;
            let w = flat_w.index_select(&slot_idx, 0)?.unsqueeze(1)?;
            outs.push(y.broadcast_mul(&w)?);
            token_rows.push(tokens);
        }
        let out = Tensor::zeros_like(x)?;
        if outs.is_empty() {
            return Ok(out);
        }
        // One scatter-add over all slots, in expert order: deterministic on every backend.
        out.index_add(&Tensor::cat(&token_rows, 0)?, &Tensor::cat(&outs, 0)?, 0)
    }
}

fn index_tensor(it: impl Iterator<Item = u32>, dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = it.collect();
    let n = v.len();
    Tensor::from_vec(v, n, dev)
}
