//! The tiny training setup the trainer tests share: a 2-block model and three classes of
//! small grayscale images.
use super::{scratch_dir, Scratch};
use std::path::Path;

pub const MODEL: &str = r#"{"input_size":8,"patch_size":2,"in_channels":1,"hidden_size":32,"depth":2,"num_heads":2,
"mlp_ratio":2,"class_dropout_prob":0.1,"num_classes":3,"num_experts":4,"num_experts_per_tok":2,
"learn_sigma":false,"n_shared_experts":1}"#;

/// 3 classes × 8 grayscale 6×6 images (padded to the model's 8×8): a horizontal ramp, a
/// vertical ramp, and flat grey, each with its own per-image jitter.
pub fn write_dataset(root: &Path) {
    for class in 0..3u32 {
        let dir = root.join(format!("class{class}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..8u32 {
            let img = image::GrayImage::from_fn(6, 6, |x, y| {
                let base = match class {
                    0 => x * 40,
                    1 => y * 40,
                    _ => 128,
                };
                image::Luma([(base + (i * 7 + x * 3 + y * 5) % 20) as u8])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// A scratch folder `tag` holding the dataset in `data/` and [`MODEL`] as `model.json`.
pub fn scratch_training_folder(tag: &str) -> Scratch {
    let dir = scratch_dir(tag);
    write_dataset(&dir.join("data"));
    std::fs::write(dir.join("model.json"), MODEL).unwrap();
    dir
}
