//! A VarBuilder backend that records the names and shapes a model asks for and hands back
//! broadcast zeros (no allocation), so even DiT-MoE-G (16.5 B parameters) can be "built" to
//! list its parameters.
use crate::config::DitConfig;
use crate::model::DitMoe;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

/// A parameter's name and shape.
pub type ParamShape = (String, Vec<usize>);

#[derive(Clone, Default)]
pub struct ShapeRecorder {
    seen: Arc<Mutex<Vec<ParamShape>>>,
}

impl ShapeRecorder {
    pub fn recorded(&self) -> Vec<ParamShape> {
        self.seen.lock().expect("recorder lock").clone()
    }
}

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.seen.lock().expect("recorder lock").push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder cannot provide `{name}` without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every parameter (official state-dict name and shape) the model of `cfg` has, in build order.
pub fn expected_parameters(cfg: &DitConfig) -> Result<Vec<ParamShape>> {
    let rec = ShapeRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    DitMoe::new(cfg, &crate::plan::ExecutionPlan::inference(&Device::Cpu, crate::plan::Precision::F32), vb)?;
    Ok(rec.recorded())
}
