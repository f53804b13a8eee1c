//! Decode through the kernels of `dejavu-kernels`, dense: [`KernelDecode`] is a
//! [`ForwardHooks`] that runs one-token steps with a handful of launches per layer instead
//! of Burn's composed tensor ops.
//!
//! At batch 1 a decode step is bound by the host's cost per launch (CubeCL spends about
//! 15–20 µs of host time on each), not by the GPU: Burn's LayerNorm alone is eight small
//! kernels plus two casts, a `Linear` is a matmul and a bias add, and the attention over the
//! cache is two matmuls, a softmax of four kernels and the copies between them. Here a
//! layer is: LayerNorm (1 launch), q with k and v projected straight into the caches
//! (`qkv_append`, 1, biases fused), attention over every head (`selected_heads_attention`
//! with all heads: 1–2 launches), `out_proj` (transposed GEMV, 2, the residual add in its
//! second pass), LayerNorm, fc1 (1, bias and ReLU fused) and fc2 (2, the residual add
//! likewise): 9–10 launches. The residual adds go through [`ForwardHooks::attention_residual`] and
//! [`ForwardHooks::mlp_residual`], which the layer calls. Prompts (several tokens at once) still run
//! through the tensor ops, where a matmul is the right tool; LayerNorm uses the kernel
//! everywhere.
//!
//! The GEMV kernels read each output's weights as one contiguous row (PyTorch's `[out, in]`
//! layout) while Burn's `Linear` keeps `[in, out]`. [`use_row_major_weights`] re-lays q, k,
//! v and fc1 in place — k and v as the two halves of one `[2d, d]` buffer — and each module
//! keeps a transposed view of its rows, so its own forward is unchanged; the
//! [`DecodeWeights`] it returns share those buffers. [`DecodeWeights::new`] instead copies
//! what is not already laid out so (always k and v). fc2 and `out_proj` are read as they are: their
//! `[in, out]` rows are the transposed GEMV's layout.

use burn::module::Param;
use burn::nn::LayerNorm;
use burn::prelude::*;
use burn::tensor::DType;
use dejavu_kernels::{Activation as Act, SparseKernels};

use crate::attention::OptAttention;
use crate::cache::{LayerKvCache, Step};
use crate::hooks::{Dense, ForwardHooks, NormSite};
use crate::layer::OptDecoderLayer;
use crate::layer::LAYER_NORM_EPS;
use crate::mlp::OptMlp;
use crate::opt::Opt;

/// The weights one layer's decode kernels read, each output one contiguous row.
#[derive(Debug, Clone)]
pub struct DecodeLayer<B: Backend> {
    /// `q_proj`, `[d, d]`.
    pub q_rows: Tensor<B, 2>,
    /// `k_proj`'s rows then `v_proj`'s, `[2d, d]`, and their biases, `[2d]`.
    pub kv_rows: Tensor<B, 2>,
    pub kv_bias: Option<Tensor<B, 1>>,
    /// `fc1`, `[ffn, d]`.
    pub fc1_rows: Tensor<B, 2>,
    /// `out_proj`, `[d, d]`: each output's weights one contiguous row, so the selected
    /// heads' columns of a row are contiguous runs of `head_dim`.
    pub out_rows: Tensor<B, 2>,
}

/// [`DecodeLayer`] for every layer, and the list of every head id (what the selected-head
/// attention kernel reads for a dense step).
#[derive(Debug, Clone)]
pub struct DecodeWeights<B: Backend> {
    pub layers: Vec<DecodeLayer<B>>,
    pub all_heads: Tensor<B, 1, Int>,
}

/// A row-major `[out, in]` tensor for a `Linear` weight stored `[in, out]`: a view when the
/// weight is already a transposed view of a row-major buffer ([`use_row_major_weights`]),
/// else a copy (flattening a strided tensor materialises it).
pub fn rows_of<B: Backend>(weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let t = weight.transpose();
    let [r, c] = t.dims();
    t.reshape([r * c]).reshape([r, c])
}

fn kv_bias<B: Backend>(attention: &OptAttention<B>) -> Option<Tensor<B, 1>> {
    match (&attention.k_proj.bias, &attention.v_proj.bias) {
        (Some(k), Some(v)) => Some(Tensor::cat(vec![k.val(), v.val()], 0)),
        _ => None,
    }
}

