//! The reference implementation in Burn tensor ops, for backends without the CubeCL
//! kernels (Flex on the CPU, fused backends). Exact, with f32 accumulation, but it
//! materialises the gathered rows, so it saves no memory traffic.

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData, TensorPrimitive};

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The rows `idx` selects, with empty slots (out of range) read as row 0, and a mask of
/// which slots are live.
fn gather<B: Backend>(
    w: Tensor<B, 2>,
    idx: IntTensor<B>,
) -> (Tensor<B, 2>, Tensor<B, 1, Bool>) {
    let rows = w.dims()[0] as i64;
    let idx: Tensor<B, 1, Int> = Tensor::from_primitive(idx);
    let live = idx
        .clone()
        .lower_elem(rows)
        .bool_and(idx.clone().greater_equal_elem(0));
    let safe = idx.mask_fill(live.clone().bool_not(), 0);
    (w.select(0, safe), live)
}

/// Block ids to row ids: block `b` → rows `b·block .. (b+1)·block`; an empty slot stays
/// empty (`rows`) for each of its rows.
fn expand_blocks<B: Backend>(idx: IntTensor<B>, block: usize, rows: usize) -> IntTensor<B> {
    if block <= 1 {
        return idx;
    }
    let idx: Tensor<B, 1, Int> = Tensor::from_primitive(idx);
    let device = idx.device();
    let n = idx.dims()[0];
    let live = idx
        .clone()
        .lower_elem((rows / block) as i64)
        .bool_and(idx.clone().greater_equal_elem(0));
    let base = idx.mul_scalar(block as i64).unsqueeze_dim::<2>(1);
    let offsets = Tensor::<B, 1, Int>::arange(0..block as i64, &device).unsqueeze_dim::<2>(0);
    let dead = live.bool_not().unsqueeze_dim::<2>(1).expand([n, block]);
    (base + offsets).mask_fill(dead, rows as i64).reshape([n * block]).into_primitive()
}

pub fn rows_gemv<B: Backend>(
    w: FloatTensor<B>,
    idx: Option<IntTensor<B>>,
    block: usize,
    x: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    relu: bool,
) -> FloatTensor<B> {
    let w: Tensor<B, 2> = float(w);
    // The output has the weights' dtype (`x` may be another float type).
    let dtype = w.dtype();
    let idx = idx.map(|i| expand_blocks::<B>(i, block, w.dims()[0]));
    let x: Tensor<B, 2> = float(x);
    let bias: Option<Tensor<B, 1>> = bias.map(float);
    let (rows, bias, live) = match idx {
        Some(idx) => {
            let (rows, live) = gather(w, idx.clone());
            let bias = bias.map(|b| {
                let (b, _) = gather(b.unsqueeze_dim::<2>(1), idx);
                b.squeeze_dim::<1>(1)
            });
            (rows, bias, Some(live))
        }
        None => (w, bias, None),
    };
    let batch = x.dims()[0];
    let mut y = x.cast(DType::F32).matmul(rows.cast(DType::F32).transpose());
    if let Some(b) = bias {
        y = y + b.cast(DType::F32).unsqueeze_dim(0);
    }
    if relu {
        y = burn::tensor::activation::relu(y);
    }
    if let Some(live) = live {
        let k = live.dims()[0];
        let dead = live.bool_not().unsqueeze_dim::<2>(0).expand([batch, k]);
        y = y.mask_fill(dead, 0.0);
    }
    y.cast(dtype).into_primitive().tensor()
}

pub fn block_cols_gemv<B: Backend>(
    w: FloatTensor<B>,
    idx: Option<IntTensor<B>>,
    block: usize,
    x: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    residual: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let w: Tensor<B, 2> = float(w);
    // The output in the residual's dtype (a residual stream kept in f32), else the weights'.
    let residual: Option<Tensor<B, 2>> = residual.map(float);
    let dtype = residual.as_ref().map_or(w.dtype(), |r| r.dtype());
    let mut x: Tensor<B, 2> = float::<B, 2>(x).cast(DType::F32);
    // The selected columns as rows of Wᵀ; an empty slot's columns read as column 0, and
    // its inputs count as 0.
    let w_t = w.transpose();
    let cols = match idx {
        Some(idx) => {
            let (cols, live) = gather(w_t.clone(), expand_blocks::<B>(idx, block, w_t.dims()[0]));
            let dead = live.bool_not().unsqueeze_dim::<2>(0).expand(x.dims());
            x = x.mask_fill(dead, 0.0);
            cols
        }
        None => w_t,
    };
    let mut y = x.matmul(cols.cast(DType::F32));
    if let Some(b) = bias {
        y = y + float::<B, 1>(b).cast(DType::F32).unsqueeze_dim(0);
    }
    if let Some(r) = residual {
        y = y + r.cast(DType::F32);
    }
    y.cast(dtype).into_primitive().tensor()
}

