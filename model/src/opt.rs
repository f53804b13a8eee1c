//! The OPT decoder and its tied LM head.

use burn::module::{ModuleMapper, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::DType;

use crate::cache::KvCache;
use crate::config::{OptConfig, POSITION_OFFSET};
use crate::error::ModelError;
use crate::hooks::{Activation, Dense, ForwardHooks, NormSite};
use crate::layer::{layer_norm, OptDecoderLayer};

/// Field names follow Hugging Face's `model.decoder.*` so the checkpoint maps onto them
/// with one small table ([`crate::weights::key_remapper`]).
#[derive(Module, Debug)]
pub struct OptDecoder<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub embed_positions: Embedding<B>,
    pub project_in: Option<Linear<B>>,
    pub project_out: Option<Linear<B>>,
    pub final_layer_norm: Option<LayerNorm<B>>,
    pub layers: Vec<OptDecoderLayer<B>>,
}

/// OPT for causal language modelling. The LM head is `embed_tokens` transposed.
#[derive(Module, Debug)]
pub struct Opt<B: Backend> {
    pub decoder: OptDecoder<B>,
    pub max_positions: usize,
}

impl<B: Backend> Opt<B> {
    /// A model of this shape with Burn's default random initialisation, in the device's
    /// default float dtype. [`crate::weights::load_model`] fills it from a checkpoint.
    pub fn new(config: &OptConfig, device: &B::Device) -> Self {
        let d = config.hidden_size;
        let e = config.embed_dim();
        let projections = config.has_projections();
        Self {
            decoder: OptDecoder {
                embed_tokens: EmbeddingConfig::new(config.vocab_size, e).init(device),
                embed_positions: EmbeddingConfig::new(
                    config.max_position_embeddings + POSITION_OFFSET,
                    d,
                )
                .init(device),
                project_in: projections
                    .then(|| LinearConfig::new(e, d).with_bias(false).init(device)),
                project_out: projections
                    .then(|| LinearConfig::new(d, e).with_bias(false).init(device)),
                final_layer_norm: config
                    .has_final_layer_norm()
                    .then(|| layer_norm(d, device)),
                layers: (0..config.num_hidden_layers)
                    .map(|_| OptDecoderLayer::new(config, device))
                    .collect(),
            },
            max_positions: config.max_position_embeddings,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.decoder.layers.len()
    }

    /// The dtype the weights are stored in.
    pub fn dtype(&self) -> DType {
        self.decoder.embed_tokens.weight.val().dtype()
    }

    pub fn device(&self) -> B::Device {
        self.decoder.embed_tokens.weight.val().device()
    }

    /// Casts every weight to `dtype`, except LayerNorm parameters, which stay f32 (see
    /// [`crate::layer::norm`]).
    pub fn cast(self, dtype: DType) -> Self {
        self.map(&mut CastFloats {
            dtype,
            layer_norm_depth: 0,
        })
    }

    /// Logits `[batch, n, vocab]` for `tokens` (`[batch, n]`), which continue the sequences
    /// held in `cache`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let hidden = self.forward_with(tokens, cache, &mut Dense)?;
        Ok(self.logits(hidden))
    }

    /// The decoder output `[batch, n, hidden or word_embed_proj_dim]`, calling `hooks` at
    /// each layer (see [`ForwardHooks`]).
    pub fn forward_with<H: ForwardHooks<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        hooks: &mut H,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let [batch, n] = tokens.dims();
        let start = cache.len();
        if n == 0 {
            return Err(ModelError::InvalidInput("no tokens to run".into()));
        }
        if start + n > self.max_positions {
            return Err(ModelError::ContextTooLong {
                requested: start + n,
                limit: self.max_positions,
            });
        }
        cache.check_room(batch, n)?;
        let device = tokens.device();
        let decoder = &self.decoder;

        // The new positions are consecutive rows of the position table: a view of those
        // rows (no upload of position ids, no lookup launch), broadcast over the batch.
        let first = start + POSITION_OFFSET;
        let positions = decoder.embed_positions.weight.val().narrow(0, first, n);
        let embedded = match &decoder.project_in {
            None => hooks.embed(&tokens, &decoder.embed_tokens.weight.val(), &positions),
            Some(_) => None,
        };
        let mut x = match embedded {
            Some(x) => x,
            None => {
                let mut x = decoder.embed_tokens.forward(tokens);
                if let Some(project_in) = &decoder.project_in {
                    x = project_in.forward(x);
                }
                x + positions.unsqueeze::<3>()
            }
        };
        hooks.observe(Activation::Hidden { index: 0, value: &x });

        let num_layers = decoder.layers.len();
        let step = cache.step(n, &device);
        for (i, layer) in decoder.layers.iter().enumerate() {
            x = layer.forward(i, x, &mut cache.layers[i], &step, hooks);
            if i + 1 < num_layers {
                hooks.observe(Activation::Hidden {
                    index: i + 1,
                    value: &x,
                });
            }
        }
        if let Some(final_norm) = &decoder.final_layer_norm {
            x = hooks.norm(NormSite::Final, final_norm, x);
        }
        if let Some(project_out) = &decoder.project_out {
            x = project_out.forward(x);
        }
        hooks.observe(Activation::Hidden {
            index: num_layers,
            value: &x,
        });
        cache.advance(n);
        Ok(x)
    }

    /// The tied LM head: `hidden · embed_tokensᵀ`, `[batch, n, vocab]`, in f32.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, n, _] = hidden.dims();
        let logits = self.logits_rows(hidden);
        let vocab = logits.dims()[1];
        let logits = if logits.dtype() == DType::F32 {
            logits
        } else {
            logits.cast(DType::F32)
        };
        logits.reshape([batch, n, vocab])
    }

    /// The LM head's weights `[vocab, e]`: OPT ties them to the token embeddings.
    pub fn lm_head(&self) -> Tensor<B, 2> {
        self.decoder.embed_tokens.weight.val()
    }

    /// Logits `[batch·n, vocab]` in the weights' dtype, as the LM head's matmul leaves them
    /// (on CUDA its rows may be pitched): what greedy decoding reads
    /// ([`crate::generate::greedy_tokens`]), with no cast and no copy launch.
    pub fn logits_rows(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, n, e] = hidden.dims();
        hidden.reshape([batch * n, e]).matmul(self.lm_head().transpose())
    }

    /// A KV cache for `batch` sequences of up to `capacity` positions, in the weights' dtype.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache<B>, ModelError> {
        let first = &self.decoder.layers[0].self_attn;
        let config_shape = CacheShape {
            layers: self.num_layers(),
            heads: first.num_heads,
            head_dim: first.head_dim,
            max_positions: self.max_positions,
        };
        KvCache::with_shape(config_shape, batch, capacity, self.dtype(), &self.device())
    }
}

/// What a KV cache needs to know of the model.
#[derive(Debug, Clone, Copy)]
pub struct CacheShape {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
}

/// Casts float parameters to one dtype, LayerNorm parameters to f32.
struct CastFloats {
    dtype: DType,
    layer_norm_depth: usize,
}

const LAYER_NORM: &str = "Struct:LayerNorm";

impl<B: Backend> ModuleMapper<B> for CastFloats {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        if container_type == LAYER_NORM {
            self.layer_norm_depth += 1;
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if container_type == LAYER_NORM {
            self.layer_norm_depth -= 1;
        }
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = if self.layer_norm_depth > 0 {
            DType::F32
        } else {
            self.dtype
        };
        param.map(|t| if t.dtype() == dtype { t } else { t.cast(dtype) })
    }
}
