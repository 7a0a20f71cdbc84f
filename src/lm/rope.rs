//! `RotaryEmbedding`: transformers' default rotary embedding (`rope_type: "default"`,
//! `_compute_default_rope_parameters` and `apply_rotary_pos_emb`): `inv_freq_i = 1 /
//! θ^(2i/d)`, `cos`/`sin` of `position · inv_freq`, applied in the `rotate_half` convention
//! (the two halves of a head, not interleaved pairs). The tables cover
//! `max_position_embeddings` positions; a call names its first position (the KV cache's length).
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, head_dim / 2]` f32.
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
}

impl RotaryEmbedding {
    /// The tables for `head_dim` and positions `0..max_positions`, computed in f32 as
    /// transformers does (`inv_freq` in f32, `freqs = inv_freq ⊗ positions`).
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates x `[B, H, 1, head_dim]` at the position held on the device in `pos` (`[1]`
    /// u32): the tables' row is gathered on the device, so a captured decoding step serves
    /// every position.
    pub fn forward_at(&self, x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let cos = self.cos.index_select(pos, 0)?;
        let sin = self.sin.index_select(pos, 0)?;
        candle_nn::rotary_emb::rope(&x.to_dtype(DType::F32)?.contiguous()?, &cos, &sin)
    }

    /// Rotates x `[B, H, T, head_dim]` (f32) at positions `offset .. offset + T`
    /// (`q * cos + rotate_half(q) * sin`). Past the tables it is an error naming the limit.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, _) = x.dims4()?;
        if offset + t > self.max_positions {
            candle_core::bail!("rope: positions {offset}..{} exceed max_position_embeddings {}", offset + t, self.max_positions)
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let x = x.to_dtype(DType::F32)?;
        if x.track_op() {
            // candle's fused rope has no backward
            candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
        }
    }
}
