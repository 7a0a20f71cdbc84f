//! `StaticKvCache`: the keys and values of every layer in buffers of a fixed capacity, written
//! at a position held on the device, so one decoding step has the same shapes and the same host
//! values at every position and can be captured once as a CUDA graph and replayed (vLLM's and
//! transformers' `StaticCache` idea). The queries attend to every slot, the ones past the
//! current position masked out; the prompt's keys and values are copied in after an ordinary
//! prefill ([`StaticKvCache::fill`]).
use super::{KvCache, LmConfig};
use candle_core::{bail, DType, Device, Result, Tensor};

#[derive(Debug)]
pub struct StaticKvCache {
    /// Per layer, `[B, kv_heads, capacity, head_dim]` f32 keys (after RoPE) and values.
    layers: Vec<(Tensor, Tensor)>,
    /// `[capacity]` u32: 0, 1, …, the slot positions the visibility mask compares against.
    positions: Tensor,
    /// The additive mask's two values, broadcast to `[capacity]`.
    visible: Tensor,
    hidden: Tensor,
}

impl StaticKvCache {
    /// Zeroed buffers for `batch` sequences of up to `capacity` positions.
    pub fn new(cfg: &LmConfig, batch: usize, capacity: usize, device: &Device) -> Result<Self> {
        if capacity == 0 || capacity > cfg.max_position_embeddings {
            bail!("static kv cache: capacity {capacity} must be in 1..={} (max_position_embeddings)", cfg.max_position_embeddings)
        }
        let shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim);
        let layers = (0..cfg.num_layers).map(|_| Ok((Tensor::zeros(shape, DType::F32, device)?, Tensor::zeros(shape, DType::F32, device)?))).collect::<Result<_>>()?;
        Ok(Self {
            layers,
            positions: Tensor::arange(0u32, capacity as u32, device)?,
            visible: Tensor::zeros((), DType::F32, device)?.broadcast_as(capacity)?.contiguous()?,
            hidden: Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(capacity)?.contiguous()?,
        })
    }

    pub fn capacity(&self) -> usize {
        self.positions.dim(0).unwrap_or(0)
    }

    /// Copies a prefill's keys and values (positions `0..cache.len()`) into the buffers.
    pub fn fill(&self, cache: &KvCache) -> Result<()> {
        if cache.len() > self.capacity() {
            bail!("static kv cache: a prefill of {} positions exceeds the capacity {}", cache.len(), self.capacity())
        }
        for (i, (k, v)) in self.layers.iter().enumerate() {
            let Some((pk, pv)) = cache.layer(i) else { bail!("static kv cache: the prefill cache has no layer {i}") };
            k.slice_set(&pk.to_dtype(DType::F32)?.contiguous()?, 2, 0)?;
            v.slice_set(&pv.to_dtype(DType::F32)?.contiguous()?, 2, 0)?;
        }
        Ok(())
    }

    /// Writes one position's k and v `[B, kv_heads, 1, head_dim]` of layer `layer` at slot
    /// `pos` (`[1]` u32 on the device) and hands back the layer's whole buffers.
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        let Some((ck, cv)) = self.layers.get(layer) else { bail!("static kv cache: no layer {layer}") };
        let index = pos.reshape((1, 1, 1, 1))?.broadcast_as(k.shape())?.contiguous()?;
        ck.scatter_set(&index, &k.to_dtype(DType::F32)?.contiguous()?, 2)?;
        cv.scatter_set(&index, &v.to_dtype(DType::F32)?.contiguous()?, 2)?;
        Ok((ck.clone(), cv.clone()))
    }

    /// `[capacity]` f32: 0 for slots at or before `pos`, -inf after.
    pub fn visible_mask(&self, pos: &Tensor) -> Result<Tensor> {
        self.positions.broadcast_le(pos)?.where_cond(&self.visible, &self.hidden)
    }
}
