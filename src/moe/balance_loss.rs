//! The load-balancing losses: DiT-MoE's expert-level balance loss (official `MoEGate.forward`,
//! training mode) and DeepSpeed-MoE's `l_aux`, per layer ([`balance_loss`]); transformers'
//! `load_balancing_loss_func` over all layers of a language model ([`hf_load_balancing_loss`]).
use super::config::BalanceForm;
use super::router::Routing;
use candle_core::{DType, Result, Tensor, D};

/// `alpha * sum_i P_i * f_i` with `f_i = E * count_i / (S k)` (fraction of the S*k slots sent to
/// expert i, times E) and `P_i` = mean over the S tokens of the softmax score of expert i.
/// `per_sequence` is DiT-MoE's `seq_aux` variant over the caller's sequences of `seq_len`
/// tokens (the DiT: an image's patches): per sequence n, `ce_{n,i} = count_{n,i} / (T k / E)`
/// and the loss is `alpha * mean_n sum_i ce_{n,i} * mean_t scores[n, t, i]`.
/// [`BalanceForm::FirstChoice`] is DeepSpeed's `l_aux`: `E · sum_e P_e · first_e / S`.
/// Counts are constants (no gradient), the scores carry the gradient to the router, as the
/// official one-hot/scatter_add construction does.
pub fn balance_loss(routing: &Routing, seq_len: usize, alpha: f64, form: BalanceForm) -> Result<Tensor> {
    let (s, e) = routing.scores.dims2()?;
    let k = routing.experts.dim(1)?;
    let dev = routing.scores.device();
    if form == BalanceForm::FirstChoice {
        let first = Routing { experts: routing.experts.narrow(1, 0, 1)?.contiguous()?, ..routing.clone() };
        let f = (expert_slot_mask(&first)?.sum(0)? * (e as f64 / s as f64))?;
        return (routing.scores.mean(0)? * f)?.sum_all()? * alpha;
    }
    if form == BalanceForm::PerSequence {
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

/// transformers' `load_balancing_loss_func` (Switch Transformer eq. 4, as Mixtral, Qwen2-MoE and
/// OLMoE train with it, no padding mask): the router logits of every MoE layer `[S, E]` are
/// concatenated to N = L·S rows, `P_e` = mean softmax probability, `f_e` = the fraction of rows
/// whose top-k holds e; the loss is `E · sum_e P_e f_e` (the coefficient is the caller's).
pub fn hf_load_balancing_loss(router_logits: &[Tensor], top_k: usize) -> Result<Tensor> {
    let logits = Tensor::cat(router_logits, 0)?;
    let (n, e) = logits.dims2()?;
    let scores = crate::nn::softmax_last_dim(&logits)?;
    let experts = scores.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, top_k)?.contiguous()?;
    let routing = Routing { experts, weights: scores.clone(), scores, logits };
    let f = (expert_slot_mask(&routing)?.sum(0)? / n as f64)?;
    (routing.scores.mean(0)? * f)?.sum_all()? * e as f64
}
