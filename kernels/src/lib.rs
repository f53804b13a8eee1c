//! Sparse GEMV kernels for Deja Vu decode, written in CubeCL, behind one Burn backend
//! extension trait ([`SparseKernels`]).
//!
//! - [`gather_rows_gemv`]: `y = act(W[idx, :] · x + b[idx])` — the selected fc1 rows, with
//!   bias and ReLU fused.
//! - [`gather_rows_transposed_gemv`]: `y = Σ_j h_j · Wt[idx_j, :] + b` — the selected rows
//!   of fc2 stored transposed (`[ffn, d]`, so each neuron is one contiguous row); split-K
//!   with a deterministic two-pass reduction.
//! - [`gemv`] / [`transposed_gemv`]: the same kernels over every row, our dense baseline.
//! - [`select_above_threshold`]: predictor logits to a compact, padded index list on the
//!   device, with no sort.
//! - [`gather_blocks_gemv`] / [`gather_blocks_transposed_gemv`]: the same two kernels over
//!   whole blocks of rows — attention heads: the selected heads' QKV projection and
//!   `out_proj` over their columns.
//! - [`selected_heads_attention`]: decode attention that reads only the selected heads'
//!   keys and values.
//! - [`kv_append`]: a decode step's keys and values, projected and written straight into
//!   the caches in one launch.
//! - [`layer_norm`]: a row-wise LayerNorm in one launch (f32 statistics), so that a decode
//!   step's norms are not a chain of small tensor ops.
//! - [`predicted_rows_gemv`] / [`predicted_mlp`]: a decode step's fc1 gated by its low-rank
//!   predictor in the same launch; and the whole MLP from the predictor to the residual,
//!   with predictor, selection, fc1 and fc2's split sums in one launch.
//! - For a residual stream kept in f32: [`accumulate_transposed_gemv`] (fc2 adding into it,
//!   one launch with f32 atomics), [`attention_out_proj_accumulate`] (attention and
//!   `out_proj` adding into it, optionally in one launch), [`layer_norm_to`] /
//!   [`norm_predict_to`] (its LayerNorms, written in the weights' dtype).
//!
//! Which backend runs what: `CubeBackend<R, ..>` (CUDA and wgpu without Burn's fusion
//! layer) runs the CubeCL kernels. Every other backend — Flex on the CPU, and the fused
//! `Fusion<CubeBackend>` — runs the reference implementation in Burn tensor ops
//! ([`reference`]), which is exact but reads whole gathered copies. The sparse path is
//! meant to run on `CubeBackend`: fusion computes wrong results in half precision on CUDA
//! here (see the foundation's measurements), and a fused custom op would need the
//! `CustomOpIr` plumbing for no gain on GEMV-bound decode.
//!
//! Empty slots: an index `>= rows` (or negative) selects nothing — it reads no weights,
//! gathered fc1 writes 0 for it and fc2 skips it. Selection pads its list that way, so a
//! launch's grid is fixed by the list's capacity, never by a count on the device.
//!
//! This crate depends on nothing of `model`, `train` or `bench`.

pub mod checks;
pub mod cube;
pub mod host;
pub mod reference;
pub mod topk;

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;

/// What [`gather_rows_gemv`] applies after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    #[error("{op}: {what}")]
    Dtype { op: &'static str, what: String },
}

fn shape_err(op: &'static str, what: String) -> KernelError {
    KernelError::Shape { op, what }
}

/// The operations the sparse decode path needs, on primitives. Every method has a
/// reference implementation in Burn tensor ops; `CubeBackend` overrides them with the
/// CubeCL kernels. Call them through the checked functions of this crate.
pub trait SparseKernels: Backend {
    /// Whether this backend runs the CubeCL kernels (else the tensor-op reference, which
    /// is exact but no faster than Burn's own ops).
    fn has_kernels() -> bool {
        false
    }

    /// Turns the device allocator's pool of fixed sizes on (`true`) or off for the buffers
    /// this thread reserves from now on. While it is on, every buffer goes to that pool and
    /// stays there when freed, kept for the next reservation of its size; a size the pool
    /// holds is served from it afterwards whatever the mode, by a hash lookup, instead of
    /// the default pool's search of its pages (on `CubeBackend`, CubeCL's persistent
    /// memory; the default pool's page search, `MemoryPage::coalesce` and `try_reserve`,
    /// was 60% of CubeCL's device-thread samples while 6.7B-shape sparse steps were
    /// enqueued, run 117). The pool never frees, so it is for buffers whose sizes repeat:
    /// one decode step's. A no-op on backends without such a pool.
    fn hold_buffer_sizes(_device: &burn::tensor::Device<Self>, _on: bool) {}

    /// `out [B, K] = act(W[row_j, :] · x[b, :] + bias[row_j])`, `row_j = idx[j]` (or `j`
    /// when `idx` is `None`, `K = rows`). `w [rows, d]`, `x [B, d]`, `bias [rows]`.
    ///
    /// With `block > 1`, `idx` lists blocks of `block` consecutive rows (whole attention
    /// heads): output `j` is row `j % block` of block `idx[j / block]`, `K = len × block`.
    fn rows_gemv(
        w: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
    ) -> FloatTensor<Self> {
        reference::rows_gemv::<Self>(w, idx, block, x, bias, relu)
    }

    /// `out [B, rows] = W[:, cols] · x + bias + residual`, where `cols` are the column
    /// blocks `idx` picks (`block` columns each, all columns when `None`; an empty slot
    /// contributes nothing) and `x [B, len × block]` holds their inputs side by side.
    /// `w [rows, cols]` row-major, `bias [rows]`, `residual [B, rows]`.
    fn block_cols_gemv(
        w: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        reference::block_cols_gemv::<Self>(w, idx, block, x, bias, residual)
    }

    /// `out [B, d] = residual + Σ_j h[b, j] · Wt[row_j, :] + bias`, `row_j = idx[j]` (or
    /// `j`). `w_t [rows, d]`, `h [B, K]`, `bias [d]`, `residual [B, d]`.
    /// `block` as in [`SparseKernels::rows_gemv`]; `h [B, len × block]`.
    fn rows_transposed_gemv(
        w_t: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        h: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        reference::rows_transposed_gemv::<Self>(w_t, idx, block, h, bias, residual)
    }

    /// `acc + Σ_j h[b, j] · Wt[row_j, :] + bias` with `acc [B, d]` f32 (a residual kept in
    /// f32), the rest as in [`SparseKernels::rows_transposed_gemv`]; the sum is not rounded
    /// to the weights' dtype before it is added. `CubeBackend` adds into `acc` in place
    /// with f32 atomics, in one launch, where the device has them.
    fn rows_transposed_gemv_accumulate(
        w_t: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        h: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let f32 = |t| Self::float_cast(t, burn::tensor::FloatDType::F32);
        reference::rows_transposed_gemv::<Self>(f32(w_t), idx, block, f32(h), bias.map(f32), Some(acc))
    }

    /// Ascending indices `i` with `logits[b, i] > threshold` for some `b`, padded with `n`
    /// up to `capacity`; and the number selected (`[1]`, may exceed `capacity`).
    fn select_above_threshold(
        logits: FloatTensor<Self>,
        threshold: f32,
        capacity: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        reference::select_above_threshold::<Self>(logits, threshold, capacity)
    }

    /// The index of each row's largest value of `x [rows, width]` (the first on a tie),
    /// `[rows]`: greedy decoding's next token. The reference is Burn's `argmax`.
    fn argmax_rows(x: FloatTensor<Self>) -> IntTensor<Self> {
        let x: Tensor<Self, 2> = wrap(x);
        let rows = x.dims()[0];
        x.argmax(1).reshape([rows]).into_primitive()
    }

    /// The decoder's input rows `[n, d]`: `table[tokens[r]] + positions[r]` (`tokens [n]`,
    /// `table [vocab, d]`, `positions [n, d]`), added in the tables' dtype and returned as
    /// `out_dtype`. An id outside the table gives a zero row. The reference is Burn's
    /// lookup, add and cast.
    fn embed_rows(tokens: IntTensor<Self>, table: FloatTensor<Self>, positions: FloatTensor<Self>, out_dtype: burn::tensor::DType) -> FloatTensor<Self> {
        let (tokens, table, positions): (Tensor<Self, 1, Int>, Tensor<Self, 2>, Tensor<Self, 2>) = (Tensor::from_primitive(tokens), wrap(table), wrap(positions));
        let vocab = table.dims()[0] as i64;
        // Outside the table: a zero row (the lookup reads row 0, the mask clears it).
        let inside = tokens.clone().greater_equal_elem(0).bool_and(tokens.clone().lower_elem(vocab));
        let rows = table.select(0, tokens.mask_fill(inside.clone().bool_not(), 0)) + positions;
        let rows = rows.mask_fill(inside.unsqueeze_dim::<2>(1).bool_not(), 0.0);
        prim(if rows.dtype() == out_dtype { rows } else { rows.cast(out_dtype) })
    }

    /// `[rows, width]` 0/1: each row's `k` largest logits. The reference sorts (on the host
    /// for backends without a device sort); `CubeBackend` counts instead
    /// ([`topk::topk_mask_multisection`]).
    fn topk_mask(logits: FloatTensor<Self>, k: usize) -> FloatTensor<Self> {
        prim(topk::topk_mask_sorted::<Self>(wrap(logits), k))
    }

    /// Decode attention over the selected heads only: `q [B, S·hd]` (the selected heads'
    /// queries, slot order), `heads [S]`, caches `[B, H, cap, hd]`, positions `0..len`;
    /// `out [B, S·hd]`. Empty slots give zeros.
    fn selected_heads_attention(
        q: FloatTensor<Self>,
        heads: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        len: usize,
        scale: f32,
    ) -> FloatTensor<Self> {
        reference::selected_heads_attention::<Self>(q, heads, k_cache, v_cache, len, scale)
    }

    /// [`SparseKernels::selected_heads_attention`], then `out_proj` over the selected
    /// heads' columns ([`SparseKernels::block_cols_gemv`] of `w [rows, H·hd]` with `bias
    /// [rows]`) added into `acc [B, rows]` (f32); returns the sum (f32). `one_launch`: in
    /// one launch where a backend can (the reference takes the two ops either way).
    #[allow(clippy::too_many_arguments)] // attention's inputs, out_proj's and the accumulator
    fn attention_out_proj_accumulate(
        q: FloatTensor<Self>,
        heads: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        len: usize,
        scale: f32,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
        _one_launch: bool,
    ) -> FloatTensor<Self> {
        let hd = burn::tensor::TensorMetadata::shape(&k_cache)[3];
        let out = Self::selected_heads_attention(q, heads.clone(), k_cache, v_cache, len, scale);
        Self::block_cols_gemv(w, Some(heads), hd, out, bias, Some(acc))
    }

