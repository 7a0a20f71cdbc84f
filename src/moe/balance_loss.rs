//! The expert-level balance loss of DiT-MoE (official `MoEGate.forward`, training mode).
use super::router::Routing;
use candle_core::{DType, Result, Tensor, D};

/// `alpha * sum_i P_i * f_i` with `f_i = E * count_i / (S k)` (fraction of the S*k slots sent to
/// expert i, times E) and `P_i` = mean over the S tokens of the softmax score of expert i.
/// `per_sequence` is DiT-MoE's `seq_aux` variant over the caller's sequences of `seq_len`
/// tokens (the DiT: an image's patches): per sequence n, `ce_{n,i} = count_{n,i} / (T k / E)`
/// and the loss is `alpha * mean_n sum_i ce_{n,i} * mean_t scores[n, t, i]`.
/// Counts are constants (no gradient), the scores carry the gradient to the router, as the
/// official one-hot/scatter_add construction does.
pub fn balance_loss(routing: &Routing, seq_len: usize, alpha: f64, per_sequence: bool) -> Result<Tensor> {
    let (s, e) = routing.scores.dims2()?;
    let k = routing.experts.dim(1)?;
    let dev = routing.scores.device();
    if per_sequence {
        if seq_len == 0 || s % seq_len != 0 {
            candle_core::bail!("balance loss: {s} tokens do not split into sequences of {seq_len}")
        }
        let (n, t) = (s / seq_len, seq_len);
        let ids = routing.experts.reshape((n, t * k))?.to_dtype(DType::U32)?;
        let ones = Tensor::ones((n, t * k), DType::F32, dev)?;
        let ce = Tensor::zeros((n, e), DType::F32, dev)?.scatter_add(&ids, &ones, 1)?;
        let ce = (ce / ((t * k) as f64 / e as f64))?;
        let mean_scores = routing.scores.reshape((n, t, e))?.mean(1)?;
        (ce * mean_scores)?.sum(D::Minus1)?.mean(0)? * alpha
    } else {
        let counts = expert_slot_mask(routing)?.sum(0)?;
        let f = (counts * (e as f64 / (s * k) as f64))?;
        let p = routing.scores.mean(0)?;
        (p * f)?.sum_all()? * alpha
    }
}

/// (S, E) f32 mask: 1 where a token picked the expert. Built with a scatter along the expert
/// axis, which every backend runs in parallel over tokens (candle's CUDA `index_add` along
/// the token axis runs one thread per output element and loops over all S*k slots).
pub fn expert_slot_mask(routing: &Routing) -> Result<Tensor> {
    let (s, e) = routing.scores.dims2()?;
    let k = routing.experts.dim(1)?;
    let dev = routing.scores.device();
    let ones = Tensor::ones((s, k), DType::F32, dev)?;
    Tensor::zeros((s, e), DType::F32, dev)?.scatter_add(&routing.experts.to_dtype(DType::U32)?, &ones, 1)
}
