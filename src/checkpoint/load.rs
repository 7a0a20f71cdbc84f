//! Loading official checkpoints: safetensors, or PyTorch `.pt`/`.pth` pickles whose state dict
//! may sit at the top level or under `ema`, `model`, `module` or `state_dict` (the official
//! `train.py` saves `{"model", "ema", "opt", "args"}`; `sample.py` reads `ema`), or, for
//! ProMoE (`train.py::save_checkpoint`), under `ema_model_state_dict` / `model_state_dict`
//! (its `sample.py` reads the EMA one). DDP `module.` prefixes are stripped. Every tensor is validated against the config before use.
use super::error::{and_more, CheckpointError};
use super::shapes::expected_parameters;
use crate::config::DitConfig;
use crate::plan::ExecutionPlan;
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Named tensors read from one file (on the CPU, in the file's dtype).
#[derive(Debug, Clone)]
pub struct StateDict {
    pub file: PathBuf,
    pub tensors: HashMap<String, Tensor>,
}

/// Keys under which PyTorch checkpoints keep their state dict, in the order we prefer them
/// (EMA weights are what the official sampler uses).
const PTH_KEYS: [Option<&str>; 7] = [
    Some("ema"),
    Some("ema_model_state_dict"),
    Some("model"),
    Some("model_state_dict"),
    Some("module"),
    Some("state_dict"),
    None,
];

pub fn load_state_dict(path: &Path) -> Result<StateDict> {
    if !path.exists() {
        return Err(CheckpointError::Unreadable { file: path.into(), reason: "no such file".into() }.into());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let tensors = match ext.as_str() {
        "pt" | "pth" | "bin" | "ckpt" => load_pth(path)?,
        _ => load_safetensors(path)?,
    };
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").map(str::to_string).unwrap_or(k), v))
        .collect();
    Ok(StateDict { file: path.into(), tensors })
}

fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Unreadable { file: path.into(), reason: e.to_string() })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        // safetensors' own error does not say which tensor is at fault: find it in the header
        let reason = match header_fault(&bytes) {
            Some(fault) => fault,
            None => e.to_string(),
        };
        CheckpointError::Corrupt { file: path.into(), reason }
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| CheckpointError::Corrupt { file: path.into(), reason: format!("tensor `{name}`: {e}") })?;
        out.insert(name, t);
    }
    Ok(out)
}

fn load_pth(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut last_err = String::new();
    for key in PTH_KEYS {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(pth) if !pth.tensor_infos().is_empty() => {
                let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                let mut out = HashMap::new();
                for name in names {
                    let t = pth
                        .get(&name)
                        .map_err(|e| CheckpointError::Corrupt { file: path.into(), reason: format!("tensor `{name}`: {e}") })?
                        .ok_or_else(|| CheckpointError::Corrupt { file: path.into(), reason: format!("tensor `{name}` vanished") })?;
                    out.insert(name, t);
                }
                return Ok(out);
            }
            Ok(_) => {
                last_err = match key {
                    Some(k) => format!("no tensors under `{k}`"),
                    None => "no tensors at the top level".to_string(),
                }
            }
            Err(e) => last_err = e.to_string(),
        }
    }
    Err(CheckpointError::Corrupt { file: path.into(), reason: format!("no state dict found ({last_err})") }.into())
}

impl StateDict {
    /// Checks names, shapes and dtypes against the model of `cfg`, reporting the first fault
    /// of each kind in a fixed order (missing, unexpected, shape, dtype).
    pub fn validate(&self, cfg: &DitConfig) -> Result<()> {
        let expected = expected_parameters(cfg)?;
        let file = self.file.clone();
        let missing: Vec<_> = expected.iter().filter(|(n, _)| !self.tensors.contains_key(n)).collect();
        if let Some((tensor, shape)) = missing.first() {
            return Err(CheckpointError::Missing { file, tensor: tensor.clone(), expected: shape.clone(), more: and_more(missing.len()) }.into());
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut unexpected: Vec<_> = self.tensors.keys().filter(|n| !known.contains(n.as_str())).collect();
        unexpected.sort();
        if let Some(name) = unexpected.first() {
            let shape = self.tensors[*name].dims().to_vec();
            return Err(CheckpointError::Unexpected { file, tensor: (*name).clone(), shape, more: and_more(unexpected.len()) }.into());
        }
        for (name, shape) in &expected {
            let t = &self.tensors[name];
            if t.dims() != shape.as_slice() {
                return Err(CheckpointError::Shape { file, tensor: name.clone(), expected: shape.clone(), found: t.dims().to_vec() }.into());
            }
            if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                return Err(CheckpointError::DType { file, tensor: name.clone(), dtype: t.dtype() }.into());
            }
        }
        // A NaN or infinite weight makes every sample black or NaN: refuse it at load, named.
        let mut non_finite = Vec::new();
        for (name, _) in &expected {
            let count = non_finite_count(&self.tensors[name])?;
            if count > 0 {
                non_finite.push((name.clone(), count));
            }
        }
        if let Some((tensor, count)) = non_finite.first().cloned() {
            return Err(CheckpointError::NonFinite { file, tensor, count, more: and_more(non_finite.len()) }.into());
        }
        Ok(())
    }

