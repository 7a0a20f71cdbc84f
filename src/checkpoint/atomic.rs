//! Atomic file writes: write a temp file in the destination folder, fsync, rename. A crash
//! or a full disk leaves either the old file or the new one, never half of one.
use candle_core::{Result, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn io_err(path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        Ok(())
    })();
    result.map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        io_err(path, e)
    })
}

/// Serialises named tensors as safetensors and writes them atomically.
pub fn write_safetensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, None).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}