pub fn rows_transposed_gemv<B: Backend>(
    w_t: FloatTensor<B>,
    idx: Option<IntTensor<B>>,
    block: usize,
    h: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    residual: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let w_t: Tensor<B, 2> = float(w_t);
    let idx = idx.map(|i| expand_blocks::<B>(i, block, w_t.dims()[0]));
    let mut h: Tensor<B, 2> = float(h);
    let dtype = h.dtype();
    let rows = match idx {
        Some(idx) => {
            let (rows, live) = gather(w_t, idx);
            let [batch, k] = h.dims();
            let dead = live.bool_not().unsqueeze_dim::<2>(0).expand([batch, k]);
            h = h.mask_fill(dead, 0.0);
            rows
        }
        None => w_t,
    };
    let mut y = h.cast(DType::F32).matmul(rows.cast(DType::F32));
    if let Some(b) = bias {
        let b: Tensor<B, 1> = float(b);
        y = y + b.cast(DType::F32).unsqueeze_dim(0);
    }
    if let Some(r) = residual {
        let r: Tensor<B, 2> = float(r);
        y = y + r.cast(DType::F32);
    }
    y.cast(dtype).into_primitive().tensor()
}

/// Reads the logits back to the host: this reference is for correctness, not speed.
pub fn select_above_threshold<B: Backend>(
    logits: FloatTensor<B>,
    threshold: f32,
    capacity: usize,
) -> (IntTensor<B>, IntTensor<B>) {
    let logits: Tensor<B, 2> = float(logits);
    let device = logits.device();
    let [batch, n] = logits.dims();
    let values: Vec<f32> = logits
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 logits");
    let (indices, count) = crate::host::select_above_threshold(&values, batch, n, threshold, capacity);
    let indices = Tensor::<B, 1, Int>::from_data(TensorData::new(indices, [capacity]), &device);
    let count = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![count as i64], [1]), &device);
    (indices.into_primitive(), count.into_primitive())
}

pub fn selected_heads_attention<B: Backend>(
    q: FloatTensor<B>,
    heads: IntTensor<B>,
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    len: usize,
    scale: f32,
) -> FloatTensor<B> {
    let q: Tensor<B, 2> = float(q);
    let k: Tensor<B, 4> = float(k_cache);
    let v: Tensor<B, 4> = float(v_cache);
    let dtype = q.dtype();
    let [batch, n_heads, _, hd] = k.dims();
    let heads: Tensor<B, 1, Int> = Tensor::from_primitive(heads);
    let slots = heads.dims()[0];
    let live = heads
        .clone()
        .lower_elem(n_heads as i64)
        .bool_and(heads.clone().greater_equal_elem(0));
    let safe = heads.mask_fill(live.clone().bool_not(), 0);
    let keys = k.select(1, safe.clone()).slice([0..batch, 0..slots, 0..len, 0..hd]).cast(DType::F32);
    let values = v.select(1, safe).slice([0..batch, 0..slots, 0..len, 0..hd]).cast(DType::F32);
    let q = q.cast(DType::F32).reshape([batch, slots, 1, hd]);
    let p = burn::tensor::activation::softmax(q.matmul(keys.swap_dims(2, 3)).mul_scalar(scale), 3);
    let dead = live.bool_not().reshape([1, slots, 1, 1]).expand([batch, slots, 1, hd]);
    p.matmul(values)
        .mask_fill(dead, 0.0)
        .reshape([batch, slots * hd])
        .cast(dtype)
        .into_primitive()
        .tensor()
}

pub fn layer_norm<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    beta: FloatTensor<B>,
    eps: f32,
    dtype: DType,
) -> FloatTensor<B> {
    let x: Tensor<B, 2> = float(x);
    let x = x.cast(DType::F32);
    let (var, mean) = x.clone().var_mean_bias(1);
    let gamma: Tensor<B, 1> = float(gamma);
    let beta: Tensor<B, 1> = float(beta);
    let y = x.sub(mean).div(var.add_scalar(eps).sqrt());
    (y * gamma.cast(DType::F32).unsqueeze_dim(0) + beta.cast(DType::F32).unsqueeze_dim(0))
        .cast(dtype)
        .into_primitive()
        .tensor()
}

pub fn kv_append<B: Backend>(
    kv: FloatTensor<B>,
    x: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    pos: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let k_cache: Tensor<B, 4> = float(k_cache);
    let v_cache: Tensor<B, 4> = float(v_cache);
    let [batch, heads, _, hd] = k_cache.dims();
    let y: Tensor<B, 2> = float(rows_gemv::<B>(kv, None, 1, x, bias, false));
    let half = heads * hd;
    let split = |t: Tensor<B, 2>| t.reshape([batch, heads, 1, hd]);
    let k = split(y.clone().slice([0..batch, 0..half]));
    let v = split(y.slice([0..batch, half..2 * half]));
    let ranges = [0..batch, 0..heads, pos..pos + 1, 0..hd];
    (
        k_cache.slice_assign(ranges.clone(), k).into_primitive().tensor(),
        v_cache.slice_assign(ranges, v).into_primitive().tensor(),
    )
}