    /// Validates, converts to the plan's weight dtype and moves to its device, as a VarBuilder
    /// for `DitMoe::new` with that plan. On a GPU each tensor is converted there, after the copy:
    /// the CPU converts one element at a time (seconds per billion parameters), the GPU in a
    /// kernel, to the same values (both round to nearest even). Under expert parallelism the
    /// other ranks' routed experts are dropped before anything moves: a model sharded because it
    /// does not fit one GPU puts only its rank's share there.
    pub fn into_var_builder(self, cfg: &DitConfig, plan: &ExecutionPlan) -> Result<VarBuilder<'static>> {
        self.validate(cfg)?;
        let local = match plan.expert_parallel.as_ref().filter(|ep| ep.world_size() > 1) {
            Some(ep) => Some(ep.local_experts(cfg.moe_config().total_experts())?),
            None => None,
        };
        let (dtype, device) = (plan.weight_dtype(), &plan.device);
        let tensors = self
            .tensors
            .into_iter()
            .filter(|(n, _)| match (&local, routed_expert_id(n)) {
                (Some(local), Some(id)) => local.contains(&id),
                _ => true,
            })
            .map(|(n, t)| {
                let t = if device.is_cpu() { t.to_dtype(dtype)? } else { t.to_device(device)?.to_dtype(dtype)? };
                Ok((n, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }
}

/// The global id of a routed expert's tensor (`blocks.<i>.moe.experts.<id>.…`, ProMoE's
/// `blocks.<i>.mlp.experts.<id>.…`); None for every other tensor, the shared experts' included.
fn routed_expert_id(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once(".experts.")?;
    rest.split('.').next()?.parse().ok()
}

/// How many elements of a float tensor are NaN or infinite, counted in place on the CPU (no
/// f32 copy of the tensor).
fn non_finite_count(t: &Tensor) -> Result<usize> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v[range].iter().filter(|x| !x.is_finite()).count(),
        Storage::Cpu(CpuStorage::BF16(v)) => v[range].iter().filter(|x| !x.is_finite()).count(),
        Storage::Cpu(CpuStorage::F16(v)) => v[range].iter().filter(|x| !x.is_finite()).count(),
        _ => {
            drop(storage);
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            v.iter().filter(|x| !x.is_finite()).count()
        }
    })
}

/// The first fault of a safetensors header, naming its tensor: an unknown dtype, a byte range
/// that does not match the tensor's shape and dtype, ranges that overlap or leave gaps (in
/// offset order), or data past the end of the file. None when the header is not even JSON (the
/// caller keeps safetensors' own message then) or has no such fault.
fn header_fault(bytes: &[u8]) -> Option<String> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let header_end = usize::try_from(len).ok()?.checked_add(8)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..header_end)?).ok()?;
    let data_len = (bytes.len() - header_end) as u64;
    let mut ranges = Vec::new();
    for (name, info) in header.iter().filter(|(n, _)| n.as_str() != "__metadata__") {
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let size: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Some(format!("tensor `{name}`: unknown dtype `{other}`")),
        };
        let shape: Option<Vec<u64>> = info.get("shape").and_then(|s| s.as_array()).map(|a| a.iter().filter_map(|d| d.as_u64()).collect());
        let offsets: Option<Vec<u64>> = info.get("data_offsets").and_then(|s| s.as_array()).map(|a| a.iter().filter_map(|d| d.as_u64()).collect());
        let (Some(shape), Some(offsets)) = (shape, offsets) else { return Some(format!("tensor `{name}`: no shape or data_offsets")) };
        let [begin, end] = offsets[..] else { return Some(format!("tensor `{name}`: data_offsets must be [begin, end]")) };
        let want = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
        if end < begin || want != Some(end - begin) {
            return Some(format!("tensor `{name}`: {dtype} {shape:?} needs {} bytes, its data_offsets [{begin}, {end}] hold {}", want.map_or("too many".into(), |w| w.to_string()), end.saturating_sub(begin)));
        }
        if end > data_len {
            return Some(format!("tensor `{name}`: data_offsets [{begin}, {end}] run past the {data_len} bytes of data (truncated file?)"));
        }
        ranges.push((begin, end, name));
    }
    ranges.sort();
    let mut expected = 0;
    for (begin, end, name) in ranges {
        if begin != expected {
            let why = if begin < expected { "overlaps the tensor before it" } else { "leaves a gap after the tensor before it" };
            return Some(format!("tensor `{name}`: data_offsets [{begin}, {end}] {why}"));
        }
        expected = end;
    }
    None
}
