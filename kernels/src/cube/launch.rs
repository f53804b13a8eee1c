//! Launchers: check shapes, pick vector widths and grids, allocate outputs, launch.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::features::Plane;
use cubecl::server::{MemoryLayout, MemoryLayoutDescriptor};
use cubecl::zspace::metadata::Metadata;
use cubecl::prelude::*;
use cubecl::tensor_vector_size_parallel;

use super::kernels::*;

/// Most threads of the single selection cube.
const SELECT_MAX_THREADS: usize = 1024;

/// Grid shapes of the GEMV kernels. The defaults were picked on an H100 (see
/// `dejavu-bench kernels --tune`); any values work on any device whose cubes hold
/// `cols_per_cube × lanes_k` and `32 × rows_per_cube` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LaunchConfig {
    /// Rows per cube of the row GEMV (one 32-lane group per row).
    pub rows_per_cube: usize,
    /// Column vectors per cube of the transposed GEMV.
    pub cols_per_cube: usize,
    /// Lanes along K per cube of the transposed GEMV (reduced in shared memory).
    pub lanes_k: usize,
    /// Rows each K lane sums before its split ends: fewer means more splits (more
    /// parallelism) and more f32 partials for the second pass to add.
    pub rows_per_lane: usize,
    pub max_splits: usize,
    /// Rows of K per split of the compacting transposed GEMV, for an input over every row
    /// (rounded up to a whole number of rows per unit, at most 32 each); 0 takes the
    /// skipping kernel, whose splits `rows_per_lane` and `max_splits` shape. A gathered
    /// input (its rows mostly live) always takes the skipping kernel: compacting gained
    /// nothing there (`kernels --tune` on the H100, 6.7B shape, 10% of fc2: 18.6 µs
    /// skipping, 19.0 at best compacting), where over every row with 90% zeros it took
    /// 13.5 µs against 22.1, and with half zeros 33.1 against 37.2.
    pub compact_rows: usize,
    /// Neurons each cube of the fused predicted MLP (`predicted_mlp`) owns, a power of
    /// two: fewer means more cubes and more f32 partial sums for the second pass.
    pub fused_mlp_rows: usize,
    /// Units of each fused predicted MLP cube (whole lane groups, a power of two of them;
    /// at most the device's cube). 1024 leaves a unit 64 registers on CUDA.
    pub fused_mlp_threads: usize,
    /// Whether `rows_transposed_gemv_accumulate` adds its splits' sums with f32 atomics
    /// (one launch) where the device has them; `false` takes the two passes.
    pub atomic_accumulate: bool,
    /// `compact_rows` of the one-launch accumulating form (atomic adds, no second pass:
    /// fewer, longer splits mean fewer atomic adds per output). `kernels --tune` on the
    /// H100, 6.7B shape, 10% of fc2's rows live: 13.3 µs at 1024, 14.8 at 512, 19.5 at
    /// 128 (the two-pass form's first pass alone: 13.6 at 128). Over half-live rows (the
    /// dense layers of a model with random weights) 512 took 31.8 µs against 37.3 at 1024
    /// (run 81), but in the 6.7B step (Nsight Compute with warm caches, run 85) what 512
    /// saved in the four dense layers (5.5 µs each) it lost in the 28 sparse ones (0.8 µs
    /// each): 1024 stays.
    pub accumulate_compact_rows: usize,
    /// Rows of `out_proj` per cube of the fused attention and `out_proj`
    /// (`attention_out_proj_accumulate`); each cube computes its head's attention once.
    /// 0 takes the separate kernels (attention, then `block_cols_gemv`); see
    /// `attention_out_proj_atomic_kernel` for what each costs on the H100.
    pub attention_out_rows: usize,
    /// Whether the LayerNorm epilogue of the accumulating launches (`NormArgs`) reads the
    /// finished row with plain loads through a second binding of the accumulator, on CUDA
    /// only (elsewhere, and with `false`, with atomic adds of 0).
    pub norm_plain_reads: bool,
    /// Rows per cube (one 32-lane group each) of `qkv_append` when it applies the
    /// LayerNorm itself (`NormInArgs`): every cube normalizes the residual once into shared
    /// memory, so more rows a cube means fewer of those prologues (each reads the f32
    /// residual and gamma, 32 KiB at 6.7B, from L2). On the H100 (6.7B step, Nsight
    /// Compute, runs 78–79) 16 took 36.0–36.3 µs a layer, 8 36.7 and 32 36.8: within
    /// what a kernel moves between processes.
    pub qkv_norm_rows_per_cube: usize,
    /// Positions a round of the fused attention's online softmax
    /// (`head_attention_online`: each run of units loads its positions' keys and values
    /// together, a round at a time); 0 takes the two-phase softmax (`attention_partials`:
    /// the keys, a cube-wide max, then the values). In the 6.7B step on the H100 (Nsight
    /// Compute with warm caches, run 85) 8 took the fused launch from 21.96 to 19.86 µs a
    /// layer at 256 rows and 256 units; in isolation (`kernels --tune`, runs 81–82) 8 was
    /// ahead of 0, 2 and 4 at 256 rows.
    pub attention_round_positions: usize,
    /// Units of each cube of the fused attention and `out_proj` (a power of two, capped at
    /// the device's cube): with `attention_out_rows` it sets how many cubes recompute a
    /// head's attention and how many loads of `out_proj` each unit keeps in flight. 512
    /// units with 512 rows led in isolation (15.8 µs against 18.8 for 256 with 256, run 82)
    /// but not in the step, with the LayerNorm epilogue and the caches the step leaves
    /// (22.84 against 19.86 µs a layer, 87 registers a unit and 25% of warps active against
    /// 80 and 36%, run 85): 256 stays.
    pub attention_out_threads: usize,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self { rows_per_cube: 8, cols_per_cube: 32, lanes_k: 8, rows_per_lane: 8, max_splits: 256, compact_rows: 128, fused_mlp_rows: 64, fused_mlp_threads: 512, atomic_accumulate: true, accumulate_compact_rows: 1024, attention_out_rows: 256, norm_plain_reads: true, qkv_norm_rows_per_cube: 16, attention_round_positions: 8, attention_out_threads: 256 }
    }
}

/// Widest vector (in elements) that divides the last dimension of every tensor given.
fn vector_width<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
    tensors
        .iter()
        .map(|t| {
            let rank = t.meta.num_dims();
            tensor_vector_size_parallel(
                t.client.io_optimized_vector_sizes(t.dtype.size()),
                t.meta.shape(),
                t.meta.strides(),
                rank - 1,
            )
        })
        .min()
        .unwrap_or(1)
        .max(1)
}

/// [`vector_width`] of a contiguous row of `width` elements of `dtype` (an output not
/// allocated yet).
fn row_vector_width<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType, width: usize) -> usize {
    client.io_optimized_vector_sizes(dtype.size()).filter(|v| width.is_multiple_of(*v)).max().unwrap_or(1).max(1)
}

/// Whether row groups can reduce with plane (warp) shuffles, and the group size: one
/// plane where its size is fixed (CUDA: 32), else 32 lanes through shared memory
/// (lavapipe and other wgpu devices whose subgroup size varies).
fn reduction_group<R: CubeRuntime>(client: &ComputeClient<R>) -> (usize, bool) {
    let props = client.properties();
    let hw = &props.hardware;
    let planes = props.features.plane.contains(Plane::Ops);
    if planes && hw.plane_size_min == hw.plane_size_max && hw.plane_size_max >= 8 {
        (hw.plane_size_max as usize, true)
    } else {
        (32, false)
    }
}

/// The plane size `cube_reduce` may use for a cube of `threads` units (a multiple of
/// it, at most that many planes), or 0 for its shared-memory tree.
fn reduce_plane<R: CubeRuntime>(client: &ComputeClient<R>, threads: usize) -> usize {
    let (group, use_plane) = reduction_group(client);
    if use_plane && threads.is_multiple_of(group) && threads / group <= group { group } else { 0 }
}

fn client_units<R: CubeRuntime>(t: &CubeTensor<R>) -> usize {
    t.client.properties().hardware.max_units_per_cube as usize
}

/// The tensor's shape, borrowed (launchers read it several times a launch).
fn dims<R: CubeRuntime>(t: &CubeTensor<R>) -> &[usize] {
    t.meta.shape()
}

/// The shape a kernel reads a predictor's second factor `up [rows, r]` by.
fn predictor_shape<R: CubeRuntime>(up: &CubeTensor<R>) -> PredictorShapeLaunch<R> {
    PredictorShapeLaunch::new(dims(up)[1], stride(up, 0))
}

/// Stride of dimension `dim`, in elements.
fn stride<R: CubeRuntime>(t: &CubeTensor<R>, dim: usize) -> usize {
    t.meta.strides()[dim]
}

/// A kernel's buffer argument: the kernels take `Array`s, with shapes and strides as scalar
/// arguments (see the module comment of `kernels.rs`).
///
/// Bound from a reference: the buffer's handle and its element count (what
/// `into_array_arg` binds), with no clone of the tensor — its client, boxed metadata and
/// device — which the host paid for each of a launch's up to 18 bindings.
fn arg<R: CubeRuntime>(t: &CubeTensor<R>) -> ArrayArg<R> {
    let len = t.meta.shape().iter().product();
    // SAFETY: the length is the tensor's own element count, as `into_array_arg` has it.
    unsafe { ArrayArg::from_raw_parts(t.handle.clone(), len) }
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::from(shape), dtype)
}

