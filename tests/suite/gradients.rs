//! Training reaches every parameter: a backward pass through the full model (both attention
//! forms, router, experts, shared expert, norms) gives every trainable tensor a nonzero
//! gradient, and the balance loss alone reaches the router. (candle-nn's fused softmax and
//! LayerNorm kernels have no backward; this is the test that catches them in the graph.)
use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_core::Var;
use common::fixture_path;
use ditmoe::moe::{ExpertDispatch, GeluMlp, StackedExperts, SwigluExpert};
use ditmoe::model::{ForwardMode, Trace};
use ditmoe::{DitConfig, DitMoe};

fn check(case: &str) {
    let cfg = DitConfig::from_file(&fixture_path(&format!("models/{case}/config.json"))).unwrap();
    let varmap = VarMap::new();
    let model = DitMoe::new(&cfg, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    // The official fixture weights (no zero-initialised norms that would make some gradients
    // vanish for structural reasons), loaded into the variables in place.
    let mut varmap = varmap;
    varmap.load(fixture_path(&format!("models/{case}/model.safetensors"))).unwrap();
    let io = common::load_fixture(&format!("models/{case}/io.safetensors"));
    let out = model.forward_full(&io["x"], &io["t"], &io["y"], ForwardMode::Train, &mut Trace::default()).unwrap();
    let aux = Tensor::stack(&out.aux_losses, 0).unwrap().sum_all().unwrap();
    let loss = (out.out.sqr().unwrap().mean_all().unwrap() + &aux).unwrap();
    let grads = loss.backward().unwrap();
    let aux_grads = aux.backward().unwrap();
    let counts = out.expert_counts_host().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        // A routed expert that no token picked has, rightly, no gradient.
        if let Some((layer, expert)) = routed_expert(name) {
            if counts[layer][expert] == 0 {
                continue;
            }
        }
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient reaches `{name}`"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{case}: gradient of `{name}` has norm {norm}");
        if name.ends_with("moe.gate.weight") {
            let g = aux_grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: balance loss does not reach `{name}`"));
            assert!(g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{case}: balance-loss gradient of `{name}` is zero");
        }
    }
}

/// (block, expert) of `blocks.<b>.moe.experts.<e>.*`.
fn routed_expert(name: &str) -> Option<(usize, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["blocks", b, "moe", "experts", e, ..] => Some((b.parse().ok()?, e.parse().ok()?)),
        _ => None,
    }
}

#[test]
fn every_parameter_gets_a_gradient_timm_attention() {
    check("tiny");
}

#[test]
fn every_parameter_gets_a_gradient_flash_attention() {
    check("tiny-flash");
}

/// The routed experts as one differentiable op on the fused kernels (the CUDA path,
/// `kernels::routed_experts`) against the candle dispatch (the CPU path, autograd through
/// index_select/matmul/index_add): the same value and the same gradients for the tokens, the
/// router scores and every expert parameter in `params` (grouped per expert). An expert
/// without rows gets no gradient from the dispatch and zeros from the fused op; `idle` counts
/// its parameters.
fn fused_experts_against_dispatch<M: StackedExperts>(experts: &[M], params: &[Vec<Var>], x: &Var, ids: &Tensor, scores: &Var, idle: usize) {
    // Gradients are compared at the router scores, through the top-k weight selection.
    let weights = scores.as_tensor().gather(ids, 1).unwrap();
    let sparse = ExpertDispatch::new(ids, experts.len()).unwrap().run(x.as_tensor(), &weights, experts).unwrap();
    let perm = ditmoe::moe::kernels::permute_by_expert(ids, experts.len()).unwrap();
    let fused = ditmoe::moe::kernels::routed_experts(x.as_tensor(), &weights, &M::stack(experts).unwrap(), &perm, &Default::default()).unwrap();
    common::assert_close("fused vs dispatch", &fused, &sparse, 1e-5);

    let probe = Tensor::randn(0f32, 1.0, sparse.shape(), &Device::Cpu).unwrap();
    let gs = (&sparse * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    common::assert_close("token gradients", gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap(), 1e-5);
    common::assert_close("router-score gradients", gf.get(scores.as_tensor()).unwrap(), gs.get(scores.as_tensor()).unwrap(), 1e-5);
    let mut zero = 0;
    for (e, ps) in params.iter().enumerate() {
        for (j, p) in ps.iter().enumerate() {
            let f = gf.get(p.as_tensor()).unwrap_or_else(|| panic!("no fused gradient reaches expert {e} parameter {j}"));
            match gs.get(p.as_tensor()) {
                Some(g) => {
                    common::assert_close(&format!("expert {e} parameter {j} gradient"), f, g, 1e-5);
                }
                None => {
                    assert_eq!(f.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "expert {e} parameter {j}");
                    zero += 1;
                }
            }
        }
    }
    assert_eq!(zero, idle, "parameters of experts without rows");
}

/// DiT-MoE's SwiGLU experts of the `tiny` fixture on its layer-0 input; `only_two_experts`
/// routes every token to experts 0 and 1 of 4, so two experts have no rows.
fn swiglu_against_dispatch(only_two_experts: bool) {
    let dir = ditmoe::checkpoint::ModelDir::open(&fixture_path("models/tiny")).unwrap();
    let model = dir.load(&ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32)).unwrap();
    let moe = model.blocks()[0].moe().unwrap();
    let io = common::load_fixture("models/tiny/io.safetensors");
    let x = Var::from_tensor(&io["blocks.0.moe_in"].flatten_to(1).unwrap()).unwrap();
    let mut routing = moe.router().route(x.as_tensor(), None).unwrap();
    let (s, k) = routing.experts.dims2().unwrap();
    if only_two_experts {
        let ids: Vec<u32> = (0..s * k).map(|p| ((p + p / k) % 2) as u32).collect();
        routing.experts = Tensor::from_vec(ids, (s, k), &Device::Cpu).unwrap();
    }
    let scores = Var::from_tensor(&routing.scores).unwrap();
    let params: Vec<Vec<Var>> = (0..moe.experts().len()).map(|e| moe.experts().weights(e).iter().map(|w| Var::from_tensor(w).unwrap()).collect()).collect();
    let experts: Vec<SwigluExpert> = params.iter().map(|p| SwigluExpert::from_weights(p[0].as_tensor().clone(), p[1].as_tensor().clone(), p[2].as_tensor().clone())).collect();
    fused_experts_against_dispatch(&experts, &params, &x, &routing.experts, &scores, if only_two_experts { 6 } else { 0 });
}

