//! A run folder belongs to one run. Training into a folder that already holds a run (its log,
//! checkpoints or exported EMA model) would truncate that run's log, overwrite its EMA model and
//! prune checkpoints by step number across both runs; so a new run refuses such a folder unless
//! told to move the old run aside, and a resumed one continues it.
use candle_core::{bail, Result};
use std::path::{Path, PathBuf};

/// How a training run treats its run folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStart {
    /// A new run: the folder must not hold one.
    New,
    /// Continue the run in the folder from its newest valid checkpoint (a new run if there is
    /// none, which the trainer reports).
    Resume,
    /// A new run; a run already in the folder is moved aside to `<folder>.old-<n>` first.
    Overwrite,
}

/// What `out` holds of an earlier run: the log, the checkpoints folder (when not empty) and the
/// exported EMA model, by name.
pub fn earlier_run(out: &Path) -> Vec<&'static str> {
    let non_empty = |p: PathBuf| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
    let mut found = Vec::new();
    if out.join(super::LOG_FILE).is_file() {
        found.push(super::LOG_FILE);
    }
    if non_empty(super::checkpoint::checkpoints_dir(out)) {
        found.push("checkpoints/");
    }
    if out.join("ema").is_dir() {
        found.push("ema/");
    }
    found
}

/// Readies `out` for a run started as `start`. Returns where an earlier run was moved to
/// ([`RunStart::Overwrite`]).
pub fn prepare(out: &Path, start: RunStart) -> Result<Option<PathBuf>> {
    let found = earlier_run(out);
    if found.is_empty() || start == RunStart::Resume {
        return Ok(None);
    }
    if start == RunStart::New {
        bail!(
            "{}: the folder holds a run ({}); continue it with --resume, train into another --out, or pass --overwrite to move it aside",
            out.display(),
            found.join(", ")
        )
    }
    let aside = (1..).map(|n| PathBuf::from(format!("{}.old-{n}", out.display()))).find(|p| !p.exists()).expect("a free name");
    std::fs::rename(out, &aside).map_err(|e| candle_core::Error::Msg(format!("moving the run in {} aside to {}: {e}", out.display(), aside.display())))?;
    Ok(Some(aside))
}