impl<B: Backend> DecodeLayer<B> {
    /// The decode layout of one layer's weights: views of buffers already laid out so,
    /// copies otherwise (always for k and v, which it concatenates).
    fn of(layer: &OptDecoderLayer<B>) -> Self {
        let attention = &layer.self_attn;
        Self {
            q_rows: rows_of(attention.q_proj.weight.val()),
            kv_rows: Tensor::cat(vec![rows_of(attention.k_proj.weight.val()), rows_of(attention.v_proj.weight.val())], 0),
            kv_bias: kv_bias(attention),
            fc1_rows: rows_of(layer.mlp.fc1.weight.val()),
            out_rows: rows_of(attention.out_proj.weight.val()),
        }
    }
}

/// Re-lays `q_proj`, `k_proj`, `v_proj`, `out_proj` and `fc1` of every layer of `model` row-major, in
/// place (k and v as one `[2d, d]` buffer), keeping each module's weight as a transposed
/// view so its forward is unchanged, and returns the [`DecodeWeights`] that share them.
/// Layer by layer, so the old layout of one layer is freed before the next is copied.
pub fn use_row_major_weights<B: Backend>(model: &mut Opt<B>) -> DecodeWeights<B> {
    let mut layers = Vec::new();
    for layer in model.decoder.layers.iter_mut() {
        let rows = DecodeLayer::of(layer);
        let [two_d, d] = rows.kv_rows.dims();
        let attention = &mut layer.self_attn;
        attention.q_proj.weight = Param::from_tensor(rows.q_rows.clone().transpose());
        attention.k_proj.weight = Param::from_tensor(rows.kv_rows.clone().slice([0..two_d / 2, 0..d]).transpose());
        attention.v_proj.weight = Param::from_tensor(rows.kv_rows.clone().slice([two_d / 2..two_d, 0..d]).transpose());
        attention.out_proj.weight = Param::from_tensor(rows.out_rows.clone().transpose());
        layer.mlp.fc1.weight = Param::from_tensor(rows.fc1_rows.clone().transpose());
        layers.push(rows);
    }
    DecodeWeights::with_layers(model, layers)
}

impl<B: Backend> DecodeWeights<B> {
    /// The decode layout of `model`'s weights: views where [`use_row_major_weights`] laid
    /// them out so, copies otherwise.
    pub fn new(model: &Opt<B>) -> Self {
        Self::with_layers(model, model.decoder.layers.iter().map(DecodeLayer::of).collect())
    }

    fn with_layers(model: &Opt<B>, layers: Vec<DecodeLayer<B>>) -> Self {
        let heads = model.decoder.layers[0].self_attn.num_heads;
        Self { layers, all_heads: Tensor::arange(0..heads as i64, &model.device()) }
    }
}

const SHAPES: &str = "decode weights are made from this very model";

/// LayerNorm through the one-launch kernel, statistics in f32 (as [`crate::layer::norm`]).
pub fn kernel_norm<B: SparseKernels>(ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let dtype = x.dtype();
    kernel_norm_to(ln, x, dtype)
}

/// [`kernel_norm`] with its output in `dtype` (a residual stream kept in f32, normalized
/// into the weights' dtype).
pub(crate) fn kernel_norm_to<B: SparseKernels>(ln: &LayerNorm<B>, x: Tensor<B, 3>, dtype: DType) -> Tensor<B, 3> {
    let [batch, n, d] = x.dims();
    let (gamma, beta) = norm_params(ln, d);
    dejavu_kernels::layer_norm_to(x.reshape([batch * n, d]), gamma, beta, LAYER_NORM_EPS as f32, dtype)
        .expect(SHAPES)
        .reshape([batch, n, d])
}

/// A LayerNorm's `gamma` and `beta` in f32, as the kernels take them (zeros for a
/// LayerNorm without a bias).
pub(crate) fn norm_params<B: Backend>(ln: &LayerNorm<B>, d: usize) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let gamma = ln.gamma.val();
    let beta = match &ln.beta {
        Some(b) => b.val(),
        None => Tensor::zeros([d], (&gamma.device(), DType::F32)),
    };
    let gamma = if gamma.dtype() == DType::F32 { gamma } else { gamma.cast(DType::F32) };
    let beta = if beta.dtype() == DType::F32 { beta } else { beta.cast(DType::F32) };
    (gamma, beta)
}

pub(crate) fn bias<B: Backend>(linear: &burn::nn::Linear<B>) -> Option<Tensor<B, 1>> {
    linear.bias.as_ref().map(|b| b.val())
}

