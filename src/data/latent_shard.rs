//! Pre-encoded latent shards: safetensors files holding `latents` `[N, C, H, W]` f32 and
//! `labels` `[N]` i64, as written by `ditmoe encode`.
//!
//! Training on cached VAE latents (as fast-DiT's `extract_features.py` does) skips the encoder
//! on every step. Shards are memory-mapped so a dataset larger than RAM (ImageNet-256 latents
//! are ~21 GB) is paged in on demand; only the labels are read up front.

use super::dataset::{Dataset, Sample};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Tensor};
use rand::RngCore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensor name of the latents in a shard.
pub const LATENTS_KEY: &str = "latents";
/// Tensor name of the class labels in a shard.
pub const LABELS_KEY: &str = "labels";

struct Shard {
    path: PathBuf,
    tensors: MmapedSafetensors,
    labels: Vec<u32>,
}

/// The concatenation of one or more latent shards, in the order given.
pub struct LatentShardDataset {
    shards: Vec<Shard>,
    /// `starts[i]` = global index of shard i's first sample; one extra entry holds the total.
    starts: Vec<usize>,
    shape: [usize; 3],
    class_names: Vec<String>,
}

impl LatentShardDataset {
    /// Maps `paths`; every shard must have the same latent shape, and every label must be a
    /// valid index into `class_names`. Errors name the offending file.
    pub fn open<P: AsRef<Path>>(paths: &[P], class_names: Vec<String>) -> Result<Self> {
        if paths.is_empty() {
            bail!("no latent shard files given");
        }
        let mut shards = Vec::with_capacity(paths.len());
        let mut starts = vec![0];
        let mut shape: Option<[usize; 3]> = None;
        for path in paths {
            let path = path.as_ref();
            let shard = open_shard(path, class_names.len())?;
            let dims = shard_shape(&shard)?;
            match shape {
                Some(s) if s != dims => bail!(
                    "latent shard {} has sample shape {dims:?}, earlier shards have {s:?}",
                    path.display()
                ),
                _ => shape = Some(dims),
            }
            starts.push(starts[starts.len() - 1] + shard.labels.len());
            shards.push(shard);
        }
        Ok(Self {
            shards,
            starts,
            shape: shape.unwrap_or_default(),
            class_names,
        })
    }

    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }
}

impl Dataset for LatentShardDataset {
    fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Latents are used as stored: no augmentation, so `rng` is not drawn from.
    fn get(&self, index: usize, _rng: &mut dyn RngCore) -> Result<Sample> {
        if index >= self.len() {
            bail!("index {index} out of range for {} latents", self.len());
        }
        let shard_idx = self.starts.partition_point(|&s| s <= index) - 1;
        let shard = &self.shards[shard_idx];
        let local = index - self.starts[shard_idx];
        let per = self.shape.iter().product::<usize>();
        let view = shard.tensors.get(LATENTS_KEY)?;
        // Byte slicing rather than a zero-copy cast: the mapped data need not be 4-aligned.
        let bytes = &view.data()[local * per * 4..(local + 1) * per * 4];
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Sample {
            data,
            label: shard.labels[local],
        })
    }
}

fn open_shard(path: &Path, num_classes: usize) -> Result<Shard> {
    let named = |e: candle_core::Error| {
        candle_core::Error::Msg(format!("latent shard {}: {e}", path.display()))
    };
    // SAFETY: the mapping is only read. `write_latent_shard` replaces shards by rename, never
    // in place, so a shard being rewritten while mapped keeps its old contents alive.
    let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(named)?;
    let labels = tensors.load(LABELS_KEY, &Device::Cpu).map_err(named)?;
    if labels.dtype() != DType::I64 || labels.rank() != 1 {
        bail!(
            "latent shard {}: `{LABELS_KEY}` must be a rank-1 i64 tensor, got {:?} {:?}",
            path.display(),
            labels.dtype(),
            labels.dims()
        );
    }
    let labels = labels
        .to_vec1::<i64>()?
        .into_iter()
        .map(|l| match u32::try_from(l) {
            Ok(l) if (l as usize) < num_classes => Ok(l),
            _ => bail!(
                "latent shard {}: label {l} is outside 0..{num_classes}",
                path.display()
            ),
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok(Shard {
        path: path.to_path_buf(),
        tensors,
        labels,
    })
}

fn shard_shape(shard: &Shard) -> Result<[usize; 3]> {
    let path = shard.path.display();
    let view = shard
        .tensors
        .get(LATENTS_KEY)
        .map_err(|e| candle_core::Error::Msg(format!("latent shard {path}: {e}")))?;
    let dtype = DType::try_from(view.dtype())
        .map_err(|e| candle_core::Error::Msg(format!("latent shard {path}: {e}")))?;
    if dtype != DType::F32 {
        bail!("latent shard {path}: `{LATENTS_KEY}` must be f32, got {dtype:?}");
    }
    match *view.shape() {
        [n, c, h, w] if n == shard.labels.len() => Ok([c, h, w]),
        _ => bail!(
            "latent shard {path}: `{LATENTS_KEY}` has shape {:?}, expected [{}, C, H, W] to match `{LABELS_KEY}`",
            view.shape(),
            shard.labels.len()
        ),
    }
}

/// Writes `latents` `[N, C, H, W]` (stored as f32) and integer `labels` `[N]` (stored as i64)
/// to `path` via a temporary file in the same directory and a rename, so readers (and mapped
/// shards) never observe a half-written file.
pub fn write_latent_shard(path: &Path, latents: &Tensor, labels: &Tensor) -> Result<()> {
    let (n, ..) = latents.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "latent shard {}: latents must be [N, C, H, W], got {:?}",
            path.display(),
            latents.dims()
        ))
    })?;
    if !labels.dtype().is_int() || labels.dims() != [n] {
        bail!(
            "latent shard {}: labels must be an integer tensor of shape [{n}], got {:?} {:?}",
            path.display(),
            labels.dtype(),
            labels.dims()
        );
    }
    let latents = latents.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let labels = labels.to_device(&Device::Cpu)?.to_dtype(DType::I64)?;
    if let Some(bad) = labels.to_vec1::<i64>()?.into_iter().find(|&l| l < 0) {
        bail!("latent shard {}: negative label {bad}", path.display());
    }
    let file_name = path.file_name().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "latent shard path {} has no file name",
            path.display()
        ))
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let tensors = HashMap::from([(LATENTS_KEY, latents), (LABELS_KEY, labels)]);
    let written = candle_core::safetensors::save(&tensors, &tmp)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(candle_core::Error::from));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write latent shard {}: {e}", path.display());
    }
    Ok(())
}
