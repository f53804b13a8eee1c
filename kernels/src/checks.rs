//! Correctness checks of every kernel against the host loops of [`crate::host`], on fresh
//! random inputs. The same code runs in the tests (tiny shapes; Flex, and wgpu on
//! lavapipe) and in `dejavu-bench kernels --check` on the GPU at real shapes.
//!
//! On `CubeBackend` the outputs are poisoned with NaN before each launch (the `_into`
//! launchers write into a tensor we fill first), so an element the kernel forgot to write
//! shows up as a failure instead of passing by luck.

use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use burn_cubecl::{CubeBackend, CubeRuntime};
use rand::prelude::*;
use rand::rngs::StdRng;

use crate::{host, Activation, SparseKernels};

/// One shape to check: `rows × d` weights, `k` selected rows (a few of them empty
/// slots), `batch` input rows, in `dtype`.
#[derive(Debug, Clone)]
pub struct Case {
    pub rows: usize,
    pub d: usize,
    pub k: usize,
    pub batch: usize,
    pub dtype: DType,
    pub seed: u64,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rows {} d {} k {} batch {} {:?} seed {}",
            self.rows, self.d, self.k, self.batch, self.dtype, self.seed
        )
    }
}

/// The result of one check: the worst error as a multiple of the tolerance (≤ 1 passes;
/// infinite when an output was NaN, i.e. never written).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub op: &'static str,
    pub case: String,
    pub worst_ratio: f32,
    pub worst_index: usize,
    pub passed: bool,
}

/// How a check calls the kernels: through the public API (any backend), or through the
/// cube launchers with a poisoned output.
pub trait Launcher<B: Backend> {
    /// `block` as in [`SparseKernels::rows_gemv`].
    fn rows_gemv(
        &self,
        w: Tensor<B, 2>,
        idx: Option<(Tensor<B, 1, Int>, usize)>,
        x: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        relu: bool,
    ) -> Tensor<B, 2>;
    /// `residual + Σ h · Wt[rows] + bias` (no residual: none added).
    fn rows_transposed_gemv(
        &self,
        w_t: Tensor<B, 2>,
        idx: Option<(Tensor<B, 1, Int>, usize)>,
        h: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        residual: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 2>;
    /// `acc + Σ h · Wt[rows] + bias` with `acc` f32.
    fn accumulate_transposed_gemv(
        &self,
        acc: Tensor<B, 2>,
        w_t: Tensor<B, 2>,
        idx: Option<(Tensor<B, 1, Int>, usize)>,
        h: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2>;
    /// [`crate::attention_out_proj_accumulate`]: `(q, heads, k_cache, v_cache)`, `len`,
    /// `scale`, `(w, bias)`, `acc`.
    #[allow(clippy::type_complexity)] // the attention's four inputs, out_proj's two
    fn attention_out_proj_accumulate(
        &self,
        attention: (Tensor<B, 2>, Tensor<B, 1, Int>, Tensor<B, 4>, Tensor<B, 4>),
        len: usize,
        scale: f32,
        out_proj: (Tensor<B, 2>, Option<Tensor<B, 1>>),
        acc: Tensor<B, 2>,
    ) -> Tensor<B, 2>;
}

/// Through the checked public functions.
pub struct PublicApi;

impl<B: SparseKernels> Launcher<B> for PublicApi {
    fn rows_gemv(
        &self,
        w: Tensor<B, 2>,
        idx: Option<(Tensor<B, 1, Int>, usize)>,
        x: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        relu: bool,
    ) -> Tensor<B, 2> {
        let act = if relu { Activation::Relu } else { Activation::Identity };
        match idx {
            Some((idx, block)) => crate::gather_blocks_gemv(w, idx, block, x, bias, act),
            None => crate::gemv(w, x, bias, act),
        }
        .expect("shapes were made consistent")
    }

    fn rows_transposed_gemv(
        &self,
        w_t: Tensor<B, 2>,
        idx: Option<(Tensor<B, 1, Int>, usize)>,
        h: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        residual: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 2> {
        match (idx, residual) {
            (idx, Some(residual)) => crate::residual_transposed_gemv(residual, w_t, idx, h, bias),
            (Some((idx, block)), None) => crate::gather_blocks_transposed_gemv(w_t, idx, block, h, bias),
            (None, None) => crate::transposed_gemv(w_t, h, bias),
        }
        .expect("shapes were made consistent")
    }

    fn accumulate_transposed_gemv(
        &self,
        acc: Tensor<B, 2>,
        w_t: Tensor<B, 2>,
        idx: Option<(Tensor<B, 1, Int>, usize)>,
        h: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        crate::accumulate_transposed_gemv(acc, w_t, idx, h, bias).expect("shapes were made consistent")
    }

    fn attention_out_proj_accumulate(
        &self,
        (q, heads, k, v): (Tensor<B, 2>, Tensor<B, 1, Int>, Tensor<B, 4>, Tensor<B, 4>),
        len: usize,
        scale: f32,
        (w, bias): (Tensor<B, 2>, Option<Tensor<B, 1>>),
        acc: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        crate::attention_out_proj_accumulate(q, heads, k, v, len, scale, w, bias, acc, true).expect("shapes were made consistent")
    }
}

/// The backend the cube checks run on.
pub type Cube<R> = CubeBackend<R, f32, i32, u32>;

/// Through the cube launchers with the given grid shapes, into an output first filled
/// with NaN.
pub struct Poisoned(pub crate::cube::LaunchConfig);

fn poison<B: Backend>(shape: [usize; 2], dtype: DType, device: &B::Device) -> Tensor<B, 2> {
    Tensor::<B, 2>::full(shape, f32::NAN, device).cast(dtype)
}

fn float_prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

impl<R: CubeRuntime> Launcher<Cube<R>> for Poisoned {
    fn rows_gemv(
        &self,
        w: Tensor<Cube<R>, 2>,
        idx: Option<(Tensor<Cube<R>, 1, Int>, usize)>,
        x: Tensor<Cube<R>, 2>,
        bias: Option<Tensor<Cube<R>, 1>>,
        relu: bool,
    ) -> Tensor<Cube<R>, 2> {
        let k = idx.as_ref().map(|(i, b)| i.dims()[0] * b).unwrap_or(w.dims()[0]);
        let block = idx.as_ref().map(|(_, b)| *b).unwrap_or(1);
        let out = poison::<Cube<R>>([x.dims()[0], k], x.dtype(), &x.device());
        let out = crate::cube::rows_gemv_into(
            float_prim(w),
            idx.map(|(i, _)| i.into_primitive()),
            block,
            float_prim(x),
            bias.map(float_prim),
            relu,
            DType::I32,
            float_prim(out),
            &self.0,
        );
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn rows_transposed_gemv(
        &self,
        w_t: Tensor<Cube<R>, 2>,
        idx: Option<(Tensor<Cube<R>, 1, Int>, usize)>,
        h: Tensor<Cube<R>, 2>,
        bias: Option<Tensor<Cube<R>, 1>>,
        residual: Option<Tensor<Cube<R>, 2>>,
    ) -> Tensor<Cube<R>, 2> {
        let block = idx.as_ref().map(|(_, b)| *b).unwrap_or(1);
        let out = poison::<Cube<R>>([h.dims()[0], w_t.dims()[1]], h.dtype(), &h.device());
        let out = crate::cube::rows_transposed_gemv_into(
            float_prim(w_t),
            idx.map(|(i, _)| i.into_primitive()),
            block,
            float_prim(h),
            bias.map(float_prim),
            residual.map(float_prim),
            DType::I32,
            float_prim(out),
            &self.0,
        );
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    /// `acc` is read and written, not poisoned: an element the kernel missed keeps its
    /// old value, which differs from the expected sum.
    fn accumulate_transposed_gemv(
        &self,
        acc: Tensor<Cube<R>, 2>,
        w_t: Tensor<Cube<R>, 2>,
        idx: Option<(Tensor<Cube<R>, 1, Int>, usize)>,
        h: Tensor<Cube<R>, 2>,
        bias: Option<Tensor<Cube<R>, 1>>,
    ) -> Tensor<Cube<R>, 2> {
        let block = idx.as_ref().map(|(_, b)| *b).unwrap_or(1);
        let out = crate::cube::rows_transposed_gemv_accumulate(
            float_prim(w_t),
            idx.map(|(i, _)| i.into_primitive()),
            block,
            float_prim(h),
            bias.map(float_prim),
            float_prim(acc),
            None,
            DType::I32,
            &self.0,
        )
        .0;
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    /// `acc` is read and written, as in `accumulate_transposed_gemv`.
    fn attention_out_proj_accumulate(
        &self,
        (q, heads, k, v): (Tensor<Cube<R>, 2>, Tensor<Cube<R>, 1, Int>, Tensor<Cube<R>, 4>, Tensor<Cube<R>, 4>),
        len: usize,
        scale: f32,
        (w, bias): (Tensor<Cube<R>, 2>, Option<Tensor<Cube<R>, 1>>),
        acc: Tensor<Cube<R>, 2>,
    ) -> Tensor<Cube<R>, 2> {
        let out = crate::cube::attention_out_proj_accumulate(
            float_prim(q),
            heads.into_primitive(),
            float_prim(k),
            float_prim(v),
            len,
            scale,
            float_prim(w),
            bias.map(float_prim),
            float_prim(acc),
            None,
            &self.0,
        )
        .0;
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// (atol, rtol) for results stored in `dtype`: f32 sums of up to ~30k products of values
/// in [-1, 1] (f32 accumulation, any order) and one rounding to the storage type.
fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1.6e-2, 1.6e-2),
        _ => (1e-4, 1e-4),
    }
}

/// Rounds host values the way the device stores them, so the host loop sees the same
/// inputs the kernel reads.
fn stored(values: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => values.into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => values.into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect(),
        _ => values,
    }
}

fn uniform(rng: &mut StdRng, n: usize, zero_fraction: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if zero_fraction > 0.0 && rng.random_bool(zero_fraction) {
                0.0
            } else {
                rng.random_range(-1.0f32..1.0)
            }
        })
        .collect()
}

/// `k` distinct rows in random order, with up to two empty slots (`rows` and `-1`).
fn random_indices(rng: &mut StdRng, rows: usize, k: usize) -> Vec<i64> {
    let mut all: Vec<i64> = (0..rows as i64).collect();
    all.shuffle(rng);
    let mut idx: Vec<i64> = all.into_iter().take(k).collect();
    if k >= 8 {
        let a = rng.random_range(0..k);
        idx[a] = rows as i64;
        let b = rng.random_range(0..k);
        if b != a {
            idx[b] = -1;
        }
    }
    idx
}

fn to_device<B: Backend, const D: usize>(
    values: &[f32],
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::<B, D>::from_data(TensorData::new(values.to_vec(), shape), device).cast(dtype)
}

fn ints<B: Backend>(values: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i32> = values.iter().map(|&v| v as i32).collect();
    Tensor::<B, 1, Int>::from_data(TensorData::new(values.clone(), [values.len()]), device)
}

fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().convert::<f32>().into_vec::<f32>().expect("f32 data")
}

fn read_ints<B: Backend>(t: Tensor<B, 1, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().into_vec::<i64>().expect("int data")
}

/// Compares with the storage type's tolerance plus the per-element `slack` (empty: none).
fn outcome(op: &'static str, case: String, dtype: DType, actual: &[f32], expected: &[f32], slack: &[f32]) -> Outcome {
    let (atol, rtol) = tolerance(dtype);
    let (worst_ratio, worst_index) = host::worst_ratio(actual, expected, atol, rtol, slack);
    Outcome { op, case, worst_ratio, worst_index, passed: worst_ratio <= 1.0 }
}

/// Runs every GEMV check of one case: dense and gathered, with and without bias/ReLU,
/// the transposed kernel (with zero `h` values to skip), and the two-launch sparse MLP.
pub fn check_gemvs<B: SparseKernels, L: Launcher<B>>(
    launcher: &L,
    device: &B::Device,
    case: &Case,
) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(case.seed);
    let (rows, d, k, batch, dtype) = (case.rows, case.d, case.k, case.batch, case.dtype);
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let x = stored(uniform(&mut rng, batch * d, 0.0), dtype);
    let b1 = stored(uniform(&mut rng, rows, 0.0), dtype);
    let b2 = stored(uniform(&mut rng, d, 0.0), dtype);
    let idx = random_indices(&mut rng, rows, k);
    let h = stored(uniform(&mut rng, batch * k, 0.3), dtype);
    let h_dense = stored(uniform(&mut rng, batch * rows, 0.3), dtype);

