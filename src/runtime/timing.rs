//! Timing for benchmarks: the median of repeated calls, measured with CUDA events on a GPU
//! (iterations recorded back to back without synchronising in between, as in a forward pass)
//! and with the wall clock on the CPU, where every call is synchronous anyway.
use candle_core::{Device, Result};

/// Median milliseconds of `f` on `dev`, after one warm-up call. The iteration count is chosen
/// so that the timed calls take about `budget_ms` (at least 5, at most 100).
pub fn median_ms<F: FnMut() -> Result<()>>(dev: &Device, budget_ms: f64, mut f: F) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let start = std::time::Instant::now();
    f()?;
    f()?;
    dev.synchronize()?;
    let estimate = start.elapsed().as_secs_f64() * 1e3 / 2.0;
    let iters = ((budget_ms / estimate.max(1e-3)) as usize).clamp(5, 100);
    median(timed_calls(dev, iters, &mut f)?)
}

/// Median milliseconds of `iters` calls of `f` on `dev` after `warmup` untimed ones. The counts
/// are fixed, not chosen from a time budget, so that every rank of a group makes the same calls
/// when `f` runs collectives.
pub fn median_of_ms<F: FnMut() -> Result<()>>(dev: &Device, warmup: usize, iters: usize, mut f: F) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    median(timed_calls(dev, iters.max(1), &mut f)?)
}

fn median(mut times: Vec<f64>) -> Result<f64> {
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

#[cfg(feature = "cuda")]
fn timed_calls<F: FnMut() -> Result<()>>(dev: &Device, iters: usize, f: &mut F) -> Result<Vec<f64>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let Ok(cuda) = dev.as_cuda_device() else {
        return wall_clock_calls(iters, f);
    };
    let stream = cuda.cuda_stream();
    let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(candle_core::Error::wrap);
    let mut events = Vec::with_capacity(iters);
    for _ in 0..iters {
        let e0 = event()?;
        f()?;
        events.push((e0, event()?));
    }
    dev.synchronize()?;
    events.iter().map(|(a, b)| a.elapsed_ms(b).map(|ms| ms as f64).map_err(candle_core::Error::wrap)).collect()
}

#[cfg(not(feature = "cuda"))]
fn timed_calls<F: FnMut() -> Result<()>>(_dev: &Device, iters: usize, f: &mut F) -> Result<Vec<f64>> {
    wall_clock_calls(iters, f)
}

fn wall_clock_calls<F: FnMut() -> Result<()>>(iters: usize, f: &mut F) -> Result<Vec<f64>> {
    (0..iters)
        .map(|_| {
            let start = std::time::Instant::now();
            f()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}
