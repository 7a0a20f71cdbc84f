//! Exponential moving average of the weights (official `train.update_ema`):
//! `ema = decay * ema + (1 - decay) * param`, started as an exact copy (`update_ema(decay=0)`).
use crate::train::kernels::foreach::ema_update;
use candle_core::{Device, Result, Tensor, Var};

pub struct Ema {
    /// (name, averaged tensor), in the order of the variables it follows.
    tensors: Vec<(String, Tensor)>,
}

impl Ema {
    /// A copy of the current weights, kept on `device` (the weights' own, or the host when the
    /// training state fills the GPU: `TrainConfig::ema_on_host`).
    pub fn new(vars: &[(String, Var)], device: &Device) -> Result<Self> {
        let tensors = vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_device(device)?.copy()?))).collect::<Result<_>>()?;
        Ok(Self { tensors })
    }

    /// One update with `decay` from the current weights (copied to the EMA's device first when
    /// they live elsewhere, one parameter at a time).
    pub fn update(&mut self, vars: &[(String, Var)], decay: f64) -> Result<()> {
        let device = match self.tensors.first() {
            Some((_, e)) => e.device().clone(),
            None => return Ok(()),
        };
        if !vars.iter().all(|(_, v)| v.device().same_device(&device)) {
            for ((_, e), (_, v)) in self.tensors.iter_mut().zip(vars) {
                let mut one = [e.clone()];
                ema_update(&mut one, &[v.as_tensor().to_device(&device)?], decay)?;
                let [updated] = one;
                *e = updated;
            }
            return Ok(());
        }
        let params: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let mut avgs: Vec<Tensor> = self.tensors.iter().map(|(_, e)| e.clone()).collect();
        ema_update(&mut avgs, &params, decay)?;
        for ((_, e), a) in self.tensors.iter_mut().zip(avgs) {
            *e = a;
        }
        Ok(())
    }

    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// Replaces the averages (resume); `named` must hold every name.
    pub fn load(&mut self, named: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for (name, e) in self.tensors.iter_mut() {
            let t = named.get(name).ok_or_else(|| candle_core::Error::Msg(format!("EMA state lacks `{name}`")))?;
            // A copy: the fused update writes the averages in place.
            *e = t.to_device(e.device())?.to_dtype(e.dtype())?.copy()?;
        }
        Ok(())
    }
}
