//! The Deja Vu sparse path: a [`ForwardHooks`] implementation, so a branch of the one OPT
//! model rather than a copy of it. Each layer's predictors read the residual stream (with
//! the lookahead they were trained with) and the layer's attention and MLP read only the
//! selected heads and neurons.
//!
//! Two ways to run a sparse block, equal in value:
//! - **Kernels** (one new token per sequence — decode): the selected indices are built on
//!   the device and the gathered kernels of `dejavu-kernels` read only those rows
//!   (`gather_rows_gemv` for fc1 with bias+ReLU, `gather_rows_transposed_gemv` for fc2;
//!   `gather_blocks_gemv` for the selected heads' queries, `selected_heads_attention`,
//!   `gather_blocks_transposed_gemv` for `out_proj`). Several sequences share one index
//!   list: the union of what each needs.
//! - **Masked** (several new tokens, with `every_token`): each token gets its own selection,
//!   applied as a 0/1 mask on the ReLU output and on the head outputs. This is what
//!   perplexity and zero-shot scoring need (every prompt token sparse), at the cost of
//!   dense compute. A test checks that a masked forward over a sequence gives the logits of
//!   the kernel path run token by token.
//!
//! The prompt is dense unless `every_token` is set, as in the reference's latency path.
//!
//! **Keys and values of skipped heads.** Every head's key and value are written at every
//! step (dense `k_proj`/`v_proj`); only the queries, the attention itself and `out_proj`
//! are restricted to the selected heads. A head chosen later therefore always reads exact
//! keys and values. The reference instead keeps the last 16 layer inputs and recomputes
//! pending keys and values when a head is selected, flushing every 16 tokens; that saves
//! K/V projection reads (2·d² of the 4·d² attention weights per layer at full width) but
//! adds a data-dependent recompute and bookkeeping per head. At the 50% head density this
//! path targets, selected-Q + out_proj + full K/V read 3·d² against the reference's 2·d²
//! plus recompute; we take the simpler exact scheme and leave the trade to the end-to-end
//! benchmark.

use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::DType;
use dejavu_kernels::{Activation as Act, SparseKernels};
use dejavu_predictor::{
    DenseLayers, LowRankClassifier, ModelDims, OperatingPoint, PredictorModules, PredictorSet, Selection, SparsityPlan,
};

use burn::nn::LayerNorm;

use crate::attention::OptAttention;
use crate::cache::{KvCache, LayerKvCache, Step};
use crate::decode::{
    attention_output, blocks_with_residual, bias, dense_attention, dense_fc1, dense_mlp, fc2, kernel_norm_to, norm_params, output_projection, plus_residual, project_qkv, project_qkv_lazy, rows_of, settle_lazy_kv, DecodeWeights, StepBufferPool,
};
use crate::hooks::NormSite;
use crate::layer::LAYER_NORM_EPS;
use crate::error::ModelError;
use crate::hooks::{Activation, ForwardHooks};
use crate::mlp::OptMlp;
use crate::opt::Opt;

/// When the sparse blocks run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SparseOptions {
    /// Apply sparsity to every token, prompt included (perplexity, zero-shot scoring),
    /// instead of only to tokens decoded one at a time.
    pub every_token: bool,
    /// Score MLP neurons by their true fc1 pre-activation instead of the predictor: with a
    /// threshold of 0 this keeps exactly the active neurons (the output equals the dense
    /// MLP); with top-K, the K largest. An upper bound on what a predictor can reach — it
    /// reads all of fc1, so it is never faster.
    pub oracle_mlp: bool,
    /// Score heads by the L2 norm of their true output (before `out_proj`; what the head
    /// labels are made of) instead of the predictor: with top-K, the K heads of largest
    /// output. Dense compute, every head computed and then masked; an upper bound on what
    /// a head predictor can reach, never faster.
    pub oracle_attention: bool,
    /// How one sequence's decode steps write keys and values in sparse attention layers: 0
    /// (the default) writes every head's at every step; `W` > 0 writes only the heads the
    /// step reads (each brought up to date from the layer inputs of the last `W` steps,
    /// which the cache keeps; the reference uses 16) and any head about to lose one of
    /// those inputs — at 50% of the heads about half the key and value weight reads
    /// (`dejavu_kernels::qkv_append_lazy`). Every head reads exactly the keys and values
    /// an every-head write gives it either way (with `deferred_norms`, to the rounding of
    /// the LayerNorm's output that the cache keeps). Measured on the H100 (50% of the heads,
    /// the step of `f32_residual`, `fused_attention`, `fused_norms` and `deferred_norms`,
    /// run 132): window 2 is 3–5% faster than the every-head write (6.7B shape 2.826 and
    /// 2.783 against 2.925 and 2.908 ms/token; 13B 4.746 and 4.766 against 5.012 and
    /// 5.023), window 4 about 2% (6.7B 2.852, 13B 4.786). Longer windows let a head owe
    /// more positions, each an accumulator in the launch (8 was 3% slower than every head
    /// in run 131, with four weight vectors in flight).
    pub lazy_kv_window: usize,
    /// Hold a second copy of the predictors in the model's float dtype for the decode
    /// step's fused kernels (`norm_predict`, `predicted_rows_gemv`, `predict_select`),
    /// which then read half the predictor bytes of an f16 model: at rank 128 the second
    /// factor of the MLP predictor is 4 of the ~14 MB a 10%-dense fc1 step reads at the
    /// 6.7B shape. Sums stay f32 either way; only the stored weights round (logits move by
    /// about 1e-3 of their size, so a neuron right at its threshold may flip). Off by
    /// default: the predictors' quality was measured in f32.
    pub predictors_in_model_dtype: bool,
    /// Run a decode step's predicted MLP (threshold selection, batch 1) as one fused kernel,
    /// `predicted_mlp` — predictor, selection, fc1 and fc2's split sums in one launch, the
    /// hidden values kept on chip, then the splits' sum with the residual: two launches —
    /// instead of the separate kernels (fc1 gated by its predictor, then fc2's two passes:
    /// three launches, the hidden values through memory). Same rows, same result up to the
    /// order of f32 additions (and, in half precision, the hidden values' rounding, which
    /// the fused kernel skips). Off by default: on the H100 it was faster only at the 6.7B
    /// shape (kernel 27.0 against 28.9 µs, decode 3.33 against 3.40 ms/token) and slower at
    /// 13B and 30B (43.9 against 36.0 µs and 62.6 against 53.6; decode 5.90 against 5.72).
    pub fused_mlp: bool,
    /// Keep a decode step's residual stream in f32 (one token of one sequence, pre-LN;
    /// not with `fused_mlp`): `out_proj` adds into it (`attention_out_proj_accumulate`,
    /// in one launch with the attention when `fused_attention` is set) and so does fc2, in
    /// one launch with f32 atomics where the device has them (`accumulate_transposed_gemv`:
    /// no partial sums, no second pass). The LayerNorms read the f32 residual and write
    /// the weights' dtype. The order of the atomic additions depends on scheduling, so
    /// logits may differ between runs in f32's last bits (and a greedy token at a near
    /// tie). Measured on the H100 (6.7B shape, Nsight Compute): fc2 11.3 µs in splits of
    /// 512 rows against 9.9 + 4.4 for the two passes.
    pub f32_residual: bool,
    /// With `f32_residual`: a sparse layer's attention and `out_proj` in one launch
    /// (`attention_out_proj_accumulate`'s one-launch form) instead of two. On the H100
    /// (6.7B shape) the one launch took as much GPU time as the two in a decode step
    /// (22.5 µs against 8.5 + 13.7) and saves the host a launch per layer.
    pub fused_attention: bool,
    /// With `f32_residual`: the LayerNorms of a sparse layer without launches of their
    /// own. The launch that finishes the residual (the one-launch attention with
    /// `out_proj`, with `fused_attention`; fc2's atomic form) also writes its LayerNorm
    /// from its last cube, and the predictors that read that residual ride in the next
    /// launch on cubes of their own: the next layer's attention first factor in
    /// `qkv_append`, its MLP first factor and head selection in the predicted fc1 (with the
    /// lookahead; without it the MLP first factor keeps a launch of its own). Four launches
    /// a sparse layer where `f32_residual` with `fused_attention` takes six. The same sums
    /// as without; the atomics' order varies as with `f32_residual`.
    pub fused_norms: bool,
    /// With `fused_norms` (lookahead 1): a sparse layer's attention LayerNorm is written by
    /// no launch — fc2 of the layer before ends with its atomic adds, with no last cube's
    /// LayerNorm — and the layer's `qkv_append` applies it to the f32 residual itself: each
    /// cube normalizes it once into shared memory (`dejavu_kernels::NormIn`; `beta` and
    /// the biases folded into one f32 number per weight row, made once here). The MLP's
    /// LayerNorm stays the attention launch's epilogue (applied by the predicted fc1's
    /// cubes it cost more than it saved on the H100).
    pub deferred_norms: bool,
}

