//! A small CNN classifier for 28×28 grayscale images (Fashion-MNIST), used only to score
//! generated samples: its accuracy on them, and the Fréchet distance between its penultimate
//! features of generated and real images (FID's recipe with a domain-appropriate network in
//! place of Inception, which knows nothing of 28×28 clothing thumbnails).
//!
//! conv 3×3 (1→32) · ReLU · maxpool 2 → conv 3×3 (32→64) · ReLU · maxpool 2 → linear
//! 3136→128 · ReLU (the features) → linear 128→classes.
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

pub const SIDE: usize = 28;
pub const FEATURES: usize = 128;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub num_classes: usize,
    /// Accuracy on the test split when it was trained (recorded for the report).
    pub test_accuracy: f64,
}

pub struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: Linear,
    head: Linear,
}

impl Classifier {
    pub fn new(num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let pad = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self {
            conv1: conv2d(1, 32, 3, pad, vb.pp("conv1"))?,
            conv2: conv2d(32, 64, 3, pad, vb.pp("conv2"))?,
            fc: linear(64 * (SIDE / 4) * (SIDE / 4), FEATURES, vb.pp("fc"))?,
            head: linear(FEATURES, num_classes, vb.pp("head"))?,
        })
    }

    /// x: (N, 1, 28, 28) in [-1, 1] -> penultimate features (N, 128).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(x)?.relu()?.max_pool2d(2)?;
        let h = self.conv2.forward(&h)?.relu()?.max_pool2d(2)?;
        self.fc.forward(&h.flatten_from(1)?)?.relu()
    }

    /// Logits (N, classes).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.features(x)?)
    }

    /// Predicted classes and features, in batches of `batch`.
    pub fn predict(&self, x: &Tensor, batch: usize) -> Result<(Vec<u32>, Tensor)> {
        let n = x.dim(0)?;
        let (mut preds, mut feats) = (Vec::with_capacity(n), Vec::new());
        for start in (0..n).step_by(batch) {
            let xb = x.narrow(0, start, batch.min(n - start))?;
            let f = self.features(&xb)?;
            preds.extend(self.head.forward(&f)?.argmax(D::Minus1)?.to_vec1::<u32>()?);
            feats.push(f);
        }
        Ok((preds, Tensor::cat(&feats, 0)?))
    }
}
