//! `KvCache`: the keys (after RoPE) and values of every layer's past positions, appended along
//! the sequence axis as decoding goes (transformers' `DynamicCache`), bounded by the model's
//! `max_position_embeddings`.
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer, `[B, kv_heads, L, head_dim]` keys and values.
    layers: Vec<Option<(Tensor, Tensor)>>,
    max_positions: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers and contexts up to `max_positions`.
    pub fn new(num_layers: usize, max_positions: usize) -> Self {
        Self { layers: vec![None; num_layers], max_positions }
    }

    /// An empty cache for a model of `cfg`.
    pub fn for_config(cfg: &super::LmConfig) -> Self {
        Self::new(cfg.num_layers, cfg.max_position_embeddings)
    }

    /// Positions held (the first layer's; every layer holds as many after a full forward).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Layer `layer`'s keys and values, if it holds any.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.as_ref().map(|(k, v)| (k, v))
    }

    /// Empties every layer.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Refuses a call of `new_tokens` positions that would take the context past
    /// `max_position_embeddings`.
    pub fn check_room(&self, new_tokens: usize) -> Result<()> {
        let len = self.len();
        if len + new_tokens > self.max_positions {
            candle_core::bail!("kv cache: {len} cached + {new_tokens} new positions exceed max_position_embeddings {}", self.max_positions)
        }
        Ok(())
    }

    /// Appends `k`, `v` `[B, kv_heads, T, head_dim]` to layer `layer` and hands back the
    /// layer's whole keys and values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let max = self.max_positions;
        let n = self.layers.len();
        let Some(slot) = self.layers.get_mut(layer) else { candle_core::bail!("kv cache: layer {layer} of a {n}-layer cache") };
        let (k, v) = match slot.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        };
        if k.dim(2)? > max {
            candle_core::bail!("kv cache: layer {layer} would hold {} positions, max_position_embeddings is {max}", k.dim(2)?)
        }
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
