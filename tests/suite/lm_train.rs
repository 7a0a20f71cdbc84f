//! The language-model trainer on a tiny corpus (CPU): the loss falls, a run resumed from its
//! checkpoint ends with the same weights as an uninterrupted one, a non-finite loss stops with
//! the step named, a model and tokenizer that disagree are refused, and the exported folder
//! loads and generates.
use crate::common;

use candle_core::{DType, Device};
use ditmoe::lm::generation::generate;
use ditmoe::lm::sampling::{SamplingParams, TokenSampler};
use ditmoe::lm::train_config::LmTrainConfig;
use ditmoe::lm::trainer::{LmTrainer, TOKENIZER_FILE};
use ditmoe::lm::{load_hf, LayerMlp, LmConfig};
use ditmoe::text::Tokenizer;
use ditmoe::train::RunStart;
use ditmoe::{ExecutionPlan, Precision};

const TEXT: &str = "The state of the union is strong. We the people of the united states, in order to form a more perfect union, establish justice and insure domestic tranquility. Congress shall make no law. The president shall from time to time give to the congress information of the state of the union.";


fn model_config(vocab: usize) -> LmConfig {
    common::lm::tiny_lm(vocab, LayerMlp::moe_every_nth(2, 2, |_| common::lm::tiny_moe()), false, 0.01)
}

fn setup(tag: &str) -> (common::Scratch, LmTrainConfig) {
    let (dir, data, vocab) = common::lm::scratch_corpus(tag, TEXT);
    let model = common::lm::write_model(&dir, "model", &model_config(vocab));
    let cfg: LmTrainConfig = serde_json::from_value(serde_json::json!({
        "model": model, "data": data, "out": dir.join("run"),
        "seq_len": 24, "batch_size": 4, "steps": 8, "lr": 3e-3, "warmup_steps": 2,
        "log_every": 2, "ckpt_every": 4, "keep_last": 3, "eval_batches": 2
    }))
    .unwrap();
    (dir, cfg)
}

fn plan() -> ExecutionPlan {
    ExecutionPlan::training(&Device::Cpu, Precision::F32)
}

fn weights(t: &LmTrainer) -> Vec<(String, Vec<f32>)> {
    t.model().named_params().iter().map(|(n, w)| (n.clone(), w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

#[test]
fn training_lowers_the_loss_and_resumes_exactly() {
    let (dir, cfg) = setup("lm-resume");
    let mut straight = LmTrainer::new(cfg.clone(), &plan(), RunStart::New).unwrap();
    let summary = straight.run(false).unwrap();
    let (first, last) = (summary.steps.first().unwrap().loss, summary.steps.last().unwrap().loss);
    assert!(last < first, "the loss falls: {first} -> {last}");
    assert!(summary.steps.iter().all(|s| s.expert_counts.len() == 1 && s.expert_counts[0].iter().sum::<usize>() == 4 * 25 * 2), "one MoE layer, 2 slots a token");

    // the same run cut at step 4 and resumed
    let mut cut = cfg.clone();
    cut.out = dir.join("run-cut");
    let mut first_half = LmTrainer::new(LmTrainConfig { steps: 4, lr_decay_steps: Some(8), ..cut.clone() }, &plan(), RunStart::New).unwrap();
    first_half.run(false).unwrap();
    let mut resumed = LmTrainer::new(cut, &plan(), RunStart::Resume).unwrap();
    assert_eq!(resumed.step(), 4);
    resumed.run(false).unwrap();
    for ((name, a), (_, b)) in weights(&resumed).iter().zip(&weights(&straight)) {
        assert!(a == b, "{name}: a resumed run ends with the uninterrupted run's weights");
    }

    // the exported folder loads by itself and generates
    let model = load_hf(&summary.model_dir, &ExecutionPlan::inference(&Device::Cpu, Precision::F32)).unwrap();
    let tok = Tokenizer::load(&summary.model_dir.join(TOKENIZER_FILE)).unwrap();
    let prompt = tok.encode("The state of").unwrap();
    let mut sampler = TokenSampler::new(SamplingParams::GREEDY).unwrap();
    let (new, _) = generate(&model, &prompt, 6, &mut sampler, None, |_| Ok(())).unwrap();
    assert_eq!(new.len(), 6);
    assert_eq!(&model.generate_greedy(&prompt, 6).unwrap()[prompt.len()..], &new[..], "sampling at temperature 0 is greedy decoding");
}

#[test]
fn a_non_finite_loss_stops_with_the_step() {
    let (_dir, mut cfg) = setup("lm-nan");
    cfg.lr = 1e30;
    cfg.max_grad_norm = None;
    let mut t = LmTrainer::new(cfg, &plan(), RunStart::New).unwrap();
    let err = t.run(false).unwrap_err().to_string();
    assert!(err.contains("non-finite") && err.contains("at step"), "{err}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let (dir, cfg) = setup("lm-vocab");
    let mut small = model_config(16);
    small.vocab_size = 16;
    std::fs::write(dir.join("model.json"), serde_json::to_string(&small).unwrap()).unwrap();
    let err = LmTrainer::new(cfg, &plan(), RunStart::New).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("vocab"), "{err}");
}

#[test]
fn a_context_longer_than_the_model_is_refused() {
    let (_dir, mut cfg) = setup("lm-context");
    cfg.seq_len = 64;
    let err = LmTrainer::new(cfg, &plan(), RunStart::New).err().unwrap().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
}
