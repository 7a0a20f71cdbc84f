//! `LmConfig`: everything that defines a decoder-only MoE language model: the transformer
//! around the MoE layers (embeddings, GQA attention with RoPE, RMSNorm) and a per-layer MLP
//! plan ([`LayerMlp`]: a dense SwiGLU MLP or an engine [`MoeConfig`]), so that layers may differ
//! in expert count (PR-MoE's pyramid) or be dense (Qwen2-MoE's `mlp_only_layers`).
//!
//! [`LmConfig::from_hf_config`] reads a transformers `config.json` of the supported families
//! (Mixtral, Qwen2-MoE, OLMoE).
use crate::moe::{BalanceLossConfig, CapacityPolicy, ExpertForm, MoeConfig, ParamNames, RouterConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The MLP of one decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// A config, built once per model: not boxed, so plans are written `LayerMlp::Moe(cfg)`.
#[allow(clippy::large_enum_variant)]
pub enum LayerMlp {
    /// A dense SwiGLU MLP of [`LmConfig::intermediate_size`] (`mlp.{gate,up,down}_proj`,
    /// transformers' `Qwen2MoeMLP`).
    Dense,
    /// An engine MoE layer under [`LmConfig::moe_prefix`].
    Moe(MoeConfig),
}

impl LayerMlp {
    /// Every one of `num_layers` layers an MoE layer; `moe(layer)` gives each its config (a
    /// constant for the HF families, a growing expert count for a pyramid).
    pub fn moe_every_layer(num_layers: usize, moe: impl FnMut(usize) -> MoeConfig) -> Vec<Self> {
        Self::moe_every_nth(num_layers, 1, moe)
    }

    /// Layer `i` is an MoE layer when `(i + 1) % n == 0` (transformers' `decoder_sparse_step`
    /// convention: n = 2 makes layers 1, 3, 5, … MoE), the others dense. `moe(layer)` gives
    /// each MoE layer its config. n = 0 gives no MoE layer.
    pub fn moe_every_nth(num_layers: usize, n: usize, mut moe: impl FnMut(usize) -> MoeConfig) -> Vec<Self> {
        (0..num_layers).map(|i| if n > 0 && (i + 1) % n == 0 { Self::Moe(moe(i)) } else { Self::Dense }).collect()
    }

    pub fn moe(&self) -> Option<&MoeConfig> {
        match self {
            Self::Moe(m) => Some(m),
            Self::Dense => None,
        }
    }
}

/// A decoder-only MoE language model (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention; `num_heads` for plain multi-head).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// The longest context (RoPE tables and the KV cache stop there).
    pub max_position_embeddings: usize,
    /// `lm_head` shares `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2-MoE); `o_proj` has none.
    pub attention_bias: bool,
    /// RMSNorm over the whole q and k projections before the head split (OLMoE's `q_norm`,
    /// `k_norm`).
    pub qk_norm: bool,
    /// The dense layers' SwiGLU intermediate width.
    pub intermediate_size: usize,
    /// One entry per layer.
    pub layers: Vec<LayerMlp>,
    /// The weight of the model-level load-balancing loss in [`super::LmModel::loss`].
    pub router_aux_loss_coef: f64,
    /// The MoE block's name under `model.layers.<i>` (`mlp`; Mixtral: `block_sparse_moe`).
    pub moe_prefix: String,
}

/// Why an [`LmConfig`] is refused; each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum LmConfigError {
    #[error("lm config: `{field}` must be positive")]
    Zero { field: &'static str },
    #[error("lm config: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")]
    KvHeads { num_heads: usize, num_kv_heads: usize },
    #[error("lm config: head_dim ({0}) must be even (RoPE rotates pairs)")]
    OddHeadDim(usize),
    #[error("lm config: `layers` has {found} entries, num_layers is {expected}")]
    LayerCount { expected: usize, found: usize },
    #[error("lm config: layer {layer}'s MoE hidden_size {found} differs from the model's hidden_size {expected}")]
    MoeHidden { layer: usize, expected: usize, found: usize },
    #[error("lm config: layer {layer}'s MoE config: {reason}")]
    Moe { layer: usize, reason: String },
    #[error("lm config: `{field}` must be finite and {bound}, got {value}")]
    Range { field: &'static str, bound: &'static str, value: f64 },
    #[error("lm config: moe_prefix must be `mlp` or `block_sparse_moe`, got `{0}`")]
    MoePrefix(String),
}

