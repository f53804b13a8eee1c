//! The CubeCL kernels themselves. Launch code (shapes, vector widths, cube counts) lives in
//! `launch.rs`; these functions only say what one cube computes.
//!
//! Conventions shared by all kernels:
//! - weights are row-major with contiguous rows (`[rows, cols]`); a kernel reads each
//!   selected row as `Vector<F, N>` loads (16 bytes for f16×8 or f32×4 on CUDA);
//! - accumulation is always f32, whatever the storage type `F`;
//! - an index `>= rows` (or a negative one) is an empty slot: it reads nothing and
//!   contributes nothing (gathered fc1 writes 0 there). Selection pads its index list this
//!   way, so the launch grid never depends on a count that lives on the device;
//! - buffers are `Array`s, and their shapes and strides come as scalar arguments (strides
//!   in the units the kernel indexes: vectors for vector arrays). A `Tensor` argument
//!   carries its shape and strides as dynamic metadata, which CubeCL's CUDA runtime
//!   uploads with a staging buffer and a host-to-device copy at every launch; scalars
//!   travel as kernel parameters. At batch 1 a decode step is hundreds of launches, each
//!   bound by host cost.

use cubecl::prelude::*;

/// A row GEMV's sizes: weights `[rows, width]` (in vectors), `x [batch, ..]`, outputs
/// `[batch, outputs]`. Strides in the units indexed: vectors for `w` and `x`, elements for
/// `out`.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct GemvShape {
    pub rows: usize,
    pub width: usize,
    pub w_stride: usize,
    pub batch: usize,
    pub x_stride: usize,
    pub outputs: usize,
    pub out_stride: usize,
}

/// A transposed GEMV's sizes: weights `[rows, width]` (in vectors), `h [batch, k]`
/// (elements). The partial sums are `[splits, batch, width]`, contiguous.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct TransposedShape {
    pub rows: usize,
    pub width: usize,
    pub w_stride: usize,
    pub k: usize,
    pub batch: usize,
    pub h_stride: usize,
}

/// Selected-head attention's sizes, strides in vectors: queries and outputs `[batch,
/// slots·hd]`, caches `[batch, heads, capacity, hd]` (keys and values laid out alike).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct AttentionShape {
    pub slots: usize,
    pub heads: usize,
    pub q_stride: usize,
    pub out_stride: usize,
    pub cache_batch_stride: usize,
    pub cache_head_stride: usize,
    pub cache_pos_stride: usize,
}

/// The LayerNorm a one-launch accumulating kernel applies to its finished row in its last
/// cube ([`last_cube_layer_norm`]): the row's width, `1 / width` and epsilon.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct NormShape {
    pub width: usize,
    pub inv_width: f32,
    pub eps: f32,
}

/// `kv_append`'s sizes: `kv [rows, width]` (vectors), `x [batch, ..]` (vectors), caches
/// `[batch, heads, capacity, head_dim]` with strides in elements (the last one 1).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct KvShape {
    pub rows: usize,
    pub width: usize,
    pub w_stride: usize,
    pub batch: usize,
    pub x_stride: usize,
    pub head_dim: usize,
    pub cache_batch_stride: usize,
    pub cache_head_stride: usize,
    pub cache_pos_stride: usize,
}

/// The query rows [`kv_append_kernel`] may compute in the same launch: `q_w [rows, width]`
/// (vectors), `outputs` of them (whole heads of `block` rows when gathered), into `q_out
/// [batch, outputs]` (row stride `out_stride`, elements), by the first `cubes` cubes.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct QueryShape {
    pub rows: usize,
    pub w_stride: usize,
    pub outputs: usize,
    pub out_stride: usize,
    pub block: usize,
    pub cubes: usize,
}

/// The lazy K/V write of [`kv_append_kernel`] (batch 1): the step's selected heads `sel`
/// (`sel_len` entries, empty slots `>= heads`), each head's first unwritten position
/// `pending`, and the ring of the last `window` layer inputs (`[window, width]` vectors).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct LazyShape {
    pub sel_len: usize,
    pub window: usize,
}

/// A low-rank predictor's second factor `up [rows, rank]` (f32, or the model's dtype: it
/// is most of the bytes a predicted fc1 reads), row stride in elements.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct PredictorShape {
    pub rank: usize,
    pub up_stride: usize,
}

/// Lanes of one row group reduce their partial sums: with plane (warp) shuffles where the
/// group is exactly one plane, otherwise through shared memory.
#[cube]
fn group_sum(
    value: f32,
    scratch: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] use_plane: bool,
) -> f32 {
    if use_plane {
        plane_sum(value)
    } else {
        let lane = UNIT_POS_X as usize;
        let base = UNIT_POS_Y as usize * group;
        scratch[base + lane] = value;
        sync_cube();
        let mut total = 0.0f32;
        if lane == 0 {
            for i in 0..group {
                total += scratch[base + i];
            }
        }
        sync_cube();
        total
    }
}

/// [`group_sum`] returned to every lane of the group (the shared-memory path gives it to
/// lane 0 only).
#[cube]
fn group_sum_all(
    value: f32,
    scratch: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] use_plane: bool,
) -> f32 {
    if use_plane {
        plane_sum(value)
    } else {
        let total = group_sum(value, scratch, group, use_plane);
        let base = UNIT_POS_Y as usize * group;
        if UNIT_POS_X == 0 {
            scratch[base] = total;
        }
        sync_cube();
        let all = scratch[base];
        sync_cube();
        all
    }
}

/// One lane's share of `W[w_base ..] · x[x_base ..]` over `width` vectors (every `group`-th
/// vector from `lane`), in f32. `x` may have another float type than `W` (an f16
/// residual into an f32 predictor). [`lane_dot_list`] with `x` in global memory.
#[cube]
fn lane_dot<F: Float, X: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    w_base: usize,
    x: &Array<Vector<X, N>>,
    x_base: usize,
    lane: usize,
    group: usize,
    width: usize,
) -> f32 {
    lane_dot_list::<F, X, N, Array<Vector<X, N>>>(w, w_base, x, x_base, lane, group, width)
}

/// [`lane_dot`] for `x` in any list: global memory, or shared memory (a cube's
/// [`cube_layer_norm_shared`]).
#[cube]
fn lane_dot_list<F: Float, X: Float, N: Size, L: List<Vector<X, N>>>(
    w: &Array<Vector<F, N>>,
    w_base: usize,
    x: &L,
    x_base: usize,
    lane: usize,
    group: usize,
    width: usize,
) -> f32 {
    let mut acc = Vector::<f32, N>::new(0.0f32);
    let step = group;
    let mut t = lane;
    while t + 7 * step < width {
        let w0 = w[w_base + t];
        let w1 = w[w_base + t + step];
        let w2 = w[w_base + t + 2 * step];
        let w3 = w[w_base + t + 3 * step];
        let w4 = w[w_base + t + 4 * step];
        let w5 = w[w_base + t + 5 * step];
        let w6 = w[w_base + t + 6 * step];
        let w7 = w[w_base + t + 7 * step];
        acc += Vector::<f32, N>::cast_from(w0) * Vector::<f32, N>::cast_from(x.read(x_base + t));
        acc += Vector::<f32, N>::cast_from(w1) * Vector::<f32, N>::cast_from(x.read(x_base + t + step));
        acc += Vector::<f32, N>::cast_from(w2) * Vector::<f32, N>::cast_from(x.read(x_base + t + 2 * step));
        acc += Vector::<f32, N>::cast_from(w3) * Vector::<f32, N>::cast_from(x.read(x_base + t + 3 * step));
        acc += Vector::<f32, N>::cast_from(w4) * Vector::<f32, N>::cast_from(x.read(x_base + t + 4 * step));
        acc += Vector::<f32, N>::cast_from(w5) * Vector::<f32, N>::cast_from(x.read(x_base + t + 5 * step));
        acc += Vector::<f32, N>::cast_from(w6) * Vector::<f32, N>::cast_from(x.read(x_base + t + 6 * step));
        acc += Vector::<f32, N>::cast_from(w7) * Vector::<f32, N>::cast_from(x.read(x_base + t + 7 * step));
        t += 8 * step;
    }
    // Four more in flight before the last ones one by one: a lane with few vectors (a
    // row spread over a whole cube) would otherwise wait on each load in turn.
    while t + 3 * step < width {
        let w0 = w[w_base + t];
        let w1 = w[w_base + t + step];
        let w2 = w[w_base + t + 2 * step];
        let w3 = w[w_base + t + 3 * step];
        acc += Vector::<f32, N>::cast_from(w0) * Vector::<f32, N>::cast_from(x.read(x_base + t));
        acc += Vector::<f32, N>::cast_from(w1) * Vector::<f32, N>::cast_from(x.read(x_base + t + step));
        acc += Vector::<f32, N>::cast_from(w2) * Vector::<f32, N>::cast_from(x.read(x_base + t + 2 * step));
        acc += Vector::<f32, N>::cast_from(w3) * Vector::<f32, N>::cast_from(x.read(x_base + t + 3 * step));
        t += 4 * step;
    }
    while t < width {
        acc += Vector::<f32, N>::cast_from(w[w_base + t]) * Vector::<f32, N>::cast_from(x.read(x_base + t));
        t += step;
    }
    let mut partial = 0.0f32;
    #[unroll]
    for v in 0..N::value() {
        partial += acc[v];
    }
    partial
}

/// The LayerNorm of an f32 residual that no launch wrote, by one cube for its own rows
/// (deferred to the launch that reads it): the mean and variance of `x` (`width` vectors,
/// every unit of the cube, one pass and two cube reductions), then `gamma ⊙ (x − mean)`
/// in the weights' dtype into `xs` (the cube synced after). Returns `1 / std`: a row's
/// `W[row] · LayerNorm(x) + bias[row]` is then `(W[row] · xs) / std + c[row]` with `c =
/// W · beta + bias` ([`normed_row_total`]). `xs` rounds as a written LayerNorm would, before
/// the division by `std`.
#[cube]
#[allow(clippy::too_many_arguments)] // the residual, the LayerNorm and the scratch
fn cube_layer_norm_shared<F: Float, N: Size>(
    x: &Array<Vector<f32, N>>,
    gamma: &Array<Vector<f32, N>>,
    width: usize,
    norm: NormShape,
    xs: &mut SharedMemory<Vector<F, N>>,
    red: &mut SharedMemory<f32>,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
) -> f32 {
    let tid = UNIT_POS as usize;
    let mut s1 = 0.0f32;
    let mut s2 = 0.0f32;
    let mut t = tid;
    while t < width {
        let v = x[t];
        #[unroll]
        for k in 0..N::value() {
            s1 += v[k];
            s2 += v[k] * v[k];
        }
        t += threads;
    }
    let mean = cube_reduce(red, s1, tid, threads, false, plane) * norm.inv_width;
    let squares = cube_reduce(red, s2, tid, threads, false, plane) * norm.inv_width;
    let var = f32::max(squares - mean * mean, 0.0f32);
    let mut t = tid;
    while t < width {
        xs[t] = Vector::<F, N>::cast_from((x[t] - Vector::<f32, N>::new(mean)) * gamma[t]);
        t += threads;
    }
    sync_cube();
    1.0f32 / f32::sqrt(var + norm.eps)
}

/// Row `row` of `W · LayerNorm(x) + bias` for a lane group, the LayerNorm's centred and
/// scaled input in `xs` ([`cube_layer_norm_shared`]), `inv_std` its `1 / std` and `c`
/// the rows' `W · beta + bias` (f32). On lane 0 (every lane with plane reductions); 0
/// where `live` is false.
#[cube]
#[allow(clippy::too_many_arguments)] // the row, the normalized input and the layout
fn normed_row_total<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    w_base: usize,
    xs: &SharedMemory<Vector<F, N>>,
    inv_std: f32,
    c: &Array<f32>,
    row: usize,
    live: bool,
    lane: usize,
    width: usize,
    scratch: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] use_plane: bool,
) -> f32 {
    let mut p = 0.0f32;
    if live {
        p = lane_dot_list::<F, F, N, SharedMemory<Vector<F, N>>>(w, w_base, xs, 0, lane, group, width);
    }
    let dot = group_sum(p, scratch, group, use_plane);
    let mut y = 0.0f32;
    if live {
        y = dot * inv_std + c[row];
    }
    y
}

/// `out[b, j] = act(W[row_j, :] · x[b, :] + bias[row_j])` with `row_j = idx[j]` when
/// `gathered`, else `j`. One group of `CUBE_DIM_X` lanes per output row, `CUBE_DIM_Y` rows
/// per cube. Each lane keeps eight loads in flight per iteration: at batch 1 a 10%-dense
/// fc1 has only ~1.6k rows, too few warps to hide HBM latency with fewer (measured on
/// the H100: four in flight reached 73% of a contiguous slice's bandwidth). `x` has its
/// own float type `X` (the output has `W`'s), so an f32 predictor reads an f16 residual
/// without a cast launch.
#[cube(launch_unchecked)]
pub(crate) fn rows_gemv_kernel<F: Float, X: Float, N: Size, I: Int>(
    w: &Array<Vector<F, N>>,
    idx: &Array<I>,
    x: &Array<Vector<X, N>>,
    bias: &Array<F>,
    out: &mut Array<F>,
    shape: GemvShape,
    block: usize,
    #[comptime] gathered: bool,
    #[comptime] has_bias: bool,
    #[comptime] relu: bool,
    #[comptime] group: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] use_plane: bool,
    #[define(F, X, I)] _dtypes: [StorageType; 3],
) {
    let mut scratch = SharedMemory::<f32>::new(group * rows_per_cube);
    let lane = UNIT_POS_X as usize;
    let j = CUBE_POS_X as usize * rows_per_cube + UNIT_POS_Y as usize;
    let k = shape.outputs;
    let rows = shape.rows;

    let in_range = j < k;
    let mut row = rows;
    if in_range {
        row = row_of(idx, j, block, rows, gathered);
    }
    let live = row < rows;
    let w_base = row * shape.w_stride;

    for b in 0..shape.batch {
        let x_base = b * shape.x_stride;
        let mut partial = 0.0f32;
        if live {
            partial = lane_dot(w, w_base, x, x_base, lane, group, shape.width);
        }
        let total = group_sum(partial, &mut scratch, group, use_plane);
        if lane == 0 && in_range {
            out[b * shape.out_stride + j] = F::cast_from(finish_row(total, bias, row, live, has_bias, relu));
        }
    }
}

/// `w[base + col]`, or zeros for an empty slot's column (`col >= limit`). The column
/// comes from [`row_of`] over column blocks: a head's `block` column vectors. Stored
/// type, not f32: eight of these are in flight per lane, and eight f32 vectors of eight
/// held `block_cols_gemv_kernel` at 91 registers, two cubes per SM (Nsight Compute).
#[cube]
fn load_col<F: Float, N: Size>(w: &Array<Vector<F, N>>, base: usize, col: usize, limit: usize) -> Vector<F, N> {
    let mut value = Vector::<F, N>::new(F::new(0.0));
    if col < limit {
        value = w[base + col];
    }
    value
}

