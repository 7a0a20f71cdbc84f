//! Benchmark of the MoE layer's training step (forward + backward of the routed experts, f32
//! as the trainer runs), for DiT-MoE's SwiGLU and ProMoE's GELU experts: the fused kernels with
//! their backward (`kernels::routed_experts`, the CUDA training path of both) against the two
//! candle forms it replaces, measured in the same run:
//! - *dense masked*: every expert on every token, weighted by `scores * mask` (DiT-MoE's CUDA
//!   training path before `routed_experts`; E/k times the routed FLOPs, no host read);
//! - *dispatch*: the sorted candle dispatch (`moe::ExpertDispatch`, index_select + index_add;
//!   the CPU path, and ProMoE's CUDA path before), whose CUDA `index_add` backward loops over
//!   all slots per column.
//!
//! ```text
//! ../shared/scripts/build-cuda.sh build --release --example bench_moe_train
//! ./bench_moe_train [--device cuda|cpu] [--quick] [--tf32]
//! ```
//! Each step includes stacking the per-expert weight variables (as the trainer's layer does) and
//! the gradients reaching the router scores, the tokens and every expert weight. Timing: median
//! of CUDA events around whole steps (each step reads the expert offsets back once).
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use ditmoe::moe::kernels::GemmConfig;
use ditmoe::moe::{ExpertDispatch, GeluMlp, StackedExperts, SwigluExpert};
use ditmoe::{ExecutionPlan, Precision};

struct Cfg {
    name: &'static str,
    d: usize,
    i: usize,
    e: usize,
    k: usize,
    tokens: usize,
    /// GEMMs per expert forward (3 for SwiGLU, 2 for GELU)
    gemms: usize,
}

/// One layer's trainable state: expert weight variables, token and router-score variables, the
/// routing picks and a probe for the loss `<out, probe>`.
struct Layer<M> {
    experts: Vec<M>,
    x: Var,
    scores: Var,
    ids: Tensor,
    probe: Tensor,
    /// The grouped-GEMM selection of the run's plan (its f32 kernel follows the precision).
    gemm: GemmConfig,
}

