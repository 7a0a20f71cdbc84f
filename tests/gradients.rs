//! Training reaches every parameter: a backward pass through the full model (both attention
//! forms, router, experts, shared expert, norms) gives every trainable tensor a nonzero
//! gradient, and the balance loss alone reaches the router. (candle-nn's fused softmax and
//! LayerNorm kernels have no backward; this is the test that catches them in the graph.)
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::fixture_path;
use ditmoe::model::{ForwardMode, Trace};
use ditmoe::{DitConfig, DitMoe};

fn check(case: &str) {
    let cfg = DitConfig::from_file(&fixture_path(&format!("models/{case}/config.json"))).unwrap();
    let varmap = VarMap::new();
    let model = DitMoe::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
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

/// The routed experts as one differentiable op on the fused kernels (the CUDA training path,
/// `kernels::routed_swiglu`) against the candle dispatch (the CPU path, autograd through
/// index_select/matmul/index_add): the same value and the same gradients for the tokens, the
/// router scores and every expert weight. `only_two_experts` routes every token to experts 0
/// and 1 of 4, so two experts have no rows: their weight gradients must be zero.
fn fused_experts_against_dispatch(only_two_experts: bool) {
    use candle_core::Var;
    use ditmoe::moe::{stack_expert_weights, ExpertDispatch, SwigluExpert};
    let dir = ditmoe::checkpoint::ModelDir::open(&fixture_path("models/tiny")).unwrap();
    let model = dir.load(DType::F32, &Device::Cpu).unwrap();
    let moe = model.blocks()[0].moe().unwrap();
    let io = common::load_fixture("models/tiny/io.safetensors");
    let x = Var::from_tensor(&io["blocks.0.moe_in"].flatten_to(1).unwrap()).unwrap();
    let mut routing = moe.router().forward(x.as_tensor()).unwrap();
    let (s, k) = routing.experts.dims2().unwrap();
    if only_two_experts {
        let ids: Vec<u32> = (0..s * k).map(|p| ((p + p / k) % 2) as u32).collect();
        routing.experts = Tensor::from_vec(ids, (s, k), &Device::Cpu).unwrap();
    }
    // Gradients are compared at the router scores, through the top-k weight selection.
    let scores = Var::from_tensor(&routing.scores).unwrap();
    let weights = scores.as_tensor().gather(&routing.experts, 1).unwrap();
    let vars: Vec<[Var; 3]> = moe.experts().iter().map(|e| e.weights().map(|w| Var::from_tensor(w).unwrap())).collect();
    let experts: Vec<SwigluExpert> = vars.iter().map(|[g, u, d]| SwigluExpert::from_weights(g.as_tensor().clone(), u.as_tensor().clone(), d.as_tensor().clone())).collect();

    let n_experts = experts.len();
    let sparse = ExpertDispatch::new(&routing.experts, n_experts).unwrap().run(x.as_tensor(), &weights, &experts).unwrap();
    let perm = ditmoe::kernels::permute_by_expert(&routing.experts, n_experts).unwrap();
    let stacked = stack_expert_weights(&experts).unwrap();
    let fused = ditmoe::kernels::routed_swiglu(x.as_tensor(), &weights, &stacked, &perm).unwrap();
    common::assert_close("fused vs dispatch", &fused, &sparse, 1e-5);

    let probe = Tensor::randn(0f32, 1.0, sparse.shape(), &Device::Cpu).unwrap();
    let gs = (&sparse * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    common::assert_close("token gradients", gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap(), 1e-5);
    common::assert_close("router-score gradients", gf.get(scores.as_tensor()).unwrap(), gs.get(scores.as_tensor()).unwrap(), 1e-5);
    let mut idle = 0;
    for (e, ws) in vars.iter().enumerate() {
        for (w, name) in ws.iter().zip(["gate", "up", "down"]) {
            let f = gf.get(w.as_tensor()).unwrap_or_else(|| panic!("no fused gradient reaches expert {e} {name}"));
            match gs.get(w.as_tensor()) {
                Some(g) => {
                    common::assert_close(&format!("expert {e} {name} gradient"), f, g, 1e-5);
                }
                None => {
                    // the dispatch skips experts without rows; the fused op gives them zeros
                    assert_eq!(f.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "expert {e} {name}");
                    idle += 1;
                }
            }
        }
    }
    assert_eq!(idle, if only_two_experts { 6 } else { 0 }, "weights of experts without rows");
}

#[test]
fn fused_experts_match_dispatch_values_and_gradients() {
    fused_experts_against_dispatch(false);
}

#[test]
fn fused_experts_give_idle_experts_zero_gradients() {
    fused_experts_against_dispatch(true);
}