/// [`crate::SparseKernels::qkv_append_lazy`] in tensor ops (batch 1): the same heads and
/// positions written, from the same ring of layer inputs, reading the selection and the
/// state back to the host.
#[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs and the lazy state
#[allow(clippy::type_complexity)] // the queries, the caches, the next lazy state
pub fn qkv_append_lazy<B: crate::SparseKernels>(
    q_w: FloatTensor<B>,
    heads: IntTensor<B>,
    block: usize,
    q_bias: Option<FloatTensor<B>>,
    kv: FloatTensor<B>,
    x: FloatTensor<B>,
    kv_bias: Option<FloatTensor<B>>,
    k_cache: FloatTensor<B>,
    v_cache: FloatTensor<B>,
    pos: usize,
    pending: IntTensor<B>,
    ring: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>, FloatTensor<B>) {
    let q = B::rows_gemv(q_w, Some(heads.clone()), block, x.clone(), q_bias, false);
    let heads: Tensor<B, 1, Int> = Tensor::from_primitive(heads);
    let pending: Tensor<B, 1, Int> = Tensor::from_primitive(pending);
    let device = pending.device();
    let int_dtype = pending.dtype();
    let selected: Vec<i64> = heads.into_data().convert::<i64>().to_vec().expect("int data");
    let pending_now: Vec<i64> = pending.into_data().convert::<i64>().to_vec().expect("int data");
    let x: Tensor<B, 2> = float(x);
    let ring: Tensor<B, 2> = float(ring);
    let [window, d] = ring.dims();
    let ring = ring.slice_assign([pos % window..pos % window + 1, 0..d], x);
    let kv: Tensor<B, 2> = float(kv);
    let kv_bias: Option<Tensor<B, 1>> = kv_bias.map(float);
    let mut k_cache: Tensor<B, 4> = float(k_cache);
    let mut v_cache: Tensor<B, 4> = float(v_cache);
    let [_, n_heads, _, hd] = k_cache.dims();
    let half = n_heads * hd;
    let mut next = pending_now.clone();
    for (h, &first) in pending_now.iter().enumerate() {
        let first = first as usize;
        let chosen = selected.iter().any(|&s| s == h as i64);
        if !(chosen || first + window <= pos + 1) || first > pos {
            continue;
        }
        let n = pos + 1 - first;
        let slots: Vec<i64> = (first..=pos).map(|p| (p % window) as i64).collect();
        let inputs = ring.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [n]), &device)).cast(DType::F32);
        for (cache, offset) in [(&mut k_cache, 0), (&mut v_cache, half)] {
            let rows = offset + h * hd..offset + (h + 1) * hd;
            let w = kv.clone().slice([rows.clone(), 0..d]).cast(DType::F32);
            let mut y = inputs.clone().matmul(w.transpose());
            if let Some(b) = &kv_bias {
                y = y + b.clone().slice([rows]).cast(DType::F32).unsqueeze_dim(0);
            }
            let dtype = cache.dtype();
            *cache = cache.clone().slice_assign([0..1, h..h + 1, first..pos + 1, 0..hd], y.cast(dtype).reshape([1, 1, n, hd]));
        }
        next[h] = (pos + 1) as i64;
    }
    let next = Tensor::<B, 1, Int>::from_data(TensorData::new(next, [n_heads]), &device).cast(int_dtype);
    (
        q,
        k_cache.into_primitive().tensor(),
        v_cache.into_primitive().tensor(),
        next.into_primitive(),
        ring.into_primitive().tensor(),
    )
}

pub fn gated_rows_gemv<B: Backend>(
    w: FloatTensor<B>,
    x: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    relu: bool,
    gate: FloatTensor<B>,
    threshold: f32,
) -> FloatTensor<B> {
    let y: Tensor<B, 2> = float(rows_gemv::<B>(w, None, 1, x, bias, relu));
    let gate: Tensor<B, 1> = float(gate);
    let off = gate.lower_equal_elem(threshold).unsqueeze_dim::<2>(0);
    y.mask_fill(off, 0.0).into_primitive().tensor()
}

/// The predictor's logits `h · upᵀ` as `[rows]` (f32).
fn predictor_logits<B: Backend>(up: FloatTensor<B>, h: FloatTensor<B>) -> Tensor<B, 1> {
    let up: Tensor<B, 2> = float(up);
    let h: Tensor<B, 2> = float(h);
    let rows = up.dims()[0];
    h.cast(DType::F32).matmul(up.cast(DType::F32).transpose()).reshape([rows])
}

pub fn predicted_rows_gemv<B: Backend>(
    w: FloatTensor<B>,
    x: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    relu: bool,
    up: FloatTensor<B>,
    h: FloatTensor<B>,
    threshold: f32,
) -> FloatTensor<B> {
    let gate = predictor_logits::<B>(up, h);
    gated_rows_gemv::<B>(w, x, bias, relu, gate.into_primitive().tensor(), threshold)
}

pub fn predict_select<B: Backend>(
    up: FloatTensor<B>,
    h: FloatTensor<B>,
    threshold: f32,
    capacity: usize,
) -> (IntTensor<B>, IntTensor<B>) {
    let logits = predictor_logits::<B>(up, h).unsqueeze_dim::<2>(0);
    select_above_threshold::<B>(logits.into_primitive().tensor(), threshold, capacity)
}
