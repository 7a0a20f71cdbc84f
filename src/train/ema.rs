//! Exponential moving average of the weights (official `train.update_ema`):
//! `ema = decay * ema + (1 - decay) * param`, started as an exact copy (`update_ema(decay=0)`).
//!
//! Two placements, decided once by the trainer's config:
//! - beside the weights (the default): the fused multi-tensor kernel on the GPU, candle's ops on
//!   the CPU;
//! - in host memory (`ema_on_host`), for a training state that leaves no room for an f32 copy of
//!   every weight on the GPU. Each update copies the weights to the host and updates the
//!   averages in place on every core, in the same f32 roundings as the candle ops.
//!
//! `ema_every = n` averages every n-th optimizer step with the product of the n steps' decays
//! (as ema-pytorch's `update_every`, keeping the average's time constant): exact while the
//! weights stand still, and n times fewer host copies. Pending steps are applied before the
//! averages are read ([`Ema::flush`]), so checkpoints, exports and sample grids see every step.
use crate::train::kernels::foreach::ema_update;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};

pub struct Ema {
    names: Vec<String>,
    averages: Averages,
    /// The host update's copy of one weight, reused from weight to weight and step to step.
    staging: Vec<f32>,
    every: u64,
    /// The product of the decays of the steps not yet averaged in (None: none pending).
    pending: Option<f64>,
}

enum Averages {
    /// On the weights' device, updated by [`ema_update`].
    WithWeights(Vec<Tensor>),
    /// f32 values in host memory with their shapes, updated in place.
    Host(Vec<(Vec<f32>, Shape)>),
}

impl Ema {
    /// A copy of the current weights, beside them or (`on_host`) in host memory, averaged every
    /// `every` steps (at least 1).
    pub fn new(vars: &[(String, Var)], on_host: bool, every: u64) -> Result<Self> {
        if every == 0 {
            candle_core::bail!("EMA: ema_every must be at least 1")
        }
        let names = vars.iter().map(|(n, _)| n.clone()).collect();
        let averages = match on_host {
            false => Averages::WithWeights(vars.iter().map(|(_, v)| v.as_tensor().detach().copy()).collect::<Result<_>>()?),
            true => Averages::Host(vars.iter().map(|(n, v)| Ok((host_values(n, v.as_tensor())?, v.shape().clone()))).collect::<Result<_>>()?),
        };
        Ok(Self { names, averages, staging: Vec::new(), every, pending: None })
    }

    /// Optimizer step `step` (1-based) is done: averages it in with `decay`, or, between two
    /// `every`-th steps, folds `decay` into the pending product.
    pub fn step(&mut self, vars: &[(String, Var)], decay: f64, step: u64) -> Result<()> {
        self.pending = Some(self.pending.unwrap_or(1.0) * decay);
        if step.is_multiple_of(self.every) {
            self.flush(vars)?;
        }
        Ok(())
    }

    /// Averages the pending steps in, with the product of their decays.
    pub fn flush(&mut self, vars: &[(String, Var)]) -> Result<()> {
        let Some(decay) = self.pending.take() else { return Ok(()) };
        if vars.len() != self.names.len() {
            candle_core::bail!("EMA: {} averages for {} weights", self.names.len(), vars.len())
        }
        match &mut self.averages {
            Averages::WithWeights(avgs) => {
                let params: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
                ema_update(avgs, &params, decay)
            }
            Averages::Host(avgs) => {
                for ((avg, shape), (name, v)) in avgs.iter_mut().zip(vars) {
                    if v.shape() != shape {
                        candle_core::bail!("EMA: `{name}` is {:?}, its average {:?}", v.dims(), shape.dims())
                    }
                    copy_to_host(name, v.as_tensor(), &mut self.staging)?;
                    update_in_place(avg, &self.staging, decay);
                }
                Ok(())
            }
        }
    }

    /// The averages by name (host ones as CPU tensors), as of the last update: call
    /// [`Self::flush`] first to include pending steps.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let tensors = match &self.averages {
            Averages::WithWeights(avgs) => avgs.clone(),
            Averages::Host(avgs) => avgs.iter().map(|(v, s)| Tensor::from_slice(v, s, &Device::Cpu)).collect::<Result<_>>()?,
        };
        Ok(self.names.iter().cloned().zip(tensors).collect())
    }

    /// Replaces the averages (resume); `named` must hold every name.
    pub fn load(&mut self, named: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let get = |name: &String| named.get(name).ok_or_else(|| candle_core::Error::Msg(format!("EMA state lacks `{name}`")));
        match &mut self.averages {
            Averages::WithWeights(avgs) => {
                for (name, e) in self.names.iter().zip(avgs.iter_mut()) {
                    // A copy: the fused update writes the averages in place.
                    *e = get(name)?.to_device(e.device())?.to_dtype(e.dtype())?.copy()?;
                }
            }
            Averages::Host(avgs) => {
                for (name, (avg, shape)) in self.names.iter().zip(avgs.iter_mut()) {
                    let t = get(name)?;
                    if t.shape() != shape {
                        candle_core::bail!("EMA state: `{name}` is {:?}, the model's {:?}", t.dims(), shape.dims())
                    }
                    *avg = host_values(name, &t.to_dtype(DType::F32)?)?;
                }
            }
        }
        self.pending = None;
        Ok(())
    }
}

