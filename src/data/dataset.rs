//! The interface between sample sources (image folders, latent shards) and the batch loader.

use candle_core::Result;
use rand::RngCore;

/// One preprocessed training example.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// CHW values, `sample_shape().iter().product()` of them.
    pub data: Vec<f32>,
    /// Class id in `0..num_classes()`.
    pub label: u32,
}

/// A random-access source of samples that all share one shape.
///
/// `get` may be called concurrently from the loader's worker threads. Any randomness (such as
/// the horizontal flip) must come from `rng` only: the loader seeds it from the
/// (seed, epoch, position) of the request, which is what makes batches independent of the
/// number of threads and reproducible after a resume.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[C, H, W]` of every sample.
    fn sample_shape(&self) -> [usize; 3];

    /// Display name of each class id.
    fn class_names(&self) -> &[String];

    fn num_classes(&self) -> usize {
        self.class_names().len()
    }

    /// Sample `index`; an error names the file it came from.
    fn get(&self, index: usize, rng: &mut dyn RngCore) -> Result<Sample>;
}