/// `out[b, j] = W[j, cols] · x[b, :] + bias[j] + residual[b, j]` (the residual and the
/// output in `O`: the weights' dtype, or f32 for a residual stream kept in f32) where `cols` are the
/// column blocks `idx` picks (all of them when not `gathered`) and `x [batch, width]` is
/// their concatenation: `out_proj` over the selected heads, whose outputs the attention
/// kernel writes side by side. `W` is row-major `[rows, limit]` (vectors), so each output
/// reads a head's weights as one contiguous run of `block` vectors (256 bytes at head dim
/// 128 in f16). One pass and no partial sums: the transposed GEMV it replaces needed a
/// second launch to add its splits (Nsight Compute, 6.7B shape, half the heads: 13.3 µs
/// plus 4.4 µs). The same lane layout as `rows_gemv_kernel`, eight loads in flight.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // the GEMV's inputs and the fused residual
pub(crate) fn block_cols_gemv_kernel<F: Float, O: Float, N: Size, I: Int>(
    w: &Array<Vector<F, N>>,
    idx: &Array<I>,
    x: &Array<Vector<F, N>>,
    bias: &Array<F>,
    residual: &Array<O>,
    out: &mut Array<O>,
    shape: GemvShape,
    block: usize,
    limit: usize,
    #[comptime] gathered: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] group: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] use_plane: bool,
    #[define(F, O, I)] _dtypes: [StorageType; 3],
) {
    let mut scratch = SharedMemory::<f32>::new(group * rows_per_cube);
    let lane = UNIT_POS_X as usize;
    let j = CUBE_POS_X as usize * rows_per_cube + UNIT_POS_Y as usize;
    let live = j < shape.rows;
    let w_base = j * shape.w_stride;
    let width = shape.width;
    let step = group;
    for b in 0..shape.batch {
        let x_base = b * shape.x_stride;
        let mut acc = Vector::<f32, N>::new(0.0f32);
        if live {
            let mut t = lane;
            while t + 7 * step < width {
                let c0 = row_of(idx, t, block, limit, gathered);
                let c1 = row_of(idx, t + step, block, limit, gathered);
                let c2 = row_of(idx, t + 2 * step, block, limit, gathered);
                let c3 = row_of(idx, t + 3 * step, block, limit, gathered);
                let c4 = row_of(idx, t + 4 * step, block, limit, gathered);
                let c5 = row_of(idx, t + 5 * step, block, limit, gathered);
                let c6 = row_of(idx, t + 6 * step, block, limit, gathered);
                let c7 = row_of(idx, t + 7 * step, block, limit, gathered);
                let w0 = load_col(w, w_base, c0, limit);
                let w1 = load_col(w, w_base, c1, limit);
                let w2 = load_col(w, w_base, c2, limit);
                let w3 = load_col(w, w_base, c3, limit);
                let w4 = load_col(w, w_base, c4, limit);
                let w5 = load_col(w, w_base, c5, limit);
                let w6 = load_col(w, w_base, c6, limit);
                let w7 = load_col(w, w_base, c7, limit);
                acc += Vector::<f32, N>::cast_from(w0) * Vector::<f32, N>::cast_from(x[x_base + t]);
                acc += Vector::<f32, N>::cast_from(w1) * Vector::<f32, N>::cast_from(x[x_base + t + step]);
                acc += Vector::<f32, N>::cast_from(w2) * Vector::<f32, N>::cast_from(x[x_base + t + 2 * step]);
                acc += Vector::<f32, N>::cast_from(w3) * Vector::<f32, N>::cast_from(x[x_base + t + 3 * step]);
                acc += Vector::<f32, N>::cast_from(w4) * Vector::<f32, N>::cast_from(x[x_base + t + 4 * step]);
                acc += Vector::<f32, N>::cast_from(w5) * Vector::<f32, N>::cast_from(x[x_base + t + 5 * step]);
                acc += Vector::<f32, N>::cast_from(w6) * Vector::<f32, N>::cast_from(x[x_base + t + 6 * step]);
                acc += Vector::<f32, N>::cast_from(w7) * Vector::<f32, N>::cast_from(x[x_base + t + 7 * step]);
                t += 8 * step;
            }
            while t < width {
                let c = row_of(idx, t, block, limit, gathered);
                acc += Vector::<f32, N>::cast_from(load_col(w, w_base, c, limit)) * Vector::<f32, N>::cast_from(x[x_base + t]);
                t += step;
            }
        }
        let mut partial = 0.0f32;
        #[unroll]
        for v in 0..N::value() {
            partial += acc[v];
        }
        let total = group_sum(partial, &mut scratch, group, use_plane);
        if lane == 0 && live {
            let mut y = total;
            if has_bias {
                y += f32::cast_from(bias[j]);
            }
            if has_residual {
                y += f32::cast_from(residual[b * shape.out_stride + j]);
            }
            out[b * shape.out_stride + j] = O::cast_from(y);
        }
    }
}

/// A GEMV row's output: its dot product plus bias, through ReLU if asked; 0 for a row that
/// was not read (an empty slot, or gated off).
#[cube]
fn finish_row<F: Float>(total: f32, bias: &Array<F>, row: usize, live: bool, #[comptime] has_bias: bool, #[comptime] relu: bool) -> f32 {
    let mut y = 0.0f32;
    if live {
        y = total;
        if has_bias {
            y += f32::cast_from(bias[row]);
        }
        if relu {
            y = f32::max(y, 0.0f32);
        }
    }
    y
}

/// The weight row of output `j`: `j` itself, or with an index list, row `j % block` of
/// block `idx[j / block]` (`block` 1: plain rows; `block` = head dim: whole heads). An
/// empty slot (block id out of range, negative ones included: they wrap to huge values)
/// gives `rows`, which no caller reads.
#[cube]
fn row_of<I: Int>(idx: &Array<I>, j: usize, block: usize, rows: usize, #[comptime] gathered: bool) -> usize {
    let mut row = j;
    if gathered {
        let id = usize::cast_from(idx[j / block]);
        if id < rows / block {
            row = id * block + j % block;
        } else {
            row = rows;
        }
    }
    row
}

/// Row `row` of the transposed weights at column vector `offset` (f32), or zeros when the
/// slot is empty or its `h` is exactly 0 — then nothing is read. The loads of several
/// rows are issued before any of them is used, so they are in flight together.
#[cube]
fn load_row<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    row: usize,
    hv: f32,
    offset: usize,
    rows: usize,
    row_stride: usize,
) -> Vector<f32, N> {
    let mut value = Vector::<f32, N>::new(0.0f32);
    if row < rows && hv != 0.0f32 {
        value = Vector::<f32, N>::cast_from(w[row * row_stride + offset]);
    }
    value
}

/// The transposed GEMV's first-pass epilogue: the cube's `CUBE_DIM_Y` lanes along K add
/// their sums `acc` for column vector `UNIT_POS_X` in lane order (through shared memory).
/// Returns the split's sum on lane 0 along K (zeros on the others); the cube is synced
/// after, so `scratch` can take the next batch row.
#[cube]
fn lanes_total<N: Size>(
    scratch: &mut SharedMemory<Vector<f32, N>>,
    acc: Vector<f32, N>,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
) -> Vector<f32, N> {
    let cx = UNIT_POS_X as usize;
    let ky = UNIT_POS_Y as usize;
    scratch[ky * cols_per_cube + cx] = acc;
    sync_cube();
    let mut total = Vector::<f32, N>::new(0.0f32);
    if ky == 0 {
        total = scratch[cx];
        for i in 1..lanes_k {
            total += scratch[i * cols_per_cube + cx];
        }
    }
    sync_cube();
    total
}

/// One lane's share of a split for column vector `c`: `Σ h[h_base + j] · Wt[row_j, c]`
/// over `j = start + UNIT_POS_Y, … + lanes_k, … < end`, in f32. Rows whose `h` is exactly
/// 0 are not read: after ReLU most of a dense fc2's rows are such rows, and the branch is
/// uniform across a warp. Each lane issues eight rows' loads before it uses any, for the
/// same reason as `rows_gemv_kernel`.
#[cube]
#[allow(clippy::too_many_arguments)] // a split's bounds and the kernel's inputs
fn split_dot<F: Float, N: Size, I: Int>(
    w: &Array<Vector<F, N>>,
    idx: &Array<I>,
    h: &Array<F>,
    h_base: usize,
    c: usize,
    start: usize,
    end: usize,
    shape: TransposedShape,
    block: usize,
    #[comptime] gathered: bool,
    #[comptime] lanes_k: usize,
) -> Vector<f32, N> {
    let rows = shape.rows;
    let row_stride = shape.w_stride;
    let mut acc = Vector::<f32, N>::new(0.0f32);
    let mut j = start + UNIT_POS_Y as usize;
    // Eight rows per iteration: their `h` (and index) loads all in flight, then
    // their weight loads. A lane's share of a split is about eight rows, so this
    // is one round trip for `h` and one for the weights, where four rows at a
    // time took two of each (Nsight Compute: 19 µs for 10% of fc2's rows).
    while j + 7 * lanes_k < end {
        let r0 = row_of(idx, j, block, rows, gathered);
        let r1 = row_of(idx, j + lanes_k, block, rows, gathered);
        let r2 = row_of(idx, j + 2 * lanes_k, block, rows, gathered);
        let r3 = row_of(idx, j + 3 * lanes_k, block, rows, gathered);
        let r4 = row_of(idx, j + 4 * lanes_k, block, rows, gathered);
        let r5 = row_of(idx, j + 5 * lanes_k, block, rows, gathered);
        let r6 = row_of(idx, j + 6 * lanes_k, block, rows, gathered);
        let r7 = row_of(idx, j + 7 * lanes_k, block, rows, gathered);
        let h0 = f32::cast_from(h[h_base + j]);
        let h1 = f32::cast_from(h[h_base + j + lanes_k]);
        let h2 = f32::cast_from(h[h_base + j + 2 * lanes_k]);
        let h3 = f32::cast_from(h[h_base + j + 3 * lanes_k]);
        let h4 = f32::cast_from(h[h_base + j + 4 * lanes_k]);
        let h5 = f32::cast_from(h[h_base + j + 5 * lanes_k]);
        let h6 = f32::cast_from(h[h_base + j + 6 * lanes_k]);
        let h7 = f32::cast_from(h[h_base + j + 7 * lanes_k]);
        let w0 = load_row(w, r0, h0, c, rows, row_stride);
        let w1 = load_row(w, r1, h1, c, rows, row_stride);
        let w2 = load_row(w, r2, h2, c, rows, row_stride);
        let w3 = load_row(w, r3, h3, c, rows, row_stride);
        let w4 = load_row(w, r4, h4, c, rows, row_stride);
        let w5 = load_row(w, r5, h5, c, rows, row_stride);
        let w6 = load_row(w, r6, h6, c, rows, row_stride);
        let w7 = load_row(w, r7, h7, c, rows, row_stride);
        acc += w0 * Vector::<f32, N>::new(h0);
        acc += w1 * Vector::<f32, N>::new(h1);
        acc += w2 * Vector::<f32, N>::new(h2);
        acc += w3 * Vector::<f32, N>::new(h3);
        acc += w4 * Vector::<f32, N>::new(h4);
        acc += w5 * Vector::<f32, N>::new(h5);
        acc += w6 * Vector::<f32, N>::new(h6);
        acc += w7 * Vector::<f32, N>::new(h7);
        j += 8 * lanes_k;
    }
    while j + 3 * lanes_k < end {
        let r0 = row_of(idx, j, block, rows, gathered);
        let r1 = row_of(idx, j + lanes_k, block, rows, gathered);
        let r2 = row_of(idx, j + 2 * lanes_k, block, rows, gathered);
        let r3 = row_of(idx, j + 3 * lanes_k, block, rows, gathered);
        let h0 = f32::cast_from(h[h_base + j]);
        let h1 = f32::cast_from(h[h_base + j + lanes_k]);
        let h2 = f32::cast_from(h[h_base + j + 2 * lanes_k]);
        let h3 = f32::cast_from(h[h_base + j + 3 * lanes_k]);
        let w0 = load_row(w, r0, h0, c, rows, row_stride);
        let w1 = load_row(w, r1, h1, c, rows, row_stride);
        let w2 = load_row(w, r2, h2, c, rows, row_stride);
        let w3 = load_row(w, r3, h3, c, rows, row_stride);
        acc += w0 * Vector::<f32, N>::new(h0);
        acc += w1 * Vector::<f32, N>::new(h1);
        acc += w2 * Vector::<f32, N>::new(h2);
        acc += w3 * Vector::<f32, N>::new(h3);
        j += 4 * lanes_k;
    }
    while j < end {
        let r = row_of(idx, j, block, rows, gathered);
        let hv = f32::cast_from(h[h_base + j]);
        acc += load_row(w, r, hv, c, rows, row_stride) * Vector::<f32, N>::new(hv);
        j += lanes_k;
    }
    acc
}

/// First pass of `out[b, :] = Σ_j h[b, j] · Wt[row_j, :] + bias`: cube `(c, s)` sums the
/// rows of split `s` for the `CUBE_DIM_X` column vectors of block `c` ([`split_dot`]), its
/// `CUBE_DIM_Y` lanes along K reduce through shared memory, and the split's sum goes to
/// `partial[s, b, :]` (f32).
#[cube(launch_unchecked)]
pub(crate) fn rows_transposed_gemv_partial_kernel<F: Float, N: Size, I: Int>(
    w: &Array<Vector<F, N>>,
    idx: &Array<I>,
    h: &Array<F>,
    partial: &mut Array<Vector<f32, N>>,
    shape: TransposedShape,
    chunk: usize,
    block: usize,
    #[comptime] gathered: bool,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let mut scratch = SharedMemory::<Vector<f32, N>>::new(cols_per_cube * lanes_k);
    let c = CUBE_POS_X as usize * cols_per_cube + UNIT_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let width = shape.width;
    let start = split * chunk;
    let end = usize::min(start + chunk, shape.k);
    let col_live = c < width;

    for b in 0..shape.batch {
        let mut acc = Vector::<f32, N>::new(0.0f32);
        if col_live {
            acc = split_dot(w, idx, h, b * shape.h_stride, c, start, end, shape, block, gathered, lanes_k);
        }
        let total = lanes_total(&mut scratch, acc, cols_per_cube, lanes_k);
        if UNIT_POS_Y == 0 && col_live {
            partial[(split * shape.batch + b) * width + c] = total;
        }
    }
}

/// [`rows_transposed_gemv_partial_kernel`] adding each split's sum into `acc [batch,
/// width·N]` (f32) with atomic adds, and split 0 adding the bias too: no partial sums and
/// no second pass, one launch. The order of the additions into an element depends on
/// scheduling, so results may differ between runs in the last bits of f32 (the deterministic
/// two-pass form stays the default where an output must be reproducible bit for bit).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // the kernel's inputs, as the two-pass form has them
pub(crate) fn rows_transposed_gemv_atomic_kernel<F: Float, N: Size, I: Int>(
    w: &Array<Vector<F, N>>,
    idx: &Array<I>,
    h: &Array<F>,
    bias: &Array<Vector<F, N>>,
    acc_out: &mut Array<Atomic<f32>>,
    shape: TransposedShape,
    chunk: usize,
    block: usize,
    acc_stride: usize,
    #[comptime] gathered: bool,
    #[comptime] has_bias: bool,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let mut scratch = SharedMemory::<Vector<f32, N>>::new(cols_per_cube * lanes_k);
    let c = CUBE_POS_X as usize * cols_per_cube + UNIT_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let start = split * chunk;
    let end = usize::min(start + chunk, shape.k);
    let col_live = c < shape.width;

    for b in 0..shape.batch {
        let mut acc = Vector::<f32, N>::new(0.0f32);
        if col_live {
            acc = split_dot(w, idx, h, b * shape.h_stride, c, start, end, shape, block, gathered, lanes_k);
        }
        let total = lanes_total(&mut scratch, acc, cols_per_cube, lanes_k);
        add_split_total(acc_out, total, bias, b * acc_stride, c, split, col_live, has_bias);
    }
}

/// A cube-wide exclusive count for compaction in unit order: unit `t` of `threads` holds
/// `mine` live items; returns how many the units before it hold (where its first one
/// goes). The counts before it in its group of 32 (shared reads of one address per step, a
/// broadcast), then the groups before its group. `counts [threads]` and `totals [groups of
/// 32]` are scratch; [`total_count`] reads the cube's total from `totals` afterwards.
#[cube]
fn exclusive_count(mine: u32, t: usize, counts: &mut SharedMemory<u32>, totals: &mut SharedMemory<u32>, #[comptime] threads: usize) -> u32 {
    let groups = comptime!(threads.div_ceil(32));
    counts[t] = mine;
    sync_cube();
    let g = t / 32;
    let g_first = g * 32;
    let mut before = 0u32;
    for i in 0..32usize {
        if g_first + i < t {
            before += counts[g_first + i];
        }
    }
    if t == usize::min(g_first + 31, threads - 1) {
        totals[g] = before + mine;
    }
    sync_cube();
    for i in 0..groups {
        if i < g {
            before += totals[i];
        }
    }
    before
}

/// The cube's total after [`exclusive_count`].
#[cube]
fn total_count(totals: &SharedMemory<u32>, #[comptime] threads: usize) -> u32 {
    let mut live = 0u32;
    for i in 0..comptime!(threads.div_ceil(32)) {
        live += totals[i];
    }
    live
}

