//! ImageNet-style class folders: `root/<class>/<image>.{png,jpg,jpeg,webp}`.
//!
//! Mirrors torchvision's `ImageFolder` (which DiT `train.py` uses): class ids are the indices of
//! the sorted sub-folder names, items are ordered by (class, file name), and a class folder
//! with no image is an error. Display names can be supplied by a `class_names.json` (a JSON
//! array of strings, one per class in id order) in the root or in its parent, which lets
//! folder names stay filesystem-safe ("0_T-shirt_top") while names stay readable
//! ("T-shirt/top").

use super::dataset::{Dataset, Sample};
use super::preprocess::Preprocess;
use candle_core::{bail, Result};
use rand::RngCore;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

/// File name of the optional display-name list.
pub const CLASS_NAMES_FILE: &str = "class_names.json";

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// What opening a dataset does with images whose header does not decode, or links that lead
/// nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadImages {
    /// Refuse the dataset, listing every bad file.
    #[default]
    Refuse,
    /// Leave them out (listed in [`ClassFolderDataset::skipped`]).
    Skip,
}

/// Images in class folders, preprocessed on access.
#[derive(Clone, Debug)]
pub struct ClassFolderDataset {
    root: PathBuf,
    folder_names: Vec<String>,
    class_names: Vec<String>,
    items: Vec<(PathBuf, u32)>,
    preprocess: Preprocess,
    /// Files left out by [`BadImages::Skip`], with why.
    skipped: Vec<String>,
}

impl ClassFolderDataset {
    /// Scans `root` and probes every image's header once (a bad file found at step 2 of a run
    /// would end it after its first checkpoint). Fails, naming the path, when `root` is missing
    /// or not a directory, has no class folder, a class folder has no image, `class_names.json`
    /// is malformed or does not list exactly one name per folder, or (see [`BadImages`]) an
    /// image does not decode. Hidden entries (`.ipynb_checkpoints`, `.DS_Store`) are ignored.
    pub fn open(root: &Path, preprocess: Preprocess) -> Result<Self> {
        Self::open_with(root, preprocess, BadImages::Refuse)
    }

    /// [`Self::open`] with a choice for undecodable images.
    pub fn open_with(root: &Path, preprocess: Preprocess, bad_images: BadImages) -> Result<Self> {
        if !root.is_dir() {
            bail!(
                "dataset root {} does not exist or is not a directory",
                root.display()
            );
        }
        let mut folder_names = Vec::new();
        for entry in read_dir(root)? {
            if entry.is_dir() && !is_hidden(&entry) {
                folder_names.push(utf8_name(&entry)?);
            }
        }
        if folder_names.is_empty() {
            bail!(
                "dataset root {} contains no class folders (expected root/<class>/<image>)",
                root.display()
            );
        }
        folder_names.sort();

        let mut items = Vec::new();
        let mut bad = Vec::new();
        for (label, folder) in folder_names.iter().enumerate() {
            let dir = root.join(folder);
            let mut files: Vec<(OsString, PathBuf)> = Vec::new();
            for p in read_dir(&dir)? {
                if is_hidden(&p) || !has_image_extension(&p) {
                    continue;
                }
                match probe(&p) {
                    Ok(()) => files.extend(p.file_name().map(|n| (n.to_owned(), p.clone()))),
                    Err(why) => bad.push(format!("{}: {why}", p.display())),
                }
            }
            if files.is_empty() {
                bail!(
                    "class folder {} contains no .png/.jpg/.jpeg/.webp images",
                    dir.display()
                );
            }
            files.sort();
            items.extend(files.into_iter().map(|(_, p)| (p, label as u32)));
        }

        let class_names = match find_class_names_file(root) {
            Some(path) => {
                let names = read_class_names(&path)?;
                if names.len() != folder_names.len() {
                    bail!(
                        "{} lists {} class names but {} has {} class folders",
                        path.display(),
                        names.len(),
                        root.display(),
                        folder_names.len()
                    );
                }
                names
            }
            None => folder_names.clone(),
        };
        bad.sort();
        if !bad.is_empty() && bad_images == BadImages::Refuse {
            bail!(
                "{}: {} image(s) cannot be read (pass --skip-bad-images to leave them out):\n  {}",
                root.display(),
                bad.len(),
                bad.join("\n  ")
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            folder_names,
            class_names,
            items,
            preprocess,
            skipped: bad,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sorted class folder names; index = class id.
    pub fn folder_names(&self) -> &[String] {
        &self.folder_names
    }

    /// Every image with its class id, in dataset order.
    pub fn items(&self) -> &[(PathBuf, u32)] {
        &self.items
    }

    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// The files [`BadImages::Skip`] left out, each with why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }
}

/// Whether the header of an image decodes (its format and size), without decoding the pixels.
/// A link that leads nowhere is reported as such.
fn probe(path: &Path) -> std::result::Result<(), String> {
    if !path.is_file() {
        return Err(match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => "a link to nothing".into(),
            _ => "not a regular file".into(),
        });
    }
    let reader = image::ImageReader::open(path).map_err(|e| e.to_string())?;
    let reader = reader.with_guessed_format().map_err(|e| e.to_string())?;
    reader.into_dimensions().map(|_| ()).map_err(|e| e.to_string())
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

impl Dataset for ClassFolderDataset {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.preprocess.sample_shape()
    }

    fn class_names(&self) -> &[String] {
        &self.class_names
    }

    fn get(&self, index: usize, rng: &mut dyn RngCore) -> Result<Sample> {
        let Some((path, label)) = self.items.get(index) else {
            bail!(
                "index {index} out of range for {} images in {}",
                self.items.len(),
                self.root.display()
            );
        };
        Ok(Sample {
            data: self.preprocess.load(path, rng)?,
            label: *label,
        })
    }
}

/// Reads a `class_names.json` list of display names.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{} is not a JSON array of class names: {e}",
            path.display()
        ))
    })
}

/// Writes a `class_names.json` list of display names.
pub fn write_class_names(path: &Path, names: &[String]) -> Result<()> {
    let json = serde_json::to_string_pretty(names)
        .map_err(|e| candle_core::Error::Msg(format!("cannot serialise class names: {e}")))?;
    fs::write(path, json + "\n")
        .map_err(|e| candle_core::Error::Msg(format!("cannot write {}: {e}", path.display())))
}

/// `root/class_names.json`, else the one beside `root` (a `train/`/`test/` split shares one).
fn find_class_names_file(root: &Path) -> Option<PathBuf> {
    std::iter::once(root.join(CLASS_NAMES_FILE))
        .chain(root.parent().map(|p| p.join(CLASS_NAMES_FILE)))
        .find(|p| p.is_file())
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let err =
        |e: std::io::Error| candle_core::Error::Msg(format!("cannot list {}: {e}", dir.display()));
    fs::read_dir(dir)
        .map_err(err)?
        .map(|entry| entry.map(|e| e.path()).map_err(err))
        .collect()
}

fn utf8_name(path: &Path) -> Result<String> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(name) => Ok(name.to_string()),
        None => bail!("class folder name {} is not valid UTF-8", path.display()),
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}