/// One step's queries (every head, or the selected `heads` — blocks of `head_dim` rows of
/// `q_proj`) and every head's keys and values (`x [batch, d]`), the keys and values
/// written into `cache`: one launch. With `first` (one sequence) the first factor of the
/// next layer's attention predictor rides in the same launch
/// ([`dejavu_kernels::qkv_append_first`]). Returns the queries `[batch, slots · hd]`, the
/// whole caches and the first factor `[1, r]` when asked for. With `norm_in` (and
/// `first`), `x` is the f32 residual and the launch applies its LayerNorm itself.
#[allow(clippy::type_complexity)] // the queries, the caches, the first factor
#[allow(clippy::too_many_arguments)] // the layer, its input, cache and step, and the two riders
pub(crate) fn project_qkv<B: SparseKernels>(
    attention: &OptAttention<B>,
    weights: &DecodeLayer<B>,
    heads: Option<Tensor<B, 1, Int>>,
    x: Tensor<B, 2>,
    cache: &mut LayerKvCache<B>,
    step: &Step<B>,
    first: Option<dejavu_kernels::FirstFactor<B>>,
    norm_in: Option<(dejavu_kernels::NormIn<B>, dejavu_kernels::RowFold<B>, dejavu_kernels::RowFold<B>)>,
) -> (Tensor<B, 2>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 2>>) {
    let query = dejavu_kernels::QueryRows { w: weights.q_rows.clone(), heads, head_dim: attention.head_dim, bias: bias(&attention.q_proj) };
    let (kv, kv_bias, key, value) = (weights.kv_rows.clone(), weights.kv_bias.clone(), cache.key.clone(), cache.value.clone());
    let (q, keys, values, first) = match first {
        Some(first) => {
            let (q, k, v, f) = dejavu_kernels::qkv_append_first(query, kv, x, kv_bias, key, value, step.start, first, norm_in).expect(SHAPES);
            (q, k, v, Some(f))
        }
        None => {
            // `x` is the residual a LayerNorm in the launch would have read: normalize it here.
            let x = match norm_in {
                Some((n, _, _)) => dejavu_kernels::layer_norm_to(x, n.gamma, n.beta, n.eps, kv.dtype()).expect(SHAPES),
                None => x,
            };
            let (q, k, v) = dejavu_kernels::qkv_append(query, kv, x, kv_bias, key, value, step.start).expect(SHAPES);
            (q, k, v, None)
        }
    };
    cache.key = keys.clone();
    cache.value = values.clone();
    (q, keys, values, first)
}

/// [`project_qkv`] for the selected `heads` of one sequence with the keys and values
/// written lazily ([`dejavu_kernels::qkv_append_lazy`]): only the heads this step reads,
/// each brought up to date, plus any head about to lose an input from the ring of the last
/// `window` steps' inputs. The cache's lazy state starts here (every head written before
/// `step.start`) and is [`settle_lazy_kv`]'d before any other use. The riders `first` and
/// `norm_in` as in [`project_qkv`]. Returns the queries, the whole caches and the first
/// factor when asked for.
#[allow(clippy::type_complexity)] // the queries, the caches, the first factor
#[allow(clippy::too_many_arguments)] // the layer, its input, cache and step, the window and the two riders
pub(crate) fn project_qkv_lazy<B: SparseKernels>(
    attention: &OptAttention<B>,
    weights: &DecodeLayer<B>,
    heads: Tensor<B, 1, Int>,
    x: Tensor<B, 2>,
    cache: &mut LayerKvCache<B>,
    step: &Step<B>,
    window: usize,
    first: Option<dejavu_kernels::FirstFactor<B>>,
    norm_in: Option<(dejavu_kernels::NormIn<B>, dejavu_kernels::RowFold<B>, dejavu_kernels::RowFold<B>)>,
) -> (Tensor<B, 2>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 2>>) {
    let [_, d] = x.dims();
    let state = cache
        .lazy
        .take()
        .unwrap_or_else(|| dejavu_kernels::LazyKv::new(attention.num_heads, d, window, step.start, weights.kv_rows.dtype(), &x.device()));
    let (q, state, first) = append_lazy(attention, weights, heads, bias(&attention.q_proj), x, cache, step.start, state, first, norm_in);
    cache.lazy = Some(state);
    (q, cache.key.clone(), cache.value.clone(), first)
}