    let w_dev = to_device::<B, 2>(&w, [rows, d], dtype, device);
    let x_dev = to_device::<B, 2>(&x, [batch, d], dtype, device);
    let b1_dev = to_device::<B, 1>(&b1, [rows], dtype, device);
    let b2_dev = to_device::<B, 1>(&b2, [d], dtype, device);
    let idx_dev = ints::<B>(&idx, device);
    let h_dev = to_device::<B, 2>(&h, [batch, k], dtype, device);
    let h_dense_dev = to_device::<B, 2>(&h_dense, [batch, rows], dtype, device);

    let mut out = Vec::new();

    let got = read(launcher.rows_gemv(w_dev.clone(), None, x_dev.clone(), None, false));
    let want = host::rows_gemv(&w, rows, d, None, &x, batch, None, false);
    out.push(outcome("gemv", case.to_string(), dtype, &got, &want, &[]));

    let got = read(launcher.rows_gemv(
        w_dev.clone(),
        Some((idx_dev.clone(), 1)),
        x_dev.clone(),
        Some(b1_dev.clone()),
        true,
    ));
    let want = host::rows_gemv(&w, rows, d, Some(&idx), &x, batch, Some(&b1), true);
    out.push(outcome("gather_rows_gemv+bias+relu", case.to_string(), dtype, &got, &want, &[]));

    let got = read(launcher.rows_gemv(w_dev.clone(), Some((idx_dev.clone(), 1)), x_dev.clone(), None, false));
    let want = host::rows_gemv(&w, rows, d, Some(&idx), &x, batch, None, false);
    out.push(outcome("gather_rows_gemv", case.to_string(), dtype, &got, &want, &[]));

    let got = read(launcher.rows_transposed_gemv(
        w_dev.clone(),
        Some((idx_dev.clone(), 1)),
        h_dev.clone(),
        Some(b2_dev.clone()),
        None,
    ));
    let want = host::rows_transposed_gemv(&w, rows, d, Some(&idx), &h, batch, Some(&b2));
    out.push(outcome("gather_rows_transposed_gemv+bias", case.to_string(), dtype, &got, &want, &[]));

    let got = read(launcher.rows_transposed_gemv(w_dev.clone(), None, h_dense_dev.clone(), None, None));
    let want = host::rows_transposed_gemv(&w, rows, d, None, &h_dense, batch, None);
    out.push(outcome("transposed_gemv", case.to_string(), dtype, &got, &want, &[]));

    // The residual add fused into the second pass (a decoder layer's `x + block(x)`).
    let residual = stored(uniform(&mut rng, batch * d, 0.0), dtype);
    let residual_dev = to_device::<B, 2>(&residual, [batch, d], dtype, device);
    let got = read(launcher.rows_transposed_gemv(w_dev.clone(), None, h_dense_dev.clone(), Some(b2_dev.clone()), Some(residual_dev.clone())));
    let want = host::add(&host::rows_transposed_gemv(&w, rows, d, None, &h_dense, batch, Some(&b2)), &residual);
    out.push(outcome("transposed_gemv+bias+residual", case.to_string(), dtype, &got, &want, &[]));
    let got = read(launcher.rows_transposed_gemv(w_dev.clone(), Some((idx_dev.clone(), 1)), h_dev.clone(), None, Some(residual_dev)));
    let want = host::add(&host::rows_transposed_gemv(&w, rows, d, Some(&idx), &h, batch, None), &residual);
    out.push(outcome("gather_rows_transposed_gemv+residual", case.to_string(), dtype, &got, &want, &[]));

    let (x_dev2, b1_dev2, b2_dev2) = (x_dev.clone(), b1_dev.clone(), b2_dev.clone());
    // The sparse MLP: the hidden values are stored in `dtype` between the two launches,
    // so the host rounds them the same way.
    let hidden_dev = launcher.rows_gemv(w_dev.clone(), Some((idx_dev.clone(), 1)), x_dev, Some(b1_dev), true);
    let got = read(launcher.rows_transposed_gemv(w_dev.clone(), Some((idx_dev.clone(), 1)), hidden_dev, Some(b2_dev), None));
    let hidden = stored(host::rows_gemv(&w, rows, d, Some(&idx), &x, batch, Some(&b1), true), dtype);
    let want = host::rows_transposed_gemv(&w, rows, d, Some(&idx), &hidden, batch, Some(&b2));
    let slack = hidden_rounding_slack(&w, rows, d, Some(&idx), &hidden, batch, dtype);
    out.push(outcome("sparse_mlp", case.to_string(), dtype, &got, &want, &slack));

    // The same added into an f32 accumulator (one launch for fc2 with atomics), its buffer
    // handed over (updated in place); the sum is not rounded to `dtype`, so f32's tolerance.
    let acc = uniform(&mut rng, batch * d, 0.0);
    let acc_dev = to_device::<B, 2>(&acc, [batch, d], DType::F32, device);
    let hidden_dev = launcher.rows_gemv(w_dev.clone(), Some((idx_dev.clone(), 1)), x_dev2.clone(), Some(b1_dev2.clone()), true);
    let got = read(launcher.accumulate_transposed_gemv(acc_dev, w_dev.clone(), Some((idx_dev.clone(), 1)), hidden_dev, Some(b2_dev2.clone())));
    let want = host::add(&host::rows_transposed_gemv(&w, rows, d, Some(&idx), &hidden, batch, Some(&b2)), &acc);
    out.push(outcome("sparse_mlp_accumulate", case.to_string(), DType::F32, &got, &want, &slack));
    // Every row, no bias, the accumulator still held by the caller: it must not change.
    let acc_dev = to_device::<B, 2>(&acc, [batch, d], DType::F32, device);
    let got = read(launcher.accumulate_transposed_gemv(acc_dev.clone(), w_dev.clone(), None, h_dense_dev.clone(), None));
    let want = host::add(&host::rows_transposed_gemv(&w, rows, d, None, &h_dense, batch, None), &acc);
    out.push(outcome("accumulate_transposed_gemv", case.to_string(), DType::F32, &got, &want, &[]));
    out.push(outcome("accumulate_transposed_gemv: the caller's accumulator kept", case.to_string(), DType::F32, &read(acc_dev), &acc, &[]));
    // Every row with the bias (added once, by one split), the buffer handed over.
    let acc_dev = to_device::<B, 2>(&acc, [batch, d], DType::F32, device);
    let got = read(launcher.accumulate_transposed_gemv(acc_dev, w_dev.clone(), None, h_dense_dev.clone(), Some(b2_dev2.clone())));
    let want = host::add(&host::rows_transposed_gemv(&w, rows, d, None, &h_dense, batch, Some(&b2)), &acc);
    out.push(outcome("accumulate_transposed_gemv+bias", case.to_string(), DType::F32, &got, &want, &[]));

