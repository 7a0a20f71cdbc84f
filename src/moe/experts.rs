//! The expert MLPs the MoE layers dispatch to. Both are plain [`Module`]s, which is all
//! [`super::ExpertDispatch::run`] needs, so every router shares one dispatch:
//! - [`SwigluExpert`]: DiT-MoE's `MoeMLP`, `down_proj(silu(gate_proj(x)) * up_proj(x))`, no
//!   bias. Routed experts use intermediate `mlp_ratio * D`, the shared expert `n_shared * D`.
//!   (`pretraining_tp` only slices these matmuls: same maths, another summation order.)
//! - [`GeluMlp`]: ProMoE's `modules.MoeMLP`, `down_proj(gelu_tanh(up_proj(x)))` with biases,
//!   for the routed, unconditional and shared experts; the same maths is timm's `Mlp`
//!   (`fc1`, `fc2`) of ProMoE's dense blocks, so one type serves both under their names; with
//!   the exact GELU it is Megatron's `ParallelMLP`, DeepSpeed-MoE's expert.
//!
//! Projections load by the layer's [`ParamNames`] (`gate_proj`/`up_proj`/`down_proj`, Mixtral's
//! `w1`/`w3`/`w2`, Megatron's `dense_h_to_4h`/`dense_4h_to_h`).
use super::config::{ExpertForm, ParamNames};
use crate::moe::kernels::expert_act::GeluKind;
use super::ExpertDispatch;
use crate::moe::kernels::{ExpertStacks, ExpertWeights, GeluExpertWeights};
use crate::nn::Linear;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct SwigluExpert {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwigluExpert {
    /// The expert under DiT-MoE's names (`gate_proj`, `up_proj`, `down_proj`).
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Self::named(hidden, intermediate, &ParamNames::default(), vb)
    }

    pub fn named(hidden: usize, intermediate: usize, names: &ParamNames, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: crate::nn::linear_no_bias(hidden, intermediate, vb.pp(&names.gate_proj))?,
            up_proj: crate::nn::linear_no_bias(hidden, intermediate, vb.pp(&names.up_proj))?,
            down_proj: crate::nn::linear_no_bias(intermediate, hidden, vb.pp(&names.down_proj))?,
        })
    }

    /// An expert over existing `[out, in]` weights (views into the layer's stacked tensors,
    /// so the two paths share one copy of the weights).
    pub fn from_weights(gate: Tensor, up: Tensor, down: Tensor) -> Self {
        let l = |w| Linear::from_weights(w, None);
        Self { gate_proj: l(gate), up_proj: l(up), down_proj: l(down) }
    }

    /// The three weights, `[out, in]` as `nn.Linear` stores them (gate, up, down).
    pub fn weights(&self) -> [&Tensor; 3] {
        [self.gate_proj.weight(), self.up_proj.weight(), self.down_proj.weight()]
    }
}

fn stack_each<E>(experts: &[E], part: impl Fn(&E) -> &Tensor) -> Result<Tensor> {
    Tensor::stack(&experts.iter().map(part).collect::<Vec<_>>(), 0)
}

/// Expert forms the fused routed op ([`crate::moe::kernels::routed_experts`]) runs: stacked, per
/// call, into its layout, or once for frozen weights ([`stack_frozen`]).
pub trait StackedExperts: Module + Sized {
    /// The experts' weights stacked as the grouped kernels take them (SwiGLU: `[E, I, D]` gate
    /// and up, `[E, D, I]` down); a copy, differentiable, so each expert's slice of a stack's
    /// gradient reaches its own weights.
    fn stack(experts: &[Self]) -> Result<ExpertStacks>;
    /// The experts as views into `stacks` (expert `e`'s slice of each stacked tensor).
    fn views(stacks: &ExpertStacks) -> Result<Vec<Self>>;
}

/// A layer's routed experts, in one of the engine's expert forms.
#[derive(Debug, Clone)]
pub enum Experts {
    Swiglu(Vec<SwigluExpert>),
    Gelu(Vec<GeluMlp>),
}