/// One `qkv_append_lazy` launch at position `pos` for the selected `heads`, the caches it
/// writes stored back into `cache`; returns the queries, the next lazy state and the first
/// factor when asked for.
#[allow(clippy::too_many_arguments)] // the layer, the step's selection and input, the cache and its state, the riders
#[allow(clippy::type_complexity)] // the queries, the next lazy state, the first factor
fn append_lazy<B: SparseKernels>(
    attention: &OptAttention<B>,
    weights: &DecodeLayer<B>,
    heads: Tensor<B, 1, Int>,
    q_bias: Option<Tensor<B, 1>>,
    x: Tensor<B, 2>,
    cache: &mut LayerKvCache<B>,
    pos: usize,
    state: dejavu_kernels::LazyKv<B>,
    first: Option<dejavu_kernels::FirstFactor<B>>,
    norm_in: Option<(dejavu_kernels::NormIn<B>, dejavu_kernels::RowFold<B>, dejavu_kernels::RowFold<B>)>,
) -> (Tensor<B, 2>, dejavu_kernels::LazyKv<B>, Option<Tensor<B, 2>>) {
    let query = dejavu_kernels::QueryRows { w: weights.q_rows.clone(), heads: Some(heads), head_dim: attention.head_dim, bias: q_bias };
    let (q, keys, values, state, first) = dejavu_kernels::qkv_append_lazy(
        query,
        weights.kv_rows.clone(),
        x,
        weights.kv_bias.clone(),
        cache.key.clone(),
        cache.value.clone(),
        pos,
        state,
        first,
        norm_in,
    )
    .expect(SHAPES);
    cache.key = keys;
    cache.value = values;
    (q, state, first)
}

/// Writes every key and value a lazily written layer still owes (each head, each position
/// before `start`, from the ring of inputs: the last lazy step is `start - 1`, so its input
/// is in the ring) and drops the lazy state. A no-op when there is none.
pub(crate) fn settle_lazy_kv<B: SparseKernels>(
    attention: &OptAttention<B>,
    weights: &DecodeLayer<B>,
    all_heads: &Tensor<B, 1, Int>,
    cache: &mut LayerKvCache<B>,
    start: usize,
) {
    let Some(state) = cache.lazy.take() else { return };
    let Some(last) = start.checked_sub(1) else { return };
    let [window, d] = state.ring.dims();
    let slot = last % window;
    let x = state.ring.clone().slice([slot..slot + 1, 0..d]);
    // The queries are not used: no bias for them.
    append_lazy(attention, weights, all_heads.clone(), None, x, cache, last, state, None, None);
}

/// fc2 (`w_t`, transposed) of `h [batch, K]` over the rows `idx` picks (all
/// when `None`), plus bias, plus `residual [batch, 1, d]` when given: the add happens in the
/// kernel's second pass, not in a launch of its own. With `accumulate` (a residual stream
/// kept in f32) the sum is added into the residual in f32 (`accumulate_transposed_gemv`:
/// one launch with f32 atomics). `[batch, 1, d]`.
pub(crate) fn output_projection<B: SparseKernels>(
    w_t: Tensor<B, 2>,
    idx: Option<Tensor<B, 1, Int>>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    residual: Option<Tensor<B, 3>>,
    accumulate: bool,
) -> Tensor<B, 3> {
    let batch = h.dims()[0];
    let d = w_t.dims()[1];
    let residual = match residual {
        Some(r) if accumulate => {
            let acc = if r.dtype() == DType::F32 { r } else { r.cast(DType::F32) };
            return dejavu_kernels::accumulate_transposed_gemv(acc.reshape([batch, d]), w_t, idx.map(|i| (i, 1)), h, bias)
                .expect(SHAPES)
                .reshape([batch, 1, d]);
        }
        r => r,
    };
    let y = match (residual, idx) {
        (Some(r), idx) => dejavu_kernels::residual_transposed_gemv(r.reshape([batch, d]), w_t, idx.map(|i| (i, 1)), h, bias),
        (None, Some(idx)) => dejavu_kernels::gather_rows_transposed_gemv(w_t, idx, h, bias),
        (None, None) => dejavu_kernels::transposed_gemv(w_t, h, bias),
    };
    y.expect(SHAPES).reshape([batch, 1, d])
}

