//! The MoE engine on its own: a `MoeLayer` built from a `MoeConfig` for a plain `[S, d]` token
//! batch (as a language model would, no DiT involved), checked forward and backward against a
//! dense reference written here with candle ops (every expert on every token, masked by the
//! router's top-k), and the kernel pipeline (the CUDA path's kernels, run by their CPU
//! references) against the layer's reference dispatch.
use crate::common;

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use common::assert_close;
use ditmoe::moe::{BalanceForm, BalanceLossConfig, ExpertForm, MoeConfig, MoeInput, MoeLayer, RouterConfig};
use ditmoe::{ExecutionPlan, Precision};

const SEQ_LEN: usize = 12;
const SEQS: usize = 5;

fn config(form: ExpertForm, top_k: usize, norm_topk_prob: bool, shared: usize) -> MoeConfig {
    MoeConfig {
        hidden_size: 32,
        num_experts: 6,
        top_k,
        expert_intermediate_size: 48,
        expert_form: form,
        shared_expert_intermediate_size: shared,
        shared_expert_gate: false,
        residual_intermediate_size: 0,
        router: RouterConfig::TopK { norm_topk_prob },
        balance_loss: BalanceLossConfig { coefficient: 0.01, form: BalanceForm::PerSequence },
        capacity: Default::default(),
        names: Default::default(),
    }
}

/// A layer with random weights, and its variables by name.
fn layer(cfg: &MoeConfig, plan: &ExecutionPlan) -> (MoeLayer, VarMap) {
    let varmap = VarMap::new();
    let layer = MoeLayer::new(cfg, plan, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    // every parameter random (a fresh router gate would start at zero: all ties)
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let fan_in = if name.ends_with("bias") { 9 } else { var.dims()[1] };
        var.set(&Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, var.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    (layer, varmap)
}

fn var(vm: &VarMap, name: &str) -> Tensor {
    vm.data().lock().unwrap().get(name).unwrap_or_else(|| panic!("no parameter {name}")).as_tensor().clone()
}

/// One MLP of the config's form under `prefix`, with candle ops.
fn mlp(cfg: &MoeConfig, vm: &VarMap, prefix: &str, x: &Tensor) -> Result<Tensor> {
    let lin = |name: &str, x: &Tensor| -> Result<Tensor> {
        let y = x.matmul(&var(vm, &format!("{prefix}.{name}.weight")).t()?)?;
        match cfg.expert_form {
            ExpertForm::GeluBias | ExpertForm::GeluErfBias => y.broadcast_add(&var(vm, &format!("{prefix}.{name}.bias"))),
            ExpertForm::Swiglu => Ok(y),
        }
    };
    match cfg.expert_form {
        ExpertForm::Swiglu => lin("down_proj", &(lin("gate_proj", x)?.silu()? * lin("up_proj", x)?)?),
        ExpertForm::GeluBias => lin("down_proj", &lin("up_proj", x)?.gelu()?),
        ExpertForm::GeluErfBias => lin("down_proj", &lin("up_proj", x)?.gelu_erf()?),
    }
}

/// The dense reference: softmax router, top-k mask, every expert on every token; plus the
/// per-sequence balance loss from the same scores. Returns (out, aux, ids).
fn dense_reference(cfg: &MoeConfig, vm: &VarMap, x: &Tensor) -> Result<(Tensor, Tensor, Vec<Vec<u32>>)> {
    let (s, _) = x.dims2()?;
    let (e, k) = (cfg.num_experts, cfg.top_k);
    let scores = candle_nn::ops::softmax(&x.matmul(&var(vm, "gate.weight").t()?)?, D::Minus1)?;
    // top-k on the host: descending score, ties to the lower id
    let rows = scores.to_vec2::<f32>()?;
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let mut order: Vec<u32> = (0..e as u32).collect();
            order.sort_by(|&a, &b| r[b as usize].total_cmp(&r[a as usize]).then(a.cmp(&b)));
            order[..k].to_vec()
        })
        .collect();
    let mask: Vec<f32> = ids.iter().flat_map(|row| (0..e as u32).map(move |i| if row.contains(&i) { 1.0 } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (s, e), x.device())?;
    let mut gate = (&scores * &mask)?;
    if let RouterConfig::TopK { norm_topk_prob: true } = cfg.router {
        gate = gate.broadcast_div(&(gate.sum_keepdim(1)? + 1e-20)?)?;
    }
    let mut out = Tensor::zeros_like(x)?;
    for i in 0..e {
        out = (out + mlp(cfg, vm, &format!("experts.{i}"), x)?.broadcast_mul(&gate.narrow(1, i, 1)?)?)?;
    }
    if cfg.shared_expert_intermediate_size > 0 {
        out = (out + mlp(cfg, vm, "shared_experts", x)?)?;
    }
    // DiT-MoE's `seq_aux` balance loss: per sequence, ce_i = count_i / (T k / E) and
    // P_i = mean score; alpha * mean_n sum_i ce_i P_i.
    let (n, t) = (s / SEQ_LEN, SEQ_LEN);
    let counts = mask.reshape((n, t, e))?.sum(1)?;
    let ce = (counts / ((t * k) as f64 / e as f64))?;
    let p = scores.reshape((n, t, e))?.mean(1)?;
    let aux = ((ce * p)?.sum(1)?.mean(0)? * cfg.balance_loss.coefficient)?;
    Ok((out, aux, ids))
}

fn tokens() -> Tensor {
    Tensor::randn(0f32, 1.0, (SEQS * SEQ_LEN, 32), &Device::Cpu).unwrap()
}

/// Gradients of `<out, probe> + aux` for the input and every parameter.
fn gradients(out: &Tensor, aux: &Tensor, probe: &Tensor, x: &Var, vm: &VarMap) -> Vec<(String, Tensor)> {
    let loss = ((out * probe).unwrap().sum_all().unwrap() + aux).unwrap();
    let g = loss.backward().unwrap();
    let mut names: Vec<(String, Var)> = vm.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut all = vec![("input".to_string(), g.get(x.as_tensor()).expect("input gradient").clone())];
    for (name, v) in names {
        // an expert without tokens has no gradient through the dispatch, zeros elsewhere
        let grad = g.get(v.as_tensor()).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().unwrap());
        all.push((name, grad));
    }
    all
}