/// Several contiguous tensors in one storage buffer: one allocation, one message to the
/// device's server, where each [`empty`] costs its own (~2 µs of host time a launch at
/// batch 1). For the outputs and workspaces of one launch, which live about as long as
/// each other (the buffer is freed when the last of them is dropped).
fn empties<R: CubeRuntime, const K: usize>(like: &CubeTensor<R>, tensors: [(Vec<usize>, DType); K]) -> [CubeTensor<R>; K] {
    let descriptors = tensors.iter().map(|(shape, dtype)| MemoryLayoutDescriptor::contiguous(Shape::from(shape.clone()), dtype.size())).collect();
    let layouts = like.client.empty_tensors(descriptors);
    let mut made = layouts.into_iter().zip(tensors).map(|(MemoryLayout { memory, strides }, (shape, dtype))| {
        CubeTensor::new(like.client.clone(), memory, Metadata::new(Shape::from(shape), strides), like.device.clone(), dtype)
    });
    std::array::from_fn(|_| made.next().expect("one layout per descriptor"))
}

/// A binding for a kernel argument that this launch's comptime flags leave unread (no
/// index list, no split workspace): an input already bound, so nothing is allocated.
/// A kernel never reads it, whatever element type it declares.
fn unread<R: CubeRuntime>(bound: &CubeTensor<R>) -> CubeTensor<R> {
    bound.clone()
}

/// The bindings of an optional group of a launch's arguments: the tensors when the launch
/// reads them, else `K` borrows of `placeholder`, a buffer already bound that the launch's
/// comptime flag leaves unread (see [`unread`]; borrowed, nothing cloned).
fn bound<'a, R: CubeRuntime, const K: usize>(tensors: &'a Option<[CubeTensor<R>; K]>, placeholder: &'a CubeTensor<R>) -> [&'a CubeTensor<R>; K] {
    match tensors {
        Some(t) => t.each_ref(),
        None => [placeholder; K],
    }
}

/// `out [B, K] = act(W[rows] · x + bias[rows])` with the given grid shapes; see
/// [`crate::SparseKernels::rows_gemv`].
#[allow(clippy::too_many_arguments)] // the kernel's inputs, as the trait method has them
pub fn rows_gemv_with<R: CubeRuntime>(
    w: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    relu: bool,
    int_dtype: DType,
    config: &LaunchConfig,
) -> CubeTensor<R> {
    let rows = dims(&w)[0];
    let batch = dims(&x)[0];
    let k = idx.as_ref().map(|i| dims(i)[0] * block).unwrap_or(rows);
    // The output has the weights' dtype (an f32 predictor may read an f16 residual).
    let out = empty(&x, vec![batch, k], w.dtype);
    rows_gemv_into(w, idx, block, x, bias, relu, int_dtype, out, config)
}

/// [`rows_gemv_with`] into a given contiguous `out [B, K]` (tests poison it first, to see that
/// every element gets written).
#[allow(clippy::too_many_arguments)] // the kernel's inputs, as the trait method has them
pub fn rows_gemv_into<R: CubeRuntime>(
    w: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    relu: bool,
    int_dtype: DType,
    out: CubeTensor<R>,
    config: &LaunchConfig,
) -> CubeTensor<R> {
    let (w, x) = (into_contiguous(w), into_contiguous(x));
    let (rows, cols, batch) = (dims(&w)[0], dims(&w)[1], dims(&x)[0]);
    let block = block.max(1);
    let k = idx.as_ref().map(|i| dims(i)[0] * block).unwrap_or(rows);
    assert_eq!(dims(&out), vec![batch, k], "rows_gemv: output shape");
    if k == 0 || batch == 0 {
        return out;
    }
    let gathered = idx.is_some();
    let idx = idx.map(into_contiguous).unwrap_or_else(|| unread(&x));
    let has_bias = bias.is_some();
    let bias = bias.map(into_contiguous).unwrap_or_else(|| unread(&w));
    let vs = vector_width(&[&w, &x]);
    let (group, use_plane) = reduction_group(&w.client);
    let cubes = k.div_ceil(config.rows_per_cube) as u32;
    let (dtype, x_dtype) = (w.dtype, x.dtype);
    let idx_dtype = if gathered { idx.dtype } else { int_dtype };
    debug_assert_eq!(cols % vs, 0);
    let shape = GemvShapeLaunch::new(rows, cols / vs, stride(&w, 0) / vs, batch, stride(&x, 0) / vs, k, stride(&out, 0));
    unsafe {
        rows_gemv_kernel::launch_unchecked::<R>(
            &out.client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(group as u32, config.rows_per_cube as u32),
            vs,
            arg(&w),
            arg(&idx),
            arg(&x),
            arg(&bias),
            arg(&out),
            shape,
            block,
            gathered,
            has_bias,
            relu,
            group,
            config.rows_per_cube,
            use_plane,
            [dtype.into(), x_dtype.into(), idx_dtype.into()],
        );
    }
    out
}

/// `out [B, rows] = W[:, cols] · x + bias + residual` over the column blocks `idx` picks
/// (`block` columns each; every column when `None`); see
/// [`crate::SparseKernels::block_cols_gemv`].
pub fn block_cols_gemv<R: CubeRuntime>(
    w: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    int_dtype: DType,
) -> CubeTensor<R> {
    let (w, x) = (into_contiguous(w), into_contiguous(x));
    let (rows, cols, batch, width) = (dims(&w)[0], dims(&w)[1], dims(&x)[0], dims(&x)[1]);
    // The output in the residual's dtype (f32 for a residual stream kept in f32).
    let out_dtype = residual.as_ref().map_or(w.dtype, |r| r.dtype);
    let out = empty(&x, vec![batch, rows], out_dtype);
    if rows == 0 || batch == 0 {
        return out;
    }
    let gathered = idx.is_some();
    let idx = idx.map(into_contiguous).unwrap_or_else(|| unread(&x));
    let has_bias = bias.is_some();
    let bias = bias.map(into_contiguous).unwrap_or_else(|| unread(&w));
    let has_residual = residual.is_some();
    let residual = residual.map(into_contiguous).unwrap_or_else(|| unread(&w));
    // A head's columns are whole vectors when the vector width divides the block.
    let block = block.max(1);
    let vs = vector_width(&[&w, &x]);
    let vs = if gathered && !block.is_multiple_of(vs) { 1 } else { vs };
    let (group, use_plane) = reduction_group(&w.client);
    let rows_per_cube = LaunchConfig::default().rows_per_cube;
    let cubes = rows.div_ceil(rows_per_cube) as u32;
    let (dtype, idx_dtype) = (w.dtype, if gathered { idx.dtype } else { int_dtype });
    let shape = GemvShapeLaunch::new(rows, width / vs, stride(&w, 0) / vs, batch, stride(&x, 0) / vs, rows, stride(&out, 0));
    unsafe {
        block_cols_gemv_kernel::launch_unchecked::<R>(
            &out.client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(group as u32, rows_per_cube as u32),
            vs,
            arg(&w),
            arg(&idx),
            arg(&x),
            arg(&bias),
            arg(&residual),
            arg(&out),
            shape,
            block / vs,
            cols / vs,
            gathered,
            has_bias,
            has_residual,
            group,
            rows_per_cube,
            use_plane,
            [dtype.into(), out_dtype.into(), idx_dtype.into()],
        );
    }
    out
}

/// `out [B, D] = Σ_j h[b, j] · Wt[row_j, :] + bias` with the given grid shapes; see
/// [`crate::SparseKernels::rows_transposed_gemv`].
pub fn rows_transposed_gemv_with<R: CubeRuntime>(
    w_t: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    h: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    int_dtype: DType,
    config: &LaunchConfig,
) -> CubeTensor<R> {
    let (batch, cols) = (dims(&h)[0], dims(&w_t)[1]);
    let (splits, _) = transposed_splits(dims(&h)[1], config, idx.is_some());
    // The output and the first pass's partial sums in one allocation.
    let [out, partial] = empties(&h, [(vec![batch, cols], h.dtype), (vec![splits, batch, cols], DType::F32)]);
    transposed_gemv_launch(w_t, idx, block, h, bias, residual, int_dtype, out, partial, config)
}

/// Splits of K for the transposed GEMV's first pass, and the rows each covers: every lane
/// sums about `rows_per_lane` rows; at least one split.
fn transposed_splits(k: usize, config: &LaunchConfig, gathered: bool) -> (usize, usize) {
    if let Some(per_unit) = compact_per_unit(config, gathered) {
        let chunk = per_unit * config.cols_per_cube * config.lanes_k;
        return (k.div_ceil(chunk).max(1), chunk);
    }
    let splits = k.div_ceil(config.lanes_k * config.rows_per_lane).clamp(1, config.max_splits);
    // Whole rows per lane: a lane left with one row fewer than the others finishes its
    // rows in more rounds of loads, and its cube waits for it (6.7B, 10% of fc2: 1638 rows
    // in 26 splits of 63 left the eighth lane seven rows, four in one round, then three
    // one at a time).
    let chunk = k.div_ceil(splits).next_multiple_of(config.lanes_k).max(1);
    (k.div_ceil(chunk).max(1), chunk)
}

/// Rows each unit of the compacting kernel scans (one bit each of a `u32` mask), when
/// `config` asks for that kernel and the input is not gathered.
fn compact_per_unit(config: &LaunchConfig, gathered: bool) -> Option<usize> {
    (config.compact_rows > 0 && !gathered).then(|| config.compact_rows.div_ceil(config.cols_per_cube * config.lanes_k).clamp(1, 32))
}

/// [`rows_transposed_gemv_with`] into a given contiguous `out [B, d]`.
#[allow(clippy::too_many_arguments)] // the kernel's inputs, as the trait method has them
pub fn rows_transposed_gemv_into<R: CubeRuntime>(
    w_t: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    h: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    int_dtype: DType,
    out: CubeTensor<R>,
    config: &LaunchConfig,
) -> CubeTensor<R> {
    let (splits, _) = transposed_splits(dims(&h)[1], config, idx.is_some());
    let partial = empty(&h, vec![splits, dims(&h)[0], dims(&w_t)[1]], DType::F32);
    transposed_gemv_launch(w_t, idx, block, h, bias, residual, int_dtype, out, partial, config)
}