    /// Row-wise LayerNorm of `x [rows, d]` (any float dtype) with f32 `gamma`, `beta`
    /// `[d]`; statistics in f32, output in `dtype`.
    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f32, dtype: DType) -> FloatTensor<Self> {
        reference::layer_norm::<Self>(x, gamma, beta, eps, dtype)
    }

    /// `out [1, rows] = act(W · x + bias)` for the rows with `gate[row] > threshold` (f32
    /// logits `[rows]`), 0 elsewhere; `x [1, d]`.
    fn gated_rows_gemv(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
        gate: FloatTensor<Self>,
        threshold: f32,
    ) -> FloatTensor<Self> {
        reference::gated_rows_gemv::<Self>(w, x, bias, relu, gate, threshold)
    }

    /// [`SparseKernels::gated_rows_gemv`] with the gate logits `up [rows, r] · h [r]` (a
    /// low-rank predictor's second factor and its first factor's output, both f32)
    /// computed in the same launch.
    fn predicted_rows_gemv(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
    ) -> FloatTensor<Self> {
        reference::predicted_rows_gemv::<Self>(w, x, bias, relu, up, h, threshold)
    }

    /// The decode step's sparse MLP from its predictor to the residual stream:
    /// `residual + b2 + Σ_j relu(W1[j] · x + b1[j]) · W2t[j]` over the rows `j` whose logit
    /// `up[j] · h` is above `threshold` (batch 1; `w1`, `w2_t [ffn, d]`, `x [1, d]`,
    /// `up [ffn, r]`, `h [1, r]` f32). [`SparseKernels::predicted_rows_gemv`] then
    /// [`SparseKernels::rows_transposed_gemv`] unless a backend fuses them.
    #[allow(clippy::too_many_arguments)] // the MLP's, the predictor's and the residual's inputs
    fn predicted_mlp(
        w1: FloatTensor<Self>,
        b1: Option<FloatTensor<Self>>,
        w2_t: FloatTensor<Self>,
        b2: Option<FloatTensor<Self>>,
        x: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
    ) -> FloatTensor<Self> {
        let hidden = Self::predicted_rows_gemv(w1, x, b1, true, up, h, threshold);
        Self::rows_transposed_gemv(w2_t, None, 1, hidden, b2, residual)
    }

    /// [`SparseKernels::select_above_threshold`] of the logits `up [rows, r] · h [r]` (f32),
    /// computed in the same launch: indices padded with `rows` to `capacity`, and the count.
    fn predict_select(
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
        capacity: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        reference::predict_select::<Self>(up, h, threshold, capacity)
    }

    /// [`SparseKernels::kv_append`] and the same step's queries `q [B, outputs] = q_w[rows]
    /// · x + q_bias[rows]` (rows as in [`SparseKernels::rows_gemv`] with `q_idx` and
    /// `block`): one launch on `CubeBackend`. Returns `q` and the caches.
    #[allow(clippy::too_many_arguments)] // the queries' and the keys' and values' inputs
    fn qkv_append(
        q_w: FloatTensor<Self>,
        q_idx: Option<IntTensor<Self>>,
        block: usize,
        q_bias: Option<FloatTensor<Self>>,
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kv_bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let q = Self::rows_gemv(q_w, q_idx, block, x.clone(), q_bias, false);
        let (k, v) = Self::kv_append(kv, x, kv_bias, k_cache, v_cache, pos);
        (q, k, v)
    }

    /// [`SparseKernels::qkv_append`] at batch 1 with the keys and values written lazily:
    /// the queries of the selected heads `heads` (blocks of `block` rows), and keys and
    /// values only for those heads and for heads whose first unwritten position
    /// (`pending [heads]`) would leave the ring of inputs next step (`pending + window <=
    /// pos + 1`) — each written for every position from its first unwritten one to `pos`,
    /// from the inputs kept in `ring [window, d]`. This step's `x` goes into ring slot
    /// `pos % window`. With `first` the next layer's attention first factor rides along,
    /// and with `norm_in` `x` is the f32 residual, normalized by the op itself (the ring
    /// then keeps its LayerNorm's output), as in [`SparseKernels::qkv_append_first`].
    /// Returns `q`, the caches, the next `pending` (`pos + 1` for the heads written), the
    /// ring and the first factor when asked for.
    #[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs, the lazy state and the riders
    #[allow(clippy::type_complexity)] // the queries, the caches, the next lazy state, the first factor
    fn qkv_append_lazy(
        q_w: FloatTensor<Self>,
        heads: IntTensor<Self>,
        block: usize,
        q_bias: Option<FloatTensor<Self>>,
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kv_bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
        pending: IntTensor<Self>,
        ring: FloatTensor<Self>,
        first: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        norm_in: Option<NormInParams<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let x = normed_input::<Self>(x, norm_in, burn::tensor::TensorMetadata::dtype(&kv));
        let (q, k, v, pending, ring) = reference::qkv_append_lazy::<Self>(q_w, heads, block, q_bias, kv, x, kv_bias, k_cache, v_cache, pos, pending, ring);
        (q, k, v, pending, ring, first.map(|(down, residual)| first_factor::<Self>(down, residual)))
    }

    /// A decode step's LayerNorm of `x [1, d]` (f32 `gamma`, `beta`), the first factor
    /// `down [r, d] · x` of a predictor (f32 out), and optionally a head selection
    /// ([`SparseKernels::predict_select`] of `(up, h, threshold, capacity)`): one launch on
    /// `CubeBackend`, three ops elsewhere.
    #[allow(clippy::type_complexity)] // three outputs, one optional pair
    fn norm_predict(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
        down: FloatTensor<Self>,
        select: Option<(FloatTensor<Self>, FloatTensor<Self>, f32, usize)>,
        normed_dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<(IntTensor<Self>, IntTensor<Self>)>) {
        let normed = Self::layer_norm_rows(x.clone(), gamma, beta, eps, normed_dtype);
        let first = first_factor::<Self>(down, x);
        let selection = select.map(|(up, h, threshold, capacity)| Self::predict_select(up, h, threshold, capacity));
        (normed, first, selection)
    }

    /// `kv [2·H·hd, d]` (k rows then v rows) times `x [B, d]` plus `bias [2·H·hd]`, written
    /// at position `pos` of `k_cache` / `v_cache` (`[B, H, cap, hd]`); returns the caches.
    fn kv_append(
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::kv_append::<Self>(kv, x, bias, k_cache, v_cache, pos)
    }

    /// [`SparseKernels::attention_out_proj_accumulate`] in one launch (batch 1), returning
    /// also the LayerNorm of the finished sum ([`SparseKernels::layer_norm_rows`] with
    /// `norm`'s parameters): `CubeBackend` writes it from the launch's last cube (counted
    /// in `norm`'s `done`), so the MLP after needs no LayerNorm launch of its own.
    #[allow(clippy::too_many_arguments)] // attention's inputs, out_proj's, the accumulator and the LayerNorm after
    fn attention_out_proj_accumulate_norm(
        q: FloatTensor<Self>,
        heads: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        len: usize,
        scale: f32,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
        norm: NormParams<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let acc = Self::attention_out_proj_accumulate(q, heads, k_cache, v_cache, len, scale, w, bias, acc, true);
        let normed = Self::layer_norm_rows(acc.clone(), norm.gamma, norm.beta, norm.eps, norm.dtype);
        (acc, normed)
    }

    /// [`SparseKernels::rows_transposed_gemv_accumulate`] over every row (batch 1),
    /// returning also the LayerNorm of the finished sum, as
    /// [`SparseKernels::attention_out_proj_accumulate_norm`]: the next layer's first
    /// LayerNorm (or the final one) without a launch of its own.
    fn rows_transposed_gemv_accumulate_norm(
        w_t: FloatTensor<Self>,
        h: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
        norm: NormParams<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let acc = Self::rows_transposed_gemv_accumulate(w_t, None, 1, h, bias, acc);
        let normed = Self::layer_norm_rows(acc.clone(), norm.gamma, norm.beta, norm.eps, norm.dtype);
        (acc, normed)
    }

    /// [`SparseKernels::predicted_rows_gemv`] with two riders on cubes of their own in the
    /// same launch on `CubeBackend` (batch 1): the first factor `down [r, d] · residual`
    /// (f32 out, `residual [1, d]` f32) of the next layer's MLP predictor, and a head
    /// selection ([`SparseKernels::predict_select`] of `(up, h, threshold, capacity)`).
    #[allow(clippy::too_many_arguments)] // fc1's and the predictor's inputs, and the riders'
    #[allow(clippy::type_complexity)] // fc1's output and the riders'
    fn predicted_rows_gemv_with(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
        first: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        select: Option<(FloatTensor<Self>, FloatTensor<Self>, f32, usize)>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>, Option<(IntTensor<Self>, IntTensor<Self>)>) {
        let out = Self::predicted_rows_gemv(w, x, bias, relu, up, h, threshold);
        let first = first.map(|(down, residual)| first_factor::<Self>(down, residual));
        let selection = select.map(|(up, h, threshold, capacity)| Self::predict_select(up, h, threshold, capacity));
        (out, first, selection)
    }

    /// [`SparseKernels::qkv_append`] with the first factor `down [r, d] · residual` of the
    /// next layer's attention predictor (f32 out, `residual [1, d]` f32) on cubes of its own
    /// in the same launch on `CubeBackend` (batch 1). Returns `q`, the caches and the
    /// first factor.
    #[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs and the rider's
    #[allow(clippy::type_complexity)] // the queries, the caches, the first factor
    fn qkv_append_first(
        q_w: FloatTensor<Self>,
        q_idx: Option<IntTensor<Self>>,
        block: usize,
        q_bias: Option<FloatTensor<Self>>,
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kv_bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
        first: (FloatTensor<Self>, FloatTensor<Self>),
        norm_in: Option<NormInParams<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let x = normed_input::<Self>(x, norm_in, burn::tensor::TensorMetadata::dtype(&kv));
        let (q, k, v) = Self::qkv_append(q_w, q_idx, block, q_bias, kv, x, kv_bias, k_cache, v_cache, pos);
        (q, k, v, first_factor::<Self>(first.0, first.1))
    }
}

/// A LayerNorm that `qkv_append` applies to its f32 residual input itself (batch 1), so
/// that no launch before it writes one ([`NormIn`]): `gamma`, `beta` `[d]` f32, epsilon,
/// and the folds of the queries' and the keys' and values' rows ([`RowFold`]), which
/// `CubeBackend`'s kernel adds in place of `beta`'s share and the bias. The default
/// implementation normalizes first (`gamma`, `beta`) and runs the op as it is, biases
/// included.
pub struct NormInParams<B: Backend> {
    pub gamma: FloatTensor<B>,
    pub beta: FloatTensor<B>,
    pub eps: f32,
    pub q_fold: FloatTensor<B>,
    pub kv_fold: FloatTensor<B>,
}

/// The default implementations' input under [`NormInParams`]: the LayerNorm of the f32
/// residual in the weights' dtype (or `x` as it is without one).
fn normed_input<B: SparseKernels>(x: FloatTensor<B>, norm_in: Option<NormInParams<B>>, dtype: DType) -> FloatTensor<B> {
    match norm_in {
        Some(n) => B::layer_norm_rows(x, n.gamma, n.beta, n.eps, dtype),
        None => x,
    }
}

/// The LayerNorm an accumulating op applies to its finished row
/// ([`SparseKernels::attention_out_proj_accumulate_norm`]): f32 `gamma`, `beta` `[d]`,
/// epsilon, the output dtype, and `done`, a zeroed int counter (`[1]` or more) that the op
/// leaves zeroed — one per sequence: ops that share one must run one after another.
pub struct NormParams<B: Backend> {
    pub gamma: FloatTensor<B>,
    pub beta: FloatTensor<B>,
    pub eps: f32,
    pub dtype: DType,
    pub done: IntTensor<B>,
}

