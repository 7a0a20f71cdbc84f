//! Input embeddings: patches, the fixed 2-D sin-cos positions, timesteps and class labels.
use crate::config::DitConfig;
use crate::nn::ops;
use candle_core::{DType, Device, Result, Tensor, D};
use crate::nn::Linear;
use candle_nn::{Embedding, Module, VarBuilder};

/// timm `PatchEmbed` (Conv2d with kernel = stride = patch). A stride-p convolution over
/// non-overlapping patches is a matmul over flattened (c, i, j) patches, which is how we run it.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    weight: Tensor, // [D, C*p*p], the conv kernel [D, C, p, p] flattened
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.in_channels, cfg.patch_size);
        let w = vb.get((d, c, p, p), "proj.weight")?;
        let bias = vb.get(d, "proj.bias")?;
        Ok(Self { weight: w.reshape((d, c * p * p))?, bias, patch: p })
    }

    /// (N, C, H, W) -> (N, T, D), tokens in row-major (h, w) order as `flatten(2).transpose(1, 2)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = ops::contiguous(&x.reshape((n, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?)?
            .reshape((n * gh * gw, c * p * p))?;
        // Computed in the weights' dtype, returned in the input's (see `crate::nn::Linear`).
        let out = patches.to_dtype(self.weight.dtype())?.matmul(&self.weight.t()?)?;
        ops::bias_cast(&out, Some(&self.bias), x.dtype())?.reshape((n, gh * gw, ()))
    }
}

/// Official `get_2d_sincos_pos_embed(embed_dim, grid_size)` as (T, D) f32. The first D/2
/// channels encode the grid *column* (meshgrid(w, h)[0]), the last D/2 the row; each half is
/// sin of D/4 frequencies then cos, omega_i = 1/10000^(i/(D/4)). Computed in f64 like numpy.
pub fn get_2d_sincos_pos_embed(embed_dim: usize, grid_size: usize, dev: &Device) -> Result<Tensor> {
    let quarter = embed_dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64)).collect();
    let mut data = Vec::with_capacity(grid_size * grid_size * embed_dim);
    for row in 0..grid_size {
        for col in 0..grid_size {
            for pos in [col as f64, row as f64] {
                data.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                data.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Tensor::from_vec(data, (grid_size * grid_size, embed_dim), dev)
}

/// Official `TimestepEmbedder`: 256 sinusoidal features `[cos | sin]` then Linear-SiLU-Linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
}

pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

impl TimestepEmbedder {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let fc1 = crate::nn::linear(FREQUENCY_EMBEDDING_SIZE, d, vb.pp("mlp.0"))?;
        let fc2 = crate::nn::linear(d, d, vb.pp("mlp.2"))?;
        Ok(Self { fc1, fc2 })
    }

    /// `timestep_embedding(t, 256)`: t (N,) of any dtype (integer DDPM steps or float
    /// rectified-flow t), f32 maths (`t[:, None].float() * freqs`), f_i = exp(-ln(1e4) i/128).
    pub fn frequencies(t: &Tensor) -> Result<Tensor> {
        Self::frequencies_with(t, &Self::frequency_table(t.device())?)
    }

    /// The (1, 128) table f_i of [`Self::frequencies`], made once per model so that a forward
    /// pass copies nothing from the host (which a CUDA graph could not replay).
    pub fn frequency_table(dev: &Device) -> Result<Tensor> {
        let half = FREQUENCY_EMBEDDING_SIZE / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp())
            .collect();
        Tensor::from_vec(freqs, (1, half), dev)
    }

    /// [`Self::frequencies`] with a table from [`Self::frequency_table`].
    pub fn frequencies_with(t: &Tensor, table: &Tensor) -> Result<Tensor> {
        let shape = [t.dim(0)?, table.dim(1)?];
        let t = ops::broadcast_contiguous(&t.to_dtype(DType::F32)?.unsqueeze(1)?, &shape)?;
        let args = (t * ops::broadcast_contiguous(table, &shape)?)?;
        Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
    }

    pub fn forward_freq(&self, t_freq: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(t_freq)?;
        self.fc2.forward(&candle_nn::ops::silu(&h)?)
    }

    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        self.forward_freq(&Self::frequencies(t)?)
    }
}

/// Official `LabelEmbedder`: a table of `num_classes (+1 null row)`. Label dropout for
/// classifier-free guidance is decided by the caller (the trainer owns the RNG), which passes
/// labels that already hold the null class `num_classes` where dropped.
#[derive(Debug, Clone)]
pub struct LabelEmbedder {
    table: Embedding,
}

impl LabelEmbedder {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let table = candle_nn::embedding(cfg.label_table_rows(), cfg.hidden_size, vb.pp("embedding_table"))?;
        Ok(Self { table })
    }

    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        // Range checks live where labels come from host data (CLI, sampler, dataset), so the
        // forward pass never waits on the device to read labels back.
        self.table.forward(&y.to_dtype(DType::U32)?)?.to_dtype(DType::F32)
    }
}