impl From<LmConfigError> for candle_core::Error {
    fn from(e: LmConfigError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// Why a transformers `config.json` is refused.
#[derive(Debug, thiserror::Error)]
pub enum HfConfigError {
    #[error("config.json: unsupported model_type `{found}`; supported: {}", SUPPORTED_MODEL_TYPES.join(", "))]
    UnknownModelType { found: String },
    #[error("config.json: unsupported architecture `{found}`; supported: {}", SUPPORTED_ARCHITECTURES.join(", "))]
    UnknownArchitecture { found: String },
    #[error("config.json: no `model_type`; supported: {}", SUPPORTED_MODEL_TYPES.join(", "))]
    NoModelType,
    #[error("config.json ({model_type}): missing field `{field}`")]
    Missing { model_type: String, field: &'static str },
    #[error("config.json ({model_type}): field `{field}` has an unusable value {value}: {why}")]
    Invalid { model_type: String, field: &'static str, value: String, why: String },
    #[error("config.json ({model_type}): `{field}` = {value} is not supported: {why}")]
    Unsupported { model_type: String, field: &'static str, value: String, why: &'static str },
}

impl From<HfConfigError> for candle_core::Error {
    fn from(e: HfConfigError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// The transformers `model_type`s [`LmConfig::from_hf_config`] reads.
pub const SUPPORTED_MODEL_TYPES: [&str; 3] = ["mixtral", "qwen2_moe", "olmoe"];
/// Their causal-LM classes (`architectures`).
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM"];

/// Field access on a transformers config with errors naming the family and field.
struct HfFields<'a> {
    json: &'a Value,
    model_type: String,
}

impl HfFields<'_> {
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }
    fn missing(&self, field: &'static str) -> HfConfigError {
        HfConfigError::Missing { model_type: self.model_type.clone(), field }
    }
    fn invalid(&self, field: &'static str, v: &Value, why: &str) -> HfConfigError {
        HfConfigError::Invalid { model_type: self.model_type.clone(), field, value: v.to_string(), why: why.into() }
    }
    fn unsupported(&self, field: &'static str, v: &Value, why: &'static str) -> HfConfigError {
        HfConfigError::Unsupported { model_type: self.model_type.clone(), field, value: v.to_string(), why }
    }
    fn usize(&self, field: &'static str) -> Result<usize, HfConfigError> {
        let v = self.get(field).ok_or_else(|| self.missing(field))?;
        v.as_u64().map(|x| x as usize).ok_or_else(|| self.invalid(field, v, "expected a non-negative integer"))
    }
    fn usize_or(&self, field: &'static str, default: usize) -> Result<usize, HfConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(_) => self.usize(field),
        }
    }
    fn f64(&self, field: &'static str) -> Result<f64, HfConfigError> {
        let v = self.get(field).ok_or_else(|| self.missing(field))?;
        v.as_f64().ok_or_else(|| self.invalid(field, v, "expected a number"))
    }
    fn f64_or(&self, field: &'static str, default: f64) -> Result<f64, HfConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(_) => self.f64(field),
        }
    }
    fn bool_or(&self, field: &'static str, default: bool) -> Result<bool, HfConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.invalid(field, v, "expected true or false")),
        }
    }

