//! The paper's predictor: `Linear(d → r, no bias)` then `Linear(r → n, no bias)` with no
//! activation between — a rank-`r` factorised linear classifier. Its outputs are logits
//! (sigmoid > 0.5 ⇔ logit > 0, as trained with binary cross-entropy).

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

#[derive(Config, Debug)]
pub struct LowRankClassifierConfig {
    /// Input width (the model's hidden size).
    pub d: usize,
    /// Rank of the factorisation.
    pub rank: usize,
    /// Outputs: ffn neurons for an MLP predictor, heads for an attention predictor.
    pub outputs: usize,
}

impl LowRankClassifierConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> LowRankClassifier<B> {
        LowRankClassifier {
            down: LinearConfig::new(self.d, self.rank).with_bias(false).init(device),
            up: LinearConfig::new(self.rank, self.outputs).with_bias(false).init(device),
        }
    }
}

#[derive(Module, Debug)]
pub struct LowRankClassifier<B: Backend> {
    pub down: Linear<B>,
    pub up: Linear<B>,
}

impl<B: Backend> LowRankClassifier<B> {
    /// Logits `[rows, outputs]` for residuals `[rows, d]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.up.forward(self.down.forward(x))
    }

    /// (d, rank, outputs), read off the weights (Burn stores `Linear` weights `[in, out]`).
    pub fn dims(&self) -> (usize, usize, usize) {
        let [d, rank] = self.down.weight.dims();
        let [_, outputs] = self.up.weight.dims();
        (d, rank, outputs)
    }
}

/// Scores a layer's MLP neurons (`outputs` = ffn): which fc1 outputs will be > 0 after ReLU.
pub type MlpPredictor<B> = LowRankClassifier<B>;
/// Scores a layer's attention heads (`outputs` = heads): which heads' outputs will be large.
pub type AttentionPredictor<B> = LowRankClassifier<B>;
