//! The seam through which a forward pass is observed and its blocks replaced.
//!
//! The dense model calls [`ForwardHooks`] at each point where later work needs to look
//! (recording predictor training data) or to substitute a block (the sparse path, which
//! swaps a layer's attention and MLP for gathered-kernel versions). Both are branches of
//! the one OPT model here, not copies of it: a hook that overrides nothing is the dense
//! model, and [`Dense`] is exactly that.

use burn::nn::LayerNorm;
use burn::prelude::*;
use burn::tensor::activation::relu;

use crate::attention::OptAttention;
use crate::cache::{LayerKvCache, Step};
use crate::mlp::OptMlp;

/// An activation made visible to [`ForwardHooks::observe`]. Shapes are `[batch, n, width]`
/// unless said otherwise; `n` is the number of new positions in this call.
#[derive(Debug)]
pub enum Activation<'a, B: Backend> {
    /// Hugging Face's `hidden_states[index]`: 0 is the embeddings (after `project_in`, with
    /// positions added), `i` the output of layer `i - 1`, the last one the decoder output
    /// (after the final LayerNorm or `project_out`).
    Hidden { index: usize, value: &'a Tensor<B, 3> },
    /// The residual entering layer `layer` (the attention input, before its LayerNorm).
    AttentionInput { layer: usize, value: &'a Tensor<B, 3> },
    /// The residual entering layer `layer`'s MLP (before its LayerNorm).
    MlpInput { layer: usize, value: &'a Tensor<B, 3> },
    /// Each head's attention output before `out_proj`: `[batch, heads, n, head_dim]`.
    HeadOutputs { layer: usize, value: &'a Tensor<B, 4> },
    /// fc1's output before the ReLU: `[batch, n, ffn]`.
    Fc1PreActivation { layer: usize, value: &'a Tensor<B, 3> },
}

/// Which LayerNorm a [`ForwardHooks::norm`] call applies, and to what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSite {
    /// Pre-LN layers: the residual entering layer `layer` (its attention input, the value
    /// [`Activation::AttentionInput`] showed just before).
    AttentionInput(usize),
    /// Pre-LN layers: the residual entering layer `layer`'s MLP (the value
    /// [`Activation::MlpInput`] showed just before).
    MlpInput(usize),
    /// Post-LN layers: the residual after layer `layer`'s attention block.
    AfterAttention(usize),
    /// Post-LN layers: the residual after layer `layer`'s MLP block.
    AfterMlp(usize),
    /// The decoder's final LayerNorm.
    Final,
}

/// Called by [`crate::Opt::forward_with`] layer by layer. Every method has the dense
/// behaviour as its default.
pub trait ForwardHooks<B: Backend> {
    /// Sees an activation. The default ignores it.
    fn observe(&mut self, _activation: Activation<'_, B>) {}

    /// The decoder's input `[batch, n, d]` for `tokens` (`[batch, n]`): rows of the token
    /// table `table` plus `positions` (`[n, d]`, the position table's rows of these
    /// positions), or `None` for the default — Burn's lookup and add, in the weights'
    /// dtype. The sparse kernel path returns it from one launch, in f32 where it keeps
    /// its residual stream in f32. Not called for models that project the embeddings in.
    fn embed(&mut self, _tokens: &Tensor<B, 2, Int>, _table: &Tensor<B, 2>, _positions: &Tensor<B, 2>) -> Option<Tensor<B, 3>> {
        None
    }

    /// Runs layer `layer`'s attention on its normalized input `x` (`[batch, n, hidden]`),
    /// reading and extending `cache` at the positions of `step`. Returns the output of
    /// `out_proj`.
    fn attention(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        let heads = attention.head_outputs(x, cache, step);
        self.observe(Activation::HeadOutputs {
            layer,
            value: &heads,
        });
        attention.project_out(heads)
    }

    /// Runs layer `layer`'s MLP on its normalized input `x` (`[batch, n, hidden]`).
    fn mlp(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let pre = mlp.fc1.forward(x);
        self.observe(Activation::Fc1PreActivation { layer, value: &pre });
        mlp.fc2.forward(relu(pre))
    }

    /// Layer `layer`'s attention block added to the residual stream: `residual +
    /// attention(x)`, what the layer calls. The default runs [`ForwardHooks::attention`]
    /// and adds; the kernel paths override it to add inside their last launch (one launch
    /// fewer per block, which at batch 1 is what a decode step's time is made of).
    fn attention_residual(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        residual + self.attention(layer, attention, x, cache, step)
    }

    /// Layer `layer`'s MLP block added to the residual stream: `residual + mlp(x)` (see
    /// [`ForwardHooks::attention_residual`]).
    fn mlp_residual(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        residual + self.mlp(layer, mlp, x)
    }

    /// Applies one of the model's LayerNorms (in f32, see [`crate::layer::norm`]); `site`
    /// says which (the sparse path computes its predictors in the same launch as the
    /// LayerNorm of a layer's input).
    fn norm(&mut self, _site: NormSite, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::layer::norm(ln, x)
    }
}

/// The dense model: observes nothing, replaces nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Dense;

impl<B: Backend> ForwardHooks<B> for Dense {}

/// Hooks borrowed: a caller keeps its hooks (and their statistics) while handing them on.
impl<B: Backend, H: ForwardHooks<B> + ?Sized> ForwardHooks<B> for &mut H {
    fn observe(&mut self, activation: Activation<'_, B>) {
        (**self).observe(activation);
    }

    fn embed(&mut self, tokens: &Tensor<B, 2, Int>, table: &Tensor<B, 2>, positions: &Tensor<B, 2>) -> Option<Tensor<B, 3>> {
        (**self).embed(tokens, table, positions)
    }

    fn attention(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        (**self).attention(layer, attention, x, cache, step)
    }

    fn mlp(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        (**self).mlp(layer, mlp, x)
    }

    fn attention_residual(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        (**self).attention_residual(layer, attention, x, residual, cache, step)
    }

    fn mlp_residual(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        (**self).mlp_residual(layer, mlp, x, residual)
    }

    fn norm(&mut self, site: NormSite, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        (**self).norm(site, ln, x)
    }
}

/// Hooks that show every activation to `tap`, then hand it and every block to `inner`
/// unchanged: recording what a forward sees (a layer's inputs, say) while the sparse path
/// or the kernels run it.
pub struct Tapped<H, F> {
    pub inner: H,
    pub tap: F,
}

impl<B: Backend, H: ForwardHooks<B>, F: FnMut(&Activation<'_, B>)> ForwardHooks<B> for Tapped<H, F> {
    fn observe(&mut self, activation: Activation<'_, B>) {
        (self.tap)(&activation);
        self.inner.observe(activation);
    }

    fn embed(&mut self, tokens: &Tensor<B, 2, Int>, table: &Tensor<B, 2>, positions: &Tensor<B, 2>) -> Option<Tensor<B, 3>> {
        self.inner.embed(tokens, table, positions)
    }

    fn attention(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        self.inner.attention(layer, attention, x, cache, step)
    }

    fn mlp(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.inner.mlp(layer, mlp, x)
    }

    fn attention_residual(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        self.inner.attention_residual(layer, attention, x, residual, cache, step)
    }

    fn mlp_residual(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        self.inner.mlp_residual(layer, mlp, x, residual)
    }

    fn norm(&mut self, site: NormSite, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.inner.norm(site, ln, x)
    }
}

/// Optional hooks: `None` is the dense model, `Some(h)` runs `h`. Lets a caller that may
/// or may not run the sparse path pass one value either way.
impl<B: Backend, H: ForwardHooks<B>> ForwardHooks<B> for Option<H> {
    fn observe(&mut self, activation: Activation<'_, B>) {
        if let Some(h) = self {
            h.observe(activation);
        }
    }

    fn embed(&mut self, tokens: &Tensor<B, 2, Int>, table: &Tensor<B, 2>, positions: &Tensor<B, 2>) -> Option<Tensor<B, 3>> {
        self.as_mut().and_then(|h| h.embed(tokens, table, positions))
    }

    fn attention(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        match self {
            Some(h) => h.attention(layer, attention, x, cache, step),
            None => Dense.attention(layer, attention, x, cache, step),
        }
    }

    fn mlp(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Some(h) => h.mlp(layer, mlp, x),
            None => Dense.mlp(layer, mlp, x),
        }
    }

    fn attention_residual(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        match self {
            Some(h) => h.attention_residual(layer, attention, x, residual, cache, step),
            None => Dense.attention_residual(layer, attention, x, residual, cache, step),
        }
    }

    fn mlp_residual(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Some(h) => h.mlp_residual(layer, mlp, x, residual),
            None => Dense.mlp_residual(layer, mlp, x, residual),
        }
    }

    fn norm(&mut self, site: NormSite, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Some(h) => h.norm(site, ln, x),
            None => Dense.norm(site, ln, x),
        }
    }
}