/// An accumulating launch `op` with the LayerNorm `norm` as its epilogue; where the
/// launcher leaves the epilogue out (no f32 atomics, a row too wide), the LayerNorm in its
/// own launch. Returns the residual and its LayerNorm.
fn with_norm_after<R, F, I, BT>(
    norm: NormParams<burn_cubecl::CubeBackend<R, F, I, BT>>,
    op: impl FnOnce(cube::NormArgs<R>) -> (CubeTensor<R>, Option<CubeTensor<R>>),
) -> (CubeTensor<R>, CubeTensor<R>)
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    let NormParams { gamma, beta, eps, dtype, done } = norm;
    let (acc, normed) = op(cube::NormArgs { gamma: gamma.clone(), beta: beta.clone(), eps, done });
    let normed = normed.unwrap_or_else(|| cube::layer_norm(acc.clone(), gamma, beta, eps, dtype));
    (acc, normed)
}

/// [`NormInParams`] as `CubeBackend`'s launcher takes them.
fn cube_norm_in<R, F, I, BT>(n: NormInParams<burn_cubecl::CubeBackend<R, F, I, BT>>) -> cube::NormInArgs<R>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    cube::NormInArgs { gamma: n.gamma, beta: n.beta, eps: n.eps, q_fold: n.q_fold, kv_fold: n.kv_fold }
}

/// A predictor's first factor `down [r, d] · residual [1, d]`, summed and stored in f32
/// whatever `down`'s dtype (as the kernels do it).
fn first_factor<B: SparseKernels>(down: FloatTensor<B>, residual: FloatTensor<B>) -> FloatTensor<B> {
    let down: Tensor<B, 2> = wrap(down);
    B::rows_gemv(prim(down.cast(DType::F32)), None, 1, residual, None, false)
}

impl SparseKernels for burn::backend::Flex {}

impl<B: burn_fusion::FusionBackend> SparseKernels for burn_fusion::Fusion<B> {}

impl<R, F, I, BT> SparseKernels for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn has_kernels() -> bool {
        true
    }

    fn hold_buffer_sizes(device: &burn::tensor::Device<Self>, on: bool) {
        let mode = if on { cubecl::MemoryAllocationMode::Persistent } else { cubecl::MemoryAllocationMode::Auto };
        // SAFETY: the mode is set for this thread's stream only (as a task in order with its
        // launches), and the "leak" the API warns of is the pool's purpose: its buffers are
        // kept for reuse, never freed.
        unsafe { R::client(device).allocation_mode(mode) };
    }

    fn rows_gemv(
        w: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
    ) -> FloatTensor<Self> {
        let int_dtype = idx.as_ref().map(|i| i.dtype).unwrap_or(I::dtype());
        cube::rows_gemv_with(w, idx, block, x, bias, relu, int_dtype, &cube::LaunchConfig::default())
    }

    fn block_cols_gemv(
        w: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let int_dtype = idx.as_ref().map(|i| i.dtype).unwrap_or(I::dtype());
        cube::block_cols_gemv(w, idx, block, x, bias, residual, int_dtype)
    }

    fn rows_transposed_gemv(
        w_t: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        h: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let int_dtype = idx.as_ref().map(|i| i.dtype).unwrap_or(I::dtype());
        cube::rows_transposed_gemv_with(w_t, idx, block, h, bias, residual, int_dtype, &cube::LaunchConfig::default())
    }

    fn rows_transposed_gemv_accumulate(
        w_t: FloatTensor<Self>,
        idx: Option<IntTensor<Self>>,
        block: usize,
        h: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let int_dtype = idx.as_ref().map(|i| i.dtype).unwrap_or(I::dtype());
        cube::rows_transposed_gemv_accumulate(w_t, idx, block, h, bias, acc, None, int_dtype, &cube::LaunchConfig::default()).0
    }

    fn rows_transposed_gemv_accumulate_norm(
        w_t: FloatTensor<Self>,
        h: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
        norm: NormParams<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        with_norm_after(norm, |args| cube::rows_transposed_gemv_accumulate(w_t, None, 1, h, bias, acc, Some(args), I::dtype(), &cube::LaunchConfig::default()))
    }

    fn select_above_threshold(
        logits: FloatTensor<Self>,
        threshold: f32,
        capacity: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        cube::select_above_threshold(logits, threshold, capacity, I::dtype())
    }

    fn argmax_rows(x: FloatTensor<Self>) -> IntTensor<Self> {
        cube::argmax_rows(x, I::dtype())
    }

    fn embed_rows(tokens: IntTensor<Self>, table: FloatTensor<Self>, positions: FloatTensor<Self>, out_dtype: burn::tensor::DType) -> FloatTensor<Self> {
        cube::embed_rows(tokens, table, positions, out_dtype)
    }

    fn topk_mask(logits: FloatTensor<Self>, k: usize) -> FloatTensor<Self> {
        prim(topk::topk_mask_multisection::<Self>(wrap(logits), k))
    }

    fn selected_heads_attention(
        q: FloatTensor<Self>,
        heads: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        len: usize,
        scale: f32,
    ) -> FloatTensor<Self> {
        cube::selected_heads_attention(q, heads, k_cache, v_cache, len, scale)
    }

    fn attention_out_proj_accumulate(
        q: FloatTensor<Self>,
        heads: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        len: usize,
        scale: f32,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
        one_launch: bool,
    ) -> FloatTensor<Self> {
        let default = cube::LaunchConfig::default();
        let config = cube::LaunchConfig { attention_out_rows: if one_launch { default.attention_out_rows } else { 0 }, ..default };
        cube::attention_out_proj_accumulate(q, heads, k_cache, v_cache, len, scale, w, bias, acc, None, &config).0
    }

    fn attention_out_proj_accumulate_norm(
        q: FloatTensor<Self>,
        heads: IntTensor<Self>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        len: usize,
        scale: f32,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        acc: FloatTensor<Self>,
        norm: NormParams<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        with_norm_after(norm, |args| cube::attention_out_proj_accumulate(q, heads, k_cache, v_cache, len, scale, w, bias, acc, Some(args), &cube::LaunchConfig::default()))
    }

    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f32, dtype: DType) -> FloatTensor<Self> {
        cube::layer_norm(x, gamma, beta, eps, dtype)
    }

    fn kv_append(
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        cube::kv_append(kv, x, bias, k_cache, v_cache, pos)
    }

    fn gated_rows_gemv(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
        gate: FloatTensor<Self>,
        threshold: f32,
    ) -> FloatTensor<Self> {
        cube::gated_rows_gemv(w, x, bias, relu, gate, threshold)
    }

    fn predicted_rows_gemv(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
    ) -> FloatTensor<Self> {
        cube::predicted_rows_gemv(w, x, bias, relu, up, h, threshold, None, None, I::dtype()).0
    }

    fn predicted_rows_gemv_with(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        relu: bool,
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
        first: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        select: Option<(FloatTensor<Self>, FloatTensor<Self>, f32, usize)>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>, Option<(IntTensor<Self>, IntTensor<Self>)>) {
        let first = first.map(|(down, residual)| cube::FirstArgs { down, residual });
        let select = select.map(|(up, h, threshold, capacity)| cube::SelectArgs { up, h, threshold, capacity });
        cube::predicted_rows_gemv(w, x, bias, relu, up, h, threshold, first, select, I::dtype())
    }

    fn predicted_mlp(
        w1: FloatTensor<Self>,
        b1: Option<FloatTensor<Self>>,
        w2_t: FloatTensor<Self>,
        b2: Option<FloatTensor<Self>>,
        x: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
    ) -> FloatTensor<Self> {
        cube::predicted_mlp(w1, b1, w2_t, b2, x, residual, up, h, threshold, &cube::LaunchConfig::default())
    }

    fn predict_select(
        up: FloatTensor<Self>,
        h: FloatTensor<Self>,
        threshold: f32,
        capacity: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        cube::predict_select(up, h, threshold, capacity, I::dtype())
    }

    fn qkv_append(
        q_w: FloatTensor<Self>,
        q_idx: Option<IntTensor<Self>>,
        block: usize,
        q_bias: Option<FloatTensor<Self>>,
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kv_bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let query = cube::QueryArgs { w: q_w, idx: q_idx, block, bias: q_bias };
        let (q, k, v, _) = cube::qkv_append(Some(query), kv, x, kv_bias, k_cache, v_cache, pos, I::dtype(), None, None);
        (q.expect("a query was asked for"), k, v)
    }

    fn qkv_append_first(
        q_w: FloatTensor<Self>,
        q_idx: Option<IntTensor<Self>>,
        block: usize,
        q_bias: Option<FloatTensor<Self>>,
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kv_bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
        first: (FloatTensor<Self>, FloatTensor<Self>),
        norm_in: Option<NormInParams<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let query = cube::QueryArgs { w: q_w, idx: q_idx, block, bias: q_bias };
        let first = cube::FirstArgs { down: first.0, residual: first.1 };
        let norm_in = norm_in.map(cube_norm_in);
        let (q, k, v, first) = cube::qkv_append(Some(query), kv, x, kv_bias, k_cache, v_cache, pos, I::dtype(), Some(first), norm_in);
        (q.expect("a query was asked for"), k, v, first.expect("a first factor was asked for"))
    }

    fn qkv_append_lazy(
        q_w: FloatTensor<Self>,
        heads: IntTensor<Self>,
        block: usize,
        q_bias: Option<FloatTensor<Self>>,
        kv: FloatTensor<Self>,
        x: FloatTensor<Self>,
        kv_bias: Option<FloatTensor<Self>>,
        k_cache: FloatTensor<Self>,
        v_cache: FloatTensor<Self>,
        pos: usize,
        pending: IntTensor<Self>,
        ring: FloatTensor<Self>,
        first: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        norm_in: Option<NormInParams<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let query = cube::QueryArgs { w: q_w, idx: Some(heads), block, bias: q_bias };
        let lazy = cube::LazyArgs { pending, ring: ring.clone() };
        let first = first.map(|(down, residual)| cube::FirstArgs { down, residual });
        let norm_in = norm_in.map(cube_norm_in);
        let (q, k, v, pending, first) = cube::qkv_append_lazy(query, kv, x, kv_bias, k_cache, v_cache, pos, lazy, first, norm_in);
        (q, k, v, pending, ring, first)
    }

    fn norm_predict(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
        down: FloatTensor<Self>,
        select: Option<(FloatTensor<Self>, FloatTensor<Self>, f32, usize)>,
        normed_dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<(IntTensor<Self>, IntTensor<Self>)>) {
        let select = select.map(|(up, h, threshold, capacity)| cube::SelectArgs { up, h, threshold, capacity });
        cube::norm_predict(x, gamma, beta, eps, down, select, normed_dtype, I::dtype())
    }
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn wrap<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn check_float<B: Backend, const D: usize>(
    op: &'static str,
    name: &str,
    t: &Tensor<B, D>,
    dtype: burn::tensor::DType,
) -> Result<(), KernelError> {
    if t.dtype() != dtype {
        return Err(KernelError::Dtype {
            op,
            what: format!("{name} is {:?}, expected {:?} like the other inputs", t.dtype(), dtype),
        });
    }
    Ok(())
}

