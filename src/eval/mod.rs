//! `ditmoe eval`: a small CNN classifier trained on the real data scores generated samples
//! (class accuracy, Fréchet distance of its features).
pub mod classifier;
pub mod fit;
pub mod frechet;
pub mod images;
pub mod report;

pub use classifier::{Classifier, ClassifierConfig};
pub use report::{EvalReport, SampleOptions};
