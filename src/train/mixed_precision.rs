//! The two copies of the weights in mixed-precision training: f32 master weights, which the
//! optimizer updates and checkpoints and the EMA hold, and the copies in the plan's compute
//! dtype that the model runs on (`--precision bf16`). This is the "master weights" scheme of
//! Micikevicius et al. 2018 (Mixed Precision Training, §3.1) as Megatron-Core's
//! `Float16OptimizerWithFloat16Params` runs it: the forward and backward see bf16 weights and
//! give bf16 gradients, each gradient is converted to f32 as it is taken, and after the update
//! the bf16 copies are refreshed from the masters.
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

    /// Copies the masters into the model's compute-dtype weights (after every update).
    pub fn sync(&self) -> Result<()> {
        if let Some(compute) = &self.compute {
            for ((_, master), model) in self.masters.iter().zip(compute) {
                model.set(&master.as_tensor().to_dtype(model.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Takes the gradient of the parameter `name` out of `grads` (the backward of a loss
    /// through the model), as a contiguous f32 tensor; None when the loss does not reach it (an
    /// expert no token was routed to). Taking it frees the compute-dtype gradient at once, so at
    /// most one parameter's gradient exists in both dtypes.
    pub fn take_grad(&self, grads: &mut GradStore, name: &str) -> Result<Option<Tensor>> {
        let index = self.masters.binary_search_by(|(n, _)| n.as_str().cmp(name)).map_err(|_| candle_core::Error::Msg(format!("no parameter `{name}`")))?;
        let model = match &self.compute {
            Some(compute) => &compute[index],
            None => &self.masters[index].1,
        };
        grads.remove(model.as_tensor()).map(|g| g.to_dtype(DType::F32)?.contiguous()).transpose()
    }

    /// Bytes per parameter beyond the f32 masters that the compute copies take: the weight and
    /// its gradient in the compute dtype.
    pub fn extra_bytes_per_param(compute: DType) -> u64 {
        match compute {
            DType::F32 => 0,
            d => 2 * d.size_in_bytes() as u64,
        }
    }
}