/// An f32 tensor's values into `buf` (reused on the GPU, see `runtime::cuda::copy_to_host`).
fn copy_to_host(name: &str, t: &Tensor, buf: &mut Vec<f32>) -> Result<()> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("EMA on the host: `{name}` is {:?}, the averages are f32", t.dtype())
    }
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return crate::runtime::cuda::copy_to_host(t, buf);
    }
    *buf = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(())
}

/// An f32 tensor's values in a new host buffer.
fn host_values(name: &str, t: &Tensor) -> Result<Vec<f32>> {
    let mut values = Vec::new();
    copy_to_host(name, t, &mut values)?;
    Ok(values)
}

/// `avg = avg * decay + param * (1 - decay)` in f32, rounded as candle's `affine` and `add`
/// (each product rounded, then the sum), on every core: the host update is memory-bound, and a
/// large model's averages are gigabytes.
fn update_in_place(avg: &mut [f32], param: &[f32], decay: f64) {
    const CHUNK: usize = 1 << 20;
    let (d, c) = (decay as f32, (1.0 - decay) as f32);
    let update = |a: &mut [f32], p: &[f32]| a.iter_mut().zip(p).for_each(|(a, &p)| *a = *a * d + p * c);
    if avg.len() <= CHUNK {
        return update(avg, param);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = avg.len().div_ceil(threads).next_multiple_of(CHUNK);
    std::thread::scope(|s| {
        for (a, p) in avg.chunks_mut(per_thread).zip(param.chunks(per_thread)) {
            s.spawn(move || update(a, p));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(values: &[Vec<f32>]) -> Vec<(String, Var)> {
        values.iter().enumerate().map(|(i, v)| (format!("w{i}"), Var::from_tensor(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap()).unwrap())).collect()
    }

    fn set(vars: &[(String, Var)], step: usize) {
        for (i, (_, v)) in vars.iter().enumerate() {
            let n = v.elem_count();
            let values: Vec<f32> = (0..n).map(|j| ((step * 31 + i * 7 + j) as f32 * 0.37).sin()).collect();
            v.set(&Tensor::new(values.as_slice(), &Device::Cpu).unwrap()).unwrap();
        }
    }

    fn values(ema: &Ema) -> Vec<Vec<f32>> {
        ema.tensors().unwrap().iter().map(|(_, t)| t.to_vec1::<f32>().unwrap()).collect()
    }

    /// Both placements round alike: the host's in-place update (threaded past one chunk) equals
    /// candle's ops bit for bit.
    #[test]
    fn host_averages_equal_the_candle_ops_bit_for_bit() {
        let vars = vars(&[vec![0.0; 5], vec![0.0; (1 << 20) + 3 * 4099]]);
        set(&vars, 0);
        let mut beside = Ema::new(&vars, false, 1).unwrap();
        let mut host = Ema::new(&vars, true, 1).unwrap();
        for step in 1..=4u64 {
            set(&vars, step as usize);
            let decay = 0.9 + 0.02 * step as f64;
            beside.step(&vars, decay, step).unwrap();
            host.step(&vars, decay, step).unwrap();
        }
        let (b, h) = (values(&beside), values(&host));
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), h.iter().map(Vec::len).collect::<Vec<_>>());
        for (b, h) in b.iter().zip(&h) {
            assert!(b.iter().zip(h).all(|(x, y)| x.to_bits() == y.to_bits()), "host and candle averages differ");
        }
    }

    /// `every = 3`: steps 3 and 6 average with the product of three decays; a flush applies what
    /// is pending; in between nothing moves.
    #[test]
    fn every_nth_step_averages_with_the_product_of_the_decays() {
        let vars = vars(&[vec![0.0; 4]]);
        set(&vars, 0);
        let start = vars[0].1.as_tensor().to_vec1::<f32>().unwrap();
        let mut ema = Ema::new(&vars, true, 3).unwrap();
        let decays = [0.5, 0.8, 0.9, 0.7, 0.6];
        for (i, &d) in decays.iter().enumerate() {
            let step = i as u64 + 1;
            set(&vars, step as usize);
            ema.step(&vars, d, step).unwrap();
            let got = values(&ema).remove(0);
            if step < 3 {
                assert_eq!(got, start, "step {step} moved the average");
            }
            if step == 3 {
                let p = vars[0].1.as_tensor().to_vec1::<f32>().unwrap();
                let d = (0.5f64 * 0.8 * 0.9) as f32;
                let want: Vec<f32> = start.iter().zip(&p).map(|(&a, &p)| a * d + p * (1.0 - 0.5f64 * 0.8 * 0.9) as f32).collect();
                assert_eq!(got, want);
            }
        }
        let before = values(&ema).remove(0);
        ema.flush(&vars).unwrap();
        let p = vars[0].1.as_tensor().to_vec1::<f32>().unwrap();
        let d = 0.7f64 * 0.6;
        let want: Vec<f32> = before.iter().zip(&p).map(|(&a, &p)| a * d as f32 + p * (1.0 - d) as f32).collect();
        assert_eq!(values(&ema).remove(0), want);
        // nothing pending: a second flush changes nothing
        ema.flush(&vars).unwrap();
        assert_eq!(values(&ema).remove(0), want);
    }
}