/// [`rows_transposed_gemv_partial_kernel`] that first compacts its split: cube `(c, s)`
/// owns the `chunk` rows `s·chunk ..` of K (every row: no index list, which the launcher
/// gives to the skipping kernel). Its units scan their `h` (any batch row nonzero),
/// `per_unit` consecutive rows each, and write the live rows in ascending order to
/// shared memory ([`compact_live_rows`]); then its `CUBE_DIM_Y` lanes along K
/// take every `CUBE_DIM_Y`-th live row, loads eight rows at a time ([`live_rows_dot`]).
/// After a ReLU most rows are zero: the skipping kernel spent a dependent `h` load on
/// each of them and left most lanes' weight loads idle (16.5 µs for 10% of fc2 at the
/// 6.7B shape, plus 6 µs to add 256 splits of partial sums); here a lane's loads are all
/// live rows, and long splits leave few partial sums. The order of the sums is fixed by
/// the row order, so the result does not depend on scheduling.
#[cube(launch_unchecked)]
pub(crate) fn rows_transposed_gemv_compact_kernel<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    h: &Array<F>,
    partial: &mut Array<Vector<f32, N>>,
    shape: TransposedShape,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
    #[comptime] per_unit: usize,
    #[define(F)] _dtype: StorageType,
) {
    let threads = comptime!(cols_per_cube * lanes_k);
    let chunk = comptime!(cols_per_cube * lanes_k * per_unit);
    let mut scratch = SharedMemory::<Vector<f32, N>>::new(threads);
    let mut live_rows = SharedMemory::<u32>::new(chunk);
    let c = CUBE_POS_X as usize * cols_per_cube + UNIT_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let width = shape.width;
    let col_live = c < width;
    let n = compact_live_rows(h, shape, &mut live_rows, cols_per_cube, lanes_k, per_unit);
    for b in 0..shape.batch {
        let total = compact_split_total(w, h, b, shape, &live_rows, n, c, col_live, &mut scratch, cols_per_cube, lanes_k);
        if UNIT_POS_Y == 0 && col_live {
            partial[(split * shape.batch + b) * width + c] = total;
        }
    }
}

/// [`rows_transposed_gemv_compact_kernel`] adding each split's sum into `acc [batch,
/// width·N]` (f32) with atomic adds, split 0 adding the bias too: fc2 over every row in
/// one launch, into a residual stream kept in f32 (the decode step's dense and gated
/// fc2). The additions' order depends on scheduling. With `has_norm` (batch 1) the last
/// cube to finish also writes the LayerNorm of the finished residual into `normed`
/// ([`last_cube_layer_norm`]): the next layer's first LayerNorm (or the final one)
/// without a launch of its own.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // the compacting kernel's inputs, the bias, the accumulator and the LayerNorm after
pub(crate) fn rows_transposed_gemv_compact_atomic_kernel<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    h: &Array<F>,
    bias: &Array<Vector<F, N>>,
    acc_out: &mut Array<Atomic<f32>>,
    acc_plain: &Array<f32>,
    done: &mut Array<Atomic<u32>>,
    gamma: &Array<f32>,
    beta: &Array<f32>,
    normed: &mut Array<F>,
    shape: TransposedShape,
    norm: NormShape,
    acc_stride: usize,
    #[comptime] has_bias: bool,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
    #[comptime] per_unit: usize,
    #[comptime] has_norm: bool,
    #[comptime] norm_plane: usize,
    #[comptime] norm_row: usize,
    #[comptime] plain_reads: bool,
    #[define(F)] _dtype: StorageType,
) {
    let threads = comptime!(cols_per_cube * lanes_k);
    let chunk = comptime!(cols_per_cube * lanes_k * per_unit);
    let mut scratch = SharedMemory::<Vector<f32, N>>::new(threads);
    let mut live_rows = SharedMemory::<u32>::new(chunk);
    let c = CUBE_POS_X as usize * cols_per_cube + UNIT_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let col_live = c < shape.width;
    let n = compact_live_rows(h, shape, &mut live_rows, cols_per_cube, lanes_k, per_unit);
    let mut pending = 0.0f32;
    for b in 0..shape.batch {
        let total = compact_split_total(w, h, b, shape, &live_rows, n, c, col_live, &mut scratch, cols_per_cube, lanes_k);
        pending += add_split_total(acc_out, total, bias, b * acc_stride, c, split, col_live, has_bias);
    }
    if has_norm {
        let mut red = SharedMemory::<f32>::new(threads);
        let mut row = SharedMemory::<f32>::new(norm_row);
        let norm_units = comptime!(norm_row.div_ceil(threads));
        last_cube_layer_norm(acc_out, acc_plain, done, gamma, beta, normed, pending, norm, &mut red, &mut row, threads, norm_plane, norm_units, plain_reads);
    }
}

/// The compacting kernels' sum of the cube's split for batch row `b` and column vector `c`
/// ([`live_rows_dot`] on each lane along K, then [`lanes_total`]): on lane 0 along K.
#[cube]
#[allow(clippy::too_many_arguments)] // the weights, the input, the compacted rows and the scratch
fn compact_split_total<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    h: &Array<F>,
    b: usize,
    shape: TransposedShape,
    live_rows: &SharedMemory<u32>,
    n: usize,
    c: usize,
    col_live: bool,
    scratch: &mut SharedMemory<Vector<f32, N>>,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
) -> Vector<f32, N> {
    let mut acc = Vector::<f32, N>::new(0.0f32);
    if col_live {
        acc = live_rows_dot(w, h, b * shape.h_stride, live_rows, n, c, shape.w_stride, lanes_k);
    }
    lanes_total(scratch, acc, cols_per_cube, lanes_k)
}

/// The atomic first passes' epilogue: lane 0 along K adds its split's sum for column
/// vector `c` (plus the bias, in split 0) into `acc_out[at + c·N ..]`, element by element.
/// Returns the sum of the values the adds found (for [`last_cube_layer_norm`] to wait on).
#[cube]
#[allow(clippy::too_many_arguments)] // the sum, where it goes, and the bias
fn add_split_total<F: Float, N: Size>(
    acc_out: &mut Array<Atomic<f32>>,
    total: Vector<f32, N>,
    bias: &Array<Vector<F, N>>,
    at: usize,
    c: usize,
    split: usize,
    col_live: bool,
    #[comptime] has_bias: bool,
) -> f32 {
    let mut found = 0.0f32;
    if UNIT_POS_Y == 0 && col_live {
        let mut sum = total;
        if has_bias && split == 0 {
            sum += Vector::<f32, N>::cast_from(bias[c]);
        }
        let first = at + c * N::value();
        // Every add issued before any result is used (see `last_cube_layer_norm`).
        let mut got = Vector::<f32, N>::new(0.0f32);
        #[unroll]
        for v in 0..N::value() {
            got[v] = acc_out[first + v].fetch_add(sum[v]);
        }
        #[unroll]
        for v in 0..N::value() {
            found += got[v];
        }
    }
    found
}

/// The compacting kernels' scan: unit `t` owns rows `s·chunk + t·per_unit ..` of the
/// cube's split `s`, and the rows whose `h` is nonzero in some batch row go, in
/// ascending order, to `live_rows`. Returns how many there are (the cube is synced).
#[cube]
fn compact_live_rows<F: Float>(
    h: &Array<F>,
    shape: TransposedShape,
    live_rows: &mut SharedMemory<u32>,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_k: usize,
    #[comptime] per_unit: usize,
) -> usize {
    let threads = comptime!(cols_per_cube * lanes_k);
    let chunk = comptime!(cols_per_cube * lanes_k * per_unit);
    let mut counts = SharedMemory::<u32>::new(threads);
    let mut totals = SharedMemory::<u32>::new(comptime!(threads.div_ceil(32)));
    let t = UNIT_POS_Y as usize * cols_per_cube + UNIT_POS_X as usize;
    let first = CUBE_POS_Y as usize * chunk + t * per_unit;
    let mut mask = 0u32;
    #[unroll]
    for q in 0..per_unit {
        let j = first + q;
        if j < shape.k {
            let mut nonzero = false;
            for b in 0..shape.batch {
                if f32::cast_from(h[b * shape.h_stride + j]) != 0.0f32 {
                    nonzero = true;
                }
            }
            if nonzero {
                mask |= 1u32 << (q as u32);
            }
        }
    }
    let before = exclusive_count(mask.count_ones(), t, &mut counts, &mut totals, threads);
    let live = total_count(&totals, threads);
    let mut pos = usize::cast_from(before);
    #[unroll]
    for q in 0..per_unit {
        if (mask >> q as u32) & 1u32 == 1u32 {
            live_rows[pos] = u32::cast_from(first + q);
            pos += 1;
        }
    }
    sync_cube();
    usize::cast_from(live)
}

/// One lane's share of a compacted split for column vector `c`: `Σ h[h_base + r] ·
/// Wt[r, c]` over the live rows `live_rows[UNIT_POS_Y], … + lanes_k, … < n`, eight rows'
/// loads in flight at a time, and the last (fewer than eight) in flight together too, as
/// one masked round, where one by one each could wait for the one before. On the H100
/// (6.7B decode step, Nsight Compute, runs 96–98) that took the step's fc2 calls from
/// 378–381 to 340–343 µs in all, mostly in the dense layers (half their rows live: 36–42
/// against 28–35 µs each); a sparse layer's moved less than its spread.
#[cube]
#[allow(clippy::too_many_arguments)] // the weights, the input and the compacted rows
fn live_rows_dot<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    h: &Array<F>,
    h_base: usize,
    live_rows: &SharedMemory<u32>,
    n: usize,
    c: usize,
    row_stride: usize,
    #[comptime] lanes_k: usize,
) -> Vector<f32, N> {
    let mut acc = Vector::<f32, N>::new(0.0f32);
    let mut i = UNIT_POS_Y as usize;
    while i + 7 * lanes_k < n {
        let r0 = usize::cast_from(live_rows[i]);
        let r1 = usize::cast_from(live_rows[i + lanes_k]);
        let r2 = usize::cast_from(live_rows[i + 2 * lanes_k]);
        let r3 = usize::cast_from(live_rows[i + 3 * lanes_k]);
        let r4 = usize::cast_from(live_rows[i + 4 * lanes_k]);
        let r5 = usize::cast_from(live_rows[i + 5 * lanes_k]);
        let r6 = usize::cast_from(live_rows[i + 6 * lanes_k]);
        let r7 = usize::cast_from(live_rows[i + 7 * lanes_k]);
        let w0 = w[r0 * row_stride + c];
        let w1 = w[r1 * row_stride + c];
        let w2 = w[r2 * row_stride + c];
        let w3 = w[r3 * row_stride + c];
        let w4 = w[r4 * row_stride + c];
        let w5 = w[r5 * row_stride + c];
        let w6 = w[r6 * row_stride + c];
        let w7 = w[r7 * row_stride + c];
        acc += Vector::<f32, N>::cast_from(w0) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r0]));
        acc += Vector::<f32, N>::cast_from(w1) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r1]));
        acc += Vector::<f32, N>::cast_from(w2) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r2]));
        acc += Vector::<f32, N>::cast_from(w3) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r3]));
        acc += Vector::<f32, N>::cast_from(w4) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r4]));
        acc += Vector::<f32, N>::cast_from(w5) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r5]));
        acc += Vector::<f32, N>::cast_from(w6) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r6]));
        acc += Vector::<f32, N>::cast_from(w7) * Vector::<f32, N>::new(f32::cast_from(h[h_base + r7]));
        i += 8 * lanes_k;
    }
    // Rows past `n` read nothing and add zeros.
    let mut ws = Array::<Vector<F, N>>::new(7usize);
    let mut hs = Array::<f32>::new(7usize);
    #[unroll]
    for k in 0..7usize {
        let at = i + k * lanes_k;
        let mut wv = Vector::<F, N>::new(F::new(0.0));
        let mut hv = 0.0f32;
        if at < n {
            let r = usize::cast_from(live_rows[at]);
            wv = w[r * row_stride + c];
            hv = f32::cast_from(h[h_base + r]);
        }
        ws[k] = wv;
        hs[k] = hv;
    }
    #[unroll]
    for k in 0..7usize {
        acc += Vector::<f32, N>::cast_from(ws[k]) * Vector::<f32, N>::new(hs[k]);
    }
    acc
}

/// Second pass: `out[b, c] = residual[b, c] + Σ_s partial[s, b, c] + bias[c]` (the residual
/// add of a decoder layer fused here saves it a launch). A cube owns `CUBE_DIM_X`
/// column vectors; its `lanes_s` lanes along the splits each add every `lanes_s`-th
/// split, then lane 0 adds the lanes' sums in lane order. The order is fixed, so the
/// result does not depend on scheduling (no atomics). One thread per column vector
/// instead made this pass latency-bound: 256 splits took ~60 µs on the H100.
#[cube(launch_unchecked)]
pub(crate) fn sum_partials_kernel<F: Float, O: Float, N: Size>(
    partial: &Array<Vector<f32, N>>,
    bias: &Array<Vector<F, N>>,
    residual: &Array<Vector<O, N>>,
    out: &mut Array<Vector<O, N>>,
    width: usize,
    batch: usize,
    splits: usize,
    residual_stride: usize,
    out_stride: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] cols_per_cube: usize,
    #[comptime] lanes_s: usize,
    #[define(F, O)] _dtypes: [StorageType; 2],
) {
    let mut scratch = SharedMemory::<Vector<f32, N>>::new(cols_per_cube * lanes_s);
    let cx = UNIT_POS_X as usize;
    let ly = UNIT_POS_Y as usize;
    let c = CUBE_POS_X as usize * cols_per_cube + cx;
    let b = CUBE_POS_Y as usize;
    let live = c < width && b < batch;
    // `partial [splits, batch, width]`, contiguous.
    let split_stride = batch * width;
    let base = b * width + c;
    let mut t0 = Vector::<f32, N>::new(0.0f32);
    let mut t1 = Vector::<f32, N>::new(0.0f32);
    if live {
        let mut s = ly;
        while s + lanes_s < splits {
            t0 += partial[base + s * split_stride];
            t1 += partial[base + (s + lanes_s) * split_stride];
            s += 2 * lanes_s;
        }
        if s < splits {
            t0 += partial[base + s * split_stride];
        }
    }
    scratch[ly * cols_per_cube + cx] = t0 + t1;
    sync_cube();
    if ly == 0 && live {
        let mut total = scratch[cx];
        for i in 1..lanes_s {
            total += scratch[i * cols_per_cube + cx];
        }
        if has_bias {
            total += Vector::<f32, N>::cast_from(bias[c]);
        }
        if has_residual {
            total += Vector::<f32, N>::cast_from(residual[b * residual_stride + c]);
        }
        out[b * out_stride + c] = Vector::<O, N>::cast_from(total);
    }
}

/// The better of two (value, index) candidates for an argmax: the larger value, the
/// smaller index on a tie (the first occurrence, as Burn's and PyTorch's argmax). Index
/// `u32::MAX` is no candidate yet, which any candidate replaces (so a row of -∞ gives its
/// first index).
#[cube]
fn argmax_pick(value: f32, index: u32, other_value: f32, other_index: u32) -> (f32, u32) {
    let mut v = value;
    let mut i = index;
    let none = 4294967295u32;
    if other_index != none && (index == none || other_value > value || (other_value == value && other_index < index)) {
        v = other_value;
        i = other_index;
    }
    (v, i)
}

/// The cube-wide argmax of each unit's candidate, in shared memory (a tree; every unit
/// must call it); unit 0 gets the result.
#[cube]
fn cube_argmax(value: f32, index: u32, #[comptime] threads: usize) -> (f32, u32) {
    let mut vals = SharedMemory::<f32>::new(threads);
    let mut idxs = SharedMemory::<u32>::new(threads);
    let tid = UNIT_POS_X as usize;
    vals[tid] = value;
    idxs[tid] = index;
    sync_cube();
    let mut stride = 0usize;
    stride += threads / 2;
    while stride > 0 {
        if tid < stride {
            let (v, i) = argmax_pick(vals[tid], idxs[tid], vals[tid + stride], idxs[tid + stride]);
            vals[tid] = v;
            idxs[tid] = i;
        }
        sync_cube();
        stride /= 2;
    }
    (vals[0], idxs[0])
}

