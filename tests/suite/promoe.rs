//! ProMoE: parity of the MoE layer (the engine's `MoeLayer` with the prototypical router, unconditional expert,
//! GELU experts, shared expert, routing contrastive loss) with the official
//! `models_ProMoE_TC.py::SparseMoeBlock` on both fixture cases; gradients of the contrastive
//! loss (autograd reaches prototypes and tokens, finite differences agree); the ProMoE DiT
//! (odd-MoE / even-dense blocks, official parameter names, presets); its flow-matching schedule.
use crate::common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use common::{assert_close, fixture_path, load_fixture};
use ditmoe::checkpoint::{expected_parameters, ShapeRecorder};
use ditmoe::diffusion::{sample_euler, shift_time, FlowTimeGrid, RectifiedFlow};
use ditmoe::model::{ForwardMode, Trace};
use ditmoe::moe::{ExpertDispatch, MoeInput, MoeLayer, MoeOutput, PrototypicalRouter, RoutingContrastive, WeightMode};
use ditmoe::{ExecutionPlan, Precision};
use ditmoe::{presets, DitConfig, DitMoe};
use std::collections::HashMap;

const F32_TOL: f64 = 1e-4;
/// The released routing contrastive loss settings.
const RCL: RoutingContrastive = RoutingContrastive { lambda: 1.0, temperature: 0.07, top_k_assignment: true };
const CASES: [&str; 2] = ["official-top1-identity", "top2-softmax"];
/// The official code's hard-coded null label, the fixtures' null class.
const NULL: i64 = 1000;

/// A fixture's `config.json` (the official `SparseMoeBlock` constructor arguments) as a model
/// config holding that block: the keys `DitConfig` already has move to the top level, all the
/// others must parse as `ProMoeConfig` (`deny_unknown_fields`: the official key names).
/// `num_classes` 1000 makes the null class the official hard-coded 1000.
fn block_config(case: &str) -> DitConfig {
    let text = std::fs::read_to_string(fixture_path(&format!("promoe/{case}/config.json"))).unwrap();
    let mut block: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut take = |k: &str| block.remove(k).unwrap_or_else(|| panic!("{case}: config lacks {k}"));
    let top = serde_json::json!({
        "input_size": 4, "patch_size": 1, "in_channels": 1, "depth": 2, "num_heads": 1, "mlp_ratio": 4,
        "class_dropout_prob": 0.1, "num_classes": 1000, "learn_sigma": false,
        "hidden_size": take("hidden_size"), "num_experts": take("num_routed_experts"),
        "num_experts_per_tok": take("top_k"), "seq_aux": take("seq_aux"), "norm_topk_prob": take("norm_topk_prob"),
    });
    let mut top = top.as_object().unwrap().clone();
    top.insert("promoe".into(), serde_json::Value::Object(block));
    DitConfig::from_json_str(&serde_json::Value::Object(top).to_string(), case).unwrap()
}

fn cpu_plan() -> ExecutionPlan {
    ExecutionPlan::inference(&Device::Cpu, Precision::F32)
}

fn fixture_block(case: &str, dtype: DType) -> (DitConfig, MoeLayer, HashMap<String, Tensor>) {
    let cfg = block_config(case);
    let weights = load_fixture(&format!("promoe/{case}/model.safetensors"));
    let vb = VarBuilder::from_tensors(weights.clone(), dtype, &Device::Cpu);
    (cfg.clone(), MoeLayer::new(&cfg.moe_config(), &cpu_plan(), vb).unwrap(), weights)
}

/// The layer on hidden (N, T, D) with the null-label images' tokens marked unconditional; the
/// output reshaped to (N, T, D).
fn run(moe: &MoeLayer, hidden: &Tensor, labels: &Tensor, train: bool) -> MoeOutput {
    let (n, t, d) = hidden.dims3().unwrap();
    let uncond = unconditional_mask(labels, t);
    let tokens = hidden.reshape((n * t, d)).unwrap();
    let mut o = moe.forward(&MoeInput { tokens: &tokens, seq_len: t, unconditional: Some(&uncond), train }).unwrap();
    o.out = o.out.reshape((n, t, d)).unwrap();
    o
}

