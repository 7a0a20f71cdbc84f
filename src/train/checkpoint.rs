//! Training checkpoints: `<out>/checkpoints/step-<8 digits>/` holding `model.safetensors`,
//! `ema.safetensors`, `optim.safetensors` (AdamW moments) and `state.json` (step, data-loader
//! position, seed, and the byte size of every file). Each file is written atomically
//! (temp + fsync + rename) and `state.json` goes last, so a folder without a readable
//! `state.json`, or whose files do not match the recorded sizes or fail to parse, is an
//! interrupted or damaged save: resume names it in a warning and falls back to the one before.
//! (The official `train.py` saves model, EMA, optimizer and args with `torch.save` every
//! `ckpt_every` steps; RNG state needs no saving here, see `rng.rs`.)
use crate::checkpoint::{write_atomic, write_safetensors_atomic};
use crate::data::LoaderState;
use candle_core::{bail, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const STATE_FILE: &str = "state.json";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the data stream continues.
    pub loader: LoaderState,
    pub seed: u64,
    /// Byte size of each tensor file, to detect truncation before parsing.
    pub files: BTreeMap<String, u64>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub model: HashMap<String, Tensor>,
    pub ema: HashMap<String, Tensor>,
    pub optim: HashMap<String, Tensor>,
}

/// What one save writes.
pub struct SaveRequest<'a> {
    pub step: u64,
    pub loader: LoaderState,
    pub seed: u64,
    pub model: &'a [(String, Tensor)],
    pub ema: &'a [(String, Tensor)],
    pub optim: &'a [(String, Tensor)],
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn io(path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

/// Writes checkpoint `req.step` under `root` and then deletes all but the newest `keep_last`
/// checkpoint folders. Returns the new folder.
pub fn save(root: &Path, req: &SaveRequest, keep_last: usize) -> Result<PathBuf> {
    let dir = root.join(format!("step-{:08}", req.step));
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    // A stale state.json from an earlier (abandoned) save of this step must not vouch for the
    // new files while they are being written.
    let state_path = dir.join(STATE_FILE);
    if state_path.exists() {
        std::fs::remove_file(&state_path).map_err(|e| io(&state_path, e))?;
    }
    let mut files = BTreeMap::new();
    for (name, tensors) in [(MODEL_FILE, req.model), (EMA_FILE, req.ema), (OPTIM_FILE, req.optim)] {
        let path = dir.join(name);
        write_safetensors_atomic(&path, tensors)?;
        files.insert(name.to_string(), std::fs::metadata(&path).map_err(|e| io(&path, e))?.len());
    }
    let state = CheckpointState { step: req.step, loader: req.loader, seed: req.seed, files };
    write_atomic(&state_path, serde_json::to_string_pretty(&state).expect("state serialises").as_bytes())?;
    for (_, old) in list(root)?.iter().rev().skip(keep_last) {
        std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
    }
    // what a save killed mid-write left in the checkpoints that remain
    for (_, kept) in list(root)? {
        crate::checkpoint::remove_stale_temps_in(&kept);
    }
    Ok(dir)
}

/// Checkpoint folders under `root`, oldest first, with their step (parsed from the name).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
        let path = entry.map_err(|e| io(root, e))?.path();
        let step = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse::<u64>().ok());
        if let (Some(step), true) = (step, path.is_dir()) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Loads and validates one checkpoint folder; an error names the damaged file.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", state_path.display())))?;
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(name);
        let want = state.files.get(name).copied();
        let have = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
        match want {
            Some(w) if w != have => bail!("{}: {have} bytes, the checkpoint recorded {w} (truncated or replaced)", path.display()),
            None => bail!("{}: the checkpoint's {STATE_FILE} does not list this file", path.display()),
            Some(_) => {}
        }
        candle_core::safetensors::load(&path, device).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    };
    let (model, ema, optim) = (read(MODEL_FILE)?, read(EMA_FILE)?, read(OPTIM_FILE)?);
    Ok(Checkpoint { dir: dir.to_path_buf(), state, model, ema, optim })
}

/// The newest checkpoint under `root` that loads, plus one warning per newer one that did
/// not (each naming the damaged file). `None` when there is no usable checkpoint.
pub fn load_latest(root: &Path, device: &Device) -> Result<(Option<Checkpoint>, Vec<String>)> {
    let mut warnings = Vec::new();
    for (_, dir) in list(root)?.into_iter().rev() {
        match load(&dir, device) {
            Ok(ckpt) => return Ok((Some(ckpt), warnings)),
            Err(e) => warnings.push(format!("skipping damaged checkpoint {}: {e}", dir.display())),
        }
    }
    Ok((None, warnings))
}