/// Predictors, plan and kernel-ready weights for one model.
#[derive(Debug)]
pub struct SparseModel<B: Backend> {
    plan: SparsityPlan,
    /// Per layer, the MLP predictor and the attention predictor (if any).
    predictors: Vec<[Option<RowPredictor<B>>; 2]>,
    weights: DecodeWeights<B>,
    options: SparseOptions,
    /// Pre-LN layers: a decode step's predictors run in the launch of the LayerNorm of the
    /// layer input they read (`norm_predict`). Post-LN layers normalize other values.
    pre_ln: bool,
    /// Each layer's two LayerNorms' `gamma` and `beta` in f32 (attention's, then the
    /// MLP's) and the final one's, for the launches that apply them to the residual they
    /// finish ([`SparseOptions::fused_norms`]).
    norms: Vec<[(Tensor<B, 1>, Tensor<B, 1>); 2]>,
    final_norm: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    /// Per layer, its query, key and value rows folded with its attention LayerNorm
    /// ([`SparseOptions::deferred_norms`]); `None` where the layer's heads are dense.
    folds: Vec<Option<LayerFolds<B>>>,
}

/// A layer's attention LayerNorm and its query, key and value rows folded with it, for a
/// `qkv_append` that applies the LayerNorm itself ([`SparseOptions::deferred_norms`]).
#[derive(Debug)]
struct LayerFolds<B: Backend> {
    attention: dejavu_kernels::NormIn<B>,
    q: dejavu_kernels::RowFold<B>,
    kv: dejavu_kernels::RowFold<B>,
}

/// A low-rank predictor in f32 (as trained: in f16 the low-rank sums of a large residual
/// overflow), both factors row-major (`down [r, d]`, `up [outputs, r]`). A decode step runs
/// the first factor as one GEMV (reading the residual in the model's dtype, no cast) when
/// the layer's input is seen, and keeps its output `[1, r]`; the second factor runs later,
/// inside the launch that uses the logits (fc1 gated by them, or head selection), so the
/// logits never go through memory. Several tokens at once go through matmuls of the
/// transposed views.
#[derive(Debug)]
struct RowPredictor<B: Backend> {
    down_rows: Tensor<B, 2>,
    up_rows: Tensor<B, 2>,
    /// What the decode step's fused kernels read: the same tensors, or copies in the
    /// model's dtype ([`SparseOptions::predictors_in_model_dtype`]).
    down_decode: Tensor<B, 2>,
    up_decode: Tensor<B, 2>,
}

/// What a predictor left for the layer it scores: the logits (several tokens), or for a
/// decode step its first factor's output, the second factor still to run, or (heads, a
/// decode step of a pre-LN model) the selection itself, made in the launch of the layer's
/// first LayerNorm.
#[derive(Debug, Clone)]
enum Prediction<B: Backend> {
    Logits(Tensor<B, 2>),
    FirstFactor(Tensor<B, 2>),
    Selected(dejavu_kernels::Selection<B>),
}

impl<B: SparseKernels> RowPredictor<B> {
    /// `decode_dtype`: the dtype the decode kernels read the factors in (f32 when `None`).
    fn new(p: &LowRankClassifier<B>, decode_dtype: Option<DType>) -> Self {
        let to = |t: Tensor<B, 2>, dtype: DType| if t.dtype() == dtype { t } else { t.cast(dtype) };
        let (down_rows, up_rows) = (to(rows_of(p.down.weight.val()), DType::F32), to(rows_of(p.up.weight.val()), DType::F32));
        let decode = decode_dtype.unwrap_or(DType::F32);
        Self { down_decode: to(down_rows.clone(), decode), up_decode: to(up_rows.clone(), decode), down_rows, up_rows }
    }

    /// For residuals `x [batch, n, d]`: one new position, the first factor's output
    /// `[batch, r]` (one GEMV launch); else the logits `[batch · n, outputs]` (f32).
    fn predict(&self, x: &Tensor<B, 3>) -> Prediction<B> {
        let [batch, n, d] = x.dims();
        let x = x.clone().reshape([batch * n, d]);
        if n == 1 {
            return Prediction::FirstFactor(dejavu_kernels::gemv(self.down_rows.clone(), x, None, Act::Identity).expect(KERNEL_SHAPES));
        }
        let x = if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) };
        Prediction::Logits(x.matmul(self.down_rows.clone().transpose()).matmul(self.up_rows.clone().transpose()))
    }

    /// The logits `[rows, outputs]` of a prediction.
    fn logits(&self, prediction: Prediction<B>) -> Tensor<B, 2> {
        match prediction {
            Prediction::Logits(l) => l,
            Prediction::FirstFactor(h) => dejavu_kernels::gemv(self.up_rows.clone(), h, None, Act::Identity).expect(KERNEL_SHAPES),
            // Only a one-token step of a threshold plan selects in the LayerNorm's launch,
            // and that step takes the selection as it is.
            Prediction::Selected(_) => unreachable!("a selection made with the LayerNorm is used as it is"),
        }
    }
}

fn model_dims<B: Backend>(model: &Opt<B>) -> ModelDims {
    let layer = &model.decoder.layers[0];
    ModelDims {
        hidden_size: layer.self_attn.num_heads * layer.self_attn.head_dim,
        ffn_dim: layer.mlp.fc1.weight.dims()[1],
        num_heads: layer.self_attn.num_heads,
        num_layers: model.num_layers(),
    }
}

