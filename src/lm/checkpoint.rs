//! HF model folders: `config.json` with `model.safetensors`, or with a sharded
//! `model.safetensors.index.json` (`weight_map`: tensor → shard file), read through memory
//! maps of every shard ([`HfCheckpoint`]; what `from_pretrained` reads), and written back in
//! the same layout ([`LmModel::save_hf`]; `save_pretrained`'s single-file form). A missing,
//! mis-shaped or non-float tensor is an error naming the tensor and the file; so is a tensor
//! the model does not use (a config that does not match its weights).
use super::{LmConfig, LmModel};
use crate::checkpoint::{write_atomic, write_safetensors_atomic, CheckpointError};
use crate::plan::ExecutionPlan;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The key of `config.json` under which [`LmModel::save_hf`] stores our own [`LmConfig`]
/// (read back in preference to the transformers fields).
pub const CONFIG_KEY: &str = "ditmoe";

fn io_err(path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    CheckpointError::Unreadable { file: path.into(), reason: e.to_string() }.into()
}

/// An opened HF model folder: its config and memory maps of its weight files.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: LmConfig,
    weights: Arc<ShardedWeights>,
}

/// The weight files and which tensor lives in which.
struct ShardedWeights {
    files: Vec<PathBuf>,
    maps: Vec<MmapedSafetensors>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
    /// What a missing tensor is reported against: `model.safetensors` or the index file.
    listing: PathBuf,
}

/// The VarBuilder backend over [`ShardedWeights`].
struct WeightsBackend {
    weights: Arc<ShardedWeights>,
    /// Whether parameters come back as training variables.
    trainable: bool,
}

impl HfCheckpoint {
    /// Reads `dir/config.json` (our [`CONFIG_KEY`] when present, else the transformers fields
    /// through [`LmConfig::from_hf_config`]) and maps `dir/model.safetensors` or the shards of
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt { file: config_path.clone(), reason: e.to_string() })?;
        let config = match json.get(CONFIG_KEY) {
            Some(ours) => serde_json::from_value::<LmConfig>(ours.clone()).map_err(|e| CheckpointError::Corrupt { file: config_path.clone(), reason: format!("`{CONFIG_KEY}`: {e}") })?,
            None => LmConfig::from_hf_config(&json).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", config_path.display())))?,
        };
        config.validate().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", config_path.display())))?;
        let weights = ShardedWeights::open(dir)?;
        Ok(Self { dir: dir.into(), config, weights: Arc::new(weights) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LmConfig {
        &self.config
    }

    /// The weight files (one, or the shards in the index's order of first appearance).
    pub fn files(&self) -> &[PathBuf] {
        &self.weights.files
    }

    /// A VarBuilder over the mapped weights, converting to `plan.weight_dtype()` on
    /// `plan.device` as each tensor is asked for (training variables for a training plan).
    pub fn var_builder(&self, plan: &ExecutionPlan) -> VarBuilder<'static> {
        let backend = WeightsBackend { weights: self.weights.clone(), trainable: plan.trainable() };
        VarBuilder::from_backend(Box::new(backend), plan.weight_dtype(), plan.device.clone())
    }

    /// The model, run as `plan` says; under expert parallelism this rank's slice, its experts
    /// read by their global names. Every tensor of the files must be used by the model (or, for
    /// a split expert, by another rank), transformers' `rotary_emb.inv_freq` buffers and a tied
    /// model's `lm_head.weight` excepted.
    pub fn load(&self, plan: &ExecutionPlan) -> Result<LmModel> {
        let model = LmModel::new(&self.config, plan, self.var_builder(plan))?;
        let used: std::collections::HashSet<&str> = model.named_params().iter().map(|(n, _)| n.as_str()).collect();
        // under expert parallelism the other ranks' experts are theirs to load
        let split = model.split_experts();
        let elsewhere = |n: &str| split.iter().any(|(prefix, _)| n.starts_with(prefix.as_str()));
        let mut unused: Vec<(&String, usize)> = self
            .weights
            .index
            .iter()
            .filter(|(n, _)| !(used.contains(n.as_str()) || elsewhere(n) || n.ends_with("rotary_emb.inv_freq") || self.config.tie_word_embeddings && n.as_str() == "lm_head.weight"))
            .map(|(n, &f)| (n, f))
            .collect();
        unused.sort();
        if let Some((name, f)) = unused.first() {
            let shape = self.weights.maps[*f].get(name)?.shape().to_vec();
            let more = crate::checkpoint::error::and_more(unused.len());
            return Err(CheckpointError::Unexpected { file: self.weights.files[*f].clone(), tensor: (*name).clone(), shape, more }.into());
        }
        Ok(model)
    }
}

