//! OPT self-attention: separate q/k/v projections, scaled dot product, causal mask.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::DType;

use crate::cache::{LayerKvCache, Step};

#[derive(Module, Debug)]
pub struct OptAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> OptAttention<B> {
    pub fn new(hidden: usize, num_heads: usize, bias: bool, device: &B::Device) -> Self {
        let linear = || LinearConfig::new(hidden, hidden).with_bias(bias).init(device);
        Self {
            q_proj: linear(),
            k_proj: linear(),
            v_proj: linear(),
            out_proj: linear(),
            num_heads,
            head_dim: hidden / num_heads,
        }
    }

    /// `[batch, n, hidden]` → `[batch, heads, n, head_dim]`.
    pub fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, n, _] = x.dims();
        x.reshape([batch, n, self.num_heads, self.head_dim])
            .swap_dims(1, 2)
    }

    /// Each head's attention output before `out_proj`, `[batch, heads, n, head_dim]`, for
    /// the `n` new positions of `x` described by `step`. Appends their keys and values to
    /// `cache`.
    pub fn head_outputs(
        &self,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 4> {
        // Hugging Face scales q after the bias: q = q_proj(x) · head_dim^-½.
        let scaling = (self.head_dim as f64).powf(-0.5);
        let q = self.split_heads(self.q_proj.forward(x.clone()).mul_scalar(scaling));
        let k = self.split_heads(self.k_proj.forward(x.clone()));
        let v = self.split_heads(self.v_proj.forward(x));
        let (keys, values) = cache.append(step.start, k, v);
        attend(q, keys, values, step.mask())
    }

    /// `[batch, heads, n, head_dim]` → `out_proj` output `[batch, n, hidden]`.
    pub fn project_out(&self, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, h, n, hd] = heads.dims();
        self.out_proj
            .forward(heads.swap_dims(1, 2).reshape([batch, n, h * hd]))
    }
}

/// Softmax attention of queries over the whole key/value buffers under an additive f32
/// `mask` (`[1, 1, n, capacity]`, see [`Step::mask`]). Scores and softmax run in f32
/// whatever the storage dtype, as Hugging Face upcasts them for half precision.
pub fn attend<B: Backend>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    mask: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let mut scores = q.matmul(keys.swap_dims(2, 3));
    if dtype != DType::F32 {
        scores = scores.cast(DType::F32);
    }
    let mut probs = softmax(scores + mask, 3);
    if dtype != DType::F32 {
        probs = probs.cast(dtype);
    }
    probs.matmul(values)
}