/// Both passes of the transposed GEMV into `out [B, d]`, with `partial [splits, B, d]`
/// (f32) for the first pass's sums.
#[allow(clippy::too_many_arguments)] // the kernel's inputs, its output and workspace
fn transposed_gemv_launch<R: CubeRuntime>(
    w_t: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    h: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    int_dtype: DType,
    out: CubeTensor<R>,
    partial: CubeTensor<R>,
    config: &LaunchConfig,
) -> CubeTensor<R> {
    let (w_t, h) = (into_contiguous(w_t), into_contiguous(h));
    let cols = dims(&w_t)[1];
    let (batch, k) = (dims(&h)[0], dims(&h)[1]);
    assert_eq!(dims(&out), vec![batch, cols], "rows_transposed_gemv: output shape");
    if batch == 0 || cols == 0 {
        return out;
    }
    let gathered = idx.is_some();
    let idx = idx.map(into_contiguous).unwrap_or_else(|| unread(&h));
    let bias = bias.map(into_contiguous);
    let residual = residual.map(into_contiguous);
    if let Some(r) = &residual {
        assert_eq!(dims(r), vec![batch, cols], "rows_transposed_gemv: residual shape");
    }

    let mut vectors = vec![&w_t];
    vectors.extend(bias.iter());
    vectors.extend(residual.iter());
    let vs = vector_width(&vectors);
    let (splits, chunk) = transposed_splits(k, config, gathered);
    assert_eq!(dims(&partial), vec![splits, batch, cols], "rows_transposed_gemv: partial sums' shape");
    let col_blocks = (cols / vs).div_ceil(config.cols_per_cube) as u32;
    let dtype = w_t.dtype;
    let idx_dtype = if gathered { idx.dtype } else { int_dtype };
    let shape = TransposedShapeLaunch::new(dims(&w_t)[0], cols / vs, stride(&w_t, 0) / vs, k, batch, stride(&h, 0));
    unsafe {
        let cubes = CubeCount::Static(col_blocks, splits as u32, 1);
        let cube_dim = CubeDim::new_2d(config.cols_per_cube as u32, config.lanes_k as u32);
        if let Some(per_unit) = compact_per_unit(config, gathered) {
            rows_transposed_gemv_compact_kernel::launch_unchecked::<R>(
                &out.client,
                cubes,
                cube_dim,
                vs,
                arg(&w_t),
                arg(&h),
                arg(&partial),
                shape,
                config.cols_per_cube,
                config.lanes_k,
                per_unit,
                dtype.into(),
            );
        } else {
            rows_transposed_gemv_partial_kernel::launch_unchecked::<R>(
                &out.client,
                cubes,
                cube_dim,
                vs,
                arg(&w_t),
                arg(&idx),
                arg(&h),
                arg(&partial),
                shape,
                chunk,
                block.max(1),
                gathered,
                config.cols_per_cube,
                config.lanes_k,
                [dtype.into(), idx_dtype.into()],
            );
        }
    }
    sum_partials(partial, bias, residual, out, splits, vs)
}

/// Whether the device adds f32 atomically in its buffers (CUDA does; wgpu where the
/// adapter has `SHADER_FLOAT32_ATOMIC`).
pub fn supports_atomic_f32_add<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    use cubecl::ir::{ElemType, FloatKind, StorageType, Type};
    let atomic = Type::new(StorageType::Atomic(ElemType::Float(FloatKind::F32)));
    client.properties().atomic_type_usage(atomic).contains(cubecl::ir::features::AtomicUsage::Add)
}

/// `acc [B, d] (f32) + Σ_j h[b, j] · Wt[row_j, :] + bias` in one launch: the first pass's
/// cubes add their split sums into `acc` with f32 atomics (split 0 adds the bias), where
/// [`rows_transposed_gemv_with`] writes partial sums and a second launch adds them. `acc`
/// is updated in place when nothing else holds its buffer (else copied first). The
/// device must have f32 atomic adds ([`supports_atomic_f32_add`]).
#[allow(clippy::too_many_arguments)] // the kernel's inputs, as the trait method has them
pub fn rows_transposed_gemv_accumulate<R: CubeRuntime>(
    w_t: CubeTensor<R>,
    idx: Option<CubeTensor<R>>,
    block: usize,
    h: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    acc: CubeTensor<R>,
    norm: Option<NormArgs<R>>,
    int_dtype: DType,
    config: &LaunchConfig,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    let (w_t, h) = (into_contiguous(w_t), into_contiguous(h));
    let cols = dims(&w_t)[1];
    let (batch, k) = (dims(&h)[0], dims(&h)[1]);
    assert_eq!(dims(&acc), vec![batch, cols], "rows_transposed_gemv_accumulate: accumulator shape");
    assert_eq!(acc.dtype, DType::F32, "rows_transposed_gemv_accumulate: accumulator dtype");
    if !config.atomic_accumulate || !supports_atomic_f32_add(&acc.client) {
        // Both passes, the second adding `acc` into a new f32 output.
        let (splits, _) = transposed_splits(k, config, idx.is_some());
        let [out, partial] = empties(&h, [(vec![batch, cols], DType::F32), (vec![splits, batch, cols], DType::F32)]);
        return (transposed_gemv_launch(w_t, idx, block, h, bias, Some(acc), int_dtype, out, partial, config), None);
    }
    let acc = into_contiguous(acc);
    let acc = if acc.can_mut() { acc } else { acc.copy() };
    if batch == 0 || cols == 0 || k == 0 && bias.is_none() {
        return (acc, None);
    }
    let config = &LaunchConfig { compact_rows: config.accumulate_compact_rows, ..*config };
    let gathered = idx.is_some();
    let idx = idx.map(into_contiguous).unwrap_or_else(|| unread(&h));
    let has_bias = bias.is_some();
    let bias = bias.map(into_contiguous);
    let mut vectors = vec![&w_t];
    vectors.extend(bias.iter());
    let vs = vector_width(&vectors);
    let (splits, chunk) = transposed_splits(k, config, gathered);
    let col_blocks = (cols / vs).div_ceil(config.cols_per_cube) as u32;
    let dtype = w_t.dtype;
    let idx_dtype = if gathered { idx.dtype } else { int_dtype };
    let shape = TransposedShapeLaunch::new(dims(&w_t)[0], cols / vs, stride(&w_t, 0) / vs, k, batch, stride(&h, 0));
    let acc_stride = stride(&acc, 0);
    let cubes = CubeCount::Static(col_blocks, splits as u32, 1);
    let cube_dim = CubeDim::new_2d(config.cols_per_cube as u32, config.lanes_k as u32);
    if let Some(per_unit) = compact_per_unit(config, gathered) {
        // Over every row (a dense or gated fc2, its `h` mostly zeros after the ReLU): the
        // compacting first pass, as in the two-pass form.
        let threads = config.cols_per_cube * config.lanes_k;
        // The kernel's own shared memory: the lanes' sums and the compacted row list, and
        // with the epilogue its reduction's.
        let used = 4 * (threads * vs + threads * per_unit + threads);
        let e = norm_epilogue(norm, &acc, w_t.dtype, threads, used);
        let [e_done, e_gamma, e_beta, e_normed] = bound(&e.tensors, &acc);
        let plain = e.has_norm && plain_reads(&acc.client, config);
        unsafe {
            rows_transposed_gemv_compact_atomic_kernel::launch_unchecked::<R>(
                &acc.client,
                cubes,
                cube_dim,
                vs,
                arg(&w_t),
                arg(&h),
                arg(bias.as_ref().unwrap_or(&w_t)),
                arg(&acc),
                arg(&acc),
                arg(e_done),
                arg(e_gamma),
                arg(e_beta),
                arg(e_normed),
                shape,
                e.shape,
                acc_stride,
                has_bias,
                config.cols_per_cube,
                config.lanes_k,
                per_unit,
                e.has_norm,
                e.plane,
                e.row,
                plain,
                dtype.into(),
            );
        }
        return (acc, e.out);
    }
    unsafe {
        rows_transposed_gemv_atomic_kernel::launch_unchecked::<R>(
            &acc.client,
            cubes,
            cube_dim,
            vs,
            arg(&w_t),
            arg(&idx),
            arg(&h),
            arg(bias.as_ref().unwrap_or(&w_t)),
            arg(&acc),
            shape,
            chunk,
            block.max(1),
            acc_stride,
            gathered,
            has_bias,
            config.cols_per_cube,
            config.lanes_k,
            [dtype.into(), idx_dtype.into()],
        );
    }
    (acc, None)
}

/// The transposed GEMV's second pass: `out [B, d] = Σ_s partial[s] + bias + residual`
/// (`partial [splits, B, d]` f32, the bias in the weights' dtype, the residual in `out`'s,
/// vectors of `vs`).
fn sum_partials<R: CubeRuntime>(
    partial: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    out: CubeTensor<R>,
    splits: usize,
    vs: usize,
) -> CubeTensor<R> {
    let (batch, cols) = (dims(&out)[0], dims(&out)[1]);
    let residual_stride = residual.as_ref().map_or(0, |r| stride(r, 0) / vs);
    let out_stride = stride(&out, 0) / vs;
    let (has_bias, has_residual) = (bias.is_some(), residual.is_some());
    // The bias has the weights' dtype; the residual and the output may be f32 instead
    // (`rows_transposed_gemv_accumulate` without atomics).
    let bias_dtype = bias.as_ref().map_or(out.dtype, |b| b.dtype);
    // Lanes along the splits: enough that each adds a handful.
    let lanes_s = splits.div_ceil(4).next_power_of_two().clamp(1, 32);
    let sum_cols = (256 / lanes_s).max(1);
    unsafe {
        sum_partials_kernel::launch_unchecked::<R>(
            &out.client,
            CubeCount::Static((cols / vs).div_ceil(sum_cols) as u32, batch as u32, 1),
            CubeDim::new_2d(sum_cols as u32, lanes_s as u32),
            vs,
            arg(&partial),
            arg(bias.as_ref().unwrap_or(&out)),
            arg(residual.as_ref().unwrap_or(&out)),
            arg(&out),
            cols / vs,
            batch,
            splits,
            residual_stride,
            out_stride,
            has_bias,
            has_residual,
            sum_cols,
            lanes_s,
            [bias_dtype.into(), out.dtype.into()],
        );
    }
    out
}

