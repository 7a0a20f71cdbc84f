//! Whole class-folder splits as one tensor, for classifier training and scoring.
use crate::data::{ClassFolderDataset, Dataset, Preprocess};
use candle_core::{Device, Result, Tensor};
use std::path::Path;

/// Every image of `root` as (N, 1, side, side) in [-1, 1] (the training preprocessing, no
/// flip) with its labels, plus the class display names.
pub fn load_split(root: &Path, side: usize, device: &Device) -> Result<(Tensor, Vec<u32>, Vec<String>)> {
    let ds = ClassFolderDataset::open(root, Preprocess::new(side, 1)?.with_random_flip(false))?;
    // The flip is off, so the generator is never drawn from.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let (mut data, mut labels) = (Vec::with_capacity(ds.len() * side * side), Vec::with_capacity(ds.len()));
    for i in 0..ds.len() {
        let s = ds.get(i, &mut rng)?;
        data.extend(s.data);
        labels.push(s.label);
    }
    let x = Tensor::from_vec(data, (labels.len(), 1, side, side), device)?;
    Ok((x, labels, ds.class_names().to_vec()))
}

/// Centre crop of a (N, C, H, W) batch to `side`², undoing the training-time padding.
pub fn center_crop(x: &Tensor, side: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.narrow(2, (h - side) / 2, side)?.narrow(3, (w - side) / 2, side)
}
