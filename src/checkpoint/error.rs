//! Checkpoint errors; each names the file and, where there is one, the tensor at fault.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{file}: cannot read checkpoint: {reason}")]
    Unreadable { file: PathBuf, reason: String },
    #[error("{file}: corrupt or truncated checkpoint: {reason}")]
    Corrupt { file: PathBuf, reason: String },
    #[error("{file}: missing tensor `{tensor}` (expected shape {expected:?}){more}")]
    Missing { file: PathBuf, tensor: String, expected: Vec<usize>, more: String },
    #[error("{file}: unexpected tensor `{tensor}` (shape {shape:?}) not used by this config{more}")]
    Unexpected { file: PathBuf, tensor: String, shape: Vec<usize>, more: String },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, the config expects {expected:?}")]
    Shape { file: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{file}: tensor `{tensor}` has dtype {dtype:?}; weights must be f32, bf16 or f16")]
    DType { file: PathBuf, tensor: String, dtype: candle_core::DType },
    #[error("{file}: tensor `{tensor}` holds {count} non-finite values (NaN or infinity){more}")]
    NonFinite { file: PathBuf, tensor: String, count: usize, more: String },
}

impl From<CheckpointError> for candle_core::Error {
    fn from(e: CheckpointError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// " (and N more)" when a list of faults has more than the one reported.
pub(crate) fn and_more(n: usize) -> String {
    if n > 1 {
        format!(" (and {} more)", n - 1)
    } else {
        String::new()
    }
}
