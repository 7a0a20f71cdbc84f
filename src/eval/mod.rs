//! `ditmoe eval`: a small CNN classifier trained on the real data scores generated samples
//! (class accuracy; Fréchet distance of its features, overall, against the real-vs-real floor
//! and per class; k-NN precision and recall), alone or over a sweep of guidance scales and
//! step counts.
pub mod classifier;
pub mod fit;
pub mod frechet;
pub mod images;
pub mod precision_recall;
pub mod reference;
pub mod report;
pub mod sweep;

pub use classifier::{Classifier, ClassifierConfig};
pub use precision_recall::{precision_recall, PrecisionRecall};
pub use reference::{RealReference, RealSubsets};
pub use report::{EvalReport, SampleOptions};
