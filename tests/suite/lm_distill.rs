//! Mixture-of-Students distillation on a tiny corpus (CPU): distilling lowers the KL term, the
//! loss is the plain one after `stop_step` (the teacher is gone), a distillation cut before or
//! after its stop step and resumed ends with the uninterrupted run's weights bit for bit, a
//! resume under other settings and a teacher of another vocabulary are refused by name; and,
//! through the CLI, the curves chart is drawn and a bf16 export loads and generates.
use crate::common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use common::Scratch;
use ditmoe::lm::train_config::{DistillConfig, LmTrainConfig};
use ditmoe::lm::trainer::{LmTrainer, EVAL_FILE};
use ditmoe::lm::{load_hf, LayerMlp, LmConfig, LmModel};
use ditmoe::moe::{BalanceForm, BalanceLossConfig, CapacityPolicy, MoeConfig, ParamNames, RouterConfig};
use ditmoe::train::RunStart;
use ditmoe::{ExecutionPlan, Precision};
use std::path::{Path, PathBuf};
use std::process::Command;

const TEXT: &str = "The state of the union is strong. We the people of the united states, in order to form a more perfect union, establish justice and insure domestic tranquility. Congress shall make no law. The president shall from time to time give to the congress information of the state of the union.";


/// A PR-MoE-shaped model of `layers` layers: MoE on every other layer, top-1 with DeepSpeed's
/// capacity and l_aux and a residual MLP, `experts[i]` experts in the i-th MoE layer.
fn model_config(vocab: usize, layers: usize, experts: &[usize]) -> LmConfig {
    let mut next = experts.iter().copied();
    let moe = |_| MoeConfig {
        num_experts: next.next().expect("an expert count per MoE layer"),
        top_k: 1,
        residual_intermediate_size: 32,
        router: RouterConfig::TopK { norm_topk_prob: false },
        balance_loss: BalanceLossConfig { coefficient: 0.01, form: BalanceForm::FirstChoice },
        capacity: CapacityPolicy::Capacity { capacity_factor: 1.0, eval_capacity_factor: 1.0, min_capacity: 4, drop_tokens: true },
        names: ParamNames::default(),
        ..common::lm::tiny_moe()
    };
    common::lm::tiny_lm(vocab, LayerMlp::moe_every_nth(layers, 2, moe), true, 0.0)
}

fn plan() -> ExecutionPlan {
    ExecutionPlan::training(&Device::Cpu, Precision::F32)
}

fn train_config(model: &Path, data: &Path, out: PathBuf, steps: u64) -> LmTrainConfig {
    serde_json::from_value(serde_json::json!({
        "model": model, "data": data, "out": out,
        "seq_len": 24, "batch_size": 4, "steps": steps, "lr": 3e-3, "warmup_steps": 2,
        "log_every": 1, "ckpt_every": 100, "keep_last": 3, "eval_every": 4, "eval_batches": 2
    }))
    .unwrap()
}

/// A corpus, a trained 4-layer teacher (MoE layers of 2 and 4 experts) in `<dir>/teacher/model`,
/// and the config of a 3-layer student (2 and 4 experts: one dense layer fewer) distilled
/// from it for 8 steps, stopping after step 4.
fn setup(tag: &str) -> (Scratch, LmTrainConfig) {
    let (dir, data, vocab) = common::lm::scratch_corpus(tag, TEXT);
    let teacher_json = common::lm::write_model(&dir, "teacher", &model_config(vocab, 4, &[2, 4]));
    let mut teacher = train_config(&teacher_json, &data, dir.join("teacher"), 24);
    teacher.lr = 1e-2;
    LmTrainer::new(teacher, &plan(), RunStart::New).unwrap().run(false).unwrap();
    let student_json = common::lm::write_model(&dir, "student", &model_config(vocab, 3, &[2]));
    let mut cfg = train_config(&student_json, &data, dir.join("student"), 8);
    cfg.distill = Some(DistillConfig { teacher: dir.join("teacher/model"), beta: 1.0, temperature: 2.0, stop_step: Some(4) });
    (dir, cfg)
}

