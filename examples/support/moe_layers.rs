//! MoE layers from raw stacked weights, for the MoE benchmarks and GPU tests:
//! - [`fused_layer`]: the engine's `MoeLayer` over given tensors (a top-k router, SwiGLU
//!   experts, an optional shared expert), run by the plan's path;
//! - [`random_layer`]: such tensors at random (std 1/sqrt(fan-in));
//! - [`moe_forward_loop`]: the per-expert loop baseline, structured like the official
//!   `SparseMoeBlock.moe_infer`: softmax + top-k with candle ops, one host read of the routing,
//!   then per expert `index_select`, three matmuls, SiLU·mul, scaling by the gate weight and
//!   `index_add` back, plus the shared expert. It is what a candle port without fused kernels
//!   runs (candle's Mixtral/Qwen-MoE do the same), so the benchmarks measure the kernels
//!   against it.
#![allow(dead_code)]
use candle_core::{DType, Device, Result, Tensor};
use ditmoe::moe::kernels::{ExpertWeights, SwigluWeights};
use ditmoe::moe::{ExpertForm, MoeConfig, MoeLayer, RouterConfig};
use ditmoe::ExecutionPlan;
use std::collections::HashMap;

/// Random weights of one layer in `dt` on `dev`: experts `[E, I, D]`/`[E, D, I]`, the shared
/// expert of width `i_shared`, the router `[E, D]`.
pub fn random_layer(dev: &Device, dt: DType, d: usize, e: usize, i: usize, i_shared: usize) -> Result<(ExpertWeights, SwigluWeights, Tensor)> {
    let mk = |shape: &[usize]| -> Result<Tensor> {
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        (Tensor::randn(0f32, 1.0, shape, dev)? / fan_in.sqrt())?.to_dtype(dt)
    };
    let experts = ExpertWeights { gate: mk(&[e, i, d])?, up: mk(&[e, i, d])?, down: mk(&[e, d, i])? };
    let shared = SwigluWeights { gate: mk(&[i_shared, d])?, up: mk(&[i_shared, d])?, down: mk(&[d, i_shared])? };
    Ok((experts, shared, mk(&[e, d])?))
}

/// The engine's layer over these weights (DiT-MoE's parameter names), top-`k` routing.
pub fn fused_layer(router: &Tensor, experts: &ExpertWeights, shared: Option<&SwigluWeights>, k: usize, plan: &ExecutionPlan) -> Result<MoeLayer> {
    let (e, i, d) = experts.gate.dims3()?;
    let mut tensors = HashMap::from([("gate.weight".to_string(), router.clone())]);
    for x in 0..e {
        for (name, stack) in [("gate_proj", &experts.gate), ("up_proj", &experts.up), ("down_proj", &experts.down)] {
            tensors.insert(format!("experts.{x}.{name}.weight"), stack.get(x)?);
        }
    }
    if let Some(s) = shared {
        for (name, w) in [("gate_proj", &s.gate), ("up_proj", &s.up), ("down_proj", &s.down)] {
            tensors.insert(format!("shared_experts.{name}.weight"), w.clone());
        }
    }
    let cfg = MoeConfig {
        hidden_size: d,
        num_experts: e,
        top_k: k,
        expert_intermediate_size: i,
        expert_form: ExpertForm::Swiglu,
        shared_expert_intermediate_size: shared.map_or(0, |s| s.gate.dim(0).unwrap_or(0)),
        shared_expert_gate: false,
        residual_intermediate_size: 0,
        router: RouterConfig::TopK { norm_topk_prob: false },
        balance_loss: Default::default(),
        capacity: Default::default(),
        names: Default::default(),
    };
    MoeLayer::new(&cfg, plan, candle_nn::VarBuilder::from_tensors(tensors, router.dtype(), router.device()))
}

/// The per-expert loop baseline (see the module docs); works on every device.
/// Returns the output `[S, D]`, the ids `[S, k]` and the weights `[S, k]`.
pub fn moe_forward_loop(
    x: &Tensor,
    router_w: &Tensor,
    experts: &ExpertWeights,
    shared: Option<&SwigluWeights>,
    k: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = x.device();
    let (s, d) = x.dims2()?;
    let n_experts = router_w.dim(0)?;
    let logits = x.matmul(&router_w.t()?)?.to_dtype(DType::F32)?;
    let scores = candle_nn::ops::softmax_last_dim(&logits)?;
    // top-k by descending score (ties: the CPU sort is stable, the CUDA bitonic sort is not)
    let sorted = scores.arg_sort_last_dim(false)?;
    let ids = sorted.narrow(1, 0, k)?.contiguous()?;
    let weights = scores.gather(&ids, 1)?;
    // the one host read per layer, as in the official moe_infer (bincount().cpu())
    let ids_host: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n_experts];
    for (p, &e) in ids_host.iter().enumerate() {
        rows[e as usize].push(p as u32);
    }
    let flat_w = weights.flatten_all()?;
    let mut out = Tensor::zeros((s, d), DType::F32, dev)?;
    for (e, slots) in rows.iter().enumerate() {
        if slots.is_empty() {
            continue;
        }
        let slot_idx = Tensor::new(slots.as_slice(), dev)?;
        let tok: Vec<u32> = slots.iter().map(|&p| p / k as u32).collect();
        let tok_idx = Tensor::new(tok.as_slice(), dev)?;
        let xe = x.index_select(&tok_idx, 0)?;
        let g = xe.matmul(&experts.gate.get(e)?.t()?)?;
        let u = xe.matmul(&experts.up.get(e)?.t()?)?;
        let h = (g.silu()? * u)?;
        let y = h.matmul(&experts.down.get(e)?.t()?)?.to_dtype(DType::F32)?;
        let we = flat_w.index_select(&slot_idx, 0)?.unsqueeze(1)?;
        let y = y.broadcast_mul(&we)?;
        out = out.index_add(&tok_idx, &y, 0)?;
    }
    if let Some(sh) = shared {
        let g = x.matmul(&sh.gate.t()?)?;
        let u = x.matmul(&sh.up.t()?)?;
        let y = (g.silu()? * u)?.matmul(&sh.down.t()?)?;
        out = (out + y.to_dtype(DType::F32)?)?;
    }
    Ok((out.to_dtype(x.dtype())?, ids, weights))
}
