//! OPT's MLP: fc1 → ReLU → fc2.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// fc1 (`hidden → ffn`) and fc2 (`ffn → hidden`). In the checkpoint these sit directly
/// under the layer (`layers.N.fc1`); the key map in [`crate::weights`] places them here.
#[derive(Module, Debug)]
pub struct OptMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> OptMlp<B> {
    pub fn new(hidden: usize, ffn: usize, bias: bool, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(hidden, ffn).with_bias(bias).init(device),
            fc2: LinearConfig::new(ffn, hidden).with_bias(bias).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}
