//! Full-model forward throughput of DiT-MoE presets with random weights (frozen, as loaded
//! from a checkpoint, so on CUDA the MoE layers run the fused kernels), and where the time of
//! one block goes.
//!
//! cargo run --example bench_model -- --device cuda --models S/2-8E2A,B/2-8E2A,XL/2-8E2A \
//!     --batches 1,8,64 --dtypes bf16,f32 [--breakdown] [--budget-ms 1000]
//!
//! Prints ms per forward run eagerly and replayed as one CUDA graph (`GraphedForward`, what
//! the samplers use on a GPU; the replay is checked against the eager output), images/s and
//! achieved TFLOP/s (matmul FLOPs, the count of shared/docs/baseline.md) of the faster one.
//! The baseline is the official PyTorch code measured in the same device command
//! (`shared/tools/bench_official_ditmoe.py`); the per-expert loop path is measured per layer
//! in `bench_moe`. `--breakdown` adds, per model and batch, the time of each stage of one
//! block run alone. Timing: `ditmoe::runtime::timing::median_ms` (CUDA events, calls back to
//! back). `--graph-probe STAGE` checks one piece of the forward under graph capture;
//! `--gemm-variant NAME` runs every grouped GEMM with one kernel variant (tuning).
//! `--matmul-floor` adds, per model and batch, the forward's matmuls alone as dense cuBLAS
//! products (`matmul_floor`): what any implementation pays for its matmul FLOPs on this GPU.
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use ditmoe::checkpoint::expected_parameters;
use ditmoe::runtime::graph::GraphedForward;
use ditmoe::runtime::timing::median_ms;
use ditmoe::model::kernels::block_ops;
use ditmoe::moe::MoeInput;
use ditmoe::{presets, DitConfig, DitMoe, ExecutionPlan, Precision};

#[path = "support/gemm_variants.rs"]
mod gemm_variants;
use gemm_variants::gemm_variants;
use std::collections::HashMap;

#[path = "support/args.rs"]
mod args;
use args::{arg, flag};

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