impl<B: SparseKernels> SparseModel<B> {
    /// Checks that `plan` was made for this model (`model_hash` is
    /// [`crate::content_hash`] of its folder) and that every sparse layer has its
    /// predictor, then lays out the weights the kernels read.
    pub fn new(
        model: &Opt<B>,
        model_hash: &str,
        plan: SparsityPlan,
        predictors: PredictorModules<B>,
        options: SparseOptions,
    ) -> Result<Self, ModelError> {
        // Views of the model's buffers after `use_row_major_weights`, else copies.
        Self::with_weights(model, model_hash, plan, predictors, options, DecodeWeights::new(model))
    }

    /// [`SparseModel::new`] with the decode layout already made (what
    /// [`crate::use_row_major_weights`] returns), so that nothing is copied.
    pub fn with_weights(
        model: &Opt<B>,
        model_hash: &str,
        plan: SparsityPlan,
        predictors: PredictorModules<B>,
        options: SparseOptions,
        weights: DecodeWeights<B>,
    ) -> Result<Self, ModelError> {
        let dims = model_dims(model);
        plan.check_model(model_hash, &dims).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        if plan.lookahead > 1 {
            return Err(ModelError::InvalidInput(format!("lookahead {} is not 0 or 1", plan.lookahead)));
        }
        for (l, layer) in plan.layers.iter().enumerate() {
            let needs = |selection: &Selection, present: bool, kind: &str| {
                if !selection.is_dense() && (!present || l < plan.lookahead) {
                    return Err(ModelError::InvalidInput(format!(
                        "layer {l}'s {kind} is sparse in the plan but has no predictor"
                    )));
                }
                Ok(())
            };
            if !options.oracle_mlp {
                needs(&layer.mlp, predictors.mlp.get(l).is_some_and(Option::is_some), "MLP")?;
            }
            if !options.oracle_attention {
                needs(&layer.attention, predictors.attention.get(l).is_some_and(Option::is_some), "attention")?;
            }
            for (selection, width, kind) in [(layer.mlp, dims.ffn_dim, "MLP"), (layer.attention, dims.num_heads, "attention")] {
                if let Selection::TopK { k } = selection {
                    if k == 0 || k > width {
                        return Err(ModelError::InvalidInput(format!(
                            "layer {l}'s {kind} keeps K = {k} of {width}: K must be in 1..={width}"
                        )));
                    }
                }
            }
        }
        let decode_dtype = options.predictors_in_model_dtype.then(|| model.decoder.layers[0].mlp.fc1.weight.val().dtype());
        let at = |v: &Vec<Option<LowRankClassifier<B>>>, l: usize| v.get(l).and_then(Option::as_ref).map(|p| RowPredictor::new(p, decode_dtype));
        let predictors = (0..dims.num_layers).map(|l| [at(&predictors.mlp, l), at(&predictors.attention, l)]).collect();
        let pre_ln = model.decoder.layers.first().is_none_or(|l| l.do_layer_norm_before);
        let d = dims.hidden_size;
        let norms: Vec<[(Tensor<B, 1>, Tensor<B, 1>); 2]> = model.decoder.layers.iter().map(|l| [norm_params(&l.self_attn_layer_norm, d), norm_params(&l.final_layer_norm, d)]).collect();
        let final_norm = model.decoder.final_layer_norm.as_ref().map(|ln| norm_params(ln, d));
        let folds = (0..dims.num_layers)
            .map(|l| {
                (options.deferred_norms && pre_ln && !plan.layers[l].attention.is_dense()).then(|| {
                    let (layer, rows) = (&model.decoder.layers[l], &weights.layers[l]);
                    let (gamma, beta) = norms[l][0].clone();
                    let attention = dejavu_kernels::NormIn { gamma, beta, eps: LAYER_NORM_EPS as f32 };
                    LayerFolds {
                        q: dejavu_kernels::RowFold::new(&rows.q_rows, &attention, bias(&layer.self_attn.q_proj).as_ref()),
                        kv: dejavu_kernels::RowFold::new(&rows.kv_rows, &attention, rows.kv_bias.as_ref()),
                        attention,
                    }
                })
            })
            .collect();
        Ok(Self { plan, predictors, weights, options, pre_ln, norms, final_norm, folds })
    }

    /// The predictor that reads layer `layer`'s attention input (`is_attention`) or MLP
    /// input, with the layer it scores (`layer + lookahead`): none where that layer's kind
    /// is dense in the plan, where an oracle scores it, or past the last layer.
    fn predictor_reading(&self, layer: usize, is_attention: bool) -> Option<(usize, &RowPredictor<B>)> {
        let target = layer + self.plan.lookahead;
        let plan = self.plan.layers.get(target)?;
        let (selection, oracle) = match is_attention {
            true => (plan.attention, self.options.oracle_attention),
            false => (plan.mlp, self.options.oracle_mlp),
        };
        if selection.is_dense() || oracle {
            return None;
        }
        self.predictors[target][usize::from(is_attention)].as_ref().map(|p| (target, p))
    }

    /// Loads the predictor folder `predictors_dir` for the model loaded from `model_dir`
    /// and follows `point`: the folder must have been trained for this very model (same
    /// content hash and widths).
    pub fn load(
        model: &Opt<B>,
        model_dir: &std::path::Path,
        predictors_dir: &std::path::Path,
        point: &OperatingPoint,
        dense: &DenseLayers,
        options: SparseOptions,
    ) -> Result<Self, ModelError> {
        let err = |message: String| ModelError::Predictors { dir: predictors_dir.to_path_buf(), message };
        let set = PredictorSet::<B>::load(predictors_dir, &model.device()).map_err(|e| err(e.to_string()))?;
        let plan = SparsityPlan::new(&set.manifest, point, dense).map_err(|e| err(e.to_string()))?;
        let hash = crate::content_hash(model_dir)?;
        Self::new(model, &hash, plan, set.modules, options).map_err(|e| match e {
            ModelError::InvalidInput(message) => err(format!("{message} (model folder {})", model_dir.display())),
            other => other,
        })
    }

    pub fn plan(&self) -> &SparsityPlan {
        &self.plan
    }