/// First pass of a row-wise argmax of `x [rows, width]` (`width_vectors` vectors a row,
/// `x_stride` between rows): cube `(c, r)` takes the `threads · per_unit` vectors of row
/// `r` from `c · threads · per_unit` on (each unit `per_unit` of them, their loads in
/// flight together) and writes its best value and index to `part_vals[r · parts + c]` and
/// `part_idxs[..]`. [`argmax_finish_kernel`] picks among a row's parts. Burn's argmax of
/// one row runs in one cube: 26.5 µs for the 50,272 logits of OPT's vocabulary on the H100
/// (and 3.3 µs more to cast f16 to f32 first).
#[cube(launch_unchecked)]
pub(crate) fn argmax_parts_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    part_vals: &mut Array<f32>,
    part_idxs: &mut Array<u32>,
    width_vectors: usize,
    x_stride: usize,
    #[comptime] threads: usize,
    #[comptime] per_unit: usize,
    #[define(F)] _dtype: StorageType,
) {
    let tid = UNIT_POS_X as usize;
    let c = CUBE_POS_X as usize;
    let r = CUBE_POS_Y as usize;
    let parts = CUBE_COUNT_X as usize;
    let first = c * threads * per_unit;
    let mut best = f32::new(-3.4e38);
    let mut best_idx = 4294967295u32;
    #[unroll]
    for k in 0..per_unit {
        // Unit-contiguous runs of vectors across the cube: a plane's loads are coalesced.
        let at = first + k * threads + tid;
        if at < width_vectors {
            let v = x[r * x_stride + at];
            #[unroll]
            for l in 0..N::value() {
                let (bv, bi) = argmax_pick(best, best_idx, f32::cast_from(v[l]), u32::cast_from(at * N::value() + l));
                best = bv;
                best_idx = bi;
            }
        }
    }
    let (v, i) = cube_argmax(best, best_idx, threads);
    if tid == 0 {
        part_vals[r * parts + c] = v;
        part_idxs[r * parts + c] = i;
    }
}

/// Second pass of the row-wise argmax: cube `r` picks among row `r`'s `parts` candidates
/// from [`argmax_parts_kernel`] and writes the index to `out[r]`.
#[cube(launch_unchecked)]
pub(crate) fn argmax_finish_kernel<I: Int>(
    part_vals: &Array<f32>,
    part_idxs: &Array<u32>,
    out: &mut Array<I>,
    parts: usize,
    #[comptime] threads: usize,
    #[define(I)] _dtype: StorageType,
) {
    let tid = UNIT_POS_X as usize;
    let r = CUBE_POS_X as usize;
    let mut best = f32::new(-3.4e38);
    let mut best_idx = 4294967295u32;
    let mut p = tid;
    while p < parts {
        let (bv, bi) = argmax_pick(best, best_idx, part_vals[r * parts + p], part_idxs[r * parts + p]);
        best = bv;
        best_idx = bi;
        p += threads;
    }
    let (_v, i) = cube_argmax(best, best_idx, threads);
    if tid == 0 {
        out[r] = I::cast_from(i);
    }
}

/// The decoder's input rows: `out[r] = table[tokens[r]] + positions[r]`, the sum rounded to
/// the tables' dtype `F` (as an addition in `F` rounds it) and stored as `O` — an f32
/// residual stream needs no cast launch after. `CUBE_COUNT_Y` cubes a row (`CUBE_POS_X`),
/// `width` vectors a row, so that a unit's loads are one round (one cube a row, a unit
/// looping over four vectors of a 4096-wide row, took 5.1 µs on the H100); `positions`
/// may be a view of consecutive rows of the position table (`pos_stride` apart). An id
/// outside the table gives a zero row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // the two tables, the ids, the output and their strides
pub(crate) fn embed_rows_kernel<F: Float, O: Float, N: Size, I: Int>(
    tokens: &Array<I>,
    table: &Array<Vector<F, N>>,
    positions: &Array<Vector<F, N>>,
    out: &mut Array<Vector<O, N>>,
    width: usize,
    vocab: usize,
    table_stride: usize,
    pos_stride: usize,
    #[define(F, O, I)] _dtypes: [StorageType; 3],
) {
    let r = CUBE_POS_X as usize;
    let token = usize::cast_from(tokens[r]);
    let live = token < vocab;
    let mut t = CUBE_POS_Y as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    while t < width {
        let mut value = Vector::<f32, N>::new(0.0f32);
        if live {
            let sum = Vector::<f32, N>::cast_from(table[token * table_stride + t]) + Vector::<f32, N>::cast_from(positions[r * pos_stride + t]);
            value = Vector::<f32, N>::cast_from(Vector::<F, N>::cast_from(sum));
        }
        out[r * width + t] = Vector::<O, N>::cast_from(value);
        t += CUBE_COUNT_Y as usize * CUBE_DIM_X as usize;
    }
}

/// Selection without a sort: one cube scans `logits [batch, n]` and writes, in ascending
/// order, every index `i` with `logits[b, i] > threshold` for some `b` (the union a batch
/// needs), then pads `idx` to its capacity with `n` (an empty slot for the gather
/// kernels). `count[0]` gets the number selected, which may exceed the capacity (then the
/// list holds the first `capacity` of them).
///
/// Each round covers `32 × threads` logits; thread `t` owns 32 consecutive ones, loads
/// them as vectors all at once (a loop of dependent loads cost 26 µs on the H100), keeps
/// its hits as a 32-bit mask, and a cube-wide scan of the masks' popcounts gives each
/// thread where its indices go.
#[cube(launch_unchecked)]
pub(crate) fn select_above_threshold_kernel<F: Float, N: Size, I: Int>(
    logits: &Array<Vector<F, N>>,
    threshold: f32,
    idx: &mut Array<I>,
    count: &mut Array<I>,
    n: usize,
    batch: usize,
    logits_stride: usize,
    capacity: usize,
    #[comptime] threads: usize,
    #[comptime] lanes: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    // `lanes` is the vector width (`N`), as a comptime value to unroll over.
    let mut scan = SharedMemory::<u32>::new(threads);
    let t = UNIT_POS_X as usize;
    let per_round = 32 * threads;
    #[allow(clippy::manual_div_ceil)] // div_ceil is not a cube operation
    let rounds = (n + per_round - 1) / per_round;
    let mut written = 0usize;

    for round in 0..rounds {
        let first = round * per_round + t * 32;
        let mut mask = 0u32;
        for b in 0..batch {
            // In elements: a row starts on a vector boundary (`lanes` divides the stride).
            let row = b * logits_stride;
            #[unroll]
            for q in 0..32 / lanes {
                let e = first + q * lanes;
                if e < n {
                    let v = logits[(row + e) / lanes];
                    #[unroll]
                    for lane in 0..lanes {
                        if f32::cast_from(v[lane]) > threshold {
                            mask |= 1u32 << ((q * lanes + lane) as u32);
                        }
                    }
                }
            }
        }
        let mine = mask.count_ones();

        // Inclusive Hillis-Steele scan of the per-thread counts.
        scan[t] = mine;
        sync_cube();
        let mut offset = 1usize;
        while offset < threads {
            let mut value = scan[t];
            if t >= offset {
                value += scan[t - offset];
            }
            sync_cube();
            scan[t] = value;
            sync_cube();
            offset *= 2;
        }
        let round_total = usize::cast_from(scan[threads - 1]);
        let mut pos = written + usize::cast_from(scan[t] - mine);
        #[unroll]
        for q in 0..32usize {
            if (mask >> q as u32) & 1u32 == 1u32 {
                if pos < capacity {
                    idx[pos] = I::cast_from(first + q);
                }
                pos += 1;
            }
        }
        written += round_total;
        // Everyone has read the scan before the next round overwrites it.
        sync_cube();
    }
    let mut p = written + t;
    while p < capacity {
        idx[p] = I::cast_from(n);
        p += threads;
    }
    if t == 0 {
        count[0] = I::cast_from(written);
    }
}

