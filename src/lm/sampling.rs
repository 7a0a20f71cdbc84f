//! Token sampling for text generation, as transformers' `generate(do_sample=True)` composes its
//! logits warpers: temperature, then top-k, then top-p (nucleus), then a draw from the
//! renormalised distribution; temperature 0 is greedy decoding (argmax). Draws come from a
//! seeded generator, so a (prompt, settings, seed) triple always gives the same text.
use candle_core::{bail, DType, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by it; 0 = greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl SamplingParams {
    pub const GREEDY: Self = Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };

    /// Refuses settings with no meaning, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be finite and >= 0, got {}", self.temperature)
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p)
        }
        Ok(())
    }
}

/// Draws tokens with [`SamplingParams`].
pub struct TokenSampler {
    params: SamplingParams,
    rng: StdRng,
}

impl TokenSampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { params, rng: StdRng::seed_from_u64(params.seed) })
    }

    /// The next token from one position's logits `[V]`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        if logits.iter().any(|l| l.is_nan()) {
            bail!("lm: the model produced NaN logits")
        }
        let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32;
        if self.params.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        // candidates by descending logit (ties by id, as a stable sort leaves them)
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let t = self.params.temperature as f32;
        let max = logits[order[0]] / t;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] / t - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            // transformers' TopPLogitsWarper keeps the tokens whose cumulative probability,
            // most likely first, has not yet passed p, and always the first
            let mut cumulative = 0.0;
            let keep = probs.iter().take_while(|&&p| {
                let inside = cumulative < self.params.top_p;
                cumulative += p;
                inside
            });
            let n = keep.count().max(1);
            order.truncate(n);
            probs.truncate(n);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (&id, &p) in order.iter().zip(&probs) {
            if u < p {
                return Ok(id as u32);
            }
            u -= p;
        }
        Ok(*order.last().expect("at least one candidate") as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = TokenSampler::new(SamplingParams::GREEDY).unwrap();
        assert_eq!(s.sample(&logits(&[0.1, 3.0, -1.0, 2.9])).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let p = SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 };
        let mut s = TokenSampler::new(p).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits(&[0.1, 3.0, -1.0, 2.9])).unwrap(), 1);
        }
        // p = 0.5: token 0 alone holds 0.88 of the mass
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 3 };
        let mut s = TokenSampler::new(p).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits(&[4.0, 2.0, 0.0, -2.0])).unwrap(), 0);
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_seed() {
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 };
        let draw = || {
            let mut s = TokenSampler::new(p).unwrap();
            (0..2000).map(|_| s.sample(&logits(&[0.0, (3f32).ln()])).unwrap()).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw(), "the same seed draws the same tokens");
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.04, "P(1) = 0.75, drew {ones}");
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let bad = SamplingParams { temperature: -1.0, ..SamplingParams::GREEDY };
        assert!(TokenSampler::new(bad).err().unwrap().to_string().contains("--temperature"));
        let bad = SamplingParams { top_p: 0.0, ..SamplingParams::GREEDY };
        assert!(TokenSampler::new(bad).err().unwrap().to_string().contains("--top-p"));
    }
}
