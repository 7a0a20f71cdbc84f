//! Which experts each token of a prompt picks, per MoE layer: the record behind `ditmoe lm
//! routes` and the explorer's text view. One forward of the prompt; each layer's choices are
//! the top-k of its router logits, best first (the routing's own order).
use super::LmModel;
use crate::analysis::figures::expert_load_figure;
use crate::analysis::Heatmap;
use crate::text::Tokenizer;
use candle_core::{bail, Result, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoutes {
    /// Each token's text (its decoded piece, newlines written `\n`).
    pub pieces: Vec<String>,
    /// The MoE layers' indices.
    pub layers: Vec<usize>,
    /// `[layer][token]`: the token's experts in that layer, best first.
    pub choices: Vec<Vec<Vec<u32>>>,
    /// The widest MoE layer's expert count.
    pub num_experts: usize,
}

impl TokenRoutes {
    /// Routes `prompt`; a prompt that encodes to no token or to more than the context is refused.
    pub fn of_prompt(model: &LmModel, tokenizer: &Tokenizer, prompt: &str) -> Result<Self> {
        let cfg = model.config();
        let ids = tokenizer.encode(prompt)?;
        if ids.is_empty() || ids.len() > cfg.max_position_embeddings {
            bail!("routes: the prompt has {} tokens; the model takes 1 to {}", ids.len(), cfg.max_position_embeddings)
        }
        let out = model.forward(&Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?, None, false)?;
        let layers = cfg.moe_layers();
        let moes: Vec<_> = layers.iter().filter_map(|&l| cfg.layers[l].moe()).collect();
        let choices = out
            .router_logits
            .iter()
            .zip(&moes)
            .map(|(logits, m)| logits.arg_sort_last_dim(false)?.narrow(1, 0, m.top_k)?.to_vec2::<u32>())
            .collect::<Result<_>>()?;
        let pieces = ids.iter().map(|&id| tokenizer.decode(&[id]).map(|s| s.replace('\n', "\\n"))).collect::<Result<_>>()?;
        let num_experts = moes.iter().map(|m| m.num_experts).max().unwrap_or(1);
        Ok(Self { pieces, layers, choices, num_experts })
    }

    /// A markdown table: a row per token, a column per MoE layer, the experts best first.
    pub fn table(&self) -> String {
        let mut s = format!("| token |{}\n", self.layers.iter().map(|l| format!(" layer {l} |")).collect::<String>());
        s.push_str(&format!("|---|{}\n", "---|".repeat(self.layers.len())));
        for (t, piece) in self.pieces.iter().enumerate() {
            let cells: String = self.choices.iter().map(|c| format!(" {} |", c[t].iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "))).collect();
            s.push_str(&format!("| `{piece}` |{cells}\n"));
        }
        s
    }

    /// A column per token, a row per MoE layer, each cell the colour of the token's
    /// first-choice expert.
    pub fn figure(&self) -> Result<Heatmap> {
        let first: Vec<usize> = self.choices.iter().flat_map(|c| c.iter().map(|row| row[0] as usize)).collect();
        Ok(Heatmap::experts(&first, self.layers.len(), self.pieces.len(), self.num_experts)?
            .title("first-choice expert per token")
            .labels("token", "MoE layer")
            .x_tick_labels(self.pieces.clone())
            .y_tick_labels(self.layers.iter().map(|l| l.to_string()))
            .cell(30, 22))
    }

    /// Per MoE layer, the share of the prompt's routed slots each expert took.
    pub fn load(&self) -> Vec<Vec<f64>> {
        self.choices
            .iter()
            .map(|layer| {
                let mut counts = vec![0.0; self.num_experts];
                let slots: usize = layer.iter().map(Vec::len).sum();
                layer.iter().flatten().for_each(|&e| counts[e as usize] += 1.0);
                counts.iter().map(|c| c / slots.max(1) as f64).collect()
            })
            .collect()
    }

    /// [`Self::load`] as a layer x expert heatmap.
    pub fn load_figure(&self) -> Result<Heatmap> {
        expert_load_figure(&self.layers, &self.load())
    }
}