/// [`HfCheckpoint::open`] then [`HfCheckpoint::load`].
pub fn load_hf(dir: &Path, plan: &ExecutionPlan) -> Result<LmModel> {
    HfCheckpoint::open(dir)?.load(plan)
}

impl ShardedWeights {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let (files, listing) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, e))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt { file: index_path.clone(), reason: e.to_string() })?;
            let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| CheckpointError::Corrupt { file: index_path.clone(), reason: "no `weight_map` object".into() })?;
            let mut files: Vec<String> = vec![];
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| CheckpointError::Corrupt { file: index_path.clone(), reason: format!("`weight_map` entry of `{name}` is not a file name") })?;
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            (files.into_iter().map(|f| dir.join(f)).collect::<Vec<_>>(), index_path)
        } else if single.exists() {
            (vec![single.clone()], single)
        } else {
            return Err(io_err(dir, "no model.safetensors or model.safetensors.index.json"));
        };
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if !f.exists() {
                return Err(io_err(f, format!("no such file (listed in {})", listing.display())));
            }
            // SAFETY: the map is only read; as with every memory-mapped checkpoint reader, the
            // file must not be truncated while the model is being loaded.
            let m = unsafe { MmapedSafetensors::new(f) }.map_err(|e| CheckpointError::Corrupt { file: f.clone(), reason: e.to_string() })?;
            for (name, _) in m.tensors() {
                if let Some(&j) = index.get(&name) {
                    let first: &PathBuf = &files[j];
                    return Err(CheckpointError::Corrupt { file: f.clone(), reason: format!("tensor `{name}` is also in {}", first.display()) }.into());
                }
                index.insert(name, i);
            }
            maps.push(m);
        }
        Ok(Self { files, maps, index, listing })
    }

    /// Tensor `name`, checked against the `expected` shape, as `dtype` on `dev`.
    fn load(&self, name: &str, expected: Option<&Shape>, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Some(&f) = self.index.get(name) else {
            let expected = expected.map(|s| s.dims().to_vec()).unwrap_or_default();
            return Err(CheckpointError::Missing { file: self.listing.clone(), tensor: name.into(), expected, more: String::new() }.into());
        };
        let file = &self.files[f];
        let view = self.maps[f].get(name)?;
        if let Some(s) = expected {
            if view.shape() != s.dims() {
                return Err(CheckpointError::Shape { file: file.clone(), tensor: name.into(), expected: s.dims().to_vec(), found: view.shape().to_vec() }.into());
            }
        }
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| CheckpointError::Corrupt { file: file.clone(), reason: format!("tensor `{name}`: {e}") })?;
        if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(CheckpointError::DType { file: file.clone(), tensor: name.into(), dtype: t.dtype() }.into());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl WeightsBackend {
    fn param(&self, t: Tensor) -> Result<Tensor> {
        match self.trainable {
            true => Ok(Var::from_tensor(&t)?.as_tensor().clone()),
            false => Ok(t),
        }
    }
}

impl SimpleBackend for WeightsBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.param(self.weights.load(name, Some(&s), dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.param(self.weights.load(name, None, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.index.contains_key(name)
    }
}

impl LmModel {
    /// Writes the model as an HF folder: `config.json` (the transformers fields of its family
    /// when its layout is one, see [`LmConfig::to_hf_config`], and our [`LmConfig`] under
    /// [`CONFIG_KEY`]) and `model.safetensors` under the parameters' checkpoint names, each
    /// written atomically (temp file + rename).
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let tensors = self.named_params().iter().map(|(n, t)| Ok((n.clone(), t.detach().to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<Vec<_>>>()?;
        let dtype = tensors.first().map(|(_, t)| t.dtype()).unwrap_or(DType::F32);
        let mut json = self.config().to_hf_config().map(|(_, m)| m).unwrap_or_default();
        json.insert("dtype".into(), Value::from(match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }));
        json.insert(CONFIG_KEY.into(), serde_json::to_value(self.config()).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
        let text = serde_json::to_string_pretty(&Value::Object(json)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        write_safetensors_atomic(&dir.join("model.safetensors"), &tensors)?;
        write_atomic(&dir.join("config.json"), text.as_bytes())
    }
}
