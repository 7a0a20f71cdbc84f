//! The EMA update's cost by placement (`train::ema`): beside the weights (the fused kernel on a
//! GPU, candle's ops on the CPU) against in host memory (`ema_on_host`: each weight copied to a
//! reused host buffer, then averaged in place on every core). Prints one markdown row per
//! placement: ms per update, weights per second, and the host threads.
//!
//! ```text
//! cargo run [--release] --example bench_ema -- [--device cpu|cuda] [--millions 400] [--tensors 400] [--steps 3]
//! ```
//! On the CPU, "beside the weights" is candle's ops over CPU tensors: the arithmetic the host
//! EMA ran before it updated in place. On a GPU, "in host memory" adds the copy of every weight
//! over PCIe, which is what `--ema-on-host` costs a training step.
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use ditmoe::train::ema::Ema;
use std::time::Instant;

#[path = "support/args.rs"]
mod args;
use args::arg;

fn main() -> Result<()> {
    let device = match arg("--device", "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => anyhow::bail!("--device {other}: cpu or cuda"),
    };
    let millions: usize = arg("--millions", "400").parse()?;
    let tensors: usize = arg("--tensors", "400").parse()?;
    let steps: u64 = arg("--steps", "3").parse()?;
    let per_tensor = millions * 1_000_000 / tensors;
    let vars: Vec<(String, Var)> = (0..tensors).map(|i| Ok((format!("w{i}"), Var::from_tensor(&Tensor::randn(0f32, 1.0, per_tensor, &device)?)?))).collect::<Result<_>>()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{tensors} tensors of {per_tensor} f32 weights on {device:?}, {threads} host threads");
    println!("| placement | ms / update | G weights / s |");
    println!("|---|---:|---:|");
    for (name, on_host) in [("beside the weights", false), ("in host memory", true)] {
        let mut ema = Ema::new(&vars, on_host, 1)?;
        // one untimed update: the host buffers and the kernel are ready after it
        ema.step(&vars, 0.999, 1)?;
        device.synchronize()?;
        let t0 = Instant::now();
        for step in 2..2 + steps {
            ema.step(&vars, 0.999, step)?;
        }
        device.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!("| {name} | {ms:.1} | {:.2} |", (tensors * per_tensor) as f64 / ms / 1e6);
    }
    Ok(())
}