/// Units of each argmax cube and vectors each unit reads.
const ARGMAX_THREADS: usize = 256;
const ARGMAX_PER_UNIT: usize = 4;

/// The index of each row's largest value of `x [rows, width]` (the first on a tie), as
/// `int_dtype` `[rows]`; see [`crate::SparseKernels::argmax_rows`]. Two launches: cubes
/// over each row's parts, then one cube a row over its parts.
pub fn argmax_rows<R: CubeRuntime>(x: CubeTensor<R>, int_dtype: DType) -> CubeTensor<R> {
    // Rows apart by more than their width are read in place (on CUDA a matmul's output
    // rows are pitched, and making them contiguous took a copy launch of the logits).
    let x = if stride(&x, 1) == 1 { x } else { into_contiguous(x) };
    let [rows, width] = [dims(&x)[0], dims(&x)[1]];
    if rows == 0 || width == 0 {
        return empty(&x, vec![rows], int_dtype);
    }
    let vs = vector_width(&[&x]);
    let width_vectors = width / vs;
    let threads = ARGMAX_THREADS.min(client_units(&x));
    let parts = width_vectors.div_ceil(threads * ARGMAX_PER_UNIT);
    // A decode step's argmax: its output and the parts' workspace in one allocation.
    let [out, part_vals, part_idxs] = empties(&x, [(vec![rows], int_dtype), (vec![rows * parts], DType::F32), (vec![rows * parts], DType::U32)]);
    let (dtype, x_stride) = (x.dtype, stride(&x, 0) / vs);
    let client = x.client.clone();
    unsafe {
        argmax_parts_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(parts as u32, rows as u32, 1),
            CubeDim::new_1d(threads as u32),
            vs,
            arg(&x),
            arg(&part_vals),
            arg(&part_idxs),
            width_vectors,
            x_stride,
            threads,
            ARGMAX_PER_UNIT,
            dtype.into(),
        );
        // Parts are few (13 for OPT's vocabulary): a cube of 32 units a row.
        let finish_threads = parts.next_power_of_two().clamp(32, threads);
        argmax_finish_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(finish_threads as u32),
            arg(&part_vals),
            arg(&part_idxs),
            arg(&out),
            parts,
            finish_threads,
            int_dtype.into(),
        );
    }
    out
}

/// The decoder's input rows `table[tokens] + positions` as `out_dtype` `[n, d]`; see
/// [`crate::SparseKernels::embed_rows`]. One launch with `Array` arguments, where Burn's
/// lookup, add and cast were three, each uploading its tensors' shapes.
pub fn embed_rows<R: CubeRuntime>(tokens: CubeTensor<R>, table: CubeTensor<R>, positions: CubeTensor<R>, out_dtype: DType) -> CubeTensor<R> {
    let (tokens, table, positions) = (into_contiguous(tokens), into_contiguous(table), into_contiguous(positions));
    let [n, d] = [dims(&positions)[0], dims(&positions)[1]];
    let out = empty(&table, vec![n, d], out_dtype);
    if n == 0 || d == 0 {
        return out;
    }
    let vs = vector_width(&[&table, &positions, &out]);
    let width = d / vs;
    let threads = width.next_power_of_two().clamp(32, 256).min(client_units(&table));
    // Enough cubes a row for one vector a unit.
    let cubes_per_row = width.div_ceil(threads);
    let (dtype, int_dtype, vocab) = (table.dtype, tokens.dtype, dims(&table)[0]);
    let (table_stride, pos_stride) = (stride(&table, 0) / vs, stride(&positions, 0) / vs);
    let client = table.client.clone();
    unsafe {
        embed_rows_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(n as u32, cubes_per_row as u32, 1),
            CubeDim::new_1d(threads as u32),
            vs,
            arg(&tokens),
            arg(&table),
            arg(&positions),
            arg(&out),
            width,
            vocab,
            table_stride,
            pos_stride,
            [dtype.into(), out_dtype.into(), int_dtype.into()],
        );
    }
    out
}

/// Indices (ascending) of the logits above `threshold` in any batch row, padded with `n`
/// to `capacity`, and the number selected; see [`crate::SparseKernels::select_above_threshold`].
pub fn select_above_threshold<R: CubeRuntime>(
    logits: CubeTensor<R>,
    threshold: f32,
    capacity: usize,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let logits = into_contiguous(logits);
    let n = dims(&logits)[1];
    let idx = empty(&logits, vec![capacity.max(1)], int_dtype);
    let count = empty(&logits, vec![1], int_dtype);
    // Each thread owns 32 logits: as many threads as that takes, 32 to 1024 (larger
    // inputs take several rounds).
    let threads = n.div_ceil(32).next_power_of_two().clamp(32, SELECT_MAX_THREADS.min(client_units(&logits)));
    // Vectors must tile a thread's 32 logits.
    let vs = vector_width(&[&logits]).min(32);
    let dtype = logits.dtype;
    let client = logits.client.clone();
    let (batch, logits_stride) = (dims(&logits)[0], stride(&logits, 0));
    unsafe {
        select_above_threshold_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(threads as u32),
            vs,
            arg(&logits),
            threshold,
            arg(&idx),
            arg(&count),
            n,
            batch,
            logits_stride,
            capacity.max(1),
            threads,
            vs,
            [dtype.into(), int_dtype.into()],
        );
    }
    (idx, count)
}

/// Positions one attention cube covers when a head's context is split across cubes.
const ATTENTION_CHUNK: usize = 128;
/// Contexts up to this long take one cube per head and no merge launch. At 130–256
/// positions two splits cost 9.6 µs plus 4.3 µs for the merge on the H100 (Nsight Compute,
/// 6.7B shape, 16 heads) and one more launch of host time; one 512-unit cube holds every
/// position's score and reads the head's keys and values in two round trips.
const ONE_CUBE_MAX_LEN: usize = 256;

/// Decode attention over the selected heads; see
/// [`crate::SparseKernels::selected_heads_attention`]. Contexts longer than one chunk are
/// split across cubes and merged by a second kernel.
pub fn selected_heads_attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    heads: CubeTensor<R>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    len: usize,
    scale: f32,
) -> CubeTensor<R> {
    let (q, heads) = (into_contiguous(q), into_contiguous(heads));
    let (k_cache, v_cache) = (into_contiguous(k_cache), into_contiguous(v_cache));
    let [batch, _, cap, hd] = [dims(&k_cache)[0], dims(&k_cache)[1], dims(&k_cache)[2], dims(&k_cache)[3]];
    let slots = dims(&heads)[0];
    let len = len.min(cap);
    // One cube per head up to ONE_CUBE_MAX_LEN positions, else chunks of ATTENTION_CHUNK.
    let splits = if len <= ONE_CUBE_MAX_LEN { 1 } else { len.div_ceil(ATTENTION_CHUNK) };
    let split = splits > 1;
    // The split workspace, only where there are splits to merge, allocated with the output.
    let (out, ws) = if split {
        let [out, ws_o, ws_ml] = empties(
            &q,
            [(vec![batch, slots * hd], q.dtype), (vec![batch, slots, splits, hd], DType::F32), (vec![batch, slots, splits, 2], DType::F32)],
        );
        (out, Some((ws_o, ws_ml)))
    } else {
        (empty(&q, vec![batch, slots * hd], q.dtype), None)
    };
    if slots == 0 || batch == 0 {
        return out;
    }
    let vs = vector_width(&[&q, &k_cache, &v_cache]);
    let hd_vectors = hd / vs;
    // One split: the whole context in one cube (512 threads keep its loads in flight).
    // Several: a chunk per cube, 128 threads.
    let max_units = client_units(&q);
    let threads = if split { 128 } else { 512 }.min(max_units).max(hd_vectors.next_power_of_two());
    let chunk = if split { ATTENTION_CHUNK } else { len.max(1) };
    let max_chunk = if split { ATTENTION_CHUNK } else { cap.max(1) };
    let (ws_o, ws_ml) = ws.unwrap_or_else(|| (unread(&out), unread(&out)));
    let (dtype, idx_dtype) = (q.dtype, heads.dtype);
    let client = q.client.clone();
    let shape = attention_shape(&q, &k_cache, &v_cache, slots, stride(&out, 0) / vs, vs);
    let out_stride = stride(&out, 0) / vs;
    unsafe {
        selected_heads_attention_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(slots as u32, splits as u32, batch as u32),
            CubeDim::new_1d(threads as u32),
            vs,
            arg(&q),
            arg(&heads),
            arg(&k_cache),
            arg(&v_cache),
            arg(&out),
            arg(&ws_o),
            arg(&ws_ml),
            shape,
            len,
            chunk,
            scale,
            threads,
            max_chunk,
            hd_vectors,
            split,
            [dtype.into(), idx_dtype.into()],
        );
        if split {
            combine_attention_splits_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(slots as u32, batch as u32, 1),
                CubeDim::new_1d(hd_vectors as u32),
                vs,
                arg(&ws_o),
                arg(&ws_ml),
                arg(&out),
                out_stride,
                splits,
                hd_vectors,
                dtype.into(),
            );
        }
    }
    out
}

