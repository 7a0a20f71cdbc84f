//! Benchmark of the MoE layer on one GPU: the fused kernels (`ditmoe::moe::kernels`) against the
//! per-expert candle loop (the structure of the official `moe_infer`), candle-nn's WMMA
//! `moe_gemm` (bf16 only) and dense cuBLAS GEMMs of the same FLOPs.
//!
//! ```text
//! ../shared/scripts/build-cuda.sh build --release --example bench_moe
//! ./bench_moe [--quick] [--configs S,XL,G] [--variants-only]
//! ```
//! Timing: CUDA events around each call, recorded back to back without synchronising between
//! iterations (as in a model's forward pass), after warm-up; the median is reported.
//! Configs: S (D 384), XL (D 1152), both 8 experts, top-2, and G (D 1408, 16 experts, top-2),
//! all with I = 4·D and a shared expert of I = 2·D, at 256, 4096 and 16384 tokens.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_imports))]
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use ditmoe::moe::kernels::{self as kx, GemmConfig};
use ditmoe::moe::MoeInput;
use ditmoe::{ExecutionPlan, Precision};

#[path = "support/gemm_variants.rs"]
mod gemm_variants;
#[path = "support/moe_layers.rs"]
mod moe_layers;
use moe_layers::{fused_layer, moe_forward_loop, random_layer};

/// `ditmoe::runtime::timing::median_ms` for closures returning `anyhow::Result`.
#[cfg(feature = "cuda")]
fn time_ms<F: FnMut() -> Result<()>>(dev: &Device, budget_ms: f64, mut f: F) -> Result<f64> {
    Ok(ditmoe::runtime::timing::median_ms(dev, budget_ms, || f().map_err(candle_core::Error::wrap))?)
}

struct Cfg {
    name: &'static str,
    d: usize,
    e: usize,
    k: usize,
    i: usize,
    i_shared: usize,
}

fn tflops(flop: f64, ms: f64) -> f64 {
    flop / (ms * 1e-3) / 1e12
}