/// `residual + y` when there is a residual (a tensor-op path's add), else `y`; in the
/// residual's dtype (f32 for a residual stream kept in f32).
pub(crate) fn plus_residual<B: Backend>(y: Tensor<B, 3>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
    match residual {
        Some(r) if r.dtype() != y.dtype() => {
            let dtype = r.dtype();
            r + y.cast(dtype)
        }
        Some(r) => r + y,
        None => y,
    }
}

/// One decode step of attention over every head (`x [batch, 1, d]`, normalized), plus
/// `residual` when given.
pub(crate) fn dense_attention<B: SparseKernels>(
    attention: &OptAttention<B>,
    weights: &DecodeLayer<B>,
    all_heads: &Tensor<B, 1, Int>,
    x: Tensor<B, 3>,
    residual: Option<Tensor<B, 3>>,
    cache: &mut LayerKvCache<B>,
    step: &Step<B>,
) -> Tensor<B, 3> {
    let [batch, _, d] = x.dims();
    let x = x.reshape([batch, d]);
    settle_lazy_kv(attention, weights, all_heads, cache, step.start);
    let (q, keys, values, _) = project_qkv(attention, weights, None, x, cache, step, None, None);
    let scale = (attention.head_dim as f32).powf(-0.5);
    let heads = dejavu_kernels::selected_heads_attention(q, all_heads.clone(), keys, values, step.start + 1, scale)
        .expect(SHAPES);
    attention_output(weights, None, heads, bias(&attention.out_proj), residual)
}

/// `out_proj` of a decode step's attention outputs `heads_out [batch, len · hd]` (the
/// `heads = (idx, hd)` selected, every head when `None`), plus bias, plus `residual
/// [batch, 1, d]` when given, in one launch (`block_cols_gemv`). `[batch, 1, d]`.
pub(crate) fn attention_output<B: SparseKernels>(
    weights: &DecodeLayer<B>,
    heads: Option<(Tensor<B, 1, Int>, usize)>,
    heads_out: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    residual: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    let batch = heads_out.dims()[0];
    let d = weights.out_rows.dims()[0];
    let residual = residual.map(|r| r.reshape([batch, d]));
    dejavu_kernels::block_cols_gemv(weights.out_rows.clone(), heads, heads_out, bias, residual)
        .expect(SHAPES)
        .reshape([batch, 1, d])
}

/// One decode step of the dense MLP (`x [batch, 1, d]`): fc1 with bias and ReLU fused,
/// then fc2 by the transposed GEMV, which skips the rows whose input the ReLU zeroed; plus
/// `residual` when given (`accumulate`: see [`output_projection`]).
pub(crate) fn dense_mlp<B: SparseKernels>(
    mlp: &OptMlp<B>,
    weights: &DecodeLayer<B>,
    x: Tensor<B, 3>,
    residual: Option<Tensor<B, 3>>,
    accumulate: bool,
) -> Tensor<B, 3> {
    fc2(mlp, dense_fc1(mlp, weights, x), residual, accumulate)
}

/// One decode step's fc1 with bias and ReLU fused over every row (`x [batch, 1, d]`):
/// `[batch, ffn]`.
pub(crate) fn dense_fc1<B: SparseKernels>(mlp: &OptMlp<B>, weights: &DecodeLayer<B>, x: Tensor<B, 3>) -> Tensor<B, 2> {
    let [batch, _, d] = x.dims();
    dejavu_kernels::gemv(weights.fc1_rows.clone(), x.reshape([batch, d]), bias(&mlp.fc1), Act::Relu).expect(SHAPES)
}

/// fc2 of one step's fc1 outputs `h [batch, ffn]` (zeros where the ReLU, or a gate, left
/// nothing: the transposed GEMV skips those rows), plus `residual` when given, as
/// `[batch, 1, d]` (`accumulate`: see [`output_projection`]).
pub(crate) fn fc2<B: SparseKernels>(mlp: &OptMlp<B>, h: Tensor<B, 2>, residual: Option<Tensor<B, 3>>, accumulate: bool) -> Tensor<B, 3> {
    output_projection(mlp.fc2.weight.val(), None, h, bias(&mlp.fc2), residual, accumulate)
}

/// The dense model, with one-token steps through the kernels (see the module comment).
/// Equal in value to [`Dense`] up to rounding: same operations, other summation orders.
pub struct KernelDecode<'a, B: Backend> {
    weights: &'a DecodeWeights<B>,
    step_buffers: StepBufferPool<B>,
}

