//! What a forward pass records besides its output: the opt-in routing record (expert ids and
//! weights of every token per MoE layer) and, for parity tests and `ditmoe forward --trace`,
//! named intermediates. Both cost nothing when off: no tensor is kept or copied.
use candle_core::Tensor;

/// Training mode changes what the official model computes: the gate returns the balance loss
/// (`MoEGate.forward` with `self.training`), ProMoE's layer its routing contrastive loss.
/// Label dropout is applied by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    #[default]
    Eval,
    Train,
}

/// One MoE layer's routing decisions, rows = flattened (image n, token t) as n*T + t.
#[derive(Debug, Clone)]
pub struct LayerRouting {
    /// The block index (ProMoE has MoE in odd blocks only, so entries need not be 0, 1, ...).
    pub layer: usize,
    /// (N*T, k) u32 expert ids, sorted by descending weight. ProMoE: id E (= `scores.dim(1)`)
    /// is the unconditional expert, filling every slot of a null-label image's tokens.
    pub experts: Tensor,
    /// (N*T, k) f32 gate weights: softmax scores of the chosen experts (DiT-MoE); the chosen
    /// cosines / softmax / sigmoid of them (ProMoE), `[1, 0, ...]` for unconditional tokens.
    pub weights: Tensor,
    /// (N*T, E) f32 scores over the E routed experts, kept so analyses can show near misses:
    /// softmax probabilities (DiT-MoE), cosines to the prototypes (ProMoE; unconditional rows
    /// too, although those tokens are not routed by them).
    pub scores: Tensor,
}

/// Options and sinks for one forward pass.
#[derive(Debug, Default)]
pub struct Trace {
    pub record_routing: bool,
    pub record_intermediates: bool,
    pub routing: Vec<LayerRouting>,
    pub intermediates: Vec<(String, Tensor)>,
}

impl Trace {
    pub fn routing() -> Self {
        Self { record_routing: true, ..Self::default() }
    }
    pub fn everything() -> Self {
        Self { record_routing: true, record_intermediates: true, ..Self::default() }
    }
    /// Keeps `t` under `name` only when intermediates are requested; the closure form means
    /// nothing is computed (not even the name) when they are not.
    pub fn keep(&mut self, name: impl FnOnce() -> String, t: &Tensor) {
        if self.record_intermediates {
            self.intermediates.push((name(), t.clone()));
        }
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.intermediates.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}