    /// Writes every key and value that lazily written layers of `cache` still owe (see
    /// [`SparseOptions::lazy_kv_window`]), from the inputs the cache keeps: afterwards
    /// every head has its keys and values at every cached position, as an every-head
    /// decode leaves them. The sparse hooks do this themselves before any other use of a
    /// layer; this is for reading the cache from outside.
    pub fn settle_kv(&self, model: &Opt<B>, cache: &mut KvCache<B>) {
        let len = cache.len();
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            settle_lazy_kv(&model.decoder.layers[l].self_attn, &self.weights.layers[l], &self.weights.all_heads, layer, len);
        }
    }

    /// Hooks for [`Opt::forward_with`] (and so for generation and perplexity). Keep one
    /// per sequence of calls to accumulate [`SparsityStats`].
    pub fn hooks(&self) -> SparseHooks<'_, B> {
        let n = self.plan.layers.len();
        SparseHooks {
            model: self,
            mlp_pending: vec![None; n],
            attention_pending: vec![None; n],
            mlp_kept: vec![Kept::default(); n],
            attention_kept: vec![Kept::default(); n],
            count_kept: true,
            normed_ahead: None,
            deferred: None,
            norm_in: None,
            norms_in_launch: 0,
            first_due: None,
            done: None,
            step_buffers: StepBufferPool::new(true),
        }
    }

    /// Whether the launch that finishes the residual entering layer `l` (fc2 of the layer
    /// before) leaves its LayerNorm to the launch that reads it
    /// ([`SparseOptions::deferred_norms`]): layer `l`'s `qkv_append` on its sparse path,
    /// carrying the next layer's attention first factor (lookahead 1).
    /// `attention_pending`: whether the hooks hold a prediction for layer `l`'s heads.
    /// (Layer `l` has folds only with `deferred_norms` and sparse heads.)
    fn defers_attention_norm(&self, l: usize, attention_pending: bool) -> bool {
        let options = &self.options;
        options.fused_norms
            && self.folds.get(l).is_some_and(Option::is_some)
            && !options.oracle_attention
            && attention_pending
            && self.plan.lookahead == 1
            && self.predictor_reading(l, true).is_some()
    }

    /// The LayerNorm for the launch that finishes the residual entering `site` to apply
    /// ([`SparseOptions::fused_norms`]), with the sequence's counter (made on first use).
    fn norm_after(&self, done: &mut Option<Tensor<B, 1, Int>>, site: NormSite, device: &B::Device) -> Option<dejavu_kernels::NormAfter<B>> {
        let (gamma, beta) = match site {
            NormSite::AttentionInput(l) => self.norms.get(l)?[0].clone(),
            NormSite::MlpInput(l) => self.norms.get(l)?[1].clone(),
            NormSite::Final => self.final_norm.clone()?,
            _ => return None,
        };
        let done = done.get_or_insert_with(|| dejavu_kernels::NormAfter::counter(device)).clone();
        Some(dejavu_kernels::NormAfter { gamma, beta, eps: LAYER_NORM_EPS as f32, dtype: self.weights_dtype(), done })
    }

    /// The weights' float dtype, which a LayerNorm of an f32 residual writes.
    fn weights_dtype(&self) -> DType {
        self.weights.layers[0].q_rows.dtype()
    }
}

/// A predictor's first factor still owed: the residual it reads was normalized by the
/// launch before ([`SparseOptions::fused_norms`]), so no `norm_predict` computed it. The
/// next launch carries it where it can, else it gets a GEMV of its own.
#[derive(Debug)]
struct FirstDue<B: Backend> {
    /// The layer the predictor scores.
    target: usize,
    is_attention: bool,
    /// The residual it reads, `[1, d]` f32.
    residual: Tensor<B, 2>,
}

impl<B: SparseKernels> FirstDue<B> {
    fn predictor<'m>(&self, model: &'m SparseModel<B>) -> &'m RowPredictor<B> {
        model.predictors[self.target][usize::from(self.is_attention)].as_ref().expect("a first factor owed has its predictor")
    }

    /// What a launch needs to carry it: its predictor's first factor (in the decode
    /// kernels' dtype) and the residual, with the layer it scores.
    fn rider(self, model: &SparseModel<B>) -> (usize, dejavu_kernels::FirstFactor<B>) {
        let down = self.predictor(model).down_decode.clone();
        (self.target, dejavu_kernels::FirstFactor { down, residual: self.residual })
    }
}

/// Per-token counts of what was kept, summed on the device (no sync per layer).
#[derive(Debug, Clone)]
struct Kept<B: Backend> {
    host: f64,
    device: Option<Tensor<B, 1>>,
    /// Selection counts, summed as integers: one launch per step instead of a conversion,
    /// a cast and an add (a decode step is bound by its number of launches).
    device_int: Option<Tensor<B, 1, Int>>,
    tokens: u64,
}

impl<B: Backend> Default for Kept<B> {
    fn default() -> Self {
        Self { host: 0.0, device: None, device_int: None, tokens: 0 }
    }
}

impl<B: Backend> Kept<B> {
    fn add_host(&mut self, kept: f64, tokens: usize) {
        self.host += kept;
        self.tokens += tokens as u64;
    }

    fn add_device(&mut self, kept: Tensor<B, 1>, tokens: usize) {
        self.device = Some(match self.device.take() {
            Some(sum) => sum + kept,
            None => kept,
        });
        self.tokens += tokens as u64;
    }

    fn add_device_int(&mut self, kept: Tensor<B, 1, Int>, tokens: usize) {
        self.device_int = Some(match self.device_int.take() {
            Some(sum) => sum + kept,
            None => kept,
        });
        self.tokens += tokens as u64;
    }

    /// Mean fraction of `width` kept per sparse token; `None` when no token was sparse.
    fn density(&self, width: usize) -> Option<f64> {
        if self.tokens == 0 {
            return None;
        }
        let device = self.device.as_ref().map_or(0.0, |t| t.clone().into_scalar().elem::<f64>());
        let device_int = self.device_int.as_ref().map_or(0.0, |t| t.clone().into_scalar().elem::<f64>());
        Some((self.host + device + device_int) / (self.tokens as f64 * width as f64))
    }
}

/// What the sparse path kept, per layer: the mean fraction of neurons and heads per token
/// that ran sparse (`None` for a layer that ran dense throughout).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SparsityStats {
    pub mlp: Vec<Option<f64>>,
    pub attention: Vec<Option<f64>>,
}

impl SparsityStats {
    /// Mean over all layers, a dense layer counting 1.
    pub fn mean_mlp_density(&self) -> f64 {
        mean_density(&self.mlp)
    }

    pub fn mean_attention_density(&self) -> f64 {
        mean_density(&self.attention)
    }
}

fn mean_density(v: &[Option<f64>]) -> f64 {
    v.iter().map(|d| d.unwrap_or(1.0)).sum::<f64>() / v.len().max(1) as f64
}

/// The per-forward state of the sparse path: predictions for the layers ahead, and what
/// was kept so far.
pub struct SparseHooks<'a, B: Backend> {
    model: &'a SparseModel<B>,
    mlp_pending: Vec<Option<Prediction<B>>>,
    attention_pending: Vec<Option<Prediction<B>>>,
    mlp_kept: Vec<Kept<B>>,
    attention_kept: Vec<Kept<B>>,
    count_kept: bool,
    /// A LayerNorm the launch before wrote for `site` ([`SparseOptions::fused_norms`]),
    /// taken by the next [`ForwardHooks::norm`] of that site.
    normed_ahead: Option<(NormSite, Tensor<B, 3>)>,
    /// A LayerNorm the launch before left to the launch that reads it
    /// ([`SparseOptions::deferred_norms`]), taken by the next [`ForwardHooks::norm`] of
    /// that site, which hands the residual on as it is and moves it to `norm_in`.
    deferred: Option<NormSite>,
    /// The site whose block gets the residual instead of its LayerNorm, to apply itself.
    norm_in: Option<NormSite>,
    /// How many LayerNorms blocks applied in their own launches (`norm_in` taken).
    norms_in_launch: usize,
    first_due: Option<FirstDue<B>>,
    /// The counter of the launches that write a LayerNorm from their last cube.
    done: Option<Tensor<B, 1, Int>>,
    /// The first decode step's buffers held for the later ones (see `StepBufferPool`).
    step_buffers: StepBufferPool<B>,
}