impl<'a, B: Backend> KernelDecode<'a, B> {
    pub fn new(weights: &'a DecodeWeights<B>) -> Self {
        Self { weights, step_buffers: StepBufferPool::new(true) }
    }

    /// Steps whose buffers come from the allocator's default pool, without the pool of
    /// fixed sizes that [`KernelDecode::new`] turns on for the first step (see
    /// `StepBufferPool`).
    pub fn without_step_buffer_pool(mut self) -> Self {
        self.step_buffers = StepBufferPool::new(false);
        self
    }
}

/// Holds a decode's step buffers in the allocator's pool of fixed sizes
/// ([`SparseKernels::hold_buffer_sizes`]): on from the first one-token step's first layer
/// to the second step's, so that the pool learns every size a step reserves (the
/// embedding, the kernels' outputs, the logits, the token) and serves each to every later
/// step by a hash lookup on CubeCL's device thread, where the default pool searched its
/// pages. Only one step's worth: sizes that change with the context (attention's split
/// workspaces past one cube per head) would pile up in a pool that never frees.
pub(crate) enum StepBufferPool<B: Backend> {
    /// No one-token step yet.
    Waiting,
    /// The first step runs in the pool: its device and the switch to turn the pool off.
    Recording(B::Device, PoolSwitch<B>),
    /// The pool is off for good (after the first step, or never used).
    Done,
}

/// [`SparseKernels::hold_buffer_sizes`] of the backend, kept so that `Drop` (which knows
/// the backend only as a `Backend`) can turn the pool off.
type PoolSwitch<B> = fn(&burn::tensor::Device<B>, bool);

impl<B: Backend> StepBufferPool<B> {
    pub(crate) fn new(enabled: bool) -> Self {
        if enabled { Self::Waiting } else { Self::Done }
    }
}

impl<B: SparseKernels> StepBufferPool<B> {
    /// Called at layer 0 of every one-token step.
    pub(crate) fn at_step(&mut self, device: &B::Device) {
        match self {
            Self::Waiting => {
                B::hold_buffer_sizes(device, true);
                *self = Self::Recording(device.clone(), B::hold_buffer_sizes);
            }
            // Dropping the recording state turns the pool off (see `Drop`).
            Self::Recording(..) => *self = Self::Done,
            Self::Done => {}
        }
    }
}

impl<B: Backend> Drop for StepBufferPool<B> {
    fn drop(&mut self) {
        // The second step started, or the hooks were dropped after a single step: back to
        // the default pool.
        if let Self::Recording(device, hold) = self {
            hold(device, false);
        }
    }
}

/// The block methods of [`ForwardHooks`] for hooks whose `attention_block` and `mlp_block`
/// take the residual as an `Option` (the kernel paths, which add it inside their last
/// launch).
macro_rules! blocks_with_residual {
    () => {
        fn attention(
            &mut self,
            layer: usize,
            attention: &OptAttention<B>,
            x: Tensor<B, 3>,
            cache: &mut LayerKvCache<B>,
            step: &Step<B>,
        ) -> Tensor<B, 3> {
            self.attention_block(layer, attention, x, None, cache, step)
        }

        fn mlp(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
            self.mlp_block(layer, mlp, x, None)
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
            self.attention_block(layer, attention, x, Some(residual), cache, step)
        }

        fn mlp_residual(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
            self.mlp_block(layer, mlp, x, Some(residual))
        }
    };
}
pub(crate) use blocks_with_residual;

impl<B: SparseKernels> KernelDecode<'_, B> {
    fn attention_block(
        &mut self,
        layer: usize,
        attention: &OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Option<Tensor<B, 3>>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        if x.dims()[1] != 1 {
            return plus_residual(Dense.attention(layer, attention, x, cache, step), residual);
        }
        if layer == 0 {
            self.step_buffers.at_step(&x.device());
        }
        dense_attention(attention, &self.weights.layers[layer], &self.weights.all_heads, x, residual, cache, step)
    }

    fn mlp_block(&mut self, layer: usize, mlp: &OptMlp<B>, x: Tensor<B, 3>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        if x.dims()[1] != 1 {
            return plus_residual(Dense.mlp(layer, mlp, x), residual);
        }
        dense_mlp(mlp, &self.weights.layers[layer], x, residual, false)
    }
}

impl<B: SparseKernels> ForwardHooks<B> for KernelDecode<'_, B> {
    blocks_with_residual!();

    fn norm(&mut self, _site: NormSite, ln: &LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        kernel_norm(ln, x)
    }
}