/// The max (`max`) or the sum of one value per unit of the cube, returned to every unit.
/// With `plane` > 0 (the plane size; `threads` a multiple of it, at most `plane` planes)
/// each plane reduces with shuffles, then every plane reduces the planes' results: two
/// barriers. Otherwise a shared-memory tree (`threads` a power of two), one barrier per
/// level: ten for 1024 units, which made a LayerNorm cost 5–6 µs on the H100.
#[cube]
#[allow(unused_assignments)] // `result` is set in the one branch that expands
fn cube_reduce(red: &mut SharedMemory<f32>, value: f32, tid: usize, #[comptime] threads: usize, #[comptime] max: bool, #[comptime] plane: usize) -> f32 {
    let mut result = 0.0f32;
    if comptime!(plane > 0) {
        let planes = comptime!(threads / plane);
        let lane = tid % plane;
        let mut v = value;
        if max {
            v = plane_max(v);
        } else {
            v = plane_sum(v);
        }
        if lane == 0 {
            red[tid / plane] = v;
        }
        sync_cube();
        let mut w = 0.0f32;
        if max {
            w = f32::new(-3.0e38);
        }
        if lane < planes {
            w = red[lane];
        }
        if max {
            result = plane_max(w);
        } else {
            result = plane_sum(w);
        }
        sync_cube();
    } else {
        red[tid] = value;
        sync_cube();
        // (A runtime variable: a comptime one cannot be updated in the loop.)
        let mut stride = 0usize;
        stride += threads / 2;
        while stride > 0 {
            if tid < stride {
                if max {
                    red[tid] = f32::max(red[tid], red[tid + stride]);
                } else {
                    red[tid] += red[tid + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
        result = red[0];
        sync_cube();
    }
    result
}

/// The LayerNorm of a launch's finished output row, by its last cube: the epilogue of the
/// one-launch kernels that add into a residual stream kept in f32 (`acc [1, width]`), so
/// that the block after needs no LayerNorm launch of its own. Each cube counts itself done
/// in `done[0]` once its own adds are back (`pending` sums what they returned: writing it
/// waits for them, where an add whose result goes unused is fire-and-forget); the cube
/// that counts last reads the row, which every other cube's adds have then reached, writes
/// `(x − mean) / sqrt(var + eps) · gamma + beta` into `normed` (the statistics in f32, two
/// passes over the row kept in `row`, as `layer_norm_row`) and sets `done[0]` back to 0
/// for the next launch. The row is read with atomic adds of 0, which see every add, or
/// with `plain_reads` through `plain`, a second binding of the same buffer (CUDA: the
/// adds were made in L2, and no cube of the launch loaded the row before, so no cache
/// above holds an old copy). Every cube runs the reductions'
/// barriers, so none sits in a branch that depends on a value read at run time.
#[cube]
#[allow(clippy::too_many_arguments)] // the row, the counter, the LayerNorm's parameters and output, the scratch
fn last_cube_layer_norm<F: Float>(
    acc: &mut Array<Atomic<f32>>,
    plain: &Array<f32>,
    done: &mut Array<Atomic<u32>>,
    gamma: &Array<f32>,
    beta: &Array<f32>,
    normed: &mut Array<F>,
    pending: f32,
    norm: NormShape,
    red: &mut SharedMemory<f32>,
    row: &mut SharedMemory<f32>,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
    #[comptime] per_unit: usize,
    #[comptime] plain_reads: bool,
) {
    let tid = UNIT_POS as usize;
    red[tid] = pending;
    sync_cube();
    if tid == 0 {
        let before = usize::cast_from(done[0].fetch_add(1u32));
        let mut last = 0.0f32;
        if before + 1 == CUBE_COUNT {
            last = 1.0;
            done[0].store(0u32);
        }
        red[0] = last;
    }
    sync_cube();
    let last = red[0] > 0.5;
    sync_cube();
    let width = norm.width;
    // All of a unit's reads issued before any is used (an atomic's result used at once
    // would hold the unit for its round trip before the next is issued).
    let mut sum = 0.0f32;
    if last {
        let mut got = Array::<f32>::new(per_unit);
        #[unroll]
        for i in 0..per_unit {
            let c = tid + i * threads;
            got[i] = 0.0f32;
            if c < width {
                if plain_reads {
                    got[i] = plain[c];
                } else {
                    got[i] = acc[c].fetch_add(0.0f32);
                }
            }
        }
        #[unroll]
        for i in 0..per_unit {
            let c = tid + i * threads;
            if c < width {
                row[c] = got[i];
                sum += got[i];
            }
        }
    }
    let mean = cube_reduce(red, sum, tid, threads, false, plane) * norm.inv_width;
    let mut squares = 0.0f32;
    if last {
        #[unroll]
        for i in 0..per_unit {
            let c = tid + i * threads;
            if c < width {
                let v = row[c] - mean;
                squares += v * v;
            }
        }
    }
    let var = cube_reduce(red, squares, tid, threads, false, plane) * norm.inv_width;
    let inv_std = 1.0f32 / f32::sqrt(var + norm.eps);
    if last {
        #[unroll]
        for i in 0..per_unit {
            let c = tid + i * threads;
            if c < width {
                normed[c] = F::cast_from((row[c] - mean) * inv_std * gamma[c] + beta[c]);
            }
        }
    }
}

/// One cube's share of a head's decode attention: the scores of positions `start..end`
/// against the query `q[q_base ..]` (f32, in `scores`), their max and the sum of their
/// exponentials (returned), and each unit's unnormalised `Σ p·V` for its column vector
/// in `acc_smem` (lane `(cv, tl)` sums positions `tl, tl + lanes, …`; the cube is synced
/// after). A dead head (`live` false) leaves zeros.
#[cube]
#[allow(clippy::too_many_arguments)] // the query, the head's cache, its positions and the scratch
fn attention_partials<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    q_base: usize,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    kv_base: usize,
    pos_stride: usize,
    start: usize,
    end: usize,
    scale: f32,
    live: bool,
    scores: &mut SharedMemory<f32>,
    red: &mut SharedMemory<f32>,
    acc_smem: &mut SharedMemory<Vector<f32, N>>,
    q_smem: &mut SharedMemory<Vector<f32, N>>,
    #[comptime] threads: usize,
    #[comptime] hd_vectors: usize,
) -> (f32, f32) {
    let tid = UNIT_POS_X as usize;
    // The query in shared memory (f32), read by every unit from there: held in each
    // unit's registers beside a key row's loads, it took the one-launch attention with
    // out_proj to 98 registers a unit, two cubes an SM (Nsight Compute, 6.7B step).
    if live && tid < hd_vectors {
        q_smem[tid] = Vector::<f32, N>::cast_from(q[q_base + tid]);
    }
    sync_cube();
    // Scores and their max.
    let mut local_max = f32::new(-3.0e38);
    if live {
        let mut t = start + tid;
        while t < end {
            let mut dot = Vector::<f32, N>::new(0.0f32);
            let row = kv_base + t * pos_stride;
            // Unrolled: the whole key row's loads are in flight together.
            #[unroll]
            for v in 0..hd_vectors {
                dot += q_smem[v] * Vector::<f32, N>::cast_from(k_cache[row + v]);
            }
            let mut s = 0.0f32;
            #[unroll]
            for l in 0..N::value() {
                s += dot[l];
            }
            s *= scale;
            scores[t - start] = s;
            local_max = f32::max(local_max, s);
            t += threads;
        }
    }
    // The shared-memory tree, not planes: with plane reductions this kernel took 9.6 µs
    // against 8.5 (Nsight Compute, 6.7B decode step, runs 15 and 19).
    let max = cube_reduce(red, local_max, tid, threads, true, 0usize);

    // Exponentials. Their sum is taken by the value lanes below (each lane sums its
    // positions' weights beside their values), not by a cube-wide reduction of its own:
    // one barrier where the tree took eight.
    if live {
        let mut t = start + tid;
        while t < end {
            scores[t - start] = f32::exp(scores[t - start] - max);
            t += threads;
        }
    }
    sync_cube();

    // p·V: lane (cv, tl) sums positions tl, tl + lanes, ... for column vector cv.
    let lanes = threads / hd_vectors;
    let cv = tid % hd_vectors;
    let tl = tid / hd_vectors;
    let mut acc = Vector::<f32, N>::new(0.0f32);
    let mut weights = 0.0f32;
    if live && tl < lanes {
        let mut t = start + tl;
        // Four positions' values in flight per iteration.
        while t + 3 * lanes < end {
            let v0 = v_cache[kv_base + t * pos_stride + cv];
            let v1 = v_cache[kv_base + (t + lanes) * pos_stride + cv];
            let v2 = v_cache[kv_base + (t + 2 * lanes) * pos_stride + cv];
            let v3 = v_cache[kv_base + (t + 3 * lanes) * pos_stride + cv];
            let (p0, p1, p2, p3) = (scores[t - start], scores[t + lanes - start], scores[t + 2 * lanes - start], scores[t + 3 * lanes - start]);
            acc += Vector::<f32, N>::cast_from(v0) * Vector::<f32, N>::new(p0);
            acc += Vector::<f32, N>::cast_from(v1) * Vector::<f32, N>::new(p1);
            acc += Vector::<f32, N>::cast_from(v2) * Vector::<f32, N>::new(p2);
            acc += Vector::<f32, N>::cast_from(v3) * Vector::<f32, N>::new(p3);
            weights += p0 + p1 + p2 + p3;
            t += 4 * lanes;
        }
        while t < end {
            let p = scores[t - start];
            acc += Vector::<f32, N>::cast_from(v_cache[kv_base + t * pos_stride + cv]) * Vector::<f32, N>::new(p);
            weights += p;
            t += lanes;
        }
    }
    acc_smem[tid] = acc;
    // Every lane of a position group summed the same weights: its first lane reports them.
    // (`red` is free: the max's reduction read it and synced.)
    if cv == 0 && tl < lanes {
        red[tl] = weights;
    }
    sync_cube();
    let mut total = 0.0f32;
    for l in 0..lanes {
        total += red[l];
    }
    (max, total)
}

/// Decode attention over the selected heads only: cube `(j, s, b)` takes head
/// `heads[j]`, its query `q[b, j·hd ..]`, and reads that head's keys and values for its
/// share of the positions, `s·chunk .. min((s+1)·chunk, len)` — no other head's cache is
/// touched. Scores go to shared memory (f32), softmax in f32, then `CUBE_DIM_X / (hd/N)`
/// position lanes accumulate `p·V` for each column vector and reduce in shared memory.
///
/// With one split the cube normalises and writes `out`. With several (`split`), each
/// writes its unnormalised `Σ p·V`, its max and its sum to the workspace and
/// [`combine_attention_splits_kernel`] merges them: one cube per head left most of the
/// GPU idle at long contexts (22 µs for 8 MB of KV at 1024 positions on the H100).
/// An empty slot writes zeros.
#[cube(launch_unchecked)]
pub(crate) fn selected_heads_attention_kernel<F: Float, N: Size, I: Int>(
    q: &Array<Vector<F, N>>,
    heads: &Array<I>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    ws_o: &mut Array<Vector<f32, N>>,
    ws_ml: &mut Array<f32>,
    shape: AttentionShape,
    len: usize,
    chunk: usize,
    scale: f32,
    #[comptime] threads: usize,
    #[comptime] max_chunk: usize,
    #[comptime] hd_vectors: usize,
    #[comptime] split: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let mut scores = SharedMemory::<f32>::new(max_chunk);
    let mut red = SharedMemory::<f32>::new(threads);
    let mut acc_smem = SharedMemory::<Vector<f32, N>>::new(threads);
    let tid = UNIT_POS_X as usize;
    let j = CUBE_POS_X as usize;
    let sp = CUBE_POS_Y as usize;
    let splits = CUBE_COUNT_Y as usize;
    let b = CUBE_POS_Z as usize;
    let slots = shape.slots;
    let head = usize::cast_from(heads[j]);
    let live = head < shape.heads;
    let q_base = b * shape.q_stride + j * hd_vectors;
    let kv_base = b * shape.cache_batch_stride + head * shape.cache_head_stride;
    let start = usize::min(sp * chunk, len);
    let end = usize::min(start + chunk, len);
    let mut q_smem = SharedMemory::<Vector<f32, N>>::new(hd_vectors);
    let (max, total) = attention_partials(q, q_base, k_cache, v_cache, kv_base, shape.cache_pos_stride, start, end, scale, live, &mut scores, &mut red, &mut acc_smem, &mut q_smem, threads, hd_vectors);
    let lanes = threads / hd_vectors;
    if tid < hd_vectors {
        let mut sum = Vector::<f32, N>::new(0.0f32);
        if live {
            for l in 0..lanes {
                sum += acc_smem[l * hd_vectors + tid];
            }
        }
        if split {
            let slot = (b * slots + j) * splits + sp;
            ws_o[slot * hd_vectors + tid] = sum;
            if tid == 0 {
                ws_ml[slot * 2] = max;
                ws_ml[slot * 2 + 1] = total;
            }
        } else {
            if live {
                sum /= Vector::<f32, N>::new(total);
            }
            out[b * shape.out_stride + j * hd_vectors + tid] = Vector::<F, N>::cast_from(sum);
        }
    }
}

/// A decode step's attention over the selected heads with `out_proj` in the same launch,
/// added into the residual stream kept in f32: cube `(r, j, b)` computes head `heads[j]`'s
/// output for batch row `b` (by [`head_attention_online`] with `round_positions` > 0, else
/// as [`selected_heads_attention_kernel`] with one split; into shared memory), then for its
/// `rows_per_cube` rows `i` of `out_proj` (`w [rows,
/// H·hd]` row-major: a head's columns are one contiguous run of `hd_vectors` vectors)
/// adds `W[i, head] · o` into `acc_out[b, i]` with an f32 atomic; slot 0 also adds the
/// bias. The head's attention is computed once per row block (its keys and values read
/// from L2 after the first), and the attention output never goes through memory: a sparse
/// layer's attention and `out_proj` are one launch where they were two, whose output and
/// input were a round trip. A group of `hd_vectors` units takes one row (one vector
/// each), reduced by plane shuffles (`use_plane`) or shared memory; each unit keeps four
/// rows' loads in flight. An empty slot adds nothing (slot 0 still adds the bias).
///
/// Measured on the H100 (6.7B shape, half the heads; Nsight Compute on a decode step): 22.5
/// µs, where the attention kernel and `block_cols_gemv` took 8.5 + 13.7 (an earlier
/// step's profile) — each cube runs its attention and then its rows, one after the other,
/// and every row block of a head recomputes the head's attention. At 98 registers a unit
/// (the query held in registers) two cubes fit an SM, 25% occupancy; with the query in
/// shared memory, 52 registers and 20.8 µs (run 42). Issuing all of a unit's 16 rows'
/// loads in one round instead of four was no faster (22.5 against 22.3 µs, run 41). Loading a unit's rows
/// into registers before the attention, to overlap the two, was slower (31.3 µs in the
/// step; in isolation, `kernels --tune` at 192 positions, 25.7 µs against 19.4 for the two
/// kernels back to back) and was reverted. What it saves is a launch, where the host, not the GPU, bounds a step
/// (`SparseOptions::fused_attention` in the model). The online softmax for the attention
/// half, 8 positions a round, took it from 21.96 to 19.86 µs a layer (run 85, Nsight
/// Compute with the caches the step leaves).
///
/// With `has_norm` (batch 1) the last cube to finish also writes the LayerNorm of the
/// finished residual into `normed` ([`last_cube_layer_norm`]): the MLP's LayerNorm
/// without a launch of its own.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // attention's inputs, out_proj's, the accumulator and the LayerNorm after
pub(crate) fn attention_out_proj_atomic_kernel<F: Float, N: Size, I: Int>(
    q: &Array<Vector<F, N>>,
    heads: &Array<I>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    bias: &Array<F>,
    acc_out: &mut Array<Atomic<f32>>,
    acc_plain: &Array<f32>,
    done: &mut Array<Atomic<u32>>,
    gamma: &Array<f32>,
    beta: &Array<f32>,
    normed: &mut Array<F>,
    shape: AttentionShape,
    norm: NormShape,
    rows: usize,
    w_stride: usize,
    acc_stride: usize,
    len: usize,
    scale: f32,
    #[comptime] threads: usize,
    #[comptime] max_chunk: usize,
    #[comptime] hd_vectors: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] has_bias: bool,
    #[comptime] use_plane: bool,
    #[comptime] has_norm: bool,
    #[comptime] norm_plane: usize,
    #[comptime] norm_row: usize,
    #[comptime] plain_reads: bool,
    #[comptime] round_positions: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let mut red = SharedMemory::<f32>::new(threads);
    let mut acc_smem = SharedMemory::<Vector<f32, N>>::new(threads);
    let mut o = SharedMemory::<Vector<f32, N>>::new(hd_vectors);
    let tid = UNIT_POS_X as usize;
    let j = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let head = usize::cast_from(heads[j]);
    let live = head < shape.heads;
    let q_base = b * shape.q_stride + j * hd_vectors;
    let kv_base = b * shape.cache_batch_stride + head * shape.cache_head_stride;
    if comptime!(round_positions > 0) {
        head_attention_online(q, q_base, k_cache, v_cache, kv_base, shape.cache_pos_stride, len, scale, live, &mut red, &mut acc_smem, &mut o, threads, hd_vectors, round_positions, use_plane);
    } else {
        let mut scores = SharedMemory::<f32>::new(max_chunk);
        let mut q_smem = SharedMemory::<Vector<f32, N>>::new(hd_vectors);
        let (_max, total) = attention_partials(q, q_base, k_cache, v_cache, kv_base, shape.cache_pos_stride, 0, len, scale, live, &mut scores, &mut red, &mut acc_smem, &mut q_smem, threads, hd_vectors);
        if tid < hd_vectors {
            let mut sum = Vector::<f32, N>::new(0.0f32);
            if live {
                for l in 0..comptime!(threads / hd_vectors) {
                    sum += acc_smem[l * hd_vectors + tid];
                }
                sum /= Vector::<f32, N>::new(total);
            }
            o[tid] = sum;
        }
        sync_cube();
    }

    // out_proj: group `g` of `hd_vectors` units takes rows first + g, + groups, ...
    let groups = comptime!(threads / hd_vectors);
    let per_group = comptime!(rows_per_cube.div_ceil(threads / hd_vectors));
    let lane = tid % hd_vectors;
    let g = tid / hd_vectors;
    let first = CUBE_POS_X as usize * rows_per_cube + g;
    let col = head * hd_vectors + lane;
    let ov = o[lane];
    let add_bias = has_bias && j == 0;
    let mut pending = 0.0f32;
    // With `has_norm` the rows' sums wait in shared memory and each unit adds at most a
    // row after the loop: the epilogue needs the adds' results, and a result waited for
    // inside the loop would hold the unit a round trip per round of rows.
    let mut sums = SharedMemory::<f32>::new(comptime!(if has_norm { rows_per_cube } else { 1 }));
    let block_first = CUBE_POS_X as usize * rows_per_cube;
    let mut i = 0usize;
    while i < per_group {
        // Four rows' loads in flight; rows past the end (or a dead head's) read nothing.
        let r0 = first + i * groups;
        let r1 = r0 + groups;
        let r2 = r0 + 2 * groups;
        let r3 = r0 + 3 * groups;
        let w0 = load_head_cols(w, r0, w_stride, col, rows, live);
        let w1 = load_head_cols(w, r1, w_stride, col, rows, live && i + 1 < per_group);
        let w2 = load_head_cols(w, r2, w_stride, col, rows, live && i + 2 < per_group);
        let w3 = load_head_cols(w, r3, w_stride, col, rows, live && i + 3 < per_group);
        let s0 = segment_sum(vector_dot(w0, ov), &mut red, lane, hd_vectors, use_plane);
        let s1 = segment_sum(vector_dot(w1, ov), &mut red, lane, hd_vectors, use_plane);
        let s2 = segment_sum(vector_dot(w2, ov), &mut red, lane, hd_vectors, use_plane);
        let s3 = segment_sum(vector_dot(w3, ov), &mut red, lane, hd_vectors, use_plane);
        if lane == 0 {
            let at = b * acc_stride;
            let any = live || add_bias;
            put_row(acc_out, &mut sums, bias, at, r0, rows, block_first, s0, any, add_bias, has_norm, rows_per_cube);
            if i + 1 < per_group {
                put_row(acc_out, &mut sums, bias, at, r1, rows, block_first, s1, any, add_bias, has_norm, rows_per_cube);
            }
            if i + 2 < per_group {
                put_row(acc_out, &mut sums, bias, at, r2, rows, block_first, s2, any, add_bias, has_norm, rows_per_cube);
            }
            if i + 3 < per_group {
                put_row(acc_out, &mut sums, bias, at, r3, rows, block_first, s3, any, add_bias, has_norm, rows_per_cube);
            }
        }
        i += 4;
    }
    if has_norm {
        sync_cube();
        let mut t = tid;
        while t < rows_per_cube {
            pending += add_row(acc_out, bias, b * acc_stride, block_first + t, rows, sums[t], live || add_bias, add_bias);
            t += threads;
        }
        let mut row = SharedMemory::<f32>::new(norm_row);
        let per_unit = comptime!(norm_row.div_ceil(threads));
        last_cube_layer_norm(acc_out, acc_plain, done, gamma, beta, normed, pending, norm, &mut red, &mut row, threads, norm_plane, per_unit, plain_reads);
    }
}

/// Row `row` of `out_proj` at the head's column vector `col` (f32), or zeros for a row
/// past the end or when `read` is false — then nothing is read.
#[cube]
fn load_head_cols<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    row: usize,
    w_stride: usize,
    col: usize,
    rows: usize,
    read: bool,
) -> Vector<f32, N> {
    let mut value = Vector::<f32, N>::new(0.0f32);
    if read && row < rows {
        value = Vector::<f32, N>::cast_from(w[row * w_stride + col]);
    }
    value
}

/// The sum of the `N` products of two vectors.
#[cube]
fn vector_dot<N: Size>(a: Vector<f32, N>, b: Vector<f32, N>) -> f32 {
    let p = a * b;
    let mut sum = 0.0f32;
    #[unroll]
    for l in 0..N::value() {
        sum += p[l];
    }
    sum
}

/// The sum over each run of `width` consecutive units (`lane` = unit mod `width`, a power
/// of two no wider than a plane) of their `value`, on lane 0 of the run: plane shuffles
/// within the run, or (`use_plane` false) shared memory, one barrier pair — every unit of
/// the cube must call it.
#[cube]
fn segment_sum(
    value: f32,
    scratch: &mut SharedMemory<f32>,
    lane: usize,
    #[comptime] width: usize,
    #[comptime] use_plane: bool,
) -> f32 {
    let mut v = value;
    if use_plane {
        if comptime!(width > 16) {
            v += plane_shuffle_xor(v, 16u32);
        }
        if comptime!(width > 8) {
            v += plane_shuffle_xor(v, 8u32);
        }
        if comptime!(width > 4) {
            v += plane_shuffle_xor(v, 4u32);
        }
        if comptime!(width > 2) {
            v += plane_shuffle_xor(v, 2u32);
        }
        if comptime!(width > 1) {
            v += plane_shuffle_xor(v, 1u32);
        }
    } else {
        let tid = UNIT_POS_X as usize;
        scratch[tid] = value;
        sync_cube();
        if lane == 0 {
            for l in 1..width {
                v += scratch[tid + l];
            }
        }
        sync_cube();
    }
    v
}

/// [`segment_sum`] returned to every unit of the run (the shared-memory path gives each
/// unit the run's sum from one barrier pair; plane shuffles by xor give it to all).
#[cube]
#[allow(unused_assignments)] // `v` is set in the one branch that expands
fn segment_sum_all(
    value: f32,
    scratch: &mut SharedMemory<f32>,
    lane: usize,
    #[comptime] width: usize,
    #[comptime] use_plane: bool,
) -> f32 {
    let mut v = value;
    if use_plane {
        v = segment_sum(value, scratch, lane, width, use_plane);
    } else {
        let tid = UNIT_POS_X as usize;
        scratch[tid] = value;
        sync_cube();
        let base = tid - lane;
        v = 0.0f32;
        for l in 0..width {
            v += scratch[base + l];
        }
        sync_cube();
    }
    v
}

/// One head's decode attention into `o` (shared memory, f32, `hd_vectors` vectors,
/// normalised; zeros for a dead head), every key's and value's load issued together:
/// unit `(cv, g)` — `cv = tid mod hd_vectors`, `g = tid / hd_vectors`, `groups` of them —
/// takes column vector `cv` of positions `g, g + groups, …`, `positions` of them a round
/// with their keys' and values' loads in flight together. A position's score is the sum of
/// its run of `hd_vectors` units ([`segment_sum_all`]); each run keeps its own running max,
/// sum of exponentials and `Σ p·V` (the online softmax of flash decoding), and the runs
/// are merged once at the end. Where [`attention_partials`] takes a round trip for the
/// keys, a cube-wide max (a barrier a level), and then the values' rounds, this takes one
/// round trip a round and two barriers in all. The number of rounds is the same for every
/// unit (positions past `len` are masked, their loads clamped to the last one), so the
/// shuffles and barriers inside are uniform. `threads` is a multiple of `hd_vectors`, and
/// `hd_vectors` at least 2 (`red` holds the runs' maxima and sums, `2·groups` values).
#[cube]
#[allow(clippy::too_many_arguments)] // the query, the head's cache, its positions and the scratch
#[allow(clippy::manual_div_ceil)] // a runtime value in a cube function: the kernels use plain arithmetic there
fn head_attention_online<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    q_base: usize,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    kv_base: usize,
    pos_stride: usize,
    len: usize,
    scale: f32,
    live: bool,
    red: &mut SharedMemory<f32>,
    acc_smem: &mut SharedMemory<Vector<f32, N>>,
    o: &mut SharedMemory<Vector<f32, N>>,
    #[comptime] threads: usize,
    #[comptime] hd_vectors: usize,
    #[comptime] positions: usize,
    #[comptime] use_plane: bool,
) {
    let tid = UNIT_POS_X as usize;
    let groups = comptime!(threads / hd_vectors);
    let per_round = comptime!(threads / hd_vectors * positions);
    let cv = tid % hd_vectors;
    let g = tid / hd_vectors;
    let mut qv = Vector::<f32, N>::new(0.0f32);
    if live {
        qv = Vector::<f32, N>::cast_from(q[q_base + cv]) * Vector::<f32, N>::new(scale);
    }
    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let mut acc = Vector::<f32, N>::new(0.0f32);
    let mut rounds = 0usize;
    if live && len > 0 {
        rounds = (len + per_round - 1) / per_round;
    }
    let last = usize::max(len, 1) - 1;
    let mut ks = Array::<Vector<F, N>>::new(positions);
    let mut vs = Array::<Vector<F, N>>::new(positions);
    let mut s = Array::<f32>::new(positions);
    for r in 0..rounds {
        let first = r * per_round + g;
        #[unroll]
        for p in 0..positions {
            let t = usize::min(first + p * groups, last);
            let at = kv_base + t * pos_stride + cv;
            ks[p] = k_cache[at];
            vs[p] = v_cache[at];
        }
        let mut mr = m;
        #[unroll]
        for p in 0..positions {
            let score = segment_sum_all(vector_dot(qv, Vector::<f32, N>::cast_from(ks[p])), red, cv, hd_vectors, use_plane);
            s[p] = score;
            if first + p * groups < len {
                mr = f32::max(mr, score);
            }
        }
        let c = f32::exp(m - mr);
        acc *= Vector::<f32, N>::new(c);
        l *= c;
        #[unroll]
        for p in 0..positions {
            let mut w = 0.0f32;
            if first + p * groups < len {
                w = f32::exp(s[p] - mr);
            }
            acc += Vector::<f32, N>::cast_from(vs[p]) * Vector::<f32, N>::new(w);
            l += w;
        }
        m = mr;
    }
    // Merge the runs as the splits of a long context are merged ([`merge_softmax_parts`]).
    // (`red` is free: a shared-memory segment sum ends with a barrier.)
    acc_smem[tid] = acc;
    if cv == 0 {
        red[2 * g] = m;
        red[2 * g + 1] = l;
    }
    sync_cube();
    if tid < hd_vectors {
        let (mut sum, total) = merge_softmax_parts::<N, SharedMemory<f32>, SharedMemory<Vector<f32, N>>>(red, acc_smem, 0, groups, tid, hd_vectors);
        if live && total > 0.0f32 {
            sum /= Vector::<f32, N>::new(total);
        } else {
            sum = Vector::<f32, N>::new(0.0f32);
        }
        o[tid] = sum;
    }
    sync_cube();
}

/// One row's sum of the one-launch attention's `out_proj`: added into `acc_out` now
/// ([`add_row`]), or with `has_norm` kept in `sums` at its place in the cube's block of
/// rows (from `block_first`; a row past the block is dropped: past the output, it is never
/// added) for the add after the loop.
#[cube]
#[allow(clippy::too_many_arguments)] // add_row's arguments, the stash and its block
fn put_row<F: Float>(
    acc_out: &mut Array<Atomic<f32>>,
    sums: &mut SharedMemory<f32>,
    bias: &Array<F>,
    at: usize,
    row: usize,
    rows: usize,
    block_first: usize,
    sum: f32,
    any: bool,
    add_bias: bool,
    #[comptime] has_norm: bool,
    #[comptime] rows_per_cube: usize,
) {
    if has_norm {
        let local = row - block_first;
        if local < rows_per_cube {
            sums[local] = sum;
        }
    } else {
        add_row(acc_out, bias, at, row, rows, sum, any, add_bias);
    }
}

/// Adds one row's sum (and its bias with `add_bias`) into `acc_out[at + row]`, for a row
/// inside the output when `any` says there is something to add. Returns the value the add
/// found (0 when nothing was added), for [`last_cube_layer_norm`] to wait on.
#[cube]
#[allow(clippy::too_many_arguments)] // the sum, where it goes, and the bias
fn add_row<F: Float>(
    acc_out: &mut Array<Atomic<f32>>,
    bias: &Array<F>,
    at: usize,
    row: usize,
    rows: usize,
    sum: f32,
    any: bool,
    add_bias: bool,
) -> f32 {
    let mut found = 0.0f32;
    if any && row < rows {
        let mut y = sum;
        if add_bias {
            y += f32::cast_from(bias[row]);
        }
        found = acc_out[at + row].fetch_add(y);
    }
    found
}

/// Merges `parts` partial softmax states of one head (flash decoding's combine), part `s`
/// at `first + s`: its max at `ml[2·(first + s)]` and its sum of exponentials after it, its
/// unnormalised `Σ p·V` for column vector `cv` at `o[(first + s)·hd_vectors + cv]`. With `M`
/// the largest max, returns `(Σ_s e^(m_s − M)·o_s, Σ_s e^(m_s − M)·l_s)`, summed in part
/// order; a part with nothing in it (max −3e38, sums 0) adds nothing.
#[cube]
fn merge_softmax_parts<N: Size, LM: List<f32>, LO: List<Vector<f32, N>>>(
    ml: &LM,
    o: &LO,
    first: usize,
    parts: usize,
    cv: usize,
    #[comptime] hd_vectors: usize,
) -> (Vector<f32, N>, f32) {
    let mut m = f32::new(-3.0e38);
    for s in 0..parts {
        m = f32::max(m, ml.read((first + s) * 2));
    }
    let mut l = 0.0f32;
    let mut sum = Vector::<f32, N>::new(0.0f32);
    for s in 0..parts {
        let w = f32::exp(ml.read((first + s) * 2) - m);
        l += w * ml.read((first + s) * 2 + 1);
        sum += o.read((first + s) * hd_vectors + cv) * Vector::<f32, N>::new(w);
    }
    (sum, l)
}

/// Merges the splits of [`selected_heads_attention_kernel`]: with `M` the largest split
/// max, `out = Σ_s e^(m_s − M)·o_s / Σ_s e^(m_s − M)·l_s`, in split order. Cube `(j, b)`,
/// one unit per column vector. Empty slots (no live split: every sum 0) write zeros.
#[cube(launch_unchecked)]
pub(crate) fn combine_attention_splits_kernel<F: Float, N: Size>(
    ws_o: &Array<Vector<f32, N>>,
    ws_ml: &Array<f32>,
    out: &mut Array<Vector<F, N>>,
    out_stride: usize,
    splits: usize,
    #[comptime] hd_vectors: usize,
    #[define(F)] _dtype: StorageType,
) {
    let cv = UNIT_POS_X as usize;
    let j = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let slots = CUBE_COUNT_X as usize;
    let first = (b * slots + j) * splits;
    let (mut o, l) = merge_softmax_parts::<N, Array<f32>, Array<Vector<f32, N>>>(ws_ml, ws_o, first, splits, cv, hd_vectors);
    if l > 0.0f32 {
        o /= Vector::<f32, N>::new(l);
    }
    out[b * out_stride + j * hd_vectors + cv] = Vector::<F, N>::cast_from(o);
}

/// LayerNorm of each row of `x [rows, d]`: `(x − mean) / sqrt(var + eps) · gamma + beta`
/// with the biased variance, statistics in f32 (two passes over the row, which the second
/// reads from cache), `gamma` and `beta` f32 as OPT keeps them. One cube per row; a decode
/// step's LayerNorm is one launch instead of the eight or so of composed tensor ops.
#[cube(launch_unchecked)]
pub(crate) fn layer_norm_kernel<F: Float, O: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    gamma: &Array<Vector<f32, N>>,
    beta: &Array<Vector<f32, N>>,
    out: &mut Array<Vector<O, N>>,
    width: usize,
    x_stride: usize,
    out_stride: usize,
    inv_width: f32,
    eps: f32,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
    #[define(F, O)] _dtypes: [StorageType; 2],
) {
    let mut red = SharedMemory::<f32>::new(threads);
    let r = CUBE_POS_X as usize;
    layer_norm_row(x, gamma, beta, out, width, r * x_stride, r * out_stride, inv_width, eps, UNIT_POS_X as usize, &mut red, threads, plane);
}