    // Whole blocks of rows (attention heads): block ids in random order, one empty slot.
    let block = [8usize, 4, 2].into_iter().find(|b| rows % b == 0 && rows / b >= 3).unwrap_or(1);
    let blocks = rows / block;
    let mut ids = random_indices(&mut rng, blocks, (blocks / 2).max(2));
    ids[0] = blocks as i64;
    let rows_idx = host::block_rows(&ids, block, rows);
    let ids_dev = ints::<B>(&ids, device);
    let got = read(launcher.rows_gemv(w_dev.clone(), Some((ids_dev.clone(), block)), x_dev2.clone(), Some(b1_dev2.clone()), false));
    let want = host::rows_gemv(&w, rows, d, Some(&rows_idx), &x, batch, Some(&b1), false);
    out.push(outcome("gather_blocks_gemv+bias", case.to_string(), dtype, &got, &want, &[]));
    let hb = stored(uniform(&mut rng, batch * rows_idx.len(), 0.0), dtype);
    let hb_dev = to_device::<B, 2>(&hb, [batch, rows_idx.len()], dtype, device);
    let got = read(launcher.rows_transposed_gemv(w_dev, Some((ids_dev, block)), hb_dev, Some(b2_dev2), None));
    let want = host::rows_transposed_gemv(&w, rows, d, Some(&rows_idx), &hb, batch, Some(&b2));
    out.push(outcome("gather_blocks_transposed_gemv+bias", case.to_string(), dtype, &got, &want, &[]));
    out
}

/// Slack for hidden values stored in `dtype` between fc1 and fc2: the device and the host
/// may round a hidden value to opposite sides of a storage ulp (one from an f32 sum, the
/// other from an f64 one), so allow one ulp of every hidden value, times the weight it
/// meets, on top of the usual tolerance.
fn hidden_rounding_slack(w_t: &[f32], rows: usize, d: usize, idx: Option<&[i64]>, hidden: &[f32], batch: usize, dtype: DType) -> Vec<f32> {
    let spread = host::rows_transposed_gemv(&abs(w_t), rows, d, idx, &abs(hidden), batch, None);
    let ulp = storage_ulp(dtype);
    spread.iter().map(|s| ulp * s).collect()
}

/// Every value's magnitude.
fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// The relative rounding step of a value stored in `dtype` (one ulp at 1.0, with f32's
/// taken at its sums' precision).
fn storage_ulp(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 2f32.powi(-10),
        DType::BF16 => 2f32.powi(-7),
        _ => 2f32.powi(-22),
    }
}

/// Selection: the union over the batch, full capacity and a truncating one; indices and
/// count must equal the host's exactly.
pub fn check_selection<B: SparseKernels>(device: &B::Device, n: usize, batch: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let logits = stored((0..batch * n).map(|_| rng.random_range(-3.0f32..3.0)).collect(), dtype);
    let threshold = 1.5f32;
    let dev = to_device::<B, 2>(&logits, [batch, n], dtype, device);
    let mut out = Vec::new();
    let (_, total) = host::select_above_threshold(&logits, batch, n, threshold, n);
    for capacity in [n, (total / 2).max(1), total + 3] {
        let (want_idx, want_count) = host::select_above_threshold(&logits, batch, n, threshold, capacity);
        let sel = crate::select_above_threshold(dev.clone(), threshold, capacity).expect("capacity ≥ 1");
        let case = format!("n {n} batch {batch} capacity {capacity} {dtype:?} seed {seed}");
        out.push(selection_outcome("select_above_threshold", case, sel, &want_idx, want_count));
    }
    out
}

/// The row-wise argmax (greedy decoding's next token) of `[rows, width]` random values
/// against the host's first largest index, with each row's largest value planted twice
/// (at a random place and, where the row is long enough, one part of the kernel's split
/// further on), so that the first occurrence must win inside a cube and across parts; with
/// several rows, the first is all -∞.
pub fn check_argmax<B: SparseKernels>(device: &B::Device, rows: usize, width: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut values: Vec<f32> = (0..rows * width).map(|_| rng.random_range(-8.0f32..8.0)).collect();
    for r in 0..rows {
        let at = rng.random_range(0..width);
        values[r * width + at] = 9.5;
        values[r * width + (at + 1100).min(width - 1)] = 9.5;
    }
    // A row of -∞ (every logit masked) gives its first index.
    if rows > 1 {
        values[..width].fill(f32::NEG_INFINITY);
    }
    let values = stored(values, dtype);
    let want: Vec<i64> = values
        .chunks(width)
        .map(|row| row.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as i64)
        .collect();
    let outcome = |got: Vec<i64>, layout: &str| exact_outcome("argmax_rows", format!("rows {rows} width {width} {dtype:?}{layout} seed {seed}"), &got, &want);
    let got = read_ints(crate::argmax_rows(to_device::<B, 2>(&values, [rows, width], dtype, device)).expect("a non-empty row"));
    // Rows further apart than their width (as CUDA pitches a matmul's output rows), read in
    // place: the padding holds larger values, which a read past a row's end would pick.
    let pad = 24;
    let mut padded = vec![100.0f32; rows * (width + pad)];
    for (r, row) in values.chunks(width).enumerate() {
        padded[r * (width + pad)..r * (width + pad) + width].copy_from_slice(row);
    }
    let pitched = to_device::<B, 2>(&padded, [rows, width + pad], dtype, device).slice([0..rows, 0..width]);
    let got_pitched = read_ints(crate::argmax_rows(pitched).expect("a non-empty row"));
    vec![outcome(got, ""), outcome(got_pitched, ", rows pitched")]
}

/// The decoder's input rows (`embed_rows`) for `n` random ids into a `[vocab, d]` table,
/// with the position rows read as a view of consecutive rows of their own table (as the
/// model reads them), into f32 and into the tables' dtype, against the host's sum rounded
/// to the tables' dtype: exact, so the ratio is the number of elements that differ. With
/// several ids, the last is past the table (a zero row) and the first is the last row.
pub fn check_embed_rows<B: SparseKernels>(device: &B::Device, vocab: usize, d: usize, n: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (first, position_rows) = (3, n + 5);
    let table = stored(uniform(&mut rng, vocab * d, 0.0), dtype);
    let position_table = stored(uniform(&mut rng, position_rows * d, 0.0), dtype);
    let mut ids: Vec<i64> = (0..n).map(|_| rng.random_range(0..vocab as i64)).collect();
    if n > 1 {
        ids[0] = vocab as i64 - 1;
        ids[n - 1] = vocab as i64;
    }
    let sums: Vec<f32> = (0..n * d)
        .map(|i| {
            let (r, c) = (i / d, i % d);
            match ids[r] < vocab as i64 {
                true => table[ids[r] as usize * d + c] + position_table[(first + r) * d + c],
                false => 0.0,
            }
        })
        .collect();
    let want = stored(sums, dtype);
    let table_dev = to_device::<B, 2>(&table, [vocab, d], dtype, device);
    let positions = to_device::<B, 2>(&position_table, [position_rows, d], dtype, device).narrow(0, first, n);
    [DType::F32, dtype]
        .into_iter()
        .map(|out_dtype| {
            let got = read(crate::embed_rows(ints::<B>(&ids, device), table_dev.clone(), positions.clone(), out_dtype).expect("shapes were made consistent"));
            exact_outcome("embed_rows", format!("vocab {vocab} d {d} n {n} {dtype:?} into {out_dtype:?} seed {seed}"), &got, &want)
        })
        .collect()
}

/// An output that must equal the host's exactly: the ratio is the number of elements that
/// differ (a length mismatch counts one more).
fn exact_outcome<T: PartialEq>(op: &'static str, case: String, got: &[T], want: &[T]) -> Outcome {
    let mismatches = got.iter().zip(want).filter(|(a, b)| a != b).count() + usize::from(got.len() != want.len());
    Outcome {
        op,
        case,
        worst_ratio: mismatches as f32,
        worst_index: got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0),
        passed: mismatches == 0,
    }
}

/// A selection against the host's: every index and the count must be equal (the ratio is
/// the number of mismatches).
fn selection_outcome<B: Backend>(op: &'static str, case: String, got: crate::Selection<B>, want_idx: &[i64], want_count: usize) -> Outcome {
    let got_idx = read_ints(got.indices);
    let got_count = read_ints(got.count)[0];
    let mut outcome = exact_outcome(op, case, &got_idx, want_idx);
    if got_count as usize != want_count {
        outcome.worst_ratio += 1.0;
        outcome.passed = false;
    }
    outcome
}

/// A decode attention's random inputs: half the heads (or two) selected, slot 0 empty;
/// caches of `dims` `[batch, heads, cap, hd]`, the selected heads' queries, the scale.
struct AttentionInputs {
    heads: Vec<i64>,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
    scale: f32,
}

fn attention_inputs(rng: &mut StdRng, dims: [usize; 4], dtype: DType) -> AttentionInputs {
    let [batch, n_heads, cap, hd] = dims;
    let mut heads = random_indices(rng, n_heads, (n_heads / 2).max(2));
    heads[0] = n_heads as i64;
    let slots = heads.len();
    let k = stored(uniform(rng, batch * n_heads * cap * hd, 0.0), dtype);
    let v = stored(uniform(rng, batch * n_heads * cap * hd, 0.0), dtype);
    let q = stored(uniform(rng, batch * slots * hd, 0.0).into_iter().map(|x| 2.0 * x).collect(), dtype);
    AttentionInputs { heads, k, v, q, scale: 1.0 / (hd as f32).sqrt() }
}