/// 0/1 mask `[rows, width]` of what `selection` keeps for each row of `logits`: top-K
/// without a sort on `CubeBackend` ([`dejavu_kernels::topk_mask`]).
fn selection_mask<B: SparseKernels>(logits: Tensor<B, 2>, selection: Selection) -> Tensor<B, 2> {
    let [rows, width] = logits.dims();
    match selection {
        Selection::Dense => Tensor::ones([rows, width], &logits.device()),
        Selection::TopK { k } if k >= width => Tensor::ones([rows, width], &logits.device()),
        Selection::TopK { k } => dejavu_kernels::topk_mask(logits, k).expect(KERNEL_SHAPES),
        Selection::Threshold { threshold } => logits.greater_elem(threshold).float(),
    }
}

/// The number of ones in a 0/1 mask, summed in f32 whatever the default dtype: a half
/// precision sum would lose counts past 2048 and overflow past 65504.
fn count<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 1> {
    mask.cast(DType::F32).sum()
}

const KERNEL_SHAPES: &str = "the sparse model checked these shapes when it was built";

impl<B: SparseKernels> SparseHooks<'_, B> {
    /// Hooks that do not count what decode steps keep ([`SparseHooks::stats`] then covers
    /// only what was counted): counting costs a launch per selection, which a latency
    /// benchmark's timed runs leave out.
    pub fn without_counts(mut self) -> Self {
        self.count_kept = false;
        self
    }

    /// Steps whose buffers come from the allocator's default pool, without the pool of
    /// fixed sizes the hooks otherwise turn on for the first decode step (see
    /// `StepBufferPool` in `decode.rs`).
    pub fn without_step_buffer_pool(mut self) -> Self {
        self.step_buffers = StepBufferPool::new(false);
        self
    }

    /// Mean fraction kept per sparse token, per layer (reads the device once).
    pub fn stats(&self) -> SparsityStats {
        let dims = &self.model.plan.dims;
        SparsityStats {
            mlp: self.mlp_kept.iter().map(|k| k.density(dims.ffn_dim)).collect(),
            attention: self.attention_kept.iter().map(|k| k.density(dims.num_heads)).collect(),
        }
    }

    /// How many LayerNorms the blocks applied in their own launches so far
    /// ([`SparseOptions::deferred_norms`]).
    pub fn norms_in_launch(&self) -> usize {
        self.norms_in_launch
    }

    fn sparse_call(&self, n: usize) -> bool {
        n == 1 || self.model.options.every_token
    }

    /// Whether the predictors reading layer input `x` run in the launch of its LayerNorm
    /// ([`SparseHooks::norm_and_predict`]) rather than when it is observed: one token of
    /// one sequence, in a pre-LN model (where that LayerNorm reads exactly the observed
    /// residual).
    fn fused_with_norm(&self, x: &Tensor<B, 3>) -> bool {
        let [batch, n, _] = x.dims();
        self.fused_with_norm_step(batch, n)
    }

    /// [`Self::fused_with_norm`] for a step of `n` tokens of `batch` sequences.
    fn fused_with_norm_step(&self, batch: usize, n: usize) -> bool {
        self.model.pre_ln && batch == 1 && n == 1
    }

    /// Whether this one-token step keeps its residual stream in f32
    /// ([`SparseOptions::f32_residual`]); `x` is a block's normalized input or the
    /// residual, `[1, 1, d]`.
    fn f32_residual(&self, x: &Tensor<B, 3>) -> bool {
        let [batch, n, _] = x.dims();
        self.f32_residual_step(batch, n)
    }

    /// [`Self::f32_residual`] for a step of `n` tokens of `batch` sequences.
    fn f32_residual_step(&self, batch: usize, n: usize) -> bool {
        let options = &self.model.options;
        options.f32_residual && !options.fused_mlp && self.fused_with_norm_step(batch, n)
    }

    /// The weights' float dtype, which a LayerNorm of an f32 residual writes.
    fn weights_dtype(&self) -> DType {
        self.model.weights_dtype()
    }

    /// Records the first factor owed to the predictor that reads the residual `x` entering
    /// `site`, whose LayerNorm no `norm_predict` launch computed ([`FirstDue`]).
    fn owe_first_factor(&mut self, site: NormSite, x: &Tensor<B, 3>) {
        let reading = match site {
            NormSite::AttentionInput(layer) => Some((layer, true)),
            NormSite::MlpInput(layer) => Some((layer, false)),
            _ => None,
        };
        if let Some((target, is_attention)) = reading.and_then(|(l, a)| self.model.predictor_reading(l, a).map(|(t, _)| (t, a))) {
            let d = x.dims()[2];
            self.first_due = Some(FirstDue { target, is_attention, residual: x.clone().reshape([1, d]) });
        }
    }

    /// The attention LayerNorm of layer `layer`'s input `x` where its block could not
    /// apply it in its own launch after all ([`SparseHooks::norm_in`]), in the weights'
    /// dtype.
    fn normalize_here(&self, layer: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, n, d] = x.dims();
        let (gamma, beta) = self.model.norms[layer][0].clone();
        dejavu_kernels::layer_norm_to(x.reshape([batch * n, d]), gamma, beta, LAYER_NORM_EPS as f32, self.weights_dtype()).expect(KERNEL_SHAPES).reshape([batch, n, d])
    }

    /// Gives a first factor still owed ([`FirstDue`]) a GEMV launch of its own, where no
    /// launch of the block carries it.
    fn settle_first(&mut self, due: Option<FirstDue<B>>) {
        let Some(due) = due else { return };
        let [_, d] = due.residual.dims();
        let prediction = Some(due.predictor(self.model).predict(&due.residual.clone().reshape([1, 1, d])));
        match due.is_attention {
            true => self.attention_pending[due.target] = prediction,
            false => self.mlp_pending[due.target] = prediction,
        }
    }

    /// fc2 added into the residual; with [`SparseOptions::fused_norms`] (an f32 residual
    /// stream, one token) its launch also writes the LayerNorm of the next layer's input
    /// (or the final one), which the next [`ForwardHooks::norm`] takes.
    fn fc2_and_norm(&mut self, layer: usize, mlp: &OptMlp<B>, h: Tensor<B, 2>, residual: Option<Tensor<B, 3>>, accumulate: bool) -> Tensor<B, 3> {
        let next = if layer + 1 < self.model.plan.layers.len() { NormSite::AttentionInput(layer + 1) } else { NormSite::Final };
        let fused = accumulate && self.model.options.fused_norms;
        let defers = match next {
            NormSite::AttentionInput(l) => self.model.defers_attention_norm(l, self.attention_pending.get(l).is_some_and(Option::is_some)),
            _ => false,
        };
        if fused && residual.is_some() && defers {
            self.deferred = Some(next);
            return fc2(mlp, h, residual, accumulate);
        }
        let norm = match &residual {
            Some(r) if fused => self.model.norm_after(&mut self.done, next, &r.device()),
            _ => None,
        };
        // The residual handed over, not cloned: a second handle would make the launch copy
        // it before adding into it.
        let (r, norm) = match (residual, norm) {
            (Some(r), Some(norm)) => (r, norm),
            (residual, _) => return fc2(mlp, h, residual, accumulate),
        };
        let [_, _, d] = r.dims();
        let r = if r.dtype() == DType::F32 { r } else { r.cast(DType::F32) };
        let (y, normed) = dejavu_kernels::accumulate_transposed_gemv_norm(r.reshape([1, d]), mlp.fc2.weight.val(), h, bias(&mlp.fc2), norm).expect(KERNEL_SHAPES);
        self.normed_ahead = Some((next, normed.reshape([1, 1, d])));
        y.reshape([1, 1, d])
    }

    /// The LayerNorm of layer `layer`'s attention input (`is_attention`) or MLP input `x`
    /// `[1, 1, d]`, with the first factor of the predictor that reads it (layer `layer +
    /// lookahead`'s) and, for the attention input, this layer's head selection from the
    /// first factor left before, all in one launch (`dejavu_kernels::norm_predict`).
    fn norm_and_predict(&mut self, layer: usize, is_attention: bool, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let model = self.model;
        let d = x.dims()[2];
        let dtype = self.weights_dtype();
        let Some((target, predictor)) = model.predictor_reading(layer, is_attention) else { return kernel_norm_to(ln, x, dtype) };
        // This layer's heads, from the first factor the layer before left.
        let select = match (is_attention, &self.attention_pending[layer], model.plan.layers[layer].attention) {
            (true, Some(Prediction::FirstFactor(h)), Selection::Threshold { threshold }) => model.predictors[layer][1]
                .as_ref()
                .map(|p| dejavu_kernels::HeadSelect { up: p.up_decode.clone(), h: h.clone(), threshold, capacity: model.plan.dims.num_heads }),
            _ => None,
        };
        let (gamma, beta) = norm_params(ln, d);
        let fused = dejavu_kernels::norm_predict_to(x.reshape([1, d]), gamma, beta, LAYER_NORM_EPS as f32, predictor.down_decode.clone(), select, dtype)
            .expect(KERNEL_SHAPES);
        let pending = if is_attention { &mut self.attention_pending } else { &mut self.mlp_pending };
        pending[target] = Some(Prediction::FirstFactor(fused.first));
        if let Some(selected) = fused.selection {
            self.attention_pending[layer] = Some(Prediction::Selected(selected));
        }
        fused.normed.reshape([1, 1, d])
    }

    /// The index list `[slots]` the kernels read for `logits [batch, width]` (the union of
    /// every row's selection, empty slots padded with `width`), recording what was kept.
    fn indices(kept: &mut Kept<B>, logits: Tensor<B, 2>, selection: Selection, count_kept: bool) -> Tensor<B, 1, Int> {
        let [rows, width] = logits.dims();
        match selection {
            Selection::Threshold { threshold } => {
                // One row: the selection's own count is what the token kept.
                let per_token = (rows > 1).then(|| count(logits.clone().greater_elem(threshold).float()));
                let selected = dejavu_kernels::select_above_threshold(logits, threshold, width).expect(KERNEL_SHAPES);
                match per_token {
                    Some(c) => kept.add_device(c, rows),
                    None if count_kept => kept.add_device_int(selected.count, rows),
                    None => {}
                }
                selected.indices
            }
            Selection::TopK { k } => {
                // Each row's top-K as a mask, their union, then the compact list.
                if count_kept {
                    kept.add_host((k * rows) as f64, rows);
                }
                let union = selection_mask(logits, selection).sum_dim(0);
                dejavu_kernels::select_above_threshold(union, 0.5, (rows * k).min(width))
                    .expect(KERNEL_SHAPES)
                    .indices
            }
            Selection::Dense => Tensor::arange(0..width as i64, &logits.device()),
        }
    }

    /// The per-token 0/1 mask of `selection` (`[rows, width]`), recording what was kept.
    fn mask(kept: &mut Kept<B>, logits: Tensor<B, 2>, selection: Selection) -> Tensor<B, 2> {
        let rows = logits.dims()[0];
        let mask = selection_mask(logits, selection);
        match selection {
            Selection::TopK { k } => kept.add_host((k * rows) as f64, rows),
            _ => kept.add_device(count(mask.clone()), rows),
        }
        mask
    }
}

