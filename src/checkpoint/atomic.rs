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

/// Removes the temp files of earlier writes of `path` that never completed (a process killed
/// mid-write leaves `.{name}.{pid}.tmp`): once `path` itself is written, they hold nothing of
/// value, and a checkpoint's can be as large as the model.
fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    remove_temps(dir, Some(&name.to_string_lossy()));
}

/// Removes every temp file that [`write_atomic`] leaves when killed mid-write in `dir` (for a
/// folder whose writes are all complete, e.g. the checkpoints of a run once a newer one is saved).
pub fn remove_stale_temps_in(dir: &Path) {
    remove_temps(dir, None);
}

/// Temp files `.{name}.{pid}.tmp` in `dir`, of one file name or of any.
fn remove_temps(dir: &Path, name: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix('.').and_then(|r| r.strip_suffix(".tmp")) else { continue };
        let Some((file, pid)) = rest.rsplit_once('.') else { continue };
        if name.is_none_or(|want| want == file) && !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
            std::fs::remove_file(e.path()).ok();
        }
    }
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
        remove_stale_temps(path);
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