/// Decode attention over selected heads (some repeated order, one empty slot) against the
/// host loop, on random caches of `[batch, heads, cap, hd]` with `len` valid positions.
pub fn check_attention<B: SparseKernels>(
    device: &B::Device,
    dims: [usize; 4],
    len: usize,
    dtype: DType,
    seed: u64,
) -> Vec<Outcome> {
    let [batch, n_heads, cap, hd] = dims;
    let mut rng = StdRng::seed_from_u64(seed);
    let AttentionInputs { heads, k, v, q, scale } = attention_inputs(&mut rng, dims, dtype);
    let slots = heads.len();
    let got = read(
        crate::selected_heads_attention(
            to_device::<B, 2>(&q, [batch, slots * hd], dtype, device),
            ints::<B>(&heads, device),
            to_device::<B, 4>(&k, dims, dtype, device),
            to_device::<B, 4>(&v, dims, dtype, device),
            len,
            scale,
        )
        .expect("consistent shapes"),
    );
    let want = host::selected_heads_attention(&q, &heads, &k, &v, dims, len, scale);
    let case = format!("batch {batch} heads {n_heads} cap {cap} hd {hd} len {len} slots {slots} {dtype:?} seed {seed}");
    vec![outcome("selected_heads_attention", case, dtype, &got, &want, &[])]
}

/// Row-wise LayerNorm against the host loop: rows with a large common offset (as OPT's
/// residuals have), so a one-pass `E[x²] − E[x]²` would fail the check.
pub fn check_layer_norm<B: SparseKernels>(device: &B::Device, rows: usize, d: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..rows * d)
        .map(|i| 40.0 * ((i / d) as f32 - 1.0) + 4.0 * rng.random_range(-1.0f32..1.0))
        .collect();
    let x = stored(x, dtype);
    let gamma = uniform(&mut rng, d, 0.0);
    let beta = uniform(&mut rng, d, 0.0);
    let eps = 1e-5;
    let got = read(
        crate::layer_norm(
            to_device::<B, 2>(&x, [rows, d], dtype, device),
            to_device::<B, 1>(&gamma, [d], DType::F32, device),
            to_device::<B, 1>(&beta, [d], DType::F32, device),
            eps,
        )
        .expect("consistent shapes"),
    );
    let want = host::layer_norm(&x, rows, d, &gamma, &beta, eps);
    let case = format!("rows {rows} d {d} {dtype:?} seed {seed}");
    let mut out = vec![outcome("layer_norm", case.clone(), dtype, &got, &want, &[])];
    if dtype != DType::F32 {
        // A residual stream kept in f32, normalized into `dtype`.
        let x32: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + 1e-3 * ((i % 7) as f32)).collect();
        let got = read(
            crate::layer_norm_to(
                to_device::<B, 2>(&x32, [rows, d], DType::F32, device),
                to_device::<B, 1>(&gamma, [d], DType::F32, device),
                to_device::<B, 1>(&beta, [d], DType::F32, device),
                eps,
                dtype,
            )
            .expect("consistent shapes"),
        );
        let want = host::layer_norm(&x32, rows, d, &gamma, &beta, eps);
        out.push(outcome("layer_norm: f32 in", case, dtype, &got, &want, &[]));
    }
    out
}

/// `kv_append` against the host GEMV: the new position holds the keys and values, every
/// other position keeps its poison.
pub fn check_kv_append<B: SparseKernels>(device: &B::Device, dims: [usize; 4], d: usize, pos: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let [batch, heads, cap, hd] = dims;
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = 2 * heads * hd;
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let x = stored(uniform(&mut rng, batch * d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, rows, 0.0), dtype);
    let poison = -777.0f32;
    let cache = || Tensor::<B, 4>::full(dims, poison, (device, dtype));
    let kv_inputs = || {
        let w_dev = to_device::<B, 2>(&w, [rows, d], dtype, device);
        (w_dev, to_device::<B, 2>(&x, [batch, d], dtype, device), Some(to_device::<B, 1>(&bias, [rows], dtype, device)), cache(), cache())
    };
    let (w_dev, x_dev, bias_dev, k_cache, v_cache) = kv_inputs();
    let (k, v) = crate::kv_append(w_dev, x_dev, bias_dev, k_cache, v_cache, pos).expect("consistent shapes");
    let case = format!("batch {batch} heads {heads} cap {cap} hd {hd} d {d} pos {pos} {dtype:?} seed {seed}");
    let mut out = vec![kv_outcome("kv_append", &case, dims, pos, &w, &x, &bias, d, dtype, read(k), read(v), poison)];

    // The same with the queries in the launch: every head, then selected heads (in
    // random order, one empty slot) with a bias.
    let q_rows = heads * hd;
    let wq = stored(uniform(&mut rng, q_rows * d, 0.0), dtype);
    let bq = stored(uniform(&mut rng, q_rows, 0.0), dtype);
    let mut ids = random_indices(&mut rng, heads, heads.div_ceil(2).max(2));
    ids[0] = heads as i64;
    let rows_idx = host::block_rows(&ids, hd, q_rows);
    for selected in [false, true] {
        let query = crate::QueryRows {
            w: to_device::<B, 2>(&wq, [q_rows, d], dtype, device),
            heads: selected.then(|| ints::<B>(&ids, device)),
            head_dim: hd,
            bias: selected.then(|| to_device::<B, 1>(&bq, [q_rows], dtype, device)),
        };
        let (w_dev, x_dev, bias_dev, k_cache, v_cache) = kv_inputs();
        let (q, k, v) = crate::qkv_append(query, w_dev, x_dev, bias_dev, k_cache, v_cache, pos).expect("consistent shapes");
        let which = if selected { "qkv_append (selected heads)" } else { "qkv_append (every head)" };
        let want_q = match selected {
            true => host::rows_gemv(&wq, q_rows, d, Some(&rows_idx), &x, batch, Some(&bq), false),
            false => host::rows_gemv(&wq, q_rows, d, None, &x, batch, None, false),
        };
        out.push(outcome(which, case.clone(), dtype, &read(q), &want_q, &[]));
        out.push(kv_outcome(which, &case, dims, pos, &w, &x, &bias, d, dtype, read(k), read(v), poison));
    }
    out
}

