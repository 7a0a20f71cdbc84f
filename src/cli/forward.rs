//! `ditmoe forward`: one forward pass on an inputs safetensors (`x`, `t`, `y`), writing the
//! output, the guided output, the per-layer balance losses and the routing record under the
//! fixtures' names, so any model folder can be checked against the official code.
use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;
use ditmoe::checkpoint::{write_safetensors_atomic, ModelDir};
use ditmoe::model::{ForwardMode, Trace};
use std::path::PathBuf;

#[derive(Args)]
pub struct ForwardArgs {
    /// Model folder (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Safetensors with `x` (N,C,H,W f32), `t` (N) and `y` (N int64).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the outputs (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Also write `out_cfg` (official forward_with_cfg layout: guidance on the first 3 channels).
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Also write every intermediate (`embed.*`, `blocks.<l>.*`, `final.out`).
    #[arg(long)]
    trace: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(a: ForwardArgs) -> anyhow::Result<()> {
    if let Some(s) = a.cfg_scale.filter(|s| !s.is_finite()) {
        return Err(super::usage(format!("--cfg-scale {s}: must be a finite number")));
    }
    // the same file, named twice or through another path: writing the outputs would destroy the inputs
    let same_file = a.inputs == a.output || std::fs::canonicalize(&a.inputs).ok().is_some_and(|i| std::fs::canonicalize(&a.output).ok() == Some(i));
    if same_file {
        return Err(super::usage(format!("--output {}: is the --inputs file; writing there would overwrite the inputs", a.output.display())));
    }
    let plan = super::inference_plan(&a.device, &a.dtype)?;
    let device = plan.device.clone();
    let dir = ModelDir::open(&a.model)?;
    let model = dir.load(&plan)?;
    let inputs = candle_core::safetensors::load(&a.inputs, &device)
        .map_err(|e| super::usage(format!("--inputs {}: {e}", a.inputs.display())))?;
    let get = |name: &str| -> anyhow::Result<&Tensor> {
        inputs.get(name).ok_or_else(|| super::usage(format!("--inputs {}: no tensor `{name}`", a.inputs.display())))
    };
    let (x, t, y) = (get("x")?, get("t")?, get("y")?);
    let labels = y.to_dtype(DType::I64)?.to_vec1::<i64>().map_err(|e| super::usage(format!("--inputs: `y`: {e}")))?;
    let rows = dir.config.label_table_rows() as i64;
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l >= rows) {
        return Err(super::usage(format!("--inputs: `y` holds class {bad}, outside 0..{rows} (num_classes {} + null)", dir.config.num_classes)));
    }

    let mut trace = Trace { record_routing: true, record_intermediates: a.trace, ..Trace::default() };
    let out = model.forward_full(x, t, y, ForwardMode::Eval, &mut trace).context("forward pass")?;
    let train = model.forward_full(x, t, y, ForwardMode::Train, &mut Trace::default())?;

    let mut tensors: Vec<(String, Tensor)> = vec![
        ("out".into(), out.out.to_dtype(DType::F32)?),
        ("aux_loss".into(), Tensor::stack(&train.aux_losses, 0)?.to_dtype(DType::F32)?),
    ];
    if let Some(s) = a.cfg_scale {
        let guided = model.forward_with_cfg(x, t, y, s, 3, &mut Trace::default())?;
        tensors.push(("out_cfg".into(), guided.to_dtype(DType::F32)?));
    }
    for r in &trace.routing {
        // Named by block index: ProMoE models route only in their odd blocks.
        let l = r.layer;
        tensors.push((format!("routing.{l}.experts"), r.experts.to_dtype(DType::I64)?));
        tensors.push((format!("routing.{l}.weights"), r.weights.clone()));
    }
    for (name, t) in trace.intermediates {
        tensors.push((name, t.to_dtype(DType::F32)?));
    }
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| super::usage(format!("--output {}: {e}", parent.display())))?;
    }
    write_safetensors_atomic(&a.output, &tensors).map_err(|e| super::usage(format!("--output: {e}")))?;
    println!("wrote {} tensors to {}", tensors.len(), a.output.display());
    Ok(())
}
