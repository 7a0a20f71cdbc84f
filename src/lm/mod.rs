//! Decoder-only mixture-of-experts language models on the engine ([`crate::moe`]): the
//! transformer of transformers' Mixtral, Qwen2-MoE and OLMoE (RMSNorm, GQA attention with RoPE
//! and a KV cache, SwiGLU MLPs) around [`crate::moe::MoeLayer`]s, a per-layer MLP plan
//! ([`LayerMlp`]), HF checkpoint folders read and written by their own names
//! ([`HfCheckpoint`], [`LmModel::save_hf`]), the causal-LM loss with the model-level
//! load-balancing loss, greedy decoding and sampled generation ([`generation`]), validation
//! ([`eval`]) and training on a token corpus ([`trainer`]).
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod decoder_layer;
pub mod distill;
pub mod eval;
pub mod generation;
pub mod init;
pub mod kv_cache;
pub mod model;
pub mod params;
pub mod rms_norm;
pub mod rope;
pub mod routes;
pub mod sampling;
pub mod static_cache;
pub mod train_config;
pub mod trainer;

pub use crate::nn::causal_mask;
pub use attention::{repeat_kv, LmAttention};
pub use checkpoint::{load_hf, HfCheckpoint};
pub use config::{HfConfigError, LayerMlp, LmConfig, LmConfigError, SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES};
pub use decoder::Decoder;
pub use decoder_layer::{DecoderLayer, LmMlp};
pub use kv_cache::KvCache;
pub use model::{cross_entropy, LmModel, LmOutput};
pub use params::{NamedParams, ParamRecorder};
pub use rms_norm::RmsNorm;
pub use rope::RotaryEmbedding;
pub use static_cache::StaticKvCache;