/// `[S]` u8: the tokens of null-label images.
fn unconditional_mask(labels: &Tensor, tokens_per_image: usize) -> Tensor {
    let v: Vec<u8> = labels.to_vec1::<i64>().unwrap().iter().flat_map(|&l| std::iter::repeat_n(u8::from(l == NULL), tokens_per_image)).collect();
    let n = v.len();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

/// Rows of the tokens of images whose label is not the null label, in token order.
fn conditional_tokens(labels: &Tensor, tokens_per_image: usize) -> Vec<u32> {
    let labels = labels.to_vec1::<i64>().unwrap();
    (0..labels.len())
        .filter(|&n| labels[n] != NULL)
        .flat_map(|n| (n * tokens_per_image) as u32..((n + 1) * tokens_per_image) as u32)
        .collect()
}

#[test]
fn block_parameter_names_are_the_official_ones() {
    for case in CASES {
        let cfg = block_config(case);
        let rec = ShapeRecorder::default();
        MoeLayer::new(&cfg.moe_config(), &cpu_plan(), VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu)).unwrap();
        let mut ours: Vec<(String, Vec<usize>)> = rec.recorded();
        let weights = load_fixture(&format!("promoe/{case}/model.safetensors"));
        let mut official: Vec<(String, Vec<usize>)> = weights.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
        assert_eq!(ours.first().map(|p| p.0.as_str()), Some("cluster_centers"), "official state-dict order starts with the prototypes");
        ours.sort();
        official.sort();
        assert_eq!(ours, official, "{case}: parameter names and shapes");
    }
}