impl Experts {
    /// `count` experts of `form`, `<e>.<proj>` under `vb`.
    pub fn new(form: ExpertForm, hidden: usize, intermediate: usize, count: usize, names: &ParamNames, vb: VarBuilder) -> Result<Self> {
        let pp = |e: usize| vb.pp(e.to_string());
        Ok(match form.gelu() {
            None => Self::Swiglu((0..count).map(|e| SwigluExpert::named(hidden, intermediate, names, pp(e))).collect::<Result<_>>()?),
            Some(act) => Self::Gelu((0..count).map(|e| GeluMlp::named(hidden, intermediate, act, &names.up_proj, &names.down_proj, pp(e))).collect::<Result<_>>()?),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Swiglu(v) => v.len(),
            Self::Gelu(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `e`'s weights, `[out, in]` (SwiGLU: gate, up, down; GELU: up, down).
    pub fn weights(&self, e: usize) -> Vec<&Tensor> {
        match self {
            Self::Swiglu(v) => v[e].weights().to_vec(),
            Self::Gelu(v) => v[e].weights().to_vec(),
        }
    }

    /// The dispatch's weighted sum of the experts over x `[S, d]` (the CPU reference).
    pub fn run(&self, dispatch: &ExpertDispatch, x: &Tensor, weights: &Tensor) -> Result<Tensor> {
        match self {
            Self::Swiglu(v) => dispatch.run(x, weights, v),
            Self::Gelu(v) => dispatch.run(x, weights, v),
        }
    }

    /// The weights stacked for the grouped kernels: a differentiable copy (see
    /// [`StackedExperts::stack`]).
    pub fn stack(&self) -> Result<ExpertStacks> {
        match self {
            Self::Swiglu(v) => SwigluExpert::stack(v),
            Self::Gelu(v) => GeluMlp::stack(v),
        }
    }
}

/// Frozen experts stacked once, and rebuilt as views into the stacks, so that the fused and the
/// per-expert paths share one copy of the weights and no call stacks them again.
pub fn stack_frozen(experts: &Experts) -> Result<(ExpertStacks, Experts)> {
    let stacks = experts.stack()?;
    let views = match experts {
        Experts::Swiglu(_) => Experts::Swiglu(SwigluExpert::views(&stacks)?),
        Experts::Gelu(_) => Experts::Gelu(GeluMlp::views(&stacks)?),
    };
    Ok((stacks, views))
}

/// The always-on shared expert (and PR-MoE's residual MLP), in the layer's expert form.
#[derive(Debug, Clone)]
pub enum SharedExpert {
    Swiglu(SwigluExpert),
    Gelu(GeluMlp),
}

impl SharedExpert {
    pub fn new(form: ExpertForm, hidden: usize, intermediate: usize, names: &ParamNames, vb: VarBuilder) -> Result<Self> {
        Ok(match form.gelu() {
            None => Self::Swiglu(SwigluExpert::named(hidden, intermediate, names, vb)?),
            Some(act) => Self::Gelu(GeluMlp::named(hidden, intermediate, act, &names.up_proj, &names.down_proj, vb)?),
        })
    }
}

impl Module for SharedExpert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Swiglu(m) => m.forward(x),
            Self::Gelu(m) => m.forward(x),
        }
    }
}

/// Expert `e`'s slice of a stacked tensor.
fn slice(stack: &Tensor, e: usize) -> Result<Tensor> {
    stack.narrow(0, e, 1)?.squeeze(0)
}

fn form_mismatch() -> candle_core::Error {
    candle_core::Error::Msg("stacked experts of another form".into())
}

impl StackedExperts for SwigluExpert {
    fn stack(experts: &[Self]) -> Result<ExpertStacks> {
        let stack = |i: usize| stack_each(experts, |e| e.weights()[i]);
        Ok(ExpertStacks::Swiglu(ExpertWeights { gate: stack(0)?, up: stack(1)?, down: stack(2)? }))
    }

    fn views(stacks: &ExpertStacks) -> Result<Vec<Self>> {
        let ExpertStacks::Swiglu(w) = stacks else { return Err(form_mismatch()) };
        (0..w.gate.dim(0)?).map(|e| Ok(Self::from_weights(slice(&w.gate, e)?, slice(&w.up, e)?, slice(&w.down, e)?))).collect()
    }
}

impl StackedExperts for GeluMlp {
    fn stack(experts: &[Self]) -> Result<ExpertStacks> {
        let bias = |l: &Linear| l.bias().cloned().ok_or_else(|| candle_core::Error::Msg("GELU experts have biases".into()));
        let (up_bias, down_bias) = (experts.iter().map(|e| bias(&e.up)).collect::<Result<Vec<_>>>()?, experts.iter().map(|e| bias(&e.down)).collect::<Result<Vec<_>>>()?);
        Ok(ExpertStacks::Gelu(GeluExpertWeights {
            up: stack_each(experts, |e| e.up.weight())?,
            up_bias: Tensor::stack(&up_bias, 0)?,
            down: stack_each(experts, |e| e.down.weight())?,
            down_bias: Tensor::stack(&down_bias, 0)?,
            activation: experts.first().map_or(GeluKind::Tanh, |e| e.activation),
        }))
    }

    fn views(stacks: &ExpertStacks) -> Result<Vec<Self>> {
        let ExpertStacks::Gelu(w) = stacks else { return Err(form_mismatch()) };
        let linear = |wt: &Tensor, b: &Tensor, e| -> Result<Linear> { Ok(Linear::from_weights(slice(wt, e)?, Some(slice(b, e)?))) };
        (0..w.up.dim(0)?).map(|e| Ok(Self { up: linear(&w.up, &w.up_bias, e)?, down: linear(&w.down, &w.down_bias, e)?, activation: w.activation })).collect()
    }
}

impl Module for SwigluExpert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::moe::kernels::expert_act::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// `Linear(D, I) -> GELU -> Linear(I, D)`, both with bias.
#[derive(Debug, Clone)]
pub struct GeluMlp {
    up: Linear,
    down: Linear,
    activation: GeluKind,
}

impl GeluMlp {
    /// ProMoE's `MoeMLP`: names `up_proj`, `down_proj`, tanh GELU.
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Self::named(hidden, intermediate, GeluKind::Tanh, "up_proj", "down_proj", vb)
    }

    /// timm `Mlp` names: `fc1`, `fc2`, tanh GELU (the dense blocks of ProMoE; dropout is 0 there).
    pub fn timm(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Self::named(hidden, intermediate, GeluKind::Tanh, "fc1", "fc2", vb)
    }

    pub fn named(hidden: usize, intermediate: usize, activation: GeluKind, up: &str, down: &str, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            up: crate::nn::linear(hidden, intermediate, vb.pp(up))?,
            down: crate::nn::linear(intermediate, hidden, vb.pp(down))?,
            activation,
        })
    }

    /// The two weights, `[out, in]` (up, down).
    pub fn weights(&self) -> [&Tensor; 2] {
        [self.up.weight(), self.down.weight()]
    }
}

impl Module for GeluMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.activation.apply(&self.up.forward(x)?)?)
    }
}