/// One row of [`layer_norm_kernel`], by the cube's `threads` units (`tid` each).
#[cube]
#[allow(clippy::too_many_arguments)] // the row, its parameters and the cube's layout
fn layer_norm_row<F: Float, O: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    gamma: &Array<Vector<f32, N>>,
    beta: &Array<Vector<f32, N>>,
    out: &mut Array<Vector<O, N>>,
    width: usize,
    x_base: usize,
    o_base: usize,
    inv_width: f32,
    eps: f32,
    tid: usize,
    red: &mut SharedMemory<f32>,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
) {
    if width <= threads {
        // One vector per unit: the row, gamma and beta loaded together up front and the
        // row kept in registers, where the loops below wait on gamma and beta only after
        // both reductions.
        let live = tid < width;
        let mut v = Vector::<f32, N>::new(0.0f32);
        let mut g = Vector::<f32, N>::new(0.0f32);
        let mut b = Vector::<f32, N>::new(0.0f32);
        if live {
            v = Vector::<f32, N>::cast_from(x[x_base + tid]);
            g = gamma[tid];
            b = beta[tid];
        }
        let mut sum = 0.0f32;
        #[unroll]
        for l in 0..N::value() {
            sum += v[l];
        }
        let mean = cube_reduce(red, sum, tid, threads, false, plane) * inv_width;
        let mut centered = Vector::<f32, N>::new(0.0f32);
        if live {
            centered = v - Vector::<f32, N>::new(mean);
        }
        let mut squares = 0.0f32;
        #[unroll]
        for l in 0..N::value() {
            squares += centered[l] * centered[l];
        }
        let var = cube_reduce(red, squares, tid, threads, false, plane) * inv_width;
        let inv_std = 1.0f32 / f32::sqrt(var + eps);
        if live {
            out[o_base + tid] = Vector::<O, N>::cast_from(centered * Vector::<f32, N>::new(inv_std) * g + b);
        }
    } else {
        // Wider rows: each unit strides over the row, three passes (the second and third
        // read the row from cache).
        let mut sum = 0.0f32;
        let mut c = tid;
        while c < width {
            let v = Vector::<f32, N>::cast_from(x[x_base + c]);
            #[unroll]
            for l in 0..N::value() {
                sum += v[l];
            }
            c += threads;
        }
        let mean = cube_reduce(red, sum, tid, threads, false, plane) * inv_width;

        let mut squares = 0.0f32;
        c = tid;
        while c < width {
            let v = Vector::<f32, N>::cast_from(x[x_base + c]) - Vector::<f32, N>::new(mean);
            #[unroll]
            for l in 0..N::value() {
                squares += v[l] * v[l];
            }
            c += threads;
        }
        let var = cube_reduce(red, squares, tid, threads, false, plane) * inv_width;
        let inv_std = 1.0f32 / f32::sqrt(var + eps);

        c = tid;
        while c < width {
            let v = (Vector::<f32, N>::cast_from(x[x_base + c]) - Vector::<f32, N>::new(mean)) * Vector::<f32, N>::new(inv_std);
            out[o_base + c] = Vector::<O, N>::cast_from(v * gamma[c] + beta[c]);
            c += threads;
        }
    }
}

/// One lane's share of `W[w_base ..] · cur` (returned) and of `W[w_base ..] · ring[slots[q]
/// ..]` for the first `owed_count` of `owed_max` ring inputs (into `sums[q]`), over
/// `width` vectors: each weight vector is loaded once for all the inputs, the ring's
/// vectors come from L1 (every row of the cube reads the same ones). A lazily written
/// head's positions in one pass over its rows. Zeros where `live` is false. Two weight
/// vectors in flight and scalar sums: with four in flight and a vector accumulator the
/// launch took 86 registers a unit, one 512-unit cube an SM (24% of warps active against
/// 45%), and 38.0 µs a layer against 36.0 for the every-head write (window 4, run 131).
#[cube]
#[allow(clippy::too_many_arguments)] // the row, the inputs and the layout
fn lane_dots_owed<F: Float, N: Size, L: List<Vector<F, N>>>(
    w: &Array<Vector<F, N>>,
    w_base: usize,
    cur: &L,
    ring: &Array<Vector<F, N>>,
    slots: &Array<usize>,
    owed_count: usize,
    sums: &mut Array<f32>,
    live: bool,
    lane: usize,
    group: usize,
    width: usize,
    #[comptime] owed_max: usize,
) -> f32 {
    let mut partial = 0.0f32;
    #[unroll]
    for q in 0..owed_max {
        sums[q] = 0.0f32;
    }
    if live {
        let mut t = lane;
        while t + group < width {
            let w0 = Vector::<f32, N>::cast_from(w[w_base + t]);
            let w1 = Vector::<f32, N>::cast_from(w[w_base + t + group]);
            partial += vector_dot(w0, Vector::<f32, N>::cast_from(cur.read(t))) + vector_dot(w1, Vector::<f32, N>::cast_from(cur.read(t + group)));
            #[unroll]
            for q in 0..owed_max {
                if q < owed_count {
                    let s = slots[q] + t;
                    sums[q] += vector_dot(w0, Vector::<f32, N>::cast_from(ring[s])) + vector_dot(w1, Vector::<f32, N>::cast_from(ring[s + group]));
                }
            }
            t += 2 * group;
        }
        if t < width {
            let wv = Vector::<f32, N>::cast_from(w[w_base + t]);
            partial += vector_dot(wv, Vector::<f32, N>::cast_from(cur.read(t)));
            #[unroll]
            for q in 0..owed_max {
                if q < owed_count {
                    sums[q] += vector_dot(wv, Vector::<f32, N>::cast_from(ring[slots[q] + t]));
                }
            }
        }
    }
    partial
}

/// Row `j` of `[k_proj; v_proj]` (the first `half` rows are keys) with its bias, stored
/// at `offset` of the key or the value cache: the write every path of
/// [`kv_append_kernel`] ends with.
#[cube]
#[allow(clippy::too_many_arguments)] // the row's sum and where it goes
fn write_kv<F: Float>(
    total: f32,
    bias: &Array<F>,
    j: usize,
    half: usize,
    offset: usize,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    #[comptime] has_bias: bool,
) {
    let mut y = total;
    if has_bias {
        y += f32::cast_from(bias[j]);
    }
    if j < half {
        k_cache[offset] = F::cast_from(y);
    } else {
        v_cache[offset] = F::cast_from(y);
    }
}

