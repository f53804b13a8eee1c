//! One OPT decoder layer: attention then MLP, each with a residual, LayerNorm before
//! (pre-LN) or after (post-LN, OPT-350m).

use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::DType;

use crate::attention::OptAttention;
use crate::cache::{LayerKvCache, Step};
use crate::config::OptConfig;
use crate::hooks::{Activation, ForwardHooks, NormSite};
use crate::mlp::OptMlp;

#[derive(Module, Debug)]
pub struct OptDecoderLayer<B: Backend> {
    pub self_attn: OptAttention<B>,
    pub self_attn_layer_norm: LayerNorm<B>,
    pub mlp: OptMlp<B>,
    pub final_layer_norm: LayerNorm<B>,
    pub do_layer_norm_before: bool,
}

/// OPT's LayerNorm epsilon (every released checkpoint uses PyTorch's default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// OPT's LayerNorm: eps 1e-5, always with a bias. Without `elementwise_affine` the
/// checkpoint stores no weight or bias and the initial 1 and 0 stay.
pub fn layer_norm<B: Backend>(width: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(width).with_epsilon(LAYER_NORM_EPS).init(device)
}

/// Applies a LayerNorm in f32 whatever the activations' dtype (its parameters are kept in
/// f32, see [`crate::Opt::cast`]), as PyTorch does for half precision: a half-precision
/// mean of squares overflows on OPT's large residuals.
pub fn norm<B: Backend>(ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        ln.forward(x)
    } else {
        ln.forward(x.cast(DType::F32)).cast(dtype)
    }
}

impl<B: Backend> OptDecoderLayer<B> {
    pub fn new(config: &OptConfig, device: &B::Device) -> Self {
        let d = config.hidden_size;
        Self {
            self_attn: OptAttention::new(d, config.num_attention_heads, config.enable_bias, device),
            self_attn_layer_norm: layer_norm(d, device),
            mlp: OptMlp::new(d, config.ffn_dim, config.enable_bias, device),
            final_layer_norm: layer_norm(d, device),
            do_layer_norm_before: config.do_layer_norm_before,
        }
    }

    /// `x`: the residual entering the layer, `[batch, n, hidden]`, for the positions of
    /// `step`.
    pub fn forward<H: ForwardHooks<B> + ?Sized>(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
        hooks: &mut H,
    ) -> Tensor<B, 3> {
        let pre_ln = self.do_layer_norm_before;

        hooks.observe(Activation::AttentionInput { layer, value: &x });
        let h = if pre_ln {
            hooks.norm(NormSite::AttentionInput(layer), &self.self_attn_layer_norm, x.clone())
        } else {
            x.clone()
        };
        let mut x = hooks.attention_residual(layer, &self.self_attn, h, x, cache, step);
        if !pre_ln {
            x = hooks.norm(NormSite::AfterAttention(layer), &self.self_attn_layer_norm, x);
        }

        hooks.observe(Activation::MlpInput { layer, value: &x });
        let h = if pre_ln {
            hooks.norm(NormSite::MlpInput(layer), &self.final_layer_norm, x.clone())
        } else {
            x.clone()
        };
        let mut x = hooks.mlp_residual(layer, &self.mlp, h, x);
        if !pre_ln {
            x = hooks.norm(NormSite::AfterMlp(layer), &self.final_layer_norm, x);
        }
        x
    }
}