/// `qkv_append_lazy` over `steps` decode steps from position 0 (batch 1, `heads` heads of
/// `hd`, ring of `window`), each step with its own input and a random selection (about
/// half the heads, in random order, one empty slot; the last head never selected, so it is
/// written only when its oldest position is about to leave the ring), against the host's
/// every-head keys and values: after each step, every head's positions below its
/// `pending` — all of them up to the step for a selected head — hold exactly the keys and
/// values an every-head write gives, the selected heads' `pending` is the next position,
/// no head's oldest unwritten position has left the ring, and the queries match.
///
/// With `norm_in` each step's input is an f32 residual (mean about 3) that the op
/// normalizes itself ([`crate::NormIn`]), with the next layer's first factor riding along:
/// the keys, values and queries are then checked against the host's f32 LayerNorm and
/// GEMVs, with a slack of the rounding of the LayerNorm's output to the weights' dtype
/// (the ring keeps it rounded; this step's rows fold `beta` in instead).
#[allow(clippy::too_many_arguments)] // the shape, the run and the case
pub fn check_qkv_lazy<B: SparseKernels>(
    device: &B::Device,
    heads: usize,
    hd: usize,
    d: usize,
    window: usize,
    steps: usize,
    norm_in: bool,
    dtype: DType,
    seed: u64,
) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = 2 * heads * hd;
    let q_rows = heads * hd;
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, rows, 0.0), dtype);
    let wq = stored(uniform(&mut rng, q_rows * d, 0.0), dtype);
    let bq = stored(uniform(&mut rng, q_rows, 0.0), dtype);
    let (gamma, beta, eps) = (uniform(&mut rng, d, 0.0), uniform(&mut rng, d, 0.0), 1e-5f32);
    let r = 5;
    let down = uniform(&mut rng, r * d, 0.0);
    let dims = [1, heads, steps, hd];
    let poison = -777.0f32;
    let mut k_cache = Tensor::<B, 4>::full(dims, poison, (device, dtype));
    let mut v_cache = Tensor::<B, 4>::full(dims, poison, (device, dtype));
    let mut state = crate::LazyKv::<B>::new(heads, d, window, 0, dtype, device);
    let form = if norm_in { ", LayerNorm in the launch" } else { "" };
    let case = format!("heads {heads} hd {hd} d {d} window {window} steps {steps}{form} {dtype:?} seed {seed}");
    let slack_of = |w: &[f32], n: usize, x: &[f32], idx: Option<&[i64]>| -> Vec<f32> {
        match norm_in {
            true => host::rows_gemv(&abs(w), n, d, idx, &abs(x), 1, None, false).iter().map(|s| storage_ulp(dtype) * s).collect(),
            false => vec![0.0; idx.map_or(n, <[i64]>::len)],
        }
    };
    // Every head's keys and values at every step, as an every-head write gives them.
    let (mut want_kv, mut slack_kv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (Vec::new(), Vec::new());
    let (mut got_all, mut want_all, mut slack_all) = (Vec::new(), Vec::new(), Vec::new());
    let (mut got_q, mut want_q, mut slack_q) = (Vec::new(), Vec::new(), Vec::new());
    let (mut got_first, mut want_first) = (Vec::new(), Vec::new());
    let mut state_ok = true;
    for pos in 0..steps {
        // The op's input, and the layer input it stands for (its LayerNorm, with `norm_in`).
        let (input, x) = match norm_in {
            true => {
                let residual: Vec<f32> = uniform(&mut rng, d, 0.0).into_iter().map(|v| 3.0 + 2.0 * v).collect();
                let x = host::layer_norm(&residual, 1, d, &gamma, &beta, eps);
                (residual, x)
            }
            false => {
                let x = stored(uniform(&mut rng, d, 0.0), dtype);
                (x.clone(), x)
            }
        };
        want_kv.push(host::rows_gemv(&w, rows, d, None, &x, 1, Some(&bias), false));
        slack_kv.push(slack_of(&w, rows, &x, None));
        let mut ids = random_indices(&mut rng, heads - 1, (heads / 2).max(1));
        ids.push(heads as i64);
        let (wq_dev, bq_dev) = (to_device::<B, 2>(&wq, [q_rows, d], dtype, device), to_device::<B, 1>(&bq, [q_rows], dtype, device));
        let (w_dev, bias_dev) = (to_device::<B, 2>(&w, [rows, d], dtype, device), to_device::<B, 1>(&bias, [rows], dtype, device));
        let (riders, input_dev) = match norm_in {
            true => {
                let norm = crate::NormIn { gamma: to_device::<B, 1>(&gamma, [d], DType::F32, device), beta: to_device::<B, 1>(&beta, [d], DType::F32, device), eps };
                let (q_fold, kv_fold) = (crate::RowFold::new(&wq_dev, &norm, Some(&bq_dev)), crate::RowFold::new(&w_dev, &norm, Some(&bias_dev)));
                let residual = to_device::<B, 2>(&input, [1, d], DType::F32, device);
                let first = crate::FirstFactor { down: to_device::<B, 2>(&down, [r, d], DType::F32, device), residual: residual.clone() };
                want_first.extend(host::rows_gemv(&down, r, d, None, &input, 1, None, false));
                ((Some(first), Some((norm, q_fold, kv_fold))), residual)
            }
            false => ((None, None), to_device::<B, 2>(&input, [1, d], dtype, device)),
        };
        let query = crate::QueryRows { w: wq_dev, heads: Some(ints::<B>(&ids, device)), head_dim: hd, bias: Some(bq_dev) };
        let (q, k, v, next, first) = crate::qkv_append_lazy(query, w_dev, input_dev, Some(bias_dev), k_cache, v_cache, pos, state, riders.0, riders.1)
            .expect("consistent shapes");
        match (norm_in, first) {
            (true, Some(first)) => got_first.extend(read(first)),
            (false, None) => {}
            _ => state_ok = false,
        }
        got_q.extend(read(q));
        let q_idx = host::block_rows(&ids, hd, q_rows);
        want_q.extend(host::rows_gemv(&wq, q_rows, d, Some(&q_idx), &x, 1, Some(&bq), false));
        slack_q.extend(slack_of(&wq, q_rows, &x, Some(&q_idx)));
        let pending = read_ints(next.pending.clone());
        let (k_now, v_now) = (read(k.clone()), read(v.clone()));
        for h in 0..heads {
            let first = pending[h] as usize;
            let selected = ids.contains(&(h as i64));
            if (selected && first != pos + 1) || first + window < pos + 2 || first > pos + 1 {
                state_ok = false;
            }
            for p in 0..first {
                for c in 0..hd {
                    let at = (h * steps + p) * hd + c;
                    got_all.extend([k_now[at], v_now[at]]);
                    want_all.extend([want_kv[p][h * hd + c], want_kv[p][q_rows + h * hd + c]]);
                    slack_all.extend([slack_kv[p][h * hd + c], slack_kv[p][q_rows + h * hd + c]]);
                }
            }
        }
        (k_cache, v_cache, state) = (k, v, next);
    }
    let mut kv = outcome("qkv_append_lazy (keys and values below pending)", case.clone(), dtype, &got_all, &want_all, &slack_all);
    kv.passed &= state_ok;
    let mut out = vec![kv, outcome("qkv_append_lazy (queries)", case.clone(), dtype, &got_q, &want_q, &slack_q)];
    if norm_in {
        out.push(outcome("qkv_append_lazy (first factor)", case, DType::F32, &got_first, &want_first, &[]));
    }
    out
}

/// The caches `kv_append` wrote against the host GEMV: the new position holds the keys
/// and values, every other position keeps its poison.
#[allow(clippy::too_many_arguments)] // the launch's inputs and what it wrote
fn kv_outcome(
    op: &'static str,
    case: &str,
    dims: [usize; 4],
    pos: usize,
    w: &[f32],
    x: &[f32],
    bias: &[f32],
    d: usize,
    dtype: DType,
    k: Vec<f32>,
    v: Vec<f32>,
    poison: f32,
) -> Outcome {
    let [batch, heads, cap, hd] = dims;
    let rows = 2 * heads * hd;
    let y = host::rows_gemv(w, rows, d, None, x, batch, Some(bias), false);
    let half = heads * hd;
    let mut got = Vec::new();
    let mut want = Vec::new();
    for b in 0..batch {
        for h in 0..heads {
            for p in 0..cap {
                for c in 0..hd {
                    let at = ((b * heads + h) * cap + p) * hd + c;
                    got.push(k[at]);
                    got.push(v[at]);
                    if p == pos {
                        want.push(y[b * rows + h * hd + c]);
                        want.push(y[b * rows + half + h * hd + c]);
                    } else {
                        want.push(poison);
                        want.push(poison);
                    }
                }
            }
        }
    }
    outcome(op, case.to_string(), dtype, &got, &want, &[])
}

/// The gated GEMV against the host GEMV with the gated-off rows zeroed (about a quarter of
/// the rows kept).
pub fn check_gated_rows_gemv<B: SparseKernels>(device: &B::Device, rows: usize, d: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let x = stored(uniform(&mut rng, d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, rows, 0.0), dtype);
    let gate: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let threshold = 0.5;
    let got = read(
        crate::gated_rows_gemv(
            to_device::<B, 2>(&w, [rows, d], dtype, device),
            to_device::<B, 2>(&x, [1, d], dtype, device),
            Some(to_device::<B, 1>(&bias, [rows], dtype, device)),
            crate::Activation::Relu,
            to_device::<B, 1>(&gate, [rows], DType::F32, device),
            threshold,
        )
        .expect("consistent shapes"),
    );
    let mut want = host::rows_gemv(&w, rows, d, None, &x, 1, Some(&bias), true);
    for (j, g) in gate.iter().enumerate() {
        if *g <= threshold {
            want[j] = 0.0;
        }
    }
    vec![outcome("gated_rows_gemv", format!("rows {rows} d {d} {dtype:?} seed {seed}"), dtype, &got, &want, &[])]
}

/// `out_proj` over selected heads (`block_cols_gemv`) against the host loop: `rows`
/// outputs of `heads` column blocks of `hd`, half of the heads picked (two of them empty
/// slots when there are 8 or more), with bias and residual, without the residual, and
/// over every column.
pub fn check_block_cols_gemv<B: SparseKernels>(
    device: &B::Device,
    rows: usize,
    heads: usize,
    hd: usize,
    batch: usize,
    dtype: DType,
    seed: u64,
) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = heads * hd;
    let idx = random_indices(&mut rng, heads, (heads / 2).max(1));
    let width = idx.len() * hd;
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let x = stored(uniform(&mut rng, batch * width, 0.0), dtype);
    let x_all = stored(uniform(&mut rng, batch * d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, rows, 0.0), dtype);
    let residual = stored(uniform(&mut rng, batch * rows, 0.0), dtype);
    let case = format!("rows {rows} heads {heads} hd {hd} batch {batch} picked {} {dtype:?} seed {seed}", idx.len());
    let run = |heads: Option<&[i64]>, x: &[f32], with_residual: bool| {
        let width = x.len() / batch;
        read(
            crate::block_cols_gemv(
                to_device::<B, 2>(&w, [rows, d], dtype, device),
                heads.map(|ids| (ints::<B>(ids, device), hd)),
                to_device::<B, 2>(x, [batch, width], dtype, device),
                Some(to_device::<B, 1>(&bias, [rows], dtype, device)),
                with_residual.then(|| to_device::<B, 2>(&residual, [batch, rows], dtype, device)),
            )
            .expect("consistent shapes"),
        )
    };
    let want = |heads: Option<&[i64]>, x: &[f32], with_residual: bool| {
        host::block_cols_gemv(&w, rows, d, heads, hd, x, batch, Some(&bias), with_residual.then_some(&residual[..]))
    };
    // An f32 residual (a residual stream kept in f32): the output is f32, not rounded.
    let residual32: Vec<f32> = residual.iter().enumerate().map(|(i, v)| v + 1e-3 * ((i % 5) as f32)).collect();
    let got32 = read(
        crate::block_cols_gemv(
            to_device::<B, 2>(&w, [rows, d], dtype, device),
            Some((ints::<B>(&idx, device), hd)),
            to_device::<B, 2>(&x, [batch, width], dtype, device),
            Some(to_device::<B, 1>(&bias, [rows], dtype, device)),
            Some(to_device::<B, 2>(&residual32, [batch, rows], DType::F32, device)),
        )
        .expect("consistent shapes"),
    );
    let want32 = host::block_cols_gemv(&w, rows, d, Some(&idx), hd, &x, batch, Some(&bias), Some(&residual32));
    vec![
        outcome("block_cols_gemv+bias+residual", case.clone(), dtype, &run(Some(&idx), &x, true), &want(Some(&idx), &x, true), &[]),
        outcome("block_cols_gemv+bias", case.clone(), dtype, &run(Some(&idx), &x, false), &want(Some(&idx), &x, false), &[]),
        outcome("block_cols_gemv+bias+f32 residual", case.clone(), DType::F32, &got32, &want32, &[]),
        outcome("block_cols_gemv (every column)", case, dtype, &run(None, &x_all, true), &want(None, &x_all, true), &[]),
    ]
}

