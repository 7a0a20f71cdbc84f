//! The CUDA path against the CPU path and the official outputs, on every fixture model:
//! f32 within 1e-4 of both (routing identical), bf16 within 1e-2 of the CPU bf16 run (relative L2).
//!
//! cargo run --example device_parity -- [--device cuda]   (run from the repository root)
//!
//! Exits non-zero if any check fails.
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use ditmoe::checkpoint::ModelDir;
use ditmoe::model::{ForwardMode, Trace};

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den.max(1e-300)).sqrt())
}

fn main() -> Result<()> {
    let device = match std::env::args().nth(2).as_deref() {
        Some("cuda") => ditmoe::kernels::cuda_graph::cuda_device(0)?,
        _ => Device::Cpu,
    };
    let mut failures = 0;
    println!("| case | dtype | device | rel. L2 vs official | rel. L2 vs CPU | routing = CPU |");
    println!("|---|---|---|---:|---:|---|");
    for case in ["pixel", "tiny", "tiny-flash", "tiny-noshared"] {
        let dir = ModelDir::open(std::path::Path::new(&format!("tests/fixtures/models/{case}")))?;
        let io = candle_core::safetensors::load(format!("tests/fixtures/models/{case}/io.safetensors"), &Device::Cpu)?;
        for (dtype, name, tol) in [(DType::F32, "f32", 1e-4), (DType::BF16, "bf16", 1e-2)] {
            let run = |dev: &Device| -> Result<(Tensor, Vec<Vec<u32>>)> {
                let model = dir.load(dtype, dev)?;
                let mut trace = Trace::routing();
                let (x, t, y) = (io["x"].to_device(dev)?, io["t"].to_device(dev)?, io["y"].to_device(dev)?);
                let out = model.forward_full(&x, &t, &y, ForwardMode::Eval, &mut trace)?.out.to_device(&Device::Cpu)?;
                let ids = trace.routing.iter().map(|r| r.experts.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<u32>()).collect::<candle_core::Result<_>>()?;
                Ok((out, ids))
            };
            let (cpu_out, cpu_ids) = run(&Device::Cpu)?;
            let (dev_out, dev_ids) = run(&device)?;
            let vs_official = rel_l2(&dev_out, &io["out"])?;
            let vs_cpu = rel_l2(&dev_out, &cpu_out)?;
            let same_routing = cpu_ids == dev_ids;
            // bf16 may flip near-tie routing decisions against the f32 official run (reported,
            // not failed); the device must still agree with the CPU at the same precision.
            let ok = vs_cpu <= tol && (dtype != DType::F32 || (vs_official <= tol && same_routing));
            failures += usize::from(!ok);
            println!("| {case} | {name} | {device:?} | {vs_official:.2e} | {vs_cpu:.2e} | {same_routing}{} |", if ok { "" } else { " **FAIL**" });
        }
    }
    if failures > 0 {
        bail!("{failures} checks failed")
    }
    println!("all checks passed");
    Ok(())
}