impl<M: StackedExperts> Layer<M> {
    /// `make(vb)`: one expert with its parameters drawn by the variable map's initialisers.
    fn new(c: &Cfg, plan: &ExecutionPlan, make: impl Fn(VarBuilder) -> candle_core::Result<M>) -> Result<Self> {
        let dev = &plan.device;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let experts = (0..c.e).map(|e| make(vb.pp(e.to_string()))).collect::<candle_core::Result<Vec<_>>>()?;
        let scores = candle_nn::ops::softmax_last_dim(&Tensor::randn(0f32, 1.0, (c.tokens, c.e), dev)?)?;
        let ids = scores.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, c.k)?.contiguous()?;
        Ok(Self {
            experts,
            x: Var::from_tensor(&Tensor::randn(0f32, 1.0, (c.tokens, c.d), dev)?)?,
            scores: Var::from_tensor(&scores)?,
            ids,
            probe: Tensor::randn(0f32, 1.0, (c.tokens, c.d), dev)?,
            gemm: plan.gemm,
        })
    }

    fn weights(&self) -> Result<Tensor> {
        Ok(self.scores.as_tensor().gather(&self.ids, 1)?)
    }

    /// Backward of `<out, probe>`; the gradient store is dropped, as after an optimizer step.
    fn step(&self, out: Tensor) -> Result<()> {
        (out * &self.probe)?.sum_all()?.backward()?;
        Ok(())
    }

    fn fused(&self) -> Result<()> {
        let perm = ditmoe::moe::kernels::permute_by_expert(&self.ids, self.experts.len())?;
        self.step(ditmoe::moe::kernels::routed_experts(self.x.as_tensor(), &self.weights()?, &M::stack(&self.experts)?, &perm, &self.gemm)?)
    }

    fn dense_masked(&self) -> Result<()> {
        let (s, e) = self.scores.as_tensor().dims2()?;
        let ones = Tensor::ones(self.ids.dims(), DType::F32, self.ids.device())?;
        let mask = Tensor::zeros((s, e), DType::F32, self.ids.device())?.scatter_add(&self.ids, &ones, 1)?;
        let dense = (self.scores.as_tensor() * mask)?;
        let mut out = Tensor::zeros_like(self.x.as_tensor())?;
        for (j, expert) in self.experts.iter().enumerate() {
            out = (out + expert.forward(self.x.as_tensor())?.broadcast_mul(&dense.narrow(1, j, 1)?)?)?;
        }
        self.step(out)
    }

    fn dispatch(&self) -> Result<()> {
        let out = ExpertDispatch::new(&self.ids, self.experts.len())?.run(self.x.as_tensor(), &self.weights()?, &self.experts)?;
        self.step(out)
    }

    /// One table row: fused, dense masked and (up to `dispatch_max` tokens) dispatch steps.
    fn row(&self, c: &Cfg, dev: &Device, budget: f64, dispatch_max: usize) -> Result<String> {
        let time = |f: &dyn Fn() -> Result<()>| ditmoe::runtime::timing::median_ms(dev, budget, || f().map_err(candle_core::Error::wrap));
        let fused = time(&|| self.fused())?;
        let dense = time(&|| self.dense_masked())?;
        // the dispatch's index_add backward is the slow one: not run at the largest size
        let dispatch = if c.tokens <= dispatch_max { Some(time(&|| self.dispatch())?) } else { None };
        // forward 3 GEMMs (SwiGLU; 2 for GELU), backward twice that, over S*k rows
        let flop = 2.0 * 3.0 * (c.gemms * c.tokens * c.k * c.d * c.i) as f64;
        let (d_ms, d_ratio) = dispatch.map_or(("not run".into(), "".into()), |d| (format!("{d:.2}"), format!("{:.1}x", d / fused)));
        Ok(format!(
            "| {} (D {}, I {}, E {}, top-{}) | {} | {fused:.2} | {dense:.2} | {:.1}x | {d_ms} | {d_ratio} | {:.1} |",
            c.name,
            c.d,
            c.i,
            c.e,
            c.k,
            c.tokens,
            dense / fused,
            flop / (fused * 1e-3) / 1e12
        ))
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dev = match args.iter().position(|a| a == "--device").and_then(|i| args.get(i + 1)).map(String::as_str) {
        Some("cpu") => Device::Cpu,
        Some("cuda") | None => Device::new_cuda(0)?,
        Some(other) => anyhow::bail!("--device {other}: expected cuda or cpu"),
    };
    let budget = if quick { 100.0 } else { 400.0 };
    // --tf32: f32 matmuls on TF32 tensor cores, as `ditmoe train` runs them on CUDA (candle's
    // cuBLAS matmuls and the grouped kernels alike)
    let tf32 = args.iter().any(|a| a == "--tf32");
    let plan = ExecutionPlan::training(&dev, if tf32 { Precision::Tf32 } else { Precision::F32 });
    plan.apply_matmul_precision();
    println!("f32 matmuls: {}\n", if tf32 { "TF32 (as ditmoe train)" } else { "full f32 (the grouped kernels 3xTF32)" });
    let big = if dev.is_cuda() { 16384 } else { 1024 };
    let cfg = |name, d, i, e, tokens, gemms| Cfg { name, d, i, e, k: 2, tokens, gemms };
    let swiglu = [
        // the bundled Fashion-MNIST model's layer (D 160, I 2D); on the GPU at a quarter and all
        // of its training batch (2048 images of 64 tokens)
        cfg("Fashion-MNIST SwiGLU", 160, 320, 8, 2 * big, 3),
        cfg("Fashion-MNIST SwiGLU", 160, 320, 8, 8 * big, 3),
        cfg("S SwiGLU", 384, 1536, 8, big, 3),
        cfg("XL SwiGLU", 1152, 4608, 8, big, 3),
    ];
    // ProMoE's GELU experts (with biases), E routed + the unconditional one
    let gelu = [cfg("ProMoE-S GELU", 384, 1536, 9, big, 2)];
    println!("| layer | tokens | fused ms | dense masked ms | dense / fused | dispatch ms | dispatch / fused | fused TFLOP/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in swiglu.iter().take(if quick { 3 } else { swiglu.len() }) {
        let make = |vb: VarBuilder| SwigluExpert::new(c.d, c.i, vb);
        println!("{}", Layer::new(c, &plan, make)?.row(c, &dev, budget, 2 * big)?);
    }
    for c in &gelu {
        let make = |vb: VarBuilder| GeluMlp::new(c.d, c.i, vb);
        println!("{}", Layer::new(c, &plan, make)?.row(c, &dev, budget, 2 * big)?);
    }
    Ok(())
}
