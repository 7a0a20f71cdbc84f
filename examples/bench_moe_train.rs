//! Benchmark of the MoE layer's training step (forward + backward of the routed experts, f32
//! as the trainer runs): the fused kernels with their backward (`kernels::routed_swiglu`, the
//! CUDA training path) against the two candle forms it replaces, measured in the same run:
//! - *dense masked*: every expert on every token, weighted by `scores * mask` (the CUDA
//!   training path before `routed_swiglu`; E/k times the routed FLOPs, no host read);
//! - *dispatch*: the sorted candle dispatch (`moe::ExpertDispatch`, index_select + index_add,
//!   the CPU path), whose CUDA `index_add` backward loops over all slots per column.
//!
//! ```text
//! ../shared/scripts/build-cuda.sh build --release --example bench_moe_train
//! ./bench_moe_train [--device cuda|cpu] [--quick]
//! ```
//! Each step includes stacking the per-expert weight variables (as the trainer's layer does) and
//! the gradients reaching the router scores, the tokens and every expert weight. Timing: median
//! of CUDA events around whole steps (each step reads the expert offsets back once).
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use ditmoe::moe::{stack_expert_weights, ExpertDispatch, SwigluExpert};

struct Cfg {
    name: &'static str,
    d: usize,
    i: usize,
    e: usize,
    k: usize,
    tokens: usize,
}

/// One layer's trainable state: expert weight variables, token and router-score variables, the
/// routing picks and a probe for the loss `<out, probe>`.
struct Layer {
    experts: Vec<SwigluExpert>,
    x: Var,
    scores: Var,
    ids: Tensor,
    probe: Tensor,
}

impl Layer {
    fn new(c: &Cfg, dev: &Device) -> Result<Self> {
        let w = |o: usize, i: usize| -> Result<Tensor> { Ok(Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, i), dev)? / (i as f64).sqrt())?)?.as_tensor().clone()) };
        let experts = (0..c.e).map(|_| Ok(SwigluExpert::from_weights(w(c.i, c.d)?, w(c.i, c.d)?, w(c.d, c.i)?))).collect::<Result<Vec<_>>>()?;
        let scores = candle_nn::ops::softmax_last_dim(&Tensor::randn(0f32, 1.0, (c.tokens, c.e), dev)?)?;
        let ids = scores.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, c.k)?.contiguous()?;
        Ok(Self {
            experts,
            x: Var::from_tensor(&Tensor::randn(0f32, 1.0, (c.tokens, c.d), dev)?)?,
            scores: Var::from_tensor(&scores)?,
            ids,
            probe: Tensor::randn(0f32, 1.0, (c.tokens, c.d), dev)?,
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
        let perm = ditmoe::kernels::permute_by_expert(&self.ids, self.experts.len())?;
        let stacks = stack_expert_weights(&self.experts)?;
        self.step(ditmoe::kernels::routed_swiglu(self.x.as_tensor(), &self.weights()?, &stacks, &perm)?)
    }

    fn dense_masked(&self) -> Result<()> {
        let (s, e) = self.scores.as_tensor().dims2()?;
        let ones = Tensor::ones(self.ids.dims(), DType::F32, self.ids.device())?;
        let mask = Tensor::zeros((s, e), DType::F32, self.ids.device())?.scatter_add(&self.ids, &ones, 1)?;
        let dense = (self.scores.as_tensor() * mask)?;
        let mut out = Tensor::zeros_like(self.x.as_tensor())?;
        for (j, expert) in self.experts.iter().enumerate() {
            out = (out + candle_core::Module::forward(expert, self.x.as_tensor())?.broadcast_mul(&dense.narrow(1, j, 1)?)?)?;
        }
        self.step(out)
    }

    fn dispatch(&self) -> Result<()> {
        let out = ExpertDispatch::new(&self.ids, self.experts.len())?.run(self.x.as_tensor(), &self.weights()?, &self.experts)?;
        self.step(out)
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
    let big = if dev.is_cuda() { 16384 } else { 1024 };
    let cfgs = [
        // the bundled Fashion-MNIST model's layer (D 160, I 2D); on the GPU at a quarter and all
        // of its training batch (2048 images of 64 tokens)
        Cfg { name: "Fashion-MNIST", d: 160, i: 320, e: 8, k: 2, tokens: 2 * big },
        Cfg { name: "Fashion-MNIST", d: 160, i: 320, e: 8, k: 2, tokens: 8 * big },
        Cfg { name: "S", d: 384, i: 1536, e: 8, k: 2, tokens: big },
        Cfg { name: "XL", d: 1152, i: 4608, e: 8, k: 2, tokens: big },
    ];
    println!("| layer | tokens | fused ms | dense masked ms | dense / fused | dispatch ms | dispatch / fused | fused TFLOP/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cfgs.iter().take(if quick { 3 } else { cfgs.len() }) {
        let layer = Layer::new(c, &dev)?;
        let time = |f: &dyn Fn() -> Result<()>| ditmoe::kernels::timing::median_ms(&dev, budget, || f().map_err(candle_core::Error::wrap));
        let fused = time(&|| layer.fused())?;
        let dense = time(&|| layer.dense_masked())?;
        // the dispatch's index_add backward is the slow one: not run at the largest size
        let dispatch = if c.tokens <= 2 * big { Some(time(&|| layer.dispatch())?) } else { None };
        // forward 3 GEMMs, backward 6 (data and weight gradients of each), over S*k rows
        let flop = 2.0 * 9.0 * (c.tokens * c.k * c.d * c.i) as f64;
        let (d_ms, d_ratio) = dispatch.map_or(("not run".into(), "".into()), |d| (format!("{d:.2}"), format!("{:.1}x", d / fused)));
        println!(
            "| {} (D {}, I {}, E {}, top-{}) | {} | {fused:.2} | {dense:.2} | {:.1}x | {d_ms} | {d_ratio} | {:.1} |",
            c.name,
            c.d,
            c.i,
            c.e,
            c.k,
            c.tokens,
            dense / fused,
            flop / (fused * 1e-3) / 1e12
        );
    }
    Ok(())
}