fn check_against_dense(form: ExpertForm, top_k: usize, norm: bool, shared: usize) {
    let cfg = config(form, top_k, norm, shared);
    let (moe, vm) = layer(&cfg, &ExecutionPlan::training(&Device::Cpu, Precision::F32));
    let x = Var::from_tensor(&tokens()).unwrap();
    let o = moe.forward(&MoeInput { tokens: x.as_tensor(), seq_len: SEQ_LEN, unconditional: None, train: true }).unwrap();
    let (want, want_aux, want_ids) = dense_reference(&cfg, &vm, x.as_tensor()).unwrap();
    let tag = format!("{form:?} top-{top_k} norm={norm} shared={shared}");
    assert_eq!(o.routing.experts.to_vec2::<u32>().unwrap(), want_ids, "{tag}: expert choices");
    assert_close(&format!("{tag}: output"), &o.out, &want, 1e-5);
    let aux = o.aux_loss.clone().expect("training mode with a coefficient gives a balance loss");
    assert_close(&format!("{tag}: balance loss"), &aux, &want_aux, 1e-5);
    let counts: u32 = o.expert_counts.to_vec1::<u32>().unwrap().iter().sum();
    assert_eq!(counts as usize, SEQS * SEQ_LEN * top_k, "{tag}: every slot counted once");

    let probe = Tensor::randn(0f32, 1.0, want.shape(), &Device::Cpu).unwrap();
    let ours = gradients(&o.out, &aux, &probe, &x, &vm);
    let theirs = gradients(&want, &want_aux, &probe, &x, &vm);
    for ((name, g), (_, w)) in ours.iter().zip(&theirs) {
        assert_close(&format!("{tag}: gradient of {name}"), g, w, 1e-4);
    }
}

#[test]
fn swiglu_layer_matches_the_dense_reference_forward_and_backward() {
    check_against_dense(ExpertForm::Swiglu, 2, false, 64);
    check_against_dense(ExpertForm::Swiglu, 2, true, 0);
    check_against_dense(ExpertForm::Swiglu, 1, false, 40);
}

#[test]
fn gelu_layer_matches_the_dense_reference_forward_and_backward() {
    check_against_dense(ExpertForm::GeluBias, 2, false, 40);
    check_against_dense(ExpertForm::GeluErfBias, 1, false, 0);
}