#[cfg(feature = "cuda")]
pub fn run(dev: &Device, args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    // --variants-only: just the grouped GEMM kernel variants (and the fused layer with each) at
    // the largest size, against dense cuBLAS
    let variants_only = args.iter().any(|a| a == "--variants-only");
    let budget = if quick { 60.0 } else { 250.0 };
    let cfgs = [
        Cfg {
            name: "S",
            d: 384,
            e: 8,
            k: 2,
            i: 4 * 384,
            i_shared: 2 * 384,
        },
        Cfg {
            name: "XL",
            d: 1152,
            e: 8,
            k: 2,
            i: 4 * 1152,
            i_shared: 2 * 1152,
        },
        Cfg {
            name: "G",
            d: 1408,
            e: 16,
            k: 2,
            i: 4 * 1408,
            i_shared: 2 * 1408,
        },
    ];
    // --configs S,XL: only these widths
    let only: Option<Vec<String>> = args.iter().position(|a| a == "--configs").and_then(|i| args.get(i + 1)).map(|v| v.split(',').map(str::to_string).collect());
    let cfgs: Vec<&Cfg> = cfgs.iter().filter(|c| only.as_ref().is_none_or(|o| o.iter().any(|n| n == c.name))).collect();
    let tokens: &[usize] = if quick {
        &[256, 16384]
    } else {
        &[256, 4096, 16384]
    };
    let m = ditmoe::runtime::cuda::target(dev.as_cuda_device()?)?;
    let mut layer_rows = Vec::new();
    let mut gemm_rows = Vec::new();
    let mut stage_rows = Vec::new();
    let mut variant_rows = Vec::new();
    let t_all = std::time::Instant::now();
    for dt in [DType::BF16, DType::F32] {
        for &c in &cfgs {
            let (d, e, k, i, is) = (c.d, c.e, c.k, c.i, c.i_shared);
            let (experts, shared, router) = random_layer(dev, dt, d, e, i, is)?;
            let plan = ExecutionPlan::inference(dev, Precision::of_dtype(dt));
            let gemm = GemmConfig::default();
            let layer = fused_layer(&router, &experts, Some(&shared), k, &plan)?;
            // candle-nn's moe_gemm wants gate and up stacked: [E, 2I, D]
            let w_gu = if dt == DType::BF16 {
                Some(Tensor::cat(&[&experts.gate, &experts.up], 1)?)
            } else {
                None
            };
            // dense reference weights of the same shapes as one expert's projections
            let w_gu0 = Tensor::cat(&[&experts.gate.get(0)?, &experts.up.get(0)?], 0)?; // [2I, D]
            let w_d0 = experts.down.get(0)?; // [D, I]
            for &s in tokens {
                let x = Tensor::randn(0f32, 1.0, (s, d), dev)?.to_dtype(dt)?;
                let r = s * k;
                let f_router = 2.0 * (s * d * e) as f64;
                let f_routed = 2.0 * (r * 3 * d * i) as f64;
                let f_shared = 2.0 * (s * 3 * d * is) as f64;
                let f_layer = f_router + f_routed + f_shared;

                if variants_only && s != *tokens.last().unwrap() {
                    continue;
                }
                // routing, and the dense references of the routed projections: every table uses them
                let logits = x.matmul(&router.t()?)?;
                let g = kx::fused_topk_gating(&logits, k)?;
                let p = kx::permute_by_expert(&g.ids, e)?;
                let h = kx::grouped_gate_up_gather(&x, &p, &experts.gate, &experts.up, &gemm)?;
                let xr = kx::gather_rows(&x, &p)?;
                let t_dense_gu = time_ms(dev, budget, || {
                    let _ = xr.matmul(&w_gu0.t()?)?;
                    Ok(())
                })?;
                let t_dense_down = time_ms(dev, budget, || {
                    let _ = h.matmul(&w_d0.t()?)?;
                    Ok(())
                })?;
                let t_dn = t_dense_gu + t_dense_down;
                let f_gu = 2.0 * (r * d * 2 * i) as f64;
                let f_dn = 2.0 * (r * i * d) as f64;
                let dts = format!("{dt:?}").to_lowercase();
                if variants_only {
                    println!(
                        "dense {} {s} {dts}: gate/up {t_dense_gu:.3} ms ({:.0} TFLOP/s), down {t_dense_down:.3} ms ({:.0} TFLOP/s)",
                        c.name,
                        tflops(f_gu, t_dense_gu),
                        tflops(f_dn, t_dense_down)
                    );
                } else {
                    let t_fused = time_ms(dev, budget, || {
                        let _ = layer.forward(&MoeInput { tokens: &x, seq_len: s, unconditional: None, train: false })?;
                        Ok(())
                    })?;
                    let t_loop = time_ms(dev, budget, || {
                        let _ = moe_forward_loop(&x, &router, &experts, Some(&shared), k)?;
                        Ok(())
                    })?;
                    let t_cnn = match &w_gu {
                        Some(w_gu) => Some(time_ms(dev, budget, || {
                            let logits = x.matmul(&router.t()?)?;
                            let g = kx::fused_topk_gating(&logits, k)?;
                            let p = kx::permute_by_expert(&g.ids, e)?;
                            let sorted_experts = g.ids.flatten_all()?.index_select(&p.order, 0)?;
                            let gu = candle_nn::moe::moe_gemm(
                                &x,
                                w_gu,
                                &None,
                                &p.order,
                                &sorted_experts,
                                k,
                                true,
                            )?;
                            let h = (gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?)?;
                            let tw = g.weights.flatten_all()?;
                            let y = candle_nn::moe::moe_gemm(
                                &h,
                                &experts.down,
                                &Some(tw),
                                &p.order,
                                &sorted_experts,
                                k,
                                true,
                            )?;
                            let y = y.reshape((s, k, d))?.sum(1)?;
                            let sh = kx::swiglu_mlp(&x, &shared, &gemm)?;
                            let _ = (y + sh)?;
                            Ok(())
                        })?),
                        None => None,
                    };
                    // the routed experts alone: ours (gather fused into gate/up, then down) vs dense
                    let y = kx::grouped_matmul(&h, &p.offsets, &experts.down, &gemm)?;
                    let t_gu = time_ms(dev, budget, || {
                        let _ = kx::grouped_gate_up_gather(&x, &p, &experts.gate, &experts.up, &gemm)?;
                        Ok(())
                    })?;
                    let t_down = time_ms(dev, budget, || {
                        let _ = kx::grouped_matmul(&h, &p.offsets, &experts.down, &gemm)?;
                        Ok(())
                    })?;
                    // stage breakdown of the fused layer
                    let t_router = time_ms(dev, budget / 2.0, || {
                        let _ = x.matmul(&router.t()?)?;
                        Ok(())
                    })?;
                    let t_gate = time_ms(dev, budget / 2.0, || {
                        let _ = kx::fused_topk_gating(&logits, k)?;
                        Ok(())
                    })?;
                    let t_perm = time_ms(dev, budget / 2.0, || {
                        let _ = kx::permute_by_expert(&g.ids, e)?;
                        Ok(())
                    })?;
                    let t_shared = time_ms(dev, budget / 2.0, || {
                        let _ = kx::swiglu_mlp(&x, &shared, &gemm)?;
                        Ok(())
                    })?;
                    let sh = kx::swiglu_mlp(&x, &shared, &gemm)?;
                    let t_comb = time_ms(dev, budget / 2.0, || {
                        let _ = kx::combine(&y, &p, &g.weights, Some(&sh))?;
                        Ok(())
                    })?;
                    let t_g = t_gu + t_down;
                    let ratio = t_dn / t_g;
                    let cnn = t_cnn
                        .map(|t| format!("{t:.3}"))
                        .unwrap_or_else(|| "n/a".into());
                    let row = format!(
                        "| {} | {s} | {dts} | {t_fused:.3} | {:.1} | {t_loop:.3} | {:.2}x | {cnn} |",
                        c.name,
                        tflops(f_layer, t_fused),
                        t_loop / t_fused
                    );
                    println!("{row}");
                    layer_rows.push(row);
                    let row = format!(
                        "| {} | {s} | {dts} | {t_gu:.3} + {t_down:.3} | {:.1} | {t_dense_gu:.3} + {t_dense_down:.3} | {:.1} | {:.0}% | {:.1} / {:.1} |",
                        c.name,
                        tflops(f_gu + f_dn, t_g),
                        tflops(f_gu + f_dn, t_dn),
                        100.0 * ratio,
                        tflops(f_gu, t_gu),
                        tflops(f_dn, t_down)
                    );
                    println!("{row}");
                    gemm_rows.push(row);
                    let row = format!(
                        "| {} | {s} | {dts} | {t_router:.3} | {t_gate:.3} | {t_perm:.3} | {t_gu:.3} | {t_down:.3} | {t_shared:.3} | {t_comb:.3} | {:.3} | {t_fused:.3} |",
                        c.name,
                        t_router + t_gate + t_perm + t_gu + t_down + t_shared + t_comb
                    );
                    stage_rows.push(row);
                }
                // every kernel variant at the largest size
                if s == *tokens.last().unwrap() {
                    for (vname, cfg) in gemm_variants::gemm_variants(dt, m.has_wgmma) {
                        let a = time_ms(dev, budget / 2.0, || {
                            let _ = kx::grouped_gate_up_gather(&x, &p, &experts.gate, &experts.up, &cfg)?;
                            Ok(())
                        })?;
                        let b = time_ms(dev, budget / 2.0, || {
                            let _ = kx::grouped_matmul(&h, &p.offsets, &experts.down, &cfg)?;
                            Ok(())
                        })?;
                        let variant_layer = fused_layer(&router, &experts, Some(&shared), k, &plan.clone().with_gemm(cfg))?;
                        let lay = time_ms(dev, budget / 2.0, || {
                            let _ = variant_layer.forward(&MoeInput { tokens: &x, seq_len: s, unconditional: None, train: false })?;
                            Ok(())
                        })?;
                        let row = format!(
                            "| {} | {s} | {dts} | {vname} | {a:.3} ({:.0} TFLOP/s) | {b:.3} ({:.0} TFLOP/s) | {:.0}% | {lay:.3} ({:.0} TFLOP/s) |",
                            c.name,
                            tflops(f_gu, a),
                            tflops(f_dn, b),
                            100.0 * t_dn / (a + b),
                            tflops(f_layer, lay)
                        );
                        println!("{row}");
                        variant_rows.push(row);
                    }
                }
            }
        }
    }
    let name = dev
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .name()
        .unwrap_or_default();
    println!(
        "\n## MoE layer ({name}; {:.0} s of benchmarking)\n",
        t_all.elapsed().as_secs_f64()
    );
    println!("Times in ms (median, CUDA events). Layer = router + top-2 routed SwiGLU experts + shared expert.\n");
    println!("| config | tokens | dtype | fused ms | fused TFLOP/s | loop ms | loop/fused | candle-nn moe_gemm ms |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for r in &layer_rows {
        println!("{r}");
    }
    println!("\n## Routed experts: grouped GEMMs (gate/up with fused gather + SiLU·mul, then down) vs dense cuBLAS of the same shapes\n");
    println!("| config | tokens | dtype | grouped ms (gate/up + down) | grouped TFLOP/s | dense ms | dense TFLOP/s | grouped / dense speed | gate/up / down TFLOP/s |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &gemm_rows {
        println!("{r}");
    }
    println!("\n## Fused layer, stage by stage (ms)\n");
    println!("| config | tokens | dtype | router matmul | gating | permute | gate/up | down | shared | combine | sum | whole layer |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &stage_rows {
        println!("{r}");
    }
    println!("\n## Grouped GEMM kernel variants (routed experts at the largest size)\n");
    println!(
        "| config | tokens | dtype | kernel | gate/up ms | down ms | vs dense | fused layer ms |"
    );
    println!("|---|---:|---|---|---:|---:|---:|---:|");
    for r in &variant_rows {
        println!("{r}");
    }
    Ok(())
}

#[allow(dead_code)]
fn main() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let args: Vec<String> = std::env::args().collect();
        let dev = Device::new_cuda(0)?;
        run(&dev, &args)
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("built without the cuda feature")
}