fn weights(t: &LmTrainer) -> Vec<(String, Vec<f32>)> {
    t.model().named_params().iter().map(|(n, w)| (n.clone(), w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

fn ditmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(args).output().unwrap()
}

#[test]
fn distillation_lowers_the_kl_then_stops_at_its_step() {
    let (dir, mut cfg) = setup("lm-distill");
    // a stage long enough to see the student approach the teacher
    cfg.steps = 12;
    cfg.distill.as_mut().unwrap().stop_step = Some(8);
    let mut t = LmTrainer::new(cfg.clone(), &plan(), RunStart::New).unwrap();
    assert!(t.teacher().is_some());
    let summary = t.run(false).unwrap();
    let kl: Vec<Option<f32>> = summary.kl.clone();
    assert_eq!(kl.len(), 12);
    assert!(kl[..8].iter().all(Option::is_some) && kl[8..].iter().all(Option::is_none), "the KL term on steps 1..=8 only: {kl:?}");
    let (first, last) = (kl[0].unwrap(), kl[7].unwrap());
    assert!(last < 0.8 * first, "distillation lowers the KL term: {first} -> {last}");
    assert!(t.teacher().is_none(), "the teacher is dropped after the stop step");
    // log.jsonl carries the term on the distilling steps alone
    let log = std::fs::read_to_string(cfg.out.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().all(|l| l.get("kl").is_some() == (l["step"].as_u64().unwrap() <= 8)), "{log}");
    // eval.jsonl: one line per evaluation with the training tokens
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(cfg.out.join(EVAL_FILE)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 8, 12], "the last step's evaluation is written once");
    assert!(evals.iter().all(|e| e["train_tokens"].as_u64() == Some(e["step"].as_u64().unwrap() * 4 * 24)));

    // the curves of the teacher and the student, through the CLI
    let png = dir.join("curves.png");
    let runs = format!("{},{}", dir.join("teacher").display(), cfg.out.display());
    let o = ditmoe(&["lm", "curves", "--runs", &runs, "--labels", "teacher,student", "--out", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap();
    assert!(img.width() > 400 && img.height() > 300);
    let o = ditmoe(&["lm", "curves", "--runs", &runs, "--labels", "teacher", "--out", png.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--labels"), "a label per run");
}

#[test]
fn a_resumed_distillation_ends_with_the_uninterrupted_weights() {
    let (dir, cfg) = setup("lm-distill-resume");
    let mut straight = LmTrainer::new(cfg.clone(), &plan(), RunStart::New).unwrap();
    straight.run(false).unwrap();
    // cut inside the distillation stage (step 3) and after it (step 6)
    for cut_at in [3, 6] {
        let mut cut = cfg.clone();
        cut.out = dir.join(format!("student-cut-{cut_at}"));
        LmTrainer::new(LmTrainConfig { steps: cut_at, lr_decay_steps: Some(8), ..cut.clone() }, &plan(), RunStart::New).unwrap().run(false).unwrap();
        let mut resumed = LmTrainer::new(cut.clone(), &plan(), RunStart::Resume).unwrap();
        assert_eq!(resumed.step(), cut_at);
        assert_eq!(resumed.teacher().is_some(), cut_at < 4, "cut at {cut_at}: the teacher only while the stage lasts");
        let summary = resumed.run(false).unwrap();
        assert_eq!(summary.kl.iter().filter(|k| k.is_some()).count() as u64, 4u64.saturating_sub(cut_at));
        for ((name, a), (_, b)) in weights(&resumed).iter().zip(&weights(&straight)) {
            assert!(a == b, "cut at {cut_at}, {name}: a resumed distillation ends with the uninterrupted run's weights");
        }
        let evals = std::fs::read_to_string(cut.out.join(EVAL_FILE)).unwrap();
        let steps: Vec<u64> = evals.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, if cut_at == 3 { vec![3, 4, 8] } else { vec![4, 6, 8] }, "cut at {cut_at}");
    }

    // the stop step is part of the run: resuming under another is refused by name
    let mut other = cfg.clone();
    other.out = dir.join("student-cut-3");
    other.distill.as_mut().unwrap().stop_step = Some(5);
    let err = LmTrainer::new(other, &plan(), RunStart::Resume).err().unwrap().to_string();
    assert!(err.contains("distill.json") && err.contains("`distill.stop_step` = 4"), "{err}");
    let mut plain = cfg;
    plain.out = dir.join("student-cut-3");
    plain.distill = None;
    let err = LmTrainer::new(plain, &plan(), RunStart::Resume).err().unwrap().to_string();
    assert!(err.contains("distils"), "{err}");
}

#[test]
fn a_teacher_of_another_vocabulary_is_refused() {
    let (dir, mut cfg) = setup("lm-distill-vocab");
    let student: LmConfig = serde_json::from_str(&std::fs::read_to_string(&cfg.model).unwrap()).unwrap();
    let wide = LmConfig { vocab_size: student.vocab_size + 8, ..student.clone() };
    let varmap = VarMap::new();
    let teacher = LmModel::new(&wide, &plan(), VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    let teacher_dir = dir.join("wide-teacher");
    teacher.save_hf(&teacher_dir).unwrap();
    cfg.distill.as_mut().unwrap().teacher = teacher_dir.clone();
    let err = LmTrainer::new(cfg.clone(), &plan(), RunStart::New).err().unwrap().to_string();
    assert!(err.contains(&teacher_dir.display().to_string()) && err.contains("vocab_size") && err.contains(&format!("{}", student.vocab_size + 8)), "{err}");
    assert!(!cfg.out.exists(), "refused before anything is written");
}

#[test]
fn a_bf16_export_loads_and_generates() {
    let (dir, cfg) = setup("lm-export");
    let teacher = cfg.distill.unwrap().teacher;
    let out = dir.join("bf16");
    let o = ditmoe(&["lm", "export", "--model", teacher.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f32_size = std::fs::metadata(teacher.join("model.safetensors")).unwrap().len();
    let bf16_size = std::fs::metadata(out.join("model.safetensors")).unwrap().len();
    assert!(bf16_size < f32_size * 6 / 10, "bf16 weights take half the bytes: {bf16_size} of {f32_size}");
    let stored = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(stored.values().all(|t| t.dtype() == DType::BF16), "every tensor stored in bf16");
    let model = load_hf(&out, &ExecutionPlan::inference(&Device::Cpu, Precision::Bf16)).unwrap();
    let original = load_hf(&teacher, &ExecutionPlan::inference(&Device::Cpu, Precision::F32)).unwrap();
    assert_eq!(model.config(), original.config());
    let o = ditmoe(&["lm", "generate", "--model", out.to_str().unwrap(), "--prompt", "The state of", "--max-tokens", "6", "--temperature", "0", "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("The state of"));
    // a second export into the same folder needs --overwrite
    let o = ditmoe(&["lm", "export", "--model", teacher.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "bf16"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
}