    /// RoPE θ: transformers 5's `rope_parameters.rope_theta` or 4's top-level `rope_theta`;
    /// only the default rotary (no scaling) is supported.
    fn rope_theta(&self, default: f64) -> Result<f64, HfConfigError> {
        for field in ["rope_parameters", "rope_scaling"] {
            if let Some(p) = self.get(field) {
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    let f = if field == "rope_parameters" { "rope_parameters" } else { "rope_scaling" };
                    return Err(self.unsupported(f, p, "only the default RoPE (no scaling) is implemented"));
                }
            }
        }
        if let Some(t) = self.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
            return t.as_f64().ok_or_else(|| self.invalid("rope_parameters", t, "rope_theta must be a number"));
        }
        self.f64_or("rope_theta", default)
    }

    /// `hidden_act` must be SiLU (the SwiGLU experts).
    fn silu(&self) -> Result<(), HfConfigError> {
        match self.get("hidden_act") {
            Some(v) if v.as_str() != Some("silu") => Err(self.unsupported("hidden_act", v, "only silu (SwiGLU) is implemented")),
            _ => Ok(()),
        }
    }
}

impl LmConfig {
    /// Reads a transformers `config.json` (mirrors `MixtralConfig`, `Qwen2MoeConfig`,
    /// `OlmoeConfig` and how their `*ForCausalLM` build their layers). An unknown `model_type`
    /// or architecture is refused, naming it and the supported ones; a missing required field
    /// is named.
    pub fn from_hf_config(json: &Value) -> Result<Self, HfConfigError> {
        let model_type = match json.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => return Err(HfConfigError::NoModelType),
        };
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(HfConfigError::UnknownModelType { found: model_type });
        }
        if let Some(archs) = json.get("architectures").and_then(Value::as_array) {
            for a in archs {
                let a = a.as_str().unwrap_or_default();
                if !SUPPORTED_ARCHITECTURES.contains(&a) {
                    return Err(HfConfigError::UnknownArchitecture { found: a.to_string() });
                }
            }
        }
        let f = HfFields { json, model_type: model_type.clone() };
        // The families' config-class defaults for fields a config.json may leave out
        // (`MixtralConfig`, `Qwen2MoeConfig`, `OlmoeConfig`): rope_theta, rms_norm_eps,
        // router_aux_loss_coef.
        let (rope_theta, rms_norm_eps, aux_coef) = match model_type.as_str() {
            "mixtral" => (1e6, 1e-5, 0.001),
            "qwen2_moe" => (10000.0, 1e-6, 0.001),
            _ => (10000.0, 1e-5, 0.01),
        };
        f.silu()?;
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_layers = f.usize("num_hidden_layers")?;
        let head_dim = match f.get("head_dim") {
            Some(_) => f.usize("head_dim")?,
            None if num_heads > 0 => hidden_size / num_heads,
            None => return Err(f.invalid("num_attention_heads", &Value::from(0), "must be positive")),
        };
        let max_position_embeddings = f.usize("max_position_embeddings")?;
        let num_experts_per_tok = f.usize("num_experts_per_tok")?;
        let top_k = |names: ParamNames, num_experts: usize, intermediate: usize, norm: bool| MoeConfig {
            hidden_size,
            num_experts,
            top_k: num_experts_per_tok,
            expert_intermediate_size: intermediate,
            expert_form: ExpertForm::Swiglu,
            shared_expert_intermediate_size: 0,
            shared_expert_gate: false,
            residual_intermediate_size: 0,
            router: RouterConfig::TopK { norm_topk_prob: norm },
            // The HF families' balance loss is model-level (`load_balancing_loss_func`).
            balance_loss: BalanceLossConfig::default(),
            capacity: CapacityPolicy::Dropless,
            names,
        };
        let intermediate_size = f.usize("intermediate_size")?;
        let hf_names = |shared: &str| ParamNames { router: "gate".into(), experts: "experts".into(), shared_expert: shared.into(), shared_expert_gate: "shared_expert_gate".into(), ..ParamNames::default() };
        let (layers, attention_bias, qk_norm, moe_prefix) = match model_type.as_str() {
            "mixtral" => {
                // `MixtralSparseMoeBlock`: the top-k weights are always renormalised.
                if let Some(w) = f.get("sliding_window") {
                    if w.as_u64().is_none_or(|w| (w as usize) < max_position_embeddings) {
                        return Err(f.unsupported("sliding_window", w, "sliding-window attention is not implemented"));
                    }
                }
                let names = ParamNames { router: "gate".into(), experts: "experts".into(), gate_proj: "w1".into(), up_proj: "w3".into(), down_proj: "w2".into(), ..ParamNames::default() };
                let moe = top_k(names, f.usize("num_local_experts")?, intermediate_size, true);
                (LayerMlp::moe_every_layer(num_layers, |_| moe.clone()), false, false, "block_sparse_moe")
            }
            "qwen2_moe" => {
                if f.bool_or("use_sliding_window", false)? {
                    return Err(f.unsupported("use_sliding_window", &Value::Bool(true), "sliding-window attention is not implemented"));
                }
                let mut moe = top_k(hf_names("shared_expert"), f.usize("num_experts")?, f.usize("moe_intermediate_size")?, f.bool_or("norm_topk_prob", false)?);
                moe.shared_expert_intermediate_size = f.usize("shared_expert_intermediate_size")?;
                moe.shared_expert_gate = moe.shared_expert_intermediate_size > 0;
                // `Qwen2MoeDecoderLayer`: sparse when not in mlp_only_layers and
                // (layer_idx + 1) % decoder_sparse_step == 0 (and num_experts > 0).
                let step = f.usize_or("decoder_sparse_step", 1)?;
                let dense: Vec<usize> = match f.get("mlp_only_layers") {
                    None => vec![],
                    Some(v) => v
                        .as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| f.invalid("mlp_only_layers", v, "expected a list of layer indices"))?,
                };
                let step = if moe.num_experts == 0 { 0 } else { step };
                let mut layers = LayerMlp::moe_every_nth(num_layers, step, |_| moe.clone());
                for i in dense {
                    if let Some(l) = layers.get_mut(i) {
                        *l = LayerMlp::Dense;
                    }
                }
                (layers, f.bool_or("qkv_bias", true)?, false, "mlp")
            }
            "olmoe" => {
                if let Some(c) = f.get("clip_qkv") {
                    return Err(f.unsupported("clip_qkv", c, "q/k/v clipping is not implemented"));
                }
                let moe = top_k(hf_names("shared_expert"), f.usize("num_experts")?, intermediate_size, f.bool_or("norm_topk_prob", false)?);
                (LayerMlp::moe_every_layer(num_layers, |_| moe.clone()), f.bool_or("attention_bias", false)?, true, "mlp")
            }
            _ => unreachable!("checked against SUPPORTED_MODEL_TYPES"),
        };
        Ok(Self {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads: f.usize_or("num_key_value_heads", num_heads)?,
            head_dim,
            rope_theta: f.rope_theta(rope_theta)?,
            rms_norm_eps: f.f64_or("rms_norm_eps", rms_norm_eps)?,
            max_position_embeddings,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            attention_bias,
            qk_norm,
            intermediate_size,
            layers,
            router_aux_loss_coef: f.f64_or("router_aux_loss_coef", aux_coef)?,
            moe_prefix: moe_prefix.into(),
        })
    }

    /// The transformers fields of this config when it is one of the supported families'
    /// layouts (every MoE layer alike, the family's names): `Some((model_type, fields))`, else
    /// None. What [`super::LmModel::save_hf`] writes beside our own config.
    pub fn to_hf_config(&self) -> Option<(String, serde_json::Map<String, Value>)> {
        let moes: Vec<&MoeConfig> = self.layers.iter().filter_map(LayerMlp::moe).collect();
        let moe = *moes.first()?;
        if moes.iter().any(|m| *m != moe) || moe.top_k == 0 {
            return None;
        }
        let RouterConfig::TopK { norm_topk_prob } = moe.router else { return None };
        let n = &moe.names;
        let dense_layers: Vec<usize> = self.layers.iter().enumerate().filter(|(_, l)| matches!(l, LayerMlp::Dense)).map(|(i, _)| i).collect();
        let plain = moe.residual_intermediate_size == 0 && moe.capacity == CapacityPolicy::Dropless && moe.expert_form == ExpertForm::Swiglu && moe.balance_loss.coefficient == 0.0;
        let hf_names = n.router == "gate" && n.experts == "experts";
        let mut m = serde_json::Map::new();
        let model_type = if self.moe_prefix == "block_sparse_moe" {
            let ok = plain && hf_names && norm_topk_prob && (n.gate_proj.as_str(), n.up_proj.as_str(), n.down_proj.as_str()) == ("w1", "w3", "w2");
            if !ok || !dense_layers.is_empty() || moe.shared_expert_intermediate_size > 0 || self.attention_bias || self.qk_norm {
                return None;
            }
            m.insert("num_local_experts".into(), moe.num_experts.into());
            m.insert("intermediate_size".into(), moe.expert_intermediate_size.into());
            m.insert("sliding_window".into(), Value::Null);
            m.insert("router_jitter_noise".into(), 0.0.into());
            ("mixtral", "MixtralForCausalLM")
        } else {
            let ok = plain && hf_names && self.moe_prefix == "mlp" && (n.gate_proj.as_str(), n.up_proj.as_str(), n.down_proj.as_str()) == ("gate_proj", "up_proj", "down_proj");
            if !ok {
                return None;
            }
            m.insert("num_experts".into(), moe.num_experts.into());
            m.insert("norm_topk_prob".into(), norm_topk_prob.into());
            if self.qk_norm {
                if !dense_layers.is_empty() || moe.shared_expert_intermediate_size > 0 {
                    return None;
                }
                m.insert("intermediate_size".into(), moe.expert_intermediate_size.into());
                m.insert("attention_bias".into(), self.attention_bias.into());
                m.insert("clip_qkv".into(), Value::Null);
                ("olmoe", "OlmoeForCausalLM")
            } else {
                if moe.shared_expert_gate != (moe.shared_expert_intermediate_size > 0) || n.shared_expert != "shared_expert" {
                    return None;
                }
                m.insert("intermediate_size".into(), self.intermediate_size.into());
                m.insert("moe_intermediate_size".into(), moe.expert_intermediate_size.into());
                m.insert("shared_expert_intermediate_size".into(), moe.shared_expert_intermediate_size.into());
                m.insert("decoder_sparse_step".into(), 1.into());
                m.insert("mlp_only_layers".into(), dense_layers.into());
                m.insert("qkv_bias".into(), self.attention_bias.into());
                m.insert("use_sliding_window".into(), false.into());
                ("qwen2_moe", "Qwen2MoeForCausalLM")
            }
        };
        m.insert("model_type".into(), model_type.0.into());
        m.insert("architectures".into(), vec![model_type.1].into());
        m.insert("vocab_size".into(), self.vocab_size.into());
        m.insert("hidden_size".into(), self.hidden_size.into());
        m.insert("num_hidden_layers".into(), self.num_layers.into());
        m.insert("num_attention_heads".into(), self.num_heads.into());
        m.insert("num_key_value_heads".into(), self.num_kv_heads.into());
        m.insert("head_dim".into(), self.head_dim.into());
        m.insert("hidden_act".into(), "silu".into());
        m.insert("max_position_embeddings".into(), self.max_position_embeddings.into());
        m.insert("rms_norm_eps".into(), self.rms_norm_eps.into());
        m.insert("rope_theta".into(), self.rope_theta.into());
        m.insert("rope_parameters".into(), serde_json::json!({ "rope_theta": self.rope_theta, "rope_type": "default" }));
        m.insert("num_experts_per_tok".into(), moe.top_k.into());
        m.insert("router_aux_loss_coef".into(), self.router_aux_loss_coef.into());
        m.insert("output_router_logits".into(), true.into());
        m.insert("tie_word_embeddings".into(), self.tie_word_embeddings.into());
        m.insert("dtype".into(), "float32".into());
        Some((model_type.0.to_string(), m))
    }

    /// Parameters in total, and those one token uses (its top-k routed experts instead of all
    /// of them): the "total / active" counts MoE models are quoted by.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let (d, hd) = (self.hidden_size, self.head_dim);
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let qk_norm = if self.qk_norm { q + kv } else { 0 };
        let attention = d * q + 2 * d * kv + q * d + bias + qk_norm + 2 * d;
        let mlp = |form: ExpertForm, width: usize| self.mlp_params(form, width);
        let (mut total, mut active) = (0, 0);
        for layer in &self.layers {
            let (t, a) = match layer {
                LayerMlp::Dense => (mlp(ExpertForm::Swiglu, self.intermediate_size), mlp(ExpertForm::Swiglu, self.intermediate_size)),
                LayerMlp::Moe(m) => {
                    let expert = mlp(m.expert_form, m.expert_intermediate_size);
                    let mut always = m.num_experts * d;
                    if m.shared_expert_intermediate_size > 0 {
                        always += mlp(m.expert_form, m.shared_expert_intermediate_size) + if m.shared_expert_gate { d } else { 0 };
                    }
                    if m.residual_intermediate_size > 0 {
                        always += mlp(m.expert_form, m.residual_intermediate_size) + 2 * d + 2;
                    }
                    (always + m.total_experts() * expert, always + m.top_k * expert)
                }
            };
            total += attention + t;
            active += attention + a;
        }
        let embeddings = self.vocab_size * d * if self.tie_word_embeddings { 1 } else { 2 } + d;
        (total + embeddings, active + embeddings)
    }

    /// Parameters of one MLP `width` wide: SwiGLU's three projections, or GELU's two with biases.
    fn mlp_params(&self, form: ExpertForm, width: usize) -> usize {
        let d = self.hidden_size;
        match form {
            ExpertForm::Swiglu => 3 * d * width,
            ExpertForm::GeluBias | ExpertForm::GeluErfBias => 2 * d * width + width + d,
        }
    }

    /// Parameters of the routed experts of every MoE layer: what expert parallelism splits over
    /// its ranks (routers, shared and residual MLPs are replicated).
    pub fn routed_experts_params(&self) -> usize {
        self.layers.iter().filter_map(LayerMlp::moe).map(|m| m.num_experts * self.mlp_params(m.expert_form, m.expert_intermediate_size)).sum()
    }

    /// All parameters ([`Self::parameter_counts`]'s total).
    pub fn num_parameters(&self) -> usize {
        self.parameter_counts().0
    }

    /// The MoE layers' indices.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.layers.iter().enumerate().filter(|(_, l)| l.moe().is_some()).map(|(i, _)| i).collect()
    }

    /// Checks sizes and the layer plan, naming the field at fault.
    pub fn validate(&self) -> Result<(), LmConfigError> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(LmConfigError::Zero { field });
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(LmConfigError::KvHeads { num_heads: self.num_heads, num_kv_heads: self.num_kv_heads });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(LmConfigError::OddHeadDim(self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(LmConfigError::Range { field: "rope_theta", bound: "> 0", value: self.rope_theta });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(LmConfigError::Range { field: "rms_norm_eps", bound: "> 0", value: self.rms_norm_eps });
        }
        if !(self.router_aux_loss_coef.is_finite() && self.router_aux_loss_coef >= 0.0) {
            return Err(LmConfigError::Range { field: "router_aux_loss_coef", bound: ">= 0", value: self.router_aux_loss_coef });
        }
        if self.layers.len() != self.num_layers {
            return Err(LmConfigError::LayerCount { expected: self.num_layers, found: self.layers.len() });
        }
        if self.moe_prefix != "mlp" && self.moe_prefix != "block_sparse_moe" {
            return Err(LmConfigError::MoePrefix(self.moe_prefix.clone()));
        }
        for (layer, l) in self.layers.iter().enumerate() {
            match l {
                LayerMlp::Dense if self.intermediate_size == 0 => return Err(LmConfigError::Zero { field: "intermediate_size" }),
                LayerMlp::Dense => {}
                LayerMlp::Moe(m) => {
                    if m.hidden_size != self.hidden_size {
                        return Err(LmConfigError::MoeHidden { layer, expected: self.hidden_size, found: m.hidden_size });
                    }
                    if !matches!(m.router, RouterConfig::TopK { .. }) {
                        return Err(LmConfigError::Moe { layer, reason: "a language model's MoE layers take the top-k router".into() });
                    }
                    m.validate().map_err(|e| LmConfigError::Moe { layer, reason: e.to_string() })?;
                }
            }
        }
        Ok(())
    }
}