/// Frozen random weights (std 1/sqrt(fan_in)): what a loaded checkpoint gives, run by `plan`.
fn frozen_model(cfg: &DitConfig, plan: &ExecutionPlan) -> Result<DitMoe> {
    let (dtype, device) = (plan.weight_dtype(), &plan.device);
    let frozen: HashMap<String, Tensor> = expected_parameters(cfg)?
        .into_iter()
        .map(|(name, shape)| {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let t = Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape, device)?.to_dtype(dtype)?;
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    Ok(DitMoe::new(cfg, plan, VarBuilder::from_tensors(frozen, dtype, device))?)
}

/// Each stage of block 0 timed alone on (B, T, D) activations, then the whole block.
fn breakdown(name: &str, dtype_name: &str, model: &DitMoe, plan: &ExecutionPlan, b: usize, device: &Device) -> Result<()> {
    let cfg = model.config();
    let (t, d) = (cfg.num_patches(), cfg.hidden_size);
    let block = &model.blocks()[0];
    let attn = block.attention();
    let x = Tensor::randn(0f32, 1.0, (b, t, d), device)?;
    let c = Tensor::randn(0f32, 1.0, (b, d), device)?;
    let ada = block.ada_ln().forward(&candle_nn::ops::silu(&c)?)?;
    // What the block feeds its matmuls (the weights' dtype on the GPU path, f32 on the CPU).
    let h_dtype = plan.matmul_input_dtype();
    let h = block_ops::ln_modulate(&x, &ada, 0, 1, h_dtype)?;
    let qkv = attn.qkv_projection(&h)?;
    let merged = attn.attend(&qkv)?.to_dtype(h_dtype)?;
    let budget = 200.0;
    let mut rows: Vec<(&str, f64)> = Vec::new();
    let mut time = |stage: &'static str, f: &mut dyn FnMut() -> candle_core::Result<Tensor>| -> Result<()> {
        rows.push((stage, median_ms(device, budget, || f().map(drop))?));
        Ok(())
    };
    time("adaLN: SiLU + Linear(D, 6D)", &mut || block.ada_ln().forward(&candle_nn::ops::silu(&c)?))?;
    time("LayerNorm + modulate", &mut || block_ops::ln_modulate(&x, &ada, 0, 1, h_dtype))?;
    time("attention: qkv Linear", &mut || attn.qkv_projection(&h))?;
    time("attention: heads (+ q/k norm) + softmax(qkᵀ)v", &mut || attn.attend(&qkv))?;
    time("attention: out Linear (bias in the next pass)", &mut || attn.project_out_before_bias(&merged))?;
    let projected = attn.project_out_before_bias(&merged)?;
    time("gated residual (+ out bias) + LayerNorm + modulate", &mut || {
        block_ops::residual_ln_modulate(&x, &projected, attn.out_bias(), &ada, 2, 3, 4, h_dtype).map(|r| r.1)
    })?;
    time("gated residual", &mut || block_ops::gated_residual(&x, &merged, None, &ada, 5))?;
    if let Some(moe) = block.moe() {
        let tokens = h.reshape((b * t, d))?;
        time("MoE layer (routed + shared)", &mut || moe.forward(&MoeInput { tokens: &tokens, seq_len: t, unconditional: None, train: false }).map(|o| o.out))?;
    }
    time("whole block", &mut || block.forward(&x, &c, None, ditmoe::ForwardMode::Eval, 0, &mut Default::default()).map(|o| o.x))?;
    let whole = rows.last().map(|r| r.1).unwrap_or(f64::NAN);
    println!("\n{name} {dtype_name}, batch {b} ({} tokens), one block:\n", b * t);
    println!("| stage | ms | share of the block |");
    println!("|---|---:|---:|");
    for (stage, ms) in &rows {
        println!("| {stage} | {ms:.3} | {:.0}% |", 100.0 * ms / whole);
    }
    println!();
    Ok(())
}