#[test]
fn fused_swiglu_experts_match_dispatch_values_and_gradients() {
    swiglu_against_dispatch(false);
}

#[test]
fn fused_swiglu_experts_give_idle_experts_zero_gradients() {
    swiglu_against_dispatch(true);
}

/// ProMoE's GELU experts (with biases): 5 experts, the last one taking both slots of every
/// third token (as the unconditional expert does), expert 3 taking none.
#[test]
fn fused_gelu_experts_match_dispatch_values_and_gradients() {
    let (s, k, d, i, e) = (150usize, 2usize, 24usize, 40usize, 5usize);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let experts: Vec<GeluMlp> = (0..e).map(|j| GeluMlp::new(d, i, vb.pp(format!("experts.{j}"))).unwrap()).collect();
    // the biases start at zero: make them count
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("bias") {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let params: Vec<Vec<Var>> = {
        let data = varmap.data().lock().unwrap();
        (0..e).map(|j| ["up_proj.weight", "up_proj.bias", "down_proj.weight", "down_proj.bias"].iter().map(|p| data[&format!("experts.{j}.{p}")].clone()).collect()).collect()
    };
    let ids: Vec<u32> = (0..s).flat_map(|t| if t % 3 == 0 { [4, 4] } else { [(t % 3) as u32 - 1, 2 + (t % 2) as u32 * 2] }).collect();
    let ids = Tensor::from_vec(ids, (s, k), &Device::Cpu).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (s, d), &Device::Cpu).unwrap()).unwrap();
    let scores = Var::from_tensor(&candle_nn::ops::softmax_last_dim(&Tensor::randn(0f32, 1.0, (s, e), &Device::Cpu).unwrap()).unwrap()).unwrap();
    fused_experts_against_dispatch(&experts, &params, &x, &ids, &scores, 4);
}

/// The vendored candle-core's backward (`vendor/README.md`) stores each node's first gradient
/// contribution as it is instead of adding it to a tensor of zeroes. Gradients of tensors used
/// several times, through subtraction (the first contribution negated), views and reductions
/// must still sum every contribution, and arrive contiguous as the sums did.
#[test]
fn patched_backward_sums_every_contribution() {
    let dev = Device::Cpu;
    let x0 = Tensor::new(&[[1f32, -2., 3.], [0.5, 4., -1.]], &dev).unwrap(); // (2, 3)
    let w0 = Tensor::new(&[[2f32, 1.], [0., -1.], [3., 0.5]], &dev).unwrap(); // (3, 2)
    let (x, w) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
    let (xt, wt) = (x.as_tensor(), w.as_tensor());
    // L = Σ x w + Σ x² − Σ 3 xᵀ + Σ (2x − x), so
    // dL/dx[i, j] = Σ_k w[j, k] + 2 x[i, j] − 3 + 1 and dL/dw[j, k] = Σ_i x[i, j].
    let l = (xt.matmul(wt).unwrap().sum_all().unwrap() + (xt * xt).unwrap().sum_all().unwrap()).unwrap();
    let l = (l - (xt.t().unwrap() * 3.0).unwrap().sum_all().unwrap()).unwrap();
    let l = (l + ((xt * 2.0).unwrap() - xt).unwrap().sum_all().unwrap()).unwrap();
    let g = l.backward().unwrap();
    let dx = g.get(xt).unwrap();
    let dw = g.get(wt).unwrap();
    let want_dx = (w0.sum_keepdim(1).unwrap().t().unwrap().broadcast_as((2, 3)).unwrap() + ((&x0 * 2.0).unwrap() - 2.0).unwrap()).unwrap();
    let want_dw = x0.sum_keepdim(0).unwrap().t().unwrap().broadcast_as((3, 2)).unwrap();
    let max_err = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(max_err(dx, &want_dx), 0.0, "dx {dx} want {want_dx}");
    assert_eq!(max_err(dw, &want_dw), 0.0, "dw {dw} want {want_dw}");

    // x's only contribution comes through a transposed view: stored contiguous.
    let v = Tensor::new(&[[1f32], [2.]], &dev).unwrap();
    let g = xt.t().unwrap().matmul(&v).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(xt).unwrap();
    assert!(dx.is_contiguous(), "the gradient of a transposed view is stored contiguous");
    assert_eq!(dx.to_vec2::<f32>().unwrap(), vec![vec![1f32; 3], vec![2f32; 3]]);
}