/// `attention_out_proj_accumulate` (attention over the selected heads, some in repeated
/// order and one empty slot — slot 0, which adds the bias — then `out_proj` over their
/// columns, added into an f32 accumulator) against the host's attention and GEMV. The
/// host keeps the attention output in f32; a path that stores it in `dtype` between the
/// two (the reference, the two-kernel fallback) gets one ulp of it times the weights as
/// slack. Twice: the accumulator handed over, and still held by the caller (which must
/// not change).
pub fn check_attention_out_proj<B: SparseKernels, L: Launcher<B>>(
    launcher: &L,
    device: &B::Device,
    dims: [usize; 4],
    len: usize,
    rows: usize,
    dtype: DType,
    seed: u64,
) -> Vec<Outcome> {
    let [batch, n_heads, cap, hd] = dims;
    let mut rng = StdRng::seed_from_u64(seed);
    let AttentionInputs { heads, k, v, q, scale } = attention_inputs(&mut rng, dims, dtype);
    let slots = heads.len();
    let d = n_heads * hd;
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, rows, 0.0), dtype);
    let acc = uniform(&mut rng, batch * rows, 0.0);
    let o = host::selected_heads_attention(&q, &heads, &k, &v, dims, len, scale);
    let want = host::block_cols_gemv(&w, rows, d, Some(&heads), hd, &o, batch, Some(&bias), Some(&acc));
    let ulp = storage_ulp(dtype);
    let slack: Vec<f32> = host::block_cols_gemv(&abs(&w), rows, d, Some(&heads), hd, &abs(&o), batch, None, None).iter().map(|s| ulp * s).collect();
    let case = format!("batch {batch} heads {n_heads} cap {cap} hd {hd} len {len} rows {rows} slots {slots} {dtype:?} seed {seed}");
    let mut out = Vec::new();
    for handed_over in [true, false] {
        let acc_dev = to_device::<B, 2>(&acc, [batch, rows], DType::F32, device);
        let kept = (!handed_over).then(|| acc_dev.clone());
        let got = launcher.attention_out_proj_accumulate(
            (
                to_device::<B, 2>(&q, [batch, slots * hd], dtype, device),
                ints::<B>(&heads, device),
                to_device::<B, 4>(&k, dims, dtype, device),
                to_device::<B, 4>(&v, dims, dtype, device),
            ),
            len,
            scale,
            (to_device::<B, 2>(&w, [rows, d], dtype, device), Some(to_device::<B, 1>(&bias, [rows], dtype, device))),
            acc_dev,
        );
        match kept {
            None => out.push(outcome("attention_out_proj_accumulate", case.clone(), DType::F32, &read(got), &want, &slack)),
            Some(kept) => {
                out.push(outcome("attention_out_proj_accumulate (held)", case.clone(), DType::F32, &read(got), &want, &slack));
                out.push(outcome("attention_out_proj_accumulate: the caller's accumulator kept", case.clone(), DType::F32, &read(kept), &acc, &[]));
            }
        }
    }
    out
}

/// The decode-step predictor kernels against host loops: the mixed-dtype GEMV (f32
/// weights `[r, d]` reading an `x` stored in `dtype`, f32 out: the predictor's first
/// factor), fc1 gated by the predictor's logits computed in the same launch
/// (`predicted_rows_gemv`, `rows × d` in `dtype`), and head selection from the predictor
/// in one launch (`predict_select`, `heads` rows, three capacities), these two with the
/// predictor in f32 and in `dtype`. Thresholds sit in the widest gap between the middle
/// logits, so rounding cannot move a row across.
pub fn check_predictor_kernels<B: SparseKernels>(
    device: &B::Device,
    rows: usize,
    d: usize,
    r: usize,
    heads: usize,
    dtype: DType,
    seed: u64,
) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let case = format!("rows {rows} d {d} r {r} heads {heads} {dtype:?} seed {seed}");

    // First factor: f32 weights, x in `dtype`.
    let down = uniform(&mut rng, r * d, 0.0);
    let x = stored(uniform(&mut rng, d, 0.0), dtype);
    let x_dev = to_device::<B, 2>(&x, [1, d], dtype, device);
    let got = crate::gemv(to_device::<B, 2>(&down, [r, d], DType::F32, device), x_dev.clone(), None, Activation::Identity)
        .expect("consistent shapes");
    let got_dtype = got.dtype();
    let got = read(got);
    let want = host::rows_gemv(&down, r, d, None, &x, 1, None, false);
    let mut o = outcome("gemv (f32 weights, x stored in the model dtype)", case.clone(), DType::F32, &got, &want, &[]);
    if got_dtype != DType::F32 {
        o.passed = false;
    }
    out.push(o);

    // Second factor fused into fc1, then heads: predictor and selection in one cube; the
    // predictor in f32 and, for a half-precision model, also stored as the model is.
    let h: Vec<f32> = uniform(&mut rng, r, 0.0);
    let h_dev = to_device::<B, 2>(&h, [1, r], DType::F32, device);
    let w = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, rows, 0.0), dtype);
    let up_values = uniform(&mut rng, rows * r, 0.0);
    let up_heads_values = uniform(&mut rng, heads * r, 0.0);
    for p_dtype in predictor_dtypes(dtype) {
        let p_case = format!("{case} predictor {p_dtype:?}");
        let up = stored(up_values.clone(), p_dtype);
        let logits = host::rows_gemv(&up, rows, r, None, &h, 1, None, false);
        let threshold = threshold_in_gap(&logits);
        let got = read(
            crate::predicted_rows_gemv(
                to_device::<B, 2>(&w, [rows, d], dtype, device),
                x_dev.clone(),
                Some(to_device::<B, 1>(&bias, [rows], dtype, device)),
                Activation::Relu,
                to_device::<B, 2>(&up, [rows, r], p_dtype, device),
                h_dev.clone(),
                threshold,
            )
            .expect("consistent shapes"),
        );
        let mut want = host::rows_gemv(&w, rows, d, None, &x, 1, Some(&bias), true);
        for (j, l) in logits.iter().enumerate() {
            if *l <= threshold {
                want[j] = 0.0;
            }
        }
        out.push(outcome("predicted_rows_gemv", p_case.clone(), dtype, &got, &want, &[]));

        let up_heads = stored(up_heads_values.clone(), p_dtype);
        let logits = host::rows_gemv(&up_heads, heads, r, None, &h, 1, None, false);
        let threshold = threshold_in_gap(&logits);
        let up_dev = to_device::<B, 2>(&up_heads, [heads, r], p_dtype, device);
        let (_, total) = host::select_above_threshold(&logits, 1, heads, threshold, heads);
        for capacity in [heads, (total / 2).max(1), total + 3] {
            let (want_idx, want_count) = host::select_above_threshold(&logits, 1, heads, threshold, capacity);
            let sel = crate::predict_select(up_dev.clone(), h_dev.clone(), threshold, capacity).expect("consistent shapes");
            out.push(selection_outcome("predict_select", format!("{p_case} capacity {capacity}"), sel, &want_idx, want_count));
        }
    }
    out
}

/// The decode step's whole sparse MLP from its predictor (`predicted_mlp`: predictor,
/// selection, fc1, fc2 and the residual) against the host loops: fc1 over every row with
/// the rows at or below the threshold zeroed, then fc2 over the hidden values (ReLU's
/// zeros included), plus bias and residual. Neurons `rows`, width `d`, rank `r`; the
/// predictor in f32 and, for a half-precision model, in `dtype`.
pub fn check_predicted_mlp<B: SparseKernels>(device: &B::Device, rows: usize, d: usize, r: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let case = format!("rows {rows} d {d} r {r} {dtype:?} seed {seed}");
    let w1 = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let b1 = stored(uniform(&mut rng, rows, 0.0), dtype);
    let w2_t = stored(uniform(&mut rng, rows * d, 0.0), dtype);
    let b2 = stored(uniform(&mut rng, d, 0.0), dtype);
    let x = stored(uniform(&mut rng, d, 0.0), dtype);
    let residual = stored(uniform(&mut rng, d, 0.0), dtype);
    let h: Vec<f32> = uniform(&mut rng, r, 0.0);
    let up_values = uniform(&mut rng, rows * r, 0.0);
    let mut out = Vec::new();
    for p_dtype in predictor_dtypes(dtype) {
        let up = stored(up_values.clone(), p_dtype);
        let logits = host::rows_gemv(&up, rows, r, None, &h, 1, None, false);
        let threshold = threshold_in_gap(&logits);
        let mut hidden = host::rows_gemv(&w1, rows, d, None, &x, 1, Some(&b1), true);
        for (j, l) in logits.iter().enumerate() {
            if *l <= threshold {
                hidden[j] = 0.0;
            }
        }
        let want = host::add(&host::rows_transposed_gemv(&w2_t, rows, d, None, &hidden, 1, Some(&b2)), &residual);
        let weights = crate::MlpWeights {
            w1: to_device::<B, 2>(&w1, [rows, d], dtype, device),
            b1: Some(to_device::<B, 1>(&b1, [rows], dtype, device)),
            w2_t: to_device::<B, 2>(&w2_t, [rows, d], dtype, device),
            b2: Some(to_device::<B, 1>(&b2, [d], dtype, device)),
        };
        let got = read(
            crate::predicted_mlp(
                weights,
                to_device::<B, 2>(&x, [1, d], dtype, device),
                Some(to_device::<B, 2>(&residual, [1, d], dtype, device)),
                to_device::<B, 2>(&up, [rows, r], p_dtype, device),
                to_device::<B, 2>(&h, [1, r], DType::F32, device),
                threshold,
            )
            .expect("consistent shapes"),
        );
        // The reference path stores the hidden values in `dtype` (the CubeCL kernel keeps
        // them in f32 on chip).
        let slack = hidden_rounding_slack(&w2_t, rows, d, None, &hidden, 1, dtype);
        out.push(outcome("predicted_mlp", format!("{case} predictor {p_dtype:?}"), dtype, &got, &want, &slack));
    }
    out
}