/// The attention kernels' sizes for `slots` selected heads (strides in vectors of `vs`);
/// the keys and values must be laid out alike.
fn attention_shape<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k_cache: &CubeTensor<R>,
    v_cache: &CubeTensor<R>,
    slots: usize,
    out_stride: usize,
    vs: usize,
) -> AttentionShapeLaunch<R> {
    assert_eq!(k_cache.meta.strides(), v_cache.meta.strides(), "decode attention: keys and values laid out alike");
    AttentionShapeLaunch::new(
        slots,
        dims(k_cache)[1],
        stride(q, 0) / vs,
        out_stride,
        stride(k_cache, 0) / vs,
        stride(k_cache, 1) / vs,
        stride(k_cache, 2) / vs,
    )
}

/// The LayerNorm an accumulating launch applies to its finished row in its last cube
/// (batch 1): f32 `gamma`, `beta` `[d]`, epsilon, and `done`, a zeroed `u32` (or `i32`)
/// counter of at least one element that the launch leaves zeroed — one per sequence, as
/// launches that share it must run one after another.
pub struct NormArgs<R: CubeRuntime> {
    pub gamma: CubeTensor<R>,
    pub beta: CubeTensor<R>,
    pub eps: f32,
    pub done: CubeTensor<R>,
}

/// Whether the LayerNorm epilogue reads with plain loads ([`LaunchConfig::norm_plain_reads`]):
/// on CUDA only, where the adds are made in L2 and no cube of the launch has loaded the
/// row before, so no cache above L2 holds an old copy; elsewhere the row is read with
/// atomics.
fn plain_reads<R: CubeRuntime>(client: &ComputeClient<R>, config: &LaunchConfig) -> bool {
    config.norm_plain_reads && R::name(client) == "cuda"
}

/// Static shared memory a CUDA cube may declare; the LayerNorm epilogue keeps its row
/// there and is left out (the caller then runs the LayerNorm itself) where it would not
/// fit beside the kernel's own.
const SHARED_BYTES: usize = 48 * 1024;

/// The LayerNorm epilogue's launch arguments ([`NormArgs`]): its bindings (the accumulator
/// itself in each slot where there is no epilogue, never read then), its shape, comptime
/// plane and row length, and the normalized row when there is one.
struct NormEpilogue<R: CubeRuntime> {
    has_norm: bool,
    /// `done`, `gamma`, `beta` and `normed`, when there is an epilogue.
    tensors: Option<[CubeTensor<R>; 4]>,
    shape: NormShapeLaunch<R>,
    plane: usize,
    row: usize,
    out: Option<CubeTensor<R>>,
}

/// [`NormEpilogue`] for a row of `width` f32 beside `used` bytes of the kernel's own shared
/// memory on cubes of `threads` units; none where no norm is asked, the batch is not 1 or
/// the row would not fit.
fn norm_epilogue<R: CubeRuntime>(norm: Option<NormArgs<R>>, acc: &CubeTensor<R>, normed_dtype: DType, threads: usize, used: usize) -> NormEpilogue<R> {
    let [batch, width] = [dims(acc)[0], dims(acc)[1]];
    match norm {
        Some(NormArgs { gamma, beta, eps, done })
            if batch == 1 && width > 0 && used + 4 * width <= SHARED_BYTES && dims(&gamma) == vec![width] && dims(&beta) == vec![width] =>
        {
            let normed = empty(acc, vec![1, width], normed_dtype);
            NormEpilogue {
                has_norm: true,
                tensors: Some([into_contiguous(done), into_contiguous(gamma), into_contiguous(beta), normed.clone()]),
                shape: NormShapeLaunch::new(width, 1.0 / width as f32, eps),
                plane: reduce_plane(&acc.client, threads),
                row: width,
                out: Some(normed),
            }
        }
        _ => NormEpilogue {
            has_norm: false,
            tensors: None,
            shape: NormShapeLaunch::new(0, 0.0, 0.0),
            plane: 0,
            row: 1,
            out: None,
        },
    }
}

/// Decode attention over the selected heads with `out_proj` over their columns added into
/// `acc [B, rows]` (f32, the residual stream), bias included; see
/// [`crate::SparseKernels::attention_out_proj_accumulate`]. One launch
/// (`attention_out_proj_atomic_kernel`) where the device adds f32 atomically, the context
/// fits one cube per head and `config.attention_out_rows` > 0; else the attention kernel
/// and `block_cols_gemv` into a new f32 output. `acc` is updated in place when nothing else
/// holds its buffer (else copied first).
#[allow(clippy::too_many_arguments)] // attention's inputs, out_proj's and the accumulator
pub fn attention_out_proj_accumulate<R: CubeRuntime>(
    q: CubeTensor<R>,
    heads: CubeTensor<R>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    len: usize,
    scale: f32,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    acc: CubeTensor<R>,
    norm: Option<NormArgs<R>>,
    config: &LaunchConfig,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    assert_eq!(acc.dtype, DType::F32, "attention_out_proj_accumulate: accumulator dtype");
    let [batch, _, cap, hd] = [dims(&k_cache)[0], dims(&k_cache)[1], dims(&k_cache)[2], dims(&k_cache)[3]];
    let len = len.min(cap);
    let (q, heads, w) = (into_contiguous(q), into_contiguous(heads), into_contiguous(w));
    let (k_cache, v_cache) = (into_contiguous(k_cache), into_contiguous(v_cache));
    let vs = vector_width(&[&q, &k_cache, &v_cache, &w]);
    let hd_vectors = hd / vs.max(1);
    let (plane, use_plane) = reduction_group(&q.client);
    let threads = config.attention_out_threads.min(client_units(&q));
    // The two-phase softmax's cube-wide reduction halves its units level by level.
    let fused = config.attention_out_rows > 0
        && threads.is_power_of_two()
        && len <= ONE_CUBE_MAX_LEN
        && supports_atomic_f32_add(&acc.client)
        && hd.is_multiple_of(vs)
        && hd_vectors.is_power_of_two()
        && hd_vectors <= 32
        && threads.is_multiple_of(hd_vectors)
        && threads >= hd_vectors;
    if !fused {
        let out = selected_heads_attention(q, heads.clone(), k_cache, v_cache, len, scale);
        let int_dtype = heads.dtype;
        return (block_cols_gemv(w, Some(heads), hd, out, bias, Some(acc), int_dtype), None);
    }
    let acc = into_contiguous(acc);
    let acc = if acc.can_mut() { acc } else { acc.copy() };
    let slots = dims(&heads)[0];
    let rows = dims(&w)[0];
    if batch == 0 || rows == 0 || slots == 0 {
        return (acc, None);
    }
    // The kernel's own shared memory: scores, the reduction, the value lanes, o and q, and
    // with the epilogue the rows' sums.
    let used = 4 * (cap.max(1) + threads + threads * vs + 2 * hd + config.attention_out_rows);
    let e = norm_epilogue(norm, &acc, w.dtype, threads, used);
    let [e_done, e_gamma, e_beta, e_normed] = bound(&e.tensors, &acc);
    let plain = e.has_norm && plain_reads(&acc.client, config);
    // Shuffles within a run of `hd_vectors` units stay inside one plane.
    let use_plane = use_plane && plane.is_multiple_of(hd_vectors);
    let has_bias = bias.is_some();
    let bias = bias.map(into_contiguous).unwrap_or_else(|| unread(&w));
    let rows_per_cube = config.attention_out_rows;
    // The online softmax keeps each run's max and sum in `red` (2 values a run of
    // `hd_vectors` units): runs of one unit take the two-phase form.
    let round_positions = if hd_vectors >= 2 { config.attention_round_positions } else { 0 };
    let shape = attention_shape(&q, &k_cache, &v_cache, slots, 0, vs);
    let (dtype, idx_dtype) = (q.dtype, heads.dtype);
    let (w_stride, acc_stride) = (stride(&w, 0) / vs, stride(&acc, 0));
    unsafe {
        attention_out_proj_atomic_kernel::launch_unchecked::<R>(
            &acc.client,
            CubeCount::Static(rows.div_ceil(rows_per_cube) as u32, slots as u32, batch as u32),
            CubeDim::new_1d(threads as u32),
            vs,
            arg(&q),
            arg(&heads),
            arg(&k_cache),
            arg(&v_cache),
            arg(&w),
            arg(&bias),
            arg(&acc),
            arg(&acc),
            arg(e_done),
            arg(e_gamma),
            arg(e_beta),
            arg(e_normed),
            shape,
            e.shape,
            rows,
            w_stride,
            acc_stride,
            len,
            scale,
            threads,
            cap.max(1),
            hd_vectors,
            rows_per_cube,
            has_bias,
            use_plane,
            e.has_norm,
            e.plane,
            e.row,
            plain,
            round_positions,
            [dtype.into(), idx_dtype.into()],
        );
    }
    (acc, e.out)
}

/// LayerNorm of each row of `x [rows, d]` with f32 `gamma`, `beta` `[d]`; see
/// [`crate::SparseKernels::layer_norm_rows`].
pub fn layer_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    beta: CubeTensor<R>,
    eps: f32,
    out_dtype: DType,
) -> CubeTensor<R> {
    let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
    let [rows, d] = [dims(&x)[0], dims(&x)[1]];
    let out = empty(&x, vec![rows, d], out_dtype);
    if rows == 0 || d == 0 {
        return out;
    }
    let vs = vector_width(&[&x, &gamma, &beta, &out]);
    // A power of two (the reduction's tree), at most 1024: up to that width a unit holds one
    // vector of the row (`layer_norm_row`'s one-pass path).
    let threads = (d / vs).next_power_of_two().clamp(32, 1024).min(client_units(&x));
    let dtype = x.dtype;
    let client = x.client.clone();
    let (x_stride, out_stride) = (stride(&x, 0) / vs, stride(&out, 0) / vs);
    unsafe {
        layer_norm_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(threads as u32),
            vs,
            arg(&x),
            arg(&gamma),
            arg(&beta),
            arg(&out),
            d / vs,
            x_stride,
            out_stride,
            1.0 / d as f32,
            eps,
            threads,
            reduce_plane(&client, threads),
            [dtype.into(), out_dtype.into()],
        );
    }
    out
}