impl<B: SparseKernels> SparseHooks<'_, B> {
    /// Layer `layer`'s attention, plus `residual` when given (fused into `out_proj` on the
    /// kernel path).
    fn attention_block(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Option<Tensor<B, 3>>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        let selection = self.model.plan.layers[layer].attention;
        let [batch, n, d] = x.dims();
        if layer == 0 && n == 1 {
            self.step_buffers.at_step(&x.device());
        }
        // A residual stream kept in f32 starts at the first layer's attention.
        let accumulate = residual.is_some() && self.f32_residual(&x);
        let residual = residual.map(|r| if accumulate && r.dtype() != DType::F32 { r.cast(DType::F32) } else { r });
        let weights = &self.model.weights;
        let oracle = self.model.options.oracle_attention && self.sparse_call(n) && !selection.is_dense();
        // Whether this call takes the kernel path below for one sequence with lazy keys
        // and values; any other use of the cache first settles what it owes.
        let window = self.model.options.lazy_kv_window;
        let lazy = window > 0
            && batch == 1
            && n == 1
            && !oracle
            && self.sparse_call(n)
            && !selection.is_dense()
            && self.attention_pending[layer].is_some();
        if !lazy {
            settle_lazy_kv(attention, &weights.layers[layer], &weights.all_heads, cache, step.start);
        }
        // A first factor still owed rides in `qkv_append` (or its lazy twin) on the kernel
        // path below, else gets its own launch now.
        let kernel_path = !oracle && batch == 1 && n == 1 && self.sparse_call(n) && !selection.is_dense() && self.attention_pending[layer].is_some();
        // `x` may be the residual whose LayerNorm `qkv_append` is to apply
        // ([`SparseOptions::deferred_norms`]); any other path normalizes it first.
        let site = NormSite::AttentionInput(layer);
        let (x, norm_in) = if self.norm_in.take_if(|s| *s == site).is_none() {
            (x, None)
        } else if let Some(f) = self.model.folds[layer].as_ref().filter(|_| kernel_path) {
            self.norms_in_launch += 1;
            (x, Some((f.attention.clone(), f.q.clone(), f.kv.clone())))
        } else {
            (self.normalize_here(layer, x), None)
        };
        let due = match self.first_due.take() {
            Some(due) if kernel_path && due.is_attention && due.target != layer => Some(due),
            other => {
                self.settle_first(other);
                None
            }
        };
        if oracle {
            // The oracle: every head computed, then masked by its output norm.
            let dtype = x.dtype();
            let heads = attention.head_outputs(x, cache, step);
            let scores = heads.clone().cast(DType::F32).powf_scalar(2.0).sum_dim(3).sqrt();
            let scores = scores.reshape([batch, attention.num_heads, n]).swap_dims(1, 2).reshape([batch * n, attention.num_heads]);
            let mask = Self::mask(&mut self.attention_kept[layer], scores, selection)
                .cast(dtype)
                .reshape([batch, n, attention.num_heads])
                .swap_dims(1, 2)
                .unsqueeze_dim::<4>(3);
            return plus_residual(attention.project_out(heads * mask), residual);
        }
        let prediction = match self.attention_pending[layer].take() {
            Some(p) if self.sparse_call(n) && !selection.is_dense() => p,
            _ if n == 1 => return dense_attention(attention, &weights.layers[layer], &weights.all_heads, x, residual, cache, step),
            _ => return plus_residual(attention.project_out(attention.head_outputs(x, cache, step)), residual),
        };
        let predictor = self.model.predictors[layer][1].as_ref().expect("a pending prediction has its predictor");
        let kept = &mut self.attention_kept[layer];
        if n > 1 {
            // Masked: each token keeps its own heads.
            let dtype = x.dtype();
            let heads = attention.head_outputs(x, cache, step);
            let mask = Self::mask(kept, predictor.logits(prediction), selection)
                .cast(dtype)
                .reshape([batch, n, attention.num_heads])
                .swap_dims(1, 2)
                .unsqueeze_dim::<4>(3);
            return plus_residual(attention.project_out(heads * mask), residual);
        }
        // Kernels.
        let x = x.reshape([batch, d]);
        let heads = match (prediction, selection) {
            // Selected in the launch of this layer's first LayerNorm.
            (Prediction::Selected(selected), _) => {
                if self.count_kept {
                    kept.add_device_int(selected.count, 1);
                }
                selected.indices
            }
            // One token, threshold: the predictor's second factor and the selection in
            // one launch.
            (Prediction::FirstFactor(h), Selection::Threshold { threshold }) if batch == 1 => {
                let selected = dejavu_kernels::predict_select(predictor.up_decode.clone(), h, threshold, attention.num_heads)
                    .expect(KERNEL_SHAPES);
                if self.count_kept {
                    kept.add_device_int(selected.count, 1);
                }
                selected.indices
            }
            (prediction, _) => Self::indices(kept, predictor.logits(prediction), selection, self.count_kept),
        };
        let hd = attention.head_dim;
        // The selected heads' queries, and every head's key and value (see the module
        // comment) or, lazily, those of the heads read, in one launch.
        // A first factor owed rides along (see above).
        let first = due.map(|due| due.rider(self.model));
        let target = first.as_ref().map(|(t, _)| *t);
        let first = first.map(|(_, f)| f);
        let (q, keys, values, first) = match lazy {
            true => project_qkv_lazy(attention, &weights.layers[layer], heads.clone(), x, cache, step, window, first, norm_in),
            false => project_qkv(attention, &weights.layers[layer], Some(heads.clone()), x, cache, step, first, norm_in),
        };
        if let (Some(target), Some(first)) = (target, first) {
            self.attention_pending[target] = Some(Prediction::FirstFactor(first));
        }
        let scale = (hd as f32).powf(-0.5);
        let residual = match (accumulate, residual) {
            // Attention and out_proj in one launch, added into the f32 residual (its
            // buffer handed over: updated in place).
            (true, Some(r)) => {
                let out_rows = self.model.weights.layers[layer].out_rows.clone();
                let one_launch = self.model.options.fused_attention;
                // With fused_norms the launch's last cube also writes the MLP's LayerNorm.
                let norm = match one_launch && self.model.options.fused_norms && batch == 1 {
                    true => self.model.norm_after(&mut self.done, NormSite::MlpInput(layer), &r.device()),
                    false => None,
                };
                if let Some(norm) = norm {
                    let out_bias = bias(&attention.out_proj);
                    let (y, normed) = dejavu_kernels::attention_out_proj_accumulate_norm(q, heads, keys, values, step.start + 1, scale, out_rows, out_bias, r.reshape([batch, d]), norm)
                        .expect(KERNEL_SHAPES);
                    self.normed_ahead = Some((NormSite::MlpInput(layer), normed.reshape([batch, 1, d])));
                    return y.reshape([batch, 1, d]);
                }
                let y = dejavu_kernels::attention_out_proj_accumulate(q, heads, keys, values, step.start + 1, scale, out_rows, bias(&attention.out_proj), r.reshape([batch, d]), one_launch);
                return y.expect(KERNEL_SHAPES).reshape([batch, 1, d]);
            }
            (_, residual) => residual,
        };
        let out = dejavu_kernels::selected_heads_attention(q, heads.clone(), keys, values, step.start + 1, scale)
            .expect(KERNEL_SHAPES);
        attention_output(&self.model.weights.layers[layer], Some((heads, hd)), out, bias(&attention.out_proj), residual)
    }

    /// Layer `layer`'s MLP, plus `residual` when given (fused into fc2 on the kernel path).
    fn mlp_block(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let selection = self.model.plan.layers[layer].mlp;
        let [batch, n, d] = x.dims();
        let model = self.model;
        let weights = &model.weights.layers[layer];
        // fc2 adds into a residual stream kept in f32 (see the attention block).
        let accumulate = residual.is_some() && self.f32_residual(&x);
        // A first factor still owed (the next layer's, with the lookahead) rides in the
        // predicted fc1 below; else (this layer's own, or another path) its own launch now.
        let fc1_path = matches!(selection, Selection::Threshold { .. })
            && batch == 1
            && n == 1
            && self.sparse_call(n)
            && !model.options.oracle_mlp
            && !model.options.fused_mlp
            && matches!(self.mlp_pending[layer], Some(Prediction::FirstFactor(_)));
        let due = match self.first_due.take() {
            Some(due) if fc1_path && !due.is_attention && due.target != layer => Some(due),
            other => {
                self.settle_first(other);
                None
            }
        };
        if !self.sparse_call(n) || selection.is_dense() {
            // One token: the dense MLP's fc2 (with fused_norms, writing the next LayerNorm).
            return if n == 1 { self.fc2_and_norm(layer, mlp, dense_fc1(mlp, weights, x), residual, accumulate) } else { plus_residual(mlp.forward(x), residual) };
        }
        // The oracle scores neurons by fc1's own pre-activation, kept for the masked path.
        let oracle = self.model.options.oracle_mlp.then(|| mlp.fc1.forward(x.clone()));
        let prediction = match &oracle {
            Some(pre) => {
                let pre = pre.clone().reshape([batch * n, self.model.plan.dims.ffn_dim]);
                Prediction::Logits(if pre.dtype() == DType::F32 { pre } else { pre.cast(DType::F32) })
            }
            None => match self.mlp_pending[layer].take() {
                Some(p) => p,
                None if n == 1 => return dense_mlp(mlp, weights, x, residual, accumulate),
                None => return plus_residual(mlp.forward(x), residual),
            },
        };
        let predictor = || self.model.predictors[layer][0].as_ref().expect("a first factor comes from a predictor");
        let logits_of = |prediction: Prediction<B>| match prediction {
            Prediction::Logits(l) => l,
            first => predictor().logits(first),
        };
        let kept = &mut self.mlp_kept[layer];
        let count_kept = self.count_kept;
        if let (Selection::Threshold { threshold }, 1, 1) = (selection, batch, n) {
            // Selection fused into fc1: a row is read only when its logit is above the
            // threshold (the others give 0), and fc2's transposed GEMV skips the zeros.
            // No index list.
            if count_kept {
                kept.add_device_int(logits_of(prediction.clone()).greater_elem(threshold).int().sum(), 1);
            }
            let x = x.reshape([batch, d]);
            let fc1_rows = weights.fc1_rows.clone();
            let h = match prediction {
                // Predictor, selection, fc1 and fc2 in one launch, then the residual add.
                Prediction::FirstFactor(h) if self.model.options.fused_mlp => {
                    let mlp_weights = dejavu_kernels::MlpWeights { w1: fc1_rows, b1: bias(&mlp.fc1), w2_t: mlp.fc2.weight.val(), b2: bias(&mlp.fc2) };
                    let residual = residual.map(|r| r.reshape([batch, d]));
                    let y = dejavu_kernels::predicted_mlp(mlp_weights, x, residual, predictor().up_decode.clone(), h, threshold);
                    return y.expect(KERNEL_SHAPES).reshape([batch, 1, d]);
                }
                // The predictor's second factor runs in the same launch: no logits in memory.
                // With fused_norms the next layer's MLP first factor and head selection ride
                // along on cubes of their own.
                Prediction::FirstFactor(h) => {
                    let first = due.map(|due| due.rider(model));
                    let next = layer + 1;
                    let next_heads = (self.attention_pending.get(next), model.plan.layers.get(next).map(|p| p.attention), model.predictors.get(next));
                    let select = match next_heads {
                        (Some(Some(Prediction::FirstFactor(h))), Some(Selection::Threshold { threshold }), Some([_, Some(p)])) if model.options.fused_norms => {
                            Some(dejavu_kernels::HeadSelect { up: p.up_decode.clone(), h: h.clone(), threshold, capacity: model.plan.dims.num_heads })
                        }
                        _ => None,
                    };
                    let target = first.as_ref().map(|(t, _)| *t);
                    let up = predictor().up_decode.clone();
                    let rows = dejavu_kernels::predicted_rows_gemv_with(fc1_rows, x, bias(&mlp.fc1), Act::Relu, up, h, threshold, first.map(|(_, f)| f), select)
                        .expect(KERNEL_SHAPES);
                    if let (Some(target), Some(first)) = (target, rows.first) {
                        self.mlp_pending[target] = Some(Prediction::FirstFactor(first));
                    }
                    if let Some(selected) = rows.selection {
                        self.attention_pending[next] = Some(Prediction::Selected(selected));
                    }
                    return self.fc2_and_norm(layer, mlp, rows.out, residual, accumulate);
                }
                // The oracle's logits.
                Prediction::Logits(logits) => {
                    let [_, width] = logits.dims();
                    dejavu_kernels::gated_rows_gemv(fc1_rows, x, bias(&mlp.fc1), Act::Relu, logits.reshape([width]), threshold)
                }
                Prediction::Selected(_) => unreachable!("neurons are selected inside fc1, never with the LayerNorm"),
            };
            return fc2(mlp, h.expect(KERNEL_SHAPES), residual, accumulate);
        }
        let logits = logits_of(prediction);
        if n > 1 {
            // Masked: each token keeps its own neurons.
            let [_, width] = logits.dims();
            let mask = Self::mask(kept, logits, selection).cast(x.dtype()).reshape([batch, n, width]);
            let pre = oracle.unwrap_or_else(|| mlp.fc1.forward(x));
            return plus_residual(mlp.fc2.forward(relu(pre) * mask), residual);
        }
        let x = x.reshape([batch, d]);
        let idx = Self::indices(kept, logits, selection, count_kept);
        let fc1_rows = weights.fc1_rows.clone();
        let h = dejavu_kernels::gather_rows_gemv(fc1_rows, idx.clone(), x, bias(&mlp.fc1), Act::Relu).expect(KERNEL_SHAPES);
        output_projection(mlp.fc2.weight.val(), Some(idx), h, bias(&mlp.fc2), residual, accumulate)
    }
}