/// The kernel pipeline (fused gating + sort + grouped GEMMs + combine for frozen weights, the
/// differentiable routed-experts op for trainable ones), run by the kernels' CPU references,
/// against the reference dispatch: the same choices, values and gradients.
#[test]
fn kernel_pipeline_matches_the_reference_dispatch() {
    for form in [ExpertForm::Swiglu, ExpertForm::GeluBias, ExpertForm::GeluErfBias] {
        let cfg = config(form, 2, true, 40);
        let train = ExecutionPlan::training(&Device::Cpu, Precision::F32);
        let (reference, vm) = layer(&cfg, &train);
        let tensors = vm.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        // the same variables, run by the kernel pipeline
        let kernels = MoeLayer::new(&cfg, &train.clone().with_moe_kernels(true), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let frozen_plan = ExecutionPlan::inference(&Device::Cpu, Precision::F32).with_moe_kernels(true);
        let frozen = MoeLayer::new(&cfg, &frozen_plan, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(frozen.is_fused(), form == ExpertForm::Swiglu, "{form:?}: the whole-layer fused path serves top-k SwiGLU layers");

        let x = Var::from_tensor(&tokens()).unwrap();
        let input = MoeInput { tokens: x.as_tensor(), seq_len: SEQ_LEN, unconditional: None, train: true };
        let r = reference.forward(&input).unwrap();
        let k = kernels.forward(&input).unwrap();
        let f = frozen.forward(&MoeInput { train: false, ..input }).unwrap();
        for (name, o) in [("kernels", &k), ("frozen", &f)] {
            assert_eq!(o.routing.experts.to_vec2::<u32>().unwrap(), r.routing.experts.to_vec2::<u32>().unwrap(), "{form:?} {name}: expert choices");
            assert_close(&format!("{form:?} {name}: gate weights"), &o.routing.weights, &r.routing.weights, 1e-6);
            assert_close(&format!("{form:?} {name}: output"), &o.out, &r.out, 1e-5);
            assert_eq!(o.expert_counts.to_vec1::<u32>().unwrap(), r.expert_counts.to_vec1::<u32>().unwrap(), "{form:?} {name}: counts");
        }
        assert!(f.aux_loss.is_none(), "no losses in eval mode");
        let probe = Tensor::randn(0f32, 1.0, r.out.shape(), &Device::Cpu).unwrap();
        let (ra, ka) = (r.aux_loss.unwrap(), k.aux_loss.unwrap());
        assert_close(&format!("{form:?}: balance loss"), &ka, &ra, 1e-6);
        let ours = gradients(&k.out, &ka, &probe, &x, &vm);
        let theirs = gradients(&r.out, &ra, &probe, &x, &vm);
        for ((name, g), (_, w)) in ours.iter().zip(&theirs) {
            assert_close(&format!("{form:?} kernels: gradient of {name}"), g, w, 1e-4);
        }
    }
}

/// Sequences are the caller's: a token count that does not split into them is refused, and the
/// per-sequence balance loss differs from the batch form on the same routing.
#[test]
fn sequences_come_from_the_caller() {
    let mut cfg = config(ExpertForm::Swiglu, 2, false, 0);
    let plan = ExecutionPlan::training(&Device::Cpu, Precision::F32);
    let (moe, vm) = layer(&cfg, &plan);
    let x = tokens();
    let err = moe.forward(&MoeInput { tokens: &x, seq_len: 7, unconditional: None, train: true }).unwrap_err().to_string();
    assert!(err.contains("do not split into sequences of 7"), "{err}");
    let per_seq = moe.forward(&MoeInput { tokens: &x, seq_len: SEQ_LEN, unconditional: None, train: true }).unwrap();
    // the same variables with the batch form: alpha * sum_i P_i * E count_i / (S k)
    cfg.balance_loss.form = BalanceForm::Batch;
    let batch_layer = MoeLayer::new(&cfg, &plan, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let batch = batch_layer.forward(&MoeInput { tokens: &x, seq_len: SEQ_LEN, unconditional: None, train: true }).unwrap();
    assert_eq!(batch.routing.experts.to_vec2::<u32>().unwrap(), per_seq.routing.experts.to_vec2::<u32>().unwrap());
    let (s, e, k) = (SEQS * SEQ_LEN, cfg.num_experts, cfg.top_k);
    let counts = batch.expert_counts.to_vec1::<u32>().unwrap();
    let p = batch.routing.scores.mean(0).unwrap().to_vec1::<f32>().unwrap();
    let want: f64 = (0..e).map(|i| p[i] as f64 * e as f64 * counts[i] as f64 / (s * k) as f64).sum::<f64>() * 0.01;
    let got = batch.aux_loss.unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() <= 1e-6 * want, "batch balance loss {got} vs {want}");
    let got_seq = per_seq.aux_loss.unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((got_seq - got).abs() > 1e-7, "the per-sequence form groups by the caller's sequences ({got_seq} vs {got})");
    // a config the kernels cannot run is refused before any weight is made
    cfg.num_experts = 300;
    let err = MoeLayer::new(&cfg, &plan, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap_err().to_string();
    assert!(err.contains("num_experts"), "{err}");
}

/// A `MoeConfig` round-trips through JSON and names an unknown key.
#[test]
fn config_is_json_with_named_errors() {
    let cfg = config(ExpertForm::GeluBias, 2, true, 16);
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<MoeConfig>(&json).unwrap(), cfg);
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["top_kk"] = 3.into();
    let err = serde_json::from_value::<MoeConfig>(v).unwrap_err().to_string();
    assert!(err.contains("top_kk"), "{err}");
    // the experts' forward of one token is what `Module` gives for the shared expert
    let (moe, vm) = layer(&cfg, &ExecutionPlan::inference(&Device::Cpu, Precision::F32));
    let x = tokens().narrow(0, 0, 3).unwrap();
    let shared = moe.shared_expert().expect("shared expert").forward(&x).unwrap();
    assert_close("shared expert", &shared, &mlp(&cfg, &vm, "shared_experts", &x).unwrap(), 1e-6);
}
