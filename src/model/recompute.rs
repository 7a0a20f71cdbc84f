//! Activation recomputation per block (`ditmoe train --recompute`), what
//! `torch.utils.checkpoint` around each `DiTBlock` does: the training forward keeps only each
//! block's input tokens, and the backward runs every block's forward again, from the last
//! block to the first, to rebuild that block's activations just before they are needed.
//!
//! Memory: the blocks' activations (attention, the MoE layer's permuted tokens and expert
//! hidden states, adaLN terms) exist for one block at a time instead of all `depth` blocks; what
//! stays is one `(N, T, D)` f32 tensor per block. Cost: a second forward of every block.
//!
//! candle's autograd has no checkpoint op, so the backward is run in segments:
//! 1. [`DitMoe::forward_recomputed`]: the embeddings with their graph, then each block on a
//!    detached copy of its input (its graph dropped as soon as its output is taken), then the
//!    final layer on a leaf variable holding the last block's output. The loss built on that
//!    output is differentiable in the final layer, the embeddings through `c`, and the leaf.
//! 2. The caller's `loss.backward()` gives those gradients, among them `dL/dx_L` at the leaf.
//! 3. [`BlockTape::backward`]: for `i = L-1 .. 0`, block `i` runs again on leaf copies of its
//!    input and of `c`; the backward of `<block_i(x_i, c), dL/dx_{i+1}>` plus the block's own
//!    losses (balance, contrastive) gives its parameters' gradients, `dL/dx_i` and its share of
//!    `dL/dc`. Last, `<x_0, dL/dx_0> + <c, Σ dL/dc>` through the embeddings.
//!
//! Every block's forward is deterministic (no dropout; routing is a function of the tokens), so
//! the recomputed activations are the ones the first pass produced and the gradients equal the
//! plain backward's up to the order of floating-point sums (`tests/suite/train.rs`).
use super::dit::Routed;
use super::{DitMoe, DitOutput, ForwardMode, Trace};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// What the backward of a recomputed forward needs: each block's input and the graph-carrying
/// embeddings. Consumed by [`BlockTape::backward`].
pub struct BlockTape {
    /// Block `i`'s input tokens, detached (N, T, D) f32.
    block_inputs: Vec<Tensor>,
    /// The embeddings' outputs, with their autograd graph: tokens `x_0` and conditioning `c`.
    x0: Tensor,
    c: Tensor,
    /// The final layer's input, the last block's output as a leaf.
    head_input: Var,
    /// ProMoE's null-label token mask, as the first pass used it.
    unconditional: Option<Tensor>,
}

impl DitMoe {
    /// The training forward of [`DitMoe::forward_full`] that keeps only the blocks' inputs (see
    /// the module docs). The output's balance and contrastive losses carry their values but no
    /// gradient: [`BlockTape::backward`] adds their gradients when it recomputes their blocks.
    pub fn forward_recomputed(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<(DitOutput, BlockTape)> {
        let no_trace = &mut Trace::default();
        let (x0, c) = self.embed(x, t, y, no_trace)?;
        let unconditional = self.unconditional_tokens(y)?;
        // The blocks' inputs are leaves, as they are when the backward recomputes them: a
        // layer may take another kernel for a tensor autograd tracks (the LayerNorms do), and
        // the two passes must route every token alike.
        let c_leaf = Var::from_tensor(&c.detach())?;
        let mut routed = Routed::default();
        let mut block_inputs = Vec::with_capacity(self.blocks().len());
        let mut x = x0.detach();
        for (i, block) in self.blocks().iter().enumerate() {
            let x_leaf = Var::from_tensor(&x)?;
            let mut b = block.forward(x_leaf.as_tensor(), c_leaf.as_tensor(), unconditional.as_ref(), ForwardMode::Train, i, no_trace)?;
            b.aux_loss = b.aux_loss.map(|a| a.detach());
            b.contrastive_loss = b.contrastive_loss.map(|a| a.detach());
            block_inputs.push(x);
            // Detaching the output drops the block's autograd graph, and with it its activations.
            x = routed.take(b).detach();
        }
        let head_input = Var::from_tensor(&x)?;
        let out = self.head(head_input.as_tensor(), &c, no_trace)?;
        Ok((routed.into_output(out), BlockTape { block_inputs, x0, c, head_input, unconditional }))
    }
}

impl BlockTape {
    /// Continues `grads`, the backward of a loss through [`DitMoe::forward_recomputed`]'s
    /// output, through the blocks and the embeddings, adding every parameter's gradient to it.
    /// `loss_scale`: the factor on the blocks' balance and contrastive losses in that loss (the
    /// trainer's `1 / accumulation`).
    pub fn backward(self, model: &DitMoe, grads: &mut GradStore, loss_scale: f64) -> Result<()> {
        let mut dx = grads
            .remove(self.head_input.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("recomputed backward: the loss does not depend on the model output".into()))?;
        // One leaf for c serves every block: each block's backward has a store of its own.
        let c_in = Var::from_tensor(&self.c.detach())?;
        let mut dc: Option<Tensor> = None;
        for (i, block) in model.blocks().iter().enumerate().rev() {
            let x_in = Var::from_tensor(&self.block_inputs[i])?;
            let b = block.forward(x_in.as_tensor(), c_in.as_tensor(), self.unconditional.as_ref(), ForwardMode::Train, i, &mut Trace::default())?;
            let mut objective = (b.x * &dx)?.sum_all()?;
            for loss in b.aux_loss.iter().chain(&b.contrastive_loss) {
                objective = (objective + (loss.sum_all()? * loss_scale)?)?;
            }
            let mut block_grads = objective.backward()?;
            dx = block_grads.remove(x_in.as_tensor()).ok_or_else(|| candle_core::Error::Msg(format!("recomputed backward: block {i}'s output does not depend on its input")))?;
            if let Some(g) = block_grads.remove(c_in.as_tensor()) {
                dc = Some(match dc {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
            grads.extend(block_grads)?;
        }
        let mut objective = (&self.x0 * &dx)?.sum_all()?;
        if let Some(dc) = dc {
            objective = (objective + (&self.c * &dc)?.sum_all()?)?;
        }
        grads.extend(objective.backward()?)
    }
}
