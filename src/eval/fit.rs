//! Training the scoring classifier: AdamW (lr 1e-3), cross-entropy, shuffled mini-batches from
//! a seeded generator, a few epochs; writes `model.safetensors` + `classifier.json`.
use super::classifier::{Classifier, ClassifierConfig};
use crate::checkpoint::{write_atomic, write_safetensors_atomic};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{loss::cross_entropy, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

pub struct FitOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Re-draws every parameter from the seeded generator (candle's CPU generator cannot be
/// seeded, so VarMap's own init would make the classifier differ run to run): weights
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's default `kaiming_uniform_(a=sqrt(5))`,
/// biases zero.
fn seeded_init(varmap: &VarMap, rng: &mut rand::rngs::StdRng) -> Result<()> {
    use rand::Rng;
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let values: Vec<f32> = if dims.len() >= 2 {
            let bound = 1.0 / (dims[1..].iter().product::<usize>() as f64).sqrt();
            (0..var.elem_count()).map(|_| rng.random_range(-bound..bound) as f32).collect()
        } else {
            vec![0.0; var.elem_count()]
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// Accuracy of `clf` on (x, labels).
pub fn accuracy(clf: &Classifier, x: &Tensor, labels: &[u32]) -> Result<f64> {
    let (pred, _) = clf.predict(x, 500)?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64)
}

/// Trains on (x, labels), reports progress through `on_epoch(epoch, mean loss, test accuracy)`,
/// and writes the classifier folder `out`. Returns the final test accuracy.
pub fn fit(
    train: (&Tensor, &[u32]),
    test: (&Tensor, &[u32]),
    num_classes: usize,
    opts: &FitOptions,
    out: &Path,
    on_epoch: &mut dyn FnMut(usize, f32, f64),
) -> Result<f64> {
    let device = train.0.device().clone();
    let varmap = VarMap::new();
    let clf = Classifier::new(num_classes, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    seeded_init(&varmap, &mut rng)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() })?;
    let n = train.1.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut test_acc = 0.0;
    for epoch in 0..opts.epochs {
        order.shuffle(&mut rng);
        let mut losses = Vec::new();
        for chunk in order.chunks(opts.batch) {
            let idx = Tensor::new(chunk, &device)?;
            let xb = train.0.index_select(&idx, 0)?;
            let yb = Tensor::new(chunk.iter().map(|&i| train.1[i as usize]).collect::<Vec<_>>(), &device)?;
            let loss = cross_entropy(&clf.forward(&xb)?, &yb)?;
            opt.backward_step(&loss)?;
            losses.push(loss.to_scalar::<f32>()?);
        }
        test_acc = accuracy(&clf, test.0, test.1)?;
        on_epoch(epoch + 1, losses.iter().sum::<f32>() / losses.len() as f32, test_acc);
    }
    std::fs::create_dir_all(out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))?;
    let mut tensors: Vec<(String, Tensor)> = varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors_atomic(&out.join("model.safetensors"), &tensors)?;
    let cfg = ClassifierConfig { num_classes, test_accuracy: test_acc };
    write_atomic(&out.join("classifier.json"), serde_json::to_string_pretty(&cfg).expect("serialises").as_bytes())?;
    Ok(test_acc)
}

/// Loads a classifier folder written by [`fit`].
pub fn load(dir: &Path, device: &Device) -> Result<(Classifier, ClassifierConfig)> {
    let cfg_path = dir.join("classifier.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let cfg: ClassifierConfig = serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let w = dir.join("model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&w], DType::F32, device)? };
    Ok((Classifier::new(cfg.num_classes, vb)?, cfg))
}

/// Per-class accuracy: `out[c]` = fraction of items labelled c predicted as c.
pub fn per_class_accuracy(pred: &[u32], labels: &[u32], num_classes: usize) -> Vec<f64> {
    let mut hit = vec![0usize; num_classes];
    let mut total = vec![0usize; num_classes];
    for (p, l) in pred.iter().zip(labels) {
        total[*l as usize] += 1;
        hit[*l as usize] += usize::from(p == l);
    }
    hit.iter().zip(&total).map(|(h, t)| if *t == 0 { 0.0 } else { *h as f64 / *t as f64 }).collect()
}

