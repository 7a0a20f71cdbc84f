//! Where training's device memory goes before the first step, stage by stage (the model's
//! weights, the f32 masters, the optimizer's moments, the EMA, ...), so that running out of
//! memory names the stage or step phase that failed and what the stages before it hold, instead
//! of the allocator's bare `CUDA_ERROR_OUT_OF_MEMORY`. `--profile` prints the same table. On
//! the CPU nothing is counted and errors pass through unchanged.
use crate::runtime::memory::{gib, in_use_bytes, is_out_of_memory};
use candle_core::{Device, Error, Result};

pub struct MemoryStages {
    device: Device,
    /// In use before the first stage (other models, the CUDA context's pool).
    baseline: Option<u64>,
    /// Each finished stage with the bytes in use once it finished.
    stages: Vec<(&'static str, u64)>,
}

impl MemoryStages {
    pub fn new(device: &Device) -> Result<Self> {
        device.synchronize()?;
        Ok(Self { device: device.clone(), baseline: in_use_bytes(device)?, stages: Vec::new() })
    }

    /// Runs one stage; an out-of-memory error comes back naming `stage` and the stages before.
    pub fn stage<T>(&mut self, stage: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let value = f().map_err(|e| self.explain(&format!("allocating {stage}"), e))?;
        if self.counted() {
            self.device.synchronize()?;
            if let Some(used) = in_use_bytes(&self.device)? {
                self.stages.push((stage, used));
            }
        }
        Ok(value)
    }

    /// `e` as an out-of-memory error that says what ran out (`during`) and what the stages hold;
    /// other errors unchanged.
    pub fn explain(&self, during: &str, e: Error) -> Error {
        match self.counted() && is_out_of_memory(&e) {
            true => self.out_of_memory(during, e),
            false => e,
        }
    }

    fn out_of_memory(&self, during: &str, e: Error) -> Error {
        let now = in_use_bytes(&self.device).ok().flatten().map_or(String::new(), |b| format!("; {:.1} GiB in use now", gib(b)));
        Error::Msg(format!("out of device memory {during}{now}; training's state: {} ({e})", self.summary()))
    }

    /// Each stage's share, e.g. `model weights 7.8 GiB, f32 masters 15.5 GiB, ...`.
    pub fn summary(&self) -> String {
        let mut before = self.baseline.unwrap_or(0);
        let mut parts = vec![format!("{:.1} GiB in use before", gib(before))];
        for &(stage, used) in &self.stages {
            parts.push(format!("{stage} {:.1} GiB", gib(used.saturating_sub(before))));
            before = used;
        }
        parts.join(", ")
    }

    /// Whether anything was counted (a GPU).
    pub fn counted(&self) -> bool {
        self.baseline.is_some()
    }
}
