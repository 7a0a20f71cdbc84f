//! Full-model forward throughput of DiT-MoE presets with random weights.
//!
//! cargo run --example bench_model -- --device cuda --models S/2-8E2A,B/2-8E2A,XL/2-8E2A \
//!     --batches 1,8,64 --dtypes bf16,f32
//!
//! Prints ms per forward, images/s and achieved TFLOP/s (matmul FLOPs, the count of
//! shared/docs/baseline.md) for two builds of the same model measured in the same run: frozen
//! weights (on CUDA the MoE layers take the fused kernels) and training variables (the candle
//! per-expert dispatch, structured like the official `moe_infer`), and their ratio.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ditmoe::checkpoint::expected_parameters;
use ditmoe::{presets, DitConfig, DitMoe};
use std::collections::HashMap;
use std::time::Instant;

/// Matmul FLOPs of one image's forward (2 x MACs), as in the official baseline's count.
fn flops_per_image(c: &DitConfig) -> f64 {
    let (d, t) = (c.hidden_size as f64, c.num_patches() as f64);
    let p2c = (c.patch_size * c.patch_size * c.in_channels) as f64;
    let e = c.num_experts as f64;
    let k = c.num_experts_per_tok as f64;
    let r = c.mlp_ratio as f64;
    let s = c.n_shared_experts as f64;
    let out = (c.patch_size * c.patch_size * c.out_channels()) as f64;
    let per_layer = 6.0 * d * d + t * (4.0 * d * d + 2.0 * t * d + d * e + k * 3.0 * d * r * d + 3.0 * d * s * d);
    2.0 * (t * p2c * d + 256.0 * d + d * d + c.depth as f64 * per_layer + 2.0 * d * d + t * d * out)
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    let device = match arg("--device", "cpu").as_str() {
        "cuda" => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    let models = arg("--models", "S/2-8E2A");
    let batches: Vec<usize> = arg("--batches", "1,8").split(',').map(|b| b.parse()).collect::<Result<_, _>>()?;
    let iters: usize = arg("--iters", "10").parse()?;
    println!("| model | dtype | batch | MoE path | ms / forward | images/s | TFLOP/s | vs loop path |");
    println!("|---|---|---:|---|---:|---:|---:|---:|");
    for name in models.split(',') {
        let cfg = presets::get(name)?.config;
        for dtype_name in arg("--dtypes", "f32").split(',') {
            let dtype = match dtype_name {
                "bf16" => DType::BF16,
                "f16" => DType::F16,
                _ => DType::F32,
            };
            // Frozen random weights (std 1/sqrt(fan_in)): what a loaded checkpoint gives.
            let frozen: HashMap<String, Tensor> = expected_parameters(&cfg)?
                .into_iter()
                .map(|(name, shape)| {
                    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
                    let t = Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape, &device)?.to_dtype(dtype)?;
                    Ok((name, t))
                })
                .collect::<Result<_>>()?;
            let fused = DitMoe::new(&cfg, VarBuilder::from_tensors(frozen, dtype, &device))?;
            let varmap = VarMap::new();
            let looped = DitMoe::new(&cfg, VarBuilder::from_varmap(&varmap, dtype, &device))?;
            for &b in &batches {
                let x = Tensor::randn(0f32, 1.0, (b, cfg.in_channels, cfg.input_size, cfg.input_size), &device)?;
                let t = Tensor::arange(0i64, b as i64, &device)?;
                let y = Tensor::arange(0i64, b as i64, &device)?;
                let time = |model: &DitMoe| -> Result<f64> {
                    let run = || -> Result<f64> {
                        let start = Instant::now();
                        let out = model.forward(&x, &t, &y)?;
                        device.synchronize()?;
                        drop(out);
                        Ok(start.elapsed().as_secs_f64() * 1e3)
                    };
                    for _ in 0..3 {
                        run()?; // warm-up: PTX JIT, NVRTC, allocator
                    }
                    let mut times = (0..iters).map(|_| run()).collect::<Result<Vec<_>>>()?;
                    times.sort_by(f64::total_cmp);
                    Ok(times[times.len() / 2])
                };
                let loop_ms = time(&looped)?;
                let fused_ms = time(&fused)?;
                for (path, ms) in [("loop", loop_ms), ("frozen (fused on CUDA)", fused_ms)] {
                    let ips = b as f64 / (ms / 1e3);
                    let tflops = flops_per_image(&cfg) * ips / 1e12;
                    println!("| {name} | {dtype_name} | {b} | {path} | {ms:.2} | {ips:.1} | {tflops:.1} | {:.2}x |", loop_ms / ms);
                }
            }
        }
    }
    Ok(())
}
