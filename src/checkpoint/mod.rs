//! Reading and writing model weights: official checkpoints (safetensors or PyTorch pickles),
//! model folders (`config.json` + `model.safetensors`), strict name/shape/dtype validation
//! with errors that name the file and tensor, and atomic writes.
pub mod atomic;
pub mod error;
pub mod load;
pub mod model_dir;
pub mod shapes;

pub use atomic::{remove_stale_temps_in, write_atomic, write_safetensors_atomic};
pub use error::CheckpointError;
pub use load::{load_state_dict, StateDict};
pub use model_dir::ModelDir;
pub use shapes::{expected_parameters, ShapeRecorder};
