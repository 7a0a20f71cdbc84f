//! Validation of a language model on a token stream: the mean next-token cross-entropy and its
//! perplexity over consecutive windows (each token predicted once, from up to `seq_len`
//! tokens of context), and each MoE layer's expert load over the same tokens.
use super::{cross_entropy, LmModel};
use candle_core::{bail, DType, Result, Tensor};

/// What [`evaluate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Windows of `seq_len + 1` tokens evaluated.
    pub windows: usize,
    /// Tokens predicted (`windows · seq_len`).
    pub tokens: usize,
    /// Mean cross-entropy in nats per token (no balance loss).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// The MoE layers' indices, in layer order.
    pub moe_layers: Vec<usize>,
    /// Per MoE layer, the fraction of routed slots each expert received.
    pub expert_load: Vec<Vec<f64>>,
}

/// Evaluates up to `max_windows` windows of `tokens`: window i is
/// `tokens[i·seq_len .. i·seq_len + seq_len + 1]`, run `batch_size` at a time.
pub fn evaluate(model: &LmModel, tokens: &[u32], seq_len: usize, batch_size: usize, max_windows: usize) -> Result<EvalReport> {
    if seq_len == 0 || batch_size == 0 {
        bail!("lm eval: seq_len and batch size must be positive")
    }
    let available = tokens.len().saturating_sub(1) / seq_len;
    let windows = available.min(max_windows);
    if windows == 0 {
        bail!("lm eval: {} tokens hold no window of {} tokens", tokens.len(), seq_len + 1)
    }
    let dev = model.device();
    let moe_layers = model.config().moe_layers();
    let mut counts: Vec<Vec<f64>> = Vec::new();
    let mut nll_sum = 0f64;
    for first in (0..windows).step_by(batch_size) {
        let n = batch_size.min(windows - first);
        let ids: Vec<u32> = (first..first + n).flat_map(|w| tokens[w * seq_len..w * seq_len + seq_len + 1].iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (n, seq_len + 1), dev)?;
        let out = model.forward(&ids, None, false)?;
        nll_sum += cross_entropy(&out.logits, &ids)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * (n * seq_len) as f64;
        for (l, c) in out.expert_counts.iter().enumerate() {
            let c: Vec<u32> = c.to_dtype(DType::U32)?.to_vec1()?;
            if counts.len() <= l {
                counts.push(vec![0.0; c.len()]);
            }
            counts[l].iter_mut().zip(&c).for_each(|(acc, &x)| *acc += x as f64);
        }
    }
    let predicted = windows * seq_len;
    let loss = nll_sum / predicted as f64;
    let expert_load = counts
        .into_iter()
        .map(|c| {
            let total: f64 = c.iter().sum();
            c.into_iter().map(|x| x / total.max(1.0)).collect()
        })
        .collect();
    Ok(EvalReport { windows, tokens: predicted, loss, perplexity: loss.exp(), moe_layers, expert_load })
}
