//! Language-model test material: a corpus folder written as `ditmoe data sotu` writes it, and
//! the small transformer and MoE layer every LM test builds its layer plans from.
use super::{scratch_dir, Scratch};
use ditmoe::lm::trainer::{TOKENIZER_FILE, TRAIN_SHARD, VALIDATION_SHARD};
use ditmoe::lm::{LayerMlp, LmConfig};
use ditmoe::moe::{BalanceLossConfig, ExpertForm, MoeConfig, ParamNames, RouterConfig};
use ditmoe::text::{TokenShard, Tokenizer};
use std::path::{Path, PathBuf};

/// Twelve numbered copies of `text` as documents: a 300-token BPE trained on them, the first
/// ten as the train shard, the last two as validation. Returns the vocabulary size.
pub fn write_corpus(dir: &Path, text: &str) -> usize {
    let docs: Vec<String> = (0..12).map(|i| format!("{i}: {text}")).collect();
    let tok = Tokenizer::train(&docs, 300).unwrap();
    tok.save(&dir.join(TOKENIZER_FILE)).unwrap();
    let eos = tok.eos_id().unwrap();
    let ids: Vec<Vec<u32>> = docs.iter().map(|d| tok.encode(d).unwrap()).collect();
    TokenShard::from_documents(&ids[..10], eos).write(&dir.join(TRAIN_SHARD)).unwrap();
    TokenShard::from_documents(&ids[10..], eos).write(&dir.join(VALIDATION_SHARD)).unwrap();
    tok.vocab_size()
}

/// A scratch folder `tag` holding [`write_corpus`] of `text` in `<folder>/data`: (folder, data
/// folder, vocabulary size).
pub fn scratch_corpus(tag: &str, text: &str) -> (Scratch, PathBuf, usize) {
    let dir = scratch_dir(tag);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let vocab = write_corpus(&data, text);
    (dir, data, vocab)
}

/// `cfg` written as `<dir>/<name>.json`, the path a run config's `model` names.
pub fn write_model(dir: &Path, name: &str, cfg: &LmConfig) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string(cfg).unwrap()).unwrap();
    path
}

/// An MoE layer of width 32: 4 SwiGLU experts of 32, top-2 renormalised, no shared or residual
/// expert, transformers' parameter names; tests change the fields they are about.
pub fn tiny_moe() -> MoeConfig {
    MoeConfig {
        hidden_size: 32,
        num_experts: 4,
        top_k: 2,
        expert_intermediate_size: 32,
        expert_form: ExpertForm::Swiglu,
        shared_expert_intermediate_size: 0,
        shared_expert_gate: false,
        residual_intermediate_size: 0,
        router: RouterConfig::TopK { norm_topk_prob: true },
        balance_loss: BalanceLossConfig::default(),
        capacity: Default::default(),
        names: ParamNames { shared_expert: "shared_expert".into(), ..ParamNames::default() },
    }
}

/// Width 32, 4 query and 2 key/value heads of 8, context 64, dense MLPs of 64, around `layers`.
pub fn tiny_lm(vocab: usize, layers: Vec<LayerMlp>, tie_word_embeddings: bool, router_aux_loss_coef: f64) -> LmConfig {
    LmConfig {
        vocab_size: vocab,
        hidden_size: 32,
        num_layers: layers.len(),
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 64,
        tie_word_embeddings,
        attention_bias: false,
        qk_norm: false,
        intermediate_size: 64,
        layers,
        router_aux_loss_coef,
        moe_prefix: "mlp".into(),
    }
}

/// The corpus text of the parallel-training tests.
const PARALLEL_TEXT: &str = "The state of the union is strong. We the people of the united states, in order to form a more perfect union, establish justice and insure domestic tranquility. Congress shall make no law.";

/// The run the parallel-training tests compare across layouts: a corpus, a model of two MoE
/// layers of 4 top-2 experts and a gated shared expert (Qwen2-MoE's form) with transformers'
/// load-balancing loss, and a training config of 3 steps of 4 windows (as JSON, for the tests
/// that deserialise it and those that hand it to the CLI).
pub fn parallel_run(tag: &str) -> (Scratch, serde_json::Value) {
    let (dir, data, vocab) = scratch_corpus(tag, PARALLEL_TEXT);
    let moe = |_| MoeConfig { shared_expert_intermediate_size: 16, shared_expert_gate: true, ..tiny_moe() };
    let model = write_model(&dir, "model", &tiny_lm(vocab, LayerMlp::moe_every_nth(2, 1, moe), false, 0.05));
    let cfg = serde_json::json!({
        "model": model, "data": data, "out": dir.join("run"),
        "seq_len": 16, "batch_size": 4, "steps": 3, "lr": 3e-3, "warmup_steps": 1,
        "log_every": 1, "ckpt_every": 100, "eval_batches": 1, "max_grad_norm": 0.5, "adam_eps": 1e-6
    });
    (dir, cfg)
}