fn check_rows_gemv<B: Backend>(
    op: &'static str,
    w: &Tensor<B, 2>,
    x: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Result<(), KernelError> {
    check_float(op, "x", x, w.dtype())?;
    check_mixed_rows_gemv(op, w, x, bias)
}

/// [`check_rows_gemv`] for the GEMVs whose `x` may have another float dtype than `w`
/// (the output has `w`'s).
fn check_mixed_rows_gemv<B: Backend>(
    op: &'static str,
    w: &Tensor<B, 2>,
    x: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Result<(), KernelError> {
    let [rows, d] = w.dims();
    let [_, xd] = x.dims();
    if xd != d {
        return Err(shape_err(op, format!("x has {xd} columns but the weight rows have {d}")));
    }
    if !x.dtype().is_float() {
        return Err(KernelError::Dtype { op, what: format!("x is {:?}, expected a float dtype", x.dtype()) });
    }
    check_bias(op, bias, rows, "rows", w.dtype())
}

/// [`check_rows_gemv`], or with `x_f32` — `x` the f32 residual whose LayerNorm the op
/// applies itself ([`NormIn`]) — [`check_mixed_rows_gemv`].
fn check_input_rows_gemv<B: Backend>(
    op: &'static str,
    w: &Tensor<B, 2>,
    x: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    x_f32: bool,
) -> Result<(), KernelError> {
    if x_f32 { check_mixed_rows_gemv(op, w, x, bias) } else { check_rows_gemv(op, w, x, bias) }
}

/// A bias, if any, has one entry per output (`len` of them, `what` they are) and the
/// weights' dtype.
fn check_bias<B: Backend>(
    op: &'static str,
    bias: Option<&Tensor<B, 1>>,
    len: usize,
    what: &str,
    dtype: burn::tensor::DType,
) -> Result<(), KernelError> {
    if let Some(b) = bias {
        if b.dims()[0] != len {
            return Err(shape_err(op, format!("bias has {} entries for {len} {what}", b.dims()[0])));
        }
        check_float(op, "bias", b, dtype)?;
    }
    Ok(())
}

/// Dense `out [B, rows] = act(x · Wᵀ + bias)` with `w [rows, d]` in PyTorch `Linear`
/// layout (each output's weights one contiguous row): our own GEMV. `x` may have another
/// float dtype than `w` (read and converted in the kernel); the output has `w`'s.
pub fn gemv<B: SparseKernels>(
    w: Tensor<B, 2>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    act: Activation,
) -> Result<Tensor<B, 2>, KernelError> {
    check_mixed_rows_gemv("gemv", &w, &x, bias.as_ref())?;
    Ok(wrap(B::rows_gemv(prim(w), None, 1, prim(x), bias.map(prim), act == Activation::Relu)))
}

/// `out [B, K] = act(x · W[idx, :]ᵀ + bias[idx])`: only the `K` selected rows of `w`
/// are read. Empty slots (index `>= rows`) give 0.
pub fn gather_rows_gemv<B: SparseKernels>(
    w: Tensor<B, 2>,
    idx: Tensor<B, 1, Int>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    act: Activation,
) -> Result<Tensor<B, 2>, KernelError> {
    gather_blocks_gemv(w, idx, 1, x, bias, act)
}

/// [`gather_rows_gemv`] over blocks of `block` consecutive rows — whole attention heads
/// (`block` = head dim) of a `[heads·hd, d]` projection: `out [B, len·block]`, output `j`
/// from row `j % block` of block `idx[j / block]`. This is the selected-head QKV
/// projection.
pub fn gather_blocks_gemv<B: SparseKernels>(
    w: Tensor<B, 2>,
    idx: Tensor<B, 1, Int>,
    block: usize,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    act: Activation,
) -> Result<Tensor<B, 2>, KernelError> {
    check_rows_gemv("gather_rows_gemv", &w, &x, bias.as_ref())?;
    check_block("gather_rows_gemv", w.dims()[0], block)?;
    Ok(wrap(B::rows_gemv(
        prim(w),
        Some(idx.into_primitive()),
        block,
        prim(x),
        bias.map(prim),
        act == Activation::Relu,
    )))
}

fn check_block(op: &'static str, rows: usize, block: usize) -> Result<(), KernelError> {
    if block == 0 || !rows.is_multiple_of(block) {
        return Err(shape_err(op, format!("block size {block} does not divide the {rows} rows")));
    }
    Ok(())
}

fn check_transposed<B: Backend>(
    op: &'static str,
    w_t: &Tensor<B, 2>,
    h: &Tensor<B, 2>,
    k: usize,
    bias: Option<&Tensor<B, 1>>,
) -> Result<(), KernelError> {
    let [_, d] = w_t.dims();
    let [_, hk] = h.dims();
    if hk != k {
        return Err(shape_err(op, format!("h has {hk} columns but {k} rows are selected")));
    }
    check_float(op, "h", h, w_t.dtype())?;
    check_bias(op, bias, d, "columns", w_t.dtype())
}

/// `out [B, rows] = W[:, cols] · x + bias (+ residual)` with `w [rows, d]` in PyTorch
/// `Linear` layout: `out_proj` of a decode step's attention, reading only the columns of
/// the heads `heads = Some((idx, head_dim))` selects (all columns when `None`), from
/// `x [B, len · head_dim]`, the selected heads' outputs side by side as
/// [`selected_heads_attention`] writes them. One launch, no partial sums; an empty slot
/// (head id out of range) contributes nothing.
pub fn block_cols_gemv<B: SparseKernels>(
    w: Tensor<B, 2>,
    heads: Option<(Tensor<B, 1, Int>, usize)>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    residual: Option<Tensor<B, 2>>,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "block_cols_gemv";
    let [rows, cols] = w.dims();
    let [batch, width] = x.dims();
    let block = heads.as_ref().map_or(1, |(_, block)| *block);
    match &heads {
        Some((idx, block)) => {
            if *block == 0 || cols % block != 0 {
                return Err(shape_err(op, format!("column blocks of {block} do not tile {cols} columns")));
            }
            if width != idx.dims()[0] * block {
                return Err(shape_err(op, format!("x has {width} columns for {} blocks of {block}", idx.dims()[0])));
            }
        }
        None if width != cols => return Err(shape_err(op, format!("x has {width} columns for a weight of {cols}"))),
        None => {}
    }
    check_float(op, "x", &x, w.dtype())?;
    check_bias(op, bias.as_ref(), rows, "rows", w.dtype())?;
    // The residual in the weights' dtype, or in f32 (a residual stream kept in f32); the
    // output has its dtype.
    let residual_dtype = match &residual {
        Some(r) if r.dtype() == DType::F32 => DType::F32,
        _ => w.dtype(),
    };
    check_residual(op, residual.as_ref(), [batch, rows], residual_dtype)?;
    let idx = heads.map(|(idx, _)| idx.into_primitive());
    Ok(wrap(B::block_cols_gemv(prim(w), idx, block, prim(x), bias.map(prim), residual.map(prim))))
}

/// Dense `out [B, d] = h · Wt + bias` with `w_t [rows, d]` (fc2 stored transposed).
pub fn transposed_gemv<B: SparseKernels>(
    w_t: Tensor<B, 2>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, KernelError> {
    checked_transposed_gemv("transposed_gemv", w_t, None, h, bias, None)
}

/// `out [B, d] = Σ_j h[:, j] · Wt[idx_j, :] + bias`: only the selected rows of the
/// transposed fc2 are read (and not those whose `h` is 0). `h [B, K]` pairs with `idx [K]`.
pub fn gather_rows_transposed_gemv<B: SparseKernels>(
    w_t: Tensor<B, 2>,
    idx: Tensor<B, 1, Int>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, KernelError> {
    gather_blocks_transposed_gemv(w_t, idx, 1, h, bias)
}

/// [`gather_rows_transposed_gemv`] over blocks of `block` rows: with `w_t` the transposed
/// `out_proj` (`[heads·hd, d]`, input dims as rows) and `h [B, len·hd]` the selected
/// heads' attention outputs, this is `out_proj` over the selected heads' columns.
pub fn gather_blocks_transposed_gemv<B: SparseKernels>(
    w_t: Tensor<B, 2>,
    idx: Tensor<B, 1, Int>,
    block: usize,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, KernelError> {
    checked_transposed_gemv("gather_rows_transposed_gemv", w_t, Some((idx, block)), h, bias, None)
}

/// A decoder layer's block output added to its residual in the same launches:
/// `residual + Σ_j h[:, j] · Wt[row_j, :] + bias` ([`transposed_gemv`] with `idx` `None`,
/// [`gather_blocks_transposed_gemv`] with `Some((idx, block))`), summed in f32 and rounded
/// once. `residual [B, d]` in the weights' dtype.
pub fn residual_transposed_gemv<B: SparseKernels>(
    residual: Tensor<B, 2>,
    w_t: Tensor<B, 2>,
    idx: Option<(Tensor<B, 1, Int>, usize)>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, KernelError> {
    checked_transposed_gemv("residual_transposed_gemv", w_t, idx, h, bias, Some(residual))
}

/// What every transposed GEMV checks, then its launch: the rows of `w_t [rows, d]` that
/// `idx` picks against `h` and the bias ([`check_transposed_rows`]), and the residual
/// `[B, d]` when there is one.
fn checked_transposed_gemv<B: SparseKernels>(
    op: &'static str,
    w_t: Tensor<B, 2>,
    idx: Option<(Tensor<B, 1, Int>, usize)>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    residual: Option<Tensor<B, 2>>,
) -> Result<Tensor<B, 2>, KernelError> {
    let (idx, block) = check_transposed_rows(op, &w_t, idx, &h, bias.as_ref())?;
    check_residual(op, residual.as_ref(), [h.dims()[0], w_t.dims()[1]], w_t.dtype())?;
    Ok(wrap(B::rows_transposed_gemv(prim(w_t), idx, block, prim(h), bias.map(prim), residual.map(prim))))
}

/// The rows of `w_t [rows, d]` that `idx` picks (whole blocks; every row when `None`)
/// against `h` and the bias; the index list as a primitive and its block size.
#[allow(clippy::type_complexity)] // an optional index primitive and its block size
fn check_transposed_rows<B: SparseKernels>(
    op: &'static str,
    w_t: &Tensor<B, 2>,
    idx: Option<(Tensor<B, 1, Int>, usize)>,
    h: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Result<(Option<IntTensor<B>>, usize), KernelError> {
    let rows = w_t.dims()[0];
    let k = match &idx {
        Some((idx, block)) => {
            check_block(op, rows, *block)?;
            idx.dims()[0] * block
        }
        None => rows,
    };
    check_transposed(op, w_t, h, k, bias)?;
    Ok(match idx {
        Some((idx, block)) => (Some(idx.into_primitive()), block),
        None => (None, 1),
    })
}

/// A selection made on the device: `indices [capacity]` ascending and padded with the
/// row count (an empty slot), and `count [1]`, how many were above the threshold.
#[derive(Debug, Clone)]
pub struct Selection<B: Backend> {
    pub indices: Tensor<B, 1, Int>,
    pub count: Tensor<B, 1, Int>,
}

/// Every index whose logit exceeds `threshold` in some batch row (the union a batch
/// needs), without sorting. `logits [B, n]`.
pub fn select_above_threshold<B: SparseKernels>(
    logits: Tensor<B, 2>,
    threshold: f32,
    capacity: usize,
) -> Result<Selection<B>, KernelError> {
    if capacity == 0 {
        return Err(shape_err("select_above_threshold", "capacity must be at least 1".into()));
    }
    let (indices, count) = B::select_above_threshold(prim(logits), threshold, capacity);
    Ok(Selection { indices: Tensor::from_primitive(indices), count: Tensor::from_primitive(count) })
}

/// The index of each row's largest value of `x [rows, width]` (the first on a tie),
/// `[rows]`, on the device: greedy decoding's next token. On `CubeBackend` two launches
/// ([`cube::argmax_rows`]) where Burn's `argmax` runs a row in one cube (26.5 µs for OPT's
/// 50,272 logits on the H100, plus 3.3 µs to cast f16 to f32 first).
pub fn argmax_rows<B: SparseKernels>(x: Tensor<B, 2>) -> Result<Tensor<B, 1, Int>, KernelError> {
    if x.dims()[1] == 0 {
        return Err(shape_err("argmax_rows", "the rows are empty".into()));
    }
    Ok(Tensor::from_primitive(B::argmax_rows(prim(x))))
}

/// The decoder's input rows `[n, d]` for `tokens [n]`: rows of the token table `table
/// [vocab, d]` plus `positions [n, d]` (the position table's rows of these positions, a
/// view of them is read in place), added in the tables' dtype — as a model adds them —
/// and returned as `out_dtype` (f32 for a residual stream kept in f32). One launch on
/// `CubeBackend`. An id outside the table gives a zero row (the ids live on the device
/// and are not read back to be checked).
pub fn embed_rows<B: SparseKernels>(tokens: Tensor<B, 1, Int>, table: Tensor<B, 2>, positions: Tensor<B, 2>, out_dtype: burn::tensor::DType) -> Result<Tensor<B, 2>, KernelError> {
    let op = "embed_rows";
    let ([n], [_, d], [pn, pd]) = (tokens.dims(), table.dims(), positions.dims());
    if pn != n || pd != d {
        return Err(shape_err(op, format!("positions are [{pn}, {pd}] for {n} tokens of width {d}")));
    }
    check_float(op, "positions", &positions, table.dtype())?;
    if !out_dtype.is_float() {
        return Err(KernelError::Dtype { op, what: format!("the output dtype {out_dtype:?} is not a float") });
    }
    Ok(wrap(B::embed_rows(tokens.into_primitive(), prim(table), prim(positions), out_dtype)))
}

/// `[rows, width]` 0/1 mask of each row's `k` largest logits (`1 ≤ k < width`), made on
/// the device without a sort on `CubeBackend`. A row with values tied at its `k`-th largest
/// may keep them all there.
pub fn topk_mask<B: SparseKernels>(logits: Tensor<B, 2>, k: usize) -> Result<Tensor<B, 2>, KernelError> {
    let width = logits.dims()[1];
    if k == 0 || k >= width {
        return Err(shape_err("topk_mask", format!("k {k} outside 1..{width} (the row width)")));
    }
    Ok(wrap(B::topk_mask(prim(logits), k)))
}

/// Decode attention (one new query per batch row) over the selected heads only, reading
/// only their keys and values: `q [B, S·hd]` holds the selected heads' queries in slot
/// order (what [`gather_blocks_gemv`] of `q_proj` gives), `heads [S]` the head ids (an
/// out-of-range id is an empty slot: zeros), caches `[B, H, cap, hd]` with valid positions
/// `0..len`. Returns `[B, S·hd]`, ready for [`gather_blocks_transposed_gemv`] over the
/// transposed `out_proj`. Scores and softmax in f32.
pub fn selected_heads_attention<B: SparseKernels>(
    q: Tensor<B, 2>,
    heads: Tensor<B, 1, Int>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    len: usize,
    scale: f32,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "selected_heads_attention";
    check_attention(op, &q, &heads, &k_cache, &v_cache, len)?;
    Ok(wrap(B::selected_heads_attention(
        prim(q),
        heads.into_primitive(),
        prim(k_cache),
        prim(v_cache),
        len,
        scale,
    )))
}

/// The inputs of a decode attention over the selected heads agree: caches alike, `q [B,
/// slots·hd]` in their dtype, `len` within the capacity.
fn check_attention<B: Backend>(
    op: &'static str,
    q: &Tensor<B, 2>,
    heads: &Tensor<B, 1, Int>,
    k_cache: &Tensor<B, 4>,
    v_cache: &Tensor<B, 4>,
    len: usize,
) -> Result<(), KernelError> {
    let [batch, _, cap, hd] = k_cache.dims();
    if v_cache.dims() != k_cache.dims() {
        return Err(shape_err(op, format!("key cache {:?} and value cache {:?} differ", k_cache.dims(), v_cache.dims())));
    }
    let slots = heads.dims()[0];
    if q.dims() != [batch, slots * hd] {
        return Err(shape_err(op, format!("q is {:?}, expected [{batch}, {}] for {slots} heads of {hd}", q.dims(), slots * hd)));
    }
    if len == 0 || len > cap {
        return Err(shape_err(op, format!("length {len} outside 1..={cap} (the cache capacity)")));
    }
    check_float(op, "the key cache", k_cache, q.dtype())?;
    check_float(op, "the value cache", v_cache, q.dtype())
}

/// [`selected_heads_attention`] followed by `out_proj` over the selected heads' columns
/// ([`block_cols_gemv`] of `w [rows, H·hd]`, bias `[rows]`), added into `acc [B, rows]`,
/// which is f32: a decode step's attention block into a residual stream kept in f32. On
/// `CubeBackend` with f32 atomics one launch (each cube computes its head's attention and
/// adds its rows of `out_proj` atomically; the order of the additions depends on
/// scheduling) for contexts up to 256 positions when `one_launch` is asked, else the two
/// kernels (the attention's output rounded to the weights' dtype between them); `acc` is
/// updated in place when the caller gave up its last handle to it. On the H100 the one
/// launch cost as much GPU time as the two within a decode step and saves the host a
/// launch (see `cube::LaunchConfig::attention_out_rows`).
#[allow(clippy::too_many_arguments)] // attention's inputs, out_proj's and the accumulator
pub fn attention_out_proj_accumulate<B: SparseKernels>(
    q: Tensor<B, 2>,
    heads: Tensor<B, 1, Int>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    len: usize,
    scale: f32,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    acc: Tensor<B, 2>,
    one_launch: bool,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "attention_out_proj_accumulate";
    check_attention(op, &q, &heads, &k_cache, &v_cache, len)?;
    let [batch, heads_total, _, hd] = k_cache.dims();
    let [rows, cols] = w.dims();
    if cols != heads_total * hd {
        return Err(shape_err(op, format!("out_proj is {:?} for {heads_total} heads of {hd}", w.dims())));
    }
    check_float(op, "out_proj", &w, q.dtype())?;
    check_bias(op, bias.as_ref(), rows, "rows", w.dtype())?;
    check_residual(op, Some(&acc), [batch, rows], DType::F32)?;
    Ok(wrap(B::attention_out_proj_accumulate(
        prim(q),
        heads.into_primitive(),
        prim(k_cache),
        prim(v_cache),
        len,
        scale,
        prim(w),
        bias.map(prim),
        prim(acc),
        one_launch,
    )))
}

/// LayerNorm of each row of `x [rows, d]`: `(x − mean) / sqrt(var + eps) · gamma + beta`
/// (biased variance, as PyTorch and Burn), statistics in f32 whatever `x`'s dtype;
/// `gamma` and `beta` are f32 `[d]` (OPT keeps its LayerNorm parameters in f32).
pub fn layer_norm<B: SparseKernels>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f32,
) -> Result<Tensor<B, 2>, KernelError> {
    let dtype = x.dtype();
    layer_norm_to(x, gamma, beta, eps, dtype)
}

/// [`layer_norm`] with its output in `dtype`: a residual stream kept in f32 normalized
/// into the weights' dtype, in the same launch.
pub fn layer_norm_to<B: SparseKernels>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f32,
    dtype: DType,
) -> Result<Tensor<B, 2>, KernelError> {
    check_norm_params("layer_norm", x.dims()[1], &gamma, &beta)?;
    check_any_float("layer_norm", "the output dtype", dtype)?;
    Ok(wrap(B::layer_norm_rows(prim(x), prim(gamma), prim(beta), eps, dtype)))
}

/// A LayerNorm's `gamma` and `beta`: `[d]` each, f32.
fn check_norm_params<B: Backend>(op: &'static str, d: usize, gamma: &Tensor<B, 1>, beta: &Tensor<B, 1>) -> Result<(), KernelError> {
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.dims()[0] != d {
            return Err(shape_err(op, format!("{name} has {} entries for rows of {d}", t.dims()[0])));
        }
        check_float(op, name, t, burn::tensor::DType::F32)?;
    }
    Ok(())
}

/// `out [1, rows] = act(W · x + bias)` over the rows whose predictor logit is above
/// `threshold` (`gate`: f32 `[rows]`), 0 for the others, which read nothing: threshold
/// selection fused into fc1, so a decode step needs no index list and no selection launch
/// (fc2's transposed GEMV then skips the zero rows). Batch 1: `x [1, d]`.
pub fn gated_rows_gemv<B: SparseKernels>(
    w: Tensor<B, 2>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    act: Activation,
    gate: Tensor<B, 1>,
    threshold: f32,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "gated_rows_gemv";
    check_gated_rows(op, &w, &x, bias.as_ref())?;
    if gate.dims()[0] != w.dims()[0] {
        return Err(shape_err(op, format!("gate has {} logits for {} rows", gate.dims()[0], w.dims()[0])));
    }
    check_float(op, "gate", &gate, burn::tensor::DType::F32)?;
    Ok(wrap(B::gated_rows_gemv(prim(w), prim(x), bias.map(prim), act == Activation::Relu, prim(gate), threshold)))
}

/// [`gated_rows_gemv`] whose gate is a low-rank predictor's logits, computed in the same
/// launch: row `j` of `w` is read (and `out[0, j] = act(W[j, :] · x + bias[j])`) only where
/// `up[j, :] · h > threshold`; elsewhere `out` is 0. `up [rows, r]` is the predictor's
/// second factor (f32, or a half type to read half the bytes) and `h [1, r]` its first
/// factor's output (f32); logits in f32. Predictor, selection and fc1 in one launch, with
/// no logits or index list in memory. Batch 1.
#[allow(clippy::too_many_arguments)] // fc1's inputs and the predictor's
pub fn predicted_rows_gemv<B: SparseKernels>(
    w: Tensor<B, 2>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    act: Activation,
    up: Tensor<B, 2>,
    h: Tensor<B, 2>,
    threshold: f32,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "predicted_rows_gemv";
    check_gated_rows(op, &w, &x, bias.as_ref())?;
    check_predictor(op, &up, &h, Some(w.dims()[0]))?;
    Ok(wrap(B::predicted_rows_gemv(
        prim(w),
        prim(x),
        bias.map(prim),
        act == Activation::Relu,
        prim(up),
        prim(h),
        threshold,
    )))
}

/// The weights of an OPT MLP for the fused sparse kernels: `w1 [ffn, d]` (fc1 in PyTorch
/// layout), `w2_t [ffn, d]` (fc2 stored transposed), their biases `[ffn]` and `[d]`.
#[derive(Debug, Clone)]
pub struct MlpWeights<B: Backend> {
    pub w1: Tensor<B, 2>,
    pub b1: Option<Tensor<B, 1>>,
    pub w2_t: Tensor<B, 2>,
    pub b2: Option<Tensor<B, 1>>,
}

/// A decode step's whole sparse MLP from its predictor: `residual + b2 + Σ_j relu(W1[j] ·
/// x + b1[j]) · W2t[j]` over the neurons `j` whose logit `up[j, :] · h` is above
/// `threshold` (`up [ffn, r]` any float dtype, `h [1, r]` f32, `x [1, d]`, `residual
/// [1, d]`). On `CubeBackend` two launches: predictor, selection, fc1 and fc2's split sums
/// in one (the hidden values stay on chip), then the splits' sum with bias and residual.
/// Equals [`predicted_rows_gemv`] followed by [`residual_transposed_gemv`] (same rows, f32
/// sums; the order of the additions differs). Batch 1.
pub fn predicted_mlp<B: SparseKernels>(
    mlp: MlpWeights<B>,
    x: Tensor<B, 2>,
    residual: Option<Tensor<B, 2>>,
    up: Tensor<B, 2>,
    h: Tensor<B, 2>,
    threshold: f32,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "predicted_mlp";
    let MlpWeights { w1, b1, w2_t, b2 } = mlp;
    check_gated_rows(op, &w1, &x, b1.as_ref())?;
    check_predictor(op, &up, &h, Some(w1.dims()[0]))?;
    let d = x.dims()[1];
    if w2_t.dims() != w1.dims() {
        return Err(shape_err(op, format!("fc2 (transposed) is {:?}, expected fc1's {:?}", w2_t.dims(), w1.dims())));
    }
    check_float(op, "fc2", &w2_t, w1.dtype())?;
    check_bias(op, b2.as_ref(), d, "columns", w1.dtype())?;
    check_residual(op, residual.as_ref(), [1, d], w1.dtype())?;
    Ok(wrap(B::predicted_mlp(
        prim(w1),
        b1.map(prim),
        prim(w2_t),
        b2.map(prim),
        prim(x),
        residual.map(prim),
        prim(up),
        prim(h),
        threshold,
    )))
}

/// [`check_rows_gemv`] for the gated GEMVs, which take one token (`x [1, d]`).
fn check_gated_rows<B: Backend>(op: &'static str, w: &Tensor<B, 2>, x: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>) -> Result<(), KernelError> {
    check_rows_gemv(op, w, x, bias)?;
    if x.dims()[0] != 1 {
        return Err(shape_err(op, format!("x has {} rows; the gated GEMV is for batch 1", x.dims()[0])));
    }
    Ok(())
}

/// The second factor of a low-rank predictor (`up [rows, r]`, any float dtype) and its
/// first factor's output for one token (`h [1, r]`, f32); `rows` as expected when given.
fn check_predictor<B: Backend>(op: &'static str, up: &Tensor<B, 2>, h: &Tensor<B, 2>, rows: Option<usize>) -> Result<(), KernelError> {
    let [up_rows, r] = up.dims();
    if let Some(rows) = rows {
        if up_rows != rows {
            return Err(shape_err(op, format!("the predictor scores {up_rows} rows for {rows}")));
        }
    }
    if h.dims() != [1, r] {
        return Err(shape_err(op, format!("h is {:?}, expected [1, {r}] (one token, the predictor's rank)", h.dims())));
    }
    check_any_float(op, "the predictor", up.dtype())?;
    check_float(op, "h", h, burn::tensor::DType::F32)
}

/// A residual the kernel adds in its last pass: the output's shape, in `dtype`.
fn check_residual<B: Backend>(op: &'static str, residual: Option<&Tensor<B, 2>>, out: [usize; 2], dtype: burn::tensor::DType) -> Result<(), KernelError> {
    if let Some(r) = residual {
        if r.dims() != out {
            return Err(shape_err(op, format!("residual is {:?} for an output of {out:?}", r.dims())));
        }
        check_float(op, "residual", r, dtype)?;
    }
    Ok(())
}

/// A float dtype the kernels read (f32, f16 or bf16).
fn check_any_float(op: &'static str, name: &str, dtype: burn::tensor::DType) -> Result<(), KernelError> {
    use burn::tensor::DType;
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(KernelError::Dtype { op, what: format!("{name} is {other:?}, expected f32, f16 or bf16") }),
    }
}

/// Ascending indices of the rows whose predictor logit `up[j, :] · h` is above `threshold`,
/// padded with `rows` (an empty slot) to `capacity`, and how many there were (`[1]`):
/// [`select_above_threshold`] of the predictor's logits, computed in the same launch.
/// `up [rows, r]` (any float dtype), `h [1, r]` (f32); for few rows (attention heads: one
/// cube).
pub fn predict_select<B: SparseKernels>(
    up: Tensor<B, 2>,
    h: Tensor<B, 2>,
    threshold: f32,
    capacity: usize,
) -> Result<Selection<B>, KernelError> {
    check_head_select("predict_select", &up, &h, capacity)?;
    let (indices, count) = B::predict_select(prim(up), prim(h), threshold, capacity);
    Ok(Selection { indices: Tensor::from_primitive(indices), count: Tensor::from_primitive(count) })
}

/// Most rows [`predict_select`] takes: its logits live in one cube's shared memory.
pub const PREDICT_SELECT_MAX_ROWS: usize = 4096;

/// A one-cube selection's predictor (as [`check_predictor`]), a capacity of at least one,
/// and no more rows than the cube holds.
fn check_head_select<B: Backend>(op: &'static str, up: &Tensor<B, 2>, h: &Tensor<B, 2>, capacity: usize) -> Result<(), KernelError> {
    check_predictor(op, up, h, None)?;
    if capacity == 0 {
        return Err(shape_err(op, "capacity must be at least 1".into()));
    }
    let rows = up.dims()[0];
    if rows > PREDICT_SELECT_MAX_ROWS {
        return Err(shape_err(op, format!("{rows} rows; one cube selects at most {PREDICT_SELECT_MAX_ROWS}")));
    }
    Ok(())
}

/// A head selection for [`norm_predict`] to make alongside: the second factor `up [rows,
/// r]` (in the dtype of [`norm_predict`]'s `down`) and first-factor output `h [1, r]` (f32)
/// of a head predictor, as [`predict_select`] takes them.
pub struct HeadSelect<B: Backend> {
    pub up: Tensor<B, 2>,
    pub h: Tensor<B, 2>,
    pub threshold: f32,
    pub capacity: usize,
}

/// What [`norm_predict`] returns: the normalized row `[1, d]`, the predictor's first
/// factor `[1, r]` (f32), and the selection when one was asked for.
pub struct NormPrediction<B: Backend> {
    pub normed: Tensor<B, 2>,
    pub first: Tensor<B, 2>,
    pub selection: Option<Selection<B>>,
}

/// A pre-LN decode step's layer input in one launch (batch 1): the LayerNorm of the
/// residual `x [1, d]` (f32 `gamma`, `beta` `[d]`), the first factor `down [r, d] · x` of
/// the next layer's predictor (`down` in f32 or the model's dtype, the output f32, `x` in
/// the model's dtype), and optionally this
/// layer's head selection ([`HeadSelect`], as [`predict_select`]). The three read the same
/// residual and none needs another's output, so a sparse layer's predictors add no
/// launches of their own.
pub fn norm_predict<B: SparseKernels>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f32,
    down: Tensor<B, 2>,
    select: Option<HeadSelect<B>>,
) -> Result<NormPrediction<B>, KernelError> {
    let dtype = x.dtype();
    norm_predict_to(x, gamma, beta, eps, down, select, dtype)
}

/// [`norm_predict`] with the normalized row in `normed_dtype`: a residual stream kept in
/// f32 (`x`) normalized into the weights' dtype for the layer's GEMVs.
pub fn norm_predict_to<B: SparseKernels>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f32,
    down: Tensor<B, 2>,
    select: Option<HeadSelect<B>>,
    normed_dtype: DType,
) -> Result<NormPrediction<B>, KernelError> {
    let op = "norm_predict";
    check_any_float(op, "the output dtype", normed_dtype)?;
    let [rows, d] = x.dims();
    if rows != 1 {
        return Err(shape_err(op, format!("x has {rows} rows; norm_predict is for one token")));
    }
    check_norm_params(op, d, &gamma, &beta)?;
    if down.dims()[1] != d {
        return Err(shape_err(op, format!("the predictor's first factor is {:?} for rows of {d}", down.dims())));
    }
    check_any_float(op, "the predictor's first factor", down.dtype())?;
    if let Some(s) = &select {
        check_head_select(op, &s.up, &s.h, s.capacity)?;
        // One dtype for both factors: the kernel reads them as one type.
        check_float(op, "the head predictor's second factor", &s.up, down.dtype())?;
    }
    let select = select.map(|s| (prim(s.up), prim(s.h), s.threshold, s.capacity));
    let (normed, first, selection) = B::norm_predict(prim(x), prim(gamma), prim(beta), eps, prim(down), select, normed_dtype);
    Ok(NormPrediction {
        normed: wrap(normed),
        first: wrap(first),
        selection: selection.map(|(indices, count)| Selection { indices: Tensor::from_primitive(indices), count: Tensor::from_primitive(count) }),
    })
}

/// A decode step's keys and values, projected and written into the caches in one launch:
/// row `j` of `kv [2·H·hd, d]` (k_proj's rows, then v_proj's, each output one contiguous
/// row) dotted with `x [B, d]`, plus `bias[j]`, lands at position `pos` of `k_cache`
/// (first half) or `v_cache` (second half), both `[B, H, cap, hd]`. Returns the caches;
/// on `CubeBackend` they are written in place, so the caller must hold their only handles.
pub fn kv_append<B: SparseKernels>(
    kv: Tensor<B, 2>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    pos: usize,
) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KernelError> {
    check_kv_inputs("kv_append", &kv, &x, bias.as_ref(), &k_cache, &v_cache, pos, false)?;
    let (k, v) = B::kv_append(prim(kv), prim(x), bias.map(prim), prim(k_cache), prim(v_cache), pos);
    Ok((wrap(k), wrap(v)))
}

/// The query rows [`qkv_append`] computes beside the keys and values: `w [rows, d]`
/// (q_proj, each output one contiguous row), the selected heads (`heads`, whole blocks of
/// `head_dim` rows, empty slots allowed; every row when `None`) and the bias `[rows]`.
pub struct QueryRows<B: Backend> {
    pub w: Tensor<B, 2>,
    pub heads: Option<Tensor<B, 1, Int>>,
    pub head_dim: usize,
    pub bias: Option<Tensor<B, 1>>,
}

/// [`kv_append`] and the same step's queries in one launch: `q [B, outputs]` is
/// [`gemv`] of `query.w` (or [`gather_blocks_gemv`] of the selected heads) with its bias,
/// and the keys and values land in the caches as [`kv_append`] writes them. Returns `q`
/// and the caches.
pub fn qkv_append<B: SparseKernels>(
    query: QueryRows<B>,
    kv: Tensor<B, 2>,
    x: Tensor<B, 2>,
    kv_bias: Option<Tensor<B, 1>>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    pos: usize,
) -> Result<(Tensor<B, 2>, Tensor<B, 4>, Tensor<B, 4>), KernelError> {
    let op = "qkv_append";
    let block = check_qkv_inputs(op, &query, &kv, &x, kv_bias.as_ref(), &k_cache, &v_cache, pos, None, None)?;
    let (q, k, v) = B::qkv_append(
        prim(query.w),
        query.heads.map(|h| h.into_primitive()),
        block,
        query.bias.map(prim),
        prim(kv),
        prim(x),
        kv_bias.map(prim),
        prim(k_cache),
        prim(v_cache),
        pos,
    );
    Ok((wrap(q), wrap(k), wrap(v)))
}

/// The lazy K/V state of one layer at batch 1 ([`qkv_append_lazy`]): each head's first
/// position whose key and value are not yet in the cache (`pending [heads]`), and the
/// layer inputs of the last `window` steps (`ring [window, d]`, slot `pos % window`; the
/// LayerNorm's output in the weights' dtype).
#[derive(Debug, Clone)]
pub struct LazyKv<B: Backend> {
    pub pending: Tensor<B, 1, Int>,
    pub ring: Tensor<B, 2>,
}

impl<B: Backend> LazyKv<B> {
    /// Every head written up to `pos - 1`, an empty ring of `window` inputs of `d` values.
    pub fn new(heads: usize, d: usize, window: usize, pos: usize, dtype: burn::tensor::DType, device: &B::Device) -> Self {
        Self {
            pending: Tensor::<B, 1, Int>::full([heads], pos as i64, device),
            ring: Tensor::zeros([window.max(1), d], (device, dtype)),
        }
    }
}

/// [`qkv_append`] at batch 1 that writes keys and values only where they will be read:
/// for the selected heads (`query.heads`, required) and for any head whose oldest
/// unwritten position would otherwise leave `state`'s ring next step — each for every
/// position it has not written yet, recomputed from the ring's inputs, so a head reads
/// exactly the keys and values an every-head write would have given it. The queries are
/// those of the selected heads. The riders of [`qkv_append_first`] may come along: `first`,
/// the next layer's attention first factor, and `norm_in`, the LayerNorm applied by the op
/// to the f32 residual `x` (the ring then keeps the LayerNorm's output in the weights'
/// dtype, and a head's owed positions, recomputed from it, match an every-head write to
/// its rounding). Returns `q`, the caches, the next state and the first factor when asked
/// for.
#[allow(clippy::type_complexity)] // the queries, the caches, the next lazy state, the first factor
#[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs, the lazy state and the riders
pub fn qkv_append_lazy<B: SparseKernels>(
    query: QueryRows<B>,
    kv: Tensor<B, 2>,
    x: Tensor<B, 2>,
    kv_bias: Option<Tensor<B, 1>>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    pos: usize,
    state: LazyKv<B>,
    first: Option<FirstFactor<B>>,
    norm_in: Option<NormInRiders<B>>,
) -> Result<(Tensor<B, 2>, Tensor<B, 4>, Tensor<B, 4>, LazyKv<B>, Option<Tensor<B, 2>>), KernelError> {
    let op = "qkv_append_lazy";
    let block = check_qkv_inputs(op, &query, &kv, &x, kv_bias.as_ref(), &k_cache, &v_cache, pos, first.as_ref(), norm_in.as_ref())?;
    let Some(heads) = query.heads else {
        return Err(shape_err(op, "needs the selected heads' index list".into()));
    };
    let [batch, n_heads, _, _] = k_cache.dims();
    if batch != 1 {
        return Err(shape_err(op, format!("batch {batch}: lazy keys and values are for batch 1")));
    }
    if state.pending.dims() != [n_heads] {
        return Err(shape_err(op, format!("pending {:?}, expected [{n_heads}]", state.pending.dims())));
    }
    let [_, d] = x.dims();
    if state.ring.dims()[1] != d || state.ring.dtype() != kv.dtype() {
        return Err(shape_err(op, format!("ring {:?} {:?}, expected [window, {d}] {:?}", state.ring.dims(), state.ring.dtype(), kv.dtype())));
    }
    let (q, k, v, pending, ring, first) = B::qkv_append_lazy(
        prim(query.w),
        heads.into_primitive(),
        block,
        query.bias.map(prim),
        prim(kv),
        prim(x),
        kv_bias.map(prim),
        prim(k_cache),
        prim(v_cache),
        pos,
        state.pending.into_primitive(),
        prim(state.ring),
        first.map(|f| (prim(f.down), prim(f.residual))),
        norm_in.map(norm_in_params),
    );
    Ok((wrap(q), wrap(k), wrap(v), LazyKv { pending: Tensor::from_primitive(pending), ring: wrap(ring) }, first.map(wrap)))
}

/// A LayerNorm an op applies itself with the folds of its queries' and its keys' and
/// values' rows ([`qkv_append_first`], [`qkv_append_lazy`]).
type NormInRiders<B> = (NormIn<B>, RowFold<B>, RowFold<B>);

/// [`NormInRiders`] as the backends take them.
fn norm_in_params<B: Backend>((n, q_fold, kv_fold): NormInRiders<B>) -> NormInParams<B> {
    NormInParams { gamma: prim(n.gamma), beta: prim(n.beta), eps: n.eps, q_fold: prim(q_fold.0), kv_fold: prim(kv_fold.0) }
}

/// The inputs of [`qkv_append`] (and its twins with riders, [`qkv_append_first`] and
/// [`qkv_append_lazy`]) agree: the keys' and values' as [`kv_append`] checks them, and the
/// queries' rows; with `norm_in`, `x` is the f32 residual and the folds have a value per
/// query row and per key-and-value row; a first factor needs one sequence of `x`'s width.
/// Returns the query rows' block (the head dim when heads are selected, else 1).
#[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs and the riders
fn check_qkv_inputs<B: Backend>(
    op: &'static str,
    query: &QueryRows<B>,
    kv: &Tensor<B, 2>,
    x: &Tensor<B, 2>,
    kv_bias: Option<&Tensor<B, 1>>,
    k_cache: &Tensor<B, 4>,
    v_cache: &Tensor<B, 4>,
    pos: usize,
    first: Option<&FirstFactor<B>>,
    norm_in: Option<&NormInRiders<B>>,
) -> Result<usize, KernelError> {
    if let Some((norm, q_fold, kv_fold)) = norm_in {
        check_norm_in(op, norm, &[(q_fold, query.w.dims()[0]), (kv_fold, kv.dims()[0])], x)?;
    }
    let x_f32 = norm_in.is_some();
    check_kv_inputs(op, kv, x, kv_bias, k_cache, v_cache, pos, x_f32)?;
    check_input_rows_gemv(op, &query.w, x, query.bias.as_ref(), x_f32)?;
    let block = if query.heads.is_some() { query.head_dim.max(1) } else { 1 };
    check_block(op, query.w.dims()[0], block)?;
    if let Some(first) = first {
        check_first_factor(op, first)?;
        if x.dims()[0] != 1 || first.down.dims()[1] != x.dims()[1] {
            return Err(shape_err(op, format!("x {:?} and a first factor {:?}: one sequence, one width", x.dims(), first.down.dims())));
        }
    }
    Ok(block)
}

/// The inputs of [`kv_append`] agree. With `x_f32`, `x` is the f32 residual whose
/// LayerNorm the op applies itself ([`NormIn`]).
#[allow(clippy::too_many_arguments)] // the GEMV's inputs, the caches, the position and x's kind
fn check_kv_inputs<B: Backend>(
    op: &'static str,
    kv: &Tensor<B, 2>,
    x: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    k_cache: &Tensor<B, 4>,
    v_cache: &Tensor<B, 4>,
    pos: usize,
    x_f32: bool,
) -> Result<(), KernelError> {
    let [batch, heads, cap, hd] = k_cache.dims();
    if v_cache.dims() != k_cache.dims() {
        return Err(shape_err(op, format!("key cache {:?} and value cache {:?} differ", k_cache.dims(), v_cache.dims())));
    }
    if kv.dims()[0] != 2 * heads * hd {
        return Err(shape_err(op, format!("kv has {} rows, expected 2 × {heads} heads × {hd}", kv.dims()[0])));
    }
    if x.dims()[0] != batch {
        return Err(shape_err(op, format!("x has {} rows for a cache of batch {batch}", x.dims()[0])));
    }
    if pos >= cap {
        return Err(shape_err(op, format!("position {pos} outside the cache's {cap}")));
    }
    check_input_rows_gemv(op, kv, x, bias, x_f32)?;
    check_float(op, "the key cache", k_cache, kv.dtype())?;
    check_float(op, "the value cache", v_cache, kv.dtype())
}

/// `acc + Σ_j h[:, j] · Wt[row_j, :] + bias` ([`gather_rows_transposed_gemv`] or, with `idx`
/// `None`, [`transposed_gemv`]) added into `acc [B, d]`, which is f32 whatever the weights'
/// dtype: a residual stream kept in f32. On `CubeBackend` with f32 atomics (CUDA) one
/// launch, adding into `acc`'s buffer in place when the caller gave up its last handle
/// to it; the order of the f32 additions then depends on scheduling.
pub fn accumulate_transposed_gemv<B: SparseKernels>(
    acc: Tensor<B, 2>,
    w_t: Tensor<B, 2>,
    idx: Option<(Tensor<B, 1, Int>, usize)>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, KernelError> {
    let op = "accumulate_transposed_gemv";
    let (idx, block) = check_transposed_rows(op, &w_t, idx, &h, bias.as_ref())?;
    check_residual(op, Some(&acc), [h.dims()[0], w_t.dims()[1]], DType::F32)?;
    Ok(wrap(B::rows_transposed_gemv_accumulate(prim(w_t), idx, block, prim(h), bias.map(prim), prim(acc))))
}

/// [`sparse_mlp`] added into an f32 accumulator (a residual stream kept in f32): `acc +
/// fc2ᵀ[idx]ᵀ · relu(fc1[idx] · x + b1[idx]) + b2`. Two launches on `CubeBackend` with
/// f32 atomics, where [`sparse_mlp`]'s fc2 takes two of its own.
pub fn sparse_mlp_accumulate<B: SparseKernels>(
    acc: Tensor<B, 2>,
    x: Tensor<B, 2>,
    mlp: MlpWeights<B>,
    idx: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 2>, KernelError> {
    let MlpWeights { w1, b1, w2_t, b2 } = mlp;
    let h = gather_rows_gemv(w1, idx.clone(), x, b1, Activation::Relu)?;
    accumulate_transposed_gemv(acc, w2_t, Some((idx, 1)), h, b2)
}

/// A sparse OPT MLP for the selected neurons: `fc2ᵀ[idx]ᵀ · relu(fc1[idx] · x + b1[idx]) + b2`.
/// `w1 [ffn, d]` (fc1 in PyTorch layout), `w2_t [ffn, d]` (fc2 transposed). Two launches;
/// the hidden values (`[B, K]`) make one round trip through memory.
pub fn sparse_mlp<B: SparseKernels>(
    x: Tensor<B, 2>,
    w1: Tensor<B, 2>,
    b1: Tensor<B, 1>,
    w2_t: Tensor<B, 2>,
    b2: Tensor<B, 1>,
    idx: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 2>, KernelError> {
    let h = gather_rows_gemv(w1, idx.clone(), x, Some(b1), Activation::Relu)?;
    gather_rows_transposed_gemv(w2_t, idx, h, Some(b2))
}

/// The LayerNorm that [`attention_out_proj_accumulate_norm`] and
/// [`accumulate_transposed_gemv_norm`] apply to the row they finish: f32 `gamma`, `beta`
/// `[d]`, epsilon, the output dtype, and `done`, a zeroed int counter (`[1]` or more,
/// [`NormAfter::counter`]) that they leave zeroed. One counter per sequence: the ops that
/// share one must run one after another (as a sequence's decode steps do).
pub struct NormAfter<B: Backend> {
    pub gamma: Tensor<B, 1>,
    pub beta: Tensor<B, 1>,
    pub eps: f32,
    pub dtype: DType,
    pub done: Tensor<B, 1, Int>,
}

impl<B: Backend> NormAfter<B> {
    /// A zeroed counter for [`NormAfter::done`].
    pub fn counter(device: &B::Device) -> Tensor<B, 1, Int> {
        Tensor::zeros([1], device)
    }
}

fn check_norm_after<B: Backend>(op: &'static str, norm: &NormAfter<B>, d: usize, batch: usize) -> Result<(), KernelError> {
    if batch != 1 {
        return Err(shape_err(op, format!("batch {batch}; the LayerNorm after is for one sequence")));
    }
    check_norm_params(op, d, &norm.gamma, &norm.beta)?;
    check_any_float(op, "the LayerNorm's output dtype", norm.dtype)?;
    if norm.done.dims()[0] == 0 {
        return Err(shape_err(op, "the counter is empty".into()));
    }
    Ok(())
}

fn norm_params<B: Backend>(norm: NormAfter<B>) -> NormParams<B> {
    NormParams { gamma: prim(norm.gamma), beta: prim(norm.beta), eps: norm.eps, dtype: norm.dtype, done: norm.done.into_primitive() }
}

/// [`attention_out_proj_accumulate`] in one launch (batch 1) that also returns the
/// LayerNorm ([`NormAfter`]) of the finished residual `[1, rows]`: on `CubeBackend` with
/// f32 atomics the launch's last cube writes it, so the MLP's LayerNorm needs no launch of
/// its own. Returns the residual and its LayerNorm.
#[allow(clippy::too_many_arguments)] // attention's inputs, out_proj's, the accumulator and the LayerNorm after
pub fn attention_out_proj_accumulate_norm<B: SparseKernels>(
    q: Tensor<B, 2>,
    heads: Tensor<B, 1, Int>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    len: usize,
    scale: f32,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    acc: Tensor<B, 2>,
    norm: NormAfter<B>,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), KernelError> {
    let op = "attention_out_proj_accumulate_norm";
    check_attention(op, &q, &heads, &k_cache, &v_cache, len)?;
    let [batch, heads_total, _, hd] = k_cache.dims();
    let [rows, cols] = w.dims();
    if cols != heads_total * hd {
        return Err(shape_err(op, format!("out_proj is {:?} for {heads_total} heads of {hd}", w.dims())));
    }
    check_float(op, "out_proj", &w, q.dtype())?;
    check_bias(op, bias.as_ref(), rows, "rows", w.dtype())?;
    check_residual(op, Some(&acc), [batch, rows], DType::F32)?;
    check_norm_after(op, &norm, rows, batch)?;
    let (acc, normed) =
        B::attention_out_proj_accumulate_norm(prim(q), heads.into_primitive(), prim(k_cache), prim(v_cache), len, scale, prim(w), bias.map(prim), prim(acc), norm_params(norm));
    Ok((wrap(acc), wrap(normed)))
}

/// [`accumulate_transposed_gemv`] over every row (batch 1) that also returns the LayerNorm
/// ([`NormAfter`]) of the finished residual, as [`attention_out_proj_accumulate_norm`]:
/// the next layer's first LayerNorm, or the final one, without a launch of its own.
pub fn accumulate_transposed_gemv_norm<B: SparseKernels>(
    acc: Tensor<B, 2>,
    w_t: Tensor<B, 2>,
    h: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    norm: NormAfter<B>,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), KernelError> {
    let op = "accumulate_transposed_gemv_norm";
    check_transposed_rows(op, &w_t, None, &h, bias.as_ref())?;
    let [batch, d] = [h.dims()[0], w_t.dims()[1]];
    check_residual(op, Some(&acc), [batch, d], DType::F32)?;
    check_norm_after(op, &norm, d, batch)?;
    let (acc, normed) = B::rows_transposed_gemv_accumulate_norm(prim(w_t), prim(h), bias.map(prim), prim(acc), norm_params(norm));
    Ok((wrap(acc), wrap(normed)))
}

/// A predictor's first factor for another op to compute beside its own work (batch 1):
/// `down [r, d]` (f32 or the model's dtype) times the residual `[1, d]` (f32).
pub struct FirstFactor<B: Backend> {
    pub down: Tensor<B, 2>,
    pub residual: Tensor<B, 2>,
}

fn check_first_factor<B: Backend>(op: &'static str, first: &FirstFactor<B>) -> Result<(), KernelError> {
    let d = first.down.dims()[1];
    if first.residual.dims() != [1, d] {
        return Err(shape_err(op, format!("the residual is {:?} for a first factor {:?}", first.residual.dims(), first.down.dims())));
    }
    check_float(op, "the residual", &first.residual, DType::F32)?;
    check_any_float(op, "the predictor's first factor", first.down.dtype())
}

/// A LayerNorm an op applies to its input itself ([`qkv_append_first`], batch 1): the op
/// then reads the f32 residual `[1, d]` where it read the LayerNorm's output, so the
/// launch that finished the residual writes no LayerNorm. `gamma`, `beta` `[d]` f32.
#[derive(Clone, Debug)]
pub struct NormIn<B: Backend> {
    pub gamma: Tensor<B, 1>,
    pub beta: Tensor<B, 1>,
    pub eps: f32,
}

/// A weight's rows folded with the LayerNorm before it, for an op that applies that
/// LayerNorm itself ([`NormIn`]): `c = W · beta + bias` (f32 `[rows]`), so that `W[row] ·
/// LayerNorm(x) + bias[row] = W[row] · (gamma ⊙ (x − mean(x))) / std(x) + c[row]`.
#[derive(Clone, Debug)]
pub struct RowFold<B: Backend>(pub Tensor<B, 1>);

impl<B: Backend> RowFold<B> {
    /// The fold of `w [rows, d]` (row-major: the kernels' layout) with the LayerNorm's
    /// `beta` `[d]` and the bias `[rows]`, computed in f32.
    pub fn new(w: &Tensor<B, 2>, norm: &NormIn<B>, bias: Option<&Tensor<B, 1>>) -> Self {
        let [rows, d] = w.dims();
        let c = w.clone().cast(DType::F32).matmul(norm.beta.clone().cast(DType::F32).reshape([d, 1])).reshape([rows]);
        Self(match bias {
            Some(b) => c + b.clone().cast(DType::F32),
            None => c,
        })
    }
}

fn check_norm_in<B: Backend>(op: &'static str, norm: &NormIn<B>, folds: &[(&RowFold<B>, usize)], x: &Tensor<B, 2>) -> Result<(), KernelError> {
    let d = x.dims()[1];
    if x.dims()[0] != 1 {
        return Err(shape_err(op, format!("x is {:?}: a LayerNorm in the op takes one sequence", x.dims())));
    }
    check_float(op, "the residual (a LayerNorm in the op)", x, DType::F32)?;
    for (name, t) in [("gamma", &norm.gamma), ("beta", &norm.beta)] {
        if t.dims() != [d] {
            return Err(shape_err(op, format!("the LayerNorm's {name} is {:?} for a residual of width {d}", t.dims())));
        }
        check_float(op, name, t, DType::F32)?;
    }
    for (fold, rows) in folds {
        if fold.0.dims() != [*rows] {
            return Err(shape_err(op, format!("a row fold is {:?} for {rows} rows", fold.0.dims())));
        }
        check_float(op, "a row fold", &fold.0, DType::F32)?;
    }
    Ok(())
}

/// What [`predicted_rows_gemv_with`] returns: fc1's output `[1, rows]`, the next layer's
/// MLP first factor `[1, r]` and head selection, when asked for.
pub struct PredictedRows<B: Backend> {
    pub out: Tensor<B, 2>,
    pub first: Option<Tensor<B, 2>>,
    pub selection: Option<Selection<B>>,
}

/// [`predicted_rows_gemv`] with up to two riders on cubes of their own in the same launch
/// on `CubeBackend` (batch 1): `first`, the first factor of the next layer's MLP
/// predictor from the same residual, and `select`, the next layer's head selection
/// ([`HeadSelect`], from the first factor its attention predictor left). Neither needs
/// fc1's output, so the predictors of the next layer cost no launches of their own. Both
/// riders' predictor factors must share `up`'s dtype (the kernel reads them as one type).
#[allow(clippy::too_many_arguments)] // fc1's inputs, the predictor's and the riders'
pub fn predicted_rows_gemv_with<B: SparseKernels>(
    w: Tensor<B, 2>,
    x: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    act: Activation,
    up: Tensor<B, 2>,
    h: Tensor<B, 2>,
    threshold: f32,
    first: Option<FirstFactor<B>>,
    select: Option<HeadSelect<B>>,
) -> Result<PredictedRows<B>, KernelError> {
    let op = "predicted_rows_gemv_with";
    check_gated_rows(op, &w, &x, bias.as_ref())?;
    check_predictor(op, &up, &h, Some(w.dims()[0]))?;
    if let Some(f) = &first {
        check_first_factor(op, f)?;
        check_float(op, "the next MLP predictor's first factor", &f.down, up.dtype())?;
    }
    if let Some(s) = &select {
        check_head_select(op, &s.up, &s.h, s.capacity)?;
        check_float(op, "the head predictor's second factor", &s.up, up.dtype())?;
    }
    let first = first.map(|f| (prim(f.down), prim(f.residual)));
    let select = select.map(|s| (prim(s.up), prim(s.h), s.threshold, s.capacity));
    let (out, first, selection) = B::predicted_rows_gemv_with(prim(w), prim(x), bias.map(prim), act == Activation::Relu, prim(up), prim(h), threshold, first, select);
    Ok(PredictedRows {
        out: wrap(out),
        first: first.map(wrap),
        selection: selection.map(|(indices, count)| Selection { indices: Tensor::from_primitive(indices), count: Tensor::from_primitive(count) }),
    })
}

/// [`qkv_append`] with the first factor of the next layer's attention predictor (`first`,
/// from the layer's residual, batch 1) on cubes of its own in the same launch on
/// `CubeBackend`. Returns `q`, the caches and the first factor `[1, r]` (f32).
#[allow(clippy::type_complexity)] // the queries, the caches, the first factor
#[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs and the rider's
pub fn qkv_append_first<B: SparseKernels>(
    query: QueryRows<B>,
    kv: Tensor<B, 2>,
    x: Tensor<B, 2>,
    kv_bias: Option<Tensor<B, 1>>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    pos: usize,
    first: FirstFactor<B>,
    norm_in: Option<NormInRiders<B>>,
) -> Result<(Tensor<B, 2>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 2>), KernelError> {
    let op = "qkv_append_first";
    let block = check_qkv_inputs(op, &query, &kv, &x, kv_bias.as_ref(), &k_cache, &v_cache, pos, Some(&first), norm_in.as_ref())?;
    let (q, k, v, f) = B::qkv_append_first(
        prim(query.w),
        query.heads.map(|h| h.into_primitive()),
        block,
        query.bias.map(prim),
        prim(kv),
        prim(x),
        kv_bias.map(prim),
        prim(k_cache),
        prim(v_cache),
        pos,
        (prim(first.down), prim(first.residual)),
        norm_in.map(norm_in_params),
    );
    Ok((wrap(q), wrap(k), wrap(v), wrap(f)))
}
