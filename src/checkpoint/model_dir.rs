//! A model folder: `config.json` + `model.safetensors` (or an official `.pt`), plus optional
//! `class_names.json` (a JSON list, index = class id). `ditmoe convert` writes this layout.
use super::{load_state_dict, write_atomic, write_safetensors_atomic};
use crate::config::DitConfig;
use crate::model::DitMoe;
use crate::plan::ExecutionPlan;
use candle_core::{DType, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: DitConfig,
    pub weights: PathBuf,
    pub class_names: Option<Vec<String>>,
}

const WEIGHT_FILES: [&str; 4] = ["model.safetensors", "ema.safetensors", "model.pt", "model.pth"];

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            candle_core::bail!("{}: not a model folder (expected a folder with config.json and model.safetensors)", dir.display())
        }
        let config = DitConfig::from_file(&dir.join("config.json"))?;
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: no weights file (looked for {})", dir.display(), WEIGHT_FILES.join(", "))))?;
        let names_path = dir.join("class_names.json");
        let class_names = if names_path.exists() {
            let s = std::fs::read_to_string(&names_path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", names_path.display())))?;
            let names: Vec<String> =
                serde_json::from_str(&s).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", names_path.display())))?;
            if names.len() != config.num_classes {
                candle_core::bail!("{}: {} names for {} classes", names_path.display(), names.len(), config.num_classes)
            }
            Some(names)
        } else {
            None
        };
        Ok(Self { dir: dir.into(), config, weights, class_names })
    }

    /// The model, its weights in the plan's dtype on its device.
    pub fn load(&self, plan: &ExecutionPlan) -> Result<DitMoe> {
        plan.check_fits(&format!("{}: the model's weights", self.dir.display()), self.config.weight_bytes(plan.weight_dtype(), plan.expert_parallel_size()))?;
        let vb = load_state_dict(&self.weights)?.into_var_builder(&self.config, plan)?;
        DitMoe::new(&self.config, plan, vb)
    }

    /// Writes a model folder: validated weights (in `dtype`) as safetensors, config and class
    /// names, each file atomically.
    pub fn write(dir: &Path, config: &DitConfig, weights_from: &Path, dtype: DType, class_names: Option<&[String]>) -> Result<Self> {
        let sd = load_state_dict(weights_from)?;
        sd.validate(config)?;
        std::fs::create_dir_all(dir).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
        let mut tensors = sd.tensors.into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect::<Result<Vec<_>>>()?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        write_safetensors_atomic(&dir.join("model.safetensors"), &tensors)?;
        write_atomic(&dir.join("config.json"), config.to_json().as_bytes())?;
        if let Some(names) = class_names {
            write_atomic(&dir.join("class_names.json"), serde_json::to_string_pretty(names).expect("names").as_bytes())?;
        }
        Self::open(dir)
    }

    /// Display name of a class id, falling back to the id.
    pub fn class_name(&self, id: usize) -> String {
        self.class_names.as_ref().and_then(|n| n.get(id).cloned()).unwrap_or_else(|| id.to_string())
    }
}