/// `--matmul-floor`: the forward's matmul FLOPs as plain dense products (candle's matmul, i.e.
/// cuBLAS), back to back and replayed as one CUDA graph, with nothing else: per block the qkv,
/// out and router projections, the shared expert, the routed experts as one dense product over
/// all k·S routed rows (the FLOPs of the grouped GEMMs without their gather or uneven
/// segments), the attention's q kᵀ and p v as batched products and the block's adaLN
/// projection. No routing, norms, softmax, residuals or patch embedding: a floor for the
/// forward of this model on this GPU, whoever implements it. One weight set serves every block
/// (the products are compute-bound; an expert's weights do not fit in L2 either way).
/// Returns the chain's ms and FLOPs, with and without the attention's products (cuBLAS is
/// not at its best on T x hd = 256 x 72 batches; the chain without them bounds from below).
fn matmul_floor(cfg: &DitConfig, dtype: DType, b: usize, device: &Device, budget: f64) -> Result<[(f64, f64); 2]> {
    let (t, d, heads) = (cfg.num_patches(), cfg.hidden_size, cfg.num_heads);
    let (hd, s) = (d / heads, b * t);
    let (ri, si, k) = (cfg.mlp_ratio * d, cfg.n_shared_experts * d, cfg.num_experts_per_tok);
    let rand = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, (1.0 / d as f32).sqrt(), shape, device)?.to_dtype(dtype)?)
    };
    // (activation [m, kk], weight [n, kk]) pairs, multiplied as activation · weightᵀ
    let mut linears = vec![(rand(&[s, d])?, rand(&[3 * d, d])?), (rand(&[s, d])?, rand(&[d, d])?)];
    linears.push((rand(&[s, d])?, rand(&[cfg.num_experts, d])?));
    if si > 0 {
        linears.push((rand(&[s, d])?, rand(&[2 * si, d])?));
        linears.push((rand(&[s, si])?, rand(&[d, si])?));
    }
    linears.push((rand(&[k * s, d])?, rand(&[2 * ri, d])?));
    linears.push((rand(&[k * s, ri])?, rand(&[d, ri])?));
    let (q, kt, p, v) = (rand(&[b * heads, t, hd])?, rand(&[b * heads, hd, t])?, rand(&[b * heads, t, t])?, rand(&[b * heads, t, hd])?);
    let (c, ada) = (rand(&[b, d])?, rand(&[6 * d, d])?);
    let attention_flops = cfg.depth as f64 * 2.0 * 2.0 * (b * heads * t * t * hd) as f64;
    let mut flops = 2.0 * (b * 6 * d * cfg.depth * d) as f64;
    for (x, w) in &linears {
        flops += cfg.depth as f64 * 2.0 * (x.dim(0)? * x.dim(1)? * w.dim(0)?) as f64;
    }
    let block = |attention: bool| -> candle_core::Result<Tensor> {
        for (x, w) in &linears {
            drop(x.matmul(&w.t()?)?);
        }
        if attention {
            drop(q.matmul(&kt)?);
            drop(p.matmul(&v)?);
        }
        c.matmul(&ada.t()?)
    };
    let z = Tensor::zeros(1, DType::F32, device)?;
    let time = |attention: bool| -> Result<f64> {
        let mut graphed = GraphedForward::new(|_: &[&Tensor]| (1..cfg.depth).try_fold(block(attention)?, |_, _| block(attention)));
        graphed.call(&[&z])?;
        let ms = median_ms(device, budget, || graphed.call(&[&z]).map(drop))?;
        if let Some(e) = graphed.capture_error() {
            println!("matmul floor: CUDA graph capture failed, eager: {e}");
        }
        Ok(ms)
    };
    // the adaLN product runs once per block here: depth x [B, D] x [D, 6D] has the FLOPs of
    // the model's one [B, D] x [D, 6D depth] product
    Ok([(time(true)?, flops + attention_flops), (time(false)?, flops)])
}