/// The keys and values of one new position, written straight into the caches: row `j` of
/// `kv [2·H·hd, d]` (k_proj's rows, then v_proj's) dotted with `x[b, :]` plus `bias[j]`
/// goes to `k_cache[b, h, pos, c]` (`j < H·hd`) or `v_cache[b, h, pos, c]`, with
/// `h·hd + c = j mod H·hd`. One launch instead of two GEMVs and two cache writes; the
/// same lane layout as `rows_gemv_kernel`. With `has_query` the first `query.cubes` cubes
/// compute the queries instead (`rows_gemv_kernel` of `q_w`, all heads or the selected
/// ones): q, k and v of a decode step in one launch. Each cube does one job, so the
/// reductions never diverge inside a cube. With `has_first` (batch 1), cubes after those
/// write the first factor of the next layer's attention predictor from the layer's
/// residual (`down`, `residual`, `first`; [`first_factor_row`]). With `norm_in` (batch 1)
/// the input is the f32 residual `xf` itself: each cube applies its LayerNorm for its own
/// rows ([`cube_layer_norm_shared`] with `gamma`, then [`normed_row_total`] with the rows'
/// `W · beta + bias` in `q_fold`, `kv_fold`), so no launch before had to write it; lazily,
/// the ring then gets the LayerNorm's output (`beta` added), from which the positions a
/// head still owes are recomputed with `bias`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // the keys', values' and queries' inputs
pub(crate) fn kv_append_kernel<F: Float, N: Size, I: Int, P: Float>(
    kv: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    bias: &Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    q_w: &Array<Vector<F, N>>,
    q_idx: &Array<I>,
    q_bias: &Array<F>,
    q_out: &mut Array<F>,
    pending_in: &Array<I>,
    pending_out: &mut Array<I>,
    ring: &mut Array<Vector<F, N>>,
    down: &Array<P>,
    residual: &Array<f32>,
    first: &mut Array<f32>,
    xf: &Array<Vector<f32, N>>,
    gamma: &Array<Vector<f32, N>>,
    beta: &Array<Vector<f32, N>>,
    q_fold: &Array<f32>,
    kv_fold: &Array<f32>,
    shape: KvShape,
    query: QueryShape,
    lazy_shape: LazyShape,
    first_shape: FirstFactorShape,
    norm: NormShape,
    pos: usize,
    #[comptime] has_bias: bool,
    #[comptime] has_query: bool,
    #[comptime] q_gathered: bool,
    #[comptime] has_q_bias: bool,
    #[comptime] lazy: bool,
    #[comptime] group: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] use_plane: bool,
    #[comptime] has_first: bool,
    #[comptime] norm_in: bool,
    #[comptime] norm_vectors: usize,
    #[comptime] owed_max: usize,
    #[define(F, I, P)] _dtypes: [StorageType; 3],
) {
    let mut scratch = SharedMemory::<f32>::new(group * rows_per_cube);
    let lane = UNIT_POS_X as usize;
    let mut cube = CUBE_POS_X as usize;
    let plane = comptime!(if use_plane && rows_per_cube <= group { group } else { 0 });
    if has_first && cube >= first_shape.after {
        first_factor_row(down, residual, first, cube - first_shape.after, first_shape, &mut scratch, group * rows_per_cube, plane);
        terminate!();
    }
    let rows = shape.rows;
    let half = rows / 2;
    let hd = shape.head_dim;
    let window = lazy_shape.window;
    // Lazily (batch 1), a key-and-value cube decides first, before any LayerNorm, which
    // positions its head writes: head `h` is written when selected, or when its oldest
    // unwritten position would otherwise leave the ring next step; then every position
    // from its first unwritten one to `pos`. A cube's rows are all in one head (the
    // launcher takes one row a cube where its rows per cube do not divide the head dim),
    // so the decision is the cube's, and a cube with nothing to write ends here.
    let mut lazy_first = pos + 1;
    if lazy && cube >= query.cubes {
        let base = (cube - query.cubes) * rows_per_cube;
        if base < rows {
            let h = (base % half) / hd;
            let pending = usize::cast_from(pending_in[h]);
            let mut selected = false;
            for i in 0..lazy_shape.sel_len {
                if usize::cast_from(q_idx[i]) == h {
                    selected = true;
                }
            }
            if selected || pending + window <= pos + 1 {
                lazy_first = pending;
            }
            // The head's first key row (column 0 of a key block) writes its next pending.
            let column = base % hd;
            if column == 0 && base < half && UNIT_POS_Y == 0 && lane == 0 {
                let mut next = pending;
                if lazy_first <= pos {
                    next = pos + 1;
                }
                pending_out[h] = I::cast_from(next);
            }
        }
        if lazy_first > pos {
            terminate!();
        }
    }
    let mut xs = SharedMemory::<Vector<F, N>>::new(norm_vectors);
    let mut inv_std = 0.0f32;
    if norm_in {
        inv_std = cube_layer_norm_shared(xf, gamma, shape.width, norm, &mut xs, &mut scratch, group * rows_per_cube, plane);
    }
    // The ring keeps this step's layer input (the LayerNorm's output) for the steps that
    // recompute it; its slot held position `pos - window`, which no head still needs.
    // Cube 0 computes queries, which a lazy launch always has.
    if lazy && cube == 0 && UNIT_POS_Y == 0 {
        let slot = (pos % window) * shape.width;
        let mut t = lane;
        while t < shape.width {
            if norm_in {
                ring[slot + t] = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(xs[t]) * Vector::<f32, N>::new(inv_std) + beta[t]);
            } else {
                ring[slot + t] = x[t];
            }
            t += group;
        }
    }
    if has_query {
        if cube < query.cubes {
            let j = cube * rows_per_cube + UNIT_POS_Y as usize;
            let in_range = j < query.outputs;
            let mut row = query.rows;
            if in_range {
                row = row_of(q_idx, j, query.block, query.rows, q_gathered);
            }
            let live = row < query.rows;
            if norm_in {
                let total = normed_row_total(q_w, row * query.w_stride, &xs, inv_std, q_fold, row, live, lane, shape.width, &mut scratch, group, use_plane);
                if lane == 0 && in_range {
                    q_out[j] = F::cast_from(total);
                }
            } else {
                for b in 0..shape.batch {
                    let mut partial = 0.0f32;
                    if live {
                        partial = lane_dot(q_w, row * query.w_stride, x, b * shape.x_stride, lane, group, shape.width);
                    }
                    let total = group_sum(partial, &mut scratch, group, use_plane);
                    if lane == 0 && in_range {
                        q_out[b * query.out_stride + j] = F::cast_from(finish_row(total, q_bias, row, live, has_q_bias, false));
                    }
                }
            }
            terminate!();
        }
        cube -= query.cubes;
    }
    let j = cube * rows_per_cube + UNIT_POS_Y as usize;
    let in_range = j < rows;
    let w_base = j * shape.w_stride;
    let jj = j % half;
    let h = jj / hd;
    let c = jj % hd;
    if lazy {
        // This position, then the positions the head still owes, each from its input in
        // the ring. Where it owes none, the plain row dot of the every-head write; where
        // it does, one pass over the row for all of them ([`lane_dots_owed`]): re-reading
        // the row for each owed position (from L2, one after another) cost what the
        // skipped heads saved (the launch 36.35 µs a layer against 36.00 writing every
        // head, at 30–88 MB of DRAM reads against 79–98; 6.7B shape, window 4, run 130).
        let owed_count = pos - lazy_first;
        let mut sums = Array::<f32>::new(owed_max);
        let mut partial = 0.0f32;
        if owed_count == 0 {
            if in_range {
                partial = if norm_in {
                    lane_dot_list::<F, F, N, SharedMemory<Vector<F, N>>>(kv, w_base, &xs, 0, lane, group, shape.width)
                } else {
                    lane_dot(kv, w_base, x, 0, lane, group, shape.width)
                };
            }
        } else {
            let mut slots = Array::<usize>::new(owed_max);
            #[unroll]
            for q in 0..owed_max {
                slots[q] = ((lazy_first + q) % window) * shape.width;
            }
            partial = if norm_in {
                lane_dots_owed::<F, N, SharedMemory<Vector<F, N>>>(kv, w_base, &xs, ring, &slots, owed_count, &mut sums, in_range, lane, group, shape.width, owed_max)
            } else {
                lane_dots_owed::<F, N, Array<Vector<F, N>>>(kv, w_base, x, ring, &slots, owed_count, &mut sums, in_range, lane, group, shape.width, owed_max)
            };
        }
        let total = group_sum(partial, &mut scratch, group, use_plane);
        if lane == 0 && in_range {
            let mut y = total;
            if norm_in {
                y = total * inv_std + kv_fold[j];
            }
            let offset = h * shape.cache_head_stride + pos * shape.cache_pos_stride + c;
            write_kv(y, bias, j, half, offset, k_cache, v_cache, comptime!(has_bias && !norm_in));
        }
        #[unroll]
        for q in 0..owed_max {
            if q < owed_count {
                let total = group_sum(sums[q], &mut scratch, group, use_plane);
                if lane == 0 && in_range {
                    let offset = h * shape.cache_head_stride + (lazy_first + q) * shape.cache_pos_stride + c;
                    write_kv(total, bias, j, half, offset, k_cache, v_cache, has_bias);
                }
            }
        }
    } else if norm_in {
        let total = normed_row_total(kv, w_base, &xs, inv_std, kv_fold, j, in_range, lane, shape.width, &mut scratch, group, use_plane);
        if lane == 0 && in_range {
            let offset = h * shape.cache_head_stride + pos * shape.cache_pos_stride + c;
            write_kv(total, bias, j, half, offset, k_cache, v_cache, false);
        }
    } else {
        for b in 0..shape.batch {
            let x_base = b * shape.x_stride;
            let mut partial = 0.0f32;
            if in_range {
                partial = lane_dot(kv, w_base, x, x_base, lane, group, shape.width);
            }
            let total = group_sum(partial, &mut scratch, group, use_plane);
            if lane == 0 && in_range {
                let offset = b * shape.cache_batch_stride + h * shape.cache_head_stride + pos * shape.cache_pos_stride + c;
                write_kv(total, bias, j, half, offset, k_cache, v_cache, has_bias);
            }
        }
    }
}

/// `out[b, j] = act(W[j, :] · x[b, :] + bias[j])` for the rows whose predictor logit
/// `gate[j]` is above `threshold`, 0 for the others (which read nothing). Selection fused
/// into fc1: no index list, no selection launch; fc2 then skips the zero rows. Batch 1
/// (one gate row). The lane layout of `rows_gemv_kernel`.
#[cube(launch_unchecked)]
pub(crate) fn gated_rows_gemv_kernel<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    gate: &Array<f32>,
    x: &Array<Vector<F, N>>,
    bias: &Array<F>,
    out: &mut Array<F>,
    shape: GemvShape,
    threshold: f32,
    #[comptime] has_bias: bool,
    #[comptime] relu: bool,
    #[comptime] group: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] use_plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let mut scratch = SharedMemory::<f32>::new(group * rows_per_cube);
    let lane = UNIT_POS_X as usize;
    let j = CUBE_POS_X as usize * rows_per_cube + UNIT_POS_Y as usize;
    let mut live = false;
    if j < shape.rows {
        live = gate[j] > threshold;
    }
    gated_row(w, x, bias, out, shape, j, live, lane, &mut scratch, has_bias, relu, group, use_plane);
}

/// Output row `j` of a gated fc1 (batch 1): `act(W[j, :] · x + bias[j])` where `live`
/// (uniform across the row's lane group), else 0 without reading the row.
#[cube]
#[allow(clippy::too_many_arguments)] // the row, its inputs and the kernel's layout
fn gated_row<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    bias: &Array<F>,
    out: &mut Array<F>,
    shape: GemvShape,
    j: usize,
    live: bool,
    lane: usize,
    scratch: &mut SharedMemory<f32>,
    #[comptime] has_bias: bool,
    #[comptime] relu: bool,
    #[comptime] group: usize,
    #[comptime] use_plane: bool,
) {
    let mut partial = 0.0f32;
    if live {
        partial = lane_dot(w, j * shape.w_stride, x, 0, lane, group, shape.width);
    }
    let total = group_sum(partial, scratch, group, use_plane);
    if lane == 0 && j < shape.rows {
        out[j] = F::cast_from(finish_row(total, bias, j, live, has_bias, relu));
    }
}

/// One unit's share of a predictor row's logit: `Σ up[base + e] · h[e]` over `e = start,
/// start + step, ..` below `r`, in f32. Eight loads in flight, then four, then one at a
/// time: a rank-128 row is four loads a lane of a plane, or sixteen a unit where 8 units
/// share it, and one load at a time made the logit that many round trips to memory.
#[cube]
fn strided_dot<P: Float>(up: &Array<P>, base: usize, h: &Array<f32>, start: usize, step: usize, r: usize) -> f32 {
    let mut partial = 0.0f32;
    let mut e = start;
    while e + 7 * step < r {
        let u0 = f32::cast_from(up[base + e]);
        let u1 = f32::cast_from(up[base + e + step]);
        let u2 = f32::cast_from(up[base + e + 2 * step]);
        let u3 = f32::cast_from(up[base + e + 3 * step]);
        let u4 = f32::cast_from(up[base + e + 4 * step]);
        let u5 = f32::cast_from(up[base + e + 5 * step]);
        let u6 = f32::cast_from(up[base + e + 6 * step]);
        let u7 = f32::cast_from(up[base + e + 7 * step]);
        partial += u0 * h[e] + u1 * h[e + step] + u2 * h[e + 2 * step] + u3 * h[e + 3 * step];
        partial += u4 * h[e + 4 * step] + u5 * h[e + 5 * step] + u6 * h[e + 6 * step] + u7 * h[e + 7 * step];
        e += 8 * step;
    }
    while e + 3 * step < r {
        let u0 = f32::cast_from(up[base + e]);
        let u1 = f32::cast_from(up[base + e + step]);
        let u2 = f32::cast_from(up[base + e + 2 * step]);
        let u3 = f32::cast_from(up[base + e + 3 * step]);
        partial += u0 * h[e] + u1 * h[e + step] + u2 * h[e + 2 * step] + u3 * h[e + 3 * step];
        e += 4 * step;
    }
    while e < r {
        partial += f32::cast_from(up[base + e]) * h[e];
        e += step;
    }
    partial
}

/// A low-rank predictor's logit for row `j`: `up[j, :] · h` (f32, `r` values), summed by
/// the row's lane group (every lane gets it). Rows past `rows` give -3e38: never above a
/// threshold.
#[cube]
fn predicted_logit<P: Float>(
    up: &Array<P>,
    h: &Array<f32>,
    predictor: PredictorShape,
    j: usize,
    rows: usize,
    lane: usize,
    scratch: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] use_plane: bool,
) -> f32 {
    let mut partial = 0.0f32;
    if j < rows {
        partial = strided_dot(up, j * predictor.up_stride, h, lane, group, predictor.rank);
    }
    let total = group_sum_all(partial, scratch, group, use_plane);
    let mut logit = f32::new(-3.0e38);
    if j < rows {
        logit = total;
    }
    logit
}

/// A predictor's first factor on cubes of their own inside another launch (batch 1): cube
/// `j` of them writes `first[j] = down[j, :] · x` (f32), every unit of the cube on the row
/// (`down [rows, width]` row-major, `x` the residual `[width]` in f32). The launch that
/// reads a residual for its own work carries the predictor that reads the same residual,
/// so the predictor needs no launch of its own.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct FirstFactorShape {
    pub rows: usize,
    pub width: usize,
    /// Cubes of the launch's own work, before the first factor's.
    pub after: usize,
}

/// Row `j` of a first factor ([`FirstFactorShape`]) by one cube of `threads` units.
#[cube]
#[allow(clippy::too_many_arguments)] // the factor, the residual, the output and the cube's layout
fn first_factor_row<P: Float>(
    down: &Array<P>,
    x: &Array<f32>,
    first: &mut Array<f32>,
    j: usize,
    shape: FirstFactorShape,
    red: &mut SharedMemory<f32>,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
) {
    let tid = UNIT_POS as usize;
    let live = j < shape.rows;
    let mut partial = 0.0f32;
    if live {
        partial = strided_dot(down, j * shape.width, x, tid, threads, shape.width);
    }
    let total = cube_reduce(red, partial, tid, threads, false, plane);
    if tid == 0 && live {
        first[j] = total;
    }
}