/// `norm_predict` (LayerNorm + a predictor's first factor + a head selection in one
/// launch) against the host's LayerNorm, GEMV and selection, with and without the
/// selection. The residual is stored in `dtype`, the predictors in f32 and in `dtype`.
pub fn check_norm_predict<B: SparseKernels>(device: &B::Device, d: usize, r: usize, heads: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = stored((0..d).map(|_| 3.0 + 4.0 * rng.random_range(-1.0f32..1.0)).collect(), dtype);
    let (gamma, beta) = (uniform(&mut rng, d, 0.0), uniform(&mut rng, d, 0.0));
    let down_values = uniform(&mut rng, r * d, 0.0);
    let (up_values, h) = (uniform(&mut rng, heads * r, 0.0), uniform(&mut rng, r, 0.0));
    let eps = 1e-5;
    let want_normed = host::layer_norm(&x, 1, d, &gamma, &beta, eps);
    let mut out = Vec::new();
    for (p_dtype, with_select) in predictor_dtypes(dtype).into_iter().flat_map(|p| [(p, true), (p, false)]) {
        let case = format!("d {d} r {r} heads {heads} {dtype:?} predictor {p_dtype:?} seed {seed}");
        let (down, up) = (stored(down_values.clone(), p_dtype), stored(up_values.clone(), p_dtype));
        let logits = host::rows_gemv(&up, heads, r, None, &h, 1, None, false);
        let threshold = threshold_in_gap(&logits);
        let want_first = host::rows_gemv(&down, r, d, None, &x, 1, None, false);
        let select = with_select.then(|| crate::HeadSelect {
            up: to_device::<B, 2>(&up, [heads, r], p_dtype, device),
            h: to_device::<B, 2>(&h, [1, r], DType::F32, device),
            threshold,
            capacity: heads,
        });
        let got = crate::norm_predict(
            to_device::<B, 2>(&x, [1, d], dtype, device),
            to_device::<B, 1>(&gamma, [d], DType::F32, device),
            to_device::<B, 1>(&beta, [d], DType::F32, device),
            eps,
            to_device::<B, 2>(&down, [r, d], p_dtype, device),
            select,
        )
        .expect("consistent shapes");
        let which = if with_select { "with selection" } else { "without selection" };
        out.push(outcome("norm_predict: LayerNorm", format!("{case} {which}"), dtype, &read(got.normed), &want_normed, &[]));
        if dtype != DType::F32 && !with_select {
            // A residual stream kept in f32, normalized into `dtype`; the first factor
            // reads the f32 residual.
            let x32: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + 1e-3 * ((i % 7) as f32)).collect();
            let got = crate::norm_predict_to(
                to_device::<B, 2>(&x32, [1, d], DType::F32, device),
                to_device::<B, 1>(&gamma, [d], DType::F32, device),
                to_device::<B, 1>(&beta, [d], DType::F32, device),
                eps,
                to_device::<B, 2>(&down, [r, d], p_dtype, device),
                None,
                dtype,
            )
            .expect("consistent shapes");
            let want_normed32 = host::layer_norm(&x32, 1, d, &gamma, &beta, eps);
            let want_first32 = host::rows_gemv(&down, r, d, None, &x32, 1, None, false);
            out.push(outcome("norm_predict: LayerNorm, f32 in", case.clone(), dtype, &read(got.normed), &want_normed32, &[]));
            out.push(outcome("norm_predict: first factor, f32 in", case.clone(), DType::F32, &read(got.first), &want_first32, &[]));
        }
        out.push(outcome("norm_predict: first factor", format!("{case} {which}"), DType::F32, &read(got.first), &want_first, &[]));
        match (got.selection, with_select) {
            (Some(sel), true) => {
                let (want_idx, want_count) = host::select_above_threshold(&logits, 1, heads, threshold, heads);
                out.push(selection_outcome("norm_predict: selection", case.clone(), sel, &want_idx, want_count));
            }
            (None, false) => {}
            (got, _) => out.push(Outcome {
                op: "norm_predict: selection",
                case: format!("{case}: a selection was {}asked for but {}returned", if with_select { "" } else { "not " }, if got.is_some() { "" } else { "not " }),
                worst_ratio: f32::INFINITY,
                worst_index: 0,
                passed: false,
            }),
        }
    }
    out
}

/// The predictor dtypes the checks take for a model stored in `dtype`: f32 always, and
/// the model's own half type (what a half-precision sparse decode reads).
fn predictor_dtypes(dtype: DType) -> Vec<DType> {
    if dtype == DType::F32 { vec![DType::F32] } else { vec![DType::F32, dtype] }
}

/// A threshold halfway across the widest gap between consecutive sorted values of the
/// middle half, so about half lie above it and none near it.
fn threshold_in_gap(values: &[f32]) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n < 2 {
        return v.first().map(|x| x - 1.0).unwrap_or(0.0);
    }
    let (lo, hi) = (n / 4, (3 * n / 4).max(n / 4 + 1).min(n - 1));
    let i = (lo.max(1)..=hi).max_by(|&a, &b| (v[a] - v[a - 1]).total_cmp(&(v[b] - v[b - 1]))).unwrap_or(1);
    (v[i] + v[i - 1]) / 2.0
}

/// A seed that differs from run to run (tests print it, so a failure can be replayed).
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Whether a CubeCL device can store `dtype` (lavapipe, for one, has no f16).
pub fn cube_supports<R: CubeRuntime>(device: &R::Device, dtype: DType) -> bool {
    use cubecl::prelude::{Runtime, StorageType};
    let client = <R as Runtime>::client(device);
    let storage: StorageType = dtype.into();
    client.properties().supports_type(storage)
}

