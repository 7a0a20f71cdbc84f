//! Autoregressive generation: the prompt in one forward (prefill), then one token per step
//! ([`Decoder`]: a static KV cache, each step a CUDA-graph replay on a GPU), each drawn by a
//! [`TokenSampler`] and handed to a callback as it comes (the CLI streams it). Stops at
//! `max_new_tokens`, at the end-of-text token, or where the context is full.
use super::sampling::TokenSampler;
use super::{Decoder, LmModel};
use candle_core::{bail, IndexOp, Result, Tensor};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationStop {
    MaxTokens,
    EndOfText,
    ContextFull,
}

/// Generates after `prompt` (ids); `on_token(id)` sees each new token. Returns the new tokens
/// and why it stopped. A prompt that does not fit the context, or holds ids outside the
/// vocabulary, is refused before anything runs.
pub fn generate(model: &LmModel, prompt: &[u32], max_new_tokens: usize, sampler: &mut TokenSampler, eos: Option<u32>, on_token: impl FnMut(u32) -> Result<()>) -> Result<(Vec<u32>, GenerationStop)> {
    generate_with(model, prompt, max_new_tokens, |logits| sampler.sample(logits), eos, on_token)
}

/// [`generate`] with each token chosen by `next_token` from its logits `[V]`: a model sharded
/// by experts over ranks runs the same forward on every rank, and there rank 0 samples and every
/// rank takes rank 0's token, so that the ranks keep feeding the same tokens.
pub fn generate_with(model: &LmModel, prompt: &[u32], max_new_tokens: usize, mut next_token: impl FnMut(&Tensor) -> Result<u32>, eos: Option<u32>, mut on_token: impl FnMut(u32) -> Result<()>) -> Result<(Vec<u32>, GenerationStop)> {
    let cfg = model.config();
    if prompt.is_empty() {
        bail!("lm generate: the prompt is empty (it needs at least one token)")
    }
    if prompt.len() > cfg.max_position_embeddings {
        bail!("lm generate: the prompt has {} tokens, longer than the model's context of {} (max_position_embeddings)", prompt.len(), cfg.max_position_embeddings)
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!("lm generate: prompt token {bad} is outside the model's vocabulary of {}", cfg.vocab_size)
    }
    let dev = model.device();
    // the context the cache must hold: the prompt and every new token but the last
    let capacity = (prompt.len() + max_new_tokens).min(cfg.max_position_embeddings);
    let mut decoder = Decoder::new(model, 1, capacity)?;
    let mut logits = decoder.prefill(&Tensor::new(prompt, dev)?.unsqueeze(0)?)?;
    let mut new = Vec::with_capacity(max_new_tokens);
    while new.len() < max_new_tokens {
        let next = next_token(&logits.i(0)?)?;
        new.push(next);
        on_token(next)?;
        if Some(next) == eos {
            return Ok((new, GenerationStop::EndOfText));
        }
        if new.len() == max_new_tokens {
            break;
        }
        if decoder.len() >= decoder.capacity() {
            return Ok((new, GenerationStop::ContextFull));
        }
        logits = decoder.step(&Tensor::new(&[[next]], dev)?)?;
    }
    Ok((new, GenerationStop::MaxTokens))
}