/// `--graph-probe STAGE`: one piece of the forward captured as a CUDA graph, replayed on
/// fresh inputs and compared with its eager result (run each stage in its own process: a
/// faulting replay poisons the context).
fn graph_probe(stage: &str, cfg: &DitConfig, plan: &ExecutionPlan, b: usize) -> Result<()> {
    let (dtype, device) = (plan.weight_dtype(), &plan.device);
    let model = frozen_model(cfg, plan)?;
    let (t, d) = (cfg.num_patches(), cfg.hidden_size);
    let block = &model.blocks()[0];
    let moe = block.moe().expect("DiT-MoE block");
    let w = block.attention().qkv_projection(&Tensor::zeros((1, 1, d), DType::F32, device)?)?; // warm
    drop(w);
    type Stage<'a> = Box<dyn FnMut(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + 'a>;
    let mut f: Stage = match stage {
        "matmul" => Box::new(|x: &Tensor, _: &Tensor, _: &Tensor| x.reshape((b * t, d))?.to_dtype(dtype)?.matmul(&x.reshape((b * t, d))?.to_dtype(dtype)?.t()?)),
        "linear" => Box::new(|x: &Tensor, _: &Tensor, _: &Tensor| block.attention().project_out(x)),
        "broadcast" => Box::new(|x: &Tensor, c: &Tensor, _: &Tensor| x.broadcast_mul(&c.unsqueeze(1)?)),
        "moe" => Box::new(|x: &Tensor, _: &Tensor, _: &Tensor| moe.forward(&MoeInput { tokens: &x.reshape((b * t, d))?, seq_len: t, unconditional: None, train: false }).map(|o| o.out)),
        "block" => Box::new(|x: &Tensor, c: &Tensor, _: &Tensor| block.forward(x, c, None, ditmoe::ForwardMode::Eval, 0, &mut Default::default()).map(|o| o.x)),
        "model" => Box::new(|x: &Tensor, c: &Tensor, y: &Tensor| model.forward(&x.reshape((b, t, d))?.narrow(2, 0, cfg.in_channels * cfg.input_size * cfg.input_size / t)?.reshape((b, cfg.in_channels, cfg.input_size, cfg.input_size))?, &c.narrow(1, 0, 1)?.squeeze(1)?, y)),
        other => anyhow::bail!("unknown probe stage {other}"),
    };
    let inputs = || -> Result<(Tensor, Tensor, Tensor)> {
        Ok((Tensor::randn(0f32, 1.0, (b, t, d), device)?, Tensor::rand(0f32, 1.0, (b, d), device)?, Tensor::zeros(b, DType::I64, device)?))
    };
    let mut eager = Vec::new();
    let sets = (0..4).map(|_| inputs()).collect::<Result<Vec<_>>>()?;
    for (x, c, y) in &sets {
        eager.push(f(x, c, y)?);
    }
    let mut graphed = GraphedForward::new(|ins: &[&Tensor]| f(ins[0], ins[1], ins[2]));
    for (i, ((x, c, y), e)) in sets.iter().zip(&eager).enumerate() {
        let out = graphed.call(&[x, c, y])?;
        device.synchronize()?;
        let diff = (out.to_dtype(DType::F32)? - e.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("probe {stage}: call {i} replays {} max |graph - eager| {diff:.3e} capture error {:?}", graphed.replays(), graphed.capture_error());
    }
    Ok(())
}

/// GPU memory in use (GiB), for the log: the largest models must fit one after another.
#[cfg(feature = "cuda")]
fn gpu_used_gib(device: &Device) -> Option<f64> {
    let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
    let (free, total) = ctx.mem_get_info().ok()?;
    Some(ditmoe::runtime::memory::gib((total - free) as u64))
}
#[cfg(not(feature = "cuda"))]
fn gpu_used_gib(_: &Device) -> Option<f64> {
    None
}

fn main() -> Result<()> {
    let device = match arg("--device", "cpu").as_str() {
        "cuda" => ditmoe::runtime::graph::cuda_device(0)?,
        _ => Device::Cpu,
    };
    let models = arg("--models", "S/2-8E2A");
    let batches: Vec<usize> = arg("--batches", "1,8").split(',').map(|b| b.parse()).collect::<Result<_, _>>()?;
    let budget: f64 = arg("--budget-ms", "1000").parse()?;
    // `--gemm-variant NAME`: one of `support::gemm_variants` for every grouped GEMM (tuning).
    let gemm = match flag("--gemm-variant") {
        true => {
            let want = arg("--gemm-variant", "");
            let variants = gemm_variants(DType::BF16, true);
            let Some((_, cfg)) = variants.iter().find(|(n, _)| *n == want) else {
                anyhow::bail!("--gemm-variant: unknown `{want}`; one of {:?}", variants.iter().map(|v| v.0).collect::<Vec<_>>())
            };
            Some(*cfg)
        }
        false => None,
    };
    let plan_for = |dtype: DType| {
        let plan = ExecutionPlan::inference(&device, Precision::of_dtype(dtype));
        match gemm {
            Some(g) => plan.with_gemm(g),
            None => plan,
        }
    };
    if flag("--graph-probe") {
        let cfg = presets::get(&models)?.config;
        return graph_probe(&arg("--graph-probe", ""), &cfg, &plan_for(DType::BF16), batches[0]);
    }
    let mut table = vec![
        "| model | dtype | batch | ms / forward, eager | ms / forward, CUDA graph | images/s | TFLOP/s | graph vs eager |".to_string(),
        "|---|---|---:|---:|---:|---:|---:|---:|".to_string(),
    ];
    let mut floor_rows = vec![
        "| model | dtype | batch | ms / forward (best) | ms, its matmuls alone as dense cuBLAS | their TFLOP/s | forward / floor | TFLOP: floor / forward | ms without the attention's products | their TFLOP/s |".to_string(),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|".to_string(),
    ];
    for name in models.split(',') {
        let cfg = presets::get(name)?.config;
        for dtype_name in arg("--dtypes", "f32").split(',') {
            let dtype = match dtype_name {
                "bf16" => DType::BF16,
                "f16" => DType::F16,
                _ => DType::F32,
            };
            let inputs = |b: usize| -> Result<(Tensor, Tensor, Tensor)> {
                let x = Tensor::randn(0f32, 1.0, (b, cfg.in_channels, cfg.input_size, cfg.input_size), &device)?;
                let t = Tensor::arange(0i64, b as i64, &device)?;
                Ok((x, t.clone(), t))
            };
            let plan = plan_for(dtype);
            let model = frozen_model(&cfg, &plan)?;
            for &b in &batches {
                let (x, t, y) = inputs(b)?;
                let eager_ms = median_ms(&device, budget, || model.forward(&x, &t, &y).map(drop))?;
                // The same forward replayed as one CUDA graph (what the samplers do on a GPU),
                // checked against the eager output on a second input set.
                let graph_ms = if device.is_cuda() {
                    let mut graphed = GraphedForward::new(|ins: &[&Tensor]| model.forward(ins[0], ins[1], ins[2]));
                    graphed.call(&[&x, &t, &y])?;
                    let ms = median_ms(&device, budget, || graphed.call(&[&x, &t, &y]).map(drop))?;
                    let (x2, t2, y2) = inputs(b)?;
                    let diff = (graphed.call(&[&x2, &t2, &y2])? - model.forward(&x2, &t2, &y2)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    if let Some(e) = graphed.capture_error() {
                        println!("CUDA graph capture failed, eager fallback: {e}");
                    }
                    println!("{name} {dtype_name} b{b}: graph replays {}, max |graph - eager| on fresh inputs {diff:.3e}", graphed.replays());
                    Some(ms)
                } else {
                    None
                };
                let best = graph_ms.unwrap_or(eager_ms).min(eager_ms);
                let ips = b as f64 / (best / 1e3);
                let tflops = flops_per_image(&cfg) * ips / 1e12;
                let (graph_col, ratio) = match graph_ms {
                    Some(g) => (format!("{g:.2}"), format!("{:.2}x", eager_ms / g)),
                    None => ("–".into(), "–".into()),
                };
                table.push(format!("| {name} | {dtype_name} | {b} | {eager_ms:.2} | {graph_col} | {ips:.1} | {tflops:.1} | {ratio} |"));
                println!("{}", table.last().unwrap());
                if let Some(gib) = gpu_used_gib(&device) {
                    println!("GPU memory in use after this row: {gib:.1} GiB");
                }
                if flag("--breakdown") {
                    breakdown(name, dtype_name, &model, &plan, b, &device)?;
                }
                if flag("--matmul-floor") {
                    let [(floor_ms, floor_flops), (proj_ms, proj_flops)] = matmul_floor(&cfg, dtype, b, &device, budget)?;
                    let row = format!(
                        "| {name} | {dtype_name} | {b} | {best:.2} | {floor_ms:.2} | {:.1} | {:.2}x | {:.2} / {:.2} | {proj_ms:.2} | {:.1} |",
                        floor_flops / floor_ms / 1e9,
                        best / floor_ms,
                        floor_flops / 1e12,
                        flops_per_image(&cfg) * b as f64 / 1e12,
                        proj_flops / proj_ms / 1e9
                    );
                    println!("matmul floor {row}");
                    floor_rows.push(row);
                }
            }
        }
    }
    println!("\n{}", table.join("\n"));
    if floor_rows.len() > 2 {
        println!("\n{}", floor_rows.join("\n"));
    }
    Ok(())
}
