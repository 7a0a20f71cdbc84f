//! Official parameter initialisation (`DiT.initialize_weights` + `MoEGate.reset_parameters`),
//! applied by name to a freshly built model's variables.
use crate::config::DitConfig;
use crate::model::get_2d_sincos_pos_embed;
use candle_core::{Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// How one parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// `xavier_uniform_` on the weight seen as (out, in·rest): every `nn.Linear`, and the
    /// patch-embedding conv kernel flattened "like nn.Linear".
    XavierUniform,
    /// `normal_(std)`: the label table, the timestep MLP weights, and ProMoE's prototypes.
    Normal(f64),
    /// `kaiming_uniform_(a = sqrt(5))` = U(±1/sqrt(fan_in)): the router (`MoEGate.reset_parameters`).
    KaimingUniformA5,
    /// Biases, and the zeroed adaLN modulations and final linear layer.
    Zero,
    /// The fixed 2-D sin-cos table (`pos_embed`, never trained).
    SinCos,
}

fn rule(name: &str) -> Init {
    if name == "pos_embed" {
        Init::SinCos
    } else if name.contains("adaLN_modulation") || name.starts_with("final_layer.linear") {
        Init::Zero
    } else if name == "y_embedder.embedding_table.weight" || (name.starts_with("t_embedder.mlp.") && name.ends_with(".weight")) {
        Init::Normal(0.02)
    } else if name.ends_with("cluster_centers") {
        // ProMoE `SparseMoeBlock._init_weights`: `nn.init.normal_(self.cluster_centers, mean=0.0,
        // std=0.02)` (ali-vilab/ProMoE models/models_ProMoE_TC.py @5915b31, line 278); the
        // model's `_basic_init` only touches `nn.Linear`, so it stays N(0, 0.02²). Its experts
        // are `nn.Linear`s and get xavier_uniform (`init_MoeMLP` is False in every released config).
        Init::Normal(0.02)
    } else if name.ends_with("moe.gate.weight") {
        Init::KaimingUniformA5
    } else if name.ends_with(".bias") {
        Init::Zero
    } else {
        Init::XavierUniform
    }
}

/// Names of parameters the optimizer must not touch (`pos_embed`: `requires_grad=False`).
pub fn is_frozen(name: &str) -> bool {
    name == "pos_embed"
}

/// Sets every variable (sorted by name, one seeded generator) to its official initial value.
pub fn initialize(vars: &[(String, Var)], cfg: &DitConfig, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, var) in vars {
        let shape = var.shape().clone();
        let dims = shape.dims();
        let n = shape.elem_count();
        let fan_out = dims[0];
        let fan_in = n / fan_out.max(1);
        let values: Vec<f32> = match rule(name) {
            Init::Zero => vec![0.0; n],
            Init::SinCos => {
                let t = get_2d_sincos_pos_embed(cfg.hidden_size, cfg.grid_size(), &candle_core::Device::Cpu)?;
                t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?
            }
            Init::Normal(std) => (0..n).map(|_| (rng.sample::<f64, _>(StandardNormal) * std) as f32).collect(),
            Init::XavierUniform => uniform(&mut rng, n, (6.0 / (fan_in + fan_out) as f64).sqrt()),
            Init::KaimingUniformA5 => uniform(&mut rng, n, 1.0 / (fan_in as f64).sqrt()),
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn uniform(rng: &mut StdRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_initialize_weights() {
        assert_eq!(rule("pos_embed"), Init::SinCos);
        assert_eq!(rule("blocks.3.adaLN_modulation.1.weight"), Init::Zero);
        assert_eq!(rule("final_layer.linear.weight"), Init::Zero);
        assert_eq!(rule("final_layer.adaLN_modulation.1.bias"), Init::Zero);
        assert_eq!(rule("t_embedder.mlp.2.weight"), Init::Normal(0.02));
        assert_eq!(rule("t_embedder.mlp.0.bias"), Init::Zero);
        assert_eq!(rule("blocks.0.moe.gate.weight"), Init::KaimingUniformA5);
        assert_eq!(rule("blocks.0.moe.experts.1.up_proj.weight"), Init::XavierUniform);
        assert_eq!(rule("x_embedder.proj.weight"), Init::XavierUniform);
        assert_eq!(rule("blocks.0.attn.qkv.bias"), Init::Zero);
        assert_eq!(rule("blocks.1.mlp.cluster_centers"), Init::Normal(0.02));
    }
}