/// The LayerNorms written by the launch that finishes the residual and the predictors that
/// ride in the next launches ([`crate::attention_out_proj_accumulate_norm`],
/// [`crate::accumulate_transposed_gemv_norm`], [`crate::predicted_rows_gemv_with`],
/// [`crate::qkv_append_first`]), batch 1, against host loops: the residual and its
/// LayerNorm (each accumulating op run twice with one counter, which must come back to 0
/// each time: the second run's LayerNorm needs it), fc1 with the next layer's first factor
/// and head selection, and the queries with the next layer's attention first factor. The
/// residual has a mean of about 3, so the LayerNorm's centring matters. `heads × hd = d`,
/// `len` positions of `cap`.
#[allow(clippy::too_many_arguments)] // the model's shape and the case
pub fn check_norms_ahead<B: SparseKernels>(device: &B::Device, heads: usize, hd: usize, ffn: usize, r: usize, cap: usize, len: usize, dtype: DType, seed: u64) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = heads * hd;
    let eps = 1e-5;
    let case = format!("d {d} heads {heads} ffn {ffn} r {r} len {len} {dtype:?} seed {seed}");
    let (gamma, beta) = (uniform(&mut rng, d, 0.0), uniform(&mut rng, d, 0.0));
    let norm = |done: &Tensor<B, 1, Int>| crate::NormAfter {
        gamma: to_device::<B, 1>(&gamma, [d], DType::F32, device),
        beta: to_device::<B, 1>(&beta, [d], DType::F32, device),
        eps,
        dtype,
        done: done.clone(),
    };
    let residual: Vec<f32> = uniform(&mut rng, d, 0.0).into_iter().map(|v| 3.0 + 2.0 * v).collect();
    let mut out = Vec::new();
    let done = crate::NormAfter::<B>::counter(device);
    let counter_outcome = |op: &'static str, done: &Tensor<B, 1, Int>| {
        let left = read_ints::<B>(done.clone());
        Outcome { op, case: format!("{case}: counter left at {left:?}"), worst_ratio: if left == [0] { 0.0 } else { f32::INFINITY }, worst_index: 0, passed: left == [0] }
    };

    // Attention with out_proj into the residual, its LayerNorm from the last cube.
    let dims = [1, heads, cap, hd];
    let AttentionInputs { heads: ids, k, v, q, scale } = attention_inputs(&mut rng, dims, dtype);
    let slots = ids.len();
    let w = stored(uniform(&mut rng, d * d, 0.0), dtype);
    let bias = stored(uniform(&mut rng, d, 0.0), dtype);
    let o = host::selected_heads_attention(&q, &ids, &k, &v, dims, len, scale);
    let want = host::block_cols_gemv(&w, d, d, Some(&ids), hd, &o, 1, Some(&bias), Some(&residual));
    let want_normed = host::layer_norm(&want, 1, d, &gamma, &beta, eps);
    let slack: Vec<f32> = host::block_cols_gemv(&abs(&w), d, d, Some(&ids), hd, &abs(&o), 1, None, None).iter().map(|s| storage_ulp(dtype) * s).collect();
    for run in ["first run", "second run"] {
        let (acc, normed) = crate::attention_out_proj_accumulate_norm(
            to_device::<B, 2>(&q, [1, slots * hd], dtype, device),
            ints::<B>(&ids, device),
            to_device::<B, 4>(&k, dims, dtype, device),
            to_device::<B, 4>(&v, dims, dtype, device),
            len,
            scale,
            to_device::<B, 2>(&w, [d, d], dtype, device),
            Some(to_device::<B, 1>(&bias, [d], dtype, device)),
            to_device::<B, 2>(&residual, [1, d], DType::F32, device),
            norm(&done),
        )
        .expect("consistent shapes");
        out.push(outcome("attention_out_proj_accumulate_norm: residual", format!("{case} {run}"), DType::F32, &read(acc), &want, &slack));
        out.push(outcome("attention_out_proj_accumulate_norm: LayerNorm", format!("{case} {run}"), dtype, &read(normed), &want_normed, &[]));
    }
    out.push(counter_outcome("attention_out_proj_accumulate_norm: counter", &done));

    // fc2 over every row (90% of h zero) into the residual, its LayerNorm from the last cube.
    let w_t = stored(uniform(&mut rng, ffn * d, 0.0), dtype);
    let h = stored(uniform(&mut rng, ffn, 0.9), dtype);
    let b2 = stored(uniform(&mut rng, d, 0.0), dtype);
    let want = host::add(&host::rows_transposed_gemv(&w_t, ffn, d, None, &h, 1, Some(&b2)), &residual);
    let want_normed = host::layer_norm(&want, 1, d, &gamma, &beta, eps);
    for run in ["first run", "second run"] {
        let (acc, normed) = crate::accumulate_transposed_gemv_norm(
            to_device::<B, 2>(&residual, [1, d], DType::F32, device),
            to_device::<B, 2>(&w_t, [ffn, d], dtype, device),
            to_device::<B, 2>(&h, [1, ffn], dtype, device),
            Some(to_device::<B, 1>(&b2, [d], dtype, device)),
            norm(&done),
        )
        .expect("consistent shapes");
        out.push(outcome("accumulate_transposed_gemv_norm: residual", format!("{case} {run}"), DType::F32, &read(acc), &want, &[]));
        out.push(outcome("accumulate_transposed_gemv_norm: LayerNorm", format!("{case} {run}"), dtype, &read(normed), &want_normed, &[]));
    }
    out.push(counter_outcome("accumulate_transposed_gemv_norm: counter", &done));

    // fc1 gated by its predictor, with the next layer's MLP first factor and head selection.
    let w1 = stored(uniform(&mut rng, ffn * d, 0.0), dtype);
    let b1 = stored(uniform(&mut rng, ffn, 0.0), dtype);
    let x = stored(uniform(&mut rng, d, 0.0), dtype);
    let (up, hf) = (uniform(&mut rng, ffn * r, 0.0), uniform(&mut rng, r, 0.0));
    let logits = host::rows_gemv(&up, ffn, r, None, &hf, 1, None, false);
    let threshold = threshold_in_gap(&logits);
    let dense = host::rows_gemv(&w1, ffn, d, None, &x, 1, Some(&b1), true);
    let want_h: Vec<f32> = dense.iter().zip(&logits).map(|(v, l)| if *l > threshold { *v } else { 0.0 }).collect();
    let down = uniform(&mut rng, r * d, 0.0);
    let want_first = host::rows_gemv(&down, r, d, None, &residual, 1, None, false);
    let (sel_up, sel_h) = (uniform(&mut rng, heads * r, 0.0), uniform(&mut rng, r, 0.0));
    let sel_logits = host::rows_gemv(&sel_up, heads, r, None, &sel_h, 1, None, false);
    let sel_threshold = threshold_in_gap(&sel_logits);
    let got = crate::predicted_rows_gemv_with(
        to_device::<B, 2>(&w1, [ffn, d], dtype, device),
        to_device::<B, 2>(&x, [1, d], dtype, device),
        Some(to_device::<B, 1>(&b1, [ffn], dtype, device)),
        Activation::Relu,
        to_device::<B, 2>(&up, [ffn, r], DType::F32, device),
        to_device::<B, 2>(&hf, [1, r], DType::F32, device),
        threshold,
        Some(crate::FirstFactor { down: to_device::<B, 2>(&down, [r, d], DType::F32, device), residual: to_device::<B, 2>(&residual, [1, d], DType::F32, device) }),
        Some(crate::HeadSelect { up: to_device::<B, 2>(&sel_up, [heads, r], DType::F32, device), h: to_device::<B, 2>(&sel_h, [1, r], DType::F32, device), threshold: sel_threshold, capacity: heads }),
    )
    .expect("consistent shapes");
    out.push(outcome("predicted_rows_gemv_with: fc1", case.clone(), dtype, &read(got.out), &want_h, &[]));
    match (got.first, got.selection) {
        (Some(first), Some(sel)) => {
            out.push(outcome("predicted_rows_gemv_with: first factor", case.clone(), DType::F32, &read(first), &want_first, &[]));
            let (want_idx, want_count) = host::select_above_threshold(&sel_logits, 1, heads, sel_threshold, heads);
            out.push(selection_outcome("predicted_rows_gemv_with: head selection", case.clone(), sel, &want_idx, want_count));
        }
        _ => out.push(Outcome { op: "predicted_rows_gemv_with", case: format!("{case}: a rider asked for was not returned"), worst_ratio: f32::INFINITY, worst_index: 0, passed: false }),
    }

    // The queries of the selected heads with the next layer's attention first factor.
    let wq = stored(uniform(&mut rng, d * d, 0.0), dtype);
    let kv = stored(uniform(&mut rng, 2 * d * d, 0.0), dtype);
    let rows_idx = host::block_rows(&ids, hd, d);
    let query = crate::QueryRows { w: to_device::<B, 2>(&wq, [d, d], dtype, device), heads: Some(ints::<B>(&ids, device)), head_dim: hd, bias: None };
    let (q_got, _, _, first) = crate::qkv_append_first(
        query,
        to_device::<B, 2>(&kv, [2 * d, d], dtype, device),
        to_device::<B, 2>(&x, [1, d], dtype, device),
        None,
        Tensor::<B, 4>::zeros(dims, (device, dtype)),
        Tensor::<B, 4>::zeros(dims, (device, dtype)),
        len.min(cap - 1),
        crate::FirstFactor { down: to_device::<B, 2>(&down, [r, d], DType::F32, device), residual: to_device::<B, 2>(&residual, [1, d], DType::F32, device) },
        None,
    )
    .expect("consistent shapes");
    out.push(outcome("qkv_append_first: queries", case.clone(), dtype, &read(q_got), &host::rows_gemv(&wq, d, d, Some(&rows_idx), &x, 1, None, false), &[]));
    out.push(outcome("qkv_append_first: first factor", case.clone(), DType::F32, &read(first), &want_first, &[]));

    // qkv_append applying the LayerNorm of the f32 residual itself (`NormIn`, the rows'
    // folds holding beta · W and the bias): against the host's LayerNorm in f32, then the
    // GEMVs. The slack covers the rounding of the LayerNorm (less its beta) to the
    // weights' dtype, which both forms do.
    let normed = host::layer_norm(&residual, 1, d, &gamma, &beta, eps);
    let norm_in = crate::NormIn { gamma: to_device::<B, 1>(&gamma, [d], DType::F32, device), beta: to_device::<B, 1>(&beta, [d], DType::F32, device), eps };
    let (bq, bkv) = (stored(uniform(&mut rng, d, 0.0), dtype), stored(uniform(&mut rng, 2 * d, 0.0), dtype));
    let (wq_dev, bq_dev) = (to_device::<B, 2>(&wq, [d, d], dtype, device), to_device::<B, 1>(&bq, [d], dtype, device));
    let (kv_dev, bkv_dev) = (to_device::<B, 2>(&kv, [2 * d, d], dtype, device), to_device::<B, 1>(&bkv, [2 * d], dtype, device));
    let (q_fold, kv_fold) = (crate::RowFold::new(&wq_dev, &norm_in, Some(&bq_dev)), crate::RowFold::new(&kv_dev, &norm_in, Some(&bkv_dev)));
    let query = crate::QueryRows { w: wq_dev, heads: Some(ints::<B>(&ids, device)), head_dim: hd, bias: Some(bq_dev) };
    let pos = len.min(cap - 1);
    let (q_got, k_got, v_got, first) = crate::qkv_append_first(
        query,
        kv_dev,
        to_device::<B, 2>(&residual, [1, d], DType::F32, device),
        Some(bkv_dev),
        Tensor::<B, 4>::zeros(dims, (device, dtype)),
        Tensor::<B, 4>::zeros(dims, (device, dtype)),
        pos,
        crate::FirstFactor { down: to_device::<B, 2>(&down, [r, d], DType::F32, device), residual: to_device::<B, 2>(&residual, [1, d], DType::F32, device) },
        Some((norm_in, q_fold, kv_fold)),
    )
    .expect("consistent shapes");
    let want_q = host::rows_gemv(&wq, d, d, Some(&rows_idx), &normed, 1, Some(&bq), false);
    let slack_q: Vec<f32> = host::rows_gemv(&abs(&wq), d, d, Some(&rows_idx), &abs(&normed), 1, None, false).iter().map(|s| storage_ulp(dtype) * s).collect();
    out.push(outcome("qkv_append_first, LayerNorm in the launch: queries", case.clone(), dtype, &read(q_got), &want_q, &slack_q));
    let kv_vals = host::rows_gemv(&kv, 2 * d, d, None, &normed, 1, Some(&bkv), false);
    let kv_slack: Vec<f32> = host::rows_gemv(&abs(&kv), 2 * d, d, None, &abs(&normed), 1, None, false).iter().map(|s| storage_ulp(dtype) * s).collect();
    // Position `pos` of every head's row in the caches (the rest stays 0).
    let at_pos = |cache: Vec<f32>| -> Vec<f32> { (0..heads).flat_map(|h| cache[(h * cap + pos) * hd..(h * cap + pos + 1) * hd].to_vec()).collect() };
    out.push(outcome("qkv_append_first, LayerNorm in the launch: keys", case.clone(), dtype, &at_pos(read(k_got)), &kv_vals[..d], &kv_slack[..d]));
    out.push(outcome("qkv_append_first, LayerNorm in the launch: values", case.clone(), dtype, &at_pos(read(v_got)), &kv_vals[d..], &kv_slack[d..]));
    out.push(outcome("qkv_append_first, LayerNorm in the launch: first factor", case, DType::F32, &read(first), &want_first, &[]));
    out
}
