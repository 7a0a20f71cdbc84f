//! Picks the training dataset `TrainConfig::data` points at and checks it fits the model.
use super::pad::PadDataset;
use super::TrainConfig;
use crate::config::DitConfig;
use crate::data::{read_class_names, BadImages, ClassFolderDataset, Dataset, LatentShardDataset, Preprocess, CLASS_NAMES_FILE};
use candle_core::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Shard files at `path`: the file itself when it is a `.safetensors`, or the `.safetensors`
/// files of a folder that has no sub-folders (a class-folder root has only sub-folders).
fn shard_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let is_shard = |p: &Path| p.extension().is_some_and(|e| e == "safetensors");
    if path.is_file() {
        return Ok(is_shard(path).then(|| vec![path.to_path_buf()]));
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let mut shards: Vec<PathBuf> = entries.iter().filter(|p| p.is_file() && is_shard(p)).cloned().collect();
    if shards.is_empty() || entries.iter().any(|p| p.is_dir()) {
        return Ok(None);
    }
    shards.sort();
    Ok(Some(shards))
}

/// The dataset for `cfg.data`, with samples shaped `[in_channels, input_size, input_size]`
/// and `num_classes` classes, or an error naming the mismatch.
pub fn open_dataset(cfg: &TrainConfig, model: &DitConfig) -> Result<Arc<dyn Dataset>> {
    let root = &cfg.data;
    if !root.exists() {
        bail!("data root {} does not exist", root.display());
    }
    if root.is_dir() && std::fs::read_dir(root).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", root.display())))?.next().is_none() {
        bail!("data folder {} is empty (expected class folders, or .safetensors latent shards)", root.display());
    }
    let ds: Arc<dyn Dataset> = match shard_files(root)? {
        Some(shards) => {
            let dir = if root.is_dir() { root.clone() } else { root.parent().unwrap_or(Path::new(".")).to_path_buf() };
            let names_path = dir.join(CLASS_NAMES_FILE);
            let names = if names_path.exists() {
                read_class_names(&names_path)?
            } else {
                (0..model.num_classes).map(|c| c.to_string()).collect()
            };
            Arc::new(LatentShardDataset::open(&shards, names)?)
        }
        None => {
            let size = cfg.image_size.unwrap_or(model.input_size);
            if size > model.input_size {
                bail!("image_size {size} is larger than the model's input_size {}", model.input_size);
            }
            let pre = Preprocess::new(size, model.in_channels)?.with_random_flip(cfg.random_flip);
            let bad_images = if cfg.skip_bad_images { BadImages::Skip } else { BadImages::Refuse };
            let folders = ClassFolderDataset::open_with(root, pre, bad_images)?;
            if !folders.skipped().is_empty() {
                eprintln!("warning: left out {} image(s) that cannot be read:\n  {}", folders.skipped().len(), folders.skipped().join("\n  "));
            }
            let folders: Arc<dyn Dataset> = Arc::new(folders);
            if size < model.input_size {
                Arc::new(PadDataset::new(folders, model.input_size)?)
            } else {
                folders
            }
        }
    };
    let want = [model.in_channels, model.input_size, model.input_size];
    if ds.sample_shape() != want {
        bail!("{}: samples have shape {:?}, the model expects {want:?}", root.display(), ds.sample_shape());
    }
    if ds.num_classes() != model.num_classes {
        bail!("{}: {} classes, the model has num_classes {}", root.display(), ds.num_classes(), model.num_classes);
    }
    Ok(ds)
}
