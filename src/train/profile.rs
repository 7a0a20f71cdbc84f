//! Where a training step's time goes (`ditmoe train --profile`): the wall time of each phase of
//! every step, with the device synchronised at each phase boundary so that the GPU work a
//! phase queued is charged to it (what `torch.cuda.synchronize()` around timers does). The
//! synchronisation costs a little overlap, so profiled steps run slightly slower than plain
//! ones. The run's first step pays for kernel compilation and loader start-up and is left out.
//! On a GPU it also reports the peak memory in use over the steps ([`crate::runtime::memory`]).
use crate::runtime::memory;
use candle_core::{Device, Result};
use std::time::Instant;

pub struct StepProfile {
    device: Device,
    /// Phase names in first-seen order, with their summed seconds over the counted steps.
    totals: Vec<(&'static str, f64)>,
    /// This step's phases, folded into `totals` by [`StepProfile::end_step`].
    current: Vec<(&'static str, f64)>,
    last: Instant,
    steps_seen: u64,
    steps_counted: u64,
    /// The most device memory in use during any step, in bytes (None on the CPU).
    peak_bytes: Option<u64>,
}

impl StepProfile {
    pub fn new(device: &Device) -> Self {
        Self { device: device.clone(), totals: Vec::new(), current: Vec::new(), last: Instant::now(), steps_seen: 0, steps_counted: 0, peak_bytes: None }
    }

    /// Starts a step's clock once the device is idle.
    pub fn start_step(&mut self) -> Result<()> {
        self.device.synchronize()?;
        memory::reset_peak(&self.device)?;
        self.current.clear();
        self.last = Instant::now();
        Ok(())
    }

    /// Charges the time since the previous mark (or the step's start) to `phase`.
    pub fn mark(&mut self, phase: &'static str) -> Result<()> {
        self.device.synchronize()?;
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        match self.current.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.current.push((phase, dt)),
        }
        Ok(())
    }

    /// Ends a step: every step after the run's first is counted.
    pub fn end_step(&mut self) -> Result<()> {
        if let Some(peak) = memory::peak_bytes(&self.device)? {
            self.peak_bytes = Some(self.peak_bytes.unwrap_or(0).max(peak));
        }
        self.end_step_timing();
        Ok(())
    }

    /// The most device memory in use during any step so far, in bytes; None on the CPU.
    pub fn peak_bytes(&self) -> Option<u64> {
        self.peak_bytes
    }

    fn end_step_timing(&mut self) {
        self.steps_seen += 1;
        if self.steps_seen == 1 {
            return;
        }
        self.steps_counted += 1;
        for &(phase, dt) in &self.current {
            match self.totals.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, t)) => *t += dt,
                None => self.totals.push((phase, dt)),
            }
        }
    }

    /// Steps that went into [`StepProfile::table`].
    pub fn steps_counted(&self) -> u64 {
        self.steps_counted
    }

    /// Mean milliseconds per step for each phase, in the order the phases ran.
    pub fn per_step_ms(&self) -> Vec<(&'static str, f64)> {
        let n = self.steps_counted.max(1) as f64;
        self.totals.iter().map(|&(p, t)| (p, t * 1e3 / n)).collect()
    }

    /// A markdown table: phase, ms per step, share of the step.
    pub fn table(&self) -> String {
        let rows = self.per_step_ms();
        let total: f64 = rows.iter().map(|r| r.1).sum();
        let mut s = format!("step profile over {} steps (the first step left out)\n\n| phase | ms per step | share |\n|---|---:|---:|\n", self.steps_counted);
        for (p, ms) in &rows {
            s += &format!("| {p} | {ms:.2} | {:.1}% |\n", 100.0 * ms / total.max(f64::MIN_POSITIVE));
        }
        s += &format!("| **step** | **{total:.2}** | 100% |\n");
        if let Some(peak) = self.peak_bytes {
            s += &format!("\npeak device memory in use: {:.2} GiB\n", memory::gib(peak));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::StepProfile;
    use candle_core::Device;

    #[test]
    fn phases_sum_per_step_and_the_first_step_is_left_out() {
        let mut p = StepProfile::new(&Device::Cpu);
        for step in 0..3 {
            p.start_step().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(if step == 0 { 40 } else { 4 }));
            p.mark("a").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
            p.mark("b").unwrap();
            p.mark("a").unwrap();
            p.end_step().unwrap();
        }
        assert_eq!(p.steps_counted(), 2);
        let rows = p.per_step_ms();
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), ["a", "b"]);
        // the 40 ms first step is not in the mean
        assert!(rows[0].1 >= 4.0 && rows[0].1 < 30.0, "{rows:?}");
        assert!(rows[1].1 >= 2.0, "{rows:?}");
        assert!(p.table().contains("| a |"));
    }
}
