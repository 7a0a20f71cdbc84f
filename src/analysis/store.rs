//! A trajectory on disk, reloadable without the model: `trajectory.json` (the metadata,
//! readable by people and scripts) beside `trajectory.safetensors` (the arrays, loadable
//! with numpy/torch `safetensors`). Both are written atomically.
use super::trajectory::{Dims, ImageRecord, RoutingTrajectory, TrajectoryMeta};
use crate::checkpoint::{write_atomic, write_safetensors_atomic};
use candle_core::{bail, DType, Device, Result, Tensor};
use std::path::Path;

pub const META_FILE: &str = "trajectory.json";
pub const DATA_FILE: &str = "trajectory.safetensors";

fn msg(path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

/// Whether `dir` holds a saved trajectory.
pub fn is_trajectory_dir(dir: &Path) -> bool {
    dir.join(META_FILE).is_file() && dir.join(DATA_FILE).is_file()
}

impl RoutingTrajectory {
    /// Writes `dir/trajectory.json` and `dir/trajectory.safetensors` (the folder is created).
    /// Arrays: `experts` u32 and `weights` f32 (N, S, L, T, k), `scores` f32 (N, S, L, T, E),
    /// `states` f32 (N, S, C, H, W), `samples` f32 (N, C, H, W).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| msg(dir, e))?;
        let d = self.dims();
        let raw = self.raw();
        let cpu = Device::Cpu;
        let routed = (d.images, d.steps, d.layers, d.tokens);
        let (c, h, w) = d.state;
        let tensors = vec![
            ("experts".to_string(), Tensor::from_slice(raw.experts, (routed.0, routed.1, routed.2, routed.3, d.top_k), &cpu)?),
            ("weights".to_string(), Tensor::from_slice(raw.weights, (routed.0, routed.1, routed.2, routed.3, d.top_k), &cpu)?),
            ("scores".to_string(), Tensor::from_slice(raw.scores, (routed.0, routed.1, routed.2, routed.3, d.score_width), &cpu)?),
            ("states".to_string(), Tensor::from_slice(raw.states, (d.images, d.steps, c, h, w), &cpu)?),
            ("samples".to_string(), Tensor::from_slice(raw.samples, (d.images, c, h, w), &cpu)?),
        ];
        write_safetensors_atomic(&dir.join(DATA_FILE), &tensors)?;
        let json = serde_json::to_string_pretty(&self.meta).map_err(|e| msg(&dir.join(META_FILE), e))?;
        write_atomic(&dir.join(META_FILE), json.as_bytes())
    }

    /// Reads a folder written by [`Self::save`]; every array's shape and dtype is checked
    /// against the metadata.
    pub fn load(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        let s = std::fs::read_to_string(&meta_path).map_err(|e| msg(&meta_path, e))?;
        let meta: TrajectoryMeta = serde_json::from_str(&s).map_err(|e| msg(&meta_path, e))?;
        meta.config.validate().map_err(|e| msg(&meta_path, e))?;
        let data_path = dir.join(DATA_FILE);
        let mut tensors = candle_core::safetensors::load(&data_path, &Device::Cpu).map_err(|e| msg(&data_path, e))?;
        let d = Dims::of(&meta);
        let (c, h, w) = d.state;
        let mut take = |name: &str, dtype: DType, shape: &[usize]| -> Result<Vec<Tensor>> {
            let t = tensors.remove(name).ok_or_else(|| msg(&data_path, format!("no `{name}` tensor")))?;
            if t.dtype() != dtype || t.dims() != shape {
                return Err(msg(&data_path, format!("`{name}` is {:?} {:?}, the metadata needs {dtype:?} {shape:?}", t.dtype(), t.dims())));
            }
            (0..d.images).map(|n| t.get(n)?.flatten_all()).collect()
        };
        let experts = take("experts", DType::U32, &[d.images, d.steps, d.layers, d.tokens, d.top_k])?;
        let weights = take("weights", DType::F32, &[d.images, d.steps, d.layers, d.tokens, d.top_k])?;
        let scores = take("scores", DType::F32, &[d.images, d.steps, d.layers, d.tokens, d.score_width])?;
        let states = take("states", DType::F32, &[d.images, d.steps, c, h, w])?;
        let samples = take("samples", DType::F32, &[d.images, c, h, w])?;
        if d.images == 0 {
            bail!("{}: a trajectory of no images", meta_path.display())
        }
        let images = (0..d.images)
            .map(|n| {
                Ok(ImageRecord {
                    experts: experts[n].to_vec1()?,
                    weights: weights[n].to_vec1()?,
                    scores: scores[n].to_vec1()?,
                    states: states[n].to_vec1()?,
                    sample: samples[n].to_vec1()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        RoutingTrajectory::new(meta, images).map_err(|e| msg(dir, e))
    }
}