impl<B: SparseKernels> ForwardHooks<B> for SparseHooks<'_, B> {
    fn observe(&mut self, activation: Activation<'_, B>) {
        let model = self.model;
        let (layer, value, is_attention) = match activation {
            Activation::AttentionInput { layer, value } => (layer, value, true),
            Activation::MlpInput { layer, value } => (layer, value, false),
            _ => return,
        };
        if !self.sparse_call(value.dims()[1]) || self.fused_with_norm(value) {
            return;
        }
        if let Some((target, p)) = model.predictor_reading(layer, is_attention) {
            let prediction = Some(p.predict(value));
            if is_attention {
                self.attention_pending[target] = prediction;
            } else {
                self.mlp_pending[target] = prediction;
            }
        }
    }

    /// A decode step whose residual stream is f32 starts it in f32 from one launch
    /// (`embed_rows`: the token's row plus its position's, rounded to the weights' dtype
    /// as Burn's add rounds it), where Burn's lookup, add and the first attention's cast
    /// were three launches, each uploading its tensors' shapes.
    fn embed(&mut self, tokens: &Tensor<B, 2, Int>, table: &Tensor<B, 2>, positions: &Tensor<B, 2>) -> Option<Tensor<B, 3>> {
        let [batch, n] = tokens.dims();
        let d = table.dims()[1];
        if !B::has_kernels() || !self.f32_residual_step(batch, n) {
            return None;
        }
        let x = dejavu_kernels::embed_rows(tokens.clone().reshape([n]), table.clone(), positions.clone(), DType::F32).expect(KERNEL_SHAPES);
        Some(x.reshape([1, 1, d]))
    }

    blocks_with_residual!();

    fn norm(&mut self, site: NormSite, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // A residual stream kept in f32 is normalized into the weights' dtype (the last
        // LayerNorm's output goes to the LM head).
        let dtype = if self.f32_residual(&x) { self.weights_dtype() } else { x.dtype() };
        // No launch wrote this LayerNorm: the block's launch applies it to the residual,
        // handed on as it is. The predictor that reads the residual is still owed its first
        // factor, which the next launch carries.
        if self.deferred == Some(site) {
            self.deferred = None;
            self.norm_in = Some(site);
            self.owe_first_factor(site, &x);
            return x;
        }
        // Written by the launch that finished this residual; the first factor as above.
        if let Some((ahead, normed)) = self.normed_ahead.take() {
            if ahead == site {
                self.owe_first_factor(site, &x);
                return normed;
            }
        }
        let (layer, is_attention) = match site {
            NormSite::AttentionInput(layer) => (layer, true),
            NormSite::MlpInput(layer) => (layer, false),
            _ => return kernel_norm_to(ln, x, dtype),
        };
        if !self.fused_with_norm(&x) {
            return kernel_norm_to(ln, x, dtype);
        }
        self.norm_and_predict(layer, is_attention, ln, x)
    }
}
