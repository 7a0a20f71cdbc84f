//! Training data: ImageNet-style class folders with the official DiT preprocessing,
//! pre-encoded latent shards, a deterministic resumable multi-threaded batch loader, and the
//! Fashion-MNIST converter.

mod class_folder;
mod dataset;
mod fashion_mnist;
mod latent_shard;
mod loader;
mod preprocess;
mod resample;

pub use class_folder::{read_class_names, write_class_names, BadImages, ClassFolderDataset, CLASS_NAMES_FILE};
pub use dataset::{Dataset, Sample};
pub use fashion_mnist::{
    convert_fashion_mnist, fashion_mnist_folder_name, FashionMnistSummary, FASHION_MNIST_CLASSES,
};
pub use latent_shard::{write_latent_shard, LatentShardDataset, LABELS_KEY, LATENTS_KEY};
pub use loader::{Batch, DataLoader, LoaderConfig, LoaderState};
pub use preprocess::{center_crop_arr, decode_image, to_channels, Preprocess};
pub use resample::{Filter, U8Image};