#[test]
fn block_matches_official_in_eval_and_training_mode() {
    for case in CASES {
        let (cfg, moe, _) = fixture_block(case, DType::F32);
        let io = load_fixture(&format!("promoe/{case}/io.safetensors"));
        let (hidden, labels) = (&io["hidden"], &io["labels"]);
        let (n, t, k) = io["expert_indices"].dims3().unwrap();
        let e = cfg.num_experts;
        assert_eq!(k, cfg.num_experts_per_tok);

        let o = run(&moe, hidden, labels, false);
        let ids = o.routing.experts.to_dtype(DType::I64).unwrap().reshape((n, t, k)).unwrap();
        assert_eq!(ids.to_vec3::<i64>().unwrap(), io["expert_indices"].to_vec3::<i64>().unwrap(), "{case}: expert ids");
        // The null-label images use the unconditional expert E with weight 1 (both fixtures have two).
        let null_images = labels.to_vec1::<i64>().unwrap().iter().filter(|&&l| l == NULL).count();
        assert_eq!(null_images, 2, "{case}: fixture premise");
        assert_eq!(o.expert_counts.to_vec1::<u32>().unwrap()[e] as usize, null_images * t * k, "{case}: unconditional expert's slots");
        let weights = o.routing.weights.reshape((n, t, k)).unwrap();
        let mut errors = Vec::new();
        let mut check = |name: &str, ours: &Tensor, official: &Tensor| errors.push(format!("{name} {:.2e}", assert_close(&format!("{case} {name}"), ours, official, F32_TOL)));
        check("router_weights", &weights, &io["router_weights"]);
        let cond = conditional_tokens(labels, t);
        let cos = o.routing.scores.index_select(&Tensor::new(cond.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
        check("cos_sim_cond", &cos, &io["cos_sim_cond"]);
        check("out", &o.out, &io["out"]);
        assert!(o.contrastive_loss.is_none() && o.aux_loss.is_none(), "{case}: no losses in eval mode");

        // Training mode: the same forward plus the router losses (balance coefficient 0 -> none).
        let train = run(&moe, hidden, labels, true);
        check("train.out", &train.out, &io["train.out"]);
        assert!(train.aux_loss.is_none(), "{case}: balance coefficient 0");
        let rcl = train.contrastive_loss.clone().expect("contrastive loss in training mode");
        let want = io["routing_contrastive_loss"].reshape(()).unwrap();
        check("routing_contrastive_loss", &rcl, &want);
        assert!(rcl.to_scalar::<f32>().unwrap() > 0.0, "{case}: a nonzero contrastive loss");
        println!("{case}: expert ids identical; relative errors: {}", errors.join(", "));
    }
}

#[test]
fn weight_modes_pick_the_same_experts_and_transform_the_cosines() {
    // The three modes are increasing in the cosine: same ids, weights = f(chosen cosines).
    let weights = load_fixture("promoe/top2-softmax/model.safetensors");
    let io = load_fixture("promoe/top2-softmax/io.safetensors");
    let (n, t, d) = io["hidden"].dims3().unwrap();
    let x = io["hidden"].reshape((n * t, d)).unwrap();
    let router = |mode| {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        PrototypicalRouter::new(d, 5, 2, mode, true, RCL, vb).unwrap()
    };
    let uncond = unconditional_mask(&io["labels"], t);
    let id = router(WeightMode::Identity).forward(&x, Some(&uncond)).unwrap();
    let sig = router(WeightMode::Sigmoid).forward(&x, Some(&uncond)).unwrap();
    assert_eq!(id.experts.to_vec2::<u32>().unwrap(), sig.experts.to_vec2::<u32>().unwrap());
    let cond = Tensor::new(conditional_tokens(&io["labels"], t).as_slice(), &Device::Cpu).unwrap();
    let chosen = |r: &ditmoe::moe::Routing| r.weights.index_select(&cond, 0).unwrap();
    let want = candle_nn::ops::sigmoid(&chosen(&id)).unwrap();
    assert_close("sigmoid weights", &chosen(&sig), &want, 1e-6);
    // Identity weights are the cosines themselves, and no prototype beats a chosen one.
    let cos_max = id.scores.max_keepdim(1).unwrap().index_select(&cond, 0).unwrap();
    assert_close("identity top-1 = max cosine", &chosen(&id).narrow(1, 0, 1).unwrap(), &cos_max, 0.0);
    // Without the unconditional expert every token is routed by the prototypes, labels unused.
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let plain = PrototypicalRouter::new(d, 5, 2, WeightMode::Identity, false, RCL, vb).unwrap().forward(&x, None).unwrap();
    assert!(plain.experts.flatten_all().unwrap().to_vec1::<u32>().unwrap().iter().all(|&e| e < 5));
}

#[test]
fn balance_loss_covers_the_conditional_tokens_only() {
    // Released configs switch it off (coefficient 0); the official formula, recomputed here in
    // f64 from the fixture's cosines and ids: scores = softmax(w) (w itself in softmax mode),
    // `alpha sum_i P_i f_i`, or per image with seq_aux.
    for case in CASES {
        for seq_aux in [false, true] {
            let mut cfg = block_config(case);
            cfg.seq_aux = seq_aux;
            cfg.promoe.as_mut().unwrap().load_balance_loss_coef = 0.3;
            let weights = load_fixture(&format!("promoe/{case}/model.safetensors"));
            let moe = MoeLayer::new(&cfg.moe_config(), &cpu_plan(), VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap();
            let io = load_fixture(&format!("promoe/{case}/io.safetensors"));
            let o = run(&moe, &io["hidden"], &io["labels"], true);
            let ours = o.aux_loss.expect("coefficient > 0").to_scalar::<f32>().unwrap() as f64;

            let (e, k, t) = (cfg.num_experts, cfg.num_experts_per_tok, io["hidden"].dim(1).unwrap());
            let cos = io["cos_sim_cond"].to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            // Both fixture modes give softmax(cos): identity softmaxes w = cos, softmax mode is it.
            let probs: Vec<Vec<f64>> = cos
                .iter()
                .map(|row| {
                    let z: f64 = row.iter().map(|v| v.exp()).sum();
                    row.iter().map(|v| v.exp() / z).collect()
                })
                .collect();
            let cond = conditional_tokens(&io["labels"], t);
            let ids = io["expert_indices"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
            let images = cond.len() / t;
            let mut want = 0.0;
            let groups: Vec<std::ops::Range<usize>> = if seq_aux { (0..images).map(|m| m * t..(m + 1) * t).collect() } else { std::iter::once(0..cond.len()).collect() };
            for g in &groups {
                let rows = g.len() as f64;
                // i is an expert id (compared with the routed ids), not only an index into probs
                #[allow(clippy::needless_range_loop)]
                for i in 0..e {
                    let count = g.clone().flat_map(|r| (0..k).map(move |j| (r, j))).filter(|&(r, j)| ids[cond[r] as usize * k + j] == i as i64).count() as f64;
                    let p_mean: f64 = g.clone().map(|r| probs[r][i]).sum::<f64>() / rows;
                    want += count * e as f64 / (rows * k as f64) * p_mean;
                }
            }
            want *= 0.3 / groups.len() as f64;
            assert!((ours - want).abs() <= 1e-5 * want, "{case} seq_aux={seq_aux}: {ours} vs {want}");
        }
    }
}

/// The contrastive loss of the fixture's routing (`ids` and their dispatch) for prototypes `c`
/// and tokens `h`.
fn rcl(c: &Tensor, h: &Tensor, ids: &Tensor, dispatch: &ExpertDispatch) -> Tensor {
    RCL.loss(c, h, ids, dispatch).unwrap()
}

#[test]
fn contrastive_loss_gradients_reach_prototypes_and_tokens() {
    let case = "official-top1-identity";
    let weights = load_fixture(&format!("promoe/{case}/model.safetensors"));
    let io = load_fixture(&format!("promoe/{case}/io.safetensors"));
    let (n, t, d) = io["hidden"].dims3().unwrap();
    let e = weights["cluster_centers"].dim(0).unwrap();
    let ids = io["expert_indices"].reshape((n * t, 1)).unwrap();
    let dispatch = ExpertDispatch::new(&ids, e + 1).unwrap();

    // f32 autograd through the loss alone.
    let c = Var::from_tensor(&weights["cluster_centers"]).unwrap();
    let h = Var::from_tensor(&io["hidden"].reshape((n * t, d)).unwrap()).unwrap();
    let loss = rcl(c.as_tensor(), h.as_tensor(), &ids, &dispatch);
    let want = io["routing_contrastive_loss"].reshape(()).unwrap();
    assert_close("loss from the recorded routing", &loss, &want, F32_TOL);
    let grads = loss.backward().unwrap();
    let row_norms = |g: &Tensor| g.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    let gc = row_norms(grads.get(c.as_tensor()).expect("gradient reaches the prototypes"));
    let gh = row_norms(grads.get(h.as_tensor()).expect("gradient reaches the tokens"));
    let counts = dispatch.counts();
    for (p, g) in gc.iter().enumerate() {
        assert_eq!(*g > 0.0, counts[p] > 0, "prototype {p} ({} tokens): gradient norm {g}", counts[p]);
    }
    let cond = conditional_tokens(&io["labels"], t);
    for (tok, g) in gh.iter().enumerate() {
        assert_eq!(*g > 0.0, cond.contains(&(tok as u32)), "token {tok}: gradient norm {g} (only conditional tokens)");
    }

    // Finite differences in f64 on one prototype element (the assignment is a constant).
    let c64 = Var::from_tensor(&weights["cluster_centers"].to_dtype(DType::F64).unwrap()).unwrap();
    let h64 = h.as_tensor().to_dtype(DType::F64).unwrap();
    let g = rcl(c64.as_tensor(), &h64, &ids, &dispatch).backward().unwrap();
    // The largest gradient element (a prototype with tokens), so the check is not trivially 0.
    let gc64 = g.get(c64.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let at = (0..gc64.len()).max_by(|&a, &b| gc64[a].abs().total_cmp(&gc64[b].abs())).unwrap();
    let analytic = gc64[at];
    let eps = 1e-6;
    let bumped = |delta: f64| {
        let mut v = c64.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[at] += delta;
        let c = Tensor::from_vec(v, (e, d), &Device::Cpu).unwrap();
        rcl(&c, &h64, &ids, &dispatch).to_scalar::<f64>().unwrap()
    };
    let numeric = (bumped(eps) - bumped(-eps)) / (2.0 * eps);
    assert!(analytic.abs() > 1e-2, "a non-trivial gradient element: {analytic}");
    let (row, col) = (at / d, at % d);
    assert!(counts[row] > 0, "only prototypes with tokens get gradients");
    assert!((numeric - analytic).abs() <= 1e-6 * analytic.abs(), "d loss / d c[{row}][{col}]: numeric {numeric} vs autograd {analytic}");
    println!("finite difference d loss / d c[{row}][{col}]: numeric {numeric:.9e}, autograd {analytic:.9e}");
}

#[test]
fn block_contrastive_loss_backpropagates_to_its_parameters_and_input() {
    let case = "top2-softmax";
    let cfg = block_config(case);
    let weights = load_fixture(&format!("promoe/{case}/model.safetensors"));
    let vars: HashMap<String, Var> = weights.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
    let vb = VarBuilder::from_tensors(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(), DType::F32, &Device::Cpu);
    let moe = MoeLayer::new(&cfg.moe_config(), &ExecutionPlan::training(&Device::Cpu, Precision::F32), vb).unwrap();
    let io = load_fixture(&format!("promoe/{case}/io.safetensors"));
    let x = Var::from_tensor(&io["hidden"]).unwrap();
    let loss = run(&moe, x.as_tensor(), &io["labels"], true).contrastive_loss.unwrap();
    let grads = loss.backward().unwrap();
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(norm(grads.get(vars["cluster_centers"].as_tensor()).expect("prototypes")) > 0.0);
    assert!(norm(grads.get(x.as_tensor()).expect("MoE input")) > 0.0);
    // The loss does not depend on the experts' weights.
    assert!(grads.get(vars["experts.0.up_proj.weight"].as_tensor()).is_none());
}

/// A deterministic pseudo-random tensor (an LCG; candle's CPU randn is not seeded).
fn pseudo_random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn tiny_promoe() -> DitConfig {
    let json = r#"{
        "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 4,
        "num_heads": 2, "mlp_ratio": 4, "class_dropout_prob": 0.1, "num_classes": 10,
        "num_experts": 4, "num_experts_per_tok": 2, "learn_sigma": true,
        "promoe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 48}
    }"#;
    DitConfig::from_json_str(json, "tiny ProMoE").unwrap()
}

#[test]
fn tiny_promoe_dit_lists_official_names_and_runs() {
    let cfg = tiny_promoe();
    let params = expected_parameters(&cfg).unwrap();
    let block = |i: usize| -> Vec<(String, Vec<usize>)> {
        let prefix = format!("blocks.{i}.");
        params.iter().filter_map(|(n, s)| n.strip_prefix(&prefix).map(|r| (r.to_string(), s.clone()))).collect()
    };
    let p = |n: &str, s: &[usize]| (n.to_string(), s.to_vec());
    let attn = [p("attn.qkv.weight", &[96, 32]), p("attn.qkv.bias", &[96]), p("attn.proj.weight", &[32, 32]), p("attn.proj.bias", &[32])];
    let ada = [p("adaLN_modulation.1.weight", &[192, 32]), p("adaLN_modulation.1.bias", &[192])];
    let mut dense = attn.to_vec();
    dense.extend([p("mlp.fc1.weight", &[128, 32]), p("mlp.fc1.bias", &[128]), p("mlp.fc2.weight", &[32, 128]), p("mlp.fc2.bias", &[32])]);
    dense.extend(ada.clone());
    let mut moe = attn.to_vec();
    moe.push(p("mlp.cluster_centers", &[4, 32]));
    for e in 0..=4 {
        // experts.4 is the unconditional expert.
        for (name, shape) in [("up_proj.weight", vec![64, 32]), ("up_proj.bias", vec![64]), ("down_proj.weight", vec![32, 64]), ("down_proj.bias", vec![32])] {
            moe.push((format!("mlp.experts.{e}.{name}"), shape));
        }
    }
    moe.extend([p("mlp.shared_expert.up_proj.weight", &[48, 32]), p("mlp.shared_expert.up_proj.bias", &[48])]);
    moe.extend([p("mlp.shared_expert.down_proj.weight", &[32, 48]), p("mlp.shared_expert.down_proj.bias", &[32])]);
    moe.extend(ada);
    assert_eq!(block(0), dense, "even blocks: dense timm Mlp");
    assert_eq!(block(1), moe, "odd blocks: ProMoE MoE");
    assert_eq!(block(2), dense);
    assert_eq!(block(3), moe);
    assert_eq!(params[0].0, "pos_embed");
    let total: usize = params.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(cfg.param_counts().0, total, "param_counts agrees with the built model");

    let tensors: HashMap<String, Tensor> = params.iter().enumerate().map(|(i, (n, s))| (n.clone(), pseudo_random(s, i as u64, 0.2))).collect();
    let model = DitMoe::new(&cfg, &cpu_plan(), VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap();
    let x = pseudo_random(&[4, 4, 8, 8], 99, 1.0);
    let t = Tensor::new(&[999f32, 500.0, 250.0, 10.0], &Device::Cpu).unwrap();
    // 10 = num_classes is the model's null class (not the official hard-coded 1000).
    let y = Tensor::new(&[3u32, 10, 7, 10], &Device::Cpu).unwrap();
    let mut trace = Trace::routing();
    let train = model.forward_full(&x, &t, &y, ForwardMode::Train, &mut trace).unwrap();
    assert_eq!(train.out.dims(), &[4, 8, 8, 8]);
    assert!(train.out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    assert!(train.aux_losses.is_empty(), "balance loss coefficient 0");
    assert_eq!(train.contrastive_losses.len(), 2, "one contrastive loss per MoE block");
    for l in &train.contrastive_losses {
        let v = l.to_scalar::<f32>().unwrap();
        assert!(v.is_finite() && v > 0.0, "contrastive loss {v}");
    }
    let counts = train.expert_counts_host().unwrap();
    assert_eq!(counts.len(), 2, "counts for the MoE blocks only (dense blocks route nothing)");
    assert_eq!(counts[0][4], 2 * 16 * 2, "null images: all k slots on the unconditional expert");
    assert_eq!(counts[0].iter().sum::<usize>(), 4 * 16 * 2);

    assert_eq!(trace.routing.iter().map(|r| r.layer).collect::<Vec<_>>(), vec![1, 3]);
    for r in &trace.routing {
        let ids = r.experts.to_vec2::<u32>().unwrap();
        let w = r.weights.to_vec2::<f32>().unwrap();
        for (tok, (row, wrow)) in ids.iter().zip(&w).enumerate() {
            let image = tok / 16;
            if image % 2 == 1 {
                assert_eq!((row.as_slice(), wrow.as_slice()), (&[4u32, 4][..], &[1f32, 0.0][..]), "null token {tok}");
            } else {
                assert!(row[0] < 4 && row[1] < 4 && row[0] != row[1] && wrow[0] >= wrow[1], "conditional token {tok}: {row:?} {wrow:?}");
            }
        }
        let cos = r.scores.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r.scores.dims(), &[64, 4]);
        assert!(cos.iter().all(|c| c.abs() <= 1.0 + 1e-6), "scores are cosines");
    }
    // The forward is the same in both modes; eval mode computes no router loss.
    let eval = model.forward_full(&x, &t, &y, ForwardMode::Eval, &mut Trace::default()).unwrap();
    assert_close("eval = train output", &eval.out, &train.out, 0.0);
    assert!(eval.contrastive_losses.is_empty());
}

#[test]
fn promoe_presets_follow_the_official_sizes() {
    for (name, depth, hidden, heads) in [("ProMoE-S/2", 12, 384, 6), ("ProMoE-B/2", 12, 768, 12), ("ProMoE-L/2", 24, 1024, 16), ("ProMoE-XL/2", 28, 1152, 16)] {
        let cfg = presets::get(name).unwrap().config;
        assert_eq!((cfg.depth, cfg.hidden_size, cfg.num_heads), (depth, hidden, heads), "{name}");
        let p = cfg.promoe.as_ref().unwrap();
        assert_eq!((cfg.num_experts, cfg.num_experts_per_tok, p.moe_intermediate_size, p.shared_expert_intermediate_size), (12, 1, 2 * hidden, 2 * hidden));
        let params = expected_parameters(&cfg).unwrap();
        let total: usize = params.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(cfg.param_counts().0, total, "{name}: parameter count");
        let has = |n: &str| params.iter().any(|(p, _)| p == n);
        assert!(has("blocks.0.mlp.fc1.weight") && has("blocks.1.mlp.cluster_centers") && has("blocks.1.mlp.experts.12.down_proj.bias"));
        assert!(!has("blocks.1.mlp.experts.13.up_proj.weight") && !has("blocks.0.mlp.cluster_centers"));
        assert!(params.iter().all(|(n, _)| !n.contains(".moe.")), "{name}: ProMoE names its MoE `mlp`");
    }
    assert_eq!(presets::get("promoe-xl-2").unwrap().name, "ProMoE-XL/2");
}

#[test]
fn config_keeps_dit_moe_files_and_round_trips_promoe() {
    let dit = DitConfig::from_file(&fixture_path("models/tiny/config.json")).unwrap();
    assert!(dit.promoe.is_none() && !dit.to_json().contains("promoe"), "DiT-MoE configs unchanged");
    let cfg = tiny_promoe();
    assert_eq!(DitConfig::from_json_str(&cfg.to_json(), "round trip").unwrap(), cfg);
    let p = cfg.promoe.as_ref().unwrap();
    assert_eq!((p.router_weight_mode, p.routing_contrastive_lam, p.routing_contrastive_temperature), (WeightMode::Identity, 1.0, 0.07), "released defaults");
    let bad = cfg.to_json().replace("\"interleave\"", "\"interleaved\"");
    let err = DitConfig::from_json_str(&bad, "typo").unwrap_err().to_string();
    assert!(err.contains("interleaved"), "{err}");
}

#[test]
fn flow_matching_schedule_shifts_sigma_and_scales_the_timestep() {
    // Sampling grid: diffusers' sigmas, terminal 0, model fed sigma * 1000.
    let grid = FlowTimeGrid::shifted_sigmas(4, 1.0, 1000.0).unwrap();
    assert_eq!(grid.times(), &[1.0, 0.75, 0.5, 0.25, 0.0]);
    assert_eq!(grid.model_time(1), 750.0);
    let shifted = FlowTimeGrid::shifted_sigmas(4, 3.0, 1000.0).unwrap();
    assert_eq!(shifted.times()[2], 0.75f32 as f64, "3 * 0.5 / (1 + 2 * 0.5)");
    assert!((shift_time(shift_time(0.3, 2.0), 1.5) - shift_time(0.3, 3.0)).abs() < 1e-15, "shifts compose by product");
    // Euler on dz/dt = z: each step multiplies by 1 + (sigma_next - sigma) (diffusers' step).
    let z0 = Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap();
    let out = sample_euler(&z0, &shifted, |z, _| Ok(z.clone())).unwrap();
    let factor: f64 = shifted.times().windows(2).map(|w| 1.0 + (w[1] - w[0])).product();
    assert_close("euler", out.states.last().unwrap(), &(&z0 * factor).unwrap(), 1e-6);

    // Training: sigma = shift(sigmoid(nt)), zt = (1 - sigma) x + sigma noise, model fed 1000 sigma.
    let rf = RectifiedFlow::flow_matching(false, 3.0, 1000.0).unwrap();
    let x = Tensor::new(&[[0.5f32], [1.0]], &Device::Cpu).unwrap();
    let z1 = Tensor::new(&[[-1f32], [2.0]], &Device::Cpu).unwrap();
    let nt = Tensor::new(&[0.0f32, 1.0], &Device::Cpu).unwrap();
    let mut fed = None;
    let o = rf
        .training_losses(&x, &nt, &z1, |zt, t| {
            fed = Some((zt.clone(), t.clone()));
            zt.zeros_like()
        })
        .unwrap();
    let (zt, t) = fed.unwrap();
    let sig: Vec<f64> = [0.0f64, 1.0].iter().map(|n| shift_time(1.0 / (1.0 + (-n).exp()), 3.0)).collect();
    let want_t = Tensor::new(&[(sig[0] * 1000.0) as f32, (sig[1] * 1000.0) as f32], &Device::Cpu).unwrap();
    assert_close("model timestep", &t, &want_t, 1e-6);
    let want_zt = Tensor::new(&[[((1.0 - sig[0]) * 0.5 - sig[0]) as f32], [((1.0 - sig[1]) + 2.0 * sig[1]) as f32]], &Device::Cpu).unwrap();
    assert_close("zt", &zt, &want_zt, 1e-6);
    assert_close("sigma", &o.t, &(want_t / 1000.0).unwrap(), 1e-6);
}

/// `GeluMlp` is the official `MoeMLP`: `down(gelu_tanh(up(x)))` with biases.
#[test]
fn gelu_expert_is_up_gelu_tanh_down() {
    let weights = load_fixture("promoe/top2-softmax/model.safetensors");
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let expert = ditmoe::moe::GeluMlp::new(32, 48, vb.pp("experts.2")).unwrap();
    let x = pseudo_random(&[3, 32], 5, 1.0);
    let lin = |x: &Tensor, n: &str| x.matmul(&weights[&format!("experts.2.{n}.weight")].t().unwrap()).unwrap().broadcast_add(&weights[&format!("experts.2.{n}.bias")]).unwrap();
    let h = lin(&x, "up_proj");
    // 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), written out.
    let cube = (&h * &h).unwrap().mul(&h).unwrap();
    let inner = ((&h + (cube * 0.044715).unwrap()).unwrap() * (2.0f64 / std::f64::consts::PI).sqrt()).unwrap();
    let gelu = ((&h * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap();
    assert_close("gelu expert", &expert.forward(&x).unwrap(), &lin(&gelu, "down_proj"), 1e-5);
}

/// A ProMoE model's sampling run records its MoE blocks only, with the unconditional expert
/// (id E) among the ids, and the trajectory holds together (what `ditmoe routes` and the
/// explorer read).
#[test]
fn promoe_trajectory_records_moe_blocks_and_the_unconditional_expert() {
    use ditmoe::analysis::{record_trajectory, RecordRequest, SamplerKind};
    let cfg = tiny_promoe();
    let varmap = candle_nn::VarMap::new();
    let model = ditmoe::DitMoe::new(&cfg, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    let req = RecordRequest { classes: vec![1, 2], seed: 0, sampler: SamplerKind::Euler, steps: 3, guidance: 2.0, guidance_interval: None, batch_size: 2 };
    let traj = record_trajectory(&model, "tiny ProMoE", None, &req, &Device::Cpu, &mut |_| {}).unwrap();
    let d = traj.dims();
    assert_eq!((d.layers, d.experts, d.score_width), (2, 5, 4), "2 MoE blocks of 4, ids 0..=4");
    assert!(traj.token_experts(0, 0, 0, 0).iter().all(|&e| e < 5));
}

/// ProMoE models sample (and train) on their flow-matching schedule: the same t grid at
/// shift 1, fed to the model as sigma * 1000; DiT-MoE models are fed t itself.
#[test]
fn promoe_models_use_their_flow_matching_timesteps() {
    use ditmoe::sampling::RectifiedFlowSampler;
    let promoe = RectifiedFlowSampler::for_model(&tiny_promoe(), 4, false).unwrap();
    let mut dit = tiny_promoe();
    dit.promoe = None;
    let plain = RectifiedFlowSampler::for_model(&dit, 4, false).unwrap();
    let times = |s: &RectifiedFlowSampler| (0..4).map(|i| s.grid().model_time(i)).collect::<Vec<f32>>();
    assert_eq!(times(&plain), vec![1.0, 0.75, 0.5, 0.25]);
    assert_eq!(times(&promoe), vec![1000.0, 750.0, 500.0, 250.0]);
    assert_eq!(tiny_promoe().flow_time_scale(), 1000.0);
}

/// Frozen experts stacked once (what a ProMoE layer does on the kernel pipeline): the views
/// compute what the experts compute, and the fused routed op over the stacks what the dispatch
/// computes.
#[test]
fn frozen_gelu_experts_stack_once_into_views() {
    use ditmoe::moe::{stack_frozen, Experts, StackedExperts};
    let case = std::fs::read_dir(fixture_path("promoe")).unwrap().flatten().find(|e| e.path().join("model.safetensors").exists()).unwrap();
    let (_, moe, _) = fixture_block(case.file_name().to_str().unwrap(), DType::F32);
    let (stacks, views) = stack_frozen(moe.experts()).unwrap();
    let (Experts::Gelu(experts), Experts::Gelu(views)) = (moe.experts(), &views) else { panic!("ProMoE experts are GELU MLPs") };
    let d = experts[0].weights()[0].dim(1).unwrap();
    let x = Tensor::randn(0f32, 1.0, (37, d), &Device::Cpu).unwrap();
    for (e, (view, expert)) in views.iter().zip(experts).enumerate() {
        assert_close(&format!("expert {e} view"), &view.forward(&x).unwrap(), &expert.forward(&x).unwrap(), 0.0);
    }
    let k = 2;
    let ids: Vec<u32> = (0..37 * k).map(|p| ((p * 7 + p / k) % experts.len()) as u32).collect();
    let ids = Tensor::from_vec(ids, (37, k), &Device::Cpu).unwrap();
    let w = Tensor::rand(0f32, 1.0, (37, k), &Device::Cpu).unwrap();
    let perm = ditmoe::moe::kernels::permute_by_expert(&ids, experts.len()).unwrap();
    let fused = ditmoe::moe::kernels::routed_experts(&x, &w, &stacks, &perm, &Default::default()).unwrap();
    let sparse = ExpertDispatch::new(&ids, experts.len()).unwrap().run(&x, &w, experts).unwrap();
    assert_close("fused over the stacks vs dispatch", &fused, &sparse, 1e-5);
    assert!(ditmoe::moe::SwigluExpert::views(&stacks).is_err(), "GELU stacks are not SwiGLU experts");
}