/// Keys and values of one new position into the caches; see
/// [`crate::SparseKernels::kv_append`]. Writes `k_cache` and `v_cache` in place (the
/// caller holds their only handles) and returns them.
pub fn kv_append<R: CubeRuntime>(
    kv: CubeTensor<R>,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    pos: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (_, k, v, _) = qkv_append(None, kv, x, bias, k_cache, v_cache, pos, DType::I32, None, None);
    (k, v)
}

/// A LayerNorm that `qkv_append` applies to its input itself (batch 1), so that no launch
/// before has to write it: `x` is then the f32 residual `[1, d]`, `gamma` `[d]` f32, and
/// `q_fold`, `kv_fold` hold `W[row] · beta + bias[row]` per row of the queries' and the
/// keys' and values' weights, f32 ([`crate::RowFold`]), which replace the biases. A lazy
/// launch also reads `beta` `[d]` f32: its ring keeps the LayerNorm's output.
pub struct NormInArgs<R: CubeRuntime> {
    pub gamma: CubeTensor<R>,
    pub beta: CubeTensor<R>,
    pub eps: f32,
    pub q_fold: CubeTensor<R>,
    pub kv_fold: CubeTensor<R>,
}

/// The bindings of an optional [`NormInArgs`]: `gamma`, `beta`, the keys' and values' fold
/// and the queries' fold (bind them with [`bound`]) and the shape, or none. The residual
/// it normalizes is the launch's `x` (f32), bound as `xf` whatever the flag.
fn norm_in_bindings<R: CubeRuntime>(norm_in: Option<NormInArgs<R>>, x: &CubeTensor<R>) -> (Option<[CubeTensor<R>; 4]>, NormShapeLaunch<R>, bool) {
    match norm_in {
        Some(NormInArgs { gamma, beta, eps, q_fold, kv_fold }) => {
            let d = dims(x)[1];
            assert_eq!(dims(x)[0], 1, "a LayerNorm applied in the launch: one sequence");
            assert_eq!(x.dtype, DType::F32, "a LayerNorm applied in the launch: the residual in f32");
            (Some([into_contiguous(gamma), into_contiguous(beta), into_contiguous(kv_fold), into_contiguous(q_fold)]), NormShapeLaunch::new(d, 1.0 / d as f32, eps), true)
        }
        None => (None, NormShapeLaunch::new(0, 0.0, 0.0), false),
    }
}

/// The query rows for [`qkv_append`]: `w [rows, d]`, the selected heads (`idx`, blocks of
/// `block` rows; all rows when `None`) and the bias.
pub struct QueryArgs<R: CubeRuntime> {
    pub w: CubeTensor<R>,
    pub idx: Option<CubeTensor<R>>,
    pub block: usize,
    pub bias: Option<CubeTensor<R>>,
}

/// [`kv_append`] with the queries of the same step in the same launch, and optionally the
/// next layer's attention first factor on cubes of their own (`first`, batch 1); see
/// [`crate::SparseKernels::qkv_append`]. Returns `q [B, outputs]` (when asked), the
/// caches and the first factor `[1, r]`.
#[allow(clippy::too_many_arguments)] // the queries' and the keys' and values' inputs
#[allow(clippy::type_complexity)] // the queries, the caches, the first factor
pub fn qkv_append<R: CubeRuntime>(
    query: Option<QueryArgs<R>>,
    kv: CubeTensor<R>,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    pos: usize,
    int_dtype: DType,
    first: Option<FirstArgs<R>>,
    norm_in: Option<NormInArgs<R>>,
) -> (Option<CubeTensor<R>>, CubeTensor<R>, CubeTensor<R>, Option<CubeTensor<R>>) {
    let (q, k, v, _, first) = qkv_append_launch(query, kv, x, bias, k_cache, v_cache, pos, int_dtype, None, first, norm_in);
    (q, k, v, first)
}

/// The lazy K/V state [`qkv_append_lazy`] reads: each head's first unwritten position
/// (`pending [heads]`) and the ring of the last layer inputs (`[window, d]`).
pub struct LazyArgs<R: CubeRuntime> {
    pub pending: CubeTensor<R>,
    pub ring: CubeTensor<R>,
}

/// [`qkv_append`] at batch 1 writing keys and values only for the selected heads (the
/// query's index list) and for heads whose oldest unwritten position is about to leave
/// the ring — each of those for every position it has not written yet, from the ring's
/// inputs; see [`crate::SparseKernels::qkv_append_lazy`]. The riders of [`qkv_append`]
/// (`first`, `norm_in`) as there. Returns the queries, the caches, the next `pending`
/// (the ring is updated in place) and the first factor.
#[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs, the lazy state and the riders
#[allow(clippy::type_complexity)] // the queries, the caches, the next lazy state, the first factor
pub fn qkv_append_lazy<R: CubeRuntime>(
    query: QueryArgs<R>,
    kv: CubeTensor<R>,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    pos: usize,
    lazy: LazyArgs<R>,
    first: Option<FirstArgs<R>>,
    norm_in: Option<NormInArgs<R>>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>, CubeTensor<R>, Option<CubeTensor<R>>) {
    assert!(query.idx.is_some(), "qkv_append_lazy: the selected heads' index list");
    let int_dtype = lazy.pending.dtype;
    let (q, k, v, pending, first) = qkv_append_launch(Some(query), kv, x, bias, k_cache, v_cache, pos, int_dtype, Some(lazy), first, norm_in);
    (q.expect("a query was asked for"), k, v, pending.expect("the lazy launch's next pending"), first)
}

#[allow(clippy::too_many_arguments)] // the queries', keys' and values' inputs and the lazy state
#[allow(clippy::type_complexity)] // the queries, the caches, the next lazy state
fn qkv_append_launch<R: CubeRuntime>(
    query: Option<QueryArgs<R>>,
    kv: CubeTensor<R>,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    k_cache: CubeTensor<R>,
    v_cache: CubeTensor<R>,
    pos: usize,
    int_dtype: DType,
    lazy: Option<LazyArgs<R>>,
    first: Option<FirstArgs<R>>,
    norm_in: Option<NormInArgs<R>>,
) -> (Option<CubeTensor<R>>, CubeTensor<R>, CubeTensor<R>, Option<CubeTensor<R>>, Option<CubeTensor<R>>) {
    let (kv, x) = (into_contiguous(kv), into_contiguous(x));
    let rows = dims(&kv)[0];
    let batch = dims(&x)[0];
    let has_bias = bias.is_some();
    let bias = bias.map(into_contiguous);
    // An f32 residual read with the LayerNorm in the launch takes the weights' vector width
    // (its own would be half that, and would halve the weights' loads); it divides the
    // residual's width, which is the weights' (checked by the caller).
    let vs = match norm_in {
        Some(_) => vector_width(&[&kv]),
        None => vector_width(&[&kv, &x]),
    };
    let (group, use_plane) = reduction_group(&kv.client);
    // Lazily, a cube's rows must be one head's (the cube decides for its head which
    // positions to write, and its row groups share them).
    let config = LaunchConfig::default();
    let rows_per_cube = match norm_in {
        Some(_) => config.qkv_norm_rows_per_cube.clamp(1, client_units(&kv) / group),
        None => config.rows_per_cube,
    };
    let rows_per_cube = match rows_per_cube {
        r if lazy.is_some() && !dims(&k_cache)[3].is_multiple_of(r) => 1,
        r => r,
    };
    let dtype = kv.dtype;
    let client = kv.client.clone();
    let (q_w, q_idx, q_bias, q_out, query_shape, query_cubes, q_gathered, has_q_bias, idx_dtype) = match query {
        Some(QueryArgs { w, idx, block, bias }) => {
            let w = into_contiguous(w);
            let q_rows = dims(&w)[0];
            let block = block.max(1);
            let outputs = idx.as_ref().map_or(q_rows, |i| dims(i)[0] * block);
            let q_out = empty(&x, vec![batch, outputs], dtype);
            let cubes = outputs.div_ceil(rows_per_cube);
            let shape = QueryShapeLaunch::new(q_rows, stride(&w, 0) / vs, outputs, outputs, block, cubes);
            let (gathered, has_q_bias) = (idx.is_some(), bias.is_some());
            let idx_dtype = idx.as_ref().map_or(int_dtype, |i| i.dtype);
            let idx = idx.map(into_contiguous).unwrap_or_else(|| unread(&x));
            let bias = bias.map(into_contiguous).unwrap_or_else(|| unread(&w));
            (w, idx, bias, Some(q_out), shape, cubes, gathered, has_q_bias, idx_dtype)
        }
        None => (unread(&kv), unread(&x), unread(&kv), None, QueryShapeLaunch::new(0, 0, 0, 0, 1, 0), 0, false, false, int_dtype),
    };
    let has_query = q_out.is_some();
    let is_lazy = lazy.is_some();
    let heads = dims(&k_cache)[1];
    let (lazy_bound, pending_out, lazy_shape, window) = match lazy {
        Some(LazyArgs { pending, ring }) => {
            assert_eq!(batch, 1, "qkv_append_lazy: batch 1");
            let window = dims(&ring)[0];
            let sel_len = dims(&q_idx)[0];
            let pending_out = empty(&pending, vec![heads], pending.dtype);
            (Some([into_contiguous(pending), into_contiguous(ring)]), Some(pending_out), LazyShapeLaunch::new(sel_len, window), window)
        }
        None => (None, None, LazyShapeLaunch::new(0, 1), 1),
    };
    let [pending_in, ring] = bound(&lazy_bound, &x);
    debug_assert!(!has_query || (dims(&q_w)[1] == dims(&kv)[1] && stride(&q_w, 0) % vs == 0));
    assert_eq!(k_cache.meta.strides(), v_cache.meta.strides(), "kv_append: keys and values laid out alike");
    assert_eq!(stride(&k_cache, 3), 1, "kv_append: cache rows contiguous");
    let shape = KvShapeLaunch::new(
        rows,
        dims(&kv)[1] / vs,
        stride(&kv, 0) / vs,
        batch,
        stride(&x, 0) / vs,
        dims(&k_cache)[3],
        stride(&k_cache, 0),
        stride(&k_cache, 1),
        stride(&k_cache, 2),
    );
    let kv_cubes = query_cubes + rows.div_ceil(rows_per_cube);
    let (first_bound, first_shape, first) = first_factor(first, kv_cubes);
    let [down, residual, first_out] = bound(&first_bound, &x);
    let (has_first, first_dtype) = (first.is_some(), down.dtype);
    let first_cubes = first.as_ref().map_or(0, |f| dims(f)[1]);
    let (norm_in_bound, norm_shape, has_norm_in) = norm_in_bindings(norm_in, &x);
    let [gamma, beta, kv_fold, q_fold] = bound(&norm_in_bound, &x);
    // The cubes' LayerNorm in shared memory: the row in vectors.
    let norm_vectors = if has_norm_in { dims(&kv)[1] / vs } else { 1 };
    // With the LayerNorm applied in the launch, `x` (the weights' dtype) is not read.
    let x_read = if has_norm_in { &kv } else { &x };
    // Lazily, the most positions a head can owe besides this one (a window's worth, less
    // one): the kernel's accumulators for them are unrolled (at least one, unused
    // elsewhere).
    let owed_max = window.saturating_sub(1).max(1);
    unsafe {
        kv_append_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static((kv_cubes + first_cubes) as u32, 1, 1),
            CubeDim::new_2d(group as u32, rows_per_cube as u32),
            vs,
            arg(&kv),
            arg(x_read),
            arg(bias.as_ref().unwrap_or(&x)),
            arg(&k_cache),
            arg(&v_cache),
            arg(&q_w),
            arg(&q_idx),
            arg(&q_bias),
            arg(q_out.as_ref().unwrap_or(&k_cache)),
            arg(pending_in),
            arg(pending_out.as_ref().unwrap_or(&k_cache)),
            arg(ring),
            arg(down),
            arg(residual),
            arg(first_out),
            arg(&x),
            arg(gamma),
            arg(beta),
            arg(q_fold),
            arg(kv_fold),
            shape,
            query_shape,
            lazy_shape,
            first_shape,
            norm_shape,
            pos,
            // With the LayerNorm in the launch the folds hold the bias, except for a lazy
            // head's owed positions (from the ring's LayerNorm outputs).
            has_bias,
            has_query,
            q_gathered,
            has_q_bias && !has_norm_in,
            is_lazy,
            group,
            rows_per_cube,
            use_plane,
            has_first,
            has_norm_in,
            norm_vectors,
            owed_max,
            [dtype.into(), idx_dtype.into(), first_dtype.into()],
        );
    }
    (q_out, k_cache, v_cache, pending_out, first)
}

