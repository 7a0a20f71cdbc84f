//! The two copies of the weights in mixed-precision training: f32 master weights, which the
//! optimizer updates and checkpoints and the EMA hold, and the copies in the plan's compute
//! dtype that the model runs on (`--precision bf16`). This is the "master weights" scheme of
//! Micikevicius et al. 2018 (Mixed Precision Training, §3.1) as Megatron-Core's
//! `Float16OptimizerWithFloat16Params` runs it: the forward and backward see bf16 weights and
//! give bf16 gradients, the optimizer updates the f32 masters, and the bf16 copies are then
//! refreshed from them. Unlike Megatron (which copies each gradient into an fp32 `main_grad`
//! and the masters back to the model in a second pass), the AdamW kernel reads the bf16
//! gradients as they are, widening each element to f32 (apex's `FusedAdam` with half gradients
//! and fp32 masters), and writes the bf16 copies in the update's own pass
//! (`AdamW::with_model_copies`): no f32 copy of the gradients exists. Gradients summed over
//! micro-batches or ranks are summed in f32, as Megatron does for bf16
//! (`accumulate_allreduce_grads_in_fp32`): a bf16 sum would round every addition.
//!
//! In an f32 or TF32 plan there is one copy: the model runs on the masters.
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;

pub struct TrainingWeights {
    /// (name, f32 variable), sorted by name.
    masters: Vec<(String, Var)>,
    /// The model's variables in its compute dtype, aligned with `masters`; None when that dtype
    /// is f32 and the model runs on the masters themselves.
    compute: Option<Vec<Var>>,
}

impl TrainingWeights {
    /// The weights of a model built on `model_vars` (its `VarMap`, in the compute dtype):
    /// when that dtype is not f32, f32 masters of the same names and shapes are made. Their
    /// values are set afterwards (initialisation, a checkpoint), then [`Self::sync`] copies
    /// them to the model.
    pub fn new(model_vars: &VarMap) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = model_vars.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        if vars.iter().all(|(_, v)| v.dtype() == DType::F32) {
            return Ok(Self { masters: vars, compute: None });
        }
        let masters = vars.iter().map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?))).collect::<Result<Vec<_>>>()?;
        Ok(Self { masters, compute: Some(vars.into_iter().map(|(_, v)| v).collect()) })
    }

    /// The f32 master weights, sorted by name.
    pub fn masters(&self) -> &[(String, Var)] {
        &self.masters
    }

    /// The model's compute-dtype weights of the masters `names` (for the optimizer to write);
    /// None when the model runs on the masters.
    pub fn model_copies(&self, names: &[String]) -> Result<Option<Vec<Var>>> {
        let Some(compute) = &self.compute else { return Ok(None) };
        names.iter().map(|name| Ok(compute[self.index(name)?].clone())).collect::<Result<Vec<_>>>().map(Some)
    }

    /// Copies the masters into the model's compute-dtype weights (after they are initialised or
    /// loaded; the optimizer keeps the copies of the weights it updates in step itself).
    pub fn sync(&self) -> Result<()> {
        if let Some(compute) = &self.compute {
            for ((_, master), model) in self.masters.iter().zip(compute) {
                model.set(&master.as_tensor().to_dtype(model.dtype())?)?;
            }
        }
        Ok(())
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.masters.binary_search_by(|(n, _)| n.as_str().cmp(name)).map_err(|_| candle_core::Error::Msg(format!("no parameter `{name}`")))
    }

    /// Takes the gradient of the parameter `name` out of `grads` (the backward of a loss
    /// through the model), contiguous and in the model's compute dtype (the optimizer widens a
    /// bf16 gradient per element as it reads it); with `f32`, converted to f32 (for a sum over
    /// micro-batches or ranks), freeing the compute-dtype one at once. None when the loss does
    /// not reach the parameter (an expert no token was routed to).
    pub fn take_grad(&self, grads: &mut GradStore, name: &str, f32: bool) -> Result<Option<Tensor>> {
        let index = self.index(name)?;
        let model = match &self.compute {
            Some(compute) => &compute[index],
            None => &self.masters[index].1,
        };
        let dtype = if f32 { DType::F32 } else { model.dtype() };
        grads.remove(model.as_tensor()).map(|g| g.to_dtype(dtype)?.contiguous()).transpose()
    }

    /// A zero gradient for the parameter `name` (one the loss did not reach), in the dtype
    /// [`Self::take_grad`] gives with the same `f32`.
    pub fn zero_grad(&self, name: &str, f32: bool) -> Result<Tensor> {
        let index = self.index(name)?;
        let master = self.masters[index].1.as_tensor();
        let dtype = match &self.compute {
            Some(compute) if !f32 => compute[index].dtype(),
            _ => DType::F32,
        };
        Tensor::zeros(master.dims(), dtype, master.device())
    }

    /// Bytes per parameter of the weights and their gradients: the f32 master; in a plan whose
    /// compute dtype is not f32, the model's copy in that dtype; the gradient, in the compute
    /// dtype (`f32_grads`: in f32, as a sum over micro-batches or ranks is kept).
    pub fn bytes_per_param(compute: DType, f32_grads: bool) -> u64 {
        let copy = if compute == DType::F32 { 0 } else { compute.size_in_bytes() };
        let grad = if f32_grads { 4 } else { compute.size_in_bytes() };
        (4 + copy + grad) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Master, model copy and gradient: a bf16 plan's single-batch gradients are bf16.
    #[test]
    fn bytes_per_param_counts_the_gradient_in_its_dtype() {
        assert_eq!(TrainingWeights::bytes_per_param(DType::F32, false), 8);
        assert_eq!(TrainingWeights::bytes_per_param(DType::F32, true), 8);
        assert_eq!(TrainingWeights::bytes_per_param(DType::BF16, false), 8);
        assert_eq!(TrainingWeights::bytes_per_param(DType::BF16, true), 10);
    }
}
