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

/// The dense masked mixture (CUDA training path) computes what the sorted dispatch computes,
/// and passes the same gradients to the router weights.
#[test]
fn dense_masked_mixture_equals_dispatch() {
    use ditmoe::moe::{run_dense_masked, ExpertDispatch};
    let dir = ditmoe::checkpoint::ModelDir::open(&fixture_path("models/tiny")).unwrap();
    let model = dir.load(DType::F32, &Device::Cpu).unwrap();
    let moe = model.blocks()[0].moe().unwrap();
    let io = common::load_fixture("models/tiny/io.safetensors");
    let x = io["blocks.0.moe_in"].flatten_to(1).unwrap();
    let routing = moe.router().forward(&x).unwrap();
    // Gradients are compared at the router scores, through the top-k weight selection.
    let w = candle_core::Var::from_tensor(&routing.scores).unwrap();
    let weights = w.as_tensor().gather(&routing.experts, 1).unwrap();
    let routing = ditmoe::moe::Routing { scores: w.as_tensor().clone(), weights, ..routing };
    let sparse = ExpertDispatch::new(&routing.experts, 4).unwrap().run(&x, &routing.weights, moe.experts()).unwrap();
    let dense = run_dense_masked(&x, &routing, moe.experts(), false).unwrap();
    common::assert_close("dense vs dispatch", &dense, &sparse, 1e-5);
    let probe = Tensor::randn(0f32, 1.0, sparse.shape(), &Device::Cpu).unwrap();
    let gs = (&sparse * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gd = (&dense * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    common::assert_close("router-weight gradients", gd.get(w.as_tensor()).unwrap(), gs.get(w.as_tensor()).unwrap(), 1e-5);
}