/// [`gated_rows_gemv_kernel`] with the gate computed in the same launch: row `j`'s group
/// first takes its predictor logit `up[j, :] · h` (the low-rank predictor's second
/// factor, f32 `[rows, r]`, `h` its first factor's output `[r]`) and reads fc1's row only
/// when that is above `threshold`. Predictor, selection and fc1 in one launch; no logits
/// or index list in memory. (Several rows per lane group, their logits' loads issued
/// together, was slower on the H100: 24.6 µs against 13.7 at the 6.7B shape, `kernels
/// --tune`.)
///
/// Two more jobs may ride in the same launch, on cubes of their own after fc1's: with
/// `has_first`, the first factor of the next layer's MLP predictor from the same
/// residual ([`first_factor_row`], `down`, `residual`, `first`); with `has_select`, the
/// next layer's head selection from the first factor its attention predictor left
/// (`select_by_predictor`: `sel_up`, `sel_h`, `idx`, `count`), on the last cube.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // fc1's, the predictor's, and the riders' inputs
pub(crate) fn predicted_rows_gemv_kernel<F: Float, P: Float, N: Size, I: Int>(
    w: &Array<Vector<F, N>>,
    up: &Array<P>,
    h: &Array<f32>,
    x: &Array<Vector<F, N>>,
    bias: &Array<F>,
    out: &mut Array<F>,
    down: &Array<P>,
    residual: &Array<f32>,
    first: &mut Array<f32>,
    sel_up: &Array<P>,
    sel_h: &Array<f32>,
    idx: &mut Array<I>,
    count: &mut Array<I>,
    shape: GemvShape,
    predictor: PredictorShape,
    first_shape: FirstFactorShape,
    sel_predictor: PredictorShape,
    threshold: f32,
    sel_rows: usize,
    sel_capacity: usize,
    sel_threshold: f32,
    #[comptime] has_bias: bool,
    #[comptime] relu: bool,
    #[comptime] group: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] use_plane: bool,
    #[comptime] has_first: bool,
    #[comptime] has_select: bool,
    #[comptime] sel_max_rows: usize,
    #[define(F, P, I)] _dtypes: [StorageType; 3],
) {
    let mut scratch = SharedMemory::<f32>::new(group * rows_per_cube);
    let cube = CUBE_POS_X as usize;
    if (has_first || has_select) && cube >= first_shape.after {
        let j = cube - first_shape.after;
        if has_first && j < first_shape.rows {
            let plane = comptime!(if use_plane && rows_per_cube <= group { group } else { 0 });
            first_factor_row(down, residual, first, j, first_shape, &mut scratch, group * rows_per_cube, plane);
        } else if has_select {
            let mut logits = SharedMemory::<f32>::new(sel_max_rows);
            select_by_predictor(sel_up, sel_h, idx, count, sel_predictor, sel_rows, sel_capacity, sel_threshold, &mut scratch, &mut logits, group, rows_per_cube, use_plane);
        }
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let j = cube * rows_per_cube + UNIT_POS_Y as usize;
    let logit = predicted_logit(up, h, predictor, j, shape.rows, lane, &mut scratch, group, use_plane);
    // Every lane of the group holds the same logit, so `live` is uniform.
    gated_row(w, x, bias, out, shape, j, logit > threshold, lane, &mut scratch, has_bias, relu, group, use_plane);
}

/// The decode step's sparse MLP up to fc2's split sums in one launch (batch 1): cube `s`
/// owns the `split_rows` consecutive neurons `s·split_rows ..` and
/// 1. scores them with the predictor (`up [rows, r] · h`, `threads / split_rows` lanes a
///    row, one round of loads) and lists those above `threshold` in shared memory;
/// 2. computes fc1 for the listed rows only (`relu(W1[row] · x + b1[row])`, one 32-lane
///    group a row, [`lane_dot`]'s eight loads in flight), the hidden values kept in
///    shared memory;
/// 3. lists the rows whose hidden value is not 0 (after ReLU many are), and
/// 4. adds those rows of the transposed fc2 into `partial[s, :]` (f32), each unit owning
///    whole column vectors, eight rows' loads in flight.
///
/// [`sum_partials_kernel`] then adds the splits with bias and residual, as after the
/// separate kernels. Against `predicted_rows_gemv_kernel` followed by
/// `rows_transposed_gemv_compact_kernel` this saves a launch and its ramp-up, and the
/// hidden values' round trip through memory, at the cost of one f32 row of partial sums
/// per `split_rows` neurons (the compacting fc2 writes one per 128). The split's phases
/// depend on each other inside a cube, so each keeps many loads in flight per unit, and
/// several cubes per SM overlap one another's phases.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // fc1's, the predictor's and fc2's inputs
#[allow(clippy::collapsible_if)] // `&&` is not short-circuit in a kernel: it would read past `hidden`
pub(crate) fn predicted_mlp_kernel<F: Float, P: Float, N: Size>(
    w1: &Array<Vector<F, N>>,
    up: &Array<P>,
    h: &Array<f32>,
    x: &Array<Vector<F, N>>,
    b1: &Array<F>,
    w2: &Array<Vector<F, N>>,
    partial: &mut Array<Vector<f32, N>>,
    shape: GemvShape,
    w2_stride: usize,
    predictor: PredictorShape,
    threshold: f32,
    #[comptime] has_bias: bool,
    #[comptime] split_rows: usize,
    #[comptime] group: usize,
    #[comptime] groups: usize,
    #[comptime] use_plane: bool,
    #[define(F, P)] _dtypes: [StorageType; 2],
) {
    let threads = comptime!(group * groups);
    let per_row = comptime!(threads / split_rows);
    let mut scratch = SharedMemory::<f32>::new(threads);
    let mut counts = SharedMemory::<u32>::new(threads);
    let mut totals = SharedMemory::<u32>::new(comptime!(threads.div_ceil(32)));
    let mut listed = SharedMemory::<u32>::new(split_rows);
    let mut hidden = SharedMemory::<f32>::new(split_rows);
    let mut live_rows = SharedMemory::<u32>::new(split_rows);
    let mut live_h = SharedMemory::<f32>::new(split_rows);
    let lane = UNIT_POS_X as usize;
    let g = UNIT_POS_Y as usize;
    let t = g * group + lane;
    let rows = shape.rows;
    let first = CUBE_POS_X as usize * split_rows;

    // 1. Logits: unit `t` sums every `per_row`-th rank element of row `t / per_row`.
    let q = t / per_row;
    let sub = t % per_row;
    let j = first + q;
    let mut part = 0.0f32;
    if j < rows {
        part = strided_dot(up, j * predictor.up_stride, h, sub, per_row, predictor.rank);
    }
    scratch[t] = part;
    sync_cube();
    let mut selected = 0u32;
    if t < split_rows && first + t < rows {
        let mut logit = 0.0f32;
        for i in 0..per_row {
            logit += scratch[t * per_row + i];
        }
        if logit > threshold {
            selected = 1u32;
        }
    }
    let at = exclusive_count(selected, t, &mut counts, &mut totals, threads);
    let n = usize::cast_from(total_count(&totals, threads));
    if selected == 1u32 {
        listed[usize::cast_from(at)] = u32::cast_from(t);
    }
    sync_cube();

    // 2. fc1 of the listed rows, a lane group each. Every group runs the same rounds
    // (`group_sum` may sync the cube).
    #[allow(clippy::manual_div_ceil)] // div_ceil is not a cube operation
    let rounds = (n + groups - 1) / groups;
    for round in 0..rounds {
        let i = round * groups + g;
        let live = i < n;
        let mut row = rows;
        let mut dot = 0.0f32;
        if live {
            row = first + usize::cast_from(listed[i]);
            dot = lane_dot(w1, row * shape.w_stride, x, 0, lane, group, shape.width);
        }
        let total = group_sum(dot, &mut scratch, group, use_plane);
        if lane == 0 && live {
            hidden[i] = finish_row(total, b1, row, true, has_bias, true);
        }
    }
    sync_cube();

    // 3. The rows fc2 reads: listed, with a hidden value that is not 0.
    let mut nonzero = 0u32;
    if t < n {
        if hidden[t] != 0.0f32 {
            nonzero = 1u32;
        }
    }
    let at2 = exclusive_count(nonzero, t, &mut counts, &mut totals, threads);
    let m = usize::cast_from(total_count(&totals, threads));
    if nonzero == 1u32 {
        live_rows[usize::cast_from(at2)] = u32::cast_from(first) + listed[t];
        live_h[usize::cast_from(at2)] = hidden[t];
    }
    sync_cube();

    // 4. fc2: unit `t` owns column vectors `t, t + threads, ..` of the split's sum.
    let width = shape.width;
    let mut c = t;
    while c < width {
        let mut acc = Vector::<f32, N>::new(0.0f32);
        let mut i = 0usize;
        while i + 7 < m {
            let w0 = w2[usize::cast_from(live_rows[i]) * w2_stride + c];
            let w1v = w2[usize::cast_from(live_rows[i + 1]) * w2_stride + c];
            let w2v = w2[usize::cast_from(live_rows[i + 2]) * w2_stride + c];
            let w3 = w2[usize::cast_from(live_rows[i + 3]) * w2_stride + c];
            let w4 = w2[usize::cast_from(live_rows[i + 4]) * w2_stride + c];
            let w5 = w2[usize::cast_from(live_rows[i + 5]) * w2_stride + c];
            let w6 = w2[usize::cast_from(live_rows[i + 6]) * w2_stride + c];
            let w7 = w2[usize::cast_from(live_rows[i + 7]) * w2_stride + c];
            acc += Vector::<f32, N>::cast_from(w0) * Vector::<f32, N>::new(live_h[i]);
            acc += Vector::<f32, N>::cast_from(w1v) * Vector::<f32, N>::new(live_h[i + 1]);
            acc += Vector::<f32, N>::cast_from(w2v) * Vector::<f32, N>::new(live_h[i + 2]);
            acc += Vector::<f32, N>::cast_from(w3) * Vector::<f32, N>::new(live_h[i + 3]);
            acc += Vector::<f32, N>::cast_from(w4) * Vector::<f32, N>::new(live_h[i + 4]);
            acc += Vector::<f32, N>::cast_from(w5) * Vector::<f32, N>::new(live_h[i + 5]);
            acc += Vector::<f32, N>::cast_from(w6) * Vector::<f32, N>::new(live_h[i + 6]);
            acc += Vector::<f32, N>::cast_from(w7) * Vector::<f32, N>::new(live_h[i + 7]);
            i += 8;
        }
        while i < m {
            acc += Vector::<f32, N>::cast_from(w2[usize::cast_from(live_rows[i]) * w2_stride + c]) * Vector::<f32, N>::new(live_h[i]);
            i += 1;
        }
        partial[CUBE_POS_X as usize * width + c] = acc;
        c += threads;
    }
}

/// Head selection with its predictor in one cube: the logits `up · h` of `rows` heads
/// (f32 `[rows, r]` and `[r]`), each by one lane group into shared memory, then the
/// ascending indices of those above `threshold` into `idx`, padded with `rows` to its
/// length, and their number into `count[0]`. `rows` is small (OPT has at most 96 heads),
/// so one unit compacts them serially.
#[cube(launch_unchecked)]
pub(crate) fn predict_select_kernel<P: Float, I: Int>(
    up: &Array<P>,
    h: &Array<f32>,
    idx: &mut Array<I>,
    count: &mut Array<I>,
    predictor: PredictorShape,
    rows: usize,
    capacity: usize,
    threshold: f32,
    #[comptime] max_rows: usize,
    #[comptime] group: usize,
    #[comptime] groups: usize,
    #[comptime] use_plane: bool,
    #[define(P, I)] _dtypes: [StorageType; 2],
) {
    let mut scratch = SharedMemory::<f32>::new(group * groups);
    let mut logits = SharedMemory::<f32>::new(max_rows);
    select_by_predictor(up, h, idx, count, predictor, rows, capacity, threshold, &mut scratch, &mut logits, group, groups, use_plane);
}

/// The body of [`predict_select_kernel`], for one cube of `groups` lane groups.
#[cube]
#[allow(clippy::too_many_arguments)] // the predictor, the outputs and the cube's layout
fn select_by_predictor<P: Float, I: Int>(
    up: &Array<P>,
    h: &Array<f32>,
    idx: &mut Array<I>,
    count: &mut Array<I>,
    predictor: PredictorShape,
    rows: usize,
    capacity: usize,
    threshold: f32,
    scratch: &mut SharedMemory<f32>,
    logits: &mut SharedMemory<f32>,
    #[comptime] group: usize,
    #[comptime] groups: usize,
    #[comptime] use_plane: bool,
) {
    let lane = UNIT_POS_X as usize;
    let g = UNIT_POS_Y as usize;
    // Every group runs the same number of rounds (group_sum may sync the cube).
    #[allow(clippy::manual_div_ceil)] // div_ceil is not a cube operation
    let rounds = (rows + groups - 1) / groups;
    for round in 0..rounds {
        let j = round * groups + g;
        let logit = predicted_logit(up, h, predictor, j, rows, lane, scratch, group, use_plane);
        if lane == 0 && j < rows {
            logits[j] = logit;
        }
    }
    sync_cube();
    if lane == 0 && g == 0 {
        let mut written = 0usize;
        for j in 0..rows {
            if logits[j] > threshold {
                if written < capacity {
                    idx[written] = I::cast_from(j);
                }
                written += 1;
            }
        }
        let mut p = written;
        while p < capacity {
            idx[p] = I::cast_from(rows);
            p += 1;
        }
        count[0] = I::cast_from(written);
    }
}

/// A pre-LN decode step's layer input, three jobs in one launch (batch 1): the LayerNorm of
/// the residual `x [1, d]` into `normed`; the first factor of the next layer's predictor,
/// `first [1, r] = down · x` (f32, from `down [r, d]` in f32 or the model's dtype, reading
/// the residual as it is stored);
/// and with `has_select`, this layer's head selection from the first factor the layer
/// before left (`up · h` above `threshold`, as [`predict_select_kernel`]). Cubes
/// `0..gemv_cubes` each take one row of `down`, cube `gemv_cubes` the LayerNorm,
/// cube `gemv_cubes + 1` the selection. The three read the same residual and none needs
/// another's output, so the sparse path's predictors cost no launches of their own.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)] // three jobs' inputs and outputs
pub(crate) fn norm_predict_kernel<F: Float, O: Float, P: Float, N: Size, I: Int>(
    x: &Array<Vector<F, N>>,
    gamma: &Array<Vector<f32, N>>,
    beta: &Array<Vector<f32, N>>,
    normed: &mut Array<Vector<O, N>>,
    down: &Array<Vector<P, N>>,
    first: &mut Array<f32>,
    up: &Array<P>,
    h: &Array<f32>,
    idx: &mut Array<I>,
    count: &mut Array<I>,
    width: usize,
    down_rows: usize,
    down_stride: usize,
    gemv_cubes: usize,
    predictor: PredictorShape,
    select_rows: usize,
    capacity: usize,
    inv_width: f32,
    eps: f32,
    threshold: f32,
    #[comptime] group: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] use_plane: bool,
    #[comptime] has_select: bool,
    #[comptime] max_rows: usize,
    #[define(F, O, P, I)] _dtypes: [StorageType; 4],
) {
    let mut scratch = SharedMemory::<f32>::new(group * rows_per_cube);
    let cube = CUBE_POS_X as usize;
    let tid = UNIT_POS_Y as usize * group + UNIT_POS_X as usize;
    // Cube-wide sums by planes where a group is one plane and the cube has at most a
    // plane of them.
    let reduce_plane = comptime!(if use_plane && rows_per_cube <= group { group } else { 0 });
    if cube < gemv_cubes {
        // One row of `down` per cube, every unit of the cube on it: a rank-128 first
        // factor is only 128 rows, and a plane per row left the GEMV on 16 cubes, each
        // lane waiting on its loads in turn (Nsight Compute: 10–16 µs for 2 MB).
        let j = cube;
        let live = j < down_rows;
        let mut partial = 0.0f32;
        if live {
            partial = lane_dot(down, j * down_stride, x, 0, tid, group * rows_per_cube, width);
        }
        let total = cube_reduce(&mut scratch, partial, tid, group * rows_per_cube, false, reduce_plane);
        if tid == 0 && live {
            first[j] = total;
        }
    } else if cube == gemv_cubes {
        // The LayerNorm's reductions use the GEMV cubes' scratch (one value per unit).
        layer_norm_row(x, gamma, beta, normed, width, 0, 0, inv_width, eps, tid, &mut scratch, group * rows_per_cube, reduce_plane);
    } else if has_select {
        let mut logits = SharedMemory::<f32>::new(max_rows);
        select_by_predictor(
            up, h, idx, count, predictor, select_rows, capacity, threshold, &mut scratch, &mut logits, group, rows_per_cube, use_plane,
        );
    }
}