/// How the one-row-per-lane-group fc1 kernels of batch 1 (gated and predicted) launch:
/// their output `[1, rows]` in the weights' dtype, the bias (or an unread binding) and
/// the grid.
struct GatedRows<R: CubeRuntime> {
    out: CubeTensor<R>,
    shape: GemvShapeLaunch<R>,
    bias: CubeTensor<R>,
    has_bias: bool,
    vs: usize,
    group: usize,
    use_plane: bool,
    rows_per_cube: usize,
    count: CubeCount,
    dim: CubeDim,
}

impl<R: CubeRuntime> GatedRows<R> {
    fn new(w: &CubeTensor<R>, x: &CubeTensor<R>, bias: Option<CubeTensor<R>>) -> Self {
        let rows = dims(w)[0];
        let (group, use_plane) = reduction_group(&w.client);
        let rows_per_cube = LaunchConfig::default().rows_per_cube;
        let vs = vector_width(&[w, x]);
        Self {
            out: empty(x, vec![1, rows], w.dtype),
            shape: GemvShapeLaunch::new(rows, dims(w)[1] / vs, stride(w, 0) / vs, 1, stride(x, 0) / vs, rows, rows),
            has_bias: bias.is_some(),
            bias: bias.map(into_contiguous).unwrap_or_else(|| unread(w)),
            vs,
            group,
            use_plane,
            rows_per_cube,
            count: CubeCount::Static(rows.div_ceil(rows_per_cube) as u32, 1, 1),
            dim: CubeDim::new_2d(group as u32, rows_per_cube as u32),
        }
    }
}

/// `out [1, rows] = act(W · x + bias)` on the rows whose `gate` logit is above `threshold`,
/// 0 elsewhere; see [`crate::SparseKernels::gated_rows_gemv`].
pub fn gated_rows_gemv<R: CubeRuntime>(
    w: CubeTensor<R>,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    relu: bool,
    gate: CubeTensor<R>,
    threshold: f32,
) -> CubeTensor<R> {
    let (w, x, gate) = (into_contiguous(w), into_contiguous(x), into_contiguous(gate));
    let l = GatedRows::new(&w, &x, bias);
    let (dtype, client) = (w.dtype, w.client.clone());
    unsafe {
        gated_rows_gemv_kernel::launch_unchecked::<R>(
            &client,
            l.count,
            l.dim,
            l.vs,
            arg(&w),
            arg(&gate),
            arg(&x),
            arg(&l.bias),
            arg(&l.out),
            l.shape,
            threshold,
            l.has_bias,
            relu,
            l.group,
            l.rows_per_cube,
            l.use_plane,
            dtype.into(),
        );
    }
    l.out
}

/// A predictor's first factor for a launch to compute on cubes of its own beside its own
/// work (batch 1): `down [r, d]` (in the dtype of the launch's predictor, or f32) and the
/// residual it reads, `[1, d]` f32.
pub struct FirstArgs<R: CubeRuntime> {
    pub down: CubeTensor<R>,
    pub residual: CubeTensor<R>,
}

/// The first factor's bindings (down, residual, output `[1, r]`; bind them with
/// [`bound`]) and shape after `after` cubes, or none and no cubes.
#[allow(clippy::type_complexity)] // the bindings, the shape, the output
fn first_factor<R: CubeRuntime>(first: Option<FirstArgs<R>>, after: usize) -> (Option<[CubeTensor<R>; 3]>, FirstFactorShapeLaunch<R>, Option<CubeTensor<R>>) {
    match first {
        Some(FirstArgs { down, residual }) => {
            let (down, residual) = (into_contiguous(down), into_contiguous(residual));
            let [r, d] = [dims(&down)[0], dims(&down)[1]];
            assert_eq!(dims(&residual), vec![1, d], "first factor: a residual [1, d] for down [r, d]");
            assert_eq!(residual.dtype, DType::F32, "first factor: the residual in f32");
            let out = empty(&residual, vec![1, r], DType::F32);
            (Some([down, residual, out.clone()]), FirstFactorShapeLaunch::new(r, d, after), Some(out))
        }
        None => (None, FirstFactorShapeLaunch::new(0, 0, after), None),
    }
}

/// fc1 gated by its low-rank predictor, computed in the same launch, with the next layer's
/// MLP first factor (`first`) and head selection (`select`) on cubes of their own; see
/// [`crate::SparseKernels::predicted_rows_gemv`]. Returns fc1's output, the first factor
/// `[1, r]` and the selection's indices and count.
#[allow(clippy::too_many_arguments)] // the kernel's inputs, as the trait method has them
#[allow(clippy::type_complexity)] // fc1's output and the riders'
pub fn predicted_rows_gemv<R: CubeRuntime>(
    w: CubeTensor<R>,
    x: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    relu: bool,
    up: CubeTensor<R>,
    h: CubeTensor<R>,
    threshold: f32,
    first: Option<FirstArgs<R>>,
    select: Option<SelectArgs<R>>,
    int_dtype: DType,
) -> (CubeTensor<R>, Option<CubeTensor<R>>, Option<(CubeTensor<R>, CubeTensor<R>)>) {
    let (w, x) = (into_contiguous(w), into_contiguous(x));
    let (up, h) = (into_contiguous(up), into_contiguous(h));
    let l = GatedRows::new(&w, &x, bias);
    let (dtype, up_dtype, client) = (w.dtype, up.dtype, w.client.clone());
    let predictor = predictor_shape(&up);
    let CubeCount::Static(fc1_cubes, _, _) = l.count else { unreachable!("GatedRows makes a static grid") };
    let has_select = select.is_some();
    let (first_bound, first_shape, first) = first_factor(first, fc1_cubes as usize);
    let [down, residual, first_out] = bound(&first_bound, &x);
    let has_first = first.is_some();
    let first_cubes = first.as_ref().map_or(0, |f| dims(f)[1]);
    let (sel_bound, idx, count, sel_predictor, sel_rows, sel_capacity, sel_threshold) = match select {
        Some(SelectArgs { up: sel_up, h: sel_h, threshold, capacity }) => {
            let (sel_up, sel_h) = (into_contiguous(sel_up), into_contiguous(sel_h));
            let [idx, count] = empties(&x, [(vec![capacity.max(1)], int_dtype), (vec![1], int_dtype)]);
            let shape = predictor_shape(&sel_up);
            let rows = dims(&sel_up)[0];
            (Some([sel_up, sel_h]), Some(idx), Some(count), shape, rows, capacity.max(1), threshold)
        }
        None => (None, None, None, PredictorShapeLaunch::new(0, 0), 0, 1, 0.0),
    };
    let [sel_up, sel_h] = bound(&sel_bound, &up);
    let selection = idx.clone().zip(count.clone());
    let cubes = fc1_cubes as usize + first_cubes + usize::from(has_select);
    unsafe {
        predicted_rows_gemv_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes as u32, 1, 1),
            l.dim,
            l.vs,
            arg(&w),
            arg(&up),
            arg(&h),
            arg(&x),
            arg(&l.bias),
            arg(&l.out),
            arg(down),
            arg(residual),
            arg(first_out),
            arg(sel_up),
            arg(sel_h),
            arg(idx.as_ref().unwrap_or(&x)),
            arg(count.as_ref().unwrap_or(&x)),
            l.shape,
            predictor,
            first_shape,
            sel_predictor,
            threshold,
            sel_rows,
            sel_capacity,
            sel_threshold,
            l.has_bias,
            relu,
            l.group,
            l.rows_per_cube,
            l.use_plane,
            has_first,
            has_select,
            sel_rows.max(1).next_power_of_two(),
            [dtype.into(), up_dtype.into(), int_dtype.into()],
        );
    }
    (l.out, first, selection)
}

