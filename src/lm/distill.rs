//! Mixture-of-Students (MoS) distillation (DeepSpeed-MoE, Rajbhandari et al. 2022, sec. 5): a
//! smaller MoE student learns from the next-token distributions of a frozen, trained teacher
//! on the same windows, as Megatron-DeepSpeed's `pretrain_gpt.py` does it with `--mos`.
//!
//! The teacher ([`Teacher`]) is an HF-layout model folder loaded on the same engine with its
//! own frozen plan (constants, no autograd history, the fused inference kernels on CUDA) and
//! run in evaluation mode. [`mos_kl`] is the distillation term; the trainer
//! (`super::trainer`) adds `beta · mos_kl` to the student's loss while
//! [`super::train_config::DistillConfig::distils_at`] says so.
use super::{load_hf, LmConfig, LmModel};
use crate::plan::ExecutionPlan;
use candle_core::{bail, DType, Result, Tensor, D};
use std::path::{Path, PathBuf};

/// A frozen teacher model and the folder it came from.
pub struct Teacher {
    model: LmModel,
    dir: PathBuf,
}

impl Teacher {
    /// Loads the teacher in `dir` with `plan` (a frozen plan) and checks it can teach `student`
    /// on windows of `window` tokens: the same vocabulary (the two distributions are compared
    /// token id by token id) and a context that holds the window. Errors name the teacher's
    /// folder and the field.
    pub fn load(dir: &Path, plan: &ExecutionPlan, student: &LmConfig, window: usize) -> Result<Self> {
        if plan.trainable() {
            bail!("lm distill: the teacher needs a frozen plan")
        }
        let model = load_hf(dir, plan).map_err(|e| candle_core::Error::Msg(format!("teacher {}: {e}", dir.display())))?;
        let cfg = model.config();
        if cfg.vocab_size != student.vocab_size {
            bail!(
                "teacher {}: vocab_size {} differs from the student's vocab_size {}; distillation compares the two distributions token by token, so both need the same tokenizer",
                dir.join("config.json").display(),
                cfg.vocab_size,
                student.vocab_size
            )
        }
        if window > cfg.max_position_embeddings {
            bail!("teacher {}: windows of {window} tokens exceed its max_position_embeddings {}", dir.join("config.json").display(), cfg.max_position_embeddings)
        }
        Ok(Self { model, dir: dir.into() })
    }

    pub fn model(&self) -> &LmModel {
        &self.model
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The teacher's logits `[B, T, V]` f32 on `input_ids` `[B, T]`, in evaluation mode (its
    /// MoE layers drop by their evaluation capacity, as a served model does).
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.model.forward(input_ids, None, false)?.logits.detach())
    }
}

/// The distillation term of Megatron-DeepSpeed's `calculate_mos_loss` (`pretrain_gpt.py`,
/// before `beta`):
///
/// ```text
/// T² · KLDivLoss(reduction="batchmean")(log_softmax(student / T), softmax(teacher / T)) / seq_length
/// ```
///
/// There the logits are `[b, s, V]`, so `batchmean` divides the summed KL by `b` and the
/// division by `seq_length` makes it the mean over the `b · s` token positions of
/// `Σ_v p_v (log p_v − log q_v)`. Our windows are `seq_len + 1` tokens whose last position has
/// no label (the cross-entropy uses the first `T − 1`, [`super::cross_entropy`]); the mean here
/// is over those same `B · (T − 1)` positions, which is Megatron's `b · seq_length` positions,
/// each of which predicts a label. `log p` is the teacher's log-softmax (not the log of its
/// softmax, which underflows to `-inf` where the probability is 0 in f32; `kl_div` takes
/// `0 · log 0` as 0, and so does `exp(log p) · log p` for a finite `log p`). f32 throughout;
/// the teacher's logits carry no gradient.
pub fn mos_kl(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, t, v) = student_logits.dims3()?;
    if teacher_logits.dims() != student_logits.dims() {
        bail!("lm distill: teacher logits {:?} do not match the student's {:?}", teacher_logits.dims(), student_logits.dims())
    }
    if t < 2 {
        bail!("lm distill: the distillation term needs at least 2 positions, got {t}")
    }
    let n = b * (t - 1);
    let scaled = |logits: &Tensor| -> Result<Tensor> {
        let x = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.reshape((n, v))?;
        candle_nn::ops::log_softmax(&(x / temperature)?, D::Minus1)
    };
    let log_q = scaled(student_logits)?;
    let log_p = scaled(&teacher_logits.detach())?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum_all()?;
    kl * (temperature * temperature / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The formula written out per position in f64: mean over positions of
    /// `T² Σ_v p_v (log p_v − log q_v)`.
    fn by_hand(s: &[f32], t: &[f32], positions: usize, v: usize, temp: f64) -> f64 {
        let log_softmax = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().map(|&a| a as f64 / temp).fold(f64::MIN, f64::max);
            let z: f64 = x.iter().map(|&a| (a as f64 / temp - m).exp()).sum();
            x.iter().map(|&a| a as f64 / temp - m - z.ln()).collect()
        };
        let mut total = 0.0;
        for i in 0..positions {
            let (lq, lp) = (log_softmax(&s[i * v..(i + 1) * v]), log_softmax(&t[i * v..(i + 1) * v]));
            total += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
        }
        temp * temp * total / positions as f64
    }

    #[test]
    fn mos_kl_is_the_per_position_mean_scaled_by_t_squared() {
        let (b, t, v) = (2, 4, 5);
        let s: Vec<f32> = (0..b * t * v).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let te: Vec<f32> = (0..b * t * v).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.4).collect();
        let st = Tensor::from_vec(s.clone(), (b, t, v), &Device::Cpu).unwrap();
        let tt = Tensor::from_vec(te.clone(), (b, t, v), &Device::Cpu).unwrap();
        for temp in [1.0, 2.0] {
            let got = mos_kl(&st, &tt, temp).unwrap().to_scalar::<f32>().unwrap() as f64;
            // the positions with a label: each row's first t - 1
            let keep = |x: &[f32]| -> Vec<f32> { (0..b).flat_map(|r| x[r * t * v..(r * t + t - 1) * v].to_vec()).collect() };
            let want = by_hand(&keep(&s), &keep(&te), b * (t - 1), v, temp);
            assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "T = {temp}: {got} vs {want}");
        }
        assert!(mos_kl(&tt, &tt, 1.0).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-6, "no divergence from itself");
    }
}
