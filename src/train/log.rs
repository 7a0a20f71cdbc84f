//! The training log: one JSON object per logged step in `<out>/log.jsonl`, with the per-layer
//! per-expert token counts so load imbalance can be plotted.
use candle_core::Result;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const LOG_FILE: &str = "log.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    /// The model's own loss (diffusion, or next-token cross-entropy; mean over the global
    /// batch), without the balance loss.
    pub loss: f32,
    /// The balance losses (coefficients included): summed over DiT layers; a language
    /// model's model-level load-balancing loss.
    pub aux: f32,
    /// Sum over MoE layers of ProMoE's routing contrastive loss (lambda included); 0 with the
    /// top-k router. Absent in logs written before the field existed.
    #[serde(default)]
    pub contrastive: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f64,
    /// Optimizer steps per second over the steps since the previous log line.
    pub steps_per_sec: f64,
    /// Tokens routed to each expert during the step: `[layer][expert]`.
    pub expert_counts: Vec<Vec<usize>>,
}

pub struct JsonlLog {
    path: PathBuf,
    file: std::fs::File,
}

fn io(path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

impl JsonlLog {
    /// Opens `<out>/log.jsonl` for appending after dropping lines past `keep_through_step`:
    /// a resumed run rewrites the steps after its checkpoint, so they must not appear twice.
    pub fn open(out: &Path, keep_through_step: u64) -> Result<Self> {
        let path = out.join(LOG_FILE);
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= keep_through_step))
                .map(|l| format!("{l}\n"))
                .collect();
            crate::checkpoint::write_atomic(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io(&path, e))?;
        Ok(Self { path, file })
    }

    pub fn write(&mut self, rec: &StepLog) -> Result<()> {
        let line = serde_json::to_string(rec).expect("log serialises");
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| io(&self.path, e))
    }

    /// Every record in a log file (for tests and plots).
    pub fn read(path: &Path) -> Result<Vec<StepLog>> {
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display()))))
            .collect()
    }
}