/// The decode step's sparse MLP, predictor to residual, in two launches (batch 1):
/// `out [1, d] = residual + b2 + Σ_j relu(W1[j] · x + b1[j]) · W2t[j]` over the rows `j`
/// whose logit `up[j] · h` is above `threshold`; see
/// [`crate::SparseKernels::predicted_mlp`]. `config.fused_mlp_rows` rows a cube (rounded
/// up to a power of two, at most its units), of `config.fused_mlp_threads` units.
#[allow(clippy::too_many_arguments)] // the MLP's, the predictor's and the residual's inputs
pub fn predicted_mlp<R: CubeRuntime>(
    w1: CubeTensor<R>,
    b1: Option<CubeTensor<R>>,
    w2_t: CubeTensor<R>,
    b2: Option<CubeTensor<R>>,
    x: CubeTensor<R>,
    residual: Option<CubeTensor<R>>,
    up: CubeTensor<R>,
    h: CubeTensor<R>,
    threshold: f32,
    config: &LaunchConfig,
) -> CubeTensor<R> {
    let (w1, w2_t, x) = (into_contiguous(w1), into_contiguous(w2_t), into_contiguous(x));
    let (up, h) = (into_contiguous(up), into_contiguous(h));
    let (b2, residual) = (b2.map(into_contiguous), residual.map(into_contiguous));
    let (rows, d) = (dims(&w1)[0], dims(&w1)[1]);
    let (group, use_plane) = reduction_group(&w1.client);
    // Whole lane groups, a power of two of them (the logits split a cube's units evenly
    // over its rows), at most the device's cube.
    let most = config.fused_mlp_threads.max(group).min(client_units(&w1));
    let groups = (most / group).max(1);
    let groups = 1 << groups.ilog2();
    let threads = group * groups;
    let split_rows = config.fused_mlp_rows.next_power_of_two().min(threads);
    let splits = rows.div_ceil(split_rows).max(1);
    let mut vectors = vec![&w1, &w2_t, &x];
    vectors.extend(b2.iter());
    vectors.extend(residual.iter());
    let vs = vector_width(&vectors);
    let [out, partial] = empties(&x, [(vec![1, d], w1.dtype), (vec![splits, 1, d], DType::F32)]);
    let shape = GemvShapeLaunch::new(rows, d / vs, stride(&w1, 0) / vs, 1, stride(&x, 0) / vs, rows, rows);
    let predictor = predictor_shape(&up);
    let has_bias = b1.is_some();
    let b1 = b1.map(into_contiguous).unwrap_or_else(|| unread(&w1));
    let (dtype, up_dtype, client) = (w1.dtype, up.dtype, w1.client.clone());
    let w2_stride = stride(&w2_t, 0) / vs;
    unsafe {
        predicted_mlp_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(splits as u32, 1, 1),
            CubeDim::new_2d(group as u32, groups as u32),
            vs,
            arg(&w1),
            arg(&up),
            arg(&h),
            arg(&x),
            arg(&b1),
            arg(&w2_t),
            arg(&partial),
            shape,
            w2_stride,
            predictor,
            threshold,
            has_bias,
            split_rows,
            group,
            groups,
            use_plane,
            [dtype.into(), up_dtype.into()],
        );
    }
    sum_partials(partial, b2, residual, out, splits, vs)
}

/// Lane groups of the head-selection cube: 8 groups of 32 lanes score 8 heads at a time.
const PREDICT_SELECT_GROUPS: usize = 8;

/// A low-rank predictor's logits `up · h` and their threshold selection in one launch; see
/// [`crate::SparseKernels::predict_select`].
pub fn predict_select<R: CubeRuntime>(
    up: CubeTensor<R>,
    h: CubeTensor<R>,
    threshold: f32,
    capacity: usize,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (up, h) = (into_contiguous(up), into_contiguous(h));
    let rows = dims(&up)[0];
    let idx = empty(&up, vec![capacity.max(1)], int_dtype);
    let count = empty(&up, vec![1], int_dtype);
    let (group, use_plane) = reduction_group(&up.client);
    let groups = PREDICT_SELECT_GROUPS.min(client_units(&up) / group).max(1);
    let (client, up_dtype) = (up.client.clone(), up.dtype);
    let predictor = predictor_shape(&up);
    unsafe {
        predict_select_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_2d(group as u32, groups as u32),
            arg(&up),
            arg(&h),
            arg(&idx),
            arg(&count),
            predictor,
            rows,
            capacity.max(1),
            threshold,
            rows.max(1),
            group,
            groups,
            use_plane,
            [up_dtype.into(), int_dtype.into()],
        );
    }
    (idx, count)
}

/// A head selection for [`norm_predict`] to make in the same launch: `up [rows, r]` (in
/// the dtype of `norm_predict`'s `down`), the first factor `h [1, r]` (f32), the threshold
/// and the index list's capacity.
pub struct SelectArgs<R: CubeRuntime> {
    pub up: CubeTensor<R>,
    pub h: CubeTensor<R>,
    pub threshold: f32,
    pub capacity: usize,
}

/// LayerNorm of `x [1, d]`, the first factor `down [r, d] · x` (f32) and optionally a head
/// selection, in one launch; see [`crate::SparseKernels::norm_predict`]. Returns the
/// normalized row, the first factor `[1, r]` and the selection's indices and count.
#[allow(clippy::type_complexity)] // three outputs, one optional pair
#[allow(clippy::too_many_arguments)] // the LayerNorm's, the predictor's and the selection's inputs, two dtypes
pub fn norm_predict<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    beta: CubeTensor<R>,
    eps: f32,
    down: CubeTensor<R>,
    select: Option<SelectArgs<R>>,
    normed_dtype: DType,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>, Option<(CubeTensor<R>, CubeTensor<R>)>) {
    let (x, gamma, beta, down) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta), into_contiguous(down));
    let d = dims(&x)[1];
    let r = dims(&down)[0];
    // The widest vector that every tensor read, and the output, take (an f32 residual
    // and an f16 output: the narrower of the two).
    let out_vs = row_vector_width(&x.client, normed_dtype, d);
    let vs = vector_width(&[&x, &gamma, &beta, &down]).min(out_vs);
    let (group, use_plane) = reduction_group(&x.client);
    // A cube of up to 1024 units (a power of two: the reductions are trees), about one
    // vector of the row each: the LayerNorm and each row of `down` are then one round
    // trip of loads. The selection's lane groups are its rows of `group` units.
    let most = (1usize << client_units(&x).clamp(1, 1024).ilog2()).max(group);
    let units = (d / vs).next_power_of_two().clamp(group, most);
    let rows_per_cube = units / group;
    let gemv_cubes = r;
    let has_select = select.is_some();
    // The outputs in one allocation: the normalized row, the first factor and, with a
    // selection, its indices and count.
    let (normed, first, up, h, threshold, capacity, select_rows, predictor, selection) = match select {
        Some(SelectArgs { up, h, threshold, capacity }) => {
            let (up, h) = (into_contiguous(up), into_contiguous(h));
            let rows = dims(&up)[0];
            let [normed, first, idx, count] =
                empties(&x, [(vec![1, d], normed_dtype), (vec![1, r], DType::F32), (vec![capacity.max(1)], int_dtype), (vec![1], int_dtype)]);
            let predictor = predictor_shape(&up);
            (normed, first, up, h, threshold, capacity.max(1), rows, predictor, Some((idx, count)))
        }
        None => {
            let [normed, first] = empties(&x, [(vec![1, d], normed_dtype), (vec![1, r], DType::F32)]);
            (normed, first, unread(&gamma), unread(&gamma), 0.0, 1, 0, PredictorShapeLaunch::new(0, 0), None)
        }
    };
    // Cubes: the GEMV's, the LayerNorm's, the selection's.
    let cubes = gemv_cubes + 1 + usize::from(has_select);
    let (idx, count) = match &selection {
        Some((idx, count)) => (idx.clone(), count.clone()),
        None => (unread(&x), unread(&x)),
    };
    let max_rows = select_rows.max(1).next_power_of_two();
    let (dtype, down_dtype) = (x.dtype, down.dtype);
    let client = x.client.clone();
    unsafe {
        norm_predict_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_2d(group as u32, rows_per_cube as u32),
            vs,
            arg(&x),
            arg(&gamma),
            arg(&beta),
            arg(&normed),
            arg(&down),
            arg(&first),
            arg(&up),
            arg(&h),
            arg(&idx),
            arg(&count),
            d / vs,
            r,
            stride(&down, 0) / vs,
            gemv_cubes,
            predictor,
            select_rows,
            capacity,
            1.0 / d as f32,
            eps,
            threshold,
            group,
            rows_per_cube,
            use_plane,
            has_select,
            max_rows,
            [dtype.into(), normed_dtype.into(), down_dtype.into(), int_dtype.into()],
        );
    }
    (normed, first, selection)
}
